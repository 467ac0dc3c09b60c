"""The Twisted adapter of the SMTP server: bytes in, replies out.

`SMTPServerProtocol` frames the byte stream into command lines and message
bodies, hands them to a `Session` (session.py) and writes the replies.  It
owns everything about the connection itself: connection limits, idle and
data timeouts, the error limit, pausing while a message is committed,
closing.

Framing.  It is a `LineReceiver` whose `dataReceived` is our own, because
SMTP needs what the stock framing cannot give: a command line may end in
CRLF or (tolerated, as most MTAs do) a bare LF; an over-long line is
answered with 500 and skipped up to its end instead of dropping the
connection [RFC 5321 4.5.3.1.4]; and after DATA/BDAT the following bytes
go to a body reader, with whatever the reader does not consume (pipelined
commands) framed again.  Commands are handled strictly in order; while a
reply is pending (a spool commit) nothing more is read, so no reply is lost
or reordered [RFC 2920 3.1].  Feeding the same input in one chunk or a byte
at a time gives the same replies.

STARTTLS [RFC 3207].  After the 220 the transport is handed to TLS
(`transport.startTLS`) and whatever the client sent after STARTTLS in the
same plain-text packet is thrown away: it came before the handshake, so it
cannot be trusted (the STARTTLS command-injection attack, CVE-2011-0411).
The session forgets HELO, the transaction and AUTH (`Session.start_tls`).

Early talkers.  On port-25 listeners (role ``smtp``), a client outside
`mynetworks` gets its 220 only after ``[limits] greeting_delay``; a client
that sends anything before it is a bot that does not wait for the server
[RFC 5321 4.3.1] and gets 554 5.5.0 and a close (Postfix's postscreen does
the same pregreet test).  Trusted clients and the submission ports are not
delayed.

Connection limits (``[limits] connections`` and ``connections_per_client``)
are counted over all listeners together (`ConnectionTable`); past them the
client gets 421 4.7.0 and a close.

What happens after each reply is the `Answer`'s next step (answer.py):
go on, close, start TLS, read a body, or turn round.  Turning round (ATRN,
TURN) gives the live transport to a client protocol (reversal.py): from
then on this protocol has no timeouts and no producer registration, and
forwards every byte and the connection's loss to its successor.
"""

from __future__ import annotations

import functools
import ipaddress
from collections import Counter
from typing import Any

from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.interfaces import IHalfCloseableProtocol, IHandshakeListener, ISSLTransport
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin
from zope.interface import implementer

from mta import maillog, reply
from mta.address import client_ip
from mta.config import Config, Listener
from mta.reply import Reply
from mta.server.answer import Answer, Close, ReadBody, StartTLS, TurnRound
from mta.server.context import ServerContext
from mta.server.local import peer_user
from mta.server.ratelimit import WindowCounter
from mta.server.reversal import Reversible
from mta.server.session import Session
from mta.wire import close_now, send_now

log = Logger(namespace="mta.smtpd")

# AUTH initial responses and SASL lines may reach 12288 octets [RFC 4954 4];
# every other command is held to the configured command line length.
MAX_FRAME = 12288
# Unanswered input kept while the client does not read our replies, before we stop reading.
MAX_BUFFERED = 64 * 1024


