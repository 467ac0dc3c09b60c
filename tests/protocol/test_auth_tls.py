"""STARTTLS, AUTH, listener rules and abuse limits, in memory (DESIGN.md sections 4 and 8).

The transport is a `StringTransport` that records `startTLS` instead of
doing a handshake: what matters here is what the session does around the
switch (the reset of RFC 3207 4.2, the input thrown away at the switch).
The real handshakes are in tests/integration/test_trust.py.  Passwords are
checked synchronously and time comes from a `task.Clock`, so the AUTH
failure delay and the greeting delay are observed without sleeping.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer, task
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher

from mta import config as config_module
from mta import reply, tls
from mta.server import auth
from mta.server.context import ServerContext
from mta.server.protocol import ConnectionTable, SMTPFactory
from mta.server.trust import Trust
from mta.spool.store import Spool
from tests.protocol.dialog import ListQueue, Server, body_of, reply_codes

PASSWORD = "correct horse battery"
EHLO = "EHLO client.test\r\n"
MAIL = "MAIL FROM:<alice@example.org>\r\n"
RCPT = "RCPT TO:<bob@example.org>\r\n"
UNTRUSTED = "198.51.100.7"  # neither loopback nor in mynetworks

TLS_READY = b"220 2.0.0 ready to start TLS\r\n"
AUTH_OK = ["235 2.7.0"]
AUTH_FAILED = ["535 5.7.8"]


class TLSTransport(StringTransport):
    """A StringTransport that can be asked to start TLS; it records when."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tls_context: Any = None
        self.before_tls = b""  # everything written in plain text

    def startTLS(self, contextFactory: Any, normal: bool = True) -> None:
        assert self.tls_context is None, "startTLS twice"
        self.tls_context = contextFactory
        self.before_tls = self.value()


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    """A certificate and a password file: alice can use CRAM-MD5, bob cannot."""
    root = tmp_path_factory.mktemp("keys")
    tls.make_cert(root / "cert.pem", root / "key.pem", "mx.test")
    auth.set_password(root / "passwords", "alice", PASSWORD, cram_md5=True)
    auth.set_password(root / "passwords", "bob", PASSWORD)
    auth.set_password(root / "bob-only", "bob", PASSWORD)
    return root


def build(tmp_path: Path, keys: Path, *, listeners: list[dict] | None = None,
          passwords: str | None = "passwords", **sections: dict) -> dict:
    data: dict[str, Any] = {
        "server": {"hostname": "mx.test", "spool": str(tmp_path / "spool"),
                   "postmaster": "postmaster@example.org"},
        "listeners": listeners or [{"endpoint": "tcp:0", "role": "smtp", "tls": "starttls"}],
        "tls": {"certificate": str(keys / "cert.pem"), "key": str(keys / "key.pem")},
        "auth": {"failure_delay": "0s"},
        "relay": {"mynetworks": ["127.0.0.0/8"]},
        "domains": {"example.org": {"route": f"maildir:{tmp_path / 'mail'}",
                                    "users": ["alice", "bob"]},
                    "example.net": {"route": "hold"}},
        "limits": {"greeting_delay": 0},
    }
    if passwords is not None:
        data["auth"]["passwords"] = str(keys / passwords)
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return data


class Peer(Server):
    """`Server` with STARTTLS and AUTH wired as tap.py wires them."""

    @classmethod
    def start(cls, tmp_path: Path, keys: Path, client: str = "127.0.0.1", listener: int = 0,
              factory: SMTPFactory | None = None, **options: Any) -> Peer:
        if factory is None:
            factory = make_factory(tmp_path, keys, **options)
        peer = cls(tmp_path, client=client, factory=factory, clock=factory.context.trust.reactor,
                   transport_class=TLSTransport)
        peer.queued = factory.queued
        return peer

    @property
    def session(self):
        return self.protocol.session

    def greeted(self) -> Peer:
        self.take()
        self.send(EHLO)
        return self

    def keywords(self, helo: str = EHLO) -> list[str]:
        lines = self.send(helo).decode().split("\r\n")[1:-1]
        return [line[4:] for line in lines]


def make_factory(tmp_path: Path, keys: Path, listener: int = 0,
                 table: ConnectionTable | None = None, **options: Any) -> SMTPFactory:
    config = config_module.from_dict(build(tmp_path, keys, **options), "<test>")
    clock = task.Clock()
    synchronous = lambda f, *a: defer.maybeDeferred(f, *a)
    trust = Trust.from_config(config, clock, run_in_thread=synchronous)
    queued = ListQueue()
    context = ServerContext(config, config.listeners[listener], Spool(config.server.spool),
                            queue=queued, clock=lambda: 1_800_000_000.0,
                            run_blocking=synchronous, trust=trust)
    factory = SMTPFactory(context, table)
    factory.queued = queued
    return factory


