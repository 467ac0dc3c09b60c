"""DKIM signing [RFC 6376] of our own users' mail, RSA and Ed25519 [RFC 8463], with dkimpy.

Where: once, on the way in.  At the end of DATA/BDAT, in the thread that
commits the message (`sign_and_commit`), the message is read back from its
spool `Incoming`, signed, and the DKIM-Signature fields are put in front of
it; then it is committed.  The queue holds exactly what is sent: a retried
message carries the same signature by construction, no attempt pays for
signing, and a key changed later does not touch mail already queued.
Postfix with OpenDKIM signs at the same point.

Which mail (the session decides, server/session.py): only mail from a trusted
source (an authenticated session, a client in ``[relay] mynetworks``, a local
user's `sendmail`), never mail from the outside on port 25; not mail whose
every recipient is delivered here (a Maildir route): nobody downstream checks
it.  Our own delivery reports (bounce.py, from ``MAILER-DAEMON@hostname``)
are signed as well, by the same rule about their From: domain.

Which key (`domain_keys`): the signing domain is the From: header field's
domain, or the envelope sender's with ``[relay] dkim_domain = "sender"``.
The ``[dkim."DOMAIN"]`` table for that exact domain signs; failing that, the
closest parent domain's does (``d=example.org`` for mail From:
``alice@lists.example.org``): DMARC's relaxed alignment [RFC 7489 3.1.1]
accepts it, as rspamd's default does.  A domain with no table anywhere above
it is not signed, and costs nothing: the message is never read back.

What is signed: relaxed/relaxed canonicalisation [RFC 6376 3.4]; the header
fields of `SIGNED_FIELDS` that are present, every instance of each, and
From: once more than it occurs (over-signing: a From: added on the way does
not pass [RFC 6376 8.15]); no l= (the whole body).  One signature per key of
the domain: the main ``key`` (RSA, 2048 bits by default, or Ed25519), and
the optional ``ed25519_key`` beside an RSA one (dual signing, RFC 8463:
verifiers that cannot check Ed25519 still find the RSA signature).

Cost: dkimpy's own RSA step is pure Python (2048 bits: about 8 ms of CPU a
signature, holding the GIL, so the reactor would stall meanwhile); for the
keys loaded here it is routed to `cryptography` (OpenSSL), which makes the
same PKCS#1 v1.5 signature, byte for byte, in well under a millisecond
(`_rsa_sign`).  Everything else (canonicalisation, hashing, the b= layout)
stays dkimpy's.  Ed25519 (PyNaCl) is well under 1 ms too.  The relaxed body
canonicalisation is dkimpy's, applied a piece at a time (`_relaxed_body`), so
that signing a large message does not hold the GIL (and the reactor) for
seconds.

Keys (`load_key`) are read when the config is loaded (and again at each
reload), never per message: a missing, unreadable or unparseable file, one
that others than its owner may open, an RSA key under 1024 bits [RFC 8301
3.2] or a key of another kind is a `DKIMKeyError` naming the file, which
config.py turns into a ConfigError (so start-up, reload and `mta
check-config` refuse it alike).

Errors while signing: a message dkimpy cannot sign (no From:, a header it
cannot parse) is committed unsigned and the reason logged, rather than
refused: the same bytes would fail the same way at every retry of the
client, and mail accepted from our own users must not be lost or bounced
for want of a signature.  Disk errors (OSError) are the spool's: the
message is not accepted (451), as when the commit itself fails.
"""

from __future__ import annotations

import base64
import email.utils
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dkim
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils
from dkim import canonicalization

if TYPE_CHECKING:
    from mta.config import Config, DKIMDomain
    from mta.spool.store import Incoming, Spool

RSA_SHA256, ED25519_SHA256 = "rsa-sha256", "ed25519-sha256"
RSA_BITS = 2048  # RFC 8301 3.2: at least 1024, 2048 recommended
MIN_RSA_BITS, MAX_RSA_BITS = 1024, 4096
TXT_STRING = 255  # octets per character-string of a TXT record [RFC 1035 3.3.14]

# Header fields signed when present [RFC 6376 5.4.1], every instance; From: once more.
SIGNED_FIELDS = (
    "from", "sender", "reply-to", "subject", "date", "message-id", "to", "cc",
    "mime-version", "content-type", "content-transfer-encoding",
    "in-reply-to", "references",
)
SIGNED_PREFIXES = ("list-",)  # List-Id, List-Unsubscribe, ... [RFC 2369, 2919, 8058]

