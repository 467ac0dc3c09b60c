"""Completion of bare messages against real clients (RFC 6409 8).

swaks submits a message without Date:, Message-ID: and From: on a
submission listener after AUTH: it is stored with them.  The same message
on port 25 from a client that did not authenticate is stored as it came.
"""

from __future__ import annotations

import email
import subprocess

from mta.server import auth
from tests.integration.harness import MtaServer, free_port, need, wait_for

CONFIG = """
[server]
hostname = "mx.test"
spool = "spool"

[[listeners]]
endpoint = "tcp:{port}:interface=127.0.0.1"

[[listeners]]
endpoint = "tcp:%d:interface=127.0.0.1"
role = "submission"

[auth]
passwords = "passwords"
failure_delay = "0s"

[relay]
mynetworks = ["127.0.0.1/32"]
nameservers = ["127.0.0.1:9"]
dns_timeout = "1s"

[domains."local.test"]
route = "maildir:mail"
"""

BARE = "Subject: bare\n\nno header fields but the subject\n"


def delivered(server: MtaServer, user: str) -> list[email.message.Message]:
    new = server.directory / "mail" / user / "new"
    files = sorted(new.iterdir()) if new.is_dir() else []
    return [email.message_from_bytes(p.read_bytes()) for p in files]


def swaks(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([need("swaks"), "--from", "alice@local.test", "--data", BARE,
                           "--silent", "2", *args],
                          capture_output=True, timeout=60, check=False)


def test_swaks_submission_is_completed_and_port_25_mail_is_not(start_mta, tmp_path) -> None:
    submission = free_port()
    directory = tmp_path / "mta"
    directory.mkdir()
    auth.set_password(directory / "passwords", "alice", "s3cret")
    server = start_mta(CONFIG % submission)
    done = swaks("--server", f"127.0.0.1:{submission}", "--to", "bob@local.test",
                 "--auth", "PLAIN", "--auth-user", "alice", "--auth-password", "s3cret")
    assert done.returncode == 0, done.stdout + done.stderr
    (message,) = wait_for("the submitted message", lambda: delivered(server, "bob"))
    assert message["From"] == "<alice@local.test>"
    assert message["Date"] and message["Message-ID"].endswith("@mx.test>")
    assert message.get_payload().rstrip("\n") == "no header fields but the subject"

    done = swaks("--server", f"127.0.0.1:{server.port}", "--to", "carol@local.test")
    assert done.returncode == 0, done.stdout + done.stderr
    (plain,) = wait_for("the port-25 message", lambda: delivered(server, "carol"))
    assert plain["From"] is None and plain["Date"] is None and plain["Message-ID"] is None
