"""Mail addresses and the argument syntax of MAIL and RCPT.

Owns the grammar of RFC 5321 4.1.2 (Path, Mailbox, Local-part, Domain,
address-literal), its UTF-8 extension of RFC 6531 3.3, ESMTP parameters
(``KEYWORD[=value]``) and xtext [RFC 3461 4].  Nothing here does I/O.

`parse_path` raises `AddressError` with a sentence fit for a 501/553 reply.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass


class AddressError(ValueError):
    """The text is not a valid path, mailbox or parameter list."""


_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_ATEXT_UTF8 = r"(?:[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]|[^\x00-\x7f])"
_DOT_STRING = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*\Z")
_DOT_STRING_UTF8 = re.compile(rf"{_ATEXT_UTF8}+(?:\.{_ATEXT_UTF8}+)*\Z")
# Quoted-string: qtextSMTP is %d32-33 / %d35-91 / %d93-126, quoted-pair is "\" %d32-126.
_QUOTED = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"\Z')
_QUOTED_UTF8 = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|[^\x00-\x7f]|\\[\x20-\x7e])*"\Z')
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\Z")
_LABEL_UTF8 = re.compile(r"(?:[A-Za-z0-9]|[^\x00-\x7f])(?:(?:[A-Za-z0-9-]|[^\x00-\x7f])*(?:[A-Za-z0-9]|[^\x00-\x7f]))?\Z")
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
# esmtp-value: any CHAR excluding "=", SP, and control characters [RFC 5321 4.1.2];
# RFC 6531 3.3 allows UTF-8 there when SMTPUTF8 is in use.
_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e\u0080-\U0010ffff]+\Z")

MAX_LOCAL_PART = 64  # RFC 5321 4.5.3.1.1
MAX_DOMAIN = 255  # RFC 5321 4.5.3.1.2
MAX_PATH = 256  # RFC 5321 4.5.3.1.3


@dataclass(frozen=True)
class Mailbox:
    """``local@domain``; `domain` is kept as given, `domain_key` is for lookups."""

    local: str
    domain: str

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}" if self.domain else self.local

    @property
    def domain_key(self) -> str:
        """The domain, lower case, without a trailing dot; used for routing."""
        domain = self.domain.lower()
        return domain.removesuffix(".")

    @property
    def is_ascii(self) -> bool:
        return str(self).isascii()

    @property
    def is_postmaster(self) -> bool:
        return self.local.lower() == "postmaster"


def is_valid_domain(domain: str, utf8: bool = False) -> bool:
    if not domain or len(domain) > MAX_DOMAIN:
        return False
    # One trailing dot (an absolute name) is tolerated and dropped in lookups; more are not.
    name = domain.removesuffix(".")
    labels = name.split(".") if name else []
    if not labels:
        return False
    label_re = _LABEL_UTF8 if utf8 else _LABEL
    return all(len(label.encode()) <= 63 and label_re.match(label) for label in labels)


def _valid_address_literal(text: str) -> bool:
    inner = text[1:-1]
    if inner.lower().startswith("ipv6:"):
        try:
            ipaddress.IPv6Address(inner[5:])
            return True
        except ValueError:
            return False
    try:
        ipaddress.IPv4Address(inner)
        return True
    except ValueError:
        pass
    # General-address-literal: Standardized-tag ":" 1*dcontent
    return bool(re.match(r"[A-Za-z0-9-]*[A-Za-z0-9]:[\x21-\x5a\x5e-\x7e]+\Z", inner))


def parse_mailbox(text: str, utf8: bool = False, allow_bare_postmaster: bool = False) -> Mailbox:
    """Parse ``local@domain``; ``utf8`` allows RFC 6531 non-ASCII."""
    if not utf8 and not text.isascii():
        raise AddressError("non-ASCII address requires SMTPUTF8")
    if allow_bare_postmaster and text.lower() == "postmaster":
        return Mailbox(text, "")
    at = text.rfind("@")
    if at <= 0:
        raise AddressError("address must be local-part@domain")
    local, domain = text[:at], text[at + 1 :]
    dot_re, quoted_re = (_DOT_STRING_UTF8, _QUOTED_UTF8) if utf8 else (_DOT_STRING, _QUOTED)
    if not dot_re.match(local):
        if not quoted_re.match(local):
            raise AddressError("invalid local part")
        # "bob"@ is bob@ [RFC 5321 4.1.2: quoting what needs none changes nothing]:
        # one mailbox, one spelling, for policy, routing and the log alike.
        unquoted = re.sub(r"\\(.)", r"\1", local[1:-1])
        if dot_re.match(unquoted):
            local = unquoted
    if len(local.encode()) > MAX_LOCAL_PART:
        raise AddressError("local part too long")
    if domain.startswith("["):
        if not (domain.endswith("]") and _valid_address_literal(domain)):
            raise AddressError("invalid address literal")
    elif not is_valid_domain(domain, utf8):
        raise AddressError("invalid domain")
    return Mailbox(local, domain)


def split_path_and_params(arg: str) -> tuple[str, str]:
    """Split ``<path> PARAMS`` (or a bare path, which we tolerate) into two strings."""
    arg = arg.strip()
    if arg.startswith("<"):
        # A quoted local part may hold '>'; scan for the closing bracket outside quotes.
        in_quote = escaped = False
        for i, ch in enumerate(arg):
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_quote = not in_quote
            elif ch == ">" and not in_quote:
                return arg[: i + 1], arg[i + 1 :].strip()
        raise AddressError("path is missing its closing '>'")
    path, _, rest = arg.partition(" ")
    if not path:
        raise AddressError("missing path")
    return f"<{path}>", rest.strip()


def parse_path(path: str, utf8: bool = False, null_ok: bool = False,
               allow_bare_postmaster: bool = False) -> Mailbox | None:
    """Parse ``<...>`` into a Mailbox; ``<>`` gives None when `null_ok`.

    A source route (``<@a,@b:user@c>``) is accepted and its hops dropped, as
    RFC 5321 4.1.1.3 and Appendix C ask.
    """
    if not (path.startswith("<") and path.endswith(">")):
        raise AddressError("path must be enclosed in <>")
    inner = path[1:-1]
    if inner == "":
        if null_ok:
            return None
        raise AddressError("empty path not allowed here")
    if len(inner.encode()) > MAX_PATH:
        raise AddressError("path too long")
    if inner.startswith("@"):
        route, colon, mailbox = inner.partition(":")
        if not colon:
            raise AddressError("bad source route")
        for hop in route.split(","):
            if not (hop.startswith("@") and is_valid_domain(hop[1:], utf8)):
                raise AddressError("bad source route")
        inner = mailbox
    return parse_mailbox(inner, utf8, allow_bare_postmaster)


def parse_params(text: str) -> dict[str, str | None]:
    """``A=1 B`` -> {"A": "1", "B": None}; keywords upper-cased; duplicates refused."""
    params: dict[str, str | None] = {}
    for item in text.split():
        key, eq, value = item.partition("=")
        if not _KEYWORD.match(key):
            raise AddressError(f"bad parameter syntax: {item}")
        if eq and not _VALUE.match(value):
            raise AddressError(f"bad value for {key.upper()}")
        key = key.upper()
        if key in params:
            raise AddressError(f"duplicate parameter {key}")
        params[key] = value if eq else None
    return params


@functools.lru_cache(maxsize=4096)  # asked several times per connection, of few addresses
def client_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A peer's address as an IP, IPv4-mapped IPv6 unwrapped, scope dropped; None if not an IP."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return ip.ipv4_mapped
    return ip


# -- xtext [RFC 3461 4] ------------------------------------------------------

_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*\Z")


def xtext_decode(text: str) -> str:
    """The octets `text` stands for, read as UTF-8: the inverse of `xtext_encode`."""
    if not _XTEXT.match(text):
        raise AddressError("bad xtext")
    raw = re.sub(rb"\+([0-9A-F]{2})", lambda m: bytes([int(m.group(1), 16)]), text.encode("ascii"))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise AddressError("xtext does not encode UTF-8") from None


def xtext_encode(text: str) -> str:
    out = []
    for ch in text:
        if "!" <= ch <= "~" and ch not in "+=":
            out.append(ch)
        else:
            out.extend(f"+{b:02X}" for b in ch.encode("utf-8"))
    return "".join(out)
