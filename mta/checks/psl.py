"""The public suffix list, and the organisational domain DMARC needs from it.

RFC 7489 3.2 defines a domain's organisational domain from a public suffix
list: the public suffix (the longest matching rule, ``*`` a wildcard label,
``!`` an exception that takes one label off) plus one more label.  The
matching is the `publicsuffixlist` package's (PyPI), which also ships a
recent copy of the list [publicsuffix.org/list], updated with the package:
that copy is the default, so DMARC works on any machine.  ``[checks]
public_suffix_list`` names another file in the published form instead, such
as the one Debian's ``publicsuffix`` package keeps up to date
(``/usr/share/publicsuffix/public_suffix_list.dat``).

`load(path)` reads a file once per modification time (None: the shipped
copy, read once); `organizational_domain` never fails: a name no rule
matches has the implicit rule ``*`` (its last label is the suffix), as the
list's own algorithm says, and a public suffix is its own organisational
domain.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import publicsuffixlist


class PublicSuffixList:
    def __init__(self, source: publicsuffixlist.PublicSuffixList) -> None:
        self.source = source

    @classmethod
    def of_lines(cls, lines: list[str]) -> PublicSuffixList:
        """A list made of rule lines (tests, and any file in the published form)."""
        text = "\n".join(lines).encode("utf-8")
        return cls(publicsuffixlist.PublicSuffixList(source=text.splitlines(keepends=True)))

    def public_suffix(self, domain: str) -> str:
        """The public suffix of `domain` (lower case, no trailing dot, A-labels)."""
        name = a_label(domain.lower().rstrip("."))
        return self.source.publicsuffix(name) or name.rpartition(".")[2]

    def organizational_domain(self, domain: str) -> str:
        """The public suffix plus one label [RFC 7489 3.2]; a suffix itself is its own."""
        name = a_label(domain.lower().rstrip("."))
        return self.source.privatesuffix(name) or name


def a_label(name: str) -> str:
    """A-labels, as DNS and DKIM's d= have them; a name IDNA refuses stays as it is."""
    if name.isascii():
        return name
    try:
        return name.encode("idna").decode("ascii")
    except UnicodeError:
        return name


_cache: dict[Path | None, tuple[float, PublicSuffixList]] = {}
_lock = threading.Lock()


def load(path: Path | None = None) -> PublicSuffixList:
    """The list in `path` (None: the copy shipped with publicsuffixlist), read again
    only when the file changed; OSError if it cannot be read."""
    mtime = os.stat(path).st_mtime if path is not None else 0.0
    with _lock:
        cached = _cache.get(path)
        if cached is not None and cached[0] == mtime:
            return cached[1]
    if path is None:
        table = PublicSuffixList(publicsuffixlist.PublicSuffixList())
    else:
        with open(path, "rb") as f:
            table = PublicSuffixList(publicsuffixlist.PublicSuffixList(source=f))
    with _lock:
        _cache[path] = (mtime, table)
    return table
