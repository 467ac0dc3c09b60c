"""The inbound check functions, driven directly (mta/checks/).

SPF, DKIM and DMARC ask a real DNS server on loopback (tests/dnsserver.py,
with a query log), through the resolver mta builds from its config, so the
lookups go exactly the way they go in the server.  DKIM signatures are made
with dkimpy and keys published in that DNS.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import dkim
import pytest
import spf as pyspf

from mta.checks import authresults, dkimverify, dmarc, psl, spf
from mta.checks.dkimverify import DKIMResult
from mta.checks.spf import SPFResult
from mta.config import DEBIAN_PUBLIC_SUFFIX_LIST
from mta.resolver import make_resolver
from tests.authpeers import LoopbackDNS, dkim_key, sign

CLIENT = "127.0.0.9"
KEY, KEY_RECORD = dkim_key()
OTHER_KEY, _ = dkim_key()

ZONE = {
    "good.test": {"TXT": ["v=spf1 ip4:127.0.0.9 -all"]},
    "xn--bcher-kva.test": {"TXT": ["v=spf1 ip4:127.0.0.9 -all"]},
    "mail.good.test": {"TXT": ["v=spf1 ip4:127.0.0.9 -all"]},
    "soft.test": {"TXT": ["v=spf1 ~all"]},
    "broken.test": "SERVFAIL",
    "helo.good.test": {"TXT": ["v=spf1 a:host.good.test -all"]},
    "host.good.test": {"A": ["127.0.0.9"]},
    "loop.test": {"TXT": ["v=spf1 include:loop.test -all"]},
    "s1._domainkey.good.test": {"TXT": [KEY_RECORD]},
    "s1._domainkey.badkey.test": {"TXT": ["v=DKIM1; k=rsa; p=not*base64"]},
    "s1._domainkey.revoked.test": {"TXT": ["v=DKIM1; k=rsa; p="]},
    "s1._domainkey.servfail.test": "SERVFAIL",
    "_dmarc.good.test": {"TXT": ["v=DMARC1; p=reject; rua=mailto:d@good.test"]},
    "_dmarc.org.test": {"TXT": ["v=DMARC1; p=reject; sp=quarantine; adkim=s; aspf=s"]},
    "_dmarc.sub.org.test": {"TXT": ["some other text"]},
    "_dmarc.half.test": {"TXT": ["v=DMARC1; p=reject; pct=50"]},
    "_dmarc.two.test": {"TXT": ["v=DMARC1; p=none", "v=DMARC1; p=reject"]},
    "_dmarc.servfail.test": "SERVFAIL",
    "_dmarc.nop.test": {"TXT": ["v=DMARC1; rua=mailto:r@nop.test"]},
    "_dmarc.junk.test": {"TXT": ["v=DMARC1; p=bogus"]},
}


@pytest.fixture(scope="module")
def dns_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackDNS]:
    server = LoopbackDNS(tmp_path_factory.mktemp("dns"), ZONE)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def resolver(dns_server: LoopbackDNS):
    return dns_server.resolver(timeout=2.0)


@pytest.fixture(scope="module")
def suffixes() -> psl.PublicSuffixList:
    return psl.load()


MESSAGE = (b"From: Alice <alice@good.test>\r\nTo: bob@example.org\r\nSubject: hello\r\n"
           b"Date: Tue, 01 Dec 2026 03:00:00 +0000\r\nMessage-ID: <1@good.test>\r\n\r\n"
           b"Hello Bob.\r\n")


# -- SPF ------------------------------------------------------------------------------------

def test_spf_results_come_from_our_resolver(resolver, dns_server: LoopbackDNS) -> None:
    assert spf.check(resolver, CLIENT, "alice@good.test", "client.test").result == "pass"
    assert "good.test TXT" in dns_server.queries()
    failed = spf.check(resolver, "127.0.0.10", "alice@good.test", "client.test")
    assert (failed.result, failed.identity, failed.domain) == ("fail", "mailfrom", "good.test")
    assert spf.check(resolver, CLIENT, "a@soft.test", "x").result == "softfail"
    assert spf.check(resolver, CLIENT, "a@unknown.test", "x").result == "none"
    assert spf.check(resolver, CLIENT, "a@loop.test", "x").result == "permerror"


def test_spf_of_an_smtputf8_sender_asks_for_the_a_label(resolver) -> None:
    result = spf.check(resolver, CLIENT, "jörg@bücher.test", "client.test")
    assert result.result == "pass"
    assert spf.check(resolver, CLIENT, "", "bücher.test").result == "pass"


def test_spf_servfail_is_temperror_not_a_guess(resolver) -> None:
    result = spf.check(resolver, CLIENT, "a@broken.test", "x")
    assert result.result == "temperror"


def test_spf_null_sender_checks_the_helo_identity(resolver) -> None:
    result = spf.check(resolver, CLIENT, "", "helo.good.test")
    assert (result.result, result.identity, result.sender) == \
        ("pass", "helo", "postmaster@helo.good.test")
    assert spf.check(resolver, "127.0.0.10", "", "helo.good.test").result == "fail"


def test_spf_follows_the_resolver_it_is_given(dns_server: LoopbackDNS) -> None:
    """A reload's new resolver reaches pyspf: a dead nameserver now means temperror."""
    dead = make_resolver([("127.0.0.1", 9)], 0.5)
    assert spf.check(dead, CLIENT, "alice@good.test", "x").result == "temperror"
    assert spf.check(dns_server.resolver(), CLIENT, "alice@good.test", "x").result == "pass"
    # pyspf's module-level lookup is ours; outside a check no resolver is set, and a
    # thread that calls pyspf on its own gets pyspf's own lookup.
    assert pyspf.DNSLookup is spf._lookup and spf._local.resolver is None


