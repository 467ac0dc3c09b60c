"""The `mta` command: operator tools beside the twistd service.

    mta check-config [FILE]            check a config without starting
    mta aliases check                  expand every alias: unknown targets, loops
    mta aliases expand ADDRESS...      where mail to ADDRESS goes after aliases
    mta reload [--pidfile F]           check the config, then SIGHUP the running server
    mta passwd USER [--cram-md5]       set a password (from stdin when not a terminal)
    mta make-cert [--cert F --key F]   a self-signed certificate for trying TLS
    mta queue list                     one line per queued message
    mta queue show ID                  envelope and headers of one message
    mta queue flush [DOMAIN]           try queued mail now (all, or one domain)
    mta queue hold ID | release ID | delete ID
    mta sendmail [-t] [-f SENDER] [RCPT ...]   inject a message read from stdin
    mta odmr --server HOST[:PORT] --user U --password-file F [--domains a,b]
                                       pull our held mail from a provider (ATRN, RFC 2645)
    mta etrn HOST[:PORT] DOMAIN...     ask a server to start a queue run (RFC 1985)

Every subcommand takes ``--config FILE`` (default: $MTA_CONFIG, else
etc/mta.toml).  Queue changes are made on the spool directly and announced
to a running server through the spool's control directory, so it notices
them without a restart.  Exit status: 0 done, 1 the operation failed,
2 bad usage.
"""

from __future__ import annotations

import argparse
import email.parser
import email.policy
import email.utils
import json
import re
import socket
import sys
import time
import tomllib
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from twisted.internet import defer

from mta import config as config_module
from mta.address import AddressError, parse_mailbox
from mta.aliases import LOCAL, REMOTE
from mta.spool.envelope import PENDING, Envelope, EnvelopeError, Recipient, add_recipients
from mta.spool.store import HOLD, QUEUE, Spool, SpoolError


def _default_config() -> str:
    from mta.tap import default_config_path
    return default_config_path()


def _load(args: argparse.Namespace) -> config_module.Config:
    return config_module.load(args.config)


def cmd_check_config(args: argparse.Namespace) -> int:
    from twisted.internet import reactor

    from mta.tap import alias_warnings, pickup_warnings, prepare
    path = args.file or args.config
    prepared = prepare(path, reactor)
    cfg = prepared.config
    for warning in alias_warnings(cfg) + pickup_warnings(cfg, prepared.trust):
        print(f"{path}: warning: {warning}")
    listeners = ", ".join(f"{x.role} on {x.endpoint} (tls {x.tls})" for x in cfg.listeners)
    print(f"{path}: OK: hostname {cfg.server.hostname}; spool {cfg.server.spool}; "
          f"listeners: {listeners}; {len(cfg.domains)} domain(s)")
    relay = cfg.relay
    if relay.smarthost and relay.smarthost_tls == "verify":
        store = relay.tls_ca_file or "the system's CA certificates"
        print(f"{path}: note: the smart host's certificate is checked against {store} "
              "before the password is sent; for a self-signed one set [relay] tls_ca_file "
              "to it, or smarthost_tls = \"required\" to encrypt without checking")
    return 0


def cmd_passwd(args: argparse.Namespace) -> int:
    from mta.server.auth import passwd_main
    cfg = _load(args)
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


# -- queue ------------------------------------------------------------------------

def _spool(args: argparse.Namespace) -> Spool:
    return Spool(_load(args).server.spool)


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def cmd_queue_list(args: argparse.Namespace) -> int:
    cfg = _load(args)
    spool = Spool(cfg.server.spool)
    held_domains = {name for name, domain in cfg.domains.items() if domain.held}
    count = pickup = 0
    out = []
    for state in (QUEUE, HOLD):
        for queue_id, envelope in spool.scan(state):
            if isinstance(envelope, Exception):
                # Damaged: the server moves it to corrupt/ at its next start.
                out.append(f"{queue_id}? unreadable envelope: {envelope}")
                continue
            count += 1
            try:
                lines, held = _listing(queue_id, envelope, state == HOLD, held_domains)
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                out.append(f"{queue_id}? unreadable envelope: {e!r}")
                continue
            pickup += held
            out += lines
    out.append(f"-- {count} message(s), {pickup} held for pickup; "
               "! = on hold, * = held for pickup, ? = damaged")
    sys.stdout.write("\n".join(out) + "\n")
    return 0


