"""The header section on its way to the spool: completed for our users, filtered for others.

Submitted mail: RFC 6409 8 lets a submission server (MSA) complete a message its user's
program left bare: add Date: [8.3], Message-ID: [8.3] and, where From: is
missing, an originator [8.1 names Sender:; a From: made of the envelope
sender is what MSAs do, and RFC 5322 3.6 requires From:].  It applies to
mail from our own users only: submission listeners, authenticated sessions
and local `sendmail`, never to port-25 mail from the outside, which a relay
passes on as it came [RFC 5321 6.4, RFC 6409 8].

`HeaderEditor` is what both share: it sits between a body reader and the
spool file and looks at the header section only (it is short; the body
passes straight through, untouched and unscanned), one whole field at a
time, folded lines together [RFC 5322 2.2.3], so that a field can be kept
or left out as a whole.  A first line that is not a header field means the
message has no header section.

`HeaderCompletion` writes the missing fields at the end of the header
section, before the empty line (or, with no header section, first, then an
empty line, so the text becomes the body).  A header section longer than
`HEADER_LIMIT` is passed on as it is.

`ResultsFilter`, on port 25 for the mail the inbound checks look at
(mta/checks/), leaves out every ``Authentication-Results`` field that
claims our authserv-id [RFC 8601 5] (other hosts' are kept), and notes what
the checks need from the header: the ``From:`` fields and whether there is
a ``DKIM-Signature``.  It reads the whole header section, however long,
holding one field at a time (at most `FIELD_LIMIT` octets of it; a longer
field is decided on its first `FIELD_LIMIT` octets, and a From: that long is
noted as unreadable: DMARC gives it permerror).  For it only the empty
line ends the header section: a line of text among the fields (a misplaced
mbox ``From `` line, say) is kept and the fields after it are still looked
at, because the programs that read the stored message (Dovecot, and Python's
email for a ``From `` line) go on reading fields there, and a forged field
hidden behind such a line would reach them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from mta.checks.authresults import authserv_id_of
from mta.datefield import mail_date

HEADER_LIMIT = 256 * 1024  # octets of header section HeaderCompletion looks at before giving up
FIELD_LIMIT = 64 * 1024  # octets of one field held at a time
MAX_FROM_FIELDS = 10  # more than one is already wrong [RFC 5322 3.6]; keep a few for the log

# A header field's first line: a name of printable ASCII but ":", then ":" [RFC 5322 2.2].
_FIELD = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")
_WANTED = (b"date", b"message-id", b"from")


class HeaderEditor:
    """Writes a message into a spool `Incoming`, deciding on each header field.

    It has the `write(data)` and `size` a body reader needs; `size` counts what
    the client sent (and what was in the file before), not what is added or
    left out, so that size limits apply to the client's octets only.
    `finish()` must be called once the body is complete, before the commit.
    Subclasses say what to do with a field (`keep`) and what to add at the
    end of the header section (`ending`).
    """

    limit: int | None = None  # octets of header section looked at; None: all of it
    # Whether a line that is neither a field nor empty ends the header section (RFC 5322
    # 2.2 has no such line in it).  Readers differ: Python's email stops there, Dovecot
    # reads on to the empty line, and both skip a misplaced "From " line.
    text_ends_header = True

    def __init__(self, incoming: Any) -> None:
        self.incoming = incoming
        self.size = incoming.size
        self.open = True  # still inside the header section
        self.pending = b""  # an incomplete line, not yet written
        self.field = b""  # the complete lines of the field being read
        self.name = b""  # its name, lower case
        self.decided: bool | None = None  # a long field decided early: keep (True) or drop
        self.midline: bool | None = None  # inside a long line already decided: keep or drop
        self.scanned = 0

    # -- what subclasses decide -------------------------------------------------

    def keep(self, name: bytes, field: bytes) -> bool:
        """Whether the field `name` (lower case; `field` its lines) goes into the message."""
        return True

    def ending(self, body_follows: bool) -> bytes:
        """What to write at the end of the header section."""
        return b""

    # -- the stream ---------------------------------------------------------------

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if not self.open:
            self.incoming.write(data)
            return
        if self.midline is not None:
            data = self._rest_of_line(data)
            if not data:
                return
        buf = self.pending + data if self.pending else data
        out: list[bytes] = []
        start = 0
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            line = buf[start:nl + 1]
            content = line[:-2] if line.endswith(b"\r\n") else line[:-1]
            if content[:1] in (b" ", b"\t"):
                self._continue(line, out)
            elif content and _FIELD.match(content):
                self._field_done(out)
                self.field, self.name = line, _name(content)
            elif content and not self.text_ends_header:
                self._field_done(out)
                out.append(line)  # kept as it is; the header section goes on
            else:
                # The empty line, or text that is no header field: the header section ends.
                self._field_done(out)
                out += [self.ending(body_follows=bool(content)), buf[start:]]
                self._write(out)
                self._close()
                return
            start = nl + 1
        self.pending = buf[start:]
        self.scanned += start
        if self.limit is not None and self.scanned + len(self.pending) > self.limit:
            # No end in sight: leave the rest of the message as it is.
            self._field_done(out)
            self._write([*out, self.pending])
            self._close()
            return
        if len(self.pending) > FIELD_LIMIT:
            self._long_line(out)
        self._write(out)

    def _long_line(self, out: list[bytes]) -> None:
        """A line longer than FIELD_LIMIT and not yet complete (BDAT has no line limit):
        decide its field now on what we have, and let the rest of the line follow."""
        line, self.pending = self.pending, b""
        if line[:1] in (b" ", b"\t") and (self.field or self.decided is not None):
            if self.decided is None:
                self.decided = self.keep(self.name, self.field + line)
                if self.decided:
                    out.append(self.field)
                self.field = b""
        elif _FIELD.match(line):
            self._field_done(out)
            self.name = _name(line)
            self.decided = self.keep(self.name, line)
        elif self.text_ends_header:  # no field at all: the header section is over
            self._field_done(out)
            out.append(line)
            self._close()
            return
        else:  # a long line of text: kept, and the header section goes on
            self._field_done(out)
            self.decided = True
            self.name = b""
        if self.decided:
            out.append(line)
        self.midline = self.decided

    def _rest_of_line(self, data: bytes) -> bytes:
        """The bytes after the end of a long line; the line's own go where it was decided."""
        nl = data.find(b"\n")
        head = data if nl < 0 else data[:nl + 1]
        if self.midline:
            self.incoming.write(head)
        if nl < 0:
            return b""
        self.midline = None
        return data[nl + 1:]

    def _continue(self, line: bytes, out: list[bytes]) -> None:
        if not self.field and self.decided is None:
            out.append(line)  # a folded line with no field before it: pass it on
        elif self.decided is not None:
            if self.decided:
                out.append(line)  # the rest of a long field already decided
        else:
            self.field += line
            if len(self.field) > FIELD_LIMIT:
                self.decided = self.keep(self.name, self.field)
                if self.decided:
                    out.append(self.field)
                self.field = b""

    def _field_done(self, out: list[bytes]) -> None:
        if self.field and self.keep(self.name, self.field):
            out.append(self.field)
        self.field, self.decided = b"", None

    def _write(self, pieces: list[bytes]) -> None:
        data = b"".join(pieces)
        if data:
            self.incoming.write(data)

    def finish(self) -> None:
        """The body is complete: a message that was all header gets its ending at the end."""
        if self.open and self.midline is not None:  # a long last line without a line end
            if self.midline:
                self.incoming.write(b"\r\n")
            self.midline = None
        if self.open and self.pending:
            # The last line had no line end (BDAT): complete it, and read it as a line.
            size = self.size
            self.write(b"\r\n")
            self.size = size
        if not self.open:
            return
        out: list[bytes] = []
        self._field_done(out)
        out.append(self.ending(body_follows=False))
        self._write(out)
        self._close()

    def _close(self) -> None:
        self.open = False
        self.pending = self.field = b""


