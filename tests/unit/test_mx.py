"""MX resolution rules [RFC 5321 5.1, RFC 7505] against a scripted resolver."""

from __future__ import annotations

import random

import dns.exception
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import pytest

from mta import config as config_mod
from mta.delivery.mx import MXHost, MXResolver, listening_addresses, order_mx
from mta.delivery.outcome import DeliveryError


class FakeResolver:
    """Answers from a dict {(name, type): [rdata text] | exception instance}."""

    def __init__(self, zone: dict[tuple[str, str], object]) -> None:
        self.zone = zone
        self.asked: list[tuple[str, str]] = []

    def resolve(self, name: str, rdtype: str, search: bool = False) -> list:
        self.asked.append((name, rdtype))
        answer = self.zone.get((name, rdtype))
        if answer is None:
            if any(n == name for n, _ in self.zone):
                raise dns.resolver.NoAnswer()
            raise dns.resolver.NXDOMAIN()
        if isinstance(answer, Exception):
            raise answer
        return [dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.from_text(rdtype), text)
                for text in answer]


def resolver(zone: dict, hostname: str = "mx.local.test", addresses: frozenset[str] = frozenset(),
             seed: int = 1) -> MXResolver:
    return MXResolver(FakeResolver(zone), hostname, addresses, False, random.Random(seed))


BASIC = {
    ("example.test", "MX"): ["20 mx2.example.test.", "10 mx1.example.test."],
    ("mx1.example.test", "A"): ["127.0.0.2"],
    ("mx2.example.test", "A"): ["127.0.0.3", "127.0.0.4"],
    ("mx2.example.test", "AAAA"): ["::1"],
}


def test_order_mx_sorts_by_preference_and_shuffles_ties() -> None:
    records = [(20, "c"), (10, "a"), (10, "b"), (30, "d")]
    seen = set()
    for seed in range(40):
        ordered = order_mx(records, random.Random(seed))
        assert [p for p, _ in ordered] == [10, 10, 20, 30]
        assert {h for _, h in ordered[:2]} == {"a", "b"}
        seen.add(tuple(h for _, h in ordered[:2]))
    assert seen == {("a", "b"), ("b", "a")}  # both orders occur


def test_mx_hosts_in_preference_order_with_all_addresses() -> None:
    hosts = resolver(BASIC).resolve("Example.TEST.")
    assert hosts == [
        MXHost("mx1.example.test", 10, ("127.0.0.2",)),
        MXHost("mx2.example.test", 20, ("127.0.0.3", "127.0.0.4", "::1")),
    ]


def test_implicit_mx_uses_the_domain_addresses() -> None:
    zone = {("plain.test", "A"): ["127.0.0.5"], ("plain.test", "TXT"): ['"x"']}
    assert resolver(zone).resolve("plain.test") == [MXHost("plain.test", 0, ("127.0.0.5",))]


def test_domain_without_mx_or_address_is_permanent() -> None:
    zone = {("empty.test", "TXT"): ['"x"']}
    with pytest.raises(DeliveryError) as e:
        resolver(zone).resolve("empty.test")
    assert e.value.status == "5.1.2"


def test_null_mx_is_permanent_5_1_10() -> None:
    zone = {("nullmx.test", "MX"): ["0 ."]}
    with pytest.raises(DeliveryError) as e:
        resolver(zone).resolve("nullmx.test")
    assert e.value.status == "5.1.10"


def test_nxdomain_is_permanent_5_1_2() -> None:
    with pytest.raises(DeliveryError) as e:
        resolver({}).resolve("nowhere.test")
    assert e.value.status == "5.1.2"


@pytest.mark.parametrize("error", [dns.resolver.NoNameservers(), dns.exception.Timeout()])
def test_servfail_and_timeout_are_temporary_4_4_3(error: Exception) -> None:
    zone = {("broken.test", "MX"): error}
    with pytest.raises(DeliveryError) as e:
        resolver(zone).resolve("broken.test")
    assert e.value.status == "4.4.3"


