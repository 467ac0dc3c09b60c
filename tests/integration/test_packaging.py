"""The systemd unit in etc/examples/: systemd accepts it, and its commands work.

`systemd-analyze verify` checks every directive (the test fails on any
warning too: systemd only warns about an unknown key).  It needs no running
systemd; CI installs the systemd package for it (Makefile PEER_PACKAGES), so
it is skipped only on a machine without it and without CI.  Its ExecStart
is then run as written (with this venv's twistd and a test config), and its
ExecReload's signal must leave the server running.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
from pathlib import Path

from tests.integration.harness import (
    REPO,
    TWISTD,
    free_port,
    greets,
    need,
    source_env,
    stop_process,
    wait_for,
)

UNIT = REPO / "etc" / "examples" / "mta.service"
INSTALLED_TWISTD = "/opt/mta/bin/twistd"


def directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    analyze = need("systemd-analyze")
    # The unit names the installed twistd; verify checks that it exists, so point it here.
    unit = tmp_path / "mta.service"
    unit.write_text(UNIT.read_text().replace(INSTALLED_TWISTD, str(TWISTD)))
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr  # unknown keys are only warnings


def test_the_unit_runs_its_own_user_logs_to_the_journal_and_reloads_by_sighup() -> None:
    unit = directives(UNIT.read_text())
    assert unit["User"] == ["mta"] and unit["Group"] == ["mta"]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    (exec_start,) = unit["ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[0] == INSTALLED_TWISTD and "--nodaemon" in argv and "--logfile=-" in argv
    assert argv[argv.index("--config") + 1] == "/etc/mta/mta.toml"
    assert "/var/spool/mta" in unit["ReadWritePaths"][0]


def test_the_units_command_line_starts_the_server_and_survives_reload(tmp_path: Path) -> None:
    (exec_start,) = directives(UNIT.read_text())["ExecStart"]
    port = free_port()
    config = tmp_path / "mta.toml"
    config.write_text(f'[server]\nhostname = "mx.test"\nspool = "{tmp_path / "spool"}"\n'
                      f'[[listeners]]\nendpoint = "tcp:{port}:interface=127.0.0.1"\n')
    argv = [str(TWISTD) if a == INSTALLED_TWISTD else str(config) if a == "/etc/mta/mta.toml"
            else a for a in shlex.split(exec_start)]
    log = tmp_path / "journal"
    with log.open("wb") as out:
        process = subprocess.Popen(argv, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                                   env=source_env())
        try:
            wait_for("the server", lambda: process.poll() is None and greets(port))
            os.kill(process.pid, signal.SIGHUP)  # what ExecReload does
            wait_for("the reload in the log", lambda: b"SIGHUP" in log.read_bytes()
                     or b"reload" in log.read_bytes().lower())
            assert process.poll() is None and greets(port)
        finally:
            stop_process(process)
    text = log.read_text()
    assert "local submission (sendmail) on" in text  # the log went to stdout: the journal
