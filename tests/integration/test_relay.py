"""The relayer end to end: the real server (`twistd -n mta`) against real peers on loopback.

Peers: a twisted.names DNS server (tests/dnsserver.py) serving the zone
below, Postfix's smtp-sink on 127.0.0.x as the MX hosts (one of them
rejecting RCPT with 5xx or 4xx), aiosmtpd with STARTTLS + AUTH as the smart
host, and a second mta instance as an internal next hop.  Mail goes in with
smtplib; what arrives is read from smtp-sink's dump files, and every bounce
is parsed with the `email` package and checked field by field.

Every port is picked at run time; every process is stopped at the end.
"""

from __future__ import annotations

import email
import email.message
import smtplib
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.authpeers import LoopbackDNS
from tests.integration.harness import MTA as MTA_COMMAND
from tests.integration.harness import (
    MtaServer,
    Sink,
    source_env,
    wait_for,
)

ZONE = {
    "example.test": {"MX": [[10, "mx1.example.test"], [20, "mx2.example.test"]]},
    "mx1.example.test": {"A": ["127.0.0.2"]},  # nothing listens there: a dead MX
    "mx2.example.test": {"A": ["127.0.0.3"]},
    "plain.test": {"A": ["127.0.0.4"]},  # no MX: the implicit MX
    "nullmx.test": {"MX": [[0, "."]]},
    "sender.test": {"MX": [[10, "mx.sender.test"]]},
    "mx.sender.test": {"A": ["127.0.0.5"]},  # where reports to our senders arrive
    "rejects.test": {"MX": [[10, "mx.rejects.test"]]},
    "mx.rejects.test": {"A": ["127.0.0.6"]},
    "soft.test": {"MX": [[10, "mx.soft.test"]]},
    "mx.soft.test": {"A": ["127.0.0.7"]},
    "dead.test": {"MX": [[10, "mx.dead.test"]]},
    "mx.dead.test": {"A": ["127.0.0.8"]},
    "broken.test": "SERVFAIL",
    "smarthost.test": {"A": ["127.0.0.1"]},
}
SENDER = "alice@sender.test"
MESSAGE = (b"From: Alice <alice@sender.test>\r\nTo: someone\r\nSubject: relay test %d\r\n"
           b"Message-ID: <%d.relaytest@sender.test>\r\n\r\nHello.\r\n.A line with a dot.\r\n")
MX_ADDRESSES = tuple(f"127.0.0.{i}" for i in range(2, 9))


def port_is_free(port: int, addresses: tuple[str, ...]) -> bool:
    for address in addresses:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((address, port))
            except OSError:
                return False
    return True


def free_port_on(addresses: tuple[str, ...]) -> int:
    """A port free on every one of `addresses` (the MX hosts share relay.smtp_port)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((addresses[0], 0))
            port = s.getsockname()[1]
        if port != 2525 and port_is_free(port, addresses):
            return port
    raise RuntimeError("no free port")


def send(mta: MtaServer, recipients: list[str], number: int = 1, sender: str = SENDER,
         rcpt_options: tuple[str, ...] = ()) -> None:
    with smtplib.SMTP("127.0.0.1", mta.port, timeout=10) as client:
        client.ehlo("client.sender.test")
        client.sendmail(sender, recipients, MESSAGE % (number, number),
                        rcpt_options=list(rcpt_options))


def queue_empty(mta: MtaServer) -> bool:
    return mta.spool.queue_ids() == []


# -- peers -------------------------------------------------------------------------------


DNSServer = LoopbackDNS  # tests/dnsserver.py on a free loopback port (tests/authpeers.py)


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dns_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    server = DNSServer(tmp_path_factory.mktemp("dns"), ZONE)
    try:
        yield server.port
    finally:
        server.stop()


@pytest.fixture
def smtp_port() -> int:
    """The port every loopback MX host listens on (relay.smtp_port)."""
    return free_port_on(MX_ADDRESSES)


@pytest.fixture
def sinks(smtp_port: int) -> Iterator[Callable[..., Sink]]:
    started: list[Sink] = []

    def start(address: str, *options: str) -> Sink:
        sink = Sink(address, smtp_port, *options)
        started.append(sink)
        return sink
    yield start
    for sink in started:
        sink.cleanup()


@pytest.fixture
def mtas(start_mta: Callable[..., MtaServer], dns_port: int,
         smtp_port: int) -> Callable[..., MtaServer]:
    """mtas(name="a", relay="", extra="", hostname=..., retry_min=..., retry_max=...): started."""

    def start(name: str = "a", relay: str = "", extra: str = "",
              hostname: str = "relay.test", retry_min: str = "1s",
              retry_max: str = "2s") -> MtaServer:
        config = f"""
