"""Which next hop each recipient goes to.

`Router.next_hop(address)` decides, per recipient domain, in this order:

0. an address of a local domain that has no such name (aliases.py decides,
   as it did at RCPT: a user removed since, a list member that does not
   exist, a name at our hostname that is not an alias): ``unknown``, which
   fails it (5.1.1) and so bounces it to its sender or list owner;
1. a domain in `config.domains` with a route:
   - ``maildir:PATH``: local delivery, one Maildir per user under PATH;
   - ``smtp:[host]:port``: that host, no MX lookup;
   - ``smtp:host:port``: the MX hosts of `host`, at `port`;
   - ``hold``: kept in the queue, not attempted, until ETRN/ATRN releases
     it (then its `etrn_route`, or the domain's MX hosts);
2. an address literal (``user@[192.0.2.1]``): that address [RFC 5321 4.1.3];
3. the smart host, when `relay.smarthost` is set (STARTTLS per
   `relay.smarthost_tls`, AUTH with `smarthost_user`);
4. the domain's MX hosts at `relay.smtp_port` [RFC 5321 5.1].

The TLS policy of a hop to the domain's own servers (1 with an ``smtp:``
route, 4) is the domain's ``[tls_policy]`` level when it has one (none: no
TLS; may: opportunistic; encrypt: TLS required, any certificate; verify: a
certificate that names the host; a domain in U-labels is looked up by its
A-labels), else `relay.tls_verify`'s.  A hop by MX
whose level is "sts" (the default for unlisted domains while `relay.mta_sts`
is on) carries ``sts=True``: the courier then asks MTA-STS (mta_sts.py),
whose policy may tighten it per MX host.  Explicit routes, address literals
and the smart host never use MTA-STS [RFC 8461 5: it governs MX delivery].

A `NextHop` is a plain value.  Its `destination` names it for grouping
(recipients of one message with the same destination share one SMTP
transaction) and for the per-destination concurrency limit.  Nothing here
does I/O apart from reading the smart host's password file, once.

Every step after the first depends only on the domain and the config, so the
hop of each (domain, release) is made once per config and kept (up to
`HOPS_KEPT` of them): each message asks twice per recipient, once when it is
queued (is it held?) and once when it is attempted.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import idna

from mta import aliases
from mta.config import Config, Live, Route, parse_hostport

MAILDIR, SMTP, HOLD = "maildir", "smtp", "hold"
UNKNOWN = "unknown"  # a local address with no mailbox or forward: fails 5.1.1
TURNED = "turned"  # over a connection the customer opened and we turned round (ATRN, TURN)
HOPS_KEPT = 4096  # (domain, release) hops kept for the config in force; then started afresh

# TLS policies of a next hop.  "opportunistic": STARTTLS when offered, no
# certificate check, plain text when the peer cannot; "required": STARTTLS
# or no delivery; "verify": required, and the certificate must name the host.
OPPORTUNISTIC, REQUIRED, VERIFY = "opportunistic", "required", "verify"
# [tls_policy] levels (config.TLS_POLICIES) as those policies; "sts" is decided per delivery.
_LEVELS = {"none": "off", "may": OPPORTUNISTIC, "encrypt": REQUIRED, "verify": VERIFY}


@dataclass(frozen=True)
class NextHop:
    kind: str  # maildir | smtp | hold | turned
    destination: str  # grouping and concurrency key, also shown in logs
    domain: str = ""  # the recipient domain this hop was chosen for
    # smtp
    host: str = ""  # a domain whose MX to look up, or a host name or address
    port: int = 25
    mx: bool = True  # look up MX records of `host`
    tls: str = OPPORTUNISTIC
    auth_user: str = ""
    auth_password: str = ""
    loop_is_temporary: bool = False  # MX pointing back at us: defer (held domains) rather than fail
    sts: bool = False  # MTA-STS decides how each MX host of `domain` must do TLS
    # maildir
    path: Path | None = None

    def __repr__(self) -> str:  # never show the password
        return f"NextHop({self.kind}, {self.destination})"


def _a_label(domain: str) -> str:
    """`domain` as [tls_policy] names it: A-labels (the config takes no others), so that
    mail to ``bücher.example`` (SMTPUTF8) gets ``xn--bcher-kva.example``'s level."""
    if domain.isascii():
        return domain
    try:
        return idna.encode(domain, uts46=True).decode("ascii")
    except idna.IDNAError:
        return domain


