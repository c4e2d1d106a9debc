"""Network lists and per-account countries: the list files (their checks and
lookups), the decision's four list actions and --only-from, as pure
functions.  Through the daemon's ports: tests/e2e/test_network_lists.py."""
import datetime as dt
import ipaddress

import pytest
from conftest import ip_in, list_path

from pcclib.config import ConfigError
from pcclib.decision import AccountHistory, CountrySeen, decide
from pcclib.networks import ListError, Networks, NetworkFacts, parse_list
from pcclib.protocol import PolicyRequest

NOW = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.timezone.utc)
TOR_BULK_LIST = "185.220.101.1\n185.220.101.2\n" + "".join(f"109.70.100.{n}\n" for n in range(1, 120))
VPN_CIDR_LIST = "# vpn ranges\n45.80.0.0/22\n2a0c:5::/32\n146.70.0.0/16\n" + "".join(
    f"91.{n}.0.0/24\n" for n in range(100, 200))


def address(text):
    return ipaddress.ip_address(text)


def test_a_tor_bulk_list_and_a_cidr_list_are_looked_up_exactly():
    tor = parse_list(TOR_BULK_LIST.encode(), min_entries=100)
    assert address("185.220.101.2") in tor and address("109.70.100.119") in tor
    assert address("185.220.101.3") not in tor and address("109.70.100.120") not in tor
    assert tor.entries == 121
    vpn = parse_list(VPN_CIDR_LIST.encode(), min_entries=100)
    assert address("45.80.3.255") in vpn and address("45.80.4.0") not in vpn and address("45.79.255.255") not in vpn
    assert address("2a0c:5:ffff::1") in vpn and address("2a0c:6::1") not in vpn
    assert address("146.70.200.1") in vpn and address("91.199.0.9") in vpn and address("91.200.0.1") not in vpn


# The /17s of the RIRs' main /12s (APNIC, ARIN, LACNIC, RIPE NCC, AFRINIC):
# "1%" of 2000::/3, and every IPv6 user of Google, Cloudflare, Deutsche Telekom...
RIR_SEVENTEENS = b"".join(f"{block + half // 2:x}:{half % 2 * 0x8000:x}::/17\n".encode()
                          for block in (0x2400, 0x2600, 0x2800, 0x2a00, 0x2c00) for half in range(32))


def test_ipv6_coverage_is_judged_where_ipv6_users_are():
    """Against what the RIRs hand out, not 2000::/3 (97% unassigned): the
    RIRs' main blocks are refused; a million hosting /32s in them are not;
    ranges IANA has not given out count for nothing."""
    assert address("2a00:1450:4001::1") in parse_list(b"2a00:1450::/32\n")  # Google's: a list may name it
    hosting = b"".join(f"2a0{n % 8}:{n // 8:x}::/32\n".encode() for n in range(4096))
    assert parse_list(hosting).ipv6_share < 0.01
    assert parse_list(b"3000::/16\n").ipv6_share == 0.0
    with pytest.raises(ListError, match="covers 71% of the RIRs' IPv6 address space"):
        parse_list(RIR_SEVENTEENS)


def test_overlapping_and_adjacent_ranges_are_merged():
    ranges = parse_list(b"20.1.0.0/24\n20.1.1.0/24\n20.1.0.128/25\n20.1.0.5\n")
    assert ranges.ranges == 1 and address("20.1.1.255") in ranges and address("20.1.2.0") not in ranges


@pytest.mark.parametrize("data, problem", [
    (b"185.220.101.1\n<html>Too many requests</html>\n", "line 2 is not an IP address"),
    (TOR_BULK_LIST.encode()[:-3], "truncated download"),
    (b"185.220.101.1\n185.220.101.2\n", "fewer than min_entries"),
    (b"185.220.101.1\n10.0.0.0/8\n", "private, reserved"),
    (b"185.220.101.1\n0.0.0.0/0\n", "private, reserved or far too wide"),
    (b"".join(f"{n}.0.0.0/8\n".encode() for n in range(11, 90)), "of the public IPv4 address space"),
    (RIR_SEVENTEENS, "of the RIRs' IPv6 address space"),
    (b"\x1f\x8b\x08\x00binary", "not plain text"),
])
def test_a_broken_list_is_refused_with_its_reason(data, problem):
    with pytest.raises(ListError, match=problem):
        parse_list(data, min_entries=10)


