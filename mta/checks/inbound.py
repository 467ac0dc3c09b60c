"""The inbound checks in an SMTP transaction, and what ``[checks]`` makes of them.

Who is checked (session.py asks): sessions on ``role = "smtp"`` listeners,
and there only clients the relay policy does not trust (neither
authenticated nor in ``[relay] mynetworks``: `Policy.is_trusted`).  Nothing
here runs for anyone else: no thread hop, no DNS, no header scan.

When:

- SPF starts at MAIL, in the checks' own thread pool.  With ``spf =
  "reject"`` MAIL's reply waits for it (550 5.7.23 for ``fail``, 451 4.7.24
  for ``temperror`` [RFC 7208 8.4, 8.6]); otherwise it runs alongside the
  rest of the transaction.  One session runs one SPF check at a time, and a
  new transaction with the same sender and HELO reuses the last result, so
  that MAIL/RSET loops cannot queue lookups without end.
- While the body streams in, `ResultsFilter` (cleanup.py) leaves out the
  Authentication-Results fields that claim our name and notes the From:
  fields and whether any DKIM-Signature is there.
- After the final dot, in the pool: DKIM verification (the message is read
  back from the spool file only when it has a signature), then DMARC.  The
  verdict (`Verdict`) is the header fields to put in front of the message
  and the refusal, if the policy refuses.

The policy [DESIGN.md 12], in this order:

1. ``dmarc = "enforce"``: a ``fail`` whose disposition (p or sp, after
   pct) is ``reject``, or a message without exactly one From: domain set
   [RFC 7489 6.6.1], is refused: 550 5.7.1 with the reason.
2. Nothing is guessed: where a policy would refuse but a lookup failed
   for now (DMARC ``temperror`` with a policy other than ``none``, or an
   unknown one; SPF ``temperror`` with ``reject-after-data``), 451.
3. ``spf = "reject-after-data"``: an SPF ``fail`` is refused (550 5.7.23)
   unless DMARC passed: an aligned DKIM signature vouches for mail that
   came through a forwarder.
4. ``dmarc = "enforce"`` and a ``fail`` with disposition ``quarantine``:
   accepted, with ``X-Quarantine: dmarc ...`` (``quarantine_header``) for
   the operator's filter.

The pool (`InboundChecks`) is bounded (``[checks] threads``) so that DNS
waits never starve the spool commits in the reactor's own pool; its threads
are daemon threads and stopping does not wait for them, so that a lookup
that hangs for ``dns_timeout`` never holds up a shutdown (a message whose
checks were cut short was never answered, so its client sends it again).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import dns.resolver
from twisted.application import service
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from mta import reply
from mta import resolver as resolver_module
from mta.checks import authresults, dkimverify, dmarc, psl, spf
from mta.checks.dkimverify import DKIMResult
from mta.checks.dmarc import DMARCResult
from mta.checks.spf import SPFResult
from mta.config import Config
from mta.reply import Reply, printable
from mta.server.cleanup import FIELD_LIMIT, ResultsFilter

log = Logger(namespace="mta.checks")

MAX_AUTHOR_DOMAINS = 10  # a From: naming more is not evaluated (each costs DNS lookups)
DMARC_BUDGET = 3  # DNS timeouts one message's DMARC policy lookups may use together


@dataclass(frozen=True)
class Verdict:
    refusal: Reply | None  # None: accept
    fields: bytes  # header fields to put in front of the message (when accepted)
    summary: str  # the verdicts on one line, for the mail log
    # (method, result) for the metrics: ("spf", "pass"), one ("dkim", ...) per signature
    # (or "none"), and the ("dmarc", ...) that decided.
    results: tuple[tuple[str, str], ...] = ()


class InboundChecks:
    """What every checked session shares: the thread pool and the resolver in force.

    `run` is how work reaches the pool (tests pass one that runs at once);
    `chance` draws DMARC's pct samples; `clock` measures the DMARC lookups'
    time budget.
    """

    def __init__(self, reactor: Any, threads: int,
                 run: Callable[..., defer.Deferred] | None = None,
                 chance: Callable[[], float] = random.random,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.reactor = reactor
        self.clock = clock  # for the DNS time budgets
        self.pool = ThreadPool(0, threads, "mta-checks")
        self.pool.threadFactory = _daemon_thread
        self._run = run
        self.chance = chance
        self._resolver: tuple[Config, dns.resolver.Resolver] | None = None

    def start(self) -> None:
        self.pool.start()

    def stop(self) -> None:
        """No new work; threads still waiting for DNS are left to end on their own."""
        # ThreadPool.stop() refuses new work, then joins every thread; it runs in a
        # thread of its own, which nobody waits for (the pool's threads are daemons).
        threading.Thread(target=self.pool.stop, name="mta-checks-stop", daemon=True).start()

    def reconfigure(self, config: Config) -> None:
        """A reload: the pool's size, and the next check's resolver."""
        self.pool.adjustPoolsize(0, config.checks.threads)

    def run(self, function: Callable[..., Any], *args: Any) -> defer.Deferred:
        if self._run is not None:
            return self._run(function, *args)
        return threads.deferToThreadPool(self.reactor, self.pool, function, *args)

    def resolver(self, config: Config) -> dns.resolver.Resolver:
        """The resolver ``[relay] nameservers`` and ``dns_timeout`` of `config` describe."""
        cached = self._resolver
        if cached is None or cached[0] is not config:
            cached = self._resolver = (config, resolver_module.from_config(config))
        return cached[1]

    def begin(self, config: Config, state: SessionChecks, client_address: str, helo: str,
              reverse_path: str) -> MessageChecks:
        """The checks of one transaction, from its MAIL on (SPF starts now)."""
        return MessageChecks(self, config, state, client_address, helo, reverse_path)


class ChecksService(service.Service):
    """Starts and stops the checks' thread pool with the server."""

    name = "checks"

    def __init__(self, checks: InboundChecks) -> None:
        self.checks = checks

    def startService(self) -> None:
        super().startService()
        self.checks.start()

    def stopService(self) -> None:
        super().stopService()
        self.checks.stop()