[server]
hostname = "{hostname}"
spool = "spool"

[[listeners]]
endpoint = "tcp:{{port}}:interface=127.0.0.1"

[relay]
nameservers = ["127.0.0.1:{dns_port}"]
smtp_port = {smtp_port}
dns_timeout = "2s"
connect_timeout = "2s"
retry_min = "{retry_min}"
retry_max = "{retry_max}"
{relay}
{extra}
"""
        return start_mta(config=config, name=name)
    return start


def report_parts(message: email.message.Message) -> tuple[email.message.Message,
                                                          list[email.message.Message]]:
    """(per-message fields, [per-recipient fields]) of a multipart/report."""
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    human, status, _original = message.get_payload()
    assert human.get_content_type() == "text/plain"
    assert status.get_content_type() == "message/delivery-status"
    blocks = status.get_payload()
    return blocks[0], blocks[1:]


def check_report(message: email.message.Message, hostname: str = "relay.test") -> list[
        email.message.Message]:
    """The envelope and the fixed fields of a report we sent; returns the recipient blocks."""
    assert message["X-Mail-Args"].startswith("<>")  # from the null reverse-path
    assert "<alice@sender.test>" in message["X-Rcpt-Args"]
    assert message["From"] == f"Mail Delivery System <MAILER-DAEMON@{hostname}>"
    per_message, recipients = report_parts(message)
    assert per_message["Reporting-MTA"] == f"dns; {hostname}"
    assert per_message["Arrival-Date"]
    return recipients


def rcpt_args(message: email.message.Message) -> list[str]:
    return message.get_all("X-Rcpt-Args") or []


# -- the tests ------------------------------------------------------------------------------


def test_mx_with_a_dead_first_mx(mtas: Callable[..., MtaServer], sinks: Callable[..., Sink]) -> None:
    mx2 = sinks("127.0.0.3")
    mta = mtas()
    send(mta, ["bob@example.test"])
    (message,) = mx2.wait(1)
    assert rcpt_args(message) == ["<bob@example.test>"]
    assert message["X-Mail-Args"].startswith("<alice@sender.test>")
    assert message["Subject"] == "relay test 1"
    assert ".A line with a dot." in message.get_payload()
    wait_for("the queue to empty", lambda: queue_empty(mta))
    log = mta.log_text()
    assert "to=<bob@example.test>, relay=mx2.example.test[127.0.0.3]" in log
    assert "status=sent (250" in log


def test_implicit_mx(mtas: Callable[..., MtaServer], sinks: Callable[..., Sink]) -> None:
    host = sinks("127.0.0.4")
    mta = mtas()
    send(mta, ["carol@plain.test", "dave@plain.test"])
    (message,) = host.wait(1)  # one transaction for both recipients
    assert [a.split()[0] for a in rcpt_args(message)] == ["<carol@plain.test>", "<dave@plain.test>"]
    wait_for("the queue to empty", lambda: queue_empty(mta))


def test_null_mx_bounces(mtas: Callable[..., MtaServer], sinks: Callable[..., Sink]) -> None:
    senders = sinks("127.0.0.5")
    mta = mtas()
    send(mta, ["nobody@nullmx.test"])
    (report,) = senders.wait(1)
    (rcpt,) = check_report(report)
    assert rcpt["Final-Recipient"] == "rfc822; nobody@nullmx.test"
    assert rcpt["Action"] == "failed"
    assert rcpt["Status"] == "5.1.10"
    assert rcpt["Remote-MTA"] is None
    assert rcpt["Diagnostic-Code"] == "X-mta; domain nullmx.test does not accept mail (null MX)"
    wait_for("the queue to empty", lambda: queue_empty(mta))
    assert "sender non-delivery notification" in mta.log_text()


def test_5xx_recipient_bounced_others_delivered(mtas: Callable[..., MtaServer],
                                               sinks: Callable[..., Sink]) -> None:
    good = sinks("127.0.0.3")
    sinks("127.0.0.6", "-f", "RCPT")
    senders = sinks("127.0.0.5")
    mta = mtas()
    send(mta, ["bob@example.test", "eve@rejects.test"])
    (delivered,) = good.wait(1)
    assert rcpt_args(delivered)[0].startswith("<bob@example.test>")
    (report,) = senders.wait(1)
    (rcpt,) = check_report(report)
    assert rcpt["Final-Recipient"] == "rfc822; eve@rejects.test"
    assert rcpt["Action"] == "failed"
    assert rcpt["Status"].startswith("5.")
    assert rcpt["Remote-MTA"] == "dns; mx.rejects.test"
    assert rcpt["Diagnostic-Code"].startswith("smtp; 5")
    original = report.get_payload()[2]
    assert original.get_content_type() == "message/rfc822"
    assert original.get_payload()[0]["Subject"] == "relay test 1"
    wait_for("the queue to empty", lambda: queue_empty(mta))
    log = mta.log_text()
    assert "to=<eve@rejects.test>, relay=mx.rejects.test[127.0.0.6]" in log
    assert "status=bounced" in log


def test_4xx_deferred_then_delivered_on_retry(mtas: Callable[..., MtaServer],
                                             sinks: Callable[..., Sink]) -> None:
    soft = sinks("127.0.0.7", "-r", "RCPT")
    mta = mtas()
    send(mta, ["frank@soft.test"])
    wait_for("a deferral", lambda: "status=deferred" in mta.log_text())
    (queue_id,) = mta.spool.queue_ids()
    envelope = mta.spool.load(queue_id)
    assert envelope.recipients[0].status.startswith("4.")
    assert envelope.recipients[0].remote_mta == "mx.soft.test"
    soft.restart()  # now it accepts
    (message,) = soft.wait(1)
    assert rcpt_args(message)[0].startswith("<frank@soft.test>")
    wait_for("the queue to empty", lambda: queue_empty(mta))


def test_queue_flush_from_the_command_line(mtas: Callable[..., MtaServer],
                                           sinks: Callable[..., Sink]) -> None:
    soft = sinks("127.0.0.7", "-r", "RCPT")
    mta = mtas(retry_min="1h", retry_max="1h")
    send(mta, ["frank@soft.test"])
    wait_for("a deferral", lambda: "status=deferred" in mta.log_text())
    soft.restart()  # it would accept now, but the next retry is an hour away
    time.sleep(1.5)
    assert soft.messages() == []
    subprocess.run([str(MTA_COMMAND), "queue", "flush", "soft.test", "--config",
                    str(mta.config_path)], cwd=mta.directory, env=source_env(), check=True,
                   capture_output=True, timeout=30)
    (message,) = soft.wait(1)
    assert rcpt_args(message)[0].startswith("<frank@soft.test>")
    wait_for("the queue to empty", lambda: queue_empty(mta))


def test_expiry_after_the_lifetime(mtas: Callable[..., MtaServer], sinks: Callable[..., Sink]) -> None:
    senders = sinks("127.0.0.5")
    mta = mtas(relay='lifetime = "3s"\ndelay_warning = "0"')
    send(mta, ["gina@dead.test"])
    (report,) = senders.wait(1)
    (rcpt,) = check_report(report)
    assert rcpt["Final-Recipient"] == "rfc822; gina@dead.test"
    assert rcpt["Action"] == "failed"
    assert rcpt["Status"] == "4.4.7"
    assert rcpt["Diagnostic-Code"].startswith("X-mta; delivery time expired; last error: "
                                              "connect to mx.dead.test[127.0.0.8]")
    assert "connection refused" in rcpt["Diagnostic-Code"]
    wait_for("the queue to empty", lambda: queue_empty(mta))
    assert "status=expired" in mta.log_text()


def test_delay_warning_once(mtas: Callable[..., MtaServer], sinks: Callable[..., Sink]) -> None:
    senders = sinks("127.0.0.5")
    mta = mtas(relay='delay_warning = "1s"\nlifetime = "1h"')
    send(mta, ["hank@dead.test"])
    (report,) = senders.wait(1)
    assert report["Subject"].startswith("Delayed Mail")
    (rcpt,) = check_report(report)
    assert rcpt["Final-Recipient"] == "rfc822; hank@dead.test"
    assert rcpt["Action"] == "delayed"
    assert rcpt["Status"] == "4.4.1"
    assert rcpt["Will-Retry-Until"]
    assert "connection refused" in rcpt["Diagnostic-Code"]
    assert report.get_payload()[2].get_content_type() == "text/rfc822-headers"
    time.sleep(3)  # several more retries, no second warning
    assert len(senders.messages()) == 1
    assert len(mta.spool.queue_ids()) == 1


def test_8bit_message_to_a_peer_without_8bitmime_bounces_5_6_3(
        mtas: Callable[..., MtaServer], sinks: Callable[..., Sink]) -> None:
    plain_smtp = sinks("127.0.0.3", "-e")  # no ESMTP: our EHLO is refused, HELO is used
    senders = sinks("127.0.0.5")
    mta = mtas()
    body = "From: alice@sender.test\r\nSubject: caf\u00e9\r\n\r\nd\u00e9j\u00e0 vu\r\n"
    with smtplib.SMTP("127.0.0.1", mta.port, timeout=10) as client:
        client.sendmail(SENDER, ["bob@example.test", "carol@plain.test"],
                        body.encode("utf-8"), mail_options=["BODY=8BITMIME"])
    (report,) = senders.wait(1)
    (rcpt,) = check_report(report)
    assert (rcpt["Final-Recipient"], rcpt["Action"], rcpt["Status"]) == \
        ("rfc822; bob@example.test", "failed", "5.6.3")
    assert "8BITMIME" in rcpt["Diagnostic-Code"]
    assert plain_smtp.messages() == []  # never sent mangled
    original = report.get_payload()[2]
    assert original["Content-Transfer-Encoding"] == "8bit"
    assert "X-Mail-Args: <> BODY=8BITMIME" in report.as_string()


def test_smtputf8_message_to_a_peer_without_smtputf8_bounces_5_6_7(
        mtas: Callable[..., MtaServer], sinks: Callable[..., Sink]) -> None:
    mx = sinks("127.0.0.3")  # smtp-sink offers 8BITMIME but not SMTPUTF8
    senders = sinks("127.0.0.5")
    mta = mtas()
    body = "From: alice@sender.test\r\nTo: jos\u00e9@example.test\r\nSubject: hi\r\n\r\nx\r\n"
    with smtplib.SMTP("127.0.0.1", mta.port, timeout=10) as client:
        client.sendmail(SENDER, ["jos\u00e9@example.test"], body.encode("utf-8"),
                        mail_options=["SMTPUTF8", "BODY=8BITMIME"])
    (report,) = senders.wait(1)
    assert report.get_param("report-type") == "global-delivery-status"
    _, status, original = report.get_payload()
    assert status.get_content_type() == "message/global-delivery-status"
    assert original.get_content_type() == "message/global"
    raw = report.as_bytes().decode("utf-8")
    assert "Final-Recipient: utf-8; jos\u00e9@example.test" in raw
    assert "Action: failed" in raw and "Status: 5.6.7" in raw
    assert mx.messages() == []


def test_dns_servfail_is_deferred(mtas: Callable[..., MtaServer]) -> None:
    mta = mtas()
    send(mta, ["ivan@broken.test"])
    wait_for("a deferral", lambda: "status=deferred" in mta.log_text())
    (queue_id,) = mta.spool.queue_ids()
    assert mta.spool.load(queue_id).recipients[0].status == "4.4.3"


def test_restart_mid_delivery_delivers_each_message_once(
        mtas: Callable[..., MtaServer], sinks: Callable[..., Sink]) -> None:
    slow = sinks("127.0.0.3", "-w", "2")  # 2 s before answering DATA
    mta = mtas()
    count = 6
    for number in range(count):
        send(mta, [f"user{number}@example.test"], number=number)
    wait_for("deliveries in progress", lambda: len(mta.spool.queue_ids()) == count)
    time.sleep(0.8)
    mta.stop()  # mid-delivery: every transaction is waiting for its DATA reply
    assert len(mta.spool.queue_ids()) == count
    mta.start()
    wait_for("the queue to empty", lambda: queue_empty(mta))
    # Each message exactly once: none lost, none sent twice.
    subjects = sorted(m["Subject"] for m in slow.messages())
    assert subjects == sorted(f"relay test {n}" for n in range(count))


def test_restart_keeps_recorded_deliveries(mtas: Callable[..., MtaServer],
                                           sinks: Callable[..., Sink]) -> None:
    good = sinks("127.0.0.3")
    mta = mtas()
    send(mta, ["one@example.test", "two@dead.test"])
    good.wait(1)

    def recorded() -> dict[str, tuple[str, str | None]]:
        (queue_id,) = mta.spool.queue_ids()
        return {r.address: (r.state, r.status) for r in mta.spool.load(queue_id).recipients}
    wait_for("both outcomes on disk",
             lambda: recorded() == {"one@example.test": ("delivered", "2.0.0"),
                                    "two@dead.test": ("pending", "4.4.1")})
    mta.stop()
    mta.start()
    time.sleep(2.5)  # retries of two@dead.test happen; one@ must not be sent again
    assert len(good.messages()) == 1


def test_second_mta_as_next_hop_with_local_delivery(
        mtas: Callable[..., MtaServer], sinks: Callable[..., Sink], tmp_path: Path) -> None:
    senders = sinks("127.0.0.5")
    inner = mtas("inner", hostname="inner.test", extra=f"""
