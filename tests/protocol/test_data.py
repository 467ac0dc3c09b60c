"""Message bodies (DATA and BDAT), pipelining, framing and limits."""

from __future__ import annotations

import os

import pytest

from tests.protocol.dialog import Server, body_of, reply_codes

EHLO = "EHLO client.test\r\n"
TX = "MAIL FROM:<sender@client.test>\r\nRCPT TO:<alice@example.org>\r\n"


def greeted(tmp_path, **sections) -> Server:
    s = Server(tmp_path, **sections)
    s.take()
    s.send(EHLO)
    return s


def deliver(tmp_path, body: bytes, **sections) -> tuple[Server, list[str]]:
    s = greeted(tmp_path, **sections)
    codes = s.codes(TX + "DATA\r\n")
    assert codes == ["250 2.1.0", "250 2.1.5", "354"]
    return s, s.codes(body)


# -- DATA ------------------------------------------------------------------------

def test_dot_unstuffing(tmp_path):
    s, codes = deliver(tmp_path, b"..leading dot\r\n...\r\n..\r\nx.\r\n.\r\n")
    assert codes == ["250 2.0.0"]
    assert body_of(s.queued_data()) == b".leading dot\r\n..\r\n.\r\nx.\r\n"


def test_empty_message(tmp_path):
    s, codes = deliver(tmp_path, b".\r\n")
    assert codes == ["250 2.0.0"]
    assert body_of(s.queued_data()) == b""


def test_eight_bit_body_is_kept_byte_for_byte(tmp_path):
    body = bytes(range(128, 256)).replace(b"\r", b"").replace(b"\n", b"") + b"\r\n"
    s, codes = deliver(tmp_path, body + b".\r\n")
    assert codes == ["250 2.0.0"]
    assert body_of(s.queued_data()) == body


@pytest.mark.parametrize("attack", [
    b"a\r\n\n.\n", b"a\r\n\n.\r\n", b"a\r\n.\n", b"a\r\n\r.\r\n", b"a\n.\r\n",
])
def test_smuggled_end_of_data_is_not_an_end(tmp_path, attack):
    # SMTP smuggling: only <CRLF>.<CRLF> ends the data [RFC 5321 4.1.1.4].
    s, codes = deliver(tmp_path, attack + b"MAIL FROM:<evil@x.test>\r\n")
    assert codes == [] and not s.queued
    assert s.codes(b"\r\n.\r\n") == ["250 2.0.0"]
    stored = body_of(s.queued_data())
    assert b"MAIL FROM:<evil@x.test>\r\n" in stored


def test_bare_lf_and_cr_become_crlf(tmp_path):
    s, codes = deliver(tmp_path, b"one\ntwo\rthree\r\n.\r\n")
    assert codes == ["250 2.0.0"]
    assert body_of(s.queued_data()) == b"one\r\ntwo\r\nthree\r\n"


def test_message_over_size_limit_is_552_and_session_goes_on(tmp_path):
    s, codes = deliver(tmp_path, b"x" * 80 + b"\r\n" + (b"y" * 98 + b"\r\n") * 20 + b".\r\n",
                       limits={"message_size": 1000})
    assert codes == ["552 5.3.4"]
    assert not s.queued
    assert not list((s.spool.root / "tmp").iterdir())
    assert s.codes(TX + "DATA\r\n") == ["250 2.1.0", "250 2.1.5", "354"]
    assert s.codes("small\r\n.\r\n") == ["250 2.0.0"]


def test_declared_size_too_big_is_552_at_mail(tmp_path):
    s = greeted(tmp_path, limits={"message_size": 1000})
    assert s.codes("MAIL FROM:<a@b.test> SIZE=1001\r\n") == ["552 5.3.4"]
    assert s.codes("MAIL FROM:<a@b.test> SIZE=1000\r\n") == ["250 2.1.0"]


def test_data_line_over_1000_octets_rejects_message_after_end(tmp_path):
    s, codes = deliver(tmp_path, b"a" * 999 + b"\r\n" + b"ok\r\n.\r\n")
    assert codes == ["500 5.5.2"]
    assert not s.queued
    _, codes = deliver(tmp_path / "2", b"a" * 998 + b"\r\n.\r\n")
    assert codes == ["250 2.0.0"]


def test_very_long_line_is_not_buffered_and_ends_cleanly(tmp_path):
    s = greeted(tmp_path)
    s.send(TX + "DATA\r\n")
    for _ in range(100):
        assert s.send(b"z" * 10000) == b""
    assert len(s.protocol._reader.partial) <= 2
    assert s.codes(b"\r\n.\r\nNOOP\r\n") == ["500 5.5.2", "250 2.0.0"]


