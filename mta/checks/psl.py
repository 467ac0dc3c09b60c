"""The public suffix list, and the organisational domain DMARC needs from it.

RFC 7489 3.2 defines a domain's organisational domain from a public suffix
list: the public suffix (the longest matching rule, ``*`` a wildcard label,
``!`` an exception that takes one label off) plus one more label.  The list
is the one Debian's ``publicsuffix`` package installs
(``/usr/share/publicsuffix/public_suffix_list.dat``, ``[checks]
public_suffix_list``), read in its published form [publicsuffix.org/list]:
one rule a line, ``//`` comments, the ICANN and private sections alike.

`load(path)` reads a file once per modification time; `organizational_domain`
never fails: a name no rule matches has the implicit rule ``*`` (its last
label is the suffix), as the list's own algorithm says.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path


class PublicSuffixList:
    def __init__(self, lines: list[str]) -> None:
        self.rules: set[str] = set()
        self.wildcards: set[str] = set()  # "*.ck" is kept as "ck"
        self.exceptions: set[str] = set()  # "!www.ck" is kept as "www.ck"
        for line in lines:
            rule = line.strip().split()[0] if line.strip() else ""
            if not rule or rule.startswith("//"):
                continue
            rule = a_label(rule.lower().rstrip("."))
            if rule.startswith("!"):
                self.exceptions.add(rule[1:])
            elif rule.startswith("*."):
                self.wildcards.add(rule[2:])
            else:
                self.rules.add(rule)

    def public_suffix(self, domain: str) -> str:
        """The public suffix of `domain` (lower case, no trailing dot, A-labels)."""
        labels = a_label(domain.lower().rstrip(".")).split(".")
        for i in range(len(labels)):
            candidate = ".".join(labels[i:])
            if candidate in self.exceptions:
                return ".".join(labels[i + 1:])  # an exception rule: one label less
            if candidate in self.rules:
                return candidate
            if i > 0 and candidate in self.wildcards:
                return ".".join(labels[i - 1:])
        return labels[-1]  # the implicit "*" rule

    def organizational_domain(self, domain: str) -> str:
        """The public suffix plus one label [RFC 7489 3.2]; a suffix itself is its own."""
        name = a_label(domain.lower().rstrip("."))
        suffix = self.public_suffix(name)
        if name == suffix:
            return name
        labels = name.split(".")
        return ".".join(labels[-(suffix.count(".") + 2):])


def a_label(name: str) -> str:
    """A-labels, as DNS and DKIM's d= have them; a name IDNA refuses stays as it is."""
    if name.isascii():
        return name
    try:
        return name.encode("idna").decode("ascii")
    except UnicodeError:
        return name


_cache: dict[Path, tuple[float, PublicSuffixList]] = {}
_lock = threading.Lock()


def load(path: Path) -> PublicSuffixList:
    """The list in `path`, read again only when the file changed (OSError if unreadable)."""
    mtime = os.stat(path).st_mtime
    with _lock:
        cached = _cache.get(path)
        if cached is not None and cached[0] == mtime:
            return cached[1]
    with open(path, encoding="utf-8") as f:
        table = PublicSuffixList(f.read().splitlines())
    with _lock:
        _cache[path] = (mtime, table)
    return table
