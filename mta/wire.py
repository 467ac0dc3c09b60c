"""Writing a reply or a command to a plain TCP connection at once, and closing one.

Twisted's `transport.write` queues the bytes and asks the reactor to tell it
when the socket can take them: two epoll calls and one more turn of the
event loop for every reply, while the socket almost always has room for a
reply of a few hundred octets right now.  `send_now` tries the socket first
when nothing is queued before it, and hands whatever the socket did not take
(or everything, on any doubt) to `transport.write`, so order and flow
control stay the transport's.  On the SMTP paths this was a quarter of the
reactor's time.

`close_now` is the same for the end of a connection: `loseConnection` asks
the reactor to say when the socket can be written, writes nothing to it, and
only then closes: three more system calls and a turn of the event loop for
every connection.  When the socket already has every byte, the connection is
closed at once, the way Twisted's own `loseConnection` closes a connection
whose writing side is already shut.

It applies to Twisted's plain TCP connections only: a TLS transport, or
anything else (a test's StringTransport), gets `transport.write` and
`transport.loseConnection` as always.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import main, tcp
from twisted.python.failure import Failure


def send_now(transport: Any, data: bytes) -> None:
    if _idle_plain_tcp(transport):
        try:
            sent = transport.socket.send(data)
        except OSError:
            sent = 0  # would block, or broken: the transport finds out as usual
        data = data[sent:]
        if not data:
            return
    transport.write(data)


def close_now(transport: Any) -> bool:
    """Close `transport` now if nothing it holds is still to be written: its
    protocol's connectionLost runs before this returns.  False (nothing done):
    the caller uses `transport.loseConnection()`, which waits for the bytes."""
    if not _idle_plain_tcp(transport):
        return False
    transport.disconnecting = True  # for a protocol still looping over what it received
    transport.connectionLost(_DONE)
    return True


# One for every connection, as Twisted's reactor keeps its own: a Failure made for each
# close, and its ancestry found again for `check`, was 2% of the receiving process.
_DONE = Failure(main.CONNECTION_DONE)


def _idle_plain_tcp(transport: Any) -> bool:
    """A plain TCP connection, open, with nothing queued that must go first."""
    if not isinstance(transport, tcp.Connection):
        return False
    try:
        return (not transport.TLS and transport.connected and not transport.disconnecting
                and not transport._writeDisconnected and not transport._tempDataBuffer
                and transport.offset == len(transport.dataBuffer))
    except AttributeError:  # a Twisted whose internals moved on: the plain path
        return False
