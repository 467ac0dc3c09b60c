"""The peers in the bench: smtp-sink, smtp-source, a private Postfix, aiosmtpd+fsync.

Each server class starts on a free loopback port in a directory of its own
and is stopped by `stop()`, which is safe to call twice and after a failed
start.  The private Postfix has its own config, queue and data directories:
the machine's Postfix (its /etc/postfix and its queue) is never touched.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import BENCH, BenchError, accepts, free_port, greets, need_path, stop_process, wait_for

SENDER = "bench@client.test"
RECIPIENT = "user@example.org"


def smtp_source(port: int, messages: int, sessions: int, size: int = 5000,
                recipient: str = RECIPIENT, timeout: float = 900) -> tuple[float, str]:
    """Postfix's smtp-source: `messages` of `size` bytes, a new connection per
    message (no -d), `sessions` in parallel.  Returns (seconds, its stderr)."""
    command = [need_path("smtp-source"), "-s", str(sessions), "-m", str(messages),
               "-l", str(size), "-f", SENDER, "-t", recipient, f"127.0.0.1:{port}"]
    start = time.monotonic()
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          timeout=timeout, check=False)
    seconds = time.monotonic() - start
    errors = done.stderr.decode(errors="replace").strip()
    if done.returncode != 0:
        raise BenchError(f"smtp-source exited {done.returncode}: {errors[:300]}")
    return seconds, errors


class SmtpSink:
    """smtp-sink on a free port; with `count`, its running counters go to a file
    whose last "mesg=N" says how many messages it has received; with `dump`,
    each transaction is written to a file of its own in that directory
    (smtp-sink -d: its envelope as X-Rcpt-Args: lines, then the message)."""

    def __init__(self, directory: Path, count: bool = True, dump: Path | None = None) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.count = count
        self.dump = dump
        self.out_path = directory / "sink.out"
        self.process: subprocess.Popen | None = None

    def start(self) -> SmtpSink:
        options = ["-c"] if self.count else []
        if self.dump is not None:
            self.dump.mkdir(parents=True, exist_ok=True)
            shutil.chown(self.dump, "nobody")  # it writes as nobody (-u)
            options += ["-d", f"{self.dump}/%H%M%S."]
        with self.out_path.open("wb") as out:
            # -u nobody: it drops root; 1024 simultaneous connections at most.
            self.process = subprocess.Popen(
                [need_path("smtp-sink"), "-u", "nobody", *options, "-m", "1024",
                 f"127.0.0.1:{self.port}", "1024"],
                stdout=out, stderr=subprocess.STDOUT)
        wait_for("smtp-sink", lambda: self._alive() and accepts(self.port))
        return self

    def _alive(self) -> bool:
        if self.process.poll() is not None:
            raise BenchError(f"smtp-sink exited: {self.out_path.read_text(errors='replace')}")
        return True

    def received(self) -> int:
        """Messages received so far (needs count=True)."""
        try:
            with self.out_path.open("rb") as f:
                f.seek(0, 2)
                f.seek(max(0, f.tell() - 200))
                tail = f.read()
        except OSError:
            return 0
        found = re.findall(rb"mesg=(\d+)", tail)
        return int(found[-1]) if found else 0

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        stop_process(self.process)


MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {dir}/queue
data_directory = {dir}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = pfx.test
mydomain = pfx.test
myorigin = pfx.test
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relay_domains = example.org
relayhost = [127.0.0.1]:{sink_port}
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
maillog_file = {dir}/maillog
maillog_file_prefixes = {dir}
smtp_dns_support_level = disabled
disable_dns_lookups = yes
default_process_limit = 100
alias_maps =
alias_database =
"""

