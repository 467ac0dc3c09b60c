"""Held mail handed over on request, end to end: the real server against real pickup clients.

The provider (`twistd -n mta`) holds mail for customer.test (route "hold")
and hands it over when asked:

- ATRN [RFC 2645] on an odmr listener: fetchmail's ODMR client logs in as
  "customer" (CRAM-MD5: the password file is written by `mta passwd
  --cram-md5`), says ATRN, and relays the turned connection to Postfix's
  smtp-sink, which plays the customer's own server;
- ETRN [RFC 1985] on the smtp listener: fetchmail (`protocol ETRN`) and
  msmtp (`--rmqs`) ask for a queue run; held mail goes to the domain's
  etrn_route (an smtp-sink), a deferred domain's mail is retried at once;
- TURN [RFC 821]: a raw-socket client written here (no mta code) logs in
  with AUTH PLAIN, says TURN and then acts as the SMTP server itself.

Mail goes in with smtplib, each message with its own Message-Id; what
arrives is matched by Message-Id, and the provider's queue is read from its
spool.  A refusal is checked by its reply and its log line first, and only
then is the queue found unchanged.  Every port is picked at run time; every
process is stopped at the end.
"""

from __future__ import annotations

import base64
import os
import re
import smtplib
import socket
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.harness import (
    MTA,
    MtaServer,
    Sink,
    free_port,
    need,
    source_env,
    wait_for,
)

PASSWORD = "customer pass phrase"
OTHER_PASSWORD = "other pass phrase"
SENDER = "alice@sender.test"
TIMEOUT = 30

CONFIG = """
[server]
hostname = "provider.test"
spool = "spool"
postmaster = "postmaster@provider.test"

[[listeners]]
endpoint = "tcp:{{port}}:interface=127.0.0.1"
role = "smtp"

[[listeners]]
endpoint = "tcp:{odmr}:interface=127.0.0.1"
role = "odmr"

[auth]
passwords = "{passwords}"
failure_delay = "0.2s"

[relay]
mynetworks = ["127.0.0.1/32"]
nameservers = ["127.0.0.1:9"]
dns_timeout = "1s"
connect_timeout = "2s"
retry_min = "1h"
retry_max = "1h"

[domains."customer.test"]
route = "hold"
pull_users = ["customer"]
etrn_route = "smtp:[127.0.0.1]:{etrn_port}"

[domains."sub.customer.test"]
route = "hold"
etrn_route = "smtp:[127.0.0.1]:{etrn_port}"

[domains."other.test"]
route = "hold"
pull_users = ["other"]
etrn_route = "smtp:[127.0.0.1]:{etrn_port}"

[domains."guarded.test"]
route = "hold"
etrn_clients = ["10.0.0.0/8"]
etrn_route = "smtp:[127.0.0.1]:{etrn_port}"

[domains."later.test"]
route = "smtp:[127.0.0.1]:{later_port}"

[etrn]
per_client = {per_client}
window = "1m"
"""


# -- the provider and its peers -------------------------------------------------------------


@dataclass
class Provider:
    server: MtaServer
    odmr: int  # the odmr listener (ATRN); server.port is the smtp listener
    etrn_port: int  # where customer.test's etrn_route points
    later_port: int  # later.test's normal route: nothing listens there at first
    home: Path  # HOME for fetchmail and msmtp

    @property
    def smtp(self) -> int:
        return self.server.port

    def queue(self) -> set[str]:
        return set(self.server.spool.queue_ids())

    def log(self) -> str:
        return self.server.log_text()

    def wait_log(self, pattern: str, timeout: float = TIMEOUT) -> re.Match[str]:
        return wait_for(f"log line {pattern!r}",
                        lambda: re.search(pattern, self.log()), timeout)


@pytest.fixture
def sinks() -> Iterator[Callable[[int], Sink]]:
    started: list[Sink] = []

    def start(port: int) -> Sink:
        sink = Sink("127.0.0.1", port)
        started.append(sink)
        return sink
    yield start
    for sink in started:
        sink.cleanup()