[domains."inner.test"]
route = "maildir:{tmp_path / 'maildirs'}"
users = ["dave"]
""")
    mta = mtas(extra=f"""
[domains."inner.test"]
route = "smtp:[127.0.0.1]:{inner.port}"
""")
    send(mta, ["dave@inner.test", "nobody@inner.test"], rcpt_options=("NOTIFY=SUCCESS,FAILURE",))
    mailbox = tmp_path / "maildirs" / "dave" / "new"
    (stored,) = wait_for("dave's mail", lambda: mailbox.is_dir() and list(mailbox.iterdir()))
    text = stored.read_text()
    assert "Subject: relay test 1" in text and "Delivered-To: dave@inner.test" in text
    # nobody@ is refused by the inner mta at RCPT: we bounce it.  dave@ asked for SUCCESS and
    # the inner mta offers DSN, so the success report is its job ("delivered", RFC 3461 4.1).
    reports = wait_for("two reports", lambda: len(m := senders.messages()) >= 2 and m)
    by_reporter = {report_parts(m)[0]["Reporting-MTA"]: m for m in reports}
    assert set(by_reporter) == {"dns; relay.test", "dns; inner.test"}
    (failed,) = check_report(by_reporter["dns; relay.test"])
    assert failed["Final-Recipient"] == "rfc822; nobody@inner.test"
    assert (failed["Action"], failed["Status"]) == ("failed", "5.1.1")
    assert failed["Remote-MTA"] == "dns; 127.0.0.1"
    assert failed["Diagnostic-Code"].startswith("smtp; 550 5.1.1")
    (success,) = check_report(by_reporter["dns; inner.test"], hostname="inner.test")
    assert success["Final-Recipient"] == "rfc822; dave@inner.test"
    assert (success["Action"], success["Status"]) == ("delivered", "2.0.0")
    wait_for("both queues to empty",
             lambda: mta.spool.queue_ids() == [] and inner.spool.queue_ids() == [])


# -- the smart host: STARTTLS + AUTH -------------------------------------------------------


def test_smarthost_is_a_second_mta_with_starttls_and_auth(
        mtas: Callable[..., MtaServer], start_mta: Callable[..., MtaServer],
        sinks: Callable[..., Sink], dns_port: int, smtp_port: int, tmp_path: Path) -> None:
    """A -> (STARTTLS, certificate checked, AUTH PLAIN) -> B, a submission listener -> MX."""
    from mta.server.auth import set_password
    from mta.tls import make_cert

    mx = sinks("127.0.0.3")
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    make_cert(secrets / "cert.pem", secrets / "key.pem", "smarthost.test")
    set_password(secrets / "passwords", "relayuser", "s3cret pass")
    (secrets / "smarthost-password").write_text("s3cret pass\n")
    smarthost = start_mta(name="smarthost", config=f"""
