"""SASL for AUTH [RFC 4954]: what to offer, and the mechanisms as state machines.

What it owns: PLAIN [RFC 4616], LOGIN [draft-murchison-sasl-login] and
CRAM-MD5 [RFC 2195] as small classes without I/O and without any knowledge
of the SMTP session.  `new_mechanism(name, hostname)` makes one exchange;
`start(initial_response)` takes the AUTH command's optional initial response,
then `respond(line)` takes each client line.  Each returns a step:

- a `Challenge`: send ``challenge.reply`` (334 and base64) and wait for a line;
- twisted.cred credentials (`UsernamePassword` or `CramMD5Credentials`):
  check them with ``mta.server.auth.login(portal, credentials)``.

`mechanisms_for` decides what EHLO offers and `refusal_for` answers an AUTH
for a mechanism that is not offered.  DIGEST-MD5 is never offered: RFC 6331
moved it to Historic.

What errors mean: a `SASLError` ends the exchange and carries, as `reply`,
what the session sends: ``*`` from the client -> 501 5.0.0 (`AuthCancelled`),
bad base64 -> 501 5.5.2 (`BadBase64`), a decoded response of the wrong shape
-> 501 5.5.2 (`MalformedResponse`), a line over 12288 octets -> 500 5.5.6
(`ResponseTooLong`), an initial response to a server-first mechanism ->
501 5.5.4 (`UnexpectedInitialResponse`), a PLAIN authzid other than the
authcid -> 535 5.7.8 (`AuthorizationRefused`: count it as a failed AUTH).
Calling a method out of order is a programming error (`RuntimeError`).
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from twisted.cred.credentials import CramMD5Credentials, UsernamePassword

from mta import reply
from mta.reply import Reply

# RFC 4954 4: servers should take lines of at least 12288 octets in an exchange.
MAX_RESPONSE_LENGTH = 12288

Credentials = UsernamePassword | CramMD5Credentials


class SASLError(Exception):
    """Ends the AUTH exchange; `reply` is what the session sends."""

    reply: ClassVar[Reply] = reply.AUTH_MALFORMED


class AuthCancelled(SASLError):
    reply = reply.AUTH_CANCELLED


class BadBase64(SASLError):
    reply = reply.AUTH_BAD_BASE64


class MalformedResponse(SASLError):
    reply = reply.AUTH_MALFORMED


class ResponseTooLong(SASLError):
    reply = reply.AUTH_LINE_TOO_LONG


class UnexpectedInitialResponse(SASLError):
    reply = reply.AUTH_NO_INITIAL_RESPONSE


class AuthorizationRefused(SASLError):
    """PLAIN with an authzid other than the authcid: we do not act for others."""

    reply = reply.AUTH_FAILED


class Phase(enum.Enum):
    NEW = "new"
    WANT_RESPONSE = "want response"  # PLAIN's message, LOGIN's user name, CRAM-MD5's answer
    WANT_PASSWORD = "want password"  # LOGIN only
    DONE = "done"


@dataclass(frozen=True)
class Challenge:
    """Server data for the client: send `reply` (334 and the base64 of `data`)."""

    data: bytes

    @property
    def reply(self) -> Reply:
        return reply.auth_challenge(base64.b64encode(self.data).decode("ascii"))


Step = Challenge | Credentials


def decode_response(text: str | bytes) -> bytes:
    """A client line of the exchange (without CRLF): base64, strictly [RFC 4954 4]."""
    text = text.strip()
    if len(text) > MAX_RESPONSE_LENGTH:
        raise ResponseTooLong()
    try:
        raw = text if isinstance(text, bytes) else text.encode("ascii")
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise BadBase64() from None


def _utf8(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedResponse("not UTF-8") from None


class Mechanism:
    """One AUTH exchange.  Call `start` once, then `respond` with each client line."""

    name: ClassVar[str] = ""

    def __init__(self) -> None:
        self.phase = Phase.NEW

    def start(self, initial_response: str | bytes | None) -> Step:
        """`initial_response` is the AUTH argument after the mechanism, None if absent."""
        if self.phase is not Phase.NEW:
            raise RuntimeError(f"{self.name}: already started")
        if initial_response is None:
            return self._begin()
        # RFC 4954 4: "=" stands for an empty initial response.
        if initial_response.strip() in ("=", b"="):
            return self._guard(self._initial, None)
        return self._guard(self._initial, initial_response)

    def respond(self, line: str | bytes) -> Step:
        """The next client line, without its CRLF."""
        if self.phase in (Phase.NEW, Phase.DONE):
            raise RuntimeError(f"{self.name}: no exchange in progress")
        if line.strip() in ("*", b"*"):  # RFC 4954 4: the client cancels
            self.phase = Phase.DONE
            raise AuthCancelled()
        return self._guard(self._next, line)

    def _guard(self, handler: Callable[[bytes], Step], text: str | bytes | None) -> Step:
        """Decode `text` (None: empty) and hand it on; any error ends the exchange."""
        try:
            return handler(b"" if text is None else decode_response(text))
        except SASLError:
            self.phase = Phase.DONE
            raise

    def _done(self, credentials: Credentials) -> Credentials:
        self.phase = Phase.DONE
        return credentials

    def _begin(self) -> Step:
        raise NotImplementedError

    def _initial(self, raw: bytes) -> Step:
        raise NotImplementedError

    def _next(self, raw: bytes) -> Step:
        raise NotImplementedError


class Plain(Mechanism):
    """RFC 4616 2: ``[authzid] NUL authcid NUL passwd``; client-first."""

    name = "PLAIN"

    def _begin(self) -> Step:
        self.phase = Phase.WANT_RESPONSE
        return Challenge(b"")  # RFC 4954 4: an empty challenge asks for the response

    def _initial(self, raw: bytes) -> Step:
        return self._next(raw)

    def _next(self, raw: bytes) -> Step:
        parts = raw.split(b"\0")
        if len(parts) != 3 or not parts[1] or not parts[2]:
            raise MalformedResponse("expected [authzid] NUL authcid NUL passwd")
        authzid, authcid, passwd = parts
        for part in parts:
            _utf8(part)
        # RFC 4616 2: the server decides whether authcid may act as authzid;
        # we allow only the trivial case.
        if authzid and authzid != authcid:
            raise AuthorizationRefused()
        return self._done(UsernamePassword(authcid, passwd))


class Login(Mechanism):
    """LOGIN (draft-murchison-sasl-login): user name, then password, each on request."""

    name = "LOGIN"
    USER_PROMPT = b"Username:"
    PASSWORD_PROMPT = b"Password:"

    def __init__(self) -> None:
        super().__init__()
        self._user = b""

    def _begin(self) -> Step:
        self.phase = Phase.WANT_RESPONSE
        return Challenge(self.USER_PROMPT)

    def _initial(self, raw: bytes) -> Step:
        # An initial response carries the user name.
        self.phase = Phase.WANT_RESPONSE
        return self._next(raw)

    def _next(self, raw: bytes) -> Step:
        if self.phase is Phase.WANT_RESPONSE:
            _utf8(raw)
            self._user = raw
            self.phase = Phase.WANT_PASSWORD
            return Challenge(self.PASSWORD_PROMPT)
        _utf8(raw)
        return self._done(UsernamePassword(self._user, raw))


class CramMD5(Mechanism):
    """RFC 2195: server-first; the client answers ``user SP hex(HMAC-MD5(password, challenge))``."""

    name = "CRAM-MD5"
    _ANSWER = re.compile(rb"(.+) ([0-9a-fA-F]{32})\Z", re.DOTALL)

    def __init__(self, hostname: str, clock: Callable[[], float] = time.time,
                 nonce: Callable[[], int] = lambda: secrets.randbits(63)) -> None:
        super().__init__()
        self.challenge = make_challenge(hostname, clock(), nonce())

    def _begin(self) -> Step:
        self.phase = Phase.WANT_RESPONSE
        return Challenge(self.challenge)

    def _initial(self, raw: bytes) -> Step:
        # RFC 4954 4: an initial response with a server-first mechanism -> 501.
        raise UnexpectedInitialResponse()

    def _next(self, raw: bytes) -> Step:
        match = self._ANSWER.match(raw)
        if not match:
            raise MalformedResponse("expected user SP 32 hex digits")
        user = match.group(1)
        _utf8(user)
        credentials = CramMD5Credentials()
        credentials.challenge = self.challenge
        credentials.username = user
        credentials.response = match.group(2).lower()
        return self._done(credentials)


def make_challenge(hostname: str, now: float, nonce: int) -> bytes:
    """RFC 2195 2: ``<random-digits.timestamp@hostname>``, a msg-id that never repeats."""
    return f"<{nonce}.{int(now)}@{hostname}>".encode("ascii", "replace")


MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5")
CLEARTEXT_MECHANISMS = frozenset({"PLAIN", "LOGIN"})


def mechanisms_for(tls_active: bool, client_is_loopback: bool,
                   listener_plaintext_ok: bool, store_has_cram: bool) -> list[str]:
    """What EHLO's AUTH line offers here (empty: do not advertise AUTH).

    PLAIN and LOGIN send the password itself, so they need TLS unless the
    client is on loopback or the listener's ``plaintext_auth`` says otherwise
    [RFC 4954 4, 14].  CRAM-MD5 is offered only when some user has a CRAM-MD5
    entry.  DIGEST-MD5 is never offered: RFC 6331 made it Historic.
    """
    offered = []
    if tls_active or client_is_loopback or listener_plaintext_ok:
        offered += ["PLAIN", "LOGIN"]
    if store_has_cram:
        offered.append("CRAM-MD5")
    return offered


def refusal_for(mechanism: str, offered: Sequence[str],
                allowed: Sequence[str] = MECHANISMS) -> Reply | None:
    """None when AUTH `mechanism` may start; else 538 (needs TLS) or 504 (not here).

    `allowed` is what the listener may ever offer: a mechanism outside it is
    504 even where TLS would otherwise make it available.
    """
    name = mechanism.upper()
    if name in offered:
        return None
    if name in CLEARTEXT_MECHANISMS and name in allowed:
        return reply.AUTH_ENCRYPTION_REQUIRED  # RFC 4954 6
    return reply.AUTH_MECH_UNKNOWN


def new_mechanism(name: str, hostname: str,
                  clock: Callable[[], float] = time.time) -> Mechanism | None:
    """A fresh exchange for `name` (any case), or None if we do not implement it."""
    name = name.upper()
    if name == "PLAIN":
        return Plain()
    if name == "LOGIN":
        return Login()
    if name == "CRAM-MD5":
        return CramMD5(hostname, clock)
    return None
