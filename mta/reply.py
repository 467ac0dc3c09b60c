"""SMTP replies: one value type and the catalogue of every text we send.

A `Reply` is a three-digit code, an optional enhanced status code (RFC 3463 /
RFC 5248) and one or more text lines.  `render()` gives the wire form with
``250-`` continuation lines [RFC 5321 4.2.1] and the enhanced code on every
line when the session negotiated ENHANCEDSTATUSCODES [RFC 2034 3].

Reply texts live here and nowhere else, so that tests compare against the
same constants the server sends.
"""

from __future__ import annotations

import errno
import functools
from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    code: int
    enhanced: str | None
    lines: tuple[str, ...]

    def __init__(self, code: int, enhanced: str | None, *lines: str) -> None:
        object.__setattr__(self, "code", code)
        object.__setattr__(self, "enhanced", enhanced)
        object.__setattr__(self, "lines", tuple(lines) or ("",))

    @property
    def text(self) -> str:
        return " ".join(self.lines)

    @property
    def is_positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def with_text(self, *lines: str) -> Reply:
        return Reply(self.code, self.enhanced, *lines)

    def render(self, enhanced: bool = True) -> bytes:
        """Wire form, CRLF-terminated, continuation lines for multi-line replies.

        Kept once made: most replies are constants of the catalogue below, sent
        again and again.  (Beside the fields, so equality and hashing ignore it.)"""
        key = "_wire" if enhanced else "_wire_plain"
        wire = self.__dict__.get(key)
        if wire is None:
            wire = self.__dict__[key] = self._render(enhanced)
        return wire

    def _render(self, enhanced: bool) -> bytes:
        out = []
        last = len(self.lines) - 1
        for i, line in enumerate(self.lines):
            sep = " " if i == last else "-"
            if enhanced and self.enhanced:
                text = f"{self.enhanced} {line}" if line else self.enhanced
            else:
                text = line
            out.append(f"{self.code}{sep}{text}".rstrip(" ") + "\r\n")
        return "".join(out).encode("utf-8", "replace")

    def __str__(self) -> str:
        return self.render().decode("utf-8", "replace").rstrip("\r\n")


def printable(text: str, limit: int = 1000) -> str:
    """Text from the network (a peer's reply, a HELO name) made fit for a log line or a
    report: control characters become "?", and it is cut at `limit` characters."""
    text = text[:limit]
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else "?" for c in text)


# -- the catalogue ---------------------------------------------------------
# Grouped by when they are sent.  Functions build the replies that carry data.

@functools.lru_cache(maxsize=64)
def greeting(hostname: str) -> Reply:
    """One Reply per hostname (a reload may change it), rendered once (`Reply.render`)."""
    return Reply(220, None, f"{hostname} ESMTP mta ready")


@functools.lru_cache(maxsize=64)
def closing(hostname: str) -> Reply:
    return Reply(221, "2.0.0", f"{hostname} closing connection")


def helo_ok(hostname: str, client: str) -> Reply:
    return Reply(250, None, f"{hostname} hello {client}")


OK = Reply(250, "2.0.0", "OK")
NOOP_OK = Reply(250, "2.0.0", "OK")
RESET_OK = Reply(250, "2.0.0", "reset")
SENDER_OK = Reply(250, "2.1.0", "sender OK")
RECIPIENT_OK = Reply(250, "2.1.5", "recipient OK")
START_DATA = Reply(354, None, "End data with <CR><LF>.<CR><LF>")


def queued(queue_id: str) -> Reply:
    return Reply(250, "2.0.0", f"OK queued as {queue_id}")


def chunk_ok(size: int) -> Reply:
    return Reply(250, "2.0.0", f"{size} octets received")


VRFY_CANNOT = Reply(252, "2.5.2", "cannot VRFY user, but will accept message and attempt delivery")
EXPN_DISABLED = Reply(502, "5.5.1", "EXPN not available")

# 4xx
TIMEOUT = Reply(421, "4.4.2", "timeout exceeded, closing connection")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "too many errors, closing connection")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "too many connections, try again later")
TOO_MANY_FROM_CLIENT = Reply(421, "4.7.0", "too many connections from your address, try again later")
TOO_MANY_FROM_NETWORK = Reply(421, "4.7.0", "too many connections from your network, try again later")
CONNECTING_TOO_FAST = Reply(421, "4.7.0", "too many connections from your address in the last "
                                           "minute, try again later")
EARLY_TALKER = Reply(554, "5.5.0", "protocol violation: talked before the greeting")
LOCAL_ERROR_CLOSING = Reply(421, "4.3.0", "local error, closing connection")
LOCAL_ERROR = Reply(451, "4.3.0", "local error in processing; try again later")
SPOOL_ERROR = Reply(451, "4.3.0", "local error in processing, message not accepted")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "too many recipients")
INSUFFICIENT_STORAGE = Reply(452, "4.3.1", "insufficient system storage")