def b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def plain(user: str = "alice", password: str = PASSWORD, authzid: str = "") -> str:
    return b64(f"{authzid}\0{user}\0{password}")


def cram_answer(challenge_line: bytes, user: str = "alice", password: str = PASSWORD) -> str:
    assert challenge_line.startswith(b"334 ")
    challenge = base64.b64decode(challenge_line[4:].strip())
    digest = hmac.new(password.encode(), challenge, hashlib.md5).hexdigest()
    return b64(f"{user} {digest}")


def send_message(peer: Peer, sender: str = "alice@example.org") -> list[str]:
    return peer.codes(f"MAIL FROM:<{sender}>\r\n{RCPT}DATA\r\nSubject: t\r\n\r\nhi\r\n.\r\n")


# -- what EHLO offers ------------------------------------------------------------------

def test_starttls_advertised_only_with_certificate_and_listener_tls(tmp_path, keys):
    assert "STARTTLS" in Peer.start(tmp_path, keys).greeted().keywords()
    off = Peer.start(tmp_path / "off", keys,
                     listeners=[{"endpoint": "tcp:0", "role": "smtp", "tls": "off"}])
    assert "STARTTLS" not in off.greeted().keywords()
    s = Peer.start(tmp_path / "s", keys)
    s.greeted()
    assert s.send("STARTTLS\r\n") == TLS_READY
    assert "STARTTLS" not in s.keywords()


def test_no_auth_without_password_file(tmp_path, keys):
    s = Peer.start(tmp_path, keys, passwords=None)
    assert not any(k.startswith("AUTH") for k in s.greeted().keywords())
    assert s.codes("AUTH PLAIN " + plain() + "\r\n") == ["502 5.5.1"]
    # The MAIL parameter belongs to the extension: unknown without it.
    assert s.codes("MAIL FROM:<a@b.test> AUTH=<>\r\n") == ["555 5.5.4"]


@pytest.mark.parametrize(("client", "passwords", "listener", "after_tls", "offered"), [
    # PLAIN and LOGIN carry the password: TLS or loopback only [RFC 4954 4, 14].
    ("127.0.0.1", "passwords", {}, False, "AUTH PLAIN LOGIN CRAM-MD5"),
    (UNTRUSTED, "passwords", {}, False, "AUTH CRAM-MD5"),
    (UNTRUSTED, "passwords", {}, True, "AUTH PLAIN LOGIN CRAM-MD5"),
    # CRAM-MD5 only when some user has a CRAM-MD5 entry.
    (UNTRUSTED, "bob-only", {}, False, None),
    ("127.0.0.1", "bob-only", {}, False, "AUTH PLAIN LOGIN"),
    # The listener may allow plain-text passwords.
    (UNTRUSTED, "bob-only", {"plaintext_auth": True}, False, "AUTH PLAIN LOGIN"),
    # ... and may leave a mechanism out (clients such as curl pick CRAM-MD5
    # when offered, which fails for users without a CRAM-MD5 entry).
    ("127.0.0.1", "passwords", {"auth_mechanisms": ["PLAIN", "LOGIN"]}, False, "AUTH PLAIN LOGIN"),
    (UNTRUSTED, "passwords", {"auth_mechanisms": ["cram-md5"]}, True, "AUTH CRAM-MD5"),
])
def test_mechanisms_offered(tmp_path, keys, client, passwords, listener, after_tls, offered):
    listeners = [{"endpoint": "tcp:0", "role": "smtp", "tls": "starttls", **listener}]
    s = Peer.start(tmp_path, keys, client=client, passwords=passwords, listeners=listeners)
    s.greeted()
    if after_tls:
        assert s.send("STARTTLS\r\n") == TLS_READY
    found = [k for k in s.keywords() if k.startswith("AUTH")]
    assert found == ([offered] if offered else [])


def test_mechanism_left_out_by_the_listener_is_refused(tmp_path, keys):
    listeners = [{"endpoint": "tcp:0", "role": "smtp", "tls": "starttls",
                  "auth_mechanisms": ["PLAIN"]}]
    s = Peer.start(tmp_path, keys, listeners=listeners).greeted()
    assert s.codes("AUTH CRAM-MD5\r\n") == ["504 5.5.4"]
    assert s.codes("AUTH LOGIN\r\n") == ["504 5.5.4"]


