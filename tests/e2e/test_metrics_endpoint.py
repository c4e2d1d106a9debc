"""The Prometheus endpoint ([server] metrics_port), scraped over HTTP from a
running daemon."""
import datetime as dt
import socket
import time

import pytest
from conftest import NOT_IN_GEOIP, free_port, ip_in, scrape

from pcclib.geoip import GeoIP


def test_decisions_latency_blocks_and_geoip(start_daemon, db_url, geoip_path):
    metrics_port = free_port()
    daemon = start_daemon(**{"db.dbcon": db_url, "server.metrics_port": metrics_port, "policy.action": "REJECT"})
    client = daemon.client()
    answers = [client.ask("alice@example.com", ip_in(country)) for country in ("GB", "US", "FR", "DE", "SE")]
    answers.append(client.ask("bob@example.com", NOT_IN_GEOIP))
    answers.append(client.ask("", ip_in("GB")))  # not authenticated: not counted, still answered
    assert [answer.split()[0] for answer in answers] == ["DUNNO"] * 3 + ["REJECT"] * 2 + ["DUNNO"] * 2
    metrics = scrape(metrics_port)
    assert metrics[("pcc_decisions_total", (("action", "DUNNO"),))] == 5
    assert metrics[("pcc_decisions_total", (("action", "REJECT"),))] == 2
    assert metrics[("pcc_request_duration_seconds_count", ())] == 7
    assert metrics[("pcc_request_duration_seconds_bucket", (("le", "+Inf"),))] == 7
    assert metrics[("pcc_new_blocks_total", (("mode", "enforce"), ("rule", "countries")))] == 1
    assert metrics[("pcc_blocked_accounts", (("mode", "enforce"),))] == 1
    assert metrics[("pcc_blocked_accounts", (("mode", "monitor"),))] == 0
    assert metrics[("pcc_geoip_lookups_without_country_total", (("why", "not_in_database"),))] == 1
    assert metrics[("pcc_database_errors_total", ())] == 0
    built = GeoIP(geoip_path).built
    assert metrics[("pcc_geoip_build_timestamp_seconds", ())] == dt.datetime(
        built.year, built.month, built.day, tzinfo=dt.timezone.utc).timestamp()
    assert f"(metrics on port {metrics_port})" in daemon.log()


def test_the_metrics_follow_prometheus_conventions(start_daemon):
    """No _created series, label values that are words, and a build_info."""
    import urllib.request

    from pcclib.common import __version__

    metrics_port = free_port()
    daemon = start_daemon(**{"server.metrics_port": metrics_port})
    daemon.client().ask("alice@example.com", ip_in("GB"))
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert "_created" not in text
    metrics = scrape(metrics_port)
    assert metrics[("pcc_build_info", (("version", __version__),))] == 1
    ports = {dict(labels)["port"] for (name, labels) in metrics if name == "pcc_connections"}
    assert ports == {"policy"}
    assert all(" " not in value for (_name, labels) in metrics for _label, value in labels), \
        [labels for (_name, labels) in metrics if any(" " in value for _label, value in labels)]


def test_database_errors_are_counted(start_daemon):
    metrics_port = free_port()
    gone = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/test"
    daemon = start_daemon(**{"db.dbcon": gone, "server.metrics_port": metrics_port})
    assert daemon.client().ask("alice@example.com", ip_in("GB")) == "DUNNO"
    metrics = scrape(metrics_port)
    assert metrics[("pcc_database_errors_total", ())] >= 1
    assert ("pcc_blocked_accounts", (("mode", "enforce"),)) not in metrics  # unknown, not a made-up zero
    assert metrics[("pcc_decisions_total", (("action", "DUNNO"),))] == 1


def test_metrics_are_off_by_default(start_daemon):
    daemon = start_daemon()
    assert daemon.client().ask("alice@example.com", ip_in("GB")) == "DUNNO"
    assert "metrics on port" not in daemon.log()


def test_a_taken_metrics_port_is_a_clear_error(start_daemon):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(RuntimeError, match="cannot serve metrics on 127.0.0.1:"):
            start_daemon(**{"server.metrics_port": taken.getsockname()[1]})


def test_allowed_clients_guard_the_metrics_port_too(start_daemon):
    metrics_port = free_port()
    daemon = start_daemon(**{"server.metrics_port": metrics_port, "server.allowed_clients": "192.0.2.0/24"})
    with pytest.raises(OSError):  # closed before any thread or HTTP: connection reset / remote disconnected
        scrape(metrics_port)
    assert "metrics port: connection refused, not in [server] allowed_clients: 127.0.0.1" in daemon.log()
    allowed_port = free_port()
    start_daemon(**{"server.metrics_port": allowed_port, "server.allowed_clients": "127.0.0.0/8"})
    assert scrape(allowed_port)[("pcc_database_errors_total", ())] == 0


def test_the_metrics_port_is_bounded(start_daemon):
    """Silent clients hold at most the port's share of the open-file limit; a
    scrape still gets through at once (the connection that waited longest is
    cut to make room), and the daemon keeps answering."""
    metrics_port = free_port()
    daemon = start_daemon(**{"server.metrics_port": metrics_port})
    silent = [socket.create_connection(("127.0.0.1", metrics_port)) for _ in range(40)]
    try:
        started = time.monotonic()
        assert scrape(metrics_port)[("pcc_database_errors_total", ())] == 0
        assert time.monotonic() - started < 1.0
        assert daemon.client().ask("alice@example.com", ip_in("GB")) == "DUNNO"
        assert "metrics port: its share of the open-file limit reached: cut the connection that waited" in daemon.log()
    finally:
        for sock in silent:
            sock.close()

def test_every_metric_the_alert_rules_and_the_dashboard_use_is_exported(start_daemon, sqlite_url):
    """A renamed metric breaks the build, not the pager (contrib/)."""
    import re
    import urllib.request

    from conftest import ROOT

    metrics_port, dovecot_port = free_port(), free_port()
    start_daemon(**{"db.dbcon": sqlite_url, "server.metrics_port": metrics_port, "dovecot.policy_port": dovecot_port,
                    "dovecot.api_header": "Authorization: Basic cGNjOm1ldHJpY3M=",
                    "limits.messages_per_hour": "1000"})  # pcc_volume_shared is there with limits on
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        exposition = response.read().decode()
    exported = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", exposition, re.M):
        exported |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else {name}
    used = set()
    for path in ("contrib/prometheus/pcc-alerts.yml", "contrib/grafana/pcc-dashboard.json"):
        used |= set(re.findall(r"\bpcc_[a-z_]+[a-z]", (ROOT / path).read_text()))
    used -= {"pcc_alerts"}  # the rules file's own name, in its comments
    assert len(used) >= 15
    assert sorted(used - exported) == []
