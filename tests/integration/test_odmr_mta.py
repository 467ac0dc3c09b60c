"""Role reversal mta against mta: ODMR (ATRN, RFC 2645) and ETRN (RFC 1985) end to end.

Two `twistd -n mta` instances on loopback.  The provider holds mail for
customer.test (``route = "hold"``, ``pull_users = ["customer"]``) and has an
odmr listener with STARTTLS (a certificate from `mta make-cert` naming
localhost and 127.0.0.1) and AUTH (a password file from `mta passwd
--cram-md5`).  The customer delivers customer.test into a Maildir and pulls:
by hand with `mta odmr` / `mta etrn`, or on a schedule with ``[[pull]]``
entries run by its daemon.  Messages are told apart by their Message-Id.
"""

from __future__ import annotations

import re
import signal
import smtplib
import subprocess
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.integration.harness import MTA, MtaServer, free_port, source_env, wait_for

PASSWORD = "secret"
CUSTOMER_DOMAIN = "customer.test"

PROVIDER_CONFIG = """
[server]
hostname = "provider.test"
spool = "spool"
postmaster = "postmaster@provider.test"

[[listeners]]
endpoint = "tcp:{{port}}:interface=127.0.0.1"
role = "smtp"

[[listeners]]
endpoint = "tcp:{odmr}:interface=127.0.0.1"
role = "odmr"
tls = "starttls"

[tls]
certificate = "cert.pem"
key = "key.pem"

[auth]
passwords = "passwords"

[relay]
mynetworks = ["127.0.0.1/32"]
nameservers = ["127.0.0.1:9"]
dns_timeout = "1s"
retry_min = "1h"
retry_max = "1h"

[domains."customer.test"]
route = "hold"
pull_users = ["customer"]
etrn_route = "smtp:[127.0.0.1]:{customer_smtp}"

[domains."closed.test"]
route = "hold"
etrn_clients = ["10.0.0.0/8"]
"""

CUSTOMER_CONFIG = """
[server]
hostname = "gateway.customer.test"
spool = "spool"
postmaster = "postmaster@customer.test"

[[listeners]]
endpoint = "tcp:{{port}}:interface=127.0.0.1"
role = "smtp"

[relay]
mynetworks = ["127.0.0.1/32"]
nameservers = ["127.0.0.1:9"]
dns_timeout = "1s"
retry_min = "1h"
retry_max = "1h"

[domains."customer.test"]
route = "maildir:mail"
{pulls}
"""

ODMR_PULL = """
[[pull]]
protocol = "odmr"
server = "localhost:{odmr}"
user = "customer"
password_file = "odmr-password"
domains = ["customer.test"]
interval = "2s"
ca_file = "provider-cert.pem"
"""

ETRN_PULL = """
[[pull]]
protocol = "etrn"
server = "127.0.0.1:{provider_smtp}"
domains = ["customer.test"]
interval = "2s"
"""

MESSAGE_ID = re.compile(rb"^Message-Id:[ \t]*(<[^>\r\n]+>)", re.MULTILINE | re.IGNORECASE)
TURNED_SENT = re.compile(r"([0-9A-F]+): to=<[^>]*>, relay=turned\[127\.0\.0\.1\], .*status=sent")


# -- running the `mta` command -------------------------------------------------------

def run_mta(directory: Path, *args: str, stdin: bytes = b"",
            timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(MTA), *args], cwd=directory, input=stdin, capture_output=True,
                          env=source_env(), timeout=timeout, check=False)


def text(done: subprocess.CompletedProcess) -> str:
    return (f"exit {done.returncode}\nstdout: {done.stdout.decode(errors='replace')}\n"
            f"stderr: {done.stderr.decode(errors='replace')}")