def test_helo_offers_nothing_and_auth_needs_ehlo(tmp_path, keys):
    s = Peer.start(tmp_path, keys)
    s.take()
    assert s.send("AUTH PLAIN " + plain() + "\r\n") == \
        b"503 send EHLO first: AUTH is an ESMTP extension\r\n"
    assert s.send("HELO client.test\r\n") == b"250 mx.test hello client.test\r\n"
    assert s.codes("AUTH PLAIN " + plain() + "\r\n") == ["503"]


def test_auth_not_advertised_once_authenticated(tmp_path, keys):
    s = Peer.start(tmp_path, keys).greeted()
    assert s.codes("AUTH PLAIN " + plain() + "\r\n") == AUTH_OK
    assert not any(k.startswith("AUTH") for k in s.keywords())
    # A new EHLO does not forget the authentication [RFC 4954 4].
    assert s.session.authenticated == "alice"


# -- each mechanism --------------------------------------------------------------------

def test_plain_with_initial_response(tmp_path, keys):
    s = Peer.start(tmp_path, keys).greeted()
    assert s.send("AUTH PLAIN " + plain() + "\r\n") == \
        b"235 2.7.0 authentication successful\r\n"
    assert s.session.authenticated == "alice"


def test_plain_without_initial_response(tmp_path, keys):
    s = Peer.start(tmp_path, keys).greeted()
    # RFC 4954 4: an empty challenge is "334 " with its space.
    assert s.send("AUTH PLAIN\r\n") == b"334 \r\n"
    assert s.codes(plain() + "\r\n") == AUTH_OK


def test_plain_with_authzid_of_someone_else_fails(tmp_path, keys):
    s = Peer.start(tmp_path, keys).greeted()
    assert s.codes("AUTH PLAIN " + plain(authzid="bob") + "\r\n") == AUTH_FAILED
    assert s.codes("AUTH PLAIN " + plain(authzid="alice") + "\r\n") == AUTH_OK


def test_login(tmp_path, keys):
    s = Peer.start(tmp_path, keys).greeted()
    assert s.send("AUTH LOGIN\r\n") == b"334 VXNlcm5hbWU6\r\n"
    assert s.send(b64("bob") + "\r\n") == b"334 UGFzc3dvcmQ6\r\n"
    assert s.codes(b64(PASSWORD) + "\r\n") == AUTH_OK
    assert s.session.authenticated == "bob"


def test_login_with_initial_response(tmp_path, keys):
    s = Peer.start(tmp_path, keys).greeted()
    assert s.send("AUTH LOGIN " + b64("bob") + "\r\n") == b"334 UGFzc3dvcmQ6\r\n"
    assert s.codes(b64(PASSWORD) + "\r\n") == AUTH_OK


def test_cram_md5(tmp_path, keys):
    s = Peer.start(tmp_path, keys, client=UNTRUSTED).greeted()
    challenge = s.send("AUTH CRAM-MD5\r\n")
    assert base64.b64decode(challenge[4:]).endswith(b"@mx.test>")
    assert s.codes(cram_answer(challenge) + "\r\n") == AUTH_OK
    assert s.session.authenticated == "alice"


def test_cram_md5_wrong_password_and_user_without_entry(tmp_path, keys):
    s = Peer.start(tmp_path, keys, client=UNTRUSTED).greeted()
    challenge = s.send("AUTH CRAM-MD5\r\n")
    assert s.codes(cram_answer(challenge, password="wrong") + "\r\n") == AUTH_FAILED
    challenge = s.send("AUTH CRAM-MD5\r\n")
    assert s.codes(cram_answer(challenge, user="bob") + "\r\n") == AUTH_FAILED


def test_cram_md5_refuses_initial_response(tmp_path, keys):
    s = Peer.start(tmp_path, keys).greeted()
    assert s.codes("AUTH CRAM-MD5 " + b64("alice 00") + "\r\n") == ["501 5.5.4"]


@pytest.mark.parametrize("start", ["AUTH PLAIN\r\n", "AUTH LOGIN\r\n", "AUTH CRAM-MD5\r\n"])
def test_star_cancels(tmp_path, keys, start):
    s = Peer.start(tmp_path, keys).greeted()
    assert s.send(start).startswith(b"334 ")
    assert s.codes("*\r\n") == ["501 5.0.0"]
    assert s.session.authenticated is None
    # The exchange is over: the next line is a command again.
    assert s.codes("NOOP\r\n") == ["250 2.0.0"]


def test_bad_base64(tmp_path, keys):
    s = Peer.start(tmp_path, keys).greeted()
    assert s.codes("AUTH PLAIN not!base64\r\n") == ["501 5.5.2"]
    assert s.send("AUTH LOGIN\r\n").startswith(b"334 ")
    assert s.codes("%%%\r\n") == ["501 5.5.2"]
    assert s.codes("NOOP\r\n") == ["250 2.0.0"]


