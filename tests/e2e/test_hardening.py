"""The doors hold against a hostile local user (#20): floods of trickling and
oversized connections on the HTTP ports leave the Postfix port and Dovecot's
checks answered; a reload narrows every port; the Dovecot port reads only
plainly framed requests; the health report is for this host only; root
follows no planted link."""
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest
from conftest import dovecot_post, free_port, ip_in, pcc_command, run_pcc, unavailable, wait_for_log, write_config

API_HEADER = "Authorization: Basic cGNjOmhhcmRlbmluZw=="


def post(port: int, body: bytes, command: str = "allow", timeout: float = 5.0) -> tuple:
    """(HTTP status, JSON answer or None, seconds)."""
    return dovecot_post(port, command, body, API_HEADER, timeout)


def login(name: str, country: str = "GB") -> bytes:
    return json.dumps({"login": name, "remote": ip_in(country), "protocol": "imap"}).encode()


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        kilobytes = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return kilobytes / 1024


def attack(port: int, count: int, opening: bytes) -> list:
    """`count` connections that send `opening` and then trickle or stall."""
    sockets = []
    for _ in range(count):
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=0.5)
            sock.setblocking(False)
            sock.send(opening)
            sockets.append(sock)
        except OSError:
            pass  # refused or cut at once: fine, that is the defence
    return sockets


def trickle(sockets: list) -> None:
    for sock in sockets:
        try:
            sock.send(b"X")
        except OSError:
            pass


@pytest.mark.parametrize("open_files", [300, 8192], ids=["300 open files", "pcc.service's LimitNOFILE"])
def test_floods_of_slow_and_huge_http_clients_leave_both_doors_answering(start_daemon, sqlite_url, open_files):
    dovecot_port, metrics_port = free_port(), free_port()
    daemon = start_daemon(open_files=open_files, **{
        "db.dbcon": sqlite_url, "policy.action": "REJECT", "dovecot.policy_port": dovecot_port,
        "dovecot.count_logins": "yes", "dovecot.api_header": API_HEADER, "server.metrics_port": metrics_port})
    pcc_command(daemon.config_path, "-b", "mallory@example.com")
    time.sleep(1.0)  # the daemon's poll sees the block
    huge_headers = b"POST /?command=allow HTTP/1.1\r\n" + b"X-Padding: " + b"a" * 65000 + b"\r\n"
    flood = (attack(dovecot_port, 200, b"POST /?command=allow HTTP/1.1\r\nHost: x\r\n")
             + attack(metrics_port, 150, b"GET /metrics HTTP/1.1\r\n")
             + attack(dovecot_port, 40, huge_headers))
    try:
        client = daemon.client()
        for second in range(6):  # longer than the 5 s a request may take
            trickle(flood)
            started = time.monotonic()
            assert client.ask_like_postfix(f"user{second}@example.com", ip_in("GB")) == "DUNNO"
            assert time.monotonic() - started < 1.0
            code, answer, seconds = post(dovecot_port, login("mallory@example.com"))
            assert code == 200 and answer["status"] == -1 and seconds < 1.0, (code, answer, seconds)
            time.sleep(0.5)
        assert rss_mb(daemon.process.pid) < 250
    finally:
        for sock in flood:
            sock.close()
    log = daemon.log()
    if open_files < 1000:  # more connections than the ports' shares: the longest waiting were cut, a line at a time
        assert "dovecot policy port: its share of the open-file limit reached: cut the connection" in log
        assert "metrics port: its share of the open-file limit reached" in log
    assert log.count("reached") < 12  # rate-limited: a line per port every 10 s at most
    assert "Traceback" not in log


def test_a_reload_narrows_every_port(start_daemon, sqlite_url):
    dovecot_port, metrics_port = free_port(), free_port()
    daemon = start_daemon(**{"db.dbcon": sqlite_url, "dovecot.policy_port": dovecot_port,
                             "dovecot.api_header": API_HEADER, "server.metrics_port": metrics_port,
                             "server.allowed_clients": "127.0.0.0/8"})
    assert post(dovecot_port, login("alice@example.com"))[0] == 200
    urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read()
    config = open(daemon.config_path).read().replace("allowed_clients = 127.0.0.0/8", "allowed_clients = 10.0.0.0/8")
    open(daemon.config_path, "w").write(config)
    daemon.process.send_signal(signal.SIGHUP)
    wait_for_log(daemon, "reloaded")
    for port in (daemon.port, dovecot_port, metrics_port):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            assert sock.recv(100) == b"", port  # closed unanswered
    log = daemon.log()
    for port_name in ("policy port", "dovecot policy port", "metrics port"):
        assert f"{port_name}: connection refused, not in [server] allowed_clients: 127.0.0.1" in log


def threads_taking(pid: int, signals) -> list:
    """The threads of process `pid`, other than its main thread, that do not
    block all of `signals` (the kernel may hand them a signal for the process)."""
    wanted = sum(1 << (number - 1) for number in signals)
    takers = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            status = open(f"/proc/{pid}/task/{task}/status").read()
        except FileNotFoundError:  # a connection's thread that has just ended
            continue
        blocked = int(status.split("SigBlk:")[1].split()[0], 16)
        if int(task) != pid and blocked & wanted != wanted:
            takers.append(task)
    return takers