def test_mail_loop_is_554(tmp_path):
    headers = b"Received: from a by b; date\r\n" * 101
    _, codes = deliver(tmp_path, headers + b"\r\nbody\r\n.\r\n")
    assert codes == ["554 5.4.6"]
    assert not list((tmp_path / "spool" / "queue").iterdir())
    _, codes = deliver(tmp_path / "2", b"Received: x\r\n" * 99 + b"\r\n.\r\n")
    assert codes == ["250 2.0.0"]


# -- BDAT [RFC 3030] ----------------------------------------------------------------

def test_bdat_many_chunks(tmp_path):
    s = greeted(tmp_path)
    s.send(TX)
    out = s.send(b"BDAT 6\r\nHello BDAT 7\r\n world BDAT 3 LAST\r\n!\r\n")
    codes = reply_codes(out)
    assert codes == ["250 2.0.0", "250 2.0.0", "250 2.0.0"]
    assert body_of(s.queued_data()) == b"Hello  world !\r\n"
    assert "queued as" in out.decode().split("\r\n")[-2]


def test_bdat_keeps_dots_and_octets(tmp_path):
    s = greeted(tmp_path)
    s.send(TX)
    chunk = b".\r\n..x\r\n"
    assert s.codes(b"BDAT %d LAST\r\n" % len(chunk) + chunk) == ["250 2.0.0"]
    assert body_of(s.queued_data()) == chunk


def test_bdat_zero_last(tmp_path):
    s = greeted(tmp_path)
    s.send(TX)
    assert s.codes(b"BDAT 4\r\nabc\nBDAT 0 LAST\r\n") == ["250 2.0.0", "250 2.0.0"]
    assert body_of(s.queued_data()) == b"abc\n"


def test_bdat_without_transaction_consumes_chunk(tmp_path):
    s = greeted(tmp_path)
    # The 4 octets "NOOP" are chunk data, not a command.
    assert s.codes(b"BDAT 4\r\nNOOPRSET\r\n") == ["503 5.5.1", "250 2.0.0"]


def test_data_after_bdat_is_503(tmp_path):
    s = greeted(tmp_path)
    s.send(TX)
    assert s.codes(b"BDAT 2\r\nabDATA\r\n") == ["250 2.0.0", "503 5.5.1"]
    assert s.codes(b"BDAT 1 LAST\r\nc") == ["250 2.0.0"]


def test_bdat_bad_syntax(tmp_path):
    s = greeted(tmp_path)
    s.send(TX)
    for bad in (b"BDAT\r\n", b"BDAT x\r\n", b"BDAT 5 FIRST\r\n", b"BDAT -1\r\n"):
        assert s.codes(bad) == ["501 5.5.4"]


def test_huge_bdat_is_refused_and_closed(tmp_path):
    s = greeted(tmp_path, limits={"message_size": 1000})
    s.send(TX)
    assert s.codes(b"BDAT 999999999999999\r\n") == ["552 5.3.4"]
    assert s.closed


def test_bdat_total_over_limit(tmp_path):
    s = greeted(tmp_path, limits={"message_size": 1000})
    s.send(TX)
    assert s.codes(b"BDAT 900\r\n" + b"a" * 900) == ["250 2.0.0"]
    assert s.codes(b"BDAT 900\r\n" + b"a" * 900) == ["552 5.3.4"]
    assert s.codes(b"BDAT 3 LAST\r\nabc") == ["503 5.5.1"]
    assert not s.queued


# -- pipelining and framing ------------------------------------------------------------

PIPELINED = (
    b"EHLO client.test\r\nMAIL FROM:<a@client.test>\r\nRCPT TO:<alice@example.org>\r\n"
    b"RCPT TO:<nobody@example.org>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n"
    b"Subject: pipelined\r\n\r\n..dot\r\nline\r\n.\r\n"
    b"MAIL FROM:<b@client.test>\r\nRCPT TO:<bob@example.org>\r\nBDAT 5 LAST\r\nhello"
    b"NOOP\r\nFOO\r\nRSET\r\nQUIT\r\n"
)


def _normalise(out: bytes, queued) -> bytes:
    for envelope in queued:
        out = out.replace(envelope.queue_id.encode(), b"QID")
    return out


