"""MTA-STS [RFC 8461] and [tls_policy] end to end: the real server against real peers.

Peers, all on loopback at ports picked now:
- tests/dnsserver.py publishes the MX records, the ``_mta-sts`` TXT records and the
  addresses of the MX hosts and of ``mta-sts.DOMAIN``;
- ``openssl s_server -WWW`` (one per policy domain, each on its own 127.0.0.2x address
  at one port, ``[relay] mta_sts_port``) serves ``/.well-known/mta-sts.txt`` over
  HTTPS with a certificate from a test CA made here (tests/testca.py);
- two receiving mta instances (``twistd -n mta``) offer STARTTLS on 127.0.0.2 and
  127.0.0.3 at ``[relay] smtp_port``: the first with a certificate naming every MX host
  that points at it, the second with one for another name (``wrong.example``); each
  delivers into Maildirs, where the tests read what arrived, and how (``with ESMTPS``).

The sending mta trusts the test CA (``[relay] tls_ca_file``).  Every refusal is
checked after its positive signal, the deferral in the sender's log.
"""

from __future__ import annotations

import json
import smtplib
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.authpeers import LoopbackDNS
from tests.integration.harness import MTA as MTA_COMMAND
from tests.integration.harness import (
    MtaServer,
    accepts,
    free_port,
    need,
    source_env,
    stop_process,
    wait_for,
)
from tests.testca import TestCA

GOOD_MX, BAD_MX = "127.0.0.2", "127.0.0.3"
POLICY_HOSTS = {"enforce.test": "127.0.0.20", "unlisted.test": "127.0.0.21",
                "badcert.test": "127.0.0.22", "testing.test": "127.0.0.23",
                "cached.test": "127.0.0.24"}
POLICIES = {
    "enforce.test": ("e1", "enforce", ["*.enforce.test"]),
    "unlisted.test": ("u1", "enforce", ["mx.elsewhere.test"]),
    "badcert.test": ("b1", "enforce", ["*.badcert.test"]),
    "testing.test": ("t1", "testing", ["*.testing.test"]),
    "cached.test": ("c1", "enforce", ["mx.cached.test"]),
}
# MX host -> where it is: the good receiver has certificates for these names.
MX_HOSTS = {"mx1.enforce.test": GOOD_MX, "mx.unlisted.test": GOOD_MX,
            "mx.cached.test": GOOD_MX, "mx.moved.cached.test": GOOD_MX,
            "mx.badcert.test": BAD_MX, "mx.testing.test": BAD_MX, "mx.plain.test": BAD_MX}
DOMAINS = ["enforce.test", "unlisted.test", "badcert.test", "testing.test", "plain.test",
           "cached.test"]


def zone(**changes: Any) -> dict[str, Any]:
    records: dict[str, Any] = {}
    for domain in DOMAINS:
        mx = next(name for name in MX_HOSTS if name.endswith("." + domain))
        records[domain] = {"MX": [[10, mx]]}
    for name, address in MX_HOSTS.items():
        records[name] = {"A": [address]}
    for domain, (policy_id, _, _) in POLICIES.items():
        records[f"_mta-sts.{domain}"] = {"TXT": [f"v=STSv1; id={policy_id}"]}
        records[f"mta-sts.{domain}"] = {"A": [POLICY_HOSTS[domain]]}
    records.update(changes)
    return records


class PolicyServer:
    """openssl s_server -WWW serving one domain's policy file on ADDRESS:PORT."""

    def __init__(self, directory: Path, domain: str, port: int, cert: Path, key: Path) -> None:
        self.openssl = need("openssl")
        _, mode, mx = POLICIES[domain]
        self.root = directory / domain
        (self.root / ".well-known").mkdir(parents=True)
        lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {p}" for p in mx), "max_age: 86400"]
        (self.root / ".well-known" / "mta-sts.txt").write_text("\r\n".join(lines) + "\r\n")
        self.address, self.port = POLICY_HOSTS[domain], port
        self.cert, self.key = cert, key
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.openssl, "s_server", "-accept", f"{self.address}:{self.port}",
             "-cert", str(self.cert), "-key", str(self.key), "-WWW", "-quiet"],
            cwd=self.root, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        wait_for(f"openssl s_server on {self.address}:{self.port}",
                 lambda: accepts(self.address, self.port))

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None


