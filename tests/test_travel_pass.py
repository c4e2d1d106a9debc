"""Travel passes: pcc.py --allow LOGIN --country FR,DE --days 14."""
import datetime as dt
import json

import pytest
from conftest import counted_request as request
from conftest import ip_in, pcc_command, seen_an_hour_before, wait_until_visible

import pcc

NOW = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.timezone.utc)
HOUR = dt.timedelta(hours=1)
DAY = dt.timedelta(days=1)


@pytest.fixture
def settings(make_settings):
    return make_settings(**{"policy.action": "REJECT", "policy.reason": "blocked"})


# --- the rule, pure -----------------------------------------------------------


def test_a_passed_country_does_not_count(settings):
    history = pcc.AccountHistory(sightings=seen_an_hour_before(NOW, "GB", "US", "DE"), travel_passes={"FR": NOW + DAY})
    decision = pcc.decide(request("FR"), history, settings, NOW)
    assert decision.action == "DUNNO" and not decision.counted and not decision.record_sighting
    assert decision.reason == "not counted: travel pass for FR until 2026-11-26 12:00 UTC"


def test_sightings_in_passed_countries_do_not_count_either(settings):
    # FR was seen before the pass was granted: while the pass holds, it does not count
    history = pcc.AccountHistory(sightings=seen_an_hour_before(NOW, "GB", "US", "FR"), travel_passes={"FR": NOW + DAY})
    decision = pcc.decide(request("DE"), history, settings, NOW)
    assert decision.action == "DUNNO" and [s.country for s in decision.countries] == ["GB", "US", "DE"]


def test_an_expired_pass_counts_again(settings):
    history = pcc.AccountHistory(sightings=seen_an_hour_before(NOW, "GB", "US", "DE"), travel_passes={"FR": NOW - HOUR})
    assert pcc.decide(request("FR"), history, settings, NOW).action == "REJECT blocked"


# --- storage, on each database -------------------------------------------------------


def test_passes_are_stored_replaced_and_ended(db_url):
    store = pcc.Store(db_url)
    store.create_tables()
    try:
        store.grant_travel_pass("alice@example.com", ["DE", "FR"], NOW, NOW + 14 * DAY, "root")
        store.grant_travel_pass("bob@example.com", ["JP"], NOW, NOW + DAY, "root")
        assert store.load_history("alice@example.com", NOW - DAY).travel_passes == {"DE": NOW + 14 * DAY,
                                                                                     "FR": NOW + 14 * DAY}
        store.grant_travel_pass("alice@example.com", ["FR"], NOW + DAY, NOW + 2 * DAY, "admin2")
        passes = {p.country: p for p in store.travel_passes("alice@example.com")}
        assert passes["FR"].expires_at == NOW + 2 * DAY and passes["FR"].granted_by == "admin2"
        assert passes["DE"].expires_at == NOW + 14 * DAY
        # a pass that ended before the window began is not loaded at all
        assert store.load_history("alice@example.com", NOW + 3 * DAY).travel_passes == {"DE": NOW + 14 * DAY}
        assert store.load_history("bob@example.com", NOW - DAY).travel_passes == {"JP": NOW + DAY}
    finally:
        store.dispose()


# --- the admin command with a running daemon ----------------------------------------