# -- DKIM -----------------------------------------------------------------------------------

def test_dkim_pass_and_its_properties(resolver) -> None:
    [result] = dkimverify.verify(resolver, sign(MESSAGE, "good.test", "s1", KEY))
    assert (result.result, result.domain, result.selector, result.algorithm) == \
        ("pass", "good.test", "s1", "rsa-sha256")
    assert len(result.signature) > 100


def test_dkim_a_changed_body_fails(resolver) -> None:
    signed = sign(MESSAGE, "good.test", "s1", KEY)
    [result] = dkimverify.verify(resolver, signed.replace(b"Hello Bob.", b"Hello Eve."))
    assert result.result == "fail"
    assert "body hash" in result.reason


def test_dkim_a_wrong_key_fails(resolver) -> None:
    [result] = dkimverify.verify(resolver, sign(MESSAGE, "good.test", "s1", OTHER_KEY))
    assert result.result == "fail"


def test_dkim_key_problems_are_permerror_and_dns_trouble_temperror(resolver) -> None:
    assert [r.result for r in dkimverify.verify(
        resolver, sign(MESSAGE, "nokey.test", "s1", KEY))] == ["permerror"]
    assert [r.result for r in dkimverify.verify(
        resolver, sign(MESSAGE, "badkey.test", "s1", KEY))] == ["permerror"]
    assert [r.result for r in dkimverify.verify(
        resolver, sign(MESSAGE, "revoked.test", "s1", KEY))] == ["permerror"]
    assert [r.result for r in dkimverify.verify(
        resolver, sign(MESSAGE, "servfail.test", "s1", KEY))] == ["temperror"]


def test_dkim_every_signature_is_verified(resolver) -> None:
    twice = sign(sign(MESSAGE, "good.test", "s1", KEY), "nokey.test", "s1", KEY)
    results = dkimverify.verify(resolver, twice)
    assert [(r.result, r.domain) for r in results] == \
        [("permerror", "nokey.test"), ("pass", "good.test")]
    assert dkimverify.verify(resolver, MESSAGE) == []


def test_dkim_checks_at_most_max_signatures(resolver, monkeypatch) -> None:
    """A pile of signatures cannot tie a thread up in key lookups: the first few count."""
    monkeypatch.setattr(dkimverify, "MAX_SIGNATURES", 2)
    message = sign(MESSAGE, "good.test", "s1", KEY)
    for i in range(3):
        message = sign(message, f"nokey{i}.test", "s1", KEY)
    results = dkimverify.verify(resolver, message)
    assert [(r.result, r.domain) for r in results] == [
        ("permerror", "nokey2.test"), ("permerror", "nokey1.test"), ("neutral", "")]
    assert results[-1].reason == "2 more signatures not checked: at most 2 a message"


