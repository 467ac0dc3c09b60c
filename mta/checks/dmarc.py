"""DMARC [RFC 7489]: the From: domain's policy, alignment, and the verdict.

`author_domains(from_fields)` finds the domains to evaluate in the
message's ``From:`` fields [RFC 7489 6.6.1]: exactly one field is needed;
none, several, or one without a usable address is a `NoAuthorDomain`
(recorded as ``dmarc=permerror``; RFC 7489 6.6.1 says such messages are
"typically rejected", which ``dmarc = "enforce"`` does).  A single field
with several addresses is evaluated for each domain, and the strictest
policy among the failures applies.

`discover(resolver, psl, domain)` is policy discovery [6.6.3]: the TXT
records at ``_dmarc.DOMAIN``, else at ``_dmarc.`` + the organisational
domain (public suffix list, psl.py); only records whose first tag is
``v=DMARC1`` count; none or several means no policy.  A timeout or
SERVFAIL raises `TemporaryDNSError` (never a guess).  A record without a
valid ``p`` (or with a bad ``sp``) counts as ``p=none`` when it has a
``rua``, else as no record [6.6.3 step 6].

`evaluate(...)` gives one `DMARCResult` per author domain:

- ``pass`` when an SPF pass or a DKIM pass is aligned with it [3.1]:
  relaxed (``adkim``/``aspf=r``, the default) when the organisational
  domains are equal, strict (``s``) when the names are;
- ``temperror`` when nothing aligned passed but an aligned check was a
  temperror, or the policy lookup itself failed;
- ``fail`` otherwise; ``none`` when the domain publishes no policy.

The policy that applies is ``sp`` for a subdomain whose record was found
at its organisational domain, else ``p`` [6.3]; ``pct`` [6.6.4] samples
the failures it applies to, the others get the next lower policy
(reject -> quarantine -> none).  The result's `disposition` is that.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import getaddresses

import dns.resolver

from mta import resolver as resolver_module
from mta.address import is_valid_domain
from mta.checks.dkimverify import DKIMResult
from mta.checks.psl import PublicSuffixList, a_label
from mta.checks.spf import SPFResult

POLICIES = ("none", "quarantine", "reject")
_LOWER = {"reject": "quarantine", "quarantine": "none", "none": "none"}


@dataclass(frozen=True)
class Record:
    p: str  # none | quarantine | reject
    sp: str | None = None  # for subdomains; None: p applies
    adkim: str = "r"  # r (relaxed) | s (strict)
    aspf: str = "r"
    pct: int = 100


@dataclass(frozen=True)
class Policy:
    """A discovered record and where it was found."""

    record: Record
    domain: str  # the name whose _dmarc record it is: the author domain or its organisational one
    author_domain: str

    @property
    def requested(self) -> str:
        """The policy for the author domain: sp for a subdomain covered by its org's record."""
        if self.domain != self.author_domain and self.record.sp is not None:
            return self.record.sp
        return self.record.p


@dataclass(frozen=True)
class DMARCResult:
    result: str  # pass | fail | none | temperror | permerror
    domain: str  # the author domain (header.from)
    policy: str | None = None  # the requested policy (p or sp), when one was found
    disposition: str = "none"  # what applies to this message: none | quarantine | reject
    reason: str = ""


class NoAuthorDomain(Exception):
    """The message has no single From: field with usable addresses [RFC 7489 6.6.1]."""


def parse_record(text: str) -> Record | None:
    """A DMARC record's tags [RFC 7489 6.3, 6.4]; None when it is not one we can use."""
    tags: dict[str, str] = {}
    for i, part in enumerate(text.split(";")):
        name, equals, value = part.partition("=")
        name, value = name.strip().lower(), value.strip()
        if i == 0:
            if name != "v" or value != "DMARC1":
                return None
            continue
        if not equals:
            if name:
                return None  # a tag without "=": not a tag-list [RFC 6376 3.2, 7489 6.4]
            continue
        tags.setdefault(name, value)
    p = tags.get("p", "").lower()
    sp = tags.get("sp", "").lower() or None
    if p not in POLICIES or (sp is not None and sp not in POLICIES):
        if not tags.get("rua", "").strip():
            return None
        p, sp = "none", None  # 6.6.3 step 6: report-only, as if p=none
    adkim = tags.get("adkim", "r").lower()
    aspf = tags.get("aspf", "r").lower()
    pct_text = tags.get("pct", "100")
    pct = int(pct_text) if pct_text.isascii() and pct_text.isdigit() else 100
    return Record(p=p, sp=sp, adkim=adkim if adkim in ("r", "s") else "r",
                  aspf=aspf if aspf in ("r", "s") else "r", pct=min(pct, 100))


