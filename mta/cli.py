"""The `mta` command: operator tools beside the twistd service.

    mta check-config [FILE]            check a config without starting
    mta aliases check                  expand every alias: unknown targets, loops
    mta aliases expand ADDRESS...      where mail to ADDRESS goes after aliases
    mta reload [--pidfile F]           check the config, then SIGHUP the running server
    mta passwd USER [--cram-md5]       set a password (from stdin when not a terminal)
    mta make-cert [--cert F --key F]   a self-signed certificate for trying TLS
    mta dkim keygen DOMAIN SELECTOR [--type rsa|ed25519] [--bits N] [--output F] [--force]
                                       a DKIM key (0600) and the DNS record to publish
    mta dkim record DOMAIN             the DNS records of the configured keys of DOMAIN
    mta records [DOMAIN...] [--dmarc P] [--sts MODE]
                                       every record to publish: MX, SPF, DKIM, DMARC, MTA-STS
    mta config [--all]                 the effective config (non-default values, or all)
    mta queue list                     one line per queued message, with its age and next try
    mta queue show ID                  times, envelope and headers of one message
    mta queue flush [DOMAIN]           try queued mail now (all, or one domain)
    mta queue hold|release|delete|requeue ID... | --all | --domain D | --sender S
    mta sendmail [-t] [-f SENDER] [RCPT ...]   send a message read from stdin (sendmail.py)
    mta odmr --server HOST[:PORT] --user U --password-file F [--domains a,b]
                                       pull our held mail from a provider (ATRN, RFC 2645)
    mta etrn HOST[:PORT] DOMAIN...     ask a server to start a queue run (RFC 1985)

``--config FILE`` goes before or after the subcommand (default: $MTA_CONFIG,
else etc/mta.toml if present, else /etc/mta/mta.toml).  Queue changes are made on the spool directly and announced
to a running server through the spool's control directory, so it notices
them without a restart.  Exit status: 0 done, 1 the operation failed,
2 bad usage.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import ipaddress
import json
import os
import socket
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mta import config as config_module
from mta.spool.envelope import PENDING, EnvelopeError
from mta.spool.store import HOLD, QUEUE, Spool, SpoolError

if TYPE_CHECKING:
    from twisted.internet import defer


def _default_config() -> str:
    from mta.tap import default_config_path
    return default_config_path()


def _load(args: argparse.Namespace, check_files: bool = True) -> config_module.Config:
    return config_module.load(args.config, check_files=check_files)


def cmd_check_config(args: argparse.Namespace) -> int:
    from twisted.internet import reactor

    from mta.tap import config_warnings, prepare
    path = args.file or args.config
    prepared = prepare(path, reactor)
    cfg = prepared.config
    for warning in config_warnings(cfg, prepared.trust):
        print(f"{path}: warning: {warning}")
    listeners = ", ".join(f"{x.role} on {x.endpoint} (tls {x.tls})" for x in cfg.listeners)
    print(f"{path}: OK: hostname {cfg.server.hostname}; spool {cfg.server.spool}; "
          f"listeners: {listeners}; {len(cfg.domains)} domain(s); "
          f"{config_module.where_sessions_run(cfg)}")
    for name, table in cfg.dkim.items():
        keys = ", ".join(f"s={k.selector} {k.algorithm}" for k in table.keys)
        print(f"{path}: DKIM signs mail of {name} and its subdomains ({keys}); "
              f"publish the records: mta dkim record {name}")
    relay = cfg.relay
    if relay.smarthost and relay.smarthost_tls == "verify":
        store = relay.tls_ca_file or "the system's CA certificates"
        print(f"{path}: note: the smart host's certificate is checked against {store} "
              "before the password is sent; for a self-signed one set [relay] tls_ca_file "
              "to it, or smarthost_tls = \"required\" to encrypt without checking")
    return 0


def cmd_passwd(args: argparse.Namespace) -> int:
    from mta.server.auth import passwd_main
    cfg = _load(args, check_files=False)  # a missing certificate or aliases file is no matter here
    if cfg.auth.passwords is None:
        print(f"mta passwd: {args.config}: [auth] passwords: not set; "
              "name the password file there first", file=sys.stderr)
        return 1
    return passwd_main(cfg.auth.passwords, args.user, args.cram_md5)


def cmd_make_cert(args: argparse.Namespace) -> int:
    from mta.tls import make_cert
    hostname = args.hostname or _configured_hostname(args.config)
    for path in (args.cert, args.key):
        Path(path).parent.mkdir(parents=True, exist_ok=True)  # etc/ in a fresh directory
    make_cert(args.cert, args.key, hostname)
    print(f"wrote {args.cert} and {args.key} (self-signed for {hostname}); set them in [tls]")
    return 0


def _configured_hostname(path: str) -> str:
    """[server] hostname, read without checking the rest of the file: the
    config may well name the certificate we are about to make."""
    try:
        with open(path, "rb") as f:
            hostname = tomllib.load(f).get("server", {}).get("hostname")
    except (OSError, tomllib.TOMLDecodeError, AttributeError):
        hostname = None
    return hostname if isinstance(hostname, str) and hostname else socket.getfqdn()


def cmd_aliases_check(args: argparse.Namespace) -> int:
    """Every alias, virtual alias and list expanded: unknown targets and loops."""
    cfg = _load(args)
    problems = cfg.addresses.problems()
    for line in problems:
        print(f"{args.config}: {line}")
    if problems:
        return 1
    print(f"{args.config}: aliases OK")
    return 0


def cmd_aliases_expand(args: argparse.Namespace) -> int:
    """Where mail to each address goes, as RCPT would expand it."""
    from mta import aliases
    cfg = _load(args)
    status = 0
    for address in args.addresses:
        found = cfg.addresses.resolve(address)
        if found.kind in (aliases.LOCAL, aliases.REMOTE):
            for target in found.targets:
                owner = f"  (sender <{target.sender}>)" if target.sender else ""
                print(f"{address} -> {target.address}{owner}")
            for unknown in found.unknown:
                print(f"{address} -> {unknown}  (unknown: fails at delivery)")
        else:
            print(f"{address}: {'alias loop' if found.kind == aliases.LOOP else 'unknown'}")
            status = 1
    return status


def cmd_reload(args: argparse.Namespace) -> int:
    """Send SIGHUP to the running server: it re-reads the whole config."""
    import os
    import signal

    from mta.tap import PID_FILE
    cfg = _load(args)  # a broken file is refused here, with check-config's line
    pid_file = Path(args.pidfile) if args.pidfile else cfg.server.spool / PID_FILE
    try:
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError, IndexError) as e:
        why = getattr(e, "strerror", None) or "no pid in it"
        print(f"mta reload: {pid_file}: {why} (is the server running?)", file=sys.stderr)
        return 1
    print(f"mta reload: {args.config} checked; SIGHUP sent to {pid} "
          "(the server logs \"reload: ... in force\")")
    return 0


# -- DKIM keys (signing.py) ------------------------------------------------------------

def cmd_dkim_keygen(args: argparse.Namespace) -> int:
    """A new DKIM private key, mode 0600, and what to publish and configure for it."""
    from mta import signing
    from mta.address import is_valid_domain
    domain = _domain_argument(args.domain)
    if not is_valid_domain(domain):
        print(f"mta dkim keygen: not a valid domain name: {args.domain!r}", file=sys.stderr)
        return 2
    if not signing.valid_selector(args.selector):
        print(f"mta dkim keygen: not a valid selector (DNS labels such as \"s1\" or "
              f"\"2025a\"): {args.selector!r}", file=sys.stderr)
        return 2
    if args.type == "ed25519" and args.bits is not None:
        print("mta dkim keygen: --bits is for RSA keys; Ed25519 keys have one size",
              file=sys.stderr)
        return 2
    bits = args.bits if args.bits is not None else signing.RSA_BITS
    if not signing.MIN_RSA_BITS <= bits <= signing.MAX_RSA_BITS:
        print(f"mta dkim keygen: --bits must be {signing.MIN_RSA_BITS} to "
              f"{signing.MAX_RSA_BITS} (RFC 8301: at least 1024; 2048 is usual)",
              file=sys.stderr)
        return 2
    path = Path(args.output or f"etc/dkim/{domain}.{args.selector}.key")
    if (path.exists() or path.is_symlink()) and not args.force:  # a dangling link too
        print(f"mta dkim keygen: {path} exists; --force replaces it (and the record "
              "published for it stops matching)", file=sys.stderr)
        return 1
    key, pem = signing.generate(args.type, bits)
    _write_private(path, pem)
    loaded = signing.signing_key(key, domain, args.selector, path)
    print(f"wrote {path} ({loaded.describe()}, mode 0600)")
    _print_record(loaded)
    section = f'[dkim."{domain}"]'
    if args.type == "ed25519":
        print(f"\nThen sign with it beside the domain's RSA key (RFC 8463 dual signing): in "
              f"{section} of the config add\n"
              f'ed25519_selector = "{args.selector}"\ned25519_key = "{path}"\n'
              "(or make it the only key with selector/key: many receivers cannot check "
              "Ed25519 signatures yet)")
    else:
        print(f'\nThen add to the config:\n{section}\nselector = "{args.selector}"\n'
              f'key = "{path}"')
    print("\nPublish the record first, then `mta reload`: until the record is in the DNS, "
          "receivers fail the signatures.")
    return 0


def _domain_argument(text: str) -> str:
    """A domain named on the command line as the config and the DNS name it: lower case,
    no trailing dot, A-labels (``bücher.example`` is ``xn--bcher-kva.example``)."""
    domain = text.lower().rstrip(".")
    if domain.isascii():
        return domain
    import idna
    try:
        return idna.encode(domain, uts46=True).decode("ascii")
    except idna.IDNAError:
        return domain  # refused as "not a valid domain name", as it was given


def _write_private(path: Path, data: bytes) -> None:
    """Write a private key: mode 0600 from the start, complete or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _print_record(key: object) -> None:
    from mta import signing
    assert isinstance(key, signing.SigningKey)
    print(f"\nPublish this TXT record ({key.describe()}):\n"
          f"  name:  {key.record_name}\n  value: {key.record}\n"
          f"\nIn zone-file form (strings of at most 255 octets):\n{signing.zone_lines(key)}")