def _listing(queue_id: str, envelope: dict, on_hold: bool,
             held_domains: set[str]) -> tuple[list[str], bool]:
    """The lines `mta queue list` prints for one envelope (the spool's JSON object), and
    whether all it has left is held for pickup."""
    pending = [r for r in envelope["recipients"] if r["state"] == PENDING]
    waiting = [_domain_of(r["address"]) in held_domains for r in pending]
    held = bool(pending) and all(waiting)
    mark = "!" if on_hold else "*" if held else " "
    lines = [(f"{queue_id}{mark} {envelope['size']:>9} {_when(envelope['arrival'])}  "
              f"<{envelope['reverse_path']}>")]
    for r, for_pickup in zip(pending, waiting):
        note = "  [held for pickup]" if for_pickup else ""
        why = f"  ({r['status']} {r['diagnostic']})" if r.get("diagnostic") else ""
        lines.append(f"{'':>22}<{r['address']}>{note}{why}")
    return lines, held


def _domain_of(address: str) -> str:
    """The domain key of an address, as config.Domain and routing use it."""
    return address.rpartition("@")[2].lower().rstrip(".")


def cmd_queue_show(args: argparse.Namespace) -> int:
    spool = _spool(args)
    envelope = spool.load(args.id)
    print(json.dumps(json.loads(envelope.to_json()), indent=1, ensure_ascii=False))
    print("-- headers --")
    with spool.message_data(args.id).open() as f:
        for line in f:
            if line in (b"\r\n", b"\n"):
                break
            sys.stdout.write(line.decode("utf-8", "replace").rstrip("\r\n") + "\n")
    return 0


def cmd_queue_flush(args: argparse.Namespace) -> int:
    spool = _spool(args)
    spool.notify("flush", domain=args.domain or "")
    print("flush requested" + (f" for {args.domain}" if args.domain else ""))
    _wait_for_pickup(spool, "took the request", "it will act on it when it starts")
    return 0


# What `mta queue hold|release|delete ID` do to the spool, and what they say.
_QUEUE_CHANGES = {
    "hold": (Spool.hold, "on hold"),
    "release": (Spool.release, "released"),
    "delete": (Spool.remove, "deleted"),
}


def cmd_queue_change(args: argparse.Namespace) -> int:
    change, done = _QUEUE_CHANGES[args.action]
    spool = _spool(args)
    change(spool, args.id)
    spool.notify(args.action, queue_id=args.id)
    print(f"{args.id}: {done}")
    return 0


# -- sendmail ------------------------------------------------------------------------

def cmd_sendmail(args: argparse.Namespace) -> int:
    cfg = _load(args)
    raw = sys.stdin.buffer.read()
    data = _crlf(raw)
    header_end = data.find(b"\r\n\r\n")
    head = data[: header_end + 2] if header_end >= 0 else data
    message = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(head)
    recipients = [r.strip() for arg in args.recipients for r in arg.split(",") if r.strip()]
    if args.t:
        for field in ("To", "Cc", "Bcc"):
            recipients += [addr for _, addr in email.utils.getaddresses(message.get_all(field, []))
                           if addr]
        data = _drop_header(data, b"bcc")
    if not recipients:
        print("mta sendmail: no recipients (give them as arguments, or -t)", file=sys.stderr)
        return 2
    sender = args.f if args.f is not None else _default_sender(cfg)
    if sender.startswith("<") and sender.endswith(">"):
        sender = sender[1:-1]  # "-f <>" is the null path, as with sendmail
    # A bare user name is a local address, as sendmail appends its own domain.
    sender, recipients = _qualify(sender, cfg), [_qualify(r, cfg) for r in recipients]
    try:
        for address in ([sender] if sender else []) + recipients:
            parse_mailbox(address, utf8=True)
    except AddressError as e:
        print(f"mta sendmail: bad address: {e}", file=sys.stderr)
        return 2
    unknown = [r for r in recipients if cfg.addresses.resolve(r).kind not in (LOCAL, REMOTE)]
    if unknown:
        print(f"mta sendmail: no such local address: {', '.join(unknown)}", file=sys.stderr)
        return 1
    smtputf8 = not all(a.isascii() for a in [sender, *recipients])
    envelope = Envelope(
        queue_id="", reverse_path=sender, recipients=_expanded(cfg, recipients, sender),
        arrival=time.time(), client_address="127.0.0.1", client_helo="localhost",
        protocol="LOCAL", smtputf8=smtputf8,
        body="8BITMIME" if not data.isascii() else "7BIT",
    )
    spool = Spool(cfg.server.spool)
    received = (f"Received: by {cfg.server.hostname} (mta sendmail) id %s;\r\n"
                f"\t{email.utils.format_datetime(datetime.now(UTC).astimezone())}\r\n")
    incoming = spool.receive(envelope)
    try:
        incoming.write(received.replace("%s", incoming.queue_id).encode())
        if not message.get("Date"):
            incoming.write(f"Date: {email.utils.formatdate(localtime=True)}\r\n".encode())
        if not message.get("Message-ID"):
            incoming.write(f"Message-ID: {email.utils.make_msgid(domain=cfg.server.hostname)}\r\n"
                           .encode())
        if not message.get("From") and sender:
            name = f"{_quoted_name(args.F)} " if args.F else ""
            incoming.write(f"From: {name}<{sender}>\r\n".encode())
        if not _HEADER_FIELD.match(data):
            incoming.write(b"\r\n")  # no header section: the text is the body
        incoming.write(data)
    except BaseException:
        incoming.abort()
        raise
    queue_id = spool.commit(incoming)
    spool.notify("new", queue_id=queue_id)
    if args.v:
        print(f"queued as {queue_id}")
    return 0