@implementer(IHalfCloseableProtocol, IHandshakeListener)
class SMTPServerProtocol(Reversible, LineReceiver, TimeoutMixin):
    delimiter = b"\r\n"
    MAX_LENGTH = MAX_FRAME

    def __init__(self, context: ServerContext) -> None:
        self.context = context
        self.limits = context.config.limits
        self.session: Session | None = None
        self._greeting_call = None  # the delayed 220, while the client must stay silent
        self._buffer = b""
        self._discarding = False  # inside an over-long command line
        self._waiting = False  # a reply is pending; act on nothing more
        self._write_blocked = False  # the transport cannot take more replies; answer nothing more
        self._reading_paused = False  # we told the transport to stop reading
        self._processing = False
        self._closed = False
        self._input_ended = False  # the client shut down its side; answer what it sent, then close
        self._reader: Any = None  # a body reader taking the bytes that follow DATA/BDAT
        self._body_deadline: Any = None  # ends a body that trickles in for too long
        self._out: list[bytes] = []  # replies to pipelined commands, sent together
        self.client_address = ""

    # -- connection ----------------------------------------------------------

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.client_address = getattr(peer, "host", "unix")
        refused = self.factory.admit(self)
        if refused is not None:
            maillog.reject(None, "CONNECT", self.client_address, str(refused), None, None,
                           "SMTP", None)
            self._closed = True
            self.transport.write(refused.render())
            self.transport.loseConnection()
            return
        self.session = Session(self.context, self.client_address, getattr(peer, "port", 0),
                               tls=self._transport_is_tls(),
                               local_user=peer_user(self.transport)
                               if self.context.listener.role == "local" else None)
        maillog.connect(self.client_address, self.context.listener.name)
        if self.context.turned:
            log.info("turned connection: serving [{client}] as its SMTP server",
                     client=self.client_address)
        # Flow control: a client that pipelines without reading its replies must
        # not make us buffer them without end; the transport pauses us instead.
        self.transport.registerProducer(self, True)
        self.setTimeout(self.limits.command_timeout)
        delay = self._greeting_delay()
        if delay > 0:
            self._greeting_call = self.callLater(delay, self._greet)
        else:
            self._greet()

    def _greeting_delay(self) -> float:
        if self.context.listener.role != "smtp" or self.context.turned or \
                self.context.config.is_mynetwork(self.client_address):
            return 0.0  # a turned connection's other side waits for our 220 [RFC 2645 5.3]
        return self.limits.greeting_delay

    def _greet(self) -> None:
        self._greeting_call = None
        send_now(self.transport, self.session.greeting().render())

    def handshakeCompleted(self) -> None:
        """IHandshakeListener: a TLS handshake (STARTTLS or implicit) is done: log what it chose."""
        connection = _tls_connection(self.transport)
        if connection is None or self.session is None:
            return
        version = connection.get_protocol_version_name()
        cipher = connection.get_cipher_name()
        bits = connection.get_cipher_bits()
        self.session.tls_info = f"{version}:{cipher}"
        maillog.tls_established(self.client_address,
                                f"{version} with cipher {cipher} ({bits}/{bits} bits)")

    def _transport_is_tls(self) -> bool:
        if self.context.turned:
            return ISSLTransport.providedBy(self.transport)
        return self.context.listener.tls == "implicit"

    def connectionLost(self, reason=None) -> None:
        if self.successor is not None:
            self.successor.connectionLost(reason)
        self.setTimeout(None)
        self._cancel_body_deadline()
        self._closed = True
        if self._greeting_call is not None and self._greeting_call.active():
            self._greeting_call.cancel()
        self._greeting_call = None
        if self.session is not None:
            self.factory.release(self)
            self.session.connection_lost()
            maillog.disconnect(self.client_address, self.context.listener.name,
                               self.session.counts, self.session.tls_info is not None)

    def readConnectionLost(self) -> None:
        """The client sent all it will (a shutdown of its side, such as `nc -N` does
        after the final dot): what it sent is still answered, then we close.  Replies
        owed for input already received, a 250 for a message being committed above
        all, must reach it, or it would send the message again."""
        if self.successor is not None:
            self.transport.loseConnection()
            return
        self._input_ended = True
        if not self._processing:
            self._end_if_done()

    def writeConnectionLost(self) -> None:
        self.transport.loseConnection()

    def _end_if_done(self) -> None:
        """After a half-close: close once nothing is left to answer."""
        if self._input_ended and not (self._waiting or self._write_blocked or self._closed):
            self._closed = True
            self._lose()

    def _body_too_slow(self) -> None:
        self._body_deadline = None
        log.info("body not complete within data_deadline from [{client}]",
                 client=self.client_address)
        self._close_with(reply.TIMEOUT)

    def _cancel_body_deadline(self) -> None:
        if self._body_deadline is not None and self._body_deadline.active():
            self._body_deadline.cancel()
        self._body_deadline = None

    def timeoutConnection(self) -> None:
        if self._closed:
            # Closing, but the client never read what we still have to send.
            self.transport.abortConnection()
            return
        log.info("timeout from [{client}]", client=self.client_address)
        self._close_with(reply.TIMEOUT)

    def _close_with(self, answer: Reply, enhanced: bool | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        if enhanced is None:
            enhanced = self.session.enhanced if self.session else True
        self._write(answer.render(enhanced))
        self._lose()

    def _write(self, data: bytes) -> None:
        """Send a reply; while a batch of pipelined commands is being answered, the
        replies wait and go out together when it ends [RFC 2920 3.2]."""
        if self._processing:
            self._out.append(data)
        else:
            send_now(self.transport, data)

    def _flush(self) -> None:
        if self._out:
            data, self._out = b"".join(self._out), []
            send_now(self.transport, data)

    def _lose(self) -> None:
        self._flush()
        # A registered producer keeps a paused transport open: unregister first.
        self.transport.unregisterProducer()
        if close_now(self.transport):
            return  # the socket had every byte: closed, and connectionLost has run
        self.transport.loseConnection()
        # The close waits for our last replies to be read; a client that never
        # reads them is cut off when this runs out (timeoutConnection).
        self.setTimeout(self.limits.command_timeout)

    # -- flow control (IPushProducer, for our own transport) ---------------------

    def pauseProducing(self) -> None:
        """The client is not reading our replies: stop answering (and soon reading) it."""
        self._write_blocked = True
        self._sync_reading()

    def resumeProducing(self) -> None:
        if not self._write_blocked:
            return
        self._write_blocked = False
        if not self._processing and not self._closed:
            self._process()
        self._sync_reading()

    def stopProducing(self) -> None:
        pass

    def _sync_reading(self) -> None:
        """Read from the transport unless 64 KiB of input wait unanswered.

        While a reply is pending (a commit) or the client does not read our
        replies, what it sends is only buffered, never acted on, so no reply
        is lost or reordered [RFC 2920 3.1]; past that much we stop reading.
        Reading goes on below it: pausing and resuming the transport around
        every commit cost two system calls a message.  A write pause alone
        must not stop reading anyway: an implicit-TLS transport pauses us
        while it holds the greeting for the handshake, which needs the
        client's bytes.
        """
        pause = (self._waiting or self._write_blocked) and len(self._buffer) >= MAX_BUFFERED
        if self._closed or pause == self._reading_paused:
            return
        self._reading_paused = pause
        if pause:
            self.transport.pauseProducing()
        else:
            self.transport.resumeProducing()

    # -- input -----------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.successor is not None:
            self.successor.dataReceived(data)
            return
        if self._closed or self.session is None:
            return
        if self._greeting_call is not None:
            self._refuse_early_talker(data)
            return
        if self._reader is not None:
            # Body data: the timeout is for a pause in it [RFC 5321 4.5.3.2.5], and the
            # whole body has its deadline.  A command line gets no more time for
            # arriving a byte at a time: it must be complete within command_timeout.
            self.resetTimeout()
        self._buffer += data
        if not self._processing:
            self._process()
        self._sync_reading()

    def _refuse_early_talker(self, data: bytes) -> None:
        self._greeting_call.cancel()
        self._greeting_call = None
        maillog.reject(None, "CONNECT", self.client_address,
                       f"{reply.EARLY_TALKER} ({len(data)} octets before the greeting)",
                       None, None, "SMTP", None)
        self._close_with(reply.EARLY_TALKER, enhanced=True)

    def _process(self) -> None:
        self._processing = True
        try:
            while self._buffer and not (self._waiting or self._write_blocked or self._closed
                                        or self.successor is not None):
                if self._reader is not None:
                    self._feed_body()
                elif not self._next_command():
                    break
        finally:
            self._processing = False
            self._flush()
        self._end_if_done()

    def _feed_body(self) -> None:
        rest = self._reader.feed(self._buffer)
        if rest is None:
            self._buffer = b""
            return
        self._buffer = rest
        self._cancel_body_deadline()
        reader, self._reader = self._reader, None
        self._answer(self.session.body_done(reader))

    def _next_command(self) -> bool:
        """Frame and handle one command line; False when more bytes are needed."""
        end = self._buffer.find(b"\n")
        if self._discarding:
            if end < 0:
                self._buffer = b""
                return False
            self._buffer = self._buffer[end + 1:]
            self._discarding = False
            self._answer(Answer(self.session.line_too_long()))
            return True
        if end < 0:
            if len(self._buffer) > MAX_FRAME:
                self._discarding = True
                self._buffer = b""
            return False
        line, self._buffer = self._buffer[:end], self._buffer[end + 1:]
        if line.endswith(b"\r"):
            line = line[:-1]
        self.lineReceived(line)
        return True

    def lineReceived(self, line: bytes) -> None:
        if len(line) + 2 > self._line_limit(line):
            self._answer(Answer(self.session.line_too_long()))
            return
        self._answer(self.session.command(line))

    def _line_limit(self, line: bytes) -> int:
        """RFC 5321 4.5.3.1.4, plus what the extensions we offer add to MAIL and RCPT."""
        base = self.limits.command_line_length
        verb = line[:5].upper()
        if verb.startswith(b"AUTH") or self.session.expects_sasl:
            return MAX_FRAME
        if verb[:4] in (b"MAIL", b"SEND", b"SOML", b"SAML"):
            return base + 26 + 100 + 500  # SIZE [RFC 1870], RET/ENVID [RFC 3461], AUTH= [RFC 4954]
        if verb[:4] == b"RCPT":
            return base + 500  # NOTIFY/ORCPT [RFC 3461 5]
        return base

    # -- output ----------------------------------------------------------------

    def _answer(self, result: Answer | defer.Deferred[Answer]) -> None:
        if isinstance(result, defer.Deferred):
            self._wait_for(result)
        else:
            self._send(result)

    def _wait_for(self, d: defer.Deferred) -> None:
        self._waiting = True
        self.setTimeout(None)
        self._sync_reading()

        def done(result: Answer) -> None:
            self._waiting = False
            self._send(result)  # to a connection gone meanwhile, only its `then` runs
            if self._closed:
                return
            if not self._processing:
                self._process()
            self._sync_reading()

        def broken(failure) -> None:
            # A bug, not a verdict: never leave the client paused without a reply or a timeout.
            log.failure("reply failed for [{client}]", failure, client=self.client_address)
            self._waiting = False
            self._close_with(reply.LOCAL_ERROR_CLOSING)

        d.addCallback(done)
        d.addErrback(broken)

    def _send(self, answer: Answer) -> None:
        if self._closed:
            self._then(answer)  # a message committed for a client that left is still queued
            return
        session = self.session
        said = answer.reply
        if said is not None:
            self._write(said.render(session.enhanced))
        if answer.then is not None:
            self._flush()  # the client has its reply while the bookkeeping runs
            self._then(answer)
        match answer.next:
            case Close():
                self._closed = True
                self._lose()
                return
            case StartTLS():
                self._start_tls()
                return
            case TurnRound(successor=successor):
                self._turn_round(successor)
                return
            case ReadBody(reader=reader):
                self._reader = reader
                self.setTimeout(self.limits.data_timeout)
                if getattr(reader, "remaining", None) == 0:
                    self._reader = None  # an empty BDAT chunk is complete at once
                    self._answer(session.body_done(reader))
                    return
                self._body_deadline = self.callLater(self.limits.data_deadline,
                                                     self._body_too_slow)
                return
        # 452 4.5.3 (too many recipients) is the limit working as RFC 5321 4.5.3.1.10
        # says, not a client error: the client sends the rest in another transaction.
        if said is not None and said.code >= 400 and said != reply.TOO_MANY_RECIPIENTS:
            session.errors += 1
            if session.errors >= self.limits.errors:
                session.log_refusal("COMMAND", reply.TOO_MANY_ERRORS)
                self._close_with(reply.TOO_MANY_ERRORS)
                return
        self.setTimeout(self.limits.command_timeout)

    def _then(self, answer: Answer) -> None:
        if answer.then is None:
            return
        try:
            answer.then()
        except Exception:  # noqa: BLE001 (the reply is out: nothing to tell the client)
            log.failure("after the reply to [{client}]", client=self.client_address)

    def _turn_round(self, successor: Any) -> None:
        """The 250 to ATRN or TURN is written: the connection is `successor`'s now [RFC 2645 5.3]."""
        self._flush()
        self.setTimeout(None)
        leftover, self._buffer = self._buffer, b""
        self._reader = None
        # Our producer registration and any reading pause are ours, not the successor's.
        self.transport.unregisterProducer()
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resumeProducing()
        log.info("turned round: delivering to [{client}] on this connection",
                 client=self.client_address)
        self.turn_round(successor, leftover)

    def _start_tls(self) -> None:
        """The 220 to STARTTLS is written (in plain text): switch the transport to TLS."""
        if self._buffer:
            # RFC 3207 5 / CVE-2011-0411: nothing sent before the handshake counts.
            log.info("discarded {n} octets pipelined after STARTTLS by [{client}]",
                     n=len(self._buffer), client=self.client_address)
        self._buffer = b""
        self._discarding = False
        self._flush()  # the 220 goes in plain text, before the handshake
        self.session.start_tls()
        self.transport.startTLS(self.context.trust.tls)
        self.setTimeout(self.limits.command_timeout)


def _tls_connection(transport: Any) -> Any:
    """The OpenSSL connection under `transport`: its handle (implicit TLS, where we are
    wrapped) or that of the TLS layer STARTTLS put in (twisted's `_newtls`)."""
    handle = getattr(transport, "getHandle", lambda: None)()
    if isinstance(handle, SSL.Connection):
        return handle
    layer = getattr(transport, "protocol", None)
    return getattr(layer, "_tlsConnection", None)


class ConnectionTable:
    """Open connections, shared by every listener: in total, per listener, per client
    address and per network, and how fast each untrusted address connects.

    Untrusted clients (outside mynetworks) on port-25 listeners (role ``smtp``)
    cannot take the last ``[limits] connections_reserved``, so that a flood of
    idle connections from outside never locks out the LAN or the submission
    and ODMR listeners; they are also held to ``connections_per_network`` per
    /24 (IPv4) or /64 (IPv6) and ``connection_rate`` new connections a minute.
    """

    def __init__(self, clock: Any = None) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
        self.active = 0
        self.per_client: Counter[str] = Counter()
        self.per_network: Counter[str] = Counter()
        self.per_listener: Counter[str] = Counter()
        self._rate: WindowCounter | None = None

    def admit(self, client: str, listener: Listener, config: Config) -> Reply | None:
        """Count a new connection, or say why it is refused."""
        limits = config.limits
        # Local users of the sendmail socket are this machine's own (server/local.py).
        trusted = listener.role == "local" or config.is_mynetwork(client)
        if not trusted:
            if self._rate is None or self._rate.limit != limits.connection_rate:
                self._rate = WindowCounter(limits.connection_rate, RATE_WINDOW, self.clock)
            if self._rate.record(client) > limits.connection_rate:
                return _refused(reply.CONNECTING_TOO_FAST, "connection rate", client)
        if self.active >= limits.connections:
            return _refused(reply.TOO_MANY_CONNECTIONS, "connection limit", client)
        if listener.connections and self.per_listener[listener.name] >= listener.connections:
            return _refused(reply.TOO_MANY_CONNECTIONS, f"{listener.name} connection limit",
                            client)
        if not trusted and listener.role == "smtp" and \
                self.active >= limits.connections - limits.connections_reserved:
            return _refused(reply.TOO_MANY_CONNECTIONS, "connection limit for untrusted clients",
                            client)
        if self.per_client[client] >= limits.connections_per_client:
            return _refused(reply.TOO_MANY_FROM_CLIENT, "per-client connection limit", client)
        network = network_of(client)
        if not trusted and self.per_network[network] >= limits.connections_per_network:
            return _refused(reply.TOO_MANY_FROM_NETWORK, f"connection limit for {network}",
                            client)
        self.active += 1
        self.per_client[client] += 1
        self.per_network[network] += 1
        self.per_listener[listener.name] += 1
        return None

    def release(self, client: str, listener: Listener) -> None:
        self.active -= 1
        for table, key in ((self.per_client, client), (self.per_network, network_of(client)),
                           (self.per_listener, listener.name)):
            table[key] -= 1
            if table[key] <= 0:
                del table[key]


RATE_WINDOW = 60.0  # connection_rate counts connections per this many seconds


@functools.lru_cache(maxsize=4096)
def network_of(client: str) -> str:
    """The /24 (IPv4) or /64 (IPv6) of a client address; the address itself otherwise."""
    ip = client_ip(client)
    if ip is None:
        return client
    prefix = 24 if ip.version == 4 else 64
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


def _refused(answer: Reply, limit: str, client: str) -> Reply:
    log.warn("{limit} reached, refusing [{client}]", limit=limit, client=client)  # noqa: G010
    return answer


class SMTPFactory(ServerFactory):
    """Makes one protocol per connection and enforces the connection limits."""

    def __init__(self, context: ServerContext, table: ConnectionTable | None = None) -> None:
        self.context = context
        self.table = table if table is not None else ConnectionTable()

    @property
    def active(self) -> int:
        return self.table.active

    @property
    def per_client(self) -> Counter[str]:
        return self.table.per_client

    def buildProtocol(self, addr) -> SMTPServerProtocol:
        protocol = SMTPServerProtocol(self.context)
        protocol.factory = self
        return protocol

    def admit(self, protocol: SMTPServerProtocol) -> Reply | None:
        return self.table.admit(protocol.client_address, self.context.listener,
                                self.context.config)

    def release(self, protocol: SMTPServerProtocol) -> None:
        self.table.release(protocol.client_address, self.context.listener)
