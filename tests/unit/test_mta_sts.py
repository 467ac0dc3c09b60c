"""MTA-STS (mta.delivery.mta_sts): the TXT record and the policy file as RFC 8461 3.1 and
3.2 write them, MX patterns [4.1], and the cache [3.3, 5.1] with a clock, a DNS answer
and a fetch that the tests control (the real HTTPS fetch is in test_mta_sts_fetch.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dns.exception
import dns.resolver
import pytest
from twisted.internet import defer, task
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from mta import config as config_mod
from mta.delivery import mta_sts
from mta.delivery.mta_sts import (
    MAX_AGE_LIMIT,
    FetchError,
    Policies,
    Policy,
    PolicyError,
    mx_matches,
    parse_policy,
    parse_txt,
    policy_domain,
)

GOOD = "version: STSv1\nmode: enforce\nmx: mx1.example.com\nmx: *.example.net\nmax_age: 86400\n"


# -- the TXT record [RFC 8461 3.1] -----------------------------------------------------

@pytest.mark.parametrize("records, expected", [
    (["v=STSv1; id=20160831085700Z;"], "20160831085700Z"),
    (["v=STSv1;id=abc"], "abc"),
    (["v=STSv1 ;\tid=abc ; "], "abc"),
    (["v=STSv1; id=abc; ext_1.x-y=some-value"], "abc"),  # extensions are ignored
    (["v=STSv1; ext=1; id=abc"], "abc"),  # the id need not come second
    (["v=spf1 -all", "v=STSv1; id=abc"], "abc"),  # other records are discarded
    (["v=STSv1; id=abc; id=def"], "abc"),  # the first one counts
    (["v=STSv1; id=" + "a" * 32], "a" * 32),
])
def test_txt_record_gives_the_policy_id(records: list[str], expected: str) -> None:
    assert parse_txt(records) == expected


@pytest.mark.parametrize("records", [
    [],
    ["v=spf1 -all"],
    ["v=STSv1; id=abc", "v=STSv1; id=def"],  # more than one: no policy
    ["v=STSv1"],  # no id
    ["v=STSv1; id="],
    ["v=STSv1; id=a-b"],  # ALPHA / DIGIT only
    ["v=STSv1; id=" + "a" * 33],  # at most 32
    ["v=STSv1; id=abc;; x=1"],  # an empty field
    ["v=STSv1; id=abc; bad field"],
    ["v=STSv1; id=abc; x=a=b"],  # "=" is not in sts-ext-value
    ["v=STSv2; id=abc"],
    ["V=STSv1; id=abc"],  # case-sensitive
    [" v=STSv1; id=abc"],
    ["v=STSv1x; id=abc"],
])
def test_txt_records_that_give_no_policy(records: list[str]) -> None:
    assert parse_txt(records) is None


# -- the policy file [RFC 8461 3.2] ------------------------------------------------------

def test_policy_fields() -> None:
    policy = parse_policy(GOOD)
    assert (policy.mode, policy.mx, policy.max_age) == \
        ("enforce", ("mx1.example.com", "*.example.net"), 86400)


@pytest.mark.parametrize("text", [
    GOOD.replace("\n", "\r\n"),  # CRLF
    GOOD.rstrip("\n"),  # no line end after the last field
    GOOD.replace("mode: enforce", "mode:enforce"),  # *WSP after the colon
    GOOD.replace("mode: enforce", "mode: \tenforce \t"),  # trailing blanks
    GOOD + "extension-field_1.x: any value; with = signs\n",  # unknown fields are ignored
    GOOD + "mode: testing\nmax_age: 5\nversion: STSv2\n",  # the first of each counts
    "\n" + GOOD + "\n\n",  # blank lines are passed over
    "\ufeff" + GOOD,  # and a byte order mark
    GOOD.replace("mx1.example.com", "MX1.Example.COM"),  # patterns are compared in lower case
])
def test_policy_variants_that_are_valid(text: str) -> None:
    policy = parse_policy(text)
    assert (policy.mode, policy.max_age) == ("enforce", 86400)
    assert policy.mx == ("mx1.example.com", "*.example.net")


@pytest.mark.parametrize("text, why", [
    ("", "no version"),
    (GOOD.replace("version: STSv1\n", ""), "no version"),
    (GOOD.replace("mode: enforce\n", ""), "no mode"),
    (GOOD.replace("max_age: 86400\n", ""), "no max_age"),
    (GOOD.replace("STSv1", "STSv2"), "is not STSv1"),
    (GOOD.replace("STSv1", "stsv1"), "is not STSv1"),
    (GOOD.replace("enforce", "Enforce"), "is not enforce"),
    (GOOD.replace("enforce", "reject"), "is not enforce"),
    (GOOD.replace("version:", "Version:"), "no version"),  # names are case-sensitive
    ("version: STSv1\nmode: enforce\nmax_age: 86400\n", "no mx field in mode enforce"),
    ("version: STSv1\nmode: testing\nmax_age: 86400\n", "no mx field in mode testing"),
    (GOOD + "this line has no colon\n", "line 6: not \"name: value\""),
    (GOOD + "mode : testing\n", "line 6"),  # no blank before the colon
    (GOOD + " mode: testing\n", "line 6"),  # nor before the name
    (GOOD + "_x: 1\n", "line 6"),  # a name starts with ALPHA / DIGIT
    (GOOD + "x" * 33 + ": 1\n", "line 6"),  # and has at most 32 characters
    (GOOD + "note:\n", "line 6: bad value"),  # an empty value
    (GOOD + "note: a\x00b\n", "line 6: bad value"),  # control characters
    (GOOD + "mx: *\n", "bad mx pattern"),
    (GOOD + "mx: mx.*.example.com\n", "bad mx pattern"),
    (GOOD + "mx: **.example.com\n", "bad mx pattern"),
    (GOOD + "mx: mx..example.com\n", "bad mx pattern"),
    (GOOD + "mx: -mx.example.com\n", "bad mx pattern"),
    (GOOD + "mx: mx.example.com.\n", "bad mx pattern"),
    (GOOD + "mx: [192.0.2.1]\n", "bad mx pattern"),
])
def test_bad_policies(text: str, why: str) -> None:
    with pytest.raises(PolicyError, match=why.replace("[", r"\[")):
        parse_policy(text)


def test_mode_none_needs_no_mx() -> None:
    policy = parse_policy("version: STSv1\nmode: none\nmax_age: 86400\n")
    assert (policy.mode, policy.mx) == ("none", ())


@pytest.mark.parametrize("value, seconds", [
    ("0", 0),
    ("86400", 86400),
    (str(MAX_AGE_LIMIT), MAX_AGE_LIMIT),
    (str(MAX_AGE_LIMIT + 1), MAX_AGE_LIMIT),  # more than a year counts as a year
    ("9999999999", MAX_AGE_LIMIT),  # ten digits: the grammar's most
    ("0000086400", 86400),
])
def test_max_age_limits(value: str, seconds: int) -> None:
    assert parse_policy(GOOD.replace("86400", value)).max_age == seconds


@pytest.mark.parametrize("value", ["10000000000", "-1", "+5", "1.5", "1e5", "86400s", "a"])
def test_bad_max_age(value: str) -> None:
    with pytest.raises(PolicyError, match="max_age"):
        parse_policy(GOOD.replace("86400", value))


# -- MX patterns [RFC 8461 4.1] ----------------------------------------------------------

@pytest.mark.parametrize("pattern, host, expected", [
    ("mx.example.com", "mx.example.com", True),
    ("mx.example.com", "MX.Example.Com.", True),  # case and the root dot do not count
    ("mx.example.com", "mx2.example.com", False),
    ("mx.example.com", "example.com", False),
    ("*.example.com", "mail.example.com", True),
    ("*.example.com", "MAIL.EXAMPLE.COM", True),
    ("*.example.com", "example.com", False),  # the wildcard is one whole label
    ("*.example.com", "foo.bar.example.com", False),  # and only one
    ("*.example.com", "mail.example.net", False),
    ("*.example.com", ".example.com", False),
    ("*.example.com", "mailexample.com", False),
])
def test_mx_patterns(pattern: str, host: str, expected: bool) -> None:
    assert mx_matches(pattern, host) is expected


def test_policy_matches_any_of_its_patterns() -> None:
    policy = parse_policy(GOOD)
    assert policy.matches("mx1.example.com") and policy.matches("a.example.net")
    assert not policy.matches("mx2.example.com")


def test_policy_domain_is_the_a_label() -> None:
    assert policy_domain("Example.COM.") == "example.com"
    assert policy_domain("b\u00fccher.example") == "xn--bcher-kva.example"
    assert policy_domain("[192.0.2.1]") is None
    assert policy_domain("../etc") is None


# -- the cache, with a fake resolver and fetch ---------------------------------------------

class _Record:
    def __init__(self, text: str) -> None:
        self.strings = [text.encode()]


class FakeDNS:
    """What dnspython's Resolver.resolve answers for _mta-sts TXT queries."""

    def __init__(self) -> None:
        self.txt: dict[str, list[str] | str] = {}
        self.queries: list[str] = []

    def resolve(self, name: str, rdtype: Any, search: bool = False) -> list[_Record]:
        self.queries.append(name)
        answer = self.txt.get(name)
        if answer is None:
            raise dns.resolver.NXDOMAIN()
        if answer == "TIMEOUT":
            raise dns.exception.Timeout()
        return [_Record(text) for text in answer]


