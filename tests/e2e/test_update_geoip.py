"""`pcc.py --update-geoip` installs current GeoIP data, or nothing: files
served by a local HTTP server in the real format; a good update reaches the
running daemon; a bad, slow, poisoned or forged one leaves the installed
file as it was, with one line; --force installs a file after a person looked."""
import datetime
import gzip
import http.server
import os
import threading
import time

import pytest
from conftest import ip_in, run_pcc, wait_for_log, write_config

# 200 country codes for a world map of /8 networks, as real data has some 240.
CODES = sorted({a + b for a in "ABCDEFGHIKLMNPRSTUVZ" for b in "ABCDEFGHIKLMNOPRSTUVWYZ"})[:200]
SKIPPED_OCTETS = {0, 1, 8, 9, 10, 20, 90, 100, 127, 169, 172, 192, 198, 203}  # special, or given below
WELL_KNOWN = {"8.8.8.0/24": "US", "1.1.1.0/24": "AU", "9.9.9.0/24": "CH", "20.1.0.0/16": "GB"}


def world(**moved) -> dict:
    """network -> country: a /8 per country over the public IPv4 space, the
    well-known resolvers, and the networks in `moved` ("20.1.0.0/16": "JP")."""
    networks = {f"{octet}.0.0.0/8": CODES[octet % len(CODES)] for octet in range(1, 224)
                if octet not in SKIPPED_OCTETS}
    networks.update(WELL_KNOWN)
    networks.update(moved)
    return networks


def write_mmdb(path, countries: dict, database_type="DBIP-Country-Lite", built: datetime.datetime = None) -> bytes:
    from mmdb_writer import MMDBWriter
    from netaddr import IPSet

    writer = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type=database_type, languages=["en"])
    for network, code in countries.items():
        record = {"country": {"iso_code": code}}
        if "City" in database_type:
            record.update(city={"names": {"en": "X"}}, location={"latitude": 1.0, "longitude": 2.0})
        writer.insert_network(IPSet([network]), record)
    writer.to_db_file(str(path))
    data = open(path, "rb").read()
    if built is not None:  # mmdb-writer stamps "now": rewrite the metadata's build_epoch
        data = with_build_epoch(data, int(built.timestamp()))
        open(path, "wb").write(data)
    return data


def with_build_epoch(data: bytes, epoch: int) -> bytes:
    """The same .mmdb with another build_epoch (uint64 in the metadata map)."""
    key = b"\x4bbuild_epoch"  # a UTF-8 string of 11 bytes
    at = data.rindex(key) + len(key)
    size = data[at] & 0x1F  # type 9 (uint64): extended type byte, then the size
    assert data[at] >> 5 == 0 and data[at + 1] == 2, "build_epoch is not a uint64"
    encoded = epoch.to_bytes(8, "big").lstrip(b"\x00") or b"\x00"
    return data[:at] + bytes([len(encoded), 2]) + encoded + data[at + 2 + size:]


class Downloads:
    """A local HTTP server: path -> (status, body, seconds to wait first, bytes a second or 0, headers)."""

    def __init__(self):
        self.files: dict = {}
        files = self.files

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                missing = (404, b"<html>Not Found</html>", 0, 0, {})
                entry = files.get(self.path, missing)
                status, body, delay, rate, headers = tuple(entry) + missing[len(entry):]
                time.sleep(delay)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    if not rate:
                        self.wfile.write(body)
                        return
                    for start in range(0, len(body), rate):  # a trickle
                        self.wfile.write(body[start:start + rate])
                        self.wfile.flush()
                        time.sleep(1)
                except OSError:
                    pass

            def log_message(self, *_arguments):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path):
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"


@pytest.fixture
def downloads():
    served = Downloads()
    yield served
    served.server.shutdown()


def leftovers(directory) -> list:
    return [name for name in os.listdir(directory) if name.startswith(".pcc-geoip-")]