def make_provider(start_mta: Callable[..., MtaServer], tmp_path: Path,
                  per_client: int = 50) -> Provider:
    """The provider with "customer" (CRAM-MD5 secret too) and "other" set by `mta passwd`."""
    keys = tmp_path / "keys"
    keys.mkdir()
    passwords = keys / "passwords"
    port, odmr, etrn_port, later_port = free_port(), free_port(), free_port(), free_port()
    assert len({port, odmr, etrn_port, later_port}) == 4
    config = CONFIG.format(odmr=odmr, passwords=passwords, etrn_port=etrn_port,
                           later_port=later_port, per_client=per_client)
    # `mta passwd` reads the same file the server will: write it out for the command.
    config_file = keys / "provider.toml"
    config_file.write_text(config.format(port=port))
    for user, password, extra in (("customer", PASSWORD, ["--cram-md5"]),
                                  ("other", OTHER_PASSWORD, [])):
        done = subprocess.run([str(MTA), "passwd", "--config", str(config_file), *extra, user],
                              input=f"{password}\n".encode(), capture_output=True,
                              env=source_env(), timeout=TIMEOUT, check=False)
        assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert "cram-md5$" in passwords.read_text()
    home = tmp_path / "home"
    home.mkdir()
    server = start_mta(config, port=port)
    return Provider(server, odmr, etrn_port, later_port, home)


@pytest.fixture
def provider(start_mta: Callable[..., MtaServer], tmp_path: Path) -> Provider:
    return make_provider(start_mta, tmp_path)


def inject(provider: Provider, recipient: str, tag: str) -> tuple[str, str]:
    """One message for `recipient` through the smtp listener: (queue id, Message-Id)."""
    message_id = f"<{tag}.pickup@sender.test>"
    message = (f"From: Alice <{SENDER}>\r\nTo: <{recipient}>\r\nSubject: pickup {tag}\r\n"
               f"Message-Id: {message_id}\r\n\r\nHeld for {recipient}.\r\n").encode()
    before = provider.queue()
    with smtplib.SMTP("127.0.0.1", provider.smtp, timeout=10) as client:
        client.ehlo("client.sender.test")
        client.sendmail(SENDER, [recipient], message)
    [queue_id] = provider.queue() - before
    return queue_id, message_id


def message_ids(sink: Sink) -> list[str]:
    return sorted(str(m["Message-Id"]) for m in sink.messages())


def run(argv: list[str], home: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HOME=str(home), FETCHMAILHOME=str(home))
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=TIMEOUT,
                          check=False)


def output(done: subprocess.CompletedProcess[str]) -> str:
    return f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"


def fetchmail(provider: Provider, poll: str) -> subprocess.CompletedProcess[str]:
    """fetchmail once with a run control file holding `poll` (mode 0600, as it insists)."""
    rc = provider.home / "fetchmailrc"
    rc.write_text(poll + "\n")
    rc.chmod(0o600)
    return run([need("fetchmail"), "-f", str(rc), "--nosyslog", "-v"], provider.home)


def odmr_poll(provider: Provider, domain: str, sink_port: int) -> str:
    return (f'poll 127.0.0.1 protocol ODMR service {provider.odmr} user "customer" '
            f'password "{PASSWORD}" fetchdomains {domain} smtphost 127.0.0.1/{sink_port}')


def msmtp_rmqs(provider: Provider, node: str) -> subprocess.CompletedProcess[str]:
    """msmtp asks for a queue run; with --debug it prints the dialogue ("<-- 253 ...")."""
    return run([need("msmtp"), "--debug", "--host=127.0.0.1", f"--port={provider.smtp}",
                f"--rmqs={node}"], provider.home)


def msmtp_refused(done: subprocess.CompletedProcess[str], server_message: str) -> None:
    """msmtp's failure for a 4xx/5xx ETRN reply: EX_UNAVAILABLE and the server's words."""
    assert done.returncode == 69, output(done)
    assert f"server message: {server_message}" in done.stderr, output(done)


# -- ATRN with fetchmail's ODMR client -------------------------------------------------------


def test_fetchmail_odmr_receives_held_mail_once(provider: Provider,
                                                sinks: Callable[[int], Sink]) -> None:
    held = dict(inject(provider, f"user{i}@customer.test", f"odmr{i}") for i in range(3))
    assert provider.queue() == set(held)
    sink = sinks(free_port())

    first = fetchmail(provider, odmr_poll(provider, "customer.test", sink.port))
    assert first.returncode == 0, output(first)
    assert "ODMR< 250 2.0.0 OK, now reversing the connection" in first.stdout, output(first)
    sink.wait(3)
    assert message_ids(sink) == sorted(held.values())
    assert all(dump["X-Mail-Args"].startswith(f"<{SENDER}>") for dump in sink.messages())
    assert sorted(rcpt for dump in sink.messages() for rcpt in dump.get_all("X-Rcpt-Args")) == \
        [f"<user{i}@customer.test>" for i in range(3)]
    wait_for("the provider's queue to empty", lambda: not provider.queue())
    for queue_id in held:
        provider.wait_log(rf"{queue_id}: to=<user\d@customer\.test>, "
                          rf"relay=turned\[127\.0\.0\.1\].*status=sent")
    provider.wait_log(r"turned connection to \[127\.0\.0\.1\] ended: 3 messages")

    second = fetchmail(provider, odmr_poll(provider, "customer.test", sink.port))
    assert second.returncode == 0, output(second)
    assert "ODMR< 453 4.2.0 You have no mail" in second.stdout, output(second)
    assert "You have no mail." in second.stderr, output(second)
    assert message_ids(sink) == sorted(held.values())


