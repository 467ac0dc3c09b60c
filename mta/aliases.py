"""Local addresses: which domains are ours, which names exist there, and where mail to them goes.

This module is the one definition of "local" and "which mailbox".  RCPT
(policy.py), VRFY and EXPN (session.py), `mta sendmail`, bounces we inject
and delivery (router.py) all ask `Addresses`, which `Config.addresses` builds
once per config (a reload makes a new one).

Files, read when the config is loaded (`read_aliases`, `read_virtual`):

- aliases, the ``/etc/aliases`` form [aliases(5)]: ``name: target, target``;
  a line starting with white space continues the one before; ``#`` starts a
  comment line; a target is a local name (qualified with the domain of the
  address being expanded), ``user@domain`` (local or remote),
  ``\\name`` (the mailbox itself, no further alias lookup) or
  ``:include:/path`` (a file of targets, one or more a line).  Pipes and
  file targets are refused: we deliver to Maildirs and SMTP only.
  ``[server] aliases`` are the system's (``root``, ``MAILER-DAEMON``...):
  they apply at our hostname and ``localhost``; ``[domains."D"] aliases``
  apply at D (first, when D is also our hostname).
- virtual aliases ``[server] virtual``, the Postfix virtual(5) form:
  ``user@domain target, target`` (a colon after the key is allowed);
  ``@domain target`` catches every address of that domain that is not
  otherwise known; ``@domain @other`` maps each user to the same name at
  other.  A domain named there that is not in ``[domains]`` is ours too,
  for those addresses only.

Expansion (`resolve`) is recursive, loop-safe (an address seen once is not
expanded again; a name that lists itself means its own mailbox) and
de-duplicated.  A list ``NAME`` whose file also has ``owner-NAME`` is a
mailing list [RFC 5321 3.10]: its members get ``owner-NAME@domain`` as
their envelope sender, so their bounces go to the owner.

Local domains are the ``[domains]`` (their `users`, when given, are the
only names there besides aliases and postmaster), our hostname and
``localhost`` (system mail: only aliases and postmaster there, unless the
hostname is itself a configured domain).  ``postmaster@`` every local
domain works [RFC 5321 4.5.1]: an alias for it wins, else ``[server]
postmaster``, else the domain's own ``postmaster`` mailbox; at a domain
routed on to its own server (smtp:, hold) it is passed on to that server.  With
``[server] recipient_delimiter`` (default "+"), ``user+tag@`` is accepted
wherever ``user@`` is, and lands in user's mailbox.

Errors in the files are `AliasFileError` with a one-line message naming
the file and line; the config loader turns them into `ConfigError`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mta.address import AddressError, parse_mailbox

if TYPE_CHECKING:
    from mta.config import Config

SYSTEM_DOMAINS = ("localhost",)  # besides our hostname
MAX_DEPTH = 20  # nested aliases; deeper is treated as a loop (sendmail stops at 10)
MAX_INCLUDE_DEPTH = 5

# What `destination` says of an address.
MAILBOX = "mailbox"  # a Maildir here
FORWARD = "forward"  # ours, and handed on over the domain's smtp: or hold route
UNKNOWN = "unknown"  # ours, and no such name
REMOTE = "remote"  # not ours

# What `resolve` says of an address.
LOCAL = "local"  # ours: `targets` is where it goes
LOOP = "loop"  # ours, but its aliases lead nowhere but back to themselves


class AliasFileError(ValueError):
    """A line of an aliases or virtual file cannot be used."""


# -- the files ----------------------------------------------------------------------

_NAME = re.compile(r"[^\s:#,\"]+\Z")


def _read_text(path: Path, where: str, cannot: str = "") -> str:
    """A file's text, or an AliasFileError that starts with `where`."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise AliasFileError(f"{where} {cannot}{e.strerror}") from None
    except UnicodeDecodeError:
        raise AliasFileError(f"{where} not UTF-8 text") from None


