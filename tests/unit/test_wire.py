"""mta.wire.send_now and close_now over a real loopback TCP connection (the reactor's own
transports)."""

from __future__ import annotations

from twisted.internet import defer, error, protocol, reactor
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from mta.wire import close_now, send_now


class Collect(protocol.Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.waiting: list[tuple[int, defer.Deferred[bytes]]] = []
        self.lost: list = []
        self.closed: defer.Deferred = defer.Deferred()

    def connectionLost(self, reason=None) -> None:
        self.lost.append(reason)
        self.closed.callback(self.data)

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


class Loopback(TestCase):
    @defer.inlineCallbacks
    def connected(self) -> defer.Deferred:
        server_side: defer.Deferred = defer.Deferred()

        class Factory(protocol.Factory):
            def buildProtocol(self, addr):
                p = Collect()
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


class SendNowTest(Loopback):
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


class CloseNowTest(Loopback):
    @defer.inlineCallbacks
    def test_an_idle_connection_is_closed_at_once_after_its_last_bytes(self):
        transport, peer = yield self.connected()
        server = transport.protocol
        send_now(transport, b"221 bye\r\n")
        self.assertTrue(close_now(transport))
        # Closed before close_now returned: connectionLost ran, with a clean close...
        self.assertEqual(len(server.lost), 1)
        self.assertTrue(server.lost[0].check(error.ConnectionDone))
        self.assertEqual(transport.fileno(), -1)
        self.assertNotIn(transport, reactor.getReaders())
        self.assertNotIn(transport, reactor.getWriters())
        # ...and the peer has every byte, then the end of the stream.
        self.assertEqual((yield peer.closed), b"221 bye\r\n")
        self.assertTrue(peer.lost[0].check(error.ConnectionDone))
        self.assertEqual(len(server.lost), 1)  # the reactor did not close it a second time

    @defer.inlineCallbacks
    def test_a_connection_with_bytes_still_to_write_is_left_to_lose_connection(self):
        transport, peer = yield self.connected()
        big = b"x" * (8 * 1024 * 1024)
        send_now(transport, big)  # more than the socket takes: the rest waits in the transport
        self.assertFalse(close_now(transport))
        self.assertEqual(transport.protocol.lost, [])
        transport.loseConnection()
        self.assertEqual(len((yield peer.closed)), len(big))

    def test_other_transports_are_left_alone(self):
        transport = StringTransport()
        self.assertFalse(close_now(transport))
        self.assertFalse(transport.disconnecting)
