"""`make soak`: receive -> queue -> relay -> sink for SOAK_MINUTES under random faults (issue 10).

What runs (all on 127.0.0.1, free ports, in a directory of its own; every
process it starts is stopped and the spool file system unmounted at the end,
even when it fails):

- mta (`twistd -n mta` of this work tree, bench/mtaproc.py) with its spool
  on a 64 MiB tmpfs mounted for the run, and these domains:
    good.test    -> Postfix's smtp-sink (-d: every transaction dumped to a file)
    defer.test   -> a fake next hop answering 4xx at MAIL, RCPT or after the dot, half the time
    drop.test    -> one closing the connection at the greeting, MAIL, RCPT or mid-DATA, half the time
    stall.test   -> a tarpit: no answer at the greeting, RCPT or after the dot, at times
                    (30% of its connections during 15 s of every minute)
    reject.test  -> one answering 5xx at RCPT or after the dot, always (so: bounces)
    sender.test  -> a local Maildir: the senders' mailboxes, where the DSNs arrive
  The fake next hops (an asyncio SMTP server in this process) record a
  message only when they answer 250 to its final dot.
- Python clients (smtplib, a few threads) sending messages of 1-3
  recipients with a unique Message-ID each; a message counts as acknowledged
  (for the recipients that got 250) only once its DATA got 250.
- Faults: mta stopped with SIGTERM or SIGKILL at random moments while the
  clients send (the first part of the run), and the spool file system filled
  with a ballast file for a while, then emptied (the whole run).

The second part of the run keeps mta up: after a warm-up the clients pause
until the queue is empty, RSS and open file descriptors are sampled, the
load and faults go on, then faults stop (the next hops heal, but for the
rejecting one), `mta queue flush`, the queue drains and they are sampled
again.

Checks (the exit status is 1 when one fails):
- every acknowledged (message, recipient) was delivered to its sink or
  bounced (a DSN naming it arrived in the sender's Maildir), and
  duplicates are only those README's "What mta guarantees" allows: a
  delivery in flight at a SIGKILL (the first copy reached its sink less
  than KILL_WINDOW seconds before one, or a fake hop recorded a dot sent
  before it up to HOP_LAG seconds after), or one made on a full spool when
  mta was stopped before the disk had room again, or just after (see explain());
- RSS flat after the warm-up; no file descriptor leaked (queue empty both
  times); the spool empty at the end.

Environment: SOAK_MINUTES (default 15), SOAK_CLIENTS (4), SOAK_DIR (default a
new directory under /tmp; kept afterwards with mta's log), SOAK_SEED, and
SOAK_RECEIVER=1 for sessions in a second process (``[server] receiver_process``;
the faults hit the main process, which ends its child; RSS and fds are the main
process's).  Needs root (the tmpfs mount) and smtp-sink (`make peers`).
"""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import os
import random
import re
import signal
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from common import BenchError, free_port, raise_nofile, rss_kb, wait_for
from mtaproc import Mta, with_receiver_process
from peers import SmtpSink

SPOOL_SIZE = "64m"
KILL_WINDOW = 5.0          # a copy older than this at a SIGKILL was not in flight
KEPT_SLACK = 2.0           # after a full disk has room: mta writes what it kept each second
HOP_LAG = 2.0              # a fake next hop may record a dot sent before a SIGKILL this late
RSS_SLACK_KB = 16 * 1024   # RSS growth allowed between the two quiet samples
RSS_SLACK_RATIO = 0.15
DRAIN_TIMEOUT = 300.0
SENDER = "sender@sender.test"

CONFIG = """
[server]
hostname = "mta.soak"
spool = "spool"
postmaster = "postmaster@sender.test"
receiver_process = false

[[listeners]]
endpoint = "tcp:{port}:interface=127.0.0.1"
role = "smtp"

[relay]
mynetworks = ["127.0.0.0/8"]
nameservers = ["127.0.0.1:9"]
dns_timeout = "1s"
connect_timeout = "5s"
retry_min = "2s"
retry_max = "15s"
lifetime = "1d"
delay_warning = "0"
smtp_greeting_timeout = "4s"
smtp_command_timeout = "4s"
smtp_mail_timeout = "4s"
smtp_rcpt_timeout = "4s"
smtp_data_init_timeout = "4s"
smtp_data_block_timeout = "4s"
smtp_data_done_timeout = "6s"
dead_host_time = "10s"
concurrency = 20
concurrency_per_destination = 5

[limits]
message_size = "{message_size}"
connections = 500
connections_per_client = 500

[domains."good.test"]
route = "smtp:[127.0.0.1]:{good}"

[domains."defer.test"]
route = "smtp:[127.0.0.1]:{defer}"

[domains."drop.test"]
route = "smtp:[127.0.0.1]:{drop}"

[domains."stall.test"]
route = "smtp:[127.0.0.1]:{stall}"

[domains."reject.test"]
route = "smtp:[127.0.0.1]:{reject}"

[domains."sender.test"]
route = "maildir:mail/sender.test"
"""

