"""Hostile input: random bytes, NULs, half commands, bare line ends, huge sizes.

Whatever arrives, the server answers with well-formed replies or closes
cleanly, never raises, and keeps every message it acknowledged.
"""

from __future__ import annotations

import random
import re

import pytest

from tests.protocol.dialog import Server

REPLY_LINE = re.compile(rb"[2-5]\d\d[ -][^\r\n]*\Z")

FRAGMENTS = [
    b"EHLO x\r\n", b"HELO y\r\n", b"MAIL FROM:<a@b.test>\r\n", b"RCPT TO:<alice@example.org>\r\n",
    b"RCPT TO:<x@elsewhere.test>\r\n", b"DATA\r\n", b".\r\n", b"\r\n.\r\n", b"BDAT 3\r\n",
    b"BDAT 0 LAST\r\n", b"BDAT 99999999999999999999999\r\n", b"RSET\r\n", b"NOOP\r\n",
    b"\x00", b"\r", b"\n", b"\n.\n", b"\xff\xfe", b"MAIL FROM:<\xc3\xa9@b.test> SMTPUTF8\r\n",
    b"x" * 700, b"QUIT\r\n", b"AUTH PLAIN\r\n", b"STARTTLS\r\n", b"SIZE=-1", b" ", b"..",
]


def check_output(out: bytes) -> None:
    assert out.endswith(b"\r\n") or out == b""
    for line in out.split(b"\r\n")[:-1]:
        assert REPLY_LINE.match(line), line


@pytest.mark.parametrize("seed", range(40))
def test_random_fragments(tmp_path, seed):
    rng = random.Random(seed)
    s = Server(tmp_path, limits={"errors": 1000})
    check_output(s.take())
    for _ in range(200):
        if s.closed:
            break
        piece = rng.choice(FRAGMENTS) if rng.random() < 0.8 else rng.randbytes(rng.randrange(50))
        check_output(s.send(piece))
    # Every message the server acknowledged is in the spool.
    for envelope in s.queued:
        assert s.spool.load(envelope.queue_id).queue_id == envelope.queue_id
    s.protocol.connectionLost(None)
    assert list((s.spool.root / "tmp").iterdir()) == []


@pytest.mark.parametrize("seed", range(10))
def test_random_bytes_byte_by_byte(tmp_path, seed):
    rng = random.Random(1000 + seed)
    s = Server(tmp_path, limits={"errors": 1000})
    s.take()
    data = rng.randbytes(3000)
    check_output(s.send_bytewise(data))


def test_half_command_then_close(tmp_path):
    s = Server(tmp_path)
    s.take()
    s.send(b"EHLO x\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\nhalf a mess")
    s.protocol.connectionLost(None)
    assert not s.queued
    assert list((s.spool.root / "tmp").iterdir()) == []


# -- slow clients and connection floods ([limits], issue 10 fault 6) -------------------------

OUTSIDE = "198.51.100.7"  # not in mynetworks


def test_a_command_line_trickled_a_byte_at_a_time_still_times_out(tmp_path):
    s = Server(tmp_path, client=OUTSIDE, limits={"command_timeout": "60s", "greeting_delay": 0})
    assert s.take().startswith(b"220 ")
    for byte in b"NOOP":  # one byte every 20 seconds: each is "activity", none is a command
        s.protocol.dataReceived(bytes([byte]))
        s.clock.advance(20)
    assert s.take() == b"421 timeout exceeded, closing connection\r\n"
    assert s.closed


def test_complete_commands_keep_the_session_going(tmp_path):
    s = Server(tmp_path, client=OUTSIDE, limits={"command_timeout": "60s", "greeting_delay": 0})
    s.take()
    for _ in range(5):
        s.clock.advance(50)
        assert s.send("NOOP\r\n").startswith(b"250 ")
    assert not s.closed


def test_a_body_trickled_in_meets_its_deadline(tmp_path):
    s = Server(tmp_path, client=OUTSIDE, limits={"data_timeout": "60s", "data_deadline": "5m",
                                                 "greeting_delay": 0})
    s.take()
    s.send("EHLO c.test\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
    for _ in range(9):  # a line every 30 s: never idle for data_timeout
        s.clock.advance(30)
        assert s.send("x\r\n") == b""
    s.clock.advance(30)  # five minutes in the body
    assert s.take() == b"421 4.4.2 timeout exceeded, closing connection\r\n"
    assert s.closed and not s.queued


def test_a_body_within_its_deadline_is_accepted_and_the_deadline_ends_with_it(tmp_path):
    s = Server(tmp_path, client=OUTSIDE, limits={"data_timeout": "60s", "data_deadline": "5m",
                                                 "greeting_delay": 0})
    s.take()
    s.send("EHLO c.test\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
    s.clock.advance(30)
    assert s.send("x\r\n.\r\n").startswith(b"250 ")
    s.clock.advance(299)
    assert s.send("NOOP\r\n").startswith(b"250 ")
    assert not s.closed


def test_untrusted_port_25_clients_cannot_take_the_reserved_connections(tmp_path):
    limits = {"connections": 6, "connections_reserved": 2, "greeting_delay": 0}
    first = Server(tmp_path, client="198.51.100.1", limits=limits)
    outsiders = [first] + [Server(tmp_path, client=f"198.51.100.{i}", factory=first.factory)
                           for i in range(2, 6)]
    assert [o.take()[:4] for o in outsiders] == [b"220 "] * 4 + [b"421 "]
    # The LAN still gets in, up to the total.
    lan = [Server(tmp_path, client=f"127.0.0.{i}", factory=first.factory) for i in (2, 3, 4)]
    assert [c.take()[:4] for c in lan] == [b"220 ", b"220 ", b"421 "]


def test_connections_per_network(tmp_path):
    limits = {"connections_per_network": 2, "greeting_delay": 0}
    first = Server(tmp_path, client="203.0.113.1", limits=limits)
    same = [Server(tmp_path, client=f"203.0.113.{i}", factory=first.factory) for i in (2, 3)]
    other = Server(tmp_path, client="203.0.114.1", factory=first.factory)
    assert first.take()[:4] == same[0].take()[:4] == other.take()[:4] == b"220 "
    assert same[1].take() == b"421 4.7.0 too many connections from your network, try again later\r\n"
    v6 = [Server(tmp_path, client=f"2001:db8:0:1::{i}", factory=first.factory) for i in (1, 2, 3)]
    assert [c.take()[:4] for c in v6] == [b"220 ", b"220 ", b"421 "]


def test_connection_rate_per_address(tmp_path):
    from twisted.internet import task
    clock = task.Clock()
    limits = {"connection_rate": 3, "greeting_delay": 0}
    first = Server(tmp_path, client=OUTSIDE, clock=clock, limits=limits)
    first.factory.table.clock = clock
    first.factory.table._rate = None
    first.protocol.connectionLost(None)
    replies = []
    for _ in range(4):
        s = Server(tmp_path, client=OUTSIDE, clock=clock, factory=first.factory)
        replies.append(s.take()[:4])
        s.protocol.connectionLost(None)
    assert replies[-1] == b"421 "  # the fourth in a minute, though none is open
    clock.advance(61)
    assert Server(tmp_path, client=OUTSIDE, clock=clock, factory=first.factory).take()[:4] == \
        b"220 "