# A selector is one or more DNS labels [RFC 6376 3.1].
_SELECTOR = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\Z")


class DKIMKeyError(Exception):
    """A key file that cannot sign; the message names the file."""


@dataclass(frozen=True)
class SigningKey:
    """One private key of a signing domain, read and checked once."""

    domain: str  # d=
    selector: str  # s=
    path: Path
    algorithm: str  # rsa-sha256 | ed25519-sha256
    bits: int
    private: bytes = field(repr=False)  # as dkimpy's sign() takes it
    public: bytes = field(repr=False)  # the p= value: base64 [RFC 6376 3.6.1, RFC 8463 4.2]

    @property
    def key_type(self) -> str:
        """The k= value of the DNS record."""
        return "ed25519" if self.algorithm == ED25519_SHA256 else "rsa"

    @property
    def record_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}."  # RFC 6376 3.6.2.1

    @property
    def record(self) -> str:
        """The TXT record to publish at `record_name` [RFC 6376 3.6.1]."""
        return f"v=DKIM1; k={self.key_type}; p={self.public.decode()}"

    def describe(self) -> str:
        kind = "Ed25519" if self.key_type == "ed25519" else f"RSA {self.bits} bits"
        return f"{kind}, {self.algorithm}"


# -- the RSA step, by OpenSSL ---------------------------------------------------------

_OPENSSL_KEYS: dict[int, rsa.RSAPrivateKey] = {}  # modulus -> the key loaded by load_key
_dkimpy_rsa_sign = dkim.RSASSA_PKCS1_v1_5_sign


def _rsa_sign(digest: Any, private_key: Any) -> bytes:
    """dkimpy's RSASSA-PKCS1-v1_5 signing step [RFC 8017 8.2.1], done by OpenSSL for a
    key we loaded; dkimpy's own for any other (dkimpy hands its parsed key: a dict)."""
    key = _OPENSSL_KEYS.get(private_key.get("modulus")) if isinstance(private_key, dict) \
        else None
    if key is None or getattr(digest, "name", "") != "sha256":
        return _dkimpy_rsa_sign(digest, private_key)
    return key.sign(digest.digest(), padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))


# dkimpy's DKIM.sign calls the name in its module: that one name is replaced.
dkim.RSASSA_PKCS1_v1_5_sign = _rsa_sign


# -- the relaxed body, in pieces ---------------------------------------------------------

BODY_PIECE = 64 * 1024  # octets canonicalised at a time
_CUT = re.compile(rb"[^\t \r]")  # a cut after such an octet splits no match of the rules


def _relaxed_body(body: bytes) -> bytes:
    """dkimpy's relaxed body canonicalisation [RFC 6376 3.4.4], the same octets, done
    `BODY_PIECE` at a time.  dkimpy runs each rule as one regular expression over the
    whole body, which holds the GIL throughout: 2 s for a 24 MB body full of spaces,
    during which the reactor (every session and delivery) stood still.  A piece ends
    after an octet that no rule's match can span (not WSP, not CR), so the pieces'
    results joined are the whole body's."""
    if len(body) <= BODY_PIECE:
        return _dkimpy_relaxed_body(body)
    pieces = []
    start = 0
    while start < len(body):
        cut = _CUT.search(body, start + BODY_PIECE)
        end = cut.end() if cut is not None else len(body)
        piece = body[start:end]
        pieces.append(canonicalization.compress_whitespace(
            canonicalization.strip_trailing_whitespace(piece)))
        start = end
    return canonicalization.correct_empty_body(
        canonicalization.strip_trailing_lines(b"".join(pieces)))


_BLANK_LINE = re.compile(rb"(?:\A|\n)\r?\n")  # the end of the header section
_NEWLINE = re.compile(rb"\r?\n")


