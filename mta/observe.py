"""What the mail log's events feed besides the text log: metrics and a JSON-lines file.

Both are off by default and turned on by the config:

- ``[metrics] endpoint = "tcp:9125:interface=127.0.0.1"`` serves ``/metrics``
  in the Prometheus text format (prometheus-client, over twisted.web).
  `Metrics` counts what maillog.py logs, at the same calls, so that a
  number and a log line never disagree: connections (per listener),
  sessions and those with TLS (and their share), messages received,
  recipient deliveries by status (sent, deferred, bounced, expired),
  rejections by stage and reply code, the delivery delay of sent mail as a
  histogram, the inbound checks' verdicts (per method and result), DKIM
  signatures made, MTA-STS verdicts, and, read at each scrape, the queue by
  state.
- ``[log] json_file = PATH`` writes one JSON object per line for each event
  of mta's own loggers (``time``, ``level``, ``namespace``, ``event``,
  ``text`` and the event's fields), for log shippers.  SIGHUP reopens the
  file (after logrotate moved it).

Neither does anything on the hot path while off: maillog checks one module
attribute.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import Service
from twisted.internet import endpoints
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import Site

from mta import maillog

DELAY_BUCKETS = (0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 86400, 5 * 86400)


class Metrics:
    """The counters, in a registry of their own; `queue` (optional) reports the queue."""

    def __init__(self, queue: Any = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections = Counter("mta_connections", "SMTP connections accepted, per listener",
                                   ["listener"], registry=r)
        self.active = Gauge("mta_connections_active", "SMTP connections open now", registry=r)
        self.sessions = Counter("mta_sessions", "SMTP sessions ended", registry=r)
        self.tls_sessions = Counter("mta_tls_sessions", "SMTP sessions ended that used TLS",
                                    registry=r)
        self.received_messages = Counter("mta_messages_received",
                                         "messages received and queued", registry=r)
        self.deliveries = Counter("mta_deliveries",
                                  "recipient delivery results (sent, deferred, bounced, expired)",
                                  ["status"], registry=r)
        self.rejections = Counter("mta_rejections", "refused SMTP commands, by stage and reply",
                                  ["stage", "code", "dsn"], registry=r)
        self.auth_results = Counter(
            "mta_auth_results", "verdicts of the inbound checks on mail from outside, per "
            "method (spf, dkim, dmarc) and result (pass, fail, none, temperror, ...)",
            ["method", "result"], registry=r)
        self.dkim_signatures = Counter("mta_dkim_signatures",
                                       "DKIM signatures made (signed) and keys that could "
                                       "not sign (error)", ["result"], registry=r)
        self.sts_verdicts = Counter("mta_sts_verdicts",
                                    "MTA-STS verdicts on MX hosts, per mode and verdict "
                                    "(verified, refused, would_refuse)",
                                    ["mode", "verdict"], registry=r)
        self.delay = Histogram("mta_delivery_delay_seconds",
                               "time from receipt to delivery of sent mail",
                               buckets=DELAY_BUCKETS, registry=r)
        self.ended = self.ended_with_tls = 0  # for the share of sessions with TLS
        r.register(_Derived(self, queue))

    # -- called by maillog -------------------------------------------------------------

    def connected(self, listener: str) -> None:
        self.connections.labels(listener).inc()
        self.active.inc()

    def disconnected(self, tls: bool) -> None:
        self.active.dec()
        self.sessions.inc()
        self.ended += 1
        if tls:
            self.tls_sessions.inc()
            self.ended_with_tls += 1

    def sessions_lost(self, count: int) -> None:
        """`count` sessions ended without a word: the receiving process died."""
        self.active.dec(count)

    def rejected(self, stage: str, answer: str) -> None:
        code, _, rest = answer.partition(" ")
        dsn = rest.split(" ", 1)[0] if rest[:1].isdigit() and "." in rest[:6] else ""
        self.rejections.labels(stage, code, dsn).inc()

    def received(self) -> None:
        self.received_messages.inc()

    def checked(self, results: tuple[tuple[str, str], ...]) -> None:
        for method, result in results:
            self.auth_results.labels(method, result).inc()

    def dkim_signing(self, signed: int, errors: int) -> None:
        if signed:
            self.dkim_signatures.labels("signed").inc(signed)
        if errors:
            self.dkim_signatures.labels("error").inc(errors)

    def sts(self, mode: str, verdict: str) -> None:
        self.sts_verdicts.labels(mode, verdict).inc()

    def delivery(self, status: str, delay: float) -> None:
        self.deliveries.labels(status).inc()
        if status == maillog.SENT:
            self.delay.observe(delay)


class _Derived:
    """Read at each scrape: the queue by state, and the share of sessions with TLS."""

    def __init__(self, metrics: Metrics, queue: Any) -> None:
        self.metrics = metrics
        self.queue = queue

    def collect(self) -> Any:
        sessions, tls = self.metrics.ended, self.metrics.ended_with_tls
        yield GaugeMetricFamily("mta_tls_session_ratio",
                                "share of ended SMTP sessions that used TLS",
                                value=tls / sessions if sessions else 0.0)
        if self.queue is not None:
            family = GaugeMetricFamily("mta_queue_messages", "queued messages by state",
                                       labels=["state"])
            for state, count in sorted(self.queue.queue_sizes().items()):
                family.add_metric([state], count)
            yield family


class _MetricsPage(Resource):
    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Any) -> bytes:
        from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self.registry)


def metrics_service(endpoint: str, metrics: Metrics, reactor: Any) -> StreamServerEndpointService:
    """``/metrics`` on `endpoint` (a Twisted server endpoint string)."""
    root = Resource()
    root.putChild(b"metrics", _MetricsPage(metrics.registry))
    service = StreamServerEndpointService(endpoints.serverFromString(reactor, endpoint),
                                          Site(root))
    service._raiseSynchronously = True
    service.setName("metrics")
    return service


class JSONLines:
    """A log observer writing mta's events to `path`, one JSON object per line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = path.open("a", encoding="utf-8")

    def __call__(self, event: dict[str, Any]) -> None:
        namespace = event.get("log_namespace") or ""
        if not namespace.startswith("mta"):
            return
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z",
                                        time.localtime(event.get("log_time", time.time()))),
                  "level": getattr(event.get("log_level"), "name", "info"),
                  "namespace": namespace, "event": event.get("mta_event", ""),
                  "text": formatEvent(event)}
        for key, value in event.items():
            if not key.startswith("log_") and key != "mta_event":
                record.setdefault(key, value)
        self.file.write(json.dumps(record, default=str, ensure_ascii=False) + "\n")
        self.file.flush()

    def reopen(self, path: Path | None = None) -> None:
        """After logrotate moved the file (SIGHUP), or for a new ``json_file``."""
        self.file.close()
        self.path = path or self.path
        self.file = self.path.open("a", encoding="utf-8")

    def close(self) -> None:
        self.file.close()


class JSONLogService(Service):
    """``[log] json_file``: the observer while the service runs; a reload reopens the
    file (logrotate) or follows a new path, or stops writing when the key is gone."""

    name = "json-log"

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.observer: JSONLines | None = None

    def startService(self) -> None:
        super().startService()
        self._open()

    def stopService(self) -> None:
        super().stopService()
        self._close()

    def reconfigure(self, config: Any) -> None:
        self._close()
        self.path = config.log.json_file
        self._open()

    def _open(self) -> None:
        if self.path is None:
            return
        self.observer = JSONLines(self.path)
        globalLogPublisher.addObserver(self.observer)
        maillog.structured = True

    def _close(self) -> None:
        if self.observer is not None:
            globalLogPublisher.removeObserver(self.observer)
            maillog.structured = False
            self.observer.close()
            self.observer = None