def author_domains(from_fields: list[str]) -> list[str]:
    """The distinct domains of the one From: field (unfolded values), lower case."""
    if len(from_fields) != 1:
        raise NoAuthorDomain("no From: field" if not from_fields
                             else f"{len(from_fields)} From: fields")
    domains: list[str] = []
    for _name, address in getaddresses([from_fields[0]]):
        domain = address.rpartition("@")[2].lower().rstrip(".")
        if not address or "@" not in address or not is_valid_domain(domain, utf8=True):
            raise NoAuthorDomain("From: without a usable address")
        if domain not in domains:
            domains.append(domain)
    if not domains:
        raise NoAuthorDomain("From: without an address")
    return domains


def discover(resolver: dns.resolver.Resolver, psl: PublicSuffixList,
             domain: str) -> Policy | None:
    """Policy discovery [RFC 7489 6.6.3]; raises TemporaryDNSError."""
    ascii_domain = _ascii(domain)
    record = _record_at(resolver, ascii_domain)
    if record is not None:
        return Policy(record, ascii_domain, ascii_domain)
    organizational = psl.organizational_domain(ascii_domain)
    if organizational != ascii_domain:
        record = _record_at(resolver, organizational)
        if record is not None:
            return Policy(record, organizational, ascii_domain)
    return None


def _record_at(resolver: dns.resolver.Resolver, domain: str) -> Record | None:
    texts = [t for t in resolver_module.txt(resolver, f"_dmarc.{domain}")
             if t.split(";", 1)[0].replace(" ", "").replace("\t", "") == "v=DMARC1"]
    if len(texts) != 1:
        return None  # none, or several: no policy [6.6.3 steps 3-4]
    return parse_record(texts[0])


def aligned(authenticated: str, author: str, mode: str, psl: PublicSuffixList) -> bool:
    """Identifier alignment [RFC 7489 3.1.1, 3.1.2]."""
    authenticated, author = _ascii(authenticated), _ascii(author)
    if not authenticated:
        return False
    if mode == "s":
        return authenticated == author
    return psl.organizational_domain(authenticated) == psl.organizational_domain(author)


def evaluate(resolver: dns.resolver.Resolver, psl: PublicSuffixList, domain: str,
             spf: SPFResult | None, dkim: list[DKIMResult],
             chance: Callable[[], float] = random.random) -> DMARCResult:
    """The DMARC result for one author domain (see the module's text)."""
    try:
        policy = discover(resolver, psl, domain)
    except resolver_module.TemporaryDNSError as e:
        return DMARCResult("temperror", domain, reason=f"policy lookup: {e}")
    if policy is None:
        return DMARCResult("none", domain, reason="no DMARC policy published")
    record = policy.record
    spf_aligned = spf is not None and aligned(spf.domain, domain, record.aspf, psl)
    dkim_aligned = [r for r in dkim if aligned(r.domain, domain, record.adkim, psl)]
    if spf_aligned and spf.result == "pass":
        return DMARCResult("pass", domain, policy.requested, reason="SPF aligned")
    if any(r.result == "pass" for r in dkim_aligned):
        return DMARCResult("pass", domain, policy.requested, reason="DKIM aligned")
    requested = policy.requested
    if (spf_aligned and spf.result == "temperror") or \
            any(r.result == "temperror" for r in dkim_aligned):
        return DMARCResult("temperror", domain, requested, _sampled(requested, record, chance),
                           "an aligned check had a temporary DNS error")
    return DMARCResult("fail", domain, requested, _sampled(requested, record, chance),
                       "no aligned SPF or DKIM pass")


def _sampled(requested: str, record: Record, chance: Callable[[], float]) -> str:
    """pct [RFC 7489 6.6.4]: the policy for a sample of failures, the next lower one else."""
    if record.pct >= 100 or chance() * 100 < record.pct:
        return requested
    return _LOWER[requested]


def strictest(results: list[DMARCResult]) -> DMARCResult:
    """The result that decides a message with several author domains [RFC 7489 6.6.1]."""
    rank = {"fail": 4, "temperror": 3, "permerror": 3, "none": 1, "pass": 0}
    return max(results, key=lambda r: (rank.get(r.result, 0), POLICIES.index(r.disposition)))



def _ascii(domain: str) -> str:
    return a_label(domain.lower().rstrip("."))
