"""Where a domain's mail goes: MX records [RFC 5321 5.1] resolved with dnspython.

`MXResolver.resolve(domain)` returns the hosts to try, best first, each with
all its addresses (IPv4 first, then IPv6).  `resolve_host(name)` does the
same for one host without MX (``smtp:[host]`` routes, the smart host).
Both block on the network: the scheduler runs them in a thread, never in
the reactor.

What it promises [RFC 5321 5.1, RFC 7505]:

- MX records in order of preference; records of equal preference are
  shuffled (the random generator is injected, so tests can pin it).
- No MX records: the domain itself is the one host (the implicit MX).
- A null MX (``0 .``) is a permanent failure, 5.1.10.
- A domain that does not exist (NXDOMAIN) is a permanent failure, 5.1.2.
- SERVFAIL and timeouts are temporary, 4.4.3.
- An MX host that is this server (our host name, or an address we listen
  on at the SMTP port) is dropped together with every host of the same or
  worse preference; if that leaves nothing, the mail loops: 5.4.6, unless
  a better host's addresses could not be looked up for now (4.4.3).
- MX hosts without any address are skipped; if none is left the failure
  is temporary when any lookup was, else permanent (5.4.4).

Errors are `DeliveryError` (from `outcome`), whose status class says
temporary or permanent.
"""

from __future__ import annotations

import functools
import ipaddress
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
from twisted.logger import Logger

from mta.config import Config
from mta.delivery.outcome import DeliveryError
from mta.resolver import make_resolver

log = Logger(namespace="mta.delivery.mx")


@dataclass(frozen=True)
class MXHost:
    name: str  # host name without the trailing dot, or an address
    preference: int
    addresses: tuple[str, ...]


@dataclass
class _Lookups:
    """Errors met while resolving host addresses, to choose temporary or permanent."""

    temporary: list[str] = field(default_factory=list)
    permanent: list[str] = field(default_factory=list)


def order_mx(records: Iterable[tuple[int, str]], rng: random.Random) -> list[tuple[int, str]]:
    """Sort (preference, host) by preference, shuffling each group of equal preference."""
    groups: dict[int, list[str]] = {}
    for preference, host in records:
        groups.setdefault(preference, []).append(host)
    ordered = []
    for preference in sorted(groups):
        hosts = groups[preference]
        rng.shuffle(hosts)
        ordered.extend((preference, host) for host in hosts)
    return ordered


def listening_addresses(config: Config) -> tuple[frozenset[str], bool]:
    """The addresses we accept SMTP on at `relay.smtp_port`, and whether one listener is a wildcard."""
    addresses: set[str] = set()
    wildcard = False
    for listener in config.listeners:
        port, interface = _endpoint_port_interface(listener.endpoint)
        if port != config.relay.smtp_port:
            continue
        if interface in ("", "0.0.0.0", "::"):
            wildcard = True
        else:
            addresses.add(_normal_address(interface))
    return frozenset(addresses), wildcard


def _endpoint_port_interface(endpoint: str) -> tuple[int | None, str]:
    """Port and interface of a Twisted server endpoint string (``tcp:25:interface=...``)."""
    parts, current, escaped = [], [], False
    for ch in endpoint:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    port: int | None = None
    interface = ""
    for arg in parts[1:]:
        key, eq, value = arg.partition("=")
        if not eq and port is None and key.isdigit():
            port = int(key)
        elif key == "port" and value.isdigit():
            port = int(value)
        elif key == "interface":
            interface = value
    return port, interface


