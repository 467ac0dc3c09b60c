"""TLS (mta.tls): handshakes against Python's ssl module and Twisted.

The server side is our pyOpenSSL context; the client side is the standard
library's `ssl` (a separate OpenSSL build and API) driven through memory
BIOs, or Twisted's own TLS client for `client_options`; those handshakes are
pumped by hand, without sockets or reactor.  The last tests use real loopback
sockets and smtplib in a thread, to prove `transport.startTLS(server_tls)`
and `wrap_factory` on a real reactor.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import smtplib
import ssl
import stat
import tempfile
import warnings
from pathlib import Path

import pytest
from cryptography import x509
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer, reactor, task, threads
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.basic import LineReceiver
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import TestCase as TrialTestCase

from mta import tls
from tests.testca import TestCA


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """Two self-signed certificates, as `mta make-cert` writes them."""
    root = tmp_path_factory.mktemp("certs")
    tls.make_cert(root / "a.pem", root / "a.key", "mx.example.org")
    tls.make_cert(root / "b.pem", root / "b.key", "mx2.example.org")
    return root


def stdlib_client(cafile: Path | None, hostname: str | None = "localhost",
                  maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cafile is None:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context.load_verify_locations(cafile)
    if maximum is not None:
        context.maximum_version = maximum
    return context


class Handshake:
    """A stdlib client and a server `Connection` joined by memory BIOs."""

    def __init__(self, server_tls: tls.ServerTLS, client: ssl.SSLContext,
                 server_hostname: str | None = "localhost") -> None:
        self.server = server_tls.serverConnectionForTLS(None)
        self.server.set_accept_state()
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.client = client.wrap_bio(self.incoming, self.outgoing,
                                      server_hostname=server_hostname)

    def run(self) -> None:
        """Pump until both sides finish; errors from either side propagate."""
        for _ in range(10):
            client_done = self._step(self.client.do_handshake, ssl.SSLWantReadError)
            self._carry()
            server_done = self._step(self.server.do_handshake, SSL.WantReadError)
            self._carry()
            if client_done and server_done:
                return
        raise AssertionError("handshake did not finish")

    @staticmethod
    def _step(call, want_read) -> bool:
        try:
            call()
            return True
        except want_read:
            return False

    def _carry(self) -> None:
        if self.outgoing.pending:
            self.server.bio_write(self.outgoing.read())
        try:
            self.incoming.write(self.server.bio_read(65536))
        except SSL.WantReadError:
            pass

    def client_to_server(self, data: bytes) -> bytes:
        self.client.write(data)
        self._carry()
        return self.server.recv(65536)

    def server_to_client(self, data: bytes) -> bytes:
        self.server.send(data)
        self._carry()
        return self.client.read(65536)

    def peer_common_name(self) -> str:
        cert = x509.load_der_x509_certificate(self.client.getpeercert(binary_form=True))
        return cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value


# -- make-cert --------------------------------------------------------------------------

def test_make_cert_files(certs):
    assert stat.S_IMODE((certs / "a.key").stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate((certs / "a.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mx.example.org", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    assert cert.not_valid_after_utc - cert.not_valid_before_utc > datetime.timedelta(days=800)


def test_make_cert_loads_in_pythons_ssl(certs):
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(certs / "a.pem", certs / "a.key")
    client = stdlib_client(certs / "a.pem")
    client.load_verify_locations(certs / "a.pem")


def test_make_cert_in_one_file(tmp_path):
    both = tmp_path / "both.pem"
    tls.make_cert(both, both, "127.0.0.2")
    assert stat.S_IMODE(both.stat().st_mode) == 0o600
    ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(both)
    cert = x509.load_pem_x509_certificate(both.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.2") in san.get_values_for_type(x509.IPAddress)
    tls.ServerTLS(both)  # the key defaults to the certificate file


# -- the server context -------------------------------------------------------------------

@pytest.mark.parametrize("name", ["localhost", "mx.example.org"])
def test_handshake_with_verification(certs, name):
    handshake = Handshake(tls.ServerTLS(certs / "a.pem", certs / "a.key"),
                          stdlib_client(certs / "a.pem"), server_hostname=name)
    handshake.run()
    assert handshake.client.version() in ("TLSv1.2", "TLSv1.3")
    assert handshake.client_to_server(b"EHLO client.example\r\n") == b"EHLO client.example\r\n"
    assert handshake.server_to_client(b"250 ok\r\n") == b"250 ok\r\n"


def test_handshake_tls12_uses_forward_secret_aead(certs):
    handshake = Handshake(tls.ServerTLS(certs / "a.pem", certs / "a.key"),
                          stdlib_client(certs / "a.pem", maximum=ssl.TLSVersion.TLSv1_2))
    handshake.run()
    name, version, _ = handshake.client.cipher()
    assert version == "TLSv1.2"
    assert name.startswith("ECDHE-") and ("GCM" in name or "CHACHA20" in name)


def test_compression_is_off(certs):
    handshake = Handshake(tls.ServerTLS(certs / "a.pem", certs / "a.key"), stdlib_client(None))
    handshake.run()
    assert handshake.client.compression() is None


def test_wrong_name_fails_on_the_client(certs):
    handshake = Handshake(tls.ServerTLS(certs / "a.pem", certs / "a.key"),
                          stdlib_client(certs / "a.pem"), server_hostname="other.example")
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake.run()


def _cannot_offer_tls11(why: str) -> None:
    """A laptop whose OpenSSL lacks TLS 1.1 skips; CI must prove the refusal."""
    if os.environ.get("CI") == "true":
        pytest.fail(why)
    pytest.skip(why)


def test_tls11_is_refused(certs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        client = stdlib_client(None, maximum=ssl.TLSVersion.TLSv1_1)
        try:
            client.minimum_version = ssl.TLSVersion.TLSv1_1
            client.set_ciphers("DEFAULT:@SECLEVEL=0")
        except (ValueError, ssl.SSLError):
            _cannot_offer_tls11("this Python's OpenSSL cannot offer TLS 1.1")
    handshake = Handshake(tls.ServerTLS(certs / "a.pem", certs / "a.key"), client)
    try:
        handshake.run()
    except SSL.Error as e:  # the server said no: the proof we want
        assert "unsupported protocol" in str(e) or "version" in str(e)
    except ssl.SSLError as e:
        if "no protocols available" in str(e) or "NO_PROTOCOLS" in str(e):
            _cannot_offer_tls11(f"this Python's OpenSSL cannot offer TLS 1.1: {e}")
        raise
    else:
        pytest.fail("a TLS 1.1 handshake succeeded")


def test_reload_swaps_certificate_for_new_handshakes_only(certs, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes((certs / "a.pem").read_bytes())
    key.write_bytes((certs / "a.key").read_bytes())
    server_tls = tls.ServerTLS(cert, key)
    old = Handshake(server_tls, stdlib_client(None))
    old.run()
    assert old.peer_common_name() == "mx.example.org"

    cert.write_bytes((certs / "b.pem").read_bytes())
    key.write_bytes((certs / "b.key").read_bytes())
    assert server_tls.reload()

    new = Handshake(server_tls, stdlib_client(certs / "b.pem"))
    new.run()
    assert new.peer_common_name() == "mx2.example.org"
    # The session that started before the reload goes on undisturbed.
    assert old.client_to_server(b"DATA\r\n") == b"DATA\r\n"
    assert old.server_to_client(b"354 go ahead\r\n") == b"354 go ahead\r\n"


@pytest.mark.parametrize("damage", ["garbage", "mismatch", "missing"])
def test_reload_with_bad_files_keeps_the_old_certificate(certs, tmp_path, damage):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes((certs / "a.pem").read_bytes())
    key.write_bytes((certs / "a.key").read_bytes())
    server_tls = tls.ServerTLS(cert, key)
    if damage == "garbage":
        cert.write_text("-----BEGIN CERTIFICATE-----\nnot really\n-----END CERTIFICATE-----\n")
    elif damage == "mismatch":
        key.write_bytes((certs / "b.key").read_bytes())
    else:
        key.unlink()
    assert not server_tls.reload()
    handshake = Handshake(server_tls, stdlib_client(certs / "a.pem"))
    handshake.run()
    assert handshake.peer_common_name() == "mx.example.org"


def test_bad_files_at_start(certs, tmp_path):
    with pytest.raises(tls.TLSConfigError, match="private key does not match"):
        tls.ServerTLS(certs / "a.pem", certs / "b.key")
    with pytest.raises(tls.TLSConfigError, match="cannot load certificate"):
        tls.ServerTLS(tmp_path / "nothing.pem", certs / "a.key")
    empty = tmp_path / "empty.pem"
    empty.write_text("")
    with pytest.raises(tls.TLSConfigError, match=str(empty)):
        tls.ServerTLS(empty, certs / "a.key")


def test_encrypted_key_is_refused_without_prompting(certs, tmp_path):
    from cryptography.hazmat.primitives import serialization
    key = serialization.load_pem_private_key((certs / "a.key").read_bytes(), None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(tls.TLSConfigError, match="cannot load private key"):
        tls.ServerTLS(certs / "a.pem", encrypted)


def test_from_config(certs):
    from mta.config import from_dict
    assert tls.ServerTLS.from_config(from_dict({}, "<test>").tls) is None
    config = from_dict({"tls": {"certificate": str(certs / "a.pem"),
                                "key": str(certs / "a.key")}}, "<test>")
    assert tls.ServerTLS.from_config(config.tls).certificate == certs / "a.pem"


# -- through Twisted: implicit TLS and the client options ----------------------------------

class Greeter(Protocol):
    """Server side: greets, then echoes; records whether it runs inside TLS."""

    def connectionMade(self):
        self.tls = ISSLTransport.providedBy(self.transport)
        self.transport.write(b"220 ready\r\n")

    def dataReceived(self, data):
        self.transport.write(data)


class Client(Protocol):
    def __init__(self):
        self.received = b""
        self.lost = None

    def dataReceived(self, data):
        self.received += data
        if data == b"220 ready\r\n":
            self.transport.write(b"QUIT\r\n")

    def connectionLost(self, reason):
        self.lost = reason


class Recording(Factory):
    """Builds one protocol and keeps it, so the test can look at it afterwards."""

    def __init__(self, protocol):
        self.protocol = protocol
        self.built = None

    def buildProtocol(self, addr):
        self.built = super().buildProtocol(addr)
        return self.built


def twisted_dialog(server_tls, options):
    clock = task.Clock()
    server, client = Recording(Greeter), Recording(Client)
    server_factory = server_tls.wrap_factory(server, clock)
    client_factory = TLSMemoryBIOFactory(options, True, client, clock)
    _, _, pump = connectedServerAndClient(
        lambda: server_factory.buildProtocol(None), lambda: client_factory.buildProtocol(None),
        clock=clock)
    pump.flush()
    return client.built, server.built


def test_implicit_tls_with_verified_client(certs):
    server_tls = tls.ServerTLS(certs / "a.pem", certs / "a.key")
    options = tls.client_options("mx.example.org", verify=True, trust_root=certs / "a.pem")
    client, server = twisted_dialog(server_tls, options)
    assert server.tls
    assert client.received == b"220 ready\r\nQUIT\r\n"
    assert client.lost is None


def test_verified_client_refuses_a_wrong_name(certs):
    server_tls = tls.ServerTLS(certs / "a.pem", certs / "a.key")
    options = tls.client_options("mx3.example.org", verify=True, trust_root=certs / "a.pem")
    client, _ = twisted_dialog(server_tls, options)
    assert client.received == b""
    assert client.lost.check(VerificationError)  # service-identity said no


def test_verified_client_refuses_an_unknown_issuer(certs):
    server_tls = tls.ServerTLS(certs / "a.pem", certs / "a.key")
    options = tls.client_options("mx.example.org", verify=True, trust_root=certs / "b.pem")
    client, _ = twisted_dialog(server_tls, options)
    assert client.received == b""
    assert client.lost.check(SSL.Error)
    assert "certificate verify failed" in str(client.lost.value)


@pytest.mark.parametrize("hostname", ["mx.untrusted.example", "127.0.0.1", "[::1]"])
def test_opportunistic_client_takes_any_certificate(certs, hostname):
    server_tls = tls.ServerTLS(certs / "a.pem", certs / "a.key")
    client, _ = twisted_dialog(server_tls, tls.client_options(hostname, verify=False))
    assert client.received == b"220 ready\r\nQUIT\r\n"


def test_opportunistic_client_sends_sni():
    options = tls.client_options("mx.example.org.", verify=False)
    connection = options.clientConnectionForTLS(None)
    assert connection.get_servername() == b"mx.example.org"
    assert tls.client_options("192.0.2.1", verify=False).clientConnectionForTLS(None) \
        .get_servername() is None


def test_bad_trust_root(tmp_path):
    with pytest.raises(tls.TLSConfigError):
        tls.client_options("mx.example.org", verify=True, trust_root=tmp_path / "none.pem")


# -- over real loopback sockets: STARTTLS through transport.startTLS, implicit TLS ---------

class ToySMTP(LineReceiver):
    """Just enough SMTP for smtplib to reach TLS; not the real server."""

    def connectionMade(self):
        self.sendLine(b"220 toy ESMTP")

    def lineReceived(self, line):
        verb = line.split(b" ", 1)[0].upper()
        if verb == b"EHLO":
            tls_active = ISSLTransport.providedBy(self.transport)
            self.sendLine(b"250-toy" if not tls_active else b"250-toy (TLS)")
            self.sendLine(b"250 STARTTLS" if not tls_active else b"250 HELP")
        elif verb == b"STARTTLS":
            self.sendLine(b"220 2.0.0 ready to start TLS")
            self.transport.startTLS(self.factory.server_tls)
        elif verb == b"QUIT":
            self.sendLine(b"221 bye")
            self.transport.loseConnection()
        else:
            self.sendLine(b"250 ok")


def smtplib_session(port: int, cafile: Path, implicit: bool) -> tuple[str, str]:
    """Blocking: an smtplib session; returns the server's CN and the EHLO reply under TLS."""
    context = ssl.create_default_context(cafile=str(cafile))
    if implicit:
        client = smtplib.SMTP_SSL("127.0.0.1", port, context=context, timeout=10)
    else:
        client = smtplib.SMTP("127.0.0.1", port, timeout=10)
        client.starttls(context=context)
    with client:
        _, text = client.ehlo("client.example")
        der = client.sock.getpeercert(binary_form=True)
        cert = x509.load_der_x509_certificate(der)
        name = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
        assert client.noop()[0] == 250
    return name, text.decode()


