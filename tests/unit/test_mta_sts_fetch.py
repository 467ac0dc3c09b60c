"""The MTA-STS policy fetch (mta.delivery.mta_sts) over real loopback HTTPS [RFC 8461 3.3].

The peer is twisted.web with our server TLS context and certificates from a test CA
(tests/testca.py), on 127.0.0.1 at a free port; the client is the real fetch on the
real reactor (trial drives it).  Each test names what the server does wrong, and the
reason the fetch gives.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from mta import config as config_mod
from mta import tls
from mta.delivery.mta_sts import (
    MAX_RESPONSE_SIZE,
    FetchError,
    Policies,
    fetch_policy_text,
    parse_policy,
)
from mta.delivery.mx import MXHost
from tests.testca import TestCA

POLICY = b"version: STSv1\r\nmode: enforce\r\nmx: mx.example.test\r\nmax_age: 604800\r\n"


class PolicyResource(Resource):
    """/.well-known/mta-sts.txt, served as `behaviour` says."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.behaviour = "good"
        self.requests: list[tuple[bytes, bytes | None]] = []

    def render_GET(self, request: Any) -> Any:
        self.requests.append((request.path, request.getHeader(b"host")))
        if request.path != b"/.well-known/mta-sts.txt":
            request.setResponseCode(404)
            return b"not here"
        if self.behaviour == "redirect":
            request.setResponseCode(301)
            request.setHeader(b"location", b"https://elsewhere.test/policy.txt")
            return b""
        if self.behaviour == "missing":
            request.setResponseCode(404)
            return b"no policy"
        if self.behaviour == "slow":
            return NOT_DONE_YET
        request.setHeader(b"content-type", b"text/html" if self.behaviour == "html"
                          else b"text/plain; charset=utf-8")
        if self.behaviour == "big":
            return b"#" * (64 * 1024 + 1)
        if self.behaviour == "big-chunked":  # no Content-Length: the cap must cut it
            for _ in range(70):
                request.write(b"#" * 1024)
            request.finish()
            return NOT_DONE_YET
        return POLICY


class HeaderFlood(Protocol):
    """A policy host that answers 200 and then sends header fields (or one field's
    continuation lines) and never ends them: 2 MiB of them, then it waits."""

    continuation = False

    def connectionMade(self) -> None:
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n")
        line = b" " + b"a" * 1000 + b"\r\n" if self.continuation else \
            b"X-Junk: " + b"a" * 1000 + b"\r\n"
        self.transport.write(line * 2048)