def test_update_geoip_installs_a_good_file_and_the_daemon_counts_with_it(start_daemon, tmp_path, downloads):
    installed = tmp_path / "geoip.mmdb"
    write_mmdb(installed, world())
    fresh = write_mmdb(tmp_path / "new.mmdb", world(**{"20.1.0.0/16": "JP"}))  # one network moved
    downloads.files["/dbip.mmdb.gz"] = (200, gzip.compress(fresh), 0)
    daemon = start_daemon(**{"geoip.database": str(installed), "geoip.update_url": downloads.url("/dbip.mmdb.gz")})
    client = daemon.client()
    client.ask("alice@example.com", ip_in("GB"))
    assert "country=GB" in daemon.log()
    result = run_pcc("--config", daemon.config_path, "--update-geoip")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"installed {installed}: DBIP-Country-Lite, built ")
    assert installed.read_bytes() == fresh
    wait_for_log(daemon, "was replaced; now using")
    client.ask("bob@example.com", ip_in("GB"))
    assert "login=bob@example.com client=20.1.0.1 country=JP" in daemon.log()


@pytest.mark.parametrize("served, expected", [
    ((200, b"<html><body>Please log in</body></html>", 0), "not a MaxMind-format database"),
    ("truncated-gzip", "truncated download"),
    ("truncated-plain", "not a MaxMind-format database"),
    ((404, b"Not Found", 0), "HTTP 404"),
    ("country-for-city", "max_travel_speed_kmh needs City-level data"),
    ("no-well-known", "places no country for 8.8.8.8, 1.1.1.1, 9.9.9.9"),
    ("one-country", "in 1 countries only"),
    ("moved-half", "of the sampled addresses to another country"),
    ("from-2100", "claims to be built on 2100-01-01, in the future"),
    ("older", "before the installed file"),
    ("epoch-overflow", "not a MaxMind-format database"),
    ("redirect-to-ftp", "which is not https"),
    ((200, b"", 5), "took longer than --timeout (2 s)"),
    ("trickle", "took longer than --timeout (2 s)"),
])
def test_update_geoip_keeps_the_installed_file_when_the_download_is_bad(tmp_path, downloads, served, expected):
    installed = tmp_path / "geoip.mmdb"
    city = served == "country-for-city"
    write_mmdb(installed, world(), "DBIP-City-Lite" if city else "DBIP-Country-Lite")
    before = installed.read_bytes()
    good = write_mmdb(tmp_path / "good.mmdb", world())
    half = {network: ("JP" if index % 2 else code) for index, (network, code) in enumerate(world().items())}
    everyone_in_one = {network: "US" for network in world()}
    bodies = {
        "truncated-gzip": (200, gzip.compress(good)[:-200], 0), "truncated-plain": (200, good[:-4000], 0),
        "country-for-city": (200, good, 0),
        "no-well-known": (200, write_mmdb(tmp_path / "x.mmdb", {"20.1.0.0/16": "GB"}), 0),
        "one-country": (200, write_mmdb(tmp_path / "one.mmdb", everyone_in_one), 0),
        "moved-half": (200, write_mmdb(tmp_path / "half.mmdb", half), 0),
        "from-2100": (200, write_mmdb(tmp_path / "2100.mmdb", world(), built=datetime.datetime(2100, 1, 1, 12)), 0),
        "older": (200, write_mmdb(tmp_path / "old.mmdb", world(), built=datetime.datetime(2020, 1, 1, 12)), 0),
        "epoch-overflow": (200, with_build_epoch(good, 1 << 62), 0),
        "redirect-to-ftp": (302, b"", 0, 0, {"Location": "ftp://127.0.0.1/dbip.mmdb"}),
        "trickle": (200, good, 0, 1),
    }
    downloads.files["/file"] = bodies.get(served, served)
    overrides = {"geoip.database": str(installed), "geoip.update_url": downloads.url("/file")}
    if city:
        overrides["policy.max_travel_speed_kmh"] = "1000"
    config = write_config(tmp_path, overrides)
    started = time.monotonic()
    result = run_pcc("--config", config, "--update-geoip", "--timeout", "2")
    assert time.monotonic() - started < 6  # --timeout bounds the whole download, however it trickles
    assert result.returncode == 1, result
    assert result.stderr.startswith("pcc: GeoIP update failed, the installed file is unchanged: ")
    assert expected in result.stderr and len(result.stderr.splitlines()) == 1, result.stderr
    assert installed.read_bytes() == before
    assert leftovers(tmp_path) == []


