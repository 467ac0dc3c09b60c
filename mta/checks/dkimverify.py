"""DKIM verification [RFC 6376 6] of every signature of a message, with dkimpy.

`verify(resolver, message)` checks each ``DKIM-Signature`` field of
`message` (the whole message as received, CRLF line ends) and returns one
`DKIMResult` per signature, in the order they appear, with the result
names of RFC 8601 2.7.1:

- ``pass``: the signature verifies with the key published at
  ``s._domainkey.d`` [RFC 6376 3.6.2];
- ``fail``: it parsed and a key was found, but the body hash or the
  signature does not match;
- ``neutral``: the signature cannot be processed (a syntax error, a
  missing required tag, an expired signature) [RFC 8601 2.7.1];
- ``policy``: an algorithm we refuse to verify (rsa-sha1, RFC 8301 3.1);
- ``permerror``: no key at that name, or a key record that cannot be used
  (revoked, bad syntax, too short: RFC 8301 3.2 wants 1024 bits at least);
- ``temperror``: the key lookup timed out or got SERVFAIL: nobody can say.

A message without signatures gives an empty list (``dkim=none``).  Only the
first `MAX_SIGNATURES` are checked (RFC 6376 6.1 lets a verifier limit them):
each costs a key lookup that may wait the whole DNS timeout, and a sender
could otherwise tie up a checking thread for hours with a thousand of them;
the rest, however many, are one more ``neutral`` result that says how many
were left unchecked (one line in our header, not one per signature).  One
message's key lookups share a budget of `LOOKUP_BUDGET` DNS timeouts, and a
key name asked once is not asked again: a signature whose lookup would start
after the budget is spent is ``temperror`` without one.

``rsa-sha1`` signatures are ``policy`` without a lookup: RFC 8301 3.1 says
rsa-sha1 "MUST NOT be used for signing or verifying".

The key lookup goes through our resolver (`mta.resolver.txt`), not
dkimpy's own.  It blocks on DNS and hashes the whole message: callers run
it in a thread.
"""

from __future__ import annotations

import binascii
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import dkim
import dns.resolver

from mta import resolver as resolver_module

MIN_KEY_BITS = 1024  # RFC 8301 3.2
MAX_SIGNATURES = 8  # checked per message; real mail carries one to three
LOOKUP_BUDGET = 3  # DNS timeouts (the resolver's lifetime) one message's key lookups may use
REFUSED_ALGORITHMS = (b"rsa-sha1",)  # RFC 8301 3.1
_quiet = logging.getLogger("mta.checks.dkimpy")  # dkimpy logs every step: keep it out of ours
_quiet.addHandler(logging.NullHandler())
_quiet.propagate = False


@dataclass(frozen=True)
class DKIMResult:
    result: str  # pass | fail | neutral | policy | permerror | temperror
    domain: str  # d=, lower case ("" when the signature has none)
    selector: str  # s=
    algorithm: str  # a=
    signature: str  # b=, for header.b [RFC 6008]: the first 8 characters go in the header
    reason: str = ""  # why it is not a pass, for the header's comment and the log


class _KeyLookupFailed(Exception):
    """The key's TXT lookup got no definite answer (temperror)."""


@dataclass
class _Keys:
    """One message's key lookups: each name asked once, all within one time budget."""

    resolver: dns.resolver.Resolver
    clock: Callable[[], float] = time.monotonic
    found: dict[bytes, bytes | None | _KeyLookupFailed] = field(default_factory=dict)
    deadline: float = 0.0

    def __post_init__(self) -> None:
        self.deadline = self.clock() + LOOKUP_BUDGET * self.resolver.lifetime

    def record(self, name: bytes) -> bytes | None:
        key = name.lower().rstrip(b".")
        if key not in self.found:
            if self.clock() >= self.deadline:
                raise _KeyLookupFailed(f"key lookup not made: this message's lookups "
                                       f"took {LOOKUP_BUDGET} DNS timeouts already")
            try:
                self.found[key] = _key_record(self.resolver, name)
            except _KeyLookupFailed as e:
                self.found[key] = e
        found = self.found[key]
        if isinstance(found, _KeyLookupFailed):
            raise found
        return found


