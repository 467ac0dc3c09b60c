"""ETRN, ATRN and TURN through the server protocol, and the hand-over of the connection.

The whole provider runs in memory: the real SMTP factory and protocol on a
StringTransport, the real relayer on a task.Clock with synchronous spool work,
and a scripted courier for the etrn_route next hop.  A turned connection's
client writes into the same transport the server wrote its 250 into, and the
test plays the customer's SMTP server by feeding replies back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure

from mta import config as config_module
from mta import tls
from mta.delivery.courier import Result
from mta.delivery.outcome import Deferred, Delivered, Outcome
from mta.delivery.router import MAILDIR, SMTP
from mta.delivery.scheduler import Relayer
from mta.server import auth
from mta.server.context import ServerContext
from mta.server.protocol import ConnectionTable, SMTPFactory
from mta.server.reversal import Pickup
from mta.server.trust import Trust
from mta.spool.envelope import PENDING, Envelope, Recipient
from mta.spool.store import Spool
from tests.protocol.dialog import reply_codes
from tests.protocol.test_auth_tls import PASSWORD, TLSTransport, plain

DATA = b"From: a@far.test\r\nSubject: held\r\n\r\nhello\r\n"
SMTP_LISTENER, ODMR, SUBMISSION_ATRN, SUBMISSION = range(4)


class Courier:
    """The etrn_route next hop: records what it is given and takes it all."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []
        self.outcome: Outcome = Delivered("2.0.0", "250 ok", "sink")

    def deliver(self, hop, envelope, recipients, data_path) -> defer.Deferred:
        self.calls.append((hop.destination, [r.address for r in recipients]))
        return defer.succeed([Result(self.outcome, "sink")] * len(recipients))

    def abort_all(self) -> None:
        pass


class Provider:
    """One provider: spool, relayer, and a factory per listener."""

    def __init__(self, tmp_path: Path, keys: Path, **etrn: Any) -> None:
        data = {
            "server": {"hostname": "provider.test", "spool": str(tmp_path / "spool")},
            "listeners": [
                {"endpoint": "tcp:0", "role": "smtp", "tls": "starttls"},
                {"endpoint": "tcp:0", "role": "odmr"},
                {"endpoint": "tcp:0", "role": "submission", "atrn": True},
                {"endpoint": "tcp:0", "role": "submission"},
            ],
            "tls": {"certificate": str(keys / "cert.pem"), "key": str(keys / "key.pem")},
            "auth": {"passwords": str(keys / "passwords"), "failure_delay": "0s"},
            "relay": {"mynetworks": ["127.0.0.0/8"], "retry_min": "1h", "retry_max": "1h",
                      "lifetime": "5d"},
            "domains": {
                "held.test": {"route": "hold", "pull_users": ["alice"],
                              "etrn_route": "smtp:[192.0.2.9]:25"},
                "sub.held.test": {"route": "hold", "pull_users": ["alice"],
                                  "etrn_route": "smtp:[192.0.2.9]:25"},
                "bobs.test": {"route": "hold", "pull_users": ["bob"]},
                "locked.test": {"route": "hold", "pull_users": ["bob"],
                                "etrn_clients": ["10.0.0.0/8"]},
            },
            "etrn": etrn,
            "limits": {"greeting_delay": 0, "command_timeout": "30s"},
        }
        self.config = config_module.from_dict(data, "<test>")
        self.clock = task.Clock()
        self.clock.advance(1_800_000_000)
        self.spool = Spool(self.config.server.spool, clock=self.clock.seconds)
        self.courier = Courier()

        def synchronous(f, *a, **kw):
            return defer.maybeDeferred(f, *a, **kw)
        self.relayer = Relayer(self.config, self.spool, self.clock, run_blocking=synchronous,
                               couriers={SMTP: self.courier, MAILDIR: self.courier})
        self.relayer.startService()
        trust = Trust.from_config(self.config, self.clock, run_in_thread=synchronous)
        pickup = Pickup(self.config, self.relayer, self.clock)
        table = ConnectionTable()
        self.factories = [
            SMTPFactory(ServerContext(self.config, listener, self.spool, queue=self.relayer,
                                      pickup=pickup, clock=self.clock.seconds,
                                      run_blocking=synchronous, trust=trust), table)
            for listener in self.config.listeners]

    def hold(self, *recipients: str) -> Envelope:
        envelope = Envelope("", "a@far.test", [Recipient(r) for r in recipients],
                            arrival=self.clock.seconds())
        self.spool.inject(envelope, DATA)
        self.relayer.enqueue(envelope)
        self.clock.advance(0)
        return envelope

    def connect(self, listener: int = SMTP_LISTENER, client: str = "127.0.0.1") -> Session:
        return Session(self, listener, client)