class OverSockets(TrialTestCase):
    """The reactor, real TCP on 127.0.0.1 and Python's smtplib/ssl in a thread."""

    timeout = 30

    def setUp(self):
        root = Path(tempfile.mkdtemp(prefix="mta-test-tls-"))
        self.addCleanup(shutil.rmtree, root, True)
        self.root = root
        tls.make_cert(root / "a.pem", root / "a.key", "localhost")
        tls.make_cert(root / "b.pem", root / "b.key", "127.0.0.1")
        self.cert, self.key = root / "cert.pem", root / "key.pem"
        self.install("a")
        self.server_tls = tls.ServerTLS(self.cert, self.key)
        factory = Factory.forProtocol(ToySMTP)
        factory.server_tls = self.server_tls
        self.plain = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.implicit = reactor.listenTCP(0, self.server_tls.wrap_factory(factory),
                                          interface="127.0.0.1")

    def install(self, which):
        self.cert.write_bytes((self.root / f"{which}.pem").read_bytes())
        self.key.write_bytes((self.root / f"{which}.key").read_bytes())

    def tearDown(self):
        return defer.gatherResults([self.plain.stopListening(), self.implicit.stopListening()])

    @defer.inlineCallbacks
    def test_starttls_then_reload(self):
        port = self.plain.getHost().port
        name, ehlo = yield threads.deferToThread(
            smtplib_session, port, self.root / "a.pem", False)
        self.assertEqual((name, ehlo), ("localhost", "toy (TLS)\nHELP"))
        self.install("b")
        self.assertTrue(self.server_tls.reload())
        name, _ = yield threads.deferToThread(smtplib_session, port, self.root / "b.pem", False)
        self.assertEqual(name, "127.0.0.1")

    @defer.inlineCallbacks
    def test_implicit_tls(self):
        port = self.implicit.getHost().port
        name, ehlo = yield threads.deferToThread(
            smtplib_session, port, self.root / "a.pem", True)
        self.assertEqual((name, ehlo), ("localhost", "toy (TLS)\nHELP"))


