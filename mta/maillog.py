"""The mail log: one Postfix-style line per message event, through `twisted.logger`.

Each delivery attempt of each recipient is one line::

    QUEUEID: to=<addr>, relay=host[addr]:port, delay=1.2, dsn=2.0.0, status=sent (250 2.0.0 Ok)
    QUEUEID: to=<alice@example.org>, orig_to=<sales@example.org>, relay=maildir, ...

with status ``sent``, ``deferred``, ``bounced`` or ``expired``; ``relay=none``
when no connection was made, ``relay=maildir`` for a local mailbox.  An MTA-STS
policy's verdict on an MX host is one more line per attempt (`sts_verdict`).  Reports
we create are logged as ``QUEUEID: sender non-delivery notification: ID``
(or ``delay`` / ``delivery status``), and a finished message as
``QUEUEID: removed``.  The fields are also in the event, for structured
observers: ``queue_id``, ``to``, ``relay``, ``delay``, ``dsn``, ``status``.

The SMTP server's events, one line each (namespace ``mta.smtpd``)::

    connect from unknown[192.0.2.7] to smtp[tcp:25]
    TLS connection established from unknown[192.0.2.7]: TLSv1.3 with cipher ... (256/256 bits)
    NOQUEUE: reject: RCPT from unknown[192.0.2.7]: 550 5.1.1 no such user here;
        from=<a@example.net> to=<zed@example.org> proto=ESMTP helo=<client.example.net>
    warning: unknown[192.0.2.7]: SASL PLAIN authentication failed: 535 5.7.8 ...
    QUEUEID: client=unknown[192.0.2.7], tls=TLSv1.3:..., sasl_method=PLAIN,
        sasl_username=alice, from=<..>, nrcpt=1, size=300, message-id=<..>, proto=ESMTPSA
    QUEUEID: dkim=signed d=example.org s=s1 a=rsa-sha256
    QUEUEID: spf=pass smtp.mailfrom=a@example.net dkim=pass header.d=example.net
        header.s=s1 dmarc=pass header.from=example.net      (port-25 mail from outside)
    disconnect from unknown[192.0.2.7] ehlo=1 mail=1 rcpt=1/2 data=1 quit=1 commands=5/6

Every line is formatted once, here, with an f-string; network text goes
through `printable` first.  Each event carries ``mta_event`` (its kind), and
its fields too when a structured observer (``[log] json_file``) is on; the
metrics endpoint counts the same events (mta/observe.py).
"""

from __future__ import annotations

import math
import time
from typing import IO, Any

import twisted.logger
from twisted.logger import (
    FileLogObserver,
    Logger,
    LogLevel,
    formatEventAsClassicLogText,
    formatTime,
    timeFormatRFC3339,
)

from mta.reply import printable

log = Logger(namespace="mta.maillog")
smtpd = Logger(namespace="mta.smtpd")

# Set by mta.observe when a JSON-lines log or the metrics endpoint is on:
# only then are the fields of each event gathered, and counted.
structured = False
metrics: Any = None
# Set in the receiving process (receiver.py): each line goes to the main process,
# which logs it (`emit_line`), instead of to this process's observers; its fields
# go with it only when `structured` says the main process keeps them.
forward: Any = None

SENT, DEFERRED, BOUNCED, EXPIRED = "sent", "deferred", "bounced", "expired"


def _emit(logger: Logger, level: LogLevel, event: str, text: str,
          fields: dict[str, Any] | None = None) -> None:
    """One line, formatted here once: the event's format is ``{log_mta_text}``, so
    every observer prints the text as it is, and ours (`text_file_observer`) takes
    it without formatting anything.  `fields` go into the event only when a
    structured observer wants them."""
    if forward is not None:
        forward(logger.namespace, level.name, event, text, fields if structured else None)
        return
    # The event Logger.emit would build, given to the logger's observer directly:
    # Logger.emit first looks the level up among all LogLevel constants (a sixth of
    # a line's cost in a profile); our levels are LogLevel constants by construction.
    record = dict(fields) if structured and fields is not None else {}
    record.update(log_mta_text=text, mta_event=event, log_logger=logger, log_level=level,
                  log_namespace=logger.namespace, log_source=logger.source,
                  log_format=_FORMAT, log_time=time.time())
    logger.observer(record)


