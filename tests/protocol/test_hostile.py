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
