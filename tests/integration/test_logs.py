"""The log an operator greps, end to end: each rejection, AUTH failure, TLS session and
receipt of a message is one Postfix-like line, and the fail2ban filter in
etc/examples/fail2ban/ matches the AUTH failures (checked with fail2ban-regex)."""

from __future__ import annotations

import re
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

from mta import tls
from mta.server import auth
from tests.integration.harness import REPO, MtaServer, free_port, need, wait_for

UNTRUSTED = "127.0.0.9"  # loopback, but not in mynetworks
PASSWORD = "right password"

CONFIG = """
[server]
hostname = "mx.test"
spool = "spool"

[[listeners]]
endpoint = "tcp:{{port}}:interface=127.0.0.1"
role = "smtp"
tls = "starttls"

[[listeners]]
endpoint = "tcp:{submission}:interface=127.0.0.1"
role = "submission"
tls = "starttls"

[tls]
certificate = "{cert}"
key = "{key}"

[auth]
passwords = "{passwords}"
failure_delay = "0s"
max_failures = 10
failures_per_client = 3

[relay]
mynetworks = ["127.0.0.1/32"]
nameservers = ["127.0.0.1:9"]
dns_timeout = "1s"

[domains."example.org"]
route = "maildir:mail/example.org"
users = ["alice"]

[limits]
greeting_delay = "0s"
message_size = "2KB"
"""

FILTER = REPO / "etc/examples/fail2ban/filter.d/mta.conf"


def swaks(port: int, *args: str, local: str = UNTRUSTED) -> subprocess.CompletedProcess[str]:
    return subprocess.run([need("swaks"), "--server", f"127.0.0.1:{port}", "--helo",
                           "client.test", "--local-interface", local, *args],
                          capture_output=True, text=True, timeout=60, check=False)


def test_every_rejection_and_receipt_is_one_line(start_mta: Callable[..., MtaServer],
                                                 tmp_path: Path) -> None:
    cert, key, passwords = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "passwords"
    tls.make_cert(cert, key, "mx.test")
    auth.set_password(passwords, "alice", PASSWORD)
    submission = free_port()
    server = start_mta(CONFIG.format(submission=submission, cert=cert, key=key,
                                     passwords=passwords))
    port = server.port

    # Relaying from outside, an unknown user, a message over the size limit.
    swaks(port, "--from", "a@client.test", "--to", "friend@elsewhere.test")
    swaks(port, "--from", "a@client.test", "--to", "zed@example.org")
    swaks(port, "--from", "a@client.test", "--to", "alice@example.org",
          "--body", "x" * 3000)
    # MAIL before AUTH on the submission port; three wrong passwords; one right one, in TLS.
    swaks(submission, "--from", "alice@example.org", "--to", "bob@elsewhere.test", "--tls")
    done = swaks(submission, "--tls", "--auth", "PLAIN", "--auth-user", "alice",
                 "--auth-password", PASSWORD, "--from", "alice@example.org",
                 "--to", "alice@example.org", "--header", "Message-Id: <m1@client.test>")
    assert done.returncode == 0, done.stdout
    # Three wrong passwords, then AUTH is refused to that address (failures_per_client).
    for _ in range(4):
        swaks(submission, "--tls", "--auth", "PLAIN", "--auth-user", "alice",
              "--auth-password", "wrong", "--from", "alice@example.org", "--to", "b@x.test")
    # Control characters from the network never reach the log as they are.
    with socket.create_connection(("127.0.0.1", port)) as raw:
        raw.recv(512)
        raw.sendall(b"EHLO bad\x1bname\r\nMAIL FROM:<a@client.test>\r\n"
                    b"RCPT TO:<zed\x07@example.org>\r\nQUIT\r\n")
        while raw.recv(4096):
            pass

    wait_for("the last disconnect", lambda: server.log_text().count("disconnect from") >= 10)
    log = server.log_text()
    client = re.escape(f"unknown[{UNTRUSTED}]")
    expected = [
        rf"connect from {client} to smtp\[tcp:{port}:interface=127\.0\.0\.1\]",
        (rf"NOQUEUE: reject: RCPT from {client}: 554 5\.7\.1 .*; from=<a@client\.test> "
         rf"to=<friend@elsewhere\.test> proto=ESMTP helo=<client\.test>"),
        (rf"NOQUEUE: reject: RCPT from {client}: 550 5\.1\.1 .*; from=<a@client\.test> "
         rf"to=<zed@example\.org> proto=ESMTP helo=<client\.test>"),
        (rf"[0-9A-F]+: reject: END-OF-MESSAGE from {client}: 552 5\.3\.4 .*; "
         rf"from=<a@client\.test> to=<alice@example\.org> proto=ESMTP helo=<client\.test>"),
        (rf"NOQUEUE: reject: MAIL from {client}: 530 5\.7\.0 .*; from=<alice@example\.org> "
         rf"proto=ESMTPS helo=<client\.test>"),
        (rf"TLS connection established from {client}: TLSv1\.[23] with cipher \S+ "
        rf"\(\d+/\d+ bits\)"),
        (rf"[0-9A-F]+: client={client}, tls=TLSv1\.[23]:\S+, sasl_method=PLAIN, "
         rf"sasl_username=alice, from=<alice@example\.org>, nrcpt=1, size=\d+, "
         rf"message-id=<m1@client\.test>, proto=ESMTPSA"),
        (rf"disconnect from {client} ehlo=2 starttls=1 auth=1 mail=1 rcpt=1 data=1 quit=1 "
         rf"commands=8"),
        rf"disconnect from {client} ehlo=1 mail=1 rcpt=0/1 quit=1 commands=3/4",
        r"helo=<bad\?name>",
        r"to=<zed\?@example\.org>",
    ]
    for pattern in expected:
        assert re.search(pattern, log), f"{pattern!r} not in the log:\n{log}"
    failures = re.findall(rf"warning: {client}: SASL PLAIN authentication failed: 535 5\.7\.8 "
                          rf".*, sasl_username=alice", log)
    assert len(failures) == 3
    assert re.search(rf"NOQUEUE: reject: AUTH from {client}: 421 4\.7\.0 too many authentication "
                     rf"failures from your address", log)
    assert "\x1b" not in log and "\x07" not in log

    # fail2ban reads the same lines with our filter.
    regex = need("fail2ban-regex")
    result = subprocess.run([regex, "--print-all-matched", str(server.log_path), str(FILTER)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"Failregex: 4 total", result.stdout), result.stdout
    assert re.search(r"127\.0\.0\.9\s+\(", result.stdout) or "127.0.0.9" in result.stdout
