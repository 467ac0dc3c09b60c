"""The outbound SMTP client: one connection, one or more transactions, one result per recipient.

`SMTPClient` is a `LineReceiver` driven by replies.  Every command it sends
queues the handler of its reply; a complete reply (continuation lines
joined [RFC 5321 4.2.1]) goes to the oldest handler.  With PIPELINING
[RFC 2920] MAIL, the RCPTs and DATA leave in one write and the handlers
simply wait in line; without it, each handler sends the next command.

Session set-up, then `ready` fires with the peer's `Capabilities`:

- greeting (220), EHLO, or HELO when EHLO is refused [RFC 5321 3.2];
- STARTTLS when offered and the policy allows it, then EHLO again
  [RFC 3207 4.2]; "required"/"verify" policies fail without it
  (`TLSUnavailable`), "verify" and "verify-if-offered" check the
  certificate against the host name (service-identity), with the TLS
  options of mta/tls.py; under the others, `check_identity` checks it
  too but takes any, and `identity_problem` tells what was found (MTA-STS
  "testing" mode);
- AUTH when credentials are given [RFC 4954], with the first mechanism of
  the policy's list that the peer offers: PLAIN [RFC 4616], LOGIN, or
  CRAM-MD5 [RFC 2195].  PLAIN and LOGIN carry the password itself: without
  TLS they are used only where the policy allows it (`plaintext_password`,
  the operator's choice for a smart host); CRAM-MD5 never reveals it.

Any failure there errbacks `ready` with a `DeliveryError` (always
temporary: a host that will not talk to us is not a verdict on the
recipients) or the connection's own error.  `TLSFailed` marks a failed
handshake, so that an opportunistic caller may retry in plain text.

`command(line)` sends one more command (ETRN) and fires with its reply;
`reverse(line, successor)` sends ATRN and, on its 250, gives the live
connection to `successor` (reversal.py) before anything more is read.

`deliver(transaction)` then returns a `TransactionResult`: one outcome per
recipient in order (`None` for those a broken connection left undecided),
and whether the final dot had been sent.  It checks first that the peer can
take the message: SIZE [RFC 1870] (5.3.4), 8BITMIME [RFC 6152] (5.6.3),
SMTPUTF8 [RFC 6531] (5.6.7): a message is failed rather than mangled.  DSN
parameters [RFC 3461] are passed on when the peer offers DSN.

Message data is read from the spool file in chunks by a pull producer,
dot-stuffed [RFC 5321 4.5.2] and written as the transport drains.

Every wait has the RFC 5321 4.5.3.2 timeout of its stage; a timeout drops
the connection and is reported as a 4.4.2 `DeliveryError`.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import re
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from twisted.internet import defer, interfaces
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from mta import tls
from mta.address import xtext_encode
from mta.delivery.outcome import DeliveryError, Failed, Outcome, classify, reply_text
from mta.reply import Reply
from mta.server.reversal import Reversible
from mta.wire import close_now, send_now

log = Logger(namespace="mta.delivery.client")


@dataclass(frozen=True)
class Timeouts:
    """Seconds to wait at each stage [RFC 5321 4.5.3.2]."""

    greeting: float = 300.0  # 4.5.3.2.1 initial 220 message: 5 minutes
    command: float = 300.0  # EHLO, STARTTLS, AUTH, RSET, QUIT
    mail: float = 300.0  # 4.5.3.2.2
    rcpt: float = 300.0  # 4.5.3.2.3
    data_init: float = 120.0  # 4.5.3.2.4
    data_block: float = 180.0  # 4.5.3.2.5: no progress writing the body
    data_end: float = 600.0  # 4.5.3.2.6 after the final dot

    @classmethod
    def from_config(cls, relay: Any) -> Timeouts:
        """The `[relay] smtp_*_timeout` keys."""
        return cls(greeting=relay.smtp_greeting_timeout, command=relay.smtp_command_timeout,
                   mail=relay.smtp_mail_timeout, rcpt=relay.smtp_rcpt_timeout,
                   data_init=relay.smtp_data_init_timeout,
                   data_block=relay.smtp_data_block_timeout,
                   data_end=relay.smtp_data_done_timeout)


class Stalled(DeliveryError):
    """The peer did not answer (or take data) within the stage's timeout."""


# TLS policies: "verify-if-offered" is STARTTLS with a checked certificate when the
# peer offers it, plain text when it does not (the ODMR client's default).
VERIFY_IF_OFFERED = "verify-if-offered"
_VERIFIED = ("verify", VERIFY_IF_OFFERED)
_PASSWORD_MECHANISMS = ("PLAIN", "LOGIN")  # these send the password itself