def spool_error(error: BaseException) -> Reply:
    """The reply when the spool could not take a message: 452 4.3.1 for a full disk or
    quota [RFC 3463 3.4], else 451 4.3.0."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return INSUFFICIENT_STORAGE
    return SPOOL_ERROR

# 5xx: syntax and ordering [RFC 5321 4.2.4, 4.1.4]
UNKNOWN_COMMAND = Reply(500, "5.5.1", "command not recognized")
LINE_TOO_LONG = Reply(500, "5.5.2", "line too long")
BAD_BYTES = Reply(500, "5.5.2", "command contains invalid characters")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "command not implemented")
BAD_SEQUENCE = Reply(503, "5.5.1", "bad sequence of commands")
NEED_HELO = Reply(503, "5.5.1", "send HELO/EHLO first")
NEED_MAIL = Reply(503, "5.5.1", "need MAIL command first")
NEED_RCPT = Reply(503, "5.5.1", "need RCPT before DATA")
NESTED_MAIL = Reply(503, "5.5.1", "sender already specified")
NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "no valid recipients")
MIXED_DATA_BDAT = Reply(503, "5.5.1", "DATA and BDAT cannot be mixed in one transaction")
PARAM_NOT_SUPPORTED = Reply(504, "5.5.4", "parameter not supported")


def syntax_error(why: str, enhanced: str = "5.5.4") -> Reply:
    return Reply(501, enhanced, why)


def bad_parameter(why: str) -> Reply:
    return Reply(501, "5.5.4", why)


def unknown_parameter(name: str) -> Reply:
    return Reply(555, "5.5.4", f"{name} parameter not recognized")


MESSAGE_TOO_BIG = Reply(552, "5.3.4", "message size exceeds fixed maximum message size")
DATA_LINE_TOO_LONG = Reply(500, "5.5.2", "message has a line longer than 1000 octets")
LOOP_DETECTED = Reply(554, "5.4.6", "too many Received headers: mail loop")
NON_ASCII_WITHOUT_SMTPUTF8 = Reply(553, "5.6.7", "non-ASCII address requires SMTPUTF8")
BAD_SENDER = Reply(501, "5.1.7", "bad sender address syntax")
BAD_RECIPIENT = Reply(501, "5.1.3", "bad recipient address syntax")
RELAY_DENIED = Reply(554, "5.7.1", "relay access denied")
NO_SUCH_USER = Reply(550, "5.1.1", "no such user here")
ALIAS_LOOP = Reply(550, "5.4.6", "alias loop: this address leads back to itself")
VRFY_AMBIGUOUS = Reply(553, "5.1.4", "user ambiguous")
NOT_A_LIST = Reply(550, "5.1.1", "no such list here")
AUTH_REQUIRED = Reply(530, "5.7.0", "authentication required")


# -- trust: STARTTLS and AUTH ------------------------------------------------
# Appended by the trust work (mta/server/auth.py, mta/server/tls.py).

class ContinueRequest(Reply):
    """A 334 continuation [RFC 4954 4]: ``"334" SP [base64] CRLF``.

    The space stays even when the challenge is empty (PLAIN without an initial
    response), which `Reply.render` would strip; 334 never carries an
    enhanced status code.
    """

    def render(self, enhanced: bool = True) -> bytes:
        return f"334 {self.lines[0]}\r\n".encode("ascii")


def auth_challenge(base64_text: str) -> Reply:
    return ContinueRequest(334, None, base64_text)


# STARTTLS [RFC 3207 4]
TLS_READY = Reply(220, "2.0.0", "ready to start TLS")
TLS_ALREADY_ACTIVE = Reply(503, "5.5.1", "TLS already active")
TLS_NO_PARAMETERS = Reply(501, "5.5.4", "syntax error (no parameters allowed)")

# AUTH [RFC 4954 4, 6]
AUTH_OK = Reply(235, "2.7.0", "authentication successful")
AUTH_FAILED = Reply(535, "5.7.8", "authentication credentials invalid")
AUTH_CANCELLED = Reply(501, "5.0.0", "authentication cancelled")
AUTH_BAD_BASE64 = Reply(501, "5.5.2", "cannot decode base64 response")
AUTH_MALFORMED = Reply(501, "5.5.2", "malformed authentication response")
AUTH_NO_INITIAL_RESPONSE = Reply(501, "5.5.4", "this mechanism does not take an initial response")
AUTH_LINE_TOO_LONG = Reply(500, "5.5.6", "authentication exchange line is too long")
AUTH_ALREADY = Reply(503, "5.5.1", "already authenticated")
AUTH_IN_TRANSACTION = Reply(503, "5.5.1", "AUTH not permitted during a mail transaction")
AUTH_MECH_UNKNOWN = Reply(504, "5.5.4", "unrecognized authentication mechanism")
AUTH_ENCRYPTION_REQUIRED = Reply(
    538, "5.7.11", "encryption required for requested authentication mechanism")
AUTH_TEMPORARY_FAILURE = Reply(454, "4.7.0", "temporary authentication failure")
AUTH_TOO_MANY_FAILURES = Reply(
    421, "4.7.0", "too many authentication failures, closing connection")
AUTH_NEED_EHLO = Reply(503, "5.5.1", "send EHLO first: AUTH is an ESMTP extension")
AUTH_CLIENT_BLOCKED = Reply(
    421, "4.7.0", "too many authentication failures from your address, try again later")
TLS_IN_TRANSACTION = Reply(503, "5.5.1", "STARTTLS not permitted during a mail transaction")
SENDER_NOT_OWNED = Reply(553, "5.7.1", "sender address not owned by the authenticated user")


# Inbound checks (mta/checks/inbound.py): the texts name the check and the domain.
def spf_fail(sender: str, explanation: str) -> Reply:
    """RFC 7208 8.4: 550 5.7.23 [RFC 7372 3.2], with the domain's explanation."""
    return Reply(550, "5.7.23", f"SPF check failed for <{sender}>: {explanation}".rstrip(": "))