def test_pipelined_in_one_chunk_equals_byte_at_a_time(tmp_path):
    one = Server(tmp_path / "one")
    one.take()
    out_one = _normalise(one.send(PIPELINED), one.queued)
    many = Server(tmp_path / "many")
    many.take()
    out_many = _normalise(many.send_bytewise(PIPELINED), many.queued)
    assert out_one == out_many
    assert reply_codes(out_one) == [
        "250", "250 2.1.0", "250 2.1.5", "550 5.1.1", "250 2.1.5", "354", "250 2.0.0",
        "250 2.1.0", "250 2.1.5", "250 2.0.0", "250 2.0.0", "500 5.5.1", "250 2.0.0", "221 2.0.0"]
    assert len(one.queued) == len(many.queued) == 2
    assert body_of(one.queued_data(0)) == body_of(many.queued_data(0)) == \
        b"Subject: pipelined\r\n\r\n.dot\r\nline\r\n"


def test_bare_lf_command_lines_are_tolerated(tmp_path):
    s = Server(tmp_path)
    s.take()
    assert s.codes(b"EHLO x\nMAIL FROM:<a@b.test>\nRSET\n")[-2:] == ["250 2.1.0", "250 2.0.0"]


def test_over_long_command_line_is_500_and_session_goes_on(tmp_path):
    s = greeted(tmp_path)
    assert s.codes(b"NOOP " + b"x" * 600 + b"\r\nNOOP\r\n") == ["500 5.5.2", "250 2.0.0"]
    # Longer than anything we buffer: skipped up to its end.
    for _ in range(5):
        assert s.send(b"y" * 10000) == b""
    assert s.codes(b"\r\nNOOP\r\n") == ["500 5.5.2", "250 2.0.0"]
    assert len(s.protocol._buffer) == 0


def test_rcpt_line_may_carry_dsn_parameters_past_512(tmp_path):
    s = greeted(tmp_path)
    s.send("MAIL FROM:<a@b.test>\r\n")
    orcpt = "rfc822;" + "a" * 60 + "@" + ".".join(["label"] * 80)
    line = f"RCPT TO:<alice@example.org> ORCPT={orcpt[:490]}\r\n"
    assert len(line) > 512
    assert s.codes(line) == ["250 2.1.5"]


# -- limits -------------------------------------------------------------------------------

def test_recipient_limit_is_452(tmp_path):
    s = greeted(tmp_path, limits={"recipients": 2})
    s.send("MAIL FROM:<a@b.test>\r\n")
    assert s.codes("RCPT TO:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\n"
                   "RCPT TO:<alice@example.org>\r\nDATA\r\n") == \
        ["250 2.1.5", "250 2.1.5", "452 4.5.3", "354"]
    s.send("x\r\n.\r\n")
    assert len(s.queued[0].recipients) == 2


def test_error_limit_closes_with_421(tmp_path):
    s = greeted(tmp_path, limits={"errors": 3})
    out = s.send("FOO\r\nBAR\r\nBAZ\r\nNOOP\r\n")
    assert reply_codes(out) == ["500 5.5.1", "500 5.5.1", "500 5.5.1", "421 4.7.0"]
    assert s.closed


def test_command_timeout(tmp_path):
    s = greeted(tmp_path, limits={"command_timeout": "30s"})
    s.clock.advance(29)
    assert s.codes("NOOP\r\n") == ["250 2.0.0"]
    s.clock.advance(29)
    assert not s.closed
    s.clock.advance(2)
    assert s.take() == b"421 4.4.2 timeout exceeded, closing connection\r\n"
    assert s.closed


def test_data_timeout_drops_partial_message(tmp_path):
    s = greeted(tmp_path, limits={"data_timeout": "10s", "command_timeout": "1h"})
    s.send(TX + "DATA\r\npartial line\r\n")
    s.clock.advance(11)
    assert reply_codes(s.take()) == ["421 4.4.2"]
    s.protocol.connectionLost(None)
    assert not list((s.spool.root / "tmp").iterdir())
    assert not s.queued


def test_connection_limits(tmp_path):
    first = Server(tmp_path, limits={"connections_per_client": 2, "connections": 3})
    second = Server(tmp_path, factory=first.factory)
    third = Server(tmp_path, factory=first.factory)
    assert third.take() == b"421 4.7.0 too many connections from your address, try again later\r\n"
    assert third.closed
    other = Server(tmp_path, factory=first.factory, client="127.0.0.2")
    assert other.take().startswith(b"220 ")
    fourth = Server(tmp_path, factory=first.factory, client="127.0.0.3")
    assert fourth.take().startswith(b"421 4.7.0 too many connections")
    second.protocol.connectionLost(None)
    again = Server(tmp_path, factory=first.factory, client="127.0.0.3")
    assert again.take().startswith(b"220 ")


