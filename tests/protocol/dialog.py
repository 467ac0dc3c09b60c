"""Drive the SMTP server protocol over an in-memory transport.

`Server` builds the real factory and protocol on a `StringTransport`, with
the spool in a temporary directory, commits run synchronously and time from
a `task.Clock`, so a dialog runs in microseconds and deterministically.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from mta import config as config_module
from mta.server.context import ServerContext
from mta.server.protocol import SMTPFactory
from mta.spool.store import Spool


class ListQueue(list):
    """The queue a session sees (context.MailQueue): committed envelopes, in order."""

    def enqueue(self, envelope) -> None:
        self.append(envelope)


def make_config(tmp_path: Path, **sections) -> config_module.Config:
    # No early-talker delay unless a test asks for one: the 220 comes at once.
    data = {"server": {"hostname": "mx.test", "spool": str(tmp_path / "spool"),
                       "postmaster": "postmaster@example.org"},
            "domains": {"example.org": {"route": f"maildir:{tmp_path / 'mail'}",
                                        "users": ["alice", "bob"]}},
            "limits": {"greeting_delay": 0}}
    for name, values in sections.items():
        if isinstance(values, list):  # [[listeners]]
            data[name] = values
        else:
            data.setdefault(name, {}).update(values)
    return config_module.from_dict(data, "<test>")


class Server:
    def __init__(self, tmp_path: Path, client: str = "127.0.0.1", listener_index: int = 0,
                 factory: SMTPFactory | None = None, clock: task.Clock | None = None,
                 transport_class: type[StringTransport] = StringTransport,
                 **sections) -> None:
        self.clock = clock if clock is not None else task.Clock()
        if factory is None:
            self.config = make_config(tmp_path, **sections)
            self.spool = Spool(self.config.server.spool)
            self.queued = ListQueue()
            context = ServerContext(
                self.config, self.config.listeners[listener_index], self.spool,
                queue=self.queued, clock=lambda: 1_800_000_000.0,
                run_blocking=lambda f, *a: defer.maybeDeferred(f, *a),
            )
            factory = SMTPFactory(context)
        else:
            self.config = factory.context.config
            self.spool = factory.context.spool
            self.queued = []
        self.factory = factory
        self.protocol = factory.buildProtocol(None)
        self.protocol.callLater = self.clock.callLater
        self.transport = transport_class(peerAddress=IPv4Address("TCP", client, 40000))
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes | str) -> bytes:
        """Feed `data` in one chunk; return what the server wrote since the last call."""
        if isinstance(data, str):
            data = data.encode()
        self.protocol.dataReceived(data)
        return self.take()

    def send_bytewise(self, data: bytes) -> bytes:
        for i in range(len(data)):
            self.protocol.dataReceived(data[i:i + 1])
        return self.take()

    def take(self) -> bytes:
        out = self.transport.value()
        self.transport.clear()
        return out

    def codes(self, data: bytes | str) -> list[str]:
        """The reply codes (with enhanced code when present) of the final reply lines."""
        return reply_codes(self.send(data))

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting

    def queued_data(self, index: int = -1) -> bytes:
        envelope = self.queued[index]
        return self.spool.message_data(envelope.queue_id).read_bytes()


def reply_codes(out: bytes) -> list[str]:
    """Final lines of each reply, as "250 2.1.0" (or "250" without an enhanced code)."""
    codes = []
    for line in out.decode("utf-8", "replace").split("\r\n"):
        if len(line) >= 4 and line[3] == " ":
            parts = line.split(" ")
            if len(parts) > 1 and parts[1][:1].isdigit() and parts[1].count(".") == 2:
                codes.append(f"{parts[0]} {parts[1]}")
            else:
                codes.append(parts[0])
    return codes


def body_of(stored: bytes) -> bytes:
    """The stored message without our Received header (its first header field)."""
    assert stored.startswith(b"Received: ")
    lines = stored.split(b"\r\n")
    i = 1
    while lines[i].startswith(b"\t"):
        i += 1
    return b"\r\n".join(lines[i:])
