"""Trust and abuse end to end: `twistd -n mta` on loopback against real TLS and AUTH clients.

One server per test, with three listeners: smtp (STARTTLS) on the harness's
port, submission (STARTTLS, AUTH required) and smtps (implicit TLS, RFC
8314), a certificate made by `make_cert` and a password file made by
`set_password`.  Only 127.0.0.1 is in mynetworks; a client that binds its
socket to 127.0.0.9 stands for the internet.  swaks, curl and Python's
smtplib/ssl are the clients; a raw socket shows the STARTTLS injection.
Each test ends by checking that every message that got its 250 is in the
spool.
"""

from __future__ import annotations

import base64
import hashlib
import os
import signal
import smtplib
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import pytest

from mta import tls
from mta.server import auth
from tests.integration.harness import REPO, MtaServer, free_port, need, wait_for

PASSWORD = "s3cret pass phrase"
UNTRUSTED = "127.0.0.9"  # loopback, but not in mynetworks: "the internet"
MESSAGE = b"From: alice@example.org\r\nTo: friend@elsewhere.test\r\nSubject: trust\r\n\r\nhello\r\n"

CONFIG = """
[server]
hostname = "mx.test"
spool = "spool"
postmaster = "postmaster@example.org"

[[listeners]]
endpoint = "tcp:{{port}}:interface=127.0.0.1"
role = "smtp"
tls = "starttls"

[[listeners]]
endpoint = "tcp:{submission}:interface=127.0.0.1"
role = "submission"
tls = "starttls"

[[listeners]]
endpoint = "tcp:{smtps}:interface=127.0.0.1"
role = "smtps"

[tls]
certificate = "{cert}"
key = "{key}"

[auth]
passwords = "{passwords}"
failure_delay = "0.2s"

[relay]
mynetworks = ["127.0.0.1/32"]
nameservers = ["127.0.0.1:9"]
dns_timeout = "1s"
retry_min = "1h"
retry_max = "1h"

[domains."example.org"]
route = "hold"

[limits]
greeting_delay = "0.3s"
data_timeout = "2s"
connections_per_client = 50
# Every "internet" address here is in 127.0.0.0/24: one network, which must not limit them.
connections_per_network = 1000
"""


@dataclass
class Trusted:
    server: MtaServer
    submission: int
    smtps: int
    cert: Path
    key: Path
    passwords: Path

    @property
    def smtp(self) -> int:
        return self.server.port

    def queued(self) -> dict[str, bytes]:
        return self.server.queued()

    def envelope(self, queue_id: str) -> dict:
        return self.server.envelope(queue_id)


@pytest.fixture
def trusted(start_mta: Callable[..., MtaServer], tmp_path: Path) -> Iterator[Trusted]:
    keys = tmp_path / "keys"
    keys.mkdir()
    cert, key, passwords = keys / "cert.pem", keys / "key.pem", keys / "passwords"
    tls.make_cert(cert, key, "mx.test")
    auth.set_password(passwords, "alice", PASSWORD, cram_md5=True)
    submission, smtps = free_port(), free_port()
    config = CONFIG.format(submission=submission, smtps=smtps, cert=cert, key=key,
                           passwords=passwords)
    server = start_mta(config)
    yield Trusted(server, submission, smtps, cert, key, passwords)


def client_context(cafile: Path) -> ssl.SSLContext:
    """A verifying client: our self-signed certificate is its only trust root."""
    context = ssl.create_default_context(cafile=str(cafile))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def file_fingerprint(cert: Path) -> str:
    return fingerprint(ssl.PEM_cert_to_DER_cert(cert.read_text()))


def run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=False, capture_output=True, timeout=60)


def output(done: subprocess.CompletedProcess) -> str:
    return done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")


def swaks(*args: str) -> subprocess.CompletedProcess:
    return run([need("swaks"), "--from", "alice@example.org", "--to", "friend@elsewhere.test",
                "--helo", "client.test", *args])


def swaks_auth(mechanism: str, password: str = PASSWORD) -> list[str]:
    return ["--auth", mechanism, "--auth-user", "alice", "--auth-password", password]


def read_reply(sock: socket.socket | ssl.SSLSocket) -> bytes:
    """One complete reply (all its lines), read a byte at a time so nothing more is taken."""
    data = b""
    while True:
        chunk = sock.recv(1)
        if not chunk:
            return data
        data += chunk
        if data.endswith(b"\r\n"):
            last = data[:-2].rsplit(b"\r\n", 1)[-1]
            if len(last) < 4 or last[3:4] == b" ":
                return data


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10,
                                    source_address=(source, 0))
    return sock


