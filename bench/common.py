"""Helpers shared by the bench modules: ports, waiting, processes, memory, the machine."""

from __future__ import annotations

import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
BIN = Path(sys.executable).parent
TWISTD = BIN / "twistd"
MTA = BIN / "mta"


class BenchError(Exception):
    """A measurement that could not be made; the table shows it as not measured."""


def need_path(program: str) -> str:
    """The path of a Debian peer, or exit with one clear line."""
    found = shutil.which(program) or next(
        (str(p) for p in (Path("/usr/sbin") / program, Path("/usr/bin") / program) if p.exists()),
        None)
    if not found:
        raise SystemExit(f"bench: {program} is not installed (`make peers` installs it)")
    return found


def source_env() -> dict[str, str]:
    """The environment of a process that must run this work tree's mta."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def raise_nofile() -> int:
    """Raise RLIMIT_NOFILE to the hard limit; children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            return soft
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port != 2525:
            return port


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30.0,
             interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"timed out waiting for {what}")
        time.sleep(interval)


def greets(port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            return s.recv(512).startswith(b"220")
    except OSError:
        return False


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def stop_process(process: subprocess.Popen | None, sig: int = signal.SIGTERM,
                 timeout: float = 30.0) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def status_kb(pid: int, field: str) -> int:
    """A figure of /proc/PID/status in kB: VmRSS (now) or VmHWM (peak)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise BenchError(f"no {field} for pid {pid}")


def rss_kb(pid: int) -> int:
    return status_kb(pid, "VmRSS")


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, our own processes)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def settled_rss_kb(pid: int, seconds: float = 1.0) -> int:
    """RSS after a short pause, so that lazy work after the last event is counted."""
    time.sleep(seconds)
    return rss_kb(pid)


def drop_caches() -> bool:
    """Empty the page cache (root only); whether it worked."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


# -- the machine ---------------------------------------------------------------------

def _first(path: str, pattern: str) -> str | None:
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    match = re.search(pattern, text, re.MULTILINE)
    return match.group(1).strip() if match else None


def _version(module: str) -> str:
    try:
        from importlib.metadata import version
        return version(module)
    except Exception:  # noqa: BLE001 (any missing metadata: say so)
        return "?"


def postfix_version() -> str:
    try:
        out = subprocess.run([need_path("postconf"), "-d", "-h", "mail_version"],
                             check=False, capture_output=True, text=True, timeout=10).stdout.strip()
        return out or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def disk_of(path: Path) -> str:
    """The device, file system and medium that `path` is on."""
    try:
        out = subprocess.run(["findmnt", "-n", "-o", "SOURCE,FSTYPE,OPTIONS", "-T", str(path)],
                             check=False, capture_output=True, text=True, timeout=10).stdout.split()
    except (OSError, subprocess.SubprocessError):
        out = []
    if len(out) < 2:
        return "?"
    source, fstype = out[0], out[1]
    options = out[2] if len(out) > 2 else ""
    medium = ""
    name = Path(source).name
    block = Path("/sys/class/block") / name
    if block.exists():
        disk = block.resolve()
        queue = disk / "queue" if (disk / "queue").exists() else disk.parent / "queue"
        rotational = _first(str(queue / "rotational"), r"(\d)")
        medium = {"0": "non-rotational", "1": "rotational"}.get(rotational or "", "")
        model = _first(str(disk / "device" / "model"), r"(.+)") or \
            _first(str(disk.parent / "device" / "model"), r"(.+)")
        if name.startswith("vd"):
            medium = f"virtio disk, {medium}" if medium else "virtio disk"
        if model:
            medium = f"{model}, {medium}" if medium else model
    barrier = "nobarrier" if "nobarrier" in options else ""
    return ", ".join(filter(None, [f"{source} ({fstype})", medium, barrier]))


def machine(spool_dir: Path) -> dict[str, str]:
    cpus = _first("/proc/cpuinfo", r"^model name\s*:\s*(.+)$") or platform.processor() or "?"
    count = os.cpu_count() or 0
    mem_kb = _first("/proc/meminfo", r"^MemTotal:\s*(\d+)")
    ram = f"{int(mem_kb) / 1024 / 1024:.1f} GiB" if mem_kb else "?"
    try:
        load = Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        load = ["?"]
    return {
        "CPU": f"{cpus} x {count}",
        "RAM": ram,
        "kernel": platform.release(),
        "OS": _first("/etc/os-release", r'^PRETTY_NAME="?([^"\n]+)') or "?",
        "Python": platform.python_version(),
        "Twisted": _version("twisted"),
        "aiosmtpd": _version("aiosmtpd"),
        "Postfix": postfix_version(),
        "spool disk": disk_of(spool_dir),
        "load average at start": " ".join(load),
    }
