"""The Postfix policy protocol, over a real socket to a real `pcc.py -d`."""
import socket
import time

import pytest
from conftest import PolicyClient, encode_request, free_port, ip_in, policy_request, scrape


@pytest.fixture
def daemon(start_daemon):
    return start_daemon(**{"policy.action": "REJECT", "policy.reason": "blocked by pcc"})


def four_country_requests(login="alice@example.com"):
    return [policy_request(login, ip_in(country)) for country in ("GB", "US", "FR", "DE")]


def test_several_requests_on_one_connection(daemon):
    client = daemon.client()
    answers = [client.ask(r["sasl_username"], r["client_address"]) for r in four_country_requests()]
    assert answers == ["DUNNO", "DUNNO", "DUNNO", "REJECT blocked by pcc"]
    assert client.ask("alice@example.com", ip_in("GB")) == "REJECT blocked by pcc"
    assert client.ask("bob@example.com", ip_in("GB")) == "DUNNO"


def test_a_request_split_byte_by_byte(daemon):
    client = daemon.client()
    client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for attributes in four_country_requests():
        for byte in encode_request(attributes):
            client.send(bytes([byte]))
        last = client.reply()
    assert last == "REJECT blocked by pcc"


def test_several_requests_in_one_send(daemon):
    client = daemon.client()
    client.send(b"".join(encode_request(r) for r in four_country_requests()))
    assert [client.reply() for _ in range(4)] == ["DUNNO", "DUNNO", "DUNNO", "REJECT blocked by pcc"]


def test_unknown_attributes_are_ignored(daemon):
    client = daemon.client()
    for attributes in four_country_requests():
        attributes.update({"x_new_attribute": "1", "server_name": "mx"})
        client.send(encode_request(attributes))
        last = client.reply()
    assert last == "REJECT blocked by pcc"


def test_non_policy_requests_get_dunno(daemon):
    client = daemon.client()
    client.send(b"request=something_else\nsasl_username=alice@example.com\n\n")
    assert client.reply() == "DUNNO"
    client.send(b"sasl_username=alice@example.com\nclient_address=20.1.0.1\n\n")
    assert client.reply() == "DUNNO"


def test_a_dovecot_login_is_no_request_of_the_policy_port(daemon):
    """Only the Dovecot port's adapter makes logins: one sent to the policy
    port by any allowed client counts for nothing (with count_logins = no
    too) and claims no Dovecot door."""
    client = daemon.client()
    for attributes in four_country_requests():
        attributes["request"] = "dovecot_login"
        client.send(encode_request(attributes))
        assert client.reply() == "DUNNO"
    assert client.ask("alice@example.com", ip_in("GB")) == "DUNNO"
    assert "via=dovecot" not in daemon.log()


def test_crlf_line_endings_and_stray_empty_lines(daemon):
    client = daemon.client()
    client.send(b"\n\nrequest=smtpd_access_policy\r\nsasl_username=alice@example.com\r\nclient_address=20.1.0.1\r\n\r\n")
    assert client.reply() == "DUNNO"


def test_garbage_bytes_get_an_answer_and_the_daemon_goes_on(daemon):
    client = daemon.client()
    client.send(b"\xff\xfe\x00garbage\nrequest=smtpd_access_policy\nsasl_username=\xc3\x28@example.com\n"
                b"client_address=not-an-ip\n\n")
    assert client.reply() == "DUNNO"
    assert client.ask("carol@example.com", ip_in("GB")) == "DUNNO"


def test_an_oversized_request_closes_only_that_connection(start_daemon):
    daemon = start_daemon(**{"server.max_request_bytes": "4096"})
    bystander = daemon.client()
    hostile = daemon.client()
    hostile.send(b"request=smtpd_access_policy\nsasl_username=" + b"a" * 10000 + b"\n")
    with pytest.raises(ConnectionError):
        hostile.reply()
    assert bystander.ask("alice@example.com", ip_in("GB")) == "DUNNO"
    assert "request larger than max_request_bytes" in daemon.log()