@dataclass(frozen=True)
class SessionPolicy:
    helo_name: str  # our name in EHLO
    peer_name: str  # the host we believe we talk to: logs, TLS certificate check
    tls: str = "opportunistic"  # off | opportunistic | required | verify | verify-if-offered
    ca_file: Path | None = None  # CA certificates for checked TLS; None = the platform's
    auth_user: str = ""
    auth_password: str = ""
    auth_mechanisms: tuple[str, ...] = _PASSWORD_MECHANISMS  # in order of preference
    # PLAIN/LOGIN without TLS: only where the operator chose it (smarthost_tls = "opportunistic").
    plaintext_password: bool = False
    # Check the certificate under a policy that takes any, and tell (identity_problem).
    check_identity: bool = False

    def __repr__(self) -> str:
        return f"SessionPolicy({self.peer_name}, tls={self.tls}, auth={bool(self.auth_user)})"


@dataclass(frozen=True)
class RecipientSpec:
    address: str
    notify: tuple[str, ...] | None = None
    orcpt: str | None = None  # decoded "type;address"


@dataclass
class Transaction:
    reverse_path: str
    recipients: list[RecipientSpec]
    open_data: Callable[[], BinaryIO]
    size: int = 0
    body: str = "7BIT"
    smtputf8: bool = False
    ret: str | None = None
    envid: str | None = None


@dataclass
class Capabilities:
    esmtp: bool = False
    keywords: dict[str, str] = field(default_factory=dict)  # "SIZE" -> "1000", "PIPELINING" -> ""
    tls: bool = False
    authenticated: bool = False

    def has(self, keyword: str) -> bool:
        return keyword.upper() in self.keywords

    @property
    def size_limit(self) -> int:
        value = self.keywords.get("SIZE", "")
        return int(value) if value.isdigit() else 0

    @property
    def auth_mechanisms(self) -> set[str]:
        return set(self.keywords.get("AUTH", "").upper().split())


@dataclass
class TransactionResult:
    outcomes: list[Outcome | None]  # None: undecided (connection lost before the end)
    data_sent: bool = False  # the final dot went out: the peer may have the message
    error: Failure | None = None


class TLSFailed(DeliveryError):
    """The TLS handshake (or certificate check) after STARTTLS failed."""


class TLSUnavailable(DeliveryError):
    """The policy requires TLS and the peer does not offer STARTTLS, or refuses it."""


class _Stage(enum.Enum):
    GREETING = "greeting"
    EHLO = "EHLO"
    HELO = "HELO"
    STARTTLS = "STARTTLS"
    AUTH = "AUTH"
    MAIL = "MAIL FROM"
    RCPT = "RCPT TO"
    DATA = "DATA"
    DOT = "end of data"
    RSET = "RSET"
    QUIT = "QUIT"
    COMMAND = "command"


MAX_REPLY_LINES = 100


def parse_ehlo(reply: Reply) -> dict[str, str]:
    """EHLO keywords (upper case) and their parameters; the first line is the greeting."""
    keywords = {}
    for line in reply.lines[1:]:
        keyword, _, params = line.strip().partition(" ")
        if keyword:
            keywords[keyword.upper()] = params.strip()
    # Old servers say "AUTH=LOGIN PLAIN" (or "AUTH=PLAIN LOGIN"); treat it as AUTH.
    if "AUTH" not in keywords:
        for keyword, params in list(keywords.items()):
            if keyword.startswith("AUTH="):
                keywords["AUTH"] = f"{keyword[5:]} {params}".strip()
                break
    return keywords


MAX_TEXT_LINE = 998  # octets of a line without its CRLF [RFC 5321 4.5.3.1.6]
_LINE_END = re.compile(rb"\r\n|\r|\n")


