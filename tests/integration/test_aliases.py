"""Aliases, lists, virtual aliases, postmaster, system mail and plus-addressing, end to end.

The real server (`twistd -n mta`) with an aliases file for example.org, the
system aliases of its hostname and a virtual alias file; peers: swaks and
smtplib as clients, `mta sendmail` as cron calls it, Postfix's smtp-sink as
the remote hosts, reached by MX through the loopback DNS server
(tests/dnsserver.py): a list member's host, one that refuses every RCPT
(a member that bounces), the target of a virtual alias, and the original
sender's host (which must get no bounce: the list's owner does).
"""

from __future__ import annotations

import email
import smtplib
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.harness import MTA, MtaServer, Sink, need, source_env, wait_for
from tests.integration.test_relay import DNSServer, free_port_on, report_parts

ZONE = {
    "remote.test": {"MX": [[10, "mx.remote.test"]]},
    "mx.remote.test": {"A": ["127.0.0.2"]},
    "forward.test": {"MX": [[10, "mx.forward.test"]]},
    "mx.forward.test": {"A": ["127.0.0.3"]},
    "bounces.test": {"MX": [[10, "mx.bounces.test"]]},
    "mx.bounces.test": {"A": ["127.0.0.4"]},
    "sender.test": {"MX": [[10, "mx.sender.test"]]},
    "mx.sender.test": {"A": ["127.0.0.5"]},
}
HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")
HOSTNAME = "mail.local.test"

CONFIG = """
[server]
hostname = "mail.local.test"
spool = "spool"
postmaster = "pm@example.org"
aliases = "system-aliases"
virtual = "virtual"

[[listeners]]
endpoint = "tcp:{port}:interface=127.0.0.1"
vrfy = true
expn = true

[relay]
mynetworks = ["127.0.0.1/32"]
nameservers = ["127.0.0.1:%(dns)d"]
smtp_port = %(smtp)d
dns_timeout = "2s"
connect_timeout = "2s"
retry_min = "1s"
retry_max = "2s"
masquerade = "example.org"

[domains."example.org"]
route = "maildir:mail"
users = ["alice", "bob", "pm"]
aliases = "aliases"
"""

ALIASES = """\
# The list: two local members and a remote one, and one whose host refuses it.
list: alice, bob,
      member@remote.test,
      gone@bounces.test
owner-list: bob
typo: alice, nosuchuser
"""
SYSTEM_ALIASES = "root: alice@example.org\nMAILER-DAEMON: postmaster\n"
VIRTUAL = "info@virtual.test  someone@forward.test\n"


@pytest.fixture(scope="module")
def dns_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    server = DNSServer(tmp_path_factory.mktemp("dns"), ZONE)
    try:
        yield server.port
    finally:
        server.stop()


@pytest.fixture
def smtp_port() -> int:
    return free_port_on(HOSTS)


@pytest.fixture
def sinks(smtp_port: int) -> Iterator[Callable[..., Sink]]:
    started: list[Sink] = []

    def start(address: str, *options: str) -> Sink:
        started.append(Sink(address, smtp_port, *options))
        return started[-1]
    yield start
    for sink in started:
        sink.cleanup()


@pytest.fixture
def server(start_mta: Callable[..., MtaServer], tmp_path: Path, dns_port: int,
           smtp_port: int) -> MtaServer:
    directory = tmp_path / "mta"
    directory.mkdir()
    (directory / "aliases").write_text(ALIASES)
    (directory / "system-aliases").write_text(SYSTEM_ALIASES)
    (directory / "virtual").write_text(VIRTUAL)
    return start_mta(CONFIG % {"dns": dns_port, "smtp": smtp_port}, name="mta")


def maildir(server: MtaServer, user: str) -> list[email.message.Message]:
    new = server.directory / "mail" / user / "new"
    paths = sorted(new.iterdir(), key=lambda p: p.stat().st_mtime_ns) if new.is_dir() else []
    return [email.message_from_bytes(p.read_bytes()) for p in paths]


def wait_maildir(server: MtaServer, user: str, count: int) -> list[email.message.Message]:
    return wait_for(f"{count} message(s) for {user}",
                    lambda: len(found := maildir(server, user)) >= count and found)


