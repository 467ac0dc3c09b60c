"""The relayer: decides when each queued message is tried, and by which plan.

`Relayer` is a Twisted `Service`.  `startService()` runs `spool.recover()`
(synchronously, before any listener starts) and schedules every committed
message; `enqueue(envelope)` schedules a message the server just committed;
`flush(domain)` makes queued mail due now (ETRN, `mta queue flush`);
`turn(domains, peer)` delivers held mail over a connection a customer
turned round (ATRN, TURN); `stopService()` stops starting attempts and
abandons the ones in flight.  What one attempt does (group by next hop,
couriers, record outcomes, reports, remove or reschedule) is attempt.py's;
this module only says when, and over which plan.

Strategies, each in one place:

Due times.  One heap of (due time, queue id) and one timer for its head.
A new message is due at once; at start-up a message is due at its stored
`next_attempt` (or at once if it was never tried).  A new message's envelope
stays in memory until its first attempt (for at most `FRESH_KEPT` messages
at once), which then reads nothing but the data from the disk; every other
attempt reads the envelope afresh.  Time comes from the
injected reactor (`IReactorTime`), so tests run on `task.Clock`.

Back-off and lifetime (attempt.py).  After an attempt that leaves
recipients pending, the message is due again after `retry_min`, doubling
up to `retry_max`, with +-10% jitter, never later than the end of its
lifetime, when its pending recipients fail (4.4.7).

Concurrency.  A message is in one attempt at a time (a flush or a turn
that finds it running waits for that attempt).  Within an attempt each
group of recipients with one next hop needs a slot: at most
`relay.concurrency` in total and `relay.concurrency_per_destination` per
destination; a group whose destination is full does not hold up others.

Held mail.  A message whose pending recipients are all in ``hold`` domains
is not attempted: it costs a heap entry at the end of its lifetime and a
place in the domain index, no timer and no disk work, until ETRN, ATRN or
TURN asks for it (or it expires and bounces as usual).  `flush(domain)`
releases a held domain's recipients for one attempt over its
``etrn_route``; `turn()` attempts them over the turned connection, one
message after another, until none is left or the customer goes away; a
domain is turned on one connection at a time.

The domain index.  Each message is listed under the domains of its pending
recipients, so that flush, waiting and turn find their messages without
walking the whole queue.

Notices.  Every second the spool's ``control/`` notices from the command
line are read (in a thread) and acted on: ``new``, ``release`` and
``requeue`` schedule the message now (an attempt routes it afresh), ``flush`` is `flush(domain)`, ``hold`` and ``delete``
forget it (an attempt re-reads the envelope from disk anyway).

Spool work runs in the process's spool workers (mta/blocking.py), DNS
resolution in a pool of its own (a dead name server must not delay the server's commits); neither
ever in the reactor thread.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, task, threads
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from mta import blocking, maillog
from mta.config import Config, Live
from mta.delivery.attempt import Attempts, Plan, Verdict
from mta.delivery.client import SessionPolicy, SMTPClient
from mta.delivery.courier import STOP_REPLY_GRACE, MaildirCourier, SMTPCourier, TurnedCourier
from mta.delivery.router import MAILDIR, SMTP, Router
from mta.server.context import TurnBusy
from mta.spool.envelope import Envelope
from mta.spool.store import HOLD, QUEUE, Spool

log = Logger(namespace="mta.delivery.scheduler")

STOP_GRACE = 10.0  # seconds stopService waits for abandoned attempts to record themselves
ACTIVE_PER_SLOT = 4  # messages in attempts at once, per delivery slot ([relay] concurrency)
LOAD_BATCH = 500  # envelopes read at start in one go, in a thread
NOTICE_INTERVAL = 1.0  # seconds between reads of the spool's control/ notices
KEPT_INTERVAL = 1.0  # seconds between tries to write the states a full disk kept in memory
DNS_THREADS = 10  # at most this many DNS resolutions at once
FRESH_KEPT = 1000  # new messages whose envelope waits in memory for their first attempt

def domain_matches(domain: str, wanted: str, subdomains: bool = False) -> bool:
    domain, wanted = domain.lower().rstrip("."), wanted.lower().rstrip(".")
    return domain == wanted or (subdomains and domain.endswith("." + wanted))


@dataclass(slots=True)
class _Entry:
    """What the scheduler keeps in memory for one queued message (about 200 octets)."""

    queue_id: str
    due: float | None = None
    running: bool = False
    again: bool = False  # flushed while running: due again as soon as it ends
    fresh: bool = False  # new mail, not yet tried: waits in the fresh line, not the heap
    dropped: bool = False  # held or deleted by the operator while running: forget it after
    held: bool = False  # all it has left waits for pickup (hold domains)
    domains: frozenset[str] = frozenset()  # of pending recipients: the domain index
    release: frozenset[str] = frozenset()  # held domains to attempt next time
    idle: list[defer.Deferred[None]] | None = None  # waiting for it to stop
    envelope: Envelope | None = None  # fresh: as committed, until its first attempt


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
        # A granted attempt may run to its end (and release, and grant) inside the
        # callback: find the next one afresh each time rather than walk a stale list.
        while self.active < self.total:
            found = next((i for i, (destination, _) in enumerate(self.waiting)
                          if self._fits(destination)), None)
            if found is None:
                return
            destination, d = self.waiting.pop(found)
            self._take(destination)
            d.callback(None)


class Relayer(Service):
    name = "relayer"

    def __init__(self, config: Config | Live, spool: Spool, reactor: Any = None, *,
                 rng: random.Random | None = None,
                 run_blocking: Callable[..., defer.Deferred[Any]] | None = None,
                 router: Router | None = None,
                 couriers: dict[str, Any] | None = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor
            reactor = global_reactor
        self.live = live = Live.of(config)
        config = live.config
        self.spool = spool
        self.reactor = reactor
        self.rng = rng or random.Random()
        self.run_blocking = run_blocking or self._in_thread
        self.router = router or Router(live)
        # DNS lookups wait on the network for up to dns_timeout: they get threads of
        # their own, so that they never hold up the spool work of the shared pool.
        self._dns_pool: ThreadPool | None = None
        if couriers is None:
            self._dns_pool = ThreadPool(0, DNS_THREADS, name="mta-dns")
            couriers = {
                SMTP: SMTPCourier(live, reactor, self._in_dns_thread),
                MAILDIR: MaildirCourier(live, self.run_blocking),
            }
        self.couriers = couriers
        relay = config.relay
        self.limiter = _Limiter(relay.concurrency, relay.concurrency_per_destination)
        self.attempts = Attempts(live, spool, self.router, couriers, self.limiter,
                                 self.run_blocking, reactor, self.rng,
                                 on_report=self.enqueue, stopping=lambda: self._stopping)
        self._entries: dict[str, _Entry] = {}
        self._by_domain: dict[str, set[str]] = {}  # domain -> queue ids with pending mail there
        self._heap: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self._wakeup: IDelayedCall | None = None
        self._attempts: set[defer.Deferred[Any]] = set()
        self._fresh: deque[str] = deque()  # new messages, first come first served
        self._fresh_first = True  # fresh and due mail take turns when both wait
        self._active = 0  # attempts running
        self._max_active = max(16, relay.concurrency * ACTIVE_PER_SLOT)
        self.loaded = False  # the queue found at start is all scheduled
        self._turning: set[str] = set()  # domains being turned right now
        self._turned_clients: set[SMTPClient] = set()
        self._stopping = False
        self._notices: task.LoopingCall | None = None
        self._kept: task.LoopingCall | None = None
        live.subscribe(self._reconfigured)

    @property
    def config(self) -> Config:
        """The config in force: each attempt reads it as it starts (a reload swaps it)."""
        return self.live.config

    def _reconfigured(self, config: Config) -> None:
        """A reload: new concurrency limits apply to the next grants."""
        self.limiter.total = config.relay.concurrency
        self.limiter.per_destination = config.relay.concurrency_per_destination
        self._max_active = max(16, config.relay.concurrency * ACTIVE_PER_SLOT)
        self.limiter._grant()
        self._arm()

    def _in_thread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        return blocking.workers_for(self.reactor)(f, *args, **kwargs)

    def _in_dns_thread(self, f: Callable[..., Any], *args: Any,
                       **kwargs: Any) -> defer.Deferred[Any]:
        assert self._dns_pool is not None
        return threads.deferToThreadPool(self.reactor, self._dns_pool, f, *args, **kwargs)

    # -- the service --------------------------------------------------------------------

    def startService(self) -> None:
        self._stopping = False
        queued = self.spool.recover_files()  # before anything is received: tmp/ is cleared
        if self._dns_pool is not None and not self._dns_pool.started:
            self._dns_pool.start()
        super().startService()
        loading = self._load_queue(queued)
        self._attempts.add(loading)
        loading.addErrback(self._load_failed)
        loading.addBoth(lambda _: self._attempts.discard(loading))
        self._notices = task.LoopingCall(self._read_notices)
        self._notices.clock = self.reactor
        self._notices.start(NOTICE_INTERVAL, now=False).addErrback(
            lambda f: log.failure("reading control notices stopped", f))
        self._kept = task.LoopingCall(self._write_kept)
        self._kept.clock = self.reactor
        self._kept.start(KEPT_INTERVAL, now=False).addErrback(
            lambda f: log.failure("writing the states kept in memory stopped", f))

    def stopService(self) -> defer.Deferred[None] | None:
        self._stopping = True
        super().stopService()
        if self._wakeup is not None and self._wakeup.active():
            self._wakeup.cancel()
        self._wakeup = None
        if self._notices is not None and self._notices.running:
            self._notices.stop()
        if self._kept is not None and self._kept.running:
            self._kept.stop()
        self.limiter.cancel_waiting()
        for courier in self.couriers.values():
            courier.abort_all()
        for client in list(self._turned_clients):
            client.stop(STOP_REPLY_GRACE)
        if not self._attempts and not self.attempts.unsaved:
            self._stop_dns_pool()
            return None
        done: defer.Deferred[Any] = defer.succeed(None)
        if self._attempts:
            done = defer.DeferredList(list(self._attempts), consumeErrors=True)
            timeout = self.reactor.callLater(STOP_GRACE, done.cancel)
            done.addBoth(lambda _: timeout.cancel() if timeout.active() else None)
        # Outcomes a full disk kept in memory: written now if the disk has room again
        # (after a write of them under way, if one is).
        done.addBoth(lambda _: self.attempts.kept_written())
        done.addBoth(lambda _: self._save_kept())
        done.addBoth(lambda _: self._stop_dns_pool())
        return done

    def _write_kept(self) -> defer.Deferred[None] | None:
        """Every KEPT_INTERVAL: write the states a full disk kept in memory, once it
        takes them, rather than at each message's next attempt, which may be
        retry_min away: a crash meanwhile would deliver those recipients again."""
        if not self.attempts.unsaved or self._stopping:
            return None
        d = self.attempts.write_kept()
        d.addErrback(lambda f: log.failure("writing the states kept in memory failed", f))
        return d.addCallback(lambda _: None)

    def _save_kept(self) -> defer.Deferred[None] | None:
        if not self.attempts.unsaved:
            return None
        d = self.run_blocking(self.attempts.save_kept)

        def said(failed: int) -> None:
            if failed:
                log.error("stopping with {n} message state(s) the disk did not take: those "
                          "recipients may get their message again after the restart", n=failed)
        return d.addCallback(said).addErrback(
            lambda f: log.failure("writing the states kept in memory failed", f))

    def _load_failed(self, failure: Failure) -> None:
        if not self._stopping:  # a read that failed after the stop: nobody waits for it
            log.failure("reading the queue found at start failed: the relayer does not "
                        "know those messages until a restart", failure)

    @defer.inlineCallbacks
    def _load_queue(self, queued: list[str]) -> Any:
        """Read the envelopes found at start in batches, in a thread, scheduling each
        batch as it comes: the server answers at once, and new mail does not wait."""
        count, held = yield self._schedule_from_disk(queued)
        if self._stopping:
            return
        yield self.run_blocking(self.spool.load_committed, self.spool.queue_ids(HOLD), HOLD)
        self.loaded = True
        log.info("relayer started: {count} queued messages, {held} held for pickup",
                 count=count, held=held)

    @defer.inlineCallbacks
    def adopt_unknown(self) -> Any:
        """Schedule the messages in ``queue/`` that the relayer does not know: what a
        receiving process (receiver.py) that died between a commit and its report
        left there, and removes the blanks it left (the load tells them apart).  Fires
        with how many it found."""
        ids = yield self.run_blocking(self.spool.queue_ids, QUEUE, True)
        found, _ = yield self._schedule_from_disk(
            [queue_id for queue_id in ids if queue_id not in self._entries])
        if found:
            log.info("found {count} queued message(s) the relayer did not know: scheduled",
                     count=found)
        return found

    @defer.inlineCallbacks
    def _schedule_from_disk(self, queue_ids: list[str]) -> Any:
        """Read the envelopes of `queue_ids` in batches, in a thread, and schedule each
        one not known yet: at its stored next attempt, or now if it was never tried
        (or that time is past).  Fires with (messages scheduled, of them held)."""
        count = held = 0
        for start in range(0, len(queue_ids), LOAD_BATCH):
            if self._stopping:
                break
            envelopes = yield self.run_blocking(self.spool.load_committed,
                                                queue_ids[start:start + LOAD_BATCH])
            now = self.reactor.seconds()
            for envelope in envelopes:
                if envelope.queue_id in self._entries:
                    continue  # seen already (a notice from the command line, a report)
                due = envelope.next_attempt if envelope.attempts and \
                    envelope.next_attempt > now else now
                held += self._track(envelope, due)
                count += 1
            self._arm()
        return count, held

    def _stop_dns_pool(self) -> None:
        if self._dns_pool is not None and self._dns_pool.started:
            self._dns_pool.stop()  # joins: a lookup in progress ends within dns_timeout

    # -- the queue's interfaces (server/context.py: MailQueue, HeldMail) ----------------------

    def enqueue(self, envelope: Envelope) -> None:
        """A message just committed to the queue: try it at once (held mail: not until asked)."""
        if self._stopping:
            return
        self._track(envelope, self.reactor.seconds(), fresh=True)
        self._arm()

    def ready(self) -> bool:
        """Whether the queue found at start is all known (pickups count every message)."""
        return self.loaded

    def flush(self, domain: str | None = None, subdomains: bool = False) -> int:
        """Make queued mail due now: all of it, or the messages with pending recipients
        in `domain` (and its sub-domains), whose held recipients then go to the
        domain's etrn_route.  Returns the number of messages started."""
        if self._stopping:
            return 0
        now = self.reactor.seconds()
        if domain is None:
            entries = list(self._entries.values())
        else:
            entries = self._entries_for(
                [d for d in self._by_domain if domain_matches(d, domain, subdomains)])
        for entry in entries:
            if domain is not None:
                entry.release |= {d for d in entry.domains
                                  if domain_matches(d, domain, subdomains)}
            if entry.running:
                entry.again = True
            else:
                self._set_due(entry, now)
        self._arm()
        return len(entries)

    def queue_sizes(self) -> dict[str, int]:
        """Messages by state, for the metrics: ``active`` (being attempted), ``incoming``
        (new, not tried yet), ``deferred`` (waiting for a retry), ``held`` (for pickup
        by ETRN/ATRN/TURN) and ``hold`` (put on hold by the operator)."""
        sizes = {"active": 0, "incoming": 0, "deferred": 0, "held": 0}
        for entry in self._entries.values():
            state = "active" if entry.running else "incoming" if entry.fresh else \
                "held" if entry.held else "deferred"
            sizes[state] += 1
        sizes["hold"] = len(self.spool.queue_ids(HOLD))
        return sizes

    def waiting(self, domains: Collection[str]) -> int:
        """Messages with pending recipients in `domains` (exact names)."""
        return len(self._entries_for(domains))

    def turn(self, domains: Collection[str], peer: str) -> tuple[SMTPClient, defer.Deferred[int]]:
        """ATRN/TURN [RFC 2645, RFC 821]: deliver the held mail of `domains` over a turned connection.

        Returns a client protocol and a Deferred.  The server's role reversal
        connects the client to the live transport; the client waits for the
        other side's 220, every queued message with pending recipients in
        `domains` is attempted over it (attempt.py, the turned plan), and the
        client says QUIT.  The Deferred fires with the number of messages
        with recipients delivered.  What fails to go stays queued.  Raises
        `TurnBusy` when one of `domains` is being turned already.
        """
        wanted = frozenset(d.lower().rstrip(".") for d in domains)
        busy = sorted(wanted & self._turning)
        if busy:
            raise TurnBusy(busy[0])
        policy = SessionPolicy(helo_name=self.config.server.hostname,
                               peer_name=f"turned[{peer}]", tls="off")
        client = SMTPClient(policy, self.reactor)
        self._turning |= wanted
        self._turned_clients.add(client)
        d = self._serve_turn(client, wanted, peer)
        self._attempts.add(d)

        def ended(result: Any) -> Any:
            self._turning -= wanted
            self._turned_clients.discard(client)
            self._attempts.discard(d)
            return result
        d.addBoth(ended)
        return client, d

    @defer.inlineCallbacks
    def _serve_turn(self, client: SMTPClient, domains: frozenset[str], peer: str) -> Any:
        try:
            yield client.ready
        except Exception as e:  # noqa: BLE001 (the peer went away: nothing sent)
            log.info("turned connection to [{peer}] failed before delivery: {error}",
                     peer=peer, error=e)
            return 0
        plan = self.attempts.turned(domains, peer, TurnedCourier(client, peer))
        tried: set[str] = set()
        sent = 0
        while True:
            # Mail that arrives during the turn goes too: look again after each round.
            batch = [e for e in self._entries_for(domains) if e.queue_id not in tried]
            if not batch:
                break
            for entry in batch:
                tried.add(entry.queue_id)
                if entry.running:
                    yield self._when_idle(entry)  # its attempt over another route ends first
                if client.gone or self._stopping:  # also while we waited
                    client.quit()
                    return sent
                if self._entries.get(entry.queue_id) is not entry or entry.running:
                    continue
                if entry.due is not None and entry.due <= self.reactor.seconds():
                    entry.again = True  # due now (a flush) but its timer has not fired: still due
                verdict = yield self._run(entry, plan)
                if verdict is not None and verdict.delivered:
                    sent += 1
        client.quit()
        return sent

    # -- due times --------------------------------------------------------------------

    def _track(self, envelope: Envelope, due: float, fresh: bool = False) -> bool:
        """Schedule a message; held mail waits for its lifetime's end.  True if held."""
        entry = self._entries.get(envelope.queue_id)
        if entry is None:
            entry = self._entries[envelope.queue_id] = _Entry(envelope.queue_id)
        entry.dropped = False
        self._index(entry, frozenset(r.domain for r in envelope.pending))
        held = entry.held = self.attempts.held_only(envelope)
        if held:
            due = max(due, envelope.arrival + self.config.relay.lifetime)
        if entry.running:
            entry.again = True
        elif fresh and not held:
            entry.due, entry.fresh = due, True
            if len(self._fresh) < FRESH_KEPT:
                entry.envelope = envelope
            self._fresh.append(entry.queue_id)
        else:
            self._set_due(entry, due)
        return held

    def _index(self, entry: _Entry, domains: frozenset[str]) -> None:
        for domain in entry.domains - domains:
            ids = self._by_domain.get(domain)
            if ids is not None:
                ids.discard(entry.queue_id)
                if not ids:
                    del self._by_domain[domain]
        for domain in domains - entry.domains:
            self._by_domain.setdefault(domain, set()).add(entry.queue_id)
        entry.domains = domains

    def _forget(self, entry: _Entry) -> None:
        entry.envelope = None
        self._index(entry, frozenset())
        if self._entries.get(entry.queue_id) is entry:
            del self._entries[entry.queue_id]

    def _entries_for(self, domains: Collection[str]) -> list[_Entry]:
        ids = set().union(*(self._by_domain.get(d, ()) for d in domains)) if domains else set()
        return [self._entries[i] for i in sorted(ids) if i in self._entries]

    def _set_due(self, entry: _Entry, due: float) -> None:
        entry.due, entry.fresh, entry.envelope = due, False, None
        heapq.heappush(self._heap, (due, next(self._seq), entry.queue_id))

    def _arm(self) -> None:
        """Point the one timer at the earliest due time (at once for fresh mail), unless
        as many attempts run as may: the end of one arms it again."""
        if self._stopping or not self.running or self._active >= self._max_active:
            return
        while self._heap and not self._valid(self._heap[0]):
            heapq.heappop(self._heap)
        if not self._heap and not self._fresh:
            return
        delay = 0.0 if self._fresh else max(0.0, self._heap[0][0] - self.reactor.seconds())
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
        while self._active < self._max_active and not self._stopping:
            entry = self._next_entry(now)
            if entry is None:
                break
            release, entry.release = entry.release, frozenset()
            self._run(entry, self.attempts.scheduled(release))
        self._arm()

    def _next_entry(self, now: float) -> _Entry | None:
        """The next message to try: new mail and due deferred mail take turns, so that
        neither a queue of deferred mail nor a flood of new mail starves the other."""
        order = (self._pop_fresh, self._pop_due)
        for pop in order if self._fresh_first else reversed(order):
            entry = pop(now)
            if entry is not None:
                self._fresh_first = pop is not self._pop_fresh
                return entry
        return None

    def _pop_fresh(self, now: float) -> _Entry | None:
        while self._fresh:
            entry = self._entries.get(self._fresh.popleft())
            if entry is not None and entry.fresh and not entry.running:
                return entry
        return None

    def _pop_due(self, now: float) -> _Entry | None:
        while self._heap and self._heap[0][0] <= now:
            item = heapq.heappop(self._heap)
            if self._valid(item):
                return self._entries[item[2]]
        return None

    # -- running attempts -----------------------------------------------------------------

    def _run(self, entry: _Entry, plan: Plan) -> defer.Deferred[Verdict | None]:
        """One attempt of `entry` under `plan`; settles its due time when it ends.
        Fires with the attempt's Verdict, or None when it found no message or failed."""
        entry.running, entry.due, entry.fresh = True, None, False
        fresh, entry.envelope = entry.envelope, None
        self._active += 1
        d = self.attempts.run(entry.queue_id, plan, fresh)
        self._attempts.add(d)

        def ended(verdict: Verdict | None) -> Verdict | None:
            self._attempts.discard(d)
            if verdict is None:  # not in queue/ any more: delivered, held or deleted
                self._settle(entry, None, gone=True)
            else:
                self._settle(entry, verdict)
            return verdict

        def failed(f: Any) -> None:
            if f.check(OSError, defer.CancelledError):
                # The disk (full, read-only) or a stop: one line, retried later; a
                # traceback per message and retry would bury the log in an outage.
                log.error("attempt of {queue_id} not finished, tried again later: {error}",
                          queue_id=entry.queue_id, error=f.getErrorMessage())
            else:
                log.failure("attempt of {queue_id} failed", f, queue_id=entry.queue_id)
            self._attempts.discard(d)
            self._settle(entry, None)
        d.addCallbacks(ended, failed)
        return d

    def _settle(self, entry: _Entry, verdict: Verdict | None, gone: bool = False) -> None:
        entry.running = False
        self._active -= 1
        idle, entry.idle = entry.idle or [], None
        if self._entries.get(entry.queue_id) is entry:
            if gone or entry.dropped or (verdict is not None and verdict.removed):
                self._forget(entry)
            elif not self._stopping:
                if verdict is not None:
                    self._index(entry, verdict.domains)
                if entry.again:
                    entry.again = False
                    self._set_due(entry, self.reactor.seconds())
                elif verdict is not None and verdict.next_attempt is not None:
                    self._set_due(entry, verdict.next_attempt)
                else:
                    # The attempt failed without a verdict on timing (an error): retry later.
                    self._set_due(entry, self.reactor.seconds() + self.config.relay.retry_min)
        for d in idle:
            d.callback(None)
        self._arm()

    def _when_idle(self, entry: _Entry) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        if entry.idle is None:
            entry.idle = []
        entry.idle.append(d)
        return d

    # -- notices from the command line ------------------------------------------------------

    def notice(self, notice: dict[str, str]) -> defer.Deferred[None] | None:
        """Act on one notice from the command line (see `Spool.notify`)."""
        action, queue_id = notice.get("action"), notice.get("queue_id", "")
        if action == "flush":
            self.flush(notice.get("domain") or None)
        elif action in ("new", "release", "requeue") and queue_id:
            d = self.run_blocking(self.attempts.load, queue_id)
            d.addCallback(self._noticed, action)
            return d
        elif action in ("hold", "delete") and queue_id:
            maillog.operator(queue_id, "held" if action == "hold" else "deleted")
            entry = self._entries.get(queue_id)
            if entry is not None and entry.running:
                entry.dropped = True  # its attempt ends first
            elif entry is not None:
                self._forget(entry)
        else:
            log.warn("ignoring unknown notice {notice!r}", notice=notice)  # noqa: G010
        return None

    def _noticed(self, loaded: tuple[Envelope, Any] | None, action: str) -> None:
        if loaded is None:
            return
        envelope = loaded[0]
        if action == "new":
            maillog.picked_up(envelope.queue_id, envelope.reverse_path,
                              len(envelope.recipients), envelope.size)
        else:
            maillog.operator(envelope.queue_id,
                             "released" if action == "release" else "requeued")
        self.enqueue(envelope)

    def _read_notices(self) -> defer.Deferred[None]:
        def act(notices: list[dict[str, str]]) -> defer.Deferred[Any]:
            return defer.gatherResults([defer.maybeDeferred(self.notice, n) for n in notices],
                                       consumeErrors=True)
        d = self.run_blocking(self.spool.take_notices)
        d.addCallback(act)
        d.addErrback(lambda f: log.failure("cannot read control notices", f))
        return d
