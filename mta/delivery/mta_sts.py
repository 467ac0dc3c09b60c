"""MTA-STS [RFC 8461]: which MX hosts may receive a domain's mail, and only over verified TLS.

`Policies.lookup(domain)` answers, for one delivery by MX, with the
`Policy` to apply (mode "enforce" or "testing"), or None when none applies.
The courier (courier.py) then keeps to it: under "enforce" only MX hosts
that match the policy's ``mx`` patterns are used, and only over STARTTLS
with a certificate that verifies for the MX host name [RFC 8461 4, 5];
under "testing" mail goes as before and what "enforce" would refuse is
logged.

Discovery [RFC 8461 3]:

- the TXT record ``_mta-sts.DOMAIN`` (``v=STSv1; id=...``), through the
  configured resolver (mta.resolver), in a thread.  Records not starting
  with ``v=STSv1`` are ignored; no record, several, or a bad one: the
  domain publishes no policy [3.1];
- when its id differs from the cached policy's, or that policy nears its
  expiry, the policy file ``https://mta-sts.DOMAIN/.well-known/mta-sts.txt``
  is fetched with Twisted's Agent: the host's addresses from the configured
  resolver, TLS with SNI and a certificate that must verify for
  ``mta-sts.DOMAIN`` (trust root: ``[relay] tls_ca_file``, else the
  platform's), no redirect followed, at most `MAX_POLICY_SIZE` octets,
  media type text/plain, `FETCH_TIMEOUT` for the whole fetch [3.3], and
  at most `MAX_RESPONSE_SIZE` octets of answer in all (header fields
  included: a host that sends them without end is cut off).  The
  port is ``[relay] mta_sts_port`` (443; tests point it elsewhere).

The cache [RFC 8461 3.3, 5.1]: every fetched policy is written to
``SPOOL/sts/DOMAIN.json`` (policy, id, when fetched), so that it survives a
restart, and used until ``fetched + max_age``, even when the TXT record
has gone or the policy host cannot be reached.  A failed fetch keeps the
cached policy, is logged once, and is not tried again for the same id
within `FETCH_RETRY` seconds.  A TXT answer (or its absence) is trusted for
`RECHECK` seconds, in memory, so that each delivery does not cost a lookup.
A policy of mode "none" replaces the cached one and applies nothing.

Nothing here blocks the reactor: DNS and file work run through the
`run_blocking` it is given, the fetch on the reactor.  A lookup never fails:
trouble is logged, and the answer is the cached policy or None.

Log lines (namespace ``mta.sts``): ``sts: DOMAIN: policy id ID: mode enforce,
max_age N, mx ...`` when a policy is new or changed, ``sts: DOMAIN: cannot
fetch policy id ID from URL: WHY; ...`` once per failing id, and
``sts: DOMAIN: policy id ID expired``.  Per-delivery verdicts are the
courier's (maillog.sts_verdict).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import idna
from twisted.internet import defer, endpoints
from twisted.internet import error as net_error
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    PotentialDataLoss,
    ResponseDone,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgentEndpointFactory
from zope.interface import implementer

from mta import resolver as dns_resolver
from mta import tls
from mta.config import Live
from mta.delivery.outcome import DeliveryError
from mta.reply import printable
from mta.safeio import write_atomic

log = Logger(namespace="mta.sts")

ENFORCE, TESTING, NONE = "enforce", "testing", "none"
MAX_AGE_LIMIT = 31557600  # one year: the largest max_age [RFC 8461 3.2]
MAX_POLICY_SIZE = 64 * 1024  # the suggested limit of the policy body [RFC 8461 3.3]
# Octets one connection to a policy host may send us in all (status line, header fields,
# chunk framing, body): Twisted's HTTP client counts neither header lines nor their
# length, so a hostile host could fill our memory with header fields until the timeout.
MAX_RESPONSE_SIZE = 2 * MAX_POLICY_SIZE
FETCH_TIMEOUT = 60.0  # the suggested timeout of the whole fetch [RFC 8461 3.3]
FETCH_RETRY = 300.0  # a failed fetch is not retried for the same id sooner [RFC 8461 3.3]
RECHECK = 300.0  # seconds a TXT answer, or its absence, is trusted
REFRESH_BEFORE = 86400.0  # a policy is fetched again when less than this (or half
# its max_age, if shorter) is left of it, so that it does not lapse while in use
DIRECTORY = "sts"  # under the spool
REMEMBERED = 10000  # domains known in memory before those without a policy are forgotten

_ID = re.compile(r"[A-Za-z0-9]{1,32}\Z")
_FIELD_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}"
_TXT_FIELD = re.compile(rf"({_FIELD_NAME})=([\x21-\x3a\x3c\x3e-\x7e]+)\Z")
_POLICY_LINE = re.compile(rf"({_FIELD_NAME}):[ \t]*(.*?)[ \t]*\Z")
_MAX_AGE = re.compile(r"[0-9]{1,10}\Z")
_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
_FILE_NAME = re.compile(r"[a-z0-9_-][a-z0-9_.-]*\Z")


class PolicyError(ValueError):
    """A policy file that is not a valid RFC 8461 3.2 policy."""


class FetchError(Exception):
    """The policy file could not be fetched; the message says why, in one line."""


# -- the policy ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Policy:
    mode: str  # enforce | testing | none
    mx: tuple[str, ...]  # patterns, lower case: "mx.example.com", "*.example.com"
    max_age: int  # seconds
    id: str = ""  # the TXT record's id it was fetched for
    fetched: float = 0.0  # when (seconds since the epoch)

    @property
    def expires(self) -> float:
        return self.fetched + self.max_age

    def matches(self, host: str) -> bool:
        """Whether MX host `host` may receive mail under this policy [RFC 8461 4.1]."""
        return any(mx_matches(pattern, host) for pattern in self.mx)

    def describe(self) -> str:
        """``mode enforce, max_age 86400, mx mx1.example.com *.example.net``, for the log."""
        mx = f", mx {' '.join(self.mx)}" if self.mx else ""
        return f"mode {self.mode}, max_age {self.max_age}{mx}"

    def same_as(self, other: Policy | None) -> bool:
        """Equal but for when it was fetched: a refresh that changed nothing."""
        return other is not None and replace(other, fetched=self.fetched) == self


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 4.1: equal names, or ``*.example.com`` for exactly one label more on the
    left (``mail.example.com``, not ``example.com`` nor ``a.b.example.com``)."""
    pattern = pattern.lower().rstrip(".")
    host = host.lower().rstrip(".")
    if pattern.startswith("*."):
        label, dot, rest = host.partition(".")
        return bool(label) and bool(dot) and rest == pattern[2:]
    return host == pattern