class FakeMX:
    def __init__(self, dns_server: FakeDNS) -> None:
        self.resolver = dns_server


class Fetcher:
    """Answers fetches from `policies` (text) or `errors`; `pending` holds them back."""

    def __init__(self) -> None:
        self.policies: dict[str, str] = {}
        self.errors: dict[str, Exception] = {}
        self.calls: list[str] = []
        self.hold = False
        self.pending: list[tuple[defer.Deferred, str]] = []

    def __call__(self, domain: str) -> defer.Deferred:
        self.calls.append(domain)
        if self.hold:
            d: defer.Deferred = defer.Deferred()
            self.pending.append((d, domain))
            return d
        return self._answer(domain)

    def _answer(self, domain: str) -> defer.Deferred:
        if domain in self.errors:
            return defer.fail(self.errors[domain])
        return defer.maybeDeferred(parse_policy, self.policies[domain])

    def release(self) -> None:
        for d, domain in self.pending:
            self._answer(domain).chainDeferred(d)
        self.pending = []


class LogLines:
    def __init__(self) -> None:
        from twisted.logger import formatEvent
        self.lines: list[str] = []
        self.observer = lambda event: self.lines.append(formatEvent(event)) \
            if event.get("log_namespace") == "mta.sts" else None
        globalLogPublisher.addObserver(self.observer)

    def stop(self) -> None:
        globalLogPublisher.removeObserver(self.observer)

    def matching(self, text: str) -> list[str]:
        return [line for line in self.lines if text in line]