[server]
hostname = "smarthost.test"
spool = "spool"

[[listeners]]
endpoint = "tcp:{{port}}:interface=127.0.0.1"
role = "submission"
tls = "starttls"

[tls]
certificate = "{secrets / 'cert.pem'}"
key = "{secrets / 'key.pem'}"

[auth]
passwords = "{secrets / 'passwords'}"

[relay]
mynetworks = []
nameservers = ["127.0.0.1:{dns_port}"]
smtp_port = {smtp_port}
retry_min = "1s"
""")
    mta = mtas(relay=f"""
smarthost = "smarthost.test:{smarthost.port}"
smarthost_user = "relayuser"
smarthost_password_file = "{secrets / 'smarthost-password'}"
smarthost_tls = "verify"
tls_ca_file = "{secrets / 'cert.pem'}"
""")
    send(mta, ["bob@example.test"])
    (message,) = mx.wait(1)
    assert message["Subject"] == "relay test 1"
    # smtp-sink's own Received comes first, then the smart host's.
    (by_smarthost,) = [r for r in message.get_all("Received") if "by smarthost.test" in r]
    assert "with ESMTPSA" in by_smarthost and "relayuser" in by_smarthost
    wait_for("both queues to empty",
             lambda: queue_empty(mta) and queue_empty(smarthost))
    assert f"relay=smarthost.test[127.0.0.1]:{smarthost.port}" in mta.log_text()


class AuthPeer:
    """aiosmtpd with STARTTLS required and AUTH PLAIN/LOGIN, recording each envelope."""

    def __init__(self, directory: Path, port: int, user: str, password: str) -> None:
        from aiosmtpd.controller import Controller
        from aiosmtpd.smtp import AuthResult, LoginPassword

        from mta.tls import make_cert

        cert, key = directory / "peer-cert.pem", directory / "peer-key.pem"
        make_cert(cert, key, "smarthost.test")
        self.cert = cert
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        self.received: list[dict[str, Any]] = []
        self.logins: list[tuple[str, bool]] = []
        peer = self

        class Handler:
            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                peer.received.append({"from": envelope.mail_from, "to": envelope.rcpt_tos,
                                      "tls": session.ssl is not None,
                                      "authenticated": session.authenticated,
                                      "data": envelope.content})
                return "250 2.0.0 OK queued"

        def authenticate(server: Any, session: Any, envelope: Any, mechanism: str,
                         data: Any) -> AuthResult:
            ok = isinstance(data, LoginPassword) and \
                (data.login.decode(), data.password.decode()) == (user, password)
            peer.logins.append((mechanism, ok))
            return AuthResult(success=ok, handled=False)

        self.controller = Controller(Handler(), hostname="127.0.0.1", port=port,
                                     tls_context=context, require_starttls=True,
                                     authenticator=authenticate, auth_required=True,
                                     auth_require_tls=True, server_hostname="smarthost.test")
        self.controller.start()

    def stop(self) -> None:
        self.controller.stop()


def test_smarthost_with_auth_over_starttls(mtas: Callable[..., MtaServer], tmp_path: Path) -> None:
    port = free_port_on(("127.0.0.1",))
    peer = AuthPeer(tmp_path, port, "relayuser", "s3cret pass")
    try:
        (tmp_path / "smarthost-password").write_text("s3cret pass\n")
        mta = mtas(relay=f"""