def _daemon_thread(*args: Any, **kwargs: Any) -> threading.Thread:
    return threading.Thread(*args, daemon=True, **kwargs)


class _Shared:
    """One SPF check's result, handed to everyone who asks (now or once it is known)."""

    def __init__(self) -> None:
        self.result: SPFResult | None = None
        self.waiting: list[defer.Deferred] = []

    def get(self) -> defer.Deferred:
        if self.result is not None:
            return defer.succeed(self.result)
        d: defer.Deferred = defer.Deferred()
        self.waiting.append(d)
        return d

    def set(self, result: SPFResult) -> None:
        self.result = result
        waiting, self.waiting = self.waiting, []
        for d in waiting:
            d.callback(result)


class SessionChecks:
    """Per connection: one SPF check at a time, and the last one's result.

    A check still waiting for its turn when the client has moved on to
    another sender (or gone) and nobody waits for it is not run at all.
    """

    def __init__(self) -> None:
        self.lock = defer.DeferredSemaphore(1)
        self.last: tuple[tuple[str, str], _Shared] | None = None
        self.closed = False  # the connection is gone

    def spf(self, key: tuple[str, str], start: Callable[[], defer.Deferred]) -> _Shared:
        if self.last is not None and self.last[0] == key:
            return self.last[1]
        shared = _Shared()
        self.last = (key, shared)

        def run() -> defer.Deferred:
            superseded = self.closed or self.last is None or self.last[1] is not shared
            if superseded and not shared.waiting:
                return defer.succeed(SPFResult("temperror", "mailfrom", key[0], "not run"))
            return start()

        def failed(failure: Any) -> SPFResult:
            log.failure("SPF check failed", failure)
            return SPFResult("temperror", "mailfrom", key[0], "internal error")

        self.lock.run(run).addErrback(failed).addCallback(shared.set)
        return shared

    def close(self) -> None:
        self.closed = True