def cmd_dkim_record(args: argparse.Namespace) -> int:
    """The DNS records that the configured keys of a domain need."""
    cfg = _load(args)
    domain = _domain_argument(args.domain)
    table = cfg.dkim.get(domain)
    if table is None:
        configured = ", ".join(sorted(cfg.dkim)) or "none"
        print(f"mta dkim record: {args.config}: no [dkim.\"{domain}\"] table "
              f"(configured: {configured})", file=sys.stderr)
        return 1
    for key in table.keys:
        print(f"[dkim.\"{domain}\"] {key.path}:")
        _print_record(key)
        print()
    return 0


def cmd_records(args: argparse.Namespace) -> int:
    """The DNS records (and MTA-STS policy file) each domain should publish."""
    from mta import publish
    from mta.address import is_valid_domain
    cfg = _load(args)
    domains = [_domain_argument(d) for d in args.domains] or publish.default_domains(cfg)
    if not domains:
        print(f"mta records: {args.config}: no local or signing domain configured; "
              "name one: mta records DOMAIN", file=sys.stderr)
        return 1
    for domain in domains:
        if not is_valid_domain(domain):
            print(f"mta records: not a valid domain name: {domain!r}", file=sys.stderr)
            return 2
    print("\n".join(publish.records(cfg, domain, args.dmarc, args.sts) for domain in domains),
          end="")
    return 0