class Session:
    def __init__(self, provider: Provider, listener: int, client: str) -> None:
        self.provider = provider
        self.protocol = provider.factories[listener].buildProtocol(None)
        self.protocol.callLater = provider.clock.callLater
        self.transport = TLSTransport(peerAddress=IPv4Address("TCP", client, 40000))
        self.protocol.makeConnection(self.transport)
        self.take()

    def send(self, text: str | bytes) -> bytes:
        self.protocol.dataReceived(text.encode() if isinstance(text, str) else text)
        return self.take()

    def take(self) -> bytes:
        out = self.transport.value()
        self.transport.clear()
        return out

    def codes(self, text: str) -> list[str]:
        return reply_codes(self.send(text))

    def login(self, user: str = "alice", helo: str = "customer.test") -> Session:
        assert self.codes(f"EHLO {helo}\r\n") == ["250"]
        assert self.codes(f"AUTH PLAIN {plain(user)}\r\n") == ["235 2.7.0"]
        return self

    def keywords(self, helo: str = "customer.test") -> list[str]:
        lines = self.send(f"EHLO {helo}\r\n").decode().split("\r\n")[1:-1]
        return [line[4:] for line in lines]

    def deliver_turned(self, messages: int) -> bytes:
        """Play the customer's SMTP server for `messages` messages after the client's EHLO;
        returns what the client said after the last one."""
        after = b""
        for _ in range(messages):
            self.send("250 ok\r\n250 ok\r\n354 go\r\n")
            while self.transport.producer is not None:
                self.transport.producer.resumeProducing()
            assert self.take().endswith(b"\r\n.\r\n")
            after = self.send("250 2.0.0 taken\r\n")
        return after


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("keys")
    tls.make_cert(root / "cert.pem", root / "key.pem", "provider.test")
    auth.set_password(root / "passwords", "alice", PASSWORD, cram_md5=True)
    auth.set_password(root / "passwords", "bob", PASSWORD)
    return root


@pytest.fixture
def provider(tmp_path: Path, keys: Path) -> Provider:
    return Provider(tmp_path, keys)


# -- ETRN [RFC 1985] ----------------------------------------------------------------------

def test_etrn_is_advertised_and_ordered(provider: Provider) -> None:
    s = provider.connect()
    assert s.codes("ETRN held.test\r\n") == ["503"]  # before HELO: no enhanced codes yet
    assert "ETRN" in s.keywords()
    assert s.codes("MAIL FROM:<a@far.test>\r\nETRN held.test\r\n") == ["250 2.1.0",
                                                                       "503 5.5.1"]
    assert s.codes("RSET\r\nETRN\r\nETRN bad..name\r\nETRN a b\r\n") == [
        "250 2.0.0", "501 5.5.4", "501 5.5.4", "501 5.5.4"]


def test_etrn_releases_a_held_domain_to_its_etrn_route(provider: Provider) -> None:
    first = provider.hold("x@held.test")
    provider.hold("y@held.test", "z@bobs.test")
    assert provider.courier.calls == []  # held: not attempted
    s = provider.connect()
    s.send("EHLO client.test\r\n")
    out = s.send("ETRN held.test\r\n")
    assert out == b"253 2.0.0 OK, 2 pending messages for node held.test started\r\n"
    provider.clock.advance(0)
    assert sorted(provider.courier.calls) == [("smtp:[192.0.2.9]:25", ["x@held.test"]),
                                              ("smtp:[192.0.2.9]:25", ["y@held.test"])]
    assert first.queue_id not in provider.spool.queue_ids()
    assert provider.relayer.waiting(["bobs.test"]) == 1  # the rest still waits


def test_etrn_at_domain_covers_subdomains_and_hash_names_a_queue(provider: Provider) -> None:
    provider.hold("x@held.test")
    provider.hold("y@sub.held.test")
    s = provider.connect()
    s.send("EHLO client.test\r\n")
    assert s.codes("ETRN #sub.held.test\r\n") == ["253 2.0.0"]
    assert s.codes("ETRN @held.test\r\n") == ["253 2.0.0"]
    provider.clock.advance(0)
    assert sorted(a for _, addresses in provider.courier.calls for a in addresses) == [
        "x@held.test", "y@sub.held.test"]
    assert s.codes("ETRN #nowhere.test\r\n") == ["458 4.5.1"]
    assert s.codes("ETRN held.test\r\nETRN nothing.test\r\n") == ["251 2.0.0", "251 2.0.0"]