def test_allow_a_trip(start_daemon, db_url, smtp_sink):
    daemon = start_daemon(**{"db.dbcon": db_url, "policy.action": "REJECT", "mail.notice": "admin@example.com",
                             "mail.mailsrv": "127.0.0.1", "mail.mailport": smtp_sink.port})
    client = daemon.client()
    assert client.ask("alice@example.com", ip_in("GB")) == "DUNNO"
    output = pcc_command(daemon.config_path, "--allow", "Alice@Example.com", "--country", "fr, de,SE",
                         "--days", "14").stdout
    assert output.startswith("travel pass for alice@example.com: DE, FR, SE do not count until ")
    (mail,) = [m for _r, m in smtp_sink.wait_for(1)]
    assert mail["Subject"] == "pcc: travel pass for alice@example.com (DE, FR, SE)"
    wait_until_visible()  # the daemon had alice in memory
    # a tour of six countries, three of them passed: still only three count
    answers = [client.ask("alice@example.com", ip_in(country)) for country in ("FR", "DE", "SE", "US", "JP")]
    assert answers == ["DUNNO"] * 5
    assert "reason=not counted: travel pass for FR until" in daemon.log()
    assert client.ask("alice@example.com", ip_in("BR")).startswith("REJECT")  # a fourth counted country
    shown = pcc_command(daemon.config_path, "-s", "alice@example.com").stdout
    assert "travel pass FR: active until" in shown and "by " in shown
    passes = json.loads(pcc_command(daemon.config_path, "-s", "alice@example.com", "--json").stdout)["travel_passes"]
    assert [(p["country"], p["active"]) for p in passes] == [("DE", True), ("FR", True), ("SE", True)]
    # another account is not covered by alice's pass
    for country in ("GB", "US", "JP"):
        client.ask("bob@example.com", ip_in(country))
    assert client.ask("bob@example.com", ip_in("FR")).startswith("REJECT")


def test_end_a_pass_early(start_daemon, db_url):
    daemon = start_daemon(**{"db.dbcon": db_url, "policy.action": "REJECT"})
    client = daemon.client()
    pcc_command(daemon.config_path, "--allow", "alice@example.com", "--country", "FR", "--days", "3")
    for country in ("GB", "US", "JP", "FR"):
        assert client.ask("alice@example.com", ip_in(country)) == "DUNNO"
    output = pcc_command(daemon.config_path, "--allow", "alice@example.com", "--country", "FR", "--days", "0").stdout
    assert output.strip() == "travel pass of alice@example.com for FR ended"
    wait_until_visible()
    assert client.ask("alice@example.com", ip_in("FR")).startswith("REJECT")
    assert "travel pass FR: expired" in pcc_command(daemon.config_path, "-s", "alice@example.com").stdout


@pytest.mark.parametrize("arguments, code, message", [
    (["--allow", "a@example.com", "--days", "3"], 2, "--allow needs --country and --days"),
    (["--allow", "a@example.com", "--country", "FR"], 2, "--allow needs --country and --days"),
    (["-l", "--country", "FR"], 2, "--country goes with --allow"),
    (["--allow", "a@example.com", "--country", "XX,FR", "--days", "3"], 1, "XX is not one"),
    (["--allow", "a@example.com", "--country", ",", "--days", "3"], 1, "give ISO 3166 two-letter country codes"),
    (["--allow", "a@example.com", "--country", "FR", "--days", "400"], 1, "a travel pass lasts 0 to 366 days"),
    (["--allow", "a@example.com", "--country", "FR", "--days", "-1"], 1, "a travel pass lasts 0 to 366 days"),
    (["--allow", "a b", "--country", "FR", "--days", "1"], 1, "'a b' is not a login"),
])
def test_bad_allow_arguments(tmp_path, arguments, code, message):
    from conftest import write_config

    config = write_config(tmp_path, {"db.dbcon": f"sqlite:///{tmp_path}/pcc.sqlite3"})
    assert message in pcc_command(config, *arguments, expect=code).stderr


def test_a_pass_for_an_account_never_seen_is_shown(tmp_path):
    from conftest import write_config

    config = write_config(tmp_path, {"db.dbcon": f"sqlite:///{tmp_path}/pcc.sqlite3"})
    pcc_command(config, "--allow", "new@example.com", "--country", "JP", "--days", "7")
    shown = pcc_command(config, "-s", "new@example.com").stdout
    assert shown.startswith("new@example.com: not blocked") and "travel pass JP: active until" in shown
    assert "not blocked; nothing to unblock" in pcc_command(config, "-u", "new@example.com").stdout
