"""RCPT, VRFY and EXPN answered from the user and alias data (aliases.py), and what the
spool keeps of an expansion."""

from __future__ import annotations

from pathlib import Path

from tests.protocol.dialog import Server

EHLO = "EHLO client.test\r\n"
MAIL = "MAIL FROM:<sender@client.test>\r\n"

NO_SUCH_USER = "550 5.1.1"
ALIAS_LOOP = "550 5.4.6"
RELAY_DENIED = "554 5.7.1"
OK = "250 2.1.5"
CANNOT_VRFY = "252 2.5.2"
EXPN_OFF = "502 5.5.1"


def sections(tmp_path: Path, **listener) -> dict:
    (tmp_path / "aliases").write_text(
        "sales: alice, bob, carol@remote.test\nowner-sales: alice\n"
        "loop1: loop2\nloop2: loop1\nfwd: someone@remote.test\n")
    (tmp_path / "system").write_text("root: alice@example.org\n")
    return {
        "server": {"aliases": str(tmp_path / "system")},
        "domains": {"example.org": {"route": f"maildir:{tmp_path / 'mail'}",
                                    "users": ["alice", "bob"],
                                    "aliases": str(tmp_path / "aliases")},
                    "other.org": {"route": f"maildir:{tmp_path / 'other'}", "users": ["alice"]},
                    "fwd.test": {"route": "smtp:[10.0.0.1]:25", "users": ["x"]}},
        "listeners": [{"endpoint": "tcp:25", **listener}],
    }


def greeted(tmp_path: Path, client: str = "127.0.0.1", **listener) -> Server:
    s = Server(tmp_path, client=client, **sections(tmp_path, **listener))
    s.take()
    s.send(EHLO)
    return s


def test_rcpt_answers_from_users_and_aliases(tmp_path: Path) -> None:
    s = greeted(tmp_path, client="192.0.2.9")  # not in mynetworks: no relaying
    s.send(MAIL)
    assert s.codes("RCPT TO:<carol@example.org>\r\n") == [NO_SUCH_USER]
    assert s.codes("RCPT TO:<loop1@example.org>\r\n") == [ALIAS_LOOP]
    assert s.codes("RCPT TO:<y@fwd.test>\r\n") == [NO_SUCH_USER]  # users on an smtp: route
    assert s.codes("RCPT TO:<someone@remote.test>\r\n") == [RELAY_DENIED]
    assert s.codes("RCPT TO:<nobody@mx.test>\r\n") == [NO_SUCH_USER]
    for address in ("sales@example.org", "alice+news@example.org", "x@fwd.test",
                    "postmaster@mx.test", "postmaster@fwd.test", "root@mx.test",
                    "root@localhost", "fwd@example.org"):
        assert s.codes(f"RCPT TO:<{address}>\r\n") == [OK], address


def test_the_envelope_carries_the_expansion(tmp_path: Path) -> None:
    s = greeted(tmp_path)
    s.send(MAIL)
    assert s.codes("RCPT TO:<Sales@example.org> NOTIFY=SUCCESS,FAILURE\r\n"
                   "RCPT TO:<alice@example.org>\r\nRCPT TO:<root@mx.test>\r\n"
                   "RCPT TO:<Postmaster>\r\nDATA\r\n") == [OK] * 4 + ["354"]
    s.send("Subject: x\r\n\r\nx\r\n.\r\n")
    envelope = s.queued[0]
    got = [(r.address, r.sender, r.orcpt, r.notify) for r in envelope.recipients]
    owner = "owner-sales@example.org"
    # Expanded once and de-duplicated: alice is there once, as the list's member;
    # root and <Postmaster> end at the postmaster address of the dialog config.
    assert got == [
        ("alice@example.org", owner, "rfc822;Sales@example.org", None),
        ("bob@example.org", owner, "rfc822;Sales@example.org", None),
        ("carol@remote.test", owner, "rfc822;Sales@example.org", None),
        # SUCCESS was asked for: the list address is kept for an "expanded" report.
        ("Sales@example.org", None, None, ("SUCCESS", "FAILURE")),
        ("postmaster@example.org", None, "rfc822;Postmaster@mx.test", None),
    ]
    assert envelope.recipients[3].state == "delivered"
    # The spool's copy says the same (so a restart does not expand again).
    stored = s.spool.load(envelope.queue_id)
    assert [(r.address, r.sender) for r in stored.recipients] == [g[:2] for g in got]
    # The Received header names no one when several were given.
    assert b"\tfor <" not in s.queued_data()