def _split(message: bytes) -> tuple[bytes, bytes]:
    """The header section (with the empty line after it) and the body with CRLF line
    ends, as dkimpy's own parser makes them; but dkimpy splits the whole message into
    a list of lines (one regular expression, the GIL held throughout, and an object
    per line), where only the header section needs it."""
    blank = _BLANK_LINE.search(message)
    if blank is None:
        return message, b""
    header, body = message[:blank.end()], message[blank.end():]
    if body.count(b"\n") == body.count(b"\r\n"):
        return header, body  # CRLF throughout, as the spool keeps it
    pieces = []
    start = 0
    while start < len(body):
        end = body.find(b"\n", start + BODY_PIECE)
        end = len(body) if end < 0 else end + 1
        pieces.append(_NEWLINE.sub(b"\r\n", body[start:end]))
        start = end
    return header, b"".join(pieces)


_dkimpy_relaxed_body = canonicalization.Relaxed.canonicalize_body
# Signing and the inbound checks' verification alike (both are dkimpy's Relaxed).
canonicalization.Relaxed.canonicalize_body = staticmethod(_relaxed_body)


def valid_selector(selector: str) -> bool:
    return len(selector) <= 253 and bool(_SELECTOR.match(selector))


# -- keys ----------------------------------------------------------------------