def spf_temperror(domain: str) -> Reply:
    """RFC 7208 8.6: a temporary DNS error is 451 4.7.24 [RFC 7372 3.3]: try again later."""
    return Reply(451, "4.7.24", f"SPF check of {domain or 'the sender'} got a temporary DNS "
                                "error; try again later")


def dmarc_reject(domain: str, reason: str) -> Reply:
    return Reply(550, "5.7.1", f"DMARC policy of {domain} rejects this message: {reason}")


def dmarc_temperror(domain: str) -> Reply:
    return Reply(451, "4.7.1", f"DMARC check of {domain or 'the From: domain'} got a temporary "
                               "DNS error; try again later")


def dmarc_no_author(why: str) -> Reply:
    return Reply(550, "5.7.1", f"DMARC: {why}; a message needs one From: field with its "
                               "author's address (RFC 5322 3.6.2, RFC 7489 6.6.1)")


# -- role reversal: ETRN [RFC 1985], ATRN [RFC 2645], TURN [RFC 821] -------------------

def etrn_started(node: str, messages: int) -> Reply:
    """253 with the count [RFC 1985 5]; 251 when nothing waits."""
    if messages == 0:
        return Reply(251, "2.0.0", f"OK, no messages waiting for node {node}")
    return Reply(253, "2.0.0", f"OK, {messages} pending messages for node {node} started")


def etrn_no_queue(node: str) -> Reply:
    return Reply(458, "4.5.1", f"Unable to queue messages for node {node}: no such queue")


def etrn_not_allowed(node: str, why: str) -> Reply:
    return Reply(459, "4.7.1", f"Node {node} not allowed: {why}")


ETRN_NOT_READY = Reply(458, "4.3.0", "Unable to queue messages now: the queue is still being "
                                     "loaded, try again in a moment")
PICKUP_NOT_READY = Reply(451, "4.3.0", "Unable to process ATRN request now: the queue is still "
                                       "being loaded, try again in a moment")
ETRN_SYNTAX = Reply(501, "5.5.4", "syntax: ETRN <domain>, ETRN @<domain> or ETRN #<queue>")
ETRN_TOO_OFTEN = Reply(458, "4.7.0", "Unable to queue messages: too many ETRN requests "
                                     "from your address, try again later")
ATRN_SYNTAX = Reply(501, "5.5.4", "syntax: ATRN [domain[,domain...]]")
ATRN_TURNING = Reply(250, "2.0.0", "OK, now reversing the connection")
ATRN_NO_MAIL = Reply(453, "4.2.0", "You have no mail")
TURN_TURNING = Reply(250, "2.0.0", "OK, turning round: send your greeting")
TURN_REFUSED = Reply(502, "5.7.0", "TURN refused: authenticate, and HELO/EHLO with a "
                                   "domain you may pull")


def atrn_refused(why: str) -> Reply:
    return Reply(450, "4.7.1", f"ATRN request refused: {why}")


def turn_busy(domain: str) -> Reply:
    return Reply(451, "4.3.0", f"Unable to process ATRN request now: {domain} is being "
                               "turned on another connection")