# Every service unchrooted; only what a relay needs.
MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup     unix n - n 60 1 pickup
cleanup    unix n - n - 0 cleanup
qmgr       unix n - n 300 1 qmgr
rewrite    unix - - n - - trivial-rewrite
bounce     unix - - n - 0 bounce
defer      unix - - n - 0 bounce
trace      unix - - n - 0 bounce
verify     unix - - n - 1 verify
flush      unix n - n 1000? 0 flush
proxymap   unix - - n - - proxymap
proxywrite unix - - n - 1 proxymap
smtp       unix - - n - - smtp
relay      unix - - n - - smtp
showq      unix n - n - - showq
error      unix - - n - - error
retry      unix - - n - - error
discard    unix - - n - - discard
local      unix - n n - - local
anvil      unix - - n - 1 anvil
scache     unix - - n - 1 scache
postlog    unix-dgram n - n - 1 postlogd
"""


class PrivatePostfix:
    """A Postfix instance of our own (`postfix -c CONF`), relaying example.org to a sink."""

    def __init__(self, directory: Path, sink_port: int) -> None:
        self.directory = directory
        self.conf = directory / "conf"
        self.port = free_port()
        self.sink_port = sink_port
        self.started = False

    def _postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([need_path("postfix"), "-c", str(self.conf), *args],
                              capture_output=True, text=True, timeout=120, check=False)
        if check and done.returncode != 0:
            raise BenchError(f"postfix {' '.join(args)} exited {done.returncode}: "
                             f"{(done.stdout + done.stderr).strip()[:300]} {self.log_tail()}")
        return done

    def log_tail(self) -> str:
        try:
            return (self.directory / "maillog").read_text(errors="replace")[-600:]
        except OSError:
            return "(no maillog)"

    def start(self) -> PrivatePostfix:
        for name in ("conf", "queue", "data"):
            (self.directory / name).mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o755)
        shutil.chown(self.directory / "data", "postfix")
        (self.conf / "main.cf").write_text(
            MAIN_CF.format(dir=self.directory, sink_port=self.sink_port))
        (self.conf / "master.cf").write_text(MASTER_CF.format(port=self.port))
        self.started = True  # from here on, stop() must run `postfix stop`
        self._postfix("start")
        wait_for("the private Postfix's 220", lambda: greets(self.port), timeout=60)
        return self

    @property
    def master_pid(self) -> int | None:
        try:
            return int((self.directory / "queue" / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def queue_empty(self) -> bool:
        queue = self.directory / "queue"
        return not any(p.is_file() for name in ("incoming", "active", "deferred", "maildrop")
                       for p in (queue / name).rglob("*"))

    def stop(self) -> None:
        if not self.started:
            return
        self.started = False
        pid = self.master_pid
        done = self._postfix("stop", check=False)
        if pid is not None:
            try:
                wait_for("Postfix's master to exit", lambda: not Path(f"/proc/{pid}").exists(),
                         timeout=30)
            except BenchError:
                self._postfix("abort", check=False)
                if done.returncode != 0:
                    raise BenchError(f"postfix stop failed: {done.stderr.strip()}") from None


class AiosmtpdFsync:
    """bench/fsync_smtpd.py: aiosmtpd writing, fsyncing and renaming each message."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    def start(self) -> AiosmtpdFsync:
        self.log = (self.directory / "aiosmtpd.log").open("wb")
        self.process = subprocess.Popen(
            [sys.executable, str(BENCH / "fsync_smtpd.py"), str(self.port),
             str(self.directory / "mail")],
            stdout=self.log, stderr=subprocess.STDOUT)
        wait_for("aiosmtpd", lambda: self._alive() and greets(self.port))
        return self

    def _alive(self) -> bool:
        if self.process.poll() is not None:
            raise BenchError("aiosmtpd exited: " +
                             (self.directory / "aiosmtpd.log").read_text(errors="replace"))
        return True

    def stored(self) -> int:
        return sum(1 for _ in (self.directory / "mail" / "new").iterdir())

    def stop(self) -> None:
        stop_process(self.process)
        if self.process is not None:
            self.log.close()
