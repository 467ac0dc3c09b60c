"""Which mail the session signs (signing.py, session.py), and that nothing is read back
for mail it does not sign: trusted sources only, by the From: (or envelope sender's)
domain and its parents, not for mail that stays here; BDAT as DATA; failures logged."""

from __future__ import annotations

import re
from pathlib import Path

import dkim
import pytest
from twisted.logger import formatEvent, globalLogPublisher

from mta import signing, tls
from mta.server import auth
from mta.server.local import LOCAL_LISTENER, LocalUser
from mta.server.session import Session
from mta.spool.store import Incoming
from tests.protocol.dialog import Server
from tests.protocol.test_auth_tls import PASSWORD, Peer, plain

SIGNED = (b"From: Alice <alice@example.test>\r\nTo: bob@remote.test\r\n"
          b"Subject: hello\r\n\r\nbody\r\n")


@pytest.fixture(scope="module")
def keydir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("keys")
    for name, kind in (("rsa.key", "rsa"), ("ed.key", "ed25519")):
        (root / name).write_bytes(signing.generate(kind, 1024)[1])
        (root / name).chmod(0o600)
    tls.make_cert(root / "cert.pem", root / "key.pem", "mx.test")
    auth.set_password(root / "passwords", "alice", PASSWORD)
    return root


