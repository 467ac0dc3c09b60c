"""Who accepts on the delegated listeners (receiver.ReceivingProcess): nobody until the
first receiving process serves, then the child; this process when a child cannot
start, dies, or is not serving in time."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from mta import receiver


class Port:
    def __init__(self) -> None:
        self.reading = True  # as a Twisted port is once it listens

    def startReading(self) -> None:
        self.reading = True

    def stopReading(self) -> None:
        self.reading = False

    def fileno(self) -> int:
        return 99

    def stopListening(self) -> None:
        self.reading = False


class Listener:
    name = "smtp[tcp:2525]"


class Relayer:
    def adopt_unknown(self) -> Any:
        return defer.succeed(None)


class Reactor(Clock):
    def __init__(self, spawn_fails: bool) -> None:
        super().__init__()
        self.spawn_fails = spawn_fails

    def spawnProcess(self, protocol: Any, *args: Any, **kwargs: Any) -> Any:
        if self.spawn_fails:
            raise OSError(12, "Cannot allocate memory")
        return type("Process", (), {"pid": 4242, "signalProcess": lambda self, name: None})()

    def adoptStreamConnection(self, fd: int, family: Any, factory: Any) -> None:
        pass


def make(monkeypatch: pytest.MonkeyPatch, spawn_fails: bool = False,
         ) -> tuple[receiver.ReceivingProcess, Reactor, list[Port]]:
    ports: list[Port] = []

    def listen(endpoint: Any, factory: Any, name: str) -> Port:
        ports.append(Port())
        return ports[-1]

    monkeypatch.setattr(receiver, "_listen", listen)
    reactor = Reactor(spawn_fails)
    process = receiver.ReceivingProcess("mta.toml", [(Listener(), None, None)] * 2,
                                        relayer=Relayer(), pickup=None, reactor=reactor)
    process.privilegedStartService()
    process.startService()
    return process, reactor, ports


def test_nobody_accepts_before_the_first_child_serves_then_the_child_does(monkeypatch):
    process, reactor, ports = make(monkeypatch)
    assert [port.reading for port in ports] == [False, False]  # connections wait queued
    process._received(("ready", 4242))
    assert [port.reading for port in ports] == [False, False] and not process.here
    reactor.advance(receiver.FIRST_READY_WAIT)  # serving in time: nothing changes
    assert [port.reading for port in ports] == [False, False]
    process._child_ended(type("Reason", (), {"value": None})())  # it dies: ours again
    assert [port.reading for port in ports] == [True, True] and process.here
    process.stopService()


def test_a_first_child_that_is_slow_to_serve_leaves_the_listeners_to_this_process(
        monkeypatch):
    process, reactor, ports = make(monkeypatch)
    reactor.advance(receiver.FIRST_READY_WAIT - 1)
    assert [port.reading for port in ports] == [False, False]
    reactor.advance(1)
    assert [port.reading for port in ports] == [True, True]
    process._received(("ready", 4242))  # late, but it serves: the child's now
    assert [port.reading for port in ports] == [False, False]
    process.stopService()


def test_a_child_that_cannot_be_started_leaves_the_listeners_to_this_process(monkeypatch):
    process, _, ports = make(monkeypatch, spawn_fails=True)
    assert [port.reading for port in ports] == [True, True]
    process.stopService()