def test_dkim_a_pile_of_signatures_is_one_line_of_our_header(resolver) -> None:
    """Thousands of signatures made thousands of header lines (600 KB for 5000)."""
    pile = b"".join(b"DKIM-Signature: v=1; a=rsa-sha256; d=x.test; s=s%d; h=from; bh=AA==; "
                    b"b=AAAA\r\n" % i for i in range(5000))
    results = dkimverify.verify(resolver, pile + MESSAGE)
    assert len(results) == dkimverify.MAX_SIGNATURES + 1
    field = authresults.field("mx.test", None, results, None)
    assert field.count(b"dkim=") == dkimverify.MAX_SIGNATURES + 1 and len(field) < 2000
    assert b"\tdkim=neutral (4992 more signatures not checked: at most 8 a message)\r\n" \
        in field


def test_dkim_one_lookup_per_key_name_and_a_time_budget(resolver, dns_server) -> None:
    """Many signatures naming one slow key wait for it once; a message's lookups stop
    when its budget of DNS timeouts is spent."""
    message = MESSAGE
    for _ in range(3):
        message = sign(message, "servfail.test", "s1", KEY)
    before = len(dns_server.queries())
    assert [r.result for r in dkimverify.verify(resolver, message)] == ["temperror"] * 3
    assert dns_server.queries()[before:] == ["s1._domainkey.servfail.test TXT"]
    times = iter([0.0, 0.0, 1e9, 1e9])  # the budget is spent after the first lookup
    message = sign(sign(MESSAGE, "good.test", "s1", KEY), "nokey.test", "s1", KEY)
    before = len(dns_server.queries())
    results = dkimverify.verify(resolver, message, clock=lambda: next(times))
    assert [r.result for r in results] == ["permerror", "temperror"]
    assert "lookups took 3 DNS timeouts already" in results[1].reason
    assert dns_server.queries()[before:] == ["s1._domainkey.nokey.test TXT"]


def test_dkim_rsa_sha1_is_not_verified(resolver, dns_server) -> None:
    """RFC 8301 3.1: rsa-sha1 MUST NOT be used for verifying."""
    signed = dkim.sign(MESSAGE, b"s1", b"good.test", KEY, signature_algorithm=b"rsa-sha1",
                       include_headers=[b"from"]) + MESSAGE
    before = len(dns_server.queries())
    [result] = dkimverify.verify(resolver, signed)
    assert (result.result, result.domain, result.algorithm) == ("policy", "good.test",
                                                                 "rsa-sha1")
    assert dns_server.queries()[before:] == []


def test_dkim_a_malformed_signature_is_neutral(resolver) -> None:
    broken = b"DKIM-Signature: v=1; a=rsa-sha256; d=good.test; s=s1\r\n" + MESSAGE
    [result] = dkimverify.verify(resolver, broken)
    assert (result.result, result.domain) == ("neutral", "good.test")


# -- the public suffix list -------------------------------------------------------------------

def test_organizational_domains() -> None:
    table = psl.PublicSuffixList.of_lines(["// comment", "com", "uk", "co.uk", "*.ck", "!www.ck",
                                           ""])
    assert table.organizational_domain("mail.example.com") == "example.com"
    assert table.organizational_domain("a.b.example.co.uk") == "example.co.uk"
    assert table.organizational_domain("co.uk") == "co.uk"
    assert table.organizational_domain("a.b.c.ck") == "b.c.ck"
    assert table.organizational_domain("a.www.ck") == "www.ck"
    assert table.organizational_domain("x.y.test") == "y.test"  # the implicit "*" rule
    assert table.organizational_domain("Mail.Example.COM.") == "example.com"


def test_the_shipped_list_and_debian_s(suffixes: psl.PublicSuffixList) -> None:
    debian = psl.load(Path(DEBIAN_PUBLIC_SUFFIX_LIST))
    for table in (suffixes, debian):
        assert table.organizational_domain("a.b.example.co.uk") == "example.co.uk"
        assert table.organizational_domain("mx.example.org") == "example.org"
        assert table.organizational_domain("mail.bücher.de") == "xn--bcher-kva.de"
        assert table.organizational_domain("co.uk") == "co.uk"