@functools.lru_cache(maxsize=1024)  # next hops are few; asked once per delivery
def _normal_address(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return text


@functools.lru_cache(maxsize=1024)
def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


class MXResolver:
    """Blocking MX and address resolution with our rules about ourselves; run it in a thread."""

    def __init__(self, resolver: dns.resolver.Resolver, hostname: str,
                 local_addresses: frozenset[str] = frozenset(), local_wildcard: bool = False,
                 rng: random.Random | None = None, hosts_file: Path | None = None) -> None:
        self.resolver = resolver
        # Named next hops (the smart host, smtp:[host] routes) are looked up in
        # this file first, as the system resolver would ("files dns").
        self.hosts_file = hosts_file
        self.hostname = hostname.lower().rstrip(".")
        self.local_addresses = local_addresses
        self.local_wildcard = local_wildcard
        self.rng = rng or random.Random()

    @classmethod
    def from_config(cls, config: Config, rng: random.Random | None = None) -> MXResolver:
        resolver = make_resolver(config.relay.nameservers, config.relay.dns_timeout)
        addresses, wildcard = listening_addresses(config)
        hosts_file = None if config.relay.nameservers else Path("/etc/hosts")
        return cls(resolver, config.server.hostname, addresses, wildcard, rng, hosts_file)

    # -- the two questions ------------------------------------------------------

    def resolve(self, domain: str) -> list[MXHost]:
        """Hosts to try for mail to `domain`, best first [RFC 5321 5.1]."""
        domain = domain.lower().rstrip(".")
        records = self._mx_records(domain)
        if records is None:
            # No MX: the domain is its own implicit MX of preference 0.
            lookups = _Lookups()
            addresses = self._addresses(domain, lookups)
            if not addresses:
                if lookups.temporary:
                    raise DeliveryError("4.4.3", f"cannot resolve {domain}: {lookups.temporary[0]}")
                raise DeliveryError("5.1.2", f"{domain} has no MX and no address records")
            hosts, unresolved = [MXHost(domain, 0, addresses)], []
        else:
            hosts, unresolved = self._mx_hosts(domain, records)
        return self._without_ourselves(domain, hosts, unresolved)

    def resolve_host(self, name: str) -> list[MXHost]:
        """One host (no MX lookup): ``smtp:[host]:port`` routes and the smart host."""
        if _is_ip(name):
            return [MXHost(name, 0, (_normal_address(name),))]
        listed = hosts_file_addresses(self.hosts_file, name) if self.hosts_file else ()
        if listed:
            return [MXHost(name, 0, listed)]
        lookups = _Lookups()
        addresses = self._addresses(name.lower().rstrip("."), lookups)
        if addresses:
            return [MXHost(name, 0, addresses)]
        if lookups.temporary:
            raise DeliveryError("4.4.3", f"cannot resolve {name}: {lookups.temporary[0]}")
        raise DeliveryError("4.4.4", f"host {name} not found")

    # -- steps ------------------------------------------------------------------

    def _mx_records(self, domain: str) -> list[tuple[int, str]] | None:
        """(preference, host) of the domain's MX RRset; None when there is none."""
        try:
            answer = self.resolver.resolve(domain, "MX", search=False)
        except dns.resolver.NXDOMAIN:
            raise DeliveryError("5.1.2", f"domain {domain} does not exist (NXDOMAIN)") from None
        except dns.resolver.NoAnswer:
            return None
        except (dns.resolver.NoNameservers, dns.exception.Timeout) as e:
            raise DeliveryError("4.4.3", f"DNS lookup of MX for {domain} failed: {_short(e)}") from None
        except dns.exception.DNSException as e:
            # Names dnspython cannot even encode (bad labels, IDNA): nothing to retry.
            raise DeliveryError("5.1.2", f"bad domain {domain}: {_short(e)}") from None
        records = []
        for rdata in answer:
            exchange = rdata.exchange
            # RFC 7505 3: the null MX is "0 ." and a domain with it has no other MX.
            if exchange == dns.name.root:
                if len(answer) == 1:
                    raise DeliveryError("5.1.10",
                                        f"domain {domain} does not accept mail (null MX)")
                continue
            records.append((int(rdata.preference), exchange.to_text(omit_final_dot=True).lower()))
        if not records:
            raise DeliveryError("5.1.10", f"domain {domain} does not accept mail (null MX)")
        return records

    def _mx_hosts(self, domain: str, records: list[tuple[int, str]]
                  ) -> tuple[list[MXHost], list[tuple[int, str]]]:
        """The hosts with addresses (and us), and (preference, why) of those that failed for now."""
        lookups = _Lookups()
        hosts = []
        unresolved = []
        for preference, name in order_mx(records, self.rng):
            if self._is_us(name, ()):
                # Our own record needs no addresses; keep it so that the cut below sees it.
                hosts.append(MXHost(name, preference, ()))
                continue
            failures = len(lookups.temporary)
            addresses = self._addresses(name, lookups)
            if addresses:
                hosts.append(MXHost(name, preference, addresses))
            elif len(lookups.temporary) > failures:
                unresolved.append((preference, lookups.temporary[-1]))
        if not any(h.addresses or self._is_us(h.name, ()) for h in hosts):
            if lookups.temporary:
                raise DeliveryError("4.4.3", f"cannot resolve MX hosts of {domain}: "
                                             f"{lookups.temporary[0]}")
            raise DeliveryError("5.4.4", f"no address for any MX host of {domain}")
        return hosts, unresolved

    def _without_ourselves(self, domain: str, hosts: list[MXHost],
                           unresolved: list[tuple[int, str]]) -> list[MXHost]:
        """Drop us and every host of our preference or worse [RFC 5321 5.1]."""
        ours = [h.preference for h in hosts if self._is_us(h.name, h.addresses)]
        if not ours:
            return hosts
        best_ours = min(ours)
        kept = [h for h in hosts if h.preference < best_ours]
        if not kept:
            better = [why for preference, why in unresolved if preference < best_ours]
            if better:
                # A better MX exists but cannot be resolved now: no loop, try later.
                raise DeliveryError("4.4.3", f"cannot resolve MX hosts of {domain}: {better[0]}")
            # "If there are no records left at that point, it is an error
            # condition, and the message MUST be returned as undeliverable."
            raise DeliveryError("5.4.6", f"mail for {domain} loops back to myself")
        return kept

    def _is_us(self, name: str, addresses: Iterable[str]) -> bool:
        if name.lower().rstrip(".") == self.hostname:
            return True
        for address in addresses:
            if address in self.local_addresses:
                return True
            if self.local_wildcard and ipaddress.ip_address(address).is_loopback:
                return True
        return False

    def _addresses(self, name: str, lookups: _Lookups) -> tuple[str, ...]:
        if _is_ip(name):
            return (_normal_address(name),)
        found: list[str] = []
        for rdtype in ("A", "AAAA"):
            try:
                answer = self.resolver.resolve(name, rdtype, search=False)
            except dns.resolver.NXDOMAIN:
                lookups.permanent.append(f"{name}: no such host")
                break
            except dns.resolver.NoAnswer:
                continue
            except (dns.resolver.NoNameservers, dns.exception.Timeout) as e:
                lookups.temporary.append(f"{name} {rdtype}: {_short(e)}")
                continue
            except dns.exception.DNSException as e:
                lookups.permanent.append(f"{name}: {_short(e)}")
                break
            found.extend(_normal_address(rdata.address) for rdata in answer)
        return tuple(dict.fromkeys(found))


def hosts_file_addresses(path: Path, name: str) -> tuple[str, ...]:
    """The addresses /etc/hosts (hosts(5) format) gives `name`, in file order."""
    name = name.lower().rstrip(".")
    found = []
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ()
    for line in lines:
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 2 and name in (f.lower().rstrip(".") for f in fields[1:]) \
                and _is_ip(fields[0]):
            found.append(_normal_address(fields[0]))
    return tuple(dict.fromkeys(found))


def _short(error: Exception) -> str:
    if isinstance(error, dns.exception.Timeout):
        return "timed out"
    if isinstance(error, dns.resolver.NoNameservers):
        return "server failure (SERVFAIL)"
    return str(error).split("\n", 1)[0][:200]
