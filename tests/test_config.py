"""Configuration: every key present, every value checked, one clear line on error."""
import configparser
import subprocess
import sys

import pytest
from conftest import ROOT, write_config

import pcc


def shipped_keys():
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(ROOT / "pcc.conf", encoding="utf-8")
    return [(section, key) for section in parser.sections() for key in parser[section]]


def run_pcc(*arguments):
    return subprocess.run([sys.executable, str(ROOT / "pcc.py"), *arguments],
                          capture_output=True, text=True, timeout=60)


def config_without(tmp_path, section, key):
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(ROOT / "pcc.conf", encoding="utf-8")
    parser.remove_option(section, key)
    path = tmp_path / "broken.conf"
    with open(path, "w") as config_file:
        parser.write(config_file)
    return str(path)


def test_shipped_config_is_valid_and_runs_on_embedded_defaults():
    settings = pcc.load_settings(str(ROOT / "pcc.conf"))
    assert (settings.host, settings.port) == ("127.0.0.1", 9999)
    assert settings.dbcon.startswith("sqlite:")
    assert settings.geoip_database == ""
    assert settings.action in ("REJECT", "HOLD")
    assert settings.how_many_different_countries == 3


@pytest.mark.parametrize("section, key", shipped_keys())
def test_every_key_is_required(tmp_path, section, key):
    with pytest.raises(pcc.ConfigError) as error:
        pcc.load_settings(config_without(tmp_path, section, key))
    assert f"[{section}] {key}: key is missing" in str(error.value)
    assert "broken.conf" in str(error.value)


