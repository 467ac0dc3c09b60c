"""What the mail-authentication tests share: a loopback DNS with a query log, and
DKIM keys and signatures made with dkimpy.

`LoopbackDNS` runs tests/dnsserver.py as a process on a free loopback port
with ``--log``: `queries()` is every lookup it answered (or left
unanswered), so a test can prove which lookups were made, and that none
were.  `update(zone)` rewrites the zone and waits until the server serves it.

`dkim_key()` makes an RSA key pair: the private key (PEM) and the TXT
record to publish at ``SELECTOR._domainkey.DOMAIN``; `sign()` signs a
message with it, as a sending domain's MTA would.
"""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import dkim
import dns.resolver
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mta.resolver import make_resolver

REPO = Path(__file__).resolve().parents[1]
_VERSION = "zone-version.test"


class LoopbackDNS:
    def __init__(self, directory: Path, zone: dict[str, Any]) -> None:
        self.zone_file = directory / "zone.json"
        self.log_file = directory / "queries.log"
        self.version = 0
        self._write(zone)
        self.process = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "dnsserver.py"), str(self.zone_file),
             "--log", str(self.log_file)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        line = self.process.stdout.readline() if self.process.stdout else b""
        if not line.strip().isdigit():
            self.stop()
            raise RuntimeError("the test DNS server did not start")
        self.port = int(line)

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"

    def resolver(self, timeout: float = 2.0) -> dns.resolver.Resolver:
        return make_resolver([("127.0.0.1", self.port)], timeout)

    def _write(self, zone: dict[str, Any]) -> None:
        self.version += 1
        zone = dict(zone, **{_VERSION: {"TXT": [str(self.version)]}})
        self.zone_file.write_text(json.dumps(zone))

    def update(self, zone: dict[str, Any]) -> None:
        """Serve `zone` from now on (SIGHUP), and wait until the server does."""
        self._write(zone)
        self.process.send_signal(signal.SIGHUP)
        resolver = self.resolver()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            answer = resolver.resolve(_VERSION, "TXT", raise_on_no_answer=False)
            if [b"".join(r.strings).decode() for r in answer] == [str(self.version)]:
                return
            time.sleep(0.05)
        raise AssertionError("the test DNS server did not take the new zone")

    def queries(self) -> list[str]:
        """Every query so far, "name TYPE", without our own zone-version probes."""
        if not self.log_file.exists():
            return []
        return [q for q in self.log_file.read_text().splitlines()
                if not q.startswith(_VERSION)]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def dkim_key(bits: int = 2048) -> tuple[bytes, str]:
    """(private key PEM, the TXT record that publishes its public half)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    private = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, f"v=DKIM1; k=rsa; p={base64.b64encode(public).decode()}"


def sign(message: bytes, domain: str, selector: str, private: bytes) -> bytes:
    """`message` with a DKIM-Signature field in front (relaxed/relaxed, From signed)."""
    signature = dkim.sign(message, selector.encode(), domain.encode(), private,
                          canonicalize=(b"relaxed", b"relaxed"),
                          include_headers=[b"from", b"to", b"subject", b"date",
                                           b"message-id"])
    return signature + message
