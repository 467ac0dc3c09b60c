"""A small authoritative DNS server for tests, on loopback, from a JSON zone.

Run as ``python tests/dnsserver.py ZONE.json [--address 127.0.0.1] [--log FILE]``.  It
listens on UDP and TCP at a free port and prints that port on its first
line of output, then serves until terminated.

The zone is a JSON object of names to records::

    {
      "example.test":     {"MX": [[10, "mx1.example.test"], [20, "mx2.example.test"]]},
      "mx1.example.test": {"A": ["127.0.0.2"], "AAAA": ["::1"]},
      "nullmx.test":      {"MX": [[0, "."]]},
      "example.test":     {"TXT": ["v=spf1 ip4:127.0.0.1 -all"]},
      "broken.test":      "SERVFAIL"
    }

A TXT record is one string; strings longer than 255 octets (DKIM keys) are
served as several character-strings of one record, which is how they are
published [RFC 6376 3.6.2.2, RFC 7208 3.3].  A file of zones may be re-read
while the server runs: send it SIGHUP (tests change records this way).

A name not in the zone is NXDOMAIN; a name without records of the asked
type is an empty NOERROR answer; ``"SERVFAIL"`` makes every query for the
name fail with SERVFAIL; ``"TIMEOUT"`` leaves every query for it
unanswered.  With ``--log FILE`` each query is appended to FILE as one
line, ``NAME TYPE`` (tests prove with it which lookups were made, and
that none were).  ``"."`` is the root name, so ``[0, "."]`` is the
null MX of RFC 7505.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
from typing import Any

from twisted.internet import defer, reactor
from twisted.names import dns, error, server
from twisted.names.common import ResolverBase


class ServerFailure(Exception):
    """Anything that is not a DomainError becomes SERVFAIL in DNSServerFactory."""


class ZoneResolver(ResolverBase):
    def __init__(self, zone: dict[str, Any], log: Any = None) -> None:
        super().__init__()
        self.zone = {name.lower().rstrip("."): records for name, records in zone.items()}
        self.log = log  # an open file: one line per query

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any = None) -> defer.Deferred:
        key = name.decode().lower().rstrip(".")
        if self.log is not None:
            self.log.write(f"{key} {dns.QUERY_TYPES.get(type, type)}\n")
            self.log.flush()
        records = self.zone.get(key)
        if records is None:
            return defer.fail(error.AuthoritativeDomainError(name))
        if records == "SERVFAIL":
            return defer.fail(ServerFailure(key))
        if records == "TIMEOUT":
            return defer.Deferred()  # never answered
        answers = [dns.RRHeader(name, type, cls, 60, payload, auth=True)
                   for payload in self._payloads(records, type)]
        return defer.succeed((answers, [], []))

    @staticmethod
    def _payloads(records: dict[str, Any], type: int) -> list[Any]:
        if type == dns.MX:
            return [dns.Record_MX(preference, b"" if host == "." else host.encode(), ttl=60)
                    for preference, host in records.get("MX", [])]
        if type == dns.A:
            return [dns.Record_A(address, ttl=60) for address in records.get("A", [])]
        if type == dns.AAAA:
            return [dns.Record_AAAA(address, ttl=60) for address in records.get("AAAA", [])]
        if type == dns.TXT:
            return [dns.Record_TXT(*_character_strings(text), ttl=60)
                    for text in records.get("TXT", [])]
        return []


def _character_strings(text: str) -> list[bytes]:
    data = text.encode()
    return [data[i:i + 255] for i in range(0, len(data), 255)] or [b""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("zone")
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--log", help="append each query to this file: NAME TYPE")
    args = parser.parse_args()
    with open(args.zone) as f:
        zone = json.load(f)
    resolver = ZoneResolver(zone, open(args.log, "a") if args.log else None)  # noqa: SIM115

    def reread(signum: int, frame: Any) -> None:
        with open(args.zone) as f:
            fresh = ZoneResolver(json.load(f))
        resolver.zone = fresh.zone

    signal.signal(signal.SIGHUP, reread)
    factory = server.DNSServerFactory(authorities=[resolver])
    protocol = dns.DNSDatagramProtocol(factory)
    udp = reactor.listenUDP(0, protocol, interface=args.address)
    port = udp.getHost().port
    with contextlib.suppress(OSError):  # TCP is a nicety: our answers fit in UDP
        reactor.listenTCP(port, factory, interface=args.address)
    sys.stdout.write(f"{port}\n")
    sys.stdout.flush()
    reactor.run()


if __name__ == "__main__":
    main()
