"""The inbound checks in SMTP dialogs (session.py + mta/checks/inbound.py).

The server runs on an in-memory transport; its checks run at once in the
test's thread (an `InboundChecks` whose `run` does not hop) and ask a real
DNS server on loopback with a query log.  Only 127.0.0.1 is in mynetworks;
a client at 127.0.0.9 stands for the internet.  The real server, with
swaks, is in tests/integration/test_checks.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet import defer

from mta import maillog
from mta.checks.inbound import InboundChecks, MessageChecks, SessionChecks
from mta.checks.spf import SPFResult
from mta.server.context import ServerContext
from mta.server.protocol import SMTPFactory
from mta.spool.store import Spool
from tests.authpeers import LoopbackDNS, dkim_key, sign
from tests.protocol.dialog import ListQueue, Server, make_config

OUTSIDE = "127.0.0.9"
KEY, KEY_RECORD = dkim_key()
ZONE = {
    "good.test": {"TXT": ["v=spf1 ip4:127.0.0.9 -all"]},
    "s1._domainkey.good.test": {"TXT": [KEY_RECORD]},
    "_dmarc.good.test": {"TXT": ["v=DMARC1; p=reject"]},
    "bank.test": {"TXT": ["v=spf1 ip4:192.0.2.1 -all"]},
    "_dmarc.bank.test": {"TXT": ["v=DMARC1; p=reject"]},
    "shop.test": {"TXT": ["v=spf1 ip4:192.0.2.1 -all"]},
    "_dmarc.shop.test": {"TXT": ["v=DMARC1; p=quarantine"]},
    "lists.test": {"TXT": ["v=spf1 ip4:192.0.2.1 -all"]},
    "broken.test": "SERVFAIL",
    "_dmarc.flaky.test": "SERVFAIL",
    "flaky.test": {"TXT": ["v=spf1 ip4:127.0.0.9 -all"]},
}


@pytest.fixture(scope="module")
def dns_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackDNS]:
    server = LoopbackDNS(tmp_path_factory.mktemp("dns"), ZONE)
    yield server
    server.stop()


def message(sender_domain: str, subject: str = "hello", extra: bytes = b"") -> bytes:
    return (f"From: <someone@{sender_domain}>\r\nTo: <alice@example.org>\r\n"
            f"Subject: {subject}\r\nDate: Tue, 01 Dec 2026 03:00:00 +0000\r\n"
            f"Message-ID: <{subject}@{sender_domain}>\r\n").encode() + extra + \
        b"\r\nHello.\r\n"


@pytest.fixture
def server(tmp_path: Path, dns_server: LoopbackDNS):
    def start(client: str = OUTSIDE, **checks: str) -> Server:
        config = make_config(tmp_path, relay={"mynetworks": ["127.0.0.1/32"],
                                              "nameservers": [dns_server.nameserver],
                                              "dns_timeout": "2s"},
                             checks=checks)
        inbound = InboundChecks(None, 2, run=lambda f, *a: defer.maybeDeferred(f, *a),
                                chance=lambda: 0.0)
        context = ServerContext(config, config.listeners[0], Spool(config.server.spool),
                                queue=ListQueue(), clock=lambda: 1_800_000_000.0,
                                run_blocking=lambda f, *a: defer.maybeDeferred(f, *a),
                                checks=inbound)
        return Server(tmp_path, client=client, factory=SMTPFactory(context))
    return start


def send(s: Server, sender: str, data: bytes, expect_mail: str = "250 2.1.0") -> str:
    """One transaction with DATA; the last reply's code."""
    assert s.codes("EHLO client.test\r\n")[-1] == "250"
    assert s.codes(f"MAIL FROM:<{sender}>\r\n") == [expect_mail]
    if not expect_mail.startswith("250"):
        return expect_mail
    assert s.codes("RCPT TO:<alice@example.org>\r\n") == ["250 2.1.5"]
    assert s.codes("DATA\r\n") == ["354"]
    return s.codes(data.replace(b"\r\n.", b"\r\n..") + b".\r\n")[-1]


def stored(s: Server) -> bytes:
    spool = s.factory.context.spool
    [queue_id] = spool.queue_ids()
    return spool.message_data(queue_id).read_bytes()


def test_signed_mail_from_a_permitted_address_passes(server) -> None:
    s = server()
    data = sign(message("good.test"), "good.test", "s1", KEY)
    assert send(s, "alice@good.test", data) == "250 2.0.0"
    text = stored(s)
    assert text.startswith(b"Authentication-Results: mx.test;\r\n"
                           b"\tspf=pass smtp.mailfrom=alice@good.test;\r\n"
                           b"\tdkim=pass header.d=good.test header.a=rsa-sha256 header.s=s1 ")
    assert b"\tdmarc=pass (p=reject dis=none) header.from=good.test\r\nReceived: " in text
    assert text.endswith(data)