class MessageChecks:
    def __init__(self, checks: InboundChecks, config: Config, state: SessionChecks,
                 client_address: str, helo: str, reverse_path: str) -> None:
        self.checks = checks
        self.settings = config.checks
        self.authserv_id = config.server.hostname
        self.resolver = checks.resolver(config)
        self.sender = reverse_path
        self.spf: _Shared | None = None
        if self.settings.spf != "off":
            self.spf = state.spf((reverse_path, helo), lambda: checks.run(
                spf.check, self.resolver, client_address, reverse_path, helo, self.authserv_id))

    # -- at MAIL --------------------------------------------------------------------

    def refusal_at_mail(self) -> defer.Deferred[Reply | None] | None:
        """With ``spf = "reject"``: a Deferred firing with MAIL's refusal (or None)."""
        if self.settings.spf != "reject" or self.spf is None:
            return None
        return self.spf.get().addCallback(_spf_refusal)

    # -- the body ---------------------------------------------------------------------

    def header_filter(self, incoming: Any) -> ResultsFilter:
        return ResultsFilter(incoming, self.authserv_id)

    # -- after the final dot ------------------------------------------------------------

    def verdict(self, incoming: Any, headers: ResultsFilter) -> defer.Deferred[Verdict]:
        """Waits for SPF, verifies DKIM and evaluates DMARC in the pool, then decides."""
        waiting = self.spf.get() if self.spf is not None else defer.succeed(None)
        from_fields = list(headers.from_fields)
        from_count = headers.from_count
        if headers.from_too_long:
            from_fields = [None]  # no author domain can be told (see _dmarc)
        signed = headers.signatures > 0

        def checked(spf_result: SPFResult | None) -> defer.Deferred:
            return self.checks.run(self._after_data, spf_result, incoming, signed,
                                   from_fields, from_count)
        return waiting.addCallback(checked).addCallback(self._decide)

    def _after_data(self, spf_result: SPFResult | None, incoming: Any, signed: bool,
                    from_fields: list[str | None], from_count: int) -> tuple:
        """In a pool thread: DKIM and DMARC."""
        dkim_results = None
        if self.settings.dkim != "off":
            dkim_results = dkimverify.verify(self.resolver, incoming.read_data()) if signed \
                else []
        dmarc_results = None
        if self.settings.dmarc != "off":
            dmarc_results = self._dmarc(spf_result, dkim_results or [], from_fields, from_count)
        return spf_result, dkim_results, dmarc_results

    def _dmarc(self, spf_result: SPFResult | None, dkim_results: list[DKIMResult],
               from_fields: list[str | None], from_count: int) -> list[DMARCResult]:
        try:
            if from_count != 1:
                raise dmarc.NoAuthorDomain("no From: field" if not from_count
                                           else f"{from_count} From: fields")
            if from_fields == [None]:
                # Read in part only: the addresses past the cut could name any domain.
                raise dmarc.NoAuthorDomain(f"From: field longer than {FIELD_LIMIT} octets")
            domains = dmarc.author_domains(from_fields)
        except dmarc.NoAuthorDomain as e:
            return [DMARCResult("permerror", "", reason=str(e))]
        if len(domains) > MAX_AUTHOR_DOMAINS:
            return [DMARCResult("permerror", "", reason=f"From: names {len(domains)} domains")]
        try:
            table = psl.load(self.settings.public_suffix_list)
        except OSError as e:
            log.error("cannot read the public suffix list {path}: {why}",
                      path=str(self.settings.public_suffix_list), why=e.strerror)
            return [DMARCResult("temperror", d, reason="public suffix list unreadable")
                    for d in domains]
        # The domains' policy lookups share one time budget, as DKIM's key lookups do:
        # ten domains that all time out must not hold a checking thread for 20 timeouts.
        deadline = self.checks.clock() + DMARC_BUDGET * self.resolver.lifetime
        results = []
        for domain in domains:
            if self.checks.clock() > deadline:
                results.append(DMARCResult("temperror", domain,
                                           reason="not looked up: the DNS time budget is spent"))
                continue
            results.append(dmarc.evaluate(self.resolver, table, domain, spf_result,
                                          dkim_results, self.checks.chance))
        return results

    def _decide(self, results: tuple) -> Verdict:
        spf_result, dkim_results, dmarc_results = results
        if dmarc_results and self.settings.dmarc != "enforce":
            # Recorded, not acted on: dis= in the header and the log says what was done.
            dmarc_results = [replace(r, disposition="none") for r in dmarc_results]
        fields = authresults.field(self.authserv_id, spf_result, dkim_results, dmarc_results)
        summary = authresults.summary(spf_result, dkim_results, dmarc_results)
        decisive = dmarc.strictest(dmarc_results) if dmarc_results else None
        refusal = self._refusal(spf_result, decisive)
        if refusal is None and self.settings.dmarc == "enforce" and decisive is not None \
                and decisive.result == "fail" and decisive.disposition == "quarantine":
            name = self.settings.quarantine_header
            fields += (f"{name}: dmarc header.from={_safe(decisive.domain)} "
                       f"p={decisive.policy}\r\n").encode()
            summary += f" action={name.lower()}"
        counted = [("spf", spf_result.result)] if spf_result is not None else []
        if self.settings.dkim != "off":
            counted += [("dkim", r.result) for r in dkim_results] or [("dkim", "none")]
        if decisive is not None:
            counted.append(("dmarc", decisive.result))
        return Verdict(refusal, fields, summary, tuple(counted))

    def _refusal(self, spf_result: SPFResult | None, decisive: DMARCResult | None) -> Reply | None:
        enforce = self.settings.dmarc == "enforce" and decisive is not None
        if enforce and decisive.result == "permerror":
            return reply.dmarc_no_author(decisive.reason)
        if enforce and decisive.result == "fail" and decisive.disposition == "reject":
            return reply.dmarc_reject(_safe(decisive.domain), decisive.reason)
        if enforce and decisive.result == "temperror" and decisive.policy != "none":
            return reply.dmarc_temperror(_safe(decisive.domain))
        if self.settings.spf == "reject-after-data" and spf_result is not None and \
                (decisive is None or decisive.result != "pass"):
            return _spf_refusal(spf_result)
        return None


def _spf_refusal(result: SPFResult) -> Reply | None:
    if result.result == "fail":
        return reply.spf_fail(_safe(result.sender), printable(result.explanation, 200))
    if result.result == "temperror":
        return reply.spf_temperror(_safe(result.domain))
    return None


def _safe(text: str) -> str:
    return printable(text, 255)
