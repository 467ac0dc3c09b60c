"""Submitted mail is completed (RFC 6409 8); port-25 mail from outside is stored as it came.
Local `sendmail` sessions (SO_PEERCRED) are trusted, named and completed too."""

from __future__ import annotations

import pytest

from mta import tls
from mta.server import auth
from mta.server.local import LOCAL_LISTENER, LocalUser
from mta.server.session import Session
from tests.protocol.dialog import Server, body_of
from tests.protocol.test_auth_tls import PASSWORD, Peer, plain

BARE = b"Subject: bare\r\n\r\nbody\r\n.\r\n"
COMPLETE = (b"From: a@example.org\r\nDate: Mon, 1 Dec 2025 10:00:00 +0000\r\n"
            b"Message-ID: <x@example.org>\r\nSubject: full\r\n\r\nbody\r\n.\r\n")


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    tls.make_cert(root / "cert.pem", root / "key.pem", "mx.test")
    auth.set_password(root / "passwords", "alice", PASSWORD)
    return root


def head_of(stored: bytes) -> bytes:
    return body_of(stored).partition(b"\r\n\r\n")[0]


def submit(peer, data: bytes, sender: str = "alice@example.org") -> bytes:
    codes = peer.codes(f"MAIL FROM:<{sender}>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n")
    assert codes[-1] == "354"
    assert peer.codes(data)[-1] == "250 2.0.0"
    return peer.queued_data()


def test_port_25_mail_from_outside_is_stored_as_it_came(tmp_path):
    server = Server(tmp_path)
    server.send("EHLO client.test\r\n")
    stored = submit(server, BARE)
    assert body_of(stored) == b"Subject: bare\r\n\r\nbody\r\n"


def test_submission_listener_completes_a_bare_message(tmp_path, keys):
    peer = Peer.start(tmp_path, keys, listeners=[
        {"endpoint": "tcp:0", "role": "submission", "tls": "starttls"}]).greeted()
    assert peer.codes(f"AUTH PLAIN {plain()}\r\n") == ["235 2.7.0"]
    stored = submit(peer, BARE)
    queue_id = peer.queued[-1].queue_id
    head = head_of(stored)
    assert head.startswith(b"Subject: bare\r\nDate: ")  # added at the end of the header
    assert f"\r\nMessage-ID: <{queue_id}@mx.test>\r\n".encode() in head + b"\r\n"
    assert head.endswith(b"\r\nFrom: <alice@example.org>")
    assert stored.endswith(b"\r\n\r\nbody\r\n")


def test_authenticated_session_on_port_25_completes_but_keeps_what_is_there(tmp_path, keys):
    peer = Peer.start(tmp_path, keys).greeted()
    assert peer.codes(f"AUTH PLAIN {plain()}\r\n") == ["235 2.7.0"]
    stored = submit(peer, COMPLETE)
    assert body_of(stored) == COMPLETE[:-3]
    # Only the missing one is added.
    stored = submit(peer, b"From: a@example.org\r\nSubject: s\r\n\r\nb\r\n.\r\n")
    head = head_of(stored)
    assert head.count(b"From:") == 1 and b"Date: " in head and b"Message-ID: " in head


def test_text_without_a_header_section_becomes_the_body(tmp_path, keys):
    peer = Peer.start(tmp_path, keys).greeted()
    assert peer.codes(f"AUTH PLAIN {plain()}\r\n") == ["235 2.7.0"]
    stored = submit(peer, b"just a line of text\r\nand another\r\n.\r\n", sender="")
    head, _, body = body_of(stored).partition(b"\r\n\r\n")
    assert body == b"just a line of text\r\nand another\r\n"
    # The null sender: From: names the authenticated user, qualified with our hostname.
    assert head.startswith(b"Date: ") and head.endswith(b"From: <alice@mx.test>")


def test_headers_only_message_gets_fields_at_the_end_with_bdat(tmp_path, keys):
    peer = Peer.start(tmp_path, keys).greeted()
    assert peer.codes(f"AUTH PLAIN {plain()}\r\n") == ["235 2.7.0"]
    peer.codes("MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\n")
    # Chunks cut inside a header line and inside its CRLF.
    assert peer.codes("BDAT 10\r\nSubject: s") == ["250 2.0.0"]
    assert peer.codes("BDAT 16\r\nplit\r\nTo: b@c.d\r") == ["250 2.0.0"]
    assert peer.codes("BDAT 1 LAST\r\n\n") == ["250 2.0.0"]
    head = body_of(peer.queued_data())
    assert head.startswith(b"Subject: split\r\nTo: b@c.d\r\nDate: ")
    assert head.endswith(b"From: <alice@example.org>\r\n")


def test_size_limit_counts_the_clients_octets_only(tmp_path, keys):
    body = b"Subject: s\r\n\r\n" + b"x" * 80 + b"\r\n"
    peer = Peer.start(tmp_path, keys, limits={"message_size": len(body), "greeting_delay": 0})
    peer.greeted()
    assert peer.codes(f"AUTH PLAIN {plain()}\r\n") == ["235 2.7.0"]
    submit(peer, body + b".\r\n")  # exactly the limit: accepted although we added fields


def local_server(tmp_path, user: LocalUser | None) -> Server:
    server = Server(tmp_path, relay={"mynetworks": []})
    context = server.factory.context
    context.listener = LOCAL_LISTENER
    server.protocol.session = Session(context, "unix", local_user=user)
    server.take()
    return server


def test_local_user_may_relay_and_is_named(tmp_path):
    server = local_server(tmp_path, LocalUser(1000, "carol"))
    assert server.codes("EHLO localhost\r\n")[-1] == "250"
    assert server.codes("MAIL FROM:<carol@mx.test>\r\nRCPT TO:<x@elsewhere.test>\r\n"
                        "DATA\r\n")[-1] == "354"
    assert server.codes(BARE)[-1] == "250 2.0.0"
    stored = server.queued_data()
    assert stored.startswith(b"Received: by mx.test (mta, from userid 1000 carol)\r\n\tid ")
    assert b"\r\nFrom: <carol@mx.test>\r\n" in stored
    assert server.queued[-1].protocol == "LOCAL"


def test_unix_connection_without_credentials_is_not_trusted(tmp_path):
    server = local_server(tmp_path, None)
    server.send("EHLO localhost\r\n")
    assert server.codes("MAIL FROM:<x@mx.test>\r\nRCPT TO:<x@elsewhere.test>\r\n")[-1] \
        == "554 5.7.1"

