"""GeoIP: the configured .mmdb and the embedded default data."""

from conftest import ip_in, wait_for_log

# --- a GeoIP file replaced on disk (as geoipupdate does) is used without a restart


def write_country_database(path, countries: dict) -> None:
    from mmdb_writer import MMDBWriter
    from netaddr import IPSet

    writer = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="GeoLite2-Country", languages=["en"])
    for network, code in countries.items():
        writer.insert_network(IPSet([network]), {"country": {"iso_code": code}})
    writer.to_db_file(str(path))


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
