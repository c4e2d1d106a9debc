"""The optional Prometheus endpoint ([server] metrics_port): counters the
service feeds as it answers, and gauges read at scrape time.
"""
from __future__ import annotations

import datetime as dt
import socket
import socketserver
import threading
from typing import TYPE_CHECKING, Optional

from sqlalchemy import exc as sa_exc

from .common import UTC, first_line, log
from .config import MONITOR_ACTION
from .protocol import client_allowed

if TYPE_CHECKING:  # annotations only: the service comes after its metrics
    from .service import PolicyService

# The metrics port serves a scraper or two: this many connections at once,
# each done within this many seconds.
METRICS_CONNECTIONS = 8
METRICS_TIMEOUT = 10.0


class Metrics:
    """The Prometheus metrics ([server] metrics_port).  With metrics off every
    method returns at once and prometheus_client is not even imported."""

    def __init__(self, service: Optional["PolicyService"] = None):
        self.enabled = service is not None
        if not self.enabled:
            return
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self._decisions = Counter("pcc_decisions", "Answers given to Postfix, by action", ["action"],
                                  registry=self.registry)
        self._decisions_by_action: dict = {}
        self._new_blocks = Counter("pcc_new_blocks", "Accounts newly blocked, or flagged in monitor mode, by "
                                   "rule and mode", ["rule", "mode"], registry=self.registry)
        self._journeys = Counter("pcc_impossible_travel", "Impossible journeys noticed", registry=self.registry)
        self._latency = Histogram("pcc_request_duration_seconds", "Time from a whole request to its answer",
                                  buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.8,
                                           1.0, 2.5), registry=self.registry)
        self._database_errors = Counter("pcc_database_errors", "Database operations that failed",
                                        registry=self.registry)
        self._no_country = Counter("pcc_geoip_lookups_without_country", "Counted requests whose client address "
                                   "has no country, by why", ["why"], registry=self.registry)
        self._dovecot = Counter("pcc_dovecot_requests", "Dovecot auth policy requests, by command (allow, report; "
                                "- when refused before it was read) and status (allowed, refused, not_counted, "
                                "unauthorised, bad_request)", ["command", "status"], registry=self.registry)
        self.registry.register(_StateCollector(service))

    def serve(self, host: str, port: int, allowed_clients: tuple) -> None:
        """Serve /metrics from a thread of its own; `allowed_clients` (when set)
        guards it as it guards the policy port."""
        from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

        from prometheus_client import make_wsgi_app

        app = make_wsgi_app(self.registry)
        scrapes = threading.BoundedSemaphore(METRICS_CONNECTIONS)

        class MetricsServer(socketserver.ThreadingMixIn, WSGIServer):
            """Bounded like the policy port: clients checked before a thread
            is started, a few connections at a time, each with a time limit."""

            daemon_threads = True
            address_family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]

            def verify_request(self, request, client_address) -> bool:
                if not client_allowed(client_address[0], allowed_clients):
                    log.warning("metrics connection from %s refused: not in [server] allowed_clients",
                                client_address[0])
                    return False
                if not scrapes.acquire(blocking=False):
                    log.warning("metrics connection from %s refused: %d already open", client_address[0],
                                METRICS_CONNECTIONS)
                    return False
                return True

            def process_request_thread(self, request, client_address) -> None:
                try:
                    super().process_request_thread(request, client_address)
                finally:
                    scrapes.release()

        class QuietHandler(WSGIRequestHandler):
            timeout = METRICS_TIMEOUT  # a client that sends nothing does not keep its thread

            def log_message(self, *_arguments) -> None:  # one line per scrape is noise
                pass

        server = make_server(host, port, app, MetricsServer, QuietHandler)
        threading.Thread(target=server.serve_forever, name="pcc-metrics", daemon=True).start()

    def answered(self, reply: bytes, seconds: float) -> None:
        """A reply went to Postfix `seconds` after its request began."""
        if not self.enabled:
            return
        action = reply[len(b"action="):].split(maxsplit=1)[0]
        counter = self._decisions_by_action.get(action)
        if counter is None:  # labels() takes a lock and builds a key: once per action
            counter = self._decisions_by_action.setdefault(action, self._decisions.labels(action.decode()))
        counter.inc()
        self._latency.observe(seconds)

    def new_block(self, rule: str, action: str) -> None:
        if self.enabled:
            self._new_blocks.labels(rule, "monitor" if action == MONITOR_ACTION else "enforce").inc()

    def journey(self) -> None:
        if self.enabled:
            self._journeys.inc()

    def database_failed(self) -> None:
        if self.enabled:
            self._database_errors.inc()

    def no_country(self, why: str) -> None:
        if self.enabled:
            self._no_country.labels(why).inc()

    def dovecot(self, command: str, status: str) -> None:
        if self.enabled:
            self._dovecot.labels(command, status).inc()


class _StateCollector:
    """Metrics read at scrape time: the blocked list (one COUNT query) and the
    GeoIP data in use."""

    def __init__(self, service: "PolicyService"):
        self.service = service

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        state = self.service.database_state()
        yield GaugeMetricFamily("pcc_database_up", "1 while this daemon can use its database, 0 while it decides "
                                "without it", value=0 if state["failing"] else 1)
        yield GaugeMetricFamily("pcc_database_failing_seconds", "How long the database has been failing (0 when "
                                "it is not)", value=state["failing_seconds"])
        yield CounterMetricFamily("pcc_database_error_answers", "Requests answered db_error_action because the "
                                  "database failed", value=state["error_answers_total"])
        yield GaugeMetricFamily("pcc_spooled_blocks", "Blocks waiting in the spool for the database",
                                value=self.service.journal.blocks_waiting())
        yield GaugeMetricFamily("pcc_unwritten_sightings", "Sightings counted but not yet in the database "
                                "(written every 50 ms; they pile up while it fails)",
                                value=self.service.sightings.waiting())
        operations = self.service.store.operation_counts()
        family = CounterMetricFamily("pcc_database_operations", "What the daemon asked of the database: "
                                     "history reads, sighting writes (one transaction per batch), block "
                                     "transactions", labels=["operation"])
        for operation in ("history_read", "sighting_write", "block_transaction"):
            family.add_metric([operation], operations.get(operation, 0))
        yield family
        built = self.service.geoip.built
        if built is not None:
            yield GaugeMetricFamily("pcc_geoip_build_timestamp_seconds", "When the GeoIP data in use was built",
                                    value=dt.datetime(built.year, built.month, built.day, tzinfo=UTC).timestamp())
        try:
            counts = self.service.store.count_blocked()
        except sa_exc.SQLAlchemyError as error:
            self.service.metrics.database_failed()
            log.warning("metrics: cannot count blocked accounts: %s", first_line(error))
            return
        family = GaugeMetricFamily("pcc_blocked_accounts", "Accounts on the blocked list, by mode", labels=["mode"])
        family.add_metric(["enforce"], counts.get("enforce", 0))
        family.add_metric(["monitor"], counts.get("monitor", 0))
        yield family
