"""Hostile or broken input: no exception escapes, the daemon keeps serving,
and a misbehaving client only ever loses its own connection."""
import socket
import time

import pytest
from conftest import all_at_once, encode_request, free_port, ip_in, policy_request
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

import pcc

text_lines = st.lists(st.text(max_size=300), max_size=60)


@given(text_lines)
def test_parser_accepts_any_lines(lines):
    request = pcc.parse_request(lines)
    assert all(len(value) <= pcc.MAX_ATTRIBUTE_VALUE for value in request.attributes.values())
    for value in request.attributes.values():
        assert "\n" not in value and "\r" not in value and "\x00" not in value
    assert request.client_ip is None or request.client_ip.version in (4, 6)  # never raises
    assert request.login == request.login.strip().lower()


@given(st.text(max_size=500))
def test_reply_is_one_line_whatever_the_text(text):
    reply = pcc.format_reply(text)
    assert reply.endswith(b"\n\n") and reply.count(b"\n") == 2 and b"\r" not in reply


@given(st.dictionaries(st.sampled_from(["request", "sasl_username", "client_address", "sender", "x"]),
                       st.text(max_size=80), max_size=5),
       st.lists(st.binary(max_size=100), max_size=5))
@hypothesis_settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_the_whole_answer_path_never_raises(service_server, attributes, garbage):
    lines = [f"{name}={value}" for name, value in attributes.items()]
    lines += [chunk.decode("utf-8", "replace") for chunk in garbage]
    reply = service_server.answer([line for line in lines if line])
    assert reply.startswith(b"action=") and reply.count(b"\n") == 2


@pytest.fixture(scope="module")
def service_server(tmp_path_factory, geoip_path):
    """PolicyServer.answer on a real service and SQLite file, without a socket."""
    from conftest import write_config

    directory = tmp_path_factory.mktemp("hostile")
    settings = pcc.load_settings(write_config(directory, {
        "db.dbcon": f"sqlite:///{directory}/pcc.sqlite3", "geoip.database": geoip_path,
        "db.spool_file": "", "server.port": str(free_port())}))
    service = pcc.PolicyService(settings, pcc.Store(settings.dbcon), pcc.GeoIP(geoip_path), pcc.Notifier(settings))
    server = pcc.PolicyServer(settings, service)
    yield server
    server.server_close()


@pytest.fixture
def daemon(start_daemon):
    return start_daemon(**{"server.idle_timeout": "2", "policy.action": "REJECT"})


def test_odd_but_valid_requests(daemon):
    client = daemon.client()
    # duplicated attributes: the last one counts
    assert client.ask("alice@example.com", ip_in("GB"), sasl_username="alice@example.com") == "DUNNO"
    # empty and "unknown" client addresses are not counted
    assert client.ask("alice@example.com", "") == "DUNNO"
    assert client.ask("alice@example.com", "unknown") == "DUNNO"
    # an IPv4-mapped IPv6 address counts as its IPv4 country
    assert client.ask("alice@example.com", "::ffff:" + ip_in("US")) == "DUNNO"
    assert client.ask("alice@example.com", ip_in("FR")) == "DUNNO"
    assert client.ask("alice@example.com", "::ffff:" + ip_in("DE")).startswith("REJECT")
    log = daemon.log()
    assert "reason=not counted: client address is not an IP address" in log


def test_a_1_mb_line_and_100k_attributes_lose_only_their_connection(daemon):
    bystander = daemon.client()
    for payload in (b"sasl_username=" + b"x" * 1024 * 1024 + b"\n\n",
                    b"".join(b"a%d=1\n" % n for n in range(100000)) + b"\n"):
        hostile = daemon.client()
        try:
            hostile.send(payload)
        except OSError:
            pass  # the server may close before all of it is sent
        with pytest.raises((ConnectionError, OSError)):
            hostile.reply()
        assert bystander.ask("bob@example.com", ip_in("GB")) == "DUNNO"
    assert daemon.log().count("request larger than max_request_bytes") == 2


def test_a_client_sending_one_byte_per_second_is_cut_off(daemon):
    slow = daemon.client()
    bystander = daemon.client()
    payload = encode_request(policy_request("alice@example.com", ip_in("GB")))
    started = time.monotonic()
    closed = False
    for byte in payload:
        try:
            slow.send(bytes([byte]))
        except OSError:
            closed = True
            break
        assert bystander.ask("bob@example.com", ip_in("GB")) == "DUNNO"
        time.sleep(0.5)
        if time.monotonic() - started > 6:
            break
    if not closed:
        with pytest.raises((ConnectionError, OSError)):
            slow.reply()
    assert time.monotonic() - started < 8
    assert "did not complete its request within 2 s, closing" in daemon.log()


def test_a_client_that_never_sends_is_closed_after_idle_timeout(daemon):
    silent = daemon.client()
    time.sleep(2.5)
    assert silent.sock.recv(1) == b""
    assert "idle for 2 s, closing" in daemon.log()


def test_1000_idle_connections_do_not_stop_a_new_client(start_daemon):
    daemon = start_daemon()
    idle = [socket.create_connection(("127.0.0.1", daemon.port)) for _ in range(1000)]
    try:
        started = time.monotonic()
        assert daemon.client().ask("alice@example.com", ip_in("GB")) == "DUNNO"
        assert time.monotonic() - started < 1.0
    finally:
        for sock in idle:
            sock.close()


def test_cr_lf_cannot_inject_a_reply_line_or_a_mail_header(start_daemon, smtp_sink):
    daemon = start_daemon(**{"policy.action": "REJECT", "mail.notice": "admin@example.com",
                             "mail.mailsrv": "127.0.0.1", "mail.mailport": smtp_sink.port})
    client = daemon.client()
    evil = "evil@example.com\rBcc: victim@example.net"
    for country in ("GB", "US", "FR"):
        client.send(encode_request(policy_request(evil, ip_in(country))))
        assert client.reply() == "DUNNO"
    client.send(encode_request(policy_request(evil, ip_in("DE"))))
    assert client.reply().startswith("REJECT")  # PolicyClient.reply checks it is one line
    ((recipients, message),) = smtp_sink.wait_for(1)
    assert recipients == ["admin@example.com"]
    assert message["Bcc"] is None and "\n" not in message["Subject"]


def test_many_clients_at_once_all_get_answers(daemon):
    def one(n):
        client = daemon.client()
        return [client.ask(f"user{n}@example.com", ip_in(country)) for country in ("GB", "US")]

    assert all_at_once(50, one) == [["DUNNO", "DUNNO"]] * 50