def test_malformed_plain_message(tmp_path, keys):
    s = Peer.start(tmp_path, keys).greeted()
    assert s.codes("AUTH PLAIN " + b64("alice:" + PASSWORD) + "\r\n") == ["501 5.5.2"]


def test_unknown_and_refused_mechanisms(tmp_path, keys):
    s = Peer.start(tmp_path, keys, client=UNTRUSTED).greeted()
    assert s.codes("AUTH DIGEST-MD5\r\n") == ["504 5.5.4"]
    # PLAIN without TLS from afar: 538 encryption required [RFC 4954 6].
    assert s.codes("AUTH PLAIN " + plain() + "\r\n") == ["538 5.7.11"]
    assert s.codes("AUTH\r\n") == ["501 5.5.4"]


def test_sasl_lines_up_to_12288_octets(tmp_path, keys):
    s = Peer.start(tmp_path, keys).greeted()
    assert s.send("AUTH LOGIN\r\n").startswith(b"334 ")
    # A long user name is still SASL (not a 500 for a long command line).
    assert s.send(b64("u" * 9000) + "\r\n") == b"334 UGFzc3dvcmQ6\r\n"
    assert s.codes(b64(PASSWORD) + "\r\n") == AUTH_FAILED
    assert s.send("AUTH LOGIN\r\n").startswith(b"334 ")
    assert s.codes("A" * 13000 + "\r\n") == ["500 5.5.6"]
    assert s.codes("NOOP\r\n") == ["250 2.0.0"]


def test_passwords_are_not_logged(tmp_path, keys):
    events: list[str] = []
    observer = lambda event: events.append(formatEvent(event))
    globalLogPublisher.addObserver(observer)
    try:
        s = Peer.start(tmp_path, keys).greeted()
        s.codes("AUTH PLAIN " + plain(password="wrong secret") + "\r\n")
        s.codes("AUTH PLAIN " + plain() + "\r\n")
        s.send("AUTH LOGIN\r\n")
    finally:
        globalLogPublisher.removeObserver(observer)
    text = "\n".join(events)
    assert "user=alice" in text
    for secret in (PASSWORD, "wrong secret", plain(), plain(password="wrong secret")):
        assert secret not in text


# -- failures ----------------------------------------------------------------------------

def test_wrong_password_is_535_after_the_failure_delay(tmp_path, keys):
    s = Peer.start(tmp_path, keys, auth={"failure_delay": "2s"}).greeted()
    assert s.send("AUTH PLAIN " + plain(password="wrong") + "\r\n") == b""
    # Nothing more is read meanwhile: the pipelined NOOP waits its turn.
    assert s.send("NOOP\r\n") == b""
    s.clock.advance(1.9)
    assert s.take() == b""
    s.clock.advance(0.2)
    assert reply_codes(s.take()) == ["535 5.7.8", "250 2.0.0"]
    assert s.session.authenticated is None


def test_too_many_failures_close_the_session(tmp_path, keys):
    s = Peer.start(tmp_path, keys, auth={"max_failures": 2}).greeted()
    assert s.codes("AUTH PLAIN " + plain(password="x") + "\r\n") == AUTH_FAILED
    assert s.send("AUTH PLAIN " + plain(password="y") + "\r\n") == \
        b"421 4.7.0 too many authentication failures, closing connection\r\n"
    assert s.closed


def test_failures_are_counted_per_client_address(tmp_path, keys):
    factory = make_factory(tmp_path, keys, auth={"failures_per_client": 3, "max_failures": 10,
                                                 "failure_window": "10m"})
    first = Peer.start(tmp_path, keys, client=UNTRUSTED, factory=factory).greeted()
    for _ in range(3):
        challenge = first.send("AUTH CRAM-MD5\r\n")
        assert first.codes(cram_answer(challenge, password="guess") + "\r\n") == AUTH_FAILED
    # That address may not even try now, in this session or a new one: 421 and close.
    again = Peer.start(tmp_path, keys, client=UNTRUSTED, factory=factory).greeted()
    assert again.send("AUTH CRAM-MD5\r\n") == (
        b"421 4.7.0 too many authentication failures from your address, try again later\r\n")
    assert again.closed
    # Other addresses are not affected, and mail without AUTH still flows.
    other = Peer.start(tmp_path, keys, client="203.0.113.5", factory=factory).greeted()
    assert other.send("AUTH CRAM-MD5\r\n").startswith(b"334 ")
    third = Peer.start(tmp_path, keys, client=UNTRUSTED, factory=factory).greeted()
    assert send_message(third) == ["250 2.1.0", "250 2.1.5", "354", "250 2.0.0"]
    # After the window the address may try again.
    factory.context.trust.reactor.advance(601)
    later = Peer.start(tmp_path, keys, client=UNTRUSTED, factory=factory).greeted()
    challenge = later.send("AUTH CRAM-MD5\r\n")
    assert later.codes(cram_answer(challenge) + "\r\n") == AUTH_OK


