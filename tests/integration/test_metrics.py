"""The metrics endpoint (read with curl) and the JSON-lines log, on a running server."""

from __future__ import annotations

import json
import re
import signal
import smtplib
import subprocess
from collections.abc import Callable

from tests.integration.harness import MtaServer, accepts, free_port, need, wait_for

CONFIG = """
[server]
hostname = "mx.test"
spool = "spool"

[[listeners]]
endpoint = "tcp:{{port}}:interface=127.0.0.1"

[relay]
mynetworks = ["127.0.0.1/32"]
nameservers = ["127.0.0.1:9"]
dns_timeout = "1s"

[domains."example.org"]
route = "maildir:mail/example.org"
users = ["alice"]

[domains."customer.test"]
route = "hold"

[log]
json_file = "mta.json"

[metrics]
endpoint = "tcp:{metrics}:interface=127.0.0.1"
"""


def scrape(port: int) -> str:
    done = subprocess.run([need("curl"), "-sf", f"http://127.0.0.1:{port}/metrics"],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def value(page: str, sample: str) -> float:
    match = re.search(rf"^{re.escape(sample)} (\S+)$", page, re.MULTILINE)
    assert match, f"{sample} not in:\n{page}"
    return float(match.group(1))


def test_metrics_and_json_lines(start_mta: Callable[..., MtaServer]) -> None:
    metrics = free_port()
    server = start_mta(CONFIG.format(metrics=metrics))
    wait_for("the metrics endpoint", lambda: accepts("127.0.0.1", metrics))
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
        client.ehlo("client.test")
        client.sendmail("a@client.test", ["alice@example.org"], b"Subject: one\r\n\r\nhi\r\n")
        client.sendmail("a@client.test", ["bob@customer.test"], b"Subject: held\r\n\r\nhi\r\n")
        client.mail("a@client.test")
        assert client.rcpt("zed@example.org")[0] == 550
    wait_for("alice's mail delivered", lambda: "status=sent" in server.log_text())
    # The harness's readiness probe was a session too.
    wait_for("the session's end", lambda: server.log_text().count("disconnect from") == 2)

    page = scrape(metrics)
    listener = f"smtp[tcp:{server.port}:interface=127.0.0.1]"
    assert value(page, f'mta_connections_total{{listener="{listener}"}}') == 2
    assert value(page, "mta_messages_received_total") == 2
    assert value(page, 'mta_deliveries_total{status="sent"}') == 1
    assert value(page, 'mta_rejections_total{code="550",dsn="5.1.1",stage="RCPT"}') == 1
    assert value(page, "mta_delivery_delay_seconds_count") == 1
    assert value(page, 'mta_queue_messages{state="held"}') == 1
    assert value(page, 'mta_queue_messages{state="deferred"}') == 0
    assert value(page, "mta_sessions_total") == 2
    assert value(page, "mta_tls_session_ratio") == 0
    assert value(page, "mta_connections_active") == 0

    json_path = server.directory / "mta.json"
    records = [json.loads(line) for line in json_path.read_text().splitlines()]
    [reject] = [r for r in records if r["event"] == "reject"]
    assert reject["to"] == "zed@example.org" and reject["stage"] == "RCPT"
    assert reject["text"].startswith("NOQUEUE: reject: RCPT from unknown[127.0.0.1]: 550 5.1.1")
    received = [r for r in records if r["event"] == "received"]
    assert len(received) == 2 and all(r["queue_id"] for r in received)
    [sent] = [r for r in records if r["event"] == "delivery"]
    assert sent["status"] == "sent" and sent["to"] == "alice@example.org"

    # logrotate moves the file away; SIGHUP makes the server write a new one.
    json_path.rename(server.directory / "mta.json.1")
    server.process.send_signal(signal.SIGHUP)
    wait_for("a new JSON log", lambda: json_path.exists() and "reload" in json_path.read_text())