def test_forged_mail_is_recorded_by_default(server, monkeypatch) -> None:
    logged = []
    monkeypatch.setattr(maillog, "checked", lambda *args: logged.append(args))
    s = server()
    data = sign(message("bank.test"), "bank.test", "s1", KEY)  # no key published for bank.test
    assert send(s, "ceo@bank.test", data) == "250 2.0.0"
    text = stored(s)
    assert b"\tspf=fail" in text and b"\tdkim=permerror" in text
    assert b"\tdmarc=fail (p=reject dis=none) header.from=bank.test\r\n" in text
    # What the log line and the metrics get: the same verdicts.
    [(_, summary, results)] = logged
    assert results == (("spf", "fail"), ("dkim", "permerror"), ("dmarc", "fail"))
    assert summary.startswith("spf=fail smtp.mailfrom=ceo@bank.test dkim=permerror")


def test_dmarc_enforce_refuses_p_reject_failures(server) -> None:
    s = server(dmarc="enforce")
    assert send(s, "ceo@bank.test", message("bank.test")) == "550 5.7.1"
    assert s.factory.context.spool.queue_ids() == []
    out = s.send("QUIT\r\n")
    assert out.startswith(b"221")


def test_dmarc_enforce_marks_p_quarantine_failures(server) -> None:
    s = server(dmarc="enforce", quarantine_header="X-Spam-Flag-DMARC")
    assert send(s, "sales@shop.test", message("shop.test")) == "250 2.0.0"
    text = stored(s)
    assert b"\r\nX-Spam-Flag-DMARC: dmarc header.from=shop.test p=quarantine\r\n" in text
    assert b"dmarc=fail (p=quarantine dis=quarantine)" in text


def test_spf_reject_refuses_at_mail(server) -> None:
    s = server(spf="reject")
    assert send(s, "ceo@bank.test", b"", expect_mail="550 5.7.23") == "550 5.7.23"
    assert send(s, "x@broken.test", b"", expect_mail="451 4.7.24") == "451 4.7.24"
    # A permitted sender goes on as usual in the same session.
    assert send(s, "alice@good.test", message("good.test")) == "250 2.0.0"


def test_spf_reject_after_data_weighs_dkim_first(server) -> None:
    """A forwarder breaks SPF, not an aligned DKIM signature: DMARC passes, mail goes in."""
    s = server(spf="reject-after-data")
    forwarded = sign(message("good.test"), "good.test", "s1", KEY)
    assert send(s, "alice@good.test", forwarded) == "250 2.0.0"  # SPF passes anyway
    assert send(s, "bounce@lists.test", forwarded) == "250 2.0.0"  # SPF fails, DKIM aligned
    assert send(s, "bounce@lists.test", message("lists.test")) == "550 5.7.23"
    assert send(s, "bounce@broken.test", message("lists.test")) == "451 4.7.24"


def test_servfail_on_the_policy_is_temperror_or_451(server) -> None:
    s = server()
    assert send(s, "a@flaky.test", message("flaky.test")) == "250 2.0.0"
    assert b"\tdmarc=temperror" in stored(s)
    s = server(dmarc="enforce")
    assert send(s, "a@flaky.test", message("flaky.test")) == "451 4.7.1"


def test_enforce_refuses_a_message_without_one_author(server) -> None:
    s = server(dmarc="enforce")
    twice = message("good.test", extra=b"From: <other@bank.test>\r\n")
    assert send(s, "alice@good.test", twice) == "550 5.7.1"


def test_bdat_is_checked_as_data_is(server) -> None:
    s = server(dmarc="enforce")
    data = b"Authentication-Results: mx.test; dmarc=pass\r\n" + message("bank.test")
    assert s.codes("EHLO client.test\r\n")[-1] == "250"
    assert s.codes("MAIL FROM:<ceo@bank.test>\r\nRCPT TO:<alice@example.org>\r\n") == \
        ["250 2.1.0", "250 2.1.5"]
    assert s.codes(f"BDAT {len(data)} LAST\r\n".encode() + data) == ["550 5.7.1"]


def test_trusted_clients_cost_no_lookup(server, dns_server: LoopbackDNS) -> None:
    before = len(dns_server.queries())
    s = server(client="127.0.0.1")  # in mynetworks
    data = message("bank.test")
    assert send(s, "ceo@bank.test", data) == "250 2.0.0"
    text = stored(s)
    assert b"Authentication-Results" not in text and text.endswith(data)
    assert dns_server.queries()[before:] == []
    # The same mail from outside is looked up: the log above could have shown it.
    assert send(server(), "ceo@bank.test", data) == "250 2.0.0"
    assert "bank.test TXT" in dns_server.queries()[before:]


