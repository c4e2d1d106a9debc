"""What every listening port shares (ports.py): caps that fit the open-file
limit, an accept loop that backs off when descriptors run out, HTTP reads
bounded in time and size, warnings that cannot flood the log."""
import errno
import logging
import socket
import socketserver
import threading
import time

import pytest

from pcclib import ports
from pcclib.ports import (
    ACCEPT_BACKOFF,
    BoundedPort,
    HttpRequestReader,
    RateLimitedWarning,
    RequestTooLarge,
    connection_caps,
)


@pytest.mark.parametrize("limit", [64, 300, 1024, 8192, 1 << 20])
def test_the_ports_together_never_need_more_descriptors_than_the_limit_leaves(limit):
    caps = connection_caps(4000, limit)
    assert caps["dovecot"] + caps["metrics"] <= max(4, (limit - ports.RESERVED_DESCRIPTORS) // 4) + 2
    if limit >= 300:
        assert sum(caps.values()) <= limit - ports.RESERVED_DESCRIPTORS
    assert caps["postfix"] >= 8 and caps["dovecot"] >= 2 and caps["metrics"] >= 2
    assert connection_caps(10, limit)["postfix"] <= max(10, 8)  # max_connections below the share: it rules


def test_out_of_descriptors_the_accept_loop_waits_and_says_so_once(caplog):
    class Starved(BoundedPort, socketserver.TCPServer):
        port_name = "test port"

    server = Starved(("127.0.0.1", 0), socketserver.BaseRequestHandler)
    server.init_bounds(4, "4 connections")
    server.socket.close()
    server.socket = type("NoDescriptors", (), {"accept": lambda self: (_ for _ in ()).throw(
        OSError(errno.EMFILE, "Too many open files"))})()
    caplog.set_level(logging.WARNING, logger="pcc")
    started = time.monotonic()
    for _ in range(5):
        with pytest.raises(OSError):
            server.get_request()
    assert time.monotonic() - started >= 5 * ACCEPT_BACKOFF  # no spinning
    # (another test's thread may log meanwhile: only this port's lines count)
    lines = [record.getMessage() for record in caplog.records if record.getMessage().startswith("test port")]
    assert lines == ["test port: accept failed: Too many open files; waiting 0.1 s"]


def test_a_warning_says_once_in_a_while_how_often_it_happened(caplog, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(ports.time, "monotonic", lambda: clock[0])
    warn = RateLimitedWarning("metrics port: connection refused")
    caplog.set_level(logging.WARNING, logger="pcc")
    for _ in range(1000):
        warn("192.0.2.9")
    clock[0] += ports.WARNING_INTERVAL
    warn("192.0.2.10")
    assert [record.getMessage() for record in caplog.records] == [
        "metrics port: connection refused: 192.0.2.9",
        "metrics port: connection refused: 192.0.2.10 (999 more since the last such line)"]


def reader_pair(max_body=100):
    server, client = socket.socketpair()
    return HttpRequestReader(server, idle_timeout=5.0, max_body=max_body), client


def test_a_request_must_arrive_whole_within_its_deadline(monkeypatch):
    monkeypatch.setattr(ports, "HTTP_REQUEST_DEADLINE", 0.5)
    reader, client = reader_pair()
    client.sendall(b"POST / HTTP/1.1\r\n")
    assert reader.readline(65537) == b"POST / HTTP/1.1\r\n"

    def trickle():
        for _ in range(20):
            time.sleep(0.1)
            try:
                client.sendall(b"X")
            except OSError:
                return

    threading.Thread(target=trickle, daemon=True).start()
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        reader.readline(65537)  # a byte every 0.1 s never ends the header line
    assert time.monotonic() - started < 0.8
    client.close()


def test_a_request_beyond_its_budget_is_refused_before_it_is_all_read():
    reader, client = reader_pair(max_body=100)
    client.sendall(b"GET / HTTP/1.1\r\n" + b"X-Padding: " + b"a" * 20000 + b"\r\n\r\n")
    assert reader.readline(65537) == b"GET / HTTP/1.1\r\n"
    with pytest.raises(RequestTooLarge):
        reader.readline(65537)
    client.close()


def test_between_requests_a_connection_may_idle_then_the_next_one_has_its_own_deadline(monkeypatch):
    monkeypatch.setattr(ports, "HTTP_REQUEST_DEADLINE", 0.3)
    reader, client = reader_pair()
    client.sendall(b"GET /a HTTP/1.1\r\n")
    assert reader.readline() == b"GET /a HTTP/1.1\r\n"
    reader.next_request()
    threading.Timer(0.5, lambda: client.sendall(b"GET /b HTTP/1.1\r\n")).start()  # idle longer than a deadline
    assert reader.readline() == b"GET /b HTTP/1.1\r\n"
    client.close()
