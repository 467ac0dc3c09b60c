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