def test_force_installs_what_the_comparison_refused_but_never_an_unusable_file(tmp_path, downloads):
    installed = tmp_path / "geoip.mmdb"
    write_mmdb(installed, world())
    provider = {network: CODES[(CODES.index(code) + 7) % len(CODES)] if "/8" in network else code
                for network, code in world().items()}  # another provider: most /8s elsewhere
    downloads.files["/other"] = (200, write_mmdb(tmp_path / "other.mmdb", provider), 0)
    downloads.files["/one"] = (200, write_mmdb(tmp_path / "one.mmdb", {network: "US" for network in world()}), 0)
    config = write_config(tmp_path, {"geoip.database": str(installed), "geoip.update_url": downloads.url("/other")})
    refused = run_pcc("--config", config, "--update-geoip")
    assert refused.returncode == 1 and "install it with --force" in refused.stderr
    assert run_pcc("--config", config, "--update-geoip", "--force").returncode == 0
    assert installed.read_bytes() == (tmp_path / "other.mmdb").read_bytes()
    config = write_config(tmp_path, {"geoip.database": str(installed), "geoip.update_url": downloads.url("/one")})
    result = run_pcc("--config", config, "--update-geoip", "--force")
    assert result.returncode == 1 and "countries only" in result.stderr
    assert run_pcc("--config", config, "--timeout", "3", "-l").returncode == 2  # --timeout, --force: update only


def test_a_killed_run_leaves_nothing_the_next_run_does_not_remove(tmp_path, downloads):
    installed = tmp_path / "geoip.mmdb"
    write_mmdb(installed, world())
    (tmp_path / ".pcc-geoip-killed.mmdb").write_bytes(b"half a file")
    downloads.files["/file"] = (200, write_mmdb(tmp_path / "new.mmdb", world()), 0)
    config = write_config(tmp_path, {"geoip.database": str(installed), "geoip.update_url": downloads.url("/file")})
    assert run_pcc("--config", config, "--update-geoip").returncode == 0
    assert leftovers(tmp_path) == []


def test_a_broken_installed_file_is_replaced_by_the_next_update(tmp_path, downloads):
    installed = tmp_path / "geoip.mmdb"
    installed.write_bytes(with_build_epoch(write_mmdb(tmp_path / "w.mmdb", world()), 1 << 62))
    config = write_config(tmp_path, {"geoip.database": str(installed), "geoip.update_url": downloads.url("/file")})
    refused = run_pcc("--config", config, "--check-config")
    assert refused.returncode == 2 and len(refused.stderr.splitlines()) == 1
    assert "build_epoch 4611686018427387904 is no date" in refused.stderr
    installed.write_bytes(b"\x00" * 4096)  # not even a database
    downloads.files["/file"] = (200, write_mmdb(tmp_path / "new.mmdb", world()), 0)
    result = run_pcc("--config", config, "--update-geoip")
    assert result.returncode == 0, result.stderr
    assert run_pcc("--config", config, "--check-config").returncode == 0


@pytest.mark.parametrize("url", ["http://download.example.net/x.mmdb", "ftp://127.0.0.1/x.mmdb"])
def test_update_url_must_be_https(tmp_path, url):
    result = run_pcc("--config", write_config(tmp_path, {"geoip.update_url": url}), "--check-config")
    assert result.returncode == 2 and "[geoip] update_url: must be an https:// URL" in result.stderr


def test_update_geoip_with_no_database_path_says_which_to_set(tmp_path):
    result = run_pcc("--config", write_config(tmp_path, {"geoip.database": ""}), "--update-geoip")
    assert result.returncode == 1 and "set it to the path pcc keeps its GeoIP file at" in result.stderr


def test_health_warns_of_geoip_data_dated_in_the_future(start_daemon, tmp_path):
    """A build date ahead is no age to be proud of: a broken or forged file."""
    path = tmp_path / "future.mmdb"
    write_mmdb(path, world(), built=datetime.datetime(2100, 1, 1, 12))
    daemon = start_daemon(**{"geoip.database": str(path)})
    result = run_pcc("--config", daemon.config_path, "--health")
    assert result.returncode == 1, result.stdout
    assert result.stdout.startswith("PCC WARNING - GeoIP data claims to be built ") and "forged" in result.stdout