# -- queue ------------------------------------------------------------------------

def _when(timestamp: float) -> str:
    return _local_second(int(timestamp))


@functools.lru_cache(maxsize=4096)
def _local_second(second: int) -> str:
    # Once a second: the C library reads the time zone file again at each localtime()
    # when TZ is unset, and a queue's messages share their arrival seconds in bursts.
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))


def _span(seconds: float) -> str:
    """A duration the way people say it: 45s, 12m, 3h05m, 2d04h."""
    seconds = int(max(seconds, 0))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m" if minutes else f"{secs}s"


def _next_try(envelope: dict, on_hold: bool, held: bool, now: float) -> str:
    """When the running server tries the message next, as far as the spool says."""
    if on_hold:
        return "on hold"
    if held:
        return "at pickup"
    due = envelope.get("next_attempt") or 0
    if not envelope.get("attempts") or due <= now:
        return "now"
    return f"in {_span(due - now)}"


def cmd_queue_list(args: argparse.Namespace) -> int:
    cfg = _load(args, check_files=False)
    spool = Spool(cfg.server.spool)
    held_domains = frozenset(name for name, domain in cfg.domains.items() if domain.held)
    count = pickup = 0
    now = time.time()
    for state in (QUEUE, HOLD):
        listing = functools.partial(_list_run, on_hold=state == HOLD,
                                    held_domains=held_domains, now=now)
        for text, listed, held in spool.scan_runs(state, listing):
            sys.stdout.write(text)
            count += listed
            pickup += held
    sys.stdout.write(f"-- {count} message(s), {pickup} held for pickup; "
                     "! = on hold, * = held for pickup, ? = damaged\n")
    return 0


