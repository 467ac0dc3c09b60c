"""The Authentication-Results header field [RFC 8601], written and recognised.

`field(authserv_id, spf, dkim, dmarc)` writes our one header field with
authres: ``Authentication-Results: <authserv-id>;`` then one result per
method (one per signature for DKIM, one per author domain for DMARC),
folded one result a line.  A method that was not run is left out; DKIM
run on a message without signatures is ``dkim=none``.  Everything in it
that came from the network (addresses, d=, reasons) is made printable and
fit for a header first: a reason goes into a comment without parentheses
or backslashes, and an address whose local part is not a plain dot-atom
is named by its domain alone (RFC 8601 2.7.2 allows either).

`authserv_id_of(value)` reads the authserv-id that a received field's value
begins with (after any CFWS, a token or a quoted-string [RFC 8601 2.2]; a
token ends at a control character or a tspecial [RFC 2045 5.1]),
so that fields claiming our name are removed [RFC 8601 5]; it never fails,
and gives "" for a value it cannot read.

`summary(...)` is the same verdicts on one line, for the mail log.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from authres import AuthenticationResultsHeader, DKIMAuthenticationResult, SPFAuthenticationResult
from authres.core import AuthenticationResult, AuthenticationResultProperty
from authres.dmarc import DMARCAuthenticationResult

from mta.reply import printable

if TYPE_CHECKING:  # the reading side (cleanup.py) imports this module: not dkimpy or pyspf
    from mta.checks.dkimverify import DKIMResult
    from mta.checks.dmarc import DMARCResult
    from mta.checks.spf import SPFResult

_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+\Z")
# A token ends at space, a CTL or a tspecial [RFC 2045 5.1, RFC 8601 2.2]: a value
# such as "OURNAME\0; dmarc=pass" is ours to remove (a C-string reader sees OURNAME).
_TOKEN_END = re.compile(r'[\s\x00-\x1f\x7f()<>@,;:\\"/\[\]?=]')


def field(authserv_id: str, spf: SPFResult | None, dkim: list[DKIMResult] | None,
          dmarc: list[DMARCResult] | None) -> bytes:
    """The header field, CRLF-terminated, ready for `Incoming.prepend`."""
    results = _results(spf, dkim, dmarc)
    header = AuthenticationResultsHeader(authserv_id=authserv_id, results=results)
    text = f"{header.HEADER_FIELD_NAME}: {header.authserv_id}"
    text += ";\r\n\t" + ";\r\n\t".join(str(r) for r in results) if results else "; none"
    return (text + "\r\n").encode("utf-8")


def _results(spf: SPFResult | None, dkim: list[DKIMResult] | None,
             dmarc: list[DMARCResult] | None) -> list[AuthenticationResult]:
    results: list[AuthenticationResult] = []
    if spf is not None:
        results.append(_spf(spf))
    if dkim is not None:
        results += [_dkim(r) for r in dkim] or [DKIMAuthenticationResult(result="none")]
    if dmarc is not None:
        results += [_dmarc(r) for r in dmarc]
    return results


def _spf(result: SPFResult) -> SPFAuthenticationResult:
    comment = _comment(result.explanation) if result.result not in ("pass", "none") else None
    if result.identity == "helo":
        return SPFAuthenticationResult(result=result.result, result_comment=comment,
                                       smtp_helo=_value(result.domain))
    return SPFAuthenticationResult(result=result.result, result_comment=comment,
                                   smtp_mailfrom=_address(result.sender))


def _dkim(result: DKIMResult) -> DKIMAuthenticationResult:
    made = DKIMAuthenticationResult(
        result=result.result,
        result_comment=_comment(result.reason) if result.result != "pass" else None,
        header_d=_value(result.domain) or None, header_s=_value(result.selector) or None,
        header_a=_value(result.algorithm) or None)
    prefix = _value(result.signature[:8])  # RFC 6008 4: enough to tell signatures apart
    if prefix:
        made.properties.append(AuthenticationResultProperty("header", "b", prefix))
    return made


def _dmarc(result: DMARCResult) -> DMARCAuthenticationResult:
    if result.policy is not None:
        comment = f"p={result.policy} dis={result.disposition}"
    else:
        comment = _comment(result.reason) if result.result != "none" else None
    return DMARCAuthenticationResult(result=result.result, result_comment=comment,
                                     header_from=_value(result.domain) or None)


def _address(address: str) -> str:
    local, _, domain = address.rpartition("@")
    if local and _DOT_ATOM.match(local) and not local.startswith(".") and ".." not in local:
        return _value(f"{local}@{domain}")
    return _value(domain)


def _value(text: str) -> str:
    """Text fit to be a property's value: printable, no space, no header syntax."""
    return "".join(c for c in printable(text, 255) if c.isprintable() and c not in ' ;()"\\')


def _comment(text: str) -> str | None:
    cleaned = "".join(c for c in printable(text, 120) if c not in "()\\")
    return cleaned.strip() or None


def authserv_id_of(value: str) -> str:
    """The authserv-id a field's value starts with, lower case, no trailing dot."""
    i = _skip_cfws(value, 0)
    if i < len(value) and value[i] == '"':
        j, text = i + 1, []
        while j < len(value) and value[j] != '"':
            if value[j] == "\\" and j + 1 < len(value):
                j += 1
            text.append(value[j])
            j += 1
        return "".join(text).strip().lower().rstrip(".")
    end = _TOKEN_END.search(value, i)
    return value[i:end.start() if end else len(value)].lower().rstrip(".")


def _skip_cfws(value: str, i: int) -> int:
    """Past folding white space and (nested) comments [RFC 5322 3.2.2]."""
    depth = 0
    while i < len(value):
        c = value[i]
        if depth:
            if c == "\\":
                i += 1
            elif c == "(":
                depth += 1
            elif c == ")":
                depth -= 1
        elif c == "(":
            depth = 1
        elif not c.isspace():
            break
        i += 1
    return i


def summary(spf: SPFResult | None, dkim: list[DKIMResult] | None,
            dmarc: list[DMARCResult] | None) -> str:
    """One line for the mail log: ``spf=pass smtp.mailfrom=a@x dkim=pass header.d=x ...``."""
    parts = []
    if spf is not None:
        if spf.identity == "helo":
            parts.append(f"spf={spf.result} smtp.helo={_value(spf.domain)}")
        else:
            parts.append(f"spf={spf.result} smtp.mailfrom={_address(spf.sender)}")
    if dkim is not None:
        parts += [f"dkim={r.result} header.d={_value(r.domain)} header.s={_value(r.selector)}"
                  for r in dkim] or ["dkim=none"]
    if dmarc is not None:
        for r in dmarc:
            text = f"dmarc={r.result}"
            if r.domain:
                text += f" header.from={_value(r.domain)}"
            if r.policy is not None:
                text += f" policy={r.policy} disposition={r.disposition}"
            elif r.result in ("permerror", "temperror"):
                text += f" ({_comment(r.reason) or ''})"
            parts.append(text)
    return " ".join(parts)
