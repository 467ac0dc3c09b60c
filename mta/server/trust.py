"""STARTTLS and AUTH for the SMTP server: what every listener shares, and one AUTH exchange.

`Trust` is built once (by tap.py) from the config and shared by all
listeners: the server's TLS settings (`ServerTLS`; None without a
certificate), the password portal (None without a password file), and the
per-address AUTH failure counter.  `reload()` is what SIGHUP does: new
certificate files for new handshakes (sessions already in TLS keep theirs)
and a fresh look at the password file.

`AuthExchange` runs one AUTH command [RFC 4954 4] for a session: `start()`
with the command's argument, `respond()` with each client line while
`waiting` is true.  Each returns the Reply to send, or a Deferred firing
with one once the password is checked.  `result` is the user name after a
235.  It never logs a password or a client line.

What its replies mean: 334 (send the next line), 235 (authenticated), 535
5.7.8 after ``[auth] failure_delay`` (wrong credentials; counted for the
session and for the client address), 421 4.7.0 after the failure that
reaches ``[auth] max_failures`` (the session sets `closing`), 501/500/504/538
for cancelled, malformed or refused exchanges (RFC 4954 4, 6), 454 4.7.0 when
the check itself broke.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet import defer, task
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure

from mta import reply
from mta.address import client_ip
from mta.config import Config
from mta.reply import Reply
from mta.server import sasl
from mta.server.auth import PasswordFileChecker, login, make_portal
from mta.server.ratelimit import WindowCounter
from mta.tls import ServerTLS

log = Logger(namespace="mta.smtpd")


@dataclass
class Trust:
    """The TLS context, the password portal and the failure counter every session consults."""

    reactor: Any  # IReactorTime: failure delays and the failure window
    failures: WindowCounter  # AUTH failures per client address
    failures_total: WindowCounter  # AUTH failures of all untrusted clients, under one key
    tls: ServerTLS | None = None
    checker: PasswordFileChecker | None = None
    portal: Portal | None = None

    @classmethod
    def from_config(cls, config: Config, reactor: Any,
                    run_in_thread: Callable[..., defer.Deferred] = deferToThread) -> Trust:
        """Raises `mta.tls.TLSConfigError` when the certificate cannot be used."""
        checker = None
        if config.auth.passwords is not None:
            checker = PasswordFileChecker(config.auth.passwords, run_in_thread)
        return cls(
            reactor=reactor,
            failures=WindowCounter(config.auth.failures_per_client, config.auth.failure_window,
                                   reactor),
            failures_total=WindowCounter(config.auth.failures_total, config.auth.failure_window,
                                         reactor),
            tls=ServerTLS.from_config(config.tls),
            checker=checker,
            portal=make_portal(checker) if checker is not None else None,
        )

    @property
    def auth_enabled(self) -> bool:
        return self.portal is not None

    def has_cram_md5(self) -> bool:
        return self.checker is not None and self.checker.has_cram_md5()

    def adopt(self, new: Trust, config: Config) -> None:
        """A reload: take `new`'s certificate and password file (read, and checked, by
        `tap.prepare` from `config`), and its AUTH failure limits.

        The ServerTLS object stays the same one (implicit-TLS listeners hold it)
        and takes the new context: new handshakes use it, sessions already in
        TLS keep theirs.  AUTH exchanges that start from now on use the new
        password file.  The failures counted so far are kept.
        """
        if self.tls is not None and new.tls is not None:
            self.tls.adopt(new.tls)
        else:
            self.tls = new.tls
        self.checker, self.portal = new.checker, new.portal
        self.failures.limit = config.auth.failures_per_client
        self.failures.window = config.auth.failure_window
        self.failures_total.limit = config.auth.failures_total
        self.failures_total.window = config.auth.failure_window


ALL = "*"  # the key of `Trust.failures_total`


def is_loopback(address: str) -> bool:
    ip = client_ip(address)
    return ip is not None and ip.is_loopback


class AuthExchange:
    """One AUTH command and the SASL lines that follow it."""

    def __init__(self, trust: Trust, config: Config, client_address: str, hostname: str,
                 failures_so_far: int) -> None:
        self.trust = trust
        self.config = config
        self.client_address = client_address
        self.hostname = hostname
        self.failures = failures_so_far
        self.mechanism: sasl.Mechanism | None = None
        self.waiting = False  # a 334 was sent: the next line is SASL
        self.result: str | None = None
        self.tried_user: str | None = None  # the user name of the last credentials checked
        self.closing = False
        # The guess being checked is counted as a failure from the moment it is made, and
        # taken back if it was right: parallel sessions see each other's guesses at once.
        self._counted = False
        self._trusted = config.is_mynetwork(client_address)

    def start(self, arg: str, offered: list[str],
              allowed: Sequence[str] = sasl.MECHANISMS) -> Reply | defer.Deferred:
        name, _, initial = arg.partition(" ")
        if not name:
            return reply.syntax_error("syntax: AUTH mechanism [initial-response]")
        refused = sasl.refusal_for(name, offered, allowed)
        if refused is not None:
            return refused
        self.mechanism = sasl.new_mechanism(name, self.hostname)
        if self.mechanism is None:
            return reply.AUTH_MECH_UNKNOWN
        initial = initial.strip(" ")
        return self._step(self.mechanism.start, initial or None)

    def respond(self, line: bytes) -> Reply | defer.Deferred:
        return self._step(self.mechanism.respond, line)

    def abort_too_long(self) -> Reply:
        """The client's line was over 12288 octets [RFC 4954 4]: the exchange ends."""
        self.waiting = False
        return reply.AUTH_LINE_TOO_LONG

    def _step(self, advance: Callable, text: Any) -> Reply | defer.Deferred:
        self.waiting = False
        try:
            step = advance(text)
        except sasl.AuthorizationRefused:
            return self._failed()
        except sasl.SASLError as e:
            return e.reply
        if isinstance(step, sasl.Challenge):
            self.waiting = True
            return step.reply
        if self.blocked():
            self.closing = True
            return reply.AUTH_CLIENT_BLOCKED
        self._count()
        self.tried_user = getattr(step, "username", None)
        if isinstance(self.tried_user, bytes):
            self.tried_user = self.tried_user.decode("utf-8", "replace")
        d = login(self.trust.portal, step)
        return d.addCallbacks(self._succeeded, self._errored)

    def blocked(self) -> bool:
        """Too many failures from this address, or (untrusted) from everyone."""
        return self.trust.failures.blocked(self.client_address) or \
            (not self._trusted and self.trust.failures_total.blocked(ALL))

    def _count(self) -> None:
        self._counted = True
        self.trust.failures.record(self.client_address)
        if not self._trusted:
            self.trust.failures_total.record(ALL)

    def _uncount(self) -> None:
        if self._counted:
            self._counted = False
            self.trust.failures.discard(self.client_address)
            if not self._trusted:
                self.trust.failures_total.discard(ALL)

    def _succeeded(self, user: str) -> Reply:
        self._uncount()
        self.result = user
        log.info("AUTH {mechanism} user={user} from [{client}]",
                 mechanism=self.mechanism.name, user=user, client=self.client_address)
        return reply.AUTH_OK

    def _errored(self, failure: Failure) -> Reply | defer.Deferred:
        if failure.check(UnauthorizedLogin):
            return self._failed()
        self._uncount()  # our failure, not the client's
        log.failure("AUTH check failed for [{client}]", failure, client=self.client_address)
        return reply.AUTH_TEMPORARY_FAILURE

    def _failed(self) -> Reply | defer.Deferred:
        """Wrong credentials: count them, then answer slowly [DESIGN.md 8]."""
        self.failures += 1
        if not self._counted:  # refused before any check (an authorization not allowed)
            self._count()
        # The session logs the failure (maillog.auth_failed), in the words fail2ban knows.
        answer = reply.AUTH_FAILED
        if self.failures >= self.config.auth.max_failures:
            self.closing = True
            answer = reply.AUTH_TOO_MANY_FAILURES
        delay = self.config.auth.failure_delay
        if delay <= 0:
            return answer
        return task.deferLater(self.trust.reactor, delay, lambda: answer)
