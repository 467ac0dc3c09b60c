"""Authentication: the password file, the twisted.cred checker, failure counting.

What it owns:

- The password file (``[auth] passwords``), one user per line, ``#`` comments::

      alice:scrypt$16384$8$1$<salt b64>$<hash b64>
      odmr:scrypt$16384$8$1$<salt b64>$<hash b64>:cram-md5$<64 hex digits>

  The scrypt hash (``hashlib.scrypt``, N=2**14, r=8, p=1: 16 MiB and some
  tens of milliseconds per check) is what PLAIN and LOGIN are checked
  against; it is slow on purpose and runs in a thread, never in the reactor.
  `hash_password`, `set_password` and `passwd_main` write it (``mta passwd``).

- The optional CRAM-MD5 secret, for clients that speak nothing else
  (fetchmail's ODMR client).  CRAM-MD5 [RFC 2195] needs the server to compute
  HMAC-MD5(password, challenge), so a salted slow hash cannot serve it.  We
  store the HMAC-MD5 precomputed contexts [RFC 2104 4]: the MD5 chaining
  state after the key block XOR opad, then after the key block XOR ipad,
  each four little-endian 32-bit words (the layout of Dovecot's CRAM-MD5
  scheme).  Python's hashlib cannot resume MD5 from a state, so a small
  MD5 compression function (RFC 1321 3.4) lives here.
  What that costs: the contexts are **password-equivalent for CRAM-MD5** —
  whoever reads the file can log in with CRAM-MD5 as that user without ever
  learning the password.  They do not reveal the password directly (unlike
  storing the key itself, which for passwords up to 64 octets *is* the
  password), but they are a fast unsalted hash: a weak password falls to an
  offline guessing attack.  So the entry is opt-in per user (``mta passwd
  --cram-md5``), the file is written mode 0600, and such users should have
  long random passwords.

- `PasswordFileChecker`, an `ICredentialsChecker` for `IUsernamePassword`
  (PLAIN, LOGIN) and `CramMD5Credentials`.  It re-reads the file when its
  inode, mtime or size change, so ``mta passwd`` takes effect without a
  restart.  An unknown user costs the same scrypt work as a known one.

- The SASL exchanges themselves live in `mta.server.sasl`; they produce the
  twisted.cred credentials that `login(portal, credentials)` checks here.

- AUTH failures per client address within a window (``[auth]
  failures_per_client``, ``failure_window``) are counted by a
  `ratelimit.WindowCounter` that `Trust` holds.

What errors mean: the checker fails with `UnauthorizedLogin` for wrong
credentials (-> 535 5.7.8, count it) and with `UnhandledCredentials` for
credential types it does not know; anything else is our trouble (-> 454 4.7.0).
`PasswordFileError` is a malformed password file line or a bad user name;
`set_password` also raises `OSError`.
"""

from __future__ import annotations

import base64
import binascii
import getpass
import hashlib
import hmac
import math
import os
import re
import secrets
import stat
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import (
    CramMD5Credentials,
    IUsernameHashedPassword,
    IUsernamePassword,
)
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from zope.interface import Interface, implementer

from mta.safeio import write_atomic

log = Logger()

# -- the password file ---------------------------------------------------------

SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SALT_SIZE = 16
HASH_SIZE = 32
# Bounds for parameters read from the file, so that a typo cannot make each
# login allocate gigabytes: 128 * N * r octets must stay under this.
_SCRYPT_MAX_MEMORY = 256 * 2**20

_USER = re.compile(r"[^\s:#\x00-\x1f\x7f][^\s:\x00-\x1f\x7f]{0,254}\Z")


class PasswordFileError(ValueError):
    """A password file line or a user name we cannot use; the message says why."""


@dataclass(frozen=True)
class ScryptHash:
    n: int
    r: int
    p: int
    salt: bytes
    hash: bytes

    def __str__(self) -> str:
        salt = base64.b64encode(self.salt).decode("ascii")
        digest = base64.b64encode(self.hash).decode("ascii")
        return f"scrypt${self.n}${self.r}${self.p}${salt}${digest}"


@dataclass(frozen=True)
class CramContexts:
    """HMAC-MD5 precomputed contexts: MD5 states after key^opad and key^ipad."""

    outer: tuple[int, int, int, int]
    inner: tuple[int, int, int, int]

    def __str__(self) -> str:
        return "cram-md5$" + struct.pack("<8I", *self.outer, *self.inner).hex()


@dataclass(frozen=True)
class PasswordEntry:
    user: str
    scrypt: ScryptHash
    cram_md5: CramContexts | None = None

    def __str__(self) -> str:
        fields = [self.user, str(self.scrypt)]
        if self.cram_md5 is not None:
            fields.append(str(self.cram_md5))
        return ":".join(fields)


