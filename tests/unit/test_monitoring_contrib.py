"""contrib/: the Prometheus alert rules pass the real promtool's checks and
its unit tests (each alert fires when it should and stays quiet otherwise),
and the Grafana dashboard is one importable dashboard whose panels docs/operations.md
lists.  (That every metric they use is one pcc exports is tested against a
running daemon in tests/e2e/test_metrics.py.)"""
import json
import re
import shutil
import subprocess

import pytest
from conftest import ROOT, unavailable

RULES = ROOT / "contrib" / "prometheus" / "pcc-alerts.yml"
DASHBOARD = ROOT / "contrib" / "grafana" / "pcc-dashboard.json"
MX1 = {"job": "pcc", "instance": "mx1:9998"}


def series(name: str, values: str, **labels) -> dict:
    every = {**MX1, **labels}
    inside = ",".join(f'{key}="{value}"' for key, value in every.items())
    return {"series": f"{name}{{{inside}}}", "values": values}


# Each alert: the series that make it fire (and when), and series that look
# alike but must leave it quiet.  Labels: the alert's own, besides severity.
SCENARIOS = {
    "PccDown": {
        "fires": ([series("up", "1 1 0 0 0 0 0")], "6m", MX1),
        "quiet": [([series("up", "1 1 0 0 1 1 1")], "6m"),  # a restart: down for less than 2 minutes
                  ([series("up", "1 1 0 0 0 0 0")], "3m")],  # not yet 2 minutes
    },
    "PccNoDecisions": {
        # traffic for 25 hours, then none for 100 minutes
        "fires": ([series("pcc_decisions_total", "0+10x1500 15000x100", action="DUNNO")], "1590m",
                  {"instance": "mx1:9998"}),
        "quiet": [([series("pcc_decisions_total", "0+10x1600", action="DUNNO")], "1590m"),
                  ([series("pcc_decisions_total", "0x1600", action="DUNNO")], "1590m")],  # never had traffic
    },
    "PccDatabaseFailing": {
        "fires": ([series("pcc_database_up", "1 1 0 0 0"), series("pcc_database_failing_seconds", "0 0 30 90 150")],
                  "3m", MX1),
        "quiet": [([series("pcc_database_up", "1 1 0 1 1"), series("pcc_database_failing_seconds", "0 0 30 0 0")],
                   "4m")],
    },
    "PccDatabaseErrorAnswers": {
        "fires": ([series("pcc_database_error_answers_total", "0 0 0 5 5 5 5 5 5 5 5 5")], "4m", MX1),
        "quiet": [([series("pcc_database_error_answers_total", "0 0 0 5 5 5 5 5 5 5 5 5")], "11m"),
                  ([series("pcc_database_error_answers_total", "0x11")], "4m")],
    },
    "PccSpooledBlocksNotWritten": {
        "fires": ([series("pcc_spooled_blocks", "0 2x15")], "12m", MX1),
        "quiet": [([series("pcc_spooled_blocks", "0 2 2 0x12")], "12m"), ([series("pcc_spooled_blocks", "0 2x15")],
                                                                         "5m")],
    },
    "PccBlocksLostByTheDatabase": {
        "fires": ([series("pcc_blocks_restored_total", "0 0 3 3 3 3")], "4m", MX1),
        "quiet": [([series("pcc_blocks_restored_total", "0 0 3x20")], "20m"),  # long ago
                  ([series("pcc_blocks_restored_total", "0x10")], "4m")],
    },
    "PccUnwrittenSightingsGrowing": {
        "fires": ([series("pcc_unwritten_sightings", "0+500x20")], "12m", MX1),
        "quiet": [([series("pcc_unwritten_sightings", "5000x20")], "12m"),  # many, but not growing
                  ([series("pcc_unwritten_sightings", "0+50x20")], "12m")],  # growing, but few
    },
    "PccGeoipDataStale": {
        "fires": ([series("pcc_geoip_build_timestamp_seconds", "-5270400x200")], "2h", MX1),  # 61 days
        "quiet": [([series("pcc_geoip_build_timestamp_seconds", "-4320000x200")], "2h")],  # 50 days
    },
    "PccGeoipDataFromTheFuture": {
        "fires": ([series("pcc_geoip_build_timestamp_seconds", "172800x10")], "5m", MX1),
        "quiet": [([series("pcc_geoip_build_timestamp_seconds", "0x10")], "5m")],
    },
    "PccNetworkListStale": {
        "fires": ([series("pcc_network_list_age_seconds", "172000+60x30", list="tor"),
                   series("pcc_network_list_max_age_seconds", "172800x30", list="tor")], "30m",
                  {**MX1, "list": "tor"}),
        "quiet": [([series("pcc_network_list_age_seconds", "0+60x30", list="tor"),
                    series("pcc_network_list_max_age_seconds", "172800x30", list="tor")], "30m"),
                  ([series("pcc_network_list_age_seconds", "172000+60x30", list="tor"),
                    series("pcc_network_list_max_age_seconds", "172800x30", list="tor")], "20m")],
    },
    "PccBlockBurst": {
        "fires": ([series("pcc_new_blocks_total", "0 0 4 8 12", rule="countries", mode="enforce"),
                   series("pcc_new_blocks_total", "0 0 4 8 12", rule="countries", mode="enforce", instance="mx2:9998")],
                  "4m", {}),
        "quiet": [([series("pcc_new_blocks_total", "0 0 1 2 3", rule="countries", mode="enforce"),
                    series("pcc_new_blocks_total", "0 1 1 2 2", rule="travel", mode="enforce")], "4m")],
    },
    "PccVolumeNotShared": {
        "fires": ([series("pcc_volume_shared", "1 1 0x10")], "8m", MX1),
        "quiet": [([series("pcc_volume_shared", "1 1 0 0 1x8")], "8m"),  # a short failure
                  ([series("pcc_volume_shared", "1x10")], "8m")],
    },
    "PccNotificationsUnsent": {
        "fires": ([series("pcc_unsent_notifications", "2x20"), series("pcc_oldest_unsent_notification_seconds",
                                                                      "0+60x20")], "12m", MX1),
        "quiet": [([series("pcc_unsent_notifications", "2x20"), series("pcc_oldest_unsent_notification_seconds",
                                                                       "0+60x20")], "5m"),
                  ([series("pcc_unsent_notifications", "0x20"), series("pcc_oldest_unsent_notification_seconds",
                                                                       "0x20")], "12m")],
    },
}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        unavailable("promtool (Debian's prometheus package)")
    return path


