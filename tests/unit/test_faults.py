"""Fault injection at the file layer (issue 10): ENOSPC, EIO and EROFS at the n-th
write, fsync, open, link, rename or unlink while a message is received, and while it
is delivered and recorded.

What must hold whatever fails:
- receiving: a client that heard 250 has its message in the spool, byte for byte,
  after the recovery a restart runs; a client that heard 4xx left nothing behind;
- delivering: once the faults stop, every recipient is delivered exactly once (no
  crash here, so no delivery may be repeated) and the spool ends empty.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase

from mta import config as config_mod
from mta.delivery.courier import MaildirCourier
from mta.delivery.outcome import Deferred, Delivered
from mta.delivery.router import MAILDIR, SMTP
from mta.delivery.scheduler import Relayer
from mta.spool.envelope import Envelope, Recipient
from mta.spool.store import Spool
from tests.protocol.dialog import Server
from tests.unit.test_scheduler import DATA, FixedRandom, ScriptedCourier, run_now

OPS = ("write", "fsync", "open", "link", "rename", "unlink")
ERRORS = (errno.ENOSPC, errno.EIO, errno.EROFS)


class Faults:
    """Makes the `n`-th call of ``os.<op>`` fail with `err`; `fired` once it has."""

    def __init__(self, op: str, n: int, err: int) -> None:
        self.op, self.n, self.err = op, n, err
        self.calls = 0
        self.fired = False
        self.real = getattr(os, op)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls == self.n:
            self.fired = True
            raise OSError(self.err, os.strerror(self.err))
        return self.real(*args, **kwargs)


@contextmanager
def failing(op: str, n: int, err: int) -> Iterator[Faults]:
    faults = Faults(op, n, err)
    setattr(os, op, faults)
    try:
        yield faults
    finally:
        setattr(os, op, faults.real)


BODY = b"Subject: faults\r\n\r\nline one\r\nline two\r\n"
TX = "EHLO c.test\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n"


@pytest.mark.parametrize("err", ERRORS)
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("op", OPS)
def test_receiving_under_file_faults(tmp_path, op, n, err):
    server = Server(tmp_path)
    server.take()
    server.send(TX)
    with failing(op, n, err) as faults:
        codes = server.codes(BODY + b".\r\n")
    spool = Spool(server.spool.root)
    spool.recover()  # what a restart does
    queued = spool.queue_ids()
    if codes == ["250 2.0.0"]:
        assert len(queued) == 1
        assert spool.message_data(queued[0]).read_bytes().endswith(BODY)
    else:
        assert faults.fired
        assert codes in (["451 4.3.0"], ["452 4.3.1"])
        assert queued == [] and list((server.spool.root / "tmp").iterdir()) == []
    assert not [p for p in (server.spool.root / "queue").iterdir() if p.name.endswith(".tmp")]


def test_the_receive_faults_are_really_injected(tmp_path):
    # The parametrized test must not pass because nothing failed: writing and syncing a
    # small message happen at commit, once each at least.
    for op in ("write", "fsync"):
        server = Server(tmp_path / op)
        server.take()
        server.send(TX)
        with failing(op, 1, errno.ENOSPC) as faults:
            assert server.codes(BODY + b".\r\n") == ["452 4.3.1"]
        assert faults.fired


class DeliveryFaultsTest(SynchronousTestCase):
    """A message for two recipients, both delivered at once, or one deferred once. Faults
    hit the first attempt; after them, each recipient arrives exactly once."""

    def setUp(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="mta-test-faults-"))
        self.addCleanup(shutil.rmtree, self.root, True)

    def run_case(self, op: str, n: int, err: int, defer_carol: bool) -> bool:
        tmp = self.root / f"{op}-{n}-{err}-{defer_carol}"
        config = config_mod.from_dict({
            "server": {"hostname": "mx.here.test", "spool": str(tmp / "spool")},
            "relay": {"retry_min": "60s", "retry_max": "60s", "lifetime": "1h",
                      "delay_warning": "0"}})
        clock = task.Clock()
        clock.advance(10_000)
        spool = Spool(tmp / "spool", clock=clock.seconds)
        courier = ScriptedCourier()
        if defer_carol:
            courier.script["carol@far.test"] = Deferred("4.2.0", "452 try later",
                                                        "mx.far.test")
        relayer = Relayer(config, spool, clock, rng=FixedRandom(), run_blocking=run_now,
                          couriers={SMTP: courier, MAILDIR: MaildirCourier(config, run_now)})
        relayer.startService()
        envelope = Envelope("", "", [Recipient("bob@far.test"), Recipient("carol@far.test")],
                            arrival=clock.seconds())
        spool.inject(envelope, DATA)
        with failing(op, n, err) as faults:
            relayer.enqueue(envelope)
            clock.advance(0)
        courier.script.clear()  # carol's next hop takes it from now on
        for _ in range(5):
            clock.advance(61)
        self.flushLoggedErrors(OSError)
        delivered = [addresses for _, addresses in courier.calls]
        flat = [a for batch in delivered for a in batch]
        self.assertEqual(flat.count("bob@far.test"), 1, (op, n, err, delivered))
        # carol: deferred once (if so scripted), then delivered once.
        self.assertEqual(flat.count("carol@far.test"), 2 if defer_carol else 1,
                         (op, n, err, delivered))
        self.assertEqual(spool.queue_ids(), [], (op, n, err))
        relayer.stopService()
        return faults.fired

    def test_delivery_under_file_faults(self) -> None:
        fired = set()
        for op in OPS:
            for n in (1, 2, 3):
                for err in ERRORS:
                    for defer_carol in (False, True):
                        if self.run_case(op, n, err, defer_carol):
                            fired.add(op)
        # Reading the message, recording carol's deferral and removing the message
        # went through these: the faults were really injected.
        self.assertTrue({"open", "write", "fsync", "rename", "unlink"} <= fired, fired)


def test_delivered_counts_are_what_the_courier_answered() -> None:
    assert isinstance(ScriptedCourier().default, Delivered)