def test_one_spf_check_for_a_session_that_repeats_itself(server, dns_server) -> None:
    s = server()
    before = len(dns_server.queries())
    assert s.codes("EHLO client.test\r\n")[-1] == "250"
    for _ in range(5):
        assert s.codes("MAIL FROM:<alice@good.test>\r\nRSET\r\n") == ["250 2.1.0", "250 2.0.0"]
    assert dns_server.queries()[before:] == ["good.test TXT"]


def test_a_client_that_changes_sender_in_a_loop_queues_no_lookups() -> None:
    """Each MAIL with a new sender starts an SPF check; one runs at a time per session,
    and those the client moved on from before their turn are never run."""
    started: list[str] = []
    pending: list[defer.Deferred] = []

    def start(sender: str):
        def go() -> defer.Deferred:
            started.append(sender)
            pending.append(defer.Deferred())
            return pending[-1]
        return go
    state = SessionChecks()
    first = state.spf(("a@x.test", "h"), start("a@x.test"))
    for n in range(100):
        state.spf((f"n{n}@x.test", "h"), start(f"n{n}@x.test"))
    last = state.spf(("z@x.test", "h"), start("z@x.test"))
    wanted = last.get()
    assert started == ["a@x.test"]  # the rest wait their turn
    pending[0].callback(SPFResult("pass", "mailfrom", "a@x.test"))
    assert started == ["a@x.test", "z@x.test"]  # the 100 in between are skipped
    pending[1].callback(SPFResult("fail", "mailfrom", "z@x.test"))
    assert first.result.result == "pass" and wanted.result.result == "fail"
    state.spf(("b@x.test", "h"), start("b@x.test"))
    state.spf(("gone@x.test", "h"), start("gone@x.test"))
    state.close()  # the connection is lost while b is checked and "gone" waits
    pending[2].callback(SPFResult("pass", "mailfrom", "b@x.test"))
    assert started == ["a@x.test", "z@x.test", "b@x.test"]


def test_a_client_that_leaves_while_its_message_is_checked_gets_nothing_stored(server) -> None:
    """It was never answered, so it sends the message again: storing this copy would
    deliver it twice."""
    s = server()
    held: list[tuple] = []

    def later(function, *args) -> defer.Deferred:
        held.append((function, args, defer.Deferred()))
        return held[-1][2]
    s.factory.context.checks._run = later
    data = sign(message("good.test"), "good.test", "s1", KEY)
    assert s.codes("EHLO client.test\r\n")[-1] == "250"
    assert s.codes("MAIL FROM:<alice@good.test>\r\nRCPT TO:<alice@example.org>\r\n"
                   "DATA\r\n") == ["250 2.1.0", "250 2.1.5", "354"]
    assert s.codes(data + b".\r\n") == []  # the checks are under way
    s.protocol.connectionLost()
    while held:  # SPF, then DKIM and DMARC
        function, args, d = held.pop(0)
        d.callback(function(*args))
    spool = s.factory.context.spool
    assert spool.queue_ids() == [] and s.factory.context.queue == []
    assert not list((Path(s.factory.context.config.server.spool) / "tmp").iterdir())


def test_a_from_field_too_long_to_read_whole_is_not_judged_by_its_start(server) -> None:
    """Past FIELD_LIMIT a field is decided on its start: a From: padded with 64 KiB of
    the sender's own addresses hid a p=reject domain behind them, and DMARC passed
    judgement on the start alone (dmarc=none, accepted under enforce)."""
    padding = b"".join(b"\r\n " + b", ".join([b"x@good.test"] * 70) + b"," for _ in range(80))
    data = b"From: x@good.test," + padding + b"\r\n ceo@bank.test\r\nSubject: pay\r\n\r\nHi\r\n"
    assert send(server(dmarc="enforce"), "alice@good.test", data) == "550 5.7.1"
    s = server()
    assert send(s, "alice@good.test", data) == "250 2.0.0"
    assert b"\tdmarc=permerror (From: field longer than 65536 octets)\r\n" in stored(s)


def test_dmarc_lookups_of_many_from_domains_share_one_time_budget(tmp_path, dns_server) -> None:
    """A From: naming several domains cannot hold a checking thread for a timeout each:
    once the budget is spent, the rest are temperror without a lookup."""
    config = make_config(tmp_path, relay={"nameservers": [dns_server.nameserver],
                                          "dns_timeout": "2s"}, checks={})
    ticks = iter([0.0, 0.0, 1000.0, 1000.0])  # the second domain starts after the budget
    inbound = InboundChecks(None, 1, run=lambda f, *a: defer.Deferred(),
                            clock=lambda: next(ticks))
    message = MessageChecks(inbound, config, SessionChecks(), OUTSIDE, "client.test",
                            "a@good.test")
    results = message._dmarc(None, [], ["<a@good.test>, <b@bank.test>, <c@shop.test>"], 1)
    assert [(r.result, r.domain) for r in results] == [
        ("fail", "good.test"), ("temperror", "bank.test"), ("temperror", "shop.test")]
    assert results[1].reason == "not looked up: the DNS time budget is spent"
