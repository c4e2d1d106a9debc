"""Write-heavy traffic (#14): sightings are written behind the answer in
batches and counted from memory at once; blocks are still written before the
answer; several daemons on one database see each other's sightings, blocks,
unblocks and travel passes within a second; a kill -9 loses at most the last
moments of sightings, never a block."""
import signal
import socket
import threading
import time

from conftest import (
    WritersLockedOut,
    encode_request,
    free_port,
    ip_in,
    pcc_command,
    policy_request,
    scrape,
    sightings_in_database,
    wait_until_visible,
    walk,
)

from pcclib.late import DB_ANSWER_DEADLINE


def decision_lines(daemon, login) -> list:
    return [line for line in daemon.log().splitlines() if f"login={login} " in line]


def test_a_new_country_waits_for_its_commit_no_longer_than_the_deadline(start_daemon, db_url):
    """A new country's sighting is committed before its answer (every daemon
    must count it next); with writers of pcc_sightings locked out by another
    transaction, the answer comes within the deadline all the same, the
    countries are counted (the third one says 3 of 3), and the sightings reach
    the database when the lock goes."""
    daemon = start_daemon(**{"db.dbcon": db_url})
    client = daemon.client()
    assert client.ask("alice@example.com", ip_in("GB")) == "DUNNO"
    assert sightings_in_database(db_url, "alice@example.com") == {("alice@example.com", "GB")}  # before the answer
    with WritersLockedOut(db_url, "pcc_sightings"):
        for country in ("US", "FR"):
            started = time.monotonic()
            assert client.ask("alice@example.com", ip_in(country)) == "DUNNO"
            took = time.monotonic() - started
            assert DB_ANSWER_DEADLINE - 0.05 < took < DB_ANSWER_DEADLINE + 0.7, f"{country} answered after {took:.2f} s"
        assert sightings_in_database(db_url, "alice@example.com") == {("alice@example.com", "GB")}
        assert "3 of at most 3 countries" in decision_lines(daemon, "alice@example.com")[-1]
    deadline = time.monotonic() + 5
    while len(sightings_in_database(db_url, "alice@example.com")) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sightings_in_database(db_url, "alice@example.com") == {("alice@example.com", c) for c in ("GB", "US", "FR")}


def test_a_known_country_does_not_wait_for_the_database(start_daemon, db_url):
    """Repeat traffic from a known country stays on the fast path: with writers
    of pcc_sightings locked out, it is answered at once, from memory."""
    daemon = start_daemon(**{"db.dbcon": db_url})
    client = daemon.client()
    assert walk(client, "alice@example.com", ["GB", "US"]) == ["DUNNO"] * 2
    with WritersLockedOut(db_url, "pcc_sightings"):
        for host in (7, 8, 9):
            started = time.monotonic()
            assert client.ask("alice@example.com", ip_in("GB", host=host)) == "DUNNO"
            assert time.monotonic() - started < 0.3, "a known country waited for the locked table"
    assert "2 of at most 3 countries" in decision_lines(daemon, "alice@example.com")[-1]
    assert "database failing" not in daemon.log()


