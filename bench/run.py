"""`make bench`: mta side by side with its peers, on loopback, in one run (issue 9).

What it measures (all on 127.0.0.1, free ports; every process it starts is
stopped at the end, even when a measurement fails):

1. Durable acceptance (no 250 before the message is on disk): Postfix's
   smtp-source, 5 KB messages, a new connection per message, at 1 and 20
   sessions, into
   - mta, example.org routed to an smtp-sink, so it relays while it receives,
     with [server] receiver_process = false ("mta, 1 process") and true
     ("mta, 2 processes", what the default "auto" picks with two cores or more);
   - a private Postfix instance (own config and queue in a temporary
     directory; the machine's Postfix is not touched) relaying to an smtp-sink;
   - aiosmtpd with a write + fsync + rename + directory-fsync handler;
   - smtp-sink, which keeps nothing: the ceiling of the client and loopback.
2. End-to-end relay: N messages injected at 20 sessions, until the smtp-sink
   has counted all of them; mta vs Postfix.
3. Latency from the final "\\r\\n.\\r\\n" to the 250 at 20 sessions (our own
   asyncio client, bench/loadgen.py); mta vs Postfix.
   1-3 run in rounds: each round runs every system once, in an order rotated
   each round, so drift hits all alike; the table shows the median.
4. mta's memory: RSS per idle EHLO'd connection (1,000 held open), RSS growth
   while receiving one 200 MB message (both in one process, and in the
   receiving process of two), RSS with 100,000 messages queued minus an empty
   server's (one process).
5. Queue scale, 100,000 messages for a held domain put in the spool with
   the spool's API (no SMTP), page cache dropped when we are root: time to
   the 220 and to the queue being loaded, time until a message for a local
   Maildir user sent just after start is delivered, `mta queue list`, and
   SIGTERM to exit.

Environment: BENCH_QUICK=1 (one round, fewer messages, 10,000 queued;
written to bench/results/QUICK.*), BENCH_MESSAGES (per acceptance run,
default 3000), BENCH_RELAY_MESSAGES (2000), BENCH_LATENCY_MESSAGES (2000),
BENCH_ROUNDS (3), BENCH_QUEUE (100000), BENCH_CONNECTIONS (1000).

The table goes to stdout and bench/results/LATEST.md, the chart to
bench/results/LATEST.png.  Nothing here is a test; tests/ never imports it.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from common import (
    BENCH,
    REPO,
    BenchError,
    drop_caches,
    free_port,
    machine,
    need_path,
    raise_nofile,
    reset_peak,
    rss_kb,
    settled_rss_kb,
    source_env,
    status_kb,
    wait_for,
)
from mtaproc import (
    DURABILITY,
    HOLD_CONFIG,
    LOADED,
    RELAY2_CONFIG,
    RELAY_CONFIG,
    Mta,
    with_receiver_process,
)
from peers import AiosmtpdFsync, PrivatePostfix, SmtpSink, smtp_source
from report import Row, chart, markdown_table, text_table

QUICK = os.environ.get("BENCH_QUICK", "") not in ("", "0")


def setting(name: str, full: int, quick: int) -> int:
    return int(os.environ.get(name, quick if QUICK else full))


MESSAGES = setting("BENCH_MESSAGES", 3000, 500)
RELAY_MESSAGES = setting("BENCH_RELAY_MESSAGES", 2000, 500)
LATENCY_MESSAGES = setting("BENCH_LATENCY_MESSAGES", 2000, 500)
ROUNDS = setting("BENCH_ROUNDS", 3, 1)
QUEUED = setting("BENCH_QUEUE", 100_000, 10_000)
CONNECTIONS = setting("BENCH_CONNECTIONS", 1000, 1000)
BIG_MB = 200
SIZE = 5000
SESSIONS = (1, 20)

MTA_NAME = "mta, 1 process"  # [server] receiver_process = false
MTA2 = "mta, 2 processes"  # receiver_process = true, the default on two cores or more
MTAS = (MTA_NAME, MTA2)
POSTFIX = "Postfix"
AIOSMTPD = "aiosmtpd+fsync"
SINK = "smtp-sink"
SYSTEMS = [MTA_NAME, MTA2, POSTFIX, AIOSMTPD, SINK]
RELAYS = (MTA_NAME, MTA2, POSTFIX)

RESULTS = BENCH / "results"

# Everything started is registered here and stopped in main()'s finally,
# whatever happened; each measurement also stops its own at once.
LIVE: list = []


def live(server):
    LIVE.append(server)
    return server


def stop_all(*servers) -> None:
    errors = []
    for server in servers:
        try:
            server.stop()
        except Exception as e:  # noqa: BLE001 (stop the others, then report)
            errors.append(f"{type(server).__name__}: {e}")
    if errors:
        raise BenchError("; ".join(errors))


def quiesce() -> None:
    """Between runs: let the previous run's writeback finish so it does not hit the next."""
    os.sync()
    time.sleep(0.5)