# -- STARTTLS, implicit TLS and AUTH with real clients -------------------------------------

@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
def test_swaks_starttls_and_auth_on_submission(trusted: Trusted, mechanism: str) -> None:
    done = swaks("--server", f"127.0.0.1:{trusted.submission}", "--tls",
                 *swaks_auth(mechanism))
    text = output(done)
    assert done.returncode == 0, text
    assert "TLS started" in text and "235 2.7.0" in text
    [(queue_id, stored)] = trusted.queued().items()
    assert f"queued as {queue_id}" in text
    assert b"with ESMTPSA id " + queue_id.encode() + b" (authenticated as alice)" in stored
    envelope = trusted.envelope(queue_id)
    assert envelope["auth_identity"] == "alice"
    assert [r["address"] for r in envelope["recipients"]] == ["friend@elsewhere.test"]


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
def test_swaks_implicit_tls_and_auth_on_smtps(trusted: Trusted, mechanism: str) -> None:
    done = swaks("--server", f"127.0.0.1:{trusted.smtps}", "--tlsc", *swaks_auth(mechanism))
    text = output(done)
    assert done.returncode == 0, text
    assert 'TLS peer DN="/CN=mx.test"' in text and "235 2.7.0" in text
    # Inside TLS already: STARTTLS is not offered again.
    assert "250-STARTTLS" not in text
    [(queue_id, stored)] = trusted.queued().items()
    assert b"with ESMTPSA id " + queue_id.encode() in stored


def test_swaks_wrong_password_is_535(trusted: Trusted) -> None:
    started = time.monotonic()
    done = swaks("--server", f"127.0.0.1:{trusted.submission}", "--tls",
                 *swaks_auth("PLAIN", "wrong password"))
    assert done.returncode != 0
    assert "535 5.7.8 authentication credentials invalid" in output(done)
    assert time.monotonic() - started >= 0.2  # [auth] failure_delay
    assert trusted.queued() == {}


def test_smtplib_starttls_verifies_our_certificate_and_logs_in(trusted: Trusted) -> None:
    with smtplib.SMTP("127.0.0.1", trusted.submission, local_hostname="client.test",
                      timeout=10) as client:
        client.ehlo()
        assert client.has_extn("starttls")
        # Before TLS, from loopback in mynetworks, PLAIN is offered; it is 127.0.0.1.
        assert client.starttls(context=client_context(trusted.cert))[0] == 220
        assert file_fingerprint(trusted.cert) == \
            fingerprint(client.sock.getpeercert(binary_form=True))
        assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
        client.ehlo()
        assert not client.has_extn("starttls")
        assert client.esmtp_features["auth"].split() == ["PLAIN", "LOGIN", "CRAM-MD5"]
        client.login("alice", PASSWORD)
        refused = client.sendmail("alice@example.org", ["friend@elsewhere.test"], MESSAGE)
        assert refused == {}
    [(_, stored)] = trusted.queued().items()
    assert b"ESMTPSA" in stored
    # An authenticated submission is completed (RFC 6409 8): Date: and Message-ID: are
    # added at the end of the header; what the client sent is kept as it was.
    head, _, body = MESSAGE.partition(b"\r\n\r\n")
    assert stored.endswith(b"\r\n\r\n" + body)
    assert head + b"\r\nDate: " in stored and b"\r\nMessage-ID: <" in stored


def test_curl_implicit_tls_and_starttls(trusted: Trusted, tmp_path: Path) -> None:
    curl = need("curl")
    (tmp_path / "msg.eml").write_bytes(MESSAGE)
    common = ["--user", f"alice:{PASSWORD}", "--mail-from", "alice@example.org",
              "--mail-rcpt", "friend@elsewhere.test", "--upload-file", str(tmp_path / "msg.eml"),
              "-k", "-sS", "-v"]
    implicit = run([curl, f"smtps://127.0.0.1:{trusted.smtps}/client.test", *common])
    assert implicit.returncode == 0, output(implicit)
    assert "SSL connection using TLSv1." in output(implicit)
    starttls = run([curl, f"smtp://127.0.0.1:{trusted.submission}/client.test", "--ssl-reqd",
                    *common])
    text = output(starttls)
    assert starttls.returncode == 0, text
    assert "> STARTTLS" in text and "< 220 2.0.0 ready to start TLS" in text
    assert "< 235 2.7.0" in text
    stored = list(trusted.queued().values())
    assert len(stored) == 2 and all(b"with ESMTPSA" in s for s in stored)