smarthost = "smarthost.test:{port}"
smarthost_user = "relayuser"
smarthost_password_file = "{tmp_path / 'smarthost-password'}"
smarthost_tls = "verify"
tls_ca_file = "{peer.cert}"
""")
        send(mta, ["far@example.test", "other@plain.test"],
             rcpt_options=("NOTIFY=SUCCESS,FAILURE",))
        received, report = wait_for("the message and the success report",
                                    lambda: len(peer.received) >= 2 and peer.received)
        assert received["tls"] is True
        assert received["authenticated"] is True
        # One login: the report went over the connection the message had opened.
        assert peer.logins == [("PLAIN", True)]
        assert received["from"] == SENDER
        assert received["to"] == ["far@example.test", "other@plain.test"]  # one transaction
        assert b"Subject: relay test 1" in received["data"]
        # aiosmtpd does not offer DSN, so NOTIFY=SUCCESS is ours to honour [RFC 3461 4.1]:
        # a success report (action "relayed"), itself sent through the smart host.
        assert (report["from"], report["to"]) == ("<>", [SENDER])  # aiosmtpd keeps the <>
        _, recipients = report_parts(email.message_from_bytes(report["data"]))
        assert [(r["Final-Recipient"], r["Action"], r["Status"], r["Remote-MTA"])
                for r in recipients] == [
            ("rfc822; far@example.test", "relayed", "2.0.0", "dns; smarthost.test"),
            ("rfc822; other@plain.test", "relayed", "2.0.0", "dns; smarthost.test")]
        wait_for("the queue to empty", lambda: queue_empty(mta))
        assert "relay=smarthost.test[127.0.0.1]" in mta.log_text()
        assert "sender delivery status notification" in mta.log_text()
    finally:
        peer.stop()


def test_smarthost_wrong_password_defers(mtas: Callable[..., MtaServer], tmp_path: Path) -> None:
    port = free_port_on(("127.0.0.1",))
    peer = AuthPeer(tmp_path, port, "relayuser", "right")
    try:
        (tmp_path / "smarthost-password").write_text("wrong\n")
        mta = mtas(relay=f"""