def test_missing_key_stops_the_daemon_with_one_line_and_non_zero_exit(tmp_path):
    result = run_pcc("-d", "--config", config_without(tmp_path, "policy", "action"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "broken.conf: [policy] action: key is missing" in result.stderr


def test_missing_section(tmp_path):
    path = tmp_path / "nosection.conf"
    path.write_text("[server]\nhost = 127.0.0.1\nport = 9999\n")
    with pytest.raises(pcc.ConfigError, match=r"nosection.conf: \[server\] max_request_bytes: key is missing"):
        pcc.load_settings(str(path))
    path.write_text("")
    with pytest.raises(pcc.ConfigError, match=r"section \[server\] is missing"):
        pcc.load_settings(str(path))


def test_missing_file_and_garbage_file(tmp_path):
    result = run_pcc("-d", "--config", str(tmp_path / "nope.conf"))
    assert result.returncode == 2 and "nope.conf: cannot read the configuration" in result.stderr
    garbage = tmp_path / "garbage.conf"
    garbage.write_bytes(b"\xff\xfe not ini at all\n")
    result = run_pcc("-d", "--config", str(garbage))
    assert result.returncode == 2 and "garbage.conf" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("dotted, value, message", [
    ("server.port", "abc", "[server] port: must be a whole number, got 'abc'"),
    ("server.port", "70000", "[server] port: must be between 1 and 65535"),
    ("server.port", "", "[server] port: must not be blank"),
    ("server.host", "", "[server] host: must not be blank"),
    ("server.allowed_clients", "10.0.0.0/33", "[server] allowed_clients: '10.0.0.0/33' is not an IP"),
    ("db.dbcon", "", "[db] dbcon: must not be blank"),
    ("db.dbcon", "not a url", "[db] dbcon: is not an SQLAlchemy database URL"),
    ("db.db_error_action", "OK", "[db] db_error_action: must be one of DUNNO, DEFER_IF_PERMIT"),
    ("geoip.database", "/nonexistent/x.mmdb", "[geoip] database: no such file"),
    ("mail.mailport", "-1", "[mail] mailport: must be between 1 and 65535"),
    ("mail.notice", "not-an-address", "[mail] notice: 'not-an-address' is not an email address"),
    ("policy.action", "DROP", "[policy] action: must be one of REJECT, HOLD, got 'DROP'"),
    ("policy.action", "", "[policy] action: must not be blank"),
    ("policy.how_many_different_countries", "0", "[policy] how_many_different_countries: must be between 1"),
    ("policy.how_many_different_countries", "2.5", "[policy] how_many_different_countries: must be a whole number"),
    ("policy.in_how_much_time_in_days", "0", "[policy] in_how_much_time_in_days: must be more than 0"),
    ("policy.in_how_much_time_in_days", "three", "[policy] in_how_much_time_in_days: must be a number"),
    ("policy.ignorecountries", "DE, XX", "[policy] ignorecountries: 'XX' is not an ISO 3166"),
    ("policy.ignorecountries", "GER", "[policy] ignorecountries: 'GER' is not an ISO 3166"),
    ("policy.whitelistedips", "192.0.2.0/24, 2001:db8::/129", "[policy] whitelistedips: '2001:db8::/129'"),
    ("policy.whitelistedips", "example.com", "[policy] whitelistedips: 'example.com' is not an IP"),
    ("policy.reason", "two\n  lines", "[policy] reason: must be one line"),
])
def test_bad_values_are_named(tmp_path, dotted, value, message):
    with pytest.raises(pcc.ConfigError) as error:
        pcc.load_settings(write_config(tmp_path, {dotted: value}))
    assert message in str(error.value)
    assert str(tmp_path / "pcc.conf") in str(error.value)


def test_notice_needs_a_mail_server(tmp_path):
    path = write_config(tmp_path, {"mail.notice": "admin@example.com", "mail.mailsrv": ""})
    with pytest.raises(pcc.ConfigError, match=r"\[mail\] mailsrv: must name an SMTP server"):
        pcc.load_settings(path)


def test_blank_values_mean_none(tmp_path):
    settings = pcc.load_settings(write_config(tmp_path, {
        "mail.domains": "", "mail.notice": "", "policy.ignorecountries": "", "policy.whitelisted": "",
        "policy.whitelistedips": "", "server.allowed_clients": "", "mail.mailport": "",
    }))
    assert settings.domains == frozenset() and settings.notice == ()
    assert settings.whitelistedips == () and settings.allowed_clients == ()
    assert settings.mailport == 25


def test_lists_are_parsed_and_normalised(tmp_path):
    settings = pcc.load_settings(write_config(tmp_path, {
        "mail.domains": "Example.COM example.org", "policy.ignorecountries": "de,at",
        "policy.whitelisted": "Boss@Example.com", "policy.whitelistedips": "192.0.2.1, 2001:db8::/32",
        "mail.notice": "a@example.com, b@example.com", "policy.action": "hold",
    }))
    assert settings.domains == {"example.com", "example.org"}
    assert settings.ignorecountries == {"DE", "AT"}
    assert settings.whitelisted == {"boss@example.com"}
    assert [str(n) for n in settings.whitelistedips] == ["192.0.2.1/32", "2001:db8::/32"]
    assert settings.notice == ("a@example.com", "b@example.com")
    assert settings.action == "HOLD"


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


def test_the_keys_new_in_1_1_may_all_be_blank(tmp_path):
    settings = pcc.load_settings(write_config(tmp_path, {
        "server.metrics_port": "", "policy.mode": "", "policy.max_travel_speed_kmh": "",
        "policy.travel_accuracy_radius_km": "", "policy.impossible_travel_action": "",
    }))
    assert settings.metrics_port is None and settings.mode == "ENFORCE" and not settings.monitoring
    assert settings.max_travel_speed_kmh is None and settings.travel_accuracy_radius_km == 0
    assert settings.impossible_travel_action == "NOTIFY"


def test_a_1_0_config_names_the_first_missing_new_key(tmp_path):
    path = write_config(tmp_path, {})
    text = "".join(line for line in open(path) if not line.startswith("metrics_port"))
    open(path, "w").write(text)
    with pytest.raises(pcc.ConfigError, match=r"\[server\] metrics_port: key is missing \(every key must be present"):
        pcc.load_settings(path)
