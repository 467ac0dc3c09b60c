"""Couriers: take some recipients of one message to one next hop and say what happened.

A courier's one method is ``deliver(hop, envelope, recipients, data)``,
returning a Deferred list of `Result` (an outcome and the relay it came
from, for the log), one per recipient, in order.  It never raises: every
error becomes an outcome through `outcome.classify`.

- `SMTPCourier`: resolves the hop (MX records, or one host) in a thread,
  then tries each host and each of its addresses in turn [RFC 5321 5.1]
  until one holds a transaction.  A host that cannot be reached or will
  not talk (refused connection, bad greeting, TLS trouble, timeout before
  the data is sent) sends the recipients still undecided on to the next
  address.  Once the final dot has gone, no other host is tried in this
  attempt: the peer may have the message.  Under the "opportunistic" TLS
  policy a failed handshake is retried once in plain text on the same
  address, as Postfix does for "may".  More than 100 recipients go in
  100-recipient transactions, one after the other [RFC 5321 4.5.3.1.8].
  A connection whose transaction went well is kept open for `IDLE_TIME`
  (at most `MAX_USES` messages, and as many idle connections per host and
  policy as the destination may have at once) and used for the next
  message to the same address: no new TCP connection, greeting, EHLO,
  STARTTLS and AUTH each time.  If the peer dropped it meanwhile, a fresh
  connection is made.
  A hop marked ``sts`` (delivery by MX, router.py) asks MTA-STS
  (mta_sts.py) for the domain's policy while the MX hosts are resolved.
  Under a policy in mode "enforce", a host that does not match its ``mx``
  patterns is not tried, and the others only with TLS "verify" (STARTTLS,
  a certificate that verifies for the MX host name) [RFC 8461 4, 5]; when
  none is left, the recipients are deferred (4.7.5) with the policy's
  refusals as the reason.  In mode "testing" delivery goes as before,
  certificates are checked without refusing, and what "enforce" would
  refuse is logged.  Each verdict is one mail log line (maillog.sts_verdict).
- `MaildirCourier`: local delivery in a thread (`maildir.deliver`).
- `TurnedCourier`: one message after another over a connection that a
  customer opened and we turned round (ATRN, TURN), with a client that is
  already past its EHLO; the relay in the log is ``turned[address]``.
  A lost connection defers what it left undecided: the message stays queued.
  The relayer stops its client itself at shutdown (`Relayer.stopService`).

`abort_all()` drops every live connection (service shutdown), except that a
connection whose message's final dot is out waits up to `STOP_REPLY_GRACE` for
its reply, so that a message the next hop took is not sent again after a restart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from twisted.internet import defer, endpoints
from twisted.internet import error as net_error
from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from mta import maillog
from mta.config import Config, Live
from mta.delivery import maildir, mta_sts
from mta.delivery.client import (
    RecipientSpec,
    SessionPolicy,
    SMTPClient,
    Stalled,
    Timeouts,
    TLSFailed,
    TLSUnavailable,
    Transaction,
)
from mta.delivery.mx import MXHost, MXResolver, _is_ip
from mta.delivery.outcome import Deferred, DeliveryError, Outcome, classify
from mta.delivery.router import OPPORTUNISTIC, VERIFY, NextHop
from mta.spool.envelope import Envelope, Recipient
from mta.spool.store import MessageData

log = Logger(namespace="mta.delivery.courier")

RunBlocking = Callable[..., "defer.Deferred[Any]"]

MAX_RECIPIENTS = 100  # per transaction: what every server must take [RFC 5321 4.5.3.1.8]
IDLE_TIME = 5.0  # seconds a connection waits, open, for the next message to its host
MAX_USES = 100  # messages over one connection, then a fresh one
# At shutdown, seconds a next hop has to answer a message's final dot (its answer decides
# whether the message goes again after the restart); under the relayer's STOP_GRACE.
STOP_REPLY_GRACE = 5.0


# What makes a host "dead" for a while: it did not answer in time.
_TIMEOUTS = (Stalled, net_error.TimeoutError, net_error.TCPTimedOutError)


class _QuietFactory(Factory):
    """One connection's factory, without a "Starting factory" log line per delivery."""

    noisy = False


@dataclass(frozen=True)
class Result:
    outcome: Outcome
    relay: str  # host[address]:port, "maildir" or "none"