class World:
    def __init__(self, spool: Path) -> None:
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)
        self.config = config_mod.from_dict({"server": {"spool": str(spool)}})
        self.dns = FakeDNS()
        self.fetch = Fetcher()

    def policies(self) -> Policies:
        return Policies(self.config, self.clock, defer.maybeDeferred,
                        lambda: FakeMX(self.dns), fetch=self.fetch)

    def publish(self, domain: str, policy_id: str, text: str = GOOD) -> None:
        self.dns.txt[f"_mta-sts.{domain}"] = [f"v=STSv1; id={policy_id}"]
        self.fetch.policies[domain] = text


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path / "spool")


@pytest.fixture
def logged():
    lines = LogLines()
    yield lines
    lines.stop()


def result(d: defer.Deferred) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "no result yet"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def test_no_record_no_policy_and_the_answer_is_kept_a_while(world: World) -> None:
    policies = world.policies()
    assert result(policies.lookup("example.com")) is None
    assert result(policies.lookup("EXAMPLE.com.")) is None
    assert world.dns.queries == ["_mta-sts.example.com"]  # the second cost no lookup
    world.clock.advance(mta_sts.RECHECK + 1)
    assert result(policies.lookup("example.com")) is None
    assert len(world.dns.queries) == 2
    assert world.fetch.calls == []
    assert not (world.config.server.spool / "sts").exists()