def _list_run(messages: Iterator[tuple[str, dict | Exception]], on_hold: bool,
              held_domains: frozenset[str], now: float) -> tuple[str, int, int]:
    """The text `mta queue list` prints for a run of messages, how many it lists (the
    damaged not counted), and how many of them are held for pickup."""
    out = []
    count = pickup = 0
    for queue_id, envelope in messages:
        if not isinstance(envelope, Exception):
            try:
                lines, held = _listing(queue_id, envelope, on_hold, held_domains, now)
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                envelope = ValueError(repr(e))
            else:
                count += 1
                pickup += held
                out += lines
                continue
        # Damaged: the server moves it to corrupt/ at its next start.
        out.append(f"{queue_id}? unreadable envelope: {envelope}")
    return "".join(line + "\n" for line in out), count, pickup


def _listing(queue_id: str, envelope: dict, on_hold: bool, held_domains: frozenset[str],
             now: float) -> tuple[list[str], bool]:
    """The lines `mta queue list` prints for one envelope (the spool's JSON object), and
    whether all it has left is held for pickup."""
    pending = [r for r in envelope["recipients"] if r.get("state", PENDING) == PENDING]
    waiting = [_domain_of(r["address"]) in held_domains for r in pending]
    held = bool(pending) and all(waiting)
    mark = "!" if on_hold else "*" if held else " "
    arrival = envelope["arrival"]
    lines = [(f"{queue_id}{mark} {envelope['size']:>9} {_when(arrival)}  "
              f"age {_span(now - arrival)}, next {_next_try(envelope, on_hold, held, now)}  "
              f"<{envelope['reverse_path']}>")]
    for r, for_pickup in zip(pending, waiting):
        note = "  [held for pickup]" if for_pickup else ""
        why = f"  ({r.get('status')} {r['diagnostic']})" if r.get("diagnostic") else ""
        lines.append(f"{'':>22}<{r['address']}>{note}{why}")
    return lines, held


def _domain_of(address: str) -> str:
    """The domain key of an address, as config.Domain and routing use it."""
    return address.rpartition("@")[2].lower().rstrip(".")


def cmd_queue_show(args: argparse.Namespace) -> int:
    cfg = _load(args, check_files=False)
    spool = Spool(cfg.server.spool)
    queue_id = args.ids[0] if len(args.ids) == 1 else None
    if queue_id is None:
        print("mta queue show: give one queue id", file=sys.stderr)
        return 2
    envelope, data = spool.open_message(queue_id)
    record = envelope.as_record()
    on_hold = spool.state_of(queue_id) == HOLD
    held_domains = {name for name, domain in cfg.domains.items() if domain.held}
    pending = [r.domain for r in envelope.pending]
    held = bool(pending) and all(d in held_domains for d in pending)
    now = time.time()
    print(f"queue id:     {queue_id}{' (on hold)' if on_hold else ''}")
    print(f"arrived:      {_when(envelope.arrival)} ({_span(now - envelope.arrival)} ago)")
    print(f"attempts:     {envelope.attempts}")
    print(f"next attempt: {_next_try(record, on_hold, held, now)}")
    print("-- envelope --")
    print(json.dumps(record, indent=1, ensure_ascii=False))
    print("-- headers --")
    with data.open() as f:
        for line in f:
            if line in (b"\r\n", b"\n"):
                break
            sys.stdout.write(line.decode("utf-8", "replace").rstrip("\r\n") + "\n")
    return 0


def cmd_queue_flush(args: argparse.Namespace) -> int:
    spool = Spool(_load(args, check_files=False).server.spool)
    spool.notify("flush", domain=args.domain or "")
    print("flush requested" + (f" for {args.domain}" if args.domain else ""))
    _wait_for_pickup(spool, "took the request", "it will act on it when it starts")
    return 0