def alert_rules() -> dict:
    yaml = pytest.importorskip("yaml")
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"]}


def rendered(text: str, labels: dict) -> str:
    """An annotation as Prometheus renders it (the rules use $labels.instance only)."""
    assert re.sub(r"\{\{ \$labels\.instance \}\}", "", text).count("{{") == 0, text
    return text.replace("{{ $labels.instance }}", labels.get("instance", "<no value>"))


def unit_tests(rules: dict, names, evaluation_interval: str = "1m") -> dict:
    """promtool's test file: a test per scenario of the alerts `names`."""
    tests = []
    for name in names:
        scenario = SCENARIOS[name]
        rule = rules[name]
        input_series, at, labels = scenario["fires"]
        expected = {**labels, **rule["labels"]}
        tests.append({"interval": "1m", "input_series": input_series, "alert_rule_test": [{
            "eval_time": at, "alertname": name, "exp_alerts": [{
                "exp_labels": expected,
                "exp_annotations": {key: rendered(text, labels) for key, text in rule["annotations"].items()}}]}]})
        for input_series, at in scenario["quiet"]:
            tests.append({"interval": "1m", "input_series": input_series,
                          "alert_rule_test": [{"eval_time": at, "alertname": name, "exp_alerts": []}]})
    return {"rule_files": [str(RULES)], "evaluation_interval": evaluation_interval, "tests": tests}


# Alerts over a day of series are evaluated every 5 minutes (promtool evaluates
# every rule at each step up to the last eval_time); the others every minute.
DAY_LONG = ("PccNoDecisions",)


def run_promtool_tests(tmp_path, tests: dict, name: str) -> subprocess.CompletedProcess:
    path = tmp_path / name  # JSON is YAML to promtool
    path.write_text(json.dumps(tests, indent=1))
    return subprocess.run([promtool(), "test", "rules", str(path)], capture_output=True, text=True, timeout=120)


def test_promtool_accepts_the_rules():
    result = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(SCENARIOS)} rules found" in result.stdout


def test_every_alert_fires_when_it_should_and_stays_quiet_otherwise(tmp_path):
    rules = alert_rules()
    assert sorted(rules) == sorted(SCENARIOS)
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert rule["annotations"]["summary"] and len(rule["annotations"]["description"]) > 100, name
    minutes = [name for name in SCENARIOS if name not in DAY_LONG]
    for name, tests in (("minutes.test.json", unit_tests(rules, minutes)),
                        ("days.test.json", unit_tests(rules, DAY_LONG, evaluation_interval="5m"))):
        result = run_promtool_tests(tmp_path, tests, name)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
        assert "SUCCESS" in result.stdout


def test_promtool_catches_an_alert_that_does_not_fire(tmp_path):
    """The unit tests can fail: an expectation the rules do not meet is refused."""
    broken = unit_tests(alert_rules(), ["PccDown"])
    quiet_down = next(test for test in broken["tests"] if not test["alert_rule_test"][0]["exp_alerts"])
    quiet_down["alert_rule_test"][0]["exp_alerts"] = [{"exp_labels": {**MX1, "severity": "critical"}}]
    assert run_promtool_tests(tmp_path, broken, "broken.test.json").returncode != 0
    assert run_promtool_tests(tmp_path, unit_tests(alert_rules(), ["PccDown"]), "whole.test.json").returncode == 0


def test_the_dashboard_is_one_importable_dashboard():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["type"] == "query" and "pcc_" in variables["instance"]["definition"]
    panels = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
    assert len(panels) >= 12
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and all('instance=~"$instance"' in target["expr"] for target in panel["targets"])
        assert panel["description"], panel["title"]


def test_the_operations_guide_lists_the_panels_and_the_alerts():
    readme = (ROOT / "docs" / "operations.md").read_text()
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert f"**{panel['title']}**" in readme, panel["title"]
    for name in SCENARIOS:
        assert f"`{name}`" in readme, name
