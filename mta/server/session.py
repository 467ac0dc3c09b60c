"""The SMTP state machine: one command in, one Answer out.

`Session` is the per-connection state (greeting, TLS, AUTH, counters);
`Transaction` is the per-message state, replaced on RSET, on a new
EHLO/HELO and after each message [RFC 5321 4.1.4].  Neither does network
I/O: the Twisted adapter (protocol.py) feeds lines and body bytes in and
writes replies out.

`command(line)` returns an `Answer` (answer.py): the reply and what the
connection does next (continue, close, start TLS, read a body, turn round),
or a Deferred firing with one when the answer needs the disk or a password
check.  When the body reader it handed out has all its bytes,
`body_done(reader)` answers the DATA or BDAT.  While `expects_sasl` is true the next line is a SASL response
of an AUTH exchange (trust.py), not a command.

Trust [DESIGN.md 8]: STARTTLS is offered when the listener says
``tls = "starttls"``, a certificate is configured and the session is not yet
in TLS; AUTH when a password file is configured, after EHLO, outside a
transaction and only once; PLAIN and LOGIN only inside TLS, from loopback,
or where the listener's ``plaintext_auth`` allows them.

Addresses: RCPT, VRFY and EXPN ask the config's one definition of local
addresses (aliases.py, through policy.py for RCPT).  A recipient is
expanded at RCPT, once: the transaction keeps the addresses as given
(`forward_paths`, for the limit and the Received header) and the expanded,
de-duplicated recipients that go into the spool.

Local submission (local.py): on the `sendmail` socket the kernel names the
user (`local_user`); that user is trusted as an authenticated one for
relaying, and named in the Received header and the log.

Submitted mail is completed (cleanup.py, RFC 6409 8): on submission
listeners, in authenticated sessions and from local users, a message
without Date:, Message-ID: or From: gets them; port-25 mail from outside
is stored as it came.

Mail from outside is checked (mta/checks/inbound.py): on ``smtp``
listeners, for clients the relay policy does not trust, SPF starts at MAIL
(MAIL waits for it with ``spf = "reject"``), forged Authentication-Results
are filtered out of the header as it streams in, and after the final dot
the verdict decides between a refusal and a commit with our
Authentication-Results in front.  Other sessions never reach that code.

Role reversal [DESIGN.md 5]: ETRN, ATRN and TURN are ordered here (after
a greeting, outside a transaction) and decided in reversal.py.

`phase` is the ordering state and nothing else decides ordering:
connected -> greeted -> mail (MAIL accepted) -> rcpt (a recipient accepted)
-> data (a body started: DATA being read, or BDAT chunks until LAST);
RSET, a new HELO/EHLO and the end of a message go back to greeted.
Ordering errors are 503, bad arguments 501, unknown commands 500
[RFC 5321 4.2.4, 4.1.4].
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.logger import Logger

from mta import aliases, maillog, reply, signing
from mta.address import (
    AddressError,
    Mailbox,
    parse_params,
    parse_path,
    split_path_and_params,
    xtext_decode,
)
from mta.config import Config, DKIMDomain
from mta.datefield import mail_date
from mta.reply import Reply
from mta.server import sasl
from mta.server.answer import CLOSE, START_TLS, Answer, ReadBody, answer
from mta.server.cleanup import HeaderCompletion, HeaderEditor
from mta.server.context import ServerContext
from mta.server.dataread import BodyReader, ChunkReader, DataReader
from mta.server.local import LocalUser
from mta.server.policy import Policy
from mta.server.trust import AuthExchange, is_loopback
from mta.spool.envelope import Envelope, Recipient, add_recipients
from mta.spool.store import Incoming

if TYPE_CHECKING:
    from mta.checks.inbound import MessageChecks, SessionChecks, Verdict

log = Logger(namespace="mta.smtpd")

MAX_ENVID = 100  # RFC 3461 4.4
MAX_ORCPT = 500  # RFC 3461 4.2
DSN_NOTIFY = {"SUCCESS", "FAILURE", "DELAY"}


class Phase(enum.Enum):
    CONNECTED = "connected"  # no HELO/EHLO yet
    GREETED = "greeted"  # no transaction
    MAIL = "mail"  # MAIL accepted, no recipient yet
    RCPT = "rcpt"  # at least one recipient accepted
    DATA = "data"  # a body started: DATA being read, or BDAT chunks until LAST


TRANSACTION = (Phase.MAIL, Phase.RCPT, Phase.DATA)


@dataclass
class Transaction:
    reverse_path: Mailbox | None = None  # None in a transaction: the null path <>
    smtputf8: bool = False
    body_type: str = "7BIT"
    ret: str | None = None
    envid: str | None = None
    recipients: list[Recipient] = field(default_factory=list)  # after aliases, de-duplicated
    forward_paths: list[str] = field(default_factory=list)  # as given in each accepted RCPT
    rcpt_attempts: int = 0
    mode: str | None = None  # "DATA" or "BDAT" once a body started
    incoming: Incoming | None = None
    # Where the body goes: `incoming`, or a HeaderEditor (cleanup.py) in front of it.
    writer: Incoming | HeaderEditor | None = None
    body: BodyReader | None = None
    dkim: bool = False  # DKIM signing may apply (signing.py): the reader keeps the From: field
    checks: MessageChecks | None = None  # mail from outside: SPF/DKIM/DMARC (mta/checks/)


# -- the command table ---------------------------------------------------------

@dataclass(frozen=True)
class Verb:
    name: str
    syntax: str
    help: str
    handler: Callable[[Session, str], Reply | Answer | defer.Deferred]


_VERBS: dict[str, Verb] = {}


def verb(name: str, syntax: str, help: str) -> Callable:
    """Register a command handler with its HELP text; aliases share a handler."""
    def register(handler: Callable) -> Callable:
        _VERBS[name] = Verb(name, syntax, help, handler)
        return handler
    return register


class Session:
    def __init__(self, context: ServerContext, client_address: str, client_port: int = 0,
                 tls: bool = False, local_user: LocalUser | None = None) -> None:
        self.context = context
        self.config = context.config
        self.listener = context.listener
        self.policy = Policy(self.config, self.listener)
        self.hostname = self.config.server.hostname
        self.client_address = client_address
        self.client_port = client_port
        self.phase = Phase.CONNECTED
        self.helo: str | None = None
        self.esmtp = False
        self.tls = tls
        self.authenticated: str | None = None
        self.local_user = local_user  # on the sendmail socket: who the kernel says it is
        self.transaction = Transaction()
        self.errors = 0
        self._chunk_outcome: tuple[Reply | None, bool] = (None, False)
        self.auth_exchange: AuthExchange | None = None
        self.auth_failures = 0
        self.auth_method: str | None = None
        self.tls_info: str | None = None  # "TLSv1.3:CIPHER" once a handshake is done
        self.counts: dict[str, list[int]] = {}  # command -> [accepted, given], for the log
        self._auth_noted = False  # the AUTH command's exchange ended and was logged
        self._checks: SessionChecks | None = None  # made at the first checked MAIL
        self.gone = False  # the connection is lost

    def _take_config(self) -> None:
        """Between transactions, the config in force now (a reload may have swapped it)."""
        config = self.context.config
        if config is not self.config:
            self.config = config
            self.policy = Policy(config, self.listener)
            self.hostname = config.server.hostname

    # -- replies ---------------------------------------------------------------

    @property
    def enhanced(self) -> bool:
        """Enhanced codes once ENHANCEDSTATUSCODES was offered in an EHLO [RFC 2034 3]."""
        return self.esmtp

    def greeting(self) -> Reply:
        return reply.greeting(self.hostname)

    @property
    def expects_sasl(self) -> bool:
        """The next line answers a 334 of an AUTH exchange [RFC 4954 4]."""
        return self.auth_exchange is not None and self.auth_exchange.waiting

    def line_too_long(self) -> Reply:
        """The reply to an over-long line; it also ends an AUTH exchange."""
        if self.expects_sasl:
            exchange, self.auth_exchange = self.auth_exchange, None
            said = exchange.abort_too_long()
            self._log_reject("AUTH", said)
            return said
        self._count("unknown", False)
        self._log_reject("COMMAND", reply.LINE_TOO_LONG)
        return reply.LINE_TOO_LONG

    # -- dispatch ----------------------------------------------------------------

    def command(self, line: bytes) -> Answer | defer.Deferred[Answer]:
        if self.expects_sasl:
            return _answered(self._auth_result(self.auth_exchange.respond(line)))
        if b"\x00" in line:
            return self._unknown(reply.BAD_BYTES)
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            return self._unknown(reply.BAD_BYTES)
        name, _, arg = text.partition(" ")
        found = _VERBS.get(name.upper())
        if found is None:
            return self._unknown(reply.UNKNOWN_COMMAND)
        result = _answered(found.handler(self, arg.strip(" ")))
        if isinstance(result, defer.Deferred):
            return result.addCallback(self._noted, found.name, arg)
        return self._noted(result, found.name, arg)

    # -- the log: command counts and rejections -----------------------------------

    def _unknown(self, said: Reply) -> Answer:
        self._count("unknown", False)
        self._log_reject("UNKNOWN", said)
        return Answer(said)

    def _count(self, name: str, ok: bool) -> None:
        counts = self.counts.get(name)
        if counts is None:
            counts = self.counts[name] = [0, 0]
        counts[0] += ok
        counts[1] += 1

    def _noted(self, answer: Answer, name: str, arg: str) -> Answer:
        """Count the command; log it when refused (an AUTH exchange logs at its end)."""
        said = answer.reply
        if name == "AUTH" and (self.auth_exchange is not None or self._auth_noted):
            self._auth_noted = False
            return answer  # counted and logged by _auth_result
        code = said.code if said is not None else 250
        self._count(name.lower(), code < 400)
        if code >= 400:
            self._log_reject(name, said, arg)
        return answer

    def log_refusal(self, stage: str, said: Reply) -> None:
        """A refusal decided by the connection (protocol.py): too many errors."""
        self._log_reject(stage, said)

    def _log_reject(self, stage: str, said: Reply, arg: str = "",
                    tx: Transaction | None = None, queue_id: str | None = None) -> None:
        tx = tx if tx is not None else self.transaction
        sender = recipient = None
        if stage in ("MAIL", "SEND", "SOML", "SAML"):
            sender = _path_of(arg)
        elif self.in_transaction or tx is not self.transaction:
            sender = str(tx.reverse_path) if tx.reverse_path else ""
        if stage == "RCPT":
            recipient = _path_of(arg)
        elif tx.recipients and (stage in ("DATA", "BDAT", "END-OF-MESSAGE")):
            recipient = tx.recipients[0].address if len(tx.recipients) == 1 else None
        maillog.reject(queue_id, stage, self.client_address, str(said), sender, recipient,
                       self.protocol_name(), self.helo)

    @property
    def submitter(self) -> str | None:
        """Our own user sending, whom relaying is allowed: the AUTH identity, or the
        local user of the sendmail socket (whom the kernel vouches for)."""
        if self.authenticated is not None:
            return self.authenticated
        return self.local_user.name if self.local_user is not None else None

    @property
    def completes_headers(self) -> bool:
        """Whether bare messages get Date:, Message-ID:, From: here [RFC 6409 8]."""
        return self.listener.role in ("submission", "local") or self.submitter is not None

    @property
    def checked(self) -> bool:
        """Whether this transaction's mail comes from outside and is checked (mta/checks/):
        port 25, a client neither authenticated nor in mynetworks, checks configured."""
        return (self.listener.role == "smtp" and self.context.checks is not None
                and self.config.checks.enabled
                and not self.policy.is_trusted(self.client_address, self.submitter))

    @property
    def in_transaction(self) -> bool:
        return self.phase in TRANSACTION

    def reset_transaction(self) -> None:
        if self.transaction.incoming is not None:
            self.transaction.incoming.abort()
        self.transaction = Transaction()
        if self.in_transaction:
            self.phase = Phase.GREETED

    def connection_lost(self) -> None:
        """Whatever was being received and not committed is forgotten."""
        self.gone = True
        self.reset_transaction()
        if self._checks is not None:
            self._checks.close()  # SPF checks not started yet are not run

    # -- greeting and housekeeping ---------------------------------------------

    @verb("EHLO", "EHLO <domain>", "Extended hello: start an ESMTP session")
    def ehlo(self, arg: str) -> Reply:
        if not arg:
            return reply.syntax_error("EHLO requires a domain or address literal", "5.5.4")
        self._greet(arg, esmtp=True)
        return Reply(250, None, f"{self.hostname} hello {arg} [{self.client_address}]",
                     *self.extensions())

    @verb("HELO", "HELO <domain>", "Hello: start an SMTP session")
    def helo_(self, arg: str) -> Reply:
        if not arg:
            return reply.syntax_error("HELO requires a domain or address literal", "5.5.4")
        self._greet(arg, esmtp=False)
        return reply.helo_ok(self.hostname, arg)

    def _greet(self, name: str, esmtp: bool) -> None:
        self.reset_transaction()
        self._take_config()
        self.helo = name
        self.esmtp = esmtp
        self.phase = Phase.GREETED

    def extensions(self) -> list[str]:
        """EHLO keywords [RFC 5321 4.1.1.1]; only what works end to end is offered."""
        keywords = [
            "PIPELINING",
            f"SIZE {self.config.limits.message_size}",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
            "DSN",
            "CHUNKING",
        ]
        if self.starttls_offered():
            keywords.append("STARTTLS")
        mechanisms = self.auth_mechanisms()
        if mechanisms and self.authenticated is None:
            keywords.append("AUTH " + " ".join(mechanisms))
        if self.context.pickup is not None:
            keywords.append("ETRN")  # RFC 1985
        if self.atrn_offered():
            keywords.append("ATRN")  # RFC 2645 5.1.1: before AUTH too, so clients know
        keywords += [name for name, on in (("VRFY", self.listener.vrfy),
                                           ("EXPN", self.listener.expn)) if on]
        # RFC 5321 Appendix F.6: SEND, SOML, SAML are implemented, so advertised.
        # TURN is not: it works only after AUTH, for a domain the user may pull.
        return keywords + ["HELP", "SEND", "SOML", "SAML"]

    # -- trust: STARTTLS [RFC 3207] and AUTH [RFC 4954] -------------------------------

    def starttls_offered(self) -> bool:
        trust = self.context.trust
        return (self.listener.tls == "starttls" and trust is not None
                and trust.tls is not None and not self.tls)

    def auth_mechanisms(self) -> list[str]:
        """The SASL mechanisms this connection may use now (empty: AUTH not offered)."""
        trust = self.context.trust
        if trust is None or not trust.auth_enabled:
            return []
        offered = sasl.mechanisms_for(self.tls, is_loopback(self.client_address),
                                      self.listener.plaintext_auth, trust.has_cram_md5())
        return [m for m in offered if m in self.listener.auth_mechanisms]

    def start_tls(self) -> None:
        """The handshake starts: forget all the client told us in plain text [RFC 3207 4.2]."""
        self.reset_transaction()
        self.phase = Phase.CONNECTED
        self.helo = None
        self.esmtp = False
        self.authenticated = None
        self.auth_exchange = None
        self.tls = True

    def _auth_result(self, result: Reply | defer.Deferred) -> Answer | defer.Deferred:
        """Follow the exchange's answer: remember the user, or its end and failures."""
        if isinstance(result, defer.Deferred):
            return result.addCallback(self._auth_result)
        exchange = self.auth_exchange
        if exchange is not None and not exchange.waiting:
            self.auth_exchange = None
            self.auth_failures = exchange.failures
            self.authenticated = exchange.result
            self._count("auth", exchange.result is not None)
            self._auth_noted = True
            mechanism = exchange.mechanism.name if exchange.mechanism else "?"
            if exchange.result is not None:
                self.auth_method = mechanism
            elif result in _AUTH_FAILED:
                maillog.auth_failed(self.client_address, mechanism, exchange.tried_user,
                                    str(result))
            elif result.code >= 400:
                self._log_reject("AUTH", result)
            if exchange.closing:
                return Answer(result, CLOSE)
        return Answer(result)

    @verb("RSET", "RSET", "Abort the current mail transaction")
    def rset(self, arg: str) -> Reply:
        if arg:
            return reply.syntax_error("RSET takes no arguments")
        self.reset_transaction()
        return reply.RESET_OK

    @verb("NOOP", "NOOP [string]", "Do nothing")
    def noop(self, arg: str) -> Reply:
        return reply.NOOP_OK

    @verb("QUIT", "QUIT", "Close the connection")
    def quit(self, arg: str) -> Reply | Answer:
        if arg:
            return reply.syntax_error("QUIT takes no arguments")
        self.reset_transaction()
        return Answer(reply.closing(self.hostname), CLOSE)

    @verb("HELP", "HELP [command]", "Show the commands, or one command's syntax")
    def help(self, arg: str) -> Reply:
        if arg:
            found = _VERBS.get(arg.upper())
            if found is None:
                return Reply(504, "5.5.1", f"HELP: unknown command {arg}")
            return Reply(214, "2.0.0", found.syntax, found.help)
        names = " ".join(sorted(_VERBS))
        return Reply(214, "2.0.0", f"Commands: {names}",
                     "HELP <command> gives the syntax of one; RFC 5321 has the rest")

    @verb("VRFY", "VRFY <user> | <address>", "Verify an address, where the listener allows")
    def vrfy(self, arg: str) -> Reply:
        if not arg:
            return reply.syntax_error("VRFY requires an argument")
        if not self.listener.vrfy:
            # RFC 5321 3.5.3: 252 when we will accept but do not verify.
            return reply.VRFY_CANNOT
        return self._verify(arg, expand=False)

    @verb("EXPN", "EXPN <list>", "Expand a mailing list, where the listener allows")
    def expn(self, arg: str) -> Reply:
        if not arg:
            return reply.syntax_error("EXPN requires an argument")
        if not self.listener.expn:
            # RFC 5321 3.5.3 lets EXPN answer 502 or 252; 502 says plainly it is off.
            return reply.EXPN_DISABLED
        return self._verify(arg, expand=True)

    def _verify(self, arg: str, expand: bool) -> Reply:
        """VRFY and EXPN [RFC 5321 3.5] from the same data RCPT uses (aliases.py)."""
        if self.listener.require_auth and self.authenticated is None:
            return reply.AUTH_REQUIRED  # no harvesting before AUTH where MAIL needs it
        text = arg[1:-1] if arg.startswith("<") and arg.endswith(">") else arg
        addresses = self.config.addresses
        if "@" not in text:
            try:  # a user name must be a valid local part before we look it up or echo it
                parse_path(f"<{text}@{self.hostname}>", utf8=True)
            except AddressError as e:
                return reply.syntax_error(f"bad user name: {e}", "5.1.3")
            candidates = addresses.candidates(text)
            if len(candidates) > 1:  # RFC 5321 3.5.1: 553 with the possibilities
                return Reply(553, "5.1.4", "user ambiguous; possibilities:",
                             *(f"<{c}>" for c in candidates))
            text = candidates[0] if candidates else f"{text}@{self.hostname}"
        try:
            mailbox = parse_path(f"<{text}>", utf8=True)
        except AddressError as e:
            return reply.syntax_error(f"bad address: {e}", "5.1.3")
        address = str(mailbox)
        found = addresses.resolve(address)
        if found.kind == aliases.REMOTE:
            return reply.VRFY_CANNOT  # not ours to say
        if found.kind == aliases.LOOP:
            return reply.ALIAS_LOOP
        if found.kind != aliases.LOCAL:
            return reply.NO_SUCH_USER
        if expand:
            # RFC 5321 3.5.2: one member a line; a plain mailbox "expands" to itself.
            return Reply(250, "2.1.5", *(f"<{t.address}>" for t in found.targets))
        if found.expanded and len(found.targets) == 1 and \
                not addresses.is_local_domain(found.targets[0].address.rpartition("@")[2]):
            return Reply(251, "2.1.5", f"user not local; will forward to "
                                        f"<{found.targets[0].address}>")
        return Reply(250, "2.1.5", f"<{address}>")

    @verb("STARTTLS", "STARTTLS", "Start TLS (RFC 3207), where offered")
    def starttls_(self, arg: str) -> Reply | Answer:
        if self.tls:
            return reply.TLS_ALREADY_ACTIVE
        if not self.starttls_offered():
            return reply.NOT_IMPLEMENTED  # not advertised here
        if arg:
            return reply.TLS_NO_PARAMETERS  # RFC 3207 4
        if self.in_transaction:
            return reply.TLS_IN_TRANSACTION
        return Answer(reply.TLS_READY, START_TLS)

    @verb("AUTH", "AUTH <mechanism> [initial-response]", "Authenticate (RFC 4954), where offered")
    def auth(self, arg: str) -> Reply | Answer | defer.Deferred:
        trust = self.context.trust
        if trust is None or not trust.auth_enabled:
            return reply.NOT_IMPLEMENTED  # no password file: not advertised
        if not self.esmtp:
            return reply.AUTH_NEED_EHLO  # RFC 4954 4: after EHLO
        if self.authenticated is not None:
            return reply.AUTH_ALREADY  # RFC 4954 4: once per session
        if self.in_transaction:
            return reply.AUTH_IN_TRANSACTION  # RFC 4954 4
        exchange = AuthExchange(trust, self.config, self.client_address, self.hostname,
                                self.auth_failures)
        if exchange.blocked():
            return Answer(reply.AUTH_CLIENT_BLOCKED, CLOSE)
        self.auth_exchange = exchange
        return self._auth_result(self.auth_exchange.start(arg, self.auth_mechanisms(),
                                                          self.listener.auth_mechanisms))

    # -- role reversal: ETRN [RFC 1985], ATRN [RFC 2645], TURN [RFC 821] -------------------

    def _reversal_refused(self) -> Reply | None:
        """What ETRN, ATRN and TURN share: after a greeting, outside a transaction."""
        if self.context.pickup is None:
            return reply.NOT_IMPLEMENTED  # not advertised here
        if self.phase == Phase.CONNECTED:
            return reply.NEED_HELO
        if self.in_transaction:
            return reply.BAD_SEQUENCE  # RFC 1985 5, RFC 2645 5.2.1: 503 inside a transaction
        return None

    @verb("ETRN", "ETRN <domain> | @<domain> | #<queue>", "Start a queue run (RFC 1985)")
    def etrn(self, arg: str) -> Reply:
        refused = self._reversal_refused()
        if refused is not None:
            return refused
        return self.context.pickup.etrn(arg, self.client_address, self.authenticated)

    @verb("ATRN", "ATRN [domain[,domain...]]", "Turn round and receive held mail (RFC 2645)")
    def atrn(self, arg: str) -> Reply | Answer:
        if not self.atrn_offered():
            return reply.NOT_IMPLEMENTED  # not advertised here
        refused = self._reversal_refused()
        if refused is not None:
            return refused
        if self.authenticated is None:
            return reply.AUTH_REQUIRED  # RFC 2645 5.2.1: 530 before AUTH
        return self.context.pickup.atrn(arg, self.authenticated, self.client_address)

    @verb("TURN", "TURN", "Turn round for an authenticated client's domain (RFC 821)")
    def turn(self, arg: str) -> Reply | Answer:
        refused = self._reversal_refused()
        if refused is not None:
            return refused
        if arg:
            return reply.syntax_error("TURN takes no arguments")
        return self.context.pickup.turn(self.helo, self.authenticated, self.client_address)

    def atrn_offered(self) -> bool:
        return self.listener.atrn and self.context.pickup is not None

    # -- the transaction ---------------------------------------------------------

    @verb("MAIL", "MAIL FROM:<reverse-path> [SIZE=n] [BODY=7BIT|8BITMIME] [SMTPUTF8] "
                  "[RET=FULL|HDRS] [ENVID=id]", "Start a mail transaction")
    def mail(self, arg: str) -> Reply:
        return self._mail(arg, "MAIL")

    @verb("SEND", "SEND FROM:<reverse-path> [parameters]", "Taken as MAIL (RFC 821)")
    def send(self, arg: str) -> Reply:
        return self._mail(arg, "SEND")

    @verb("SOML", "SOML FROM:<reverse-path> [parameters]", "Taken as MAIL (RFC 821)")
    def soml(self, arg: str) -> Reply:
        return self._mail(arg, "SOML")

    @verb("SAML", "SAML FROM:<reverse-path> [parameters]", "Taken as MAIL (RFC 821)")
    def saml(self, arg: str) -> Reply:
        return self._mail(arg, "SAML")

    def _mail(self, arg: str, name: str) -> Reply | defer.Deferred:
        if self.phase == Phase.CONNECTED:
            return reply.NEED_HELO
        if self.in_transaction:
            return reply.NESTED_MAIL
        self._take_config()
        if arg[:5].upper() != "FROM:":
            return reply.syntax_error(f"syntax: {name} FROM:<address>")
        try:
            path, param_text = split_path_and_params(arg[5:])
            params = parse_params(param_text)
        except AddressError as e:
            return reply.syntax_error(str(e))
        if params and not self.esmtp:
            return reply.unknown_parameter(next(iter(params)))
        tx = Transaction()
        refused = self._mail_params(tx, params)
        if refused is not None:
            return refused
        try:
            tx.reverse_path = parse_path(path, utf8=tx.smtputf8, null_ok=True)
        except AddressError as e:
            if not tx.smtputf8 and not path.isascii():
                return reply.NON_ASCII_WITHOUT_SMTPUTF8
            return reply.BAD_SENDER.with_text(f"bad sender address: {e}")
        declared = int(params["SIZE"]) if params.get("SIZE") else None
        refused = self.policy.check_mail(self.authenticated, tx.reverse_path, declared)
        if refused is not None:
            return refused
        if self.checked:
            waiting = self._start_checks(tx)
            if waiting is not None:  # spf = "reject": MAIL's reply waits for SPF
                return waiting.addCallback(lambda refusal: refusal or self._mail_accepted(tx))
        return self._mail_accepted(tx)

    def _mail_accepted(self, tx: Transaction) -> Reply:
        self.transaction = tx
        self.phase = Phase.MAIL
        return reply.SENDER_OK

    def _start_checks(self, tx: Transaction) -> defer.Deferred | None:
        """The checks of mail from outside start with SPF; a Deferred when MAIL must wait."""
        from mta.checks.inbound import SessionChecks  # dkimpy and pyspf: only where checked
        if self._checks is None:
            self._checks = SessionChecks()
        tx.checks = self.context.checks.begin(
            self.config, self._checks, self.client_address, self.helo or "",
            str(tx.reverse_path) if tx.reverse_path else "")
        return tx.checks.refusal_at_mail()

    def _mail_params(self, tx: Transaction, params: dict[str, str | None]) -> Reply | None:
        for key, value in params.items():
            if key == "SIZE":
                if value is None or not _is_number(value) or len(value) > 20:
                    return reply.bad_parameter("SIZE requires a number of octets")
            elif key == "BODY":
                if value is None:
                    return reply.bad_parameter("BODY requires 7BIT or 8BITMIME")
                body = value.upper()
                if body not in ("7BIT", "8BITMIME"):
                    return reply.PARAM_NOT_SUPPORTED.with_text(f"BODY={value} not supported")
                tx.body_type = body
            elif key == "SMTPUTF8":
                if value is not None:
                    return reply.bad_parameter("SMTPUTF8 takes no value")
                tx.smtputf8 = True
            elif key == "RET":
                ret = (value or "").upper()
                if ret not in ("FULL", "HDRS"):
                    return reply.bad_parameter("RET must be FULL or HDRS")
                tx.ret = ret
            elif key == "ENVID":
                try:
                    envid = xtext_decode(value or "")
                except AddressError:
                    return reply.bad_parameter("ENVID must be xtext")
                if not envid or len(value or "") > MAX_ENVID:
                    return reply.bad_parameter("ENVID must be 1 to 100 characters")
                tx.envid = envid
            elif key == "AUTH" and self.context.trust is not None \
                    and self.context.trust.auth_enabled:
                # RFC 4954 5: the identity that submitted the message.  We keep
                # none: an authenticated session's own identity goes into the
                # envelope, and a client's claim is not to be trusted.
                try:
                    xtext_decode(value or "")
                except AddressError:
                    return reply.bad_parameter("AUTH= must be xtext")
                if not value:
                    return reply.bad_parameter("AUTH= requires a mailbox or <>")
            else:
                return reply.unknown_parameter(key)
        return None

    @verb("RCPT", "RCPT TO:<forward-path> [NOTIFY=NEVER|SUCCESS,FAILURE,DELAY] "
                  "[ORCPT=type;address]", "Add a recipient")
    def rcpt(self, arg: str) -> Reply:
        if self.phase == Phase.CONNECTED:
            return reply.NEED_HELO
        if self.phase == Phase.GREETED:
            return reply.NEED_MAIL
        if self.phase == Phase.DATA:
            return reply.BAD_SEQUENCE
        tx = self.transaction
        if arg[:3].upper() != "TO:":
            return reply.syntax_error("syntax: RCPT TO:<address>")
        tx.rcpt_attempts += 1
        try:
            path, param_text = split_path_and_params(arg[3:])
            params = parse_params(param_text)
        except AddressError as e:
            return reply.syntax_error(str(e))
        if params and not self.esmtp:
            return reply.unknown_parameter(next(iter(params)))
        try:
            mailbox = parse_path(path, utf8=tx.smtputf8, allow_bare_postmaster=True)
        except AddressError as e:
            if not tx.smtputf8 and not path.isascii():
                return reply.NON_ASCII_WITHOUT_SMTPUTF8
            return reply.BAD_RECIPIENT.with_text(f"bad recipient address: {e}")
        # The bare <postmaster> [RFC 5321 4.1.1.3] is ours: qualified, as ORCPT will show it.
        recipient = Recipient(str(mailbox) if mailbox.domain else f"{mailbox}@{self.hostname}")
        refused = self._rcpt_params(recipient, params)
        if refused is not None:
            return refused
        if len(tx.forward_paths) >= self.config.limits.recipients:
            return reply.TOO_MANY_RECIPIENTS  # RFC 5321 4.5.3.1.10
        targets = self.policy.check_rcpt(mailbox, self.client_address, self.submitter)
        if isinstance(targets, Reply):
            return targets
        # Aliases are expanded once, here: the spool keeps the result, so a restart or
        # a changed aliases file never expands this message differently.
        add_recipients(tx.recipients,
                       recipient.expanded(targets, null_sender=tx.reverse_path is None))
        tx.forward_paths.append(str(mailbox))
        self.phase = Phase.RCPT
        return reply.RECIPIENT_OK

    @staticmethod
    def _rcpt_params(recipient: Recipient, params: dict[str, str | None]) -> Reply | None:
        for key, value in params.items():
            if key == "NOTIFY":
                items = tuple((value or "").upper().split(","))
                if items != ("NEVER",) and not (set(items) <= DSN_NOTIFY and
                                                len(set(items)) == len(items)):
                    return reply.bad_parameter(
                        "NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY")
                recipient.notify = items
            elif key == "ORCPT":
                addr_type, semi, addr = (value or "").partition(";")
                if not semi or not addr_type or len(value or "") > MAX_ORCPT:
                    return reply.bad_parameter("ORCPT must be addr-type;address")
                try:
                    decoded = xtext_decode(addr)
                except AddressError:
                    return reply.bad_parameter("ORCPT address must be xtext")
                recipient.orcpt = f"{addr_type.lower()};{decoded}"
            else:
                return reply.unknown_parameter(key)
        return None

    def _body_refused(self) -> Reply | None:
        """The ordering checks DATA and BDAT share [RFC 5321 4.1.4, RFC 2920 3.1]."""
        if self.phase == Phase.CONNECTED:
            return reply.NEED_HELO
        if self.phase == Phase.GREETED:
            return reply.NEED_MAIL
        if self.phase == Phase.MAIL:
            # With PIPELINING, DATA after only failed RCPTs gets 554 [RFC 2920 3.1].
            return reply.NO_VALID_RECIPIENTS if self.transaction.rcpt_attempts \
                else reply.NEED_RCPT
        return None

    @verb("DATA", "DATA", "Send the message, ended by a line with a single dot")
    def data(self, arg: str) -> Reply | Answer:
        if arg:
            return reply.syntax_error("DATA takes no arguments")
        refused = self._body_refused()
        if refused is not None:
            return refused
        tx = self.transaction
        if tx.mode is not None:
            return reply.MIXED_DATA_BDAT
        opened = self._open_incoming()
        if opened is not None:
            return opened
        tx.mode = "DATA"
        tx.body = DataReader(tx.writer, self.config.limits.message_size,
                             self.config.limits.received_headers)
        tx.body.headers.want_from = tx.dkim
        self.phase = Phase.DATA
        return self._read(tx.body, reply.START_DATA)

    @verb("BDAT", "BDAT <size> [LAST]", "Send a chunk of the message (RFC 3030)")
    def bdat(self, arg: str) -> Reply | Answer:
        parts = arg.split()
        if not (1 <= len(parts) <= 2 and _is_number(parts[0]) and len(parts[0]) <= 20
                and (len(parts) == 1 or parts[1].upper() == "LAST")):
            return reply.syntax_error("syntax: BDAT <size> [LAST]")
        size, last = int(parts[0]), len(parts) == 2
        limits = self.config.limits
        if size > limits.message_size + 1024 * 1024:
            # We cannot stay in step without reading it all: refuse and close.
            return Answer(reply.MESSAGE_TOO_BIG.with_text(
                "chunk exceeds the maximum message size"), CLOSE)
        tx = self.transaction
        refused = self._body_refused() or (reply.MIXED_DATA_BDAT if tx.mode == "DATA" else None)
        if refused is None and tx.incoming is None:
            refused = self._open_incoming()
        if refused is not None:
            # RFC 3030 3: the chunk's octets are read even when the command fails.
            self._chunk_outcome = (refused, False)
            return self._read(ChunkReader(None, _NullIncoming(), size, 0, 0, discard=True))
        tx.mode = "BDAT"
        tx.body = ChunkReader(tx.body, tx.writer, size, limits.message_size,
                              limits.received_headers)
        tx.body.headers.want_from = tx.dkim
        self.phase = Phase.DATA
        self._chunk_outcome = (None, last)
        return self._read(tx.body)

    @staticmethod
    def _read(reader: BodyReader, said: Reply | None = None) -> Answer:
        """The bytes that follow are a body for `reader`; `body_done` answers when it is full."""
        return Answer(said, ReadBody(reader))

    def _open_incoming(self) -> Reply | None:
        """The transaction's envelope is complete when the body starts: the spool file
        begins with it, then our Received header, then what the client sends."""
        tx = self.transaction
        envelope = Envelope(
            queue_id="",
            reverse_path=str(tx.reverse_path) if tx.reverse_path else "",
            recipients=tx.recipients,
            arrival=self.context.clock(),
            client_address=self.client_address,
            client_helo=self.helo or "",
            protocol=self.protocol_name(),
            auth_identity=self.authenticated,
            ret=tx.ret,
            envid=tx.envid,
            body=tx.body_type,
            smtputf8=tx.smtputf8,
        )
        try:
            incoming = self.context.spool.receive(envelope)
            incoming.write(self._received_header(incoming.queue_id))
        except OSError as e:
            log.error("cannot open a spool file: {error}", error=e)
            return reply.SPOOL_ERROR
        self.transaction.incoming = incoming
        self.transaction.writer = incoming
        self.transaction.dkim = self._dkim_applies()
        if self.transaction.checks is not None:
            self.transaction.writer = self.transaction.checks.header_filter(incoming)
        elif self.completes_headers:
            self.transaction.writer = HeaderCompletion(
                incoming, self.hostname, self._author(envelope.reverse_path), self.context.clock)
        return None

    # -- DKIM signing (signing.py) ------------------------------------------------------

    def _dkim_applies(self) -> bool:
        """Whether this message may be signed: the config has DKIM keys, it comes from a
        trusted source (AUTH, the sendmail socket, mynetworks), and not every recipient
        is delivered here (nobody downstream would check a signature)."""
        config = self.config
        if not config.dkim:
            return False
        if self.submitter is None and not config.is_mynetwork(self.client_address):
            return False
        return not all(_maildir(config, r.address) for r in self.transaction.recipients)

    def _dkim_domain(self, reader: BodyReader) -> DKIMDomain | None:
        """The ``[dkim]`` table whose keys sign this message, if any: by the From:
        field's domain, or the envelope sender's ([relay] dkim_domain)."""
        tx = self.transaction
        if not tx.dkim:
            return None
        if self.config.relay.dkim_domain == "sender":
            domain = tx.reverse_path.domain if tx.reverse_path is not None else None
        else:
            author = reader.headers.from_field
            if author is None and isinstance(tx.writer, HeaderCompletion) \
                    and "From" in tx.writer.added:
                author = tx.writer.author  # the From: we added (RFC 6409 8)
            domain = signing.author_domain(author) if author else None
        return signing.domain_keys(self.config, domain) if domain else None

    def _author(self, reverse_path: str) -> str | None:
        """The address of a From: we add: the envelope sender, else our user's address."""
        if reverse_path:
            return reverse_path
        user = self.submitter
        if user is None:
            return None
        return user if "@" in user else f"{user}@{self.hostname}"

    def body_done(self, reader: BodyReader) -> Answer | defer.Deferred[Answer]:
        """`reader` (handed out with ReadBody) has all its bytes: answer the DATA or BDAT."""
        tx = self.transaction
        queue_id = tx.incoming.queue_id if tx.incoming is not None else None
        result = _answered(self._body_verdict(reader))
        if isinstance(result, defer.Deferred):
            return result.addCallback(self._body_noted, tx, queue_id)
        return self._body_noted(result, tx, queue_id)

    def _body_noted(self, answer: Answer, tx: Transaction, queue_id: str | None) -> Answer:
        said = answer.reply
        if said is not None and said.code >= 400:
            self._log_reject("END-OF-MESSAGE", said, tx=tx, queue_id=queue_id)
            # DATA/BDAT counts as accepted in the disconnect line only if the message was.
            counts = self.counts.get((tx.mode or "").lower())
            if counts is not None and counts[0] > 0:
                counts[0] -= 1
        return answer

    def _body_verdict(self, reader: BodyReader) -> Reply | defer.Deferred:
        if isinstance(reader, ChunkReader):
            refused, last = self._chunk_outcome
            if refused is not None:
                return refused
            if not last:
                if reader.too_big:
                    self.reset_transaction()
                    return reply.MESSAGE_TOO_BIG
                return reply.chunk_ok(reader.chunk_size)
        problem = reader.problem
        if problem is not None:
            self.reset_transaction()
            return problem
        writer = self.transaction.writer
        if isinstance(writer, HeaderEditor):
            try:
                writer.finish()
            except OSError as e:
                log.error("cannot write to a spool file: {error}", error=e)
                self.reset_transaction()
                return reply.SPOOL_ERROR
        message_id = reader.headers.message_id
        checks = self.transaction.checks
        dkim_domain = self._dkim_domain(reader)
        incoming = self._detach()
        if checks is not None:
            return self._check_then_commit(checks, incoming, writer, message_id)
        return self._commit(incoming, message_id, dkim_domain=dkim_domain)

    def _detach(self) -> Incoming:
        """The message is complete: the spool (or the checks) own it now, whatever happens."""
        incoming = self.transaction.incoming
        self.transaction.incoming = None
        self.transaction = Transaction()
        self.phase = Phase.GREETED
        return incoming

    def _check_then_commit(self, checks: MessageChecks, incoming: Incoming,
                           headers: HeaderEditor, message_id: str | None) -> defer.Deferred:
        """Mail from outside: the checks' verdict refuses it, or it is committed with our
        Authentication-Results in front (mta/checks/inbound.py)."""

        def decided(verdict: Verdict) -> Reply | defer.Deferred:
            maillog.checked(incoming.queue_id, verdict.summary, verdict.results)
            if verdict.refusal is not None:
                incoming.abort()
                return verdict.refusal
            if self.gone:
                # The client left before its answer (the checks may take minutes): it
                # was told nothing, so it sends the message again; stored now, it would
                # be delivered twice [RFC 1047].
                log.info("{queue_id}: not stored: [{client}] left before the checks ended",
                         queue_id=incoming.queue_id, client=self.client_address)
                incoming.abort()
                return reply.LOCAL_ERROR
            return self._commit(incoming, message_id, verdict.fields)

        def failed(failure) -> Reply:
            log.failure("{queue_id}: the inbound checks failed", failure,
                        queue_id=incoming.queue_id)
            incoming.abort()
            return reply.LOCAL_ERROR
        return checks.verdict(incoming, headers).addCallbacks(decided, failed)

    def _commit(self, incoming: Incoming, message_id: str | None, fields: bytes = b"",
                dkim_domain: DKIMDomain | None = None) -> defer.Deferred:
        """Commit `incoming`, with header `fields` put in front of it first, or signed
        with `dkim_domain`'s keys (in the committing thread: `prepend` may copy a large
        message on disk).  The checks' fields and signing never meet: one is for mail
        from outside, the other for our own users' mail."""
        envelope = incoming.envelope
        protocol = envelope.protocol

        client = f"local {self.local_user}" if self.local_user else self.client_address
        tls, method, user = self.tls_info, self.auth_method, self.authenticated

        def committed(queue_id: str, signed: signing.Signed | None = None) -> Answer:
            def then() -> None:  # once the 250 is written: the client need not wait for this
                maillog.received(queue_id, client, tls, method, user, envelope.reverse_path,
                                 len(envelope.recipients), envelope.size, message_id, protocol)
                if signed is not None:
                    maillog.dkim_signing(queue_id, signed)
                try:
                    self.context.queue.enqueue(envelope)
                except Exception:  # noqa: BLE001 (whatever broke, the message is committed)
                    # The message is safely in queue/ (a restart schedules it): still 250.
                    log.failure("{queue_id}: scheduling failed", queue_id=queue_id)
            return Answer(reply.queued(queue_id), then=then)

        def failed(failure) -> Reply:
            error = failure.value
            if isinstance(error, OSError):  # a full disk, an I/O error: one line, no traceback
                log.error("{queue_id}: not accepted from [{client}]: the spool cannot store it: "
                          "{error}", queue_id=incoming.queue_id, client=self.client_address,
                          error=error)
            else:
                log.failure("spool commit failed for {queue_id}", failure,
                            queue_id=incoming.queue_id)
            return reply.spool_error(error)

        if dkim_domain is not None:
            # Signed once, here, in the committing thread: the queue holds what is sent.
            d = self.context.run_blocking(signing.sign_and_commit, self.context.spool,
                                          incoming, dkim_domain)
            return d.addCallbacks(lambda done: committed(*done), failed)
        if fields:
            d = self.context.run_blocking(_prepend_and_commit, self.context.spool, incoming, fields)
        else:
            d = self.context.run_blocking(self.context.spool.commit, incoming)
        return d.addCallbacks(committed, failed)

    # -- Received: [RFC 5321 4.4] --------------------------------------------------

    def protocol_name(self) -> str:
        """The ``with`` keyword [RFC 3848, RFC 6531 for UTF8SMTP]."""
        if self.local_user is not None:
            return "LOCAL"  # the envelope's record of a sendmail submission
        if not self.esmtp:
            return "SMTP"
        base = "UTF8SMTP" if self.transaction.smtputf8 else "ESMTP"
        return base + ("S" if self.tls else "") + ("A" if self.authenticated else "")

    def _received_header(self, queue_id: str) -> bytes:
        tx = self.transaction
        utf8 = tx.smtputf8
        if self.local_user is not None:
            # Postfix's form for local submission: no network peer to name.
            user = _header_safe(self.local_user.name, utf8)
            return (f"Received: by {self.hostname} (mta, from userid {self.local_user.uid} "
                    f"{user})\r\n\tid {queue_id}; {mail_date(self.context.clock())}\r\n"
                    ).encode()
        helo = _header_safe(self.helo or "unknown", utf8)
        # TCP-info is an address-literal [RFC 5321 4.4, 4.1.3]: IPv6 ones are tagged.
        literal = f"IPv6:{self.client_address}" if ":" in self.client_address \
            else self.client_address
        lines = [f"Received: from {helo} ([{literal}])",
                 f"\tby {self.hostname} (mta) with {self.protocol_name()} id {queue_id}"]
        if self.authenticated:
            lines[-1] += f" (authenticated as {_header_safe(self.authenticated, utf8)})"
        if len(tx.forward_paths) == 1:
            lines.append(f"\tfor <{_header_safe(tx.forward_paths[0], utf8)}>;")
        else:
            lines[-1] += ";"
        lines.append(f"\t{mail_date(self.context.clock())}")
        return ("\r\n".join(lines) + "\r\n").encode("utf-8")