def parse_txt(records: Iterable[str]) -> str | None:
    """The policy id of the ``_mta-sts`` TXT records, or None when they give none [RFC 8461 3.1].

    Records that do not begin with ``v=STSv1`` are discarded; unless exactly one
    is left, and it is valid, the domain has no available policy.
    """
    candidates = [r for r in records if re.match(r"v=STSv1[ \t]*(;|\Z)", r)]
    if len(candidates) != 1:
        return None
    fields = [f.strip(" \t") for f in candidates[0].split(";")]
    if fields[-1] == "":
        fields.pop()  # sts-text-record ends with an optional delimiter
    policy_id = None
    for text in fields[1:]:
        match = _TXT_FIELD.match(text)
        if match is None:
            return None
        name, value = match.groups()
        if name == "id" and policy_id is None:
            if not _ID.match(value):
                return None
            policy_id = value
    return policy_id


def parse_policy(text: str) -> Policy:
    """A policy file's fields [RFC 8461 3.2]; `PolicyError` says what is wrong.

    Lines end in LF or CRLF and are ``name: value``.  Unknown fields are
    ignored; of a field other than ``mx`` given twice, the first counts.
    version (``STSv1``), mode (``enforce``, ``testing``, ``none``) and max_age
    (at most ten digits; more than a year counts as a year) are required,
    and at least one ``mx`` unless the mode is "none".  Names and values are
    case-sensitive.  Blank lines (and a byte order mark) are passed over.
    """
    fields: dict[str, str] = {}
    mx: list[str] = []
    text = text.removeprefix("\ufeff")  # a byte order mark some editors write
    for number, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if not line.strip(" \t"):
            continue
        match = _POLICY_LINE.match(line)
        if match is None:
            raise PolicyError(f"line {number}: not \"name: value\": {printable(line, 80)!r}")
        name, value = match.groups()
        if not value or not all(c.isprintable() or c == "\t" for c in value):
            raise PolicyError(f"line {number}: bad value of {name}")
        if name == "mx":
            mx.append(_mx_pattern(value, number))
        else:
            fields.setdefault(name, value)
    for required in ("version", "mode", "max_age"):
        if required not in fields:
            raise PolicyError(f"no {required} field")
    if fields["version"] != "STSv1":
        raise PolicyError(f"version {printable(fields['version'], 40)!r} is not STSv1")
    mode = fields["mode"]
    if mode not in (ENFORCE, TESTING, NONE):
        raise PolicyError(f"mode {printable(mode, 40)!r} is not enforce, testing or none")
    if not _MAX_AGE.match(fields["max_age"]):
        raise PolicyError(f"max_age {printable(fields['max_age'], 40)!r} is not "
                          "a number of seconds (at most 10 digits)")
    if not mx and mode != NONE:
        raise PolicyError(f"no mx field in mode {mode}")
    return Policy(mode, tuple(dict.fromkeys(mx)), min(int(fields["max_age"]), MAX_AGE_LIMIT))


