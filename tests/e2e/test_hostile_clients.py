"""Hostile or broken input: no exception escapes, the daemon keeps serving,
and a misbehaving client only ever loses its own connection."""
import socket
import time

import pytest
from conftest import all_at_once, encode_request, ip_in, policy_request


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


def threads_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("Threads:"))


def test_1000_idle_connections_do_not_stop_a_new_client(start_daemon):
    daemon = start_daemon()
    idle = [socket.create_connection(("127.0.0.1", daemon.port)) for _ in range(1000)]
    try:
        deadline = time.monotonic() + 20  # the daemon has taken them all (a thread each) before the clock starts
        while threads_of(daemon.process.pid) < 1000:
            assert time.monotonic() < deadline, threads_of(daemon.process.pid)
            time.sleep(0.05)
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