def test_sightings_are_written_in_batches(start_daemon, db_url):
    """Sixty accounts' first messages, arriving while a commit waits (writers
    locked out for 0.4 s), share a few write transactions, not sixty; every
    sighting is in the database a moment later.  (Without the lock, how many
    arrive during one commit is up to the scheduler: with both cores busy,
    19 to 39 transactions were seen for the same sixty.)"""
    metrics_port = free_port()
    daemon = start_daemon(**{"db.dbcon": db_url, "server.metrics_port": metrics_port})
    logins = [f"user{n}@example.com" for n in range(60)]

    def writes() -> float:
        return scrape(metrics_port).get(("pcc_database_operations_total", (("operation", "sighting_write"),)), 0)

    assert daemon.client().ask("first@example.com", ip_in("GB")) == "DUNNO"  # the tables are there
    # Connected first: sixty connections made while the lock is held arrive as
    # the scheduler lets them (on a busy machine, some after it), each then a
    # commit of its own; sixty requests on open connections arrive at once.
    clients = [daemon.client() for _login in logins]
    # Sixty other first messages before: the database connections the reads
    # take are made now, not one after another while the lock is held (a
    # MariaDB connection takes tens of ms to make: the reads then trickle in).
    warming = [f"warm{n}@example.com" for n in range(60)]
    for client, login in zip(clients, warming):
        client.send(encode_request(policy_request(login, ip_in("GB"))))
    assert [client.reply() for client in clients] == ["DUNNO"] * 60
    before, deadline = writes(), time.monotonic() + 5
    while scrape(metrics_port)[("pcc_unwritten_sightings", ())] or writes() != before:  # all written, none due
        assert time.monotonic() < deadline
        before = writes()
        time.sleep(0.2)
    with WritersLockedOut(db_url, "pcc_sightings"):
        for client, login in zip(clients, logins):
            client.send(encode_request(policy_request(login, ip_in("GB"))))
        # Held well within the answer's deadline (DB_ANSWER_DEADLINE): a request
        # answered without its commit would leave its sighting to the batches
        # behind the answers, more transactions for reasons of their own.
        time.sleep(DB_ANSWER_DEADLINE / 2)
    answers = [client.reply() for client in clients]
    for client in clients:
        client.close()
    assert answers == ["DUNNO"] * 60
    deadline = time.monotonic() + 5
    everyone = logins + warming + ["first@example.com"]
    while len(sightings_in_database(db_url)) < len(everyone) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sightings_in_database(db_url) == {(login, "GB") for login in everyone}
    # Two commits when every request is in before the first one ends (the one
    # that waited for the lock, then all the rest); on MariaDB a request now
    # and then joins a later one (2 to 9 transactions were seen, 1 run in 10
    # above 6, idle or busy): "a few", where one a request would be 60.
    assert 1 <= writes() - before <= 12, (writes() - before, daemon.log()[-3000:])
    assert scrape(metrics_port)[("pcc_unwritten_sightings", ())] == 0


def test_a_sigterm_writes_what_is_pending(start_daemon, db_url):
    daemon = start_daemon(**{"db.dbcon": db_url})
    client = daemon.client()
    for n in range(20):
        assert client.ask(f"user{n}@example.com", ip_in("US")) == "DUNNO"
    daemon.stop()
    assert daemon.process.returncode == 0
    assert sightings_in_database(db_url) == {(f"user{n}@example.com", "US") for n in range(20)}


def _wait_for_answers(answered: list, count: int, timeout: float = 60.0) -> None:
    """Until `count` answers came (however fast this machine commits first
    sightings now), then a moment more: "settled" leaves out the last 0.25 s."""
    deadline = time.monotonic() + timeout
    while len(answered) < count:
        assert time.monotonic() < deadline, f"{len(answered)} answers, not {count}, in {timeout:g} s"
        time.sleep(0.05)
    time.sleep(0.3)