class FetchTest(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="mta-test-sts-fetch-"))
        self.addCleanup(shutil.rmtree, self.root, True)
        self.ca = TestCA(self.root / "ca")
        self.other_ca = TestCA(self.root / "other-ca", "another CA")
        self.resource = PolicyResource()
        self.port = None

    def serve(self, *names: str, days: int = 30) -> int:
        cert, key = self.ca.issue("policy-host", *(names or ("mta-sts.example.test",)),
                                  days=days)
        factory = tls.ServerTLS(cert, key).wrap_factory(Site(self.resource))
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        return self.port.getHost().port

    def serve_raw(self, protocol: type[Protocol]) -> int:
        cert, key = self.ca.issue("policy-host", "mta-sts.example.test")
        factory = tls.ServerTLS(cert, key).wrap_factory(Factory.forProtocol(protocol))
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        return self.port.getHost().port

    def fetch(self, port: int, trust_root: Path | None = None,
              addresses: tuple[str, ...] = ("127.0.0.1",)) -> defer.Deferred:
        return fetch_policy_text(reactor, "example.test", addresses, port,
                                 trust_root or self.ca.path, connect_timeout=5)

    @defer.inlineCallbacks
    def fails(self, d: defer.Deferred, why: str) -> Any:
        try:
            yield d
        except FetchError as e:
            self.assertIn(why, str(e))
        else:
            self.fail(f"no FetchError ({why})")
        yield task.deferLater(reactor, 0.05, lambda: None)  # let the connection close

    @defer.inlineCallbacks
    def test_good_policy(self) -> Any:
        port = self.serve()
        text = yield self.fetch(port)
        self.assertEqual(parse_policy(text).mx, ("mx.example.test",))
        # The URL's host and port, whatever address was connected to [RFC 8461 3.3].
        self.assertEqual(self.resource.requests,
                         [(b"/.well-known/mta-sts.txt", f"mta-sts.example.test:{port}".encode())])
        yield task.deferLater(reactor, 0.05, lambda: None)

    @defer.inlineCallbacks
    def test_the_next_address_after_a_refused_connection(self) -> Any:
        port = self.serve()
        text = yield self.fetch(port, addresses=("127.0.0.9", "127.0.0.1"))
        self.assertIn("mode: enforce", text)
        yield task.deferLater(reactor, 0.05, lambda: None)

    def test_no_address_answers(self) -> Any:
        port = self.serve()
        return self.fails(self.fetch(port, addresses=("127.0.0.9",)),
                          "cannot connect to mta-sts.example.test: 127.0.0.9: "
                          "connection refused")

    def test_certificate_for_another_name(self) -> Any:
        port = self.serve("mta-sts.other.test")
        return self.fails(self.fetch(port),
                          "127.0.0.1: certificate does not name mta-sts.example.test")

    def test_certificate_from_an_unknown_ca(self) -> Any:
        port = self.serve()
        return self.fails(self.fetch(port, trust_root=self.other_ca.path),
                          "127.0.0.1: certificate verify failed")

    def test_an_expired_certificate_says_so(self) -> Any:
        return self.fails(self.fetch(self.serve(days=-1)),
                          "127.0.0.1: certificate verify failed: certificate has expired")

    def test_redirects_are_not_followed(self) -> Any:
        self.resource.behaviour = "redirect"
        return self.fails(self.fetch(self.serve()), "HTTP 301 Moved Permanently: redirect to "
                                                    "https://elsewhere.test/policy.txt not followed")

    def test_not_found(self) -> Any:
        self.resource.behaviour = "missing"
        return self.fails(self.fetch(self.serve()), "HTTP 404 Not Found")

    def test_media_type_must_be_text_plain(self) -> Any:
        self.resource.behaviour = "html"
        return self.fails(self.fetch(self.serve()), "media type text/html, not text/plain")

    def test_a_policy_over_64_kib_is_refused(self) -> Any:
        self.resource.behaviour = "big"
        return self.fails(self.fetch(self.serve()), "policy of 65537 octets, more than 65536")

    def test_a_policy_over_64_kib_without_length_is_cut(self) -> Any:
        self.resource.behaviour = "big-chunked"
        return self.fails(self.fetch(self.serve()), "policy larger than 65536 octets")

    def test_header_fields_that_never_end_are_cut(self) -> Any:
        """Twisted's HTTP client bounds neither the number nor the length of header
        fields: without a cap on the whole answer, a hostile policy host fills our memory
        until the fetch times out (gigabytes in seconds over a fast link)."""
        d = self.fetch(self.serve_raw(HeaderFlood)).addTimeout(10, reactor)
        return self.fails(d, f"127.0.0.1: the answer exceeded {MAX_RESPONSE_SIZE} octets")

    def test_a_header_field_continued_forever_is_cut(self) -> Any:
        class Continued(HeaderFlood):
            continuation = True
        d = self.fetch(self.serve_raw(Continued)).addTimeout(10, reactor)
        return self.fails(d, f"127.0.0.1: the answer exceeded {MAX_RESPONSE_SIZE} octets")

    @defer.inlineCallbacks
    def test_the_whole_lookup_with_a_timeout(self) -> Any:
        """Policies: the policy host's address from the resolver, the configured port and
        CA; a server that never answers costs `fetch_timeout`, then the fetch fails."""
        self.resource.behaviour = "slow"
        port = self.serve()

        class Resolver:
            resolver = None

            def resolve_host(self, name: str) -> list[MXHost]:
                assert name == "mta-sts.example.test"
                return [MXHost(name, 0, ("127.0.0.1",))]

        config = config_mod.from_dict({
            "server": {"spool": str(self.root / "spool")},
            "relay": {"mta_sts_port": port, "tls_ca_file": str(self.ca.path)}})
        policies = Policies(config, reactor, defer.maybeDeferred, Resolver, fetch_timeout=0.5)
        started = reactor.seconds()
        yield self.fails(policies.fetch("example.test"), "no complete answer within 0.5s")
        self.assertLess(reactor.seconds() - started, 5)
        self.resource.behaviour = "good"
        policy = yield policies.fetch("example.test")
        self.assertEqual(policy.mode, "enforce")
        yield task.deferLater(reactor, 0.05, lambda: None)