def test_fetchmail_odmr_refused_for_a_domain_the_user_may_not_pull(
        provider: Provider, sinks: Callable[[int], Sink]) -> None:
    held = {inject(provider, "bob@other.test", "not-yours")[0],
            inject(provider, "carol@customer.test", "yours-later")[0]}
    sink = sinks(free_port())

    done = fetchmail(provider, odmr_poll(provider, "other.test", sink.port))
    assert done.returncode == 4, output(done)  # PS_PROTOCOL
    assert "ODMR< 450 4.7.1 ATRN request refused" in done.stdout, output(done)
    assert "fetchmail: ATRN request refused." in done.stdout, output(done)
    provider.wait_log(r"ATRN other\.test refused: customer may not pull it")
    assert provider.queue() == held
    assert sink.messages() == []
    log = provider.log()
    assert not [q for q in held if f"{q}: to=" in log], log  # no attempt of any kind
    assert "relay=turned" not in log


# -- ETRN with fetchmail and msmtp ------------------------------------------------------------


def test_fetchmail_etrn_sends_held_mail_to_the_etrn_route(provider: Provider,
                                                          sinks: Callable[[int], Sink]) -> None:
    held = dict(inject(provider, f"user{i}@customer.test", f"etrn{i}") for i in range(2))
    sink = sinks(provider.etrn_port)

    done = fetchmail(provider, f"poll 127.0.0.1 protocol ETRN service {provider.smtp} "
                               "fetchdomains customer.test")
    assert done.returncode == 0, output(done)
    assert ("ETRN< 253 2.0.0 OK, 2 pending messages for node customer.test started"
            in done.stdout), output(done)
    provider.wait_log(r"ETRN customer\.test from \[127\.0\.0\.1\]: 2 messages started")
    sink.wait(2)
    assert message_ids(sink) == sorted(held.values())
    wait_for("the provider's queue to empty", lambda: not provider.queue())
    for queue_id in held:
        provider.wait_log(rf"{queue_id}: to=<user\d@customer\.test>, "
                          rf"relay=127\.0\.0\.1\[127\.0\.0\.1\]:{sink.port}, .*status=sent")


@pytest.mark.parametrize("node, sub_domain_too", [
    ("customer.test", False),
    ("@customer.test", True),
    ("#customer.test", False),
])
def test_msmtp_etrn_forms(provider: Provider, sinks: Callable[[int], Sink], node: str,
                          sub_domain_too: bool) -> None:
    top_id, top_message = inject(provider, "dave@customer.test", "top")
    sub_id, sub_message = inject(provider, "erin@sub.customer.test", "sub")
    sink = sinks(provider.etrn_port)

    done = msmtp_rmqs(provider, node)
    assert done.returncode == 0, output(done)
    started = 2 if sub_domain_too else 1
    assert f"<-- 253 2.0.0 OK, {started} pending messages for node {node} started" \
        in done.stdout, output(done)
    provider.wait_log(rf"ETRN {re.escape(node)} from \[127\.0\.0\.1\]: "
                      rf"{started} messages started")
    expected = sorted([top_message, sub_message] if sub_domain_too else [top_message])
    sink.wait(len(expected))
    wait_for(f"{top_id} to leave the queue", lambda: top_id not in provider.queue())
    if sub_domain_too:
        wait_for(f"{sub_id} to leave the queue", lambda: sub_id not in provider.queue())
    else:
        # The sub-domain's mail was not asked for: it stays held.
        assert provider.queue() == {sub_id}
    assert message_ids(sink) == expected

    # Asked again: nothing waits for the node now (251, a success for msmtp).
    again = msmtp_rmqs(provider, node)
    assert again.returncode == 0, output(again)
    assert f"<-- 251 2.0.0 OK, no messages waiting for node {node}" in again.stdout, \
        output(again)
    provider.wait_log(rf"ETRN {re.escape(node)} from \[127\.0\.0\.1\]: 0 messages started")
    assert message_ids(sink) == expected