def test_only_the_main_thread_takes_a_stop_or_a_reload(start_daemon, sqlite_url):
    """Before pcc's handlers are set, SIGHUP's default action ends the process:
    a reload sent as soon as the port opened killed the daemon when the
    log writer's thread took it."""
    dovecot_port, metrics_port = free_port(), free_port()
    daemon = start_daemon(**{"db.dbcon": sqlite_url, "dovecot.policy_port": dovecot_port,
                             "dovecot.api_header": API_HEADER, "server.metrics_port": metrics_port})
    assert post(dovecot_port, login("alice@example.com"))[0] == 200
    signals = (signal.SIGHUP, signal.SIGINT, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while threads_taking(daemon.process.pid, signals):  # only connection threads may, until they end
        assert time.monotonic() < deadline, threads_taking(daemon.process.pid, signals)
        time.sleep(0.05)
    assert len(os.listdir(f"/proc/{daemon.process.pid}/task")) >= 6  # the helpers were looked at
    daemon.process.send_signal(signal.SIGHUP)
    wait_for_log(daemon, "reloaded")


@pytest.mark.parametrize("headers, why", [
    ("Content-Length: 20\r\nContent-Length: 20\r\n", "2 Content-Length headers"),
    ("Transfer-Encoding: chunked\r\n", "a Transfer-Encoding"),
    ("Content-Length: 1_5\r\n", "a Content-Length that is not a number"),
    ("Content-Length: +15\r\n", "a Content-Length that is not a number"),
])
def test_the_dovecot_port_reads_only_plainly_framed_requests(start_daemon, sqlite_url, headers, why):
    port = free_port()
    daemon = start_daemon(**{"db.dbcon": sqlite_url, "dovecot.policy_port": port, "dovecot.api_header": API_HEADER})
    body = b'{"login": "a@example.com"}'
    request = (f"POST /?command=allow HTTP/1.1\r\nHost: x\r\n{API_HEADER}\r\n{headers}\r\n").encode() + body
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request + b"POST /?command=allow HTTP/1.1\r\n\r\n")  # smuggled second request
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 400 ") and reply.count(b"HTTP/1.1") == 1  # then closed
    assert why in daemon.log()


def test_a_client_that_goes_away_costs_one_short_line(start_daemon, sqlite_url):
    port = free_port()
    daemon = start_daemon(**{"db.dbcon": sqlite_url, "dovecot.policy_port": port, "dovecot.api_header": API_HEADER})
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
            sock.sendall(b"BREW /coffee HTTP/1.1\r\nContent-Length: 900000\r\n\r\n" + b"x" * 100000)
    time.sleep(0.5)
    assert post(port, login("alice@example.com"))[0] == 200
    log = daemon.log()
    assert "Traceback" not in log and len(log.splitlines()) < 12, log


def test_the_health_report_is_for_this_host_only(start_daemon):
    found = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    addresses = [address for address in found if "." in address and not address.startswith("127.")]
    daemon = start_daemon(**{"server.host": "0.0.0.0"})
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=5) as sock:
        sock.sendall(b"request=pcc_health\n\n")
        assert b"database=ok" in sock.recv(4096)
    assert run_pcc("--config", daemon.config_path, "--health").returncode == 0
    if not addresses:
        unavailable("an IPv4 address of this host other than loopback")
    with socket.create_connection((addresses[0], daemon.port), timeout=5) as sock:
        sock.sendall(b"request=pcc_health\n\n")
        assert sock.recv(4096) == b"action=DUNNO\n\n"  # like any request pcc does not know


def test_root_follows_no_planted_link(start_daemon, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    state = tmp_path / "state"
    state.mkdir()
    protected = tmp_path / "root-only"
    protected.mkdir(mode=0o700)
    target = protected / "planted.sqlite3"
    database = state / "pcc.sqlite3"
    os.symlink(target, database)  # what the daemon's user could do in its own directory
    config = write_config(tmp_path, {"db.dbcon": f"sqlite:///{database}", "db.spool_file": str(state / "spool"),
                                     "server.port": free_port()})
    for arguments in (["-b", "alice@example.com"], ["--allow", "alice@example.com", "--country", "FR",
                                                    "--days", "1"], ["-u", "alice@example.com"]):
        result = run_pcc("--config", config, *arguments)
        assert result.returncode == 1, result
        assert result.stderr == (f"pcc: {database} (the SQLite database) is a symbolic link; pcc does not follow "
                                 f"links to the files it writes: point the configuration at the real file\n")
    assert not os.path.lexists(target)
    result = run_pcc("--config", config, "-d", "--stderr")
    assert result.returncode == 1 and "is a symbolic link" in result.stderr
    os.unlink(database)
    os.symlink(target, state / "spool")
    result = run_pcc("--config", config, "-d", "--stderr")
    assert result.returncode == 1 and f"{state / 'spool'} ([db] spool_file) is a symbolic link" in result.stderr
    assert not os.path.lexists(target)