def _expanded(cfg: config_module.Config, recipients: list[str], sender: str) -> list[Recipient]:
    """The recipients after aliases, de-duplicated, as RCPT makes them."""
    out: list[Recipient] = []
    for address in recipients:
        targets = cfg.addresses.resolve(address).targets
        add_recipients(out, Recipient(address).expanded(targets, null_sender=not sender))
    return out


# A header field's first line: a name of printable ASCII but ":", then ":" [RFC 5322 2.2].
_HEADER_FIELD = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")


def _qualify(address: str, cfg: config_module.Config) -> str:
    return f"{address}@{cfg.server.hostname}" if address and "@" not in address else address


def _quoted_name(name: str) -> str:
    """A display name for From:, quoted when it is not a plain phrase [RFC 5322 3.4]."""
    name = name.replace("\r", " ").replace("\n", " ")
    if all(c.isalnum() or c in " !#$%&'*+-/=?^_`{|}~" for c in name):
        return name
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _default_sender(cfg: config_module.Config) -> str:
    import getpass
    return f"{getpass.getuser()}@{cfg.server.hostname}"


def _crlf(raw: bytes) -> bytes:
    text = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    return text if text.endswith(b"\r\n") or not text else text + b"\r\n"


def _drop_header(data: bytes, name: bytes) -> bytes:
    """Remove every `name` header field (with its folded lines) from the header section."""
    end = data.find(b"\r\n\r\n")
    head, body = (data[: end + 2], data[end + 2:]) if end >= 0 else (data, b"")
    out, skipping = [], False
    for line in head.split(b"\r\n")[:-1]:
        if line[:1] in (b" ", b"\t"):
            if not skipping:
                out.append(line)
            continue
        skipping = line.split(b":", 1)[0].strip().lower() == name
        if not skipping:
            out.append(line)
    return b"".join(x + b"\r\n" for x in out) + body


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

def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=_default_config(),
                        help="config file (default: $MTA_CONFIG, else etc/mta.toml)")
    parser = argparse.ArgumentParser(prog="mta", description="mta operator tools")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check-config", parents=[common], help="check a config file")
    p.add_argument("file", nargs="?", help="the file (default: --config)")
    p.set_defaults(func=cmd_check_config)

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

    q = sub.add_parser("queue", help="look at and change the queue").add_subparsers(
        dest="action", required=True)
    p = q.add_parser("list", parents=[common])
    p.set_defaults(func=cmd_queue_list)
    p = q.add_parser("flush", parents=[common])
    p.add_argument("domain", nargs="?")
    p.set_defaults(func=cmd_queue_flush)
    for name, func in (("show", cmd_queue_show), ("hold", cmd_queue_change),
                       ("release", cmd_queue_change), ("delete", cmd_queue_change)):
        p = q.add_parser(name, parents=[common])
        p.add_argument("id")
        p.set_defaults(func=func)

    p = sub.add_parser("sendmail", parents=[common],
                       help="inject a message from stdin (like sendmail -t -f)")
    p.add_argument("-f", metavar="SENDER", help="envelope sender (default: USER@hostname)")
    p.add_argument("-t", action="store_true", help="recipients from To/Cc/Bcc; Bcc removed")
    p.add_argument("-i", "-oi", action="store_true", help="accepted; a lone dot never ends input")
    p.add_argument("-v", action="store_true", help="print the queue id")
    p.add_argument("-F", metavar="NAME", help="the sender's full name, for a From: we add")
    # Options of sendmail(1) that callers such as cron pass: accepted, no effect here.
    p.add_argument("-o", metavar="OPTION", action="append", help="accepted and ignored (-oem, -odi)")
    p.add_argument("-B", metavar="TYPE", help="accepted and ignored (8BITMIME is detected)")
    p.add_argument("-bm", action="store_true", help="accepted: deliver mail (the default)")
    p.add_argument("recipients", nargs="*")
    p.set_defaults(func=cmd_sendmail)

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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except config_module.ConfigError as e:
        print(f"mta: {e}", file=sys.stderr)
        return 1
    except SpoolError as e:
        print(f"mta: {e}", file=sys.stderr)
        return 1
    except EnvelopeError as e:
        print(f"mta: {getattr(args, 'id', '')}: damaged envelope: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"mta: {e.filename or ''}: {e.strerror}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