@pytest.mark.parametrize(("errno_", "code"), [(28, "452 4.3.1"), (122, "452 4.3.1"),
                                              (5, "451 4.3.0")])
def test_spool_failure_at_commit_and_nothing_kept(tmp_path, monkeypatch, errno_, code):
    # A small message meets the full disk only at commit, when its buffer is written:
    # a full disk (or quota) is 452 4.3.1 there too, like a large one's [RFC 3463 3.4].
    from twisted.logger import globalLogPublisher

    from mta.spool.store import Incoming
    s = greeted(tmp_path)
    s.send(TX + "DATA\r\n")

    def full(incoming):
        raise OSError(errno_, os.strerror(errno_))

    events = []
    globalLogPublisher.addObserver(events.append)
    monkeypatch.setattr(Incoming, "flush", full)
    try:
        assert s.codes("x\r\n.\r\n") == [code]
    finally:
        globalLogPublisher.removeObserver(events.append)
    monkeypatch.undo()
    assert not s.queued and not list((s.spool.root / "tmp").iterdir())
    assert s.codes("NOOP\r\n") == ["250 2.0.0"]
    # One clear line, no traceback.
    errors = [e for e in events if e.get("log_namespace") == "mta.smtpd"
              and e["log_level"].name in ("error", "critical")]
    assert len(errors) == 1 and "log_failure" not in errors[0]
    assert "spool cannot store it" in errors[0]["log_format"]


def test_recipients_past_the_limit_are_not_errors(tmp_path):
    # RFC 5321 4.5.3.1.10: 452 for RCPTs past the limit; the client delivers the
    # accepted ones and sends the rest later.  It must not cost the connection.
    s = greeted(tmp_path, limits={"recipients": 2, "errors": 3})
    s.send("MAIL FROM:<a@b.test>\r\n")
    codes = s.codes("RCPT TO:<alice@example.org>\r\n" * 2 + "RCPT TO:<bob@example.org>\r\n" * 5
                    + "DATA\r\n")
    assert codes == ["250 2.1.5"] * 2 + ["452 4.5.3"] * 5 + ["354"]
    assert s.codes("x\r\n.\r\n") == ["250 2.0.0"]
    assert not s.closed
    # The same recipient twice is one delivery (recipients are de-duplicated).
    assert [r.address for r in s.queued[0].recipients] == ["alice@example.org"]


@pytest.mark.parametrize("number", ["\u00b2", "\u0661\u0662", "\uff15"])
def test_non_ascii_digits_are_bad_syntax_not_a_crash(tmp_path, number):
    # str.isdigit() is true for these; int() refuses "²" and reads "١٢" as 12.
    s = greeted(tmp_path)
    assert s.codes(f"MAIL FROM:<a@b.test> SIZE={number}\r\n") == ["501 5.5.4"]
    s.send("MAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.org>\r\n")
    assert s.codes(f"BDAT {number}\r\n") == ["501 5.5.4"]
    assert s.codes("NOOP\r\n") == ["250 2.0.0"]


def test_committed_message_is_250_even_if_scheduling_fails(tmp_path):
    s = greeted(tmp_path)

    class Broken:
        def enqueue(self, envelope):
            raise RuntimeError("scheduler bug")

    s.factory.context.queue = Broken()
    s.send(TX + "DATA\r\n")
    assert s.codes("x\r\n.\r\nNOOP\r\n") == ["250 2.0.0", "250 2.0.0"]
    assert len(s.spool.queue_ids()) == 1


def test_the_250_is_written_before_the_message_is_logged_and_scheduled(tmp_path):
    from mta import maillog
    s = greeted(tmp_path)
    seen = []

    class Watching(list):
        def enqueue(self, envelope):
            seen.append(("enqueue", s.transport.value().count(b"250 2.0.0 OK queued")))
            self.append(envelope)

    s.factory.context.queue = Watching()
    real = maillog.received
    maillog.received = lambda *a: seen.append(("received", a[0]))
    try:
        s.send(TX + "DATA\r\n")
        assert s.codes("x\r\n.\r\n") == ["250 2.0.0"]
    finally:
        maillog.received = real
    queue_id = s.spool.queue_ids()[0]
    assert seen == [("received", queue_id), ("enqueue", 1)]