@dataclass
class _STS:
    """One transaction's MTA-STS policy, and the hosts it refused (for the reason)."""

    policy: mta_sts.Policy
    domain: str
    queue_id: str
    recipients: list[str]
    refused: list[str] = field(default_factory=list)
    last: Outcome | None = None  # the outcome of the latest refusal

    @property
    def enforce(self) -> bool:
        return self.policy.mode == mta_sts.ENFORCE

    def verdict(self, mx: str, text: str, refused: bool = False) -> None:
        maillog.sts_verdict(self.queue_id, self.recipients, self.domain, self.policy.mode,
                            self.policy.id, mx, text, refused)

    def refuse(self, mx: str, why: str) -> Outcome | None:
        """Log that `mx` fails the policy; under enforce, the outcome that says so."""
        if not self.enforce:
            self.verdict(mx, f"would refuse ({why})", refused=True)
            return None
        self.verdict(mx, f"refused ({why})", refused=True)
        self.refused.append(f"{mx}: {why}")
        self.last = Deferred("4.7.5", self.reason())
        return self.last

    def reason(self, then: Outcome | None = None) -> str:
        text = (f"MTA-STS policy of {self.domain} (mode enforce, id {self.policy.id}) "
                f"refused {'; '.join(self.refused)}")
        return f"{text}; {then.diagnostic}" if then is not None else text


def transaction_for(envelope: Envelope, recipients: list[Recipient], data: MessageData,
                    masquerade: Callable[[str], str] | None = None) -> Transaction:
    """One SMTP transaction for `recipients`, which share a reverse-path (attempt.py
    groups them so): the message's, or their list's owner; `masquerade` rewrites it."""
    reverse_path = envelope.sender_for(recipients[0])
    return Transaction(
        reverse_path=masquerade(reverse_path) if masquerade is not None else reverse_path,
        recipients=[RecipientSpec(r.address, r.notify, r.orcpt) for r in recipients],
        open_data=lambda: data.open("rb"),
        size=envelope.size,
        body=envelope.body,
        smtputf8=envelope.smtputf8,
        ret=envelope.ret,
        envid=envelope.envid,
    )


class MaildirCourier:
    def __init__(self, config: Config | Live, run_blocking: RunBlocking) -> None:
        self.live = Live.of(config)
        self.run_blocking = run_blocking

    @property
    def config(self) -> Config:
        """The config in force (a reload swaps it): mailboxes are looked up in it."""
        return self.live.config

    @property
    def hostname(self) -> str:
        return self.live.config.server.hostname

    def deliver(self, hop: NextHop, envelope: Envelope, recipients: list[Recipient],
                data: MessageData) -> defer.Deferred[list[Result]]:
        addresses = self.config.addresses
        deliveries = [maildir.Delivery(r.address, addresses.mailbox(r.address),
                                       envelope.sender_for(r)) for r in recipients]
        d = self.run_blocking(maildir.deliver, hop, deliveries, data, self.hostname)
        d.addCallbacks(lambda outcomes: [Result(o, "maildir") for o in outcomes],
                       lambda f: [Result(classify(f), "maildir")] * len(recipients))
        return d

    def abort_all(self) -> None:
        pass


class TurnedCourier:
    def __init__(self, client: SMTPClient, peer: str) -> None:
        self.client = client
        self.relay = f"turned[{peer}]"

    @defer.inlineCallbacks
    def deliver(self, hop: NextHop, envelope: Envelope, recipients: list[Recipient],
                data: MessageData) -> Any:
        results: list[Result] = []
        for start in range(0, len(recipients), MAX_RECIPIENTS):
            chunk = recipients[start:start + MAX_RECIPIENTS]
            result = yield self.client.deliver(transaction_for(envelope, chunk, data))
            undecided = classify(result.error) if result.error is not None else \
                Deferred("4.4.2", "turned connection closed")
            results += [Result(o if o is not None else undecided, self.relay)
                        for o in result.outcomes]
        return results