# -- DMARC ----------------------------------------------------------------------------------

def test_records() -> None:
    assert dmarc.parse_record("v=DMARC1; p=reject; sp=none; adkim=s; pct=20") == \
        dmarc.Record("reject", "none", "s", "r", 20)
    assert dmarc.parse_record("v=DMARC1;p=quarantine") == dmarc.Record("quarantine")
    assert dmarc.parse_record("p=reject; v=DMARC1") is None
    assert dmarc.parse_record("v=dmarc1; p=reject") is None
    assert dmarc.parse_record("v=DMARC1; p=bogus") is None
    assert dmarc.parse_record("v=DMARC1; p=bogus; rua=mailto:a@b") == dmarc.Record("none")
    assert dmarc.parse_record("v=DMARC1; p=reject; pct=x; adkim=q").pct == 100


def test_author_domains() -> None:
    assert dmarc.author_domains(["Alice <alice@Good.Test>"]) == ["good.test"]
    assert dmarc.author_domains(["a@x.test, b@y.test, c@x.test"]) == ["x.test", "y.test"]
    for fields in ([], ["a@x.test", "b@y.test"], ["undisclosed"], ["<@>"]):
        with pytest.raises(dmarc.NoAuthorDomain):
            dmarc.author_domains(fields)


def spf_pass(domain: str) -> SPFResult:
    return SPFResult("pass", "mailfrom", f"bounce@{domain}")


def dkim_pass(domain: str) -> DKIMResult:
    return DKIMResult("pass", domain, "s1", "rsa-sha256", "abcdefghij")


def test_dmarc_alignment(resolver, suffixes) -> None:
    def result(spf_result, dkim_results, domain="good.test"):
        return dmarc.evaluate(resolver, suffixes, domain, spf_result, dkim_results)
    assert result(spf_pass("good.test"), []).result == "pass"
    assert result(spf_pass("bounces.good.test"), []).result == "pass"  # relaxed
    assert result(None, [dkim_pass("mail.good.test")]).result == "pass"
    failed = result(spf_pass("other.test"), [dkim_pass("other.test")])
    assert (failed.result, failed.policy, failed.disposition) == ("fail", "reject", "reject")
    # Strict alignment at org.test: only the exact name counts.
    assert result(spf_pass("org.test"), [], "org.test").result == "pass"
    assert result(spf_pass("mail.org.test"), [], "org.test").result == "fail"


def test_dmarc_policy_discovery(resolver, suffixes) -> None:
    # sub.org.test publishes no DMARC record of its own: org.test's sp applies.
    found = dmarc.evaluate(resolver, suffixes, "sub.org.test", None, [])
    assert (found.result, found.policy) == ("fail", "quarantine")
    assert dmarc.evaluate(resolver, suffixes, "nothing.test", None, []).result == "none"
    assert dmarc.evaluate(resolver, suffixes, "two.test", None, []).result == "none"
    assert dmarc.evaluate(resolver, suffixes, "junk.test", None, []).result == "none"
    assert dmarc.evaluate(resolver, suffixes, "nop.test", None, []).policy == "none"
    temporary = dmarc.evaluate(resolver, suffixes, "servfail.test", None, [])
    assert (temporary.result, temporary.policy) == ("temperror", None)


def test_dmarc_aligned_temperror_is_not_a_fail(resolver, suffixes) -> None:
    dkim_temp = DKIMResult("temperror", "good.test", "s1", "rsa-sha256", "x")
    assert dmarc.evaluate(resolver, suffixes, "good.test", None, [dkim_temp]).result == \
        "temperror"
    spf_temp = SPFResult("temperror", "mailfrom", "a@good.test")
    assert dmarc.evaluate(resolver, suffixes, "good.test", spf_temp, []).result == "temperror"