smarthost = "smarthost.test:{port}"
smarthost_user = "relayuser"
smarthost_password_file = "{tmp_path / 'smarthost-password'}"
smarthost_tls = "required"
""")
        send(mta, ["far@example.test"])
        wait_for("a deferral", lambda: "status=deferred" in mta.log_text())
        (queue_id,) = mta.spool.queue_ids()
        assert mta.spool.load(queue_id).recipients[0].status == "4.7.8"
        assert peer.received == []
    finally:
        peer.stop()


def test_bdat_message_with_long_lines_is_relayed_within_smtp_limits(
        mtas: Callable[..., MtaServer], sinks: Callable[..., Sink]) -> None:
    # BDAT takes raw octets: a 3000-octet line, a bare CR, no CRLF at the end.  Relayed
    # with DATA, every line must fit in 1000 octets with its CRLF [RFC 5321 4.5.3.1.6].
    mx2 = sinks("127.0.0.3")
    mta = mtas()
    long_line = b"L" * 3000
    body = (b"From: alice@sender.test\r\nSubject: long\r\n\r\n" + long_line + b"\r\n"
            b"a\r.b\r\nlast line without CRLF")
    with socket.create_connection(("127.0.0.1", mta.port), timeout=10) as s:
        f = s.makefile("rwb")

        def reply() -> bytes:
            lines = [f.readline()]
            while lines[-1][3:4] == b"-":
                lines.append(f.readline())
            return lines[-1]
        assert reply().startswith(b"220")
        for command in (b"EHLO client.test", f"MAIL FROM:<{SENDER}>".encode(),
                        b"RCPT TO:<bob@example.test>"):
            f.write(command + b"\r\n")
            f.flush()
            assert reply().startswith(b"250"), command
        f.write(b"BDAT %d LAST\r\n" % len(body) + body)
        f.flush()
        assert reply().startswith(b"250")
        f.write(b"QUIT\r\n")
        f.flush()
    (message,) = mx2.wait(1)
    payload = message.get_payload().replace("\r\n", "\n")
    lines = payload.split("\n")
    assert max(len(line) for line in lines) <= 998
    assert payload.replace("\n ", "").startswith("L" * 3000 + "\n")
    assert "a\n.b\n" in payload and "last line without CRLF" in payload
    wait_for("the queue to empty", lambda: queue_empty(mta))