def _send_until_killed(port, logins, country, answered, stop):
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        for login in logins:
            if stop.is_set():
                return
            sock.sendall(encode_request(policy_request(login, ip_in(country))))
            reply = b""
            while not reply.endswith(b"\n\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    return
                reply += chunk
            answered.append((login, time.monotonic(), reply.decode()))
    except OSError:
        return
    finally:
        sock.close()


def test_kill_9_under_load_loses_at_most_the_last_moment(start_daemon, db_url, tmp_path):
    """Sixteen connections send first sightings as fast as the daemon answers
    (the writer thread gets its share of the GIL only), and one stolen account
    crosses the line among them; kill -9.  Every sighting answered more than
    0.25 s before pcc's last answer is in the database (pcc writes every 50
    ms, and requests write themselves once the writer is 100 ms behind), and
    the block is in the database or the spool."""
    daemon = start_daemon(**{"db.dbcon": db_url, "policy.action": "HOLD"})
    answered: list = []
    stop = threading.Event()
    threads = [threading.Thread(target=_send_until_killed, args=(
        daemon.port, [f"c{n}-{k}@example.com" for k in range(100000)], "GB", answered, stop)) for n in range(16)]
    for thread in threads:
        thread.start()
    # Real load before and after the crossing, however fast this machine
    # commits first sightings now (a fixed 0.7 s gave 168 on a busy MariaDB).
    _wait_for_answers(answered, 150)
    stolen = daemon.client()
    answers = [stolen.ask("stolen@example.com", ip_in(country)) for country in ("GB", "US", "FR", "DE")]
    assert answers[:3] == ["DUNNO"] * 3 and answers[3].startswith("HOLD")
    _wait_for_answers(answered, len(answered) + 150)
    daemon.process.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    daemon.process.wait()
    stop.set()
    for thread in threads:
        thread.join()
    in_database = {login for login, _country in sightings_in_database(db_url)}
    # pcc's promise: it gives no answer while a sighting more than 100 ms old is
    # unwritten (the database working).  So a sighting can be lost only if it
    # was answered within the last moments before pcc's last answer; those
    # moments may end well before the kill when the database is slow to commit
    # (answers then wait, the loss does not grow).
    first_sights = [(login, at) for login, at, reply in answered if "DUNNO" in reply]
    last_answer = max(at for _login, at in first_sights)
    settled = {login for login, at in first_sights if at < last_answer - 0.25}
    assert len(settled) > 200, len(settled)  # the load was real
    lost = [(login, round(last_answer - at, 3)) for login, at in first_sights
            if login in settled and login not in in_database]
    slow = [line for line in daemon.log().splitlines() if "sightings took" in line]
    assert lost == [], f"{len(lost)} of {len(settled)} sightings answered more than 0.25 s before the last " \
                       f"answer were lost (login, seconds before it): {lost[:5]}; last answer " \
                       f"{killed_at - last_answer:.3f} s before the kill; slow writes: {slow[-5:]}"
    restarted = start_daemon(**{"db.dbcon": db_url, "policy.action": "HOLD",
                                "db.spool_file": daemon_spool(daemon)})
    assert restarted.client().ask("stolen@example.com", ip_in("GB")).startswith("HOLD")


def daemon_spool(daemon) -> str:
    for line in open(daemon.config_path):
        if line.startswith("spool_file"):
            return line.split("=", 1)[1].strip()
    raise AssertionError("no spool_file")


def test_two_daemons_see_each_other_within_a_second(start_daemon, shared_db_url, smtp_sink):
    """Both daemons have the accounts in memory; what one records, or an
    administrator changes, counts in the other one a second later."""
    settings = {"db.dbcon": shared_db_url, "policy.action": "REJECT", "mail.notice": "admin@example.com",
                "mail.mailsrv": "127.0.0.1", "mail.mailport": smtp_sink.port}
    first, second = start_daemon(**settings), start_daemon(**settings)
    one, two = first.client(), second.client()
    assert two.ask("alice@example.com", ip_in("GB")) == "DUNNO"  # alice is in the second's memory
    assert one.ask("alice@example.com", ip_in("US")) == "DUNNO"
    wait_until_visible()
    assert two.ask("alice@example.com", ip_in("FR")) == "DUNNO"
    assert "3 of at most 3 countries" in decision_lines(second, "alice@example.com")[-1]
    wait_until_visible()
    assert one.ask("alice@example.com", ip_in("DE")).startswith("REJECT")  # the first daemon blocks
    wait_until_visible()
    assert two.ask("alice@example.com", ip_in("GB")).startswith("REJECT")
    assert "account blocked since" in decision_lines(second, "alice@example.com")[-1]

    pcc_command(first.config_path, "-u", "alice@example.com")
    wait_until_visible()
    assert one.ask("alice@example.com", ip_in("GB")) == "DUNNO"
    assert two.ask("alice@example.com", ip_in("GB")) == "DUNNO"

    for client in (one, two):
        assert client.ask("bob@example.com", ip_in("GB")) == "DUNNO"
    pcc_command(first.config_path, "--allow", "bob@example.com", "--country", "JP", "--days", "3")
    wait_until_visible()
    assert two.ask("bob@example.com", ip_in("JP")) == "DUNNO"
    assert "not counted: travel pass for JP" in decision_lines(second, "bob@example.com")[-1]
