"""Travel passes: pcc.py --allow LOGIN --country FR,DE --days 14."""
import json

import pytest
from conftest import ip_in, pcc_command, wait_until_visible

# --- the admin command with a running daemon ----------------------------------------


def test_allow_a_trip(start_daemon, sqlite_url, smtp_sink):
    daemon = start_daemon(**{"db.dbcon": sqlite_url, "policy.action": "REJECT", "mail.notice": "admin@example.com",
                             "mail.mailsrv": "127.0.0.1", "mail.mailport": smtp_sink.port})
    client = daemon.client()
    assert client.ask("alice@example.com", ip_in("GB")) == "DUNNO"
    output = pcc_command(daemon.config_path, "--allow", "Alice@Example.com", "--country", "fr, de,SE",
                         "--days", "14").stdout
    assert output.startswith("travel pass for alice@example.com: DE, FR, SE do not count until ")
    (mail,) = [m for _r, m in smtp_sink.wait_for(1)]
    assert mail["Subject"] == "pcc: travel pass for alice@example.com (DE, FR, SE)"
    wait_until_visible()  # the daemon had alice in memory
    # a tour of six countries, three of them passed: still only three count
    answers = [client.ask("alice@example.com", ip_in(country)) for country in ("FR", "DE", "SE", "US", "JP")]
    assert answers == ["DUNNO"] * 5
    assert "reason=not counted: travel pass for FR until" in daemon.log()
    assert client.ask("alice@example.com", ip_in("BR")).startswith("REJECT")  # a fourth counted country
    shown = pcc_command(daemon.config_path, "-s", "alice@example.com").stdout
    assert "travel pass FR: active until" in shown and "by " in shown
    passes = json.loads(pcc_command(daemon.config_path, "-s", "alice@example.com", "--json").stdout)["travel_passes"]
    assert [(p["country"], p["active"]) for p in passes] == [("DE", True), ("FR", True), ("SE", True)]
    # another account is not covered by alice's pass
    for country in ("GB", "US", "JP"):
        client.ask("bob@example.com", ip_in(country))
    assert client.ask("bob@example.com", ip_in("FR")).startswith("REJECT")


def test_end_a_pass_early(start_daemon, sqlite_url):
    daemon = start_daemon(**{"db.dbcon": sqlite_url, "policy.action": "REJECT"})
    client = daemon.client()
    pcc_command(daemon.config_path, "--allow", "alice@example.com", "--country", "FR", "--days", "3")
    for country in ("GB", "US", "JP", "FR"):
        assert client.ask("alice@example.com", ip_in(country)) == "DUNNO"
    output = pcc_command(daemon.config_path, "--allow", "alice@example.com", "--country", "FR", "--days", "0").stdout
    assert output.strip() == "travel pass of alice@example.com for FR ended"
    wait_until_visible()
    assert client.ask("alice@example.com", ip_in("FR")).startswith("REJECT")
    assert "travel pass FR: expired" in pcc_command(daemon.config_path, "-s", "alice@example.com").stdout


@pytest.mark.parametrize("arguments, code, message", [
    (["--allow", "a@example.com", "--days", "3"], 2, "--allow needs --country and --days"),
    (["--allow", "a@example.com", "--country", "FR"], 2, "--allow needs --country and --days"),
    (["-l", "--country", "FR"], 2, "--country goes with --allow"),
    (["--allow", "a@example.com", "--country", "XX,FR", "--days", "3"], 1, "XX is not one"),
    (["--allow", "a@example.com", "--country", ",", "--days", "3"], 1, "give ISO 3166 two-letter country codes"),
    (["--allow", "a@example.com", "--country", "FR", "--days", "400"], 1, "a travel pass lasts 0 to 366 days"),
    (["--allow", "a@example.com", "--country", "FR", "--days", "-1"], 1, "a travel pass lasts 0 to 366 days"),
    (["--allow", "a b", "--country", "FR", "--days", "1"], 1, "'a b' is not a login"),
])
def test_bad_allow_arguments(tmp_path, arguments, code, message):
    from conftest import write_config

    config = write_config(tmp_path, {"db.dbcon": f"sqlite:///{tmp_path}/pcc.sqlite3"})
    assert message in pcc_command(config, *arguments, expect=code).stderr


def test_a_pass_for_an_account_never_seen_is_shown(tmp_path):
    from conftest import write_config

    config = write_config(tmp_path, {"db.dbcon": f"sqlite:///{tmp_path}/pcc.sqlite3"})
    pcc_command(config, "--allow", "new@example.com", "--country", "JP", "--days", "7")
    shown = pcc_command(config, "-s", "new@example.com").stdout
    assert shown.startswith("new@example.com: not blocked") and "travel pass JP: active until" in shown
    assert "not blocked; nothing to unblock" in pcc_command(config, "-u", "new@example.com").stdout