def load_key(path: Path, domain: str, selector: str, key_type: str = "rsa") -> SigningKey:
    """The key in `path` (PEM: PKCS#8 or PKCS#1 RSA, PKCS#8 Ed25519); `DKIMKeyError`
    if it cannot be used.  `key_type` is the kind the config expects there: the
    error for a missing file gives the command that makes that kind, at that path."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        command = f"mta dkim keygen {domain} {selector}"
        if key_type == "ed25519":
            command += " --type ed25519"
        if Path(path) != Path(f"etc/dkim/{domain}.{selector}.key"):
            command += f" --output {path}"
        raise DKIMKeyError(f"no such file: {path} (make one with: {command})") from None
    except OSError as e:
        raise DKIMKeyError(f"cannot read {path}: {e.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise DKIMKeyError(f"{path} is not a regular file")
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise DKIMKeyError(f"{path} is mode {mode:04o}: others than its owner may open "
                               f"this private key (chmod 600 {path})")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read()
    except OSError as e:
        raise DKIMKeyError(f"cannot read {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        why = "it is encrypted (DKIM keys must be usable without a password)" \
            if "encrypted" in str(e).lower() or "password" in str(e).lower() \
            else "not a PEM private key"
        raise DKIMKeyError(f"{path}: {why}") from None
    except Exception as e:  # noqa: BLE001 (cryptography's backend errors vary by version)
        raise DKIMKeyError(f"{path}: not a usable private key: {e}") from None
    return signing_key(key, domain, selector, path)


def signing_key(key: object, domain: str, selector: str, path: Path) -> SigningKey:
    """A `SigningKey` of a `cryptography` private key object."""
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise DKIMKeyError(f"{path}: an RSA key of {key.key_size} bits; DKIM needs at "
                               f"least {MIN_RSA_BITS} (RFC 8301 3.2), {RSA_BITS} is usual")
        private = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption())
        _OPENSSL_KEYS[key.private_numbers().public_numbers.n] = key
        public = key.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
        return SigningKey(domain, selector, path, RSA_SHA256, key.key_size, private,
                          base64.b64encode(public))
    if isinstance(key, ed25519.Ed25519PrivateKey):
        seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.Raw,
                                               serialization.PublicFormat.Raw)
        return SigningKey(domain, selector, path, ED25519_SHA256, 256,
                          base64.b64encode(seed), base64.b64encode(public))
    kind = {"ECPrivateKey": "an elliptic-curve (ECDSA) key", "DSAPrivateKey": "a DSA key"}.get(
        type(key).__name__, f"a {type(key).__name__}")
    raise DKIMKeyError(f"{path}: {kind}; DKIM signs with RSA (rsa-sha256) or Ed25519 "
                       f"(ed25519-sha256) keys only")


def generate(key_type: str, bits: int = RSA_BITS) -> tuple[object, bytes]:
    """A new private key and its PEM (PKCS#8, unencrypted), for `mta dkim keygen`."""
    if key_type == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return key, pem


def zone_lines(key: SigningKey) -> str:
    """The record in zone-file form, its value cut into character-strings of at most
    255 octets [RFC 6376 3.6.2.2]: what a DNS provider's "TXT" box or BIND takes."""
    value = key.record
    strings = [value[i:i + TXT_STRING] for i in range(0, len(value), TXT_STRING)]
    if len(strings) == 1:
        return f'{key.record_name} IN TXT "{strings[0]}"'
    inner = "\n".join(f'    "{s}"' for s in strings)
    return f"{key.record_name} IN TXT (\n{inner} )"


# -- which key signs a message ------------------------------------------------------

def domain_keys(config: Config, domain: str) -> DKIMDomain | None:
    """The ``[dkim]`` table that signs mail of `domain`: its own, else its closest
    parent's; None when neither exists (or its keys were not read)."""
    if not config.dkim or not domain:
        return None
    name = _ascii_domain(domain)
    while name:
        found = config.dkim.get(name)
        if found is not None:
            return found if found.keys else None
        name = name.partition(".")[2]
    return None


def _ascii_domain(domain: str) -> str:
    """`domain` in lower case, as A-labels; "" when it is no domain name."""
    name = domain.strip().strip("[]").lower().rstrip(".")
    if name.isascii():
        return name
    try:
        return name.encode("idna").decode("ascii")
    except UnicodeError:
        return ""


def author_domain(from_field: str) -> str | None:
    """The domain of the From: field's mailboxes [RFC 5322 3.6.2], or None when it has
    none, or several different ones (no one domain speaks for the message)."""
    domains = {address.rpartition("@")[2].lower().rstrip(".")
               for _, address in email.utils.getaddresses([from_field])
               if "@" in address}
    return domains.pop() if len(domains) == 1 else None


# -- signing ---------------------------------------------------------------------------

@dataclass
class Signed:
    """What signing one message did: the fields made, the keys that made them, and why
    any key could not sign."""

    domain: str
    fields: bytes = b""
    keys: list[SigningKey] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def signed_fields(names: Iterable[bytes]) -> list[bytes]:
    """The h= list for a message with header fields `names` (in order): each signed
    field as often as it occurs, From once more [RFC 6376 5.4.2, 8.15]."""
    chosen = [name.lower() for name in names
              if name.lower().decode("ascii", "replace") in SIGNED_FIELDS
              or name.lower().startswith(tuple(p.encode() for p in SIGNED_PREFIXES))]
    return chosen + [b"from"] if b"from" in chosen else chosen


def signatures(message: bytes, keys: Iterable[SigningKey]) -> Signed:
    """Sign `message` (CRLF line ends) with each of `keys`: the DKIM-Signature fields
    (CRLF-terminated, in key order) in `Signed.fields`.  Never raises for a bad message:
    the reasons are in `Signed.errors`."""
    keys = list(keys)
    signed = Signed(keys[0].domain if keys else "")
    try:
        header, body = _split(message)
        signer = dkim.DKIM(header, linesep=b"\r\n")
        signer.body = body
        include = signed_fields(name for name, _ in signer.headers)
    except Exception as e:  # noqa: BLE001 (dkimpy's parser: any error means "cannot sign")
        signed.errors.append(f"cannot parse the message: {_reason(e)}")
        return signed
    if b"from" not in include:
        signed.errors.append("no From: header field (RFC 6376 5.4 requires signing it)")
        return signed
    for key in keys:
        try:
            signed.fields += signer.sign(
                key.selector.encode(), key.domain.encode(), key.private,
                signature_algorithm=key.algorithm.encode(),
                canonicalize=(b"relaxed", b"relaxed"), include_headers=include)
        except Exception as e:  # noqa: BLE001 (the message goes unsigned; the log says why)
            signed.errors.append(f"s={key.selector} a={key.algorithm}: {_reason(e)}")
            continue
        signed.keys.append(key)
    return signed


def _reason(error: Exception) -> str:
    text = " ".join(str(error).split()) or error.__class__.__name__
    return text[:200]


def sign_incoming(incoming: Incoming, dkim_domain: DKIMDomain) -> Signed:
    """Sign the message being received with every key of `dkim_domain`, in front of
    it; blocking (the committing thread).  OSError: the spool failed."""
    signed = signatures(incoming.read_data(), dkim_domain.keys)
    incoming.prepend(signed.fields)
    return signed


def sign_and_commit(spool: Spool, incoming: Incoming,
                    dkim_domain: DKIMDomain) -> tuple[str, Signed]:
    """Sign, then commit (`Spool.commit`); blocking.  A spool error drops the message,
    as a failed commit does."""
    try:
        signed = sign_incoming(incoming, dkim_domain)
    except BaseException:
        incoming.abort()
        raise
    return spool.commit(incoming), signed