def _requeue(spool: Spool, queue_id: str) -> None:
    """Due now: the next attempt routes it afresh with the running config."""
    envelope = spool.load(queue_id)
    if envelope.attempts and envelope.next_attempt > time.time():
        envelope.next_attempt = time.time()
        spool.save(envelope)  # a server started later sees it due too


# What `mta queue ACTION` does to the spool, which states it acts on, and what it says.
_QUEUE_CHANGES = {
    "hold": (Spool.hold, (QUEUE,), "on hold"),
    "release": (Spool.release, (HOLD,), "released"),
    "delete": (Spool.remove, (QUEUE, HOLD), "deleted"),
    "requeue": (_requeue, (QUEUE,), "requeued"),
}


def cmd_queue_change(args: argparse.Namespace) -> int:
    change, states, done = _QUEUE_CHANGES[args.action]
    spool = Spool(_load(args, check_files=False).server.spool)
    chosen = [bool(args.ids), args.all, bool(args.domain or args.sender)]
    if sum(chosen) != 1:
        print(f"mta queue {args.action}: give queue ids, or --all, or --domain/--sender",
              file=sys.stderr)
        return 2
    ids = args.ids or _select(spool, states, args.domain, args.sender)
    failed = 0
    for queue_id in ids:
        try:
            change(spool, queue_id)
        except (SpoolError, EnvelopeError, OSError) as e:
            print(f"mta: {queue_id}: {e}", file=sys.stderr)
            failed += 1
            continue
        spool.notify(args.action, queue_id=queue_id)
        print(f"{queue_id}: {done}")
    if not args.ids:
        print(f"-- {len(ids) - failed} message(s) {done}")
    return 1 if failed else 0


def _select(spool: Spool, states: tuple[str, ...], domain: str | None,
            sender: str | None) -> list[str]:
    """Queue ids in `states` with a pending recipient in `domain` (and its sub-domains) and
    from `sender` (an address, or @domain); all of them when neither is given."""
    domain = domain.lower().lstrip("@").rstrip(".") if domain else None
    sender = sender.lower().strip("<>") if sender else None
    ids = []
    for state in states:
        for queue_id, envelope in spool.scan(state):
            if isinstance(envelope, Exception):
                continue
            if domain is not None and not any(
                    r.get("state", PENDING) == PENDING
                    and _in_domain(_domain_of(r["address"]), domain)
                    for r in envelope["recipients"]):
                continue
            if sender is not None and not _sender_matches(envelope["reverse_path"], sender):
                continue
            ids.append(queue_id)
    return ids


def _in_domain(name: str, domain: str) -> bool:
    return name == domain or name.endswith("." + domain)


def _sender_matches(reverse_path: str, wanted: str) -> bool:
    if wanted.startswith("@"):
        return _in_domain(_domain_of(reverse_path), wanted[1:]) if reverse_path else False
    return reverse_path.lower() == wanted


# -- mta config: the effective config, like postconf -n ---------------------------------

def cmd_config(args: argparse.Namespace) -> int:
    cfg = _load(args)
    default = config_module.default()
    print(f"# {args.config}: " + ("every value" if args.all else
                                  "values that differ from the defaults (--all: every value)"))
    for name in ("server", "tls", "auth", "relay", "limits", "etrn"):
        section, base = getattr(cfg, name), getattr(default, name)
        lines = _section_lines(section, None if args.all else base)
        if lines:
            print(f"\n[{name}]")
            print("\n".join(lines))
    if args.all or cfg.listeners != default.listeners:
        for listener in cfg.listeners:
            print("\n[[listeners]]")
            print("\n".join(_section_lines(listener)))
    for name, domain in cfg.domains.items():
        print(f'\n[domains."{name}"]')
        print("\n".join(_section_lines(domain, _EMPTY if not args.all else None,
                                        skip=("name",))))
    for name, table in cfg.dkim.items():
        print(f'\n[dkim."{name}"]')
        print("\n".join(_section_lines(table, _EMPTY if not args.all else None,
                                        skip=("name",))))
    for pull in cfg.pulls:
        print("\n[[pull]]")
        print(f"server = {json.dumps(pull.server)}")
        print("\n".join(_section_lines(pull, skip=("host", "port"))))
    return 0


_EMPTY = object()  # compare with empty values: print a domain's keys that are set


