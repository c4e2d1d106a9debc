"""Configuration, in the process (config.load_settings): the shipped file is
valid, every key is required, each bad value is refused with one line naming
its section and key.  The command line's --check-config is e2e/test_check_config.py."""
import configparser
import dataclasses
import re

import pytest
from conftest import ROOT, config_without, write_config

from pcclib.cli import main
from pcclib.config import KEYS, LIST_KEYS, ConfigError, NetworkList, Settings, load_settings


def shipped_keys():
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(ROOT / "pcc.conf", encoding="utf-8")
    return [(section, key) for section in parser.sections() for key in parser[section]]


def test_shipped_config_is_valid_and_runs_on_embedded_defaults():
    settings = load_settings(str(ROOT / "pcc.conf"))
    assert (settings.host, settings.port) == ("127.0.0.1", 9999)
    assert settings.dbcon.startswith("sqlite:")
    assert settings.geoip_database == ""
    assert settings.action in ("REJECT", "HOLD")
    assert settings.how_many_different_countries == 3


NEW_KEYS = {(key.section, key.name) for key in KEYS if key.since}


@pytest.mark.parametrize("section, key", [pair for pair in shipped_keys() if pair not in NEW_KEYS])
def test_every_key_is_required(tmp_path, section, key):
    with pytest.raises(ConfigError) as error:
        load_settings(config_without(tmp_path, section, key))
    assert f"[{section}] {key}: key is missing" in str(error.value)
    assert "broken.conf" in str(error.value)


@pytest.mark.parametrize("section, key", sorted(NEW_KEYS))
def test_a_configuration_of_1_5_without_the_keys_added_since_still_starts(tmp_path, section, key):
    # each absent key means what pcc 1.5 did: nothing new
    as_in_1_5 = {("postfix", "queue_helper"): "", ("mail", "from"): "", ("mail", "starttls"): False,
                 ("mail", "tls_ca_file"): "", ("mail", "user"): "", ("mail", "password"): "", ("server", "socket"): "",
                 ("server", "socket_owner"): "", ("server", "socket_group"): "", ("server", "socket_mode"): 0o660,
                 ("server", "processes"): 1,
                 ("policy", "monitor_answer"): "DUNNO", ("limits", "messages_per_hour"): None,
                 ("limits", "messages_per_day"): None, ("limits", "recipients_per_hour"): None,
                 ("limits", "recipients_per_day"): None, ("limits", "action"): "BLOCK"}
    assert NEW_KEYS == set(as_in_1_5)
    (field,) = [entry.field for entry in KEYS if (entry.section, entry.name) == (section, key)]
    assert getattr(load_settings(config_without(tmp_path, section, key)), field) == as_in_1_5[section, key]


def test_a_configuration_of_1_5_without_a_limits_section_starts_with_every_limit_off(tmp_path):
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(ROOT / "pcc.conf", encoding="utf-8")
    parser.remove_section("limits")
    path = tmp_path / "pcc-1.5.conf"
    with open(path, "w") as config_file:
        parser.write(config_file)
    settings = load_settings(str(path))
    assert settings.volume_limits == () and settings.limit_action == "BLOCK"


