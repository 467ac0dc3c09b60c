"""The relayer: decides when each queued message is tried, and records what happened.

`Relayer` is a Twisted `Service`.  `startService()` runs `spool.recover()`
(synchronously, before any listener starts) and schedules every committed
message; `enqueue(envelope)` schedules a message the server just committed;
`flush(domain)` makes queued mail due now (ETRN); `stopService()` stops
starting attempts and abandons the ones in flight.

Strategies, each in one place:

Due times.  One heap of (due time, queue id) and one timer for its head.
A new message is due at once; at start-up a message is due at its stored
`next_attempt` (or at once if it was never tried).  Time comes from the
injected reactor (`IReactorTime`), so tests run on `task.Clock`.

Back-off.  After an attempt that leaves recipients pending, the message is
due again after `retry_min`, doubling with each attempt up to `retry_max`,
times a jitter of +-10% so that messages deferred together spread out.  The
next attempt is never later than the end of the message's lifetime.

Lifetime.  A message older than `relay.lifetime` fails its pending
recipients (status 4.4.7, the last reason kept in the diagnostic) after its
next attempt [RFC 5321 4.5.4.1].  A delay warning (action=delayed) is sent
once, after an attempt, for recipients older than `relay.delay_warning`
that asked for DELAY or gave no NOTIFY [RFC 3461 4.1]; ``delay_warning = "0"``
turns warnings off.

Concurrency.  A message is attempted by one attempt at a time.  Within an
attempt its pending recipients are grouped by next hop; each group is one
SMTP transaction (or one local delivery) and needs a slot: at most
`relay.concurrency` in total and `relay.concurrency_per_destination` per
destination.  Waiting groups are served first come, first served, but a
group whose destination is full does not hold up the others.

Hold.  Recipients routed to ``hold`` are not attempted; `flush(domain)`
releases them for one attempt (to the domain's `etrn_route`, or its MX).
A message with only held recipients is due again at the end of its
lifetime, when it expires.  `turn(domains)` delivers them over a connection
that ATRN or TURN turned round [RFC 2645]: it returns the client protocol
to attach to that connection.

Notices.  Every second the spool's ``control/`` notices from the command
line are read (in a thread) and acted on: ``new`` and ``release`` schedule
the message now, ``flush`` is `flush(domain)`, ``hold`` and ``delete``
forget it (an attempt re-reads the envelope from disk anyway).

Durability.  Each group's outcomes are written to the envelope with
`spool.save` as soon as its transaction ends, before anything depends on
them.  Then reports are injected (one failure report, one success report,
one delay report per message and attempt), the recipients marked
notified, the envelope saved again; a complete message is removed.  A
crash between these steps at worst sends a report twice; it never loses a
recipient's result nor delivers to a recipient recorded as delivered.
Spool work runs in the reactor's thread pool, DNS resolution in a pool of
its own (a dead name server must not delay the server's commits); neither
ever in the reactor thread.
"""

from __future__ import annotations

import copy
import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, task, threads
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from mta import bounce, maillog
from mta.config import Config
from mta.delivery.client import SessionPolicy, SMTPClient
from mta.delivery.courier import MaildirCourier, Result, SMTPCourier, transaction_for
from mta.delivery.outcome import Delivered, Failed, Outcome, classify
from mta.delivery.router import HOLD, MAILDIR, SMTP, NextHop, Router
from mta.spool.envelope import DELIVERED, FAILED, PENDING, Envelope, EnvelopeError, Recipient
from mta.spool.store import QUEUE, Spool, SpoolError

log = Logger(namespace="mta.delivery.scheduler")

JITTER = 0.1  # back-off delays are multiplied by a random factor in [0.9, 1.1]
EXPIRED_STATUS = "4.4.7"  # RFC 3463: delivery time expired
STOP_GRACE = 10.0  # seconds stopService waits for abandoned attempts to record themselves
NOTICE_INTERVAL = 1.0  # seconds between reads of the spool's control/ notices
DNS_THREADS = 10  # at most this many DNS resolutions at once


def backoff(attempts: int, retry_min: float, retry_max: float, rng: random.Random) -> float:
    """Seconds to wait after the `attempts`-th attempt: retry_min doubling, at most retry_max."""
    base = min(retry_max, retry_min * 2 ** max(0, min(attempts - 1, 30)))
    return base * rng.uniform(1 - JITTER, 1 + JITTER)