def test_dmarc_pct_samples_failures(resolver, suffixes) -> None:
    chosen = dmarc.evaluate(resolver, suffixes, "half.test", None, [], chance=lambda: 0.2)
    spared = dmarc.evaluate(resolver, suffixes, "half.test", None, [], chance=lambda: 0.7)
    assert (chosen.disposition, spared.disposition) == ("reject", "quarantine")


def test_the_strictest_failure_decides() -> None:
    results = [dmarc.DMARCResult("pass", "a.test", "reject"),
               dmarc.DMARCResult("fail", "b.test", "quarantine", "quarantine"),
               dmarc.DMARCResult("fail", "c.test", "reject", "reject")]
    assert dmarc.strictest(results).domain == "c.test"


# -- Authentication-Results -------------------------------------------------------------------

def test_the_header_field() -> None:
    field = authresults.field(
        "mx.test", SPFResult("pass", "mailfrom", "alice@good.test"),
        [dkim_pass("good.test"), DKIMResult("fail", "x.test", "s", "rsa-sha256", "ZZZZ",
                                            "body hash (mismatch) \\ here")],
        [dmarc.DMARCResult("pass", "good.test", "reject", "none")])
    assert field == (
        b"Authentication-Results: mx.test;\r\n"
        b"\tspf=pass smtp.mailfrom=alice@good.test;\r\n"
        b"\tdkim=pass header.d=good.test header.a=rsa-sha256 header.s=s1 header.b=abcdefgh;\r\n"
        b"\tdkim=fail (body hash mismatch  here) header.d=x.test header.a=rsa-sha256 header.s=s"
        b" header.b=ZZZZ;\r\n"
        b"\tdmarc=pass (p=reject dis=none) header.from=good.test\r\n")


def test_the_header_field_for_odd_senders() -> None:
    helo = authresults.field("mx.test", SPFResult("none", "helo", "postmaster@h.test"), [], None)
    assert helo == b"Authentication-Results: mx.test;\r\n\tspf=none smtp.helo=h.test;\r\n" \
                   b"\tdkim=none\r\n"
    quoted = authresults.field("mx.test", SPFResult("pass", "mailfrom", '"a;b c"@x.test'),
                               None, None)
    assert b"smtp.mailfrom=x.test\r\n" in quoted


def test_authserv_ids() -> None:
    assert authresults.authserv_id_of(" mx.test; spf=pass") == "mx.test"
    assert authresults.authserv_id_of("MX.Test.;dkim=pass") == "mx.test"
    assert authresults.authserv_id_of(" (comment (nested)) mx.test 1; none") == "mx.test"
    assert authresults.authserv_id_of('"mx.test"; none') == "mx.test"
    assert authresults.authserv_id_of("") == ""
    assert authresults.authserv_id_of("(unclosed mx.test; none") == ""


@pytest.mark.parametrize("after", ["\x00", "\x00x", "\x1b", "\x7f", "/1", ",x", "=x", "@x"])
def test_our_name_followed_by_a_control_or_special_character_is_ours(after: str) -> None:
    """A token ends at a CTL or tspecial [RFC 2045 5.1, RFC 8601 2.2]: a reader that stops
    at a NUL (a C string) sees our name in "mx.test\\0; dmarc=pass", so it is ours."""
    assert authresults.authserv_id_of(f"mx.test{after}; dmarc=pass") == "mx.test"
    assert authresults.authserv_id_of(f"mx.test.example{after}; dmarc=pass") == \
        "mx.test.example"


def test_the_log_summary() -> None:
    line = authresults.summary(SPFResult("pass", "mailfrom", "a@x.test"),
                               [dkim_pass("x.test")],
                               [dmarc.DMARCResult("fail", "y.test", "reject", "reject")])
    assert line == ("spf=pass smtp.mailfrom=a@x.test dkim=pass header.d=x.test header.s=s1 "
                    "dmarc=fail header.from=y.test policy=reject disposition=reject")


# -- the header filter (cleanup.py) ---------------------------------------------------------------

class Sink:
    """What a spool Incoming offers the filter: write() and size."""

    def __init__(self) -> None:
        self.data = b""
        self.size = 0
        self.queue_id = "Q"

    def write(self, data: bytes) -> None:
        self.data += data
        self.size += len(data)


