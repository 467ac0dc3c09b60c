"""One delivery attempt of one message, whoever starts it.

A scheduled attempt, an ETRN run and a delivery over a turned connection
(ATRN, TURN) all call `Attempts.run(queue_id, plan)`; only the `Plan`
differs: which next hop each pending recipient takes now, and which courier
serves each kind of hop.

One attempt:

1. the envelope is read from disk (the command line may have changed it;
   a message no longer in ``queue/`` is not attempted);
2. pending recipients are grouped by next hop (`Plan.route`) and envelope
   sender (a list's members carry its owner as theirs); a recipient whose
   hop is ``hold`` is not attempted, one whose hop is ``unknown`` (a local
   address with no mailbox) fails 5.1.1 without a courier; each group is
   one SMTP transaction or one local delivery and needs a concurrency slot,
   except over a turned connection, which exists already;
3. each group's outcomes are applied to the envelope and logged (one mail
   log line per recipient); when several groups are in flight, each is saved
   (`spool.save`) as soon as its transaction ends;
4. recipients older than the lifetime fail (4.4.7); if reports are due
   (one failure, one success and one delay report per message and attempt;
   bounce.py), the outcomes are saved first, then the reports injected and
   the recipients marked notified;
5. a complete message is removed, with no last rewrite; otherwise its next
   attempt is set (back-off, or the end of its lifetime when all it has
   left is held mail) and saved.

A crash between these steps never loses a recipient's result that a later
step depends on, and never loses a message: at worst a report is sent
twice, or a message whose delivery was not yet recorded (or whose removal
did not reach the disk) is delivered again.
If an outcome cannot be saved (a full disk), `run` fails: no report is sent
and the message is not removed.  The state that could not be written (or the
finished state of a message that could not be removed) is kept in memory
(`unsaved`), and the next attempt of that message writes it before anything
else, or fails again: a recipient delivered during a disk outage is
not delivered again after it.  The relayer also asks every second
(`write_kept`) for the states of messages not in an attempt, so that a crash
soon after the disk has room again does not lose them (their next attempt may be
`retry_min` away); an attempt of such a message waits for that write.  A stop
writes what is still kept (`save_kept`); only a stop or a crash while the disk
still has no room, or in the second after, loses that memory, and with it the
record of those deliveries.
While the service stops, deferrals caused by the interruption are not
recorded (only final verdicts are).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from mta import blocking, bounce, maillog, signing
from mta.config import Config, Live
from mta.delivery.courier import Result
from mta.delivery.outcome import Delivered, Failed, Outcome, classify
from mta.delivery.router import HOLD, SMTP, TURNED, UNKNOWN, NextHop, Router
from mta.spool.envelope import DELIVERED, FAILED, PENDING, Envelope, EnvelopeError, Recipient
from mta.spool.store import QUEUE, MessageData, Spool, SpoolError

log = Logger(namespace="mta.delivery.attempt")

JITTER = 0.1  # back-off delays are multiplied by a random factor in [0.9, 1.1]
EXPIRED_STATUS = "4.4.7"  # RFC 3463: delivery time expired


def backoff(attempts: int, retry_min: float, retry_max: float, rng: random.Random) -> float:
    """Seconds to wait after the `attempts`-th attempt: retry_min doubling, at most retry_max."""
    base = min(retry_max, retry_min * 2 ** max(0, min(attempts - 1, 30)))
    return base * rng.uniform(1 - JITTER, 1 + JITTER)


@dataclass(frozen=True)
class Plan:
    """How one attempt routes: the next hop of each pending recipient, and the couriers."""

    route: Callable[[Recipient], NextHop]
    couriers: Mapping[str, Any]  # hop kind -> courier (courier.py)


@dataclass(frozen=True)
class Verdict:
    """What one attempt left behind, for the scheduler."""

    removed: bool  # the message is complete and gone from the queue
    next_attempt: float | None  # when to try again (None when removed)
    domains: frozenset[str]  # the domains of the recipients still pending
    delivered: int  # recipients delivered in this attempt


class Attempts:
    def __init__(self, config: Config | Live, spool: Spool, router: Router, couriers: Mapping[str, Any],
                 limiter: Any, run_blocking: Callable[..., defer.Deferred[Any]], clock: Any,
                 rng: random.Random, on_report: Callable[[Envelope], None],
                 stopping: Callable[[], bool]) -> None:
        self.live = Live.of(config)
        self.spool = spool
        self.router = router
        self.couriers = couriers
        self.limiter = limiter
        self.run_blocking = run_blocking
        # Removals of delivered messages, gathered (self.spool is read at each one).
        self._removals = blocking.Gathered(run_blocking, lambda queue_id: self.spool.remove(queue_id))
        self.clock = clock
        self.rng = rng
        self.on_report = on_report
        self.stopping = stopping
        # Envelope states whose save failed, by queue id: written before the next attempt.
        self.unsaved: dict[str, Envelope] = {}
        self._running: set[str] = set()  # queue ids in an attempt
        self._writing: frozenset[str] = frozenset()  # kept states being written (write_kept)
        self._written: list[defer.Deferred[None]] = []  # waiting for that write to end

    @property
    def config(self) -> Config:
        """The config in force (a reload swaps it)."""
        return self.live.config

    # -- plans ----------------------------------------------------------------------------

    def scheduled(self, release: frozenset[str] = frozenset()) -> Plan:
        """Every recipient over its route; held domains in `release` over their etrn_route."""
        def route(recipient: Recipient) -> NextHop:
            return self.router.next_hop(recipient.address,
                                        release_hold=recipient.domain in release)
        return Plan(route, self.couriers)

    def turned(self, domains: frozenset[str], peer: str, courier: Any) -> Plan:
        """Recipients in `domains` over a turned connection to `peer`; the rest wait."""
        hop = NextHop(TURNED, f"turned[{peer}]")

        def route(recipient: Recipient) -> NextHop:
            if recipient.domain in domains:
                return hop
            return NextHop(HOLD, "not-now")
        return Plan(route, {TURNED: courier})

    def is_held(self, recipient: Recipient) -> bool:
        return self.router.next_hop(recipient.address).kind == HOLD

    def held_only(self, envelope: Envelope) -> bool:
        """All that is left of `envelope` waits for ETRN, ATRN or TURN."""
        pending = envelope.pending
        return bool(pending) and all(self.is_held(r) for r in pending)

    # -- one attempt ------------------------------------------------------------------------

    def load(self, queue_id: str) -> tuple[Envelope, MessageData] | None:
        """Blocking: the envelope as it is on disk now (the command line may have changed it)."""
        try:
            if self.spool.state_of(queue_id) != QUEUE:
                return None
            return self.spool.open_message(queue_id)
        except SpoolError:
            return None
        except (OSError, EnvelopeError) as e:
            log.error("{queue_id}: cannot read the envelope: {error}", queue_id=queue_id, error=e)
            return None

    def _save_unsaved(self, queue_id: str) -> None:
        """Blocking: write the state a failed save left in memory; raises while it cannot."""
        envelope = self.unsaved[queue_id]
        try:
            self.spool.save(envelope)
        except SpoolError:
            pass  # the message is gone (deleted by the operator): nothing left to record
        if self.unsaved.get(queue_id) is envelope:
            del self.unsaved[queue_id]

    def save_kept(self, queue_ids: list[str] | None = None) -> int:
        """Blocking: write the states kept in memory (`unsaved`; those of `queue_ids`)
        that the disk takes now; a restart would otherwise deliver those recipients
        again.  Returns how many could still not be written."""
        todo = list(self.unsaved) if queue_ids is None else queue_ids
        for done, queue_id in enumerate(todo):
            try:
                self._save_unsaved(queue_id)
            except KeyError:
                pass  # written meanwhile by an attempt that ended late
            except OSError:
                return len(todo) - done  # no room yet: the rest would fail alike
        return 0

    def write_kept(self) -> defer.Deferred[int]:
        """Write, in a worker, the kept states of the messages not in an attempt now; an
        attempt of one of them waits until this ends.  Fires with how many of them the
        disk did not take."""
        queue_ids = [queue_id for queue_id in self.unsaved if queue_id not in self._running]
        if not queue_ids or self._writing:
            return defer.succeed(0)
        self._writing = frozenset(queue_ids)

        def ended(result: Any) -> Any:
            self._writing = frozenset()
            waiting, self._written = self._written, []
            for d in waiting:
                d.callback(None)
            return result
        return self.run_blocking(self.save_kept, queue_ids).addBoth(ended)

    def kept_written(self) -> defer.Deferred[None]:
        """Fires once no `write_kept` is under way."""
        if not self._writing:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._written.append(d)
        return d

    def run(self, queue_id: str, plan: Plan,
            fresh: Envelope | None = None) -> defer.Deferred[Verdict | None]:
        """Attempt `queue_id` as `plan` says; a `Verdict`, or None when it is not in the queue.

        `fresh`: the envelope as the server committed it, kept since; used without
        reading the disk when the message is still as committed (no thread, no read)."""
        if queue_id in self._writing:  # its kept state is being written: after that
            return self.kept_written().addCallback(lambda _: self.run(queue_id, plan, fresh))
        self._running.add(queue_id)

        def ended(result: Any) -> Any:
            self._running.discard(queue_id)
            return result
        return self._attempt(queue_id, plan, fresh).addBoth(ended)

    @defer.inlineCallbacks
    def _attempt(self, queue_id: str, plan: Plan, fresh: Envelope | None) -> Any:
        if queue_id in self.unsaved:
            yield self.run_blocking(self._save_unsaved, queue_id)
        data = self.spool.unchanged(queue_id) if fresh is not None else None
        if data is not None:
            loaded = fresh, data
        else:
            loaded = yield self.run_blocking(self.load, queue_id)
        if loaded is None:
            return None
        envelope, data = loaded
        save = _Saver(self, envelope)
        groups = self._groups(envelope, plan)
        delivered = 0
        if groups:
            envelope.attempts += 1
            # With several groups in flight, each outcome is saved as soon as it is
            # known: a slow group must not hold a fast one's result in memory only.
            if len(groups) == 1:
                [(hop, indices)] = groups.values()
                delivered = yield self._deliver_group(None, envelope, plan, hop, indices, data)
            else:
                results = yield defer.DeferredList(
                    [self._deliver_group(save, envelope, plan, hop, indices, data)
                     for hop, indices in groups.values()], consumeErrors=True)
                failures = [result for ok, result in results if not ok]
                if failures:
                    # An outcome that could not be saved must not be reported (or the
                    # message removed) as if it were on disk: retry later from the disk.
                    failures[0].raiseException()
                delivered = sum(results_ok for ok, results_ok in results if ok)
        if self.stopping():
            if groups:
                # Outcomes that came in while we stop (a next hop's 250 after SIGTERM)
                # go to disk, or the restarted server sends those recipients again.
                yield save()
            return Verdict(False, envelope.next_attempt,
                           frozenset(r.domain for r in envelope.pending), delivered)
        return (yield self._after_attempt(save, envelope, data, delivered))

    def _groups(self, envelope: Envelope,
                plan: Plan) -> dict[tuple[str, str, str | None], tuple[NextHop, list[int]]]:
        """Pending recipients by next hop and sender: each group is one transaction.  Two
        domains routed to one host with different [tls_policy] levels are two groups."""
        groups: dict[tuple[str, str, str | None], tuple[NextHop, list[int]]] = {}
        for index, recipient in enumerate(envelope.recipients):
            if recipient.state != PENDING:
                continue
            hop = plan.route(recipient)
            if hop.kind == HOLD:
                continue
            key = (hop.destination, hop.tls, recipient.sender)
            groups.setdefault(key, (hop, []))[1].append(index)
        return groups

    @defer.inlineCallbacks
    def _deliver_group(self, save: _Saver | None, envelope: Envelope, plan: Plan, hop: NextHop,
                       indices: list[int], data: MessageData) -> Any:
        """Deliver one group; returns how many of its recipients were delivered."""
        # Slots bound our connections to other hosts.  A turned connection exists already
        # and serves one message at a time, and local delivery must never wait behind
        # slow remote hosts (the spool workers bound it): neither takes a slot.
        slot = hop.kind == SMTP
        if slot:
            yield self.limiter.acquire(hop.destination)
        recipients = [envelope.recipients[i] for i in indices]
        try:
            if self.stopping():
                return 0
            try:
                if hop.kind == UNKNOWN:
                    results = [Result(Failed("5.1.1", f"no such user here: <{r.address}>"),
                                      "none") for r in recipients]
                else:
                    results = yield plan.couriers[hop.kind].deliver(hop, envelope, recipients,
                                                                    data)
            except Exception as e:  # noqa: BLE001 (a courier bug must not lose the attempt)
                log.failure("courier error for {queue_id}", queue_id=envelope.queue_id)
                results = [Result(classify(e), "none")] * len(recipients)
        finally:
            if slot:
                self.limiter.release(hop.destination)
        now = self.clock.seconds()
        changed = False
        for recipient, result in zip(recipients, results):
            # When shutting down, a deferral is only the interruption: record final verdicts only.
            if self.stopping() and not result.outcome.is_final:
                continue
            self._apply(envelope, recipient, result, now)
            changed = True
        if changed and save is not None:
            yield save()
        return sum(1 for r in results if isinstance(r.outcome, Delivered))

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
                         outcome.status, status, outcome.diagnostic, _original(recipient))

    def _success_report_due(self, envelope: Envelope, recipient: Recipient) -> bool:
        return bool(envelope.sender_for(recipient)) and recipient.wants("SUCCESS")

    def _failure_report_due(self, envelope: Envelope, recipient: Recipient) -> bool:
        if not recipient.wants("FAILURE"):
            return False
        return bounce.report_recipient(envelope, bounce.FAILURE, self.config.server.postmaster,
                                       recipient) is not None

    # -- after the transactions -------------------------------------------------------------

    @defer.inlineCallbacks
    def _after_attempt(self, save: _Saver, envelope: Envelope, data: MessageData,
                       delivered: int) -> Any:
        now = self.clock.seconds()
        relay = self.config.relay
        expiring = envelope.pending if now >= envelope.arrival + relay.lifetime else []
        for recipient in expiring:
            self._expire(envelope, recipient, now)
        reports = self._reports_due(envelope, now)
        if reports:
            yield save()  # outcomes on disk before any report depends on them
            yield self._send_reports(envelope, data, reports, now)
        if envelope.is_complete:
            # Removed without a last rewrite: a crash before the unlink means
            # the message goes again (at most a duplicate), never that it is lost.
            # Removals finished together go to a worker together (mta/blocking.py):
            # handing each to a thread of its own woke an idle one for every message.
            try:
                yield self._removals(envelope.queue_id)
            except Exception:
                # Kept in memory as done, so that the next attempt only removes it.
                self.unsaved[envelope.queue_id] = copy.deepcopy(envelope)
                raise
            maillog.removed(envelope.queue_id)
            return Verdict(True, None, frozenset(), delivered)
        envelope.next_attempt = self.next_due(envelope, now)
        yield save()
        return Verdict(False, envelope.next_attempt,
                       frozenset(r.domain for r in envelope.pending), delivered)

    def _expire(self, envelope: Envelope, recipient: Recipient, now: float) -> None:
        last = recipient.diagnostic or "never attempted"
        recipient.state = FAILED
        recipient.status = EXPIRED_STATUS
        recipient.diagnostic = f"delivery time expired; last error: {last}"
        recipient.updated = now
        recipient.notified = not self._failure_report_due(envelope, recipient)
        maillog.delivery(envelope.queue_id, recipient.address, "none", now - envelope.arrival,
                         EXPIRED_STATUS, maillog.EXPIRED, recipient.diagnostic,
                         _original(recipient))

    def next_due(self, envelope: Envelope, now: float) -> float:
        relay = self.config.relay
        wait = backoff(envelope.attempts, relay.retry_min, relay.retry_max, self.rng)
        if not envelope.pending:
            return now + wait  # only reports left to send, which failed: try them again later
        end = envelope.arrival + relay.lifetime  # after `now`: expired recipients are not pending
        if self.held_only(envelope):
            return end  # only held recipients: wake up to expire them
        return min(now + wait, end)

    def _reports_due(self, envelope: Envelope,
                     now: float) -> list[tuple[str, list[bounce.ReportLine]]]:
        """Failure, success and delay reports due for this message, by kind."""
        failed = [r for r in envelope.recipients if r.state == FAILED and not r.notified]
        succeeded = [r for r in envelope.recipients if r.state == DELIVERED and not r.notified]
        delayed = self._delay_warnings_due(envelope, now)
        batches = [
            (bounce.FAILURE, [bounce.ReportLine(r, bounce.FAILED) for r in failed]),
            (bounce.SUCCESS, [bounce.ReportLine(r, bounce.EXPANDED if r.expansion
                                                else bounce.RELAYED if r.remote_mta
                                                else bounce.DELIVERED) for r in succeeded]),
            (bounce.DELAY, [bounce.ReportLine(r, bounce.DELAYED) for r in delayed]),
        ]
        # One report per kind and per sender: a list member's goes to the list's owner.
        by_sender = []
        for kind, lines in batches:
            senders: dict[str | None, list[bounce.ReportLine]] = {}
            for line in lines:
                senders.setdefault(line.recipient.sender, []).append(line)
            by_sender += [(kind, group) for group in senders.values()]
        return by_sender

    @defer.inlineCallbacks
    def _send_reports(self, envelope: Envelope, data: MessageData,
                      batches: list[tuple[str, list[bounce.ReportLine]]], now: float) -> Any:
        """Inject the reports; marks who was told (the caller saves that)."""
        hostname = self.config.server.hostname
        # Reports come From: MAILER-DAEMON@hostname: signed by the key of the hostname's
        # domain or its closest parent's, as our users' mail is (signing.py).
        dkim_domain = signing.domain_keys(self.config, hostname)
        for kind, lines in batches:
            signed: list[signing.Signed] = []
            sign = None
            if dkim_domain is not None:
                def sign(incoming: Any, keys: Any = dkim_domain, made: list = signed) -> None:
                    made.append(signing.sign_incoming(incoming, keys))
            try:
                report = yield self.run_blocking(
                    bounce.send_report, self.spool, hostname, envelope,
                    data, kind, lines, now,
                    retry_until=envelope.arrival + self.config.relay.lifetime,
                    postmaster=self.config.server.postmaster,
                    addresses=self.config.addresses, sign=sign)
            except OSError as e:  # a full or failing disk: one line, retried next attempt
                log.error("{queue_id}: cannot create a {kind} report yet: {error}",
                          queue_id=envelope.queue_id, kind=kind, error=e)
                continue
            except Exception:  # noqa: BLE001 (retried at the next attempt)
                log.failure("{queue_id}: cannot create a {kind} report",
                            queue_id=envelope.queue_id, kind=kind)
                continue
            for line in lines:
                if kind == bounce.DELAY:
                    line.recipient.delay_warned = True
                else:
                    line.recipient.notified = True
            if report is None:
                maillog.report_dropped(envelope.queue_id, f"no one to send a {kind} report to")
                continue
            maillog.report_created(envelope.queue_id, bounce.log_kind(kind), report.queue_id)
            for outcome in signed:
                maillog.dkim_signing(report.queue_id, outcome)
            self.on_report(report)

    def _delay_warnings_due(self, envelope: Envelope, now: float) -> list[Recipient]:
        if envelope.is_report or not self.config.relay.delay_warning:
            return []
        if now < envelope.arrival + self.config.relay.delay_warning:
            return []
        return [r for r in envelope.pending if not r.delay_warned and r.wants("DELAY")
                and envelope.sender_for(r) and not self.is_held(r)]


def _original(recipient: Recipient) -> str | None:
    """The address the recipient was given as (its ORCPT), for the log's orig_to."""
    return recipient.orcpt.partition(";")[2] if recipient.orcpt else None


class _Saver:
    """Writes snapshots of one attempt's envelope in a thread, one save at a time."""

    def __init__(self, attempts: Attempts, envelope: Envelope) -> None:
        self.attempts = attempts
        self.envelope = envelope
        self.lock = defer.DeferredLock()

    def __call__(self) -> defer.Deferred[None]:
        snapshot = copy.deepcopy(self.envelope)
        unsaved = self.attempts.unsaved
        queue_id = snapshot.queue_id

        def saved(_: None) -> None:
            if unsaved.get(queue_id) is not None:
                del unsaved[queue_id]  # superseded by this later state

        def failed(failure: Any) -> Any:
            unsaved[queue_id] = snapshot  # written before the message's next attempt
            return failure
        d = self.lock.run(self.attempts.run_blocking, self.attempts.spool.save, snapshot)
        return d.addCallbacks(saved, failed)