def free_port_everywhere(addresses: list[str]) -> int:
    import socket
    for _ in range(50):
        port = free_port()
        try:
            for address in addresses:
                with socket.socket() as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    s.bind((address, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port")


# -- the world: CA, DNS, policy servers, receivers ------------------------------------------

class World:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca = TestCA(root / "ca")
        self.smtp_port = free_port_everywhere([GOOD_MX, BAD_MX])
        self.https_port = free_port_everywhere(list(POLICY_HOSTS.values()))
        self.https_cert = self.ca.issue("policy-hosts", *(f"mta-sts.{d}" for d in POLICIES))
        self.dns = LoopbackDNS(root, zone())
        self.policy_servers: dict[str, PolicyServer] = {}
        self.receivers: dict[str, MtaServer] = {}

    def serve_policy(self, domain: str) -> PolicyServer:
        server = PolicyServer(self.root / "policies", domain, self.https_port,
                              *self.https_cert)
        self.policy_servers[domain] = server
        return server

    def receiver(self, name: str, address: str, *names: str) -> MtaServer:
        cert, key = self.ca.issue(name, *names)
        maildirs = self.root / name / "mail"
        domains = "".join(f'[domains."{d}"]\nroute = "maildir:{maildirs / d}"\n'
                          f'users = ["bob"]\n' for d in DOMAINS)
        config = f"""
[server]
hostname = "{names[0]}"
spool = "spool"

[[listeners]]
endpoint = "tcp:{{port}}:interface=127.0.0.1"

[[listeners]]
endpoint = "tcp:{self.smtp_port}:interface={address}"
tls = "starttls"

[tls]
certificate = "{cert}"
key = "{key}"

[relay]
mynetworks = ["127.0.0.0/8"]
nameservers = ["127.0.0.1:9"]

{domains}"""
        server = MtaServer(self.root / name, config).start()
        self.receivers[name] = server
        return server

    def arrived(self, receiver: str, domain: str) -> list[str]:
        new = self.root / receiver / "mail" / domain / "bob" / "new"
        return [p.read_text(errors="replace") for p in sorted(new.iterdir())] \
            if new.is_dir() else []

    def stop(self) -> None:
        for server in self.receivers.values():
            server.stop()
        for policy in self.policy_servers.values():
            policy.stop()
        self.dns.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    need("openssl")
    world = World(tmp_path_factory.mktemp("sts"))
    try:
        for domain in ("enforce.test", "unlisted.test", "badcert.test", "testing.test"):
            world.serve_policy(domain)
        world.receiver("good", GOOD_MX, *[n for n, a in MX_HOSTS.items() if a == GOOD_MX])
        world.receiver("bad", BAD_MX, "wrong.example")
        yield world
    finally:
        world.stop()


@pytest.fixture
def sender(start_mta: Callable[..., MtaServer], world: World) -> Callable[..., MtaServer]:
    """sender(extra="", dns_port=None, name="sender"): an mta that sends by MX."""

    def start(extra: str = "", dns_port: int | None = None, name: str = "sender") -> MtaServer:
        config = f"""
[server]
hostname = "sender.test"
spool = "spool"

[[listeners]]
endpoint = "tcp:{{port}}:interface=127.0.0.1"

[relay]
nameservers = ["127.0.0.1:{dns_port or world.dns.port}"]
smtp_port = {world.smtp_port}
mta_sts_port = {world.https_port}
tls_ca_file = "{world.ca.path}"
dns_timeout = "2s"
connect_timeout = "2s"
retry_min = "1h"
retry_max = "1h"
{extra}
"""
        return start_mta(config=config, name=name)
    return start


def send(mta: MtaServer, recipient: str, subject: str) -> None:
    message = (f"From: alice@sender.test\r\nTo: {recipient}\r\nSubject: {subject}\r\n"
               f"Message-ID: <{subject.replace(' ', '.')}@sender.test>\r\n\r\nHello.\r\n")
    with smtplib.SMTP("127.0.0.1", mta.port, timeout=10) as client:
        client.sendmail("alice@sender.test", [recipient], message.encode())


def line_with(mta: MtaServer, *parts: str) -> str:
    """The first log line holding every one of `parts` (waited for)."""
    def find() -> str | None:
        return next((line for line in mta.log_text().splitlines()
                     if all(p in line for p in parts)), None)
    return wait_for(f"a log line with {parts}", find)


def queue_show(mta: MtaServer, *args: str) -> str:
    done = subprocess.run([str(MTA_COMMAND), "queue", *args, "--config", str(mta.config_path)],
                          cwd=mta.directory, env=source_env(), capture_output=True,
                          timeout=30, check=True)
    return done.stdout.decode()


# -- the tests -------------------------------------------------------------------------------

def test_enforce_delivers_to_an_mx_in_the_policy_over_verified_tls(
        world: World, sender: Callable[..., MtaServer]) -> None:
    mta = sender()
    send(mta, "bob@enforce.test", "sts enforce ok")
    line_with(mta, "sts: enforce.test: policy id e1: mode enforce, max_age 86400, "
                   "mx *.enforce.test")
    line_with(mta, "to=<bob@enforce.test>, sts=enforce, domain=enforce.test, policy_id=e1, "
                   "mx=mx1.enforce.test[127.0.0.2]: verified")
    line_with(mta, "to=<bob@enforce.test>, relay=mx1.enforce.test[127.0.0.2]", "status=sent")
    (message,) = wait_for("the message at the receiver",
                          lambda: [m for m in world.arrived("good", "enforce.test")
                                   if "Subject: sts enforce ok" in m])
    assert "by mx1.enforce.test (mta) with ESMTPS" in message
    stored = json.loads((mta.directory / "spool" / "sts" / "enforce.test.json").read_text())
    assert (stored["id"], stored["mode"], stored["mx"]) == ("e1", "enforce", ["*.enforce.test"])


def test_enforce_refuses_an_mx_not_in_the_policy(
        world: World, sender: Callable[..., MtaServer]) -> None:
    mta = sender()
    send(mta, "bob@unlisted.test", "sts unlisted")
    line_with(mta, "to=<bob@unlisted.test>, sts=enforce, domain=unlisted.test, policy_id=u1, "
                   "mx=mx.unlisted.test: refused (MX host not in the policy's mx patterns)")
    reason = ("MTA-STS policy of unlisted.test (mode enforce, id u1) refused "
              "mx.unlisted.test: MX host not in the policy's mx patterns")
    line_with(mta, "to=<bob@unlisted.test>, relay=none", "dsn=4.7.5, status=deferred",
              reason)
    (queue_id,) = mta.spool.queue_ids()
    shown = queue_show(mta, "show", queue_id)
    assert reason in shown and '"status": "4.7.5"' in shown
    assert reason in queue_show(mta, "list")
    # The receiver (with a certificate for that name) never saw it.
    assert not any("sts unlisted" in m for m in world.arrived("good", "unlisted.test"))


def test_enforce_refuses_a_certificate_for_another_name(
        world: World, sender: Callable[..., MtaServer]) -> None:
    mta = sender()
    send(mta, "bob@badcert.test", "sts badcert")
    why = "TLS handshake with mx.badcert.test failed: certificate does not name mx.badcert.test"
    line_with(mta, "sts=enforce, domain=badcert.test, policy_id=b1, "
                   f"mx=mx.badcert.test[127.0.0.3]: refused ({why})")
    line_with(mta, "to=<bob@badcert.test>", "dsn=4.7.5, status=deferred",
              f"MTA-STS policy of badcert.test (mode enforce, id b1) refused "
              f"mx.badcert.test[127.0.0.3]: {why}")
    assert world.arrived("bad", "badcert.test") == []


def test_testing_delivers_to_that_certificate_and_logs_what_enforce_would_refuse(
        world: World, sender: Callable[..., MtaServer]) -> None:
    mta = sender()
    send(mta, "bob@testing.test", "sts testing")
    line_with(mta, "to=<bob@testing.test>, sts=testing, domain=testing.test, policy_id=t1, "
                   "mx=mx.testing.test[127.0.0.3]: would refuse (certificate does not name "
                   "mx.testing.test)")
    line_with(mta, "to=<bob@testing.test>, relay=mx.testing.test[127.0.0.3]", "status=sent")
    (message,) = wait_for("the message at the receiver",
                          lambda: world.arrived("bad", "testing.test"))
    assert "Subject: sts testing" in message
    assert "with ESMTPS" in message  # encrypted, as opportunistic TLS does


def test_tls_policy_verify_defers_on_a_bad_certificate(
        world: World, sender: Callable[..., MtaServer]) -> None:
    mta = sender('[tls_policy]\n"plain.test" = "verify"')
    send(mta, "bob@plain.test", "policy verify")
    line_with(mta, "to=<bob@plain.test>, relay=mx.plain.test[127.0.0.3]", "dsn=4.7.5",
              "status=deferred", "TLS handshake with mx.plain.test failed: certificate does "
              "not name mx.plain.test")
    assert world.arrived("bad", "plain.test") == []
    assert "sts=" not in mta.log_text()  # no MTA-STS: the domain publishes none


def test_tls_policy_none_overrides_mta_sts_and_sends_in_plain_text(
        world: World, sender: Callable[..., MtaServer]) -> None:
    mta = sender('[tls_policy]\n"badcert.test" = "none"')
    send(mta, "bob@badcert.test", "policy none")
    line_with(mta, "to=<bob@badcert.test>, relay=mx.badcert.test[127.0.0.3]", "status=sent")
    (message,) = wait_for("the message at the receiver",
                          lambda: [m for m in world.arrived("bad", "badcert.test")
                                   if "Subject: policy none" in m])
    assert "by wrong.example (mta) with ESMTP id" in message  # no S: no TLS
    assert "sts=" not in mta.log_text()
    assert not (mta.directory / "spool" / "sts").exists()  # not even looked up


def test_the_cached_policy_survives_a_restart_without_its_policy_host(
        world: World, sender: Callable[..., MtaServer], tmp_path: Path) -> None:
    dns = LoopbackDNS(tmp_path, zone())
    policy_host = world.serve_policy("cached.test")
    try:
        mta = sender(dns_port=dns.port)
        send(mta, "bob@cached.test", "cached one")
        line_with(mta, "sts=enforce, domain=cached.test, policy_id=c1, "
                       "mx=mx.cached.test[127.0.0.2]: verified")
        line_with(mta, "to=<bob@cached.test>", "status=sent")
        mta.stop()
        # The policy host goes away, the domain moves its MX to a host the policy does not
        # name (whose certificate is good) and announces a new policy id.
        policy_host.stop()
        dns.update(zone(**{"cached.test": {"MX": [[10, "mx.moved.cached.test"]]},
                           "_mta-sts.cached.test": {"TXT": ["v=STSv1; id=c2"]}}))
        mta.start()
        send(mta, "bob@cached.test", "cached two")
        line_with(mta, "sts: cached.test: cannot fetch policy id c2 from "
                       f"https://mta-sts.cached.test:{world.https_port}/.well-known/mta-sts.txt"
                       ": cannot connect to mta-sts.cached.test: 127.0.0.24: connection refused"
                       "; keeping policy id c1 (mode enforce) until it expires")
        line_with(mta, "to=<bob@cached.test>, sts=enforce, domain=cached.test, policy_id=c1, "
                       "mx=mx.moved.cached.test: refused (MX host not in the policy's mx "
                       "patterns)")
        line_with(mta, "to=<bob@cached.test>, relay=none", "status=deferred")
        assert [m for m in world.arrived("good", "cached.test") if "cached two" in m] == []
        # The spool's recovery and `mta queue` leave the policy cache alone.
        assert (mta.directory / "spool" / "sts" / "cached.test.json").is_file()
        listing = queue_show(mta, "list")
        assert "-- 1 message(s)" in listing and "<bob@cached.test>" in listing
        assert len(mta.log_text().split("cannot fetch policy id c2")) == 2  # logged once
    finally:
        policy_host.stop()
        dns.stop()


def test_without_mta_sts_the_policy_is_not_asked_for(
        world: World, sender: Callable[..., MtaServer]) -> None:
    mta = sender("mta_sts = false", name="no-sts")
    send(mta, "bob@unlisted.test", "sts off")
    line_with(mta, "to=<bob@unlisted.test>, relay=mx.unlisted.test[127.0.0.2]", "status=sent")
    assert "sts=" not in mta.log_text() and "sts: " not in mta.log_text()
    assert not (mta.directory / "spool" / "sts").exists()