# Where the clients' recipients go, with weights.
DOMAINS = {"good.test": 50, "defer.test": 15, "drop.test": 12, "stall.test": 10,
           "reject.test": 13}

MESSAGE_ID = re.compile(rb"^Message-ID:\s*(<soak\.[^>]+>)", re.IGNORECASE | re.MULTILINE)
RCPT_ARGS = re.compile(rb"^X-Rcpt-Args:\s*<([^>]*)>", re.IGNORECASE | re.MULTILINE)
DSN_DATE = re.compile(rb"^Date:\s*(.+)$", re.MULTILINE)
DSN_RECIPIENT = re.compile(rb"^Final-Recipient:\s*[^;]+;\s*(\S+)\s*\r?\nAction:\s*(\w+)",
                           re.IGNORECASE | re.MULTILINE)


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


# -- the faulty next hops ---------------------------------------------------------------

class Stop(Exception):
    """End this connection: dropped, or stalled until the peer gave up."""


@dataclass
class FakeHop:
    """A next hop that misbehaves at random: with `probability`, at one of `stages`;
    with `episodes` (on, period), only during the first `on` seconds of every
    `period` (a tarpit that stalls all the time is a dead host: mta stops
    trying it for dead_host_time, and its mail would never go)."""

    name: str
    kind: str                  # defer | drop | stall | reject
    probability: float
    stages: tuple[str, ...]    # of greeting, mail, rcpt, data, dot
    rng: random.Random
    episodes: tuple[float, float] | None = None
    healed: bool = False       # set while the queue drains: faults have stopped
    port: int = 0
    delivered: list[tuple[bytes, str, float]] = field(default_factory=list)
    faults: Counter = field(default_factory=Counter)

    def pick(self) -> str | None:
        if self.healed and self.kind != "reject":
            return None
        if self.episodes and time.monotonic() % self.episodes[1] >= self.episodes[0]:
            return None
        if self.rng.random() < self.probability:
            return self.rng.choice(self.stages)
        return None

    async def fault(self, stage: str, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        """Misbehave at `stage`: an error reply (returns), or Stop."""
        self.faults[f"{self.kind} at {stage}"] += 1
        if self.kind == "defer":
            writer.write(b"451 4.3.2 soak: try again later\r\n")
        elif self.kind == "reject":
            writer.write(b"550 5.1.1 soak: no such user\r\n" if stage == "rcpt"
                         else b"554 5.7.1 soak: rejected\r\n")
        elif self.kind == "drop":
            raise Stop
        else:  # stall: say nothing, read until the peer hangs up
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    if not await asyncio.wait_for(reader.read(65536), 5):
                        break
                except TimeoutError:
                    continue
            raise Stop
        await writer.drain()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self.session(reader, writer)
        except (Stop, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        fault = self.pick()
        if fault == "greeting":
            await self.fault(fault, reader, writer)
            return
        writer.write(b"220 " + self.name.encode() + b" soak ESMTP\r\n")
        rcpts: list[str] = []
        in_mail = False
        while True:
            line = await reader.readline()
            if not line:
                return
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-" + self.name.encode() +
                             b"\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 SIZE 100000000\r\n")
            elif verb == b"HELO":
                writer.write(b"250 " + self.name.encode() + b"\r\n")
            elif verb == b"MAIL":
                fault, rcpts, in_mail = self.pick(), [], False
                if fault == "mail":
                    await self.fault(fault, reader, writer)
                    continue
                in_mail = True
                writer.write(b"250 2.1.0 ok\r\n")
            elif verb == b"RCPT" and in_mail:
                if fault == "rcpt":
                    await self.fault(fault, reader, writer)
                    continue
                match = re.search(rb"<([^>]*)>", line)
                rcpts.append((match.group(1) if match else b"").decode(errors="replace").lower())
                writer.write(b"250 2.1.5 ok\r\n")
            elif verb == b"DATA" and rcpts:
                writer.write(b"354 go ahead\r\n")
                await writer.drain()
                headers, lines = b"", 0
                while True:
                    chunk = await reader.readline()
                    if not chunk:
                        return
                    if chunk == b".\r\n":
                        break
                    lines += 1
                    if fault == "data" and lines > 3:
                        await self.fault(fault, reader, writer)
                    if len(headers) < 4096:
                        headers += chunk
                in_mail = False
                if fault == "dot":
                    await self.fault(fault, reader, writer)
                    continue
                found = MESSAGE_ID.search(headers)
                now = time.time()
                for rcpt in rcpts:
                    self.delivered.append((found.group(1) if found else b"?", rcpt, now))
                writer.write(b"250 2.0.0 ok queued\r\n")
            elif verb in (b"RSET", b"NOOP"):
                in_mail, rcpts = (False, []) if verb == b"RSET" else (in_mail, rcpts)
                writer.write(b"250 2.0.0 ok\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 bye\r\n")
                await writer.drain()
                return
            else:
                writer.write(b"503 5.5.1 soak: bad sequence\r\n")
            await writer.drain()


class Hops:
    """The fake next hops, served by an asyncio loop in a thread of their own."""

    def __init__(self, rng: random.Random) -> None:
        self.hops = {
            "defer.test": FakeHop("defer.soak", "defer", 0.5, ("mail", "rcpt", "dot"), rng),
            "drop.test": FakeHop("drop.soak", "drop", 0.5, ("greeting", "mail", "rcpt", "data"),
                                 rng),
            "stall.test": FakeHop("stall.soak", "stall", 0.3, ("greeting", "rcpt", "dot"), rng,
                                  episodes=(15, 60)),
            "reject.test": FakeHop("reject.soak", "reject", 1.0, ("rcpt", "dot"), rng),
        }
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="hops", daemon=True)
        self.servers: list[asyncio.AbstractServer] = []

    def start(self) -> Hops:
        self.thread.start()
        for hop in self.hops.values():
            hop.port = free_port()
            self.servers.append(asyncio.run_coroutine_threadsafe(
                asyncio.start_server(hop.handle, "127.0.0.1", hop.port), self.loop).result(10))
        return self

    def heal(self, healed: bool) -> None:
        """Faults stop (the rejecting hop still rejects: its mail must bounce), or start again."""
        for hop in self.hops.values():
            hop.healed = healed

    def stop(self) -> None:
        if not self.thread.is_alive():
            return

        async def close() -> None:
            for server in self.servers:
                server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


