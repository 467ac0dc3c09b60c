"""DKIM signing end to end: `mta dkim keygen` makes the keys, the loopback DNS server
(tests/dnsserver.py) publishes the records it printed, the real server signs what our
users send, and two verifiers that share no code with us check what smtp-sink received.

Verifiers: dkimpy's own `dkimverify` (its main(), with dnspython's default resolver
pointed at the loopback DNS server) and Perl's Mail::DKIM (libmail-dkim-perl) with a
Net::DNS resolver on the same server.  Debian's Mail::DKIM (1.20230212) knows
rsa-sha256 only: for it an ed25519-sha256 signature is "invalid (unsupported
algorithm)", and the message passes by its RSA signature, which is what dual signing
is for (RFC 8463).  OpenDKIM's opendkim-testmsg is not used: it reads /etc/resolv.conf
only (no server or port can be given), and run in a network namespace with a
resolv.conf of its own it answered "dkim_chunk(): Syntax error" even for an unsigned
message.

Senders: swaks with AUTH on a submission listener, smtp-source from mynetworks,
`mta sendmail` on the local socket, swaks from 127.0.0.9 (outside mynetworks) on port
25.  A retried message is caught by an aiosmtpd receiver that answers 451 to the
first DATA and 250 to the second.
"""

from __future__ import annotations

import email
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from mta.server import auth
from tests.integration.harness import (
    MTA,
    MtaServer,
    Sink,
    free_port,
    need,
    source_env,
    wait_for,
)
from tests.integration.test_relay import DNSServer, free_port_on

PASSWORD = "dkim test password"
DKIMVERIFY = """\
import sys
import dns.resolver
import dkim.dkimverify

# dkimpy's dkimverify, unchanged, asking the loopback DNS server (argv[1] is its port).
port = int(sys.argv.pop(1))
resolver = dns.resolver.Resolver(configure=False)
resolver.nameservers = ["127.0.0.1"]
resolver.port = port
dns.resolver.default_resolver = resolver
dkim.dkimverify.main()
"""
PERL_VERIFY = r"""
use strict;
use warnings;
use Mail::DKIM::Verifier;
use Net::DNS::Resolver;

my $port = shift @ARGV;
Mail::DKIM::DNS::resolver(Net::DNS::Resolver->new(
    nameservers => ['127.0.0.1'], port => $port, recurse => 0, udp_timeout => 5));
my $dkim = Mail::DKIM::Verifier->new();
while (my $line = <STDIN>) {
    $line =~ s/\015?\012\z//;
    $dkim->PRINT("$line\015\012");
}
$dkim->CLOSE();
foreach my $signature ($dkim->signatures) {
    printf "%s d=%s s=%s a=%s\n", $signature->result_detail, $signature->domain,
        $signature->selector, $signature->algorithm;
}
printf "result=%s\n", $dkim->result;
"""
CONFIG = """
[server]
hostname = "mx.example.test"
spool = "spool"
postmaster = "postmaster@example.test"

[[listeners]]
endpoint = "tcp:{{port}}:interface=127.0.0.1"
role = "smtp"

[[listeners]]
endpoint = "tcp:{submission}:interface=127.0.0.1"
role = "submission"
auth_mechanisms = ["PLAIN", "LOGIN"]

[auth]
passwords = "passwords"
failure_delay = "0s"

[relay]
mynetworks = ["127.0.0.1/32"]
nameservers = ["127.0.0.1:{dns}"]
smtp_port = {smtp}
dns_timeout = "2s"
connect_timeout = "2s"
retry_min = "1s"
retry_max = "2s"

[limits]
greeting_delay = "0s"

[domains."inbound.test"]
route = "smtp:[127.0.0.2]"

[dkim."example.test"]
selector = "s1"
key = "{keys}/example.test.s1.key"
ed25519_selector = "e1"
ed25519_key = "{keys}/example.test.e1.key"
"""


def keygen(directory: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(MTA), "dkim", "keygen", *args], cwd=directory,
                          capture_output=True, text=True, env=source_env(), timeout=60,
                          check=False)