def test_lists_come_from_their_sections(make_settings, tmp_path):
    settings = make_settings(**{"list tor.action": "block", "list vpn.action": "count"})
    assert [(n.label, n.action) for n in settings.network_lists] == [("tor", "BLOCK"), ("vpn", "COUNT"),
                                                                     ("hosting", "NOTIFY")]
    markers = {n.marker for n in settings.network_lists}
    assert len(markers) == 3 and not markers & {"GB", "US", "XK"}
    # the same label keeps its marker whatever else is listed
    again = make_settings(**{"list zz-extra.action": "count", "list zz-extra.file": "/nonexistent",
                             "list zz-extra.url": "", "list zz-extra.max_age_days": "1",
                             "list zz-extra.min_entries": "1"})
    assert {n.label: n.marker for n in again.network_lists}["vpn"] == {n.label: n.marker
                                                                       for n in settings.network_lists}["vpn"]
    assert settings.place_name(settings.network_lists[1].marker) == "vpn network"


@pytest.mark.parametrize("overrides, problem", [
    ({"list tor.action": "drop"}, "must be one of IGNORE, NOTIFY, COUNT, BLOCK"),
    ({"list tor.url": "http://example.com/list"}, "must be an https:// URL"),
    ({"list Tor!.action": "block"}, "a network list's section is"),
    ({"list tor.file": ""}, "must not be blank"),
])
def test_a_bad_list_section_is_one_clear_line(make_settings, overrides, problem):
    with pytest.raises(ConfigError, match=problem):
        make_settings(**overrides)


def test_the_daemon_keeps_the_old_ranges_when_a_file_turns_bad(make_settings, tmp_path):
    settings = make_settings(**{"list tor.action": "block"})
    path = list_path(tmp_path, "tor")
    networks = Networks(settings)
    assert networks.lookup(address("185.220.101.1")) == NetworkFacts()  # no file: off
    open(path, "w").write(TOR_BULK_LIST)
    assert networks.changed_on_disk()
    networks = Networks(settings, networks)
    assert networks.lookup(address("185.220.101.1")).labels == ("tor",)
    open(path, "w").write(TOR_BULK_LIST[:50])  # truncated by a failed copy
    networks = Networks(settings, networks)
    assert networks.lookup(address("109.70.100.100")).labels == ("tor",)
    assert not networks.changed_on_disk()  # refused once, not again every few seconds


def request_from(ip, login="alice@example.com", labels=(), country="ES"):
    request = PolicyRequest(request="smtpd_access_policy", sasl_username=login, client_address=ip)
    return request.__class__(**{**request.__dict__, "client_country": country,
                                "network": NetworkFacts(tuple(labels)) if labels else None})


def history(*countries, **extra):
    start = NOW - dt.timedelta(hours=5)
    return AccountHistory(sightings=tuple(CountrySeen(code, start, start, f"81.2.69.{n}")
                                          for n, code in enumerate(countries, 1)),
                          **extra)


def test_a_tor_exit_in_the_home_country_blocks_when_tor_is_block(make_settings):
    settings = make_settings(**{"list tor.action": "block"})
    decision = decide(request_from("185.220.101.1", labels=("tor",)), history("ES"), settings, NOW)
    assert decision.new_block and decision.rule == "network" and decision.action.startswith("HOLD")
    assert "network list tor" in decision.reason
    assert not decide(request_from("185.220.101.1"), history("ES"), settings, NOW).blocks
    monitor = make_settings(**{"list tor.action": "block", "policy.mode": "monitor"})
    flagged = decide(request_from("185.220.101.1", labels=("tor",)), history("ES"), monitor, NOW)
    assert flagged.new_block and flagged.action == "DUNNO" and "would block" in flagged.reason


def test_count_makes_a_vpn_hop_the_crossing_country(make_settings):
    settings = make_settings(**{"list vpn.action": "count", "policy.how_many_different_countries": "3"})
    home_and_one = history("ES", "PT")
    assert not decide(request_from("20.1.0.1", country="ES"), home_and_one, settings, NOW).blocks
    hop = decide(request_from("45.80.0.1", country="ES", labels=("vpn",)), home_and_one, settings, NOW)
    assert not hop.blocks and len(hop.countries) == 3  # ES, PT and the vpn network
    marker = settings.network_lists[1].marker
    assert hop.sighted == ("ES", marker) and hop.record_sighting
    after = history("ES", "PT", marker)
    crossing = decide(request_from("45.80.0.2", country="FR", labels=("vpn",)), after, settings, NOW)
    assert crossing.new_block and "vpn network" in crossing.reason
    # a VPN exit in an ignored country still counts as the VPN
    ignoring = make_settings(**{"list vpn.action": "count", "policy.ignorecountries": "ES"})
    assert decide(request_from("45.80.0.1", country="ES", labels=("vpn",)), history(), ignoring,
                  NOW).sighted == (marker,)


