"""The `mta` command line against a running server: queue, sendmail, passwd, make-cert."""

from __future__ import annotations

import json
import smtplib
import ssl
import subprocess
from pathlib import Path

from tests.integration.harness import MTA, MtaServer, source_env, wait_for

CONFIG = """
[server]
hostname = "mx.test"
spool = "spool"
postmaster = "postmaster@local.test"

[[listeners]]
endpoint = "tcp:{port}:interface=127.0.0.1"

[auth]
passwords = "passwords"

[relay]
mynetworks = ["127.0.0.1/32"]
nameservers = ["127.0.0.1:9"]
dns_timeout = "1s"

[domains."held.test"]
route = "hold"

[domains."local.test"]
route = "maildir:mail"
"""


def mta(server: MtaServer, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run([str(MTA), *args, "--config", str(server.config_path)],
                          cwd=server.directory, input=stdin, capture_output=True,
                          env=source_env(), timeout=60, check=False)


def maildir_messages(server: MtaServer, user: str) -> list[bytes]:
    new = server.directory / "mail" / user / "new"
    return [p.read_bytes() for p in sorted(new.iterdir())] if new.is_dir() else []


def send(server: MtaServer, recipient: str) -> None:
    with smtplib.SMTP("127.0.0.1", server.port) as client:
        client.sendmail("carol@client.test", [recipient], b"Subject: cli\r\n\r\nbody\r\n")


def test_queue_list_show_hold_release_delete(start_mta) -> None:
    server = start_mta(CONFIG)
    send(server, "someone@held.test")
    send(server, "other@held.test")
    first, second = sorted(server.queued())
    listing = mta(server, "queue", "list")
    assert listing.returncode == 0
    text = listing.stdout.decode()
    assert first in text and second in text and "<someone@held.test>" in text
    assert "2 message(s)" in text

    shown = mta(server, "queue", "show", first)
    assert shown.returncode == 0
    head, _, headers = shown.stdout.decode().partition("-- headers --")
    assert json.loads(head)["recipients"][0]["address"] == "someone@held.test"
    assert "Subject: cli" in headers

    assert mta(server, "queue", "hold", first).returncode == 0
    assert f"{first}!" in mta(server, "queue", "list").stdout.decode()
    assert mta(server, "queue", "release", first).returncode == 0
    assert f"{first}!" not in mta(server, "queue", "list").stdout.decode()
    assert mta(server, "queue", "delete", second).returncode == 0
    assert list(server.queued()) == [first]
    # The running server saw each change and says so in its log.
    for line in (f"{first}: held by the operator", f"{first}: released by the operator",
                 f"{second}: deleted by the operator"):
        wait_for(line, lambda line=line: line in server.log_text())

    damaged = server.directory / "spool" / "queue" / "0123456789ABCDEF012345"
    damaged.with_suffix(".env").write_text("{broken")
    damaged.with_suffix(".msg").write_text("x")
    listing = mta(server, "queue", "list").stdout.decode()
    assert "0123456789ABCDEF012345? unreadable envelope" in listing
    assert "1 message(s)" in listing

    flushed = mta(server, "queue", "flush", "held.test")
    assert flushed.returncode == 0 and flushed.stdout == b"flush requested for held.test\n"
    assert flushed.stderr == b""  # the running server took the request

    missing = mta(server, "queue", "show", "0123456789ABCDEF")
    assert missing.returncode == 1 and b"no message" in missing.stderr
    bad = mta(server, "queue", "delete", "../etc")
    assert bad.returncode == 1 and b"not a queue id" in bad.stderr


def test_sendmail_is_delivered_by_the_running_server(start_mta) -> None:
    server = start_mta(CONFIG)
    message = b"To: bob@local.test\nCc: carol@local.test\nBcc: dave@local.test\nSubject: hi\n\nhello\n"
    done = mta(server, "sendmail", "-t", "-v", "-f", "alice@local.test", stdin=message)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(b"queued as ")
    queue_id = done.stdout.split()[-1].decode()
    wait_for("the pick-up line", lambda: f"{queue_id}: from=<alice@local.test>, nrcpt=3"
             in server.log_text())
    for user in ("bob", "carol", "dave"):
        delivered = wait_for(f"delivery to {user}", lambda u=user: maildir_messages(server, u))
        # Maildir files use the local line ending, LF.
        assert b"\nSubject: hi\n" in delivered[0] and delivered[0].endswith(b"\n\nhello\n")
        assert b"Bcc:" not in delivered[0]
    no_rcpt = mta(server, "sendmail", stdin=b"Subject: nobody\n\nx\n")
    assert no_rcpt.returncode == 2 and b"no recipients" in no_rcpt.stderr


def test_passwd_from_stdin_and_auth_file(start_mta) -> None:
    server = start_mta(CONFIG)
    done = mta(server, "passwd", "alice", stdin=b"s3cret pass\n")
    assert done.returncode == 0, done.stderr
    entry = (server.directory / "passwords").read_text()
    assert entry.startswith("alice:scrypt$") and "s3cret" not in entry
    assert (server.directory / "passwords").stat().st_mode & 0o077 == 0


def test_make_cert(tmp_path: Path) -> None:
    done = subprocess.run([str(MTA), "make-cert", "--cert", "c.pem", "--key", "k.pem",
                           "--hostname", "mx.test"], cwd=tmp_path, capture_output=True,
                          env=source_env(), timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    assert (tmp_path / "k.pem").stat().st_mode & 0o077 == 0


def test_flush_without_a_running_server_says_so(tmp_path: Path) -> None:
    config = tmp_path / "mta.toml"
    config.write_text(f'[server]\nspool = "{tmp_path / "spool"}"\n')
    done = subprocess.run([str(MTA), "queue", "flush", "--config", str(config)],
                          capture_output=True, env=source_env(), timeout=60, check=False)
    assert done.returncode == 0
    assert b"no running server took the request" in done.stderr