class SMTPCourier:
    @property
    def config(self) -> Config:
        """The config in force (a reload swaps it)."""
        return self.live.config

    def __init__(self, config: Config | Live, reactor: Any, run_blocking: RunBlocking,
                 resolver: MXResolver | None = None,
                 connect: Callable[[str, int, SessionPolicy], defer.Deferred[SMTPClient]] | None = None,
                 timeouts: Timeouts | None = None, sts: Any = None) -> None:
        self.live = Live.of(config)
        self.reactor = reactor
        self.run_blocking = run_blocking
        self.resolver = resolver or MXResolver.from_config(self.config)
        if resolver is None:
            # Name servers, timeouts and our own addresses may change on a reload.
            self.live.subscribe(lambda new: setattr(self, "resolver",
                                                    MXResolver.from_config(new)))
        self.connect = connect or self._connect_tcp
        # MTA-STS policies: asked only for hops marked sts, so free when unused.
        self.sts = sts or mta_sts.Policies(self.live, reactor, run_blocking,
                                           lambda: self.resolver)
        self.timeouts = timeouts or Timeouts.from_config(self.config.relay)
        # Hosts that timed out, (address, port) -> until when they are not tried: a tarpit
        # must not hold our connection slots again at once, attempt after attempt.
        self._dead: dict[tuple[str, int], float] = {}
        self._clients: set[SMTPClient] = set()
        self._connecting: set[defer.Deferred[SMTPClient]] = set()
        # Open connections waiting for their next message: (address, port, policy) ->
        # [(client, messages so far, its idle timer)], the most recent last.
        self._idle: dict[tuple[str, int, SessionPolicy], list[tuple[SMTPClient, int, Any]]] = {}
        self._generation = 0  # counts abort_all() calls

    # -- the one method -----------------------------------------------------------

    @defer.inlineCallbacks
    def deliver(self, hop: NextHop, envelope: Envelope, recipients: list[Recipient],
                data: MessageData) -> Any:
        # The policy lookup runs while the MX hosts are resolved; it never fails.
        policy_lookup = self.sts.lookup(hop.domain) if hop.sts and hop.mx else None
        try:
            hosts = yield self._resolve(hop)
        except Exception as e:  # noqa: BLE001 (any failure becomes an outcome)
            outcome = classify(e)
            return [Result(outcome, "none")] * len(recipients)
        policy = (yield policy_lookup) if policy_lookup is not None else None
        # RFC 5321 4.5.3.1.8: a server may refuse RCPTs beyond 100 (452); send
        # recipients in 100-recipient transactions, all in this attempt.
        results: list[Result] = []
        generation = self._generation
        for start in range(0, len(recipients), MAX_RECIPIENTS):
            chunk = recipients[start:start + MAX_RECIPIENTS]
            if generation != self._generation:
                # Shutting down: no new connection for the rest.
                results.extend([Result(Deferred("4.3.2", "delivery interrupted: shutting down"),
                                       "none")] * len(chunk))
                continue
            sts = None if policy is None else \
                _STS(policy, hop.domain, envelope.queue_id, [r.address for r in chunk])
            chunk_results, reached = yield self._deliver_to_hosts(hop, hosts, envelope, chunk,
                                                                  data, sts)
            results.extend(chunk_results)
            if not reached:
                # No host would hold a transaction: the others share that reason.
                results.extend(chunk_results[-1:] * (len(recipients) - len(results)))
                break
        return results

    @defer.inlineCallbacks
    def _deliver_to_hosts(self, hop: NextHop, hosts: list[MXHost], envelope: Envelope,
                          recipients: list[Recipient], data: MessageData,
                          sts: _STS | None = None) -> Any:
        """Results for one transaction's recipients, walked over the hosts and addresses in
        order, and whether any host held a transaction."""
        results: list[Result | None] = [None] * len(recipients)
        last = Result(Deferred("4.4.1", f"no host to try for {hop.destination}"), "none")
        for host in hosts:
            if sts is not None and not sts.policy.matches(host.name):
                # RFC 8461 4.1: only MX hosts the policy names may have the mail.
                refusal = sts.refuse(host.name, "MX host not in the policy's mx patterns")
                if refusal is not None:
                    last = Result(refusal, "none")
                    continue
            for address in host.addresses:
                undecided = [i for i, r in enumerate(results) if r is None]
                if not undecided:
                    return results, True
                relay = maillog.relay_name(host.name, address, hop.port)
                if self._is_dead(address, hop.port):
                    last = Result(Deferred("4.4.1", f"{relay} not tried: it timed out "
                                                    "recently (dead_host_time)"), relay)
                    continue
                txn = transaction_for(envelope, [recipients[i] for i in undecided], data,
                                      self.config.addresses.masquerade)
                outcomes, final, failure = yield self._try_address(hop, host, address, txn, sts)
                for i, outcome in zip(undecided, outcomes):
                    if outcome is not None:
                        results[i] = Result(outcome, relay)
                if failure is not None:
                    last = Result(failure, relay)
                if final:
                    return [r if r is not None else last for r in results], True
        reached = any(r is not None for r in results)
        if sts is not None and sts.refused and last.outcome is not sts.last:
            # Another host failed after the policy refused some: say both.
            last = Result(Deferred("4.7.5", sts.reason(last.outcome)), last.relay)
        return [r if r is not None else last for r in results], reached

    def abort_all(self) -> None:
        self._generation += 1
        self.sts.abort_all()
        for parked in self._idle.values():
            for _, _, timer in parked:
                if timer.active():
                    timer.cancel()
        self._idle.clear()
        for d in list(self._connecting):
            d.cancel()
        for client in list(self._clients):
            client.stop(STOP_REPLY_GRACE)

    # -- hosts that do not answer ---------------------------------------------------------

    def _is_dead(self, address: str, port: int) -> bool:
        until = self._dead.get((address, port))
        if until is None:
            return False
        if until > self.reactor.seconds():
            return True
        del self._dead[(address, port)]
        return False

    def _note(self, address: str, port: int, error: BaseException | None) -> None:
        """Remember a host that timed out for `dead_host_time`."""
        if isinstance(error, _TIMEOUTS) and self.config.relay.dead_host_time > 0:
            self._dead[(address, port)] = self.reactor.seconds() + \
                self.config.relay.dead_host_time
            log.info("{address}:{port} timed out; not tried again for {seconds:.0f}s",
                     address=address, port=port, seconds=self.config.relay.dead_host_time)

    # -- steps ----------------------------------------------------------------------

    def _resolve(self, hop: NextHop) -> defer.Deferred[list[MXHost]]:
        if not hop.mx:
            if _is_ip(hop.host):
                return defer.succeed([MXHost(hop.host, 0, (hop.host,))])
            d = self.run_blocking(self.resolver.resolve_host, hop.host)
        else:
            d = self.run_blocking(self.resolver.resolve, hop.host)

        def loop_for_held(failure: Failure) -> Failure:
            # A held domain's MX is usually us: wait for its customer, do not bounce.
            error = failure.value
            if hop.loop_is_temporary and isinstance(error, DeliveryError) and \
                    error.status == "5.4.6":
                raise DeliveryError("4.4.6", error.text)
            return failure
        return d.addErrback(loop_for_held)

    @defer.inlineCallbacks
    def _try_address(self, hop: NextHop, host: MXHost, address: str, txn: Transaction,
                     sts: _STS | None = None) -> Any:
        """(outcomes for txn's recipients or None, stop trying others?, session failure or None)."""
        attempts = [self._policy(hop, host, sts)]  # grows by a plain-text one (below)
        failure: Outcome | None = None
        judged = False  # an MTA-STS verdict on this address is logged
        for attempt in attempts:
            key = (address, hop.port, attempt)
            reused = self._unpark(key)
            if reused is not None:
                client, uses = reused
                if sts is not None and not judged:
                    self._judge(sts, f"{host.name}[{address}]", client)
                    judged = True
                result = yield client.deliver(txn)
                if result.error is None or result.data_sent or \
                        any(o is not None for o in result.outcomes):
                    return self._answer(key, client, uses + 1, txn, result)
                client.quit()  # gone while it waited: a fresh connection
            client = yield self._open(address, hop.port, attempt)
            if isinstance(client, Outcome):
                relay = maillog.relay_name(host.name, address, hop.port)
                failure = replace(client, diagnostic=f"connect to {relay}: {client.diagnostic}")
                return [None] * len(txn.recipients), False, failure
            try:
                yield client.ready
            except (TLSFailed, TLSUnavailable) as e:
                failure = classify(e)
                if sts is not None and not judged:
                    failure = sts.refuse(f"{host.name}[{address}]", e.text) or failure
                    judged = True
                if attempt.tls == OPPORTUNISTIC:
                    # After a failed handshake, plain text, but never the password: the
                    # host offered TLS, so only a host without STARTTLS gets it in clear
                    # (smarthost_tls).  The loop takes it next.
                    attempts.append(replace(attempt, tls="off", plaintext_password=False,
                                            check_identity=False))
                    log.info("TLS with {peer}[{address}] failed ({why}); trying without",
                             peer=host.name, address=address, why=e.text)
                continue
            except Exception as e:  # noqa: BLE001 (any failure becomes an outcome)
                client.quit()
                self._note(address, hop.port, e)
                return [None] * len(txn.recipients), False, classify(e)
            if sts is not None and not judged:
                self._judge(sts, f"{host.name}[{address}]", client)
                judged = True
            result = yield client.deliver(txn)
            return self._answer(key, client, 1, txn, result)
        return [None] * len(txn.recipients), False, failure

    def _answer(self, key: tuple[str, int, SessionPolicy], client: SMTPClient, uses: int,
                txn: Transaction, result: Any) -> tuple[list[Outcome | None], bool, Outcome | None]:
        """What one transaction says for `_try_address`; the connection is kept for the
        next message if it is still good, else closed."""
        if result.error is None:
            self._park(key, client, uses)
            return result.outcomes, True, None
        client.quit()
        self._note(key[0], key[1], result.error)
        error = classify(result.error)
        # Undecided recipients after the dot: the peer may have the message,
        # so no other host now; they are deferred [RFC 5321 4.1.1.4, RFC 1047].
        if result.data_sent:
            return [o if o is not None else error for o in result.outcomes], True, error
        return result.outcomes, False, error

    def _park(self, key: tuple[str, int, SessionPolicy], client: SMTPClient, uses: int) -> None:
        parked = self._idle.setdefault(key, [])
        if client.gone or uses >= MAX_USES or \
                len(parked) >= self.config.relay.concurrency_per_destination:
            client.quit()
            return
        timer = self.reactor.callLater(IDLE_TIME, self._expire, key, client)
        parked.append((client, uses, timer))

    def _unpark(self, key: tuple[str, int, SessionPolicy]) -> tuple[SMTPClient, int] | None:
        parked = self._idle.get(key)
        while parked:
            client, uses, timer = parked.pop()
            if timer.active():
                timer.cancel()
            if not client.gone:
                return client, uses
        self._idle.pop(key, None)
        return None

    def _expire(self, key: tuple[str, int, SessionPolicy], client: SMTPClient) -> None:
        parked = self._idle.get(key, [])
        parked[:] = [p for p in parked if p[0] is not client]
        if not parked:
            self._idle.pop(key, None)
        client.quit()

    def _policy(self, hop: NextHop, host: MXHost, sts: _STS | None = None) -> SessionPolicy:
        tls, check = hop.tls, False
        if sts is not None:
            if sts.enforce:
                tls = VERIFY  # RFC 8461 4.2: a certificate valid for the MX host name
            else:
                check = tls != VERIFY  # testing: find out, refuse nothing
        return SessionPolicy(helo_name=self.config.server.hostname, peer_name=host.name,
                             tls=tls, ca_file=self.config.relay.tls_ca_file,
                             plaintext_password=tls == OPPORTUNISTIC,
                             auth_user=hop.auth_user,
                             auth_password=hop.auth_password, check_identity=check)

    @staticmethod
    def _judge(sts: _STS, mx: str, client: SMTPClient) -> None:
        """The verdict on a session that is ready: verified (always, under enforce, whose
        "verify" policy made sure), or what enforce would refuse (testing)."""
        problem = client.identity_problem
        if problem is None:
            sts.verdict(mx, "verified")
        else:
            sts.refuse(mx, problem)

    @defer.inlineCallbacks
    def _open(self, address: str, port: int, policy: SessionPolicy) -> Any:
        """A connected client, or the Outcome of failing to connect."""
        d = self.connect(address, port, policy)
        self._connecting.add(d)
        try:
            client = yield d
        except Exception as e:  # noqa: BLE001 (any failure becomes an outcome)
            self._note(address, port, e)
            return classify(e)
        finally:
            self._connecting.discard(d)
        self._clients.add(client)
        client.done.addBoth(lambda _: self._clients.discard(client))
        return client

    def _connect_tcp(self, address: str, port: int,
                     policy: SessionPolicy) -> defer.Deferred[SMTPClient]:
        reactor: IReactorTCP = self.reactor
        timeout = self.config.relay.connect_timeout
        if ":" in address:
            endpoint: Any = endpoints.TCP6ClientEndpoint(reactor, address, port, timeout=timeout)
        else:
            endpoint = endpoints.TCP4ClientEndpoint(reactor, address, port, timeout=timeout)
        clock: IReactorTime = self.reactor
        client = SMTPClient(policy, clock, self.timeouts)
        return endpoint.connect(_QuietFactory.forProtocol(lambda: client))

