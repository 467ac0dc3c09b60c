"""`sendmail`: the command programs and people use to send mail from this machine.

It runs as ``sendmail`` (the console script, or a symlink named sendmail to
``mta``: argv[0] decides), as ``mailq`` (= ``sendmail -bp``), as
``newaliases`` and as ``mta sendmail``.  It reads a message on stdin and
hands it to the running server over its local socket (server/local.py), as
SMTP: the server writes the spool file itself, so any local user may send
while the server runs as its own user, and the message takes the same path
as mail from the network.  If the server is not running, nothing is queued:
a clear line on stderr and EX_TEMPFAIL (75).

Options, as sendmail(8) and Postfix's sendmail(1) take them:

    -t          recipients also from To:, Cc:, Bcc: (Bcc: is removed)
    -f ADDR     envelope sender (-r too); "<>" is the null sender; default USER@hostname
    -F NAME     full name for the From: added when the message has none
    -i, -oi     a line with a single "." does not end the message
    -v          print the queue id
    -N NOTIFY   DSN NOTIFY for every recipient (never | success,failure,delay)
    -R full|hdrs, -V ENVID   DSN RET and ENVID [RFC 3461]
    -C FILE, --config FILE   the config file (default as for every mta command)
    -bm         deliver (the default);  -bp  list the queue (= mta queue list)
    -q          flush the queue (= mta queue flush);  -qRDOMAIN  flush one domain
    -bi, -I     newaliases: nothing to rebuild (aliases are read as they are)

Accepted and ignored, as replacements for sendmail do: -o with any option
but i (-oem, -odi, -odb, -om ...), -B TYPE (8BITMIME is detected), -L, -X,
-h, -p, -O, -A, -n, -U, -G, -m.  Anything else is a usage error (64).

Exit status follows sysexits(3): 0 queued (some recipients may have been
refused: each is named on stderr), 64 bad usage, 65 bad message or address,
67 every recipient refused, 69 no local socket configured, 75 the server
is not running or refused for now, 77 -bp or -q by a user who may not:
they read and write the spool directly, so they need the server's user (or
root), as `mta queue` does.
"""

from __future__ import annotations

import email.parser
import email.policy
import email.utils
import os
import pwd
import re
import smtplib
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mta import config as config_module
from mta.address import AddressError, parse_mailbox, xtext_encode
from mta.reply import printable

EX_OK, EX_USAGE, EX_DATAERR, EX_NOUSER, EX_UNAVAILABLE = 0, 64, 65, 67, 69
EX_TEMPFAIL, EX_NOPERM = 75, 77
TIMEOUT = 300.0  # seconds for each step with the server (a large message is one step)

# Options that take a value (attached, "-fme", or the next argument, "-f me").
_VALUED = set("fFrBNRVXCLhpOA")
# Options that are flags; the ignored ones do nothing here (see the module docstring).
_FLAGS = set("tivnUGmI")


class UsageError(Exception):
    """Options sendmail cannot act on; exit 64."""


@dataclass
class Options:
    mode: str = "deliver"  # deliver | list | flush | newaliases
    config: str | None = None
    sender: str | None = None
    full_name: str | None = None
    from_headers: bool = False  # -t
    ignore_dots: bool = False  # -i, -oi
    verbose: bool = False
    notify: str | None = None
    ret: str | None = None
    envid: str | None = None
    flush_domain: str | None = None
    recipients: list[str] = field(default_factory=list)


def parse(argv: list[str], name: str = "sendmail") -> Options:
    """sendmail's command line; `name` is what it was called as (mailq, newaliases)."""
    options = Options(mode={"mailq": "list", "newaliases": "newaliases"}.get(name, "deliver"))
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--":
            options.recipients += args
            break
        if arg == "--config" or arg.startswith("--config="):
            options.config = arg.partition("=")[2] if "=" in arg else _next(args, arg)
            continue
        if not arg.startswith("-") or arg == "-":
            options.recipients.append(arg)
            continue
        _option(options, arg, args)
    return options


def _next(args: list[str], option: str) -> str:
    if not args:
        raise UsageError(f"option {option} requires a value")
    return args.pop(0)


def _option(options: Options, arg: str, args: list[str]) -> None:
    letters = arg[1:]
    while letters:
        letter, letters = letters[0], letters[1:]
        if letter in _FLAGS:
            if letter == "t":
                options.from_headers = True
            elif letter == "i":
                options.ignore_dots = True
            elif letter == "v":
                options.verbose = True
            elif letter == "I":
                options.mode = "newaliases"
            continue
        if letter == "o":
            value = letters or _next(args, arg)
            if value == "i":
                options.ignore_dots = True
            return  # -oem, -odi, -om, -o8 ...: nothing to do here
        if letter == "b":
            _mode(options, letters)
            return
        if letter == "q":
            _flush(options, letters)
            return
        if letter not in _VALUED:
            raise UsageError(f"unknown option -{letter}")
        value = letters or _next(args, f"-{letter}")
        if letter in "fr":
            options.sender = value
        elif letter == "F":
            options.full_name = value
        elif letter == "C":
            options.config = value
        elif letter == "N":
            options.notify = _notify(value)
        elif letter == "R":
            if value.lower() not in ("full", "hdrs"):
                raise UsageError("-R takes full or hdrs")
            options.ret = value.upper()
        elif letter == "V":
            options.envid = value
        return  # -B, -L, -X, -h, -p, -O, -A: accepted, no effect