def queue_empty(server: MtaServer) -> bool:
    return server.spool.queue_ids() == []


def command(server: MtaServer, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run([str(MTA), *args, "--config", str(server.config_path)],
                          cwd=server.directory, input=stdin, capture_output=True,
                          env=source_env(), timeout=60, check=False)


def test_a_list_fans_out_and_its_bounce_goes_to_the_owner(server: MtaServer,
                                                         sinks: Callable[..., Sink]) -> None:
    swaks = need("swaks")
    member = sinks("127.0.0.2")
    sinks("127.0.0.4", "-f", "RCPT")  # gone@bounces.test: every RCPT refused with 5xx
    sender = sinks("127.0.0.5")
    done = subprocess.run([swaks, "--server", f"127.0.0.1:{server.port}", "--from",
                           "someone@sender.test", "--to", "list@example.org",
                           "--h-Subject", "to the list", "--body", "hello list"],
                          capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout.decode(errors="replace")
    # The two local members, from the list's owner.
    for user in ("alice", "bob"):
        message = wait_maildir(server, user, 1)[0]
        assert message["Subject"] == "to the list"
        assert message["Return-Path"] == "<owner-list@example.org>"
        assert message["Delivered-To"] == f"{user}@example.org"
    # The remote member, by MX, from the owner, with the list as ORCPT.
    (remote,) = member.wait(1)
    assert remote["X-Mail-Args"].startswith("<owner-list@example.org>")
    assert remote["X-Rcpt-Args"].startswith("<member@remote.test>")
    assert "ORCPT=rfc822;list@example.org" in remote["X-Rcpt-Args"]
    # The member that bounced: the report reaches the owner (bob), not the sender.
    bounce = wait_maildir(server, "bob", 2)[1]
    assert bounce["Return-Path"] == "<>"
    assert bounce["To"] == "<owner-list@example.org>"
    _, (rcpt,) = report_parts(bounce)
    assert rcpt["Final-Recipient"] == "rfc822; gone@bounces.test"
    assert rcpt["Original-Recipient"] == "rfc822;list@example.org"
    assert rcpt["Action"] == "failed" and rcpt["Status"].startswith("5.")
    wait_for("the queue to empty", lambda: queue_empty(server))
    assert sender.messages() == []
    log = server.log_text()
    assert "to=<gone@bounces.test>, orig_to=<list@example.org>, " \
           "relay=mx.bounces.test[127.0.0.4]" in log
    assert "to=<alice@example.org>, orig_to=<list@example.org>, relay=maildir" in log
    # The unknown target in the aliases file was reported at start.
    assert "[domains.\"example.org\"] aliases: typo@example.org: unknown target " \
           "nosuchuser@example.org" in log


def test_virtual_postmaster_plus_and_unknown(server: MtaServer,
                                             sinks: Callable[..., Sink]) -> None:
    forward = sinks("127.0.0.3")
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.ehlo("client.sender.test")
        client.mail("someone@sender.test")
        assert client.rcpt("nobody@example.org")[0] == 550
        assert client.rcpt(f"nobody@{HOSTNAME}")[0] == 550
        assert client.rcpt("other@virtual.test")[0] == 550
        for address in ("info@virtual.test", "postmaster@example.org",
                        f"postmaster@{HOSTNAME}", "alice+news@example.org"):
            assert client.rcpt(address)[0] == 250, address
        assert client.data(b"Subject: several\r\n\r\nhello\r\n")[0] == 250
    (forwarded,) = forward.wait(1)
    assert forwarded["X-Rcpt-Args"].startswith("<someone@forward.test>")
    assert "ORCPT=rfc822;info@virtual.test" in forwarded["X-Rcpt-Args"]
    # Both postmaster addresses are one delivery to [server] postmaster.
    (postmaster,) = wait_maildir(server, "pm", 1)
    assert postmaster["Subject"] == "several"
    (tagged,) = wait_maildir(server, "alice", 1)
    assert tagged["Delivered-To"] == "alice+news@example.org"
    wait_for("the queue to empty", lambda: queue_empty(server))


def test_vrfy_and_expn(server: MtaServer) -> None:
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.ehlo("client.test")
        assert client.has_extn("vrfy") and client.has_extn("expn")
        assert client.verify("alice") == (250, b"2.1.5 <alice@example.org>")
        assert client.verify("root") == (250, f"2.1.5 <root@{HOSTNAME}>".encode())
        assert client.verify("carol@example.org")[0] == 550
        code, members = client.expn("list@example.org")
        assert code == 250
        assert members.split(b"\n") == [b"2.1.5 <alice@example.org>", b"2.1.5 <bob@example.org>",
                                        b"2.1.5 <member@remote.test>",
                                        b"2.1.5 <gone@bounces.test>"]


def test_cron_mail_to_root_and_masquerading(server: MtaServer,
                                            sinks: Callable[..., Sink]) -> None:
    member = sinks("127.0.0.2")
    # Cron runs "sendmail -FCronDaemon -i -B8BITMIME -oem root" with the job's output.
    done = command(server, "sendmail", "-FCronDaemon", "-i", "-B8BITMIME", "-oem", "-f", "root",
                   "root", stdin=b"Subject: Cron <root@host> backup\n\nbackup done\n")
    assert done.returncode == 0, done.stderr
    (cron,) = wait_maildir(server, "alice", 1)
    assert cron["Subject"] == "Cron <root@host> backup"
    assert cron["Delivered-To"] == "alice@example.org"
    assert cron["Return-Path"] == f"<root@{HOSTNAME}>"
    # A local name that does not exist is refused by the server's RCPT at once.
    refused = command(server, "sendmail", "-f", "root", "nosuchname", stdin=b"Subject: x\n\ny\n")
    assert refused.returncode == 67  # EX_NOUSER
    assert f"nosuchname@{HOSTNAME}: 550 5.1.1".encode() in refused.stderr
    # The same sender leaving by SMTP is masqueraded as example.org.
    done = command(server, "sendmail", "-f", "root", "member@remote.test",
                   stdin=b"Subject: out\n\nout\n")
    assert done.returncode == 0, done.stderr
    (out,) = member.wait(1)
    assert out["X-Mail-Args"].startswith("<root@example.org>")
    # `mta aliases check` names the unknown target; `expand` shows the way.
    check = command(server, "aliases", "check")
    assert check.returncode == 1
    assert b"typo@example.org: unknown target nosuchuser@example.org" in check.stdout
    expand = command(server, "aliases", "expand", "list@example.org", f"root@{HOSTNAME}")
    assert b"list@example.org -> member@remote.test  (sender <owner-list@example.org>)" \
        in expand.stdout
    assert f"root@{HOSTNAME} -> alice@example.org".encode() in expand.stdout


def test_a_restart_does_not_expand_again(server: MtaServer, sinks: Callable[..., Sink],
                                         smtp_port: int) -> None:
    # member@remote.test's host is down: the list's message waits for it in the queue.
    sinks("127.0.0.4", "-f", "RCPT")  # gone@bounces.test fails at once (bounce to bob)
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.sendmail("someone@sender.test", ["list@example.org"],
                        b"Subject: before the change\r\n\r\nhello\r\n")
    wait_for("the deferral", lambda: "to=<member@remote.test>, orig_to=<list@example.org>"
             in server.log_text() and "status=deferred" in server.log_text())
    server.stop()
    # The list changes while the server is down; the queued message keeps its members.
    (server.directory / "aliases").write_text("list: alice\nowner-list: bob\n")
    server.start()
    member = sinks("127.0.0.2")
    (message,) = member.wait(1)
    assert message["Subject"] == "before the change"
    assert message["X-Mail-Args"].startswith("<owner-list@example.org>")
    wait_for("the queue to empty", lambda: queue_empty(server))
    # New mail to the list follows the new file.
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.sendmail("someone@sender.test", ["list@example.org"],
                        b"Subject: after the change\r\n\r\nhello\r\n")
    wait_for("the queue to empty", lambda: queue_empty(server))
    assert [m["Subject"] for m in maildir(server, "alice")] == ["before the change",
                                                                "after the change"]
    assert [m["Subject"] for m in maildir(server, "bob")] == [
        "before the change", "Undelivered Mail Returned to Sender"]
    assert len(member.messages()) == 1