def _mx_pattern(value: str, number: int) -> str:
    """``["*."] Domain`` [RFC 8461 3.2], in lower case."""
    name = value.removeprefix("*.")
    labels = name.split(".")
    if len(name) > 253 or not all(_LABEL.match(label) for label in labels):
        raise PolicyError(f"line {number}: bad mx pattern {printable(value, 80)!r}")
    return value.lower()


# -- the cache on disk -------------------------------------------------------------------

def policy_domain(domain: str) -> str | None:
    """The domain as its policy is looked up and stored (A-labels, lower case), or None
    when it cannot have one (an address literal, a name IDNA refuses)."""
    domain = domain.lower().rstrip(".")
    if not domain or domain.startswith("["):
        return None
    if not domain.isascii():
        try:
            domain = idna.encode(domain, uts46=True).decode("ascii")
        except idna.IDNAError:
            return None
    return domain if _FILE_NAME.match(domain) else None


def cache_path(directory: Path, domain: str) -> Path:
    return directory / f"{domain}.json"


def read_cached(directory: Path, domain: str) -> Policy | None:
    """Blocking: the policy stored for `domain` (expired or not); None when there is none
    or it cannot be read (then logged: the file is left for a human to look at)."""
    path = cache_path(directory, domain)
    try:
        data = json.loads(path.read_bytes())
        policy = Policy(mode=data["mode"], mx=tuple(data["mx"]), max_age=int(data["max_age"]),
                        id=data["id"], fetched=float(data["fetched"]))
        if policy.mode not in (ENFORCE, TESTING, NONE) or \
                not all(isinstance(p, str) for p in policy.mx) or data["domain"] != domain:
            raise ValueError("unexpected values")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.error("sts: {domain}: cannot read the cached policy {path}: {error}",
                  domain=domain, path=str(path), error=e)
        return None
    return policy


def write_cached(directory: Path, domain: str, policy: Policy) -> None:
    """Blocking: store `policy` for `domain`, atomically."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    data = {"domain": domain, "id": policy.id, "fetched": policy.fetched, "mode": policy.mode,
            "max_age": policy.max_age, "mx": list(policy.mx)}
    write_atomic(cache_path(directory, domain), json.dumps(data).encode() + b"\n", 0o600)


def forget_cached(directory: Path, domain: str) -> None:
    """Blocking: remove an expired policy's file."""
    try:
        os.unlink(cache_path(directory, domain))
    except FileNotFoundError:
        pass