def _mode(options: Options, mode: str) -> None:
    modes = {"m": "deliver", "p": "list", "i": "newaliases"}
    if mode not in modes:
        raise UsageError(f"-b{mode} is not supported: mta takes -bm (deliver), -bp (list the "
                         "queue) and -bi; the server itself runs under twistd")
    options.mode = modes[mode]


def _flush(options: Options, value: str) -> None:
    if value.startswith("R") and len(value) > 1:
        options.flush_domain = value[1:].lstrip("@")
    elif value:
        raise UsageError(f"-q{value} is not supported: the server runs its queue itself; "
                         "-q flushes it now, -qRDOMAIN one domain")
    options.mode = "flush"


def _notify(value: str) -> str:
    items = [v.strip().upper() for v in value.split(",") if v.strip()]
    if items != ["NEVER"] and not (items and set(items) <= {"SUCCESS", "FAILURE", "DELAY"}):
        raise UsageError("-N takes never, or a list of success, failure, delay")
    return ",".join(items)


# -- the message -----------------------------------------------------------------------

@dataclass
class Submission:
    sender: str
    recipients: list[str]
    data: bytes  # CRLF lines


def read_message(stream, ignore_dots: bool) -> bytes:
    """The message on `stream`; without -i a line of a single "." ends it, as in sendmail."""
    if ignore_dots:
        return stream.read()
    lines = []
    for line in stream:
        if line.rstrip(b"\r\n") == b".":
            break
        lines.append(line)
    return b"".join(lines)


def prepare(options: Options, raw: bytes, hostname: str, user: str) -> Submission:
    """Envelope and data from the options and the message; UsageError without recipients,
    AddressError for an address that is no address."""
    data = _crlf(raw)
    header_end = data.find(b"\r\n\r\n")
    head = data[: header_end + 2] if header_end >= 0 else data
    message = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(head)
    recipients = [r.strip() for arg in options.recipients for r in arg.split(",") if r.strip()]
    if options.from_headers:
        for name in ("To", "Cc", "Bcc"):
            recipients += [addr for _, addr in email.utils.getaddresses(message.get_all(name, []))
                           if addr]
        data = _drop_header(data, b"bcc")
    if not recipients:
        raise UsageError("no recipients (give them as arguments, or -t)")
    sender = options.sender if options.sender is not None else user
    if sender.startswith("<") and sender.endswith(">"):
        sender = sender[1:-1]  # "-f <>" is the null path, as with sendmail
    # A bare user name is a local address, as sendmail appends its own domain.
    sender = _qualify(sender, hostname)
    recipients = list(dict.fromkeys(_qualify(r, hostname) for r in recipients))
    for address in ([sender] if sender else []) + recipients:
        parse_mailbox(address, utf8=True)
    if options.full_name and not message.get("From") and sender:
        # The server adds a From: of the bare address; only we know the name.
        data = f"From: {_quoted_name(options.full_name)} <{sender}>\r\n".encode() + data
    return Submission(sender, recipients, data)


def _qualify(address: str, hostname: str) -> str:
    return f"{address}@{hostname}" if address and "@" not in address else address


def _quoted_name(name: str) -> str:
    """A display name for From:, quoted when it is not a plain phrase [RFC 5322 3.4]."""
    name = name.replace("\r", " ").replace("\n", " ")
    if all(c.isalnum() or c in " !#$%&'*+-/=?^_`{|}~" for c in name):
        return name
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


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


# -- handing it to the server --------------------------------------------------------------

class NotRunning(Exception):
    """The server's local socket does not answer."""


class _LocalSMTP(smtplib.SMTP):
    """smtplib's client on a UNIX socket."""

    def connect(self, host: str = "localhost", port: int = 0,
                source_address: object = None) -> tuple[int, bytes]:
        # `host` is the socket's path, relative ones too (a UNIX socket path is
        # limited to 107 octets: the spool's relative path keeps it short).
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.file = None
        try:
            self.sock.connect(host)
        except OSError:
            self.close()
            raise
        code, message = self.getreply()
        if code != 220:
            self.close()
            raise smtplib.SMTPConnectError(code, message)
        return code, message


@dataclass
class Outcome:
    queue_id: str | None
    refused: dict[str, str]  # recipient -> reply text
    code: int  # the exit status


def submit(path: Path, submission: Submission, options: Options) -> Outcome:
    """Send `submission` over the server's socket; NotRunning when nobody answers."""
    try:
        client = _LocalSMTP(str(path), timeout=TIMEOUT, local_hostname="localhost")
    except (FileNotFoundError, ConnectionRefusedError) as e:
        raise NotRunning(f"no mta server answers on {path} ({e.strerror})") from None
    except PermissionError:
        raise NotRunning(f"{path}: permission denied: the socket and the directories above "
                         "it must let local users through") from None
    except (OSError, smtplib.SMTPException) as e:
        raise NotRunning(f"{path}: {e}") from None
    try:
        return _transaction(client, submission, options)
    finally:
        try:
            client.quit()
        except (OSError, smtplib.SMTPException):
            client.close()


