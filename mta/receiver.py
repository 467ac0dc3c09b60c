"""SMTP sessions in a second process: the receiving process (``[server] receiver_process``).

One Python process runs on one core.  With ``receiver_process = true`` the
sessions of the ``smtp`` and ``submission`` listeners (not the ones that offer
ATRN, nor the local sendmail socket) run in a child process, and the main
process keeps everything else: the queue, deliveries, ETRN's queue runs, ATRN,
the metrics, the logs, the control notices.  Receiving (the dialogue, DATA, the
checks, DKIM signing, the commit's fsync) and delivering then use two cores.
There is still one owner of the queue, so nothing is ever delivered twice.

How the two work together:

- The main process binds every listener as before (ports below 1024 as root)
  and hands the sockets of those listeners to the child, which accepts on them.
  At start, connections wait in the sockets' queues until the child says it is
  ready, so that the child counts them (connection limits, AUTH failures) from
  the first.  If it cannot be started, is not ready after ``FIRST_READY_WAIT``,
  or dies, the main process accepts on them itself until a child is ready: a
  child that cannot start (or dies) slows the server down, never stops it.
- The child is started as ``python -m mta.receiver``, before twistd gives up
  root, so that it reads the same certificate and password files; it gives up
  root itself (to twistd's ``--uid``/``--gid``) before it accepts a connection.
  It reads the same config file; a reload (SIGHUP, `mta reload`) reaches it
  from the main process once the main process took the new config.
- They talk over a socket pair (the child's fd 3) in messages, tuples, each
  frame one pickled message or a pickled list of them; both ends are this
  module, started by the parent, and nothing else can reach the pair:

  child -> main: ``("ready", pid)`` once it accepts; ``("enqueue", envelope)``
  after each commit (the scheduler takes it as the server's own);
  ``("line", namespace, level, event, text, fields)``, a mail log line
  (maillog.py; `fields` only when the main process keeps a JSON log), and
  ``("log", record)``, any other log event, which the main process logs as
  its own (one log, one JSON log); ``("metric", name, args)``,
  the counts for the metrics endpoint; ``("etrn", call, arg, client, user)``,
  answered by main -> child ``("answer", call, reply)``.
  main -> child: ``("start",)`` once the relayer has recovered the spool (the
  child accepts only then), and ``("reload",)``.
  The child gathers its messages and writes them as one frame, at most 20 ms
  later (``Channel.GATHER``); ``etrn`` and ``ready`` go at once, and a
  stopping child writes what waits before it ends.

- Once the first child runs, the main process lowers its priority by
  ``[server] main_process_nice`` steps (`ReceivingProcess.yield_to_sessions`):
  the sessions go first, the deliveries fit in their waits.  A child started
  again inherits that and returns to the priority the first one had
  (``--nice``; `let_children_lower_their_nice_to`).
- When the main process falls behind, the frames wait in the child's memory
  only up to the transport's buffer: then the child stops accepting new
  connections until the main process has read them (sessions under way go on).
- A committed message is on disk before its 250, as always.  If the child
  dies between a commit and its ``enqueue`` frame, the main process finds the
  message when it notices the death (it looks for committed messages its
  scheduler does not know) and delivers it.  When the main process goes away,
  the pair closes and the child stops at once.  The child ignores SIGHUP,
  SIGUSR1 and SIGINT: they are the main process's (reload, twistd's log
  rotation, a Ctrl-C at the terminal), which stops the child with SIGTERM.

Left to one process by design: TURN (RFC 821) turns the client's connection
round into a delivery of the queue's mail, which only the main process can do;
on a listener served by the child it is refused with 502.  ATRN listeners stay
in the main process and work as always.  The connection limits and AUTH failure
counts of the child's listeners are counted in the child.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import pickle
import resource
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import defer, endpoints, protocol
from twisted.internet.error import CannotListenError, ProcessExitedAlready
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger, LogLevel, eventAsText
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from mta import config as config_module
from mta import maillog
from mta import reply as reply_module
from mta.observe import Metrics
from mta.reply import Reply

log = Logger(namespace="mta.receiver")

CHANNEL_FD = 3  # the child's end of the socket pair
FIRST_LISTENER_FD = 4  # the listening sockets follow, in the order of --listeners
RESTART_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)  # after a death; reset once it ran a minute
# Seconds the first child may take to serve before this process serves its listeners itself.
FIRST_READY_WAIT = 15.0
STOP_WAIT = 10.0  # seconds a stopping child gets before SIGKILL
LAST_WORDS_WAIT = 2.0  # seconds a stopping child waits for its last frames to go out
TURN_NOT_HERE = Reply(502, "5.5.1", "TURN is not available on this port")
# What a ("metric", name, args) frame may count, by name (_RemoteMetrics sends them).
_COUNTS: dict[str, Callable[..., None]] = {
    "connected": Metrics.connected, "disconnected": Metrics.disconnected,
    "rejected": Metrics.rejected, "received": Metrics.received, "checked": Metrics.checked,
    "dkim_signing": Metrics.dkim_signing, "sts": Metrics.sts, "delivery": Metrics.delivery}


def delegated(listener: Any, endpoint: Any) -> bool:
    """Whether `listener`'s sessions run in the receiving process: smtp and submission
    listeners without ATRN, on a plain TCP or UNIX endpoint (the child gets the bare
    socket; an ``ssl:`` endpoint's TLS would stay behind, so that one stays here)."""
    return config_module.handed_over(listener) and isinstance(
        endpoint, (endpoints.TCP4ServerEndpoint, endpoints.TCP6ServerEndpoint,
                   endpoints.UNIXServerEndpoint))


class Channel(Int32StringReceiver):
    """One end of the socket pair: frames of one pickled tuple, or of a pickled list
    of tuples, each.

    Given a `clock` (the child's end), `send` gathers messages and writes them
    together at most GATHER seconds later, or at once when GATHER_COUNT wait:
    one frame, pickled in one go, one write and one wake-up of the main
    process, for the log lines, counts and commits of several messages instead
    of three or four a message (at one session: 15% more messages a second,
    and over a quarter less CPU in the main process, in alternating runs).
    `send_now` writes what waits and its own message at once: for a message
    that waits for an answer, or changes what the other end does.  The order
    of the messages is kept either way.
    """

    MAX_LENGTH = 1 << 28  # an envelope with many recipients is large, never this large
    GATHER = 0.02  # seconds a gathered message may wait
    GATHER_COUNT = 256  # written at once when this many wait

    def __init__(self, handle: Callable[[tuple[Any, ...]], None],
                 lost: Callable[[], None], clock: Any = None) -> None:
        self.handle = handle
        self.lost = lost
        self.clock = clock
        self._gathered: list[tuple[Any, ...]] = []
        self._writer: Any = None  # the DelayedCall that writes what was gathered

    def send(self, *message: Any) -> None:
        if self.transport is None or not self.connected:
            return
        if self.clock is None:
            self.sendString(pickle.dumps(message, pickle.HIGHEST_PROTOCOL))
            return
        self._gathered.append(message)
        if len(self._gathered) >= self.GATHER_COUNT:
            self.flush()
        elif self._writer is None:
            self._writer = self.clock.callLater(self.GATHER, self.flush)

    def send_now(self, *message: Any) -> None:
        self.send(*message)
        self.flush()

    def flush(self) -> None:
        """Write the gathered frames now."""
        if self._writer is not None and self._writer.active():
            self._writer.cancel()
        self._writer = None
        gathered, self._gathered = self._gathered, []
        if gathered and self.transport is not None and self.connected:
            self.sendString(pickle.dumps(gathered, pickle.HIGHEST_PROTOCOL))

    def stringReceived(self, data: bytes) -> None:
        message = pickle.loads(data)
        if isinstance(message, list):  # gathered by the other end
            for each in message:
                self.handle(each)
        else:
            self.handle(message)

    def lengthLimitExceeded(self, length: int) -> None:
        self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self.connected = False
        if self._writer is not None and self._writer.active():
            self._writer.cancel()
        self._writer = None
        self._gathered = []
        self.lost()


class _ChannelFactory(protocol.Factory):
    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    def buildProtocol(self, addr: Any) -> Channel:
        return self.channel


# -- the main process's side ------------------------------------------------------------

class _ChildProtocol(protocol.ProcessProtocol):
    def __init__(self, ended: Callable[[Any], None]) -> None:
        self.ended = ended

    def processEnded(self, reason: Any) -> None:
        self.ended(reason)


class ReceivingProcess(service.Service):
    """Starts and watches the receiving process, and serves what it asks.

    `listeners`: ``(listener, endpoint, factory)`` for each delegated listener;
    the factory is the main process's own, used while the child is not serving.
    `user`: ``(uid, gid)`` the child switches to after reading its files (twistd's
    ``--uid``/``--gid`` when started as root), or None.  `nice`: the steps of nice
    this process lowers its priority by once the first child runs
    (``[server] main_process_nice``, `yield_to_sessions`).
    """

    name = "receiver"

    def __init__(self, config_path: str, listeners: list[tuple[Any, Any, Any]],
                 relayer: Any, pickup: Any, reactor: Any,
                 user: tuple[int, int | None] | None = None, nice: int = 0) -> None:
        self.config_path = config_path
        self.nice = nice
        self.base_nice = os.getpriority(os.PRIO_PROCESS, 0)  # what children run at
        self.listeners = listeners
        self.relayer = relayer
        self.pickup = pickup
        self.reactor = reactor
        self.user = user
        self.ports: list[Any] = []
        self.process: Any = None
        self.pid: int | None = None
        self.channel: Channel | None = None
        self.ready = False
        self.here = False  # whether this process accepts on the listeners
        self.stopping = False
        self._deaths = 0
        self._first_wait: Any = None
        self._started_at = 0.0
        self._restart: Any = None
        self._ended: defer.Deferred[None] | None = None
        self._open = 0  # the child's sessions the metrics count as active

    # -- start and stop ----------------------------------------------------------------

    def privilegedStartService(self) -> None:
        # Bound now, while we may still be root; the child accepts only once told to
        # (startService), after the relayer's start-up recovery.  Until it serves, the
        # connections wait in the listening sockets' queues rather than being served
        # here: each process counts its own connections and AUTH failures, and a client
        # must meet the same counts from its first connection.  A child that dies first,
        # or is not serving after FIRST_READY_WAIT, leaves the listeners to this one.
        super().privilegedStartService()
        for listener, endpoint, factory in self.listeners:
            port = _listen(endpoint, factory, listener.name)
            port.stopReading()
            self.ports.append(port)
        if self.nice:
            let_children_lower_their_nice_to(self.base_nice)  # before twistd gives up root
        self._spawn()
        if self.nice and self.process is not None:
            self.yield_to_sessions()

    def startService(self) -> None:
        super().startService()
        if self.channel is not None:
            self.channel.send("start")
        self._first_wait = self.reactor.callLater(FIRST_READY_WAIT, self._not_ready_yet)

    def _not_ready_yet(self) -> None:
        self._first_wait = None
        if not self.ready and not self.here and not self.stopping:
            log.warn("the receiving process is not serving after {wait:.0f} s; "  # noqa: G010
                     "this process serves its listeners until it does", wait=FIRST_READY_WAIT)
            self._serve_here()

    def stopService(self) -> defer.Deferred[None] | None:
        super().stopService()
        self.stopping = True
        for call in (self._restart, self._first_wait):
            if call is not None and call.active():
                call.cancel()
        ended = self._ended
        if self.process is not None and ended is not None:
            self._signal("TERM")
            killer = self.reactor.callLater(STOP_WAIT, self._signal, "KILL")
            ended.addBoth(lambda _: killer.cancel() if killer.active() else None)
        else:
            ended = defer.succeed(None)
        ended.addBoth(lambda _: defer.gatherResults(
            [defer.maybeDeferred(port.stopListening) for port in self.ports]))
        return ended

    def _signal(self, name: str) -> None:
        with contextlib.suppress(ProcessExitedAlready, OSError):
            self.process.signalProcess(name)

    def _spawn(self) -> None:
        self._restart = None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        child_fds: dict[int, Any] = {1: 1, 2: 2, CHANNEL_FD: theirs.fileno()}
        for i, port in enumerate(self.ports):
            child_fds[FIRST_LISTENER_FD + i] = port.fileno()
        argv = [sys.executable, "-m", "mta.receiver", "--config", self.config_path,
                "--listeners", ",".join(listener.name for listener, _, _ in self.listeners)]
        if maillog.metrics is not None:
            argv.append("--metrics")
        if self.user is not None:
            uid, gid = self.user
            argv += ["--user", f"{uid}:{-1 if gid is None else gid}"]
        if self.nice:
            # A child started after we lowered ours inherits it: back to its own.
            argv += ["--nice", str(self.base_nice)]
        self.ready = False
        self._ended = defer.Deferred()
        self.channel = Channel(self._received, self._channel_lost)
        try:
            self.process = self.reactor.spawnProcess(
                _ChildProtocol(self._child_ended), sys.executable, argv, env=dict(os.environ),
                childFDs=child_fds)
        except OSError as e:
            ours.close()
            log.error("cannot start the receiving process: {why}; this process serves "
                      "every listener", why=e.strerror or str(e))
            self.process = None
            self._serve_here()
            self._ended.callback(None)
            return
        finally:
            theirs.close()
        self.pid = self.process.pid
        self._started_at = self.reactor.seconds()
        self.reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX,
                                           _ChannelFactory(self.channel))
        ours.close()

    def yield_to_sessions(self) -> None:
        """Lower this process's priority by `nice` steps: the child's sessions wait for a
        client at every command and for the disk at every commit, and the work here
        (deliveries, the log) can wait for them instead of making them wait.

        At one session (smtp-source, runs of 400 messages on one server, this
        process's nice switched between them) the child took 6% more messages a
        second at nice 10 than at 0: the median of 30 pairs, 19 faster.  At 20
        sessions acceptance was the same (0.999, 12 pairs) and end to end no
        slower (1,183 against 1,119, four pairs): the deliveries run in the child's
        waits and keep up.  Nice 5 gained less."""
        target = min(self.base_nice + self.nice, 19)
        try:
            set_nice(target)
        except OSError as e:
            log.warn("cannot lower the main process's priority: {why}",  # noqa: G010
                     why=e.strerror or str(e))
            return
        log.info("the main process runs at nice {nice} ([server] main_process_nice = {by}): "
                 "the receiving process's sessions go first", nice=target, by=self.nice)

    def _child_ended(self, reason: Any) -> None:
        pid, self.process = self.pid, None
        if self._open and maillog.metrics is not None:
            maillog.metrics.sessions_lost(self._open)
        self._open = 0
        self._serve_here()
        ended, self._ended = self._ended, None
        if not self.stopping:
            code = getattr(reason.value, "exitCode", None)
            sig = getattr(reason.value, "signal", None)
            how = f"signal {sig}" if sig else f"status {code}"
            if self.reactor.seconds() - self._started_at > 60:
                self._deaths = 0
            delay = RESTART_DELAYS[min(self._deaths, len(RESTART_DELAYS) - 1)]
            self._deaths += 1
            log.error("the receiving process (pid {pid}) ended ({how}); this process "
                      "serves its listeners until it is back, in {delay:.0f} s",
                      pid=pid, how=how, delay=delay)
            # A message the child committed but had not reported is in the queue.
            self.relayer.adopt_unknown().addErrback(
                lambda f: log.failure("looking for unreported messages failed", f))
            self._restart = self.reactor.callLater(delay, self._respawn)
        if ended is not None:
            ended.callback(None)

    def _respawn(self) -> None:
        self._spawn()
        if self.channel is not None:
            self.channel.send("start")

    def _channel_lost(self) -> None:
        self.channel = None
        if self.process is not None and not self.stopping:
            self._signal("KILL")  # a child we cannot hear cannot report its commits

    def _serve_here(self) -> None:
        if not self.here:  # the ports were the child's, or nobody's yet: ours now
            for port in self.ports:
                port.startReading()
            self.here = True
        self.ready = False

    # -- what the child says --------------------------------------------------------------

    def _received(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "enqueue":
            self.relayer.enqueue(message[1])
        elif kind == "line":
            maillog.emit_line(*message[1:6])
        elif kind == "log":
            _log_again(message[1])
        elif kind == "metric":
            count = _COUNTS.get(message[1])
            if maillog.metrics is not None and count is not None:
                count(maillog.metrics, *message[2])
                self._open += {"connected": 1, "disconnected": -1}.get(message[1], 0)
        elif kind == "etrn":
            call, arg, client, user = message[1:5]
            d = defer.maybeDeferred(self.pickup.etrn, arg, client, user)
            d.addErrback(_etrn_failed)
            d.addCallback(self._answer, call)
        elif kind == "ready":
            self.ready = True
            if self.here:
                for port in self.ports:
                    port.stopReading()
                self.here = False
            log.info("the receiving process (pid {pid}) serves {names}", pid=message[1],
                     names=", ".join(listener.name for listener, _, _ in self.listeners))
        else:
            log.warn("the receiving process sent {kind!r}", kind=kind)  # noqa: G010

    def _answer(self, answer: Reply, call: int) -> None:
        if self.channel is not None:
            self.channel.send("answer", call, answer)

    def reload(self, config: Any) -> None:
        """After the main process took a new config: the child reads it too."""
        if self.channel is not None:
            self.channel.send("reload")


def set_nice(value: int) -> None:
    """Every thread of this process at nice `value`.  Linux keeps a nice value per
    thread (setpriority's "process" is the calling thread), and a new thread takes
    its starter's; elsewhere the process has one."""
    try:
        threads = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        threads = [0]
    for tid in threads:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, value)
        except ProcessLookupError:
            pass  # a thread that ended meanwhile