def check_user_name(user: str) -> str:
    """A user name is 1-255 characters without spaces, controls or ':' (the separator)."""
    if not _USER.match(user):
        raise PasswordFileError(
            f"bad user name {user!r}: 1-255 characters, no spaces, controls, ':' or leading '#'")
    return user


def hash_password(password: str, cram_md5: bool = False) -> str:
    """The entry text after ``user:`` for `password`: scrypt, plus CRAM-MD5 contexts if asked."""
    secret = password.encode("utf-8")
    salt = secrets.token_bytes(SALT_SIZE)
    digest = _scrypt(secret, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    text = str(ScryptHash(SCRYPT_N, SCRYPT_R, SCRYPT_P, salt, digest))
    if cram_md5:
        text += ":" + str(cram_contexts(secret))
    return text


def parse_entry(line: str) -> PasswordEntry:
    """One non-comment line of the password file; `PasswordFileError` if malformed."""
    fields = line.strip().split(":")
    if len(fields) not in (2, 3):
        raise PasswordFileError("expected user:scrypt$...[:cram-md5$...]")
    user = check_user_name(fields[0])
    cram = _parse_cram(fields[2]) if len(fields) == 3 else None
    return PasswordEntry(user, _parse_scrypt(fields[1]), cram)


def _parse_scrypt(text: str) -> ScryptHash:
    parts = text.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise PasswordFileError("expected scrypt$N$r$p$salt$hash")
    try:
        n, r, p = (int(v) for v in parts[1:4])
        salt = base64.b64decode(parts[4], validate=True)
        digest = base64.b64decode(parts[5], validate=True)
    except (ValueError, binascii.Error):
        raise PasswordFileError("bad number or base64 in scrypt hash") from None
    if n < 2 or n & (n - 1) or r < 1 or p < 1 or p > 16 or 128 * n * r > _SCRYPT_MAX_MEMORY:
        raise PasswordFileError(f"scrypt parameters out of range: N={n} r={r} p={p}")
    if not salt or len(digest) < 16:
        raise PasswordFileError("scrypt salt or hash too short")
    return ScryptHash(n, r, p, salt, digest)


def _parse_cram(text: str) -> CramContexts:
    scheme, _, hexdigits = text.partition("$")
    if scheme != "cram-md5" or not re.fullmatch(r"[0-9a-fA-F]{64}", hexdigits):
        raise PasswordFileError("expected cram-md5$ and 64 hex digits")
    words = struct.unpack("<8I", bytes.fromhex(hexdigits))
    return CramContexts(words[:4], words[4:])


def _scrypt(secret: bytes, salt: bytes, n: int, r: int, p: int, size: int = HASH_SIZE) -> bytes:
    # maxmem must cover 128*N*r for V plus 128*r*p for B, with room to spare.
    maxmem = 128 * r * (n + p + 2) + 2**20
    return hashlib.scrypt(secret, salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=size)


def verify_password(entry: PasswordEntry, password: bytes) -> bool:
    """Blocking (scrypt): run it in a thread.  Constant-time comparison."""
    h = entry.scrypt
    candidate = _scrypt(password, h.salt, h.n, h.r, h.p, len(h.hash))
    return hmac.compare_digest(candidate, h.hash)


def read_password_file(path: Path) -> dict[str, PasswordEntry]:
    """Every good entry of the file; bad lines are logged with their number and skipped."""
    entries: dict[str, PasswordEntry] = {}
    with open(path, encoding="utf-8", errors="strict") as f:
        for number, line in enumerate(f, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                entry = parse_entry(line)
            except PasswordFileError as e:
                log.error("{path}:{number}: ignored: {why}", path=path, number=number, why=e)
                continue
            entries[entry.user] = entry
    return entries


def set_password(path: str | Path, user: str, password: str, cram_md5: bool = False) -> None:
    """Add or replace `user`'s entry; the file is rewritten atomically, mode 0600.

    Comments, blank lines and other users' lines are kept as they are.
    Raises `PasswordFileError` for a bad user name or empty password, `OSError`
    for disk trouble.
    """
    check_user_name(user)
    if not password:
        raise PasswordFileError("empty password")
    path = Path(path)
    new_line = f"{user}:{hash_password(password, cram_md5)}\n"
    try:
        old_lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    except FileNotFoundError:
        old_lines = []
    lines, replaced = [], False
    for line in old_lines:
        if _line_user(line) == user:
            if not replaced:
                lines.append(new_line)
            replaced = True
            continue
        lines.append(line if line.endswith("\n") else line + "\n")
    if not replaced:
        lines.append(new_line)
    write_atomic(path, "".join(lines).encode("utf-8"), 0o600)


def _line_user(line: str) -> str | None:
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    return text.split(":", 1)[0]


def passwd_main(
    path: str | Path,
    user: str,
    cram_md5: bool = False,
    *,
    stdin: TextIO | None = None,
    stderr: TextIO | None = None,
    ask: Callable[[str], str] = getpass.getpass,
) -> int:
    """``mta passwd USER [--cram-md5]``: set a password; returns the exit status.

    The password is the first line of stdin when stdin is not a terminal (for
    scripts), else it is asked twice without echo.
    """
    stdin = stdin if stdin is not None else sys.stdin
    stderr = stderr if stderr is not None else sys.stderr
    if stdin.isatty():
        password = ask(f"New password for {user}: ")
        if ask("Retype it: ") != password:
            print("mta passwd: the passwords do not match", file=stderr)
            return 1
    else:
        password = stdin.readline().rstrip("\r\n")
    try:
        set_password(path, user, password, cram_md5)
    except (ValueError, OSError) as e:  # PasswordFileError, UnicodeDecodeError
        print(f"mta passwd: {path}: {e}", file=stderr)
        return 1
    return 0


# -- HMAC-MD5 contexts for CRAM-MD5 (RFC 2104 4, MD5 per RFC 1321 3.4) --------

_MASK = 0xFFFFFFFF
_MD5_IV = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476)
_MD5_SHIFTS = (7, 12, 17, 22) * 4 + (5, 9, 14, 20) * 4 + (4, 11, 16, 23) * 4 + (6, 10, 15, 21) * 4
_MD5_SINES = tuple(int(abs(math.sin(i + 1)) * 2**32) & _MASK for i in range(64))
_BLOCK = 64


def _md5_compress(state: tuple[int, int, int, int], block: bytes) -> tuple[int, int, int, int]:
    x = struct.unpack("<16I", block)
    a, b, c, d = state
    for i in range(64):
        if i < 16:
            f, g = (b & c) | (~b & d), i
        elif i < 32:
            f, g = (d & b) | (~d & c), (5 * i + 1) % 16
        elif i < 48:
            f, g = b ^ c ^ d, (3 * i + 5) % 16
        else:
            f, g = c ^ (b | ~d), (7 * i) % 16
        f = (f + a + _MD5_SINES[i] + x[g]) & _MASK
        s = _MD5_SHIFTS[i]
        a, d, c = d, c, b
        b = (b + ((f << s) | (f >> (32 - s)))) & _MASK
    return (
        (state[0] + a) & _MASK, (state[1] + b) & _MASK,
        (state[2] + c) & _MASK, (state[3] + d) & _MASK,
    )


def _md5_resume(state: tuple[int, int, int, int], data: bytes, done: int) -> bytes:
    """Finish an MD5 whose first `done` octets (a multiple of 64) gave `state`."""
    length = done + len(data)
    padded = data + b"\x80" + b"\0" * ((55 - length) % 64) + struct.pack("<Q", length * 8)
    for i in range(0, len(padded), _BLOCK):
        state = _md5_compress(state, padded[i:i + _BLOCK])
    return struct.pack("<4I", *state)


def cram_contexts(secret: bytes) -> CramContexts:
    key = hashlib.md5(secret).digest() if len(secret) > _BLOCK else secret
    key = key.ljust(_BLOCK, b"\0")
    inner = _md5_compress(_MD5_IV, bytes(k ^ 0x36 for k in key))
    outer = _md5_compress(_MD5_IV, bytes(k ^ 0x5C for k in key))
    return CramContexts(outer, inner)


def cram_md5_digest(contexts: CramContexts, challenge: bytes) -> str:
    """HMAC-MD5(password, challenge) as lower-case hex, from the stored contexts."""
    inner = _md5_resume(contexts.inner, challenge, _BLOCK)
    return _md5_resume(contexts.outer, inner, _BLOCK).hex()


def verify_cram_md5(entry: PasswordEntry, challenge: bytes, response: str) -> bool:
    """Cheap (a few MD5 blocks): fine in the reactor.  Constant-time comparison."""
    if entry.cram_md5 is None:
        return False
    expected = cram_md5_digest(entry.cram_md5, challenge)
    return hmac.compare_digest(expected.encode("ascii"),
                               response.lower().encode("ascii", "replace"))


# -- the twisted.cred checker and realm -------------------------------------------

RunInThread = Callable[..., Deferred]


@implementer(ICredentialsChecker)
class PasswordFileChecker:
    """Checks credentials against the password file; the avatar id is the user name (str).

    `path` None means no users at all (AUTH should not be offered).
    `run_in_thread` runs scrypt off the reactor; tests pass a synchronous one.
    """

    credentialInterfaces = (IUsernamePassword, IUsernameHashedPassword)

    def __init__(self, path: str | Path | None,
                 run_in_thread: RunInThread = deferToThread) -> None:
        self._path = Path(path) if path is not None else None
        self._run_in_thread = run_in_thread
        self._stamp: tuple[int, int, int] | None = None
        self._entries: dict[str, PasswordEntry] = {}
        # Checked instead of a missing user's entry, so that the answer takes as long.
        self._dummy = PasswordEntry(
            "", ScryptHash(SCRYPT_N, SCRYPT_R, SCRYPT_P,
                           secrets.token_bytes(SALT_SIZE), secrets.token_bytes(HASH_SIZE)),
            cram_contexts(secrets.token_bytes(16)))
        self.refresh()

    @property
    def users(self) -> frozenset[str]:
        self.refresh()
        return frozenset(self._entries)

    def has_cram_md5(self) -> bool:
        """Whether any user can log in with CRAM-MD5 (only then is it offered)."""
        return bool(self.cram_md5_users())

    def cram_md5_users(self) -> frozenset[str]:
        """The users whose entry serves CRAM-MD5."""
        self.refresh()
        return frozenset(e.user for e in self._entries.values() if e.cram_md5 is not None)

    def refresh(self) -> None:
        """Re-read the file if it changed since the last look (stat per call)."""
        if self._path is None:
            return
        try:
            st = os.stat(self._path)
        except FileNotFoundError:
            if self._stamp != (0, 0, 0):
                log.warn(  # noqa: G010 (twisted.logger has no .warning)
                    "password file {path} missing: no user can log in", path=self._path)
            self._stamp, self._entries = (0, 0, 0), {}
            return
        except OSError as e:
            log.error("password file {path}: {why}; keeping the users read before",
                      path=self._path, why=e)
            return
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        try:
            entries = read_password_file(self._path)
        except (OSError, UnicodeDecodeError) as e:
            log.error("password file {path}: {why}; keeping the users read before",
                      path=self._path, why=e)
            return
        if stat.S_IMODE(st.st_mode) & 0o077:
            log.warn(  # noqa: G010 (twisted.logger has no .warning)
                "password file {path} is readable by others (mode {mode:o})",
                path=self._path, mode=stat.S_IMODE(st.st_mode))
        self._stamp, self._entries = stamp, entries
        log.info("password file {path}: {count} users", path=self._path, count=len(entries))

    def requestAvatarId(self, credentials: Any) -> Deferred:
        self.refresh()
        if isinstance(credentials, CramMD5Credentials):
            return self._check_cram_md5(credentials)
        if IUsernamePassword.providedBy(credentials):
            return self._check_password(credentials)
        return fail(UnhandledCredentials(f"cannot check {type(credentials).__name__}"))

    def _check_password(self, credentials: Any) -> Deferred:
        user = _text(credentials.username)
        password = credentials.password
        if isinstance(password, str):
            password = password.encode("utf-8")
        entry = self._entries.get(user) if user else None
        d = self._run_in_thread(verify_password, entry or self._dummy, password)

        def decide(ok: bool) -> str:
            if ok and entry is not None and password:
                return entry.user
            raise UnauthorizedLogin()

        return d.addCallback(decide)

    def _check_cram_md5(self, credentials: CramMD5Credentials) -> Deferred:
        user = _text(credentials.username)
        entry = self._entries.get(user) if user else None
        response = _text(credentials.response) or ""
        usable = entry is not None and entry.cram_md5 is not None
        ok = verify_cram_md5(entry if usable else self._dummy, credentials.challenge, response)
        if not ok or not usable:
            return fail(UnauthorizedLogin())
        return succeed(entry.user)


def _text(value: bytes | str | None) -> str | None:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return value


class IAuthenticatedUser(Interface):
    """The avatar interface: the avatar is the authenticated user name (a str)."""


@implementer(IRealm)
class UserRealm:
    def requestAvatar(self, avatar_id: Any, mind: Any, *interfaces: Any) -> tuple:
        if IAuthenticatedUser not in interfaces:
            raise NotImplementedError("UserRealm only gives IAuthenticatedUser")
        return IAuthenticatedUser, avatar_id, lambda: None


def make_portal(checker: PasswordFileChecker) -> Portal:
    return Portal(UserRealm(), [checker])


def login(portal: Portal, credentials: Any) -> Deferred:
    """Deferred firing with the user name, or failing with `UnauthorizedLogin`."""
    d = portal.login(credentials, None, IAuthenticatedUser)
    return d.addCallback(lambda result: result[1])
