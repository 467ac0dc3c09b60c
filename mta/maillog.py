"""The mail log: one Postfix-style line per message event, through `twisted.logger`.

Each delivery attempt of each recipient is one line::

    QUEUEID: to=<addr>, relay=host[addr]:port, delay=1.2, dsn=2.0.0, status=sent (250 2.0.0 Ok)
    QUEUEID: to=<alice@example.org>, orig_to=<sales@example.org>, relay=maildir, ...

with status ``sent``, ``deferred``, ``bounced`` or ``expired``; ``relay=none``
when no connection was made, ``relay=maildir`` for a local mailbox.  Reports
we create are logged as ``QUEUEID: sender non-delivery notification: ID``
(or ``delay`` / ``delivery status``), and a finished message as
``QUEUEID: removed``.  The fields are also in the event, for structured
observers: ``queue_id``, ``to``, ``relay``, ``delay``, ``dsn``, ``status``.
"""

from __future__ import annotations

from twisted.logger import Logger

from mta.reply import printable

log = Logger(namespace="mta.maillog")

SENT, DEFERRED, BOUNCED, EXPIRED = "sent", "deferred", "bounced", "expired"


def format_delay(seconds: float) -> str:
    """Postfix prints delays with at most two decimals and no trailing zeros."""
    text = f"{max(seconds, 0.0):.2f}".rstrip("0").rstrip(".")
    return text or "0"


def relay_name(host: str | None, address: str | None = None, port: int | None = None) -> str:
    """``host[addr]:port``, or ``none`` when no peer was reached."""
    if not host:
        return "none"
    if address is None:
        return host
    text = f"{host}[{address}]"
    return f"{text}:{port}" if port else text


def delivery(queue_id: str, to: str, relay: str, delay: float, dsn: str, status: str,
             reason: str, orig_to: str | None = None) -> None:
    """One recipient's result of one attempt; `orig_to`, when aliases made `to` of another
    address (or the client named one with ORCPT), is shown as Postfix does."""
    emit = log.info if status == SENT else log.warn
    orig = f", orig_to=<{printable(orig_to, 300)}>" if orig_to and orig_to != to else ""
    emit("{queue_id}: to=<{to}>{orig}, relay={relay}, delay={delay_text}, dsn={dsn}, "
         "status={status} ({reason})",
         queue_id=queue_id, to=to, orig=orig, relay=relay, delay=delay,
         delay_text=format_delay(delay), dsn=dsn, status=status, reason=reason)


def report_created(queue_id: str, kind: str, report_id: str) -> None:
    """`kind`: ``non-delivery``, ``delay`` or ``delivery status``."""
    log.info("{queue_id}: sender {kind} notification: {report_id}",
             queue_id=queue_id, kind=kind, report_id=report_id)


def report_dropped(queue_id: str, why: str) -> None:
    log.warn(  # noqa: G010 (twisted.logger has no .warning)
        "{queue_id}: no notification sent: {why}", queue_id=queue_id, why=why)


def removed(queue_id: str) -> None:
    log.info("{queue_id}: removed", queue_id=queue_id)


def operator(queue_id: str, action: str) -> None:
    """A change made with the `mta queue` command: ``held``, ``released``, ``deleted``."""
    log.info("{queue_id}: {action} by the operator", queue_id=queue_id, action=action)


def picked_up(envelope_queue_id: str, sender: str, recipients: int, size: int) -> None:
    """A message put in the spool by `mta sendmail`, seen by the running server."""
    log.info("{queue_id}: from=<{sender}>, nrcpt={n}, size={size} (local submission)",
             queue_id=envelope_queue_id, sender=sender, n=recipients, size=size)