_FORMAT = "{log_mta_text}"
_loggers: dict[str, Logger] = {}


def emit_line(namespace: str, level: str, event: str, text: str,
              fields: dict[str, Any] | None) -> None:
    """A line the receiving process sent: logged here as if it were this process's."""
    logger = _loggers.get(namespace)
    if logger is None:
        logger = _loggers[namespace] = Logger(namespace=namespace)
    _emit(logger, LogLevel.levelWithName(level), event, text, fields)


def text_file_observer(out: IO[Any], time_format: str | None = timeFormatRFC3339,
                       ) -> FileLogObserver:
    """`twisted.logger.textFileLogObserver`, line for line, but each second's time stamp
    is formatted once (the time zone lookup and strftime were a fifth of the server's
    CPU time under load; the time formats twistd uses stop at seconds), and a mail
    log line (`_emit`) is printed as it is, without twisted.logger's formatter."""
    last: list[Any] = [None, "-"]  # the second, its stamp

    def stamp(when: float | None) -> str:
        if when is None or time_format is None:
            return "-"
        second = math.floor(when)
        if second != last[0]:
            last[:] = second, formatTime(second, time_format)
        return last[1]

    def format_event(event: Any) -> str | None:
        text = event.get("log_mta_text")
        if text is None or "log_failure" in event or event.get("log_format") != _FORMAT:
            return formatEventAsClassicLogText(event, formatTime=stamp)
        system = event.get("log_system")
        if system is None:
            level = event.get("log_level")
            system = f"{event.get('log_namespace', '-')}#{level.name if level else '-'}"
        if "\n" in text:
            text = text.replace("\n", "\n\t")
        return f"{stamp(event.get('log_time'))} [{system}] {text}\n" if text else None

    return FileLogObserver(out, format_event)


def use_fast_text_log() -> None:
    """Make twistd's log file (or stdout) observer `text_file_observer`.  twistd looks up
    ``twisted.logger.textFileLogObserver`` when it starts logging, after the plugin has
    made its service: the one seam twistd leaves for a plugin."""
    twisted.logger.textFileLogObserver = text_file_observer  # type: ignore[assignment]


def client_name(address: str) -> str:
    """Postfix's ``name[address]``; we do no reverse DNS lookup, so the name is ``unknown``.
    A local submission (the sendmail socket) is ``local uid=N (user)``."""
    if address.startswith("local "):
        return address
    return f"unknown[{address}]"


# -- the SMTP server ------------------------------------------------------------

def connect(client: str, listener: str) -> None:
    _emit(smtpd, LogLevel.info, "connect", f"connect from {client_name(client)} to {listener}",
          {"client": client, "listener": listener})
    if metrics is not None:
        metrics.connected(listener)


def disconnect(client: str, listener: str, counts: dict[str, list[int]], tls: bool) -> None:
    """`counts`: command name -> [accepted, given], as Postfix's ``rcpt=1/2``."""
    parts = []
    ok = total = 0
    for name, (good, given) in counts.items():
        parts.append(f"{name}={good}" if good == given else f"{name}={good}/{given}")
        ok, total = ok + good, total + given
    commands = f"commands={ok}" if ok == total else f"commands={ok}/{total}"
    _emit(smtpd, LogLevel.info, "disconnect",
          f"disconnect from {client_name(client)} {' '.join(parts + [commands])}",
          {"client": client, "listener": listener, "commands": dict(counts)})
    if metrics is not None:
        metrics.disconnected(tls)


