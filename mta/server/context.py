"""What every session of one listener shares, and the narrow interfaces to the queue.

A session never sees the relayer.  It reaches the queue through two small
interfaces passed to it in its `ServerContext`:

- `MailQueue.enqueue(envelope)`: a message was just committed to the spool;
  deliver it.  The running service passes the relayer; `mta odmr` passes a
  spool notice, so that the running service picks the message up.
- `HeldMail` (ETRN, ATRN, TURN: reversal.py): how much mail waits for some
  domains, a queue run for a domain now, and a delivery of held mail over a
  connection that was turned round.  Only the running service has one;
  without it ETRN, ATRN and TURN are not offered.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet import defer

from mta import blocking
from mta.config import Config, Listener, Live
from mta.spool.envelope import Envelope
from mta.spool.store import Spool

if TYPE_CHECKING:
    from mta.checks.inbound import InboundChecks
    from mta.server.reversal import Pickup
    from mta.server.trust import Trust


class MailQueue(Protocol):
    def enqueue(self, envelope: Envelope) -> None:
        """A message just committed to the spool: schedule its delivery."""


class TurnBusy(Exception):
    """A domain asked for is being turned on another connection right now."""


class HeldMail(Protocol):
    def ready(self) -> bool:
        """Whether every message found at start is known yet (it is read in the background)."""

    def waiting(self, domains: Collection[str]) -> int:
        """Messages with undelivered recipients in `domains` (exact names)."""

    def flush(self, domain: str, subdomains: bool = False) -> int:
        """Try mail for `domain` now (a held domain over its etrn_route); messages started."""

    def turn(self, domains: Collection[str], peer: str) -> tuple[Any, defer.Deferred[int]]:
        """A client protocol that delivers the held mail of `domains` over a turned
        connection to `peer`, and a Deferred firing with the messages sent.
        Raises `TurnBusy`."""


class ServerContext:
    """What every session of one listener shares.

    `config` is read through the service's `Live` holder, so that a reload
    (SIGHUP, `mta reload`) reaches every listener with one swap: a new
    connection sees the config in force, and a session in progress takes it
    up at its next EHLO/HELO or MAIL (the transaction under way keeps the
    config it started with).  The listener itself never changes without a
    restart.
    """

    def __init__(self, config: Config | Live, listener: Listener, spool: Spool,
                 queue: MailQueue, pickup: Pickup | None = None,
                 clock: Callable[[], float] = time.time,
                 run_blocking: Callable[..., defer.Deferred] = blocking.run_blocking,
                 trust: Trust | None = None, turned: bool = False,
                 checks: InboundChecks | None = None) -> None:
        self.live = Live.of(config)
        self.listener = listener
        self.spool = spool
        self.queue = queue
        self.pickup = pickup  # None: no ETRN, ATRN or TURN here
        self.clock = clock
        self.run_blocking = run_blocking
        self.trust = trust  # None: neither STARTTLS nor AUTH
        self.turned = turned  # the session runs on a connection we turned round (mta odmr)
        self.checks = checks  # None: no inbound SPF/DKIM/DMARC here (mta/checks/)

    @property
    def config(self) -> Config:
        return self.live.config