def published(stdout: str) -> tuple[str, str]:
    """The record name and value that keygen (or `mta dkim record`) printed."""
    name = re.search(r"^  name:  (\S+)$", stdout, re.MULTILINE).group(1)
    value = re.search(r"^  value: (.+)$", stdout, re.MULTILINE).group(1)
    return name, value


# -- peers and the server ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str]]:
    """Keys made by `mta dkim keygen` in KEYDIR/etc/dkim; record name -> (name, value)."""
    directory = tmp_path_factory.mktemp("keygen")
    rsa = keygen(directory, "example.test", "s1")
    ed = keygen(directory, "example.test", "e1", "--type", "ed25519")
    assert rsa.returncode == 0 and ed.returncode == 0, rsa.stderr + ed.stderr
    return {"dir": (str(directory / "etc" / "dkim"), ""), "s1": published(rsa.stdout),
            "e1": published(ed.stdout)}


@pytest.fixture(scope="module")
def smtp_port() -> int:
    return free_port_on(("127.0.0.2", "127.0.0.3"))


@pytest.fixture(scope="module")
def dns(tmp_path_factory: pytest.TempPathFactory, keys) -> Iterator[DNSServer]:
    zone = {
        "remote.test": {"MX": [[10, "mx.remote.test"]]},
        "mx.remote.test": {"A": ["127.0.0.2"]},
        "example.test": {"MX": [[10, "mx.remote.test"]]},  # where reports to alice arrive
        "retry.test": {"MX": [[10, "mx.retry.test"]]},
        "mx.retry.test": {"A": ["127.0.0.3"]},
        "nullmx.test": {"MX": [[0, "."]]},
    }
    for selector in ("s1", "e1"):
        name, value = keys[selector]
        zone[name] = {"TXT": [value]}
    server = DNSServer(tmp_path_factory.mktemp("dns"), zone)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def sink(smtp_port: int) -> Iterator[Sink]:
    sink = Sink("127.0.0.2", smtp_port)
    yield sink
    sink.cleanup()


@pytest.fixture(scope="module")
def mta(tmp_path_factory: pytest.TempPathFactory, keys, dns: DNSServer, smtp_port: int,
        sink: Sink) -> Iterator[MtaServer]:
    directory = tmp_path_factory.mktemp("mta")
    auth.set_password(directory / "passwords", "alice", PASSWORD)
    submission = free_port()
    server = MtaServer(directory, CONFIG.format(submission=submission, dns=dns.port,
                                                smtp=smtp_port, keys=keys["dir"][0]))
    server.submission_port = submission
    server.start()
    yield server
    server.stop()


def raw_dump(sink: Sink, subject: str) -> bytes:
    """The complete dump of the message with `subject`, as smtp-sink wrote it."""
    def found() -> bytes | None:
        for path in sink.directory.iterdir():
            try:
                raw = path.read_bytes()
            except FileNotFoundError:
                continue
            if b"\nX-Rcpt-Args:" in raw and f"\nSubject: {subject}\n".encode() in raw:
                return raw
        return None
    return wait_for(f"a message {subject!r} at the sink", found)


def dkimverify(message: bytes, dns: DNSServer, index: int) -> str:
    done = subprocess.run([sys.executable, "-c", DKIMVERIFY, str(dns.port), "--index",
                           str(index)], input=message, capture_output=True, timeout=60,
                          check=False)
    return done.stdout.decode().strip() or done.stderr.decode()


def mail_dkim(message: bytes, dns: DNSServer) -> list[str]:
    need("perl")
    done = subprocess.run(["perl", "-e", PERL_VERIFY, str(dns.port)], input=message,
                          capture_output=True, timeout=60, check=False)
    if done.returncode != 0 and b"Mail/DKIM" in done.stderr:
        if os.environ.get("CI") == "true":
            pytest.fail("libmail-dkim-perl is required in CI (make test installs it)")
        pytest.skip("libmail-dkim-perl not installed")
    assert done.returncode == 0, done.stderr
    return done.stdout.decode().splitlines()


