"""Rules per domain and per account (rules.RuleBook): which Settings an
account is decided by, and what a rule may say."""
import configparser
import datetime as dt

import pytest
from conftest import ROOT, counted_request

from pcclib.config import ConfigError, load_settings
from pcclib.decision import AccountHistory, CountrySeen, decide
from pcclib.rules import RULE_NAMES, Rule, RuleBook, read_rule

SET_AT = dt.datetime(2026, 3, 1, tzinfo=dt.timezone.utc)
NOW = SET_AT + dt.timedelta(days=1)


def book(*rules):
    return RuleBook(Rule(scope, name, text, SET_AT, "root") for scope, name, text in rules)


def test_the_account_over_its_domain_over_pcc_conf(make_settings):
    settings = make_settings()
    rules = book(("example.org", "how_many_different_countries", "1"), ("example.org", "limits.action", "defer"),
                 ("example.org", "messages_per_hour", "50"), ("ceo@example.org", "how_many_different_countries", "4"))
    ceo, staff = rules.settings_for("ceo@example.org", settings), rules.settings_for("bob@example.org", settings)
    assert (ceo.how_many_different_countries, ceo.messages_per_hour, ceo.limit_action) == (4, 50, "DEFER")
    assert (staff.how_many_different_countries, staff.messages_per_hour) == (1, 50)
    assert rules.settings_for("eve@example.net", settings) is settings  # no rule: pcc.conf's, as they are
    assert rules.where_from("ceo@example.org") == {"how_many_different_countries": "ceo@example.org",
                                                   "limit_action": "example.org", "messages_per_hour": "example.org"}
    assert rules.sets_limits and not book(("example.org", "mode", "monitor")).sets_limits


def test_a_domains_rule_changes_the_decision(make_settings):
    settings = make_settings()
    seen = (CountrySeen("FR", NOW - dt.timedelta(hours=1), NOW - dt.timedelta(hours=1), "192.0.2.1"),)
    history = AccountHistory(sightings=seen)
    strict = book(("example.com", "how_many_different_countries", "1")).settings_for("alice@example.com", settings)
    assert decide(counted_request("GB"), history, settings, NOW).action == "DUNNO"
    assert decide(counted_request("GB"), history, strict, NOW).blocks


def test_notice_adds_the_domains_admins_to_the_sites(make_settings):
    settings = make_settings(mail__notice="admin@example.net", mail__mailsrv="127.0.0.1")
    rules = book(("example.org", "notice", "it@example.org"), ("ceo@example.org", "notice", "sec@example.org"))
    assert rules.notice_for("ceo@example.org") == ("it@example.org", "sec@example.org")
    assert rules.settings_for("bob@example.org", settings).notice == ("admin@example.net",)  # the site's stay


@pytest.mark.parametrize("name, text, message", [
    ("messages_per_hour", "0", "must be between 1 and"),
    ("in_how_much_time_in_days", "-1", "must be more than 0"),
    ("how_many_different_countries", "", "must not be blank"),
    ("ignorecountries", "GB,XX", "'XX' is not an ISO 3166"),
    ("notice", "not-an-address", "is not an email address"),
    ("limits.action", "drop", "must be one of BLOCK, DEFER, NOTIFY"),
    ("whitelisted", "x@example.org", "is not a key a rule may set"),
])
def test_a_rule_is_refused_for_what_pcc_conf_would_be(name, text, message):
    with pytest.raises(ConfigError, match=message):
        read_rule(name, text)


def test_each_rule_reads_the_shipped_value_as_pcc_conf_does():
    """A rule written as the shipped pcc.conf writes the key sets what the file sets."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(ROOT / "pcc.conf", encoding="utf-8")
    shipped = load_settings(str(ROOT / "pcc.conf"))
    for name, (section, key) in RULE_NAMES.items():
        field, value = read_rule(name, parser.get(section, key))
        assert value == getattr(shipped, field), name


def test_a_stored_rule_a_newer_pcc_wrote_is_set_aside(make_settings, caplog):
    rules = book(("example.org", "colour", "blue"), ("example.org", "mode", "monitor"))
    assert rules.settings_for("bob@example.org", make_settings()).mode == "MONITOR"
    assert "rule of example.org ignored" in caplog.text
