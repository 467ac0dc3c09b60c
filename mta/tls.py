"""TLS: the server's certificate (STARTTLS and implicit TLS), client options, make-cert.

What it owns:

- `ServerTLS`, built from ``[tls] certificate`` and ``key``: an
  `IOpenSSLServerConnectionCreator` that ``transport.startTLS(server_tls)``
  (STARTTLS, RFC 3207) and `wrap_factory` (implicit TLS on 465, RFC 8314 3.3)
  both take.  Its context allows TLS 1.2 and 1.3 only, no compression (CRIME),
  no renegotiation, server cipher preference.  `reload()` re-reads the files
  (on SIGHUP, say) and swaps the context for new handshakes; sessions already
  running keep the one they started with.  If the new files are bad, reload
  logs the error and keeps the old context.
- `client_options(hostname, verify)` for the outbound SMTP client and the
  MTA-STS policy fetch: with `verify`, Twisted's `optionsForClientTLS` (chain
  to a trust root, and the name checked by service-identity); without,
  opportunistic TLS [RFC 7435]: encrypt, send SNI, but accept any
  certificate (as Postfix's "may" level).  With `check` as well, the
  certificate is checked as `verify` would and any is still taken: the
  options' `problem` says what `verify` would have refused (MTA-STS
  "testing" mode, which delivers anyway and reports [RFC 8461 5]).
  `describe_failure` turns a failed handshake into one short line.
- `make_cert(cert_path, key_path, hostname)` for ``mta make-cert``: a
  self-signed certificate (RSA 2048, SHA-256) naming `hostname`, localhost,
  127.0.0.1 and ::1.

Cipher choice: the TLS 1.2 list prefers forward-secret AEAD suites, then
keeps ECDHE-CBC and RSA-AES-GCM for old peers, because on port 25 a failed
handshake usually means the peer retries in plain text [RFC 7435 3]; RC4,
3DES, NULL, export and anonymous suites are out.  TLS 1.3 suites are
OpenSSL's defaults, which are all good.

What errors mean: `TLSConfigError` is a certificate or key we cannot use
(missing file, bad PEM, a key that does not match, an encrypted key); its
message is one line naming the file.  Handshake failures surface on the
connection, as Twisted reports them.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL, crypto
from service_identity import CertificateError, VerificationError
from service_identity.pyopenssl import verify_hostname, verify_ip_address
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IReactorTime,
)
from twisted.internet.ssl import (
    Certificate,
    TLSVersion,
    optionsForClientTLS,
    trustRootFromCertificates,
)
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from mta.safeio import write_atomic

log = Logger()

SERVER_CIPHERS = (
    "ECDHE+AESGCM:ECDHE+CHACHA20:ECDHE+AES:RSA+AESGCM"
    ":!aNULL:!eNULL:!EXPORT:!MD5:!RC4:!3DES:!DSS:!PSK:!SRP:!AESCCM8"
)
_OPTIONS = (
    SSL.OP_NO_COMPRESSION
    | SSL.OP_NO_RENEGOTIATION
    | SSL.OP_CIPHER_SERVER_PREFERENCE
    | SSL.OP_SINGLE_ECDH_USE
)
EXPIRY_WARNING = datetime.timedelta(days=14)


class TLSConfigError(Exception):
    """A certificate or key we cannot use; the message is one line naming the file."""


# -- the server side -------------------------------------------------------------------

def server_context(certificate: Path, key: Path) -> SSL.Context:
    """A fresh context for `certificate` (a PEM chain, leaf first) and its `key`."""
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_options(_OPTIONS)
    context.set_cipher_list(SERVER_CIPHERS.encode("ascii"))
    try:
        context.use_certificate_chain_file(str(certificate))
    except SSL.Error as e:
        raise TLSConfigError(f"{certificate}: cannot load certificate: {_why(e)}") from None
    try:
        context.use_privatekey(_private_key(key))
        context.check_privatekey()
    except SSL.Error:
        raise TLSConfigError(f"{key}: private key does not match {certificate}") from None
    return context


def _private_key(path: Path) -> Any:
    """The first private key in a PEM file; never prompts for a passphrase."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TLSConfigError(f"{path}: cannot load private key: {e.strerror}") from None
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TLSConfigError(
            f"{path}: cannot load private key: it is encrypted; mta needs it unencrypted"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise TLSConfigError(f"{path}: cannot load private key: {e}") from None


def _why(error: SSL.Error) -> str:
    """OpenSSL's error queue, a list of (library, function, reason), as one short line."""
    queue = error.args[0] if error.args and isinstance(error.args[0], list) else []
    reasons = [str(item[-1]) for item in queue if isinstance(item, tuple) and item]
    return "; ".join(reasons) or str(error) or "unknown OpenSSL error"


def describe_certificate(path: Path) -> str:
    """Subject and expiry of the first certificate in `path`, for the log."""
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return f"{cert.subject.rfc4514_string()}, valid until {cert.not_valid_after_utc:%Y-%m-%d}"


def _expiry_check(path: Path, now: datetime.datetime | None = None) -> None:
    now = now or datetime.datetime.now(datetime.UTC)
    try:
        not_after = x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc
    except (OSError, ValueError):
        return  # OpenSSL accepted it: a format we cannot read here is not worth failing for
    if not_after < now:
        log.error("TLS certificate {path} expired on {when:%Y-%m-%d}", path=path, when=not_after)
    elif not_after - now < EXPIRY_WARNING:
        log.warn(  # noqa: G010 (twisted.logger has no .warning)
            "TLS certificate {path} expires on {when:%Y-%m-%d}", path=path, when=not_after)


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """The server's TLS settings; give it to ``transport.startTLS`` or use `wrap_factory`.

    Raises `TLSConfigError` when the files cannot be used at start.
    """

    def __init__(self, certificate: str | Path, key: str | Path | None = None) -> None:
        self.certificate = Path(certificate)
        self.key = Path(key) if key is not None else self.certificate
        self._context = self._load()

    @classmethod
    def from_config(cls, tls: Any) -> ServerTLS | None:
        """From the ``[tls]`` section; None when no certificate is configured."""
        if tls.certificate is None:
            return None
        return cls(tls.certificate, tls.key)

    def _load(self) -> SSL.Context:
        context = server_context(self.certificate, self.key)
        _expiry_check(self.certificate)
        return context

    def reload(self) -> bool:
        """Re-read the files; True if new handshakes now use them, False if we kept the old."""
        try:
            context = self._load()
        except (TLSConfigError, OSError) as e:
            log.error("TLS reload failed, keeping the previous certificate: {why}", why=e)
            return False
        self._context = context
        log.info("TLS certificate reloaded: {what}", what=self.describe())
        return True

    def adopt(self, new: ServerTLS) -> None:
        """A reload: use `new`'s files and context for the handshakes from now on."""
        self.certificate, self.key, self._context = new.certificate, new.key, new._context
        log.info("TLS certificate reloaded: {what}", what=self.describe())

    def describe(self) -> str:
        """Subject and expiry of the certificate in use, for the start-up log."""
        try:
            return describe_certificate(self.certificate)
        except (OSError, ValueError):
            return str(self.certificate)

    def serverConnectionForTLS(self, tls_protocol: Any) -> SSL.Connection:
        """Twisted's hook: one `Connection` per handshake, from the current context."""
        return SSL.Connection(self._context, None)

    def wrap_factory(self, factory: IProtocolFactory,
                     clock: IReactorTime | None = None) -> TLSMemoryBIOFactory:
        """Implicit TLS (465, RFC 8314 3.3): `factory`'s protocols speak inside TLS from
        the first byte.  Listen with a plain ``tcp:`` endpoint and this factory.

        `clock` (default: the reactor) schedules the flushing of buffered writes.
        """
        return TLSMemoryBIOFactory(self, False, factory, clock)


# -- the client side ---------------------------------------------------------------------

def client_options(hostname: str, verify: bool, trust_root: str | Path | None = None,
                   check: bool = False) -> IOpenSSLClientConnectionCreator:
    """TLS options for connecting to `hostname` (give them to ``startTLS``).

    With `verify`, the chain must lead to `trust_root` (a PEM file of CA
    certificates; default: the platform's store) and the certificate must
    name `hostname` (service-identity).  Without, any certificate is taken;
    with `check` too, it is checked all the same and the options'
    `problem` tells the result (`CheckingClientTLS`).  All send SNI when
    `hostname` is a DNS name, and none goes below TLS 1.2.  Options serve
    one connection.
    """
    if not verify:
        if check:
            return CheckingClientTLS(hostname, trust_root)
        return OpportunisticClientTLS(hostname)
    trust = _trust_root(Path(trust_root)) if trust_root is not None else None
    return VerifyingClientTLS(optionsForClientTLS(
        hostname, trustRoot=trust,
        extraCertificateOptions={"raiseMinimumTo": TLSVersion.TLSv1_2},
    ), Path(trust_root) if trust_root is not None else None)


@implementer(IOpenSSLClientConnectionCreator)
class VerifyingClientTLS:
    """Twisted's verifying client options (the chain to the trust root, the name by
    service-identity), left as they are, and `chain_problem`: why OpenSSL refused the
    chain ("certificate has expired", "self-signed certificate"), which its error
    ("certificate verify failed") leaves out and an operator needs in a deferral's
    reason.  Found, only after a failed handshake, by checking the chain the peer sent
    again against the same trust root."""

    def __init__(self, options: IOpenSSLClientConnectionCreator,
                 trust_root: Path | None) -> None:
        self._options = options
        self._trust_root = trust_root
        self._connection: SSL.Connection | None = None

    def clientConnectionForTLS(self, tls_protocol: Any) -> SSL.Connection:
        self._connection = self._options.clientConnectionForTLS(tls_protocol)
        return self._connection

    @property
    def chain_problem(self) -> str | None:
        chain = self._connection.get_peer_cert_chain() if self._connection else None
        if not chain:
            return None
        store = crypto.X509Store()
        try:
            if self._trust_root is not None:
                store.load_locations(str(self._trust_root))
            else:  # the platform's store, as Twisted's platformTrust() uses
                paths = ssl.get_default_verify_paths()
                if paths.cafile is None and paths.capath is None:
                    return None
                store.load_locations(paths.cafile, paths.capath)
            crypto.X509StoreContext(store, chain[0], chain[1:]).verify_certificate()
        except crypto.X509StoreContextError as e:
            return str(e)
        except (crypto.Error, OSError):
            return None
        return None


def describe_failure(error: BaseException, options: object = None) -> str:
    """A failed client handshake in one short line: "certificate verify failed:
    certificate has expired" (the reason when `options`, the `VerifyingClientTLS` of
    the handshake, has it), "certificate does not name mx.example.org", or the
    connection's own error."""
    if isinstance(error, VerificationError):
        return f"certificate does not name {_mismatched(error)}"
    if isinstance(error, SSL.Error):
        why = _why(error)
        problem = getattr(options, "chain_problem", None)
        return f"{why}: {problem}" if problem and problem not in why else why
    return str(error) or error.__class__.__name__


def _mismatched(error: VerificationError) -> str:
    names = []
    for mismatch in error.errors:
        identity = getattr(mismatch, "mismatched_id", None)
        name = getattr(identity, "hostname", None) or getattr(identity, "ip", None)
        if isinstance(name, bytes):
            name = name.decode("ascii", "replace")
        if name:
            names.append(str(name))
    return ", ".join(names) or "the host"


def _trust_root(path: Path) -> Any:
    try:
        certificates = x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError) as e:
        raise TLSConfigError(f"{path}: cannot load CA certificates: {e}") from None
    return trustRootFromCertificates([
        Certificate.loadPEM(c.public_bytes(serialization.Encoding.PEM)) for c in certificates
    ])


