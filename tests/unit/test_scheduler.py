"""The relayer's scheduling, recording and reporting, on task.Clock with a scripted courier."""

from __future__ import annotations

import email
import itertools
import random
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from twisted.internet import defer, task
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from mta import bounce
from mta import config as config_mod
from mta.delivery.attempt import backoff
from mta.delivery.courier import MaildirCourier, Result
from mta.delivery.outcome import Deferred, Delivered, Failed, Outcome
from mta.delivery.router import MAILDIR, SMTP, NextHop
from mta.delivery.scheduler import Relayer
from mta.spool.envelope import DELIVERED, FAILED, PENDING, Envelope, Recipient
from mta.spool.store import Spool

DATA = b"From: a@here.test\r\nSubject: test\r\n\r\nhello\r\n"


class FixedRandom(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return 1.0


def run_now(f: Any, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
    return defer.maybeDeferred(f, *args, **kwargs)


class ScriptedCourier:
    """Answers each recipient from `script` (address -> Outcome), or waits when `hold` is set."""

    def __init__(self) -> None:
        self.script: dict[str, Outcome] = {}
        self.default: Outcome = Delivered("2.0.0", "250 2.0.0 ok", "mx.far.test")
        self.calls: list[tuple[NextHop, list[str]]] = []
        self.waiting: list[tuple[defer.Deferred[list[Result]], list[Recipient]]] = []
        self.hold = False
        self.aborted = False

    def deliver(self, hop: NextHop, envelope: Envelope, recipients: list[Recipient],
                data_path: Path) -> defer.Deferred[list[Result]]:
        assert data_path.read_bytes() == DATA or envelope.is_report
        self.calls.append((hop, [r.address for r in recipients]))
        if self.hold:
            d: defer.Deferred[list[Result]] = defer.Deferred()
            self.waiting.append((d, recipients))
            return d
        return defer.succeed(self.results(recipients))

    def results(self, recipients: list[Recipient]) -> list[Result]:
        return [Result(self.script.get(r.address, self.default), "mx.far.test[127.0.0.2]:25")
                for r in recipients]

    def release(self) -> None:
        waiting, self.waiting = self.waiting, []
        for d, recipients in waiting:
            d.callback(self.results(recipients))

    def abort_all(self) -> None:
        self.aborted = True
        waiting, self.waiting = self.waiting, []
        for d, recipients in waiting:
            d.callback([Result(Deferred("4.3.2", "shutting down"), "none")] * len(recipients))

    @property
    def addresses(self) -> list[list[str]]:
        return [addresses for _, addresses in self.calls]


class RelayerTest(SynchronousTestCase):
    def setUp(self) -> None:
        # Not trial's mktemp(): that one lands in the working tree.
        self.tmp = Path(tempfile.mkdtemp(prefix="mta-test-relayer-"))
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.make()

    def make(self, **relay: Any) -> None:
        settings = {"retry_min": "60s", "retry_max": "600s", "lifetime": "1h",
                    "delay_warning": "20m", "concurrency": 10, "concurrency_per_destination": 2}
        settings.update(relay)
        domains = relay.pop("domains", None) or {
            "held.test": {"route": "hold", "etrn_route": "smtp:[127.0.0.9]:2600"},
            "local.test": {"route": f"maildir:{self.tmp / 'mail'}", "users": ["alice"]},
        }
        settings.pop("domains", None)
        self.config = config_mod.from_dict({
            "server": {"hostname": "mx.here.test", "spool": str(self.tmp / "spool")},
            "relay": settings, "domains": domains,
        })
        self.clock = task.Clock()
        self.clock.advance(10_000)
        self.spool = Spool(self.tmp / "spool", clock=self.clock.seconds)
        self.courier = ScriptedCourier()
        self.relayer = Relayer(self.config, self.spool, self.clock, rng=FixedRandom(),
                               run_blocking=run_now,
                               couriers={SMTP: self.courier,
                                         MAILDIR: MaildirCourier(self.config, run_now)})

    def submit(self, *recipients: str | Recipient, reverse_path: str = "alice@here.test",
               start: bool = True, **fields: Any) -> Envelope:
        envelope = Envelope("", reverse_path,
                            [r if isinstance(r, Recipient) else Recipient(r) for r in recipients],
                            arrival=self.clock.seconds(), **fields)
        self.spool.inject(envelope, DATA)
        if start and not self.relayer.running:
            self.relayer.startService()
        else:
            self.relayer.enqueue(envelope)
        self.clock.advance(0)
        return envelope

    def queued(self) -> list[Envelope]:
        return [self.spool.load(q) for q in self.spool.queue_ids()]

    def reports(self) -> list[Envelope]:
        return [e for e in self.queued() if e.is_report]

    def report_fields(self, report: Envelope) -> list[email.message.Message]:
        raw = self.spool.message_data(report.queue_id).read_bytes()
        return email.message_from_bytes(raw).get_payload()[1].get_payload()

    # -- timing ------------------------------------------------------------------------

    def test_new_message_is_tried_at_once_and_removed_when_delivered(self) -> None:
        self.relayer.startService()
        envelope = self.submit("bob@far.test")
        self.assertEqual(self.courier.addresses, [["bob@far.test"]])
        self.assertEqual(self.spool.queue_ids(), [])
        self.assertNotIn(envelope.queue_id, self.relayer._entries)

    def test_a_first_attempt_that_delivers_everything_rewrites_nothing(self) -> None:
        saved: list[str] = []
        real = self.spool.save
        self.spool.save = lambda envelope: (saved.append(envelope.queue_id), real(envelope))
        self.relayer.startService()
        delivered = self.submit("bob@far.test", "carol@far.test")
        self.assertEqual(saved, [])  # one message file in, one unlink out
        self.assertNotIn(delivered.queue_id, self.spool.queue_ids())
        # Two next hops: each outcome is saved as its transaction ends.
        self.courier.default = Deferred("4.4.1", "refused")
        deferred = self.submit("bob@far.test", "alice@local.test")
        self.assertEqual(saved.count(deferred.queue_id), 2 + 1)  # two groups, then next_attempt

    def test_a_new_messages_first_attempt_reads_no_envelope_from_disk(self) -> None:
        read: list[str] = []
        real = self.spool.open_message
        self.spool.open_message = lambda queue_id: (read.append(queue_id), real(queue_id))[1]
        self.relayer.startService()
        self.courier.default = Deferred("4.4.1", "refused")
        envelope = self.submit("bob@far.test")
        self.assertEqual(self.courier.addresses, [["bob@far.test"]])
        self.assertEqual(read, [])  # the envelope the server committed, kept in memory
        self.clock.advance(60)  # the retry reads the state the first attempt saved
        self.assertEqual(len(self.courier.calls), 2)
        self.assertEqual(read, [envelope.queue_id])
        self.assertEqual(self.spool.load(envelope.queue_id).attempts, 2)

    def test_a_new_message_changed_on_disk_before_its_attempt_is_read_afresh(self) -> None:
        self.relayer.startService()
        self.courier.hold = True
        self.submit("first@far.test")  # holds a slot: the next message waits its turn
        envelope = Envelope("", "alice@here.test",
                            [Recipient("bob@far.test"), Recipient("carol@far.test")],
                            arrival=self.clock.seconds())
        self.spool.inject(envelope, DATA)
        self.relayer.enqueue(envelope)
        on_disk = self.spool.load(envelope.queue_id)
        on_disk.recipients[0].state = DELIVERED  # as a delivery another attempt recorded
        self.spool.save(on_disk)
        self.courier.hold = False
        self.courier.release()
        self.clock.advance(0)
        self.assertIn(["carol@far.test"], self.courier.addresses)
        self.assertNotIn(["bob@far.test", "carol@far.test"], self.courier.addresses)

    def test_backoff_doubles_up_to_retry_max(self) -> None:
        self.courier.default = Deferred("4.4.1", "connection refused")
        self.make(lifetime="5d", delay_warning="0")
        self.courier.default = Deferred("4.4.1", "connection refused")
        start = self.clock.seconds()
        envelope = self.submit("bob@far.test")
        times = [0.0]
        for _ in range(6):
            before = len(self.courier.calls)
            while len(self.courier.calls) == before:
                self.clock.advance(1)
            times.append(self.clock.seconds() - start)
        gaps = [b - a for a, b in itertools.pairwise(times)]
        self.assertEqual(gaps, [60, 120, 240, 480, 600, 600])
        stored = self.spool.load(envelope.queue_id)
        self.assertEqual(stored.attempts, 7)
        self.assertEqual(stored.next_attempt, self.clock.seconds() + 600)
        self.assertEqual(stored.recipients[0].status, "4.4.1")
        self.assertEqual(stored.last_error, "connection refused")

    def test_no_report_before_the_outcome_is_saved(self) -> None:
        # Durability: a failure report must never exist for an outcome that is not on
        # disk (a crash would deliver or bounce the recipient a second time).
        self.courier.script["bob@far.test"] = Failed("5.1.1", "550 5.1.1 no such user",
                                                     "mx.far.test")
        save, calls = self.spool.save, []

        def failing_save(envelope: Envelope) -> None:
            calls.append(envelope.queue_id)
            if len(calls) == 1:
                raise OSError(28, "No space left on device")
            save(envelope)
        self.spool.save = failing_save  # type: ignore[method-assign]
        envelope = self.submit("bob@far.test")
        self.assertEqual(self.spool.queue_ids(), [envelope.queue_id])  # no report, not removed
        self.assertEqual(self.spool.load(envelope.queue_id).recipients[0].state, PENDING)
        self.assertEqual(self.flushLoggedErrors(OSError), [])  # one error line, no traceback
        self.clock.advance(60)  # the next attempt records it first, then reports
        self.assertEqual(self.courier.addresses, [["bob@far.test"], ["alice@here.test"]])
        self.assertEqual(self.spool.queue_ids(), [])

    def full_disk(self) -> list[bool]:
        """Carol's mailbox is full (452); the spool's disk is full while the flag is set."""
        self.courier.script["carol@far.test"] = Deferred("4.2.2", "452 mailbox full",
                                                         "mx.far.test")
        save, full = self.spool.save, [True]

        def disk(envelope: Envelope) -> None:
            if full[0]:
                raise OSError(28, "No space left on device")
            save(envelope)
        self.spool.save = disk  # type: ignore[method-assign]
        return full

    def test_a_delivery_recorded_during_a_full_disk_is_not_made_again(self) -> None:
        full = self.full_disk()
        envelope = self.submit("bob@far.test", "carol@far.test")
        self.assertEqual(self.flushLoggedErrors(OSError), [])  # one error line, no traceback
        spool_dir = self.tmp / "spool" / "queue"
        self.assertEqual(sorted(p.name for p in spool_dir.iterdir()),
                         [f"{envelope.queue_id}.msg"])  # no half-written state left
        self.clock.advance(60)  # the disk is still full: nothing is tried
        self.assertEqual(self.flushLoggedErrors(OSError), [])  # one error line, no traceback
        self.assertEqual(self.courier.addresses, [["bob@far.test", "carol@far.test"]])
        full[0] = False
        self.clock.advance(60)  # room again: the state is written, then only carol goes
        self.assertEqual(self.courier.addresses,
                         [["bob@far.test", "carol@far.test"], ["carol@far.test"]])
        stored = self.spool.load(envelope.queue_id)
        self.assertEqual([r.state for r in stored.recipients], [DELIVERED, PENDING])

    def test_a_kept_state_is_written_once_the_disk_has_room_not_at_the_next_attempt(self) -> None:
        # The next attempt may be retry_min away (here 60 s; an hour in a real config):
        # a crash meanwhile would lose the record of bob's delivery (make soak found it).
        from mta.delivery.scheduler import KEPT_INTERVAL
        full = self.full_disk()
        envelope = self.submit("bob@far.test", "carol@far.test")
        self.clock.advance(KEPT_INTERVAL * 3)  # still full: kept, and asked for again
        self.assertEqual(self.spool.load(envelope.queue_id).recipients[0].state, PENDING)
        self.assertEqual(list(self.relayer.attempts.unsaved), [envelope.queue_id])
        full[0] = False
        self.clock.advance(KEPT_INTERVAL)
        stored = self.spool.load(envelope.queue_id)
        self.assertEqual([r.state for r in stored.recipients], [DELIVERED, PENDING])
        self.assertEqual(self.relayer.attempts.unsaved, {})
        self.assertEqual(self.courier.addresses, [["bob@far.test", "carol@far.test"]])
        self.assertEqual(self.flushLoggedErrors(OSError), [])

    def test_an_attempt_waits_for_the_write_of_its_kept_state(self) -> None:
        from mta.delivery.scheduler import KEPT_INTERVAL
        full = self.full_disk()
        envelope = self.submit("bob@far.test", "carol@far.test")
        full[0] = False
        attempts, held = self.relayer.attempts, []

        def slow_disk(f: Any, *args: Any) -> defer.Deferred[Any]:
            d: defer.Deferred[Any] = defer.Deferred()
            held.append((d, f, args))
            return d
        attempts.run_blocking = slow_disk  # type: ignore[method-assign]
        self.clock.advance(KEPT_INTERVAL)  # the write starts, and takes its time
        attempts.run_blocking = run_now  # type: ignore[method-assign]
        self.assertEqual(len(held), 1)
        self.clock.advance(60)  # carol's retry is due: it waits for the write
        self.assertEqual(self.courier.addresses, [["bob@far.test", "carol@far.test"]])
        d, f, args = held.pop()
        d.callback(f(*args))
        self.assertEqual(self.courier.addresses,
                         [["bob@far.test", "carol@far.test"], ["carol@far.test"]])
        stored = self.spool.load(envelope.queue_id)
        self.assertEqual([r.state for r in stored.recipients], [DELIVERED, PENDING])
        self.assertEqual(self.flushLoggedErrors(OSError), [])

    def test_a_stop_writes_what_a_full_disk_kept_in_memory(self) -> None:
        # Delivered to bob during a disk outage: kept in memory.  The disk has room again
        # when the server stops, before the next attempt: the stop writes it, or the
        # restarted server would deliver to bob again (make soak found it).
        full = self.full_disk()
        envelope = self.submit("bob@far.test", "carol@far.test")
        self.assertEqual(self.flushLoggedErrors(OSError), [])
        self.assertEqual(self.spool.load(envelope.queue_id).recipients[0].state, PENDING)
        full[0] = False
        self.successResultOf(defer.maybeDeferred(self.relayer.stopService))
        stored = self.spool.load(envelope.queue_id)
        self.assertEqual([r.state for r in stored.recipients], [DELIVERED, PENDING])
        self.assertEqual(self.relayer.attempts.unsaved, {})

    def test_a_stop_on_a_full_disk_keeps_what_it_cannot_write(self) -> None:
        self.full_disk()  # and it stays full
        envelope = self.submit("bob@far.test", "carol@far.test")
        self.successResultOf(defer.maybeDeferred(self.relayer.stopService))
        self.assertEqual(self.flushLoggedErrors(OSError), [])  # a log line, no traceback
        self.assertEqual(self.spool.load(envelope.queue_id).recipients[0].state, PENDING)
        self.assertEqual(list(self.relayer.attempts.unsaved), [envelope.queue_id])

    def test_backoff_has_jitter(self) -> None:
        delays = {round(backoff(3, 60, 3600, random.Random(seed))) for seed in range(20)}
        self.assertTrue(all(216 <= d <= 264 for d in delays))
        self.assertGreater(len(delays), 5)

    def test_lifetime_then_failure_and_bounce(self) -> None:
        self.courier.default = Deferred("4.4.1", "connection refused")
        envelope = self.submit("bob@far.test")
        self.clock.advance(3600)  # retries until the lifetime is over
        self.assertNotIn(envelope.queue_id, self.spool.queue_ids())
        (report,) = self.reports()
        self.assertEqual([r.address for r in report.recipients], ["alice@here.test"])
        _, rcpt = self.report_fields(report)
        self.assertEqual((rcpt["Action"], rcpt["Status"]), ("failed", "4.4.7"))
        self.assertIn("connection refused", rcpt["Diagnostic-Code"])

    def test_delay_warning_once(self) -> None:
        self.courier.default = Deferred("4.4.1", "connection refused")
        self.courier.script["quiet@far.test"] = self.courier.default
        self.submit("bob@far.test", Recipient("quiet@far.test", notify=("FAILURE",)))
        self.clock.advance(19 * 60)
        self.assertEqual(self.reports(), [])
        self.clock.advance(30 * 60)
        (report,) = self.reports()
        _, rcpt = self.report_fields(report)
        self.assertEqual((rcpt["Final-Recipient"], rcpt["Action"], rcpt["Status"]),
                         ("rfc822; bob@far.test", "delayed", "4.4.1"))
        self.assertIsNotNone(rcpt["Will-Retry-Until"])
        # The report itself is delivered (our courier says 250) and removed; no second warning.
        self.assertEqual(len([c for c in self.courier.addresses if c == ["alice@here.test"]]), 1)

    # -- grouping and concurrency ---------------------------------------------------------

    def test_recipients_with_the_same_next_hop_share_a_transaction(self) -> None:
        self.submit("a@far.test", "b@far.test", "c@other.test")
        self.assertEqual(sorted(self.courier.addresses),
                         [["a@far.test", "b@far.test"], ["c@other.test"]])

    def test_concurrency_per_destination_and_total(self) -> None:
        self.courier.hold = True
        self.relayer.startService()
        for i in range(3):
            self.submit(f"u{i}@far.test")
        self.submit("x@other.test")
        self.assertEqual(sorted(a[0] for a in self.courier.addresses),
                         ["u0@far.test", "u1@far.test", "x@other.test"])
        self.courier.release()
        self.assertIn(["u2@far.test"], self.courier.addresses)
        self.courier.release()
        self.assertEqual(self.spool.queue_ids(), [])

        self.make(concurrency=1)
        self.courier.hold = True
        self.relayer.startService()
        self.submit("a@far.test")
        self.submit("b@other.test")
        self.assertEqual(self.courier.addresses, [["a@far.test"]])
        self.courier.release()
        self.assertEqual(self.courier.addresses, [["a@far.test"], ["b@other.test"]])

    # -- outcomes and reports -------------------------------------------------------------

    def test_failed_recipient_bounced_others_delivered(self) -> None:
        self.courier.script["bad@far.test"] = Failed("5.1.1", "550 5.1.1 no such user",
                                                      "mx.far.test")
        envelope = self.submit("good@far.test", "bad@far.test")
        reports = self.reports()
        self.assertEqual(len(reports), 0)  # the report was delivered too, by the same courier
        self.assertEqual(self.courier.addresses[-1], ["alice@here.test"])
        self.assertNotIn(envelope.queue_id, self.spool.queue_ids())

    def test_bounce_content_is_kept_until_sent(self) -> None:
        self.courier.script["bad@far.test"] = Failed("5.1.1", "550 5.1.1 no such user",
                                                      "mx.far.test")
        self.courier.script["alice@here.test"] = Deferred("4.4.1", "refused")
        self.submit("good@far.test", "bad@far.test")
        (report,) = self.reports()
        self.assertEqual(report.reverse_path, "")
        per_message, rcpt = self.report_fields(report)
        self.assertEqual(per_message["Reporting-MTA"], "dns; mx.here.test")
        self.assertEqual((rcpt["Final-Recipient"], rcpt["Action"], rcpt["Status"],
                          rcpt["Remote-MTA"], rcpt["Diagnostic-Code"]),
                         ("rfc822; bad@far.test", "failed", "5.1.1", "dns; mx.far.test",
                          "smtp; 550 5.1.1 no such user"))

    def test_notify_never_suppresses_and_success_is_reported(self) -> None:
        self.courier.script["bad@far.test"] = Failed("5.1.1", "550 no", "mx.far.test")
        self.courier.script["alice@here.test"] = Deferred("4.4.1", "refused")
        self.submit(Recipient("bad@far.test", notify=("NEVER",)),
                    Recipient("good@far.test", notify=("SUCCESS",)))
        (report,) = self.reports()
        _, rcpt = self.report_fields(report)
        self.assertEqual((rcpt["Final-Recipient"], rcpt["Action"], rcpt["Status"]),
                         ("rfc822; good@far.test", "relayed", "2.0.0"))

    def test_no_success_report_when_the_next_hop_takes_dsn(self) -> None:
        self.courier.default = Delivered("2.0.0", "250 ok", "mx.far.test", dsn_passed=True)
        self.submit(Recipient("good@far.test", notify=("SUCCESS",)))
        self.assertEqual(self.spool.queue_ids(), [])
        self.assertEqual(self.courier.addresses, [["good@far.test"]])

    def test_never_bounce_a_bounce(self) -> None:
        self.courier.default = Failed("5.1.1", "550 no", "mx.far.test")
        self.submit("gone@far.test", reverse_path="", is_report=True)
        self.assertEqual(self.spool.queue_ids(), [])
        self.assertEqual(len(self.courier.calls), 1)

    def test_double_bounce_to_postmaster(self) -> None:
        self.config = config_mod.from_dict({
            "server": {"hostname": "mx.here.test", "spool": str(self.tmp / "spool"),
                       "postmaster": "postmaster@here.test"}})
        self.relayer = Relayer(self.config, self.spool, self.clock, rng=FixedRandom(),
                               run_blocking=run_now, couriers={SMTP: self.courier})
        self.courier.default = Failed("5.1.1", "550 no", "mx.far.test")
        self.submit("gone@far.test", reverse_path="", is_report=True)
        # bounce -> double bounce to the postmaster -> fails too -> dropped.
        self.assertEqual(self.courier.addresses, [["gone@far.test"], ["postmaster@here.test"]])
        self.assertEqual(self.spool.queue_ids(), [])

    def test_a_list_members_bounce_goes_to_the_lists_owner(self) -> None:
        # RFC 5321 3.10: the list's members get its owner as envelope sender, so a member
        # that fails is reported to the owner (expanded as RCPT would), not the sender.
        (self.tmp / "aliases").write_text("list: alice, gone@far.test, ok@far.test\n"
                                          "owner-list: alice\n")
        self.make(domains={"local.test": {"route": f"maildir:{self.tmp / 'mail'}",
                                          "users": ["alice"],
                                          "aliases": str(self.tmp / "aliases")}})
        senders = []
        deliver = self.courier.deliver
        self.courier.deliver = lambda hop, envelope, recipients, data: (
            senders.append(envelope.sender_for(recipients[0])),
            deliver(hop, envelope, recipients, data))[1]
        self.courier.script["gone@far.test"] = Failed("5.1.1", "550 no such user", "mx.far.test")
        given = Recipient("list@local.test")
        members = given.expanded(self.config.addresses.resolve(given.address).targets, False)
        self.submit(*members, reverse_path="someone@far.test")
        # One transaction for the two remote members, from the owner.
        self.assertEqual(self.courier.addresses, [["gone@far.test", "ok@far.test"]])
        self.assertEqual(senders, ["owner-list@local.test"])
        # The owner is alice: her Maildir has the list's message and the bounce.
        mails = sorted((self.tmp / "mail" / "alice" / "new").iterdir())
        texts = [m.read_bytes() for m in mails]
        self.assertEqual(len(texts), 2)
        self.assertTrue(texts[0].startswith(b"Return-Path: <owner-list@local.test>\n"))
        bounce_text = texts[1]
        self.assertIn(b"Return-Path: <>\nDelivered-To: alice@local.test\n", bounce_text)
        self.assertIn(b"To: <owner-list@local.test>", bounce_text)
        self.assertIn(b"Original-Recipient: rfc822;list@local.test", bounce_text)
        self.assertIn(b"Final-Recipient: rfc822; gone@far.test", bounce_text)
        self.assertEqual(self.spool.queue_ids(), [])  # nothing went to someone@far.test

    def test_an_expanded_report_when_success_was_asked_for(self) -> None:
        (self.tmp / "aliases").write_text("team: alice, mate@far.test\n")
        self.make(domains={"local.test": {"route": f"maildir:{self.tmp / 'mail'}",
                                          "users": ["alice"],
                                          "aliases": str(self.tmp / "aliases")}})
        given = Recipient("team@local.test", notify=("SUCCESS", "FAILURE"))
        self.submit(*given.expanded(self.config.addresses.resolve(given.address).targets,
                                    False), reverse_path="alice@local.test")
        self.assertEqual(self.courier.addresses, [["mate@far.test"]])
        self.assertEqual(self.spool.queue_ids(), [])
        # alice's Maildir: the message (as a member) and one report, "expanded"; the
        # members were not asked for SUCCESS, so there is no "delivered" report.
        mails = [email.message_from_bytes(p.read_bytes())
                 for p in sorted((self.tmp / "mail" / "alice" / "new").iterdir())]
        reports = [m for m in mails if m.get_content_type() == "multipart/report"]
        self.assertEqual((len(mails), len(reports)), (2, 1))
        (fields,) = reports[0].get_payload()[1].get_payload()[1:]
        self.assertEqual((fields["Final-Recipient"], fields["Action"], fields["Status"]),
                         ("rfc822; team@local.test", "expanded", "2.0.0"))

    def test_unknown_local_address_fails_without_a_courier(self) -> None:
        # Our hostname has no mailboxes and no alias for root here; nobody was removed
        # from local.test after acceptance: both fail 5.1.1 at once, never by MX.
        self.courier.hold = True  # the bounce waits in the queue, to be read
        self.submit("root@mx.here.test", "nobody@local.test")
        self.assertEqual(self.courier.addresses, [["alice@here.test"]])  # the bounce only
        (report,) = self.reports()
        self.assertEqual(sorted((f["Final-Recipient"], f["Status"])
                                for f in self.report_fields(report)[1:]),
                         [("rfc822; nobody@local.test", "5.1.1"),
                          ("rfc822; root@mx.here.test", "5.1.1")])

    def test_local_maildir_delivery_and_unknown_user(self) -> None:
        self.courier.script["alice@here.test"] = Deferred("4.4.1", "refused")
        self.submit(Recipient("Alice+tag@local.test", notify=("SUCCESS", "FAILURE")),
                    "nobody@local.test")
        (mail,) = (self.tmp / "mail" / "alice" / "new").iterdir()
        text = mail.read_bytes()
        self.assertTrue(text.startswith(b"Return-Path: <alice@here.test>\nDelivered-To: "
                                        b"Alice+tag@local.test\nFrom: a@here.test\n"))
        self.assertNotIn(b"\r\n", text)
        self.assertFalse((self.tmp / "mail" / "nobody").exists())
        reports = self.reports()
        actions = sorted((f["Final-Recipient"], f["Action"], f["Status"])
                         for r in reports for f in self.report_fields(r)[1:])
        self.assertEqual(actions, [("rfc822; Alice+tag@local.test", "delivered", "2.0.0"),
                                   ("rfc822; nobody@local.test", "failed", "5.1.1")])

    # -- hold and flush ---------------------------------------------------------------------

    def test_hold_waits_for_flush(self) -> None:
        envelope = self.submit("x@held.test", "y@far.test")
        self.assertEqual(self.courier.addresses, [["y@far.test"]])
        self.clock.advance(1800)
        self.assertEqual(len(self.courier.calls), 1)
        self.assertEqual(self.relayer.flush("other.test"), 0)
        self.assertEqual(self.relayer.flush("held.test"), 1)
        self.clock.advance(0)
        hop, addresses = self.courier.calls[-1]
        self.assertEqual((addresses, hop.host, hop.port, hop.mx), (["x@held.test"], "127.0.0.9",
                                                                    2600, False))
        self.assertNotIn(envelope.queue_id, self.spool.queue_ids())

    def test_held_mail_costs_no_disk_work_and_expires(self) -> None:
        envelope = self.submit("x@held.test")
        queue = self.spool.root / "queue"
        written = [(p.name, p.stat().st_mtime_ns) for p in queue.iterdir()]
        self.clock.advance(3599)
        # Waiting for pickup: never attempted, nothing written (no state beside it).
        self.assertEqual(self.courier.calls, [])
        self.assertEqual([(p.name, p.stat().st_mtime_ns) for p in queue.iterdir()], written)
        self.assertEqual(written, [(f"{envelope.queue_id}.msg", written[0][1])])
        self.assertEqual(self.spool.load(envelope.queue_id).attempts, 0)
        self.assertEqual(self.relayer.waiting(["held.test"]), 1)
        self.clock.advance(1)
        # Its lifetime over, it bounces to alice as any other mail would.
        self.assertNotIn(envelope.queue_id, self.spool.queue_ids())
        self.assertEqual(self.courier.addresses, [["alice@here.test"]])
        self.assertEqual(self.relayer.waiting(["held.test"]), 0)

    def test_held_mail_waits_after_a_restart_too(self) -> None:
        envelope = self.submit("x@held.test", start=False)
        self.relayer.startService()
        self.clock.advance(100)
        self.assertEqual(self.courier.calls, [])
        self.assertEqual(self.spool.load(envelope.queue_id).attempts, 0)
        # Not rewritten at start either: the message file alone, no state beside it.
        self.assertEqual([p.name for p in (self.spool.root / "queue").iterdir()],
                         [f"{envelope.queue_id}.msg"])
        self.assertEqual(self.relayer.waiting(["held.test"]), 1)

    def test_flush_all_retries_deferred_mail_now(self) -> None:
        self.courier.default = Deferred("4.4.1", "refused")
        self.submit("a@far.test")
        self.assertEqual(self.relayer.flush(), 1)
        self.clock.advance(0)
        self.assertEqual(len(self.courier.calls), 2)

    def test_turn_delivers_held_mail_over_the_given_connection(self) -> None:
        envelope = self.submit("x@held.test", "z@held.test", "y@far.test")
        self.submit("w@other.test")
        client, done = self.relayer.turn(["HELD.test"], "192.0.2.7")
        transport = StringTransport()
        client.makeConnection(transport)
        client.dataReceived(b"220 customer.held.test ESMTP\r\n")
        self.assertEqual(transport.value(), b"EHLO mx.here.test\r\n")
        transport.clear()
        client.dataReceived(b"250-customer.held.test\r\n250 PIPELINING\r\n")
        self.assertEqual(transport.value(), b"MAIL FROM:<alice@here.test>\r\n"
                                            b"RCPT TO:<x@held.test>\r\nRCPT TO:<z@held.test>\r\n"
                                            b"DATA\r\n")
        transport.clear()
        client.dataReceived(b"250 ok\r\n250 ok\r\n550 5.1.1 unknown\r\n354 go\r\n")
        while transport.producer is not None:
            transport.producer.resumeProducing()
        self.assertTrue(transport.value().endswith(b"hello\r\n.\r\n"))
        transport.clear()
        client.dataReceived(b"250 2.0.0 got it\r\n")
        self.assertEqual(self.successResultOf(done), 1)
        self.assertTrue(transport.value().endswith(b"QUIT\r\n"))
        # x delivered, z bounced to alice (our courier takes the bounce), y went by SMTP earlier.
        self.clock.advance(0)
        self.assertNotIn(envelope.queue_id, self.spool.queue_ids())
        self.assertIn(["alice@here.test"], self.courier.addresses)

    def test_turn_with_nothing_held_just_quits(self) -> None:
        self.relayer.startService()
        client, done = self.relayer.turn(["held.test"], "192.0.2.7")
        transport = StringTransport()
        client.makeConnection(transport)
        client.dataReceived(b"220 hi\r\n250 customer\r\n")
        self.assertEqual(self.successResultOf(done), 0)
        self.assertTrue(transport.value().endswith(b"QUIT\r\n"))

    def turned_connection(self, *domains: str) -> tuple[Any, defer.Deferred[int],
                                                         StringTransport]:
        """A turn for `domains`, past the customer's greeting and EHLO (PIPELINING)."""
        client, done = self.relayer.turn(list(domains), "192.0.2.7")
        transport = StringTransport()
        client.makeConnection(transport)
        client.dataReceived(b"220 customer ESMTP\r\n250-customer\r\n250 PIPELINING\r\n")
        return client, done, transport

    def test_turned_delivery_is_an_attempt_like_any_other(self) -> None:
        envelope = self.submit("x@held.test")
        client, done, transport = self.turned_connection("held.test")
        client.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n")
        while transport.producer is not None:
            transport.producer.resumeProducing()
        with self.captured_log() as lines:
            client.dataReceived(b"250 2.0.0 got it\r\n")
        self.assertEqual(self.successResultOf(done), 1)
        self.assertIn(f"{envelope.queue_id}: to=<x@held.test>, relay=turned[192.0.2.7], "
                      "delay=0, dsn=2.0.0, status=sent (250 2.0.0 got it)", lines)
        self.assertEqual(self.spool.queue_ids(), [])

    def test_a_lost_turned_connection_keeps_what_was_not_acknowledged(self) -> None:
        first = self.submit("a@held.test")
        second = self.submit("b@held.test")
        client, done, transport = self.turned_connection("held.test")
        client.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n")
        while transport.producer is not None:
            transport.producer.resumeProducing()
        client.dataReceived(b"250 2.0.0 first one\r\n")  # the first message is theirs now
        client.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n")
        from twisted.internet.error import ConnectionLost
        from twisted.python.failure import Failure
        client.connectionLost(Failure(ConnectionLost("customer went away")))
        self.assertEqual(self.successResultOf(done), 1)
        self.assertEqual(self.spool.queue_ids(), [second.queue_id])
        kept = self.spool.load(second.queue_id)
        # Recorded as an attempt, still pending and held: it waits for the next pickup.
        self.assertEqual((kept.attempts, kept.recipients[0].state), (1, PENDING))
        self.assertEqual(kept.recipients[0].status, "4.4.2")
        self.assertEqual(kept.next_attempt, kept.arrival + 3600)
        self.assertNotIn(first.queue_id, self.spool.queue_ids())
        self.assertEqual(self.relayer.waiting(["held.test"]), 1)

    def test_one_turn_per_domain_at_a_time(self) -> None:
        from mta.server.context import TurnBusy
        self.submit("a@held.test")
        client, done, _ = self.turned_connection("held.test")
        with self.assertRaises(TurnBusy):
            self.relayer.turn(["other.test", "held.test"], "192.0.2.8")
        client.abort()
        self.successResultOf(done)
        second, again = self.relayer.turn(["held.test"], "192.0.2.8")
        second.makeConnection(StringTransport())
        second.abort()
        self.successResultOf(again)

    def test_turn_waits_for_an_attempt_in_progress(self) -> None:
        self.courier.hold = True
        envelope = self.submit("x@held.test", "y@far.test")  # y's attempt is in flight
        client, done, transport = self.turned_connection("held.test")
        self.assertEqual(transport.value(), b"EHLO mx.here.test\r\n")  # nothing sent yet
        self.courier.release()
        self.assertIn(b"RCPT TO:<x@held.test>", transport.value())
        self.assertNotIn(b"y@far.test", transport.value())
        client.abort()
        self.successResultOf(done)
        self.assertEqual([r.state for r in self.spool.load(envelope.queue_id).recipients],
                         [PENDING, DELIVERED])

    def test_a_turn_that_waited_tries_nothing_over_a_connection_gone_meanwhile(self) -> None:
        self.courier.hold = True
        envelope = self.submit("x@held.test", "y@far.test")  # y's attempt is in flight
        client, done, _ = self.turned_connection("held.test")
        from twisted.internet.error import ConnectionLost
        from twisted.python.failure import Failure
        client.connectionLost(Failure(ConnectionLost("customer went away")))
        self.courier.release()
        self.assertEqual(self.successResultOf(done), 0)
        kept = self.spool.load(envelope.queue_id)
        # Only y's attempt happened: x was never tried, so nothing is recorded for it.
        self.assertEqual(kept.attempts, 1)
        self.assertEqual((kept.recipients[0].state, kept.recipients[0].status,
                          kept.recipients[0].diagnostic), (PENDING, None, None))
        self.assertEqual(kept.recipients[1].state, DELIVERED)

    def test_after_a_turned_connection_times_out_the_rest_is_not_tried(self) -> None:
        from mta.delivery.client import Timeouts
        first = self.submit("a@held.test")
        self.clock.advance(1)
        second = self.submit("b@held.test")
        _, done, transport = self.turned_connection("held.test")
        self.assertIn(b"RCPT TO:<a@held.test>", transport.value())
        self.clock.advance(Timeouts().mail + 1)  # the customer stalls: we give up on it
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.successResultOf(done), 0)
        tried = self.spool.load(first.queue_id)
        self.assertEqual((tried.attempts, tried.recipients[0].status), (1, "4.4.2"))
        # The second message never went out: no attempt, nothing recorded.
        untouched = self.spool.load(second.queue_id)
        self.assertEqual((untouched.attempts, untouched.recipients[0].status), (0, None))

    def test_a_flush_is_kept_when_a_turn_takes_the_message_before_its_timer(self) -> None:
        self.make(domains={
            "held.test": {"route": "hold", "etrn_route": "smtp:[127.0.0.9]:2600"},
            "pull.test": {"route": "hold", "etrn_route": "smtp:[127.0.0.9]:2600"},
        })
        self.submit("a@held.test")
        self.clock.advance(1)
        both = self.submit("b@held.test", "c@pull.test")
        client, done, transport = self.turned_connection("held.test")
        self.assertIn(b"RCPT TO:<a@held.test>", transport.value())  # the first one goes
        transport.clear()
        # ETRN pull.test: `both` is due now, c released to pull.test's etrn_route...
        self.assertEqual(self.relayer.flush("pull.test"), 1)
        # ...and the turn reaches `both` before the timer fires: b goes over the turn.
        for _ in range(2):
            client.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n")
            while transport.producer is not None:
                transport.producer.resumeProducing()
            client.dataReceived(b"250 2.0.0 taken\r\n")
        self.assertEqual(self.successResultOf(done), 2)
        self.assertEqual(self.courier.calls, [])
        self.clock.advance(0)
        # The flush still happens: c goes to the etrn_route now, not at the end of its lifetime.
        self.assertEqual(self.courier.addresses, [["c@pull.test"]])
        self.assertNotIn(both.queue_id, self.spool.queue_ids())

    def test_a_turn_never_runs_a_message_held_and_released_meanwhile_twice(self) -> None:
        self.submit("a@held.test")
        self.clock.advance(1)
        second = self.submit("b@held.test")
        client, done, transport = self.turned_connection("held.test")
        self.assertIn(b"RCPT TO:<a@held.test>", transport.value())
        transport.clear()
        # While the first message goes, the operator holds and releases the second
        # (mta queue hold/release) and an ETRN sends it to the etrn_route, slowly.
        self.spool.hold(second.queue_id)
        self.relayer.notice({"action": "hold", "queue_id": second.queue_id})
        self.spool.release(second.queue_id)
        self.relayer.notice({"action": "release", "queue_id": second.queue_id})
        self.courier.hold = True
        self.assertEqual(self.relayer.flush("held.test"), 2)
        self.clock.advance(0)
        self.assertEqual(self.courier.addresses, [["b@held.test"]])  # in flight
        client.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n")
        while transport.producer is not None:
            transport.producer.resumeProducing()
        client.dataReceived(b"250 2.0.0 taken\r\n")
        # The turn must not start a second attempt of the same message.
        self.assertNotIn(b"b@held.test", transport.value())
        self.courier.release()
        self.assertNotIn(second.queue_id, self.spool.queue_ids())
        client.abort()
        self.successResultOf(done)

    def test_flush_of_a_domain_counts_and_covers_subdomains(self) -> None:
        self.courier.default = Deferred("4.4.1", "refused")
        self.submit("a@far.test")
        self.submit("b@sub.far.test", "c@other.test")
        self.assertEqual(self.relayer.waiting(["far.test"]), 1)
        self.assertEqual(self.relayer.flush("far.test"), 1)
        self.assertEqual(self.relayer.flush("far.test", subdomains=True), 2)
        self.assertEqual(self.relayer.flush("nowhere.test"), 0)
        calls = len(self.courier.calls)
        self.clock.advance(0)
        self.assertEqual(len(self.courier.calls), calls + 3)  # a, then b and c of one message

    @contextmanager
    def captured_log(self) -> Iterator[list[str]]:
        from twisted.logger import formatEvent, globalLogPublisher
        lines: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            lines.append(formatEvent(event))
        globalLogPublisher.addObserver(observe)
        try:
            yield lines
        finally:
            globalLogPublisher.removeObserver(observe)

    # -- notices from the command line -------------------------------------------------------

    def test_notices_from_the_command_line(self) -> None:
        self.relayer.startService()
        self.courier.default = Deferred("4.4.1", "refused")
        envelope = Envelope("", "alice@here.test", [Recipient("a@far.test")],
                            arrival=self.clock.seconds())
        self.spool.inject(envelope, DATA)  # as `mta sendmail` does
        self.spool.notify("new", queue_id=envelope.queue_id)
        self.clock.advance(1)
        self.assertEqual(len(self.courier.calls), 1)
        self.spool.notify("flush", domain="")
        self.clock.advance(1)
        self.assertEqual(len(self.courier.calls), 2)
        self.spool.hold(envelope.queue_id)
        self.spool.notify("hold", queue_id=envelope.queue_id)
        self.clock.advance(1000)
        self.assertEqual(len(self.courier.calls), 2)
        self.spool.release(envelope.queue_id)
        self.spool.notify("release", queue_id=envelope.queue_id)
        self.clock.advance(1)
        self.assertEqual(len(self.courier.calls), 3)

    # -- restart ---------------------------------------------------------------------------

    def test_restart_skips_recipients_recorded_as_delivered(self) -> None:
        envelope = Envelope("", "alice@here.test",
                            [Recipient("done@far.test", state=DELIVERED, notified=True),
                             Recipient("todo@far.test")], arrival=self.clock.seconds())
        self.spool.inject(envelope, DATA)
        (self.spool.root / "tmp" / "junk.msg").write_bytes(b"never accepted")
        self.relayer.startService()
        self.clock.advance(0)
        self.assertEqual(self.courier.addresses, [["todo@far.test"]])
        self.assertEqual(list((self.spool.root / "tmp").iterdir()), [])
        self.assertEqual(self.spool.queue_ids(), [])

    def test_the_queue_is_read_in_the_background_and_new_mail_does_not_wait(self) -> None:
        for i in range(3):
            self.spool.inject(Envelope("", "alice@here.test", [Recipient(f"old{i}@far.test")],
                                       arrival=self.clock.seconds()), DATA)
        pending: list[tuple[defer.Deferred[Any], Any, tuple[Any, ...]]] = []

        def later(f: Any, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
            if f.__name__ == "load_committed":  # the start-up read waits; all else runs
                d: defer.Deferred[Any] = defer.Deferred()
                pending.append((d, f, args))
                return d
            return run_now(f, *args, **kwargs)
        self.relayer.run_blocking = later
        self.relayer.attempts.run_blocking = later
        self.relayer.startService()
        self.assertFalse(self.relayer.ready())
        self.submit("new@far.test")  # while the queue is being read
        self.assertEqual(self.courier.addresses, [["new@far.test"]])
        d, f, args = pending.pop(0)
        d.callback(f(*args))
        self.clock.advance(0)
        self.assertEqual(sorted(a for [a] in self.courier.addresses[1:]),
                         ["old0@far.test", "old1@far.test", "old2@far.test"])
        d, f, args = pending.pop(0)  # hold/, read for damage only
        d.callback(f(*args))
        self.assertTrue(self.relayer.ready())

    def test_a_failed_read_of_the_queue_at_start_is_logged(self) -> None:
        self.spool.inject(Envelope("", "alice@here.test", [Recipient("old@far.test")],
                                   arrival=self.clock.seconds()), DATA)

        def failing(f: Any, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
            if f.__name__ == "load_committed":
                return defer.fail(OSError(5, "Input/output error"))
            return run_now(f, *args, **kwargs)
        self.relayer.run_blocking = failing
        self.relayer.startService()
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertFalse(self.relayer.ready())

    def test_a_read_of_the_queue_that_fails_after_the_stop_is_not_logged(self) -> None:
        self.spool.inject(Envelope("", "alice@here.test", [Recipient("old@far.test")],
                                   arrival=self.clock.seconds()), DATA)
        pending: list[defer.Deferred[Any]] = []

        def later(f: Any, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
            if f.__name__ == "load_committed":
                pending.append(defer.Deferred())
                return pending[-1]
            return run_now(f, *args, **kwargs)
        self.relayer.run_blocking = later
        self.relayer.startService()
        self.relayer.stopService()
        pending.pop().errback(OSError(5, "Input/output error"))
        self.assertEqual(self.flushLoggedErrors(OSError), [])

    def test_at_most_so_many_attempts_at_once_and_new_mail_takes_turns(self) -> None:
        self.make(concurrency=1, concurrency_per_destination=1)
        self.courier.hold = True
        for i in range(40):
            self.spool.inject(Envelope("", "alice@here.test", [Recipient(f"old{i}@far.test")],
                                       arrival=self.clock.seconds()), DATA)
        self.relayer.startService()
        self.clock.advance(0)
        self.assertEqual(self.relayer._active, 16)  # not 40 envelopes in memory at once
        self.submit("new@far.test", "alice@local.test")
        self.courier.release()  # one attempt ends: the new message is next in, before 24
        self.clock.advance(0)
        # Local delivery took no slot: alice has her mail while the far hop is busy.
        self.assertEqual(len(list((self.tmp / "mail" / "alice" / "new").iterdir())), 1)
        self.assertEqual(self.relayer._active, 16)
        for _ in range(40):
            self.courier.release()
            self.clock.advance(0)
        self.assertEqual(self.spool.queue_ids(), [])

    def test_restart_respects_the_stored_next_attempt(self) -> None:
        envelope = Envelope("", "alice@here.test", [Recipient("a@far.test")],
                            arrival=self.clock.seconds(), attempts=2,
                            next_attempt=self.clock.seconds() + 100)
        self.spool.inject(envelope, DATA)
        self.relayer.startService()
        self.clock.advance(99)
        self.assertEqual(self.courier.calls, [])
        self.clock.advance(1)
        self.assertEqual(len(self.courier.calls), 1)

    def test_stop_abandons_in_flight_attempts_safely(self) -> None:
        self.courier.hold = True
        envelope = self.submit("a@far.test", "b@other.test")
        self.assertEqual(len(self.courier.waiting), 2)
        # One transaction ends before the stop: its result is recorded.
        d, recipients = self.courier.waiting.pop(0)
        d.callback(self.courier.results(recipients))
        self.successResultOf(defer.maybeDeferred(self.relayer.stopService))
        self.assertTrue(self.courier.aborted)
        stored = self.spool.load(envelope.queue_id)
        states = {r.address: (r.state, r.status) for r in stored.recipients}
        done = recipients[0].address
        other = ({"a@far.test", "b@other.test"} - {done}).pop()
        self.assertEqual(states[done], (DELIVERED, "2.0.0"))
        self.assertEqual(states[other], (PENDING, None))  # the interruption is not recorded
        self.assertEqual(stored.attempts, 1)
        # Nothing more happens after the stop.
        self.clock.advance(10_000)
        self.assertEqual(len(self.courier.calls), 2)
        # A new relayer delivers the rest, and only the rest.
        self.make()
        self.relayer.startService()
        self.clock.advance(0)
        self.assertEqual(self.courier.addresses, [[other]])
        self.assertEqual(self.spool.queue_ids(), [])

    def test_a_delivery_that_ends_during_the_stop_is_recorded(self) -> None:
        # One transaction (one next hop): the next hop's 250 arrives after SIGTERM
        # began the stop.  It must be on disk, or the restarted server sends the
        # message again (make soak found it: duplicates after SIGTERM).
        self.courier.hold = True
        envelope = self.submit("a@far.test", "b@far.test")
        self.assertEqual(len(self.courier.waiting), 1)
        d, recipients = self.courier.waiting.pop(0)
        stopped = defer.maybeDeferred(self.relayer.stopService)
        d.callback(self.courier.results(recipients))
        self.successResultOf(stopped)
        self.assertEqual(self.spool.queue_ids(), [envelope.queue_id])
        stored = self.spool.load(envelope.queue_id)
        self.assertEqual({r.address: r.state for r in stored.recipients},
                         {"a@far.test": DELIVERED, "b@far.test": DELIVERED})
        self.make()
        self.relayer.startService()
        self.clock.advance(0)
        self.assertEqual(self.courier.addresses, [])  # not sent again: only removed
        self.assertEqual(self.spool.queue_ids(), [])

    def test_envelope_removed_by_the_command_line_is_forgotten(self) -> None:
        self.courier.default = Deferred("4.4.1", "refused")
        envelope = self.submit("a@far.test")
        self.spool.remove(envelope.queue_id)
        self.clock.advance(600)
        self.assertEqual(len(self.courier.calls), 1)
        self.assertNotIn(envelope.queue_id, self.relayer._entries)


    def test_held_by_the_operator_during_its_attempt_is_forgotten_after_it(self) -> None:
        self.courier.hold = True
        envelope = self.submit("a@far.test")
        self.spool.hold(envelope.queue_id)  # `mta queue hold` while the attempt runs
        self.relayer.notice({"action": "hold", "queue_id": envelope.queue_id})
        self.assertEqual(self.relayer.waiting(["far.test"]), 1)  # still running
        self.courier.default = Deferred("4.4.1", "refused")
        self.courier.release()
        self.assertNotIn(envelope.queue_id, self.relayer._entries)
        self.assertEqual(self.relayer.waiting(["far.test"]), 0)
        self.clock.advance(3600)
        self.assertEqual(len(self.courier.calls), 1)  # not tried again while on hold


def test_failed_state_constant_is_the_envelope_one() -> None:
    assert bounce.FAILED == FAILED
