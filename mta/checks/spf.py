"""SPF [RFC 7208] of the MAIL FROM identity, with pyspf, through our resolver.

`check(resolver, client_ip, sender, helo)` runs pyspf's `query.check()` for
the MAIL FROM identity (for the null reverse-path, the HELO identity
``postmaster@HELO``, RFC 7208 2.4) and returns an `SPFResult`: one of
pass, fail, softfail, neutral, none, permerror, temperror [RFC 7208 2.6].
It blocks on DNS: callers run it in a thread.  The RFC's processing limits
(10 DNS-querying terms, 2 void lookups [4.6.4]) are pyspf's.

pyspf asks DNS through its module-level ``spf.DNSLookup``.  We set that,
once, to `_lookup`, which asks the resolver the calling thread was given
(a thread-local set by `check` for the duration of one check), so that
every query goes to the configured nameservers with the configured
timeout, and a reload (a new resolver in the next check) reaches it.  A
thread that calls pyspf without going through `check` gets pyspf's own
lookup, unchanged.  A timeout, SERVFAIL or unreachable server is
``TempError`` (temperror): never a guess.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import dns.exception
import dns.resolver
import spf

from mta.checks.psl import a_label

RESULTS = ("pass", "fail", "softfail", "neutral", "none", "permerror", "temperror")
# RFC 7208 4.6.4: at least 20 seconds for a whole check; our per-query
# lifetime (dns_timeout) bounds each lookup inside it.
CHECK_TIME = 20.0

_local = threading.local()
_pyspf_lookup = spf.DNSLookup


@dataclass(frozen=True)
class SPFResult:
    result: str  # one of RESULTS
    identity: str  # "mailfrom" or "helo"
    sender: str  # the identity checked: the MAIL FROM address, or postmaster@HELO
    explanation: str = ""  # pyspf's text (or the receiver's reason), for replies and comments

    @property
    def domain(self) -> str:
        """The domain SPF authenticated when it passes [RFC 7489 3.1.2]."""
        return self.sender.rpartition("@")[2].lower().rstrip(".")


def check(resolver: dns.resolver.Resolver, client_ip: str, sender: str, helo: str,
          receiver: str = "") -> SPFResult:
    """SPF for `sender` ("" for the null reverse-path) from `client_ip`, who said `helo`."""
    _install()
    sender, helo = _a_labels(sender), _a_labels(helo)
    query = spf.query(i=client_ip, s=sender, h=helo, receiver=receiver or None,
                      querytime=max(CHECK_TIME, resolver.lifetime))
    _local.resolver = resolver
    try:
        result, _code, explanation = query.check()
    except Exception as e:  # noqa: BLE001 (pyspf's own bug on odd input: not a verdict to guess)
        result, explanation = "temperror", f"SPF check failed: {e.__class__.__name__}"
    finally:
        _local.resolver = None
    if result not in RESULTS:  # "ambiguous" comes only with strict=2, which we do not ask for
        result = "permerror"
    return SPFResult(result, query.ident, query.s, explanation or "")


def _a_labels(text: str) -> str:
    """An address's (or a name's) domain as DNS has it: an SMTPUTF8 sender's U-labels
    become A-labels [RFC 5890]; a domain IDNA refuses is left for pyspf to judge."""
    if text.isascii():
        return text
    local, at, domain = text.rpartition("@")
    return f"{local}{at}{a_label(domain)}"


def _install() -> None:
    if spf.DNSLookup is not _lookup:
        spf.DNSLookup = _lookup


def _lookup(name: str, qtype: str, strict: bool | int = True,
            timeout: float = 20) -> list[tuple[tuple[str, str], object]]:
    """pyspf's DNSLookup interface: [((name, type), value)], [] for none."""
    resolver = getattr(_local, "resolver", None)
    if resolver is None:
        return _pyspf_lookup(name, qtype, strict, timeout)
    lifetime = min(resolver.lifetime, timeout) if timeout and timeout > 0 else resolver.lifetime
    try:
        answer = resolver.resolve(name, qtype, search=False, lifetime=lifetime)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    except dns.exception.DNSException as e:  # timeout, SERVFAIL, no server answered
        raise spf.TempError(f"DNS {name} {qtype}: {e.__class__.__name__}") from e
    return [((name, qtype), _value(qtype, rdata)) for rdata in answer]


def _value(qtype: str, rdata: object) -> object:
    """Each record as pyspf's own dnspython lookup gives it."""
    if qtype in ("A", "AAAA"):
        return rdata.address
    if qtype == "MX":
        return rdata.preference, rdata.exchange.to_text(omit_final_dot=True)
    if qtype == "PTR":
        return rdata.target.to_text(omit_final_dot=True)
    if qtype in ("TXT", "SPF"):
        return rdata.strings
    return rdata.to_text()