def let_children_lower_their_nice_to(base: int) -> None:
    """Let a process of ours that is no longer root go back to nice `base` (RLIMIT_NICE:
    an unprivileged process may lower its nice value to 20 minus the limit, and the
    limit outlives giving up root).  A child started again after a crash inherits the
    main process's lowered priority; with this it returns to `base`.  Without root to
    raise the limit, that child runs at the main process's priority."""
    wanted = 20 - base
    soft, hard = resource.getrlimit(resource.RLIMIT_NICE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    if hard != resource.RLIM_INFINITY and hard < wanted:
        hard = wanted
    with contextlib.suppress(OSError, ValueError):
        resource.setrlimit(resource.RLIMIT_NICE, (wanted, hard))


def _listen(endpoint: Any, factory: Any, name: str) -> Any:
    """Bind `endpoint` now (TCP endpoints listen at once); failure stops start-up."""
    result: list[Any] = []
    endpoint.listen(factory).addBoth(result.append)
    outcome = result[0] if result else None
    if isinstance(outcome, Failure):
        error = outcome.value
        if isinstance(error, CannotListenError):
            why = getattr(error.socketError, "strerror", None) or str(error.socketError)
        else:
            why = str(error)
        sys.stderr.write(f"mta: cannot listen on {name}: {why}\n")
        raise SystemExit(1)
    if outcome is None or not hasattr(outcome, "fileno"):
        sys.stderr.write(f"mta: cannot listen on {name}: not a TCP endpoint\n")
        raise SystemExit(1)
    return outcome


def _etrn_failed(failure: Failure) -> Reply:
    log.failure("ETRN from the receiving process failed", failure)
    return reply_module.LOCAL_ERROR


def _log_again(record: dict[str, Any]) -> None:
    """Log an event of the child's as if it were ours."""
    fields = record.get("fields") or {}
    if not maillog.structured:
        fields = {k: v for k, v in fields.items() if k == "mta_event"}
    level = LogLevel.levelWithName(record.get("level", "info"))
    Logger(namespace=record.get("namespace") or "mta").emit(
        level, "{log_text}", log_text=record.get("text", ""), **fields)


# -- the child's side --------------------------------------------------------------------

class _RemoteQueue:
    """The session's `MailQueue` in the child: a committed message goes to the scheduler."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    def enqueue(self, envelope: Any) -> None:
        self.channel.send("enqueue", envelope)


class _RemotePickup:
    """The session's `Pickup` in the child: ETRN is answered by the main process."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.calls: dict[int, defer.Deferred[Reply]] = {}
        self._ids = itertools.count(1)

    def etrn(self, arg: str, client: str, user: str | None) -> defer.Deferred[Reply]:
        call = next(self._ids)
        d: defer.Deferred[Reply] = defer.Deferred()
        self.calls[call] = d
        self.channel.send_now("etrn", call, arg, client, user)
        return d

    def answered(self, call: int, answer: Reply) -> None:
        d = self.calls.pop(call, None)
        if d is not None:
            d.callback(answer)

    def fail_all(self) -> None:
        calls, self.calls = self.calls, {}
        for d in calls.values():
            d.callback(reply_module.LOCAL_ERROR)

    def atrn(self, arg: str, user: str, peer: str) -> Reply:
        return reply_module.NOT_IMPLEMENTED  # ATRN listeners stay in the main process

    def turn(self, helo: str | None, user: str | None, peer: str) -> Reply:
        return TURN_NOT_HERE


class _RemoteMetrics:
    """maillog's `metrics` in the child: each count goes to the main process's Metrics."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    def connected(self, listener: str) -> None:
        self.channel.send("metric", "connected", (listener,))

    def disconnected(self, tls: bool) -> None:
        self.channel.send("metric", "disconnected", (tls,))

    def rejected(self, stage: str, answer: str) -> None:
        self.channel.send("metric", "rejected", (stage, answer))

    def received(self) -> None:
        self.channel.send("metric", "received", ())

    def checked(self, results: tuple[tuple[str, str], ...]) -> None:
        self.channel.send("metric", "checked", (results,))

    def dkim_signing(self, signed: int, errors: int) -> None:
        self.channel.send("metric", "dkim_signing", (signed, errors))

    def sts(self, mode: str, verdict: str) -> None:
        self.channel.send("metric", "sts", (mode, verdict))

    def delivery(self, status: str, delay: float) -> None:
        self.channel.send("metric", "delivery", (status, delay))




def _fields_wanted(config: Any) -> None:
    """The main process keeps a mail log line's fields only for its JSON log (``[log]
    json_file``, observe.py), which a reload may start or stop: only then are they sent."""
    maillog.structured = config.log.json_file is not None


_PLAIN = (str, int, float, bool, type(None))


def _plain(value: Any) -> Any:
    """A field as the JSON log would write it, and as pickle surely carries it."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def _forwarder(channel: Channel) -> Callable[[dict[str, Any]], None]:
    def forward(event: dict[str, Any]) -> None:
        namespace = event.get("log_namespace") or ""
        fields = {}
        if namespace.startswith("mta"):
            fields = {k: _plain(v) for k, v in event.items()
                      if not k.startswith("log_") and (k == "mta_event" or "mta_event" in event)}
        level = event.get("log_level")
        channel.send("log", {
            "namespace": namespace,
            "level": getattr(level, "name", "info"),
            "text": eventAsText(event, includeTraceback=True, includeTimestamp=False,
                                includeSystem=False),
            "fields": fields,
        })
    return forward