def test_a_policy_is_fetched_stored_and_kept(world: World, logged: LogLines) -> None:
    world.publish("example.com", "1")
    policies = world.policies()
    policy = result(policies.lookup("example.com"))
    assert (policy.mode, policy.id, policy.fetched) == ("enforce", "1", world.clock.seconds())
    stored = json.loads((world.config.server.spool / "sts" / "example.com.json").read_text())
    assert stored == {"domain": "example.com", "id": "1", "fetched": world.clock.seconds(),
                      "mode": "enforce", "max_age": 86400,
                      "mx": ["mx1.example.com", "*.example.net"]}
    assert logged.matching("sts: example.com: policy id 1: mode enforce, max_age 86400, "
                           "mx mx1.example.com *.example.net")
    world.clock.advance(mta_sts.RECHECK + 1)
    assert result(policies.lookup("example.com")).id == "1"
    assert len(world.dns.queries) == 2
    assert world.fetch.calls == ["example.com"]  # the same id: no new fetch


def test_a_new_id_is_fetched(world: World, logged: LogLines) -> None:
    world.publish("example.com", "1")
    policies = world.policies()
    result(policies.lookup("example.com"))
    world.publish("example.com", "2", GOOD.replace("enforce", "testing"))
    world.clock.advance(mta_sts.RECHECK + 1)
    policy = result(policies.lookup("example.com"))
    assert (policy.id, policy.mode) == ("2", "testing")
    assert world.fetch.calls == ["example.com", "example.com"]
    assert logged.matching("policy id 2: mode testing")


def test_a_policy_near_its_end_is_fetched_again(world: World, logged: LogLines) -> None:
    world.publish("example.com", "1")
    policies = world.policies()
    result(policies.lookup("example.com"))
    world.clock.advance(86400 - 43200 + 1)  # less than half of max_age left
    policy = result(policies.lookup("example.com"))
    assert world.fetch.calls == ["example.com", "example.com"]
    assert policy.fetched == world.clock.seconds()
    assert len(logged.matching("policy id 1:")) == 1  # unchanged: not logged again


def test_a_failed_refresh_keeps_the_cached_policy(world: World, logged: LogLines) -> None:
    world.publish("example.com", "1")
    policies = world.policies()
    result(policies.lookup("example.com"))
    world.dns.txt["_mta-sts.example.com"] = ["v=STSv1; id=2"]
    world.fetch.errors["example.com"] = FetchError("127.0.0.1: connection refused\x1b[0m")
    for _ in range(3):
        world.clock.advance(mta_sts.RECHECK + 1)
        policy = result(policies.lookup("example.com"))
        assert (policy.id, policy.mode) == ("1", "enforce")
    assert len(world.fetch.calls) == 4  # tried again after each FETCH_RETRY
    (line,) = logged.matching("cannot fetch")  # once, made printable
    assert line == ("sts: example.com: cannot fetch policy id 2 from "
                    "https://mta-sts.example.com/.well-known/mta-sts.txt: 127.0.0.1: "
                    "connection refused?[0m; keeping policy id 1 (mode enforce) until it expires")


def test_a_failed_first_fetch_is_no_policy(world: World, logged: LogLines) -> None:
    world.publish("example.com", "1")
    world.fetch.errors["example.com"] = PolicyError("no mx field in mode enforce")
    policies = world.policies()
    assert result(policies.lookup("example.com")) is None
    assert logged.matching("cannot fetch policy id 1 from https://mta-sts.example.com/"
                           ".well-known/mta-sts.txt: no mx field in mode enforce; "
                           "delivering without MTA-STS")
    assert not (world.config.server.spool / "sts" / "example.com.json").exists()


