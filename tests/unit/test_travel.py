"""Impossible travel: places from City-level GeoIP data, the rule as a pure
function, and the rule in the service on SQLite, MariaDB and PostgreSQL."""
import datetime as dt
import ipaddress

import pytest
from conftest import PLACES, ip_at, ip_in, policy_request

from pcclib.config import ConfigError
from pcclib.decision import AccountHistory, CountrySeen, decide
from pcclib.geoip import GeoIP, Place
from pcclib.protocol import PolicyRequest, parse_request

NOW = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.timezone.utc)


MINUTE = dt.timedelta(minutes=1)


HOUR = dt.timedelta(hours=1)


def place(name):
    code, latitude, longitude, radius, _network = PLACES[name]
    return Place(latitude, longitude, radius, f"{name}, {code}")


def request(name, login="alice@example.com"):
    return PolicyRequest(request="smtpd_access_policy", sasl_username=login, client_address=ip_at(name),
                             client_country=PLACES[name][0], client_place=place(name))


def was_at(name, ago):
    """History: the account's latest message came from `name`, `ago` before NOW."""
    seen = CountrySeen(PLACES[name][0], NOW - ago - HOUR, NOW - ago, ip_at(name))
    return AccountHistory(sightings=(seen,), last_place=place(name))


@pytest.fixture
def settings(make_settings, city_geoip_path):
    def make(action="notify", speed="1000", **overrides):
        values = {"geoip.database": city_geoip_path, "policy.max_travel_speed_kmh": speed,
                  "policy.impossible_travel_action": action, "policy.action": "REJECT",
                  "policy.reason": "blocked", "policy.how_many_different_countries": "5"}
        values.update(overrides)
        return make_settings(**values)

    return make


# --- places -----------------------------------------------------------------


@pytest.mark.parametrize("origin, destination, km", [
    ("London", "Paris", 344), ("London", "New York", 5570), ("Paris", "Lyon", 392), ("London", "Tokyo", 9560),
])
def test_distance_between_places(origin, destination, km):
    assert place(origin).distance_km(place(destination)) == pytest.approx(km, rel=0.01)
    assert place(destination).distance_km(place(origin)) == pytest.approx(km, rel=0.01)


def test_city_database_gives_places(city_geoip_path):
    geoip = GeoIP(city_geoip_path)
    found = geoip.country(ipaddress.ip_address(ip_at("Tokyo")))
    assert geoip.has_places and found.code == "JP"
    assert found.place == Place(35.6762, 139.6503, 5.0, "Tokyo, JP")


def test_country_database_gives_no_places(geoip):
    assert not geoip.has_places
    assert geoip.country(ipaddress.ip_address(ip_in("GB"))).place is None


def test_real_geolite2_city_data(geolite2_city_2015):
    """The 2015 GeoLite2-City file as MaxMind built it (no accuracy radius then)."""
    geoip = GeoIP(geolite2_city_2015)
    princeton = geoip.country(ipaddress.ip_address("128.112.0.1"))
    stanford = geoip.country(ipaddress.ip_address("171.64.0.1"))
    assert (princeton.code, princeton.place.name) == ("US", "Princeton, US")
    assert (stanford.code, stanford.place.name) == ("US", "Stanford, US")
    assert princeton.place.distance_km(stanford.place) == pytest.approx(4100, rel=0.02)
    assert geoip.built == dt.date(2015, 3, 3)


# --- the rule, pure -----------------------------------------------------------


def test_london_to_new_york_in_an_hour_is_noticed(settings):
    decision = decide(request("New York"), was_at("London", HOUR), settings(), NOW)
    assert decision.action == "DUNNO" and not decision.new_block
    journey = decision.journey
    assert journey.origin.name == "London, GB" and journey.destination.name == "New York, US"
    assert journey.distance_km == pytest.approx(5570, rel=0.01)
    # the speed allows for both places' accuracy radii (5 km each)
    assert journey.speed_kmh == pytest.approx(journey.distance_km - 10, rel=0.001)
    assert decision.record_sighting  # the move is written, so the next message is judged from New York
    assert "impossible travel noticed: London, GB" in decision.reason


def test_a_flight_is_not_impossible(settings):
    assert decide(request("New York"), was_at("London", 8 * HOUR), settings(), NOW).journey is None
    assert decide(request("Paris"), was_at("London", HOUR), settings(), NOW).journey is None


def test_within_one_country_too(settings):
    decision = decide(request("Lyon"), was_at("Paris", 5 * MINUTE), settings(), NOW)
    assert decision.journey is not None and decision.journey.speed_kmh > 4000


def test_block_action_blocks_with_the_journey_as_reason(settings):
    decision = decide(request("Tokyo"), was_at("London", 2 * HOUR), settings("block"), NOW)
    assert decision.action == "REJECT blocked" and decision.new_block and decision.rule == "travel"
    assert decision.reason.startswith("blocking: impossible travel: London, GB (")
    assert "Tokyo, JP" in decision.reason and "km/h" in decision.reason


def test_short_hops_are_never_judged(settings):
    # Paris -> Lyon (392 km) in a minute, with a 500 km accuracy radius configured
    assert decide(request("Lyon"), was_at("Paris", MINUTE), settings(**{"policy.travel_accuracy_radius_km": "500"}),
                      NOW).journey is None
    # a country-level guess (500 km accuracy) close to Lyon: within the database's own doubt
    assert decide(request("Lyon"), was_at("Somewhere in FR", MINUTE), settings(), NOW).journey is None