def make_cert(directory: Path, cert: str, key: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    done = run_mta(directory, "make-cert", "--cert", cert, "--key", key, "--hostname", "localhost")
    assert done.returncode == 0, text(done)
    return directory / cert


# -- the two instances -----------------------------------------------------------------

@dataclass
class Pair:
    provider: MtaServer
    customer: MtaServer
    odmr_port: int
    cert: Path  # the provider's certificate, as the customer's --ca-file
    password_file: Path  # the customer's copy of its password

    def odmr(self, *extra: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return run_mta(self.customer.directory, *self.odmr_argv(*extra), timeout=timeout)

    def odmr_argv(self, *extra: str) -> list[str]:
        return ["odmr", "--config", str(self.customer.config_path),
                "--server", f"localhost:{self.odmr_port}", "--user", "customer",
                "--password-file", str(self.password_file), *extra]


def start_pair(start_mta: Callable[..., MtaServer], tmp_path: Path, pulls: str = "",
               passwd_options: tuple[str, ...] = ("--cram-md5",)) -> Pair:
    provider_dir, customer_dir = tmp_path / "provider", tmp_path / "customer"
    provider_smtp, odmr_port, customer_smtp = free_port(), free_port(), free_port()
    cert = make_cert(provider_dir, "cert.pem", "key.pem")
    provider_config = PROVIDER_CONFIG.format(odmr=odmr_port, customer_smtp=customer_smtp)
    (provider_dir / "mta.toml").write_text(provider_config.format(port=provider_smtp))
    done = run_mta(provider_dir, "passwd", "--config", "mta.toml", *passwd_options, "customer",
                   stdin=f"{PASSWORD}\n".encode())
    assert done.returncode == 0, text(done)

    customer_dir.mkdir(parents=True, exist_ok=True)
    password_file = customer_dir / "odmr-password"
    password_file.write_text(f"{PASSWORD}\n")
    (customer_dir / "provider-cert.pem").write_bytes(cert.read_bytes())
    customer_config = CUSTOMER_CONFIG.format(pulls=pulls.format(
        odmr=odmr_port, provider_smtp=provider_smtp))
    provider = start_mta(provider_config, name="provider", port=provider_smtp)
    customer = start_mta(customer_config, name="customer", port=customer_smtp)
    return Pair(provider, customer, odmr_port, customer_dir / "provider-cert.pem", password_file)


# -- messages ------------------------------------------------------------------------------

def message(message_id: str, size: int = 0) -> bytes:
    head = (f"From: sender@elsewhere.test\r\nTo: user@customer.test\r\n"
            f"Subject: held for pickup\r\nMessage-Id: {message_id}\r\n\r\n").encode()
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-+\r\n"
    return head + b"hello\r\n" + line * (size // len(line))


def inject(provider: MtaServer, count: int, size: int = 0,
           recipient: str = "user@customer.test") -> list[str]:
    """`count` messages for `recipient`, each with its 250: their Message-Ids."""
    ids = [f"<{uuid.uuid4().hex}@elsewhere.test>" for _ in range(count)]
    with smtplib.SMTP("127.0.0.1", provider.port, timeout=30) as client:
        for message_id in ids:
            client.sendmail("sender@elsewhere.test", [recipient], message(message_id, size))
    return ids


def message_id(data: bytes) -> str | None:
    head = data[:8192].split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    found = MESSAGE_ID.search(head)
    return found.group(1).decode() if found else None


def provider_queue(provider: MtaServer) -> dict[str, str | None]:
    """queue id -> Message-Id of what the provider still holds."""
    return {qid: message_id(data) for qid, data in provider.queued().items()}


def maildir(customer: MtaServer, user: str = "user") -> dict[str, bytes]:
    """Message-Id -> the stored copy, for each message in the customer's Maildir."""
    new = customer.directory / "mail" / user / "new"
    found: dict[str, bytes] = {}
    if new.is_dir():
        for path in sorted(new.iterdir()):
            data = path.read_bytes()
            found[message_id(data) or path.name] = data
    return found


def maildir_count(customer: MtaServer, user: str = "user") -> int:
    new = customer.directory / "mail" / user / "new"
    return sum(1 for _ in new.iterdir()) if new.is_dir() else 0


def customer_spool_ids(customer: MtaServer) -> set[str]:
    """Message-Ids of what the customer's spool holds (committed, not yet delivered)."""
    spool = customer.spool
    found = set()
    for qid in spool.queue_ids():
        try:
            data = spool.message_data(qid).read_bytes()
        except FileNotFoundError:
            continue  # delivered and removed meanwhile: it is in the Maildir now
        if (mid := message_id(data)) is not None:
            found.add(mid)
    return found


def at_customer(customer: MtaServer) -> set[str]:
    """Message-Ids the customer has: its spool is read before its Maildir, so a
    message moving from the one to the other while we look is seen in either."""
    in_spool = customer_spool_ids(customer)
    return in_spool | set(maildir(customer))


def received_headers(stored: bytes) -> list[str]:
    """The Received headers of a Maildir copy (LF line ends), unfolded, top first."""
    head = stored.split(b"\n\n", 1)[0].decode(errors="replace")
    unfolded = re.sub(r"\n[ \t]+", " ", head)
    return [line for line in unfolded.split("\n") if line.lower().startswith("received:")]


def wait_for_maildir(customer: MtaServer, ids: list[str], timeout: float = 20) -> dict[str, bytes]:
    def complete() -> dict[str, bytes] | None:
        found = maildir(customer)
        return found if set(ids) <= set(found) else None
    return wait_for(f"{len(ids)} messages in the customer's Maildir", complete, timeout)


def log_since(server: MtaServer, offset: int) -> str:
    return server.log_text()[offset:]


# -- 1. mta against mta over STARTTLS, the certificate checked --------------------------------

def test_odmr_over_verified_starttls(start_mta, tmp_path: Path) -> None:
    pair = start_pair(start_mta, tmp_path)
    provider, customer = pair.provider, pair.customer
    ids = inject(provider, 5)
    held = provider_queue(provider)
    assert sorted(held.values()) == sorted(ids)

    done = pair.odmr("--ca-file", str(pair.cert))
    assert done.returncode == 0, text(done)
    summary = done.stdout.decode()
    assert re.fullmatch(rf"mta odmr: ATRN at localhost:{pair.odmr_port}: 250 [^\n]*; "
                        rf"5 messages received\n", summary), summary
    # `mta odmr` waits (3 s at most) for the daemon to take its notices: it did.
    assert b"no running server" not in done.stderr, text(done)

    delivered = wait_for_maildir(customer, ids)
    assert sorted(delivered) == sorted(ids)
    assert maildir_count(customer) == len(ids)  # each exactly once
    wait_for("the provider's queue to empty", lambda: not provider.queued())
    wait_for("the customer's spool to empty", lambda: not customer.queued())

    for stored in delivered.values():
        received = received_headers(stored)
        assert len(received) == 2, received  # the customer's, then the provider's
        # The turned connection stayed inside the TLS the customer started.
        assert " by gateway.customer.test " in received[0], received[0]
        assert " with ESMTPS " in received[0], received[0]
        assert " by provider.test " in received[1], received[1]
    wait_for("the end of the turned connection", lambda: "turned connection to [127.0.0.1] "
             "ended: 5 messages for customer.test" in provider.log_text())
    log = provider.log_text()
    assert set(TURNED_SENT.findall(log)) == set(held), log[-3000:]

    # Nothing more waits: 453, which is no failure.
    again = pair.odmr("--ca-file", str(pair.cert))
    assert again.returncode == 0, text(again)
    assert re.fullmatch(rf"mta odmr: ATRN at localhost:{pair.odmr_port}: 453 [^\n]*; "
                        rf"0 messages received\n", again.stdout.decode()), text(again)


def test_odmr_refuses_an_unknown_certificate_and_no_verify_skips_the_check(
        start_mta, tmp_path: Path) -> None:
    pair = start_pair(start_mta, tmp_path)
    provider, customer = pair.provider, pair.customer
    ids = inject(provider, 3)
    held = provider_queue(provider)
    other = make_cert(tmp_path / "other", "other.pem", "other-key.pem")

    refused = pair.odmr("--ca-file", str(other))
    assert refused.returncode != 0, text(refused)
    assert refused.stdout == b"", text(refused)
    why = refused.stderr.decode(errors="replace")
    assert why.startswith(f"mta odmr: localhost:{pair.odmr_port}: TLS handshake with "
                          "localhost failed"), why
    assert "certificate verify failed" in why, why
    # The session is over (the command exited): nothing left the provider.
    assert provider_queue(provider) == held
    assert not TURNED_SENT.search(provider.log_text())
    assert not maildir(customer) and not customer.queued()

    done = pair.odmr("--no-verify")
    assert done.returncode == 0, text(done)
    assert done.stdout.decode().endswith("; 3 messages received\n"), text(done)
    delivered = wait_for_maildir(customer, ids)
    assert sorted(delivered) == sorted(ids)
    assert all(" with ESMTPS " in received_headers(m)[0] for m in delivered.values())
    wait_for("the provider's queue to empty", lambda: not provider.queued())
    assert set(TURNED_SENT.findall(provider.log_text())) == set(held)


# -- 2. the customer killed in the middle of the turned session ---------------------------------

def test_customer_killed_mid_session_loses_nothing(start_mta, tmp_path: Path) -> None:
    pair = start_pair(start_mta, tmp_path)
    provider, customer = pair.provider, pair.customer
    injected: list[str] = []
    by_queue_id: dict[str, str | None] = {}
    count, size = 40, 300_000
    for _ in range(3):
        injected += inject(provider, count, size)
        by_queue_id.update(provider_queue(provider))
        offset = len(provider.log_text())
        process = subprocess.Popen([str(MTA), *pair.odmr_argv("--ca-file", str(pair.cert))],
                                   cwd=customer.directory, env=source_env(),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for("the first turned delivery",
                     lambda o=offset: TURNED_SENT.search(log_since(provider, o)), timeout=30)
            process.send_signal(signal.SIGKILL)
            process.wait(10)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)
        assert process.returncode == -signal.SIGKILL, process.returncode
        wait_for("the provider to see the turned connection end",
                 lambda o=offset: "turned connection to [127.0.0.1] ended"
                 in log_since(provider, o), timeout=30)
        if provider.queued():
            break  # killed mid-session: mail is still held
        # The whole session ran before the kill: try again with more, larger mail.
        count, size = count * 2, size * 2
    else:
        raise AssertionError("the turned session never lasted long enough to be killed in")

    log = provider.log_text()
    sent = set(TURNED_SENT.findall(log))
    still_held = provider_queue(provider)
    assert sent and still_held, "the kill was not in the middle of the session"
    assert not sent & set(still_held), "a message logged as sent is still queued"
    have = at_customer(customer)
    for qid in sent:
        assert by_queue_id[qid] in have, f"{qid} was sent but the customer does not have it"
    missing = set(injected) - have - set(still_held.values())
    assert not missing, f"lost: {sorted(missing)}"

    # A second run brings the rest.
    done = pair.odmr("--ca-file", str(pair.cert), timeout=90)
    assert done.returncode == 0, text(done)
    got = re.search(rb"; (\d+) messages received\n$", done.stdout)
    assert got and int(got.group(1)) == len(still_held), text(done)
    wait_for("the provider's queue to empty", lambda: not provider.queued())
    delivered = wait_for_maildir(customer, injected, timeout=60)
    assert set(injected) <= set(delivered)


# -- 3. [[pull]]: the customer's daemon pulls on a schedule ---------------------------------

def test_pull_odmr_on_a_schedule(start_mta, tmp_path: Path) -> None:
    pair = start_pair(start_mta, tmp_path, pulls=ODMR_PULL)
    provider, customer = pair.provider, pair.customer
    first = inject(provider, 3)
    wait_for_maildir(customer, first)
    wait_for("the provider's queue to empty", lambda: not provider.queued())
    # Later mail comes with a later run, still with no command run by hand.
    second = inject(provider, 2)
    delivered = wait_for_maildir(customer, first + second, timeout=20)
    assert sorted(delivered) == sorted(first + second)
    assert all(" with ESMTPS " in received_headers(m)[0] for m in delivered.values())
    wait_for("the provider's queue to empty", lambda: not provider.queued())
    assert len(TURNED_SENT.findall(provider.log_text())) == 5
    # The daemon's runs say what they did; mail may have come in one run or several.
    report = re.compile(rf"pull \(odmr\) from localhost:{pair.odmr_port}: ATRN at "
                        rf"localhost:{pair.odmr_port}: 250 [^\n]*; (\d+) messages received")
    wait_for("the pull reports of all 5 messages",
             lambda: sum(map(int, report.findall(customer.log_text()))) == 5)


def test_pull_etrn_on_a_schedule(start_mta, tmp_path: Path) -> None:
    pair = start_pair(start_mta, tmp_path, pulls=ETRN_PULL)
    provider, customer = pair.provider, pair.customer
    ids = inject(provider, 3)
    delivered = wait_for_maildir(customer, ids)
    assert sorted(delivered) == sorted(ids)
    wait_for("the provider's queue to empty", lambda: not provider.queued())
    # Delivered over the etrn_route to the customer's smtp listener, not turned.
    log = provider.log_text()
    assert len(re.findall(rf"relay=127\.0\.0\.1\[127\.0\.0\.1\]:{customer.port}, "
                          r".*status=sent", log)) == 3, log[-3000:]
    assert not TURNED_SENT.search(log)
    # The ETRN that started them; the mail may have gone in one run or several.
    started = re.findall(r"ETRN customer\.test from \[127\.0\.0\.1\]: (\d+) messages started",
                         log)
    assert sum(map(int, started)) >= 3, started
    wait_for("the daemon's report of a 253", lambda: re.search(
        rf"pull \(etrn\) from 127\.0\.0\.1:{provider.port}: ETRN customer\.test: 253 ",
        customer.log_text()))


# -- 4. mta etrn ------------------------------------------------------------------------------

def test_etrn_command(start_mta, tmp_path: Path) -> None:
    pair = start_pair(start_mta, tmp_path)
    provider, customer = pair.provider, pair.customer
    ids = inject(provider, 2)
    [closed] = inject(provider, 1, recipient="someone@closed.test")

    done = run_mta(customer.directory, "etrn", "--config", str(customer.config_path),
                   f"127.0.0.1:{provider.port}", CUSTOMER_DOMAIN)
    assert done.returncode == 0, text(done)
    assert re.fullmatch(rb"customer\.test: 253 [^\n]*\n", done.stdout), text(done)
    wait_for_maildir(customer, ids)

    refused = run_mta(customer.directory, "etrn", "--config", str(customer.config_path),
                      f"127.0.0.1:{provider.port}", "closed.test")
    assert refused.returncode == 1, text(refused)
    assert re.fullmatch(rb"closed\.test: 459 [^\n]*\n", refused.stdout), text(refused)
    assert "ETRN closed.test refused for [127.0.0.1]" in provider.log_text()
    wait_for("the provider's queue to keep only closed.test's message",
             lambda: list(provider_queue(provider).values()) == [closed])


# -- 5. mta check-config ------------------------------------------------------------------------

def check_config_output(tmp_path: Path, *passwd_options: str) -> str:
    directory = tmp_path / ("cram" if passwd_options else "plain")
    make_cert(directory, "cert.pem", "key.pem")
    config = directory / "mta.toml"
    config.write_text(PROVIDER_CONFIG.format(odmr=free_port(), customer_smtp=free_port())
                      .format(port=free_port()))
    done = run_mta(directory, "passwd", "--config", str(config), *passwd_options, "customer",
                   stdin=f"{PASSWORD}\n".encode())
    assert done.returncode == 0, text(done)
    done = run_mta(directory, "check-config", str(config))
    assert done.returncode == 0, text(done)
    return done.stdout.decode()


def test_check_config_warns_of_a_pull_user_without_cram_md5(tmp_path: Path) -> None:
    out = check_config_output(tmp_path)
    assert re.search(r'warning: \[domains\."customer\.test"\] pull_users: customer has no '
                     r"CRAM-MD5 secret", out), out
    assert "mta passwd --cram-md5 customer" in out
    assert ": OK: hostname provider.test" in out
    out = check_config_output(tmp_path, "--cram-md5")
    assert "CRAM-MD5" not in out and ": OK: " in out, out