def signature_tags(raw: bytes) -> list[dict[str, str]]:
    message = email.message_from_bytes(raw)
    result = []
    for value in message.get_all("DKIM-Signature") or []:
        text = re.sub(r"\s+", "", str(value))
        result.append(dict(item.split("=", 1) for item in text.split(";") if item))
    return result


def assert_signed_and_verified(raw: bytes, dns: DNSServer, domain: str = "example.test") -> None:
    """Both signatures there; dkimpy verifies both; Mail::DKIM passes the message."""
    assert [(t["a"], t["s"], t["d"]) for t in signature_tags(raw)] == [
        ("rsa-sha256", "s1", domain), ("ed25519-sha256", "e1", domain)]
    assert dkimverify(raw, dns, 0) == "signature ok"
    assert dkimverify(raw, dns, 1) == "signature ok"
    perl = mail_dkim(raw, dns)
    assert f"pass d={domain} s=s1 a=rsa-sha256" in perl
    # Mail::DKIM in Debian 12 has no Ed25519: it says so, and passes by the RSA signature.
    assert any(line.startswith("invalid") and "s=e1 a=ed25519-sha256" in line
               for line in perl), perl
    assert perl[-1] == "result=pass"


def swaks(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([need("swaks"), "--hide-all", *args], capture_output=True,
                          timeout=60, check=False)


# -- the tests ---------------------------------------------------------------------------

def test_keygen_writes_a_private_key_and_a_publishable_record(keys) -> None:
    path = Path(keys["dir"][0]) / "example.test.s1.key"
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----\n")
    name, value = keys["s1"]
    assert name == "s1._domainkey.example.test."
    assert value.startswith("v=DKIM1; k=rsa; p=MIIBIjAN")  # a 2048-bit key's SPKI
    assert keys["e1"][1].startswith("v=DKIM1; k=ed25519; p=")
    again = keygen(path.parents[2], "example.test", "s1")
    assert again.returncode == 1
    assert "etc/dkim/example.test.s1.key exists; --force replaces it" in again.stderr
    assert path.stat().st_mode & 0o777 == 0o600


def test_authenticated_submission_is_signed_and_verifies(mta, sink, dns) -> None:
    done = swaks("--server", f"127.0.0.1:{mta.submission_port}", "--auth", "PLAIN",
                 "--auth-user", "alice", "--auth-password", PASSWORD,
                 "--from", "alice@example.test", "--to", "bob@remote.test",
                 "--header", "Subject: submitted with AUTH")
    assert done.returncode == 0, done.stdout + done.stderr
    raw = raw_dump(sink, "submitted with AUTH")
    assert_signed_and_verified(raw, dns)
    log = mta.log_text()
    queue_id = re.search(r"(\w+): client=\S+, sasl_method=PLAIN, sasl_username=alice", log)[1]
    assert f"{queue_id}: dkim=signed d=example.test s=s1 a=rsa-sha256" in log
    assert f"{queue_id}: dkim=signed d=example.test s=e1 a=ed25519-sha256" in log


def test_mail_from_mynetworks_is_signed(mta, sink, dns) -> None:
    source = need("smtp-source")
    subprocess.run([source, "-m", "1", "-S", "from mynetworks", "-f", "carol@example.test",
                    "-t", "dave@remote.test", f"127.0.0.1:{mta.port}"], check=True, timeout=60)
    assert_signed_and_verified(raw_dump(sink, "from mynetworks"), dns)


def test_mail_from_sendmail_is_signed(mta, sink, dns) -> None:
    message = b"From: Alice <alice@example.test>\nSubject: from sendmail\n\nhello\n"
    done = subprocess.run([str(MTA), "sendmail", "--config", str(mta.config_path),
                           "-f", "alice@example.test", "erin@remote.test"],
                          cwd=mta.directory, input=message, capture_output=True,
                          env=source_env(), timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    raw = raw_dump(sink, "from sendmail")
    assert b"\nReceived: by mx.example.test (mta, from userid 0 root)\n" in raw
    assert_signed_and_verified(raw, dns)


def test_untrusted_port_25_mail_and_unknown_domains_are_not_signed(mta, sink, dns) -> None:
    # The same author from mynetworks first: signed (the positive signal).
    base = ("--server", f"127.0.0.1:{mta.port}", "--to", "frank@inbound.test")
    assert swaks(*base, "--from", "alice@example.test",
                 "--header", "Subject: trusted to inbound").returncode == 0
    assert_signed_and_verified(raw_dump(sink, "trusted to inbound"), dns)
    # From 127.0.0.9 (outside mynetworks) to a domain we take mail for: not ours to sign.
    outside = swaks(*base, "--local-interface", "127.0.0.9", "--from", "alice@example.test",
                    "--header", "Subject: from outside")
    assert outside.returncode == 0, outside.stdout
    assert b"DKIM-Signature" not in raw_dump(sink, "from outside")
    # Trusted, but a From: domain without a key.
    assert swaks("--server", f"127.0.0.1:{mta.port}", "--to", "gina@remote.test",
                 "--from", "gina@nokey.test", "--header", "Subject: no key").returncode == 0
    assert b"DKIM-Signature" not in raw_dump(sink, "no key")


def test_our_own_delivery_reports_are_signed(mta, sink, dns) -> None:
    # mx.example.test's reports come From: MAILER-DAEMON@mx.example.test; the key of
    # its parent example.test signs them (relaxed alignment).
    assert swaks("--server", f"127.0.0.1:{mta.port}", "--from", "alice@example.test",
                 "--to", "nobody@nullmx.test", "--header",
                 "Subject: to a null MX").returncode == 0
    raw = raw_dump(sink, "Undelivered Mail Returned to Sender")
    assert b"From: Mail Delivery System <MAILER-DAEMON@mx.example.test>" in raw
    assert_signed_and_verified(raw, dns)
    report_id = re.search(r"sender non-delivery notification: (\w+)", mta.log_text())[1]
    assert f"{report_id}: dkim=signed d=example.test s=s1 a=rsa-sha256" in mta.log_text()


class Deferring:
    """An aiosmtpd handler: 451 to the first DATA, 250 after; keeps what each attempt sent."""

    def __init__(self) -> None:
        self.attempts: list[bytes] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server, session, envelope) -> str:
        with self.lock:
            self.attempts.append(envelope.original_content or envelope.content)
            return "451 4.3.0 try again later" if len(self.attempts) == 1 else "250 2.0.0 OK"


def test_a_retried_message_carries_the_same_signature(mta, dns, smtp_port) -> None:
    handler = Deferring()
    receiver = Controller(handler, hostname="127.0.0.3", port=smtp_port)
    receiver.start()
    try:
        assert swaks("--server", f"127.0.0.1:{mta.port}", "--from", "alice@example.test",
                     "--to", "hal@retry.test", "--header",
                     "Subject: retried").returncode == 0
        wait_for("two attempts", lambda: len(handler.attempts) >= 2)
    finally:
        receiver.stop()
    first, second = handler.attempts[:2]
    assert first == second  # the queue held the signed message: same bytes each time
    assert len(signature_tags(first)) == 2
    assert dkimverify(second, dns, 0) == "signature ok"
    assert re.search(r"to=<hal@retry\.test>, relay=mx\.retry\.test\[127\.0\.0\.3\]:\d+, "
                     r"delay=[\d.]+, dsn=4\.3\.0, status=deferred", mta.log_text())


def test_dkim_record_prints_what_the_configured_key_needs(tmp_path, keys) -> None:
    config = tmp_path / "mta.toml"
    config.write_text(f'[dkim."example.test"]\nselector = "s1"\n'
                      f'key = "{keys["dir"][0]}/example.test.s1.key"\n')
    done = subprocess.run([str(MTA), "dkim", "record", "example.test", "--config", str(config)],
                          capture_output=True, text=True, env=source_env(), timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert published(done.stdout) == keys["s1"]


@pytest.mark.parametrize(("prepare", "expected"), [
    (lambda key: key.unlink(), ("key: no such file: {key} (make one with: mta dkim keygen "
                               "example.test s1 --output {key})")),
    (lambda key: key.chmod(0o644), ("key: {key} is mode 0644: others than its owner may open "
                                   "this private key (chmod 600 {key})")),
    (lambda key: key.write_text("garbage\n"), "key: {key}: not a PEM private key"),
])
def test_check_config_names_a_bad_key_file(tmp_path, keys, prepare, expected) -> None:
    key = tmp_path / "example.test.s1.key"
    key.write_bytes((Path(keys["dir"][0]) / "example.test.s1.key").read_bytes())
    key.chmod(0o600)
    config = tmp_path / "mta.toml"
    config.write_text(f'[server]\nhostname = "mx.example.test"\nspool = "{tmp_path}/spool"\n'
                      f'[dkim."example.test"]\nselector = "s1"\nkey = "{key}"\n')
    good = subprocess.run([str(MTA), "check-config", str(config)], capture_output=True,
                          text=True, env=source_env(), timeout=60, check=False)
    assert good.returncode == 0, good.stdout + good.stderr
    prepare(key)
    bad = subprocess.run([str(MTA), "check-config", str(config)], capture_output=True,
                         text=True, env=source_env(), timeout=60, check=False)
    assert bad.returncode == 1
    assert bad.stderr == f'mta: {config}: [dkim."example.test"] ' \
                         f'{expected.format(key=key)}\n'


class Accepting:
    """An aiosmtpd handler that takes every message, keyed by its Subject."""

    def __init__(self) -> None:
        self.messages: dict[str, bytes] = {}

    async def handle_DATA(self, server, session, envelope) -> str:
        raw = envelope.original_content or envelope.content
        self.messages[str(email.message_from_bytes(raw)["Subject"])] = raw
        return "250 2.0.0 OK"


def test_a_new_key_after_reload_leaves_queued_mail_as_it_was_signed(
        tmp_path, keys, dns, smtp_port) -> None:
    directory = tmp_path / "rotating"
    directory.mkdir()
    auth.set_password(directory / "passwords", "alice", PASSWORD)
    config = CONFIG.format(submission=free_port(), dns=dns.port, smtp=smtp_port,
                           keys=keys["dir"][0])
    config = config[:config.index("ed25519_selector")]  # RSA only, to keep it short
    server = MtaServer(directory, config).start()
    try:
        # Nothing listens at retry.test's MX yet: the message waits in the queue, signed.
        assert swaks("--server", f"127.0.0.1:{server.port}", "--from", "alice@example.test",
                     "--to", "ida@retry.test", "--header",
                     "Subject: queued before the new key").returncode == 0
        wait_for("the first attempt to fail", lambda: "status=deferred" in server.log_text())
        made = keygen(directory, "example.test", "s2")
        assert made.returncode == 0, made.stderr
        server.config_path.write_text(server.config_path.read_text().replace(
            'selector = "s1"', 'selector = "s2"').replace(
            f'key = "{keys["dir"][0]}/example.test.s1.key"',
            'key = "etc/dkim/example.test.s2.key"'))
        os.kill(server.pid, signal.SIGHUP)
        wait_for("the reload", lambda: "reload: " in server.log_text()
                 and "in force" in server.log_text())
        handler = Accepting()
        receiver = Controller(handler, hostname="127.0.0.3", port=smtp_port)
        receiver.start()
        try:
            assert swaks("--server", f"127.0.0.1:{server.port}", "--from",
                         "alice@example.test", "--to", "ida@retry.test", "--header",
                         "Subject: sent after the new key").returncode == 0
            wait_for("both messages", lambda: len(handler.messages) == 2)
        finally:
            receiver.stop()
    finally:
        server.stop()
    before = handler.messages["queued before the new key"]
    after = handler.messages["sent after the new key"]
    assert [t["s"] for t in signature_tags(before)] == ["s1"]
    assert dkimverify(before, dns, 0) == "signature ok"  # s1 is still published
    assert [t["s"] for t in signature_tags(after)] == ["s2"]
