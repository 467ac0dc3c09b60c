"""The config swap (reload) as sessions and the relayer see it; the log lines and metrics."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from mta import maillog
from mta.config import Live
from mta.observe import Metrics
from tests.protocol.dialog import Server, make_config, reply_codes


@pytest.fixture
def events():
    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)


def lines(events: list[dict]) -> list[str]:
    return [formatEvent(e) for e in events if e.get("mta_event")]


def test_a_session_takes_the_new_config_at_its_next_transaction(tmp_path: Path) -> None:
    server = Server(tmp_path)
    live = server.factory.context.live
    assert server.codes("EHLO c.test\r\nMAIL FROM:<a@c.test>\r\n")[-1] == "250 2.1.0"
    assert server.codes("RCPT TO:<carol@example.org>\r\n") == ["550 5.1.1"]
    new = make_config(tmp_path, domains={"example.org": {
        "route": f"maildir:{tmp_path / 'mail'}", "users": ["alice", "bob", "carol"]}})
    live.swap(new)
    # The transaction under way keeps the config it started with...
    assert server.codes("RCPT TO:<carol@example.org>\r\n") == ["550 5.1.1"]
    # ...the next one, in the same session, has the new one.
    assert server.codes("RSET\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<carol@example.org>\r\n") == \
        ["250 2.0.0", "250 2.1.0", "250 2.1.5"]
    assert not server.closed


def test_live_swap_tells_subscribers(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    live = Live(config)
    seen = []
    live.subscribe(seen.append)
    new = dataclasses.replace(config)
    live.swap(new)
    assert live.config is new and seen == [new] and live.generation == 1
    assert Live.of(live) is live and Live.of(config).config is config


def test_relayer_takes_new_limits_and_smarthost(tmp_path: Path) -> None:
    from mta.delivery.scheduler import Relayer
    from mta.spool.store import Spool
    config = make_config(tmp_path)
    live = Live(config)
    relayer = Relayer(live, Spool(config.server.spool), couriers={})
    assert relayer.router.next_hop("x@elsewhere.test").destination == "elsewhere.test"
    new = make_config(tmp_path, relay={"concurrency": 3, "smarthost": "smart.test:587",
                                       "smarthost_tls": "opportunistic"})
    live.swap(new)
    assert relayer.limiter.total == 3 and relayer.config is new
    assert relayer.router.next_hop("x@elsewhere.test").destination == "smarthost:[smart.test]:587"
    assert relayer.attempts.config is new


def test_reject_line_is_printable_and_keeps_braces(events) -> None:
    maillog.reject(None, "RCPT", "192.0.2.7", "550 5.1.1 no such user", "a{b}@c.test",
                   "zed\x07@example.org", "ESMTP", "evil\x1b{0}")
    [line] = lines(events)
    assert line == ("NOQUEUE: reject: RCPT from unknown[192.0.2.7]: 550 5.1.1 no such user; "
                    "from=<a{b}@c.test> to=<zed?@example.org> proto=ESMTP helo=<evil?{0}>")


def test_fields_only_when_a_structured_observer_wants_them(events, monkeypatch) -> None:
    maillog.connect("192.0.2.7", "smtp[tcp:25]")
    assert "client" not in events[-1]
    monkeypatch.setattr(maillog, "structured", True)
    maillog.connect("192.0.2.7", "smtp[tcp:25]")
    assert events[-1]["client"] == "192.0.2.7" and events[-1]["mta_event"] == "connect"
    assert events[-1]["log_level"] == LogLevel.info


def test_disconnect_counts_like_postfix(events) -> None:
    maillog.disconnect("192.0.2.7", "smtp[tcp:25]",
                       {"ehlo": [1, 1], "mail": [1, 1], "rcpt": [1, 2], "quit": [1, 1]}, False)
    expected = "disconnect from unknown[192.0.2.7] ehlo=1 mail=1 rcpt=1/2 quit=1 commands=4/5"
    assert lines(events) == [expected]


def test_metrics_count_the_events(monkeypatch) -> None:
    metrics = Metrics()
    monkeypatch.setattr(maillog, "metrics", metrics)
    maillog.connect("192.0.2.7", "smtp[tcp:25]")
    maillog.reject(None, "RCPT", "192.0.2.7", "554 5.7.1 relay denied", "a@b", "c@d", "ESMTP",
                   "h")
    maillog.auth_failed("192.0.2.7", "PLAIN", "alice", "535 5.7.8 invalid")
    maillog.delivery("Q1", "a@b", "maildir", 2.0, "2.0.0", maillog.SENT, "ok")
    maillog.delivery("Q1", "a@b", "none", 2.0, "4.4.1", maillog.DEFERRED, "no")
    maillog.disconnect("192.0.2.7", "smtp[tcp:25]", {}, True)
    get = metrics.registry.get_sample_value
    assert get("mta_connections_total", {"listener": "smtp[tcp:25]"}) == 1
    assert get("mta_rejections_total", {"stage": "RCPT", "code": "554", "dsn": "5.7.1"}) == 1
    assert get("mta_rejections_total", {"stage": "AUTH", "code": "535", "dsn": "5.7.8"}) == 1
    assert get("mta_deliveries_total", {"status": "sent"}) == 1
    assert get("mta_deliveries_total", {"status": "deferred"}) == 1
    assert get("mta_delivery_delay_seconds_count") == 1
    assert get("mta_tls_session_ratio") == 1.0
    assert get("mta_connections_active") == 0


def test_metrics_count_the_authentication_verdicts(monkeypatch) -> None:
    """Inbound checks per method and result, DKIM signatures, MTA-STS verdicts: counted at
    the same calls that log them."""
    from types import SimpleNamespace
    metrics = Metrics()
    monkeypatch.setattr(maillog, "metrics", metrics)
    maillog.checked("Q1", "spf=pass dkim=pass dkim=fail dmarc=pass",
                    (("spf", "pass"), ("dkim", "pass"), ("dkim", "fail"), ("dmarc", "pass")))
    maillog.checked("Q2", "spf=fail dkim=none dmarc=fail",
                    (("spf", "fail"), ("dkim", "none"), ("dmarc", "fail")))
    key = SimpleNamespace(domain="example.org", selector="s1", algorithm="rsa-sha256")
    maillog.dkim_signing("Q3", SimpleNamespace(domain="example.org", keys=[key, key],
                                               errors=["s=e1: broken"]))
    maillog.sts_verdict("Q4", ["a@x.test"], "x.test", "enforce", "1", "mx.x.test", "verified",
                        False)
    maillog.sts_verdict("Q4", ["a@x.test"], "x.test", "enforce", "1", "mx.y.test",
                        "refused (MX host not in the policy)", True)
    maillog.sts_verdict("Q5", ["a@x.test"], "x.test", "testing", "1", "mx.y.test",
                        "would refuse (certificate)", True)
    get = metrics.registry.get_sample_value
    assert get("mta_auth_results_total", {"method": "spf", "result": "pass"}) == 1
    assert get("mta_auth_results_total", {"method": "dkim", "result": "fail"}) == 1
    assert get("mta_auth_results_total", {"method": "dkim", "result": "none"}) == 1
    assert get("mta_auth_results_total", {"method": "dmarc", "result": "fail"}) == 1
    assert get("mta_dkim_signatures_total", {"result": "signed"}) == 2
    assert get("mta_dkim_signatures_total", {"result": "error"}) == 1
    for mode, verdict in (("enforce", "verified"), ("enforce", "refused"),
                          ("testing", "would_refuse")):
        assert get("mta_sts_verdicts_total", {"mode": mode, "verdict": verdict}) == 1


def test_every_refusal_a_session_sends_is_one_log_line(tmp_path: Path, events) -> None:
    """Each 4xx/5xx reply of a session is a reject line, whatever the command."""
    server = Server(tmp_path, client="192.0.2.7",
                    relay={"mynetworks": ["127.0.0.1/32"]}, limits={"errors": 50,
                                                                    "message_size": 1000})
    script = (b"MAIL FROM:<a@c.test>\r\n"  # 503 before EHLO
              b"EHLO c.test\r\n"
              b"RCPT TO:<x@example.org>\r\n"  # 503 before MAIL
              b"MAIL FROM:<bad address>\r\n"  # 501
              b"MAIL FROM:<a@c.test> SIZE=5000\r\n"  # 552
              b"MAIL FROM:<a@c.test>\r\n"
              b"RCPT TO:<carol@example.org>\r\n"  # 550 5.1.1
              b"RCPT TO:<x@elsewhere.test>\r\n"  # 554 relay denied
              b"DATA\r\n"  # 554 no valid recipients
              b"FROB\r\n"  # 500
              + b"NOOP " + b"x" * 600 + b"\r\n"  # 500 line too long
              + b"RCPT TO:<alice@example.org>\r\nDATA\r\n"
              + b"Subject: big\r\n\r\n" + b"y" * 990 + b"\r\n" + b"y" * 100 + b"\r\n.\r\n"  # 552
              + b"QUIT\r\n")
    out = server.send(script)
    refused = [code for code in reply_codes(out) if code[0] in "45"]
    rejects = [line for line in lines(events) if ": reject: " in line]
    assert len(refused) == 10 and len(rejects) == len(refused), (refused, rejects)
    stages = [line.split(": reject: ")[1].split(" ")[0] for line in rejects]
    assert stages == ["MAIL", "RCPT", "MAIL", "MAIL", "RCPT", "RCPT", "DATA", "UNKNOWN",
                      "COMMAND", "END-OF-MESSAGE"]
    assert rejects[-1].split(":")[0] != "NOQUEUE"  # the message had a queue id
    server.protocol.connectionLost(None)  # StringTransport does not close by itself
    assert lines(events)[-1] == (
        "disconnect from unknown[192.0.2.7] mail=1/4 ehlo=1 rcpt=1/4 data=0/2 unknown=0/2 "
        "quit=1 commands=4/14")


def test_the_text_log_prints_what_twisteds_own_observer_prints(monkeypatch) -> None:
    import io
    import time

    from twisted.logger import textFileLogObserver

    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    try:
        ours, theirs = io.StringIO(), io.StringIO()
        fast, reference = maillog.text_file_observer(ours), textFileLogObserver(theirs)
        # Across a second, a minute and a daylight saving change (2026-10-25 01:00 UTC),
        # with the same second twice and an event without a time.
        base = 1792887600.0  # 2026-10-25 00:20:00 UTC
        times = [base, base + 0.4, base + 0.999, base + 1.0, base + 59.7, base + 2400.2,
                 base + 2400.9, base + 2401, None, base + 5]
        for i, when in enumerate(times):
            event = {"log_format": "line {n} {{braces}}", "n": i, "log_level": LogLevel.info,
                     "log_namespace": "mta.test", "log_system": "-"}
            if when is not None:
                event["log_time"] = when
            fast(event)
            reference(event)
        # Mail log lines (maillog._emit) are printed without twisted's formatter: the same.
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        try:
            maillog.reject("QID", "RCPT", "192.0.2.7", "550 5.1.1 {no} such user", "a@b.test",
                           "c@d.test", "ESMTP", "helo.{x}")
            maillog._emit(maillog.log, LogLevel.warn, "test", "two\nlines {{}}")
            maillog._emit(maillog.log, LogLevel.info, "test", "")
        finally:
            globalLogPublisher.removeObserver(events.append)
        assert len(events) == 3
        for event in events + [dict(events[0], log_system="sys,1,192.0.2.7")]:
            fast(event)
            reference(event)
        assert "{no} such user" in ours.getvalue() and "two\n\tlines {{}}" in ours.getvalue()
        assert ours.getvalue() == theirs.getvalue()
        assert "+0200" in ours.getvalue() and "+0100" in ours.getvalue()
    finally:
        monkeypatch.undo()
        time.tzset()


def test_mail_dates_are_local_time_to_the_second(monkeypatch) -> None:
    import time
    from datetime import UTC, datetime
    from email.utils import format_datetime, parsedate_to_datetime

    from mta.datefield import mail_date

    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        base = 1793510400.0  # 2026-11-01 05:20 UTC; clocks go back at 06:00 UTC
        for when in [base, base + 0.5, base + 1.2, base + 2400, base + 2400.7, base - 86400 * 30]:
            expected = format_datetime(datetime.fromtimestamp(when, UTC).astimezone()
                                       .replace(microsecond=0))
            assert mail_date(when) == expected
            assert parsedate_to_datetime(mail_date(when)).timestamp() == int(when)
        assert mail_date(base).endswith("-0400") and mail_date(base + 2400).endswith("-0500")
    finally:
        monkeypatch.undo()
        time.tzset()