class Router:
    def __init__(self, config: Config | Live) -> None:
        self.live = Live.of(config)
        self._smarthost = self._smarthost_hop() if self.config.relay.smarthost else None
        self._hops: dict[tuple[str, bool], NextHop] = {}
        self._hops_of: Config | None = None  # the config `_hops` were made with
        self.live.subscribe(self._reconfigured)

    @property
    def config(self) -> Config:
        """The config in force (a reload swaps it)."""
        return self.live.config

    def _reconfigured(self, config: Config) -> None:
        """A reload: the smart host, its credentials and its password file may be new."""
        self._smarthost = self._smarthost_hop() if config.relay.smarthost else None
        self._hops_of = None

    def next_hop(self, address: str, release_hold: bool = False) -> NextHop:
        """The next hop for mail to `address`; ``release_hold`` routes a held domain's mail."""
        _, domain = aliases.split(address)
        config = self.config
        if config.addresses.destination(address)[0] == aliases.UNKNOWN:
            return NextHop(UNKNOWN, f"unknown:{domain}", domain)
        if self._hops_of is not config or len(self._hops) >= HOPS_KEPT:
            self._hops, self._hops_of = {}, config
        hop = self._hops.get((domain, release_hold))
        if hop is None:
            hop = self._hops[(domain, release_hold)] = self._domain_hop(domain, release_hold)
        return hop

    def _domain_hop(self, domain: str, release_hold: bool) -> NextHop:
        configured = self.config.domain_for(domain)
        if configured is not None:
            route = configured.route
            if configured.held:
                if not release_hold:
                    return NextHop(HOLD, f"hold:{domain}", domain)
                if configured.etrn_route is not None:
                    return self._route_hop(configured.etrn_route, domain)
                return self._mx_hop(domain, loop_is_temporary=True)
            if route.kind == MAILDIR:
                return NextHop(MAILDIR, f"maildir:{route.path}", domain, path=route.path)
            return self._route_hop(route, domain)
        if domain.startswith("[") and domain.endswith("]"):
            return self._literal_hop(domain)
        if self._smarthost is not None:
            return replace(self._smarthost, domain=domain)
        return self._mx_hop(domain)

    def _tls(self, domain: str, by_mx: bool) -> tuple[str, bool]:
        """The TLS policy for `domain`'s own servers, and whether MTA-STS decides it."""
        relay = self.config.relay
        default = VERIFY if relay.tls_verify else OPPORTUNISTIC
        level = self.config.tls_policy.get(_a_label(domain)) if self.config.tls_policy \
            else None
        if level is None:
            return default, by_mx and relay.mta_sts
        if level == "sts":
            return default, by_mx
        return _LEVELS[level], False

    def _mx_hop(self, domain: str, loop_is_temporary: bool = False) -> NextHop:
        tls, sts = self._tls(domain, by_mx=True)
        return NextHop(SMTP, domain, domain, host=domain, port=self.config.relay.smtp_port,
                       mx=True, tls=tls, loop_is_temporary=loop_is_temporary, sts=sts)

    def _route_hop(self, route: Route, domain: str) -> NextHop:
        # A route without a port uses the port of MX hosts, as mail by MX does.
        port = route.port or self.config.relay.smtp_port
        tls, _ = self._tls(domain, by_mx=False)
        return NextHop(SMTP, str(route), domain, host=route.host, port=port, mx=route.mx,
                       tls=tls)

    def _literal_hop(self, domain: str) -> NextHop:
        inner = domain[1:-1]
        if inner.lower().startswith("ipv6:"):
            inner = inner[5:]
        relay = self.config.relay
        return NextHop(SMTP, f"[{inner}]:{relay.smtp_port}", domain, host=inner,
                       port=relay.smtp_port, mx=False,
                       tls=VERIFY if relay.tls_verify else OPPORTUNISTIC)

    def _smarthost_hop(self) -> NextHop:
        relay = self.config.relay
        host, port = parse_hostport(relay.smarthost, 25)
        password = ""
        if relay.smarthost_user and relay.smarthost_password_file is not None:
            password = relay.smarthost_password_file.read_text(encoding="utf-8").strip("\r\n")
        return NextHop(SMTP, f"smarthost:[{host}]:{port}", host=host, port=port, mx=False,
                       tls=relay.smarthost_tls, auth_user=relay.smarthost_user,
                       auth_password=password)