def _logical_lines(path: Path) -> Iterable[tuple[int, str]]:
    """(first line number, text) of each entry: continuation lines joined, comments dropped."""
    text = _read_text(path, f"{path}:", "cannot read: ")
    start, parts = 0, []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if line[0] in " \t" and parts:
            parts.append(stripped)
            continue
        if parts:
            yield start, " ".join(parts)
        start, parts = number, [stripped]
    if parts:
        yield start, " ".join(parts)


def _targets(text: str, where: str, depth: int = 0) -> list[str]:
    """The comma-separated targets of one entry, ``:include:`` files read in."""
    targets = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        if item.startswith('"') and item.endswith('"') and len(item) > 1:
            item = item[1:-1].strip()
        if item.lower().startswith(":include:"):
            targets += _include(Path(item[len(":include:"):].strip()), where, depth)
        elif item.startswith(("|", "/")):
            raise AliasFileError(f"{where}: {item!r}: pipes and files are not supported; "
                                 "only names and addresses")
        else:
            _check_target(item, where)
            targets.append(item)
    return targets


def _include(path: Path, where: str, depth: int) -> list[str]:
    if depth >= MAX_INCLUDE_DEPTH:
        raise AliasFileError(f"{where}: :include: nested more than {MAX_INCLUDE_DEPTH} deep")
    text = _read_text(path, f"{where}: :include:{path}:")
    targets = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            targets += _targets(line, f"{path}:{number}", depth + 1)
    return targets


def _check_target(item: str, where: str) -> None:
    name = item.removeprefix("\\")
    if name.startswith("@") and _valid_domain(name[1:]):
        return  # "@domain": read_virtual decides where it may stand
    if "@" in name:
        try:
            parse_mailbox(name, utf8=True)
        except AddressError as e:
            raise AliasFileError(f"{where}: bad address {item!r}: {e}") from None
    elif not _NAME.match(name):
        raise AliasFileError(f"{where}: bad name {item!r}")


def read_aliases(path: Path) -> dict[str, tuple[str, ...]]:
    """An aliases file: lower-case name -> targets as written."""
    entries: dict[str, tuple[str, ...]] = {}
    for number, line in _logical_lines(path):
        where = f"{path}:{number}"
        name, colon, rest = line.partition(":")
        name = name.strip().strip('"')
        if not colon or not _NAME.match(name) or "@" in name:
            raise AliasFileError(f"{where}: expected \"name: address, address\"")
        targets = _targets(rest, where)
        if not targets:
            raise AliasFileError(f"{where}: {name}: no targets")
        for target in targets:
            if target.startswith("@"):
                raise AliasFileError(f"{where}: bad target {target!r}: a name or an address")
        key = name.lower()
        if key in entries:
            raise AliasFileError(f"{where}: {name} is defined twice")
        entries[key] = tuple(targets)
    return entries


def read_virtual(path: Path) -> dict[str, tuple[str, ...]]:
    """A virtual alias file: ``user@domain`` or ``@domain`` (lower case) -> targets."""
    entries: dict[str, tuple[str, ...]] = {}
    for number, line in _logical_lines(path):
        where = f"{path}:{number}"
        fields = line.split(None, 1)
        key = fields[0].rstrip(":").lower()
        rest = fields[1] if len(fields) > 1 else ""
        if key.startswith("@"):
            domain_ok = _valid_domain(key[1:])
        else:
            try:
                mailbox = parse_mailbox(key, utf8=True)
                domain_ok = not mailbox.domain.startswith("[")
            except AddressError:
                domain_ok = False
        if not domain_ok:
            raise AliasFileError(f"{where}: expected \"user@domain address, ...\" "
                                 f"or \"@domain address, ...\", got {fields[0]!r}")
        key = key.rstrip(".")
        targets = []
        for target in _targets(rest, where):
            if target.startswith("@"):
                if not key.startswith("@") or not _valid_domain(target[1:]):
                    raise AliasFileError(f"{where}: {target!r}: \"@domain\" maps only a "
                                         "\"@domain\" key")
            elif "@" not in target:
                raise AliasFileError(f"{where}: {target!r}: write a full address "
                                     "(user@domain) in a virtual file")
            targets.append(target)
        if not targets:
            raise AliasFileError(f"{where}: {fields[0]}: no targets")
        if key in entries:
            raise AliasFileError(f"{where}: {fields[0]} is defined twice")
        entries[key] = tuple(targets)
    return entries