def test_a_list_that_no_longer_counts_stops_counting_its_past_hops(make_settings):
    counting = make_settings(**{"list vpn.action": "count", "policy.how_many_different_countries": "2"})
    marker = counting.network_lists[1].marker
    after_a_hop = history("ES", "PT", marker)
    assert decide(request_from(ip_in("ES")), after_a_hop, counting, NOW).new_block  # ES, PT, vpn
    notifying = make_settings(**{"list vpn.action": "notify", "policy.how_many_different_countries": "2"})
    assert not decide(request_from(ip_in("ES")), after_a_hop, notifying, NOW).blocks  # ES, PT


def test_notify_and_ignore_leave_the_decision_as_it_was(make_settings):
    settings = make_settings(**{"list vpn.action": "notify", "list hosting.action": "ignore"})
    plain = decide(request_from("20.1.0.1"), history("ES"), settings, NOW)
    noted = decide(request_from("45.80.0.1", labels=("vpn", "hosting")), history("ES"), settings, NOW)
    assert (noted.action, noted.counted, noted.reason) == (plain.action, plain.counted, plain.reason)
    assert noted.notify_lists == ("vpn",) and plain.notify_lists == ()


def test_only_from_blocks_any_other_country_and_honours_a_travel_pass(make_settings):
    settings = make_settings()
    restricted = history("ES", only_from=frozenset({"ES", "PT"}))
    assert not decide(request_from(ip_in("ES"), country="ES"), restricted, settings, NOW).blocks
    assert not decide(request_from("10.0.0.1", country=None), restricted, settings, NOW).blocks
    elsewhere = decide(request_from(ip_in("FR"), country="FR"), restricted, settings, NOW)
    assert elsewhere.new_block and elsewhere.rule == "only_from" and "only from ES, PT" in elsewhere.reason
    travelling = history("ES", only_from=frozenset({"ES"}), travel_passes={"FR": NOW + dt.timedelta(days=2)})
    assert not decide(request_from(ip_in("FR"), country="FR"), travelling, settings, NOW).blocks
    whitelisted_ip = make_settings(**{"policy.whitelistedips": ip_in("FR") + "/16"})
    assert not decide(request_from(ip_in("FR"), country="FR"), restricted, whitelisted_ip, NOW).blocks


def test_a_broken_asn_file_is_reported_once_and_a_good_one_replaces_it(make_settings, tmp_path, caplog):
    from e2e.test_network_lists import write_asn_database

    broken = tmp_path / "asn.mmdb"
    broken.write_bytes(b"<html>502 Bad Gateway</html>\n")
    settings = make_settings(**{"networks.asn_database": str(broken)})
    networks = Networks(settings)
    assert networks.asn is None and "asn_database" in caplog.text and "cannot be used" in caplog.text
    assert not networks.changed_on_disk()  # said once, not at every look of the housekeeping
    write_asn_database(tmp_path / "new.mmdb")
    (tmp_path / "new.mmdb").replace(broken)
    assert networks.changed_on_disk()
    networks = Networks(settings, networks)
    assert networks.lookup(address(ip_in("ES"))).describe() == "AS64500 Example Hosting B.V."


def test_a_count_lists_marker_new_to_the_account_is_a_new_place(make_settings):
    """Its sighting is committed before the answer like a new country's
    (Decision.new_place); the same marker again is not."""
    settings = make_settings(**{"list vpn.action": "count"})
    marker = settings.network_lists[1].marker
    hop = decide(request_from("45.80.0.1", country="ES", labels=("vpn",)), history("ES"), settings, NOW)
    assert hop.new_place and not hop.blocks
    again = decide(request_from("45.80.0.1", country="ES", labels=("vpn",)), history("ES", marker), settings, NOW)
    assert not again.new_place