def dkim_sections(keydir: Path, tmp_path: Path, **relay) -> dict:
    return {
        "dkim": {"example.test": {"selector": "s1", "key": str(keydir / "rsa.key"),
                                  "ed25519_selector": "e1",
                                  "ed25519_key": str(keydir / "ed.key")}},
        "domains": {"example.org": {"route": f"maildir:{tmp_path / 'mail'}",
                                    "users": ["alice", "bob"]},
                    "relayed.test": {"route": "smtp:[192.0.2.25]:25"}},
        "relay": {"mynetworks": ["127.0.0.0/8"], **relay},
    }


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Queue ids of the messages read back before their commit."""
    calls: list[str] = []
    original = Incoming.read_data

    def read_data(self: Incoming) -> bytes:
        calls.append(self.queue_id)
        return original(self)
    monkeypatch.setattr(Incoming, "read_data", read_data)
    return calls


@pytest.fixture
def logged():
    lines: list[str] = []

    def observer(event: dict) -> None:
        lines.append(formatEvent(event))
    globalLogPublisher.addObserver(observer)
    yield lines
    globalLogPublisher.removeObserver(observer)


def send(server: Server, message: bytes, sender: str = "alice@example.test",
         recipients: tuple[str, ...] = ("bob@remote.test",), bdat: bool = False) -> bytes:
    """One transaction; the stored message."""
    server.send("EHLO client.test\r\n")
    commands = f"MAIL FROM:<{sender}>\r\n" + "".join(f"RCPT TO:<{r}>\r\n" for r in recipients)
    if bdat:
        codes = server.codes(commands.encode() + b"BDAT %d LAST\r\n" % len(message) + message)
    else:
        assert server.codes(commands + "DATA\r\n")[-1] == "354"
        codes = server.codes(message + b".\r\n")
    assert codes[-1] == "250 2.0.0", codes
    return server.queued_data()


def signatures_of(stored: bytes) -> list[dict[str, str]]:
    """The tags of each DKIM-Signature field of a stored message (in order)."""
    head = stored.partition(b"\r\n\r\n")[0]
    found = re.findall(rb"^DKIM-Signature:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", head,
                       re.MULTILINE)
    result = []
    for value in found:
        text = re.sub(rb"\s+", b"", value).decode()
        result.append(dict(item.split("=", 1) for item in text.split(";") if item))
    return result


def verifies(stored: bytes, keydir: Path, index: int) -> bool:
    keys = [signing.load_key(keydir / "rsa.key", "example.test", "s1"),
            signing.load_key(keydir / "ed.key", "example.test", "e1")]
    records = {k.record_name.encode(): k.record.encode() for k in keys}
    return dkim.DKIM(stored).verify(idx=index, dnsfunc=lambda name, timeout=5: records.get(name))


def test_mail_from_mynetworks_is_signed_with_both_keys(tmp_path, keydir, reads, logged) -> None:
    server = Server(tmp_path, **dkim_sections(keydir, tmp_path))
    stored = send(server, SIGNED)
    queue_id = server.queued[-1].queue_id
    assert stored.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; "
                             b"d=example.test;")
    assert [(s["a"], s["s"], s["d"]) for s in signatures_of(stored)] == [
        ("rsa-sha256", "s1", "example.test"), ("ed25519-sha256", "e1", "example.test")]
    assert verifies(stored, keydir, 0) and verifies(stored, keydir, 1)
    assert reads == [queue_id]
    assert f"{queue_id}: dkim=signed d=example.test s=s1 a=rsa-sha256" in logged
    assert f"{queue_id}: dkim=signed d=example.test s=e1 a=ed25519-sha256" in logged
    # The received line comes first, then one line per signature.
    mine = [line for line in logged if line.startswith(f"{queue_id}: ")]
    assert mine[0].startswith(f"{queue_id}: client=unknown[127.0.0.1]")


def test_bdat_is_signed_like_data(tmp_path, keydir) -> None:
    server = Server(tmp_path, **dkim_sections(keydir, tmp_path))
    stored = send(server, SIGNED, bdat=True)
    assert len(signatures_of(stored)) == 2 and verifies(stored, keydir, 0)


def test_mail_from_outside_is_not_signed_nor_read_back(tmp_path, keydir, reads) -> None:
    # 192.0.2.7 is outside mynetworks: it may send to relayed.test (a domain we take
    # mail for), but it is not ours to vouch for, whatever its From: says.
    sections = dkim_sections(keydir, tmp_path)
    trusted = Server(tmp_path, **sections)
    assert signatures_of(send(trusted, SIGNED, recipients=("bob@relayed.test",)))
    reads.clear()
    outside = Server(tmp_path, client="192.0.2.7", **sections)
    stored = send(outside, SIGNED, recipients=("bob@relayed.test",))
    assert b"DKIM-Signature" not in stored and reads == []


def test_mail_that_stays_here_is_not_signed(tmp_path, keydir, reads) -> None:
    server = Server(tmp_path, **dkim_sections(keydir, tmp_path))
    stored = send(server, SIGNED, recipients=("alice@example.org", "bob@example.org"))
    assert b"DKIM-Signature" not in stored and reads == []
    # One recipient elsewhere is enough.
    stored = send(server, SIGNED, recipients=("alice@example.org", "bob@remote.test"))
    assert len(signatures_of(stored)) == 2


@pytest.mark.parametrize("author", [b"someone@nokey.test", b"a@example.test, b@other.test",
                                    b"undisclosed-recipients:;"])
def test_a_from_domain_without_a_key_is_not_signed_nor_read_back(
        tmp_path, keydir, reads, author: bytes) -> None:
    server = Server(tmp_path, **dkim_sections(keydir, tmp_path))
    stored = send(server, SIGNED.replace(b"Alice <alice@example.test>", author))
    assert b"DKIM-Signature" not in stored and reads == []


def test_a_subdomain_is_signed_by_its_parent_domain_key(tmp_path, keydir) -> None:
    server = Server(tmp_path, **dkim_sections(keydir, tmp_path))
    message = SIGNED.replace(b"From: Alice <alice@example.test>",
                             b"From:\r\n Alice\r\n\t<alice@Lists.Example.TEST>")  # folded
    stored = send(server, message)
    assert [s["d"] for s in signatures_of(stored)] == ["example.test", "example.test"]
    assert verifies(stored, keydir, 0)


def test_the_envelope_sender_may_choose_the_key(tmp_path, keydir, reads) -> None:
    server = Server(tmp_path, **dkim_sections(keydir, tmp_path, dkim_domain="sender"))
    forwarded = SIGNED.replace(b"alice@example.test", b"alice@elsewhere.test")
    stored = send(server, forwarded, sender="bounces@example.test")
    assert [s["d"] for s in signatures_of(stored)] == ["example.test", "example.test"]
    reads.clear()
    stored = send(server, SIGNED, sender="alice@elsewhere.test")
    assert b"DKIM-Signature" not in stored and reads == []


def test_a_bare_submission_is_signed_for_the_from_we_add(tmp_path, keydir) -> None:
    sections = dkim_sections(keydir, tmp_path)
    peer = Peer.start(tmp_path, keydir, listeners=[
        {"endpoint": "tcp:0", "role": "submission", "tls": "starttls"}], **sections).greeted()
    assert peer.codes(f"AUTH PLAIN {plain()}\r\n") == ["235 2.7.0"]
    stored = send(peer, b"Subject: bare\r\n\r\nbody\r\n")
    assert b"\r\nFrom: <alice@example.test>\r\n" in stored  # RFC 6409 8
    assert [s["s"] for s in signatures_of(stored)] == ["s1", "e1"]
    assert verifies(stored, keydir, 0)


def test_a_local_users_sendmail_is_signed(tmp_path, keydir) -> None:
    sections = dkim_sections(keydir, tmp_path)
    sections["relay"]["mynetworks"] = []
    server = Server(tmp_path, **sections)
    context = server.factory.context
    context.listener = LOCAL_LISTENER
    server.protocol.session = Session(context, "unix", local_user=LocalUser(1000, "alice"))
    server.take()
    stored = send(server, SIGNED)
    assert len(signatures_of(stored)) == 2 and verifies(stored, keydir, 1)


def test_a_message_that_cannot_be_signed_is_accepted_unsigned_and_logged(
        tmp_path, keydir, logged) -> None:
    # With dkim_domain = "sender" a message without From: still has a signing domain;
    # DKIM cannot sign it (RFC 6376 5.4): it goes on unsigned, and the log says why.
    server = Server(tmp_path, **dkim_sections(keydir, tmp_path, dkim_domain="sender"))
    stored = send(server, b"Subject: no author\r\n\r\nbody\r\n")
    queue_id = server.queued[-1].queue_id
    assert b"DKIM-Signature" not in stored
    assert (f"{queue_id}: dkim=error d=example.test: no From: header field (RFC 6376 5.4 "
            f"requires signing it); sent unsigned") in logged


def test_without_dkim_config_nothing_is_read_back(tmp_path, reads) -> None:
    server = Server(tmp_path)
    stored = send(server, SIGNED)
    assert b"DKIM-Signature" not in stored and reads == []
