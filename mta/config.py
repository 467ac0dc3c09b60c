"""The operator's config: one TOML file read into frozen, typed objects.

`load(path)` reads the file with `tomllib`, checks every key and value, and
returns a `Config`.  Any problem raises `ConfigError` whose message is one
line naming the file and the key (``etc/mta.toml: [limits] recipients: ...``),
so that `twistd` start-up and `mta check-config` say the same thing.

Durations are strings like "90s", "5m", "4h", "5d" (a bare number is seconds);
sizes like "25MB" (KB/MB/GB are powers of 1000, KiB/MiB/GiB powers of 1024,
a bare number is octets).  Relative paths are relative to the working
directory.  Unknown keys are errors: a typo must not silently fall back to a
default.
"""

from __future__ import annotations

import contextvars
import dataclasses
import ipaddress
import math
import os
import re
import socket
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from mta import aliases as aliases_module
from mta.address import AddressError, client_ip, is_valid_domain, parse_mailbox


class ConfigError(Exception):
    """The config cannot be used; the message is one line naming the key."""


DEFAULT_SPOOL = "spool"
SENDMAIL_SOCKET = "public/sendmail.sock"  # under the spool, unless [server] sendmail_socket says

# Whether `load` checks that the files the config names exist (certificates,
# password files, aliases).  Commands that need none of them (`mta passwd`,
# `sendmail`) load with check_files=False, so that a missing certificate, or
# one an ordinary user may not see, does not stop them.
_check_files: contextvars.ContextVar[bool] = contextvars.ContextVar("check_files", default=True)


def _missing(path: Path) -> bool:
    """A named file that is not there, when files are checked."""
    return _check_files.get() and not path.is_file()


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Listener:
    endpoint: str  # a Twisted server endpoint string, e.g. "tcp:25:interface=0.0.0.0"
    role: str  # smtp | submission | odmr ("smtps" in the file is submission with implicit TLS)
    tls: str  # off | starttls | implicit
    require_auth: bool  # AUTH before MAIL (530 5.7.0); default on for submission/odmr
    plaintext_auth: bool  # PLAIN/LOGIN without TLS from non-loopback clients
    # SASL mechanisms this listener may offer; which of them are offered in a
    # session still depends on TLS, the client and the password file.
    auth_mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN", "CRAM-MD5")
    # ATRN [RFC 2645] for authenticated users: always on odmr listeners, on
    # submission listeners when the operator says so.
    atrn: bool = False
    connections: int = 0  # this listener's own ceiling on open connections; 0: only [limits]
    # VRFY and EXPN answered from the alias and user data (RFC 5321 3.5); off:
    # VRFY 252, EXPN 502.  Default on for submission and odmr, off for smtp.
    vrfy: bool = False
    expn: bool = False

    @property
    def name(self) -> str:
        return f"{self.role}[{self.endpoint}]"


@dataclass(frozen=True)
class Route:
    """Where mail for a domain goes: ``maildir:PATH``, ``smtp:[host]:port`` or ``hold``."""

    kind: str  # maildir | smtp | hold
    path: Path | None = None  # maildir
    host: str = ""  # smtp
    port: int | None = None  # smtp; None: not given, [relay] smtp_port applies
    mx: bool = False  # smtp host given without [brackets]: look up its MX records

    def __str__(self) -> str:
        if self.kind == "maildir":
            return f"maildir:{self.path}"
        if self.kind == "smtp":
            host = self.host if self.mx else f"[{self.host}]"
            return f"smtp:{host}:{self.port}" if self.port else f"smtp:{host}"
        return self.kind


@dataclass(frozen=True)
class Domain:
    name: str
    route: Route
    users: tuple[str, ...] = ()
    aliases: Path | None = None
    pull_users: tuple[str, ...] = ()
    etrn_route: Route | None = None
    # Client networks that may ETRN this domain; None: those of [etrn] clients.
    etrn_clients: tuple[IPNetwork, ...] | None = None
    # The aliases file as read at load: lower-case name -> targets (aliases.py).
    alias_entries: dict[str, tuple[str, ...]] | None = field(default=None, compare=False)

    @property
    def held(self) -> bool:
        """Mail for this domain waits for its customer to pull it (ETRN, ATRN, TURN)."""
        return self.route.kind == "hold"


@dataclass(frozen=True)
class DKIMDomain:
    """One ``[dkim."example.org"]`` table: the keys that sign that domain's mail (signing.py)."""

    name: str  # d=
    selector: str
    key: Path
    # An Ed25519 key signing beside an RSA `key` (dual signing, RFC 8463); optional.
    ed25519_selector: str = ""
    ed25519_key: Path | None = None
    # The keys as read at load, in signing order (signing.SigningKey); () when files
    # are not checked.  Not compared: a reload reads them again.
    keys: tuple[Any, ...] = field(default=(), compare=False, repr=False)


@dataclass(frozen=True)
class ServerSection:
    hostname: str
    spool: Path
    postmaster: str
    aliases: Path | None = None  # applies at every local domain (aliases.py)
    virtual: Path | None = None  # virtual aliases: address or @domain -> addresses
    recipient_delimiter: str = "+"  # user+tag@ is user's; "" = off
    alias_entries: dict[str, tuple[str, ...]] | None = field(default=None, compare=False)
    virtual_entries: dict[str, tuple[str, ...]] | None = field(default=None, compare=False)
    # Where local users hand messages to the running server (`sendmail`);
    # None: no such socket.
    sendmail_socket: Path | None = None
    # SMTP sessions of the smtp and submission listeners in a second process
    # (receiver.py), receiving and delivering on two cores: true, false or "auto".
    receiver_process: bool | str = "auto"
    # What that came to when the file was read (`_two_processes`): not a key.
    two_processes: bool = field(default=False, compare=False)
    # Steps of nice the main process lowers its priority by once a receiving process
    # serves the sessions, so that they go first (receiver.py); 0: as it was started.
    main_process_nice: int = 10


@dataclass(frozen=True)
class TLSSection:
    certificate: Path | None
    key: Path | None

    @property
    def enabled(self) -> bool:
        return self.certificate is not None