# -- checking without refusing (MTA-STS testing mode) -------------------------------------

def test_checking_client_finds_a_good_certificate(certs):
    server_tls = tls.ServerTLS(certs / "a.pem", certs / "a.key")
    options = tls.client_options("mx.example.org", verify=False, trust_root=certs / "a.pem",
                                 check=True)
    assert options.problem == "no TLS handshake"
    client, _ = twisted_dialog(server_tls, options)
    assert client.received == b"220 ready\r\nQUIT\r\n"
    assert options.problem is None


def test_checking_client_takes_a_wrong_name_and_says_so(certs):
    server_tls = tls.ServerTLS(certs / "a.pem", certs / "a.key")
    options = tls.client_options("mx3.example.org", verify=False, trust_root=certs / "a.pem",
                                 check=True)
    client, _ = twisted_dialog(server_tls, options)
    assert client.received == b"220 ready\r\nQUIT\r\n"  # the session went on
    assert options.problem == "certificate does not name mx3.example.org"


def test_checking_client_takes_an_unknown_issuer_and_says_so(certs):
    server_tls = tls.ServerTLS(certs / "a.pem", certs / "a.key")
    options = tls.client_options("mx.example.org", verify=False, trust_root=certs / "b.pem",
                                 check=True)
    client, _ = twisted_dialog(server_tls, options)
    assert client.received == b"220 ready\r\nQUIT\r\n"
    assert options.problem.startswith("certificate verify failed: ")
    assert "self-signed" in options.problem or "self signed" in options.problem


