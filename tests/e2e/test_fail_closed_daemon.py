"""Faults that must never open the blocked list (#15 items 1-3, 12): a GeoIP file
that cannot answer, a value the database refuses, a damaged or unwritable
spool, a corrupt GeoIP file, and any exception nobody foresaw."""
import json
import os
import signal
import time

import pytest
import sqlalchemy as sa
from conftest import (
    COUNTRY_NETWORKS,
    TcpProxy,
    blocked_logins,
    ip_in,
    run_pcc,
    spool_entry,
    wait_for_log,
    walk,
    write_config,
)


def write_ipv4_only_database(path) -> str:
    from mmdb_writer import MMDBWriter
    from netaddr import IPSet

    writer = MMDBWriter(ip_version=4, database_type="GeoLite2-Country", languages=["en"])
    for code, (v4, _v6) in COUNTRY_NETWORKS.items():
        writer.insert_network(IPSet([v4]), {"country": {"iso_code": code}})
    writer.to_db_file(str(path))
    return str(path)


def test_a_blocked_account_stays_blocked_from_an_address_the_geoip_file_cannot_look_up(start_daemon, tmp_path):
    daemon = start_daemon(**{"geoip.database": write_ipv4_only_database(tmp_path / "v4.mmdb"),
                             "policy.action": "REJECT"})
    assert "has no IPv6 data" in daemon.log()
    client = daemon.client()
    assert walk(client, "alice@example.com", ["GB", "US", "FR", "DE"])[-1].startswith("REJECT")
    assert client.ask("alice@example.com", ip_in("GB", version=6)).startswith("REJECT")
    assert client.ask("bob@example.com", ip_in("GB", version=6)) == "DUNNO"  # no country: not counted
    assert "GeoIP lookup of 2a0c:1::1" in daemon.log() and "failed" in daemon.log()
    assert "internal error" not in daemon.log()


def test_a_zone_id_longer_than_any_address_is_not_an_outage(start_daemon, db_url):
    daemon = start_daemon(**{"db.dbcon": db_url, "policy.action": "REJECT"})
    client = daemon.client()
    walk(client, "alice@example.com", ["GB", "US", "FR"])
    zoned = ip_in("DE", version=6) + "%" + "z" * 60
    assert client.ask("alice@example.com", zoned).startswith("REJECT")
    walk(client, "bob@example.com", ["GB", "US", "FR"])  # the database is still used for everyone
    assert client.ask("bob@example.com", ip_in("DE")).startswith("REJECT")
    assert blocked_logins(db_url) == {"alice@example.com", "bob@example.com"}
    assert "failed, answering from memory" not in daemon.log()


def test_damaged_spool_entries_are_set_aside_and_the_good_ones_written(start_daemon, db_url, tmp_path):
    spool = tmp_path / "damaged.jsonl"
    missing_key = {key: value for key, value in spool_entry("mallory@example.com").items() if key != "sighting"}
    spool.write_text(json.dumps(spool_entry("alice@example.com")) + "\n" + json.dumps(missing_key) + "\n"
                     + "not json at all\n" + json.dumps(spool_entry("carol@example.com"))[:40])  # torn: crash
    daemon = start_daemon(**{"db.dbcon": db_url, "db.spool_file": str(spool), "policy.action": "REJECT"})
    assert daemon.client().ask("alice@example.com", ip_in("GB")).startswith("REJECT")
    assert blocked_logins(db_url) == {"alice@example.com"}
    assert spool.read_text() == ""
    rejected = (tmp_path / "damaged.jsonl.rejected").read_text().splitlines()
    assert len(rejected) == 3 and "mallory@example.com" in rejected[0]
    assert daemon.log().count("moved to") == 3


@pytest.mark.parametrize("backend", ["mariadb", "postgresql"])
def test_an_entry_the_database_refuses_does_not_hold_up_the_others(start_daemon, tmp_path, backend):
    from conftest import SERVER_DATABASES, fresh_database

    url = fresh_database(SERVER_DATABASES[backend])
    spool = tmp_path / "refused.jsonl"
    too_long = "x" * 300 + "@example.com"  # longer than the login column
    spool.write_text(json.dumps(spool_entry(too_long)) + "\n" + json.dumps(spool_entry("alice@example.com")) + "\n")
    daemon = start_daemon(**{"db.dbcon": url, "db.spool_file": str(spool), "policy.action": "REJECT"})
    client = daemon.client()
    assert client.ask("alice@example.com", ip_in("GB")).startswith("REJECT")
    assert blocked_logins(url) == {"alice@example.com"}
    assert too_long in (tmp_path / "refused.jsonl.rejected").read_text()
    assert spool.read_text() == ""
    assert walk(client, "bob@example.com", ["GB", "US", "FR", "DE"])[-1].startswith("REJECT")
    assert "failed, answering from memory" not in daemon.log()


def test_a_spool_that_cannot_be_written_keeps_the_block(start_daemon, shared_db_url, tmp_path):
    url = sa.engine.make_url(shared_db_url)
    proxy = TcpProxy(url.host, url.port)
    try:
        (tmp_path / "a-file").write_text("")
        unwritable = str(tmp_path / "a-file" / "spool.jsonl")  # its "directory" is a file
        daemon = start_daemon(**{"db.dbcon": url.set(host="127.0.0.1", port=proxy.port).render_as_string(
            hide_password=False), "db.spool_file": unwritable, "policy.action": "REJECT"})
        client = daemon.client()
        walk(client, "alice@example.com", ["GB", "US", "FR"])
        proxy.cut()
        assert client.ask_like_postfix("alice@example.com", ip_in("DE")).startswith("REJECT")
        assert client.ask_like_postfix("alice@example.com", ip_in("GB")).startswith("REJECT")
        assert "cannot be written" in daemon.log() and "kept in memory only" in daemon.log()
        proxy.restore()
        deadline = time.monotonic() + 15
        while "alice@example.com" not in blocked_logins(shared_db_url):  # written when the database is back
            assert time.monotonic() < deadline, daemon.log()[-3000:]
            client.ask_like_postfix("dave@example.com", ip_in("GB"))
            time.sleep(0.2)
    finally:
        proxy.close()


def test_a_corrupt_geoip_file_is_one_line_at_start_and_a_refused_reload(start_daemon, tmp_path, geoip_path):
    corrupt = tmp_path / "corrupt.mmdb"
    corrupt.write_bytes(b"\x00" * 4096)
    config = write_config(tmp_path, {"geoip.database": str(corrupt), "db.dbcon": f"sqlite:///{tmp_path}/c.db"})
    for command in ("--check-config", "-d"):
        result = run_pcc("--config", config, "--stderr", command)
        assert result.returncode == 2, result
        assert result.stderr.count("\n") == 1 and "is not a MaxMind-format database" in result.stderr
    live = tmp_path / "live.mmdb"
    live.write_bytes(open(geoip_path, "rb").read())
    daemon = start_daemon(**{"geoip.database": str(live)})
    os.replace(corrupt, live)  # renamed over, as geoipupdate does
    daemon.process.send_signal(signal.SIGHUP)
    wait_for_log(daemon, "reload refused")
    assert daemon.process.poll() is None
    assert daemon.client().ask("alice@example.com", ip_in("GB")) == "DUNNO"
