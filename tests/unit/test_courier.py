"""Routing decisions and the SMTP courier's walk over hosts and addresses."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer, error, task
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mta import config as config_mod
from mta.delivery.client import SessionPolicy, SMTPClient, Timeouts
from mta.delivery.courier import STOP_REPLY_GRACE, SMTPCourier
from mta.delivery.mx import MXHost
from mta.delivery.outcome import Deferred, Delivered, DeliveryError, Failed
from mta.delivery.router import HOLD, MAILDIR, SMTP, UNKNOWN, Router
from mta.spool.envelope import Envelope, Recipient


def make_config(tmp_path: Path | None = None, **relay: Any) -> config_mod.Config:
    domains: dict[str, Any] = {
        "held.test": {"route": "hold", "etrn_route": "smtp:[192.0.2.7]:2600"},
        "fwd.test": {"route": "smtp:[10.0.0.5]:2525"},
        "mxfwd.test": {"route": "smtp:inner.test:26"},
        "mxdefault.test": {"route": "smtp:inner.test"},
        "hostdefault.test": {"route": "smtp:[10.0.0.6]"},
        "pull.test": {"route": "hold"},
    }
    if tmp_path is not None:
        password = tmp_path / "pw"
        password.write_text("secret\n")
        relay.setdefault("smarthost_password_file", str(password))
    return config_mod.from_dict({"server": {"hostname": "mx.here.test"}, "relay": relay,
                                 "domains": domains})


# -- the router -------------------------------------------------------------------------------

def test_routes_by_domain() -> None:
    router = Router(make_config(smtp_port=2600))
    hop = router.next_hop("a@Far.Test.")
    assert (hop.kind, hop.destination, hop.host, hop.port, hop.mx, hop.tls) == \
        (SMTP, "far.test", "far.test", 2600, True, "opportunistic")
    hop = router.next_hop("a@fwd.test")
    assert (hop.host, hop.port, hop.mx, hop.destination) == ("10.0.0.5", 2525, False,
                                                            "smtp:[10.0.0.5]:2525")
    hop = router.next_hop("a@mxfwd.test")
    assert (hop.host, hop.port, hop.mx) == ("inner.test", 26, True)
    # A route without a port uses [relay] smtp_port, as mail by MX does.
    hop = router.next_hop("a@mxdefault.test")
    assert (hop.host, hop.port, hop.mx) == ("inner.test", 2600, True)
    hop = router.next_hop("a@hostdefault.test")
    assert (hop.host, hop.port, hop.mx) == ("10.0.0.6", 2600, False)
    hop = router.next_hop("a@[192.0.2.1]")
    assert (hop.host, hop.port, hop.mx) == ("192.0.2.1", 2600, False)
    assert router.next_hop("a@[IPv6:2001:db8::1]").host == "2001:db8::1"


def test_hold_until_released() -> None:
    router = Router(make_config())
    assert router.next_hop("a@held.test").kind == HOLD
    hop = router.next_hop("a@held.test", release_hold=True)
    assert (hop.kind, hop.host, hop.port, hop.mx) == (SMTP, "192.0.2.7", 2600, False)
    hop = router.next_hop("a@pull.test", release_hold=True)
    assert (hop.host, hop.mx, hop.loop_is_temporary) == ("pull.test", True, True)


def test_maildir_route(tmp_path: Path) -> None:
    cfg = config_mod.from_dict({"domains": {"local.test": {
        "route": f"maildir:{tmp_path}", "users": ["Alice"]}}})
    hop = Router(cfg).next_hop("ALICE+tag@local.test")
    assert (hop.kind, hop.path) == (MAILDIR, tmp_path)
    # A name that is not there (removed since RCPT, a list's unknown member) fails 5.1.1.
    hop = Router(cfg).next_hop("bob@local.test")
    assert (hop.kind, hop.destination) == (UNKNOWN, "unknown:local.test")
    # Our hostname is local for system mail: without an alias, no such user, never MX.
    assert Router(cfg).next_hop(f"root@{cfg.server.hostname}").kind == UNKNOWN


def test_smarthost_for_everything_else(tmp_path: Path) -> None:
    router = Router(make_config(tmp_path, smarthost="smtp.isp.test:587", smarthost_user="me",
                                smarthost_tls="verify", tls_verify=True))
    a, b = router.next_hop("x@one.test"), router.next_hop("y@two.test")
    assert a.destination == b.destination == "smarthost:[smtp.isp.test]:587"
    assert (a.host, a.port, a.mx, a.tls, a.auth_user, a.auth_password) == \
        ("smtp.isp.test", 587, False, "verify", "me", "secret")
    assert "secret" not in repr(a)
    # Configured routes still win over the smart host; MX routes then verify (tls_verify).
    assert router.next_hop("a@fwd.test").host == "10.0.0.5"
    assert router.next_hop("a@fwd.test").tls == "verify"



def test_hops_are_made_once_per_domain_and_config_and_kept_bounded(tmp_path: Path,
                                                                    monkeypatch) -> None:
    from mta.delivery import router as router_module
    monkeypatch.setattr(router_module, "HOPS_KEPT", 3)
    cfg = config_mod.from_dict({"domains": {"local.test": {
        "route": f"maildir:{tmp_path}", "users": ["alice"]}}})
    router = Router(cfg)
    first = router.next_hop("a@far.test")
    assert router.next_hop("b@Far.Test") is first
    # The address still decides "unknown" each time, whatever its domain's hop kept.
    assert router.next_hop("alice@local.test").kind == MAILDIR
    assert router.next_hop("bob@local.test").kind == UNKNOWN
    for i in range(10):
        router.next_hop(f"x@d{i}.test")
    assert len(router._hops) <= 3
    again = router.next_hop("a@far.test")
    assert again == first and again is not first


# -- the courier ------------------------------------------------------------------------------

class StubResolver:
    def __init__(self, hosts: list[MXHost] | Exception) -> None:
        self.hosts = hosts

    def resolve(self, domain: str) -> list[MXHost]:
        if isinstance(self.hosts, Exception):
            raise self.hosts
        return self.hosts

    resolve_host = resolve


class StubPolicies:
    """MTA-STS as the courier sees it: the policy `lookup` gives, per domain."""

    def __init__(self, policies: dict[str, Any] | None = None) -> None:
        self.policies = policies or {}
        self.asked: list[str] = []
        self.aborted = False

    def lookup(self, domain: str) -> defer.Deferred:
        self.asked.append(domain)
        return defer.succeed(self.policies.get(domain))

    def abort_all(self) -> None:
        self.aborted = True


EHLO = b"220 peer\r\n250-peer\r\n250-PIPELINING\r\n250 STARTTLS\r\n"


class CourierTest(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.config = make_config()
        self.connections: list[tuple[str, SessionPolicy, SMTPClient | None, StringTransport]] = []
        self.refuse: set[str] = set()
        self.data = Path(self.mktemp_file())
        self.sts = StubPolicies()

    def mktemp_file(self) -> str:
        fd, name = tempfile.mkstemp(prefix="mta-test-courier-")
        os.write(fd, b"Subject: x\r\n\r\nbody\r\n")
        os.close(fd)
        self.addCleanup(os.unlink, name)
        return name

    def connect(self, address: str, port: int, policy: SessionPolicy) -> defer.Deferred:
        transport = StringTransport()
        if address in self.refuse:
            self.connections.append((address, policy, None, transport))
            return defer.fail(error.ConnectionRefusedError())
        client = SMTPClient(policy, self.clock)
        client.makeConnection(transport)
        self.connections.append((address, policy, client, transport))
        return defer.succeed(client)

    def courier(self, hosts: list[MXHost] | Exception) -> SMTPCourier:
        return SMTPCourier(self.config, self.clock, defer.maybeDeferred,
                           resolver=StubResolver(hosts), connect=self.connect, sts=self.sts)

    def deliver(self, courier: SMTPCourier, *addresses: str) -> defer.Deferred:
        envelope = Envelope("ABC", "s@here.test", [Recipient(a) for a in addresses], 0.0,
                            size=20)
        hop = Router(self.config).next_hop(addresses[0])
        return courier.deliver(hop, envelope, envelope.recipients, self.data)

    def finish(self, client: SMTPClient, transport: StringTransport, replies: bytes) -> None:
        client.dataReceived(replies)
        while transport.producer is not None:
            transport.producer.resumeProducing()
        client.dataReceived(b"250 2.0.0 queued\r\n")

    def test_dead_first_host_then_second(self) -> None:
        self.refuse = {"127.0.0.2"}
        hosts = [MXHost("mx1.far.test", 10, ("127.0.0.2",)),
                 MXHost("mx2.far.test", 20, ("127.0.0.3", "127.0.0.4"))]
        d = self.deliver(self.courier(hosts), "a@far.test", "b@far.test")
        address, _, client, transport = self.connections[-1]
        self.assertEqual(address, "127.0.0.3")
        client.dataReceived(b"220 peer\r\n250-peer\r\n250 PIPELINING\r\n")
        self.finish(client, transport, b"250 ok\r\n250 ok\r\n550 5.1.1 no\r\n354 go\r\n")
        a, b = self.successResultOf(d)
        self.assertIsInstance(a.outcome, Delivered)
        self.assertEqual(a.relay, "mx2.far.test[127.0.0.3]:25")
        self.assertIsInstance(b.outcome, Failed)

    def test_bad_greeting_moves_on_to_the_next_address(self) -> None:
        hosts = [MXHost("mx.far.test", 10, ("127.0.0.2", "127.0.0.3"))]
        d = self.deliver(self.courier(hosts), "a@far.test")
        _, _, first, _ = self.connections[0]
        first.dataReceived(b"421 4.3.2 busy\r\n")
        first.connectionLost(Failure(error.ConnectionDone()))
        _, _, second, transport = self.connections[1]
        second.dataReceived(b"220 peer\r\n250 peer\r\n")
        self.finish(second, transport, b"250 ok\r\n250 ok\r\n354 go\r\n")
        (result,) = self.successResultOf(d)
        self.assertEqual(result.relay, "mx.far.test[127.0.0.3]:25")

    def test_all_hosts_dead_is_deferred_with_the_last_reason(self) -> None:
        self.refuse = {"127.0.0.2", "127.0.0.3"}
        hosts = [MXHost("mx1.far.test", 10, ("127.0.0.2",)), MXHost("mx2.far.test", 20,
                                                                     ("127.0.0.3",))]
        (result,) = self.successResultOf(self.deliver(self.courier(hosts), "a@far.test"))
        self.assertIsInstance(result.outcome, Deferred)
        self.assertEqual(result.outcome.status, "4.4.1")
        self.assertEqual(result.outcome.diagnostic,
                         "connect to mx2.far.test[127.0.0.3]:25: connection refused")

    def test_a_host_that_times_out_is_not_tried_again_at_once(self) -> None:
        # A tarpit (it accepts, then never greets) holds a slot for the greeting timeout
        # once; then it is remembered as dead for dead_host_time instead of every attempt.
        hosts = [MXHost("mx.far.test", 10, ("127.0.0.2",))]
        courier = self.courier(hosts)
        d = self.deliver(courier, "a@far.test")
        self.assertEqual(len(self.connections), 1)
        self.clock.advance(300)  # RFC 5321 4.5.3.2.1: five minutes for the 220
        (result,) = self.successResultOf(d)
        self.assertEqual(result.outcome.status, "4.4.2")
        (again,) = self.successResultOf(self.deliver(courier, "b@far.test"))
        self.assertEqual(len(self.connections), 1)  # not tried: no connection, no slot held
        self.assertIsInstance(again.outcome, Deferred)
        self.assertIn("timed out recently", again.outcome.diagnostic)
        self.clock.advance(300)  # dead_host_time over: tried again
        self.deliver(courier, "c@far.test")
        self.assertEqual(len(self.connections), 2)

    def test_client_timeouts_are_config_keys(self) -> None:
        from mta.delivery.client import Timeouts
        config = make_config(smtp_greeting_timeout="30s", smtp_data_done_timeout="1m")
        timeouts = Timeouts.from_config(config.relay)
        self.assertEqual((timeouts.greeting, timeouts.data_end, timeouts.rcpt), (30, 60, 300))
        self.assertEqual(SMTPCourier(config, self.clock, defer.maybeDeferred).timeouts,
                         timeouts)

    def test_opportunistic_tls_failure_retries_in_plain_text(self) -> None:
        hosts = [MXHost("mx.far.test", 10, ("127.0.0.2",))]
        d = self.deliver(self.courier(hosts), "a@far.test")
        _, policy, client, transport = self.connections[0]
        self.assertEqual(policy.tls, "opportunistic")
        transport.startTLS = lambda options: None
        client.dataReceived(EHLO + b"220 go ahead\r\n")
        client.connectionLost(Failure(Exception("handshake failure")))
        address, policy, client, transport = self.connections[1]
        self.assertEqual((address, policy.tls), ("127.0.0.2", "off"))
        client.dataReceived(EHLO)
        self.assertNotIn(b"STARTTLS", transport.value())
        self.finish(client, transport, b"250 ok\r\n250 ok\r\n354 go\r\n")
        self.assertIsInstance(self.successResultOf(d)[0].outcome, Delivered)

    def test_no_smarthost_password_in_clear_after_a_failed_tls_handshake(self) -> None:
        # "opportunistic": the password goes in clear only to a host without STARTTLS; one
        # that offers it but whose handshake fails (someone in the path?) does not get it.
        tmp = Path(tempfile.mkdtemp(prefix="mta-test-courier-"))
        self.addCleanup(shutil.rmtree, tmp, True)
        self.config = make_config(tmp, smarthost="smtp.isp.test:587", smarthost_user="me",
                                  smarthost_tls="opportunistic")
        d = self.deliver(self.courier([MXHost("smtp.isp.test", 0, ("127.0.0.2",))]),
                         "a@far.test")
        _, policy, client, transport = self.connections[0]
        transport.startTLS = lambda options: None
        client.dataReceived(EHLO + b"220 go ahead\r\n")
        client.connectionLost(Failure(Exception("handshake failure")))
        _, policy, client, transport = self.connections[1]
        self.assertEqual(policy.tls, "off")
        client.dataReceived(b"220 peer\r\n250-peer\r\n250-STARTTLS\r\n250 AUTH PLAIN LOGIN\r\n")
        self.assertNotIn(b"AUTH", transport.value())
        client.dataReceived(b"221 bye\r\n")
        (result,) = self.successResultOf(d)
        self.assertEqual((type(result.outcome), result.outcome.status), (Deferred, "4.7.4"))

    def test_lost_after_the_dot_is_not_retried_elsewhere(self) -> None:
        hosts = [MXHost("mx.far.test", 10, ("127.0.0.2", "127.0.0.3"))]
        d = self.deliver(self.courier(hosts), "a@far.test")
        _, _, client, transport = self.connections[0]
        client.dataReceived(b"220 peer\r\n250-peer\r\n250 PIPELINING\r\n250 ok\r\n250 ok\r\n"
                            b"354 go\r\n")
        while transport.producer is not None:
            transport.producer.resumeProducing()
        client.connectionLost(Failure(error.ConnectionLost()))
        (result,) = self.successResultOf(d)
        self.assertEqual(len(self.connections), 1)
        self.assertEqual((type(result.outcome), result.outcome.status), (Deferred, "4.4.2"))

    def test_more_than_100_recipients_go_in_100_recipient_transactions(self) -> None:
        # RFC 5321 4.5.3.1.8: a server need not take more than 100 RCPTs (452 beyond);
        # the client sends the rest in further transactions now, not at a later retry.
        hosts = [MXHost("mx.far.test", 10, ("127.0.0.2",))]
        addresses = [f"u{i}@far.test" for i in range(150)]
        d = self.deliver(self.courier(hosts), *addresses)
        _, _, client, transport = self.connections[0]
        client.dataReceived(b"220 peer\r\n250-peer\r\n250 PIPELINING\r\n")
        self.assertEqual(transport.value().count(b"RCPT TO:"), 100)
        self.finish(client, transport, b"250 ok\r\n" * 101 + b"354 go\r\n")
        client.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(len(self.connections), 2)
        _, _, client, transport = self.connections[1]
        client.dataReceived(b"220 peer\r\n250-peer\r\n250 PIPELINING\r\n")
        self.assertEqual(transport.value().count(b"RCPT TO:"), 50)
        self.assertIn(b"RCPT TO:<u100@far.test>", transport.value())
        self.finish(client, transport, b"250 ok\r\n" * 51 + b"354 go\r\n")
        results = self.successResultOf(d)
        self.assertEqual(len(results), 150)
        self.assertTrue(all(isinstance(r.outcome, Delivered) for r in results))

    def test_many_recipients_and_dead_hosts_cost_one_walk(self) -> None:
        self.refuse = {"127.0.0.2"}
        hosts = [MXHost("mx.far.test", 10, ("127.0.0.2",))]
        addresses = [f"u{i}@far.test" for i in range(250)]
        results = self.successResultOf(self.deliver(self.courier(hosts), *addresses))
        self.assertEqual(len(self.connections), 1)
        self.assertEqual(len(results), 250)
        self.assertEqual({r.outcome.status for r in results}, {"4.4.1"})

    def test_resolution_failure(self) -> None:
        courier = self.courier(DeliveryError("5.1.10", "null MX"))
        a, b = self.successResultOf(self.deliver(courier, "a@far.test", "b@far.test"))
        self.assertEqual((type(a.outcome), a.outcome.status, a.relay), (Failed, "5.1.10", "none"))
        self.assertEqual(b.outcome, a.outcome)

    def test_a_held_domain_pointing_at_us_waits(self) -> None:
        courier = self.courier(DeliveryError("5.4.6", "mail for pull.test loops back to myself"))
        envelope = Envelope("ABC", "s@here.test", [Recipient("a@pull.test")], 0.0)
        hop = Router(self.config).next_hop("a@pull.test", release_hold=True)
        (result,) = self.successResultOf(courier.deliver(hop, envelope, envelope.recipients,
                                                         self.data))
        self.assertEqual((type(result.outcome), result.outcome.status), (Deferred, "4.4.6"))

    def test_abort_all_drops_live_connections(self) -> None:
        hosts = [MXHost("mx.far.test", 10, ("127.0.0.2",))]
        d = self.deliver(self.courier(hosts), "a@far.test")
        courier_clients = self.connections[0][2]
        self.assertNoResult(d)
        courier = self.courier(hosts)
        d2 = self.deliver(courier, "b@far.test")
        courier.abort_all()
        client = self.connections[-1][2]
        client.connectionLost(Failure(error.ConnectionAborted()))
        (result,) = self.successResultOf(d2)
        self.assertIsInstance(result.outcome, Deferred)
        self.assertIsNotNone(courier_clients)


def test_tls_policy_and_mta_sts_choose_the_hops_tls() -> None:
    def hop(address: str, tls_policy: dict[str, str], **relay: Any) -> tuple[str, bool]:
        cfg = config_mod.from_dict({"relay": relay, "tls_policy": tls_policy, "domains": {
            "fwd.test": {"route": "smtp:[10.0.0.5]:2525"},
            "pull.test": {"route": "hold"}}})
        next_hop = Router(cfg).next_hop(address, release_hold=True)
        return next_hop.tls, next_hop.sts
    # MX delivery: MTA-STS decides unless [tls_policy] names the domain.
    assert hop("a@far.test", {}) == ("opportunistic", True)
    assert hop("a@far.test", {}, tls_verify=True) == ("verify", True)
    assert hop("a@far.test", {}, mta_sts=False) == ("opportunistic", False)
    assert hop("a@far.test", {"far.test": "sts"}, mta_sts=False) == ("opportunistic", True)
    assert hop("a@far.test", {"far.test": "none"}) == ("off", False)
    assert hop("a@far.test", {"far.test": "may"}, tls_verify=True) == ("opportunistic", False)
    assert hop("a@far.test", {"far.test": "encrypt"}) == ("required", False)
    assert hop("a@far.test", {"far.test": "verify"}) == ("verify", False)
    assert hop("a@pull.test", {}) == ("opportunistic", True)  # a held domain released by MX
    # An explicit route: [tls_policy] applies, MTA-STS never [RFC 8461 5: MX delivery].
    assert hop("a@fwd.test", {}) == ("opportunistic", False)
    assert hop("a@fwd.test", {"fwd.test": "verify"}) == ("verify", False)
    assert hop("a@fwd.test", {"fwd.test": "sts"}) == ("opportunistic", False)
    assert hop("a@[192.0.2.1]", {}) == ("opportunistic", False)
    # [tls_policy] names domains in A-labels; mail to the U-labels (SMTPUTF8) is theirs.
    assert hop("a@bücher.example", {"xn--bcher-kva.example": "verify"}) == ("verify", False)
    assert hop("a@BÜCHER.example.", {"xn--bcher-kva.example": "none"}) == ("off", False)


@pytest.mark.parametrize("address", ["a@far.test", "b@[127.0.0.1]"])
def test_router_never_raises(address: str) -> None:
    assert Router(make_config()).next_hop(address).kind == SMTP


class ReuseTest(CourierTest):
    """A connection that delivered well waits open for the next message to its host."""

    def deliver_one(self, courier: SMTPCourier, address: str = "a@far.test",
                    greet: bool = True) -> tuple[Any, SMTPClient, StringTransport]:
        d = self.deliver(courier, address)
        _, _, client, transport = self.connections[-1]
        if greet:
            client.dataReceived(b"220 peer\r\n250-peer\r\n250 PIPELINING\r\n")
        transport.clear()
        return d, client, transport

    def up_to_the_dot(self, client: SMTPClient, transport: StringTransport) -> None:
        """MAIL, RCPT and DATA accepted; the body and its final dot written."""
        client.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n")
        while transport.producer is not None:
            transport.producer.resumeProducing()

    def test_the_next_message_to_the_host_goes_over_the_same_connection(self) -> None:
        courier = self.courier([MXHost("mx.far.test", 10, ("127.0.0.2",))])
        first, client, transport = self.deliver_one(courier)
        self.finish(client, transport, b"250 ok\r\n250 ok\r\n354 go\r\n")
        self.assertIsInstance(self.successResultOf(first)[0].outcome, Delivered)
        self.assertNotIn(b"QUIT", transport.value())
        transport.clear()
        second = self.deliver(courier, "b@far.test")
        self.assertEqual(len(self.connections), 1)  # no new connection, greeting or EHLO
        self.assertTrue(transport.value().startswith(b"MAIL FROM:<s@here.test>"))
        self.finish(client, transport, b"250 ok\r\n250 ok\r\n354 go\r\n")
        (result,) = self.successResultOf(second)
        self.assertEqual((type(result.outcome), result.relay),
                         (Delivered, "mx.far.test[127.0.0.2]:25"))
        transport.clear()
        self.clock.advance(5)  # idle too long: it says goodbye
        self.assertEqual(transport.value(), b"QUIT\r\n")
        self.deliver(courier, "c@far.test")
        self.assertEqual(len(self.connections), 2)

    def test_a_connection_the_peer_dropped_meanwhile_is_not_used(self) -> None:
        courier = self.courier([MXHost("mx.far.test", 10, ("127.0.0.2",))])
        _first, client, transport = self.deliver_one(courier)
        self.finish(client, transport, b"250 ok\r\n250 ok\r\n354 go\r\n")
        client.dataReceived(b"421 4.4.2 idle timeout\r\n")  # the peer gives up on us
        client.connectionLost(Failure(error.ConnectionDone()))
        second = self.deliver(courier, "b@far.test")
        self.assertEqual(len(self.connections), 2)
        _, _, fresh, transport2 = self.connections[-1]
        fresh.dataReceived(b"220 peer\r\n250-peer\r\n250 PIPELINING\r\n")
        self.finish(fresh, transport2, b"250 ok\r\n250 ok\r\n354 go\r\n")
        self.assertIsInstance(self.successResultOf(second)[0].outcome, Delivered)

    def test_a_refused_message_keeps_the_session_a_broken_one_does_not(self) -> None:
        courier = self.courier([MXHost("mx.far.test", 10, ("127.0.0.2",))])
        first, client, transport = self.deliver_one(courier)
        self.up_to_the_dot(client, transport)
        client.dataReceived(b"451 4.3.0 try later\r\n")  # this message, not the session
        self.assertIsInstance(self.successResultOf(first)[0].outcome, Deferred)
        transport.clear()
        second = self.deliver(courier, "b@far.test")
        self.assertEqual(len(self.connections), 1)
        client.dataReceived(b"250 ok\r\n")  # MAIL, then the connection breaks
        client.connectionLost(Failure(error.ConnectionLost()))
        # Nothing was decided on it: the message goes at once over a fresh connection.
        self.assertEqual(len(self.connections), 2)
        _, _, fresh, transport2 = self.connections[-1]
        fresh.dataReceived(b"220 peer\r\n250-peer\r\n250 PIPELINING\r\n")
        self.finish(fresh, transport2, b"250 ok\r\n250 ok\r\n354 go\r\n")
        self.assertIsInstance(self.successResultOf(second)[0].outcome, Delivered)

    def test_shutdown_closes_waiting_connections(self) -> None:
        courier = self.courier([MXHost("mx.far.test", 10, ("127.0.0.2",))])
        _first, client, transport = self.deliver_one(courier)
        self.finish(client, transport, b"250 ok\r\n250 ok\r\n354 go\r\n")
        courier.abort_all()
        self.assertTrue(transport.disconnecting or client.gone)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_shutdown_after_the_dot_waits_for_its_reply(self) -> None:
        # The next hop's answer to the dot decides whether the message goes again after a
        # restart: a shutdown lets it come (then closes), it does not drop it.
        courier = self.courier([MXHost("mx.far.test", 10, ("127.0.0.2",))])
        d, client, transport = self.deliver_one(courier)
        self.up_to_the_dot(client, transport)
        self.assertTrue(transport.value().endswith(b"\r\n.\r\n"))
        courier.abort_all()
        client.stop(STOP_REPLY_GRACE)  # asked again: still waits
        self.assertFalse(transport.disconnecting)
        self.assertNoResult(d)
        self.clock.advance(STOP_REPLY_GRACE - 1)
        transport.clear()
        client.dataReceived(b"250 2.0.0 queued\r\n")
        self.assertIsInstance(self.successResultOf(d)[0].outcome, Delivered)
        # Not kept for another message: it says goodbye.
        self.assertEqual(transport.value(), b"QUIT\r\n")
        self.assertEqual(self.clock.getDelayedCalls()[0].getTime() - self.clock.seconds(),
                         Timeouts().command)

    def test_shutdown_after_the_dot_gives_up_after_the_grace(self) -> None:
        courier = self.courier([MXHost("mx.far.test", 10, ("127.0.0.2",))])
        d, client, transport = self.deliver_one(courier)
        self.up_to_the_dot(client, transport)
        courier.abort_all()
        self.clock.advance(STOP_REPLY_GRACE)
        self.assertTrue(transport.disconnecting)
        (result,) = self.successResultOf(d)
        self.assertEqual((type(result.outcome), result.outcome.status), (Deferred, "4.4.2"))

    def test_shutdown_before_the_dot_drops_the_connection_at_once(self) -> None:
        courier = self.courier([MXHost("mx.far.test", 10, ("127.0.0.2",))])
        d, client, transport = self.deliver_one(courier)
        client.dataReceived(b"250 ok\r\n")  # MAIL; RCPT and DATA answers still to come
        courier.abort_all()
        self.assertTrue(transport.disconnecting)
        (result,) = self.successResultOf(d)
        self.assertEqual((type(result.outcome), result.outcome.status), (Deferred, "4.3.2"))


# -- MTA-STS: the policy's verdicts on MX hosts [RFC 8461 4, 5] --------------------------------

class STSTest(CourierTest):
    """The courier under an MTA-STS policy (given by a stub; discovery is test_mta_sts.py)."""

    def setUp(self) -> None:
        super().setUp()
        from twisted.logger import formatEvent, globalLogPublisher
        self.lines: list[str] = []

        def observe(event: dict) -> None:
            if event.get("mta_event") == "sts":
                self.lines.append(formatEvent(event))
        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def policy(self, mode: str, *mx: str) -> None:
        from mta.delivery.mta_sts import Policy
        self.sts.policies["far.test"] = Policy(mode, mx, 86400, "7", 0.0)

    def starttls(self, client: SMTPClient, transport: StringTransport) -> None:
        """The peer offers STARTTLS, says 220 and (as if the handshake worked) EHLO again."""
        transport.startTLS = lambda options: None
        client.dataReceived(EHLO + b"220 go ahead\r\n")
        client.dataReceived(b"250-peer\r\n250 PIPELINING\r\n")

    def test_enforce_skips_hosts_outside_the_policy_and_verifies_the_others(self) -> None:
        self.policy("enforce", "*.good.test")
        hosts = [MXHost("mx1.far.test", 10, ("127.0.0.2",)),
                 MXHost("mx.good.test", 20, ("127.0.0.3",))]
        d = self.deliver(self.courier(hosts), "a@far.test")
        self.assertEqual(self.sts.asked, ["far.test"])
        (address, policy, client, transport), = self.connections  # mx1 never tried
        self.assertEqual((address, policy.tls, policy.peer_name), ("127.0.0.3", "verify",
                                                                    "mx.good.test"))
        self.starttls(client, transport)
        self.finish(client, transport, b"250 ok\r\n250 ok\r\n354 go\r\n")
        (result,) = self.successResultOf(d)
        self.assertIsInstance(result.outcome, Delivered)
        self.assertEqual(self.lines, [
            ("ABC: to=<a@far.test>, sts=enforce, domain=far.test, policy_id=7, "
            "mx=mx1.far.test: refused (MX host not in the policy's mx patterns)"),
            ("ABC: to=<a@far.test>, sts=enforce, domain=far.test, policy_id=7, "
            "mx=mx.good.test[127.0.0.3]: verified")])

    def test_enforce_with_no_host_left_defers_with_the_reason(self) -> None:
        self.policy("enforce", "mx.other.test")
        hosts = [MXHost("mx1.far.test", 10, ("127.0.0.2",)),
                 MXHost("mx2.far.test", 20, ("127.0.0.3",))]
        a, b = self.successResultOf(self.deliver(self.courier(hosts), "a@far.test",
                                                 "b@far.test"))
        self.assertEqual(self.connections, [])
        self.assertEqual((type(a.outcome), a.outcome.status, a.relay), (Deferred, "4.7.5", "none"))
        self.assertEqual(a.outcome.diagnostic,
                         "MTA-STS policy of far.test (mode enforce, id 7) refused "
                         "mx1.far.test: MX host not in the policy's mx patterns; "
                         "mx2.far.test: MX host not in the policy's mx patterns")
        self.assertEqual(b.outcome, a.outcome)
        self.assertIn("ABC: to=<a@far.test>, nrcpt=2, sts=enforce", self.lines[0])

    def test_enforce_refuses_a_host_without_starttls(self) -> None:
        self.policy("enforce", "mx.far.test")
        d = self.deliver(self.courier([MXHost("mx.far.test", 10, ("127.0.0.2",))]),
                         "a@far.test")
        _, _, client, transport = self.connections[0]
        client.dataReceived(b"220 peer\r\n250-peer\r\n250 PIPELINING\r\n")
        self.assertNotIn(b"MAIL FROM", transport.value())
        client.dataReceived(b"221 bye\r\n")
        (result,) = self.successResultOf(d)
        self.assertEqual(len(self.connections), 1)  # no plain-text retry
        self.assertEqual((result.outcome.status, result.outcome.diagnostic), (
            "4.7.5", ("MTA-STS policy of far.test (mode enforce, id 7) refused "
                     "mx.far.test[127.0.0.2]: TLS is required but mx.far.test does not "
                     "offer STARTTLS")))

    def test_enforce_refuses_a_failed_handshake(self) -> None:
        self.policy("enforce", "mx.far.test")
        d = self.deliver(self.courier([MXHost("mx.far.test", 10, ("127.0.0.2",))]),
                         "a@far.test")
        _, _, client, transport = self.connections[0]
        transport.startTLS = lambda options: None
        client.dataReceived(EHLO + b"220 go ahead\r\n")
        from OpenSSL import SSL
        client.connectionLost(Failure(SSL.Error([("SSL routines", "",
                                                  "certificate verify failed")])))
        (result,) = self.successResultOf(d)
        self.assertEqual(len(self.connections), 1)
        self.assertEqual(result.outcome.diagnostic,
                         "MTA-STS policy of far.test (mode enforce, id 7) refused "
                         "mx.far.test[127.0.0.2]: TLS handshake with mx.far.test failed: "
                         "certificate verify failed")
        self.assertIn("mx=mx.far.test[127.0.0.2]: refused (TLS handshake with mx.far.test "
                      "failed: certificate verify failed)", self.lines[0])

    def test_a_refused_host_and_a_dead_one_are_both_named(self) -> None:
        self.policy("enforce", "mx2.far.test")
        self.refuse = {"127.0.0.3"}
        hosts = [MXHost("mx1.far.test", 10, ("127.0.0.2",)),
                 MXHost("mx2.far.test", 20, ("127.0.0.3",))]
        (result,) = self.successResultOf(self.deliver(self.courier(hosts), "a@far.test"))
        self.assertEqual(result.outcome.diagnostic,
                         "MTA-STS policy of far.test (mode enforce, id 7) refused "
                         "mx1.far.test: MX host not in the policy's mx patterns; "
                         "connect to mx2.far.test[127.0.0.3]:25: connection refused")

    def test_testing_delivers_and_logs_what_enforce_would_refuse(self) -> None:
        self.policy("testing", "mx.other.test")
        d = self.deliver(self.courier([MXHost("mx.far.test", 10, ("127.0.0.2",))]),
                         "a@far.test")
        _, policy, client, transport = self.connections[0]
        self.assertEqual((policy.tls, policy.check_identity), ("opportunistic", True))
        client.dataReceived(b"220 peer\r\n250-peer\r\n250 PIPELINING\r\n")  # no STARTTLS
        self.finish(client, transport, b"250 ok\r\n250 ok\r\n354 go\r\n")
        self.assertIsInstance(self.successResultOf(d)[0].outcome, Delivered)
        self.assertEqual(self.lines, [
            ("ABC: to=<a@far.test>, sts=testing, domain=far.test, policy_id=7, "
            "mx=mx.far.test: would refuse (MX host not in the policy's mx patterns)"),
            ("ABC: to=<a@far.test>, sts=testing, domain=far.test, policy_id=7, "
            "mx=mx.far.test[127.0.0.2]: would refuse (STARTTLS not offered)")])

    def test_testing_after_a_failed_handshake_says_so_once(self) -> None:
        self.policy("testing", "mx.far.test")
        d = self.deliver(self.courier([MXHost("mx.far.test", 10, ("127.0.0.2",))]),
                         "a@far.test")
        _, _, client, transport = self.connections[0]
        transport.startTLS = lambda options: None
        client.dataReceived(EHLO + b"220 go ahead\r\n")
        client.connectionLost(Failure(Exception("handshake failure")))
        _, policy, client, transport = self.connections[1]  # plain text, as before
        self.assertEqual(policy.tls, "off")
        client.dataReceived(EHLO)
        self.finish(client, transport, b"250 ok\r\n250 ok\r\n354 go\r\n")
        self.assertIsInstance(self.successResultOf(d)[0].outcome, Delivered)
        self.assertEqual(len(self.lines), 1)
        self.assertIn("would refuse (TLS handshake with mx.far.test failed: handshake failure)",
                      self.lines[0])

    def test_no_policy_means_the_hops_own_tls(self) -> None:
        d = self.deliver(self.courier([MXHost("mx.far.test", 10, ("127.0.0.2",))]),
                         "a@far.test")
        _, policy, _, _ = self.connections[0]
        self.assertEqual((policy.tls, policy.check_identity), ("opportunistic", False))
        self.assertEqual(self.sts.asked, ["far.test"])
        self.assertNoResult(d)
        self.assertEqual(self.lines, [])

    def test_explicit_routes_never_ask(self) -> None:
        self.deliver(self.courier([MXHost("10.0.0.5", 0, ("10.0.0.5",))]), "a@fwd.test")
        self.deliver(self.courier([MXHost("inner.test", 0, ("10.0.0.6",))]), "a@mxfwd.test")
        self.assertEqual(self.sts.asked, [])

    def test_shutdown_stops_policy_fetches(self) -> None:
        courier = self.courier([])
        courier.abort_all()
        self.assertTrue(self.sts.aborted)


def test_one_route_with_two_tls_levels_is_two_transactions() -> None:
    """Recipients of two domains routed to one host share a transaction, unless their
    [tls_policy] levels differ: each group goes with its own TLS policy."""
    from mta.delivery.attempt import Attempts
    domains = {name: {"route": "smtp:[10.0.0.5]:2525"} for name in ("a.test", "b.test", "c.test")}
    cfg = config_mod.from_dict({"domains": domains, "tls_policy": {"c.test": "verify"}})
    attempts = Attempts(cfg, None, Router(cfg), {}, None, None, None, None, None, lambda: False)
    envelope = Envelope("ABC", "s@here.test",
                        [Recipient("x@a.test"), Recipient("y@b.test"), Recipient("z@c.test")], 0.0)
    groups = attempts._groups(envelope, attempts.scheduled())
    assert sorted((hop.tls, indices) for hop, indices in groups.values()) == \
        [("opportunistic", [0, 1]), ("verify", [2])]


def test_a_reload_brings_new_tls_policies_to_the_next_attempt() -> None:
    live = config_mod.Live(config_mod.from_dict({}))
    router = Router(live)
    assert (router.next_hop("a@far.test").tls, router.next_hop("a@far.test").sts) == \
        ("opportunistic", True)
    live.swap(config_mod.from_dict({"relay": {"mta_sts": False},
                                    "tls_policy": {"far.test": "encrypt"}}))
    assert (router.next_hop("a@far.test").tls, router.next_hop("a@far.test").sts) == \
        ("required", False)
    assert router.next_hop("a@near.test").sts is False