def log(text: str) -> None:
    print(text, flush=True)


# -- 1-3: the systems side by side ------------------------------------------------------

def relay_server(system: str, directory: Path, sink: SmtpSink):
    if system in MTAS:
        config = RELAY_CONFIG if system == MTA_NAME else RELAY2_CONFIG
        return live(Mta(directory / "mta", config, free_port(), sink_port=sink.port)).start()
    return live(PrivatePostfix(directory / "postfix", sink.port)).start()


def acceptance(system: str, sessions: int, directory: Path) -> float:
    """msgs/s of smtp-source into `system`."""
    servers = []
    try:
        if system in RELAYS:
            sink = live(SmtpSink(directory / "sink", count=False))
            servers.append(sink.start())
            server = relay_server(system, directory, sink)
            servers.append(server)
        elif system == AIOSMTPD:
            server = live(AiosmtpdFsync(directory / "aiosmtpd"))
            servers.append(server.start())
        else:
            server = live(SmtpSink(directory / "sink", count=False))
            servers.append(server.start())
        if system in MTAS:
            server.alive()
        seconds, _ = smtp_source(server.port, MESSAGES, sessions, SIZE)
        if system == AIOSMTPD and server.stored() != MESSAGES:
            raise BenchError(f"aiosmtpd stored {server.stored()} of {MESSAGES}")
        return MESSAGES / seconds
    finally:
        stop_all(*reversed(servers))


def end_to_end(system: str, directory: Path) -> float:
    """msgs/s from the first connection until the sink has counted every message."""
    servers = []
    try:
        sink = live(SmtpSink(directory / "sink", count=True))
        servers.append(sink.start())
        server = relay_server(system, directory, sink)
        servers.append(server)
        start = time.monotonic()
        smtp_source(server.port, RELAY_MESSAGES, 20, SIZE)
        wait_for(f"the sink to count {RELAY_MESSAGES} messages",
                 lambda: sink.received() >= RELAY_MESSAGES, timeout=900, interval=0.005)
        return RELAY_MESSAGES / (time.monotonic() - start)
    finally:
        stop_all(*reversed(servers))


def latency(system: str, directory: Path) -> dict[str, float]:
    servers = []
    try:
        sink = live(SmtpSink(directory / "sink", count=False))
        servers.append(sink.start())
        server = relay_server(system, directory, sink)
        servers.append(server)
        done = subprocess.run(
            [sys.executable, str(BENCH / "loadgen.py"), str(server.port), str(LATENCY_MESSAGES),
             "20", str(SIZE)], capture_output=True, text=True, timeout=900, check=False)
        if done.returncode != 0:
            raise BenchError(f"loadgen failed: {done.stderr.strip()[-300:]}")
        result = json.loads(done.stdout)
        if result["errors"]:
            raise BenchError(f"loadgen: {result['errors']} errors, first: "
                             f"{result['first_error']}")
        result["rate"] = result["messages"] / result["seconds"]
        return result
    finally:
        stop_all(*reversed(servers))


