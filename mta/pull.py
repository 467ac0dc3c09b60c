"""The customer side of role reversal: fetch our mail from a provider that holds it.

- `odmr(...)` [RFC 2645]: connect to the provider's ODMR port (366), EHLO,
  STARTTLS when offered (the certificate checked unless told otherwise),
  AUTH (CRAM-MD5 preferred; PLAIN or LOGIN only inside TLS), ``ATRN
  [domains]``; on 250 the connection turns round (reversal.py) and our own
  SMTP server (protocol.py, session.py: the same code and policy as every
  listener) receives the held mail on it, into our spool and on through our
  normal routes.  The provider says QUIT when it has nothing more.
- `etrn(...)` [RFC 1985]: EHLO, then ``ETRN domain`` for each domain; the
  provider starts a run towards our own server.
- `PullService`: the ``[[pull]]`` entries of the config, each run every
  ``interval`` by the running service (the dial-up customer that is not
  always on); what ODMR receives goes straight to our relayer.

`mta odmr` and `mta etrn` (cli.py) run the same functions once.  Mail that
`mta odmr` receives is announced to the running service with a spool
notice (as `mta sendmail` does), which delivers it.

Errors: a connection, TLS or AUTH failure fails the Deferred with the
reason (`DeliveryError` or the connection's own error); a refusal of ATRN
or ETRN is a reply in the result, not an error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, endpoints, task
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from mta.config import Config, Listener, Pull
from mta.delivery.client import VERIFY_IF_OFFERED, SessionPolicy, SMTPClient
from mta.delivery.outcome import DeliveryError, reply_text
from mta.reply import Reply
from mta.server.context import MailQueue, ServerContext
from mta.server.protocol import ConnectionTable, SMTPFactory
from mta.spool.envelope import Envelope
from mta.spool.store import Spool

log = Logger(namespace="mta.pull")

# Our server on a turned connection: port-25 rules (mail for our domains from
# anyone, relaying only for mynetworks), and nothing but mail: no STARTTLS
# (the connection is as secure as it is), no AUTH, no ETRN/ATRN/TURN.
TURNED_LISTENER = Listener("turned", "smtp", "off", require_auth=False, plaintext_auth=False,
                           auth_mechanisms=())
ODMR_MECHANISMS = ("CRAM-MD5", "PLAIN", "LOGIN")  # fetchmail's choice first [RFC 2645 5.1.2]


@dataclass
class OdmrResult:
    reply: Reply  # the provider's reply to ATRN
    received: list[str] = field(default_factory=list)  # queue ids of what we received

    @property
    def ok(self) -> bool:
        """250 (mail came) or 453 (none was waiting) [RFC 2645 5.2.1]."""
        return self.reply.code in (250, 453)

    def summary(self, server: str) -> str:
        return (f"ATRN at {server}: {reply_text(self.reply)}; "
                f"{len(self.received)} messages received")


@dataclass
class EtrnResult:
    replies: list[tuple[str, Reply]]  # (domain, reply) in order

    @property
    def ok(self) -> bool:
        """Every request was taken: 250-253 [RFC 1985 5]."""
        return all(250 <= r.code <= 253 for _, r in self.replies)


class _Counting:
    """The queue of a turned session: notes each message, then hands it on."""

    def __init__(self, queue: MailQueue) -> None:
        self.queue = queue
        self.received: list[str] = []

    def enqueue(self, envelope: Envelope) -> None:
        self.received.append(envelope.queue_id)
        self.queue.enqueue(envelope)


class SpoolNotices:
    """A MailQueue for `mta odmr`: the running service picks each message up."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool

    def enqueue(self, envelope: Envelope) -> None:
        self.spool.notify("new", queue_id=envelope.queue_id)


class _QuietFactory(Factory):
    noisy = False


def _connect(reactor: Any, config: Config, host: str, port: int,
             client: SMTPClient) -> defer.Deferred[Any]:
    endpoint = endpoints.HostnameEndpoint(reactor, host, port,
                                          timeout=config.relay.connect_timeout)
    return endpoint.connect(_QuietFactory.forProtocol(lambda: client))


@defer.inlineCallbacks
def odmr(reactor: Any, config: Config, spool: Spool, queue: MailQueue, *, host: str, port: int,
         user: str, password: str, domains: tuple[str, ...] = (), tls_verify: bool = True,
         ca_file: Path | None = None) -> Any:
    """One ODMR session; fires with an `OdmrResult` once the connection is closed."""
    policy = SessionPolicy(
        helo_name=config.server.hostname, peer_name=host,
        tls=VERIFY_IF_OFFERED if tls_verify else "opportunistic", ca_file=ca_file,
        auth_user=user, auth_password=password, auth_mechanisms=ODMR_MECHANISMS)
    client = SMTPClient(policy, reactor)
    yield _connect(reactor, config, host, port, client)
    try:
        capabilities = yield client.ready
    except Exception:
        client.quit()
        raise
    if not capabilities.has("ATRN"):
        client.quit()
        yield client.done
        raise DeliveryError("5.5.1", f"{host} does not offer ATRN")
    received = _Counting(queue)
    context = ServerContext(config, TURNED_LISTENER, spool, queue=received, turned=True)
    factory = SMTPFactory(context, ConnectionTable())

    def our_server() -> Any:
        return factory.buildProtocol(None)
    command = "ATRN " + ",".join(domains) if domains else "ATRN"
    reply = yield client.reverse(command, our_server)
    if reply.code != 250:
        client.quit()
    yield client.done
    return OdmrResult(reply, received.received)


