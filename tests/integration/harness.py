"""Running the real server and real peers on loopback, for the integration tests.

- `need(program)`: skip when a peer is missing on a laptop, fail when CI=true.
- `free_port()`: a port nobody listens on now (never 2525, which `make run` uses).
- `MtaServer`: `twistd -n mta --config FILE` in its own directory, started,
  stopped (SIGTERM), killed (SIGKILL) and restarted, with its log at hand.
- `Sink`: Postfix's smtp-sink on a loopback address, dumping what it receives.
- `WireTap`: a recording TCP proxy; it shows exactly which bytes a client sent
  and which replies it got, so tests can compare what was sent with what the
  spool holds, byte for byte, and know which messages got their 250.
"""

from __future__ import annotations

import email
import email.message
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from mta.spool.store import Spool

TWISTD = Path(sys.executable).parent / "twistd"
MTA = Path(sys.executable).parent / "mta"
REPO = Path(__file__).resolve().parents[2]
WAIT = 20.0


def source_env() -> dict[str, str]:
    """The environment for a server process: this source tree first on the path.

    The tests import `mta` from the source tree; the servers they start must
    run the same code, even in a developer's venv installed earlier.  (One
    test runs twistd without it, to prove the plain install finds the plugin.)
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def need(program: str) -> str:
    """The path of `program`; a missing peer skips, except in CI where it fails."""
    found = shutil.which(program) or next(
        (str(p) for p in (Path("/usr/sbin") / program, Path("/usr/bin") / program) if p.exists()),
        None)
    if found:
        return found
    if os.environ.get("CI") == "true":
        pytest.fail(f"{program} is required in CI (make test installs it)")
    pytest.skip(f"{program} not installed")


@contextmanager
def twistd_as_nobody(config: str) -> Iterator[tuple[Path, int, int]]:
    """`twistd -n --uid --gid` of nobody, started as root, in a fresh directory nobody can
    reach (not under pytest's 0700 tree), with `config` (``{port}`` and
    ``{message_size}`` filled in).  Yields the directory (the server's output in
    ``log``), the port and nobody's uid; stops the server and removes the directory."""
    nobody = pwd.getpwnam("nobody")
    work = Path(tempfile.mkdtemp(prefix="mta-uid-"))
    work.chmod(0o755)
    port = free_port()
    (work / "mta.toml").write_text(config.format(port=port, message_size="1MB"))
    server = subprocess.Popen(
        [str(TWISTD), "-n", "--pidfile=", "--uid", str(nobody.pw_uid), "--gid",
         str(nobody.pw_gid), "mta", "--config", "mta.toml"],
        cwd=work, env=source_env(), stdout=(work / "log").open("wb"), stderr=subprocess.STDOUT)
    try:
        yield work, port, nobody.pw_uid
    finally:
        stop_process(server)
        shutil.rmtree(work)


def need_root(why: str) -> None:
    """Go on only as root: a test that switches users skips on a laptop, fails in CI."""
    if os.geteuid() == 0:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{why}: CI runs it as root")
    pytest.skip(f"{why}: needs root")


def wait_for(what: str, check: Callable[[], Any], timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


_GIVEN: set[int] = set()  # ports free_port handed out in this run


def free_port(address: str = "127.0.0.1") -> int:
    """A free port, never 2525 (`make run`'s) nor one handed out before in this run: the
    kernel may give the same free port to two binds in a row, and a test that asks for
    several before it binds any would get one twice (CI saw it)."""
    while True:
        with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as s:
            s.bind((address, 0))
            port = s.getsockname()[1]
        if port != 2525 and port not in _GIVEN:
            _GIVEN.add(port)
            return port


def greets(port: int, address: str = "127.0.0.1", timeout: float = 1) -> bool:
    """Whether an SMTP server on `address`:`port` answers with its 220 now."""
    try:
        with socket.create_connection((address, port), timeout=timeout) as s:
            return s.recv(512).startswith(b"220 ")
    except OSError:
        return False


def accepts(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=0.5):
            return True
    except OSError:
        return False


def stop_process(process: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


DEFAULT_CONFIG = """
[server]
hostname = "mx.test"
spool = "spool"
postmaster = "postmaster@example.org"

[[listeners]]
endpoint = "tcp:{port}:interface=127.0.0.1"
role = "smtp"

[relay]
mynetworks = ["127.0.0.1/32", "::1/128"]
nameservers = ["127.0.0.1:9"]
dns_timeout = "1s"
retry_min = "1h"
retry_max = "1h"

[domains."example.org"]
route = "hold"

[limits]
message_size = "{message_size}"
"""


class MtaServer:
    """One `twistd -n mta` process in `directory`, listening on `port`."""

    def __init__(self, directory: Path, config: str | None = None, port: int | None = None,
                 message_size: str = "25MB") -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        text = config if config is not None else DEFAULT_CONFIG
        self.config_path = directory / "mta.toml"
        self.config_path.write_text(text.format(port=self.port, message_size=message_size))
        self.log_path = directory / "twistd.log"
        self.process: subprocess.Popen | None = None

    def start(self, twistd_options: tuple[str, ...] = ()) -> MtaServer:
        """`twistd_options` go before the plugin name (e.g. ``--uid``, ``--gid``)."""
        self.log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [str(TWISTD), "-n", "--pidfile=", *twistd_options, "mta",
             "--config", str(self.config_path)],
            cwd=self.directory, stdout=self.log, stderr=subprocess.STDOUT, env=source_env())
        wait_for(f"mta listening on {self.port}", self._ready)
        if "sessions in a receiving process" in self.log_text():
            # Connections wait until the receiving process serves (receiver.py), or
            # are served by the main process if it does not: a test starts once the
            # sessions are where they stay.
            wait_for("the receiving process", lambda: "the receiving process (pid"
                     in self.log_text() and " serves " in self.log_text())
        return self

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"mta exited with {self.process.returncode}:\n{self.log_text()}")
        # The 220 may come after [limits] greeting_delay (1s by default) when
        # 127.0.0.1 is not in the config's mynetworks: wait longer than that.
        return greets(self.port, timeout=5)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.log.close()

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.log.close()

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def spool(self) -> Spool:
        return Spool(self.directory / "spool")

    def queued(self) -> dict[str, bytes]:
        """queue id -> stored data, for every committed message."""
        spool = self.spool
        return {qid: spool.message_data(qid).read_bytes() for qid in spool.queue_ids()}

    def envelope(self, queue_id: str) -> dict:
        """A committed message's envelope as it is now, as the JSON the spool keeps."""
        return self.spool.load(queue_id).as_record()