def test_etrn_refused_for_a_client_the_domain_does_not_allow(provider: Provider) -> None:
    provider.hold("x@locked.test")
    s = provider.connect()
    s.send("EHLO client.test\r\n")
    assert s.codes("ETRN locked.test\r\n") == ["459 4.7.1"]
    # @domain reaches configured sub-domains: each must allow the client.
    assert s.codes("ETRN @test\r\n") == ["459 4.7.1"]
    provider.clock.advance(0)
    assert provider.courier.calls == []
    # The domain's own pull user may always ask.
    bob = provider.connect().login("bob")
    assert bob.codes("ETRN locked.test\r\n") == ["253 2.0.0"]


def test_etrn_is_rate_limited_per_client(tmp_path: Path, keys: Path) -> None:
    provider = Provider(tmp_path, keys, per_client=2, window="1m")
    s = provider.connect()
    s.send("EHLO client.test\r\n")
    assert s.codes("ETRN a.test\r\nETRN b.test\r\nETRN c.test\r\n") == [
        "251 2.0.0", "251 2.0.0", "458 4.7.0"]
    other = provider.connect(client="127.0.0.2")
    other.send("EHLO client.test\r\n")
    assert other.codes("ETRN a.test\r\n") == ["251 2.0.0"]
    provider.clock.advance(61)
    again = provider.connect()
    again.send("EHLO client.test\r\n")
    assert again.codes("ETRN c.test\r\n") == ["251 2.0.0"]


def test_etrn_of_a_deferred_domain_retries_it_now(provider: Provider) -> None:
    provider.courier.outcome = Deferred("4.4.1", "connection refused")
    envelope = provider.hold("r@far.test")  # not held: tried at once, deferred for an hour
    assert provider.courier.calls == [("far.test", ["r@far.test"])]
    provider.courier.outcome = Delivered("2.0.0", "250 ok", "mx.far.test")
    s = provider.connect()
    s.send("EHLO client.test\r\n")
    assert s.codes("ETRN far.test\r\n") == ["253 2.0.0"]
    provider.clock.advance(0)
    assert len(provider.courier.calls) == 2
    assert envelope.queue_id not in provider.spool.queue_ids()


# -- ATRN [RFC 2645] ---------------------------------------------------------------------

def test_atrn_only_where_offered(provider: Provider) -> None:
    smtp = provider.connect(SMTP_LISTENER)
    assert "ATRN" not in smtp.keywords()
    assert smtp.codes("ATRN\r\n") == ["502 5.5.1"]
    odmr = provider.connect(ODMR)
    assert "ATRN" in odmr.keywords()  # before AUTH, so that clients know (fetchmail checks)
    assert odmr.codes("ATRN\r\n") == ["530 5.7.0"]
    assert "ATRN" in provider.connect(SUBMISSION_ATRN).keywords()
    plain_submission = provider.connect(SUBMISSION)
    assert "ATRN" not in plain_submission.keywords()
    plain_submission.login()
    assert plain_submission.codes("ATRN\r\n") == ["502 5.5.1"]


def test_atrn_refusals(provider: Provider) -> None:
    s = provider.connect(ODMR).login("alice")
    assert s.codes("ATRN held.test\r\n") == ["453 4.2.0"]  # nothing waiting
    provider.hold("x@held.test", "y@bobs.test")
    assert s.codes("ATRN bobs.test\r\n") == ["450 4.7.1"]
    assert s.codes("ATRN held.test,bobs.test\r\n") == ["450 4.7.1"]
    assert s.codes("ATRN held..test\r\n") == ["501 5.5.4"]
    assert s.codes("MAIL FROM:<alice@held.test>\r\nATRN\r\nRSET\r\n") == [
        "250 2.1.0", "503 5.5.1", "250 2.0.0"]
    bob = provider.connect(ODMR).login("bob")
    bob.send("ATRN locked.test\r\n")  # nothing there: 453, and bob's session goes on
    provider.clock.advance(0)
    assert provider.courier.calls == []
    assert provider.relayer.waiting(["held.test", "bobs.test"]) == 1


