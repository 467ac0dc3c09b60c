"""Role reversal: ETRN, ATRN and TURN, and the hand-over of a live connection.

What it owns:

- `Pickup`, the decisions.  The session (session.py) checks ordering (after
  a greeting, outside a transaction, ATRN after AUTH) and asks `Pickup`,
  which knows the config and reaches the queue through `HeldMail`
  (context.py):

  ETRN [RFC 1985] asks for a queue run: ``ETRN domain``, ``ETRN @domain``
  (the domain and its sub-domains) or ``ETRN #queue`` (our queues are named
  after the configured domains: ``#customer.example`` is that domain's
  mail alone).  A held domain's mail goes to its ``etrn_route``; any other
  domain's deferred mail is tried at once over its normal route (a "fast
  flush").  Who may ask: a domain's ``etrn_clients`` networks (else
  ``[etrn] clients``, by default anyone) and its ``pull_users`` when
  authenticated; at most ``[etrn] per_client`` requests per client address
  within ``[etrn] window``.  Replies: 251 nothing waiting, 253 n messages
  started, 458 no such queue or too many requests, 459 not allowed, 501
  syntax.

  ATRN [RFC 2645] (on listeners that offer it, after AUTH) names domains
  the user may pull, or none for all of them: 450 when one of them is not
  the user's, 453 when no mail waits, 451 when one is being turned on
  another connection right now; otherwise 250 and the connection turns
  round.  While the queue found at start is still being read, ATRN and
  TURN get 451 and ETRN 458 (try again in a moment), rather than a count
  that misses messages.  TURN [RFC 821] turns round for the domain the client named in
  HELO/EHLO, but only for an authenticated user who may pull it: 502 5.7.0
  otherwise, so that an unauthenticated TURN never makes mail leave
  [RFC 5321 F.1].

- `Reversible`, the hand-over.  After the 250 the connection belongs to a
  successor protocol: `turn_round(successor, leftover)` connects it to our
  live transport (plain or TLS: the TLS layer stays where it is, nothing
  is reconnected) and gives it the bytes we had read but not used.  From
  then on the predecessor forwards every byte and the connection's loss
  to it.  The provider's server session hands over to the relayer's SMTP
  client (ATRN, TURN); `mta odmr`'s client hands over to our SMTP server.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from twisted.logger import Logger

from mta import reply
from mta.address import client_ip, is_valid_domain
from mta.config import Config, IPNetwork, Live
from mta.reply import Reply, printable
from mta.server.answer import Answer, TurnRound
from mta.server.context import HeldMail, TurnBusy
from mta.server.ratelimit import WindowCounter

log = Logger(namespace="mta.smtpd")


class Reversible:
    """A protocol that can give its live connection to a successor protocol."""

    successor: Any = None

    def turn_round(self, successor: Any, leftover: bytes = b"") -> None:
        """Connect `successor` to our transport; our `dataReceived` and
        `connectionLost` must forward to `self.successor` from now on."""
        self.successor = successor
        successor.makeConnection(self.transport)  # type: ignore[attr-defined]
        if leftover:
            successor.dataReceived(leftover)


class Pickup:
    """ETRN, ATRN and TURN for the sessions of every listener: one per service."""

    def __init__(self, config: Config | Live, held: HeldMail, clock: Any) -> None:
        self.live = Live.of(config)
        self.held = held
        self.requests = WindowCounter(self.config.etrn.per_client, self.config.etrn.window,
                                      clock)

    @property
    def config(self) -> Config:
        """The config in force (a reload swaps it)."""
        return self.live.config

    # -- who may pull what ------------------------------------------------------------

    def pullable(self, user: str | None) -> list[str]:
        """The held domains `user` may pull with ATRN or TURN."""
        if user is None:
            return []
        return sorted(d.name for d in self.config.domains.values()
                      if d.held and user in d.pull_users)

    def may_etrn(self, domain: str, client_address: str, user: str | None) -> bool:
        configured = self.config.domain_for(domain)
        if configured is not None and user is not None and user in configured.pull_users:
            return True
        networks = self.config.etrn.clients
        if configured is not None and configured.etrn_clients is not None:
            networks = configured.etrn_clients
        return _in(client_address, networks)

    # -- ETRN [RFC 1985] ------------------------------------------------------------------

    def etrn(self, arg: str, client_address: str, user: str | None) -> Reply:
        node = arg.strip()
        kind = node[:1] if node[:1] in ("@", "#") else ""
        name = node[len(kind):].lower().rstrip(".")
        if not node or " " in node or not is_valid_domain(name):
            return reply.ETRN_SYNTAX
        self.requests.limit = self.config.etrn.per_client  # as a reload may have set them
        self.requests.window = self.config.etrn.window
        if self.requests.blocked(client_address):
            log.info("ETRN {node} refused: too many requests from [{client}]",
                     node=node, client=client_address)
            return reply.ETRN_TOO_OFTEN
        if not self.held.ready():
            return reply.ETRN_NOT_READY
        self.requests.record(client_address)
        if kind == "#" and self.config.domain_for(name) is None:
            return reply.etrn_no_queue(node)
        # @domain reaches the configured sub-domains too: each must allow the client.
        covered = [name] + ([d for d in self.config.domains if d.endswith("." + name)]
                            if kind == "@" else [])
        denied = next((d for d in covered if not self.may_etrn(d, client_address, user)), None)
        if denied is not None:
            log.info("ETRN {node} refused for [{client}]: not allowed for {domain}",
                     node=node, client=client_address, domain=denied)
            return reply.etrn_not_allowed(node, f"[{client_address}] may not ask for {denied}")
        started = self.held.flush(name, subdomains=kind == "@")
        log.info("ETRN {node} from [{client}]: {count} messages started",
                 node=node, client=client_address, count=started)
        return reply.etrn_started(node, started)

    # -- ATRN [RFC 2645] and TURN [RFC 821] ------------------------------------------------

    def atrn(self, arg: str, user: str, peer: str) -> Reply | Answer:
        allowed = self.pullable(user)
        if arg.strip():
            names = [d.strip().lower().rstrip(".") for d in arg.split(",")]
            if not all(is_valid_domain(d) for d in names):
                return reply.ATRN_SYNTAX
            names = list(dict.fromkeys(names))
            refused = next((d for d in names if d not in allowed), None)
            if refused is not None:
                log.info("ATRN {domain} refused: {user} may not pull it [{client}]",
                         domain=refused, user=user, client=peer)
                return reply.atrn_refused(f"{user} may not pull {refused}")
        elif allowed:
            names = allowed
        else:
            return reply.atrn_refused(f"{user} may pull no domain here")
        if self.held.ready() and self.held.waiting(names) == 0:
            return reply.ATRN_NO_MAIL
        return self._turn(names, peer, reply.ATRN_TURNING)

    def turn(self, helo: str | None, user: str | None, peer: str) -> Reply | Answer:
        domain = (helo or "").lower().rstrip(".")
        if user is None or domain not in self.pullable(user):
            log.info("TURN refused for [{client}] (user {user}, HELO {helo})",
                     client=peer, user=user or "none", helo=printable(helo or "", 100))
            return reply.TURN_REFUSED
        # RFC 821 has no "no mail" reply: with nothing waiting we turn round and QUIT.
        return self._turn([domain], peer, reply.TURN_TURNING)

    def _turn(self, domains: Collection[str], peer: str, turning: Reply) -> Reply | Answer:
        if not self.held.ready():
            return reply.PICKUP_NOT_READY
        try:
            successor, done = self.held.turn(domains, peer)
        except TurnBusy as e:
            return reply.turn_busy(str(e))

        def delivered(count: int) -> int:
            log.info("turned connection to [{client}] ended: {count} messages for {domains}",
                     client=peer, count=count, domains=",".join(domains))
            return count
        done.addCallback(delivered)
        done.addErrback(lambda f: log.failure("turned delivery to [{client}] failed", f,
                                              client=peer))
        return Answer(turning, TurnRound(successor))


def _in(address: str, networks: tuple[IPNetwork, ...]) -> bool:
    ip = client_ip(address)
    return ip is not None and any(ip in net for net in networks)
