"""mta.wire.send_now over a real loopback TCP connection (the reactor's own transports)."""

from __future__ import annotations

from twisted.internet import defer, protocol, reactor
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from mta.wire import send_now


class Collect(protocol.Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.waiting: list[tuple[int, defer.Deferred[bytes]]] = []

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        for item in list(self.waiting):
            if len(self.data) >= item[0]:
                self.waiting.remove(item)
                item[1].callback(self.data)

    def until(self, size: int) -> defer.Deferred[bytes]:
        d: defer.Deferred[bytes] = defer.Deferred()
        self.waiting.append((size, d))
        self.dataReceived(b"")
        return d


class SendNowTest(TestCase):
    @defer.inlineCallbacks
    def connected(self) -> defer.Deferred:
        server_side: defer.Deferred = defer.Deferred()

        class Factory(protocol.Factory):
            def buildProtocol(self, addr):
                p = protocol.Protocol()
                reactor.callLater(0, server_side.callback, p)
                return p
        port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        peer = Collect()
        yield protocol.ClientCreator(reactor, lambda: peer).connectTCP(
            "127.0.0.1", port.getHost().port)
        server = yield server_side
        self.addCleanup(peer.transport.loseConnection)
        self.addCleanup(server.transport.loseConnection)
        return server.transport, peer

    @defer.inlineCallbacks
    def test_a_reply_goes_out_at_once_without_the_write_buffer(self):
        transport, peer = yield self.connected()
        send_now(transport, b"250 OK\r\n")
        self.assertEqual((transport._tempDataBuffer, transport.dataBuffer), ([], b""))
        self.assertNotIn(transport, reactor.getWriters())  # no epoll round for it
        self.assertEqual((yield peer.until(8)), b"250 OK\r\n")

    @defer.inlineCallbacks
    def test_what_the_socket_cannot_take_is_queued_in_order(self):
        transport, peer = yield self.connected()
        transport.write(b"first\r\n")  # something queued: send_now must not overtake it
        send_now(transport, b"second\r\n")
        big = b"x" * (8 * 1024 * 1024)
        send_now(transport, big)  # more than a socket buffer: the rest is queued
        send_now(transport, b"last\r\n")
        received = yield peer.until(15 + len(big) + 6)
        self.assertEqual(received, b"first\r\nsecond\r\n" + big + b"last\r\n")

    def test_other_transports_get_write(self):
        transport = StringTransport()
        send_now(transport, b"220 hi\r\n")
        self.assertEqual(transport.value(), b"220 hi\r\n")