def dot_stuffed(source: BinaryIO, chunk_size: int = 65536,
                max_line: int = MAX_TEXT_LINE) -> Iterator[bytes]:
    """The message as DATA sends it: CRLF line ends, leading dots doubled, ``.CRLF`` at the end.

    [RFC 5321 4.5.2] Reads 64 KiB at a time, so the message is never in
    memory whole.  A bare LF or bare CR becomes CRLF [2.3.8], so that no
    ``LF . LF`` or ``CR . CR`` sequence can end the data early on a lax peer.
    A line longer than `max_line` octets (possible in a BDAT-received or
    locally injected message) is folded with CRLF SPACE, as Postfix does,
    rather than sent over the limit [4.5.3.1.6].
    """
    pieces: list[bytes] = []
    buffered = 0
    col = 0  # octets already sent on the current output line
    held_cr = False  # the last read ended in CR: it may be the first half of a CRLF

    def emit(segment: bytes) -> None:
        nonlocal col, buffered
        if col == 0 and segment.startswith(b"."):
            segment = b"." + segment
        while col + len(segment) > max_line:
            take = max_line - col
            pieces.append(segment[:take] + b"\r\n ")
            buffered += take + 3
            segment, col = segment[take:], 1
        pieces.append(segment)
        buffered += len(segment)
        col += len(segment)

    read_size = min(chunk_size, 65536)
    for data in iter(lambda: source.read(read_size), b""):
        if held_cr:
            data = b"\r" + data
        held_cr = data.endswith(b"\r")
        if held_cr:
            data = data[:-1]
        elif col == 0 and _plain_lines(data, max_line):
            # Whole lines, CRLF only, none too long (the usual case): stuffed in one go.
            if data.startswith(b"."):
                data = b"." + data
            data = data.replace(b"\r\n.", b"\r\n..")
            pieces.append(data)
            buffered += len(data)
            if buffered >= chunk_size:
                yield b"".join(pieces)
                pieces, buffered = [], 0
            continue
        *lines, partial = _LINE_END.split(data)
        for line in lines:
            emit(line)
            pieces.append(b"\r\n")
            buffered += 2
            col = 0
        if partial:
            emit(partial)
        if buffered >= chunk_size:
            yield b"".join(pieces)
            pieces, buffered = [], 0
    if col or held_cr:
        pieces.append(b"\r\n")
    pieces.append(b".\r\n")
    yield b"".join(pieces)


def _plain_lines(data: bytes, max_line: int) -> bool:
    """Whether `data` is whole lines ending in CRLF, with no bare CR or LF, each short
    enough to take a stuffed dot and stay within `max_line`."""
    if not data.endswith(b"\r\n"):
        return False
    if len(data) < max_line:
        ends = data.count(b"\r\n")
        return data.count(b"\r") == ends and data.count(b"\n") == ends
    # The lines give the count of line ends too: a 5 KB message's body is checked in
    # about 10 µs where counting CRLF on its own took 4 more.
    lines = data.split(b"\r\n")
    ends = len(lines) - 1
    return (data.count(b"\r") == ends and data.count(b"\n") == ends
            and max(map(len, lines)) < max_line)


@implementer(interfaces.IPullProducer)
class _BodyProducer:
    """Feeds `dot_stuffed` chunks to the transport each time it asks for more.

    It reads one chunk ahead, so that the write of the last chunk and the
    wait for the final reply happen in the same turn of the reactor: the
    peer's answer to the dot can never arrive before we expect it.
    """

    def __init__(self, client: SMTPClient, source: BinaryIO) -> None:
        self.client = client
        self.source = source
        self.chunks = dot_stuffed(source)
        self.ahead: bytes | None = None
        self.done = False

    def _read(self) -> bytes | None:
        return next(self.chunks, None)

    def resumeProducing(self) -> None:
        if self.done:
            return
        self.client._progress()
        try:
            chunk = self.ahead if self.ahead is not None else self._read()
            self.ahead = self._read()
        except OSError as e:
            self._close()
            self.client._abort(DeliveryError("4.3.0", f"cannot read message data: {e}"))
            return
        if chunk is not None:
            self.client.transport.write(chunk)
        if self.ahead is None:
            self._close()
            self.client._body_sent()

    def stopProducing(self) -> None:
        self._close()

    def _close(self) -> None:
        if not self.done:
            self.done = True
            self.source.close()


