"""What a daemon remembers is never the weak link (#19): the blocked list is
whole in memory from the start (a restart during an outage included) and
answers both doors; a database that refuses at once is an outage like one
that hangs; a reload reaches the accounts in memory; names nobody has seen
cost no database read."""
import signal
import time

import pytest
import sqlalchemy as sa
from conftest import (
    TcpProxy,
    blocked_logins,
    dovecot_allow,
    free_port,
    ip_in,
    pcc_command,
    run_pcc,
    scrape,
    wait_for_log,
    walk,
)

from pcclib.decision import CountrySeen
from pcclib.storage import AdminStore

API_HEADER = "Authorization: Basic cGNjOm1lbW9yeQ=="


def allow(port: int, login: str) -> int:
    """Dovecot's question before the password: -1 refused, 0 let in."""
    return dovecot_allow(port, login, API_HEADER)


@pytest.fixture
def proxied_url(shared_db_url):
    url = sa.engine.make_url(shared_db_url)
    proxy = TcpProxy(url.host, url.port)
    yield url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False), proxy
    proxy.close()


def test_a_restart_during_an_outage_keeps_every_block(start_daemon, proxied_url, tmp_path):
    url, proxy = proxied_url
    spool, dovecot_port = str(tmp_path / "spool.jsonl"), free_port()
    config = {"db.dbcon": url, "db.spool_file": spool, "policy.action": "REJECT", "dovecot.policy_port":
              dovecot_port, "dovecot.api_header": API_HEADER}
    first = start_daemon(**config)
    client = first.client()
    assert walk(client, "alice@example.com", ["GB", "US", "FR"]) == ["DUNNO"] * 3
    pcc_command(first.config_path, "-b", "bob@example.com")  # blocked in the database, long before
    time.sleep(1.5)  # the poll brings it into memory; the copy on disk follows within a second
    assert allow(dovecot_port, "bob@example.com") == -1
    proxy.cut("refuse")
    assert client.ask_like_postfix("alice@example.com", ip_in("DE")).startswith("REJECT")  # spooled
    first.process.send_signal(signal.SIGKILL)
    first.process.wait()
    second = start_daemon(**config)  # the database still refuses
    wait_for_log(second, "blocked list: 2 accounts, from")
    client = second.client()
    for login in ("bob@example.com", "alice@example.com"):
        assert client.ask_like_postfix(login, ip_in("GB")).startswith("REJECT"), login
        assert allow(dovecot_port, login) == -1, login
    assert client.ask_like_postfix("carol@example.com", ip_in("GB")) == "DUNNO"  # unknown: db_error_action
    assert allow(dovecot_port, "carol@example.com") == 0
    proxy.restore()
    deadline = time.monotonic() + 15
    while blocked_logins(url) != {"alice@example.com", "bob@example.com"}:
        assert time.monotonic() < deadline, second.log()[-3000:]
        client.ask_like_postfix("dave@example.com", ip_in("GB"))  # a probe a second finds it back
        time.sleep(0.3)


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
def test_a_database_that_refuses_at_once_is_an_outage(start_daemon, backend, tmp_path):
    from conftest import SERVER_DATABASES, fresh_database

    direct = sa.engine.make_url(fresh_database(SERVER_DATABASES[backend]))
    proxy = TcpProxy(direct.host, direct.port)
    try:
        url = direct.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        daemon = start_daemon(**{"db.dbcon": url, "policy.action": "HOLD"})
        client = daemon.client()
        assert walk(client, "alice@example.com", ["GB", "US", "FR"]) == ["DUNNO"] * 3
        proxy.cut("refuse")
        time.sleep(1.5)  # the poll's own read finds it first, or the next request does
        answers = [client.ask_like_postfix("alice@example.com", ip_in(country)) for country in ("DE", "SE", "JP")]
        assert all(answer.startswith("HOLD") for answer in answers), answers
        log = daemon.log()
        assert "failed, answering from memory" in log and "internal error" not in log
        health = run_pcc("--config", daemon.config_path, "--health")
        assert health.returncode == 2 and "cannot use its database" in health.stdout
        proxy.restore()
        deadline = time.monotonic() + 15
        while blocked_logins(direct.render_as_string(hide_password=False)) != {"alice@example.com"}:
            assert time.monotonic() < deadline, daemon.log()[-3000:]
            client.ask_like_postfix("zed@example.com", ip_in("GB"))
            time.sleep(0.3)
    finally:
        proxy.close()


