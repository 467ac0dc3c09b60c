"""The lean epoll poll (mta/loop.py): on a real EPollReactor of its own, one round."""

from __future__ import annotations

import socket

from twisted.internet import epollreactor  # Linux, where mta runs
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from mta import loop


class Reader:
    """A descriptor the reactor reads: records what it got; a broken one fails to close."""

    def __init__(self, sock: socket.socket, got: list, broken: bool = False) -> None:
        self.sock, self.got, self.broken = sock, got, broken

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return "reader"

    def doRead(self):
        self.got.append(self.sock.recv(100))
        return ValueError("done") if self.broken else None  # a reason: it is disconnected

    def connectionLost(self, reason) -> None:
        raise RuntimeError("a bug in connectionLost")


def test_the_lean_poll_serves_every_ready_descriptor_and_logs_one_that_breaks() -> None:
    reactor = epollreactor.EPollReactor()
    pairs = [socket.socketpair() for _ in range(3)]
    logged: list[dict] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        assert loop.install(reactor)
        got: list[bytes] = []
        readers = [Reader(a, got, broken=(i == 1)) for i, (a, _) in enumerate(pairs)]
        for reader in readers:
            reactor.addReader(reader)
        for i, (_, b) in enumerate(pairs):
            b.send(b"x%d" % i)
        reactor.doIteration(0)  # one round: all three are ready
        assert sorted(got) == [b"x0", b"x1", b"x2"]
        assert [e["selectable"] for e in logged if e.get("log_namespace") == "mta.loop"
                and "log_failure" in e] == [readers[1]]
        reactor.doIteration(0)  # nothing more is ready: nothing happens, nothing breaks
        assert len(got) == 3
    finally:
        globalLogPublisher.removeObserver(logged.append)
        reactor.removeAll()
        reactor._poller.close()
        for a, b in pairs:
            a.close()
            b.close()


def test_other_reactors_are_left_as_they_are() -> None:
    clock = Clock()
    assert not loop.install(clock)
    assert not hasattr(clock, "doIteration")


def test_the_collector_collects_less_often_and_freezes_what_start_up_made():
    import gc

    from twisted.internet.testing import MemoryReactor

    reactor = MemoryReactor()
    thresholds = gc.get_threshold()
    try:
        loop.settle_garbage_collector(reactor)
        assert gc.get_threshold() == (loop.GC_YOUNG_THRESHOLD, *thresholds[1:])
        assert gc.get_freeze_count() == 0  # not before the reactor runs
        made_at_start = [object(), {}]  # a container the collector tracks
        assert gc.is_tracked(made_at_start)
        [(call, args, kwargs)] = reactor.whenRunningHooks
        call(*args, **kwargs)
        assert gc.get_freeze_count() > 0
        assert not any(o is made_at_start for o in gc.get_objects())  # frozen: not walked
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