# -- fetching the policy file ------------------------------------------------------------

def policy_url(domain: str, port: int = 443) -> str:
    host = f"mta-sts.{domain}"
    return f"https://{host}{'' if port == 443 else f':{port}'}/.well-known/mta-sts.txt"


@implementer(IAgentEndpointFactory)
class _PolicyHost:
    """The Agent's way to the policy host: one address we resolved, TLS that verifies
    the host name (SNI included), whatever the URL says."""

    def __init__(self, reactor: Any, address: str, port: int, options: Any,
                 timeout: float) -> None:
        self.reactor, self.address, self.port = reactor, address, port
        self.options, self.timeout = options, timeout
        self.cut = False  # a connection sent more than MAX_RESPONSE_SIZE octets

    def endpointForURI(self, uri: Any) -> Any:
        kind = endpoints.TCP6ClientEndpoint if ":" in self.address else \
            endpoints.TCP4ClientEndpoint
        tcp = kind(self.reactor, self.address, self.port, timeout=self.timeout)
        return _CappedEndpoint(endpoints.wrapClientTLS(self.options, tcp), self)


class _CappedEndpoint:
    """An endpoint whose connections are dropped once the peer has sent more than
    `MAX_RESPONSE_SIZE` octets (after TLS); the Agent still gets its own protocol."""

    def __init__(self, endpoint: Any, host: _PolicyHost) -> None:
        self.endpoint, self.host = endpoint, host

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        wrapping = _CappedFactory(factory)
        wrapping.host = self.host
        d = self.endpoint.connect(wrapping)
        return d.addCallback(lambda protocol: protocol.wrappedProtocol)


class _CappedProtocol(ProtocolWrapper):
    received = 0

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        if self.received > MAX_RESPONSE_SIZE:
            self.factory.host.cut = True
            self.transport.abortConnection()
            return
        super().dataReceived(data)


class _CappedFactory(WrappingFactory):
    protocol = _CappedProtocol
    noisy = False


