"""Inbound SPF, DKIM and DMARC on port 25, end to end (mta/checks/).

Peers: the real server (`twistd -n mta`), swaks as the sending MTA bound to
127.0.0.9 (not in mynetworks: "the internet"), and a loopback DNS server
(tests/dnsserver.py) with a query log, publishing the test domains' SPF
and DMARC records and the DKIM key the tests sign with (dkimpy).  Mail for
example.org is held, so what was accepted stays in the spool to be read;
the mail log is the server's own output.

Every port is picked at run time; every process is stopped at the end.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import authres
import pytest

from mta.server import auth
from tests.authpeers import LoopbackDNS, dkim_key, sign
from tests.integration.harness import MtaServer, need, wait_for

OUTSIDE = "127.0.0.9"
PASSWORD = "correct horse battery staple"
KEY, KEY_RECORD = dkim_key()
ZONE = {
    "good.test": {"TXT": ["v=spf1 ip4:127.0.0.9 -all"]},
    "s1._domainkey.good.test": {"TXT": [KEY_RECORD]},
    "_dmarc.good.test": {"TXT": ["v=DMARC1; p=reject"]},
    "bank.test": {"TXT": ["v=spf1 ip4:192.0.2.1 -all"]},
    "s1._domainkey.bank.test": {"TXT": [dkim_key()[1]]},  # not the key the forger has
    "_dmarc.bank.test": {"TXT": ["v=DMARC1; p=reject"]},
    "shop.test": {"TXT": ["v=spf1 ip4:192.0.2.1 -all"]},
    "_dmarc.shop.test": {"TXT": ["v=DMARC1; p=quarantine"]},
    "flaky.test": {"TXT": ["v=spf1 ip4:127.0.0.9 -all"]},
    "_dmarc.flaky.test": "SERVFAIL",
    "slow.test": "TIMEOUT",
}

CONFIG = """
[server]
hostname = "mx.test"
spool = "spool"
postmaster = "postmaster@example.org"

[[listeners]]
endpoint = "tcp:{port}:interface=127.0.0.1"
role = "smtp"

[auth]
passwords = "PASSWORDS"

[relay]
mynetworks = ["127.0.0.1/32"]
nameservers = ["NAMESERVER"]
dns_timeout = "DNS_TIMEOUT"
retry_min = "1h"
retry_max = "1h"

[domains."example.org"]
route = "hold"
users = ["alice"]

[limits]
greeting_delay = "0s"