# -- the clients ---------------------------------------------------------------------------

class Clients:
    """Threads sending with smtplib; `acked[message_id] = (recipients, time)`."""

    def __init__(self, port: int, count: int, seed: int) -> None:
        self.port = port
        self.count = count
        self.seed = seed
        self.acked: dict[str, tuple[list[str], float]] = {}
        self.outcomes: Counter = Counter()
        self.lock = threading.Lock()
        self.sequence = 0
        self.sending = threading.Event()
        self.done = threading.Event()
        self.busy = 0
        self.threads = [threading.Thread(target=self.run, args=(i,), name=f"client-{i}",
                                         daemon=True) for i in range(count)]

    def start(self) -> Clients:
        self.sending.set()
        for thread in self.threads:
            thread.start()
        return self

    def pause(self) -> None:
        """Stop sending and return once no client is inside a session."""
        self.sending.clear()
        wait_for("the clients to pause", lambda: self.busy == 0, timeout=120, interval=0.1)

    def stop(self) -> None:
        self.done.set()
        self.sending.set()
        for thread in self.threads:
            thread.join(120)

    def next_id(self) -> int:
        with self.lock:
            self.sequence += 1
            return self.sequence

    def message(self, rng: random.Random, number: int) -> tuple[str, list[str], bytes]:
        message_id = f"<soak.{self.seed}.{number}@client.soak>"
        domains = rng.choices(list(DOMAINS), weights=list(DOMAINS.values()), k=rng.randint(1, 3))
        rcpts = sorted({f"u{rng.randint(1, 50)}@{d}" for d in domains})
        size = rng.choice([500, 2000, 8000, 8000, 30000]) if rng.random() < 0.97 \
            else rng.randint(100_000, 400_000)
        line = b"x" * 76 + b"\r\n"
        body = line * (size // len(line) + 1)
        head = (f"From: <{SENDER}>\r\nTo: {', '.join(rcpts)}\r\nSubject: soak {number}\r\n"
                f"Message-ID: {message_id}\r\n\r\n").encode()
        return message_id, rcpts, head + body

    def run(self, index: int) -> None:
        rng = random.Random(self.seed * 100 + index)
        while not self.done.is_set():
            self.sending.wait()
            if self.done.is_set():
                return
            with self.lock:
                self.busy += 1
            try:
                self.session(rng)
            finally:
                with self.lock:
                    self.busy -= 1
            time.sleep(rng.uniform(0, 0.3))

    def session(self, rng: random.Random) -> None:
        try:
            smtp = smtplib.SMTP("127.0.0.1", self.port, timeout=60)
        except OSError:
            self.count_outcome("connect failed")
            time.sleep(0.2)
            return
        try:
            for _ in range(rng.randint(1, 5)):
                if not self.sending.is_set():
                    break
                message_id, rcpts, data = self.message(rng, self.next_id())
                try:
                    refused = smtp.sendmail(SENDER, rcpts, data)
                except smtplib.SMTPResponseException as e:
                    self.count_outcome(f"{e.smtp_code // 100}xx")
                    if e.smtp_code == 421:
                        return
                    smtp.rset()
                    continue
                except smtplib.SMTPRecipientsRefused:
                    self.count_outcome("all recipients refused")
                    smtp.rset()
                    continue
                accepted = [r for r in rcpts if r not in refused]
                with self.lock:
                    self.acked[message_id] = (accepted, time.time())
                self.count_outcome("250")
            smtp.quit()
        except (OSError, smtplib.SMTPException):
            self.count_outcome("connection lost")
        finally:
            smtp.close()

    def count_outcome(self, what: str) -> None:
        with self.lock:
            self.outcomes[what] += 1


# -- faults on the mta and its disk ------------------------------------------------------

class Spool:
    """The spool directory as a tmpfs of its own; fill() and empty() a ballast file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.ballast = path / ".soak-ballast"
        self.mounted = False
        self.fills = 0

    def mount(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SPOOL_SIZE},mode=0755", "tmpfs",
                        str(self.path)], check=True)
        self.mounted = True

    def unmount(self) -> None:
        if not self.mounted:
            return
        self.empty()
        if subprocess.run(["umount", str(self.path)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(self.path)], check=False)
        self.mounted = False

    def fill(self) -> None:
        """Write the ballast until the file system is full, to the last block."""
        self.fills += 1
        fd = os.open(self.ballast, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            block = b"\0" * (1 << 20)
            for size in (1 << 20, 1 << 16, 4096, 512):
                try:
                    while True:
                        os.write(fd, block[:size])
                except OSError:
                    pass
        finally:
            os.close(fd)

    def empty(self) -> None:
        self.ballast.unlink(missing_ok=True)

    def files(self) -> list[str]:
        """What is left in the spool, but the ballast, the running server's pid file and
        its blanks (empty message files it keeps ahead of need in queue/)."""
        return sorted(str(p.relative_to(self.path)) for p in self.path.rglob("*")
                      if p.is_file() and p != self.ballast and p != self.path / "mta.pid"
                      and not _blank(p))

    def queued(self) -> int:
        """Files in queue/ and tmp/, but blanks (empty message files made ahead of need)."""
        return sum(1 for name in ("queue", "tmp") if (self.path / name).is_dir()
                   for path in (self.path / name).iterdir() if not _blank(path))


def _blank(path: Path) -> bool:
    """An empty message file (a blank), or a file gone meanwhile (delivered)."""
    try:
        return path.suffix == ".msg" and path.stat().st_size == 0
    except FileNotFoundError:
        return True


class Chaos:
    """The fault schedule: mta restarts while `restarts` is set, disk fills while `fills` is."""

    def __init__(self, mta: Mta, spool: Spool, rng: random.Random) -> None:
        self.mta = mta
        self.spool = spool
        self.rng = rng
        self.kills: list[float] = []       # wall-clock times of the SIGKILLs
        self.terms: list[float] = []       # and of the SIGTERMs
        self.full: list[tuple[float, float]] = []  # the spool full, from, to (wall clock)
        self.restarts = threading.Event()
        self.fills = threading.Event()
        self.stop = threading.Event()
        self.mta_lock = threading.Lock()   # held while mta is down or starting
        self.disk_lock = threading.Lock()  # held while the ballast is there
        self.error: BaseException | None = None
        self.threads = [threading.Thread(target=self.guard, args=(f,), daemon=True, name=f.__name__)
                        for f in (self.restart_loop, self.disk_loop)]

    def start(self) -> Chaos:
        for thread in self.threads:
            thread.start()
        return self

    def calm(self) -> None:
        """No more faults from here on (until set again); returns once none is under way."""
        self.restarts.clear()
        self.fills.clear()
        with self.mta_lock, self.disk_lock:
            self.spool.empty()
        if self.error:
            raise self.error

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            if thread.is_alive():
                thread.join(300)
        self.spool.empty()

    def guard(self, loop) -> None:
        try:
            loop()
        except BaseException as e:  # noqa: BLE001 (handed to the main thread)
            self.error = e
            self.stop.set()

    def restart_loop(self) -> None:
        while not self.stop.wait(self.rng.uniform(15, 40)):
            if not self.restarts.is_set():
                continue
            with self.mta_lock:
                if self.rng.random() < 0.5:
                    self.kills.append(time.time())
                    self.mta.process.kill()
                    self.mta.process.wait(30)
                    self.mta.log.close()
                    log(f"SIGKILL mta (#{len(self.kills)})")
                else:
                    self.terms.append(time.time())
                    seconds = self.mta.stop()
                    log(f"SIGTERM mta (#{len(self.terms)}), exited in {seconds or 0:.1f} s")
                time.sleep(self.rng.uniform(0, 2))
                self.mta.start()

    def disk_loop(self) -> None:
        while not self.stop.wait(self.rng.uniform(20, 50)):
            if not self.fills.is_set():
                continue
            with self.disk_lock:
                start = time.time()
                try:
                    self.spool.fill()
                    log(f"spool file system full (#{self.spool.fills})")
                    self.stop.wait(self.rng.uniform(5, 20))
                finally:
                    self.spool.empty()
                    self.full.append((start, time.time()))
                log("spool file system emptied")


# -- measuring and checking ----------------------------------------------------------------

def fd_count(pid: int) -> int:
    """Open fds, but the empty files the spool keeps ahead of need (spare unnamed files
    and blanks, made in batches: how many are ready when the queue is quiet varies).
    A message's file that leaked would hold data."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if KEPT_AHEAD.search(os.readlink(f"/proc/{pid}/fd/{fd}")) and \
                    os.stat(f"/proc/{pid}/fd/{fd}").st_size == 0:
                continue
        except OSError:
            continue  # closed meanwhile
        count += 1
    return count


KEPT_AHEAD = re.compile(r"/tmp/#\d+ \(deleted\)$")


def fd_targets(pid: int) -> Counter:
    out: Counter = Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        out[re.sub(r"\[\d+\]", "[...]", target)] += 1
    return out


def quiet_sample(mta: Mta) -> tuple[int, int, Counter]:
    """(RSS kB, fds, fd targets) once the queue is empty: the lowest fd count of a few seconds."""
    counts = []
    for _ in range(5):
        time.sleep(1)
        counts.append(fd_count(mta.pid))
    return rss_kb(mta.pid), min(counts), fd_targets(mta.pid)


def drain(mta: Mta, spool: Spool, out: Path) -> bool:
    mta.cli("queue", "flush", stdout=out / "flush.out")
    try:
        wait_for("the queue to drain", lambda: spool.queued() == 0, timeout=DRAIN_TIMEOUT,
                 interval=0.5)
    except BenchError:
        return False
    return True


def sink_deliveries(dump: Path, hops: Hops) -> dict[str, list[tuple[str, str, float]]]:
    """Per domain, (message id, recipient, time) of every copy a sink accepted."""
    out: dict[str, list[tuple[str, str, float]]] = defaultdict(list)
    for path in dump.iterdir():
        head = path.read_bytes()[:16384]
        found = MESSAGE_ID.search(head)
        message_id = found.group(1).decode() if found else "?"
        for rcpt in RCPT_ARGS.findall(head):
            out["good.test"].append((message_id, rcpt.decode(errors="replace").lower(),
                                     path.stat().st_mtime))
    for domain, hop in hops.hops.items():
        out[domain].extend((m.decode(), r, t) for m, r, t in hop.delivered)
    return out


def bounces(mailboxes: Path) -> tuple[list[tuple[str, str, float, float]], Counter]:
    """(message id, recipient, time it arrived, time it was made) of every failure
    report; and the DSN actions seen."""
    out, actions = [], Counter()
    for path in mailboxes.rglob("*"):
        if not path.is_file() or path.parent.name not in ("new", "cur"):
            continue
        data = path.read_bytes()
        ids = MESSAGE_ID.findall(data)
        message_id = ids[0].decode() if ids else "?"
        # When the report was made (its Date:, to the second) as well as when it
        # reached the Maildir: one made, or delivered, just before a SIGKILL was in
        # flight at it (made again, or delivered again, by the next mta).
        date = DSN_DATE.search(data.split(b"\n\n", 1)[0].replace(b"\r", b""))
        try:
            made = email.utils.parsedate_to_datetime(date.group(1).decode()).timestamp()
        except (AttributeError, TypeError, ValueError):
            made = path.stat().st_mtime
        for rcpt, action in DSN_RECIPIENT.findall(data):
            actions[action.decode().lower()] += 1
            if action.lower() == b"failed":
                out.append((message_id, rcpt.decode(errors="replace").lower(),
                            path.stat().st_mtime, made))
    return out, actions


@dataclass
class Row:
    what: str
    value: str
    ok: bool | None = None  # None: information, not a check


def explain(first: tuple[float, ...], second: float, chaos: Chaos) -> str | None:
    """Why a recipient got a second copy at `second` after one at `first` (when it
    reached its sink, and for a DSN also when it was made), if it may:
    - "kill": the first was in flight at a SIGKILL (the next hop's 250 came, or the
      report was made, less than KILL_WINDOW seconds before it: mta died before
      writing it down; or up to HOP_LAG seconds after it: a fake next hop, in a
      thread of this busy process, read a final dot mta had sent before it died);
    - "disk": the first came while the spool was full, and mta was stopped
      (SIGTERM or SIGKILL) during that same outage or at most KEPT_SLACK seconds
      after it (mta writes what it kept every second), before the second copy:
      the outcome kept in memory could not be written (README, What mta guarantees).
    A DSN's Date: is to the second: the times are compared with a second's slack."""
    if any(-HOP_LAG <= k - t <= KILL_WINDOW + 1 for t in first for k in chaos.kills
           if k <= second + 1):
        return "kill"
    for start, end in chaos.full:
        if any(start <= t <= end for t in first) and any(
                start <= k <= end + KEPT_SLACK and k <= second + 1
                for k in chaos.kills + chaos.terms):
            return "disk"
    return None


def check_deliveries(clients: Clients, deliveries: dict, failed: list, chaos: Chaos,
                     rows: list[Row]) -> list[str]:
    copies: dict[tuple[str, str], list[tuple[float, str, tuple[float, ...]]]] = \
        defaultdict(list)
    for domain, items in deliveries.items():
        for message_id, rcpt, t in items:
            copies[(message_id, rcpt)].append((t, domain, (t,)))
    for message_id, rcpt, arrived, made in failed:
        copies[(message_id, rcpt)].append((arrived, "bounce", (arrived, made)))
    acked_pairs = {(m, r) for m, (rcpts, _) in clients.acked.items() for r in rcpts}
    lost, unexplained, mixed, notes = [], [], [], []
    explained: Counter = Counter()
    delivered = bounced = 0
    for pair in sorted(acked_pairs):
        seen = sorted(copies.get(pair, []))
        if not seen:
            lost.append(pair)
            continue
        kinds = {k for _, k, _ in seen}
        if "bounce" in kinds and len(kinds) > 1:
            mixed.append((pair, seen))
        if "bounce" in kinds:
            bounced += 1
        else:
            delivered += 1
        for (_, _, first), (second, _, _) in itertools.pairwise(seen):
            why = explain(first, second, chaos)
            if why:
                explained[why] += 1
            else:
                unexplained.append((pair, seen))
    unacked = {pair for pair in copies if pair not in acked_pairs and pair[0] != "?"}
    total = len(acked_pairs)
    kills = len(chaos.kills)
    rows.append(Row("acknowledged (message, recipient)", f"{total} in {len(clients.acked)} messages"))
    rows.append(Row("  delivered to their sink", str(delivered)))
    rows.append(Row("  bounced (DSN to the sender)", str(bounced)))
    rows.append(Row("acknowledged and lost", str(len(lost)), not lost and total > 0))
    rows.append(Row("delivered and also bounced", str(len(mixed)), not mixed))
    rows.append(Row("duplicates: in flight at a SIGKILL",
                    f"{explained['kill']} (SIGKILLs: {kills}, at most 20 a kill)",
                    explained["kill"] <= 20 * kills))
    restarts = sum(1 for a, b in chaos.full for k in chaos.kills + chaos.terms
                   if a <= k <= b + KEPT_SLACK)
    rows.append(Row("duplicates: outcome in memory, stopped on a full disk",
                    f"{explained['disk']} (restarts while full or {KEPT_SLACK:g} s after: "
                    f"{restarts})"))
    rows.append(Row("duplicates not explained", str(len(unexplained)), not unexplained))
    rows.append(Row("delivered without a 250 to the client", f"{len(unacked)} (allowed: the "
                    "reply was lost to a restart or a full disk)"))
    for pair in lost[:10]:
        notes.append(f"lost: {pair[0]} to {pair[1]}")
    for pair, seen in (unexplained + mixed)[:10]:
        times = ", ".join(f"{k} at {time.strftime('%H:%M:%S', time.localtime(t))}"
                          f".{int(t % 1 * 1000):03d}" for t, k, _ in seen)
        notes.append(f"copies of {pair[0]} to {pair[1]}: {times}")
    return notes


def rss_rows(baseline: tuple, end: tuple, samples: list[tuple[float, int, int]],
             rows: list[Row]) -> list[str]:
    rss0, fds0, targets0 = baseline
    rss1, fds1, targets1 = end
    limit = rss0 + max(RSS_SLACK_KB, int(rss0 * RSS_SLACK_RATIO))
    peak = max((s[1] for s in samples), default=rss1)
    rows.append(Row("RSS after warm-up, queue empty", f"{rss0 / 1024:.1f} MiB"))
    rows.append(Row("RSS peak under load", f"{peak / 1024:.1f} MiB"))
    rows.append(Row("RSS at the end, queue empty", f"{rss1 / 1024:.1f} MiB "
                    f"(limit {limit / 1024:.1f})", rss1 <= limit))
    rows.append(Row("open fds after warm-up / at the end", f"{fds0} / {fds1}", fds1 <= fds0))
    notes = []
    if fds1 > fds0:
        extra = targets1 - targets0
        notes.append("fds at the end not there after warm-up: " +
                     ", ".join(f"{k} x{v}" for k, v in extra.most_common(10)))
    return notes


def print_table(rows: list[Row]) -> None:
    width = max(len(r.what) for r in rows)
    vwidth = max(len(r.value) for r in rows)
    print()
    print(f"{'check':<{width}}  {'value':<{vwidth}}  result")
    print(f"{'-' * width}  {'-' * vwidth}  ------")
    for r in rows:
        result = "" if r.ok is None else ("ok" if r.ok else "FAIL")
        print(f"{r.what:<{width}}  {r.value:<{vwidth}}  {result}")
    print(flush=True)


# -- the run -------------------------------------------------------------------------------

def soak(directory: Path, minutes: float, client_count: int, seed: int) -> int:
    rng = random.Random(seed)
    rows: list[Row] = []
    notes: list[str] = []
    total = minutes * 60
    chaos_part = total * 0.55
    warmup = total * 0.15
    started = time.monotonic()

    sink = SmtpSink(directory / "sink", count=False, dump=directory / "sink" / "dump")
    hops = Hops(rng)
    spool = Spool(directory / "mta" / "spool")
    mta: Mta | None = None
    clients: Clients | None = None
    chaos: Chaos | None = None
    try:
        sink.start()
        hops.start()
        spool.mount()
        (directory / "mta" / "mail" / "sender.test").mkdir(parents=True, exist_ok=True)
        config = CONFIG
        if os.environ.get("SOAK_RECEIVER") == "1":
            config = with_receiver_process(CONFIG)
        mta = Mta(directory / "mta", config, free_port(), message_size="10MB", good=sink.port,
                  **{d.split(".")[0]: h.port for d, h in hops.hops.items()}).start()
        log(f"mta on {mta.port}, spool on a {SPOOL_SIZE} tmpfs, smtp-sink on {sink.port}, "
            + ", ".join(f"{d} on {h.port}" for d, h in hops.hops.items()))

        clients = Clients(mta.port, client_count, seed).start()
        chaos = Chaos(mta, spool, rng)
        chaos.restarts.set()
        chaos.fills.set()
        chaos.start()
        log(f"part 1: restarts, disk fills and faulty hops for {chaos_part / 60:.1f} min")
        wait_until(started + chaos_part, chaos)
        chaos.restarts.clear()
        with chaos.mta_lock:  # a restart under way finishes first
            pass
        log(f"part 2: mta stays up; warm-up under load for {warmup / 60:.1f} min")
        wait_until(time.monotonic() + warmup, chaos)
        clients.pause()
        chaos.calm()
        hops.heal(True)
        if not drain(mta, spool, directory):
            raise BenchError(f"the queue did not drain after the warm-up: {spool.files()[:10]}")
        baseline = quiet_sample(mta)
        log(f"baseline: RSS {baseline[0] / 1024:.1f} MiB, {baseline[1]} fds; load and faults again")
        hops.heal(False)
        chaos.fills.set()
        clients.sending.set()
        samples: list[tuple[float, int, int]] = []
        deadline = started + total
        while time.monotonic() < deadline and not chaos.stop.is_set():
            samples.append((time.monotonic(), rss_kb(mta.pid), fd_count(mta.pid)))
            time.sleep(2)
        log("faults stop: clients stopped, spool emptied, next hops healed, queue flushed")
        clients.stop()
        chaos.calm()
        chaos.finish()
        hops.heal(True)
        drained = drain(mta, spool, directory)
        end = quiet_sample(mta)
        left = spool.files()
        rows.append(Row("soak time", f"{(time.monotonic() - started) / 60:.1f} min "
                        f"(seed {seed})"))
        rows.append(Row("client attempts", ", ".join(f"{k}: {v}" for k, v in
                                                     sorted(clients.outcomes.items()))))
        rows.append(Row("mta restarts (part 1)",
                        f"SIGTERM {len(chaos.terms)}, SIGKILL {len(chaos.kills)}"))
        rows.append(Row("spool file system filled", f"{spool.fills} times"))
        for domain, hop in hops.hops.items():
            rows.append(Row(f"faults of {domain}", ", ".join(
                f"{k.split(' at ')[1]}: {v}" for k, v in sorted(hop.faults.items())) or "none"))
        text = mta.log_text()
        rows.append(Row("mta log: critical lines / tracebacks",
                        f"{len(re.findall(r'#critical]', text))} / {text.count('Traceback')}"))
        critical = Counter(re.sub(r"[0-9A-F]{16,}", "ID", line.split(" ", 1)[-1])
                           for line in text.splitlines() if "#critical]" in line)
        notes += [f"critical x{n}: {line}" for line, n in critical.most_common(5)]
        deliveries = sink_deliveries(sink.dump, hops)
        failed, actions = bounces(directory / "mta" / "mail" / "sender.test")
        rows.append(Row("DSN recipient reports", ", ".join(f"{k}: {v}" for k, v in
                                                           sorted(actions.items())) or "none"))
        notes += check_deliveries(clients, deliveries, failed, chaos, rows)
        notes += rss_rows(baseline, end, samples, rows)
        rows.append(Row("queue drained after the final flush", "yes" if drained else "no",
                        drained))
        rows.append(Row("files left in the spool", str(len(left)), not left))
        notes += [f"left in the spool: {name}" for name in left[:10]]
        return finish(rows, notes)
    finally:
        if clients is not None:
            clients.stop()
        if chaos is not None:
            chaos.finish()
        if mta is not None:
            mta.stop()
        hops.stop()
        sink.stop()
        spool.unmount()


def wait_until(deadline: float, chaos: Chaos) -> None:
    while time.monotonic() < deadline and not chaos.stop.is_set():
        time.sleep(1)
    if chaos.error:
        raise chaos.error


def finish(rows: list[Row], notes: list[str]) -> int:
    print_table(rows)
    for note in notes:
        print(note)
    failed = [r.what for r in rows if r.ok is False]
    print("soak: " + ("FAILED: " + "; ".join(failed) if failed else "all checks passed"),
          flush=True)
    return 1 if failed else 0


def main() -> int:
    if os.geteuid() != 0:
        raise SystemExit("soak: needs root (it mounts a tmpfs for the spool)")
    minutes = float(os.environ.get("SOAK_MINUTES", "15"))
    clients = int(os.environ.get("SOAK_CLIENTS", "4"))
    seed = int(os.environ.get("SOAK_SEED", str(random.randrange(1, 1 << 30))))
    directory = Path(os.environ.get("SOAK_DIR") or tempfile.mkdtemp(prefix="mta-soak-"))
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)
    raise_nofile()
    # SIGTERM (and ^C) end the run through the finally clauses: nothing left running.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(3))
    log(f"soak for {minutes:g} min in {directory} (mta's log: mta/twistd.log)")
    try:
        return soak(directory, minutes, clients, seed)
    except BenchError as e:
        print(f"soak: FAILED: {e}", flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
