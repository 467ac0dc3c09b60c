"""`mta records`: what it tells an operator to publish parses as the checkers read it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mta import publish, signing
from mta.checks import dmarc
from mta.config import from_dict
from mta.delivery import mta_sts

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def config(tmp_path: Path):
    key = tmp_path / "s1.key"
    key.write_bytes(signing.generate("rsa", 1024)[1])
    os.chmod(key, 0o600)
    return from_dict({
        "server": {"hostname": "mx.example.org", "spool": str(tmp_path / "spool")},
        "domains": {"example.org": {"route": f"maildir:{tmp_path / 'mail'}", "users": ["a"]},
                    "held.example": {"route": "hold"}},
        "dkim": {"example.org": {"selector": "s1", "key": str(key)}},
    })


def txt(text: str, name: str) -> str:
    """The value of the TXT record `name` in zone-file text (strings joined)."""
    match = re.search(rf"^{re.escape(name)}\s+(?:IN\s+)?TXT\s+(\(.*?\)|\".*?\")", text,
                      re.MULTILINE | re.DOTALL)
    assert match, f"no TXT record {name} in:\n{text}"
    return "".join(re.findall(r'"([^"]*)"', match.group(1)))


def test_the_records_are_what_receivers_and_senders_parse(config) -> None:
    text = publish.records(config, "example.org")
    assert re.search(r"^example\.org\.\s+MX\s+10 mx\.example\.org\.$", text, re.MULTILINE)
    assert txt(text, "example.org.") == "v=spf1 mx -all"
    assert txt(text, "mx.example.org.") == "v=spf1 a -all"
    [key] = config.dkim["example.org"].keys
    assert txt(text, "s1._domainkey.example.org.") == key.record
    assert dmarc.parse_record(txt(text, "_dmarc.example.org.")).p == "none"
    policy_id = mta_sts.parse_txt([txt(text, "_mta-sts.example.org.")])
    served = "\r\n".join(line[4:] for line in text.splitlines() if line.startswith(";   "))
    policy = mta_sts.parse_policy(served + "\r\n")
    assert (policy.mode, policy.mx, policy.max_age) == ("testing", ("mx.example.org",), 604800)
    assert policy_id == publish.sts_id(publish.sts_policy(config, "testing"))


def test_the_policy_id_changes_with_the_policy_only(config) -> None:
    testing = publish.sts_id(publish.sts_policy(config, "testing"))
    assert testing == publish.sts_id(publish.sts_policy(config, "testing"))
    enforce = publish.records(config, "example.org", dmarc="reject", sts_mode="enforce")
    assert mta_sts.parse_txt([txt(enforce, "_mta-sts.example.org.")]) != testing
    assert dmarc.parse_record(txt(enforce, "_dmarc.example.org.")).p == "reject"


def test_a_domain_without_a_key_is_told_how_to_make_one(config) -> None:
    text = publish.records(config, "other.example")
    assert "mta dkim keygen other.example s1" in text
    assert "_domainkey" not in text
    sub = publish.records(config, "lists.example.org")  # signed with the parent's keys
    assert "signed with d=example.org's keys" in sub


def test_the_command(config, tmp_path: Path) -> None:
    toml = tmp_path / "mta.toml"
    toml.write_text(f'[server]\nhostname = "mx.example.org"\nspool = "{tmp_path}/spool"\n'
                    f'[domains."example.org"]\nroute = "maildir:{tmp_path}/mail"\n'
                    f'users = ["a"]\n[domains."held.example"]\nroute = "hold"\n')
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "mta.cli", "--config", str(toml), "records"],
                         capture_output=True, text=True, env=env, check=True)
    assert "; example.org: the records to publish" in run.stdout
    assert "held.example" not in run.stdout  # a customer's domain publishes its own
    run = subprocess.run([sys.executable, "-m", "mta.cli", "--config", str(toml), "records",
                          "bad..name"], capture_output=True, text=True, env=env, check=False)
    assert run.returncode == 2 and "not a valid domain name" in run.stderr


def test_a_domain_this_server_only_signs_for_keeps_its_own_mx(tmp_path: Path) -> None:
    """A domain whose mail leaves through us but is received elsewhere (a LAN's smart
    host signing for it): an MX or an MTA-STS policy naming our host would send the
    domain's incoming mail here, where nobody takes it."""
    key = tmp_path / "s1.key"
    key.write_bytes(signing.generate("ed25519")[1])
    os.chmod(key, 0o600)
    config = from_dict({"server": {"hostname": "relay.example.org"},
                        "dkim": {"lan.example": {"selector": "s1", "key": str(key)}}})
    text = publish.records(config, "lan.example")
    assert not re.search(r"^lan\.example\.\s+MX", text, re.MULTILINE)
    assert "its mail is received elsewhere" in text
    assert txt(text, "lan.example.") == "v=spf1 a:relay.example.org -all"
    assert "_mta-sts" not in text and "mta-sts.txt" not in text
    [signing_key] = config.dkim["lan.example"].keys
    assert txt(text, "s1._domainkey.lan.example.") == signing_key.record
    assert dmarc.parse_record(txt(text, "_dmarc.lan.example.")).p == "none"