def domain_matches(domain: str, wanted: str, subdomains: bool = False) -> bool:
    domain, wanted = domain.lower().rstrip("."), wanted.lower().rstrip(".")
    return domain == wanted or (subdomains and domain.endswith("." + wanted))


@dataclass
class _Entry:
    """What the scheduler keeps in memory for one queued message."""

    queue_id: str
    due: float | None = None
    running: bool = False
    again: bool = False  # flushed while running: due again as soon as it ends
    domains: set[str] = field(default_factory=set)  # of pending recipients, for flush(domain)
    release: set[str] = field(default_factory=set)  # held domains to attempt next time
    save_lock: defer.DeferredLock = field(default_factory=defer.DeferredLock)


class _Limiter:
    """Slots for sessions: at most `total` at once, `per_destination` per destination."""

    def __init__(self, total: int, per_destination: int) -> None:
        self.total = total
        self.per_destination = per_destination
        self.active = 0
        self.by_destination: dict[str, int] = {}
        self.waiting: list[tuple[str, defer.Deferred[None]]] = []

    def _fits(self, destination: str) -> bool:
        return self.active < self.total and \
            self.by_destination.get(destination, 0) < self.per_destination

    def _take(self, destination: str) -> None:
        self.active += 1
        self.by_destination[destination] = self.by_destination.get(destination, 0) + 1

    def acquire(self, destination: str) -> defer.Deferred[None]:
        if self._fits(destination) and not self.waiting:
            self._take(destination)
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self.waiting.append((destination, d))
        self._grant()
        return d

    def release(self, destination: str) -> None:
        self.active -= 1
        left = self.by_destination[destination] - 1
        if left:
            self.by_destination[destination] = left
        else:
            del self.by_destination[destination]
        self._grant()

    def cancel_waiting(self) -> None:
        waiting, self.waiting = self.waiting, []
        for _, d in waiting:
            d.cancel()

    def _grant(self) -> None:
        for item in list(self.waiting):
            if self.active >= self.total:
                return
            destination, d = item
            if self._fits(destination):
                self.waiting.remove(item)
                self._take(destination)
                d.callback(None)


