"""The twistd entry point: command-line options and the service tree.

`makeService` reads the config (a bad one stops start-up with one line naming
the key), then builds, in start order: the relayer (whose start scans the
spool, so recovery finishes before any listener accepts a connection), the
SIGHUP handler, then one listening service per ``[[listeners]]`` entry.
The inbound checks of port-25 mail (mta/checks/) get a thread pool of
their own, started and stopped with the service.
Last comes the local submission socket (``[server] sendmail_socket``,
server/local.py), where `sendmail` hands over local users' mail.
With ``[server] receiver_process`` the smtp and submission listeners are bound
here but served by a second process (receiver.py), which reads the same config.
This is the only module that knows every part of mta.

Listeners share one `Trust` (TLS context, password portal, AUTH failures per
address) and one `ConnectionTable` (connection limits).  A listener with
``tls = "implicit"`` (465, RFC 8314 3.3) listens on its plain endpoint with
the factory wrapped in TLS by `ServerTLS.wrap_factory`, so that SIGHUP's new
certificate reaches it too; its endpoint should therefore be ``tcp:``, not
``ssl:``.  SIGHUP re-reads the whole config (`Reloader`); sessions in
progress are not dropped.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python import usage

from mta import blocking
from mta import config as config_module

DEFAULT_CONFIG = "etc/mta.toml"  # a work tree's config, relative to the working directory
SYSTEM_CONFIG = "/etc/mta/mta.toml"  # an installed server's (README, "Installing on a server")
log = Logger(namespace="mta")


def default_config_path() -> str:
    """$MTA_CONFIG, else etc/mta.toml when there is one here, else /etc/mta/mta.toml:
    the same for twistd and every `mta` subcommand, so `sendmail` run by cron from
    any directory finds the server's config."""
    if os.environ.get("MTA_CONFIG"):
        return os.environ["MTA_CONFIG"]
    return DEFAULT_CONFIG if os.path.isfile(DEFAULT_CONFIG) else SYSTEM_CONFIG


class Options(usage.Options):
    optParameters = [  # noqa: RUF012 (twisted.python.usage's convention)
        ["config", "c", None, ("config file (default: $MTA_CONFIG, else etc/mta.toml "
                              "if present, else /etc/mta/mta.toml)")],
    ]

    def postOptions(self) -> None:
        if self["config"] is None:
            self["config"] = default_config_path()


PID_FILE = "mta.pid"  # in the spool: how `mta reload` finds the running server