def test_checking_client_sends_sni_and_needs_a_readable_trust_root(tmp_path):
    options = tls.client_options("mx.example.org.", verify=False, check=True)
    assert options.clientConnectionForTLS(None).get_servername() == b"mx.example.org"
    with pytest.raises(tls.TLSConfigError, match="none.pem"):
        tls.client_options("mx.example.org", verify=False, trust_root=tmp_path / "none.pem",
                           check=True)


def test_handshake_failures_in_one_line(certs):
    server_tls = tls.ServerTLS(certs / "a.pem", certs / "a.key")
    wrong = tls.client_options("mx3.example.org", verify=True, trust_root=certs / "a.pem")
    client, _ = twisted_dialog(server_tls, wrong)
    assert tls.describe_failure(client.lost.value) == "certificate does not name mx3.example.org"
    unknown = tls.client_options("mx.example.org", verify=True, trust_root=certs / "b.pem")
    client, _ = twisted_dialog(server_tls, unknown)
    assert tls.describe_failure(client.lost.value) == "certificate verify failed"
    assert tls.describe_failure(ValueError("odd")) == "odd"
    # With the handshake's options, the reason OpenSSL's error leaves out.
    assert tls.describe_failure(client.lost.value, unknown) == \
        "certificate verify failed: self-signed certificate"


def test_a_refused_chain_says_why(tmp_path):
    """"certificate verify failed" alone sends the operator to openssl s_client; the
    deferral says what was wrong (expired, unknown issuer)."""
    ca = TestCA(tmp_path / "ca")
    expired = tls.ServerTLS(*ca.issue("old", "mx.example.org", days=-1))
    options = tls.client_options("mx.example.org", verify=True, trust_root=ca.path)
    client, _ = twisted_dialog(expired, options)
    assert client.lost.check(SSL.Error)
    assert tls.describe_failure(client.lost.value, options) == \
        "certificate verify failed: certificate has expired"
    good = tls.ServerTLS(*ca.issue("new", "mx.example.org"))
    other = TestCA(tmp_path / "other", "another CA")
    options = tls.client_options("mx.example.org", verify=True, trust_root=other.path)
    client, _ = twisted_dialog(good, options)
    assert tls.describe_failure(client.lost.value, options) == \
        "certificate verify failed: self-signed certificate in certificate chain"
    options = tls.client_options("mx.example.org", verify=True, trust_root=ca.path)
    client, _ = twisted_dialog(good, options)
    assert client.lost is None and options.chain_problem is None