@implementer(IOpenSSLClientConnectionCreator)
class OpportunisticClientTLS:
    """Encrypt without checking who is at the other end [RFC 7435]."""

    def __init__(self, hostname: str) -> None:
        self.hostname = hostname
        self._server_name = _sni_name(hostname)
        self._context = SSL.Context(SSL.TLS_METHOD)
        self._context.set_min_proto_version(SSL.TLS1_2_VERSION)
        self._context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
        self._context.set_verify(SSL.VERIFY_NONE)

    def clientConnectionForTLS(self, tls_protocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        if self._server_name is not None:
            connection.set_tlsext_host_name(self._server_name)
        return connection


@implementer(IOpenSSLClientConnectionCreator)
class CheckingClientTLS(OpportunisticClientTLS):
    """Opportunistic TLS that checks the certificate as `client_options(verify=True)`
    would (chain to the trust root, name by service-identity) and takes it anyway.

    `problem`, once the handshake is done, is None for a certificate that verify
    would accept, else the reason it would refuse it ("certificate verify failed:
    unable to get local issuer certificate", "certificate does not name ...").
    """

    def __init__(self, hostname: str, trust_root: str | Path | None = None) -> None:
        super().__init__(hostname)
        self.problem: str | None = "no TLS handshake"
        self._chain_problem: str | None = None
        context = self._context
        if trust_root is not None:
            try:
                context.load_verify_locations(str(trust_root))
            except SSL.Error as e:
                raise TLSConfigError(f"{trust_root}: cannot load CA certificates: "
                                     f"{_why(e)}") from None
        else:
            context.set_default_verify_paths()  # what Twisted's platformTrust() uses
        context.set_verify(SSL.VERIFY_PEER, self._chain_checked)
        context.set_info_callback(self._handshake_event)

    def _chain_checked(self, connection: SSL.Connection, certificate: Any, error: int,
                       depth: int, ok: int) -> bool:
        if not ok and self._chain_problem is None:
            self._chain_problem = f"certificate verify failed: {_verify_error(error)}"
        return True  # opportunistic: the handshake goes on whatever was found

    def _handshake_event(self, connection: SSL.Connection, where: int, ret: int) -> None:
        if where & SSL.SSL_CB_HANDSHAKE_DONE:
            self.problem = self._chain_problem or _identity_problem(connection, self.hostname)


def _identity_problem(connection: SSL.Connection, hostname: str) -> str | None:
    name = hostname.strip("[]").rstrip(".")
    try:
        ipaddress.ip_address(name)
        check = verify_ip_address
    except ValueError:
        check = verify_hostname
    try:
        check(connection, name)
    except VerificationError as e:
        return f"certificate does not name {_mismatched(e)}"
    except CertificateError as e:
        return f"unusable certificate: {e}"
    return None


def _verify_error(code: int) -> str:
    """OpenSSL's text for an X509_V_ERR code."""
    try:
        from OpenSSL._util import ffi, lib  # pyOpenSSL exposes no public name for it
        return ffi.string(lib.X509_verify_cert_error_string(code)).decode("ascii", "replace")
    except (ImportError, AttributeError):
        return f"X509 error {code}"


def _sni_name(hostname: str) -> bytes | None:
    """SNI carries DNS names only, never address literals [RFC 6066 3]."""
    name = hostname.strip("[]").rstrip(".")
    try:
        ipaddress.ip_address(name)
        return None
    except ValueError:
        pass
    try:
        return name.encode("idna")
    except UnicodeError:
        return None


# -- mta make-cert ------------------------------------------------------------------------

def make_cert(cert_path: str | Path, key_path: str | Path, hostname: str,
              days: int = 825) -> None:
    """Write a self-signed certificate for `hostname` (PEM) and its key (PEM, mode 0600).

    The names are `hostname`, ``localhost``, 127.0.0.1 and ::1, so local
    tests and clients can check them.  When both paths are the same file, it
    holds the key followed by the certificate.
    """
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(_alt_names(hostname)), critical=False)
        # Self-signed: it is its own trust anchor, so it is marked as a CA
        # (as `openssl req -x509` does) with the key usages that implies.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_encipherment=True, key_cert_sign=True,
            content_commitment=False, data_encipherment=False, key_agreement=False,
            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    if Path(cert_path).resolve() == Path(key_path).resolve():
        write_atomic(cert_path, key_pem + cert_pem, 0o600)
        return
    write_atomic(key_path, key_pem, 0o600)
    write_atomic(cert_path, cert_pem, 0o644)


def _alt_names(hostname: str) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for dns in dict.fromkeys([hostname, "localhost"]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(dns)))
        except ValueError:
            names.append(x509.DNSName(dns.encode("idna").decode("ascii")))
    for address in ("127.0.0.1", "::1"):
        ip = x509.IPAddress(ipaddress.ip_address(address))
        if ip not in names:
            names.append(ip)
    return names
