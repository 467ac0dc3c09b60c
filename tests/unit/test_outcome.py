"""The one classification of replies and errors into Delivered / Deferred / Failed."""

from __future__ import annotations

import errno

import pytest
from twisted.internet import error as net_error
from twisted.python.failure import Failure

from mta.delivery.outcome import (
    Deferred,
    Delivered,
    DeliveryError,
    Failed,
    ReplyError,
    classify,
    status_of,
)
from mta.reply import Reply


@pytest.mark.parametrize("reply, kind, status", [
    (Reply(250, "2.1.5", "ok"), Delivered, "2.1.5"),
    (Reply(250, None, "ok"), Delivered, "2.0.0"),
    (Reply(451, "4.3.0", "try later"), Deferred, "4.3.0"),
    (Reply(421, None, "bye"), Deferred, "4.0.0"),
    (Reply(550, "5.1.1", "no such user"), Failed, "5.1.1"),
    (Reply(554, None, "no"), Failed, "5.0.0"),
    (Reply(552, "4.2.2", "mismatched class"), Failed, "5.0.0"),
    (Reply(354, None, "go ahead"), Deferred, "4.5.0"),
])
def test_replies(reply: Reply, kind: type, status: str) -> None:
    outcome = classify(reply, "mx.example.test")
    assert type(outcome) is kind
    assert outcome.status == status
    assert outcome.remote_mta == "mx.example.test"


def test_diagnostic_is_the_reply_on_one_line() -> None:
    outcome = classify(Reply(550, "5.1.1", "no such", "user here"), "mx.example.test")
    assert outcome.diagnostic == "550 5.1.1 no such user here"
    assert outcome.diagnostic_code == "smtp; 550 5.1.1 no such user here"
    assert status_of(Reply(250, "2.0.0")) == "2.0.0"


def test_delivered_remembers_whether_the_peer_took_dsn() -> None:
    assert classify(Reply(250, None, "ok"), "h", dsn_passed=True).dsn_passed is True


@pytest.mark.parametrize("error, status", [
    (net_error.ConnectionRefusedError(), "4.4.1"),
    (net_error.TCPTimedOutError(), "4.4.1"),
    (net_error.TimeoutError(), "4.4.1"),
    (net_error.ConnectionLost(), "4.4.2"),
    (net_error.ConnectionDone(), "4.4.2"),
    (OSError(errno.ENOSPC, "No space left on device"), "4.3.1"),
    (OSError(errno.EACCES, "Permission denied"), "4.3.0"),
    (RuntimeError("bug"), "4.3.0"),
])
def test_errors_are_never_final(error: Exception, status: str) -> None:
    for what in (error, Failure(error)):
        outcome = classify(what)
        assert type(outcome) is Deferred
        assert outcome.status == status
        assert outcome.remote_mta is None
        assert outcome.diagnostic_code.startswith("X-mta; ")


def test_delivery_errors_carry_their_class() -> None:
    assert type(classify(DeliveryError("5.1.10", "null MX"))) is Failed
    assert type(classify(DeliveryError("4.4.3", "SERVFAIL"))) is Deferred
    outcome = classify(ReplyError(Reply(554, "5.7.1", "denied"), "mx.test"))
    assert (type(outcome), outcome.status, outcome.remote_mta) == (Failed, "5.7.1", "mx.test")


def test_text_from_the_network_cannot_forge_log_lines_or_report_text() -> None:
    """A next hop's reply with CR, LF or ESC in it must not start a new log line
    (`grep status=sent` would match a forged one) nor reach a report raw."""
    from mta.delivery.outcome import Deferred as Later
    from mta.reply import Reply
    forged = Reply(550, "5.1.1", "no\rsuch\nuser\n2026 X: to=<a@b>, status=sent (250 ok)\x1b[2J")
    outcome = classify(forged, "mx.evil\n.test")
    assert outcome.diagnostic.isprintable() and outcome.remote_mta.isprintable()
    assert "\x1b" not in outcome.diagnostic
    # Whatever builds an outcome, its text is printable.
    assert Later("4.7.5", "TLS failure: peer said \x00\x1b\n").diagnostic.isprintable()