def test_received_for_names_the_address_given(tmp_path: Path) -> None:
    s = greeted(tmp_path)
    s.send(MAIL + "RCPT TO:<root@mx.test>\r\nDATA\r\n")
    s.send("x\r\n.\r\n")
    assert b"\tfor <root@mx.test>;" in s.queued_data()
    assert [r.address for r in s.queued[0].recipients] == ["alice@example.org"]


def test_a_bounce_to_a_list_stays_a_bounce(tmp_path: Path) -> None:
    s = greeted(tmp_path)
    s.send("MAIL FROM:<>\r\nRCPT TO:<sales@example.org>\r\nDATA\r\n")
    s.send("x\r\n.\r\n")
    assert {r.sender for r in s.queued[0].recipients} == {None}


def test_vrfy_and_expn_off_on_port_25_by_default(tmp_path: Path) -> None:
    s = greeted(tmp_path)
    assert "VRFY" not in s.send(EHLO).decode() and "EXPN" not in s.send(EHLO).decode()
    assert s.codes("VRFY alice@example.org\r\nVRFY carol@example.org\r\n") == [CANNOT_VRFY] * 2
    assert s.codes("EXPN sales@example.org\r\n") == [EXPN_OFF]


def test_vrfy_when_enabled(tmp_path: Path) -> None:
    s = greeted(tmp_path, vrfy=True)
    ehlo = s.send(EHLO).decode()
    assert "250-VRFY\r\n" in ehlo and "EXPN" not in ehlo
    assert s.send("VRFY <alice+x@example.org>\r\n") == b"250 2.1.5 <alice+x@example.org>\r\n"
    assert s.codes("VRFY carol@example.org\r\n") == [NO_SUCH_USER]
    assert s.codes("VRFY loop1@example.org\r\n") == [ALIAS_LOOP]
    assert s.send("VRFY fwd@example.org\r\n") == \
        b"251 2.1.5 user not local; will forward to <someone@remote.test>\r\n"
    assert s.send("VRFY sales@example.org\r\n") == b"250 2.1.5 <sales@example.org>\r\n"
    assert s.codes("VRFY someone@far.test\r\n") == [CANNOT_VRFY]  # not ours to say
    # A bare name: one match is that address, several are 553 with the possibilities.
    assert s.send("VRFY root\r\n") == b"250 2.1.5 <root@mx.test>\r\n"
    assert s.send("VRFY bob\r\n") == b"250 2.1.5 <bob@example.org>\r\n"
    assert s.send("VRFY alice\r\n") == (b"553-5.1.4 user ambiguous; possibilities:\r\n"
                                        b"553-5.1.4 <alice@example.org>\r\n"
                                        b"553 5.1.4 <alice@other.org>\r\n")
    assert s.codes("VRFY nobody\r\n") == [NO_SUCH_USER]
    assert s.codes("VRFY a@@b\r\n") == ["501 5.1.3"]
    assert s.codes("VRFY a\x01b\r\n") == ["501 5.1.3"]  # never echoed back
    assert s.codes("EXPN sales@example.org\r\n") == [EXPN_OFF]


def test_expn_lists_the_members(tmp_path: Path) -> None:
    s = greeted(tmp_path, expn=True)
    assert "250-EXPN\r\n" in s.send(EHLO).decode()
    assert s.send("EXPN sales@example.org\r\n") == (b"250-2.1.5 <alice@example.org>\r\n"
                                                   b"250-2.1.5 <bob@example.org>\r\n"
                                                   b"250 2.1.5 <carol@remote.test>\r\n")
    assert s.send("EXPN alice@example.org\r\n") == b"250 2.1.5 <alice@example.org>\r\n"
    assert s.codes("EXPN nolist@example.org\r\n") == [NO_SUCH_USER]
    assert s.codes("VRFY alice@example.org\r\n") == [CANNOT_VRFY]


def test_vrfy_on_submission_needs_auth_first(tmp_path: Path) -> None:
    (tmp_path / "passwords").write_text("")
    s = Server(tmp_path, **{**sections(tmp_path, role="submission"),
                            "auth": {"passwords": str(tmp_path / "passwords")}})
    s.take()
    s.send(EHLO)
    assert s.codes("VRFY alice@example.org\r\nEXPN sales@example.org\r\n") == \
        ["530 5.7.0", "530 5.7.0"]
