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
"""

from __future__ import annotations

from collections import Counter

from twisted.internet import defer
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin

from mta import reply
from mta.reply import Reply
from mta.server.session import ServerContext, Session

log = Logger(namespace="mta.smtpd")

# AUTH initial responses and SASL lines may reach 12288 octets [RFC 4954 4];
# every other command is held to the configured command line length.
MAX_FRAME = 12288


class SMTPServerProtocol(LineReceiver, TimeoutMixin):
    delimiter = b"\r\n"
    MAX_LENGTH = MAX_FRAME

    def __init__(self, context: ServerContext) -> None:
        self.context = context
        self.limits = context.config.limits
        self.session: Session | None = None
        self._buffer = b""
        self._discarding = False  # inside an over-long command line
        self._waiting = False  # a reply is pending; read nothing more
        self._processing = False
        self._closed = False
        self.client_address = ""

    # -- connection ----------------------------------------------------------

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.client_address = getattr(peer, "host", "unix")
        refused = self.factory.admit(self)
        if refused is not None:
            self._closed = True
            self.transport.write(refused.render())
            self.transport.loseConnection()
            return
        self.session = Session(self.context, self.client_address, getattr(peer, "port", 0),
                               tls=self._transport_is_tls())
        self.transport.write(self.session.greeting().render())
        self.setTimeout(self.limits.command_timeout)

    def _transport_is_tls(self) -> bool:
        return self.context.listener.tls == "implicit"

    def connectionLost(self, reason=None) -> None:
        self.setTimeout(None)
        self._closed = True
        if self.session is not None:
            self.factory.release(self)
            self.session.connection_lost()

    def timeoutConnection(self) -> None:
        log.info("timeout from [{client}]", client=self.client_address)
        self._close_with(reply.TIMEOUT)

    def _close_with(self, answer: Reply) -> None:
        if self._closed:
            return
        self._closed = True
        enhanced = self.session.enhanced if self.session else True
        self.transport.write(answer.render(enhanced))
        self.transport.loseConnection()

    # -- input -----------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closed or self.session is None:
            return
        self.resetTimeout()
        self._buffer += data
        if not self._processing:
            self._process()

    def _process(self) -> None:
        self._processing = True
        try:
            while self._buffer and not self._waiting and not self._closed:
                if self.session.body is not None:
                    self._feed_body()
                elif not self._next_command():
                    break
        finally:
            self._processing = False

    def _feed_body(self) -> None:
        rest = self.session.body.feed(self._buffer)
        if rest is None:
            self._buffer = b""
            return
        self._buffer = rest
        self._answer(self.session.body_done())

    def _next_command(self) -> bool:
        """Frame and handle one command line; False when more bytes are needed."""
        end = self._buffer.find(b"\n")
        if self._discarding:
            if end < 0:
                self._buffer = b""
                return False
            self._buffer = self._buffer[end + 1:]
            self._discarding = False
            self._answer(reply.LINE_TOO_LONG)
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
            self._answer(reply.LINE_TOO_LONG)
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

    def _answer(self, result: Reply | defer.Deferred | None) -> None:
        if isinstance(result, defer.Deferred):
            self._wait_for(result)
        elif result is None:
            self._after_body_command()
        else:
            self._send(result)

    def _after_body_command(self) -> None:
        """A BDAT was accepted for reading; an empty chunk is complete at once."""
        body = self.session.body
        self.setTimeout(self.limits.data_timeout)
        if body is not None and getattr(body, "remaining", None) == 0:
            self._answer(self.session.body_done())

    def _wait_for(self, d: defer.Deferred) -> None:
        self._waiting = True
        self.setTimeout(None)
        self.transport.pauseProducing()

        def done(result: Reply) -> None:
            self._waiting = False
            if self._closed:
                return
            self.transport.resumeProducing()
            self._send(result)
            if not self._processing:
                self._process()

        d.addCallback(done)
        d.addErrback(lambda f: log.failure("reply failed", f))

    def _send(self, answer: Reply) -> None:
        if self._closed:
            return
        session = self.session
        self.transport.write(answer.render(session.enhanced))
        if session.closing:
            self._closed = True
            self.transport.loseConnection()
            return
        if answer.code >= 400:
            session.errors += 1
            if session.errors >= self.limits.errors:
                log.info("too many errors from [{client}]", client=self.client_address)
                self._close_with(reply.TOO_MANY_ERRORS)
                return
        self.setTimeout(self.limits.data_timeout if session.body is not None
                        else self.limits.command_timeout)


class SMTPFactory(ServerFactory):
    """Makes one protocol per connection and enforces the connection limits."""

    def __init__(self, context: ServerContext) -> None:
        self.context = context
        self.active = 0
        self.per_client: Counter[str] = Counter()

    def buildProtocol(self, addr) -> SMTPServerProtocol:
        protocol = SMTPServerProtocol(self.context)
        protocol.factory = self
        return protocol

    def admit(self, protocol: SMTPServerProtocol) -> Reply | None:
        limits = self.context.config.limits
        client = protocol.client_address
        if self.active >= limits.connections:
            log.warn("connection limit reached, refusing [{client}]", client=client)
            return reply.TOO_MANY_CONNECTIONS
        if self.per_client[client] >= limits.connections_per_client:
            log.warn("per-client connection limit reached, refusing [{client}]", client=client)
            return reply.TOO_MANY_FROM_CLIENT
        self.active += 1
        self.per_client[client] += 1
        return None

    def release(self, protocol: SMTPServerProtocol) -> None:
        self.active -= 1
        client = protocol.client_address
        self.per_client[client] -= 1
        if self.per_client[client] <= 0:
            del self.per_client[client]