def test_msmtp_etrn_retries_deferred_mail_at_once(provider: Provider,
                                                  sinks: Callable[[int], Sink]) -> None:
    queue_id, message_id = inject(provider, "frank@later.test", "later")
    provider.wait_log(rf"{queue_id}: to=<frank@later\.test>, .*status=deferred")
    assert provider.queue() == {queue_id}  # next try in an hour (retry_min)
    sink = sinks(provider.later_port)

    done = msmtp_rmqs(provider, "later.test")
    assert done.returncode == 0, output(done)
    assert "<-- 253 2.0.0 OK, 1 pending messages for node later.test started" in done.stdout, \
        output(done)
    provider.wait_log(r"ETRN later\.test from \[127\.0\.0\.1\]: 1 messages started")
    [dump] = sink.wait(1)
    assert dump["Message-Id"] == message_id
    wait_for("the provider's queue to empty", lambda: not provider.queue())
    provider.wait_log(rf"{queue_id}: to=<frank@later\.test>, "
                      rf"relay=127\.0\.0\.1\[127\.0\.0\.1\]:{sink.port}, .*status=sent")


def test_msmtp_etrn_refusals(provider: Provider, sinks: Callable[[int], Sink]) -> None:
    guarded_id, _ = inject(provider, "grace@guarded.test", "guarded")
    top_id, top_message = inject(provider, "heidi@customer.test", "allowed")
    sink = sinks(provider.etrn_port)

    msmtp_refused(msmtp_rmqs(provider, "#unknown.test"),
                  "458 4.5.1 Unable to queue messages for node #unknown.test: no such queue")

    msmtp_refused(msmtp_rmqs(provider, "guarded.test"),
                  "459 4.7.1 Node guarded.test not allowed")
    provider.wait_log(r"ETRN guarded\.test refused for \[127\.0\.0\.1\]: "
                      r"not allowed for guarded\.test")

    # @test reaches guarded.test too, which refuses this client: nothing is started.
    msmtp_refused(msmtp_rmqs(provider, "@test"),
                  "459 4.7.1 Node @test not allowed: [127.0.0.1] may not ask for guarded.test")

    # A permitted request afterwards goes through the same queue: once its mail has
    # arrived, mail wrongly started by the refused ones would have arrived with it.
    allowed = msmtp_rmqs(provider, "customer.test")
    assert allowed.returncode == 0, output(allowed)
    assert "<-- 253 " in allowed.stdout, output(allowed)
    sink.wait(1)
    wait_for(f"{top_id} to leave the queue", lambda: top_id not in provider.queue())
    assert message_ids(sink) == [top_message]
    assert provider.queue() == {guarded_id}
    assert not re.search(rf"{guarded_id}: to=", provider.log())


def test_msmtp_etrn_too_many_requests(start_mta: Callable[..., MtaServer],
                                      tmp_path: Path) -> None:
    provider = make_provider(start_mta, tmp_path, per_client=2)
    for _ in range(2):
        done = msmtp_rmqs(provider, "customer.test")
        assert done.returncode == 0, output(done)
    msmtp_refused(msmtp_rmqs(provider, "customer.test"),
                  "458 4.7.0 Unable to queue messages: too many ETRN requests")
    provider.wait_log(r"ETRN customer\.test refused: too many requests from \[127\.0\.0\.1\]")


# -- TURN with a raw-socket client that becomes the SMTP server ---------------------------------