def verify(resolver: dns.resolver.Resolver, message: bytes,
           clock: Callable[[], float] = time.monotonic) -> list[DKIMResult]:
    try:
        signer = dkim.DKIM(message, logger=_quiet, minkey=MIN_KEY_BITS,
                           timeout=resolver.lifetime)
    except dkim.DKIMException as e:  # a message dkimpy cannot even split into fields
        return [DKIMResult("neutral", "", "", "", "", f"message not parseable: {e}")]
    count = sum(1 for name, _ in signer.headers if name.lower() == b"dkim-signature")
    keys = _Keys(resolver, clock)
    results = [_verify_one(signer, index, keys) for index in range(min(count, MAX_SIGNATURES))]
    if count > MAX_SIGNATURES:
        results.append(DKIMResult("neutral", "", "", "", "",
                                  f"{count - MAX_SIGNATURES} more signatures not checked: "
                                  f"at most {MAX_SIGNATURES} a message"))
    return results


def _verify_one(signer: dkim.DKIM, index: int, keys: _Keys) -> DKIMResult:
    try:
        prepared = signer.verify_headerprep(index)
    except dkim.DKIMException as e:
        return _result("neutral", _tags_of(signer, index), f"bad signature: {e}")
    tags, include_headers, signature_fields = prepared
    if tags.get(b"a", b"").strip().lower() in REFUSED_ALGORITHMS:
        return _result("policy", tags, "rsa-sha1 is not accepted (RFC 8301 3.1)")
    name = tags[b"s"] + b"._domainkey." + tags[b"d"]
    try:
        record = keys.record(name)
    except _KeyLookupFailed as e:
        return _result("temperror", tags, str(e))
    if record is None:
        return _result("permerror", tags, f"no key at {_text(name)}")
    try:
        signer.pk, signer.keysize, signer.ktag, signer.seqtlsrpt = dkim.evaluate_pk(name, record)
    except (dkim.DKIMException, binascii.Error, ValueError) as e:
        return _result("permerror", tags, f"unusable key: {e}")
    try:
        good = signer.verify_sig_process(tags, include_headers, signature_fields[index], None)
    except dkim.KeyFormatError as e:  # e.g. a key shorter than MIN_KEY_BITS
        return _result("permerror", tags, f"unusable key: {e}")
    except dkim.ValidationError as e:  # the body hash does not match
        return _result("fail", tags, str(e))
    except (dkim.DKIMException, binascii.Error, ValueError, TypeError) as e:
        return _result("neutral", tags, f"cannot verify: {e}")
    return _result("pass" if good else "fail", tags, "" if good else "signature did not verify")


def _key_record(resolver: dns.resolver.Resolver, name: bytes) -> bytes | None:
    """The key record at `name` [RFC 6376 3.6.2.2]; None when there is none."""
    try:
        records = resolver_module.txt(resolver, name.decode("ascii"))
    except UnicodeDecodeError:
        return None  # d= and s= are ASCII [RFC 6376 3.5]; anything else names no key
    except resolver_module.TemporaryDNSError as e:
        raise _KeyLookupFailed(f"key lookup: {e}") from e
    if not records:
        return None
    # Several records at one name are ambiguous; RFC 6376 3.6.2.2 lets a verifier use the
    # first.  A record that does not parse is a permerror either way.
    return records[0].encode("utf-8")


def _tags_of(signer: dkim.DKIM, index: int) -> dict[bytes, bytes]:
    """What can be read of a signature that did not pass its syntax checks."""
    fields = [value for name, value in signer.headers if name.lower() == b"dkim-signature"]
    try:
        return dkim.util.parse_tag_value(fields[index])
    except Exception:  # noqa: BLE001 (a malformed tag list: nothing to name)
        return {}


def _result(result: str, tags: dict[bytes, bytes], reason: str = "") -> DKIMResult:
    signature = _text(b"".join(tags.get(b"b", b"").split()))
    return DKIMResult(result, _text(tags.get(b"d", b"")).lower().rstrip("."),
                      _text(tags.get(b"s", b"")), _text(tags.get(b"a", b"")),
                      signature, reason[:200])


def _text(value: bytes) -> str:
    return value.decode("ascii", "replace")