def rounds(workdir: Path, notes: list[str]) -> dict:
    accept: dict[tuple[str, int], list[float]] = defaultdict(list)
    e2e: dict[str, list[float]] = defaultdict(list)
    lat: dict[str, list[dict[str, float]]] = defaultdict(list)
    run_id = 0

    def attempt(what: str, f: Callable[[Path], object]) -> object | None:
        nonlocal run_id
        run_id += 1
        directory = workdir / f"run{run_id:03d}"
        directory.mkdir()
        try:
            return f(directory)
        except (BenchError, OSError, ValueError, subprocess.SubprocessError) as e:
            notes.append(f"{what}: not measured: {e}")
            log(f"    {what}: FAILED: {e}")
            return None
        finally:
            shutil.rmtree(directory, ignore_errors=True)
            quiesce()

    for r in range(ROUNDS):
        order = SYSTEMS[r % len(SYSTEMS):] + SYSTEMS[:r % len(SYSTEMS)]
        log(f"round {r + 1}/{ROUNDS}: order {', '.join(order)}")
        for sessions in (SESSIONS if r % 2 == 0 else tuple(reversed(SESSIONS))):
            for system in order:
                rate = attempt(f"acceptance {system} {sessions}s",
                               lambda d, s=system, n=sessions: acceptance(s, n, d))
                if rate is not None:
                    accept[(system, sessions)].append(rate)
                    log(f"  acceptance {system:<15} {sessions:>2} session(s): {rate:7.0f} msgs/s")
        pair = [s for s in order if s in RELAYS]
        for system in pair:
            rate = attempt(f"end-to-end {system}", lambda d, s=system: end_to_end(s, d))
            if rate is not None:
                e2e[system].append(rate)
                log(f"  end-to-end {system:<15} {RELAY_MESSAGES} msgs: {rate:7.0f} msgs/s")
        for system in reversed(pair):
            result = attempt(f"latency {system}", lambda d, s=system: latency(s, d))
            if result is not None:
                lat[system].append(result)
                log(f"  latency    {system:<15} p50 {result['p50_ms']:.1f} ms, "
                    f"p99 {result['p99_ms']:.1f} ms ({result['rate']:.0f} msgs/s)")
    return {"accept": accept, "e2e": e2e, "latency": lat}


# -- 4-5: mta's memory and queue scale ---------------------------------------------------

def start_data(s: socket.socket, buffer: bytearray, helo: bytes, sender: bytes,
               recipient: bytes) -> None:
    """EHLO, MAIL, RCPT and DATA, each answered with 2xx/3xx; then the body may follow."""
    for command in (b"EHLO " + helo, b"MAIL FROM:<" + sender + b">",
                    b"RCPT TO:<" + recipient + b">", b"DATA"):
        s.sendall(command + b"\r\n")
        reply = read_reply(s, buffer)
        if reply[:1] not in (b"2", b"3"):
            raise BenchError(f"{command.split()[0].decode()}: {reply.decode()}")


def read_reply(s: socket.socket, buffer: bytearray) -> bytes:
    """One complete SMTP reply from `s` (multi-line replies too)."""
    while True:
        end = buffer.find(b"\r\n")
        while end >= 0:
            line = bytes(buffer[:end])
            del buffer[:end + 2]
            if line[3:4] != b"-":
                return line
            end = buffer.find(b"\r\n")
        data = s.recv(4096)
        if not data:
            raise BenchError("connection closed by the server")
        buffer.extend(data)