def reject(queue_id: str | None, stage: str, client: str, answer: str, sender: str | None,
           recipient: str | None, proto: str, helo: str | None) -> None:
    """A refused command: ``NOQUEUE: reject: RCPT from unknown[addr]: 550 5.1.1 ...;
    from=<..> to=<..> proto=ESMTP helo=<..>`` (the queue id once DATA started)."""
    tail = []
    if sender is not None:
        tail.append(f"from=<{printable(sender, 300)}>")
    if recipient is not None:
        tail.append(f"to=<{printable(recipient, 300)}>")
    tail.append(f"proto={proto}")
    if helo is not None:
        tail.append(f"helo=<{printable(helo, 255)}>")
    _emit(smtpd, LogLevel.info, "reject",
          f"{queue_id or 'NOQUEUE'}: reject: {stage} from {client_name(client)}: "
          f"{printable(answer, 500)}; {' '.join(tail)}",
          {"queue_id": queue_id, "stage": stage, "client": client, "reply": answer,
           "from": sender, "to": recipient, "proto": proto, "helo": helo})
    if metrics is not None:
        metrics.rejected(stage, answer)


def auth_failed(client: str, mechanism: str, user: str | None, answer: str) -> None:
    """Postfix's wording, which fail2ban's filters know (etc/examples/fail2ban/)."""
    who = f", sasl_username={printable(user, 100)}" if user else ""
    _emit(smtpd, LogLevel.warn, "auth-failed",
          f"warning: {client_name(client)}: SASL {mechanism} authentication failed: "
          f"{answer}{who}", {"client": client, "mechanism": mechanism, "user": user})
    if metrics is not None:
        metrics.rejected("AUTH", answer)


def tls_established(client: str, description: str) -> None:
    """``TLS connection established from unknown[addr]: TLSv1.3 with cipher X (256/256 bits)``."""
    _emit(smtpd, LogLevel.info, "tls", f"TLS connection established from "
          f"{client_name(client)}: {description}", {"client": client, "tls": description})


def received(queue_id: str, client: str, tls: str | None, sasl_method: str | None,
             sasl_username: str | None, sender: str, recipients: int, size: int,
             message_id: str | None, proto: str) -> None:
    """A message committed: ``QUEUEID: client=unknown[addr], tls=..., sasl_method=PLAIN,
    sasl_username=alice, from=<..>, nrcpt=1, size=300, message-id=<..>, proto=ESMTPSA``."""
    parts = [f"client={client_name(client)}"]
    if tls:
        parts.append(f"tls={tls}")
    if sasl_username:
        parts += [f"sasl_method={sasl_method}", f"sasl_username={printable(sasl_username, 100)}"]
    parts += [f"from=<{printable(sender, 300)}>", f"nrcpt={recipients}", f"size={size}"]
    if message_id:
        parts.append(f"message-id={printable(message_id, 300)}")
    parts.append(f"proto={proto}")
    _emit(smtpd, LogLevel.info, "received", f"{queue_id}: {', '.join(parts)}",
          {"queue_id": queue_id, "client": client, "tls": tls, "sasl_method": sasl_method,
           "sasl_username": sasl_username, "from": sender, "nrcpt": recipients,
           "size": size, "message_id": message_id, "proto": proto})
    if metrics is not None:
        metrics.received()


def dkim_signing(queue_id: str, signed: Any) -> None:
    """What DKIM signing did (signing.Signed): ``QUEUEID: dkim=signed d=example.org s=s1
    a=rsa-sha256``, one line per signature; ``QUEUEID: dkim=error d=...: why`` when a key
    could not sign (the message goes on without that signature)."""
    for key in signed.keys:
        _emit(smtpd, LogLevel.info, "dkim_signed",
              f"{queue_id}: dkim=signed d={key.domain} s={key.selector} a={key.algorithm}",
              {"queue_id": queue_id, "d": key.domain, "s": key.selector, "a": key.algorithm})
    what = "sent without this signature" if signed.keys else "sent unsigned"
    for error in signed.errors:
        why = printable(error, 300)
        _emit(smtpd, LogLevel.error, "dkim_error",
              f"{queue_id}: dkim=error d={signed.domain}: {why}; {what}",
              {"queue_id": queue_id, "d": signed.domain, "error": why})
    if metrics is not None:
        metrics.dkim_signing(len(signed.keys), len(signed.errors))


