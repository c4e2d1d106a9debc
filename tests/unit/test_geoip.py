"""GeoIP lookups in the process (geoip.GeoIP): IPv4 and IPv6 from a .mmdb,
IPv4-mapped addresses, addresses with no country and why, the description
of the file.  Replacing the file under a running daemon is e2e/test_geoip_reload.py."""
import ipaddress

import pytest
from conftest import NOT_IN_GEOIP, ROOT, ip_in

from pcclib.geoip import GeoIP
from pcclib.protocol import PolicyRequest


def country(geoip, text):
    return geoip.country(PolicyRequest(client_address=text).client_ip)


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
    embedded = GeoIP("")
    assert embedded.description == "embedded GeoLite2-Country data of 2024-06-18 (geoip2fast package)"
    assert embedded.country(ipaddress.ip_address("81.2.69.160")).code == "GB"
    assert embedded.country(ipaddress.ip_address("8.8.8.8")).code == "US"
    assert embedded.country(ipaddress.ip_address("2001:4860:4860::8888")).code == "US"
    assert embedded.country(ipaddress.ip_address("10.0.0.1")).code is None


def test_the_shipped_db_ip_country_data_is_read(tmp_path):
    """data/dbip-country-lite.mmdb.xz, what the Debian package installs: ip-location-db's
    layout (a top-level country_code), IPv4 and IPv6."""
    import lzma

    path = tmp_path / "dbip-country-lite.mmdb"
    path.write_bytes(lzma.decompress((ROOT / "data" / "dbip-country-lite.mmdb.xz").read_bytes()))
    shipped = GeoIP(str(path))
    assert shipped.built is not None and shipped.built.year >= 2026 and not shipped.ipv4_only
    assert shipped.country(ipaddress.ip_address("81.2.69.160")).code == "GB"
    assert shipped.country(ipaddress.ip_address("8.8.8.8")).code == "US"
    assert shipped.country(ipaddress.ip_address("2001:67c:2e8::1")).code == "NL"  # RIPE NCC
    assert shipped.country(ipaddress.ip_address("2001:200::1")).code == "JP"  # WIDE
    assert shipped.country(ipaddress.ip_address("10.0.0.1")).code is None