def test_a_message_committed_after_its_client_left_is_still_logged_and_queued(tmp_path):
    # The client hangs up while its message is being committed: it heard no 250 (it
    # sends the message again), but the committed one must not sit unscheduled.
    from twisted.internet import defer

    from mta import maillog
    s = greeted(tmp_path)
    pending = defer.Deferred()
    s.factory.context.run_blocking = lambda f, *a: pending.addCallback(lambda _: f(*a))
    s.send(TX + "DATA\r\n")
    assert s.send("x\r\n.\r\n") == b""
    s.protocol.connectionLost(None)
    logged = []
    real = maillog.received
    maillog.received = lambda *a: logged.append(a[0])
    try:
        pending.callback(None)
    finally:
        maillog.received = real
    assert s.take() == b""
    assert [e.queue_id for e in s.queued] == s.spool.queue_ids() == logged


def test_a_reply_that_fails_closes_instead_of_hanging(tmp_path):
    from twisted.internet import defer
    s = greeted(tmp_path)
    s.protocol.session.command = lambda line: defer.fail(RuntimeError("bug"))
    assert s.codes("NOOP\r\n") == ["421 4.3.0"]
    assert s.closed


@pytest.mark.parametrize("command", ["DATA\r\n", "BDAT 20200 LAST\r\n"])
def test_disk_full_while_receiving_is_452_after_the_body(tmp_path, monkeypatch, command):
    # A full disk shows while the body streams to tmp/: the body is still
    # read to its end, the answer is 452 4.3.1, and the session goes on.
    from mta.spool.store import Incoming
    s = greeted(tmp_path)
    real = Incoming.write

    def write(incoming, data):
        if incoming.size + len(data) > 1000:
            raise OSError(28, "No space left on device")
        real(incoming, data)

    monkeypatch.setattr(Incoming, "write", write)
    body = (b"x" * 99 + b"\r\n") * 200
    s.send(TX + command)
    tail = b".\r\n" if command.startswith("DATA") else b""
    assert s.codes(body + tail + b"NOOP\r\n") == ["452 4.3.1", "250 2.0.0"]
    monkeypatch.undo()
    assert not s.queued and not list((s.spool.root / "tmp").iterdir())
    assert s.codes(TX + "DATA\r\nok\r\n.\r\n")[-1] == "250 2.0.0"


def test_client_that_does_not_read_its_replies_is_not_read_either(tmp_path):
    # RFC 2920 lets a client pipeline; it does not let it make us buffer replies
    # without end.  When the transport's write buffer is full it pauses us (we
    # are its registered producer): we answer nothing more, and once 64 KiB of
    # commands wait unanswered we stop reading too.
    s = greeted(tmp_path)
    assert s.transport.producer is s.protocol and s.transport.streaming
    s.protocol.pauseProducing()  # what the transport does when its buffer is full
    assert s.send("NOOP\r\nHELP\r\n" + TX + "DATA\r\nx\r\n.\r\n") == b""
    assert s.transport.producerState == "producing"  # a little input is still read
    assert s.send("NOOP\r\n" * 11000) == b""
    assert s.transport.producerState == "paused"
    s.protocol.resumeProducing()  # the client read; the buffer drained
    assert s.transport.producerState == "producing"
    assert reply_codes(s.take()) == ["250 2.0.0", "214 2.0.0", "250 2.1.0", "250 2.1.5", "354",
                                     "250 2.0.0"] + ["250 2.0.0"] * 11000
    assert len(s.queued) == 1


def test_input_during_a_commit_waits_its_turn_and_is_bounded(tmp_path):
    from twisted.internet import defer
    s = greeted(tmp_path)
    pending = defer.Deferred()
    s.factory.context.run_blocking = lambda f, *a: pending.addCallback(lambda _: f(*a))
    s.send(TX + "DATA\r\nx\r\n.\r\nNOOP\r\n")
    # The commit is pending: a little input is still read, none of it answered.
    assert s.transport.producerState == "producing"
    assert s.send("NOOP\r\n" * 10) == b""
    assert s.send("NOOP\r\n" * 11000) == b""
    assert s.transport.producerState == "paused"  # 64 KiB wait unanswered: stop reading
    s.protocol.pauseProducing()
    s.protocol.resumeProducing()  # our replies drained, but the commit is still pending
    assert s.transport.producerState == "paused"
    pending.callback(None)
    assert reply_codes(s.take())[-11012:] == ["250 2.0.0"] * 11012  # the 250, then the NOOPs
    assert s.transport.producerState == "producing"


def test_closing_connection_whose_client_never_reads_is_aborted(tmp_path):
    s = greeted(tmp_path, limits={"command_timeout": "30s"})
    s.send("QUIT\r\n")
    assert s.closed and s.transport.producer is None
    s.clock.advance(31)  # the 221 was never read: the close did not finish
    assert s.transport.disconnected