class Reloader(service.Service):
    """SIGHUP (and `mta reload`, which sends it) re-reads the whole config.

    The file is read and checked exactly as `mta check-config` does (`prepare`:
    the config, the certificate, the password file, the endpoints).  A config
    that fails is logged with check-config's one-line error and the running
    one stays in force.  Otherwise the `Live` holder swaps to it in one step:
    new connections and every session's next EHLO/HELO or MAIL see it, and so
    does each delivery attempt that starts from then on; no session is
    dropped.  What cannot change without a restart (the listeners, the spool
    directory, the metrics endpoint) is logged as such
    and keeps its running value.

    While it runs, the server's pid is in ``SPOOL/mta.pid``, for `mta reload`.

    In the receiving process (`child`, receiver.py) it neither handles SIGHUP nor
    writes the pid: the main process tells it to reload once it has; and it logs
    only a failure, since the main process logs the rest.
    """

    name = "reloader"

    def __init__(self, path: str, live: Any, trust: Any, reactor: Any,
                 child: bool = False) -> None:
        self.child = child
        self.path = path
        self.live = live
        self.trust = trust
        self.reactor = reactor
        self.on_reload: list[Any] = []  # callables(config) run after each swap
        self._previous: Any = None
        self._pid_file: Path | None = None

    def startService(self) -> None:
        super().startService()
        if self.child:
            return
        try:
            self._previous = signal.signal(signal.SIGHUP, self._hangup)
        except ValueError:  # not the main thread (an embedding program): no SIGHUP reload
            self._previous = None
        self._pid_file = self.live.config.server.spool / PID_FILE
        try:
            self._pid_file.write_text(f"{os.getpid()}\n")
        except OSError as e:
            log.warn("cannot write {path}: {why}; mta reload needs --pidfile",  # noqa: G010
                     path=str(self._pid_file), why=e.strerror)
            self._pid_file = None

    def stopService(self) -> None:
        super().stopService()
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None
        if self._pid_file is not None:
            self._pid_file.unlink(missing_ok=True)
            self._pid_file = None

    def _hangup(self, signum: int, frame: Any) -> None:
        # A signal handler runs between two bytecodes of whatever the reactor
        # was doing: do the work in the reactor's own turn.
        self.reactor.callFromThread(self.reload)

    def reload(self) -> bool:
        """Read the config file again and put it in force; False when it failed."""
        try:
            prepared = prepare(self.path, self.reactor)
        except config_module.ConfigError as e:
            log.error("{who}reload failed, the running config stays in force: {error}",
                      who="receiving process: " if self.child else "", error=str(e))
            return False
        old = self.live.config
        new = prepared.config
        kept: dict[str, Any] = {}
        changed = []
        if new.listeners != old.listeners:
            kept["listeners"] = old.listeners
            changed.append("[[listeners]]")
        # [server] keys that take a restart, with what is worked out from them.
        for key, names in (("spool", ("spool",)),
                           ("receiver_process", ("receiver_process", "two_processes")),
                           ("main_process_nice", ("main_process_nice",))):
            if any(getattr(new.server, name) != getattr(old.server, name) for name in names):
                kept["server"] = dataclasses.replace(
                    kept.get("server", new.server),
                    **{name: getattr(old.server, name) for name in names})
                changed.append(_restart_needed(key, old, new))
        if new.metrics != old.metrics:
            kept["metrics"] = old.metrics
            changed.append("[metrics]")
        for what in changed if not self.child else ():
            log.warn("reload: {what} changed: that takes a restart; "  # noqa: G010
                     "until then the running one stays", what=what)
        if kept:
            new = dataclasses.replace(new, **kept)
        for warning in alias_warnings(new) + pickup_warnings(new, prepared.trust):
            if not self.child:
                log.warn("{warning}", warning=warning)  # noqa: G010
        self.trust.adopt(prepared.trust, new)
        self.live.swap(new)
        for callback in self.on_reload:
            callback(new)
        if self.child:
            return True
        log.info("reload: {path} in force (reload #{n}): {domains} domain(s), "
                 "hostname {hostname}", path=self.path, n=self.live.generation,
                 domains=len(new.domains), hostname=new.server.hostname)
        return True


def _restart_needed(key: str, old: config_module.Config, new: config_module.Config) -> str:
    """What a reload names for a changed [server] key that takes a restart."""
    if key == "receiver_process" and \
            old.server.receiver_process == new.server.receiver_process == "auto":
        # The file says the same; what "auto" gives moved with pull_users (config.py).
        return ('[server] receiver_process = "auto", which now gives '
                + config_module.where_sessions_run(new))
    return f"[server] {key}"


def alias_warnings(config: config_module.Config) -> list[str]:
    """Unknown alias targets and loops (aliases.py), as `mta aliases check` shows them."""
    return config.addresses.problems()


def pickup_warnings(config: config_module.Config, trust: Any) -> list[str]:
    """What would stop a pull_users customer from pulling with ATRN (fetchmail: CRAM-MD5 only)."""
    pullers = {user: domain.name for domain in config.domains.values()
               for user in domain.pull_users}
    if not pullers:
        return []
    listeners = [x for x in config.listeners if x.atrn]
    if not listeners:
        return [("pull_users are set but no listener offers ATRN: add one with "
                 "role = \"odmr\" (port 366), or only TURN can pull")
                + (", and TURN is refused with [server] receiver_process"
                   if config.server.two_processes else "")]
    warnings = []
    if not any("CRAM-MD5" in x.auth_mechanisms for x in listeners):
        warnings.append("no ATRN listener offers CRAM-MD5 (auth_mechanisms): fetchmail's "
                        "ODMR client cannot log in")
    users = trust.checker.users if trust.checker is not None else frozenset()
    cram = trust.checker.cram_md5_users() if trust.checker is not None else frozenset()
    for user, domain in sorted(pullers.items()):
        if user not in users:
            warnings.append(f'[domains."{domain}"] pull_users: {user} has no password in '
                            f"[auth] passwords: mta passwd --cram-md5 {user}")
        elif user not in cram:
            warnings.append(f'[domains."{domain}"] pull_users: {user} has no CRAM-MD5 secret, '
                            f"so fetchmail's ODMR client cannot log in: "
                            f"mta passwd --cram-md5 {user}")
    return warnings


