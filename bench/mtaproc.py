"""mta under test: `twistd -n mta` of this work tree, with the bench's configs.

The durability mode is mta's default (no option is set that could weaken
it): a 250 after DATA only once the message is fsync'd in the spool.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

from common import MTA, TWISTD, BenchError, greets, source_env, stop_process, wait_for

DURABILITY = "fsync before 250 (mta's default; no durability option set)"

_BASE = """
[server]
hostname = "mta.bench"
spool = "spool"
postmaster = "postmaster@mta.bench"
receiver_process = false

[[listeners]]
endpoint = "tcp:{port}:interface=127.0.0.1"
role = "smtp"

[relay]
mynetworks = ["127.0.0.0/8"]
nameservers = ["127.0.0.1:9"]
dns_timeout = "1s"
# Postfix's default_destination_concurrency_limit is 20 as well.
concurrency = 20
concurrency_per_destination = 20

[limits]
message_size = "{message_size}"
connections = 5000
connections_per_client = 5000
"""

# example.org relayed to an smtp-sink, as the private Postfix does.
RELAY_CONFIG = _BASE + """
[domains."example.org"]
route = "smtp:[127.0.0.1]:{sink_port}"
"""

# held.test on hold (the 100,000 queued messages), local.test into Maildirs.
HOLD_CONFIG = _BASE + """
[domains."held.test"]
route = "hold"

[domains."local.test"]
route = "maildir:mail/local.test"
"""

def with_receiver_process(config: str) -> str:
    """`config` with its sessions in a second process (mta/receiver.py).  The configs here
    name one process (`receiver_process = false`), as the default ("auto") would pick
    two on a machine with two cores or more."""
    assert "receiver_process = false\n" in config
    return config.replace("receiver_process = false\n", "receiver_process = true\n", 1)


RELAY2_CONFIG = with_receiver_process(RELAY_CONFIG)

LOADED = re.compile(r"relayer started: (\d+) queued messages")


class Mta:
    def __init__(self, directory: Path, template: str, port: int, message_size: str = "25MB",
                 **fields: object) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.config_path = directory / "mta.toml"
        self.config_path.write_text(template.format(port=port, message_size=message_size,
                                                    **fields))
        self.log_path = directory / "twistd.log"
        self.process: subprocess.Popen | None = None
        self.started_at = 0.0

    @property
    def spool_dir(self) -> Path:
        return self.directory / "spool"

    def spawn(self) -> Mta:
        """Start twistd and return at once (`started_at` is the monotonic start time)."""
        self.log = self.log_path.open("ab")
        self.started_at = time.monotonic()
        self.process = subprocess.Popen(
            [str(TWISTD), "-n", "--pidfile=", "mta", "--config", str(self.config_path)],
            cwd=self.directory, stdout=self.log, stderr=subprocess.STDOUT, env=source_env())
        return self

    def start(self) -> Mta:
        self.spawn()
        wait_for(f"mta listening on {self.port}",
                 lambda: self.alive() and greets(self.port, timeout=5), timeout=120)
        if "receiver_process = true" in self.config_path.read_text():
            wait_for("the receiving process", lambda: self.alive() and
                     "the receiving process (pid" in self.log_text(), timeout=120)
        return self

    def alive(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            code = None if self.process is None else self.process.returncode
            raise BenchError(f"mta exited with {code}: {self.log_text()[-1500:]}")
        return True

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def session_pid(self) -> int:
        """The process that holds the SMTP sessions: the receiving process when there is
        one (receiver_process), else the server itself."""
        with open(f"/proc/{self.pid}/task/{self.pid}/children") as f:
            children = [int(pid) for pid in f.read().split()]
        for child in children:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                if b"mta.receiver" in f.read():
                    return child
        return self.pid

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> float | None:
        """SIGTERM; seconds until it exited (None if it was not running)."""
        if self.process is None or self.process.poll() is not None:
            return None
        start = time.monotonic()
        stop_process(self.process, timeout=120)
        seconds = time.monotonic() - start
        self.log.close()
        return seconds

    def cli(self, *args: str, stdout: Path) -> tuple[float, int]:
        """`mta ARGS --config ...` of this work tree; (seconds, exit status)."""
        start = time.monotonic()
        with stdout.open("wb") as out:
            done = subprocess.run([str(MTA), *args, "--config", str(self.config_path)],
                                  cwd=self.directory, stdout=out, stderr=subprocess.STDOUT,
                                  env=source_env(), timeout=600, check=False)
        return time.monotonic() - start, done.returncode