FORGED = (b"Authentication-Results: mx.test; spf=pass smtp.mailfrom=ceo@bank.test\r\n"
          b"AUTHENTICATION-RESULTS:\r\n  MX.TEST;\r\n\tdkim=pass header.d=bank.test\r\n"
          b"authentication-results: (we checked) mx.test.; dmarc=pass\r\n"
          b"Authentication-Results: other.test; spf=fail\r\n"
          b"From: CEO\r\n <ceo@bank.test>\r\n"
          b"DKIM-Signature: v=1; d=bank.test\r\n"
          b"Subject: pay now\r\n\r\n"
          b"Authentication-Results: mx.test; this is the body\r\n")
FILTERED = (b"Authentication-Results: other.test; spf=fail\r\n"
            b"From: CEO\r\n <ceo@bank.test>\r\n"
            b"DKIM-Signature: v=1; d=bank.test\r\n"
            b"Subject: pay now\r\n\r\n"
            b"Authentication-Results: mx.test; this is the body\r\n")


@pytest.mark.parametrize("chunk", [1, 7, 64, len(FORGED)])
def test_forged_results_claiming_our_name_are_left_out(chunk: int) -> None:
    from mta.server.cleanup import ResultsFilter
    sink = Sink()
    headers = ResultsFilter(sink, "MX.test")
    for i in range(0, len(FORGED), chunk):
        headers.write(FORGED[i:i + chunk])
    headers.finish()
    assert sink.data == FILTERED
    assert (headers.removed, headers.from_fields, headers.from_count, headers.signatures) == \
        (3, ["CEO <ceo@bank.test>"], 1, 1)
    assert headers.size == len(FORGED)  # the size limit counts what the client sent


def test_a_message_that_is_all_header_is_filtered_too() -> None:
    from mta.server.cleanup import ResultsFilter
    sink = Sink()
    headers = ResultsFilter(sink, "mx.test")
    headers.write(b"From: a@x.test\r\nAuthentication-Results: mx.test; none")
    headers.finish()
    assert sink.data == b"From: a@x.test\r\n"


HIDDEN = (b"From evil@bank.test Mon Nov 30 12:00:00 2026\r\n"
          b"Authentication-Results: mx.test; dmarc=pass header.from=bank.test\r\n"
          b"Subject: pay now\r\n"
          b"this line is no field\r\n"
          b"Authentication-Results: mx.test; dkim=pass header.d=bank.test\r\n"
          b"  folded on\r\n"
          b"From: <ceo@bank.test>\r\n"
          b"\r\n"
          b"Authentication-Results: mx.test; the body is not looked at\r\n")


@pytest.mark.parametrize("chunk", [1, 5, len(HIDDEN)])
def test_forged_results_behind_a_line_of_text_are_left_out_too(chunk: int) -> None:
    """Dovecot reads fields on past a line that is none (and Python's email past a
    misplaced "From " line): a forged field hidden behind one must go all the same."""
    import email

    from mta.server.cleanup import ResultsFilter
    sink = Sink()
    headers = ResultsFilter(sink, "mx.test")
    for i in range(0, len(HIDDEN), chunk):
        headers.write(HIDDEN[i:i + chunk])
    headers.finish()
    assert sink.data == (b"From evil@bank.test Mon Nov 30 12:00:00 2026\r\n"
                         b"Subject: pay now\r\n"
                         b"this line is no field\r\n"
                         b"From: <ceo@bank.test>\r\n"
                         b"\r\n"
                         b"Authentication-Results: mx.test; the body is not looked at\r\n")
    assert (headers.removed, headers.from_count) == (2, 1)
    # As a reader of the stored message sees it (our own field goes in front).
    stored = email.message_from_bytes(b"Authentication-Results: mx.test; none\r\n"
                                      b"Received: by mx.test\r\n" + sink.data)
    assert stored.get_all("Authentication-Results") == ["mx.test; none"]


