"""Side-by-side benchmarks: mta against its peers on loopback (`make bench`).

1. Receiving: Postfix's smtp-source sends N messages over 10 sessions to
   - smtp-sink (Postfix's discard server: the ceiling of the client and the loopback),
   - mta (each message fsync'd into the spool before its 250),
   - aiosmtpd's Sink handler (a Python asyncio server that discards mail: the
     ceiling of a Python server with no disk work).
   Twisted's own `twistd mail` is not in the table: its `--user` option
   raises TypeError on Python 3 (DirDBM key must be bytes), so its Maildir
   domain accepts nobody, and its relay mode would look up real MX records.
   Reported: messages per second, and the server's peak RSS.
2. A 200 MB message through DATA to mta: seconds and RSS growth
   (the target: a few MB, since bodies are streamed to disk).
3. Relaying: N queued messages delivered by mta's relayer to smtp-sink.

Numbers are printed as a table; nothing here is a test assertion.  Every
process runs on 127.0.0.1, on free ports, and is stopped at the end.
"""

from __future__ import annotations

import os
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.integration.harness import MtaServer, free_port, need, wait_for

MESSAGES = int(os.environ.get("BENCH_MESSAGES", "2000"))


def status_kb(pid: int, field: str) -> int:
    """A memory figure of /proc/PID/status in kB: VmRSS (now) or VmHWM (peak)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def rss_kb(pid: int) -> int:
    return status_kb(pid, "VmRSS")


def hwm_kb(pid: int) -> int:
    return status_kb(pid, "VmHWM")


def greets(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            return s.recv(100).startswith(b"220")
    except OSError:
        return False


def smtp_source(port: int, messages: int = MESSAGES) -> float:
    start = time.monotonic()
    subprocess.run([need_path("smtp-source"), "-c", "-d", "-s", "10", "-m", str(messages),
                    "-l", "4096", "-f", "bench@client.test", "-t", "user@example.org",
                    f"127.0.0.1:{port}"], check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - start


def need_path(program: str) -> str:
    found = shutil.which(program) or f"/usr/sbin/{program}"
    if not Path(found).exists():
        raise SystemExit(f"bench: {program} is missing (make test installs the peers)")
    return found


def bench_sink(workdir: Path) -> tuple[float, int]:
    port = free_port()
    sink = subprocess.Popen([need_path("smtp-sink"), "-u", "nobody", "-c", f"127.0.0.1:{port}",
                             "256"], stdout=subprocess.DEVNULL)
    try:
        wait_for("smtp-sink", lambda: greets(port))
        seconds = smtp_source(port)
        return seconds, hwm_kb(sink.pid)
    finally:
        sink.terminate()
        sink.wait()


def bench_mta(workdir: Path) -> tuple[float, int]:
    server = MtaServer(workdir / "mta-receive").start()
    try:
        seconds = smtp_source(server.port)
        return seconds, hwm_kb(server.pid)
    finally:
        server.stop()


def bench_aiosmtpd(workdir: Path) -> tuple[float, int]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "aiosmtpd", "-n", "-l", f"127.0.0.1:{port}",
         "-c", "aiosmtpd.handlers.Sink"],
        cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for("aiosmtpd", lambda: greets(port))
        seconds = smtp_source(port)
        return seconds, hwm_kb(process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait()


def bench_big_message(workdir: Path) -> tuple[float, float]:
    server = MtaServer(workdir / "mta-big", message_size="300MB").start()
    try:
        before = rss_kb(server.pid)
        size = 200 * 1000 * 1000
        block = (b"x" * 98 + b"\r\n") * 10000
        start = time.monotonic()
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            f = s.makefile("rb")
            f.readline()
            s.sendall(b"EHLO bench\r\nMAIL FROM:<b@client.test>\r\nRCPT TO:<u@example.org>\r\nDATA\r\n")
            while not f.readline().startswith(b"354"):
                pass
            for _ in range(size // len(block)):
                s.sendall(block)
            s.sendall(b".\r\n")
            reply = f.readline()
        seconds = time.monotonic() - start
        assert reply.startswith(b"250"), reply
        return seconds, (hwm_kb(server.pid) - before) / 1024
    finally:
        server.stop()


RELAY_CONFIG = """
[server]
hostname = "relay.bench"
spool = "spool"
[[listeners]]
endpoint = "tcp:{port}:interface=127.0.0.1"
[relay]
nameservers = ["127.0.0.1:9"]
concurrency = 20
concurrency_per_destination = 10
[domains."example.org"]
route = "smtp:[127.0.0.1]:%d"
"""


def bench_relay(workdir: Path, messages: int = 1000) -> float:
    sink_port = free_port()
    sink = subprocess.Popen([need_path("smtp-sink"), "-u", "nobody", "-c",
                             f"127.0.0.1:{sink_port}", "256"], stdout=subprocess.PIPE)
    server = MtaServer(workdir / "mta-relay", RELAY_CONFIG % sink_port).start()
    try:
        wait_for("smtp-sink", lambda: greets(sink_port))
        start = time.monotonic()
        with smtplib.SMTP("127.0.0.1", server.port) as client:
            for i in range(messages):
                client.sendmail("b@client.test", ["u@example.org"], b"Subject: %d\r\n\r\nx\r\n" % i)
        wait_for("queue empty", lambda: not server.spool.queue_ids(), timeout=600)
        return time.monotonic() - start
    finally:
        server.stop()
        sink.terminate()
        sink.wait()


def main() -> None:
    need("smtp-source")
    with tempfile.TemporaryDirectory(prefix="mta-bench-") as tmp:
        workdir = Path(tmp)
        os.chmod(workdir, 0o755)
        rows = []
        for name, run in (("smtp-sink (ceiling)", bench_sink), ("mta", bench_mta),
                          ("aiosmtpd Sink", bench_aiosmtpd)):
            seconds, peak = run(workdir)
            rows.append((name, MESSAGES / seconds, peak / 1024))
        print(f"\nReceiving {MESSAGES} messages of 4 kB over 10 sessions (smtp-source):")
        print(f"{'server':<22}{'msg/s':>10}{'peak RSS MB':>14}")
        for name, rate, peak in rows:
            print(f"{name:<22}{rate:>10.0f}{peak:>14.1f}")
        seconds, grown = bench_big_message(workdir)
        print(f"\n200 MB message into mta: {seconds:.1f} s ({200 / seconds:.0f} MB/s), "
              f"peak RSS grew by {grown:.1f} MB")
        seconds = bench_relay(workdir)
        print(f"\n1000 messages received and relayed to smtp-sink: {seconds:.1f} s "
              f"({1000 / seconds:.0f} msg/s end to end)")


if __name__ == "__main__":
    main()