def test_idle_connections_are_closed_after_idle_timeout(start_daemon):
    daemon = start_daemon(**{"server.idle_timeout": "1"})
    idle = daemon.client()
    time.sleep(1.5)
    assert idle.sock.recv(10) == b""
    assert daemon.client().ask("alice@example.com", ip_in("GB")) == "DUNNO"


def test_max_connections(start_daemon):
    """At the limit, a new connection is admitted and the one that has waited
    longest for its client is cut (Postfix opens another when it needs one);
    a trickling or idle client cannot keep Postfix out."""
    metrics_port = free_port()
    daemon = start_daemon(**{"server.max_connections": "2", "server.metrics_port": metrics_port})

    def settled(waiting: int) -> None:
        """Until every connection is past sending its answer: a connection
        being answered is never cut (how long its thread takes to get there
        depends on the machine's load: a fixed sleep failed under load)."""
        deadline = time.monotonic() + 10
        while True:
            samples = scrape(metrics_port)
            states = {state: samples.get(("pcc_connections", (("port", "policy"), ("state", state))))
                      for state in ("answering", "waiting")}
            if states == {"answering": 0, "waiting": waiting}:
                return
            assert time.monotonic() < deadline, states
            time.sleep(0.02)

    settled(0)  # the start-up probe's connection is gone
    first, second = daemon.client(), daemon.client()
    assert first.ask("a@example.com", ip_in("GB")) == "DUNNO"
    assert second.ask("b@example.com", ip_in("GB")) == "DUNNO"
    settled(2)
    third = daemon.client()
    assert third.ask("c@example.com", ip_in("GB")) == "DUNNO"
    assert first.sock.recv(10) == b""  # idle the longest: cut
    assert second.ask("b@example.com", ip_in("GB")) == "DUNNO"
    settled(2)
    trickling = daemon.client()
    trickling.send(b"request=smtpd_access_policy\n")  # and nothing more
    assert third.sock.recv(10) == b""  # idle since before `second`'s last answer: cut
    assert second.ask("b@example.com", ip_in("GB")) == "DUNNO"
    settled(2)
    fourth = daemon.client()
    assert fourth.ask("d@example.com", ip_in("GB")) == "DUNNO"
    assert trickling.sock.recv(10) == b""  # waited for its client longer than `second`: cut
    assert "max_connections (2) reached: cut the connection that waited longest" in daemon.log()


def test_allowed_clients(start_daemon):
    daemon = start_daemon(**{"server.allowed_clients": "10.9.9.0/24"})
    with pytest.raises((ConnectionError, OSError)):
        daemon.client().ask("a@example.com", ip_in("GB"))
    assert "not in [server] allowed_clients" in daemon.log()
    daemon = start_daemon(**{"server.allowed_clients": "127.0.0.0/8, ::1"})
    assert daemon.client().ask("a@example.com", ip_in("GB")) == "DUNNO"


def test_ipv6_listener(start_daemon):
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    daemon = start_daemon(**{"server.host": "::1"})
    client = PolicyClient(daemon.port, host="::1")
    assert client.ask("a@example.com", ip_in("GB", version=6)) == "DUNNO"


def test_every_decision_is_logged(daemon):
    client = daemon.client()
    for attributes in four_country_requests():
        client.send(encode_request(attributes))
        client.reply()
    client.ask("", ip_in("GB"))
    log = daemon.log()
    assert f"login=alice@example.com client={ip_in('GB')} country=GB decision=DUNNO" in log
    assert f"login=alice@example.com client={ip_in('DE')} country=DE decision=REJECT" in log
    assert "NEW BLOCK" in log
    assert "decision=DUNNO reason=no SASL login" in log


def test_one_warning_per_request_of_bare_lines(start_daemon):
    daemon = start_daemon(**{"server.max_request_bytes": 1024 * 1024})
    client = daemon.client()
    client.send(b"x\n" * 32000 + encode_request(policy_request("alice@example.com", ip_in("GB"))))
    assert client.reply() == "DUNNO"
    assert daemon.log().count("skipped 32000 lines that are not name=value") == 1
    assert daemon.log().count("policy request:") == 1