def test_a_long_line_of_text_in_the_header_is_passed_on() -> None:
    from mta.server.cleanup import FIELD_LIMIT, ResultsFilter
    sink = Sink()
    headers = ResultsFilter(sink, "mx.test")
    text = b"Subject: ok\r\n" + b"t" * (2 * FIELD_LIMIT) + b"\r\n\tfolded\r\n"
    headers.write(text[:FIELD_LIMIT + 100])
    headers.write(text[FIELD_LIMIT + 100:])
    headers.write(b"Authentication-Results: mx.test; dkim=pass\r\nTo: b\r\n\r\nbody\r\n")
    headers.finish()
    assert sink.data == text + b"To: b\r\n\r\nbody\r\n"


def test_an_endless_header_line_is_decided_without_holding_it() -> None:
    """BDAT has no line limit: a field longer than FIELD_LIMIT is decided on its start."""
    from mta.server.cleanup import FIELD_LIMIT, ResultsFilter
    sink = Sink()
    headers = ResultsFilter(sink, "mx.test")
    headers.write(b"Subject: ok\r\nAuthentication-Results: mx.test; " + b"x" * FIELD_LIMIT)
    for _ in range(10):
        headers.write(b"y" * FIELD_LIMIT)
        assert len(headers.pending) + len(headers.field) <= FIELD_LIMIT
    headers.write(b"\r\n\tmore\r\nX-Long: " + b"z" * (2 * FIELD_LIMIT) + b"\r\nTo: b\r\n\r\nbody\r\n")
    headers.finish()
    assert sink.data == (b"Subject: ok\r\nX-Long: " + b"z" * (2 * FIELD_LIMIT)
                         + b"\r\nTo: b\r\n\r\nbody\r\n")


# -- [checks] in the config ----------------------------------------------------------------------

def test_checks_config_defaults_and_errors(tmp_path: Path) -> None:
    from mta.config import ConfigError, from_dict
    section = from_dict({}).checks
    assert (section.spf, section.dkim, section.dmarc, section.quarantine_header,
            section.threads) == ("record", "record", "record", "X-Quarantine", 10)
    assert section.enabled and not from_dict(
        {"checks": {"spf": "off", "dkim": "off", "dmarc": "off"}}).checks.enabled
    for checks, error in [
            ({"spf": "hard"}, ("[checks] spf: expected one of off, record, reject, "
                               "reject-after-data; got 'hard'")),
            ({"dmarc": "reject"}, "[checks] dmarc: expected one of off, record, enforce"),
            ({"dkim": "off"}, "[checks] dkim: dmarc = \"record\" needs dkim results"),
            ({"spf": "off", "dmarc": "enforce"}, "[checks] spf: dmarc = \"enforce\" needs spf"),
            ({"quarantine_header": "X Bad"}, "[checks] quarantine_header: not a header field"),
            ({"threads": 0}, "[checks] threads: must be at least 1"),
            ({"public_suffix_list": str(tmp_path / "none.dat")},
             "[checks] public_suffix_list: no such file"),
            ({"spam": True}, "[checks] spam: unknown key")]:
        with pytest.raises(ConfigError) as e:
            from_dict({"checks": checks}, "mta.toml")
        assert str(e.value).startswith(f"mta.toml: {error}"), str(e.value)
    # Without DMARC, the list is not needed.
    assert from_dict({"checks": {"dmarc": "off",
                                 "public_suffix_list": str(tmp_path / "none.dat")}}).checks


def test_the_documented_config_loads_with_these_keys() -> None:
    from mta.config import load
    repo = Path(__file__).resolve().parents[2]
    section = load(repo / "etc" / "mta.toml", check_files=False).checks
    assert (section.spf, section.dkim, section.dmarc) == ("record", "record", "record")


def test_a_reload_resizes_the_pool_and_renews_the_resolver() -> None:
    from mta.checks.inbound import InboundChecks
    from mta.config import from_dict
    old = from_dict({"relay": {"nameservers": ["127.0.0.1:5300"]}})
    new = from_dict({"relay": {"nameservers": ["127.0.0.1:5301"], "dns_timeout": "3s"},
                     "checks": {"threads": 3}})
    checks = InboundChecks(None, old.checks.threads)
    assert checks.resolver(old) is checks.resolver(old)
    assert checks.pool.max == 10
    checks.reconfigure(new)
    resolver = checks.resolver(new)
    assert checks.pool.max == 3
    assert (resolver.nameservers[0].port, resolver.lifetime) == (5301, 3.0)