@dataclass(frozen=True)
class AuthSection:
    passwords: Path | None
    max_failures: int  # per session, then 421 and close
    failures_per_client: int  # per client address within failure_window
    failures_total: int  # from all untrusted addresses together within failure_window
    failure_window: float
    failure_delay: float  # seconds added to each failed attempt's reply
    # Authenticated senders may use only their own addresses (553 5.7.1 otherwise):
    # USER@<any configured domain or the hostname>, USER itself when it is an
    # address, and what `senders` lists for USER ("addr@dom" or "@dom").
    sender_restriction: bool = False
    senders: dict[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class RelaySection:
    mynetworks: tuple[IPNetwork, ...]
    smarthost: str
    smarthost_user: str
    smarthost_password_file: Path | None
    smarthost_tls: str  # required | verify | opportunistic
    nameservers: tuple[tuple[str, int], ...]
    dns_timeout: float
    smtp_port: int
    retry_min: float
    retry_max: float
    lifetime: float
    delay_warning: float
    concurrency: int
    concurrency_per_destination: int
    tls_verify: bool  # check certificates of MX hosts (off: opportunistic TLS, as Postfix "may")
    connect_timeout: float
    tls_ca_file: Path | None = None  # PEM CA certificates for verified TLS; None: the system's
    # How long our SMTP client waits at each stage [RFC 5321 4.5.3.2]; its defaults.
    smtp_greeting_timeout: float = 300.0
    smtp_command_timeout: float = 300.0  # EHLO, STARTTLS, AUTH, RSET, QUIT
    smtp_mail_timeout: float = 300.0
    smtp_rcpt_timeout: float = 300.0
    smtp_data_init_timeout: float = 120.0
    smtp_data_block_timeout: float = 180.0
    smtp_data_done_timeout: float = 600.0
    # A host that timed out is not tried again for this long ("0": no memory).
    dead_host_time: float = 300.0
    masquerade: str = ""  # outbound SMTP: the sender user@HOSTNAME becomes user@masquerade
    dkim_domain: str = "from"  # whose [dkim] key signs: the From: header's domain, or "sender"
    # MTA-STS [RFC 8461] for mail delivered by MX to domains [tls_policy] does not name.
    mta_sts: bool = True
    mta_sts_port: int = 443  # where policy files are fetched (https://mta-sts.DOMAIN/...)


@dataclass(frozen=True)
class LimitsSection:
    message_size: int
    recipients: int
    connections: int
    connections_per_client: int
    errors: int
    command_timeout: float
    data_timeout: float
    command_line_length: int
    received_headers: int
    # Port-25 early-talker check: wait this long before the 220 and refuse a
    # client that talks first (554 5.5.0).  0 disables it.
    greeting_delay: float = 0.0
    # Kept for clients in mynetworks and for listeners other than role "smtp" (submission,
    # ODMR): untrusted port-25 clients cannot take the last `connections_reserved`
    # (default: a tenth of `connections`).
    connections_reserved: int = 20
    connections_per_network: int = 50  # untrusted clients of one /24 (IPv4) or /64 (IPv6)
    connection_rate: int = 60  # new connections per client address per minute (untrusted)
    data_deadline: float = 1800.0  # a whole DATA (or BDAT chunk), however steadily it trickles


@dataclass(frozen=True)
class ETRNSection:
    """Who may ask for a queue run with ETRN [RFC 1985], and how often."""

    clients: tuple[IPNetwork, ...]  # for domains without their own etrn_clients
    per_client: int  # ETRN commands one client address may give within `window`
    window: float


@dataclass(frozen=True)
class Pull:
    """One ``[[pull]]`` entry: fetch our mail from a provider on a schedule (mta odmr / etrn)."""

    protocol: str  # odmr | etrn
    host: str
    port: int
    domains: tuple[str, ...]  # odmr: () = every domain the user may pull
    interval: float
    user: str = ""
    password_file: Path | None = None
    tls_verify: bool = True  # odmr: check the provider's certificate when it offers STARTTLS
    ca_file: Path | None = None  # PEM CA certificates for that check; None: the system's

    @property
    def server(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class LogSection:
    json_file: Path | None = None  # one JSON object per line per event, for log shippers


@dataclass(frozen=True)
class MetricsSection:
    endpoint: str = ""  # a Twisted server endpoint serving /metrics; "" = off


DEBIAN_PUBLIC_SUFFIX_LIST = "/usr/share/publicsuffix/public_suffix_list.dat"  # Debian's publicsuffix


@dataclass(frozen=True)
class ChecksSection:
    """What port 25 checks of mail from untrusted clients (mta/checks/, DESIGN.md 12)."""

    spf: str = "record"  # off | record | reject (at MAIL) | reject-after-data
    dkim: str = "record"  # off | record
    dmarc: str = "record"  # off | record | enforce
    # For DMARC's organisational domain; None: the copy shipped with publicsuffixlist.
    public_suffix_list: Path | None = None
    quarantine_header: str = "X-Quarantine"  # added to DMARC p=quarantine failures (enforce)
    threads: int = 10  # the checks' own thread pool: DNS lookups and signature checks

    @property
    def enabled(self) -> bool:
        return (self.spf, self.dkim, self.dmarc) != ("off", "off", "off")
# [tls_policy] values (as Postfix's smtp_tls_policy_maps levels): how strictly the TLS of a
# destination domain's servers is checked; "sts" leaves it to MTA-STS.
TLS_POLICIES = ("none", "may", "encrypt", "verify", "sts")


@dataclass(frozen=True)
class Config:
    path: Path | None
    server: ServerSection
    listeners: tuple[Listener, ...]
    tls: TLSSection
    auth: AuthSection
    relay: RelaySection
    domains: dict[str, Domain]
    limits: LimitsSection
    etrn: ETRNSection = field(default_factory=lambda: ETRNSection(_ANYWHERE, 10, 60.0))
    pulls: tuple[Pull, ...] = ()
    log: LogSection = field(default_factory=LogSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    dkim: dict[str, DKIMDomain] = field(default_factory=dict)
    checks: ChecksSection = field(default_factory=ChecksSection)
    tls_policy: dict[str, str] = field(default_factory=dict)  # domain -> one of TLS_POLICIES

    @cached_property
    def addresses(self) -> aliases_module.Addresses:
        """The local address space: local domains, users, aliases (built once per config)."""
        return aliases_module.Addresses(self)

    def domain_for(self, domain: str) -> Domain | None:
        """The configured domain for `domain` (lower case, no trailing dot)."""
        return self.domains.get(domain.lower().rstrip("."))

    def is_mynetwork(self, address: str) -> bool:
        # Asked four times or so a connection: each answer is kept, beside the fields
        # (equality and `mta config` ignore it), for as long as this config is in force.
        known = self.__dict__.get("_mynetwork")
        if known is None:
            known = self.__dict__["_mynetwork"] = {}
        found = known.get(address)
        if found is None:
            ip = client_ip(address)
            found = ip is not None and any(ip in net for net in self.relay.mynetworks)
            if len(known) >= 4096:
                known.clear()  # a flood of addresses from outside: start again
            known[address] = found
        return found


class Live:
    """The config in force: one object that sessions, the policy, ETRN/ATRN and the
    relayer read, whose `config` a reload replaces in one assignment (`swap`).

    Readers take ``live.config`` when a unit of work starts (a connection, a
    transaction, a delivery attempt) and keep that object to its end.  Parts
    that derive state from the config (the router's smart host, the MX
    resolver, the concurrency limits) `subscribe` and rebuild it on a swap.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.generation = 0
        self._subscribers: list[Callable[[Config], None]] = []

    @classmethod
    def of(cls, config: Config | Live) -> Live:
        return config if isinstance(config, Live) else cls(config)

    def subscribe(self, callback: Callable[[Config], None]) -> None:
        self._subscribers.append(callback)

    def swap(self, config: Config) -> None:
        self.config = config
        self.generation += 1
        for callback in self._subscribers:
            callback(config)


# -- value parsers -------------------------------------------------------------

_ANYWHERE = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))
ODMR_PORT = 366  # RFC 2645 6
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*\Z")
_DURATION_UNITS = {None: 1, "ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*\Z", re.IGNORECASE)
_SIZE_UNITS = {
    None: 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9,
    "kib": 2**10, "mib": 2**20, "gib": 2**30,
}


def parse_duration(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a duration like \"90s\", \"5m\", \"4h\" or \"5d\"")  # noqa: TRY004 (callers catch ValueError)
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    raise ValueError(f"expected a duration like \"90s\", \"5m\", \"4h\" or \"5d\", got {value!r}")


def parse_size(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            unit = m.group(2).lower() if m.group(2) else None
            return int(float(m.group(1)) * _SIZE_UNITS[unit])
    raise ValueError(f"expected a size like \"25MB\" or a number of octets, got {value!r}")


def parse_route(value: str, base: Path | None = None) -> Route:
    """``maildir:PATH`` | ``smtp:[host]:port`` | ``smtp:host[:port]`` (MX lookup) | ``hold``."""
    if not isinstance(value, str):
        raise ValueError("expected a route string")  # noqa: TRY004 (callers catch ValueError)
    kind, colon, rest = value.partition(":")
    kind = kind.strip().lower()
    if kind == "hold" and not colon:
        return Route("hold")
    if kind == "maildir" and rest:
        return Route("maildir", path=Path(rest))
    if kind in ("smtp", "relay") and rest:
        port = None
        mx = True
        if rest.startswith("["):
            host, bracket, tail = rest[1:].partition("]")
            if not bracket or not host:
                raise ValueError(f"bad route {value!r}: unbalanced [ ]")
            mx = False
            if tail:
                if not tail.startswith(":"):
                    raise ValueError(f"bad route {value!r}")
                port = _parse_port(tail[1:], value)
        else:
            host, colon2, port_text = rest.rpartition(":") if rest.count(":") == 1 else (rest, "", "")
            if colon2:
                port = _parse_port(port_text, value)
            else:
                host = rest
        if not _valid_host(host):
            raise ValueError(f"bad host in route {value!r}")
        return Route("smtp", host=host, port=port, mx=mx)
    raise ValueError(
        f"bad route {value!r}: expected \"maildir:PATH\", \"smtp:[host]:port\" or \"hold\""
    )


def _parse_port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"bad port in {whole!r}")
    return int(text)


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return is_valid_domain(host)


def parse_hostport(value: str, default_port: int) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]:port`` or ``v6``."""
    value = value.strip()
    if value.startswith("["):
        host, _, tail = value[1:].partition("]")
        port = _parse_port(tail[1:], value) if tail.startswith(":") else default_port
    elif value.count(":") == 1:
        host, _, port_text = value.partition(":")
        port = _parse_port(port_text, value)
    else:
        host, port = value, default_port
    if not host or not _valid_host(host):
        raise ValueError(f"bad host {value!r}")
    return host, port


# -- the reader ----------------------------------------------------------------

class _Section:
    """Reads one TOML table, naming the key in every error and refusing unknown keys."""

    def __init__(self, source: str, name: str, table: Any) -> None:
        self.source = source
        self.name = name
        if not isinstance(table, dict):
            raise self.error(None, "expected a table")
        self.table = dict(table)
        self.seen: set[str] = set()

    def error(self, key: str | None, why: str) -> ConfigError:
        where = f"[{self.name}]" if self.name else "top level"
        if key is not None:
            where += f" {key}"
        return ConfigError(f"{self.source}: {where}: {why}")

    def get(self, key: str, default: Any, convert: Callable[[Any], Any] | None = None,
            kind: type | tuple[type, ...] | None = None) -> Any:
        self.seen.add(key)
        if key not in self.table:
            return convert(default) if convert is not None and default is not None else default
        value = self.table[key]
        if kind is not None and (not isinstance(value, kind) or isinstance(value, bool) and kind is int):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            type_names = {"str": "a string", "int": "an integer", "bool": "true or false",
                          "list": "a list", "dict": "a table"}
            raise self.error(key, f"expected {type_names.get(names, names)}, got {value!r}")
        if convert is not None:
            try:
                return convert(value)
            except (ValueError, TypeError, AddressError) as e:
                raise self.error(key, str(e)) from None
        return value

    def positive_int(self, key: str, default: int) -> int:
        value = self.get(key, default, kind=int)
        if value < 1:
            raise self.error(key, f"must be at least 1, got {value}")
        return value

    def strings(self, key: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        value = self.get(key, list(default), kind=list)
        for item in value:
            if not isinstance(item, str):
                raise self.error(key, f"expected a list of strings, got {item!r}")
        return tuple(value)

    def path(self, key: str, default: str) -> Path | None:
        value = self.get(key, default, kind=str)
        return Path(value) if value else None

    def finish(self) -> None:
        unknown = sorted(set(self.table) - self.seen)
        if unknown:
            raise self.error(unknown[0], "unknown key")


def _network(value: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"bad network {value!r}, expected e.g. \"192.168.1.0/24\"") from None


def _mailbox_or_empty(value: str) -> str:
    if value:
        parse_mailbox(value)
    return value


def _choice(*choices: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}; got {value!r}")
        return value
    return check


def load(path: str | Path, check_files: bool = True) -> Config:
    """The config in `path`; with check_files=False, the files it names (certificate,
    key, password files, aliases) need not exist (see `_check_files`)."""
    token = _check_files.set(check_files)
    try:
        return _load(Path(path))
    finally:
        _check_files.reset(token)


def _load(path: Path) -> Config:
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return from_dict(data, str(path), path)


def from_dict(data: dict[str, Any], source: str = "<config>", path: Path | None = None) -> Config:
    top = _Section(source, "", data)
    server = _server(_Section(source, "server", top.get("server", {}, kind=dict)))
    listeners = _listeners(source, top.get("listeners", [], kind=list))
    tls = _tls(_Section(source, "tls", top.get("tls", {}, kind=dict)))
    auth = _auth(_Section(source, "auth", top.get("auth", {}, kind=dict)))
    relay = _relay(_Section(source, "relay", top.get("relay", {}, kind=dict)))
    domains = _domains(source, top.get("domains", {}, kind=dict))
    limits = _limits(_Section(source, "limits", top.get("limits", {}, kind=dict)))
    etrn = _etrn(_Section(source, "etrn", top.get("etrn", {}, kind=dict)))
    pulls = _pulls(source, top.get("pull", [], kind=list))
    log = _log(_Section(source, "log", top.get("log", {}, kind=dict)))
    metrics = _metrics(_Section(source, "metrics", top.get("metrics", {}, kind=dict)))
    dkim = _dkim(source, top.get("dkim", {}, kind=dict))
    checks = _checks(_Section(source, "checks", top.get("checks", {}, kind=dict)))
    tls_policy = _tls_policy(_Section(source, "tls_policy", top.get("tls_policy", {}, kind=dict)))
    top.finish()

    for i, listener in enumerate(listeners):
        if listener.tls != "off" and not tls.enabled:
            raise ConfigError(
                f"{source}: [tls] certificate: required by listener {listener.endpoint} "
                f"(tls = \"{listener.tls}\")"
            )
        if listener.require_auth and auth.passwords is None:
            # Nobody could ever send there: say so now rather than answer 530 forever.
            raise ConfigError(
                f"{source}: [auth] passwords: required by listener #{i + 1} "
                f"{listener.endpoint} (role {listener.role}: AUTH before MAIL)")
    if server.receiver_process == "auto":
        server = dataclasses.replace(server, two_processes=_auto(domains, listeners)[0])
    return Config(path, server, listeners, tls, auth, relay, domains, limits, etrn, pulls,
                  log, metrics, dkim, checks, tls_policy)


def cores() -> int:
    """The cores this process may use: its CPU affinity (a container's cpuset,
    `taskset`), and no more than a cgroup's CPU quota rounds up to (`docker --cpus`,
    systemd's CPUQuota=)."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    quota = cpu_quota()
    return count if quota is None else max(1, min(count, math.ceil(quota)))


def cpu_quota(proc: Path = Path("/proc/self")) -> float | None:
    """The CPUs the cgroup quotas over this process allow (the smallest of its cgroup's
    and those above it, cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``), or None."""
    try:
        mountinfo = (proc / "mountinfo").read_text()
        cgroups = (proc / "cgroup").read_text()
    except OSError:
        return None
    mounts: dict[str, tuple[str, str]] = {}  # "v2" or "v1" -> (root in the hierarchy, mount point)
    for line in mountinfo.splitlines():
        before, _, after = line.partition(" - ")
        fields, kind = before.split(), after.split()
        if len(fields) < 5 or len(kind) < 3:
            continue
        if kind[0] == "cgroup2":
            mounts.setdefault("v2", (fields[3], fields[4]))
        elif kind[0] == "cgroup" and "cpu" in kind[2].split(","):
            mounts.setdefault("v1", (fields[3], fields[4]))
    quotas = []
    for line in cgroups.splitlines():
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        version = "v2" if hierarchy == "0" and not controllers else \
            "v1" if "cpu" in controllers.split(",") else None
        if version is None or version not in mounts:
            continue
        root, point = mounts[version]
        if not path.startswith(root):
            continue
        directory = Path(point, path[len(root):].lstrip("/"))
        while True:
            quotas += _quota_in(directory, version)
            if directory == Path(point):
                break
            directory = directory.parent
    return min(quotas) if quotas else None


def _quota_in(directory: Path, version: str) -> list[float]:
    try:
        if version == "v2":
            quota, period = (directory / "cpu.max").read_text().split()
        else:
            quota = (directory / "cpu.cfs_quota_us").read_text().strip()
            period = (directory / "cpu.cfs_period_us").read_text().strip()
        if quota in ("max", "-1"):
            return []
        return [int(quota) / int(period)] if int(period) > 0 else []
    except (OSError, ValueError):
        return []


def where_sessions_run(config: Config) -> str:
    """Where the SMTP sessions run, and why ([server] receiver_process), for people."""
    server = config.server
    text = ("sessions in a receiving process" if server.two_processes
            else "sessions in the main process")
    if server.receiver_process != "auto":
        return f"{text} (receiver_process = {str(server.receiver_process).lower()})"
    _, why = _auto(config.domains, config.listeners)
    return f'{text} (receiver_process "auto": {why})'


def handed_over(listener: Listener) -> bool:
    """Whether a receiving process would serve `listener`: an smtp or submission one
    without ATRN, on a plain TCP or UNIX endpoint (receiver.delegated checks the
    endpoint Twisted made of it too)."""
    return (listener.role in ("smtp", "submission") and not listener.atrn
            and listener.endpoint.split(":", 1)[0].lower() in ("tcp", "tcp6", "unix"))


def _auto(domains: dict[str, Domain], listeners: tuple[Listener, ...]) -> tuple[bool, str]:
    """What ``receiver_process = "auto"`` gives, and why: a second process where there is
    a second core for it, unless a domain has pull_users, who may pull it with TURN,
    which a receiving process cannot serve (it does not hold the queue), or a listener
    would stay in the main process (ATRN, an ``ssl:`` endpoint), which would count its
    connections and AUTH failures apart from the others'."""
    count = cores()
    if count < 2:
        return False, "one core"
    if any(domain.pull_users for domain in domains.values()):
        return False, "a domain has pull_users, who may pull with TURN"
    kept = next((x for x in listeners if not handed_over(x)), None)
    if kept is not None:
        return False, f"{kept.name} stays in the main process"
    return True, f"{count} cores"


def _dkim(source: str, table: dict[str, Any]) -> dict[str, DKIMDomain]:
    """``[dkim."DOMAIN"]`` tables; their keys are read now (signing.py), so that a
    reload reads them again and a bad key stops start-up, naming the file."""
    if not table:
        return {}
    from mta import signing  # dkimpy and cryptography: only for a config that signs
    result = {}
    for name, item in table.items():
        s = _Section(source, f'dkim."{name}"', item)
        domain = name.lower().rstrip(".")
        if not is_valid_domain(domain):
            raise s.error(None, "not a valid domain name")
        pairs = []
        for selector_key, key_key, required in (("selector", "key", True),
                                                ("ed25519_selector", "ed25519_key", False)):
            selector = s.get(selector_key, "", kind=str)
            path = s.path(key_key, "")
            if not selector and path is None and not required:
                continue
            if not selector:
                raise s.error(selector_key, f"required beside {key_key}, e.g. \"s1\"")
            if not signing.valid_selector(selector):
                raise s.error(selector_key, f"not a valid selector (DNS labels): {selector!r}")
            if path is None:
                raise s.error(key_key, f"required: the private key file, e.g. "
                                       f"\"etc/dkim/{domain}.{selector}.key\" "
                                       f"(mta dkim keygen {domain} {selector})")
            pairs.append((selector_key, key_key, selector, path))
        s.finish()
        if len(pairs) == 2 and pairs[0][2] == pairs[1][2]:
            raise s.error("ed25519_selector", "must differ from selector: each key has its "
                                              "own DNS record")
        keys = []
        if _check_files.get():
            for selector_key, key_key, selector, path in pairs:
                try:
                    key = signing.load_key(path, domain, selector,
                                           "ed25519" if key_key == "ed25519_key" else "rsa")
                except signing.DKIMKeyError as e:
                    raise s.error(key_key, str(e)) from None
                if key_key == "ed25519_key" and key.algorithm != signing.ED25519_SHA256:
                    raise s.error(key_key, f"{path} is an RSA key; ed25519_key takes an "
                                           "Ed25519 one (mta dkim keygen --type ed25519)")
                keys.append(key)
            if len(keys) == 2 and keys[0].algorithm == signing.ED25519_SHA256:
                raise s.error("key", f"{pairs[0][3]} is an Ed25519 key: with ed25519_key "
                                     "beside it, key must be the RSA one")
        result[domain] = DKIMDomain(
            name=domain, selector=pairs[0][2], key=pairs[0][3],
            ed25519_selector=pairs[1][2] if len(pairs) == 2 else "",
            ed25519_key=pairs[1][3] if len(pairs) == 2 else None, keys=tuple(keys))
    return result


def _log(s: _Section) -> LogSection:
    section = LogSection(json_file=s.path("json_file", ""))
    s.finish()
    return section


def _tls_policy(s: _Section) -> dict[str, str]:
    """``[tls_policy]``: ``"example.com" = "verify"``, one destination domain per key."""
    table = {}
    for name, value in s.table.items():
        if isinstance(value, dict):
            # TOML reads an unquoted example.com as a table "example" holding "com".
            raise s.error(name, 'quote the domain name: "example.com" = "verify"')
        policy = s.get(name, None, _choice(*TLS_POLICIES), kind=str)
        domain = name.lower().rstrip(".")
        if not is_valid_domain(domain):
            raise s.error(name, "not a valid domain name")
        if domain in table:
            raise s.error(name, f"{domain} is named twice")
        table[domain] = policy
    s.finish()
    return table


def _metrics(s: _Section) -> MetricsSection:
    section = MetricsSection(endpoint=s.get("endpoint", "", kind=str))
    s.finish()
    return section


_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+\Z")  # RFC 5322 2.2: printable ASCII but ":"


def _checks(s: _Section) -> ChecksSection:
    section = ChecksSection(
        spf=s.get("spf", "record", _choice("off", "record", "reject", "reject-after-data"),
                  kind=str),
        dkim=s.get("dkim", "record", _choice("off", "record"), kind=str),
        dmarc=s.get("dmarc", "record", _choice("off", "record", "enforce"), kind=str),
        public_suffix_list=s.path("public_suffix_list", ""),
        quarantine_header=s.get("quarantine_header", "X-Quarantine", kind=str),
        threads=s.positive_int("threads", 10),
    )
    if not _FIELD_NAME.match(section.quarantine_header):
        raise s.error("quarantine_header", f"not a header field name: "
                                           f"{section.quarantine_header!r}")
    if section.dmarc != "off":
        # DMARC weighs the SPF and DKIM results [RFC 7489 4.2]: it needs both.
        for key in ("spf", "dkim"):
            if getattr(section, key) == "off":
                raise s.error(key, f"dmarc = \"{section.dmarc}\" needs {key} results: "
                                   f"set {key} = \"record\" or dmarc = \"off\"")
        if section.public_suffix_list is not None and _missing(section.public_suffix_list):
            raise s.error("public_suffix_list", f"no such file: {section.public_suffix_list} "
                                                f"(leave it out to use the list shipped with "
                                                f"mta, or set dmarc = \"off\")")
    s.finish()
    return section


def _server(s: _Section) -> ServerSection:
    hostname = s.get("hostname", "", kind=str) or socket.getfqdn()
    if not is_valid_domain(hostname):
        raise s.error("hostname", f"not a valid host name: {hostname!r}")
    postmaster = s.get("postmaster", "", _mailbox_or_empty, kind=str)
    spool = s.get("spool", DEFAULT_SPOOL, kind=str)
    if not spool:
        # Path("") is the working directory, whose tmp/ recovery would empty.
        raise s.error("spool", "must name a directory, e.g. \"spool\"")
    delimiter = s.get("recipient_delimiter", "+", kind=str)
    if len(delimiter) > 1 or delimiter and (delimiter.isalnum() or delimiter in '@."\\ '
                                            or not delimiter.isprintable()):
        raise s.error("recipient_delimiter", f"expected one character such as \"+\" or "
                                             f"\"-\", or \"\" for none; got {delimiter!r}")
    aliases = s.path("aliases", "")
    virtual = s.path("virtual", "")
    socket_path = s.get("sendmail_socket", "", kind=str)
    receiver_process = s.get("receiver_process", "auto")
    if receiver_process not in (True, False, "auto") or type(receiver_process) not in (bool, str):
        raise s.error("receiver_process", f"expected true, false or \"auto\", got {receiver_process!r}")
    main_process_nice = s.get("main_process_nice", 10, kind=int)
    if not 0 <= main_process_nice <= 19:
        raise s.error("main_process_nice", f"expected 0 to 19 (steps of nice; 0 leaves the "
                                           f"priority alone), got {main_process_nice}")
    section = ServerSection(
        hostname=hostname,
        spool=Path(spool),
        postmaster=postmaster,
        aliases=aliases,
        virtual=virtual,
        recipient_delimiter=delimiter,
        alias_entries=_alias_file(s, "aliases", aliases, aliases_module.read_aliases),
        virtual_entries=_alias_file(s, "virtual", virtual, aliases_module.read_virtual),
        sendmail_socket=(None if socket_path == "off" else
                         Path(socket_path) if socket_path else Path(spool) / SENDMAIL_SOCKET),
        receiver_process=receiver_process,
        two_processes=receiver_process is True,
        main_process_nice=main_process_nice,
    )
    s.finish()
    return section


def _alias_file(s: _Section, key: str, path: Path | None,
                read: Callable[[Path], dict[str, tuple[str, ...]]]
                ) -> dict[str, tuple[str, ...]] | None:
    """An aliases or virtual file read now, so that a reload reads it again."""
    if path is None:
        return None
    if not _check_files.get():
        try:  # `mta passwd`, `sendmail`: the aliases are no matter to them
            return read(path)
        except (OSError, aliases_module.AliasFileError):
            return None
    if not path.is_file():
        raise s.error(key, f"no such file: {path}")
    try:
        return read(path)
    except aliases_module.AliasFileError as e:
        raise s.error(key, str(e)) from None


def _listeners(source: str, items: list[Any]) -> tuple[Listener, ...]:
    if not items:
        return (Listener("tcp:2525:interface=127.0.0.1", "smtp", "off", False, False),)
    result = []
    for i, item in enumerate(items):
        s = _Section(source, f"listeners #{i + 1}", item)
        endpoint = s.get("endpoint", None, kind=str)
        if not endpoint:
            raise s.error("endpoint", "required, e.g. \"tcp:25\"")
        role = s.get("role", "smtp", _choice("smtp", "submission", "smtps", "odmr"), kind=str)
        tls = s.get("tls", "implicit" if role == "smtps" else "off",
                    _choice("off", "starttls", "implicit"), kind=str)
        if role == "smtps":
            # RFC 8314 3.3: message submission over implicit TLS (port 465).
            if tls != "implicit":
                raise s.error("tls", "role \"smtps\" is submission with tls = \"implicit\"")
            role = "submission"
        require_auth = s.get("require_auth", role in ("submission", "odmr"), kind=bool)
        plaintext_auth = s.get("plaintext_auth", False, kind=bool)
        mechanisms = tuple(m.upper() for m in s.strings(
            "auth_mechanisms", ("PLAIN", "LOGIN", "CRAM-MD5")))
        unknown = set(mechanisms) - {"PLAIN", "LOGIN", "CRAM-MD5"}
        if unknown:
            raise s.error("auth_mechanisms", f"expected PLAIN, LOGIN or CRAM-MD5, "
                                             f"got {min(unknown)!r}")
        atrn = s.get("atrn", role == "odmr", kind=bool)
        if atrn and role not in ("odmr", "submission"):
            raise s.error("atrn", "ATRN is offered on odmr and submission listeners only")
        if role == "odmr" and not atrn:
            raise s.error("atrn", "an odmr listener exists to offer ATRN")
        connections = s.get("connections", 0, kind=int)
        if connections < 0:
            raise s.error("connections", "must be 0 (no own ceiling) or more")
        # RFC 5321 3.5.3: off on port 25, where harvesting addresses is the usual abuse.
        vrfy = s.get("vrfy", role != "smtp", kind=bool)
        expn = s.get("expn", role != "smtp", kind=bool)
        s.finish()
        result.append(Listener(endpoint, role, tls, require_auth, plaintext_auth, mechanisms,
                               atrn, connections, vrfy, expn))
    return tuple(result)


def _tls(s: _Section) -> TLSSection:
    certificate = s.path("certificate", "")
    key = s.path("key", "")
    s.finish()
    if certificate is not None:
        if _missing(certificate):
            raise s.error("certificate", f"no such file: {certificate}")
        key = key or certificate
        if _missing(key):
            raise s.error("key", f"no such file: {key}")
    elif key is not None:
        raise s.error("certificate", "required when key is set")
    return TLSSection(certificate, key)


def _auth(s: _Section) -> AuthSection:
    passwords = s.path("passwords", "")
    section = AuthSection(
        passwords=passwords,
        max_failures=s.positive_int("max_failures", 3),
        failures_per_client=s.positive_int("failures_per_client", 10),
        failures_total=s.positive_int("failures_total", 100),
        failure_window=s.get("failure_window", "1h", parse_duration),
        failure_delay=s.get("failure_delay", "1s", parse_duration),
        sender_restriction=s.get("sender_restriction", False, kind=bool),
        senders=_senders(s),
    )
    s.finish()
    return section


def _senders(s: _Section) -> dict[str, tuple[str, ...]]:
    """``[auth.senders]``: user name -> addresses ("a@dom") and domains ("@dom") it may use."""
    table = s.get("senders", {}, kind=dict)
    senders = {}
    for user, items in table.items():
        key = f"senders.{user}"
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise s.error(key, "expected a list of addresses (\"alice@example.org\") "
                               "or domains (\"@example.org\")")
        senders[user] = tuple(_sender_pattern(s, key, item) for item in items)
    return senders


def _sender_pattern(s: _Section, key: str, item: str) -> str:
    if item.startswith("@"):
        if not is_valid_domain(item[1:], utf8=True):
            raise s.error(key, f"bad domain {item!r}")
        return item.lower().rstrip(".")
    try:
        parse_mailbox(item, utf8=True)
    except AddressError as e:
        raise s.error(key, f"bad address {item!r}: {e}") from None
    return item


def _relay(s: _Section) -> RelaySection:
    networks = tuple(_network_or_error(s, v) for v in s.strings(
        "mynetworks", ("127.0.0.0/8", "::1/128")))
    smarthost = s.get("smarthost", "", kind=str)
    if smarthost:
        s.get("smarthost", "", lambda v: parse_hostport(v, 25))
    nameservers = tuple(_nameserver(s, v) for v in s.strings("nameservers"))
    section = RelaySection(
        mynetworks=networks,
        smarthost=smarthost,
        smarthost_user=s.get("smarthost_user", "", kind=str),
        smarthost_password_file=s.path("smarthost_password_file", ""),
        # With credentials, the smart host's certificate is checked unless the operator
        # says otherwise: a password must not go to whoever answers in between.
        smarthost_tls=s.get("smarthost_tls",
                            "verify" if s.get("smarthost_user", "", kind=str) else "required",
                            _choice("required", "verify", "opportunistic"), kind=str),
        nameservers=nameservers,
        dns_timeout=s.get("dns_timeout", "10s", parse_duration),
        smtp_port=s.get("smtp_port", 25, _port, kind=int),
        retry_min=s.get("retry_min", "5m", parse_duration),
        retry_max=s.get("retry_max", "1h", parse_duration),
        lifetime=s.get("lifetime", "5d", parse_duration),
        delay_warning=s.get("delay_warning", "4h", parse_duration),
        concurrency=s.positive_int("concurrency", 20),
        concurrency_per_destination=s.positive_int("concurrency_per_destination", 5),
        tls_verify=s.get("tls_verify", False, kind=bool),
        connect_timeout=s.get("connect_timeout", "30s", parse_duration),
        tls_ca_file=s.path("tls_ca_file", ""),
        smtp_greeting_timeout=s.get("smtp_greeting_timeout", "5m", parse_duration),
        smtp_command_timeout=s.get("smtp_command_timeout", "5m", parse_duration),
        smtp_mail_timeout=s.get("smtp_mail_timeout", "5m", parse_duration),
        smtp_rcpt_timeout=s.get("smtp_rcpt_timeout", "5m", parse_duration),
        smtp_data_init_timeout=s.get("smtp_data_init_timeout", "2m", parse_duration),
        smtp_data_block_timeout=s.get("smtp_data_block_timeout", "3m", parse_duration),
        smtp_data_done_timeout=s.get("smtp_data_done_timeout", "10m", parse_duration),
        dead_host_time=s.get("dead_host_time", "5m", parse_duration),
        masquerade=s.get("masquerade", "", _masquerade_domain, kind=str),
        dkim_domain=s.get("dkim_domain", "from", _choice("from", "sender"), kind=str),
        mta_sts=s.get("mta_sts", True, kind=bool),
        mta_sts_port=s.get("mta_sts_port", 443, _port, kind=int),
    )
    for key in ("smtp_greeting_timeout", "smtp_command_timeout", "smtp_mail_timeout",
                "smtp_rcpt_timeout", "smtp_data_init_timeout", "smtp_data_block_timeout",
                "smtp_data_done_timeout"):
        if getattr(section, key) <= 0:
            raise s.error(key, "must be above zero")
    if section.smarthost_user and section.smarthost_password_file is None:
        raise s.error("smarthost_password_file", "required when smarthost_user is set")
    if section.smarthost_password_file and _missing(section.smarthost_password_file):
        raise s.error("smarthost_password_file", f"no such file: {section.smarthost_password_file}")
    if section.tls_ca_file is not None and _missing(section.tls_ca_file):
        raise s.error("tls_ca_file", f"no such file: {section.tls_ca_file}")
    if section.retry_min <= 0 or section.retry_max < section.retry_min:
        raise s.error("retry_max", "must be at least retry_min, and retry_min above zero")
    s.finish()
    return section


def _masquerade_domain(value: str) -> str:
    value = value.lower().rstrip(".")
    if value and not is_valid_domain(value):
        raise ValueError(f"expected a domain such as \"example.org\", got {value!r}")
    return value


def _port(value: int) -> int:
    if not 0 < value < 65536:
        raise ValueError(f"expected a port number 1-65535, got {value}")
    return value


def _network_or_error(s: _Section, value: str, key: str = "mynetworks") -> IPNetwork:
    try:
        return _network(value)
    except ValueError as e:
        raise s.error(key, str(e)) from None


def _nameserver(s: _Section, value: str) -> tuple[str, int]:
    try:
        host, port = parse_hostport(value, 53)
        ipaddress.ip_address(host)
        return host, port
    except ValueError:
        raise s.error("nameservers", f"expected \"ADDRESS[:PORT]\", got {value!r}") from None


def _domains(source: str, table: dict[str, Any]) -> dict[str, Domain]:
    domains = {}
    for name, item in table.items():
        s = _Section(source, f'domains."{name}"', item)
        key = name.lower().rstrip(".")
        if not is_valid_domain(key):
            raise s.error(None, "not a valid domain name")
        route = s.get("route", None, parse_route, kind=str)
        if route is None:
            raise s.error("route", "required: \"maildir:PATH\", \"smtp:[host]:port\" or \"hold\"")
        etrn = s.get("etrn_route", None, parse_route, kind=str)
        if etrn is not None and etrn.kind != "smtp":
            raise s.error("etrn_route", "must be an smtp: route")
        etrn_clients = None
        if "etrn_clients" in s.table:
            etrn_clients = tuple(_network_or_error(s, v, "etrn_clients")
                                 for v in s.strings("etrn_clients"))
        aliases = s.path("aliases", "")
        domain = Domain(
            name=key,
            route=route,
            users=s.strings("users"),
            aliases=aliases,
            pull_users=s.strings("pull_users"),
            etrn_route=etrn,
            etrn_clients=etrn_clients,
            alias_entries=_alias_file(s, "aliases", aliases, aliases_module.read_aliases),
        )
        if domain.pull_users and not domain.held:
            raise s.error("pull_users", "only a domain with route = \"hold\" can be pulled")
        s.finish()
        domains[key] = domain
    return domains


def _limits(s: _Section) -> LimitsSection:
    connections = s.positive_int("connections", 200)
    section = LimitsSection(
        message_size=s.get("message_size", "25MB", parse_size),
        recipients=s.positive_int("recipients", 100),
        connections=connections,
        connections_per_client=s.positive_int("connections_per_client", 20),
        errors=s.positive_int("errors", 10),
        command_timeout=s.get("command_timeout", "5m", parse_duration),
        data_timeout=s.get("data_timeout", "3m", parse_duration),
        command_line_length=s.get("command_line_length", 512, kind=int),
        received_headers=s.positive_int("received_headers", 100),
        greeting_delay=s.get("greeting_delay", "1s", parse_duration),
        connections_reserved=s.get("connections_reserved", connections // 10, kind=int),
        connections_per_network=s.positive_int("connections_per_network", 50),
        connection_rate=s.positive_int("connection_rate", 60),
        data_deadline=s.get("data_deadline", "30m", parse_duration),
    )
    if not 0 <= section.connections_reserved < section.connections:
        raise s.error("connections_reserved", "must be at least 0 and below connections")
    for key in ("command_timeout", "data_timeout", "data_deadline"):
        if getattr(section, key) <= 0:
            raise s.error(key, "must be more than zero")
    if section.message_size < 1:
        # RFC 1870: "SIZE 0" in EHLO would announce no limit at all.
        raise s.error("message_size", "must be at least 1 octet")
    if section.command_line_length < 512:
        raise s.error("command_line_length", "must be at least 512 (RFC 5321 4.5.3.1.4)")
    s.finish()
    return section


def _etrn(s: _Section) -> ETRNSection:
    clients = tuple(_network_or_error(s, v, "clients")
                    for v in s.strings("clients", ("0.0.0.0/0", "::/0")))
    section = ETRNSection(
        clients=clients,
        per_client=s.positive_int("per_client", 10),
        window=s.get("window", "1m", parse_duration),
    )
    if section.window <= 0:
        raise s.error("window", "must be more than zero")
    s.finish()
    return section


def _pulls(source: str, items: list[Any]) -> tuple[Pull, ...]:
    result = []
    for i, item in enumerate(items):
        s = _Section(source, f"pull #{i + 1}", item)
        protocol = s.get("protocol", "odmr", _choice("odmr", "etrn"), kind=str)
        server = s.get("server", "", kind=str)
        if not server:
            raise s.error("server", "required, e.g. \"mail.provider.example\"")
        try:
            host, port = parse_hostport(server, ODMR_PORT if protocol == "odmr" else 25)
        except ValueError as e:
            raise s.error("server", str(e)) from None
        domains = s.strings("domains")
        for name in domains:
            if not is_valid_domain(name.rstrip(".")):
                raise s.error("domains", f"not a valid domain name: {name!r}")
        pull = Pull(
            protocol=protocol,
            host=host,
            port=port,
            domains=tuple(d.lower().rstrip(".") for d in domains),
            interval=s.get("interval", "15m", parse_duration),
            user=s.get("user", "", kind=str),
            password_file=s.path("password_file", ""),
            tls_verify=s.get("tls_verify", True, kind=bool),
            ca_file=s.path("ca_file", ""),
        )
        if pull.interval <= 0:
            raise s.error("interval", "must be more than zero")
        if protocol == "odmr":
            if not pull.user:
                raise s.error("user", "required for protocol \"odmr\"")
            if pull.password_file is None:
                raise s.error("password_file", "required for protocol \"odmr\"")
            if _missing(pull.password_file):
                raise s.error("password_file", f"no such file: {pull.password_file}")
        elif not pull.domains:
            raise s.error("domains", "required for protocol \"etrn\": the domains to ask for")
        if pull.ca_file is not None and _missing(pull.ca_file):
            raise s.error("ca_file", f"no such file: {pull.ca_file}")
        s.finish()
        result.append(pull)
    return tuple(result)


def default() -> Config:
    """The config with no file: every default, one listener on 127.0.0.1:2525."""
    return from_dict({}, "<defaults>")