def config_warnings(config: config_module.Config, trust: Any) -> list[str]:
    """Everything start-up logs and `mta check-config` prints as a warning."""
    return (alias_warnings(config) + relay_warnings(config) + pickup_warnings(config, trust)
            + sendmail_warnings(config) + tls_policy_warnings(config))


def relay_warnings(config: config_module.Config) -> list[str]:
    """mynetworks wider than private address space: everyone in it may relay [DESIGN.md 8]."""
    warnings = []
    for network in config.relay.mynetworks:
        if network.prefixlen == 0:
            warnings.append(f"[relay] mynetworks: {network} makes this an open relay: any host "
                            "on the internet may send mail anywhere through it")
        elif network.num_addresses > 1 and not (network.is_private or network.is_loopback
                                                or network.is_link_local):
            warnings.append(f"[relay] mynetworks: {network} is wider than private address "
                            f"space: all its {network.num_addresses} addresses may relay; "
                            "use AUTH for clients outside your own networks")
    return warnings


def tls_policy_warnings(config: config_module.Config) -> list[str]:
    """[tls_policy] entries that govern nothing: mail for the domain never goes to its
    own servers by SMTP (router.py), or "sts" where MTA-STS cannot apply."""
    warnings = []
    for domain, level in sorted(config.tls_policy.items()):
        where = f'[tls_policy] "{domain}"'
        configured = config.domain_for(domain)
        route = configured.route if configured is not None else None
        if route is not None and route.kind == "maildir":
            warnings.append(f"{where}: mail for {domain} is delivered here ({route}); "
                            "the entry has no effect")
        elif route is None and config.relay.smarthost:
            warnings.append(f"{where}: mail for {domain} goes through the smart host, whose "
                            "TLS is [relay] smarthost_tls; the entry has no effect")
        elif level == "sts" and route is not None and route.kind == "smtp":
            warnings.append(f"{where}: MTA-STS governs delivery by MX only, and {domain} "
                            f"has the route {route}; its TLS is [relay] tls_verify's")
    return warnings


def sendmail_warnings(config: config_module.Config) -> list[str]:
    """What would keep local users from reaching the sendmail socket."""
    from mta.server.local import reachable_by_others
    if config.server.sendmail_socket is None:
        return []
    why = reachable_by_others(config.server.sendmail_socket)
    return [f"[server] sendmail_socket: {why}"] if why else []


def runtime_user(options: Options) -> tuple[int, int | None] | None:
    """``(uid, gid)`` twistd switches to after binding the ports (``--uid``, ``--gid``),
    when started as root; else None."""
    parent = getattr(options, "parent", None) or {}
    uid, gid = parent.get("uid"), parent.get("gid")
    if uid is None or os.geteuid() != 0:
        return None
    return uid, gid


def give_directories_to_runtime_user(config: config_module.Config, options: Options,
                                     made: list[Any] = ()) -> None:
    """With ``twistd --uid U [--gid G]`` started as root, the spool (made just now,
    as root) and the Maildir roots must belong to U, who runs everything after
    the ports are bound; otherwise every message would be refused with 451."""
    user = runtime_user(options)
    if user is None:
        return
    uid, gid = user
    gid = -1 if gid is None else gid
    roots = [config.server.spool, *made]
    for domain in config.domains.values():
        if domain.route.kind == "maildir" and domain.route.path is not None:
            domain.route.path.mkdir(parents=True, exist_ok=True)
            roots.append(domain.route.path)
    for root in roots:
        os.chown(root, uid, gid)
        for directory, subdirectories, files in os.walk(root):
            for name in subdirectories + files:
                os.chown(os.path.join(directory, name), uid, gid, follow_symlinks=False)


