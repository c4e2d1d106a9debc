"""Travel passes as rules and storage: a passed country does not count, nor do
its earlier sightings, an expired pass counts again; passes are stored,
replaced and ended on every database.  The --allow command is e2e/test_allow.py."""
import datetime as dt

import pytest
from conftest import counted_request as request
from conftest import seen_an_hour_before

from pcclib.decision import AccountHistory, decide
from pcclib.storage import AdminStore

NOW = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.timezone.utc)


HOUR = dt.timedelta(hours=1)


DAY = dt.timedelta(days=1)


@pytest.fixture
def settings(make_settings):
    return make_settings(**{"policy.action": "REJECT", "policy.reason": "blocked"})


# --- the rule, pure -----------------------------------------------------------


def test_a_passed_country_does_not_count(settings):
    history = AccountHistory(sightings=seen_an_hour_before(NOW, "GB", "US", "DE"), travel_passes={"FR": NOW + DAY})
    decision = decide(request("FR"), history, settings, NOW)
    assert decision.action == "DUNNO" and not decision.counted and not decision.record_sighting
    assert decision.reason == "not counted: travel pass for FR until 2026-11-26 12:00 UTC"


def test_sightings_in_passed_countries_do_not_count_either(settings):
    # FR was seen before the pass was granted: while the pass holds, it does not count
    history = AccountHistory(sightings=seen_an_hour_before(NOW, "GB", "US", "FR"), travel_passes={"FR": NOW + DAY})
    decision = decide(request("DE"), history, settings, NOW)
    assert decision.action == "DUNNO" and [s.country for s in decision.countries] == ["GB", "US", "DE"]


def test_an_expired_pass_counts_again(settings):
    history = AccountHistory(sightings=seen_an_hour_before(NOW, "GB", "US", "DE"), travel_passes={"FR": NOW - HOUR})
    assert decide(request("FR"), history, settings, NOW).action == "REJECT blocked"


# --- storage, on each database -------------------------------------------------------


def test_passes_are_stored_replaced_and_ended(db_url):
    store = AdminStore(db_url)
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