@implementer(IPushProducer)
class _AcceptPause:
    """Paused by the channel's transport when its buffer is full: stop accepting."""

    def __init__(self, ports: list[Any]) -> None:
        self.ports = ports
        self.paused = False

    def pauseProducing(self) -> None:
        if not self.paused:
            self.paused = True
            for port in self.ports:
                port.stopReading()

    def resumeProducing(self) -> None:
        if self.paused:
            self.paused = False
            for port in self.ports:
                port.startReading()

    def stopProducing(self) -> None:
        pass


class _Child:
    """The receiving process: its sessions, and its end of the channel."""

    def __init__(self, args: argparse.Namespace, reactor: Any) -> None:
        self.args = args
        self.reactor = reactor
        self.status = 0
        self.channel = Channel(self._handle, self._lost, clock=reactor)
        self.stopping = False
        self._closed: defer.Deferred[None] | None = None
        self.pickup = _RemotePickup(self.channel)
        self.reloader: Any = None
        self.top = service.MultiService()
        self.waiting: list[tuple[int, Any]] = []  # listening socket, factory: until "start"
        self.ports: list[Any] = []

    def run(self) -> int:
        from twisted.logger import globalLogBeginner
        # Reloads come from the main process; a stray SIGHUP or SIGUSR1 (meant for the
        # main process's log) must not end this one, nor a Ctrl-C at the terminal of a
        # foreground server (the whole process group gets it): the main process stops
        # this one (SIGTERM) as it stops itself.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        self.reactor.callWhenRunning(signal.signal, signal.SIGINT, signal.SIG_IGN)
        self.reactor.callWhenRunning(stop_at_the_first_signal)
        self.reactor.adoptStreamConnection(CHANNEL_FD, socket.AF_UNIX,
                                           _ChannelFactory(self.channel))
        os.close(CHANNEL_FD)
        # When the main process falls behind, what we tell it waits in our memory:
        # take no new connection until it has caught up.
        self.pause = _AcceptPause(self.ports)
        self.channel.transport.registerProducer(self.pause, True)
        globalLogBeginner.beginLoggingTo([_forwarder(self.channel)], redirectStandardIO=False)
        if self.args.nice is not None and os.getpriority(os.PRIO_PROCESS, 0) > self.args.nice:
            # Started again by a main process that yielded its priority (sessions first).
            try:
                set_nice(self.args.nice)
            except OSError as e:
                log.info("the receiving process runs at the main process's priority: "
                         "{why}", why=e.strerror or str(e))
        self.reactor.callWhenRunning(self._set_up)
        self.reactor.run()
        return self.status

    def _fail(self, why: str) -> None:
        """Say why in the main process's log, then end (the channel closes once written)."""
        log.error("the receiving process cannot start: {why}", why=why)
        self.status = 1
        self.channel.flush()
        self.channel.transport.loseConnection()

    def _set_up(self) -> None:
        from mta.config import Live
        from mta.server.context import ServerContext
        from mta.server.protocol import ConnectionTable, SMTPFactory
        from mta.spool.store import Spool
        from mta.tap import Reloader, SpareFiles, inbound_checks, prepare

        args, reactor = self.args, self.reactor
        try:
            prepared = prepare(args.config, reactor)
        except config_module.ConfigError as e:
            self._fail(str(e))
            return
        config, trust = prepared.config, prepared.trust
        by_name = {listener.name: listener for listener in config.listeners}
        names = args.listeners.split(",")
        missing = [name for name in names if name not in by_name]
        if missing:
            self._fail(f"{args.config} has no listener {missing[0]} now (listeners take "
                       f"a restart)")
            return
        maillog.metrics = _RemoteMetrics(self.channel) if args.metrics else None
        maillog.forward = lambda *line: self.channel.send("line", *line)
        _fields_wanted(config)
        live = Live(config)
        spool = Spool(config.server.spool)
        SpareFiles(spool, reactor).setServiceParent(self.top)
        self.reloader = Reloader(args.config, live, trust, reactor, child=True)
        self.reloader.on_reload.append(_fields_wanted)
        checks = inbound_checks(config, reactor, self.top, self.reloader)
        queue = _RemoteQueue(self.channel)
        connections = ConnectionTable()
        for i, name in enumerate(names):
            listener = by_name[name]
            context = ServerContext(live, listener, spool, queue=queue, pickup=self.pickup,
                                    trust=trust,
                                    checks=checks if listener.role == "smtp" else None)
            factory: Any = SMTPFactory(context, connections)
            if listener.tls == "implicit":
                factory = trust.tls.wrap_factory(factory, reactor)
            self.waiting.append((FIRST_LISTENER_FD + i, factory))
        if args.user is not None:
            from twisted.python.util import switchUID
            uid, gid = (int(x) for x in args.user.split(":"))
            switchUID(uid, None if gid < 0 else gid)
        self.top.startService()
        reactor.addSystemEventTrigger("before", "shutdown", self._stop)

    def _handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "answer":
            self.pickup.answered(message[1], message[2])
        elif kind == "reload" and self.reloader is not None:
            self.reloader.reload()
        elif kind == "start":
            self._start()

    def _start(self) -> None:
        if self.reloader is None:
            return  # not set up (it failed): nothing to serve
        for fd, factory in self.waiting:
            probe = socket.socket(fileno=os.dup(fd))
            family = probe.family
            probe.close()
            port = self.reactor.adoptStreamPort(fd, family, factory)
            if self.pause.paused:
                port.stopReading()
            self.ports.append(port)
            os.close(fd)
        self.waiting.clear()
        self.channel.send_now("ready", os.getpid())

    def _stop(self) -> defer.Deferred[Any]:
        self.stopping = True
        for port in self.ports:
            port.stopListening()
        self.ports.clear()
        d = defer.maybeDeferred(self.top.stopService)
        d.addBoth(lambda _: self._say_last())
        return d

    def _say_last(self) -> defer.Deferred[None] | None:
        """The frames gathered and written so far reach the main process before this one
        ends: the channel closes once they are out (or after LAST_WORDS_WAIT seconds)."""
        if not self.channel.connected:
            return None
        self.channel.flush()
        self._closed = defer.Deferred()
        timer = self.reactor.callLater(LAST_WORDS_WAIT, self._closed.callback, None)
        self._closed.addBoth(lambda _: timer.cancel() if timer.active() else None)
        self.channel.transport.loseConnection()
        return self._closed

    def _lost(self) -> None:
        # The main process is gone (or told us to end): stop accepting at once, so
        # that a new main process can bind the ports, and end.
        self.pickup.fail_all()
        for port in self.ports:
            port.stopListening()
        self.ports.clear()
        if self.stopping:  # the channel closed by _say_last, or the main process gone
            closed, self._closed = self._closed, None
            if closed is not None and not closed.called:
                closed.callback(None)
        elif self.reactor.running:
            self.reactor.stop()


def stop_at_the_first_signal() -> None:
    """Let the reactor's SIGTERM and SIGINT handlers stop it once (call when it runs).
    Stopped with its process group (systemd's stop, `kill -- -PGID`, an impatient
    second Ctrl-C), a process may get a second signal while it stops: the child gets
    one from the group and one from the main process.  Twisted would stop the
    stopping reactor again and log that as a critical error."""
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}

    def once(signum: int, frame: Any) -> None:
        for other, handler in handlers.items():
            if callable(handler):
                signal.signal(other, signal.SIG_IGN)  # SIGKILL still ends a stuck stop
        handlers[signum](signum, frame)

    for signum, handler in handlers.items():
        if callable(handler):
            signal.signal(signum, once)


def _child_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mta.receiver")
    parser.add_argument("--config", required=True)
    parser.add_argument("--listeners", required=True)
    parser.add_argument("--user", default=None)
    parser.add_argument("--metrics", action="store_true")
    parser.add_argument("--nice", type=int, default=None)
    from twisted.internet import reactor

    from mta import loop
    loop.install(reactor)
    loop.settle_garbage_collector(reactor)
    return _Child(parser.parse_args(argv), reactor).run()


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