def burst(tmp_path, keys, clients: list[str], **auth_options: Any) -> tuple[list[Peer], list]:
    """Sessions that each send a wrong password at once, while the checks are still running
    (in a thread, in real life): returns the sessions and the checks held back."""
    factory = make_factory(tmp_path, keys, auth={"max_failures": 10, "failure_window": "10m",
                                                 **auth_options})
    held: list = []
    checker = factory.context.trust.checker

    def later(f, *args):
        d = defer.Deferred()
        held.append((d, f, args))
        return d
    checker._run_in_thread = later
    peers = []
    for client in clients:
        peer = Peer.start(tmp_path, keys, client=client, factory=factory).greeted()
        assert peer.send("STARTTLS\r\n") == TLS_READY
        peer.send(EHLO)
        peer.send("AUTH PLAIN " + plain(password="guess") + "\r\n")
        peers.append(peer)
    return peers, held


def test_auth_failures_cannot_be_doubled_in_a_burst(tmp_path, keys):
    # 20 parallel guesses against a limit of 10: each counts from the moment it is made.
    peers, held = burst(tmp_path, keys, [UNTRUSTED] * 20, failures_per_client=10)
    assert len(held) == 10  # only ten guesses reach the password check
    refused = [p for p in peers if p.closed]
    assert len(refused) == 10
    for d, f, args in held:
        d.callback(f(*args))
    assert sum(p.take().startswith(b"535 ") for p in peers) == 10


def test_a_right_password_is_not_counted_as_a_failure(tmp_path, keys):
    factory = make_factory(tmp_path, keys, auth={"failures_per_client": 2,
                                                 "failure_window": "10m"})
    for _ in range(3):
        peer = Peer.start(tmp_path, keys, client=UNTRUSTED, factory=factory).greeted()
        challenge = peer.send("AUTH CRAM-MD5\r\n")
        assert peer.codes(cram_answer(challenge) + "\r\n") == AUTH_OK
    assert factory.context.trust.failures.count(UNTRUSTED) == 0


def test_a_global_ceiling_on_auth_failures(tmp_path, keys):
    # Guesses spread over many addresses meet a ceiling for all untrusted clients together.
    clients = [f"203.0.113.{i}" for i in range(1, 9)]
    peers, held = burst(tmp_path, keys, clients, failures_per_client=5, failures_total=6)
    assert len(held) == 6 and sum(p.closed for p in peers) == 2
    # Clients in mynetworks are not held by it.
    trusted = Peer.start(tmp_path, keys, client="127.0.0.1",
                         factory=peers[0].factory).greeted()
    trusted.send("AUTH PLAIN " + plain() + "\r\n")
    assert len(held) == 7 and not trusted.closed  # its guess is checked


# -- ordering of AUTH and STARTTLS -------------------------------------------------------

def test_auth_twice_and_inside_a_transaction(tmp_path, keys):
    s = Peer.start(tmp_path, keys).greeted()
    s.send("MAIL FROM:<x@client.test>\r\n")
    assert s.send("AUTH PLAIN " + plain() + "\r\n") == \
        b"503 5.5.1 AUTH not permitted during a mail transaction\r\n"
    s.send("RSET\r\n")
    assert s.codes("AUTH PLAIN " + plain() + "\r\n") == AUTH_OK
    assert s.send("AUTH PLAIN " + plain() + "\r\n") == b"503 5.5.1 already authenticated\r\n"


def test_starttls_switches_and_forgets_the_session(tmp_path, keys):
    s = Peer.start(tmp_path, keys).greeted()
    assert s.codes("AUTH PLAIN " + plain() + "\r\n") == AUTH_OK
    assert s.send("STARTTLS\r\n") == TLS_READY
    assert s.transport.tls_context is s.factory.context.trust.tls
    assert s.transport.before_tls.endswith(TLS_READY)  # the 220 went out in plain text
    # RFC 3207 4.2: HELO, AUTH and the transaction are forgotten; EHLO again.
    assert s.session.tls and s.session.authenticated is None and s.session.helo is None
    assert s.codes(MAIL) == ["503"]
    assert "STARTTLS" not in s.keywords()
    assert s.codes("STARTTLS\r\n") == ["503 5.5.1"]
    assert send_message(s) == ["250 2.1.0", "250 2.1.5", "354", "250 2.0.0"]
    assert b"with ESMTPS id" in s.queued_data()