@dataclass
class Prepared:
    """Everything start-up needs that can be wrong in the operator's files."""

    config: config_module.Config
    trust: Any
    endpoints: list[Any]  # one server endpoint per [[listeners]] entry, in order


def prepare(path: str, reactor: Any) -> Prepared:
    """Read the config, the certificate and the password file, and parse every
    listener endpoint; a problem is a ConfigError naming the file and the key.

    `mta check-config` runs exactly this, so it fails where start-up would.
    """
    from mta.server.trust import Trust
    from mta.tls import TLSConfigError

    config = config_module.load(path)
    try:
        trust = Trust.from_config(config, reactor)
    except TLSConfigError as e:
        raise config_module.ConfigError(f"{path}: [tls] certificate: {e}") from None
    except (OSError, ValueError) as e:  # the password file
        raise config_module.ConfigError(f"{path}: [auth] passwords: {e}") from None
    if config.metrics.endpoint:
        try:
            endpoints.serverFromString(reactor, config.metrics.endpoint)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise config_module.ConfigError(
                f"{path}: [metrics] endpoint: bad endpoint {config.metrics.endpoint!r}: "
                f"{e}") from None
    parsed = []
    for i, listener in enumerate(config.listeners):
        try:
            parsed.append(endpoints.serverFromString(reactor, listener.endpoint))
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise config_module.ConfigError(
                f"{path}: [listeners #{i + 1}] endpoint: bad endpoint "
                f"{listener.endpoint!r}: {e}") from None
    return Prepared(config, trust, parsed)


def inbound_checks(config: config_module.Config, reactor: Any, top: service.MultiService,
                   reloader: Reloader) -> Any:
    """The SPF/DKIM/DMARC checks of port-25 mail (mta/checks/), with their own thread pool;
    None when there is no ``smtp`` listener.  A reload reaches them through the config
    each transaction takes, and resizes the pool."""
    if not any(listener.role == "smtp" for listener in config.listeners):
        return None
    from mta.checks.inbound import ChecksService, InboundChecks
    checks = InboundChecks(reactor, config.checks.threads)
    ChecksService(checks).setServiceParent(top)
    reloader.on_reload.append(checks.reconfigure)
    return checks


class SpareFiles(service.Service):
    """While running, the spool keeps unnamed files open ahead of need for the process
    that receives mail over SMTP (`Spool.keep_spare_files`), made by the worker
    threads between jobs.  Started with the other services, so after twistd (or the
    receiving process) has become the runtime user: the files belong to the spool's
    owner."""

    def __init__(self, spool: Any, reactor: Any) -> None:
        self.spool = spool
        self.workers = blocking.workers_for(reactor)

    def startService(self) -> None:
        super().startService()
        self.spool.keep_spare_files()
        self.workers.between_jobs.append(self.spool.top_up_spare_files)

    def stopService(self) -> None:
        super().stopService()
        if self.spool.top_up_spare_files in self.workers.between_jobs:
            self.workers.between_jobs.remove(self.spool.top_up_spare_files)
        self.spool.stop_spare_files()


class ListeningService(StreamServerEndpointService):
    """A listener whose failure to bind (port in use, no permission) is one line."""

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            why = getattr(e.socketError, "strerror", None) or str(e.socketError)
            sys.stderr.write(f"mta: cannot listen on {self.name}: {why}\n")
            raise SystemExit(1) from None


