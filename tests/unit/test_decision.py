"""The rule, as a table: decide(request, history, settings, now) is pure."""
import datetime as dt

import pytest
from conftest import ip_in

from pcclib.decision import AccountHistory, CountrySeen, decide
from pcclib.protocol import PolicyRequest

NOW = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.timezone.utc)


HOUR = dt.timedelta(hours=1)


DAY = dt.timedelta(days=1)


def request(login="alice@example.com", country="GB", ip=None, **attributes):
    return PolicyRequest(
        request=attributes.pop("request", "smtpd_access_policy"),
        sasl_username=login,
        client_address=ip or (ip_in(country) if country else "192.168.1.10"),
        client_country=country,
        country_note="" if country else "private address has no country",
        **attributes,
    )


def seen(country, ago, ip=None, first_ago=None):
    return CountrySeen(country, NOW - (first_ago or ago), NOW - ago, ip or ip_in(country))


def history(*sightings, blocked_since=None, counting_since=None):
    return AccountHistory(blocked_since=blocked_since, counting_since=counting_since, sightings=sightings)


@pytest.fixture
def settings(make_settings):
    return make_settings(**{"policy.action": "REJECT", "policy.reason": "too many countries"})


def test_first_country_passes_and_is_recorded(settings):
    decision = decide(request(), history(), settings, NOW)
    assert decision.action == "DUNNO"
    assert decision.counted and decision.record_sighting and not decision.new_block
    assert "1 of at most 3" in decision.reason


def test_at_the_threshold_passes(settings):
    past = history(seen("US", HOUR), seen("FR", 2 * HOUR))
    decision = decide(request(country="GB"), past, settings, NOW)
    assert decision.action == "DUNNO"
    assert {c.country for c in decision.countries} == {"US", "FR", "GB"}


def test_over_the_threshold_blocks_with_action_and_reason(settings):
    past = history(seen("US", HOUR), seen("FR", 2 * HOUR), seen("DE", 3 * HOUR))
    decision = decide(request(country="GB"), past, settings, NOW)
    assert decision.action == "REJECT too many countries"
    assert decision.new_block and decision.record_sighting
    assert [c.country for c in decision.countries] == ["DE", "FR", "US", "GB"]


def test_a_country_already_counted_does_not_add(settings):
    past = history(seen("US", HOUR), seen("FR", 2 * HOUR), seen("GB", 3 * HOUR))
    decision = decide(request(country="GB"), past, settings, NOW)
    assert decision.action == "DUNNO" and len(decision.countries) == 3


def test_hold_action(make_settings):
    settings = make_settings(**{"policy.action": "hold", "policy.reason": ""})
    past = history(seen("US", HOUR), seen("FR", HOUR), seen("DE", HOUR))
    assert decide(request(), past, settings, NOW).action == "HOLD"


def test_threshold_is_configurable(make_settings):
    settings = make_settings(**{"policy.how_many_different_countries": "1"})
    assert decide(request(), history(), settings, NOW).action == "DUNNO"
    assert decide(request(), history(seen("US", HOUR)), settings, NOW).new_block


def test_sightings_outside_the_window_do_not_count(settings):
    old = 3 * DAY + dt.timedelta(seconds=1)
    past = history(seen("US", old), seen("FR", old), seen("DE", HOUR))
    decision = decide(request(country="GB"), past, settings, NOW)
    assert decision.action == "DUNNO"
    assert {c.country for c in decision.countries} == {"DE", "GB"}


def test_a_sighting_exactly_at_the_window_edge_counts(settings):
    past = history(seen("US", 3 * DAY), seen("FR", HOUR), seen("DE", HOUR))
    assert decide(request(country="GB"), past, settings, NOW).new_block


def test_fractional_window(make_settings):
    settings = make_settings(**{"policy.in_how_much_time_in_days": "0.5"})
    past = history(seen("US", 13 * HOUR), seen("FR", HOUR), seen("DE", HOUR))
    assert decide(request(), past, settings, NOW).action == "DUNNO"
    past = history(seen("US", 11 * HOUR), seen("FR", HOUR), seen("DE", HOUR))
    assert decide(request(), past, settings, NOW).new_block


def test_an_unblocked_account_starts_a_fresh_window(settings):
    past = history(seen("US", 2 * HOUR), seen("FR", 2 * HOUR), seen("DE", 2 * HOUR),
                   counting_since=NOW - HOUR)
    decision = decide(request(country="GB"), past, settings, NOW)
    assert decision.action == "DUNNO" and [c.country for c in decision.countries] == ["GB"]


def test_a_blocked_account_gets_the_action_from_anywhere(settings):
    blocked = history(blocked_since=NOW - DAY)
    for country in ("GB", None):
        decision = decide(request(country=country), blocked, settings, NOW)
        assert decision.action == "REJECT too many countries"
        assert not decision.new_block and not decision.record_sighting