def test_atrn_turns_round_and_delivers_on_the_same_connection(provider: Provider) -> None:
    first = provider.hold("x@held.test", "y@bobs.test")
    second = provider.hold("z@sub.held.test")
    s = provider.connect(ODMR).login("alice")
    # The customer's greeting may arrive in the same packet as our 250: it is not lost.
    out = s.send("ATRN\r\n220 customer.test ESMTP\r\n")
    assert out == b"250 2.0.0 OK, now reversing the connection\r\nEHLO provider.test\r\n"
    s.send("250-customer.test\r\n250 PIPELINING\r\n")
    assert s.deliver_turned(2) == b"QUIT\r\n"  # two messages, then nothing else waits
    assert second.queue_id not in provider.spool.queue_ids()
    left = provider.spool.load(first.queue_id)
    assert [r.state for r in left.recipients] == ["delivered", PENDING]  # bob's still waits
    assert provider.relayer.waiting(["bobs.test"]) == 1


def test_the_server_lets_go_of_a_turned_connection(provider: Provider) -> None:
    provider.hold("x@held.test")
    s = provider.connect(ODMR).login("alice")
    s.send("ATRN held.test\r\n")
    # The server's 30 s command timeout no longer applies: the client waits for the
    # customer's 220 with its own (5 minute) greeting timeout.
    provider.clock.advance(60)
    assert not s.transport.disconnecting
    assert s.transport.producer is None  # the server protocol is no longer registered
    assert s.send("220 customer.test\r\n") == b"EHLO provider.test\r\n"


def test_a_second_turn_of_the_same_domain_is_451(provider: Provider) -> None:
    provider.hold("x@held.test")
    first = provider.connect(ODMR).login("alice")
    first.send("ATRN held.test\r\n")
    second = provider.connect(ODMR).login("alice")
    assert second.codes("ATRN held.test\r\n") == ["451 4.3.0"]


def test_a_lost_turned_connection_records_what_was_done(provider: Provider) -> None:
    provider.hold("a@held.test")
    provider.hold("b@held.test")
    before = set(provider.spool.queue_ids())
    s = provider.connect(ODMR).login("alice")
    s.send("ATRN\r\n220 customer.test\r\n")
    s.send("250-customer.test\r\n250 PIPELINING\r\n")
    s.deliver_turned(1)  # the first message is the customer's now
    s.send("250 ok\r\n250 ok\r\n354 go\r\n")  # the second is in DATA when the line drops
    s.protocol.connectionLost(Failure(ConnectionLost("customer went away")))
    left = provider.spool.queue_ids()
    assert len(left) == 1 and set(left) < before
    kept = provider.spool.load(left[0])
    assert (kept.attempts, kept.recipients[0].state) == (1, PENDING)
    assert kept.recipients[0].status == "4.4.2"
    assert provider.relayer.waiting(["held.test"]) == 1
    # The domain is free again for the customer's next call.
    again = provider.connect(ODMR).login("alice")
    assert again.codes("ATRN held.test\r\n") == ["250 2.0.0"]


def test_atrn_on_a_submission_listener_that_allows_it(provider: Provider) -> None:
    provider.hold("x@held.test")
    s = provider.connect(SUBMISSION_ATRN).login("alice")
    assert s.codes("ATRN\r\n") == ["250 2.0.0"]


# -- TURN [RFC 821, RFC 5321 F.1] ----------------------------------------------------------

def test_unauthenticated_turn_is_refused_and_nothing_leaves(provider: Provider) -> None:
    envelope = provider.hold("x@held.test")
    s = provider.connect()
    s.send("EHLO held.test\r\n")
    assert s.send("TURN\r\n") == (b"502 5.7.0 TURN refused: authenticate, and HELO/EHLO with "
                                  b"a domain you may pull\r\n")
    assert s.codes("NOOP\r\n") == ["250 2.0.0"]  # the session goes on as a server
    provider.clock.advance(0)
    assert provider.courier.calls == []
    assert provider.spool.queue_ids() == [envelope.queue_id]


def test_turn_needs_a_helo_domain_the_user_may_pull(provider: Provider) -> None:
    provider.hold("x@held.test")
    s = provider.connect().login("alice", helo="bobs.test")
    assert s.codes("TURN\r\n") == ["502 5.7.0"]
    assert s.codes("TURN now\r\n") == ["501 5.5.4"]


def test_authenticated_turn_delivers_the_helo_domain(provider: Provider) -> None:
    envelope = provider.hold("x@held.test")
    s = provider.connect().login("alice", helo="held.test")
    out = s.send("TURN\r\n")
    assert out.startswith(b"250 2.0.0 ")
    assert s.send("220 held.test ESMTP\r\n") == b"EHLO provider.test\r\n"
    s.send("250-held.test\r\n250 PIPELINING\r\n")
    assert s.deliver_turned(1) == b"QUIT\r\n"
    assert envelope.queue_id not in provider.spool.queue_ids()