def strip_received(stored: bytes) -> bytes:
    """The stored message without the Received header we prepended."""
    assert stored.startswith(b"Received: "), stored[:80]
    lines = stored.split(b"\r\n")
    i = 1
    while lines[i].startswith(b"\t"):
        i += 1
    return b"\r\n".join(lines[i:])


QUEUED = re.compile(rb"250[ -](?:2\.0\.0 )?OK queued as ([0-9A-F]+)")


class WireTap:
    """A TCP proxy on a free loopback port that records both directions of each session."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        self.port = self.listener.getsockname()[1]
        self.sessions: list[tuple[bytearray, bytearray]] = []
        self.lock = threading.Lock()
        self.running = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while self.running:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            sent, received = bytearray(), bytearray()
            with self.lock:
                self.sessions.append((sent, received))
            threading.Thread(target=self._pump, args=(client, server, sent), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, received),
                             daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket, record: bytearray) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                record.extend(data)
                target.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, target):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.running = False
        self.listener.close()

    def acknowledged(self) -> list[str]:
        """Queue ids of every message that got its 250, in all sessions."""
        with self.lock:
            return [m.decode() for _, received in self.sessions
                    for m in QUEUED.findall(bytes(received))]

    def sent_messages(self) -> list[bytes]:
        """Every DATA body the clients sent, dot-unstuffed, as the server should store it."""
        bodies = []
        with self.lock:
            streams = [bytes(sent) for sent, _ in self.sessions]
        for stream in streams:
            for match in re.finditer(rb"(?:^|\r\n)DATA\r\n(.*?\r\n)\.\r\n", stream, re.DOTALL):
                lines = match.group(1).split(b"\r\n")
                bodies.append(b"\r\n".join(line[1:] if line.startswith(b".") else line
                                           for line in lines))
        return bodies


class Sink:
    """smtp-sink on ADDRESS:PORT, dumping each transaction (envelope in X- headers) to a file."""

    def __init__(self, address: str, port: int, *options: str) -> None:
        self.program = need("smtp-sink")
        # smtp-sink writes as "nobody": the dump directory must be reachable by it.
        self.directory = Path(tempfile.mkdtemp(prefix="mta-sink-"))
        self.directory.chmod(0o777)
        self.errors = self.directory.parent / f"{self.directory.name}.err"
        self.address, self.port, self.options = address, port, options
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.program, "-u", "nobody", "-d", f"{self.directory}/%M.", *self.options,
             f"{self.address}:{self.port}", "100"],
            stdout=subprocess.DEVNULL, stderr=self.errors.open("ab"))
        wait_for(f"smtp-sink on {self.address}:{self.port}",
                 lambda: accepts(self.address, self.port))

    def restart(self, *options: str) -> None:
        self.stop()
        self.options = options
        self.start()

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None

    def messages(self) -> list[email.message.Message]:
        """Complete dumps.  smtp-sink creates a dump when a transaction starts and removes it
        if the transaction is abandoned, so a file without a body may still be in progress."""
        found = []
        for path in sorted(self.directory.iterdir()):
            try:
                raw = path.read_bytes()
            except FileNotFoundError:
                continue
            if b"\nX-Rcpt-Args:" in raw and b"\n\n" in raw:
                found.append(email.message_from_bytes(raw))
        return found

    def wait(self, count: int) -> list[email.message.Message]:
        return wait_for(f"{count} message(s) at {self.address}",
                        lambda: len(m := self.messages()) >= count and m)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)
        self.errors.unlink(missing_ok=True)