class Relayer(Service):
    name = "relayer"

    def __init__(self, config: Config, spool: Spool, reactor: Any = None, *,
                 rng: random.Random | None = None,
                 run_blocking: Callable[..., defer.Deferred[Any]] | None = None,
                 router: Router | None = None,
                 couriers: dict[str, Any] | None = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor
            reactor = global_reactor
        self.config = config
        self.spool = spool
        self.reactor = reactor
        self.rng = rng or random.Random()
        self.run_blocking = run_blocking or self._in_thread
        self.router = router or Router(config)
        # DNS lookups wait on the network for up to dns_timeout: they get threads of
        # their own, so that they never hold up the spool work of the shared pool.
        self._dns_pool: ThreadPool | None = None
        if couriers is None:
            self._dns_pool = ThreadPool(0, DNS_THREADS, name="mta-dns")
            couriers = {
                SMTP: SMTPCourier(config, reactor, self._in_dns_thread),
                MAILDIR: MaildirCourier(config, self.run_blocking),
            }
        self.couriers = couriers
        relay = config.relay
        self.limiter = _Limiter(relay.concurrency, relay.concurrency_per_destination)
        self._entries: dict[str, _Entry] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self._wakeup: IDelayedCall | None = None
        self._attempts: set[defer.Deferred[None]] = set()
        self._stopping = False
        self._notices: task.LoopingCall | None = None

    def _in_thread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                         f, *args, **kwargs)

    def _in_dns_thread(self, f: Callable[..., Any], *args: Any,
                       **kwargs: Any) -> defer.Deferred[Any]:
        assert self._dns_pool is not None
        return threads.deferToThreadPool(self.reactor, self._dns_pool, f, *args, **kwargs)

    # -- the public interface ---------------------------------------------------------

    def startService(self) -> None:
        self._stopping = False
        envelopes = self.spool.recover()
        if self._dns_pool is not None and not self._dns_pool.started:
            self._dns_pool.start()
        super().startService()
        now = self.reactor.seconds()
        for envelope in envelopes:
            due = envelope.next_attempt if envelope.attempts and envelope.next_attempt > now \
                else now
            self._track(envelope, due)
        log.info("relayer started: {count} queued messages", count=len(envelopes))
        self._arm()
        self._notices = task.LoopingCall(self._read_notices)
        self._notices.clock = self.reactor
        self._notices.start(NOTICE_INTERVAL, now=False).addErrback(
            lambda f: log.failure("reading control notices stopped", f))

    def enqueue(self, envelope: Envelope) -> None:
        """A message just committed to the queue: try it at once."""
        if self._stopping:
            return
        self._track(envelope, self.reactor.seconds())
        self._arm()

    def flush(self, domain: str | None = None, subdomains: bool = False) -> int:
        """Make queued mail due now (all, or with pending recipients in `domain`, held ones too)."""
        if self._stopping:
            return 0
        now = self.reactor.seconds()
        count = 0
        for entry in self._entries.values():
            if domain is not None:
                matched = {d for d in entry.domains if domain_matches(d, domain, subdomains)}
                if not matched:
                    continue
                entry.release |= matched
            count += 1
            if entry.running:
                entry.again = True
            else:
                self._set_due(entry, now)
        self._arm()
        return count

    def stopService(self) -> defer.Deferred[None] | None:
        self._stopping = True
        super().stopService()
        if self._wakeup is not None and self._wakeup.active():
            self._wakeup.cancel()
        self._wakeup = None
        if self._notices is not None and self._notices.running:
            self._notices.stop()
        self.limiter.cancel_waiting()
        for courier in self.couriers.values():
            courier.abort_all()
        if not self._attempts:
            self._stop_dns_pool()
            return None
        done = defer.DeferredList(list(self._attempts), consumeErrors=True)
        timeout = self.reactor.callLater(STOP_GRACE, done.cancel)
        done.addBoth(lambda _: timeout.cancel() if timeout.active() else None)
        done.addBoth(lambda _: self._stop_dns_pool())
        return done

    def _stop_dns_pool(self) -> None:
        if self._dns_pool is not None and self._dns_pool.started:
            self._dns_pool.stop()  # joins: a lookup in progress ends within dns_timeout

    def notice(self, notice: dict[str, str]) -> defer.Deferred[None] | None:
        """Act on one notice from the command line (see `Spool.notify`)."""
        action, queue_id = notice.get("action"), notice.get("queue_id", "")
        if action == "flush":
            self.flush(notice.get("domain") or None)
        elif action in ("new", "release") and queue_id:
            d = self.run_blocking(self._load, queue_id)
            d.addCallback(self._noticed, action)
            return d
        elif action in ("hold", "delete") and queue_id:
            maillog.operator(queue_id, "held" if action == "hold" else "deleted")
            entry = self._entries.get(queue_id)
            if entry is not None and not entry.running:
                del self._entries[queue_id]
        else:
            log.warn("ignoring unknown notice {notice!r}", notice=notice)  # noqa: G010
        return None

    def _noticed(self, loaded: tuple[Envelope, Path] | None, action: str) -> None:
        if loaded is None:
            return
        envelope = loaded[0]
        if action == "new":
            maillog.picked_up(envelope.queue_id, envelope.reverse_path,
                              len(envelope.recipients), envelope.size)
        else:
            maillog.operator(envelope.queue_id, "released")
        self.enqueue(envelope)

    def _read_notices(self) -> defer.Deferred[None]:
        def act(notices: list[dict[str, str]]) -> defer.Deferred[Any]:
            return defer.gatherResults([defer.maybeDeferred(self.notice, n) for n in notices],
                                       consumeErrors=True)
        d = self.run_blocking(self.spool.take_notices)
        d.addCallback(act)
        d.addErrback(lambda f: log.failure("cannot read control notices", f))
        return d

    def turn(self, domains: list[str]) -> tuple[SMTPClient, defer.Deferred[int]]:
        """ATRN/TURN [RFC 2645 4, RFC 821]: deliver held mail for `domains` over a turned connection.

        Returns a client protocol and a Deferred.  The caller (the server's
        role reversal) attaches the client to the live transport with
        ``client.makeConnection(transport)`` and routes further bytes to it;
        the client waits for the other side's 220, delivers every queued
        message with pending recipients in `domains` (one transaction
        each, per-recipient results recorded as for any attempt), then
        says QUIT.  The Deferred fires with the number of messages sent.
        Mail that fails to go stays queued.
        """
        policy = SessionPolicy(helo_name=self.config.server.hostname,
                               peer_name="turned connection", tls="off")
        client = SMTPClient(policy, self.reactor)
        d = self._serve_turn(client, [d.lower().rstrip(".") for d in domains])
        return client, d

    @defer.inlineCallbacks
    def _serve_turn(self, client: SMTPClient, domains: list[str]) -> Any:
        try:
            yield client.ready
        except Exception as e:  # noqa: BLE001 (the peer went away: nothing sent)
            log.info("turned connection failed before delivery: {error}", error=e)
            return 0
        sent = 0
        for entry in [e for e in self._entries.values()
                      if not e.running and any(d in domains for d in e.domains)]:
            if client.closed or self._stopping:
                break
            entry.running = True
            try:
                sent += (yield self._turn_one(client, entry, domains))
            except Exception:  # noqa: BLE001 (one message must not stop the others)
                log.failure("{queue_id}: delivery over the turned connection failed",
                            queue_id=entry.queue_id)
            finally:
                entry.running = False
                if self._entries.get(entry.queue_id) is entry:
                    self._arm()
        client.quit()
        return sent

    @defer.inlineCallbacks
    def _turn_one(self, client: SMTPClient, entry: _Entry, domains: list[str]) -> Any:
        loaded = yield self.run_blocking(self._load, entry.queue_id)
        if loaded is None:
            self._entries.pop(entry.queue_id, None)
            return 0
        envelope, data_path = loaded
        recipients = [r for r in envelope.pending if r.domain in domains]
        if not recipients:
            return 0
        result = yield client.deliver(transaction_for(envelope, recipients, data_path))
        undecided = classify(result.error) if result.error is not None else None
        now = self.reactor.seconds()
        for recipient, outcome in zip(recipients, result.outcomes):
            outcome = outcome or undecided
            if outcome is not None:
                self._apply(envelope, recipient, Result(outcome, "turned-connection"), now)
        yield self._save(entry, envelope)
        yield self._after_attempt(entry, envelope, data_path)
        return 1

    # -- due times --------------------------------------------------------------------

    def _track(self, envelope: Envelope, due: float) -> None:
        entry = self._entries.get(envelope.queue_id)
        if entry is None:
            entry = self._entries[envelope.queue_id] = _Entry(envelope.queue_id)
        entry.domains = {r.domain for r in envelope.pending}
        if entry.running:
            entry.again = True
        else:
            self._set_due(entry, due)

    def _set_due(self, entry: _Entry, due: float) -> None:
        entry.due = due
        heapq.heappush(self._heap, (due, next(self._seq), entry.queue_id))

    def _arm(self) -> None:
        """Point the one timer at the earliest due time."""
        if self._stopping or not self.running:
            return
        while self._heap and not self._valid(self._heap[0]):
            heapq.heappop(self._heap)
        if not self._heap:
            return
        delay = max(0.0, self._heap[0][0] - self.reactor.seconds())
        if self._wakeup is not None and self._wakeup.active():
            if abs(self._wakeup.getTime() - self.reactor.seconds() - delay) < 1e-6:
                return
            self._wakeup.cancel()
        self._wakeup = self.reactor.callLater(delay, self._on_wakeup)

    def _valid(self, item: tuple[float, int, str]) -> bool:
        entry = self._entries.get(item[2])
        return entry is not None and not entry.running and entry.due == item[0]

    def _on_wakeup(self) -> None:
        self._wakeup = None
        now = self.reactor.seconds()
        while self._heap and self._heap[0][0] <= now and not self._stopping:
            item = heapq.heappop(self._heap)
            if self._valid(item):
                self._start(self._entries[item[2]])
        self._arm()

    def _start(self, entry: _Entry) -> None:
        entry.running = True
        entry.due = None
        d = self._attempt(entry)
        self._attempts.add(d)
        d.addErrback(lambda f: log.failure("attempt of {queue_id} failed", f,
                                           queue_id=entry.queue_id))
        d.addBoth(lambda _: self._attempt_ended(entry, d))

    def _attempt_ended(self, entry: _Entry, d: defer.Deferred[None]) -> None:
        self._attempts.discard(d)
        entry.running = False
        if self._entries.get(entry.queue_id) is not entry:
            return
        if entry.again and not self._stopping:
            entry.again = False
            self._set_due(entry, self.reactor.seconds())
        elif entry.due is None and not self._stopping:
            # The attempt ended without a verdict on timing (an error): retry later.
            self._set_due(entry, self.reactor.seconds() + self.config.relay.retry_min)
        self._arm()

    # -- one attempt --------------------------------------------------------------------

    @defer.inlineCallbacks
    def _attempt(self, entry: _Entry) -> Any:
        loaded = yield self.run_blocking(self._load, entry.queue_id)
        if loaded is None:
            self._entries.pop(entry.queue_id, None)
            return
        envelope, data_path = loaded
        release, entry.release = entry.release, set()
        groups = self._groups(envelope, release)
        if groups:
            envelope.attempts += 1
            delivered = yield defer.DeferredList(
                [self._deliver_group(entry, envelope, hop, indices, data_path)
                 for hop, indices in groups.values()], consumeErrors=True)
            failures = [result for ok, result in delivered if not ok]
            if failures:
                # An outcome that could not be saved must not be reported (or the
                # message removed) as if it were on disk: retry later from the disk.
                failures[0].raiseException()
        if self._stopping:
            return
        yield self._after_attempt(entry, envelope, data_path)

    def _load(self, queue_id: str) -> tuple[Envelope, Path] | None:
        """Blocking: the envelope as it is on disk now (the command line may have changed it)."""
        try:
            if self.spool.state_of(queue_id) != QUEUE:
                return None
            return self.spool.load(queue_id), self.spool.data_path(queue_id)
        except SpoolError:
            return None
        except (OSError, EnvelopeError) as e:
            log.error("{queue_id}: cannot read the envelope: {error}", queue_id=queue_id, error=e)
            return None

    def _groups(self, envelope: Envelope, release: set[str]) -> dict[str, tuple[NextHop, list[int]]]:
        """Pending recipients by next hop: each group is one transaction."""
        groups: dict[str, tuple[NextHop, list[int]]] = {}
        for index, recipient in enumerate(envelope.recipients):
            if recipient.state != PENDING:
                continue
            hop = self.router.next_hop(recipient.address,
                                       release_hold=recipient.domain in release)
            if hop.kind == HOLD:
                continue
            groups.setdefault(hop.destination, (hop, []))[1].append(index)
        return groups

    @defer.inlineCallbacks
    def _deliver_group(self, entry: _Entry, envelope: Envelope, hop: NextHop,
                       indices: list[int], data_path: Path) -> Any:
        yield self.limiter.acquire(hop.destination)
        recipients = [envelope.recipients[i] for i in indices]
        try:
            if self._stopping:
                return
            courier = self.couriers[hop.kind]
            try:
                results = yield courier.deliver(hop, envelope, recipients, data_path)
            except Exception as e:  # noqa: BLE001 (a courier bug must not lose the attempt)
                log.failure("courier error for {queue_id}", queue_id=envelope.queue_id)
                results = [Result(classify(e), "none")] * len(recipients)
        finally:
            self.limiter.release(hop.destination)
        now = self.reactor.seconds()
        changed = False
        for recipient, result in zip(recipients, results):
            # When shutting down, a deferral is only the interruption: record final verdicts only.
            if self._stopping and not result.outcome.is_final:
                continue
            self._apply(envelope, recipient, result, now)
            changed = True
        if changed:
            yield self._save(entry, envelope)

    def _apply(self, envelope: Envelope, recipient: Recipient, result: Result, now: float) -> None:
        outcome: Outcome = result.outcome
        recipient.status = outcome.status
        recipient.diagnostic = outcome.diagnostic
        recipient.remote_mta = outcome.remote_mta
        recipient.updated = now
        delay = now - envelope.arrival
        if isinstance(outcome, Delivered):
            recipient.state = DELIVERED
            recipient.notified = not (self._success_report_due(envelope, recipient)
                                      and not outcome.dsn_passed)
            status = maillog.SENT
        elif isinstance(outcome, Failed):
            recipient.state = FAILED
            recipient.notified = not self._failure_report_due(envelope, recipient)
            status = maillog.BOUNCED
        else:
            envelope.last_error = outcome.diagnostic
            status = maillog.DEFERRED
        maillog.delivery(envelope.queue_id, recipient.address, result.relay, delay,
                         outcome.status, status, outcome.diagnostic)

    def _success_report_due(self, envelope: Envelope, recipient: Recipient) -> bool:
        return bool(envelope.reverse_path) and recipient.wants("SUCCESS")

    def _failure_report_due(self, envelope: Envelope, recipient: Recipient) -> bool:
        if not recipient.wants("FAILURE"):
            return False
        return bounce.report_recipient(envelope, bounce.FAILURE,
                                       self.config.server.postmaster) is not None

    def _save(self, entry: _Entry, envelope: Envelope) -> defer.Deferred[None]:
        """Write a snapshot of the envelope in a thread, one save at a time per message."""
        snapshot = copy.deepcopy(envelope)
        return entry.save_lock.run(self.run_blocking, self.spool.save, snapshot)

    # -- after the transactions -------------------------------------------------------------

    @defer.inlineCallbacks
    def _after_attempt(self, entry: _Entry, envelope: Envelope, data_path: Path) -> Any:
        now = self.reactor.seconds()
        relay = self.config.relay
        expiring = envelope.pending if now >= envelope.arrival + relay.lifetime else []
        for recipient in expiring:
            self._expire(envelope, recipient, now)
        if expiring:
            yield self._save(entry, envelope)
        yield self._send_reports(envelope, data_path, now)
        if envelope.is_complete:
            yield self.run_blocking(self.spool.remove, envelope.queue_id)
            self._entries.pop(envelope.queue_id, None)
            maillog.removed(envelope.queue_id)
            return
        entry.domains = {r.domain for r in envelope.pending}
        envelope.next_attempt = self._next_due(envelope, now)
        yield self._save(entry, envelope)
        self._set_due(entry, envelope.next_attempt)

    def _expire(self, envelope: Envelope, recipient: Recipient, now: float) -> None:
        last = recipient.diagnostic or "never attempted"
        recipient.state = FAILED
        recipient.status = EXPIRED_STATUS
        recipient.diagnostic = f"delivery time expired; last error: {last}"
        recipient.updated = now
        recipient.notified = not self._failure_report_due(envelope, recipient)
        maillog.delivery(envelope.queue_id, recipient.address, "none", now - envelope.arrival,
                         EXPIRED_STATUS, maillog.EXPIRED, recipient.diagnostic)

    def _next_due(self, envelope: Envelope, now: float) -> float:
        relay = self.config.relay
        wait = backoff(envelope.attempts, relay.retry_min, relay.retry_max, self.rng)
        if not envelope.pending:
            return now + wait  # only reports left to send, which failed: try them again later
        end = envelope.arrival + relay.lifetime  # after `now`: expired recipients are not pending
        if all(self.router.next_hop(r.address).kind == HOLD for r in envelope.pending):
            return end  # only held recipients: wake up to expire them
        return min(now + wait, end)

    @defer.inlineCallbacks
    def _send_reports(self, envelope: Envelope, data_path: Path, now: float) -> Any:
        """Failure, success and delay reports due for this message; marks who was told."""
        failed = [r for r in envelope.recipients if r.state == FAILED and not r.notified]
        succeeded = [r for r in envelope.recipients if r.state == DELIVERED and not r.notified]
        delayed = self._delay_warnings_due(envelope, now)
        batches = [
            (bounce.FAILURE, [bounce.ReportLine(r, bounce.FAILED) for r in failed]),
            (bounce.SUCCESS, [bounce.ReportLine(r, bounce.RELAYED if r.remote_mta
                                                else bounce.DELIVERED) for r in succeeded]),
            (bounce.DELAY, [bounce.ReportLine(r, bounce.DELAYED) for r in delayed]),
        ]
        changed = False
        for kind, lines in batches:
            if not lines:
                continue
            try:
                report = yield self.run_blocking(
                    bounce.send_report, self.spool, self.config.server.hostname, envelope,
                    data_path, kind, lines, now,
                    retry_until=envelope.arrival + self.config.relay.lifetime,
                    postmaster=self.config.server.postmaster)
            except Exception:  # noqa: BLE001 (retried at the next attempt)
                log.failure("{queue_id}: cannot create a {kind} report",
                            queue_id=envelope.queue_id, kind=kind)
                continue
            for line in lines:
                if kind == bounce.DELAY:
                    line.recipient.delay_warned = True
                else:
                    line.recipient.notified = True
            changed = True
            if report is None:
                maillog.report_dropped(envelope.queue_id, f"no one to send a {kind} report to")
                continue
            maillog.report_created(envelope.queue_id, bounce.log_kind(kind), report.queue_id)
            self.enqueue(report)
        if changed:
            entry = self._entries.get(envelope.queue_id)
            if entry is not None:
                yield self._save(entry, envelope)

    def _delay_warnings_due(self, envelope: Envelope, now: float) -> list[Recipient]:
        if not envelope.reverse_path or envelope.is_report or not self.config.relay.delay_warning:
            return []
        if now < envelope.arrival + self.config.relay.delay_warning:
            return []
        return [r for r in envelope.pending if not r.delay_warned and r.wants("DELAY")
                and self.router.next_hop(r.address).kind != HOLD]
