"""The Postfix policy protocol: parsing a request, the reply, what a login is,
and how untrusted text is escaped before it reaches a log line, a mail or a
terminal."""
import logging
import shlex

import pytest

from pcclib.common import escape_controls, normalise_login, quoted
from pcclib.protocol import MAX_ATTRIBUTE_VALUE, PolicyRequest, format_reply, parse_request


def test_parse_request_keeps_known_and_unknown_attributes():
    request = parse_request(["request=smtpd_access_policy", "sasl_username=Bob@Example.org",
                                 "client_address=192.0.2.1", "future_attribute=x=y", "sender="])
    assert request.request == "smtpd_access_policy"
    assert request.login == "bob@example.org"
    assert request.attributes["future_attribute"] == "x=y"
    assert request.sender == ""


def test_parse_request_skips_garbage_and_cuts_long_values():
    request = parse_request(["no equals sign", "=value without name", "sasl_username=a\x00b\rc",
                                 "sasl_username=last@example.com", "recipient=" + "r" * 5000])
    assert request.sasl_username == "last@example.com"
    assert len(request.recipient) == MAX_ATTRIBUTE_VALUE


def test_reply_is_always_one_line():
    assert format_reply("REJECT bad\r\nX-Injected: yes") == b"action=REJECT bad X-Injected: yes\n\n"


def test_logins_are_lower_cased_in_ascii_only_and_keep_their_control_characters():
    assert normalise_login(" Alice@Example.COM ") == "alice@example.com"
    assert normalise_login("\u212aarl@example.com") != "karl@example.com"
    assert normalise_login("ali\tce@example.com") == "ali\\x09ce@example.com"
    assert parse_request(["sasl_username=ali\tce@example.com"]).login == "ali\\x09ce@example.com"


@pytest.mark.parametrize("wrapped", [
    "2002:1401:0001::1",  # 6to4 of 20.1.0.1
    "64:ff9b::1401:1",  # NAT64 of 20.1.0.1
    "2001:0:4136:e378:8000:63bf:ebfe:fefe",  # Teredo; client 20.1.1.1 (bits inverted)
    "::ffff:20.1.0.1",
])
def test_ipv4_inside_ipv6_counts_as_the_ipv4_address(wrapped, geoip):
    request = PolicyRequest(client_address=wrapped)
    assert request.client_ip.version == 4
    assert geoip.country(request.client_ip).code == "GB"


@pytest.mark.parametrize("character, shown", [
    ("\u2028", "\\u2028"),  # line separator (Zl)
    ("\u2029", "\\u2029"),  # paragraph separator (Zp)
    ("\u0085", "\\x85"),  # next line (a C1 control, Cc)
    ("\u009b", "\\x9b"),  # CSI: starts a terminal escape sequence (Cc)
    ("\u202e", "\\u202e"),  # right-to-left override (Cf, bidi)
    ("\u200b", "\\u200b"),  # zero-width space (Cf)
    ("\x1b", "\\x1b"),  # ESC
])
def test_every_non_printable_character_is_escaped_the_same_way_everywhere(character, shown):
    login = f"ali{character}ce@example.com"
    assert escape_controls(login) == f"ali{shown}ce@example.com"
    assert parse_request([f"sasl_username={login}"]).login == f"ali{shown}ce@example.com"
    assert normalise_login(f"ali{shown}ce@example.com") == f"ali{shown}ce@example.com"  # what -s takes back
    assert escape_controls("alicé@example.com") == "alicé@example.com"  # printable stays as it is


def test_a_value_cannot_pass_for_more_fields_of_the_decision_line(make_settings, caplog):
    from conftest import daemon_parts

    settings = make_settings()
    service = daemon_parts(settings).service
    forged = 'mallory x" client=198.51.100.7 country=RU decision=HOLD'
    caplog.set_level(logging.INFO, logger="pcc")
    service.answer(parse_request(["request=smtpd_access_policy", f"sasl_username={forged}",
                                  "client_address=20.1.0.1 country=RU"]))
    (line,) = [record.getMessage() for record in caplog.records if record.getMessage().startswith("login=")]
    head = line.split(" reason=", 1)[0]
    fields = dict(word.split("=", 1) for word in shlex.split(head))
    assert fields == {"login": forged.lower(), "client": "20.1.0.1 country=RU", "country": "-", "decision": "DUNNO"}
    assert quoted("alice@example.com") == "alice@example.com" and quoted("") == '""'
