"""RFC 3464 reports, parsed back with the `email` package and checked field by field."""

from __future__ import annotations

import email
import email.policy
from email.message import Message
from pathlib import Path

import pytest

from mta import bounce
from mta.spool.envelope import DELIVERED, FAILED, Envelope, Recipient
from mta.spool.store import Spool

ORIGINAL = (b"From: Alice <alice@here.test>\r\nTo: bob@far.test\r\nSubject: hello\r\n"
            b"Message-ID: <m1@here.test>\r\n\r\nThe body.\r\n.line with a dot\r\n")


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool")


def queued(spool: Spool, **fields: object) -> Envelope:
    recipients = fields.pop("recipients", None) or [
        Recipient("bob@far.test", orcpt="rfc822;Bob@Far.test", state=FAILED, status="5.1.1",
                  diagnostic="550 5.1.1 no such user", remote_mta="mx.far.test", updated=1000.0),
        Recipient("carol@far.test", state=DELIVERED, status="2.0.0"),
    ]
    envelope = Envelope("", fields.pop("reverse_path", "alice@here.test"), recipients,
                        arrival=900.0, envid="ENV-1", client_helo="pc.here.test", **fields)
    spool.inject(envelope, ORIGINAL)
    return envelope


def read_report(spool: Spool, report: Envelope) -> Message:
    raw = spool.message_data(report.queue_id).read_bytes()
    assert b"\n" not in raw.replace(b"\r\n", b"")  # CRLF throughout
    return email.message_from_bytes(raw, policy=email.policy.compat32)


def parts(message: Message) -> tuple[Message, list[Message], Message]:
    human, status, original = message.get_payload()
    return human, status.get_payload(), original