_AUTH_FAILED = (reply.AUTH_FAILED, reply.AUTH_TOO_MANY_FAILURES)


def _maildir(config: Config, address: str) -> bool:
    """Whether mail to `address` is delivered into a Maildir here."""
    domain = config.domain_for(address.rpartition("@")[2])
    return domain is not None and domain.route.kind == "maildir"


def _prepend_and_commit(spool: Any, incoming: Incoming, fields: bytes) -> str:
    try:
        incoming.prepend(fields)
    except BaseException:
        incoming.abort()  # as a failed commit does: nothing half-stored stays behind
        raise
    return spool.commit(incoming)


def _path_of(arg: str) -> str:
    """The address in a MAIL FROM:<..> or RCPT TO:<..> argument, for the log."""
    start, end = arg.find("<"), arg.find(">")
    if 0 <= start < end:
        return arg[start + 1:end]
    return arg.partition(":")[2].strip().split(" ")[0]


def _answered(result: Reply | Answer | defer.Deferred) -> Answer | defer.Deferred[Answer]:
    if isinstance(result, defer.Deferred):
        return result.addCallback(answer)
    return answer(result)


class _NullIncoming:
    """Where the octets of a refused BDAT chunk go: nowhere."""

    size = 0

    def write(self, data: bytes) -> None:
        pass


def _is_number(text: str) -> bool:
    """ASCII digits only: str.isdigit() also takes "²" and "١", which int() refuses or misreads."""
    return text.isascii() and text.isdigit()


def _header_safe(text: str, utf8: bool) -> str:
    """Client-given text fit for our Received header: printable, no comment
    delimiters, and ASCII unless the message is SMTPUTF8 [RFC 6532 3]."""
    if (text.isascii() and text.isprintable() and "(" not in text and ")" not in text
            and "\\" not in text):
        return text[:200]  # the usual case: nothing to drop or replace
    return "".join(c if utf8 or c.isascii() else "?" for c in text
                   if c.isprintable() and c not in "()\\")[:200]

