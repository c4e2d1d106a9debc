"""GeoIP: the configured .mmdb and the embedded default data."""
import ipaddress

import pytest
from conftest import NOT_IN_GEOIP, ip_in

import pcc


def country(geoip, text):
    return geoip.country(pcc.PolicyRequest(client_address=text).client_ip)


@pytest.mark.parametrize("code", ["GB", "US", "JP", "ZA"])
def test_mmdb_lookup_ipv4_and_ipv6(geoip, code):
    assert country(geoip, ip_in(code)).code == code
    assert country(geoip, ip_in(code, host=4000, version=6)).code == code


def test_ipv4_mapped_ipv6_is_looked_up_as_ipv4(geoip):
    assert country(geoip, "::ffff:" + ip_in("FR")).code == "FR"


@pytest.mark.parametrize("text, note", [
    ("10.1.2.3", "private address has no country"),
    ("192.168.0.1", "private address has no country"),
    ("127.0.0.1", "loopback address has no country"),
    ("::1", "loopback address has no country"),
    ("fd00::1", "private address has no country"),
    ("100.64.0.1", "non-public address has no country"),
    ("unknown", "client address is not an IP address"),
    ("", "client address is not an IP address"),
    (NOT_IN_GEOIP, "address not in the GeoIP database"),
])
def test_addresses_without_a_country(geoip, text, note):
    found = country(geoip, text)
    assert found.code is None and found.note == note


def test_mmdb_description_names_file_and_build_date(geoip, geoip_path):
    assert geoip.description.startswith(f"{geoip_path} (GeoLite2-Country, built ")
    assert geoip.built is not None


def test_embedded_default_data_works_offline():
    embedded = pcc.GeoIP("")
    assert embedded.description == "embedded GeoLite2-Country data of 2024-06-18 (geoip2fast package)"
    assert embedded.country(ipaddress.ip_address("81.2.69.160")).code == "GB"
    assert embedded.country(ipaddress.ip_address("8.8.8.8")).code == "US"
    assert embedded.country(ipaddress.ip_address("2001:4860:4860::8888")).code == "US"
    assert embedded.country(ipaddress.ip_address("10.0.0.1")).code is None


# --- a GeoIP file replaced on disk (as geoipupdate does) is used without a restart


def write_country_database(path, countries: dict) -> None:
    from mmdb_writer import MMDBWriter
    from netaddr import IPSet

    writer = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="GeoLite2-Country", languages=["en"])
    for network, code in countries.items():
        writer.insert_network(IPSet([network]), {"country": {"iso_code": code}})
    writer.to_db_file(str(path))


def wait_for_log(daemon, text, timeout=20.0):
    import time

    deadline = time.monotonic() + timeout
    while text not in daemon.log():
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{daemon.log()}"
        time.sleep(0.2)


def test_replaced_file_is_used_without_a_restart(start_daemon, tmp_path):
    import os

    live = tmp_path / "GeoLite2-Country.mmdb"
    write_country_database(live, {"20.1.0.0/16": "GB"})
    daemon = start_daemon(**{"geoip.database": live, "policy.how_many_different_countries": "1",
                             "policy.action": "REJECT"})
    client = daemon.client()
    assert client.ask("alice@example.com", ip_in("GB")) == "DUNNO"
    assert "country=GB" in daemon.log()
    # geoipupdate's way: write a new file beside it, rename it over the old one
    fresh = tmp_path / "GeoLite2-Country.mmdb.new"
    write_country_database(fresh, {"20.1.0.0/16": "US"})
    os.replace(fresh, live)
    wait_for_log(daemon, f"GeoIP file {live} was replaced; now using")
    # the same address is in another country now: a second country, over the limit of 1
    assert client.ask("alice@example.com", ip_in("GB")).startswith("REJECT")
    assert "country=US" in daemon.log()

    # a broken file (a copy cut short) is refused once; the data in use stays
    broken = tmp_path / "broken.mmdb"
    broken.write_bytes(live.read_bytes()[:len(live.read_bytes()) // 2])
    os.replace(broken, live)
    wait_for_log(daemon, "changed but cannot be used; still using the data loaded before")
    assert client.ask("bob@example.com", ip_in("GB")) == "DUNNO"
    assert daemon.log().count("changed but cannot be used") == 1
    assert daemon.process.poll() is None


def test_stale_data_warns_at_start(start_daemon):
    daemon = start_daemon(**{"geoip.database": ""})  # the embedded data is from 2024-06-18
    assert "GeoIP data is" in daemon.log() and "days old (built 2024-06-18)" in daemon.log()


def test_a_country_file_does_not_replace_city_data_the_travel_rule_needs(start_daemon, tmp_path, city_geoip_path):
    import os
    import shutil

    from conftest import ip_at

    live = tmp_path / "GeoLite2-City.mmdb"
    shutil.copy(city_geoip_path, live)
    daemon = start_daemon(**{"geoip.database": live, "policy.max_travel_speed_kmh": "1000"})
    country_file = tmp_path / "country.mmdb"
    write_country_database(country_file, {"90.1.0.0/16": "GB"})
    os.replace(country_file, live)
    wait_for_log(daemon, "it has no places (a Country database), and max_travel_speed_kmh needs them")
    client = daemon.client()
    assert client.ask("alice@example.com", ip_at("London")) == "DUNNO"
    assert client.ask("alice@example.com", ip_at("Tokyo")) == "DUNNO"
    assert "impossible travel noticed: London, GB" in daemon.log()  # the City data is still in use