@defer.inlineCallbacks
def etrn(reactor: Any, config: Config, *, host: str, port: int, domains: tuple[str, ...]) -> Any:
    """ETRN for each domain over one session; fires with an `EtrnResult`."""
    client = SMTPClient(SessionPolicy(helo_name=config.server.hostname, peer_name=host,
                                      tls="off"), reactor)
    yield _connect(reactor, config, host, port, client)
    yield client.ready
    replies = []
    for domain in domains:
        reply = yield client.command(f"ETRN {domain}")
        replies.append((domain, reply))
    client.quit()
    yield client.done
    return EtrnResult(replies)


def read_password(path: Path) -> str:
    """The first line of a password file (never the command line: ps shows it)."""
    return path.read_text(encoding="utf-8").partition("\n")[0].rstrip("\r")


class PullService(Service):
    """Runs each ``[[pull]]`` entry every `interval`, from start-up on; one run at a time each."""

    name = "pull"

    def __init__(self, config: Config, spool: Spool, queue: MailQueue, reactor: Any) -> None:
        self.config = config
        self.spool = spool
        self.queue = queue
        self.reactor = reactor
        self._loops: list[task.LoopingCall] = []
        self._running: dict[Pull, defer.Deferred[Any]] = {}

    def startService(self) -> None:
        super().startService()
        self._start_loops(self.config.pulls)

    def _start_loops(self, pulls: tuple[Pull, ...], new: Any = None) -> None:
        for pull in pulls:
            loop = task.LoopingCall(self._run, pull)
            loop.clock = self.reactor
            # At start-up every entry runs at once; after a reload, only the new ones.
            loop.start(pull.interval, now=new is None or pull in new)
            self._loops.append(loop)

    def _stop_loops(self) -> None:
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []

    def reconfigure(self, config: Config) -> None:
        """A reload: the new [[pull]] entries on their own schedule; a run in progress
        goes on to its end."""
        old, self.config = self.config, config
        if config.pulls == old.pulls or not self.running:
            return
        self._stop_loops()
        self._start_loops(config.pulls, new=set(config.pulls) - set(old.pulls))

    def stopService(self) -> defer.Deferred[Any] | None:
        super().stopService()
        self._stop_loops()
        running = list(self._running.values())
        for d in running:
            d.cancel()
        return defer.DeferredList(running, consumeErrors=True) if running else None

    def _run(self, pull: Pull) -> None:
        if pull in self._running:
            log.info("pull from {server}: the previous run is still going", server=pull.server)
            return
        d = self.run_once(pull)
        self._running[pull] = d

        def ended(result: Any) -> Any:
            # Not pop()'s value, d itself: a Deferred returning itself stalls its chain.
            self._running.pop(pull, None)
            return result
        d.addBoth(ended)

    def run_once(self, pull: Pull) -> defer.Deferred[Any]:
        d = defer.maybeDeferred(self._start, pull)
        d.addCallback(self._report, pull)
        d.addErrback(lambda f: log.warn(  # noqa: G010
            "pull ({protocol}) from {server} failed: {why}", protocol=pull.protocol,
            server=pull.server, why=f.getErrorMessage()))
        return d

    def _start(self, pull: Pull) -> defer.Deferred[Any]:
        if pull.protocol == "etrn":
            return etrn(self.reactor, self.config, host=pull.host, port=pull.port,
                        domains=pull.domains)
        assert pull.password_file is not None  # config.py requires it for odmr
        return odmr(self.reactor, self.config, self.spool, self.queue, host=pull.host,
                    port=pull.port, user=pull.user, password=read_password(pull.password_file),
                    domains=pull.domains, tls_verify=pull.tls_verify, ca_file=pull.ca_file)

    @staticmethod
    def _report(result: OdmrResult | EtrnResult, pull: Pull) -> None:
        if isinstance(result, OdmrResult):
            emit: Callable[..., None] = log.info if result.ok else log.warn
            emit("pull (odmr) from {server}: {summary}", server=pull.server,
                 summary=result.summary(pull.server))
            return
        for domain, reply in result.replies:
            log.info("pull (etrn) from {server}: ETRN {domain}: {reply}", server=pull.server,
                     domain=domain, reply=reply_text(reply))