@pytest.mark.parametrize("overrides, message", [
    ({"mail.from": "pcc at example.com"}, "[mail] from: 'pcc at example.com' is not an email address"),
    ({"mail.user": "pcc@example.com"}, "[mail] password: user and password go together"),
    ({"mail.password": "secret-1"}, "[mail] user: user and password go together"),
    ({"mail.mailsrv": "smtp.example.com", "mail.user": "pcc@example.com", "mail.password": "secret-1"},
     "[mail] starttls: must be yes with [mail] user: the password would cross the network to smtp.example.com"),
    ({"mail.tls_ca_file": "/nonexistent/ca.pem"}, "[mail] tls_ca_file: cannot read /nonexistent/ca.pem"),
])
def test_the_mail_settings_are_refused_in_one_line_when_they_do_not_go_together(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_settings(write_config(tmp_path, overrides))


def test_missing_section(tmp_path):
    path = tmp_path / "nosection.conf"
    path.write_text("[server]\nhost = 127.0.0.1\nport = 9999\n")
    with pytest.raises(ConfigError, match=r"nosection.conf: \[server\] max_request_bytes: key is missing"):
        load_settings(str(path))
    path.write_text("")
    with pytest.raises(ConfigError, match=r"section \[server\] is missing"):
        load_settings(str(path))


@pytest.mark.parametrize("dotted, value, message", [
    ("server.port", "abc", "[server] port: must be a whole number, got 'abc'"),
    ("server.port", "70000", "[server] port: must be between 0 and 65535"),
    ("server.port", "0", "[server] port: 0 (no TCP port) needs a [server] socket to listen on"),
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
    with pytest.raises(ConfigError) as error:
        load_settings(write_config(tmp_path, {dotted: value}))
    assert message in str(error.value)
    assert str(tmp_path / "pcc.conf") in str(error.value)


def test_notice_needs_a_mail_server(tmp_path):
    path = write_config(tmp_path, {"mail.notice": "admin@example.com", "mail.mailsrv": ""})
    with pytest.raises(ConfigError, match=r"\[mail\] mailsrv: must name an SMTP server"):
        load_settings(path)


def test_blank_values_mean_none(tmp_path):
    settings = load_settings(write_config(tmp_path, {
        "mail.domains": "", "mail.notice": "", "policy.ignorecountries": "", "policy.whitelisted": "",
        "policy.whitelistedips": "", "server.allowed_clients": "", "mail.mailport": "",
    }))
    assert settings.domains == frozenset() and settings.notice == ()
    assert settings.whitelistedips == () and settings.allowed_clients == ()
    assert settings.mailport == 25


def test_lists_are_parsed_and_normalised(tmp_path):
    settings = load_settings(write_config(tmp_path, {
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


def test_the_keys_new_in_1_1_may_all_be_blank(tmp_path):
    settings = load_settings(write_config(tmp_path, {
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
    with pytest.raises(ConfigError, match=r"\[server\] metrics_port: key is missing \(every key must be present"):
        load_settings(path)


@pytest.mark.parametrize("dotted, value, message", [
    ("server.port", "9999  # the port", "[server] port: has a comment after the value"),
    ("policy.reason", "Go away ; ask the admin", "[policy] reason: has a comment after the value"),
])
def test_a_comment_after_a_value_is_refused(tmp_path, dotted, value, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_settings(write_config(tmp_path, {dotted: value}))


def test_a_typo_that_replaces_a_key_is_named_as_the_typo_not_as_the_missing_key(tmp_path):
    path = config_without(tmp_path, "policy", "action")
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(path)
    parser.set("policy", "actoin", "HOLD")
    with open(path, "w") as config_file:
        parser.write(config_file)
    with pytest.raises(ConfigError, match=r"\[policy\] actoin: unknown key \(a typo\? did you mean action\?\)"):
        load_settings(path)


def test_every_setting_is_read_from_one_key_of_the_table():
    """pcc.conf(5) is written from KEYS: a setting read any other way would be missing there."""
    fields = {field.name for field in dataclasses.fields(Settings)} - {"config_path", "network_lists"}
    assert sorted(key.field for key in KEYS) == sorted(fields)
    assert {field.name for field in dataclasses.fields(NetworkList)} - {"label", "marker"} == \
        {key.field for key in LIST_KEYS}


def test_an_unknown_key_or_section_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"\[policy\] how_many_diferent_countries: unknown key \(a typo\?"):
        load_settings(write_config(tmp_path, {"policy.how_many_diferent_countries": "3"}))
    path = write_config(tmp_path, {})
    with open(path, "a") as config_file:
        config_file.write("\n[polcy]\naction = REJECT\n")
    with pytest.raises(ConfigError, match=r"unknown section \[polcy\]"):
        load_settings(path)


def test_timeout_goes_with_update_geoip_only():
    for arguments in (["-l", "--timeout", "3"], ["--update-geoip", "--timeout", "0"]):
        with pytest.raises(SystemExit) as refused:
            main(["--config", str(ROOT / "pcc.conf"), *arguments])
        assert refused.value.code == 2


@pytest.mark.parametrize("count_logins", ["yes", "no"])
def test_the_dovecot_port_needs_an_api_header(make_settings, count_logins):
    """Else anyone who can reach the Dovecot port could report logins "from"
    any country and block any account, or learn from `allow` which accounts
    are blocked (count_logins = no)."""
    with pytest.raises(ConfigError) as refused:
        make_settings(**{"dovecot.policy_port": "9997", "dovecot.count_logins": count_logins,
                         "dovecot.api_header": ""})
    assert "[dovecot] api_header: must be set with a policy_port" in str(refused.value)
    assert "openssl rand" in str(refused.value) and "auth_policy_server_api_header" in str(refused.value)
    make_settings(**{"dovecot.policy_port": "", "dovecot.count_logins": count_logins, "dovecot.api_header": ""})
    make_settings(**{"dovecot.policy_port": "9997", "dovecot.count_logins": "yes",
                     "dovecot.api_header": "Authorization: Basic cGNjOnNlY3JldA=="})


def test_a_refused_url_is_shown_without_its_secrets(make_settings):
    hook = "http://pcc:Hunter2-secret@hooks.example.com/services/T0ABCDEF/B0GHIJK/x9ZkQ3hV7tL2mN8pR4sW6yB1"
    with pytest.raises(ConfigError) as refused:
        make_settings(**{"notify.webhook_urls": hook})
    line = str(refused.value)
    assert "must be an https:// URL" in line and "hooks.example.com/services/T0ABCDEF/B0GHIJK/***" in line
    assert "Hunter2-secret" not in line and "x9ZkQ3hV7tL2mN8pR4sW6yB1" not in line


def test_the_doveadm_api_key_travels_in_clear_only_on_this_host(make_settings):
    key = {"dovecot.doveadm_api_key": "a-key-for-the-test"}
    with pytest.raises(ConfigError, match=r"\[dovecot\] doveadm_url: must be an https:// URL"):
        make_settings(**{"dovecot.doveadm_url": "http://mail.example.com:8080/doveadm/v1", **key})
    make_settings(**{"dovecot.doveadm_url": "http://127.0.0.1:8080/doveadm/v1", **key})
    make_settings(**{"dovecot.doveadm_url": "https://mail.example.com:8443/doveadm/v1", **key})
