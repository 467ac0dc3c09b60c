"""The channel between the main and the receiving process (mta/receiver.py), on a real
reactor in a child Python: frames arrive whole and in order, and a main process that
falls behind makes the receiving process stop accepting until it has caught up."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.integration.harness import source_env

PROGRAM = textwrap.dedent('''
    import socket
    from twisted.internet import reactor
    from mta.receiver import Channel, _AcceptPause, _ChannelFactory

    class Port:
        def __init__(self): self.events = []
        def stopReading(self): self.events.append("stop")
        def startReading(self): self.events.append("start")

    got = []
    a, b = socket.socketpair()
    sender = Channel(lambda m: None, lambda: None)
    receiver = Channel(got.append, lambda: None)
    reactor.adoptStreamConnection(a.fileno(), socket.AF_UNIX, _ChannelFactory(sender))
    port, pause = Port(), None

    def flood():
        global pause
        pause = _AcceptPause([port])
        sender.transport.registerProducer(pause, True)
        for i in range(3000):  # about 3 MB: far more than the socket and its buffer take
            sender.send("line", i, "x" * 1000)
        print("flooded", port.events, flush=True)
        reactor.callLater(0.2, drain)

    def drain():  # the main process catching up
        reactor.adoptStreamConnection(b.fileno(), socket.AF_UNIX, _ChannelFactory(receiver))
        check()

    def check():
        if len(got) == 3000:
            print("received", [m[1] for m in got] == list(range(3000)), port.events, flush=True)
            reactor.stop()
        else:
            reactor.callLater(0.05, check)

    reactor.callWhenRunning(flood)
    reactor.callLater(20, reactor.stop)
    reactor.run()
''')


def test_a_full_channel_pauses_accepting_until_it_drains() -> None:
    done = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True,
                          timeout=60, env=source_env(), check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "flooded ['stop']"  # once, however many frames wait
    assert lines[1] == "received True ['stop', 'start']"


def test_only_plain_smtp_and_submission_listeners_go_to_the_receiving_process(tmp_path) -> None:
    from twisted.internet import endpoints, reactor

    from mta import config
    from mta.receiver import delegated
    from tests.testca import TestCA
    cert, key = TestCA(tmp_path).issue("mx", "mx.test")
    passwords = tmp_path / "passwords"
    passwords.write_text("")
    cfg = config.from_dict({"auth": {"passwords": str(passwords)},
                            "tls": {"certificate": str(cert), "key": str(key)},
                            "listeners": [
        {"endpoint": "tcp:25", "role": "smtp"},
        {"endpoint": "tcp6:587", "role": "submission"},
        {"endpoint": "tcp:465", "role": "smtps"},
        {"endpoint": "tcp:366", "role": "odmr"},
        {"endpoint": "tcp:588", "role": "submission", "atrn": True},
        {"endpoint": f"ssl:4650:privateKey={key}:certKey={cert}", "role": "smtps"}]})
    chosen = [delegated(listener, endpoints.serverFromString(reactor, listener.endpoint))
              for listener in cfg.listeners]
    # An ssl: endpoint's TLS is in the endpoint: the child, given the bare socket,
    # would speak plain SMTP on it; it stays in the main process.
    assert chosen == [True, True, True, False, False, False]


def _gathering() -> tuple[object, object, object]:
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from mta.receiver import Channel
    clock = Clock()
    channel = Channel(lambda m: None, lambda: None, clock=clock)
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport, clock


def _writes(data: bytes) -> list:
    """What each frame written holds: a tuple, or the list of tuples it gathered."""
    import pickle
    out = []
    while data:
        size = int.from_bytes(data[:4], "big")
        out.append(pickle.loads(data[4:4 + size]))
        data = data[4 + size:]
    return out


def _frames(data: bytes) -> list[tuple]:
    out = []
    for frame in _writes(data):
        out += frame if isinstance(frame, list) else [frame]
    return out


def test_the_childs_frames_are_gathered_and_written_together_in_order() -> None:
    from mta.receiver import Channel
    channel, transport, clock = _gathering()
    channel.send("line", 1)
    channel.send("enqueue", "envelope")
    channel.send("line", 2)
    assert transport.value() == b""
    clock.advance(Channel.GATHER / 2)
    channel.send("metric", "received", ())
    assert transport.value() == b""
    clock.advance(Channel.GATHER / 2)  # GATHER after the first frame: all of them, once
    assert _writes(transport.value()) == [[("line", 1), ("enqueue", "envelope"), ("line", 2),
                                           ("metric", "received", ())]]
    assert clock.getDelayedCalls() == []


def test_send_now_writes_what_waits_first_and_a_full_gathering_goes_at_once() -> None:
    from mta.receiver import Channel
    channel, transport, clock = _gathering()
    channel.send("line", 1)
    channel.send_now("etrn", 1, "example.org", "127.0.0.1", None)
    assert _frames(transport.value()) == [("line", 1), ("etrn", 1, "example.org", "127.0.0.1",
                                                        None)]
    assert clock.getDelayedCalls() == []
    transport.clear()
    for i in range(Channel.GATHER_COUNT - 1):
        channel.send("line", i)
    assert transport.value() == b""
    channel.send("line", Channel.GATHER_COUNT - 1)
    assert [frame[1] for frame in _frames(transport.value())] == list(range(Channel.GATHER_COUNT))
    assert clock.getDelayedCalls() == []


def test_a_lost_channel_drops_what_waits_and_its_timer() -> None:
    channel, transport, clock = _gathering()
    channel.send("line", 1)
    channel.connectionLost(None)
    assert clock.getDelayedCalls() == []
    channel.send("line", 2)  # after the loss: nowhere to go, and no error
    assert transport.value() == b"" and clock.getDelayedCalls() == []


def test_the_other_end_handles_a_gathered_frame_message_by_message_in_order() -> None:
    from twisted.internet.testing import StringTransport

    from mta.receiver import Channel
    child, written, _ = _gathering()
    child.send("line", 1)
    child.send("enqueue", "envelope")
    child.send_now("ready", 42)
    got: list[tuple] = []
    main = Channel(got.append, lambda: None)  # the main process's end: no clock
    main.makeConnection(StringTransport())
    main.dataReceived(written.value())
    main.transport.clear()
    main.send("answer", 1, "reply")  # and what it sends goes as one tuple a frame
    assert got == [("line", 1), ("enqueue", "envelope"), ("ready", 42)]
    assert _writes(main.transport.value()) == [("answer", 1, "reply")]
