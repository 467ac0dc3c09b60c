"""Message bodies of DATA and BDAT, streamed into the spool as they arrive.

A reader is fed the bytes that follow the command; `feed()` returns None while
it wants more, or the bytes that came after the body (the next pipelined
commands).  Each reader writes into a spool `Incoming` file and never keeps
more than one line in memory, so a 200 MB message costs a few kB of RAM.

Each reader ends in one verdict, read once at the end (`problem`): None when
the message may be committed, else the Reply that refuses it.  Problems do
not stop the reading: the rest of the body is consumed and discarded so the
session stays in step with the client [RFC 5321 4.2.5].

DATA rules we apply:

- The body ends only at ``<CRLF>.<CRLF>`` [RFC 5321 4.1.1.4].  ``<LF>.<LF>``,
  ``<LF>.<CRLF>`` and ``<CR>.<CR>`` are not ends (SMTP smuggling,
  CVE-2023-51764 class): they are data.
- A leading dot is removed (dot-unstuffing) [4.5.2].
- Bare CR and bare LF are not allowed in SMTP text [2.3.8]; rather than
  refuse mail from old scripts and printers, we store each as CRLF, so that
  what we store and relay is well-formed.  That never creates an end of data.
- A line over 1000 octets with its CRLF [4.5.3.1.6] refuses the message.
- Past the size limit nothing more is written and the message is refused
  with 552 5.3.4 [RFC 1870].
- More Received headers than the limit refuses it as a loop (554 5.4.6) [6.3].

BDAT [RFC 3030] chunks are raw octets: exactly `size` of them, no
unstuffing, no line rules; only the size and loop limits apply.
"""

from __future__ import annotations

import re

from mta import reply
from mta.reply import Reply
from mta.spool.store import Incoming

MAX_LINE = 1000  # octets including CRLF [RFC 5321 4.5.3.1.6]
_HEADER_SCAN_LIMIT = 256 * 1024  # stop looking for Received headers this far into a message
_FROM = re.compile(rb"from[ \t]*:", re.IGNORECASE)
_FROM_LIMIT = 4096  # characters of a From: field kept (it names the signing domain)


class _HeaderScanner:
    """Counts Received: header fields in the header section (up to the first empty line).

    With `want_from` set (DKIM signing may apply: signing.py), it also keeps the
    first From: field, unfolded, so that the signing domain is known without
    reading the message back."""

    def __init__(self) -> None:
        self.received = 0
        self.message_id: str | None = None
        self.want_from = False
        self.from_field: str | None = None
        self._in_from = False  # the last line was (part of) the first From: field
        self.in_header = True
        self.at_line_start = True
        self.scanned = 0
        self.pending = b""

    def scan(self, data: bytes) -> None:
        if not self.in_header:
            return
        self.scanned += len(data)
        if self.scanned > _HEADER_SCAN_LIMIT:
            self.in_header = False
            return
        data = self.pending + data
        lines = data.split(b"\n")
        self.pending = lines.pop()
        for line in lines:
            line = line.rstrip(b"\r")
            if not line:
                self.in_header = False
                return
            if self.want_from:
                self._from(line)
            if line[:9].lower() == b"received:":
                self.received += 1
            elif line[:11].lower() == b"message-id:" and self.message_id is None:
                self.message_id = line[11:].strip().decode("utf-8", "replace")[:300]
        if len(self.pending) > MAX_LINE * 4:
            self.pending = self.pending[:16]

    def _from(self, line: bytes) -> None:
        if self._in_from and line[:1] in (b" ", b"\t"):  # a folded continuation [RFC 5322 2.2.3]
            if len(self.from_field or "") < _FROM_LIMIT:
                self.from_field = (self.from_field or "") + line.decode("utf-8", "replace")
            return
        self._in_from = False
        if self.from_field is None and _FROM.match(line):
            self.from_field = line.split(b":", 1)[1].decode("utf-8", "replace")
            self._in_from = True