def test_a_reload_that_widens_the_window_counts_at_once(start_daemon, sqlite_url):
    daemon = start_daemon(**{"db.dbcon": sqlite_url, "policy.action": "REJECT",
                             "policy.in_how_much_time_in_days": "1"})
    client = daemon.client()
    assert client.ask("alice@example.com", ip_in("GB")) == "DUNNO"  # alice in memory, read with a 1-day window
    five_days_ago = time.time() - 5 * 86400
    import datetime

    moment = datetime.datetime.fromtimestamp(five_days_ago, datetime.timezone.utc)
    store = AdminStore(sqlite_url)
    store.merge_sightings([("alice@example.com", CountrySeen(code, moment, moment, ip_in(code)))
                           for code in ("US", "FR", "DE")])
    store.dispose()
    assert client.ask("alice@example.com", ip_in("GB")) == "DUNNO"
    config = open(daemon.config_path).read().replace("in_how_much_time_in_days = 1", "in_how_much_time_in_days = 30")
    open(daemon.config_path, "w").write(config)
    daemon.process.send_signal(signal.SIGHUP)
    wait_for_log(daemon, "reloaded")
    assert client.ask("alice@example.com", ip_in("SE")).startswith("REJECT")  # 5 countries in 30 days


def test_names_nobody_has_seen_cost_no_database_read(start_daemon, sqlite_url):
    port, metrics_port = free_port(), free_port()
    daemon = start_daemon(**{"db.dbcon": sqlite_url, "dovecot.policy_port": port, "dovecot.api_header": API_HEADER,
                             "server.metrics_port": metrics_port, "policy.action": "REJECT"})
    pcc_command(daemon.config_path, "-b", "mallory@example.com")
    time.sleep(1.2)
    reads = scrape(metrics_port)[("pcc_database_operations_total", (("operation", "history_read"),))]
    for n in range(300):
        assert allow(port, f"stranger{n}@example.com") == 0
    assert allow(port, "mallory@example.com") == -1
    after = scrape(metrics_port)[("pcc_database_operations_total", (("operation", "history_read"),))]
    assert after == reads


def test_a_write_lock_held_10_s_delays_no_answer_and_drops_none(start_daemon, db_url):
    """64 requests of 16 accounts (4 of them crossing the line) over 8
    connections while another transaction holds pcc's writers out for 10 s:
    every request gets its own answer, in order, on its own connection, within
    a second, and the right one."""
    from conftest import WritersLockedOut, all_at_once

    daemon = start_daemon(**{"db.dbcon": db_url, "policy.action": "REJECT"})
    crossing = [f"thief{n}@example.com" for n in range(4)]
    seeder = daemon.client()
    for login in crossing:
        assert walk(seeder, login, ["GB", "US", "FR"]) == ["DUNNO"] * 3
    time.sleep(1.2)  # their sightings are written (and in memory)
    plans = []  # per connection: 8 x (login, country, expected answer)
    for connection in range(4):  # a user's first messages, then a thief's 4th, 5th... country
        plans.append([(f"user{connection}@example.com", "GB", "DUNNO")] * 4
                     + [(crossing[connection], country, "REJECT") for country in ("DE", "SE", "JP", "BR")])
    for connection in range(4, 8):  # first sightings of 12 more accounts, and their next messages
        plans.append([(f"user{4 + (connection * 8 + n) % 12}@example.com", "GB", "DUNNO") for n in range(8)])
    clients = [daemon.client() for _ in range(8)]

    def run(index):
        results = []
        for login, country, expected in plans[index]:
            started = time.monotonic()
            answer = clients[index].ask(login, ip_in(country))  # no reconnection: the same connection
            results.append((login, answer.split()[0], expected, round(time.monotonic() - started, 2)))
        return results

    with WritersLockedOut(db_url, "pcc_sightings"):
        locked = time.monotonic()
        outcomes = all_at_once(8, run)
        time.sleep(max(0.0, locked + 10 - time.monotonic()))  # the lock is held 10 s in all
    wrong = [outcome for results in outcomes for outcome in results if outcome[1] != outcome[2] or outcome[3] >= 1.0]
    assert wrong == [], wrong
    assert sum(len(results) for results in outcomes) == 64
