"""Completing submitted messages: Date:, Message-ID: and From: where they are missing.

RFC 6409 8 lets a submission server (MSA) complete a message its user's
program left bare: add Date: [8.3], Message-ID: [8.3] and, where From: is
missing, an originator [8.1 names Sender:; a From: made of the envelope
sender is what MSAs do, and RFC 5322 3.6 requires From:].  It applies to
mail from our own users only: submission listeners, authenticated sessions
and local `sendmail`, never to port-25 mail from the outside, which a relay
passes on as it came [RFC 5321 6.4, RFC 6409 8].

`HeaderCompletion` sits between a body reader and the spool file.  It looks
at header lines only (the header section is short; the body passes straight
through, untouched and unscanned) and writes the missing fields at the end
of the header section, before the empty line.  A first line that is not a
header field means the message has no header section: the fields are
written first, then an empty line, so the text becomes the body.  A header
section longer than `HEADER_LIMIT` is passed on as it is.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

HEADER_LIMIT = 256 * 1024  # octets of header section we look at before giving up

# A header field's first line: a name of printable ASCII but ":", then ":" [RFC 5322 2.2].
_FIELD = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")
_WANTED = (b"date", b"message-id", b"from")


class HeaderCompletion:
    """Writes a message into a spool `Incoming`, adding the fields it lacks.

    It has the `write(data)` and `size` a body reader needs; `size` counts what
    the client sent (and what was in the file before), not what we add, so that
    size limits apply to the client's octets only.  `finish()` must be called
    once the body is complete, before the commit.
    """

    def __init__(self, incoming: Any, hostname: str, author: str | None,
                 clock: Callable[[], float]) -> None:
        self.incoming = incoming
        self.hostname = hostname
        self.author = author  # the address for a From: we add; None: add none
        self.clock = clock
        self.size = incoming.size
        self.seen: set[bytes] = set()
        self.open = True  # still inside the header section
        self.pending = b""  # an incomplete header line, not yet written
        self.scanned = 0
        self.added: list[str] = []  # names of the fields we added, for tests and logs

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if not self.open:
            self.incoming.write(data)
            return
        buf = self.pending + data if self.pending else data
        start = 0
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            line = buf[start:nl]
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line or not (line[:1] in (b" ", b"\t") or _FIELD.match(line)):
                # The empty line, or text that is no header field: the header section ends.
                self.incoming.write(buf[:start])
                self.incoming.write(self._missing(body_follows=bool(line)))
                self.incoming.write(buf[start:])
                self._close()
                return
            name = line.split(b":", 1)[0].strip().lower()
            if name in _WANTED:
                self.seen.add(name)
            start = nl + 1
        self.incoming.write(buf[:start])
        self.pending = buf[start:]
        self.scanned += start
        if self.scanned + len(self.pending) > HEADER_LIMIT:
            self.incoming.write(self.pending)  # no end in sight: leave the message as it is
            self._close()

    def finish(self) -> None:
        """The body is complete: a message that was all header gets its fields at the end."""
        if not self.open:
            return
        if self.pending:
            self.incoming.write(self.pending)
            if not self.pending.endswith(b"\n"):
                self.incoming.write(b"\r\n")
        self.incoming.write(self._missing(body_follows=False))
        self._close()

    def _close(self) -> None:
        self.open = False
        self.pending = b""

    def _missing(self, body_follows: bool) -> bytes:
        fields = []
        if b"date" not in self.seen:
            now = datetime.fromtimestamp(self.clock(), UTC).astimezone()
            fields.append(f"Date: {format_datetime(now)}")
        if b"message-id" not in self.seen:
            fields.append(f"Message-ID: <{self.incoming.queue_id}@{self.hostname}>")
        if b"from" not in self.seen and self.author:
            fields.append(f"From: <{self.author}>")
        self.added = [f.split(":", 1)[0] for f in fields]
        if not fields:
            return b""
        text = "".join(f + "\r\n" for f in fields) + ("\r\n" if body_follows else "")
        return text.encode("utf-8")