def test_ignored_countries_never_count(make_settings):
    settings = make_settings(**{"policy.ignorecountries": "gb, de"})
    decision = decide(request(country="GB"), history(), settings, NOW)
    assert decision.action == "DUNNO" and not decision.counted
    assert "GB is in ignorecountries" in decision.reason
    # sightings recorded before the country was ignored do not count either
    past = history(seen("DE", HOUR), seen("US", HOUR), seen("FR", HOUR))
    assert decide(request(country="SE"), past, settings, NOW).action == "DUNNO"


def test_addresses_without_a_country_are_not_counted(settings):
    decision = decide(request(country=None), history(), settings, NOW)
    assert decision.action == "DUNNO" and not decision.counted and not decision.record_sighting
    assert "private address has no country" in decision.reason


def test_whitelisted_login_is_never_counted_nor_blocked(make_settings):
    settings = make_settings(**{"policy.whitelisted": "boss@example.com, other@example.org"})
    past = history(seen("US", HOUR), seen("FR", HOUR), seen("DE", HOUR))
    decision = decide(request(login="Boss@Example.com"), past, settings, NOW)
    assert decision.action == "DUNNO" and decision.reason == "whitelisted login"
    assert not decision.record_sighting


@pytest.mark.parametrize("ip, whitelisted", [
    ("20.1.7.7", True), ("20.1.255.255", True), ("20.2.0.1", False),
    ("2a0c:1::5", True), ("2a0c:2::5", False), ("::ffff:20.1.7.7", True),
])
def test_whitelisted_client_networks(make_settings, ip, whitelisted):
    settings = make_settings(**{"policy.whitelistedips": "20.1.0.0/16, 2a0c:1::/32"})
    past = history(seen("US", HOUR), seen("FR", HOUR), seen("DE", HOUR))
    decision = decide(request(country="SE", ip=ip), past, settings, NOW)
    if whitelisted:
        assert decision.action == "DUNNO" and decision.reason == "whitelisted client address"
    else:
        assert decision.new_block


def test_no_sasl_login_is_not_counted(settings):
    decision = decide(request(login=""), history(seen("US", HOUR)), settings, NOW)
    assert decision.action == "DUNNO" and decision.reason == "no SASL login"


def test_other_request_types_get_dunno(settings):
    decision = decide(request(request="junk"), history(), settings, NOW)
    assert decision.action == "DUNNO" and not decision.counted


def test_only_configured_domains_are_processed(make_settings):
    settings = make_settings(**{"mail.domains": "Example.com"})
    past = history(seen("US", HOUR), seen("FR", HOUR), seen("DE", HOUR))
    assert decide(request(login="alice@example.com"), past, settings, NOW).new_block
    other = decide(request(login="alice@example.org"), past, settings, NOW)
    assert other.action == "DUNNO" and "domains" in other.reason
    bare = decide(request(login="alice"), past, settings, NOW)
    assert bare.action == "DUNNO"


def test_login_is_compared_case_insensitively(settings):
    assert request(login=" Alice@EXAMPLE.com ").login == "alice@example.com"


def test_sighting_is_refreshed_only_when_stale(settings):
    ip = ip_in("GB")
    fresh = history(seen("GB", dt.timedelta(seconds=10), ip=ip))
    assert not decide(request(ip=ip), fresh, settings, NOW).record_sighting
    assert not decide(request(ip=ip_in("GB", 2)), fresh, settings, NOW).record_sighting
    assert decide(request(country="US"), fresh, settings, NOW).record_sighting
    stale = history(seen("GB", dt.timedelta(seconds=61), ip=ip))
    assert decide(request(ip=ip), stale, settings, NOW).record_sighting


def test_overlong_login_is_not_counted(settings):
    decision = decide(request(login="a" * 300 + "@example.com"), history(), settings, NOW)
    assert decision.action == "DUNNO" and "longer than" in decision.reason


def test_only_a_country_new_to_the_window_is_a_new_place(settings):
    """Decision.new_place: what every daemon must see before the answer."""
    assert decide(request(country="FR"), history(seen("GB", HOUR)), settings, NOW).new_place
    known = decide(request(country="GB", ip=ip_in("GB", 9)), history(seen("GB", 2 * HOUR)), settings, NOW)
    assert not known.new_place and known.record_sighting  # refreshed, behind the answer
    old = decide(request(country="GB"), history(seen("GB", 4 * DAY)), settings, NOW)
    assert old.new_place  # out of the window: counted anew
    assert not decide(request(country=None), history(seen("GB", HOUR)), settings, NOW).new_place
