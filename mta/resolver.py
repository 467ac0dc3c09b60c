"""The configured resolver: every DNS lookup mta makes goes through it.

``[relay] nameservers`` (empty: the system's /etc/resolv.conf) and
``[relay] dns_timeout`` make one dnspython `Resolver`; MX routing, SPF,
DKIM, DMARC and MTA-STS all ask it, so that an operator (or a test, with a
DNS server on loopback) points them all at one place.  Lookups block on
the network: callers run them in a thread, never in the reactor.

`txt(resolver, name)` is the TXT lookup the mail-authentication checks
share.  What its answers mean:

- a list of strings, one per TXT record, each record's character-strings
  joined [RFC 6376 3.6.2.2, RFC 7208 3.3, RFC 7489 6.6.3];
- an empty list when the name does not exist (NXDOMAIN) or has no TXT
  record: a definite "none";
- `TemporaryDNSError` for a timeout, SERVFAIL or no answering server:
  nobody can say, so a check must not guess (temperror, 4xx).
"""

from __future__ import annotations

from collections.abc import Iterable

import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver
from twisted.logger import Logger

from mta.config import Config

log = Logger(namespace="mta.resolver")


class TemporaryDNSError(Exception):
    """A lookup that failed for now (timeout, SERVFAIL): its answer is unknown."""


def make_resolver(nameservers: Iterable[tuple[str, int]], timeout: float) -> dns.resolver.Resolver:
    """A dnspython resolver on `nameservers` (empty: the system's /etc/resolv.conf)."""
    servers = list(nameservers)
    try:
        resolver = dns.resolver.Resolver(configure=not servers)
    except dns.resolver.NoResolverConfiguration:
        # No usable /etc/resolv.conf: a local resolver is the only sensible guess.
        log.warn("no system resolver configuration; using 127.0.0.1:53")  # noqa: G010
        resolver = dns.resolver.Resolver(configure=False)
        servers = [("127.0.0.1", 53)]
    if servers:
        resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port) for host, port in servers]
    resolver.timeout = timeout
    resolver.lifetime = timeout
    return resolver


def from_config(config: Config) -> dns.resolver.Resolver:
    """The resolver ``[relay] nameservers`` and ``dns_timeout`` describe."""
    return make_resolver(config.relay.nameservers, config.relay.dns_timeout)


def txt(resolver: dns.resolver.Resolver, name: str) -> list[str]:
    """The TXT records at `name`, each joined into one string (see the module's text)."""
    try:
        answer = resolver.resolve(name, dns.rdatatype.TXT, search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    except (dns.exception.Timeout, dns.resolver.NoNameservers,
            dns.resolver.LifetimeTimeout) as e:
        raise TemporaryDNSError(f"{name}: {e.__class__.__name__}") from e
    except dns.exception.DNSException as e:  # a malformed name, a bad reply
        raise TemporaryDNSError(f"{name}: {e}") from e
    return [b"".join(record.strings).decode("utf-8", "replace") for record in answer]