def test_starttls_refusals(tmp_path, keys):
    s = Peer.start(tmp_path, keys).greeted()
    assert s.codes("STARTTLS now\r\n") == ["501 5.5.4"]
    s.send(MAIL)
    assert s.codes("STARTTLS\r\n") == ["503 5.5.1"]
    assert s.transport.tls_context is None
    # Not offered on a listener without TLS: 502, as an unknown extension.
    off = Peer.start(tmp_path / "off", keys,
                     listeners=[{"endpoint": "tcp:0", "role": "smtp", "tls": "off"}]).greeted()
    assert off.codes("STARTTLS\r\n") == ["502 5.5.1"]


def test_starttls_before_ehlo_is_allowed(tmp_path, keys):
    s = Peer.start(tmp_path, keys)
    s.take()
    assert s.send("STARTTLS\r\n") == b"220 ready to start TLS\r\n"
    assert s.transport.tls_context is not None


@pytest.mark.parametrize("injected", [
    "RSET\r\n",
    "MAIL FROM:<evil@attacker.test>\r\n",
    "EHLO evil.test\r\nMAIL FROM:<evil@attacker.test>\r\nRCPT TO:<bob@example.org>\r\n",
    "AUTH PLAIN " + plain() + "\r\n",
    "NOOP",  # a partial line too
])
def test_starttls_injection_is_discarded(tmp_path, keys, injected):
    """CVE-2011-0411: commands sent with STARTTLS, before the handshake, are never run."""
    s = Peer.start(tmp_path, keys).greeted()
    assert s.send("STARTTLS\r\n" + injected) == TLS_READY
    assert s.session.phase.value == "connected" and s.session.authenticated is None
    # After the handshake only what the client sends inside TLS counts.
    out = s.send(EHLO)
    assert out.startswith(b"250-mx.test hello client.test") and reply_codes(out) == ["250"]
    assert s.codes("MAIL FROM:<x@client.test>\r\n") == ["250 2.1.0"]


def test_implicit_tls_listener(tmp_path, keys):
    listeners = [{"endpoint": "tcp:0", "role": "smtps"}]
    s = Peer.start(tmp_path, keys, client=UNTRUSTED, listeners=listeners)
    assert s.factory.context.listener.role == "submission"
    assert s.factory.context.listener.tls == "implicit"
    words = s.greeted().keywords()
    # Already TLS: no STARTTLS, and PLAIN/LOGIN are fine from anywhere.
    assert "STARTTLS" not in words and "AUTH PLAIN LOGIN CRAM-MD5" in words
    assert s.codes("STARTTLS\r\n") == ["503 5.5.1"]
    assert s.codes(MAIL) == ["530 5.7.0"]
    assert s.codes("AUTH PLAIN " + plain() + "\r\n") == AUTH_OK
    assert send_message(s) == ["250 2.1.0", "250 2.1.5", "354", "250 2.0.0"]
    assert b"with ESMTPSA id" in s.queued_data()
    assert s.queued[0].auth_identity == "alice"


# -- listeners and policy -------------------------------------------------------------------

SUBMISSION = [{"endpoint": "tcp:0", "role": "submission", "tls": "starttls"}]


def test_submission_requires_auth_before_mail(tmp_path, keys):
    s = Peer.start(tmp_path, keys, listeners=SUBMISSION).greeted()
    assert s.send(MAIL) == b"530 5.7.0 authentication required\r\n"
    assert s.codes("AUTH PLAIN " + plain() + "\r\n") == AUTH_OK
    # An authenticated user may send anywhere (relaying).
    out = s.codes(MAIL + "RCPT TO:<friend@elsewhere.test>\r\nDATA\r\nhi\r\n.\r\n")
    assert out == ["250 2.1.0", "250 2.1.5", "354", "250 2.0.0"]
    stored = s.queued_data()
    assert b"with ESMTPA id" in stored and b"(authenticated as alice)" in stored
    assert s.queued[0].auth_identity == "alice"


def test_odmr_listener_requires_auth(tmp_path, keys):
    listeners = [{"endpoint": "tcp:0", "role": "odmr"}]
    s = Peer.start(tmp_path, keys, listeners=listeners).greeted()
    assert s.codes(MAIL) == ["530 5.7.0"]


