"""Hostile or broken input in the process, by property: the parser takes any
lines, the reply is one line whatever the text, the whole answer path never
raises; JSON nested too deep never reaches json.  Real sockets and floods are
e2e/test_hostile_clients.py and e2e/test_hardening.py."""

import time

import pytest
from conftest import free_port
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from pcclib.config import load_settings
from pcclib.protocol import MAX_ATTRIBUTE_VALUE, format_reply, parse_request
from pcclib.server import PolicyServer

text_lines = st.lists(st.text(max_size=300), max_size=60)


@given(text_lines)
def test_parser_accepts_any_lines(lines):
    request = parse_request(lines)
    assert all(len(value) <= MAX_ATTRIBUTE_VALUE for value in request.attributes.values())
    for value in request.attributes.values():
        assert "\n" not in value and "\r" not in value and "\x00" not in value
    assert request.client_ip is None or request.client_ip.version in (4, 6)  # never raises
    assert request.login == request.login.strip().lower()


@given(st.text(max_size=500))
def test_reply_is_one_line_whatever_the_text(text):
    reply = format_reply(text)
    assert reply.endswith(b"\n\n") and reply.count(b"\n") == 2 and b"\r" not in reply


@given(st.dictionaries(st.sampled_from(["request", "sasl_username", "client_address", "sender", "x"]),
                       st.text(max_size=80), max_size=5),
       st.lists(st.binary(max_size=100), max_size=5))
@hypothesis_settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_the_whole_answer_path_never_raises(service_server, attributes, garbage):
    lines = [f"{name}={value}" for name, value in attributes.items()]
    lines += [chunk.decode("utf-8", "replace") for chunk in garbage]
    reply = service_server.answer_request([line for line in lines if line])
    assert reply.startswith(b"action=") and reply.count(b"\n") == 2


@pytest.fixture(scope="module")
def service_server(tmp_path_factory, geoip_path):
    """PolicyServer.answer on a real service and SQLite file, without a socket."""
    from conftest import daemon_parts, write_config

    directory = tmp_path_factory.mktemp("hostile")
    settings = load_settings(write_config(directory, {
        "db.dbcon": f"sqlite:///{directory}/pcc.sqlite3", "geoip.database": geoip_path,
        "db.spool_file": "", "server.port": str(free_port())}))
    server = PolicyServer(settings, daemon_parts(settings).service)
    yield server
    server.server_close()


def test_json_nested_deeper_than_asked_never_reaches_json():
    """Brackets in strings (escaped quotes too) do not count; a quote run with
    backslashes costs one pass, not one per quote."""
    from pcclib.common import json_nesting_within

    assert json_nesting_within('{"login": "a[{b", "note": "\\"[["}', 1)
    assert not json_nesting_within('{"login": ["alice"]}', 1)
    assert not json_nesting_within('{"login": "a\\\\", "x": [1]}', 1)  # an escaped backslash ends the string
    assert not json_nesting_within("[" * 16000, 1)
    assert json_nesting_within('[["doveadmResponse", [{"count": "0"}], "pcc"]]', 4)
    started = time.monotonic()
    assert json_nesting_within('"\\' * 8000, 1)
    assert time.monotonic() - started < 0.5