def test_mx_host_without_address_is_skipped() -> None:
    zone = {**BASIC, ("example.test", "MX"): ["5 ghost.example.test.", "10 mx1.example.test."]}
    assert [h.name for h in resolver(zone).resolve("example.test")] == ["mx1.example.test"]


def test_no_mx_host_has_an_address() -> None:
    zone = {("example.test", "MX"): ["10 ghost.example.test."]}
    with pytest.raises(DeliveryError) as e:
        resolver(zone).resolve("example.test")
    assert e.value.status == "5.4.4"
    zone[("ghost.example.test", "A")] = dns.resolver.NoNameservers()
    with pytest.raises(DeliveryError) as e:
        resolver(zone).resolve("example.test")
    assert e.value.status == "4.4.3"


def test_ourselves_and_worse_preferences_are_dropped() -> None:
    zone = {**BASIC, ("example.test", "MX"): ["10 mx1.example.test.", "20 mx.local.test.",
                                               "30 mx2.example.test."]}
    hosts = resolver(zone).resolve("example.test")
    assert [h.name for h in hosts] == ["mx1.example.test"]


def test_ourselves_by_listening_address() -> None:
    hosts = resolver(BASIC, addresses=frozenset({"127.0.0.3"})).resolve("example.test")
    assert [h.name for h in hosts] == ["mx1.example.test"]


def test_we_are_the_best_mx_is_a_loop() -> None:
    with pytest.raises(DeliveryError) as e:
        resolver(BASIC, addresses=frozenset({"127.0.0.2"})).resolve("example.test")
    assert e.value.status == "5.4.6"


def test_resolve_host_without_mx() -> None:
    r = resolver(BASIC)
    assert r.resolve_host("mx1.example.test") == [MXHost("mx1.example.test", 0, ("127.0.0.2",))]
    assert r.resolve_host("127.0.0.9") == [MXHost("127.0.0.9", 0, ("127.0.0.9",))]
    with pytest.raises(DeliveryError) as e:
        r.resolve_host("ghost.test")
    assert e.value.status.startswith("4.")


def test_listening_addresses_at_the_smtp_port() -> None:
    cfg = config_mod.from_dict({
        "server": {"hostname": "mx.local.test"},
        "relay": {"smtp_port": 2600},
        "listeners": [{"endpoint": "tcp:2600:interface=127.0.0.7"},
                      {"endpoint": "tcp:port=2601:interface=127.0.0.8"},
                      {"endpoint": "tcp6:2600:interface=\\:\\:1"}],
    })
    assert listening_addresses(cfg) == (frozenset({"127.0.0.7", "::1"}), False)
    cfg = config_mod.from_dict({"relay": {"smtp_port": 25}, "listeners": [{"endpoint": "tcp:25"}]})
    assert listening_addresses(cfg)[1] is True


@pytest.mark.parametrize("error", [dns.resolver.NoNameservers(), dns.exception.Timeout()])
def test_backup_mx_whose_primary_does_not_resolve_now_defers(error: Exception) -> None:
    # We are the backup MX (20); the primary's address lookup fails for now.  That
    # is no mail loop to bounce [RFC 5321 5.1]: keep the mail and try again.
    zone = {("example.test", "MX"): ["10 primary.example.test.", "20 mx.local.test."],
            ("primary.example.test", "A"): error, ("primary.example.test", "AAAA"): error}
    with pytest.raises(DeliveryError) as e:
        resolver(zone).resolve("example.test")
    assert e.value.status == "4.4.3"


def test_named_next_hop_is_looked_up_in_the_hosts_file_first(tmp_path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n# comment\n192.0.2.9  smarthost.lan  relay # x\n"
                     "::1 localhost ip6-localhost\n")
    mx = MXResolver(FakeResolver({}), "mx.local.test", hosts_file=hosts)
    assert mx.resolve_host("SmartHost.LAN.")[0].addresses == ("192.0.2.9",)
    assert mx.resolve_host("relay")[0].addresses == ("192.0.2.9",)
    assert mx.resolve_host("localhost")[0].addresses == ("127.0.0.1", "::1")
    # Names the file does not list still go to DNS.
    with pytest.raises(DeliveryError):
        mx.resolve_host("elsewhere.test")