def _section_lines(section: Any, base: Any = None, skip: tuple[str, ...] = ()) -> list[str]:
    lines, tables = [], []
    for f in dataclasses.fields(section):
        if f.name in skip or not f.compare:
            continue  # not a key (compare=False: what was read from a file it names)
        value = getattr(section, f.name)
        if value is None and f.name != "sendmail_socket":
            continue  # not set (the key's default is empty)
        if base is _EMPTY:
            if value in (None, (), {}, ""):
                continue
        elif base is not None and value == getattr(base, f.name):
            continue
        if isinstance(value, dict):
            tables += [f"{f.name}.{json.dumps(k)} = {_toml(v, f.name)}" for k, v in value.items()]
        else:
            lines.append(f"{f.name} = {_toml(value, f.name)}")
    return lines + tables


def _toml(value: Any, key: str) -> str:
    if value is None:
        return '"off"'  # sendmail_socket, the one key whose None is printed
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return json.dumps(_duration(value))
    if isinstance(value, int):
        return str(value)
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str) \
            and isinstance(value[1], int):
        return json.dumps(f"{value[0]}:{value[1]}")  # a name server
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml(v, key) for v in value) + "]"
    if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return json.dumps(str(value))
    return json.dumps(str(value), ensure_ascii=False)


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


# -- role reversal: the customer side ---------------------------------------------------

def _hostport(value: str, default_port: int) -> tuple[str, int]:
    try:
        return config_module.parse_hostport(value, default_port)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cmd_odmr(args: argparse.Namespace) -> int:
    from mta import pull
    cfg = _load(args)
    host, port = args.server  # checked by the parser (_hostport)
    try:
        password = pull.read_password(Path(args.password_file))
    except (OSError, UnicodeDecodeError) as e:
        print(f"mta odmr: {args.password_file}: {getattr(e, 'strerror', None) or e}",
              file=sys.stderr)
        return 1
    domains = tuple(d.strip().lower() for d in (args.domains or "").split(",") if d.strip())
    spool = Spool(cfg.server.spool)
    result = _react(lambda reactor: pull.odmr(
        reactor, cfg, spool, pull.SpoolNotices(spool), host=host, port=port, user=args.user,
        password=password, domains=domains, tls_verify=not args.no_verify,
        ca_file=Path(args.ca_file) if args.ca_file else None), f"mta odmr: {host}:{port}")
    if result is None:
        return 1
    print(f"mta odmr: {result.summary(f'{host}:{port}')}")
    if result.received:
        _wait_for_pickup(spool, "picked the messages up",
                         "they are in the spool and go out when it starts")
    return 0 if result.ok else 1


def cmd_etrn(args: argparse.Namespace) -> int:
    from mta import pull
    from mta.delivery.outcome import reply_text
    cfg = _load(args)
    host, port = args.server  # checked by the parser (_hostport)
    result = _react(lambda reactor: pull.etrn(reactor, cfg, host=host, port=port,
                                              domains=tuple(args.domains)),
                    f"mta etrn: {host}:{port}")
    if result is None:
        return 1
    for domain, reply in result.replies:
        print(f"{domain}: {reply_text(reply)}")
    return 0 if result.ok else 1


def _react(work: Callable[[Any], defer.Deferred], failing: str) -> Any:
    """Run ``work(reactor)`` to its end in a reactor of its own: its result, or None
    after saying on stderr, after `failing`, why it failed."""
    from twisted.internet import task
    outcome: list[Any] = [None]

    def run(reactor: Any) -> defer.Deferred:
        d = work(reactor)
        d.addCallbacks(lambda result: outcome.__setitem__(0, result),
                       lambda failure: print(f"{failing}: {_why(failure)}", file=sys.stderr))
        return d
    try:
        task.react(run)
    except SystemExit as e:  # react() always ends so; the outcome says how it went
        if e.code not in (0, None):
            raise
    return outcome[0]


def _why(failure) -> str:
    from mta.reply import printable
    error = failure.value
    text = getattr(error, "text", None) or failure.getErrorMessage() or repr(error)
    return printable(str(text), 300)


PICKUP_WAIT = 3.0  # seconds