class Line:
    """A socket read line by line (the client side of the provider, then its server side)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError(f"connection closed; unread: {self.buffer!r}")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def reply(self) -> tuple[int, list[bytes]]:
        """One complete reply: its code and its lines."""
        lines = [self.line()]
        while lines[-1][3:4] == b"-":
            lines.append(self.line())
        return int(lines[-1][:3]), lines

    def command(self, text: str) -> tuple[int, list[bytes]]:
        self.sock.sendall(text.encode() + b"\r\n")
        return self.reply()

    def send(self, text: str) -> None:
        self.sock.sendall(text.encode() + b"\r\n")

    def data(self) -> bytes:
        """The lines up to CRLF.CRLF, dot-unstuffed."""
        lines = []
        while (line := self.line()) != b".":
            lines.append(line[1:] if line.startswith(b".") else line)
        return b"\r\n".join(lines) + b"\r\n"


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


@pytest.fixture
def session(provider: Provider) -> Iterator[Callable[[], Line]]:
    opened: list[socket.socket] = []

    def connect() -> Line:
        sock = socket.create_connection(("127.0.0.1", provider.smtp), timeout=TIMEOUT)
        opened.append(sock)
        line = Line(sock)
        code, _ = line.reply()
        assert code == 220
        return line
    yield connect
    for sock in opened:
        sock.close()


def login(client: Line, helo: str, user: str, password: str) -> None:
    code, lines = client.command(f"EHLO {helo}")
    assert code == 250, lines
    assert any(line[4:].startswith(b"AUTH") and b"PLAIN" in line for line in lines), lines
    code, lines = client.command(f"AUTH PLAIN {plain(user, password)}")
    assert code == 235, lines


def serve_turned(client: Line) -> list[tuple[str, list[str], bytes]]:
    """Be the SMTP server on the turned connection until QUIT: the transactions received."""
    received: list[tuple[str, list[str], bytes]] = []
    client.send("220 customer.test ESMTP the turned side")
    sender, recipients = "", []
    while True:
        command = client.line().decode()
        verb = command.split(" ", 1)[0].upper()
        if verb in ("EHLO", "HELO"):
            client.send("250-customer.test\r\n250 8BITMIME" if verb == "EHLO"
                        else "250 customer.test")
        elif verb == "MAIL":
            sender = re.search(r"<(.*?)>", command).group(1)
            recipients = []
            client.send("250 2.1.0 OK")
        elif verb == "RCPT":
            recipients.append(re.search(r"<(.*?)>", command).group(1))
            client.send("250 2.1.5 OK")
        elif verb == "DATA":
            client.send("354 go ahead")
            received.append((sender, recipients, client.data()))
            client.send("250 2.0.0 received")
        elif verb in ("RSET", "NOOP"):
            client.send("250 2.0.0 OK")
        elif verb == "QUIT":
            client.send("221 2.0.0 bye")
            return received
        else:
            client.send("502 5.5.1 not here")


def test_turn_delivers_held_mail_on_the_same_connection(provider: Provider,
                                                        session: Callable[[], Line]) -> None:
    held = dict(inject(provider, f"user{i}@customer.test", f"turn{i}") for i in range(3))
    other = inject(provider, "ivan@other.test", "not-turned")[0]
    stored = provider.server.queued()
    client = session()
    login(client, "customer.test", "customer", PASSWORD)
    code, lines = client.command("TURN")
    assert code == 250, lines

    received = serve_turned(client)
    assert sorted(re.search(rb"^Message-Id: (.*?)\r$", data, re.MULTILINE | re.IGNORECASE).group(1).decode()
                  for _, _, data in received) == sorted(held.values())
    # Byte for byte what the provider stored (its Received header included).
    assert sorted(data for _, _, data in received) == sorted(stored[q] for q in held)
    assert {sender for sender, _, _ in received} == {SENDER}
    assert sorted(r for _, recipients, _ in received for r in recipients) == \
        [f"user{i}@customer.test" for i in range(3)]
    # The provider closes after its QUIT.
    assert client.sock.recv(1) == b""
    wait_for("customer.test's mail to leave the queue", lambda: provider.queue() == {other})
    provider.wait_log(r"turned connection to \[127\.0\.0\.1\] ended: 3 messages")
    log = provider.log()
    for queue_id in held:
        assert re.search(rf"{queue_id}: to=<user\d@customer\.test>, "
                         rf"relay=turned\[127\.0\.0\.1\].*status=sent", log), log


def test_turn_refused_without_auth_or_for_a_domain_not_the_users(
        provider: Provider, session: Callable[[], Line]) -> None:
    held = {inject(provider, "judy@customer.test", "turn-refused")[0],
            inject(provider, "ken@other.test", "turn-refused-other")[0]}

    anonymous = session()
    code, lines = anonymous.command("EHLO customer.test")
    assert code == 250, lines
    code, lines = anonymous.command("TURN")
    assert code == 502 and lines[-1].startswith(b"502 5.7.0"), lines
    provider.wait_log(r"TURN refused for \[127\.0\.0\.1\] \(user none, HELO customer\.test\)")
    # Still the server side of an SMTP session: no greeting wanted, no EHLO sent to us.
    code, lines = anonymous.command("NOOP")
    assert code == 250, lines
    assert anonymous.command("QUIT")[0] == 221

    wrong = session()
    login(wrong, "other.test", "customer", PASSWORD)
    code, lines = wrong.command("TURN")
    assert code == 502 and lines[-1].startswith(b"502 5.7.0"), lines
    provider.wait_log(r"TURN refused for \[127\.0\.0\.1\] \(user customer, HELO other\.test\)")
    code, lines = wrong.command("NOOP")
    assert code == 250, lines
    assert wrong.command("QUIT")[0] == 221

    assert provider.queue() == held
    log = provider.log()
    assert not [q for q in held if f"{q}: to=" in log], log  # no attempt of any kind
    assert "relay=turned" not in log
