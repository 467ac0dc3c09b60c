"""SIGHUP and `mta reload`: the whole config again, with no restart and no session lost."""

from __future__ import annotations

import smtplib
import subprocess
from pathlib import Path

from tests.integration.harness import MTA, MtaServer, source_env, wait_for

CONFIG = """
[server]
hostname = "mx.test"
spool = "spool"
postmaster = "postmaster@example.org"

[[listeners]]
endpoint = "tcp:{port}:interface=127.0.0.1"

[relay]
mynetworks = ["127.0.0.1/32"]
nameservers = ["127.0.0.1:9"]
dns_timeout = "1s"

[domains."example.org"]
route = "maildir:mail/example.org"
users = [USERS]
"""


def write(server: MtaServer, users: str) -> None:
    server.config_path.write_text(CONFIG.replace("USERS", users).format(port=server.port))


def mta_reload(server: MtaServer) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(MTA), "reload", "--config", str(server.config_path)],
                          cwd=server.directory, env=source_env(), capture_output=True, check=False,
                          text=True, timeout=30)


def test_a_user_added_by_reload_gets_mail_in_a_session_open_across_it(start_mta,
                                                                       tmp_path: Path) -> None:
    server = start_mta(CONFIG.replace("USERS", '"alice"'))
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
        client.ehlo("client.test")
        client.mail("sender@client.test")
        code, text = client.rcpt("bob@example.org")
        assert code == 550 and b"5.1.1" in text
        client.rset()

        write(server, '"alice", "bob"')
        done = mta_reload(server)
        assert done.returncode == 0, done.stderr
        wait_for("the reload in the log", lambda: "reload #1" in server.log_text())

        # The same session, its next transaction: bob is a user now.
        client.mail("sender@client.test")
        code, _ = client.rcpt("bob@example.org")
        assert code == 250
        code, text = client.data(b"Subject: after the reload\r\n\r\nhello bob\r\n")
        assert code == 250, text
    wait_for("bob's mail delivered", lambda: list(
        (server.directory / "mail/example.org/bob/new").glob("*")))
    assert server.process.poll() is None  # no restart

    # A broken config is refused with check-config's line; the running one stays.
    server.config_path.write_text(server.config_path.read_text().replace(
        'users = ["alice", "bob"]', 'users = "carol"'))
    check = subprocess.run([str(MTA), "check-config", str(server.config_path)],
                           cwd=server.directory, env=source_env(), capture_output=True, check=False,
                           text=True, timeout=30)
    error = check.stderr.strip().removeprefix("mta: ")
    assert check.returncode == 1 and "[domains.\"example.org\"] users" in error
    server.process.send_signal(1)  # SIGHUP straight to twistd, as systemctl reload does
    wait_for("the failed reload in the log", lambda: (
        f"reload failed, the running config stays in force: {error}" in server.log_text()))
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
        client.ehlo("client.test")
        client.mail("sender@client.test")
        assert client.rcpt("bob@example.org")[0] == 250
        assert client.rcpt("carol@example.org")[0] == 550


def test_a_listener_change_is_logged_as_needing_a_restart(start_mta) -> None:
    server = start_mta(CONFIG.replace("USERS", '"alice"'))
    server.config_path.write_text(server.config_path.read_text().replace(
        'endpoint = "tcp:', 'role = "smtp"\nendpoint = "tcp:').replace(
        "interface=127.0.0.1", "interface=127.0.0.2"))
    server.process.send_signal(1)
    wait_for("the reload in the log", lambda: "reload #1" in server.log_text())
    assert "[[listeners]] changed: that takes a restart" in server.log_text()
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:  # still listening
        assert client.ehlo("client.test")[0] == 250


def test_mta_reload_without_a_running_server_says_so(tmp_path: Path) -> None:
    config = tmp_path / "mta.toml"
    config.write_text(CONFIG.replace("USERS", "").format(port=2599))
    done = subprocess.run([str(MTA), "reload", "--config", str(config)], cwd=tmp_path,
                          env=source_env(), capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 1 and "is the server running?" in done.stderr