def _wait_for_pickup(spool: Spool, unread: str, then: str) -> None:
    """A running server reads its notices every second: say `unread` (and `then`) if none did."""
    deadline = time.monotonic() + PICKUP_WAIT
    while spool.pending_notices() and time.monotonic() < deadline:
        time.sleep(0.1)
    if spool.pending_notices():
        print(f"mta: no running server {unread} within {PICKUP_WAIT:.0f} s; {then}",
              file=sys.stderr)


# -- argument parsing ------------------------------------------------------------------

CONFIG_HELP = "config file (default: $MTA_CONFIG, else etc/mta.toml if present, " \
              "else /etc/mta/mta.toml)"


def build_parser() -> argparse.ArgumentParser:
    # --config before the subcommand (top level) or after it (each subcommand): the
    # subcommands' default is SUPPRESS so that they do not undo one given before.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, help=CONFIG_HELP)
    parser = argparse.ArgumentParser(prog="mta", description="mta operator tools")
    parser.add_argument("--config", default=None, help=CONFIG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check-config", parents=[common], help="check a config file")
    p.add_argument("file", nargs="?", help="the file (default: --config)")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("config", parents=[common],
                       help="print the effective config (like postconf -n)")
    p.add_argument("-a", "--all", action="store_true", help="every value, defaults too")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("passwd", parents=[common], help="set a user's password")
    p.add_argument("user")
    p.add_argument("--cram-md5", action="store_true",
                   help="also store a CRAM-MD5 secret (password-equivalent: see README)")
    p.set_defaults(func=cmd_passwd)

    a = sub.add_parser("aliases", help="check and try the aliases").add_subparsers(
        dest="action", required=True)
    p = a.add_parser("check", parents=[common],
                     help="expand every alias: report unknown targets and loops")
    p.set_defaults(func=cmd_aliases_check)
    p = a.add_parser("expand", parents=[common], help="show where mail to ADDRESS goes")
    p.add_argument("addresses", nargs="+", metavar="ADDRESS")
    p.set_defaults(func=cmd_aliases_expand)
    p = sub.add_parser("reload", parents=[common],
                       help="make the running server re-read its config (SIGHUP)")
    p.add_argument("--pidfile", default=None,
                   help="the server's pid file (default: SPOOL/mta.pid, written by the server)")
    p.set_defaults(func=cmd_reload)

    p = sub.add_parser("make-cert", parents=[common], help="make a self-signed certificate")
    p.add_argument("--cert", default="etc/cert.pem")
    p.add_argument("--key", default="etc/key.pem")
    p.add_argument("--hostname", default=None, help="default: [server] hostname")
    p.set_defaults(func=cmd_make_cert)

    d = sub.add_parser("dkim", help="DKIM signing keys and their DNS records"
                       ).add_subparsers(dest="action", required=True)
    p = d.add_parser("keygen", parents=[common],
                     help="make a DKIM private key and print the DNS record to publish")
    p.add_argument("domain", metavar="DOMAIN")
    p.add_argument("selector", metavar="SELECTOR")
    p.add_argument("--type", choices=("rsa", "ed25519"), default="rsa",
                   help="rsa (rsa-sha256, the default) or ed25519 (ed25519-sha256, RFC 8463)")
    p.add_argument("--bits", type=int, default=None, help="RSA key size (default 2048)")
    p.add_argument("--output", metavar="FILE",
                   help="where to write the key (default etc/dkim/DOMAIN.SELECTOR.key)")
    p.add_argument("--force", action="store_true", help="replace an existing key file")
    p.set_defaults(func=cmd_dkim_keygen)
    p = d.add_parser("record", parents=[common],
                     help="print the DNS records of a domain's configured keys")
    p.add_argument("domain", metavar="DOMAIN")
    p.set_defaults(func=cmd_dkim_record)

    p = sub.add_parser("records", parents=[common],
                       help="print the DNS records (MX, SPF, DKIM, DMARC, MTA-STS) to publish")
    p.add_argument("domains", nargs="*", metavar="DOMAIN",
                   help="default: the Maildir and DKIM domains of the config")
    p.add_argument("--dmarc", choices=("none", "quarantine", "reject"), default="none",
                   help="the DMARC policy (p=) to publish; start with none")
    p.add_argument("--sts", choices=("testing", "enforce"), default="testing",
                   help="the MTA-STS mode of the policy file; start with testing")
    p.set_defaults(func=cmd_records)

    q = sub.add_parser("queue", parents=[common], help="look at and change the queue"
                       ).add_subparsers(dest="action", required=True)
    p = q.add_parser("list", parents=[common], help="one line per message, with age and next try")
    p.set_defaults(func=cmd_queue_list)
    p = q.add_parser("flush", parents=[common], help="try queued mail now")
    p.add_argument("domain", nargs="?")
    p.set_defaults(func=cmd_queue_flush)
    p = q.add_parser("show", parents=[common], help="times, envelope and headers of a message")
    p.add_argument("ids", nargs=1, metavar="ID")
    p.set_defaults(func=cmd_queue_show)
    for name, what in (("hold", "keep messages from delivery"), ("release", "let them go again"),
                       ("delete", "drop messages"),
                       ("requeue", "make messages due now, routed afresh")):
        p = q.add_parser(name, parents=[common], help=what)
        p.add_argument("ids", nargs="*", metavar="ID")
        p.add_argument("--all", action="store_true", help="every message")
        p.add_argument("--domain", help="messages with a pending recipient in DOMAIN "
                                        "or its sub-domains")
        p.add_argument("--sender", help="messages from this address (or @domain)")
        p.set_defaults(func=cmd_queue_change)

    # Parsed by sendmail.py, sendmail(8)'s way; here for `mta --help` only.
    sub.add_parser("sendmail", add_help=False,
                   help="send a message from stdin, as sendmail(8): -t -f -F -i -bp -q ...")

    p = sub.add_parser("odmr", parents=[common],
                       help="pull our held mail from a provider with ATRN (RFC 2645)")
    p.add_argument("--server", required=True, metavar="HOST[:PORT]",
                   type=lambda value: _hostport(value, config_module.ODMR_PORT),
                   help="the provider's ODMR service (default port 366)")
    p.add_argument("--user", required=True)
    p.add_argument("--password-file", required=True, metavar="FILE",
                   help="the password is its first line (never on the command line)")
    p.add_argument("--domains", metavar="A,B", help="default: every domain the user may pull")
    p.add_argument("--no-verify", action="store_true",
                   help="do not check the provider's TLS certificate")
    p.add_argument("--ca-file", metavar="FILE",
                   help="CA certificates (PEM) for checking it; default: the system's")
    p.set_defaults(func=cmd_odmr)

    p = sub.add_parser("etrn", parents=[common],
                       help="ask a server for a queue run with ETRN (RFC 1985)")
    p.add_argument("server", metavar="HOST[:PORT]", type=lambda value: _hostport(value, 25),
                   help="default port 25")
    p.add_argument("domains", nargs="+", metavar="DOMAIN",
                   help="a domain, @domain (with its sub-domains) or #queue")
    p.set_defaults(func=cmd_etrn)
    return parser


# Names under which `mta` is sendmail(8): a symlink /usr/sbin/sendmail -> mta works.
SENDMAIL_NAMES = ("sendmail", "mailq", "newaliases")


def main(argv: list[str] | None = None) -> int:
    from mta import sendmail
    if argv is None:
        argv = sys.argv[1:]
        name = os.path.basename(sys.argv[0])
        if name in SENDMAIL_NAMES:
            return sendmail.main(argv, name)
    config, rest = _leading_config(argv)
    if rest[:1] == ["sendmail"]:
        return sendmail.main(rest[1:], "sendmail", config)
    args = build_parser().parse_args(argv)
    if args.config is None:
        args.config = _default_config()
    try:
        return args.func(args)
    except config_module.ConfigError as e:
        print(f"mta: {e}", file=sys.stderr)
        return 1
    except SpoolError as e:
        print(f"mta: {e}", file=sys.stderr)
        return 1
    except EnvelopeError as e:
        print(f"mta: {' '.join(getattr(args, 'ids', []))}: damaged envelope: {e}",
              file=sys.stderr)
        return 1
    except OSError as e:
        print(f"mta: {e.filename or ''}: {e.strerror}", file=sys.stderr)
        return 1


def _leading_config(argv: list[str]) -> tuple[str | None, list[str]]:
    """A ``--config FILE`` before the subcommand, and the rest."""
    if argv[:1] == ["--config"] and len(argv) > 1:
        return argv[1], argv[2:]
    if argv[:1] and argv[0].startswith("--config="):
        return argv[0].partition("=")[2], argv[1:]
    return None, argv


if __name__ == "__main__":
    raise SystemExit(main())