def test_smtp_listener_relay_rules(tmp_path, keys):
    s = Peer.start(tmp_path, keys, client=UNTRUSTED).greeted()
    s.send("MAIL FROM:<x@client.test>\r\n")
    assert s.codes("RCPT TO:<a@elsewhere.test>\r\n") == ["554 5.7.1"]
    assert s.codes(RCPT) == ["250 2.1.5"]  # our domains: from anyone
    s.send("RSET\r\n")
    challenge = s.send("AUTH CRAM-MD5\r\n")
    assert s.codes(cram_answer(challenge) + "\r\n") == AUTH_OK
    s.send("MAIL FROM:<alice@example.org>\r\n")
    assert s.codes("RCPT TO:<a@elsewhere.test>\r\n") == ["250 2.1.5"]


SENDERS = {"sender_restriction": True,
           "senders": {"alice": ["boss@example.net", "@alice.test"]}}


@pytest.mark.parametrize(("sender", "code"), [
    ("alice@example.org", "250 2.1.0"),  # USER@ a configured domain
    ("Alice@EXAMPLE.org", "250 2.1.0"),
    ("alice@example.net", "250 2.1.0"),
    ("alice@mx.test", "250 2.1.0"),  # USER@ our hostname
    ("boss@example.net", "250 2.1.0"),  # listed
    ("anyone@alice.test", "250 2.1.0"),  # a listed domain
    ("", "250 2.1.0"),  # the null path claims nobody
    ("bob@example.org", "553 5.7.1"),
    ("alice@elsewhere.test", "553 5.7.1"),
    ("boss@example.org", "553 5.7.1"),
])
def test_sender_restriction(tmp_path, keys, sender, code):
    s = Peer.start(tmp_path, keys, listeners=SUBMISSION, auth=SENDERS).greeted()
    assert s.codes("AUTH PLAIN " + plain() + "\r\n") == AUTH_OK
    assert s.codes(f"MAIL FROM:<{sender}>\r\n") == [code]


def test_sender_restriction_refusal_text_and_default_off(tmp_path, keys):
    s = Peer.start(tmp_path, keys, listeners=SUBMISSION, auth=SENDERS).greeted()
    s.send("AUTH PLAIN " + plain() + "\r\n")
    assert s.send("MAIL FROM:<ceo@example.org>\r\n") == \
        b"553 5.7.1 sender address not owned by the authenticated user\r\n"
    free = Peer.start(tmp_path / "free", keys, listeners=SUBMISSION).greeted()
    free.send("AUTH PLAIN " + plain() + "\r\n")
    assert free.codes("MAIL FROM:<ceo@example.org>\r\n") == ["250 2.1.0"]
    # Unauthenticated mail on port 25 is not restricted.
    mx = Peer.start(tmp_path / "mx", keys, client=UNTRUSTED, auth=SENDERS).greeted()
    assert mx.codes("MAIL FROM:<ceo@example.org>\r\n") == ["250 2.1.0"]


def test_sender_restriction_for_address_user_names(tmp_path, keys):
    auth.set_password(tmp_path / "pw", "carol@example.org", PASSWORD)
    data = build(tmp_path, keys, listeners=SUBMISSION, auth={"sender_restriction": True})
    data["auth"]["passwords"] = str(tmp_path / "pw")
    config = config_module.from_dict(data)
    from mta.address import parse_mailbox
    from mta.server.policy import Policy
    policy = Policy(config, config.listeners[0])
    assert policy.may_send_as("carol@example.org", parse_mailbox("carol@example.org"))
    assert not policy.may_send_as("carol@example.org", parse_mailbox("carol@example.net"))


def test_mail_auth_parameter_is_accepted_and_not_trusted(tmp_path, keys):
    s = Peer.start(tmp_path, keys, client=UNTRUSTED).greeted()
    assert s.codes("MAIL FROM:<x@client.test> AUTH=<>\r\n") == ["250 2.1.0"]
    s.send("RSET\r\n")
    assert s.codes("MAIL FROM:<x@client.test> AUTH=alice+40example.org\r\n") == ["250 2.1.0"]
    assert s.codes(RCPT + "DATA\r\nhi\r\n.\r\n") == ["250 2.1.5", "354", "250 2.0.0"]
    assert s.queued[0].auth_identity is None
    assert b"ESMTPA" not in s.queued_data() and b"authenticated" not in s.queued_data()
    assert s.codes("MAIL FROM:<x@client.test> AUTH=bad+zz\r\n") == ["501 5.5.4"]


def test_authenticated_identity_goes_into_envelope_and_received(tmp_path, keys):
    s = Peer.start(tmp_path, keys).greeted()
    assert s.codes("AUTH PLAIN " + plain() + "\r\n") == AUTH_OK
    assert s.codes("MAIL FROM:<alice@example.org> AUTH=someone+40else.test\r\n") == \
        ["250 2.1.0"]
    s.codes(RCPT + "DATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n")
    assert s.queued[0].auth_identity == "alice"
    head, _, body = body_of(s.queued_data()).partition(b"\r\n\r\n")
    assert body == b"hi\r\n" and head.startswith(b"Subject: x\r\nDate: ")  # RFC 6409 8