def _transaction(client: _LocalSMTP, submission: Submission, options: Options) -> Outcome:
    client.ehlo()
    mail_options = []
    if not all(a.isascii() for a in [submission.sender, *submission.recipients]):
        mail_options.append("SMTPUTF8")
    if not submission.data.isascii():
        mail_options.append("BODY=8BITMIME")
    if options.ret:
        mail_options.append(f"RET={options.ret}")
    if options.envid:
        mail_options.append(f"ENVID={xtext_encode(options.envid)}")
    code, text = client.mail(submission.sender, mail_options)
    if code != 250:
        return Outcome(None, {"<" + submission.sender + ">": _text(code, text)}, _status(code))
    rcpt_options = [f"NOTIFY={options.notify}"] if options.notify else []
    refused = {}
    last = 0
    for recipient in submission.recipients:
        code, text = client.rcpt(recipient, rcpt_options)
        if code not in (250, 251):
            refused[recipient] = _text(code, text)
            last = code
    if len(refused) == len(submission.recipients):
        client.rset()
        return Outcome(None, refused, EX_TEMPFAIL if last < 500 else EX_NOUSER)
    code, text = client.data(submission.data)
    if code != 250:
        return Outcome(None, {"(message)": _text(code, text)}, _status(code))
    said = text.decode("utf-8", "replace")
    found = re.search(r"queued as ([0-9A-F]+)", said)
    return Outcome(found.group(1) if found else None, refused, EX_OK)


def _text(code: int, text: bytes) -> str:
    return f"{code} {printable(text.decode('utf-8', 'replace').replace(chr(10), ' '), 300)}"


def _status(code: int) -> int:
    return EX_TEMPFAIL if code < 500 else EX_DATAERR


# -- the command -------------------------------------------------------------------------

def main(argv: list[str], name: str = "sendmail", config: str | None = None) -> int:
    """Run as sendmail (or mailq, newaliases); `config` is a --config given before it."""
    try:
        options = parse(argv, name)
    except UsageError as e:
        return _fail(f"{e}", EX_USAGE)
    from mta.tap import default_config_path
    path = options.config or config or default_config_path()
    if options.mode in ("list", "flush"):
        denied = _spool_denied(path)
        if denied:
            return _fail(denied, EX_NOPERM)
        from mta import cli
        command = ["queue", "list"] if options.mode == "list" else \
            ["queue", "flush", *([options.flush_domain] if options.flush_domain else [])]
        return cli.main([*command, "--config", path])
    if options.mode == "newaliases":
        print("sendmail: nothing to rebuild: mta reads aliases files as they are "
              "(`mta check-config` checks them)")
        return EX_OK
    try:
        cfg = config_module.load(path, check_files=False)
    except config_module.ConfigError as e:
        return _fail(f"{e}", EX_TEMPFAIL)
    if cfg.server.sendmail_socket is None:
        return _fail(f"{path}: [server] sendmail_socket is off: local submission is disabled",
                     EX_UNAVAILABLE)
    raw = read_message(sys.stdin.buffer, options.ignore_dots)
    try:
        submission = prepare(options, raw, cfg.server.hostname, _login_name())
    except UsageError as e:
        return _fail(f"{e}", EX_USAGE)
    except AddressError as e:
        return _fail(f"bad address: {e}", EX_DATAERR)
    try:
        outcome = submit(cfg.server.sendmail_socket, submission, options)
    except NotRunning as e:
        return _fail(f"{e}; the message was not sent", EX_TEMPFAIL)
    except (OSError, smtplib.SMTPException) as e:
        return _fail(f"the server went away ({e}); the message was not sent", EX_TEMPFAIL)
    for who, why in outcome.refused.items():
        print(f"sendmail: {who}: {why}", file=sys.stderr)
    if outcome.queue_id is None:
        print("sendmail: the message was not sent", file=sys.stderr)
    elif options.verbose:
        print(f"queued as {outcome.queue_id}")
    return outcome.code


def _spool_denied(path: str) -> str | None:
    """Why this user may not list or flush the queue (it is the server's), or None."""
    try:
        spool = config_module.load(path, check_files=False).server.spool
        owner = os.stat(spool).st_uid
    except (config_module.ConfigError, OSError):
        return None  # `mta queue` says what is wrong
    if os.geteuid() in (0, owner):
        return None
    return (f"the queue in {spool} belongs to the mail server's user: -bp (mailq) and -q "
            "need root or that user")


def _login_name() -> str:
    """The user running us, by uid (not $USER, which anyone may set)."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def _fail(why: str, code: int) -> int:
    print(f"sendmail: {why}", file=sys.stderr)
    return code


def entry_point() -> int:
    """The `sendmail` console script; `mta` run by another name comes here too."""
    return main(sys.argv[1:], Path(sys.argv[0]).name)