def checked(queue_id: str, verdicts: str, results: tuple[tuple[str, str], ...] = ()) -> None:
    """The inbound checks' verdicts on a message from outside (mta/checks/): ``QUEUEID:
    spf=pass smtp.mailfrom=a@x dkim=pass header.d=x header.s=s dmarc=pass header.from=x``.
    `verdicts` is built from network text already made fit for a header (authresults.py)."""
    _emit(smtpd, LogLevel.info, "checked", f"{queue_id}: {printable(verdicts, 2000)}",
          {"queue_id": queue_id, "verdicts": verdicts})
    if metrics is not None:
        metrics.checked(results)


# -- delivery ---------------------------------------------------------------------

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
    orig = f", orig_to=<{printable(orig_to, 300)}>" if orig_to and orig_to != to else ""
    _emit(log, LogLevel.info if status == SENT else LogLevel.warn, "delivery",
          f"{queue_id}: to=<{to}>{orig}, relay={relay}, delay={format_delay(delay)}, "
          f"dsn={dsn}, status={status} ({reason})",
          {"queue_id": queue_id, "to": to, "orig_to": orig_to, "relay": relay,
           "delay": delay, "dsn": dsn, "status": status, "reason": reason})
    if metrics is not None:
        metrics.delivery(status, delay)


def report_created(queue_id: str, kind: str, report_id: str) -> None:
    """`kind`: ``non-delivery``, ``delay`` or ``delivery status``."""
    _emit(log, LogLevel.info, "report", f"{queue_id}: sender {kind} notification: {report_id}",
          {"queue_id": queue_id, "kind": kind, "report_id": report_id})


def report_dropped(queue_id: str, why: str) -> None:
    _emit(log, LogLevel.warn, "report_dropped", f"{queue_id}: no notification sent: {why}",
          {"queue_id": queue_id, "why": why})


def removed(queue_id: str) -> None:
    _emit(log, LogLevel.info, "removed", f"{queue_id}: removed", {"queue_id": queue_id})


def operator(queue_id: str, action: str) -> None:
    """A change made with the `mta queue` command: ``held``, ``released``, ``deleted``."""
    _emit(log, LogLevel.info, "operator", f"{queue_id}: {action} by the operator",
          {"queue_id": queue_id, "action": action})


def picked_up(envelope_queue_id: str, sender: str, recipients: int, size: int) -> None:
    """A message put in the spool by `mta sendmail`, seen by the running server."""
    _emit(log, LogLevel.info, "picked_up",
          f"{envelope_queue_id}: from=<{sender}>, nrcpt={recipients}, size={size} "
          "(local submission)",
          {"queue_id": envelope_queue_id, "sender": sender, "nrcpt": recipients, "size": size})


def sts_verdict(queue_id: str, recipients: list[str], domain: str, mode: str, policy_id: str,
                mx: str, verdict: str, refused: bool) -> None:
    """One MTA-STS verdict [RFC 8461 5] on one MX host in one attempt::

        QUEUEID: to=<a@example.com>, sts=enforce, domain=example.com, policy_id=2024,
            mx=mx1.example.com: verified

    or ``refused (why)`` (mode enforce: that host is not used), ``would refuse (why)``
    (mode testing: it is used all the same)."""
    to = f"to=<{recipients[0]}>" + (f", nrcpt={len(recipients)}" if len(recipients) > 1 else "")
    _emit(log, LogLevel.warn if refused else LogLevel.info, "sts",
          f"{queue_id}: {to}, sts={mode}, domain={domain}, policy_id={policy_id}, "
          f"mx={mx}: {printable(verdict, 500)}",
          {"queue_id": queue_id, "to": recipients, "sts": mode, "domain": domain,
           "policy_id": policy_id, "mx": mx, "verdict": verdict})
    if metrics is not None:
        metrics.sts(mode, "would_refuse" if verdict.startswith("would refuse") else
                    "refused" if refused else "verified")