def test_the_cache_survives_a_restart_without_the_record(world: World) -> None:
    world.publish("example.com", "1")
    result(world.policies().lookup("example.com"))
    del world.dns.txt["_mta-sts.example.com"]  # RFC 8461 3.3: the cache holds
    world.fetch.errors["example.com"] = FetchError("down")
    world.clock.advance(3600)
    policy = result(world.policies().lookup("example.com"))  # a new process
    assert (policy.id, policy.mode) == ("1", "enforce")
    assert world.fetch.calls == ["example.com"]


def test_the_cache_after_a_restart_with_the_same_id_needs_no_fetch(world: World) -> None:
    world.publish("example.com", "1")
    result(world.policies().lookup("example.com"))
    assert result(world.policies().lookup("example.com")).id == "1"
    assert world.fetch.calls == ["example.com"]


def test_an_expired_policy_is_dropped(world: World, logged: LogLines) -> None:
    world.publish("example.com", "1")
    policies = world.policies()
    result(policies.lookup("example.com"))
    del world.dns.txt["_mta-sts.example.com"]
    world.clock.advance(86400 + 1)
    assert result(policies.lookup("example.com")) is None
    assert logged.matching("sts: example.com: policy id 1 expired")
    assert not (world.config.server.spool / "sts" / "example.com.json").exists()


def test_mode_none_replaces_a_cached_policy(world: World) -> None:
    world.publish("example.com", "1")
    policies = world.policies()
    result(policies.lookup("example.com"))
    world.publish("example.com", "2", "version: STSv1\nmode: none\nmax_age: 86400\n")
    world.clock.advance(mta_sts.RECHECK + 1)
    assert result(policies.lookup("example.com")) is None
    assert result(world.policies().lookup("example.com")) is None  # stored as such


def test_a_dns_timeout_keeps_the_cached_policy(world: World, logged: LogLines) -> None:
    world.publish("example.com", "1")
    policies = world.policies()
    result(policies.lookup("example.com"))
    world.dns.txt["_mta-sts.example.com"] = "TIMEOUT"
    world.clock.advance(mta_sts.RECHECK + 1)
    assert result(policies.lookup("example.com")).id == "1"
    assert logged.matching("cannot look up _mta-sts.example.com now")


def test_lookups_under_way_share_one_discovery(world: World) -> None:
    world.publish("example.com", "1")
    world.fetch.hold = True
    policies = world.policies()
    first, second = policies.lookup("example.com"), policies.lookup("example.com")
    assert world.fetch.calls == ["example.com"]
    world.fetch.release()
    assert result(first).id == result(second).id == "1"


def test_max_age_zero_applies_once_and_is_not_kept(world: World) -> None:
    world.publish("example.com", "1", GOOD.replace("86400", "0"))
    policies = world.policies()
    assert result(policies.lookup("example.com")).id == "1"
    world.clock.advance(1)
    assert result(policies.lookup("example.com")) is None


def test_an_unreadable_cache_file_is_logged_and_skipped(world: World, logged: LogLines) -> None:
    directory = world.config.server.spool / "sts"
    directory.mkdir(parents=True)
    (directory / "example.com.json").write_text("{not json")
    assert result(world.policies().lookup("example.com")) is None
    assert logged.matching("sts: example.com: cannot read the cached policy")


def test_policies_hold_only_mode_and_patterns() -> None:
    policy = Policy("enforce", ("mx.example.com",), 10, "1", 5.0)
    assert policy.expires == 15.0
    assert policy.same_as(Policy("enforce", ("mx.example.com",), 10, "1", 99.0))
    assert not policy.same_as(Policy("enforce", ("mx.example.com",), 10, "2", 5.0))


def test_memory_stays_bounded(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mta_sts, "REMEMBERED", 3)
    world.publish("kept.test", "1")
    policies = world.policies()
    for name in ("kept.test", "a.test", "b.test", "c.test"):
        result(policies.lookup(name))
    world.clock.advance(mta_sts.RECHECK + 1)
    result(policies.lookup("d.test"))
    assert sorted(policies._known) == ["d.test", "kept.test"]  # a policy is never forgotten
