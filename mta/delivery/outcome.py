"""What became of one recipient after one delivery attempt, and the one place that decides it.

An outcome is `Delivered`, `Deferred` (try again later) or `Failed` (final:
bounce).  Each carries the enhanced status code [RFC 3463] that goes into
the envelope and into any DSN, a diagnostic text, and the remote MTA that
gave it (None when the reason is ours: DNS, a refused connection, a local
mailbox).

`classify()` is the only function that turns a reply or an error into an
outcome.  Everything upstream (the scheduler, the bounce code) asks only
"is it final?": a 2xx reply delivers, a 4xx reply, a lost connection, a
timeout, a DNS failure or a local disk error defers, a 5xx reply fails
[RFC 5321 4.2.1, 4.5.4.1].

`DeliveryError` is how the delivery code reports a reason it found itself
(a null MX, a message too big for the next hop, a missing STARTTLS...): its
status code's class (4 or 5) makes it temporary or permanent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from twisted.internet import error as net_error
from twisted.python.failure import Failure

from mta.reply import Reply, printable


@dataclass(frozen=True)
class Outcome:
    status: str  # enhanced status code, e.g. "2.0.0", "4.4.1", "5.1.1"
    diagnostic: str  # the remote reply ("550 5.1.1 no such user") or our own reason
    remote_mta: str | None = None  # the host that replied; None for a local reason

    def __post_init__(self) -> None:
        # Outcomes reach the mail log and reports to senders; much of their text came
        # from the network (a reply, a TLS error naming a peer): one printable line.
        object.__setattr__(self, "diagnostic", printable(self.diagnostic))
        if self.remote_mta is not None:
            object.__setattr__(self, "remote_mta", printable(self.remote_mta, 255))

    @property
    def is_final(self) -> bool:
        return not isinstance(self, Deferred)

    @property
    def diagnostic_code(self) -> str:
        """The RFC 3464 2.3.6 Diagnostic-Code value: ``smtp; <reply>`` for a remote reply."""
        kind = "smtp" if self.remote_mta else "X-mta"
        return f"{kind}; {self.diagnostic}"


@dataclass(frozen=True)
class Delivered(Outcome):
    # True when the next hop offered DSN [RFC 3461 4.1]: the success report, if
    # any, is its job.  False: we send "relayed" (or "delivered" for a mailbox).
    dsn_passed: bool = False


@dataclass(frozen=True)
class Deferred(Outcome):
    pass


@dataclass(frozen=True)
class Failed(Outcome):
    pass


class DeliveryError(Exception):
    """A reason found by the delivery code; the status class (4/5) decides the outcome."""

    def __init__(self, status: str, text: str, remote_mta: str | None = None) -> None:
        super().__init__(f"{status} {text}")
        self.status = status
        self.text = text
        self.remote_mta = remote_mta


class ReplyError(Exception):
    """A negative reply to a command that decides for the whole session (greeting, EHLO, MAIL...)."""

    def __init__(self, reply: Reply, remote_mta: str | None = None, stage: str = "") -> None:
        super().__init__(str(reply))
        self.reply = reply
        self.remote_mta = remote_mta
        self.stage = stage


_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})\Z")


def status_of(reply: Reply) -> str:
    """The enhanced status of a reply, or the class default X.0.0 [RFC 3463 3.1]."""
    if reply.enhanced and _ENHANCED.match(reply.enhanced) and \
            reply.enhanced[0] == str(reply.code)[0]:
        return reply.enhanced
    return f"{str(reply.code)[0]}.0.0"


def reply_text(reply: Reply) -> str:
    """One printable line for logs and Diagnostic-Code: ``550 5.1.1 no such user``."""
    text = printable(" ".join(line.strip() for line in reply.lines if line.strip()))
    parts = [str(reply.code)]
    if reply.enhanced:
        parts.append(reply.enhanced)
    if text:
        parts.append(text)
    return " ".join(parts)


def classify(what: Reply | BaseException | Failure, remote_mta: str | None = None,
             dsn_passed: bool = False) -> Delivered | Deferred | Failed:
    """The outcome of a reply or an error: the one place that says final or not."""
    if isinstance(what, Failure):
        what = what.value
    if isinstance(what, ReplyError):
        return classify(what.reply, what.remote_mta or remote_mta)
    if isinstance(what, Reply):
        return _from_reply(what, remote_mta, dsn_passed)
    if isinstance(what, DeliveryError):
        kind = Failed if what.status.startswith("5") else Deferred
        return kind(what.status, what.text, what.remote_mta or remote_mta)
    status, text = _error_reason(what)
    # Whatever went wrong on the way (network, TLS, our disk) is never final:
    # the lifetime decides when to give up [RFC 5321 4.5.4.1].
    return Deferred(status, text, None)


def _from_reply(reply: Reply, remote_mta: str | None, dsn_passed: bool) -> Delivered | Deferred | Failed:
    status = status_of(reply)
    text = reply_text(reply)
    if 200 <= reply.code < 300:
        return Delivered(status, text, remote_mta, dsn_passed)
    if 400 <= reply.code < 500:
        return Deferred(status, text, remote_mta)
    if 500 <= reply.code < 600:
        return Failed(status, text, remote_mta)
    # 1xx/3xx where a completion was expected: the peer broke the protocol.
    return Deferred("4.5.0", f"unexpected reply: {text}", remote_mta)


def _error_reason(error: BaseException) -> tuple[str, str]:
    """(status, text) for an exception; RFC 3463 codes for network and system trouble."""
    if isinstance(error, net_error.ConnectionRefusedError):
        return "4.4.1", "connection refused"
    if isinstance(error, (net_error.TCPTimedOutError, net_error.TimeoutError)):
        return "4.4.1", "connection timed out"
    if isinstance(error, net_error.DNSLookupError):
        return "4.4.3", "host name lookup failed"
    if isinstance(error, (net_error.ConnectionDone, net_error.ConnectionLost)):
        return "4.4.2", "lost connection"
    if isinstance(error, net_error.ConnectError):
        return "4.4.1", f"cannot connect: {error}"
    if _is_tls_error(error):
        return "4.7.5", f"TLS failure: {error}"
    if isinstance(error, TimeoutError):
        return "4.4.2", "timed out"
    if isinstance(error, OSError):
        if error.errno in (28, 122):  # ENOSPC, EDQUOT
            return "4.3.1", f"mail system full: {error.strerror}"
        return "4.3.0", f"local error: {error.strerror or error}"
    return "4.3.0", f"local error: {error!r}"


def _is_tls_error(error: BaseException) -> bool:
    try:
        from OpenSSL import SSL
    except ImportError:  # pragma: no cover
        return False
    return isinstance(error, SSL.Error)
