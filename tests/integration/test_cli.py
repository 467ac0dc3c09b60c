"""The `mta` command line against a running server: queue, sendmail, passwd, make-cert."""

from __future__ import annotations

import json
import re
import smtplib
import ssl
import subprocess
import time
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
    assert re.search(first + r"\* +\d+ \S+ \S+  age \d+s, next at pickup  <carol@client.test>",
                     text)
    assert "2 message(s)" in text

    shown = mta(server, "queue", "show", first)
    assert shown.returncode == 0
    times, _, rest = shown.stdout.decode().partition("-- envelope --")
    head, _, headers = rest.partition("-- headers --")
    assert json.loads(head)["recipients"][0]["address"] == "someone@held.test"
    assert re.search(r"arrived: +\S+ \S+ \(\d+s ago\)", times)
    assert "next attempt: at pickup" in times
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
    wait_for("the local submission line", lambda: f"{queue_id}: client=local uid=0 (root), "
             "from=<alice@local.test>, nrcpt=3" in server.log_text())
    for user in ("bob", "carol", "dave"):
        delivered = wait_for(f"delivery to {user}", lambda u=user: maildir_messages(server, u))
        # Maildir files use the local line ending, LF.
        assert b"\nSubject: hi\n" in delivered[0] and delivered[0].endswith(b"\n\nhello\n")
        assert b"Bcc:" not in delivered[0]
    no_rcpt = mta(server, "sendmail", stdin=b"Subject: nobody\n\nx\n")
    assert no_rcpt.returncode == 64 and b"no recipients" in no_rcpt.stderr  # EX_USAGE


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


def test_bulk_forms_requeue_and_config_before_the_subcommand(start_mta) -> None:
    server = start_mta(CONFIG)
    for recipient in ("a@held.test", "b@held.test", "c@elsewhere.test"):
        send(server, recipient)
    # In the order sent (queue ids keep to it within a second only: blanks).
    ids = sorted(server.queued(), key=lambda i: server.envelope(i)["recipients"][0]["address"])

    def cli(*args: str) -> subprocess.CompletedProcess:
        # --config before the subcommand this time
        return subprocess.run([str(MTA), "--config", str(server.config_path), *args],
                              cwd=server.directory, capture_output=True, env=source_env(),
                              timeout=60, check=False)

    held = cli("queue", "hold", "--domain", "held.test")
    assert held.returncode == 0 and b"-- 2 message(s) on hold" in held.stdout
    assert sorted(server.spool.queue_ids("hold")) == ids[:2]
    assert cli("queue", "release", "--all").returncode == 0
    assert server.spool.queue_ids("hold") == []
    # c@elsewhere.test was tried (no DNS) and deferred: requeue makes it due now.
    wait_for("the deferral", lambda: f"{ids[2]}: to=<c@elsewhere.test>" in server.log_text())
    requeued = cli("queue", "requeue", "--sender", "@client.test")
    assert requeued.returncode == 0 and b"-- 3 message(s) requeued" in requeued.stdout
    wait_for("the requeue in the log", lambda: f"{ids[2]}: requeued by the operator"
             in server.log_text())
    assert server.envelope(ids[2])["next_attempt"] <= time.time()
    gone = cli("queue", "delete", "--sender", "carol@client.test")
    assert gone.returncode == 0 and sorted(server.queued()) == []
    usage = cli("queue", "delete")
    assert usage.returncode == 2 and b"give queue ids, or --all" in usage.stderr


def test_config_prints_what_differs_from_the_defaults(start_mta) -> None:
    server = start_mta(CONFIG)
    shown = mta(server, "config")
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout.decode()
    assert '[server]\nhostname = "mx.test"\npostmaster = "postmaster@local.test"\n' in text
    assert 'mynetworks = ["127.0.0.1/32"]' in text and 'dns_timeout = "1s"' in text
    assert "retry_min" not in text  # a default
    assert '[domains."held.test"]\nroute = "hold"' in text
    every = mta(server, "config", "--all").stdout.decode()
    assert 'retry_min = "5m"' in every and "[limits]" in every
    # What it prints is a config that loads to the same values.
    copy = server.directory / "copy.toml"
    copy.write_text(every)
    again = subprocess.run([str(MTA), "config", "--all", "--config", str(copy)],
                           cwd=server.directory, capture_output=True, env=source_env(),
                           timeout=60, check=False)
    assert again.returncode == 0, again.stderr
    assert again.stdout.decode().split("\n", 1)[1] == every.split("\n", 1)[1]


def test_passwd_and_check_config_with_missing_files_and_an_open_relay(tmp_path: Path) -> None:
    config = tmp_path / "mta.toml"
    config.write_text('[auth]\npasswords = "passwords"\n[tls]\ncertificate = "gone.pem"\n'
                      '[relay]\nmynetworks = ["0.0.0.0/0"]\n')
    done = subprocess.run([str(MTA), "passwd", "alice", "--config", str(config)], cwd=tmp_path,
                          input=b"pw\n", capture_output=True, env=source_env(), timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr  # the missing certificate is no matter here
    assert (tmp_path / "passwords").read_text().startswith("alice:")
    (tmp_path / "gone.pem").unlink(missing_ok=True)
    config.write_text('[relay]\nmynetworks = ["0.0.0.0/0", "81.2.0.0/16", "10.0.0.0/8"]\n')
    checked = subprocess.run([str(MTA), "check-config", str(config)], cwd=tmp_path,
                             capture_output=True, env=source_env(), timeout=60, check=False)
    out = checked.stdout.decode()
    assert checked.returncode == 0
    assert "0.0.0.0/0 makes this an open relay" in out
    assert "81.2.0.0/16 is wider than private address space" in out
    assert "10.0.0.0/8" not in out