def ehlo_connection(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    buffer = bytearray()
    if not read_reply(s, buffer).startswith(b"220"):
        raise BenchError("no 220")
    s.sendall(b"EHLO idle.client.test\r\n")
    if not read_reply(s, buffer).startswith(b"250"):
        raise BenchError("EHLO refused")
    return s


def idle_connections(mta: Mta) -> float:
    """KiB of RSS per idle, EHLO'd connection."""
    for _ in range(20):  # warm up: first-use allocations are not per connection
        ehlo_connection(mta.port).close()
    pid = mta.session_pid
    before = settled_rss_kb(pid, 1.0)
    held = []
    try:
        for _ in range(CONNECTIONS):
            held.append(ehlo_connection(mta.port))
        after = settled_rss_kb(pid, 1.0)
    finally:
        for s in held:
            s.close()
    return (after - before) / CONNECTIONS


def big_message(mta: Mta) -> tuple[float, float]:
    """(MB of RSS growth, MB/s) while receiving one BIG_MB message."""
    pid = mta.session_pid
    before = settled_rss_kb(pid, 0.5)
    peak_reset = reset_peak(pid)
    samples = [before]
    done = threading.Event()

    def sample() -> None:  # a fallback when VmHWM cannot be reset
        while not done.is_set():
            try:
                samples.append(rss_kb(pid))
            except (OSError, BenchError):
                return
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    block = (b"x" * 998 + b"\r\n") * 1000  # 1 MB
    start = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", mta.port), timeout=120) as s:
            buffer = bytearray()
            read_reply(s, buffer)
            start_data(s, buffer, b"big.client.test", b"big@client.test", b"user@held.test")
            s.sendall(b"Subject: big\r\n\r\n")
            for _ in range(BIG_MB):
                s.sendall(block)
            s.sendall(b".\r\n")
            reply = read_reply(s, buffer)
            if not reply.startswith(b"250"):
                raise BenchError(f"200 MB message: {reply.decode()}")
            seconds = time.monotonic() - start
            s.sendall(b"QUIT\r\n")
    finally:
        done.set()
        sampler.join()
    peak = max(samples)
    if peak_reset:
        peak = max(peak, status_kb(pid, "VmHWM"))
    return (peak - before) / 1024, BIG_MB / seconds


class LogWatch:
    """When (monotonic) the mta log first showed the queue loaded, and its count."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.at: float | None = None
        self.count: int | None = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        seen = b""
        offset = 0
        while not self.done.is_set():
            try:
                with self.path.open("rb") as f:
                    f.seek(offset)
                    chunk = f.read()
            except OSError:
                chunk = b""
            offset += len(chunk)
            seen = seen[-400:] + chunk
            match = LOADED.search(seen.decode(errors="replace"))
            if match:
                self.at, self.count = time.monotonic(), int(match.group(1))
                return
            time.sleep(0.005)

    def stop(self) -> None:
        self.done.set()
        self.thread.join()


def timed_start(mta: Mta, local_message: bool, timeout: float = 600) -> dict[str, float]:
    """Start `mta` and time: its 220, the queue loaded, a local message's delivery."""
    watch = LogWatch(mta.log_path)
    times: dict[str, float] = {}
    try:
        mta.spawn()
        t0 = mta.started_at
        deadline = t0 + timeout
        while True:
            mta.alive()
            try:
                s = socket.create_connection(("127.0.0.1", mta.port), timeout=timeout)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise BenchError("mta never listened") from None
                time.sleep(0.005)
        with s:
            buffer = bytearray()
            greeting = read_reply(s, buffer)
            times["220"] = time.monotonic() - t0
            if not greeting.startswith(b"220"):
                raise BenchError(f"greeting: {greeting.decode()}")
            if local_message:
                start_data(s, buffer, b"local.client.test", b"b@client.test",
                           b"user@local.test")
                s.sendall(b"Subject: sent just after start\r\n\r\nhello\r\n.\r\n")
                reply = read_reply(s, buffer)
                if not reply.startswith(b"250"):
                    raise BenchError(f"local message: {reply.decode()}")
                times["local 250"] = time.monotonic() - t0
                s.sendall(b"QUIT\r\n")
        if local_message:
            pattern = str(mta.directory / "mail" / "local.test" / "*" / "new" / "*")
            wait_for("the local message in its Maildir",
                     lambda: mta.alive() and glob.glob(pattern), timeout=timeout, interval=0.005)
            times["local delivered"] = time.monotonic() - t0
        wait_for("the relayer's 'relayer started' log line",
                 lambda: mta.alive() and watch.at is not None, timeout=timeout)
        times["loaded"] = watch.at - t0
        times["loaded count"] = watch.count
    finally:
        watch.stop()
    return times


def session_memory(server: Mta, results: dict, notes: list[str], key: str = "",
                   what: str = "") -> None:
    """RSS per idle connection and growth for one big message, of the sessions' process;
    `key` is appended to the results' names, `what` to the notes'."""
    try:
        results["per connection" + key] = idle_connections(server)
        log(f"  {CONNECTIONS} idle EHLO'd connections: "
            f"{results['per connection' + key]:.2f} KiB each")
    except (BenchError, OSError) as e:
        notes.append(f"RSS per idle connection{what}: not measured: {e}")
    try:
        grown, speed = big_message(server)
        results["big growth" + key], results["big speed" + key] = grown, speed
        log(f"  {BIG_MB} MB message: RSS +{grown:.1f} MB, {speed:.0f} MB/s")
    except (BenchError, OSError) as e:
        notes.append(f"{BIG_MB} MB message{what}: not measured: {e}")


def memory_and_queue(workdir: Path, results: dict, notes: list[str]) -> None:
    # An empty server first: its start-up times and RSS are the reference.
    cold = drop_caches()
    results["cold cache"] = cold
    empty = live(Mta(workdir / "empty", HOLD_CONFIG, free_port(), message_size="300MB"))
    try:
        log("memory: empty server")
        times = timed_start(empty, local_message=False)
        results["empty 220"] = times["220"]
        results["empty loaded"] = times["loaded"]
        results["empty rss"] = settled_rss_kb(empty.pid, 2.0)
        log(f"  empty mta: 220 after {times['220']:.2f} s, RSS {results['empty rss'] / 1024:.1f} MB")
        session_memory(empty, results, notes)
        results["empty stop"] = empty.stop()
        log(f"  SIGTERM to exit: {results['empty stop']:.2f} s")
    finally:
        empty.stop()
    shutil.rmtree(workdir / "empty", ignore_errors=True)

    # The same with the sessions in a receiving process (the default where there are two
    # cores): the RSS measured is that process's.
    two = live(Mta(workdir / "empty2", with_receiver_process(HOLD_CONFIG), free_port(),
                   message_size="300MB"))
    try:
        log("memory: empty server, 2 processes (the receiving process's RSS)")
        two.start()
        session_memory(two, results, notes, " 2", ", 2 processes")
    finally:
        two.stop()
    shutil.rmtree(workdir / "empty2", ignore_errors=True)
    quiesce()

    log(f"queue scale: putting {QUEUED} messages for a held domain into the spool")
    server = live(Mta(workdir / "queue", HOLD_CONFIG, free_port()))
    start = time.monotonic()
    done = subprocess.run([sys.executable, str(BENCH / "fill_spool.py"), str(server.spool_dir),
                           str(QUEUED), "user@held.test", "1000"],
                          capture_output=True, text=True, env=source_env(), timeout=3600,
                          check=False)
    if done.returncode != 0:
        raise BenchError(f"filling the spool failed: {done.stderr.strip()[-500:]}")
    results["fill seconds"] = time.monotonic() - start
    log(f"  {done.stdout.strip()} queued in {results['fill seconds']:.0f} s")
    results["cold cache"] = drop_caches() and results["cold cache"]
    try:
        times = timed_start(server, local_message=True)
        results.update({f"queued {k}": v for k, v in times.items()})
        log(f"  220 after {times['220']:.2f} s, local message delivered after "
            f"{times['local delivered']:.2f} s, queue loaded ({times['loaded count']}) after "
            f"{times['loaded']:.2f} s")
        results["queued rss"] = settled_rss_kb(server.pid, 2.0)
        log(f"  RSS {results['queued rss'] / 1024:.1f} MB")
        results["sigterm"] = server.stop()
        log(f"  SIGTERM to exit: {results['sigterm']:.2f} s")
    finally:
        server.stop()
    drop_caches()
    output = server.directory / "queue-list.txt"
    seconds, status = server.cli("queue", "list", stdout=output)
    with output.open("rb") as f:
        f.seek(0, 2)
        f.seek(max(0, f.tell() - 300))
        last = f.read().decode(errors="replace").strip().splitlines()[-1:]
    if status != 0:
        raise BenchError(f"mta queue list exited {status}: {last}")
    results["queue list"] = seconds
    results["queue list line"] = last[0] if last else ""
    log(f"  mta queue list: {seconds:.2f} s ({results['queue list line']})")


# -- the report ----------------------------------------------------------------------------

def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def build_rows(sides: dict, alone: dict) -> list[Row]:
    accept, e2e, lat = sides["accept"], sides["e2e"], sides["latency"]
    rows = []

    def lat_of(system: str, key: str) -> float | None:
        return median([r[key] for r in lat[system]])

    for mta_system in MTAS:
        which = f" — {mta_system}"
        for n in SESSIONS:
            mta = median(accept[(mta_system, n)])
            label = f"durable acceptance, {n} session{'s' if n > 1 else ''} (msgs/s){which}"
            targets = {(1, POSTFIX): 1.2, (20, POSTFIX): 1.5, (20, AIOSMTPD): 1.2}
            for peer in (POSTFIX, AIOSMTPD, SINK):
                bound = targets.get((n, peer))
                rows.append(Row(label, mta, peer, median(accept[(peer, n)]),
                                target=f">= {bound}x" if bound else "",
                                rule=("ratio", ">=", bound) if bound else None))
        rows.append(Row(f"end-to-end relay, {RELAY_MESSAGES} msgs at 20 sessions (msgs/s){which}",
                        median(e2e[mta_system]), POSTFIX, median(e2e[POSTFIX]),
                        target=">= 1.2x", rule=("ratio", ">=", 1.2)))
        rows.append(Row(f"latency dot to 250, p50, 20 sessions (ms){which}",
                        lat_of(mta_system, "p50_ms"), POSTFIX, lat_of(POSTFIX, "p50_ms"),
                        fmt="{:.1f}"))
        rows.append(Row(f"latency dot to 250, p99, 20 sessions (ms){which}",
                        lat_of(mta_system, "p99_ms"), POSTFIX, lat_of(POSTFIX, "p99_ms"),
                        target="<= Postfix's", rule=("ratio", "<=", 1.0), fmt="{:.1f}"))
    rows.append(Row(f"RSS per idle EHLO'd connection, {CONNECTIONS} open (KiB)",
                    alone.get("per connection"), target="<= 4 KiB", rule=("value", "<=", 4.0),
                    fmt="{:.2f}"))
    rows.append(Row(f"RSS growth receiving one {BIG_MB} MB message (MB)", alone.get("big growth"),
                    target="< 10 MB", rule=("value", "<", 10.0), fmt="{:.1f}"))
    rows.append(Row(f"RSS per idle EHLO'd connection — {MTA2}, the receiving process (KiB)",
                    alone.get("per connection 2"), target="<= 4 KiB",
                    rule=("value", "<=", 4.0), fmt="{:.2f}"))
    rows.append(Row(f"RSS growth receiving one {BIG_MB} MB message — {MTA2}, the receiving "
                    "process (MB)", alone.get("big growth 2"),
                    target="< 10 MB", rule=("value", "<", 10.0), fmt="{:.1f}"))
    queued_rss = alone.get("queued rss")
    empty_rss = alone.get("empty rss")
    rows.append(Row(f"RSS with {QUEUED:,} queued minus empty server (MB)",
                    (queued_rss - empty_rss) / 1024 if queued_rss and empty_rss else None,
                    target="< 100 MB", rule=("value", "<", 100.0), fmt="{:.1f}"))
    cold = "cold cache" if alone.get("cold cache") else "warm cache"
    rows.append(Row(f"start with {QUEUED:,} queued: 220 greeting (s, {cold})",
                    alone.get("queued 220"), "empty mta", alone.get("empty 220"),
                    target="at once (<= empty + 1 s)",
                    rule=("value", "<=", (alone.get("empty 220") or 0) + 1.0)
                    if alone.get("empty 220") else None, fmt="{:.2f}"))
    rows.append(Row(f"start with {QUEUED:,} queued: queue loaded (s)", alone.get("queued loaded"),
                    "empty mta", alone.get("empty loaded"), fmt="{:.2f}"))
    rows.append(Row(f"start with {QUEUED:,} queued: new local message delivered (s from start)",
                    alone.get("queued local delivered"), target="< 5 s",
                    rule=("value", "<", 5.0), fmt="{:.2f}"))
    rows.append(Row(f"`mta queue list` on {QUEUED:,} (s, {cold})", alone.get("queue list"),
                    target="< 3 s", rule=("value", "<", 3.0), fmt="{:.2f}"))
    rows.append(Row(f"SIGTERM to exit with {QUEUED:,} queued (s)", alone.get("sigterm"),
                    target="< 5 s",
                    rule=("value", "<", 5.0), fmt="{:.2f}"))
    return rows


def rounds_table(sides: dict) -> str:
    lines = ["| run | " + " | ".join(f"round {i + 1}" for i in range(ROUNDS)) + " |",
             "|---|" + "--:|" * ROUNDS]

    def cells(values: list[float], fmt: str = "{:.0f}") -> str:
        shown = [fmt.format(v) for v in values] + ["n/a"] * (ROUNDS - len(values))
        return " | ".join(shown)

    for n in SESSIONS:
        for system in SYSTEMS:
            lines.append(f"| acceptance, {system}, {n} session(s) (msgs/s) | "
                         f"{cells(sides['accept'][(system, n)])} |")
    for system in RELAYS:
        lines.append(f"| end-to-end, {system} (msgs/s) | {cells(sides['e2e'][system])} |")
    for system in RELAYS:
        lines.append(f"| latency p50 / p99, {system} (ms) | " + " | ".join(
            [f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f}" for r in sides["latency"][system]]
            + ["n/a"] * (ROUNDS - len(sides["latency"][system]))) + " |")
    return "\n".join(lines)


def main() -> int:
    began = time.monotonic()
    for program in ("smtp-source", "smtp-sink", "postfix", "postconf"):
        need_path(program)
    for module, package in (("aiosmtpd", "aiosmtpd"), ("matplotlib", "matplotlib")):
        try:
            __import__(module)
        except ImportError:
            raise SystemExit(f"bench: {package} is not installed "
                             "(`make bench` installs the bench extras)") from None
    nofile = raise_nofile()
    if nofile < CONNECTIONS + 100:
        raise SystemExit(f"bench: RLIMIT_NOFILE is {nofile}, too low for {CONNECTIONS} connections")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    RESULTS.mkdir(exist_ok=True)
    stem = "QUICK" if QUICK else "LATEST"
    workdir = Path(tempfile.mkdtemp(prefix="mta-bench-"))
    workdir.chmod(0o755)  # Postfix's daemons must reach their directories
    host = machine(workdir)
    notes: list[str] = []
    sides: dict = {"accept": defaultdict(list), "e2e": defaultdict(list),
                   "latency": defaultdict(list)}
    alone: dict = {}
    log(f"mta bench: {ROUNDS} round(s), {MESSAGES} messages per acceptance run, "
        f"{QUEUED:,} queued; work directory {workdir}")
    try:
        sides = rounds(workdir, notes)
        try:
            memory_and_queue(workdir, alone, notes)
        except (BenchError, OSError, subprocess.SubprocessError) as e:
            notes.append(f"memory/queue scale: stopped early: {e}")
            log(f"memory/queue scale FAILED: {e}")
    finally:
        try:
            stop_all(*reversed(LIVE))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    rows = build_rows(sides, alone)
    elapsed = time.monotonic() - began
    cache = ("dropped before each start and before `mta queue list` (cold)"
             if alone.get("cold cache") else "not dropped (not root?): warm")
    header = [
        (f"Durability measured: {DURABILITY}; Postfix fsyncs its queue files "
         "(its default); aiosmtpd+fsync: write, fsync, rename, fsync the directory."),
        (f"{ROUNDS} round(s), systems alternating; medians. Acceptance: smtp-source, "
         f"{MESSAGES} messages of {SIZE} bytes per run, a new connection per message. "
         f"End to end: {RELAY_MESSAGES} messages at 20 sessions until the smtp-sink has all. "
         f"Latency: bench/loadgen.py, {LATENCY_MESSAGES} messages at 20 sessions."),
        f"Queue scale: {QUEUED:,} messages for a held domain; page cache {cache}.",
    ]
    machine_lines = [f"- {k}: {v}" for k, v in host.items()]
    if "queue list line" in alone:
        notes.append(f"`mta queue list` said: {alone['queue list line']}")
    if "fill seconds" in alone:
        notes.append(f"filling the spool with {QUEUED:,} messages (Spool.inject, 16 threads) "
                     f"took {alone['fill seconds']:.0f} s")
    if "big speed" in alone:
        notes.append(f"the {BIG_MB} MB message went in at {alone['big speed']:.0f} MB/s")
    if "queued local 250" in alone:
        notes.append(f"with {QUEUED:,} queued, the local message's 250 came "
                     f"{alone['queued local 250']:.2f} s after start")
    notes.append(f"the whole bench took {elapsed / 60:.1f} minutes")

    try:
        chart(RESULTS / f"{stem}.png", SYSTEMS, list(SESSIONS), sides["accept"],
              f"Durable acceptance, {SIZE} B messages, a new connection each "
              f"(fsync before 250; smtp-sink keeps nothing)")
    except Exception as e:  # noqa: BLE001 (the table matters more than the picture)
        notes.append(f"chart not drawn: {e}")

    title = "mta bench" + (" (BENCH_QUICK: one round, small counts)" if QUICK else "")
    markdown = "\n".join([
        f"# {title}", "", time.strftime("Run on %Y-%m-%d %H:%M %Z."), "", *header, "",
        markdown_table(rows), "", f"![throughput per system]({stem}.png)", "",
        "## Each round", "", rounds_table(sides), "", "## Machine", "", *machine_lines, "",
        "## Notes", "", *[f"- {n}" for n in notes], ""])
    (RESULTS / f"{stem}.md").write_text(markdown)

    log("")
    log("\n".join(header))
    log("")
    log(text_table(rows))
    log("")
    log("Machine:")
    log("\n".join(machine_lines))
    log("")
    log("Notes:")
    log("\n".join(f"- {n}" for n in notes))
    log(f"\nwritten: {(RESULTS / f'{stem}.md').relative_to(REPO)} and "
        f"{(RESULTS / f'{stem}.png').relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
