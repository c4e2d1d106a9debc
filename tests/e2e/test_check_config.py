"""Configuration: every key present, every value checked, one clear line on error."""

from conftest import ROOT, config_without, run_pcc, write_config


def test_missing_key_stops_the_daemon_with_one_line_and_non_zero_exit(tmp_path):
    result = run_pcc("-d", "--config", config_without(tmp_path, "policy", "action"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "broken.conf: [policy] action: key is missing" in result.stderr


def test_missing_file_and_garbage_file(tmp_path):
    result = run_pcc("-d", "--config", str(tmp_path / "nope.conf"))
    assert result.returncode == 2 and "nope.conf: cannot read the configuration" in result.stderr
    garbage = tmp_path / "garbage.conf"
    garbage.write_bytes(b"\xff\xfe not ini at all\n")
    result = run_pcc("-d", "--config", str(garbage))
    assert result.returncode == 2 and "garbage.conf" in result.stderr and "Traceback" not in result.stderr


def test_check_config_command(tmp_path, city_geoip_path):
    result = run_pcc("--check-config", "--config", str(ROOT / "pcc.conf"))
    assert result.returncode == 0 and "OK" in result.stdout
    assert "rule: more than 3 countries in 3 days -> HOLD" in result.stdout
    assert "impossible travel" not in result.stdout and "MONITOR" not in result.stdout
    both = write_config(tmp_path, {"policy.mode": "monitor", "policy.max_travel_speed_kmh": "900",
                                   "geoip.database": city_geoip_path}, name="both.conf")
    result = run_pcc("--check-config", "--config", both)
    assert result.returncode == 0, result.stderr
    assert "impossible travel: faster than 900 km/h -> notify" in result.stdout
    assert "MONITOR MODE: new blocks are only recorded and notified, mail flows" in result.stdout
    country_only = write_config(tmp_path, {"policy.max_travel_speed_kmh": "900"}, name="country.conf")
    result = run_pcc("--check-config", "--config", country_only)
    assert result.returncode == 2
    assert "[policy] max_travel_speed_kmh: needs City-level GeoIP data" in result.stderr


def test_help_explains_every_option():
    result = run_pcc("-h")
    assert result.returncode == 0
    for option in ("-d", "--config", "-v", "--stderr", "--check-config", "--allow", "--country", "--days"):
        assert option in result.stdout
