"""Delivery status notifications [RFC 3464, RFC 3461 6], put back through the spool.

`send_report(spool, ...)` builds one ``multipart/report`` message about some
recipients of one queued message and injects it with `spool.inject`, from
the null reverse-path ``<>`` with ``Envelope.is_report`` set [RFC 5321
4.5.5].  It blocks on the disk: the scheduler calls it in a thread.

A report has three parts [RFC 3462]:

1. a human-readable explanation (text/plain, UTF-8);
2. the ``message/delivery-status`` fields: per message Reporting-MTA,
   Original-Envelope-Id, Received-From-MTA, Arrival-Date; per recipient
   Original-Recipient (from ORCPT), Final-Recipient, Action, Status,
   Remote-MTA, Diagnostic-Code, Last-Attempt-Date, Will-Retry-Until;
3. the original message: in full for failures unless RET=HDRS asked for
   headers only; headers only for delay and success reports [RFC 3461 4.3].

Internationalised originals (SMTPUTF8) get the RFC 6533 types
(``message/global-delivery-status``, ``message/global``,
``message/global-headers``).  The original is streamed from its spool
file, never read whole.

Who receives it (`report_recipient`): the recipient's own envelope sender
(a list member's is the list's owner [RFC 5321 3.10]), else the original
reverse-path, expanded through our aliases when it is local; never a
bounce of a bounce [RFC 3461 6.2, RFC 5321 6.1]: a failed report
(reverse-path ``<>``) goes to the postmaster as a "double bounce" when
`server.postmaster` is set, and a failed double bounce goes nowhere.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

from mta.datefield import mail_date
from mta.spool.envelope import Envelope, Recipient

if TYPE_CHECKING:
    from mta.aliases import Addresses
from mta.spool.store import Incoming, MessageData, Spool

FAILED, DELAYED, DELIVERED, RELAYED, EXPANDED = (
    "failed", "delayed", "delivered", "relayed", "expanded")
FAILURE, DELAY, SUCCESS = "failure", "delay", "success"  # report kinds

DOUBLE_BOUNCE = "double_bounce"  # Envelope.extra key of a report sent to the postmaster
REPORT_FOR = "report_for"  # Envelope.extra key: the queue id the report is about

_SUBJECTS = {
    FAILURE: "Undelivered Mail Returned to Sender",
    DELAY: "Delayed Mail (still being retried)",
    SUCCESS: "Successful Mail Delivery Report",
}
_LOG_KINDS = {FAILURE: "non-delivery", DELAY: "delay", SUCCESS: "delivery status"}


@dataclass(frozen=True)
class ReportLine:
    """One recipient in a report, with the action taken [RFC 3464 2.3.3]."""

    recipient: Recipient
    action: str  # failed | delayed | delivered | relayed | expanded


def log_kind(kind: str) -> str:
    return _LOG_KINDS[kind]


def report_recipient(envelope: Envelope, kind: str, postmaster: str,
                     recipient: Recipient | None = None) -> str | None:
    """Where a report about `recipient` (of `envelope`) goes, or None when it must not be sent."""
    sender = envelope.sender_for(recipient) if recipient is not None else envelope.reverse_path
    if sender:
        return sender
    # A message from <> is itself a report: never bounce a bounce.  Only a
    # failure earns a double bounce to the postmaster, and only once.
    if kind == FAILURE and postmaster and not envelope.extra.get(DOUBLE_BOUNCE):
        return postmaster
    return None


def send_report(spool: Spool, hostname: str, envelope: Envelope, data: MessageData, kind: str,
                lines: list[ReportLine], now: float, retry_until: float | None = None,
                postmaster: str = "", addresses: Addresses | None = None,
                sign: Callable[[Incoming], Any] | None = None) -> Envelope | None:
    """Build and inject one report about `lines` (recipients sharing one envelope
    sender); the committed report envelope, or None if none is due.  With
    `addresses`, a local report recipient is expanded as RCPT would; `sign` puts
    DKIM signatures in front of the report before it is committed (signing.py)."""
    if not lines:
        return None
    to = report_recipient(envelope, kind, postmaster, lines[0].recipient)
    if to is None:
        return None
    recipients = [Recipient(address=to)]
    if addresses is not None:
        found = addresses.resolve(to)
        if found.targets:
            recipients = recipients[0].expanded(found.targets, null_sender=True)
    utf8 = envelope.smtputf8 or not to.isascii() or \
        any(not line.recipient.address.isascii() for line in lines)
    full = kind == FAILURE and envelope.ret != "HDRS"
    eight_bit = utf8 or (full and envelope.body != "7BIT") or not _ascii(envelope, lines)
    report = Envelope(
        queue_id="",
        reverse_path="",
        recipients=recipients,
        arrival=now,
        protocol="LOCAL",
        body="8BITMIME" if eight_bit else "7BIT",
        smtputf8=utf8 and not all(r.address.isascii() for r in recipients),
        is_report=True,
        extra={REPORT_FOR: envelope.queue_id, **({DOUBLE_BOUNCE: True} if not envelope.reverse_path
                                                  else {})},
    )
    chunks = build_report(hostname, envelope, data, kind, lines, now, to,
                          retry_until=retry_until, utf8=utf8, full=full)
    spool.inject(report, chunks, before_commit=sign)
    return report


def build_report(hostname: str, envelope: Envelope, data: MessageData, kind: str,
                 lines: list[ReportLine], now: float, to: str, retry_until: float | None = None,
                 utf8: bool = False, full: bool = True) -> Iterator[bytes]:
    """The report message, CRLF line ends, as chunks (the original is streamed)."""
    # At most 70 characters [RFC 2046 5.1.1]: a long host name is cut, the unique part stays.
    boundary = f"{envelope.queue_id or 'report'}.{uuid.uuid4().hex}/{hostname}"[:70]
    status_type = "message/global-delivery-status" if utf8 else "message/delivery-status"
    report_type = "global-delivery-status" if utf8 else "delivery-status"
    yield _crlf(_top_headers(hostname, to, kind, now, boundary, report_type))
    yield _crlf(f"This is a MIME-encapsulated message.\n\n--{boundary}\n"
                "Content-Description: Notification\n"
                "Content-Type: text/plain; charset=utf-8\n"
                f"Content-Transfer-Encoding: {'8bit' if not _ascii(envelope, lines) else '7bit'}\n\n"
                f"{_human_text(hostname, envelope, kind, lines)}\n"
                f"--{boundary}\n"
                "Content-Description: Delivery report\n"
                f"Content-Type: {status_type}\n\n"
                f"{_status_fields(hostname, envelope, lines, now, retry_until, utf8)}\n"
                f"--{boundary}\n")
    yield from _original_part(envelope, data, full, utf8)
    yield _crlf(f"\n--{boundary}--\n")


def _top_headers(hostname: str, to: str, kind: str, now: float, boundary: str,
                 report_type: str) -> str:
    return (
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>\n"
        f"To: <{to}>\n"
        f"Subject: {_SUBJECTS[kind]}\n"
        f"Date: {mail_date(now)}\n"
        f"Message-ID: <{uuid.uuid4().hex}@{hostname}>\n"
        "Auto-Submitted: auto-replied\n"  # RFC 3834 5
        "MIME-Version: 1.0\n"
        f"Content-Type: multipart/report; report-type={report_type};\n"
        f"\tboundary=\"{boundary}\"\n\n"
    )


def _human_text(hostname: str, envelope: Envelope, kind: str, lines: list[ReportLine]) -> str:
    intro = {
        FAILURE: "Your message could not be delivered to the recipients below.\n"
                 "The reasons the receiving systems gave are shown with each of them.",
        DELAY: "Your message has not been delivered yet to the recipients below.\n"
               "Delivery will be tried again; you do not need to send it again.\n"
               "You will be told if it finally fails.",
        SUCCESS: "Your message was delivered to the recipients below, as you asked\n"
                 "to be told.",
    }[kind]
    out = [f"This is the mail system at {hostname}.", "", intro, ""]
    for line in lines:
        r = line.recipient
        out.append(f"<{r.address}>: {line.action}")
        if r.diagnostic and line.action != DELIVERED:
            where = f" (from {r.remote_mta})" if r.remote_mta else ""
            out.append(f"    {r.diagnostic}{where}")
    out.append("")
    return "\n".join(out)


def _status_fields(hostname: str, envelope: Envelope, lines: list[ReportLine], now: float,
                   retry_until: float | None, utf8: bool) -> str:
    fields = [f"Reporting-MTA: dns; {hostname}"]
    if envelope.queue_id:
        fields.append(f"X-Queue-ID: {envelope.queue_id}")
    if envelope.envid:
        fields.append(f"Original-Envelope-Id: {_one_line(envelope.envid)}")
    if envelope.client_helo:
        fields.append(f"Received-From-MTA: dns; {_one_line(envelope.client_helo)}")
    fields.append(f"Arrival-Date: {mail_date(envelope.arrival)}")
    blocks = ["\n".join(fields)]
    for line in lines:
        blocks.append(_recipient_fields(line, now, retry_until, utf8))
    return "\n\n".join(blocks) + "\n"


def _recipient_fields(line: ReportLine, now: float, retry_until: float | None, utf8: bool) -> str:
    r = line.recipient
    fields = []
    if r.orcpt:
        kind, _, address = r.orcpt.partition(";")
        fields.append(f"Original-Recipient: {kind.strip()};{_one_line(address.strip())}")
    address_type = "rfc822" if r.address.isascii() else "utf-8"  # RFC 6533 3
    fields.append(f"Final-Recipient: {address_type}; {r.address}")
    fields.append(f"Action: {line.action}")
    fields.append(f"Status: {_status(line)}")
    if r.remote_mta:
        fields.append(f"Remote-MTA: dns; {r.remote_mta}")
    if r.diagnostic:
        kind = "smtp" if r.remote_mta else "X-mta"
        fields.append(f"Diagnostic-Code: {kind}; {_one_line(r.diagnostic)}")
    fields.append(f"Last-Attempt-Date: {mail_date(r.updated or now)}")
    if line.action == DELAYED and retry_until is not None:
        fields.append(f"Will-Retry-Until: {mail_date(retry_until)}")
    return "\n".join(fields)


def _status(line: ReportLine) -> str:
    status = line.recipient.status
    if line.action in (DELIVERED, RELAYED, EXPANDED):
        return status if status and status.startswith("2") else "2.0.0"
    if line.action == DELAYED:
        return status if status and status.startswith("4") else "4.0.0"
    return status or "5.0.0"


def _original_part(envelope: Envelope, data: MessageData, full: bool, utf8: bool) -> Iterator[bytes]:
    if full:
        kind = "message/global" if utf8 else "message/rfc822"
        encoding = "8bit" if envelope.body != "7BIT" or utf8 else "7bit"
        description = "Undelivered Message"
    else:
        kind = "message/global-headers" if utf8 else "text/rfc822-headers"
        encoding = "8bit" if utf8 else "7bit"
        description = "Undelivered Message Headers"
    yield _crlf(f"Content-Description: {description}\nContent-Type: {kind}\n"
                f"Content-Transfer-Encoding: {encoding}\n\n")
    with data.open("rb") as source:
        yield from (_copy(source) if full else _headers_only(source))


def _copy(source: BinaryIO) -> Iterator[bytes]:
    last = b"\n"
    for chunk in iter(lambda: source.read(65536), b""):
        last = chunk
        yield chunk
    if not last.endswith(b"\n"):
        yield b"\r\n"


def _headers_only(source: BinaryIO) -> Iterator[bytes]:
    for line in iter(lambda: source.readline(65536), b""):
        if line in (b"\r\n", b"\n"):
            break
        yield line if line.endswith(b"\n") else line + b"\r\n"


def _ascii(envelope: Envelope, lines: list[ReportLine]) -> bool:
    return all(line.recipient.address.isascii() and (line.recipient.diagnostic or "").isascii()
               for line in lines)


def _one_line(text: str) -> str:
    return " ".join(text.split())



def _crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode("utf-8")