def test_new_password_file_entries_work_without_restart(trusted: Trusted) -> None:
    auth.set_password(trusted.passwords, "bob", "bob's password")
    done = run([need("swaks"), "--server", f"127.0.0.1:{trusted.submission}", "--tls",
                "--auth", "PLAIN", "--auth-user", "bob", "--auth-password", "bob's password",
                "--from", "bob@example.org", "--to", "friend@elsewhere.test"])
    assert done.returncode == 0, output(done)


# -- the STARTTLS injection attack (CVE-2011-0411 class) ------------------------------------

def test_starttls_injection_on_a_raw_socket(trusted: Trusted) -> None:
    with closing(connect(trusted.smtp)) as raw:
        assert read_reply(raw).startswith(b"220 ")
        raw.sendall(b"EHLO attacker.test\r\n")
        assert b"250-STARTTLS" in read_reply(raw)
        # One write: a command pipelined behind STARTTLS, in plain text.
        raw.sendall(b"STARTTLS\r\nRSET\r\n")
        assert read_reply(raw) == b"220 2.0.0 ready to start TLS\r\n"
        sock = client_context(trusted.cert).wrap_socket(raw, server_hostname="localhost")
        raw.detach()
        with sock:
            # The RSET must never be answered, inside TLS or outside.
            sock.settimeout(1.0)
            with pytest.raises(TimeoutError):
                sock.recv(1)
            sock.settimeout(10)
            sock.sendall(b"EHLO client.test\r\n")
            answer = read_reply(sock)
            assert answer.startswith(b"250-mx.test hello client.test")
            assert b"STARTTLS" not in answer
            sock.sendall(b"NOOP\r\n")
            assert read_reply(sock) == b"250 2.0.0 OK\r\n"


# -- no open relay -----------------------------------------------------------------------------

def test_no_relay_from_untrusted_address_on_port_25(trusted: Trusted) -> None:
    with smtplib.SMTP("127.0.0.1", trusted.smtp, local_hostname="client.test", timeout=10,
                      source_address=(UNTRUSTED, 0)) as client:
        client.ehlo()
        assert client.mail("spammer@spam.test")[0] == 250
        code, text = client.rcpt("victim@elsewhere.test")
        assert (code, text[:5]) == (554, b"5.7.1")
        # Mail for our own domains is taken from anyone.
        assert client.rcpt("alice@example.org")[0] == 250
        client.rset()
        # After AUTH the same client may relay, even on port 25.
        client.starttls(context=client_context(trusted.cert))
        client.ehlo()
        client.login("alice", PASSWORD)
        client.mail("alice@example.org")
        assert client.rcpt("friend@elsewhere.test")[0] == 250
        client.rset()


def test_relay_allowed_after_auth_on_submission(trusted: Trusted) -> None:
    with smtplib.SMTP("127.0.0.1", trusted.submission, local_hostname="client.test",
                      timeout=10, source_address=(UNTRUSTED, 0)) as client:
        client.ehlo()
        code, text = client.mail("alice@example.org")
        assert (code, text[:5]) == (530, b"5.7.0")
        client.starttls(context=client_context(trusted.cert))
        client.ehlo()
        client.login("alice", PASSWORD)
        assert client.sendmail("alice@example.org", ["friend@elsewhere.test"], MESSAGE) == {}
    [(queue_id, _)] = trusted.queued().items()
    envelope = trusted.envelope(queue_id)
    assert envelope["client_address"] == UNTRUSTED and envelope["auth_identity"] == "alice"


def test_swaks_relay_refused_from_untrusted_address(trusted: Trusted) -> None:
    done = swaks("--server", f"127.0.0.1:{trusted.smtp}", "--local-interface", UNTRUSTED)
    assert done.returncode != 0
    assert "554 5.7.1 relay access denied" in output(done)
    assert trusted.queued() == {}


# -- abuse limits ------------------------------------------------------------------------------

