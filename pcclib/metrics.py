"""The optional Prometheus endpoint ([server] metrics_port): counters the
service feeds as it answers, and gauges read at scrape time.
"""
from __future__ import annotations

import datetime as dt
import socket
import socketserver
from typing import Callable, Optional

from .common import UTC, __version__, start_thread
from .config import MONITOR_ACTION
from .ports import BoundedHttpHandler, BoundedHttpPort, RateLimitedWarning, RequestTooLarge
from .protocol import client_allowed

# A scraper that sends nothing for this long (seconds) is disconnected.
METRICS_TIMEOUT = 10.0

# The ports as the label of pcc_connections names them: words, no spaces.
PORT_LABELS = {"policy port": "policy", "policy socket": "policy_socket", "dovecot policy port": "dovecot",
               "metrics port": "metrics"}


class Metrics:
    """The Prometheus metrics ([server] metrics_port).  With metrics off every
    method returns at once and prometheus_client is not even imported."""

    def __init__(self, enabled: bool = False):
        """Off unless enabled; the gauges read at scrape time come with
        report_from(), once what they read exists."""
        self.enabled = enabled
        if not enabled:
            return
        from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics

        disable_created_metrics()  # a counter's _created series tells nothing its process_start_time does not
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
        self._restored = Counter("pcc_blocks_restored", "Blocks the database lost (no unblock recorded there: a "
                                 "failover to a standby behind, a restore from a backup), written again",
                                 registry=self.registry)
        self._database_errors = Counter("pcc_database_errors", "Database operations that failed",
                                        registry=self.registry)
        self._no_country = Counter("pcc_geoip_lookups_without_country", "Counted requests whose client address "
                                   "has no country, by why", ["why"], registry=self.registry)
        self._dovecot = Counter("pcc_dovecot_requests", "Dovecot auth policy requests, by command (allow, report; "
                                "- when refused before it was read) and status (allowed, refused, not_counted, "
                                "unauthorised, bad_request)", ["command", "status"], registry=self.registry)
        self._responses = Counter("pcc_block_responses", "What followed blocks beyond the answer, by channel "
                                  "(sessions: Dovecot sessions ended or failed; queue: queued mail held or "
                                  "failed; webhook: delivered, failed tries, dropped events)", ["channel", "outcome"],
                                  registry=self.registry)
        self._network_requests = Counter("pcc_network_list_requests", "Requests from a client address on a "
                                         "network list ([list <label>]), by list", ["list"], registry=self.registry)
        self._network_blocks = Counter("pcc_network_list_blocks", "New blocks (or monitor-mode flags) whose "
                                       "request came from an address on a network list, by list", ["list"],
                                       registry=self.registry)
        self._limit_hits = Counter("pcc_limit_hits", "Requests over a [limits] volume limit, by limit "
                                   "(messages_per_hour...) and what they got (block, defer, notify)",
                                   ["limit", "action"], registry=self.registry)

    def report_from(self, state: Callable[[], dict], count_blocked: Callable[[], Optional[dict]]) -> None:
        """The gauges: state, the daemon's snapshot (report.SelfReport.state);
        count_blocked, the blocked list's size by mode, None when it cannot be had."""
        if self.enabled:
            self.registry.register(_StateCollector(state, count_blocked))

    def text(self) -> str:
        """This process's metrics in Prometheus' text format."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()

    def serve(self, host: str, port: int, allowed_clients: Callable[[], tuple], cap: int,
              adopt: Optional[socket.socket] = None, exposition: Optional[Callable[[], str]] = None) -> None:
        """Serve /metrics from a thread of its own to at most `cap` clients at
        once; `allowed_clients()` (the setting in force, reloads included)
        guards it as it guards the policy port.  With several worker processes:
        `adopt`, the socket the master bound for this one, and `exposition`,
        the whole daemon's metrics (this process's alone without it)."""
        from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

        from prometheus_client import make_wsgi_app

        class MetricsServer(BoundedHttpPort, socketserver.ThreadingMixIn, WSGIServer):
            port_name = "metrics port"
            daemon_threads = True
            request_queue_size = 64  # a flood waits in the backlog briefly, then is cut or refused
            address_family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
            refused = RateLimitedWarning("metrics port: connection refused, not in [server] allowed_clients")

            def verify_request(self, request, client_address) -> bool:
                if client_allowed(client_address[0], allowed_clients()):
                    return True
                self.refused(client_address[0])
                return False

        class MetricsHandler(BoundedHttpHandler, WSGIRequestHandler):
            idle_timeout = METRICS_TIMEOUT  # a client that sends nothing does not keep its thread

            def handle(self) -> None:  # WSGIRequestHandler's: one request a connection
                self.rfile.next_request()
                try:
                    super().handle()
                except (RequestTooLarge, OSError) as error:
                    self.server.client_fault(self.client_address[0], error)
                finally:
                    self.server.answering(self.request, False)

        MetricsServer.adopted = adopt
        server = MetricsServer((host, port), MetricsHandler)
        server.init_bounds(cap, "its share of the open-file limit")
        server.set_app(make_wsgi_app(self.registry) if exposition is None else _exposition_app(exposition))
        start_thread(server.serve_forever, "pcc-metrics")

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

    def responded(self, channel: str, outcome: str) -> None:
        """What followed a block: channel "sessions" (ended, failed) or "webhook"
        (delivered, failed, dropped)."""
        if self.enabled:
            self._responses.labels(channel, outcome).inc()

    def blocks_restored(self, count: int) -> None:
        if self.enabled and count:
            self._restored.inc(count)

    def database_failed(self) -> None:
        if self.enabled:
            self._database_errors.inc()

    def no_country(self, why: str) -> None:
        if self.enabled:
            self._no_country.labels(why.replace(" ", "_")).inc()  # a label value is a word: not_in_database

    def on_network_list(self, label: str) -> None:
        if self.enabled:
            self._network_requests.labels(label).inc()

    def network_block(self, label: str) -> None:
        if self.enabled:
            self._network_blocks.labels(label).inc()

    def limit_hit(self, limit: str, action: str) -> None:
        if self.enabled:
            self._limit_hits.labels(limit, action.lower()).inc()

    def dovecot(self, command: str, status: str) -> None:
        if self.enabled:
            self._dovecot.labels(command, status).inc()


def _exposition_app(exposition: Callable[[], str]):
    """A WSGI app answering /metrics with `exposition()`."""
    from prometheus_client import CONTENT_TYPE_LATEST

    def app(environ, start_response):
        if environ.get("PATH_INFO", "/") not in ("/", "/metrics"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found\n"]
        body = exposition().encode()
        start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST), ("Content-Length", str(len(body)))])
        return [body]

    return app


class _StateCollector:
    """Metrics read at scrape time from the service's state snapshot, and the
    blocked list's size (one COUNT query)."""

    def __init__(self, state: Callable[[], dict], count_blocked: Callable[[], Optional[dict]]):
        self.state = state
        self.count_blocked = count_blocked

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        state = self.state()
        yield GaugeMetricFamily("pcc_database_up", "1 while this daemon can use its database, 0 while it decides "
                                "without it", value=0 if state["failing"] else 1)
        yield GaugeMetricFamily("pcc_database_failing_seconds", "How long the database has been failing (0 when "
                                "it is not)", value=state["failing_seconds"])
        yield CounterMetricFamily("pcc_database_error_answers", "Requests answered db_error_action because the "
                                  "database failed", value=state["error_answers_total"])
        yield GaugeMetricFamily("pcc_spooled_blocks", "Blocks waiting in the spool for the database",
                                value=state["spooled_blocks"])
        yield GaugeMetricFamily("pcc_unwritten_sightings", "Sightings counted but not yet in the database "
                                "(written every 50 ms; they pile up while it fails)",
                                value=state["unwritten_sightings"])
        yield GaugeMetricFamily("pcc_clock_offset_seconds", "How far the database's clock, which pcc keeps, is "
                                "ahead of this host's (0 within 0.2 s)", value=state["clock_offset"])
        yield GaugeMetricFamily("pcc_webhook_events_waiting", "Events not yet taken by a webhook receiver "
                                "(retried for 2 hours)", value=state.get("webhooks_waiting", 0))
        yield GaugeMetricFamily("pcc_unsent_notifications", "Mails to the administrators not sent yet (retried "
                                "while the daemon runs)", value=state["unsent_notifications"])
        yield GaugeMetricFamily("pcc_oldest_unsent_notification_seconds", "How long the oldest unsent mail to the "
                                "administrators has waited (0 when none waits)", value=state["oldest_unsent_seconds"])
        family = GaugeMetricFamily("pcc_connections", "Open connections of each port (policy, dovecot), being "
                                   "answered (never cut) or waiting for their client", labels=["port", "state"])
        for port, states in state.get("connections", {}).items():
            for name, count in states.items():
                family.add_metric([PORT_LABELS.get(port, port), name], count)
        yield family
        family = GaugeMetricFamily("pcc_build_info", "Always 1: the version of pcc that answers",
                                   labels=["version"])
        family.add_metric([__version__], 1)
        yield family
        operations = state["operations"]
        family = CounterMetricFamily("pcc_database_operations", "What the daemon asked of the database: "
                                     "history reads, sighting writes (one transaction per batch), block "
                                     "transactions", labels=["operation"])
        for operation in ("history_read", "sighting_write", "block_transaction"):
            family.add_metric([operation], operations.get(operation, 0))
        yield family
        built = state["geoip_built"]
        if built is not None:
            yield GaugeMetricFamily("pcc_geoip_build_timestamp_seconds", "When the GeoIP data in use was built",
                                    value=dt.datetime(built.year, built.month, built.day, tzinfo=UTC).timestamp())
        sharing = state.get("volume_sharing", "off")
        if sharing != "off":
            yield GaugeMetricFamily("pcc_volume_shared", "1 while this daemon's [limits] counts reach the other "
                                    "daemons through the database, 0 while each limits on its own",
                                    value=1 if sharing == "ok" else 0)
        yield from _list_metrics(state.get("network_lists", {}))
        counts = self.count_blocked()
        if counts is None:
            return
        family = GaugeMetricFamily("pcc_blocked_accounts", "Accounts on the blocked list, by mode", labels=["mode"])
        family.add_metric(["enforce"], counts.get("enforce", 0))
        family.add_metric(["monitor"], counts.get("monitor", 0))
        yield family


def _list_metrics(lists: dict):
    from prometheus_client.core import GaugeMetricFamily

    ranges = GaugeMetricFamily("pcc_network_list_entries", "Entries (addresses, CIDR ranges) of each network list "
                               "in use (absent while its file has never been there)", labels=["list"])
    ages = GaugeMetricFamily("pcc_network_list_age_seconds", "How old the file of each network list in use is",
                             labels=["list"])
    most = GaugeMetricFamily("pcc_network_list_max_age_seconds", "Each network list's max_age_days, in seconds",
                             labels=["list"])
    refused = GaugeMetricFamily("pcc_network_list_file_refused", "1 while the file of a network list cannot be "
                                "used (refused or gone: the list is off, or keeps the ranges it had)", labels=["list"])
    for label, (count, age_days, max_age_days, problem) in lists.items():
        refused.add_metric([label], 1 if problem else 0)
        most.add_metric([label], max_age_days * 86400)
        if count is not None:
            ranges.add_metric([label], count)
            ages.add_metric([label], age_days * 86400)
    yield ranges
    yield ages
    yield most
    yield refused