def test_same_address_or_rule_off_or_no_place(settings):
    same = AccountHistory(sightings=(CountrySeen("GB", NOW - HOUR, NOW - MINUTE, ip_at("London")),),
                              last_place=place("Tokyo"))  # even with a stale place: the address did not change
    assert decide(request("London"), same, settings(), NOW).journey is None
    assert decide(request("Tokyo"), was_at("London", HOUR), settings(speed=""), NOW).journey is None
    no_place = AccountHistory(sightings=was_at("London", HOUR).sightings)
    assert decide(request("Tokyo"), no_place, settings(), NOW).journey is None


def test_only_a_move_to_another_place_is_written_at_once(settings):
    half_a_minute = dt.timedelta(seconds=30)  # below the once-a-minute refresh
    same_city = PolicyRequest(request="smtpd_access_policy", sasl_username="alice@example.com",
                                  client_address=ip_at("Paris", host=2), client_country="FR",
                                  client_place=place("Paris"))
    assert not decide(same_city, was_at("Paris", half_a_minute), settings(), NOW).record_sighting
    assert decide(request("Somewhere in FR"), was_at("Paris", half_a_minute), settings(), NOW).record_sighting
    # without the travel rule, a sighting is refreshed at most once a minute
    assert not decide(request("Somewhere in FR"), was_at("Paris", half_a_minute), settings(speed=""),
                          NOW).record_sighting


def test_monitor_mode_flags_a_travel_block(settings):
    decision = decide(request("Tokyo"), was_at("London", HOUR), settings("block", **{"policy.mode": "monitor"}),
                          NOW)
    assert decision.action == "DUNNO" and decision.new_block
    assert decision.reason.startswith("would block (monitor mode): impossible travel")


def test_the_rule_needs_city_data(make_settings, geoip_path):
    with pytest.raises(ConfigError, match=r"\[policy\] max_travel_speed_kmh: needs City-level GeoIP data in "
                                              r"\[geoip\] database, but .* is a GeoLite2-Country database"):
        make_settings(**{"geoip.database": geoip_path, "policy.max_travel_speed_kmh": "1000"})
    with pytest.raises(ConfigError, match="the embedded default data has countries only"):
        make_settings(**{"geoip.database": "", "policy.max_travel_speed_kmh": "1000"})


@pytest.mark.parametrize("key, value, problem", [
    ("policy.max_travel_speed_kmh", "fast", "must be a number"),
    ("policy.max_travel_speed_kmh", "0", "must be more than 0"),
    ("policy.travel_accuracy_radius_km", "-5", "must be at least 0"),
    ("policy.impossible_travel_action", "shout", "must be one of BLOCK, NOTIFY"),
])
def test_bad_travel_settings(settings, key, value, problem):
    with pytest.raises(ConfigError, match=problem):
        settings(**{key: value})


# --- the rule in the service, on each database -----------------------------------


@pytest.fixture
def service_for(settings, db_url, city_geoip_path, smtp_sink, service_on):
    def make(action):
        chosen = settings(action, **{"db.dbcon": db_url, "mail.notice": "admin@example.com",
                                     "mail.mailsrv": "127.0.0.1", "mail.mailport": smtp_sink.port})
        return service_on(chosen, geoip=GeoIP(city_geoip_path))

    return make


def ask(service, name, now, login="alice@example.com"):
    return service.answer(parse_request(f"{k}={v}" for k, v in policy_request(login, ip_at(name)).items()), now)


def test_notify_mails_once_and_judges_from_the_new_place(service_for, smtp_sink):
    service = service_for("notify")
    assert ask(service, "London", NOW) == "DUNNO"
    assert ask(service, "New York", NOW + 30 * MINUTE) == "DUNNO"
    (mail,) = [m for _r, m in smtp_sink.wait_for(1)]
    assert mail["Subject"] == "pcc: impossible travel by alice@example.com"
    body = mail.get_content()
    assert "London, GB" in body and "New York, US" in body and "5,570 km in 30.0 minutes" in body
    assert "NOT blocked" in body and "-b alice@example.com" in body
    # the account now is in New York: more mail from there is fine, and Boston-like
    # hops are judged from New York, not from London
    assert ask(service, "New York", NOW + 31 * MINUTE) == "DUNNO"
    history = service.database.store.load_history("alice@example.com", NOW - HOUR)
    assert history.latest_sighting.last_ip == ip_at("New York")
    assert len(smtp_sink.wait_for(2, timeout=1)) == 1


def test_block_writes_a_block_and_mails_the_journey(service_for, smtp_sink):
    service = service_for("block")
    assert ask(service, "Paris", NOW) == "DUNNO"
    assert ask(service, "Tokyo", NOW + HOUR) == "REJECT blocked"
    assert ask(service, "Paris", NOW + 2 * HOUR) == "REJECT blocked"
    _account, _sightings, blocks = service.database.store.account("alice@example.com")
    (block,) = blocks
    assert block.reason.startswith("blocking: impossible travel: Paris, FR")
    (mail,) = [m for _r, m in smtp_sink.wait_for(1)]
    assert mail["Subject"] == "pcc: account alice@example.com blocked (REJECT)"
    assert "The impossible journey:" in mail.get_content() and "Tokyo, JP" in mail.get_content()


def test_after_an_unblock_the_travel_rule_starts_afresh(service_for):
    """The owner, unblocked, sends from home: not a journey from where the thief was."""
    service = service_for("block")
    assert ask(service, "Paris", NOW) == "DUNNO"
    assert ask(service, "Tokyo", NOW + HOUR) == "REJECT blocked"
    service.database.store.unblock("alice@example.com", NOW + 2 * HOUR)
    assert ask(service, "Paris", NOW + 2 * HOUR + MINUTE) == "DUNNO"
    assert ask(service, "Tokyo", NOW + 2 * HOUR + 2 * MINUTE) == "REJECT blocked"  # the rule still holds