class BodyReader:
    """What DATA and BDAT readers share: the spool file, the limits, the verdict."""

    def __init__(self, incoming: Incoming, max_size: int, max_received: int) -> None:
        self.incoming = incoming
        self.max_size = max_size
        self.max_received = max_received
        self.headers = _HeaderScanner()
        self.too_big = False
        self.line_too_long = False
        self.write_error: OSError | None = None  # the spool file could not take more
        # What we wrote ourselves (the Received header) does not count against the client.
        self.base = incoming.size

    @property
    def size(self) -> int:
        """Octets of the message as the client sent it."""
        return self.incoming.size - self.base

    def _store(self, data: bytes) -> None:
        if self.too_big or self.write_error or not data:
            return
        if self.size + len(data) > self.max_size:
            self.too_big = True
            return
        self.headers.scan(data)
        try:
            self.incoming.write(data)
        except OSError as e:
            # A full disk: read the rest of the body, then refuse it.
            self.write_error = e

    @property
    def problem(self) -> Reply | None:
        if self.write_error is not None:
            return reply.spool_error(self.write_error)
        if self.too_big:
            return reply.MESSAGE_TOO_BIG
        if self.line_too_long:
            return reply.DATA_LINE_TOO_LONG
        if self.headers.received > self.max_received:
            return reply.LOOP_DETECTED
        return None


class DataReader(BodyReader):
    """The body of DATA, up to ``<CRLF>.<CRLF>``."""

    def __init__(self, incoming: Incoming, max_size: int, max_received: int) -> None:
        super().__init__(incoming, max_size, max_received)
        self.partial = b""  # an incomplete line carried to the next feed
        self.prev_crlf = True  # the previous line ended in CRLF (or this is the first line)
        self.continuing = False  # `partial` is the tail of an over-long line already dropped

    def feed(self, data: bytes) -> bytes | None:
        buf = self.partial + data if self.partial else data
        if self.prev_crlf and not self.continuing:
            # Fast path for the usual last chunk: plain lines, then <CRLF>.<CRLF>.
            end = buf.find(b"\r\n.\r\n")
            if end >= 0 and self._is_plain(buf[:end + 2]):
                self._store(buf[:end + 2])
                self.partial = b""
                return buf[end + 5:]
        end = buf.rfind(b"\n") + 1
        if end == 0:
            self._hold_partial(buf)
            return None
        region, rest = buf[:end], buf[end:]
        if self._is_plain(region) and not self.continuing:
            # Fast path: only CRLF lines, none starts with a dot, none too long.
            self._store(region)
            self.prev_crlf = True
            self._hold_partial(rest)
            return None
        return self._feed_lines(region, rest)

    def _is_plain(self, region: bytes) -> bool:
        crlf = region.count(b"\r\n")
        return (crlf == region.count(b"\n") == region.count(b"\r")
                and self.prev_crlf and not region.startswith(b".")
                and b"\n." not in region and max(map(len, region.split(b"\n"))) < MAX_LINE)

    def _feed_lines(self, region: bytes, rest: bytes) -> bytes | None:
        start = 0
        while start < len(region):
            nl = region.index(b"\n", start)
            line = region[start:nl + 1]
            start = nl + 1
            crlf = line.endswith(b"\r\n")
            if self.continuing:
                self.continuing = False
                self.prev_crlf = crlf
                continue
            if crlf and line == b".\r\n" and self.prev_crlf:
                self.partial = b""
                return region[start:] + rest
            self._line(line, crlf)
        self._hold_partial(rest)
        return None

    def _line(self, line: bytes, crlf: bool) -> None:
        if len(line) > MAX_LINE:
            self.line_too_long = True
        if line.startswith(b"."):
            line = line[1:]
        content = line[:-2] if crlf else line[:-1]
        if b"\r" in content:
            # Bare CRs inside the line: each becomes a line break of its own.
            content = content.replace(b"\r", b"\r\n")
        self._store(content + b"\r\n")
        self.prev_crlf = crlf

    def _hold_partial(self, rest: bytes) -> None:
        if len(rest) > MAX_LINE + 1:
            # Too long to be a line: refuse the message, keep only what the
            # end-of-line and dot checks still need, never the whole line.
            self.line_too_long = True
            self.continuing = True
            rest = rest[-1:]
        self.partial = rest


class ChunkReader(BodyReader):
    """One BDAT chunk: exactly `size` octets, appended to the transaction's file."""

    def __init__(self, body: BodyReader | None, incoming: Incoming, chunk_size: int,
                 max_size: int, max_received: int, discard: bool = False) -> None:
        super().__init__(incoming, max_size, max_received)
        if body is not None:
            # Carry the verdict of earlier chunks of the same message.
            self.headers = body.headers
            self.too_big = body.too_big
            self.write_error = body.write_error
            self.base = body.base
        self.chunk_size = chunk_size
        self.remaining = chunk_size
        self.discard = discard  # the command was refused: read the octets, keep nothing

    def feed(self, data: bytes) -> bytes | None:
        take, rest = data[: self.remaining], data[self.remaining :]
        self.remaining -= len(take)
        if not self.discard:
            self._store(take)
        return rest if self.remaining == 0 else None