def test_early_talker_is_refused(trusted: Trusted) -> None:
    with closing(connect(trusted.smtp, UNTRUSTED)) as sock:
        sock.sendall(b"EHLO hasty.test\r\n")
        assert read_reply(sock) == b"554 5.5.0 protocol violation: talked before the greeting\r\n"
        assert sock.recv(100) == b""  # closed, and no greeting ever came
    # A client that waits gets its greeting after the delay.
    with closing(connect(trusted.smtp, UNTRUSTED)) as sock:
        started = time.monotonic()
        assert read_reply(sock).startswith(b"220 mx.test")
        assert time.monotonic() - started >= 0.25
        sock.sendall(b"QUIT\r\n")
        assert read_reply(sock).startswith(b"221")


def test_51st_connection_from_one_address_is_refused(trusted: Trusted) -> None:
    accepted = swaks("--server", f"127.0.0.1:{trusted.smtp}", "--to", "alice@example.org")
    assert accepted.returncode == 0, output(accepted)
    sockets = [connect(trusted.smtp, "127.0.0.10") for _ in range(50)]
    try:
        for sock in sockets:
            assert read_reply(sock).startswith(b"220 ")
        with closing(connect(trusted.smtp, "127.0.0.10")) as extra:
            assert read_reply(extra) == \
                b"421 4.7.0 too many connections from your address, try again later\r\n"
            assert extra.recv(100) == b""
        # Another address is not affected.
        with closing(connect(trusted.smtp, "127.0.0.11")) as other:
            assert read_reply(other).startswith(b"220 ")
        # Nor is the other port's listener: the same count (it is per address).
        with closing(connect(trusted.submission, "127.0.0.10")) as same:
            assert read_reply(same).startswith(b"421 4.7.0")
    finally:
        for sock in sockets:
            sock.close()

    def admitted() -> bool:
        with closing(connect(trusted.smtp, "127.0.0.10")) as again:
            return read_reply(again).startswith(b"220 ")

    wait_for("a free slot after the others closed", admitted)
    assert len(trusted.queued()) == 1


def test_client_stalling_in_data_is_dropped_and_earlier_mail_kept(trusted: Trusted) -> None:
    with closing(connect(trusted.smtp)) as sock:
        read_reply(sock)
        sock.sendall(b"EHLO client.test\r\nMAIL FROM:<a@client.test>\r\n"
                     b"RCPT TO:<alice@example.org>\r\nDATA\r\n")
        for _ in range(4):
            read_reply(sock)
        sock.sendall(b"Subject: first\r\n\r\nkept\r\n.\r\n")
        assert read_reply(sock).startswith(b"250 2.0.0 OK queued as")
        sock.sendall(b"MAIL FROM:<a@client.test>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
        for _ in range(3):
            read_reply(sock)
        sock.sendall(b"Subject: second\r\n\r\nand then nothing")
        started = time.monotonic()
        assert read_reply(sock) == b"421 4.4.2 timeout exceeded, closing connection\r\n"
        assert 1.5 <= time.monotonic() - started < 10  # [limits] data_timeout = 2s
        assert sock.recv(100) == b""
    stored = list(trusted.queued().values())
    assert len(stored) == 1 and stored[0].endswith(b"Subject: first\r\n\r\nkept\r\n")
    wait_for("the partial message removed from tmp/",
             lambda: not any((trusted.server.directory / "spool" / "tmp").iterdir()))


# -- SIGHUP: a new certificate without dropping sessions ------------------------------------

def starttls_session(port: int, cafile: Path) -> ssl.SSLSocket:
    raw = connect(port)
    read_reply(raw)
    raw.sendall(b"EHLO client.test\r\n")
    read_reply(raw)
    raw.sendall(b"STARTTLS\r\n")
    assert read_reply(raw).startswith(b"220 ")
    sock = client_context(cafile).wrap_socket(raw, server_hostname="localhost")
    raw.detach()
    return sock


def implicit_certificate(port: int) -> bytes:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw) as sock:
        assert read_reply(sock).startswith(b"220 ")
        return sock.getpeercert(binary_form=True)