class HeaderCompletion(HeaderEditor):
    """Adds the Date:, Message-ID: and From: a submitted message lacks."""

    limit = HEADER_LIMIT

    def __init__(self, incoming: Any, hostname: str, author: str | None,
                 clock: Callable[[], float]) -> None:
        super().__init__(incoming)
        self.hostname = hostname
        self.author = author  # the address for a From: we add; None: add none
        self.clock = clock
        self.seen: set[bytes] = set()
        self.added: list[str] = []  # names of the fields we added, for tests and logs

    def keep(self, name: bytes, field: bytes) -> bool:
        if name in _WANTED:
            self.seen.add(name)
        return True

    def ending(self, body_follows: bool) -> bytes:
        fields = []
        if b"date" not in self.seen:
            fields.append(f"Date: {mail_date(self.clock())}")
        if b"message-id" not in self.seen:
            fields.append(f"Message-ID: <{self.incoming.queue_id}@{self.hostname}>")
        if b"from" not in self.seen and self.author:
            fields.append(f"From: <{self.author}>")
        self.added = [f.split(":", 1)[0] for f in fields]
        if not fields:
            return b""
        text = "".join(f + "\r\n" for f in fields) + ("\r\n" if body_follows else "")
        return text.encode("utf-8")


class ResultsFilter(HeaderEditor):
    """Leaves out Authentication-Results fields claiming `authserv_id`; notes From: and
    DKIM-Signature for the inbound checks."""

    text_ends_header = False  # only the empty line does (see the module's text)

    def __init__(self, incoming: Any, authserv_id: str) -> None:
        super().__init__(incoming)
        self.authserv_id = authserv_id.lower().rstrip(".")
        self.removed = 0  # Authentication-Results fields left out
        self.from_fields: list[str] = []  # the values of the From: fields, unfolded
        self.from_count = 0
        # A From: longer than FIELD_LIMIT is read only in part: which addresses it
        # names is unknown, and DMARC must not judge it by the part it read.
        self.from_too_long = False
        self.signatures = 0  # DKIM-Signature fields

    def keep(self, name: bytes, field: bytes) -> bool:
        if name == b"authentication-results":
            if authserv_id_of(_value(field)) == self.authserv_id:
                self.removed += 1
                return False
        elif name == b"from":
            self.from_count += 1
            if len(field) > FIELD_LIMIT:  # decided on its first FIELD_LIMIT octets
                self.from_too_long = True
            elif len(self.from_fields) < MAX_FROM_FIELDS:
                self.from_fields.append(_value(field))
        elif name == b"dkim-signature":
            self.signatures += 1
        return True


def _name(first_line: bytes) -> bytes:
    return first_line.split(b":", 1)[0].strip().lower()


def _value(field: bytes) -> str:
    """A field's value, unfolded [RFC 5322 2.2.3], as text (UTF-8 where it is [RFC 6532])."""
    value = field.split(b":", 1)[1] if b":" in field else b""
    return value.replace(b"\r\n", b"").replace(b"\n", b"").decode("utf-8", "replace").strip()