def makeService(options: Options) -> service.MultiService:
    from twisted.internet import reactor

    from mta import loop, maillog, receiver
    from mta.delivery.scheduler import Relayer
    from mta.observe import JSONLogService, Metrics, metrics_service
    from mta.pull import PullService
    from mta.server.context import ServerContext
    from mta.server.local import LOCAL_LISTENER, LocalSubmission, prepare_directory
    from mta.server.protocol import ConnectionTable, SMTPFactory
    from mta.server.reversal import Pickup
    from mta.spool.store import Spool

    try:
        prepared = prepare(options["config"], reactor)
    except config_module.ConfigError as e:
        sys.stderr.write(f"mta: {e}\n")
        raise SystemExit(1) from None
    config, trust = prepared.config, prepared.trust
    maillog.use_fast_text_log()
    loop.install(reactor)
    loop.settle_garbage_collector(reactor)
    for warning in config_warnings(config, trust):
        log.warn("{warning}", warning=warning)  # noqa: G010
    if trust.tls is not None:
        log.info("TLS certificate: {what}", what=trust.tls.describe())
    top = service.MultiService()
    spool = Spool(config.server.spool)
    made = []
    if config.server.sendmail_socket is not None:
        try:
            made = [d for d in [prepare_directory(config.server.sendmail_socket)] if d]
        except OSError as e:
            sys.stderr.write(f"mta: [server] sendmail_socket: cannot make "
                             f"{config.server.sendmail_socket.parent}: {e.strerror}\n")
            raise SystemExit(1) from None
    give_directories_to_runtime_user(config, options, made)
    live = config_module.Live(config)
    relayer = Relayer(live, spool, reactor)
    relayer.setName("relayer")
    relayer.setServiceParent(top)
    reloader = Reloader(options["config"], live, trust, reactor)
    reloader.setServiceParent(top)
    json_log = JSONLogService(config.log.json_file)
    json_log.setServiceParent(top)
    reloader.on_reload.append(json_log.reconfigure)
    maillog.metrics = None
    if config.metrics.endpoint:
        maillog.metrics = Metrics(relayer)
        metrics_service(config.metrics.endpoint, maillog.metrics, reactor).setServiceParent(top)
    pulls = PullService(config, spool, relayer, reactor)  # idle without [[pull]] entries
    pulls.setServiceParent(top)
    reloader.on_reload.append(pulls.reconfigure)
    connections = ConnectionTable()
    pickup = Pickup(live, relayer, reactor)
    checks = inbound_checks(config, reactor, top, reloader)
    handed = []  # served by the receiving process, when there is one
    for listener, endpoint in zip(config.listeners, prepared.endpoints):
        context = ServerContext(live, listener, spool, queue=relayer, pickup=pickup,
                                trust=trust, checks=checks if listener.role == "smtp" else None)
        factory = SMTPFactory(context, connections)
        if listener.tls == "implicit":
            factory = trust.tls.wrap_factory(factory, reactor)
        if config.server.two_processes and receiver.delegated(listener, endpoint):
            handed.append((listener, endpoint, factory))
            continue
        listening = ListeningService(endpoint, factory)
        listening._raiseSynchronously = True
        listening.setName(listener.name)
        listening.setServiceParent(top)
    if len(handed) < len(config.listeners):
        SpareFiles(spool, reactor).setServiceParent(top)  # some sessions run in this process
    log.info("{where}", where=config_module.where_sessions_run(config)
             if handed or not config.server.two_processes
             else "sessions in the main process (no smtp or submission listener to hand over)")
    reactor.callWhenRunning(receiver.stop_at_the_first_signal)
    if handed:
        receiving = receiver.ReceivingProcess(options["config"], handed, relayer, pickup,
                                              reactor, user=runtime_user(options),
                                              nice=config.server.main_process_nice)
        receiving.setServiceParent(top)
        reloader.on_reload.append(receiving.reload)
    if config.server.sendmail_socket is not None:
        # Local users' `sendmail` (local.py): the same sessions, without TLS, AUTH or ETRN.
        context = ServerContext(live, LOCAL_LISTENER, spool, queue=relayer)
        LocalSubmission(config.server.sendmail_socket, SMTPFactory(context, connections),
                        reactor).setServiceParent(top)
    return top