class SMTPClient(Reversible, LineReceiver):
    delimiter = b"\r\n"
    MAX_LENGTH = 4096  # a reply line is at most 512 octets [RFC 5321 4.5.3.1.5]; be lenient

    def __init__(self, policy: SessionPolicy, clock: IReactorTime,
                 timeouts: Timeouts = Timeouts()) -> None:
        self.policy = policy
        self.clock = clock
        self.timeouts = timeouts
        # Made once a connection, not at each reply (hashing each Enum key is a Python call).
        self._stage_timeouts = {
            _Stage.GREETING: timeouts.greeting, _Stage.MAIL: timeouts.mail,
            _Stage.RCPT: timeouts.rcpt, _Stage.DATA: timeouts.data_init,
            _Stage.DOT: timeouts.data_end}
        self.ready: defer.Deferred[Capabilities] = defer.Deferred()
        self.done: defer.Deferred[None] = defer.Deferred()  # fires when the connection is gone
        self.capabilities = Capabilities()
        self.closed = False
        self._lines: list[str] = []
        self._handlers: deque[tuple[_Stage, Callable[[Reply], None]]] = deque()
        self._timer: IDelayedCall | None = None
        self._awaited: str | None = ""  # what the timer waits for, named in its error; None: nothing
        self._tls_started = False
        self._tls_confirmed = False  # the EHLO after STARTTLS was answered: the handshake worked
        self._tls_used: object | None = None  # the TLS options of our STARTTLS
        self._aborting = False
        self._stopping = False  # shutting down: the last reply awaited, nothing more sent
        self._txn: _TxnState | None = None
        self._need_rset = False
        self._quit_sent = False
        self._commands: list[defer.Deferred[Reply]] = []  # command() replies still to come
        self._group: list[bytes] | None = None  # pipelined commands not yet written

    @property
    def gone(self) -> bool:
        """Closed, or being dropped (an abort, a timeout, a shutdown): nothing more goes
        over it."""
        return self.closed or self._aborting or self._stopping

    # -- connection events ------------------------------------------------------

    def connectionMade(self) -> None:
        self._expect(_Stage.GREETING, self._on_greeting)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.successor is not None:
            self.successor.connectionLost(reason)
        self.closed = True
        self._cancel_timer()
        self._handlers.clear()
        if self._tls_started and not self._tls_confirmed and not self.ready.called:
            reason = Failure(TLSFailed("4.7.5", f"TLS handshake with {self.policy.peer_name} "
                                                f"failed: {tls.describe_failure(reason.value, self._tls_used)}",
                                       self.policy.peer_name))
        self._fail(reason)
        self.done.callback(None)

    def dataReceived(self, data: bytes) -> None:
        if self.successor is not None:
            self.successor.dataReceived(data)
            return
        super().dataReceived(data)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._abort(DeliveryError("4.5.0", "reply line too long", self.policy.peer_name))

    def lineReceived(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace")
        code = text[:3]
        if len(code) < 3 or not (code.isascii() and code.isdigit()) or \
                (len(text) > 3 and text[3] not in " -"):
            self._abort(DeliveryError("4.5.0", f"malformed reply: {text[:100]!r}",
                                      self.policy.peer_name))
            return
        self._lines.append(text)
        if len(text) > 3 and text[3] == "-":
            if len(self._lines) > MAX_REPLY_LINES:
                self._abort(DeliveryError("4.5.0", "reply too long", self.policy.peer_name))
            return
        lines, self._lines = self._lines, []
        self._dispatch(_make_reply(lines))

    def _dispatch(self, reply: Reply) -> None:
        if not self._handlers:
            if reply.code == 421:
                # The peer is closing on us [RFC 5321 3.8].
                self._abort(DeliveryError(reply.enhanced or "4.0.0", reply_text(reply),
                                          self.policy.peer_name))
            else:
                log.warn(  # noqa: G010 (twisted.logger has no .warning)
                    "unexpected reply from {peer}: {reply}", peer=self.policy.peer_name,
                    reply=reply_text(reply))
            return
        _stage, handler = self._handlers.popleft()
        if self._handlers:
            self._start_timer(self._handlers[0][0])
        else:
            self._disarm_timer()
        handler(reply)

    # -- plumbing ---------------------------------------------------------------

    def _send(self, command: str, stage: _Stage, handler: Callable[[Reply], None]) -> None:
        self._expect(stage, handler)
        line = command.encode("utf-8") + b"\r\n"
        if self._group is not None:
            self._group.append(line)
        else:
            send_now(self.transport, line)

    def _send_group(self, send: Callable[[], None]) -> None:
        """Commands that `send` issues leave together, in one write [RFC 2920 3.1]."""
        self._group = []
        try:
            send()
        finally:
            data, self._group = b"".join(self._group), None
            if data and not self.gone:
                send_now(self.transport, data)

    def _expect(self, stage: _Stage, handler: Callable[[Reply], None]) -> None:
        self._handlers.append((stage, handler))
        if len(self._handlers) == 1:
            self._start_timer(stage)

    def _timeout_for(self, stage: _Stage) -> float:
        return self._stage_timeouts.get(stage, self.timeouts.command)

    def _start_timer(self, stage: _Stage) -> None:
        self._arm(self._timeout_for(stage), stage.value)

    def _arm(self, seconds: float, what: str) -> None:
        """The one timer of the reply or progress awaited, moved when it is running
        (a tenth of the cost of a cancel and a new one, four times a message)."""
        self._awaited = what
        if self._timer is not None and self._timer.active():
            self._timer.reset(seconds)
        else:
            self._timer = self.clock.callLater(seconds, self._timed_out)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _disarm_timer(self) -> None:
        """Nothing is awaited until the next command or body data: the timer stays in
        the reactor, ignored if it fires, so that the next `_arm` moves it instead of
        making a new one (a cancel and a new timer were twice a message)."""
        self._awaited = None

    def _timed_out(self) -> None:
        self._timer = None
        what = self._awaited
        if what is None:
            return  # disarmed: nothing was awaited
        self._abort(Stalled("4.4.2", f"timeout waiting for {what} from "
                                     f"{self.policy.peer_name}", self.policy.peer_name))

    def _progress(self) -> None:
        """The transport took more body data: restart the data-block timer [4.5.3.2.5]."""
        self._arm(self.timeouts.data_block, "the peer to accept message data")

    def _abort(self, error: Exception) -> None:
        """Give up on the connection: fail what waits, then drop it."""
        if self._aborting:
            return
        self._aborting = True
        self._handlers.clear()
        self._cancel_timer()
        self._fail(Failure(error))
        if self.transport is not None and not self.closed:
            self.transport.abortConnection()

    def _fail(self, reason: Failure) -> None:
        if not self.ready.called:
            self.ready.errback(reason)
        commands, self._commands = self._commands, []
        for d in commands:
            d.errback(reason)
        if self._txn is not None:
            txn, self._txn = self._txn, None
            txn.finish(reason)

    def _session_error(self, reply: Reply, stage: _Stage,
                       kind: type[DeliveryError] = DeliveryError) -> None:
        """A refusal during set-up: temporary whatever its code (the host, not the recipients)."""
        status = reply.enhanced if reply.enhanced and reply.enhanced[0] == "4" else "4.0.0"
        if reply.enhanced and reply.enhanced[0] == "5":
            status = "4" + reply.enhanced[1:]
        self._quit_after_error(kind(
            status, f"{self.policy.peer_name} refused {stage.value}: {reply_text(reply)}",
            self.policy.peer_name))

    def _quit_after_error(self, error: DeliveryError) -> None:
        if not self.ready.called:
            self.ready.errback(Failure(error))
        self.quit()

    # -- session set-up ---------------------------------------------------------

    def _on_greeting(self, reply: Reply) -> None:
        if reply.code != 220:
            self._session_error(reply, _Stage.GREETING)
            return
        self._send_ehlo()

    def _send_ehlo(self) -> None:
        self._send(f"EHLO {self.policy.helo_name}", _Stage.EHLO, self._on_ehlo)

    def _on_ehlo(self, reply: Reply) -> None:
        self._tls_confirmed = self._tls_started
        if reply.code == 250:
            self.capabilities.esmtp = True
            self.capabilities.keywords = parse_ehlo(reply)
            self._after_hello()
        elif reply.code >= 500 and not self.capabilities.tls:
            # EHLO not understood: an RFC 821 server [RFC 5321 3.2].
            self._send(f"HELO {self.policy.helo_name}", _Stage.HELO, self._on_helo)
        else:
            self._session_error(reply, _Stage.EHLO)

    def _on_helo(self, reply: Reply) -> None:
        if reply.code != 250:
            self._session_error(reply, _Stage.HELO)
            return
        self.capabilities.keywords = {}
        self._after_hello()

    def _after_hello(self) -> None:
        policy, caps = self.policy.tls, self.capabilities
        if not caps.tls and policy != "off":
            if caps.has("STARTTLS"):
                self._send("STARTTLS", _Stage.STARTTLS, self._on_starttls)
                return
            if policy in ("required", "verify"):
                self._quit_after_error(TLSUnavailable(
                    "4.7.4", f"TLS is required but {self.policy.peer_name} does not offer "
                             "STARTTLS", self.policy.peer_name))
                return
        self._authenticate()

    def _on_starttls(self, reply: Reply) -> None:
        if reply.code != 220:
            # Offered, then refused: only plain opportunism goes on without TLS.
            if self.policy.tls in ("required", "verify", VERIFY_IF_OFFERED):
                self._session_error(reply, _Stage.STARTTLS, TLSUnavailable)
            else:
                self._authenticate()
            return
        if self.clearLineBuffer():
            # Plain text after the 220 would be read as if it came through TLS: an
            # injection by someone in the path [RFC 3207 4.2, CVE-2011-0411 class].
            self._abort(DeliveryError("4.7.0", f"{self.policy.peer_name} sent data after its "
                                               "reply to STARTTLS", self.policy.peer_name))
            return
        try:
            options = self._tls_options()
        except tls.TLSConfigError as e:  # a CA file we cannot read: ours to fix, say so
            self._abort(DeliveryError("4.7.5", str(e), self.policy.peer_name))
            return
        self._tls_started = True
        self._tls_used = options
        self.transport.startTLS(options)
        # RFC 3207 4.2: forget everything learnt before TLS and say EHLO again.
        self.capabilities = Capabilities(tls=True)
        self._send_ehlo()

    def _tls_options(self) -> object:
        verify = self.policy.tls in _VERIFIED
        return tls.client_options(self.policy.peer_name, verify=verify,
                                  trust_root=self.policy.ca_file if verify or
                                  self.policy.check_identity else None,
                                  check=self.policy.check_identity)

    @property
    def identity_problem(self) -> str | None:
        """Why this session is not proven to reach `policy.peer_name` over TLS (None: it
        is): no TLS, or what a certificate check found (under `check_identity`)."""
        caps = self.capabilities
        if not caps.tls:
            if self._tls_started:
                return "no TLS: the handshake failed"
            if self.policy.tls == "off":
                return "no TLS"
            return "STARTTLS refused" if caps.has("STARTTLS") else "STARTTLS not offered"
        if self.policy.tls in _VERIFIED:
            return None  # the handshake itself checked it
        return getattr(self._tls_used, "problem", "certificate not checked")

    def _authenticate(self) -> None:
        if not self.policy.auth_user:
            self._set_ready()
            return
        caps = self.capabilities
        offered = caps.auth_mechanisms
        usable = [m for m in self.policy.auth_mechanisms if m in offered]
        if not caps.tls and not self.policy.plaintext_password:
            usable = [m for m in usable if m not in _PASSWORD_MECHANISMS]
            if not usable and offered & set(_PASSWORD_MECHANISMS):
                self._quit_after_error(DeliveryError(
                    "4.7.4", "refusing to send a password without TLS", self.policy.peer_name))
                return
        if not usable:
            self._quit_after_error(DeliveryError(
                "4.7.4", f"{self.policy.peer_name} offers no AUTH "
                         f"{' or '.join(self.policy.auth_mechanisms)}", self.policy.peer_name))
            return
        user, password = self.policy.auth_user, self.policy.auth_password
        if usable[0] == "PLAIN":
            # RFC 4616 2: authzid NUL authcid NUL passwd, empty authzid.
            token = _b64(f"\0{user}\0{password}")
            self._send(f"AUTH PLAIN {token}", _Stage.AUTH, self._on_auth_done)
        elif usable[0] == "LOGIN":
            self._send("AUTH LOGIN", _Stage.AUTH, self._on_login_user)
        else:
            self._send("AUTH CRAM-MD5", _Stage.AUTH, self._on_cram_challenge)

    def _on_cram_challenge(self, reply: Reply) -> None:
        if reply.code != 334:
            self._auth_failed(reply)
            return
        try:
            challenge = base64.b64decode(reply.lines[0].strip(), validate=True)
        except (ValueError, binascii.Error):
            self._abort(DeliveryError("4.7.0", "malformed CRAM-MD5 challenge",
                                      self.policy.peer_name))
            return
        # RFC 2195 2: the user name, a space, and HMAC-MD5(password, challenge) in hex.
        digest = hmac.new(self.policy.auth_password.encode("utf-8"), challenge,
                          hashlib.md5).hexdigest()
        self._send(_b64(f"{self.policy.auth_user} {digest}"), _Stage.AUTH, self._on_auth_done)

    def _on_login_user(self, reply: Reply) -> None:
        if reply.code != 334:
            self._auth_failed(reply)
            return
        self._send(_b64(self.policy.auth_user), _Stage.AUTH, self._on_login_password)

    def _on_login_password(self, reply: Reply) -> None:
        if reply.code != 334:
            self._auth_failed(reply)
            return
        self._send(_b64(self.policy.auth_password), _Stage.AUTH, self._on_auth_done)

    def _on_auth_done(self, reply: Reply) -> None:
        if reply.code != 235:
            self._auth_failed(reply)
            return
        self.capabilities.authenticated = True
        self._set_ready()

    def _auth_failed(self, reply: Reply) -> None:
        # A wrong password is the operator's to fix: defer, never bounce [RFC 4954 6].
        self._quit_after_error(DeliveryError(
            "4.7.8", f"authentication to {self.policy.peer_name} failed: {reply_text(reply)}",
            self.policy.peer_name))

    def _set_ready(self) -> None:
        if not self.ready.called:
            self.ready.callback(self.capabilities)

    # -- transactions -----------------------------------------------------------

    def deliver(self, transaction: Transaction) -> defer.Deferred[TransactionResult]:
        """Send one message; the result has one outcome per recipient, in order."""
        txn = _TxnState(self, transaction)
        refusal = self._refusal(transaction)
        if refusal is not None:
            txn.decide_all(refusal)
            txn.finish()
            return txn.result
        if self.closed or self._aborting:
            txn.finish(Failure(DeliveryError("4.4.2", "connection closed", self.policy.peer_name)))
            return txn.result
        self._txn = txn
        txn.start()
        return txn.result

    def _refusal(self, t: Transaction) -> Outcome | None:
        """A message this peer cannot take unchanged fails instead of being mangled."""
        caps, peer = self.capabilities, self.policy.peer_name
        limit = caps.size_limit
        if limit and t.size > limit:
            # RFC 1870 6: do not send what the server said it cannot take.
            return Failed("5.3.4", f"message size {t.size} exceeds size limit {limit} of {peer}")
        if t.body == "BINARYMIME":
            return Failed("5.6.3", f"{peer} would need BDAT for a binary message, "
                                   "which we do not send")
        if t.body == "8BITMIME" and not caps.has("8BITMIME"):
            # RFC 6152 3: we do not convert to 7 bit, so the message cannot go.
            return Failed("5.6.3", f"8-bit message but {peer} does not offer 8BITMIME")
        if t.smtputf8 and not caps.has("SMTPUTF8"):
            # RFC 6531 3.4: no downgrade; the message is returned.
            return Failed("5.6.7", f"internationalised message but {peer} "
                                   "does not offer SMTPUTF8")
        return None

    def mail_command(self, t: Transaction) -> str:
        caps = self.capabilities
        args = [f"MAIL FROM:<{t.reverse_path}>"]
        if caps.has("SIZE"):
            args.append(f"SIZE={t.size}")
        if t.body == "8BITMIME":
            args.append("BODY=8BITMIME")
        if t.smtputf8:
            args.append("SMTPUTF8")
        if caps.has("DSN"):
            if t.ret:
                args.append(f"RET={t.ret}")
            if t.envid:
                args.append(f"ENVID={xtext_encode(t.envid)}")
        return " ".join(args)

    def rcpt_command(self, r: RecipientSpec) -> str:
        args = [f"RCPT TO:<{r.address}>"]
        if self.capabilities.has("DSN"):
            if r.notify:
                args.append(f"NOTIFY={','.join(r.notify)}")
            if r.orcpt:
                kind, _, address = r.orcpt.partition(";")
                args.append(f"ORCPT={kind.strip()};{xtext_encode(address.strip())}")
        return " ".join(args)

    def command(self, line: str) -> defer.Deferred[Reply]:
        """Send one command (ETRN ...); fires with its reply, or fails with the connection."""
        return self._request(line, lambda reply: None)

    def reverse(self, line: str, successor: Callable[[], Any]) -> defer.Deferred[Reply]:
        """Send `line` (ATRN); on a 250, the connection turns round [RFC 2645 5.3]: it
        is handed, with whatever the peer sent after the reply, to ``successor()``
        (our SMTP server), which speaks first.  Fires with the reply."""
        def turn(reply: Reply) -> None:
            if reply.code == 250:
                self._cancel_timer()
                self._handlers.clear()
                self.turn_round(successor(), self.clearLineBuffer())
        return self._request(line, turn)

    def _request(self, line: str, first: Callable[[Reply], None]) -> defer.Deferred[Reply]:
        """Send `line`; its reply goes to `first`, then fires the Deferred."""
        if self.gone:
            return defer.fail(DeliveryError("4.4.2", "connection closed", self.policy.peer_name))
        d: defer.Deferred[Reply] = defer.Deferred()
        self._commands.append(d)

        def answered(reply: Reply) -> None:
            self._commands.remove(d)
            first(reply)
            d.callback(reply)
        self._send(line, _Stage.COMMAND, answered)
        return d

    def quit(self) -> None:
        """Say QUIT and close when the reply comes (or at the command timeout)."""
        if self.closed or self._aborting or self._quit_sent or self.transport is None:
            return
        self._quit_sent = True
        self._send("QUIT", _Stage.QUIT, lambda reply: self._close())

    def _close(self) -> None:
        if not close_now(self.transport):
            self.transport.loseConnection()

    def abort(self) -> None:
        """Drop the connection now."""
        self._abort(DeliveryError("4.3.2", "delivery interrupted: shutting down",
                                  self.policy.peer_name))

    def stop(self, grace: float) -> None:
        """Service shutdown: drop the connection now, unless a message's final dot is out
        and its reply still to come.  Only that reply says whether the next hop took the
        message; dropped, it would go again after the restart, a duplicate.  So the
        reply gets `grace` seconds (at most the usual wait), and then the connection
        is dropped: nothing more is sent over it."""
        if self._stopping:
            return  # asked again: the reply still has its grace
        txn = self._txn
        if txn is None or not txn.data_sent or txn.result.called or self.gone:
            self.abort()
            return
        self._stopping = True
        self._arm(min(grace, self.timeouts.data_end),
                  "the reply to the end of data (shutting down)")

    def _body_sent(self) -> None:
        self.transport.unregisterProducer()
        if self._txn is not None:
            self._txn.body_sent()


class _TxnState:
    """One MAIL ... DATA exchange: collects per-recipient replies, streams the body."""

    def __init__(self, client: SMTPClient, transaction: Transaction) -> None:
        self.client = client
        self.t = transaction
        self.outcomes: list[Outcome | None] = [None] * len(transaction.recipients)
        self.accepted: list[int] = []
        self.rcpt_replies = 0
        self.mail_reply: Reply | None = None
        self.data_sent = False
        self.result: defer.Deferred[TransactionResult] = defer.Deferred()
        self.peer = client.policy.peer_name
        self.dsn = client.capabilities.has("DSN")

    @property
    def pipelining(self) -> bool:
        return self.client.capabilities.has("PIPELINING")

    def decide_all(self, outcome: Outcome) -> None:
        self.outcomes = [o if o is not None else outcome for o in self.outcomes]

    def finish(self, error: Failure | None = None) -> None:
        if self.result.called:
            return
        if self.client._txn is self:
            self.client._txn = None
        self.result.callback(TransactionResult(self.outcomes, self.data_sent, error))

    def start(self) -> None:
        self.client._send_group(self._start)

    def _start(self) -> None:
        c = self.client
        if c._need_rset:
            c._send("RSET", _Stage.RSET, lambda reply: None)
            c._need_rset = False
        c._send(c.mail_command(self.t), _Stage.MAIL, self.on_mail)
        if self.pipelining:
            # RFC 2920 3.1: MAIL, RCPTs and DATA may go in one group; replies come in order.
            for index in range(len(self.t.recipients)):
                self.send_rcpt(index)
            c._send("DATA", _Stage.DATA, self.on_data)

    def send_rcpt(self, index: int) -> None:
        c = self.client
        c._send(c.rcpt_command(self.t.recipients[index]), _Stage.RCPT,
                lambda reply: self.on_rcpt(index, reply))

    def on_mail(self, reply: Reply) -> None:
        self.mail_reply = reply
        if reply.code == 250:
            if not self.pipelining:
                self.send_rcpt(0)
            return
        # The sender refused: every recipient shares that verdict [RFC 5321 3.3].
        self.decide_all(classify(reply, self.peer))
        self.client._need_rset = True
        if not self.pipelining:
            self.finish()
        # With PIPELINING the RCPT and DATA replies are still to come; on_data finishes.

    def on_rcpt(self, index: int, reply: Reply) -> None:
        self.rcpt_replies += 1
        if self.mail_reply is not None and self.mail_reply.code == 250:
            if 200 <= reply.code < 300:
                self.accepted.append(index)
            else:
                self.outcomes[index] = classify(reply, self.peer)
        if self.pipelining:
            return
        if index + 1 < len(self.t.recipients):
            self.send_rcpt(index + 1)
        elif self.accepted:
            self.client._send("DATA", _Stage.DATA, self.on_data)
        else:
            # RFC 5321 3.3: no recipient accepted, no DATA.
            self.client._need_rset = True
            self.finish()

    def on_data(self, reply: Reply) -> None:
        if reply.code == 354:
            if self.accepted:
                self.send_body()
            else:
                # RFC 2920 3.1: every RCPT failed yet DATA was accepted; end it empty.
                self.client._send(".", _Stage.DOT, lambda reply: None)
                self.finish()
            return
        if self.accepted:
            outcome = classify(reply, self.peer) if reply.code >= 400 else \
                classify(DeliveryError("4.5.0", f"unexpected reply to DATA: {reply_text(reply)}",
                                       self.peer))
            for index in self.accepted:
                self.outcomes[index] = outcome
        self.client._need_rset = True
        self.finish()

    def send_body(self) -> None:
        try:
            source = self.t.open_data()
        except OSError as e:
            self.client._abort(DeliveryError("4.3.0", f"cannot read message data: {e}"))
            return
        producer = _BodyProducer(self.client, source)
        self.client.transport.registerProducer(producer, False)

    def body_sent(self) -> None:
        if self.result.called:
            return
        self.data_sent = True
        self.client._expect(_Stage.DOT, self.on_dot)

    def on_dot(self, reply: Reply) -> None:
        outcome = classify(reply, self.peer, dsn_passed=self.dsn)
        for index in self.accepted:
            self.outcomes[index] = outcome
        self.finish()


# An enhanced status code opening a reply's text [RFC 3463 2, RFC 2034 3]; its class must
# also be the reply code's first digit.
_ENHANCED = re.compile(r"[ \t]*([245]\.[0-9]+\.[0-9]+)(?=\s|$)")


def _make_reply(lines: list[str]) -> Reply:
    first = lines[0]
    code = int(first[:3])
    found = _ENHANCED.match(first, 4)
    if found is None or found.group(1)[0] != first[0]:
        return Reply(code, None, *[line[4:] for line in lines])
    enhanced = found.group(1)
    if len(lines) == 1:
        return Reply(code, enhanced, first[found.end():].lstrip())
    # Drop the code from every line that repeats it [RFC 2034 3], extra spaces or not.
    texts = [line[4:].lstrip() for line in lines]
    return Reply(code, enhanced, *[t[len(enhanced):].lstrip() if t.startswith(enhanced)
                                   else line[4:] for t, line in zip(texts, lines)])


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")