def test_failure_report_field_by_field(spool: Spool) -> None:
    envelope = queued(spool)
    failed = [bounce.ReportLine(envelope.recipients[0], bounce.FAILED)]
    report = bounce.send_report(spool, "mx.here.test", envelope,
                                spool.message_data(envelope.queue_id), bounce.FAILURE, failed, 1010.0)
    assert report is not None
    # The report's envelope: from <>, to the sender, marked as a report.
    assert (report.reverse_path, [r.address for r in report.recipients]) == ("", ["alice@here.test"])
    assert report.is_report and report.extra[bounce.REPORT_FOR] == envelope.queue_id
    msg = read_report(spool, report)
    assert msg["To"] == "<alice@here.test>"
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@mx.here.test>"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    human, (per_message, per_recipient), original = parts(msg)
    assert human.get_content_type() == "text/plain"
    assert "<bob@far.test>: failed" in human.get_payload()
    assert per_message["Reporting-MTA"] == "dns; mx.here.test"
    assert per_message["Original-Envelope-Id"] == "ENV-1"
    assert per_message["Received-From-MTA"] == "dns; pc.here.test"
    assert per_message["Arrival-Date"] is not None
    assert email.utils.parsedate_to_datetime(per_message["Arrival-Date"]).timestamp() == 900.0
    assert per_recipient["Original-Recipient"] == "rfc822;Bob@Far.test"
    assert per_recipient["Final-Recipient"] == "rfc822; bob@far.test"
    assert per_recipient["Action"] == "failed"
    assert per_recipient["Status"] == "5.1.1"
    assert per_recipient["Remote-MTA"] == "dns; mx.far.test"
    assert per_recipient["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"
    assert email.utils.parsedate_to_datetime(per_recipient["Last-Attempt-Date"]).timestamp() == 1000
    assert per_recipient["Will-Retry-Until"] is None
    # RET absent: the whole original comes back.
    assert original.get_content_type() == "message/rfc822"
    inner = original.get_payload()[0]
    assert inner["Subject"] == "hello"
    assert ".line with a dot" in inner.get_payload()


def test_ret_hdrs_returns_headers_only(spool: Spool) -> None:
    envelope = queued(spool, ret="HDRS")
    report = bounce.send_report(spool, "mx.here.test", envelope,
                                spool.message_data(envelope.queue_id), bounce.FAILURE,
                                [bounce.ReportLine(envelope.recipients[0], bounce.FAILED)], 1010.0)
    original = parts(read_report(spool, report))[2]
    assert original.get_content_type() == "text/rfc822-headers"
    text = original.get_payload()
    assert "Subject: hello" in text and "The body." not in text


def test_delay_report(spool: Spool) -> None:
    envelope = queued(spool, recipients=[Recipient("bob@far.test", status="4.4.1",
                                                   diagnostic="connection refused")])
    report = bounce.send_report(spool, "mx.here.test", envelope,
                                spool.message_data(envelope.queue_id), bounce.DELAY,
                                [bounce.ReportLine(envelope.recipients[0], bounce.DELAYED)],
                                1010.0, retry_until=900.0 + 5 * 86400)
    msg = read_report(spool, report)
    assert msg["Subject"].startswith("Delayed Mail")
    _, (_, rcpt), original = parts(msg)
    assert (rcpt["Action"], rcpt["Status"]) == ("delayed", "4.4.1")
    assert rcpt["Diagnostic-Code"] == "X-mta; connection refused"
    assert rcpt["Remote-MTA"] is None
    assert email.utils.parsedate_to_datetime(rcpt["Will-Retry-Until"]).timestamp() == \
        900.0 + 5 * 86400
    assert original.get_content_type() == "text/rfc822-headers"


def test_success_report_relayed(spool: Spool) -> None:
    envelope = queued(spool)
    carol = envelope.recipients[1]
    carol.remote_mta = "mx.far.test"
    report = bounce.send_report(spool, "mx.here.test", envelope,
                                spool.message_data(envelope.queue_id), bounce.SUCCESS,
                                [bounce.ReportLine(carol, bounce.RELAYED)], 1010.0)
    _, (_, rcpt), _ = parts(read_report(spool, report))
    assert (rcpt["Action"], rcpt["Status"], rcpt["Final-Recipient"]) == \
        ("relayed", "2.0.0", "rfc822; carol@far.test")


def test_never_bounce_a_bounce(spool: Spool) -> None:
    envelope = queued(spool, reverse_path="")
    line = [bounce.ReportLine(envelope.recipients[0], bounce.FAILED)]
    path = spool.message_data(envelope.queue_id)
    assert bounce.send_report(spool, "mx.here.test", envelope, path, bounce.FAILURE, line,
                              1010.0) is None
    # With a postmaster, a failed bounce becomes one double bounce...
    double = bounce.send_report(spool, "mx.here.test", envelope, path, bounce.FAILURE, line,
                                1010.0, postmaster="postmaster@here.test")
    assert [r.address for r in double.recipients] == ["postmaster@here.test"]
    assert double.extra[bounce.DOUBLE_BOUNCE] is True
    # ...whose own failure goes nowhere, and delay/success reports never go to <>.
    for kind in (bounce.FAILURE, bounce.DELAY, bounce.SUCCESS):
        assert bounce.report_recipient(double, kind, "postmaster@here.test") is None
    assert bounce.report_recipient(envelope, bounce.DELAY, "postmaster@here.test") is None


def test_utf8_original_uses_global_types(spool: Spool) -> None:
    envelope = queued(spool, smtputf8=True, body="8BITMIME",
                      recipients=[Recipient("josé@far.test", state=FAILED, status="5.1.1",
                                            diagnostic="550 5.1.1 no")])
    report = bounce.send_report(spool, "mx.here.test", envelope,
                                spool.message_data(envelope.queue_id), bounce.FAILURE,
                                [bounce.ReportLine(envelope.recipients[0], bounce.FAILED)], 1010.0)
    assert report.body == "8BITMIME"
    msg = read_report(spool, report)
    assert msg.get_param("report-type") == "global-delivery-status"
    _, status, original = msg.get_payload()
    assert status.get_content_type() == "message/global-delivery-status"
    assert original.get_content_type() == "message/global"
    raw = spool.message_data(report.queue_id).read_bytes().decode()
    assert "Final-Recipient: utf-8; josé@far.test" in raw


def test_boundary_fits_mime_limit_with_a_long_host_name(spool: Spool) -> None:
    # RFC 2046 5.1.1: a boundary is at most 70 characters.
    envelope = queued(spool)
    report = bounce.send_report(spool, "outbound-relay-01.mail.department.example.org", envelope,
                                spool.message_data(envelope.queue_id), bounce.FAILURE,
                                [bounce.ReportLine(envelope.recipients[0], bounce.FAILED)], 1010.0)
    msg = read_report(spool, report)
    assert 0 < len(msg.get_boundary()) <= 70
    assert len(msg.get_payload()) == 3