class _CappedBody(Protocol):
    """Collects a response body of at most `limit` octets; more drops the connection."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.chunks: list[bytes] = []
        self.size = 0
        self.finished: defer.Deferred[bytes] = defer.Deferred(self._cancel)

    def _cancel(self, _: Any) -> None:
        if self.transport is not None:
            self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.finished.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.finished.errback(FetchError(f"policy larger than {self.limit} octets"))
            self.transport.stopProducing()
            return
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.finished.called:
            return
        # No Content-Length and the server closes (HTTP/1.0): the body is complete.
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self.chunks))
        else:
            self.finished.errback(FetchError(f"body cut short: {_why(reason.value)}"))


class _Discard(Protocol):
    def connectionMade(self) -> None:
        self.transport.stopProducing()


@defer.inlineCallbacks
def fetch_policy_text(reactor: Any, domain: str, addresses: Iterable[str], port: int = 443,
                      trust_root: Path | None = None, connect_timeout: float = 30.0) -> Any:
    """The text of `domain`'s policy file [RFC 8461 3.3], from the first of `addresses`
    that answers; `FetchError` says why not.  The caller bounds the time it takes."""
    host = f"mta-sts.{domain}"
    url = policy_url(domain, port)
    try:
        options = [tls.client_options(host, verify=True, trust_root=trust_root)]
    except tls.TLSConfigError as e:
        raise FetchError(str(e)) from None
    unreachable = []
    for address in addresses:
        policy_host = _PolicyHost(reactor, address, port, options[0], connect_timeout)
        agent = Agent.usingEndpointFactory(reactor, policy_host)
        try:
            response = yield agent.request(b"GET", url.encode("ascii"),
                                           Headers({b"User-Agent": [b"mta (MTA-STS)"]}))
        except defer.CancelledError:
            raise
        except (net_error.ConnectError, net_error.TimeoutError) as e:
            unreachable.append(f"{address}: {_why(e)}")
            # A fresh options object: one connection each (the TLS verifier keeps state).
            options[0] = tls.client_options(host, verify=True, trust_root=trust_root)
            continue
        except Exception as e:  # noqa: BLE001 (TLS, HTTP: every failure is one line)
            if _cancelled(e):  # the caller's timeout: let it say so
                raise defer.CancelledError() from None
            why = _oversized(policy_host) or _why(e, options[0])
            raise FetchError(f"{address}: {why}") from None
        try:
            text = yield _policy_body(response)
        except FetchError as e:
            raise FetchError(_oversized(policy_host) or e.args[0]) from None
        return text
    raise FetchError(f"cannot connect to {host}: {'; '.join(unreachable) or 'no address'}")


@defer.inlineCallbacks
def _policy_body(response: Any) -> Any:
    """The body of a good response as text; `FetchError` for any other [RFC 8461 3.3]."""
    if response.code != 200:
        response.deliverBody(_Discard())
        phrase = printable(response.phrase.decode("latin-1"), 80)
        if 300 <= response.code < 400:
            # "HTTP 3xx redirects MUST NOT be followed" [RFC 8461 3.3].
            where = (response.headers.getRawHeaders(b"location") or [b"?"])[0]
            raise FetchError(f"HTTP {response.code} {phrase}: redirect to "
                             f"{printable(where.decode('latin-1'), 200)} not followed")
        raise FetchError(f"HTTP {response.code} {phrase}")
    content_type = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
    media_type = content_type.split(b";")[0].strip().lower()
    if media_type != b"text/plain":
        response.deliverBody(_Discard())
        shown = printable(content_type.decode("latin-1"), 80) or "none"
        raise FetchError(f"media type {shown}, not text/plain")
    if response.length is not UNKNOWN_LENGTH and response.length > MAX_POLICY_SIZE:
        response.deliverBody(_Discard())
        raise FetchError(f"policy of {response.length} octets, more than {MAX_POLICY_SIZE}")
    body = _CappedBody(MAX_POLICY_SIZE)
    response.deliverBody(body)
    data = yield body.finished
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise FetchError("policy is not UTF-8 text") from None


def _oversized(policy_host: _PolicyHost) -> str:
    return f"the answer exceeded {MAX_RESPONSE_SIZE} octets" if policy_host.cut else ""


def _cancelled(error: BaseException) -> bool:
    """Whether `error` is (or wraps, as the Agent does) a cancellation."""
    reasons = getattr(error, "reasons", None) or []
    return isinstance(error, defer.CancelledError) or \
        any(r.check(defer.CancelledError) for r in reasons)


def _why(error: BaseException, options: object = None) -> str:
    """One printable line for a failed fetch: the TLS reason (with why the certificate
    was refused, from the handshake's `options`), the connection's error."""
    reasons = getattr(error, "reasons", None)  # ResponseNeverReceived and its kin
    if reasons:
        return "; ".join(_why(r.value, options) for r in reasons)
    if isinstance(error, defer.CancelledError):
        return "cancelled"
    text = tls.describe_failure(error, options)
    if isinstance(error, net_error.ConnectionRefusedError):
        text = "connection refused"
    return printable(text, 300)


# -- what we know of each domain -------------------------------------------------------------

@dataclass
class _Known:
    policy: Policy | None  # the cached policy, mode none included; None: none
    checked: float = float("-inf")  # when the TXT record was last asked for


def applicable(policy: Policy | None, now: float) -> Policy | None:
    """The policy to apply now: unexpired and of mode enforce or testing."""
    if policy is None or policy.mode == NONE or now > policy.expires:
        return None
    return policy


class Policies:
    """The MTA-STS policies of destination domains: discovery, fetch, cache; see the module."""

    def __init__(self, config: Any, reactor: Any, run_blocking: Callable[..., Any],
                 resolver: Callable[[], Any],
                 fetch: Callable[[str], defer.Deferred[Policy]] | None = None,
                 fetch_timeout: float = FETCH_TIMEOUT) -> None:
        """`resolver()` gives the MXResolver in force (its dnspython `resolver` and
        `resolve_host`); `fetch(domain)` replaces the HTTPS fetch in tests."""
        self.live = Live.of(config)
        self.reactor = reactor
        self.run_blocking = run_blocking
        self.resolver = resolver
        self.fetch = fetch or self._fetch_https
        self.fetch_timeout = fetch_timeout
        self._known: dict[str, _Known] = {}
        self._waiting: dict[str, list[defer.Deferred[Policy | None]]] = {}
        self._retry_after: dict[tuple[str, str], float] = {}  # (domain, id) -> no fetch before
        self._reported: set[tuple[str, str]] = set()  # fetch failures already logged
        self._fetching: set[defer.Deferred[Any]] = set()

    @property
    def directory(self) -> Path:
        return self.live.config.server.spool / DIRECTORY

    def lookup(self, domain: str) -> defer.Deferred[Policy | None]:
        """The policy to apply to mail for `domain` now (mode enforce or testing), or None."""
        key = policy_domain(domain)
        if key is None:
            return defer.succeed(None)
        known = self._known.get(key)
        now = self.reactor.seconds()
        if known is not None and now < known.checked + RECHECK:
            return defer.succeed(applicable(known.policy, now))
        waiting = self._waiting.get(key)
        if waiting is not None:  # a lookup is on its way: share its answer
            d: defer.Deferred[Policy | None] = defer.Deferred()
            waiting.append(d)
            return d
        self._waiting[key] = []
        if len(self._known) > REMEMBERED:
            self._forget(now)
        discovery = self._discover(key, known)

        def answer(policy: Policy | None) -> Policy | None:
            for waiter in self._waiting.pop(key, []):
                waiter.callback(policy)
            return policy
        return discovery.addCallback(answer)

    def _forget(self, now: float) -> None:
        """Keep memory bounded on a relay that mails many domains: what is known of
        domains without a policy, once stale, is asked again when next needed."""
        for domain in [d for d, k in self._known.items()
                       if k.policy is None and now >= k.checked + RECHECK]:
            del self._known[domain]
        self._retry_after = {k: t for k, t in self._retry_after.items() if t > now}
        self._reported = {k for k in self._reported if k[0] in self._known}

    def abort_all(self) -> None:
        """Stop the fetches under way (service shutdown); their lookups answer at once."""
        for d in list(self._fetching):
            d.cancel()

    # -- steps ----------------------------------------------------------------------

    @defer.inlineCallbacks
    def _discover(self, domain: str, known: _Known | None) -> Any:
        try:
            directory = self.directory
            cached, record = yield self.run_blocking(self._ask, directory, domain,
                                                     known is None)
            if known is None:
                known = self._known.setdefault(domain, _Known(cached))
            policy = known.policy
            fresh = None
            if isinstance(record, dns_resolver.TemporaryDNSError):
                log.info("sts: {domain}: cannot look up _mta-sts.{domain} now ({why}); "
                         "{what}", domain=domain, why=printable(str(record), 200),
                         what=_consequence(policy, self.reactor.seconds()))
            elif record is not None and self._due(domain, record, policy):
                fresh = yield self._refresh(directory, domain, record, policy)
            now = self.reactor.seconds()
            known.checked = now
            if fresh is not None:
                # Applied now even with max_age 0, which only forbids keeping it.
                known.policy = fresh
                return None if fresh.mode == NONE else fresh
            if policy is not None and now > policy.expires:
                log.info("sts: {domain}: policy id {id} expired", domain=domain, id=policy.id)
                known.policy = None
                yield self.run_blocking(forget_cached, directory, domain)
                return None
            return applicable(policy, now)
        except Exception:  # noqa: BLE001 (a lookup never fails a delivery by itself)
            log.failure("sts: {domain}: policy lookup failed", domain=domain)
            return applicable(known.policy if known else None, self.reactor.seconds())

    def _ask(self, directory: Path, domain: str, load: bool) -> tuple[Policy | None, Any]:
        """Blocking: the cached policy (when `load`), and the TXT record's policy id (None
        for none, or the TemporaryDNSError)."""
        cached = read_cached(directory, domain) if load else None
        try:
            records = dns_resolver.txt(self.resolver().resolver, f"_mta-sts.{domain}")
        except dns_resolver.TemporaryDNSError as e:
            return cached, e
        return cached, parse_txt(records)

    def _due(self, domain: str, policy_id: str, policy: Policy | None) -> bool:
        """Whether to fetch the policy now: a new id, or the cached one near its end."""
        now = self.reactor.seconds()
        if self._retry_after.get((domain, policy_id), 0.0) > now:
            return False
        if policy is None or policy.id != policy_id:
            return True
        return policy.expires - now < min(REFRESH_BEFORE, policy.max_age / 2)

    @defer.inlineCallbacks
    def _refresh(self, directory: Path, domain: str, policy_id: str,
                 old: Policy | None) -> Any:
        """Fetch and store the policy for `policy_id`; None (logged once) when that fails."""
        try:
            fetched = yield self.fetch(domain)
        except Exception as e:  # noqa: BLE001 (every failure is one log line)
            now = self.reactor.seconds()
            self._retry_after[(domain, policy_id)] = now + FETCH_RETRY
            if (domain, policy_id) not in self._reported:
                self._reported.add((domain, policy_id))
                why = e.args[0] if isinstance(e, (FetchError, PolicyError)) and e.args else \
                    _why(e)
                log.warn(  # noqa: G010 (twisted.logger has no .warning)
                    "sts: {domain}: cannot fetch policy id {id} from {url}: {why}; {what}",
                    domain=domain, id=policy_id,
                    url=policy_url(domain, self.live.config.relay.mta_sts_port),
                    why=printable(str(why), 300), what=_consequence(old, now))
            return None
        self._retry_after.pop((domain, policy_id), None)
        self._reported.discard((domain, policy_id))
        fresh = replace(fetched, id=policy_id, fetched=self.reactor.seconds())
        if not fresh.same_as(old):
            log.info("sts: {domain}: policy id {id}: {policy}", domain=domain, id=policy_id,
                     policy=fresh.describe())
        try:
            yield self.run_blocking(write_cached, directory, domain, fresh)
        except OSError as e:
            log.error("sts: {domain}: cannot store the policy in {directory}: {error}; "
                      "it is used until a restart", domain=domain, directory=str(directory),
                      error=e)
        return fresh

    @defer.inlineCallbacks
    def _fetch_https(self, domain: str) -> Any:
        relay = self.live.config.relay
        host = f"mta-sts.{domain}"
        try:
            hosts = yield self.run_blocking(self.resolver().resolve_host, host)
        except DeliveryError as e:
            raise FetchError(e.text) from None
        addresses = [address for h in hosts for address in h.addresses]
        d = fetch_policy_text(self.reactor, domain, addresses, relay.mta_sts_port,
                              relay.tls_ca_file, relay.connect_timeout)
        d.addTimeout(self.fetch_timeout, self.reactor)
        self._fetching.add(d)
        try:
            text = yield d
        except defer.TimeoutError:
            raise FetchError(f"no complete answer within {self.fetch_timeout:g}s") from None
        except defer.CancelledError:
            raise FetchError("stopped (shutting down)") from None
        finally:
            self._fetching.discard(d)
        return parse_policy(text)


def _consequence(policy: Policy | None, now: float) -> str:
    """What a failed discovery leaves in force, for the log."""
    if applicable(policy, now) is not None:
        return f"keeping policy id {policy.id} (mode {policy.mode}) until it expires"
    return "delivering without MTA-STS"