[checks]
CHECKS
"""


@pytest.fixture(scope="module")
def dns_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackDNS]:
    server = LoopbackDNS(tmp_path_factory.mktemp("dns"), ZONE)
    yield server
    server.stop()


@pytest.fixture
def mx(start_mta: Callable[..., MtaServer], dns_server: LoopbackDNS,
       tmp_path: Path) -> Callable[..., MtaServer]:
    """mx(checks='dmarc = "enforce"', dns_timeout="2s"): the server under test, started."""
    passwords = tmp_path / "passwords"
    auth.set_password(passwords, "alice", PASSWORD)

    def start(checks: str = "", dns_timeout: str = "2s") -> MtaServer:
        config = (CONFIG.replace("PASSWORDS", str(passwords))
                  .replace("NAMESERVER", dns_server.nameserver)
                  .replace("DNS_TIMEOUT", dns_timeout).replace("CHECKS", checks))
        return start_mta(config=config)
    return start


def message(domain: str, subject: str, extra: str = "") -> bytes:
    return (f"From: Someone <someone@{domain}>\r\nTo: <alice@example.org>\r\n"
            f"Subject: {subject}\r\nDate: Tue, 01 Dec 2026 03:00:00 +0000\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@{domain}>\r\n{extra}"
            f"\r\nHello Alice.\r\n").encode()


def swaks(mta: MtaServer, sender: str, data: bytes, tmp_path: Path, *args: str,
          local: str = OUTSIDE) -> subprocess.CompletedProcess[str]:
    path = tmp_path / f"message-{time.monotonic_ns()}.eml"
    path.write_bytes(data)
    return subprocess.run([need("swaks"), "--server", f"127.0.0.1:{mta.port}",
                           "--local-interface", local, "--helo", "client.test",
                           "--from", sender, "--to", "alice@example.org",
                           "--data", f"@{path}", *args],
                          capture_output=True, text=True, timeout=60, check=False)


def only_message(mta: MtaServer) -> bytes:
    stored = mta.queued()
    assert len(stored) == 1, stored
    return next(iter(stored.values()))


def results_of(stored: bytes) -> authres.AuthenticationResultsHeader:
    """Our Authentication-Results field, parsed by authres (so it is well-formed)."""
    match = re.match(rb"Authentication-Results: [^\r]*(\r\n\t[^\r]*)*\r\n", stored)
    assert match, stored[:300]
    unfolded = match.group(0).replace(b"\r\n\t", b" ").decode().strip()
    return authres.all_features().parse(unfolded)


def verdicts(header: authres.AuthenticationResultsHeader) -> list[tuple[str, str]]:
    return [(r.method, r.result) for r in header.results]


def test_signed_mail_from_a_permitted_address_passes(mx, tmp_path: Path) -> None:
    mta = mx()
    data = sign(message("good.test", "a good one"), "good.test", "s1", KEY)
    done = swaks(mta, "alice@good.test", data, tmp_path)
    assert done.returncode == 0, done.stdout
    stored = only_message(mta)
    header = results_of(stored)
    assert header.authserv_id == "mx.test"
    assert verdicts(header) == [("spf", "pass"), ("dkim", "pass"), ("dmarc", "pass")]
    assert str(header.results[0].smtp_mailfrom) == "alice@good.test"
    assert (header.results[1].header_d, header.results[1].header_s) == ("good.test", "s1")
    assert header.results[2].header_from == "good.test"
    assert data in stored  # the message itself is as it was sent, signature and all
    queue_id = next(iter(mta.queued()))
    wait_for("the verdict line", lambda: re.search(
        rf"{queue_id}: spf=pass smtp.mailfrom=alice@good.test dkim=pass header.d=good.test "
        rf"header.s=s1 dmarc=pass header.from=good.test policy=reject disposition=none",
        mta.log_text()))


def test_forged_mail_is_recorded_by_default(mx, tmp_path: Path) -> None:
    mta = mx()
    forged = sign(message("bank.test", "pay now"), "bank.test", "s1", KEY)  # the wrong key
    done = swaks(mta, "ceo@bank.test", forged, tmp_path)
    assert done.returncode == 0, done.stdout
    header = results_of(only_message(mta))
    assert verdicts(header) == [("spf", "fail"), ("dkim", "fail"), ("dmarc", "fail")]
    wait_for("the verdict line", lambda: re.search(
        r": spf=fail smtp.mailfrom=ceo@bank.test dkim=fail header.d=bank.test header.s=s1 "
        r"dmarc=fail header.from=bank.test policy=reject disposition=none", mta.log_text()))


def test_dmarc_enforce_refuses_the_forgery(mx, tmp_path: Path) -> None:
    mta = mx('dmarc = "enforce"')
    forged = sign(message("bank.test", "pay now"), "bank.test", "s1", KEY)
    done = swaks(mta, "ceo@bank.test", forged, tmp_path)
    assert done.returncode != 0
    assert "550 5.7.1 DMARC policy of bank.test rejects this message" in done.stdout
    assert mta.queued() == {}
    wait_for("the reject line", lambda: re.search(
        r": reject: END-OF-MESSAGE from unknown\[127\.0\.0\.9\]: 550 5\.7\.1 DMARC policy of "
        r"bank\.test rejects this message: no aligned SPF or DKIM pass; "
        r"from=<ceo@bank\.test> to=<alice@example\.org>", mta.log_text()))
    # The real thing still goes in.
    good = sign(message("good.test", "a good one"), "good.test", "s1", KEY)
    assert swaks(mta, "alice@good.test", good, tmp_path).returncode == 0


def test_spf_reject_refuses_at_mail(mx, tmp_path: Path) -> None:
    mta = mx('spf = "reject"')
    done = swaks(mta, "ceo@bank.test", message("bank.test", "pay now"), tmp_path)
    assert done.returncode != 0
    lines = done.stdout.splitlines()
    refused = next(i for i, line in enumerate(lines)
                   if "550 5.7.23 SPF check failed for <ceo@bank.test>" in line)
    assert "MAIL FROM:<ceo@bank.test>" in lines[refused - 1]
    assert not any("DATA" in line for line in lines[refused:])
    wait_for("the reject line", lambda: re.search(
        r"NOQUEUE: reject: MAIL from unknown\[127\.0\.0\.9\]: 550 5\.7\.23 ", mta.log_text()))


def test_quarantine_adds_the_header(mx, tmp_path: Path) -> None:
    mta = mx('dmarc = "enforce"')
    assert swaks(mta, "sales@shop.test", message("shop.test", "offer"), tmp_path).returncode == 0
    stored = only_message(mta)
    assert b"\r\nX-Quarantine: dmarc header.from=shop.test p=quarantine\r\n" in stored
    assert ("dmarc", "fail") in verdicts(results_of(stored))


def test_forged_results_are_removed_and_others_kept(mx, tmp_path: Path) -> None:
    mta = mx()
    forged = ("Authentication-Results: mx.test; dmarc=pass header.from=bank.test\r\n"
              "authentication-results:\r\n MX.TEST;\r\n\tspf=pass smtp.mailfrom=bank.test\r\n"
              "Authentication-Results: relay.example.net; spf=pass smtp.mailfrom=bank.test\r\n")
    data = message("good.test", "with results", forged)
    data = sign(data, "good.test", "s1", KEY)
    assert swaks(mta, "alice@good.test", data, tmp_path).returncode == 0
    stored = only_message(mta)
    assert len(re.findall(rb"(?im)^authentication-results:", stored)) == 2
    assert b"Authentication-Results: relay.example.net; spf=pass" in stored
    assert b"MX.TEST" not in stored and b"dmarc=pass header.from=bank.test" not in stored
    # The forged fields were not signed, so the signature still verifies without them.
    assert verdicts(results_of(stored)) == [("spf", "pass"), ("dkim", "pass"),
                                            ("dmarc", "pass")]


def test_servfail_on_the_dmarc_name(mx, tmp_path: Path) -> None:
    mta = mx()
    assert swaks(mta, "a@flaky.test", message("flaky.test", "maybe"), tmp_path).returncode == 0
    assert ("dmarc", "temperror") in verdicts(results_of(only_message(mta)))
    mta.stop()
    enforcing = mx('dmarc = "enforce"')
    done = swaks(enforcing, "a@flaky.test", message("flaky.test", "maybe"), tmp_path)
    assert "451 4.7.1 DMARC check of flaky.test got a temporary DNS error" in done.stdout


def test_trusted_and_authenticated_mail_is_not_checked(mx, dns_server: LoopbackDNS,
                                                       tmp_path: Path) -> None:
    mta = mx('spf = "reject"\ndmarc = "enforce"')
    before = len(dns_server.queries())
    trusted = message("bank.test", "from our network")
    assert swaks(mta, "ceo@bank.test", trusted, tmp_path, local="127.0.0.1").returncode == 0
    authenticated = message("bank.test", "from our user")
    done = swaks(mta, "ceo@bank.test", authenticated, tmp_path, "--auth", "PLAIN",
                 "--auth-user", "alice", "--auth-password", PASSWORD)
    assert done.returncode == 0, done.stdout
    stored = sorted(mta.queued().values(), key=len)
    assert len(stored) == 2
    assert all(b"Authentication-Results" not in m for m in stored)
    assert any(trusted in m for m in stored)
    assert dns_server.queries()[before:] == []
    # The same sender from outside is looked up (and refused): the log would have shown it.
    outside = swaks(mta, "ceo@bank.test", trusted, tmp_path)
    assert "550 5.7.23" in outside.stdout
    assert "bank.test TXT" in dns_server.queries()[before:]


def test_a_reload_reaches_the_checks(mx, tmp_path: Path) -> None:
    mta = mx()
    data = message("bank.test", "pay now")
    assert swaks(mta, "ceo@bank.test", data, tmp_path).returncode == 0
    text = mta.config_path.read_text().replace("[checks]\n", '[checks]\nspf = "reject"\n')
    mta.config_path.write_text(text)
    mta.process.send_signal(signal.SIGHUP)
    wait_for("the reload", lambda: "reload: " in mta.log_text() and "in force" in mta.log_text())
    assert "550 5.7.23" in swaks(mta, "ceo@bank.test", data, tmp_path).stdout


def test_a_stop_does_not_wait_for_a_hanging_lookup(mx, dns_server: LoopbackDNS) -> None:
    """slow.test's queries are never answered: the SPF check waits 30 s per lookup."""
    mta = mx(dns_timeout="30s")
    with socket.create_connection(("127.0.0.1", mta.port), timeout=10,
                                  source_address=(OUTSIDE, 0)) as client:
        reader = client.makefile("rb")
        assert reader.readline().startswith(b"220")
        client.sendall(b"HELO client.test\r\nMAIL FROM:<x@slow.test>\r\n")
        assert reader.readline().startswith(b"250")
        assert reader.readline().startswith(b"250")  # SPF runs alongside (record mode)
        wait_for("the SPF lookup", lambda: "slow.test TXT" in dns_server.queries())
        started = time.monotonic()
        mta.process.send_signal(signal.SIGTERM)
        mta.process.wait(15)
    assert time.monotonic() - started < 10
    assert "Main loop terminated" in mta.log_text()