def test_sighup_reloads_certificate_and_keeps_sessions(trusted: Trusted, tmp_path: Path) -> None:
    old = file_fingerprint(trusted.cert)
    first = starttls_session(trusted.smtp, trusted.cert)
    assert fingerprint(first.getpeercert(binary_form=True)) == old
    first.sendall(b"EHLO client.test\r\nMAIL FROM:<a@client.test>\r\n")
    read_reply(first)
    assert read_reply(first).startswith(b"250 2.1.0")

    # New files in place (make_cert renames them in), then SIGHUP to twistd.
    tls.make_cert(trusted.cert, trusted.key, "mx.test")
    new = file_fingerprint(trusted.cert)
    assert new != old
    os.kill(trusted.server.pid, signal.SIGHUP)
    wait_for("the reload in the log", lambda: "TLS certificate reloaded" in
             trusted.server.log_text())

    # New connections, STARTTLS and implicit, see the new certificate.
    with starttls_session(trusted.smtp, trusted.cert) as second:
        assert fingerprint(second.getpeercert(binary_form=True)) == new
    assert fingerprint(implicit_certificate(trusted.smtps)) == new

    # The session opened before goes on, in the middle of its transaction.
    with first:
        first.sendall(b"RCPT TO:<alice@example.org>\r\nDATA\r\n")
        assert read_reply(first).startswith(b"250 2.1.5")
        assert read_reply(first).startswith(b"354")
        first.sendall(b"Subject: across the reload\r\n\r\nstill here\r\n.\r\nQUIT\r\n")
        assert read_reply(first).startswith(b"250 2.0.0 OK queued as")
        assert read_reply(first).startswith(b"221")
    assert trusted.server.process.poll() is None
    [(_, stored)] = trusted.queued().items()
    assert stored.endswith(b"still here\r\n") and b"with ESMTPS id" in stored


def test_sighup_with_a_broken_certificate_keeps_the_old_one(trusted: Trusted) -> None:
    old = file_fingerprint(trusted.cert)
    trusted.key.write_text("not a key\n")
    os.kill(trusted.server.pid, signal.SIGHUP)
    wait_for("the failed reload in the log", lambda: "reload failed, the running config "
             "stays in force" in trusted.server.log_text())
    assert "[tls] certificate:" in trusted.server.log_text()
    assert fingerprint(implicit_certificate(trusted.smtps)) == old
    assert trusted.server.process.poll() is None


def test_plain_auth_not_offered_to_untrusted_client_without_tls(trusted: Trusted) -> None:
    with closing(connect(trusted.submission, UNTRUSTED)) as sock:
        read_reply(sock)
        sock.sendall(b"EHLO client.test\r\n")
        features = read_reply(sock)
        # 127.0.0.9 is loopback: PLAIN is allowed from this machine.  The rule for
        # non-loopback clients is proven in tests/protocol/test_auth_tls.py.
        assert b"250-AUTH PLAIN LOGIN CRAM-MD5" in features
        sock.sendall(b"AUTH PLAIN " + base64.b64encode(b"\0alice\0" + PASSWORD.encode()) +
                     b"\r\n")
        assert read_reply(sock).startswith(b"235 2.7.0")


def test_tls_below_1_2_is_refused(trusted: Trusted) -> None:
    openssl = need("openssl")
    old = run([openssl, "s_client", "-connect", f"127.0.0.1:{trusted.smtps}", "-tls1_1",
               "-cipher", "DEFAULT@SECLEVEL=0"])
    # The server's alert 70, protocol_version: the client did offer TLS 1.1.
    assert old.returncode != 0 and "alert protocol version" in output(old)
    current = run([openssl, "s_client", "-connect", f"127.0.0.1:{trusted.smtp}",
                   "-starttls", "smtp", "-tls1_2"])
    assert "Protocol  : TLSv1.2" in output(current)


def test_default_config_runs_without_a_certificate(start_mta: Callable[..., MtaServer]) -> None:
    """`make run`'s etc/mta.toml: no certificate, no password file, so neither is offered."""
    text = (REPO / "etc" / "mta.toml").read_text()
    assert 'endpoint = "tcp:2525:interface=127.0.0.1"' in text
    server = start_mta(text.replace("tcp:2525:", "tcp:{port}:"))
    with smtplib.SMTP("127.0.0.1", server.port, local_hostname="client.test",
                      timeout=10) as client:
        client.ehlo()
        assert not client.has_extn("starttls") and not client.has_extn("auth")
        assert client.docmd("STARTTLS")[0] == 502
        assert client.docmd("AUTH", "PLAIN")[0] == 502


def test_default_greeting_delay_is_one_second(start_mta: Callable[..., MtaServer]) -> None:
    server = start_mta("""
[server]
hostname = "mx.test"
spool = "spool"

[[listeners]]
endpoint = "tcp:{port}:interface=127.0.0.1"

[relay]
mynetworks = ["192.0.2.0/24"]
nameservers = ["127.0.0.1:9"]
""")
    with closing(connect(server.port)) as sock:
        started = time.monotonic()
        assert read_reply(sock).startswith(b"220 mx.test")
        assert 0.9 <= time.monotonic() - started < 5