# -- abuse limits ---------------------------------------------------------------------------

def test_early_talker_is_refused(tmp_path, keys):
    s = Peer.start(tmp_path, keys, client=UNTRUSTED, limits={"greeting_delay": "1s"})
    assert s.take() == b""
    s.clock.advance(0.5)
    assert s.send("EHLO bot.test\r\n") == \
        b"554 5.5.0 protocol violation: talked before the greeting\r\n"
    assert s.closed
    s.clock.advance(1)
    assert s.take() == b""  # and no greeting afterwards


def test_patient_client_gets_the_greeting_after_the_delay(tmp_path, keys):
    s = Peer.start(tmp_path, keys, client=UNTRUSTED, limits={"greeting_delay": "1s"})
    s.clock.advance(0.99)
    assert s.take() == b""
    s.clock.advance(0.01)
    assert s.take() == b"220 mx.test ESMTP mta ready\r\n"
    assert s.codes(EHLO) == ["250"]


def test_greeting_delay_only_for_untrusted_clients_on_port_25(tmp_path, keys):
    trusted = Peer.start(tmp_path, keys, limits={"greeting_delay": "1s"})
    assert trusted.take().startswith(b"220 ")
    submission = Peer.start(tmp_path / "sub", keys, client=UNTRUSTED, listeners=SUBMISSION,
                            limits={"greeting_delay": "1s"})
    assert submission.take().startswith(b"220 ")
    off = Peer.start(tmp_path / "off", keys, client=UNTRUSTED, limits={"greeting_delay": 0})
    assert off.take().startswith(b"220 ")


def test_default_greeting_delay_is_one_second(tmp_path, keys):
    data = build(tmp_path, keys)
    del data["limits"]["greeting_delay"]
    assert config_module.from_dict(data).limits.greeting_delay == 1.0


def test_connection_limits_count_all_listeners(tmp_path, keys):
    table = ConnectionTable()
    limits = {"connections_per_client": 2, "connections": 3}
    smtp = make_factory(tmp_path, keys, table=table, limits=limits,
                        listeners=[{"endpoint": "tcp:0", "role": "smtp"}, *SUBMISSION])
    submission = make_factory(tmp_path, keys, listener=1, table=table, limits=limits,
                              listeners=[{"endpoint": "tcp:0", "role": "smtp"}, *SUBMISSION])
    first = Peer.start(tmp_path, keys, client=UNTRUSTED, factory=smtp)
    assert first.take().startswith(b"220 ")
    second = Peer.start(tmp_path, keys, client=UNTRUSTED, factory=submission)
    assert second.take().startswith(b"220 ")
    third = Peer.start(tmp_path, keys, client=UNTRUSTED, factory=submission)
    assert third.take() == bytes(reply.TOO_MANY_FROM_CLIENT.render())
    assert third.closed
    other = Peer.start(tmp_path, keys, client="203.0.113.5", factory=smtp)
    assert other.take().startswith(b"220 ")
    fourth = Peer.start(tmp_path, keys, client="203.0.113.6", factory=submission)
    assert fourth.take().startswith(b"421 4.7.0 too many connections")
    first.protocol.connectionLost(None)
    again = Peer.start(tmp_path, keys, client=UNTRUSTED, factory=submission)
    assert again.take().startswith(b"220 ")


def test_slow_client_during_auth_exchange_times_out(tmp_path, keys):
    s = Peer.start(tmp_path, keys, limits={"command_timeout": "30s", "greeting_delay": 0})
    s.greeted()
    assert s.send("AUTH LOGIN\r\n").startswith(b"334 ")
    s.clock.advance(31)
    assert s.take() == b"421 4.4.2 timeout exceeded, closing connection\r\n"
    assert s.closed


def test_data_block_timeout_keeps_earlier_messages(tmp_path, keys):
    s = Peer.start(tmp_path, keys, limits={"data_timeout": "10s", "greeting_delay": 0}).greeted()
    assert send_message(s) == ["250 2.1.0", "250 2.1.5", "354", "250 2.0.0"]
    s.send(MAIL + RCPT + "DATA\r\nSubject: stalled\r\n")
    s.clock.advance(9)
    s.send("more\r\n")  # each block resets the clock
    s.clock.advance(9)
    assert not s.closed
    s.clock.advance(2)
    assert s.take().startswith(b"421 4.4.2")
    assert s.closed
    assert len(s.queued) == 1 and s.spool.queue_ids() == [s.queued[0].queue_id]