def _valid_domain(text: str) -> bool:
    try:
        parse_mailbox(f"x@{text}", utf8=True)
    except AddressError:
        return False
    return not text.startswith("[")


# -- resolution -------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """One address a recipient expands to."""

    address: str
    sender: str | None = None  # a list's owner: the envelope sender for this target
    via: str | None = None  # the alias it came from, None when it is the address itself


@dataclass(frozen=True)
class Resolution:
    kind: str  # LOCAL | REMOTE | UNKNOWN | LOOP
    targets: tuple[Target, ...] = ()
    unknown: tuple[str, ...] = ()  # targets that are ours and do not exist
    loops: tuple[str, ...] = ()  # names whose expansion led back to themselves

    @property
    def expanded(self) -> bool:
        """Whether an alias was followed (EXPN's "list" and VRFY's 251 need it)."""
        return any(t.via is not None for t in self.targets)


def split(address: str) -> tuple[str, str]:
    """``local@domain`` -> (local part, domain key: lower case, no trailing dot)."""
    local, _, domain = address.rpartition("@")
    return local, domain.lower().rstrip(".")


class Addresses:
    """The local address space of one config: see the module docstring."""

    def __init__(self, config: Config) -> None:
        server = config.server
        self.hostname = server.hostname.lower().rstrip(".")
        self.postmaster = server.postmaster
        self.delimiter = server.recipient_delimiter
        self.masquerade_as = config.relay.masquerade
        self.system_domains = frozenset((self.hostname, *SYSTEM_DOMAINS))
        self.global_aliases: Mapping[str, tuple[str, ...]] = server.alias_entries or {}
        self.virtual: Mapping[str, tuple[str, ...]] = server.virtual_entries or {}
        self.domains = config.domains
        self.users = {name: frozenset(u.lower() for u in d.users)
                      for name, d in config.domains.items()}
        self.virtual_domains = frozenset(split(key)[1] if not key.startswith("@") else key[1:]
                                         for key in self.virtual)

    # -- what is ours --------------------------------------------------------------

    def is_local_domain(self, domain: str) -> bool:
        """Mail for `domain` is ours to accept (configured, system or virtual)."""
        key = domain.lower().rstrip(".")
        return key in self.domains or key in self.system_domains or key in self.virtual_domains

    def _has_mailboxes(self, domain: str) -> bool:
        """Local names apply here: a maildir domain or a system domain."""
        configured = self.domains.get(domain)
        if configured is not None:
            return configured.route.kind == "maildir"
        return domain in self.system_domains

    def _forwards(self, domain: str) -> bool:
        """Mail for `domain` goes on to its own server (an smtp: or hold route): its
        postmaster is that server's, and is passed on, not ours."""
        configured = self.domains.get(domain)
        return configured is not None and configured.route.kind != "maildir"

    def _base(self, local: str) -> str | None:
        """``user`` of ``user+tag`` (lower case), or None without a delimiter in it."""
        if not self.delimiter:
            return None
        base, found, _ = local.partition(self.delimiter)
        return base.lower() if found else None

    def destination(self, address: str) -> tuple[str, str | None]:
        """Where a final address (aliases already followed) goes: (MAILBOX, user name),
        (FORWARD, None), (UNKNOWN, None) or (REMOTE, None).  Delivery asks this too."""
        local, domain = split(address)
        configured = self.domains.get(domain)
        if configured is None:
            if domain in self.system_domains or domain in self.virtual_domains:
                return UNKNOWN, None
            return REMOTE, None
        users = self.users[domain]
        name = local.lower()
        base = self._base(local)
        if configured.route.kind != "maildir":
            if not users or name in users or base in users or name == "postmaster":
                return FORWARD, None
            return UNKNOWN, None
        if not users:
            return MAILBOX, base if base is not None else name  # "+tag" alone: "", refused
        if name in users:
            return MAILBOX, name
        if base in users:
            return MAILBOX, base
        if name == "postmaster":
            return MAILBOX, name  # RFC 5321 4.5.1: the domain's own, when nothing else is set
        return UNKNOWN, None

    def mailbox(self, address: str) -> str | None:
        """The Maildir user name `address` is delivered to, or None."""
        kind, user = self.destination(address)
        return user if kind == MAILBOX else None

    # -- one step -----------------------------------------------------------------------

    def _aliases_of(self, domain: str) -> list[Mapping[str, tuple[str, ...]]]:
        tables = []
        configured = self.domains.get(domain)
        if configured is not None and configured.alias_entries:
            tables.append(configured.alias_entries)
        if domain in self.system_domains and self.global_aliases:
            tables.append(self.global_aliases)
        return tables

    def _alias(self, local: str, domain: str) -> tuple[str, tuple[str, ...], str | None] | None:
        """(name, targets, owner address) of the alias `local` names at `domain`."""
        names = [local.lower()]
        base = self._base(local)
        if base is not None:
            names.append(base)
        for name in names:
            key = f"{name}@{domain}"
            if key in self.virtual:
                return key, self.virtual[key], None
            for table in self._aliases_of(domain):
                if name in table:
                    owner = f"owner-{name}"
                    return name, table[name], f"{owner}@{domain}" if owner in table else None
        return None

    def _step(self, address: str) -> tuple[str, tuple[str, ...], str | None]:
        """What one address is: (kind, targets or (), owner).  kind: "alias", MAILBOX,
        FORWARD, UNKNOWN or REMOTE."""
        local, domain = split(address)
        if not self.is_local_domain(domain):
            return REMOTE, (), None
        found = self._alias(local, domain)
        if found is not None:
            _name, targets, owner = found
            return "alias", tuple(self._qualify(t, domain, local) for t in targets), owner
        if local.lower() == "postmaster" and self.postmaster and not self._forwards(domain) \
                and self.postmaster.lower() != f"postmaster@{domain}":
            return "alias", (self.postmaster,), None  # RFC 5321 4.5.1
        kind, _ = self.destination(address)
        if kind == UNKNOWN:
            catch_all = self.virtual.get(f"@{domain}")
            if catch_all is not None:
                return "alias", tuple(f"{local}{t}" if t.startswith("@") else t
                                      for t in catch_all), None
        return kind, (), None

    @staticmethod
    def _qualify(target: str, domain: str, local: str) -> str:
        r"""A target as an address: bare names at `domain`; ``\name`` stays marked."""
        if target.startswith("\\"):
            name = target[1:]
            return "\\" + (name if "@" in name else f"{name}@{domain}")
        return target if "@" in target else f"{target}@{domain}"

    # -- expansion ------------------------------------------------------------------------

    def resolve(self, address: str) -> Resolution:
        """Follow `address` through aliases to its final targets."""
        if "@" not in address:
            address = f"{address}@{self.hostname}"  # <postmaster>, a bare name
        _, domain = split(address)
        if not self.is_local_domain(domain):
            return Resolution(REMOTE, (Target(address),))
        walk = _Walk()
        self._expand(walk, address, None, None, 0, ())
        if walk.targets:
            return Resolution(LOCAL, tuple(walk.targets), tuple(walk.unknown), tuple(walk.loops))
        if walk.loops and not walk.unknown:
            return Resolution(LOOP, (), (), tuple(walk.loops))
        return Resolution(UNKNOWN, (), tuple(walk.unknown), tuple(walk.loops))

    def _expand(self, walk: _Walk, address: str, sender: str | None, via: str | None,
                depth: int, chain: tuple[str, ...]) -> None:
        mailbox_only = address.startswith("\\")
        if mailbox_only:
            address = address[1:]
        local, domain = split(address)
        key = f"{local.lower()}@{domain}"
        if key in chain or depth > MAX_DEPTH:
            walk.loops.append(chain[0] if chain else key)
            return
        if key in walk.seen:
            return  # de-duplicated: it is in the result already, or being expanded
        walk.seen.add(key)
        if mailbox_only:
            kind, targets, owner = self.destination(address)[0], (), None
        else:
            kind, targets, owner = self._step(address)
        if kind == "alias":
            member_sender = owner if owner is not None else sender
            for target in targets:
                bare = target.lstrip("\\")
                if split(bare)[0].lower() == local.lower() and split(bare)[1] == domain:
                    # "alice: alice, alice@elsewhere": a copy in the mailbox itself.
                    self._final(walk, bare, member_sender, address)
                    continue
                self._expand(walk, target, member_sender, address, depth + 1, (*chain, key))
            return
        if kind == UNKNOWN and via is not None:
            walk.unknown.append(address)
        if kind != UNKNOWN:
            walk.targets.append(Target(address, sender, via))

    def _final(self, walk: _Walk, address: str, sender: str | None, via: str) -> None:
        kind, _ = self.destination(address)
        if kind == UNKNOWN:
            walk.unknown.append(address)
        else:
            walk.targets.append(Target(address, sender, via))

    # -- VRFY and EXPN: a bare name --------------------------------------------------------

    def candidates(self, name: str) -> list[str]:
        """The addresses a bare user name (VRFY alice) may mean: at our hostname, then
        at each maildir domain where it exists."""
        found: list[tuple[str, set[str]]] = []
        for domain in (self.hostname, *sorted(self.domains)):
            if domain != self.hostname and not self._has_mailboxes(domain):
                continue
            address = f"{name}@{domain}"
            result = self.resolve(address)
            where = {t.address.lower() for t in result.targets}
            if result.kind == LOCAL and where not in (w for _, w in found):
                found.append((address, where))  # the same name going the same place is one
        return [address for address, _ in found]

    # -- outbound -----------------------------------------------------------------------

    def masquerade(self, sender: str) -> str:
        """``user@HOSTNAME`` (or ``@localhost``) as ``user@[relay] masquerade``, for mail
        that leaves by SMTP; other senders as they are."""
        if not self.masquerade_as or not sender:
            return sender
        local, domain = split(sender)
        return f"{local}@{self.masquerade_as}" if domain in self.system_domains else sender

    # -- mta aliases check ------------------------------------------------------------------

    def problems(self) -> list[str]:
        """Unknown targets and loops, one line each, for `mta aliases check`.

        The global file is checked at our hostname (localhost has the same names)."""
        lines: list[str] = []
        for source, table, domains in self._tables():
            for name in table:
                results = [(d, self.resolve(name if "@" in name else f"{name}@{d}"))
                           for d in domains]
                for domain, result in results:
                    address = name if "@" in name else f"{name}@{domain}"
                    if result.kind == UNKNOWN and not result.unknown:
                        lines.append(f"{source}: {address}: no target exists")
                    for unknown in dict.fromkeys(result.unknown):
                        lines.append(f"{source}: {address}: unknown target {unknown}")
                    for looped in dict.fromkeys(result.loops):
                        lines.append(f"{source}: {address}: alias loop through {looped}")
        if self.postmaster and self.resolve(self.postmaster).kind in (UNKNOWN, LOOP):
            lines.append(f"[server] postmaster: {self.postmaster} does not exist here")
        if not self.postmaster:
            for domain in sorted(self.system_domains - set(self.domains)):
                if self.resolve(f"postmaster@{domain}").kind != LOCAL:
                    lines.append(f"[server] postmaster: not set, and postmaster@{domain} "
                                 "has nowhere to go")
        return list(dict.fromkeys(lines))

    def _tables(self) -> Iterable[tuple[str, Mapping[str, tuple[str, ...]], list[str]]]:
        """(where it is configured, the table, the domains where it applies)."""
        for name, domain in sorted(self.domains.items()):
            if domain.alias_entries:
                yield f"[domains.\"{name}\"] aliases", domain.alias_entries, [name]
        if self.global_aliases:
            # localhost has the same names as our hostname: checking one is enough.
            yield "[server] aliases", self.global_aliases, [self.hostname]
        if self.virtual:
            yield "[server] virtual", {k: v for k, v in self.virtual.items()
                                       if not k.startswith("@")}, [""]


class _Walk:
    """The state of one expansion."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.targets: list[Target] = []
        self.unknown: list[str] = []
        self.loops: list[str] = []
