"""Faults injected for real: a database behind a TCP proxy the test cuts, an SMTP
server that is down then up, kill -9 under load, SIGTERM and SIGHUP."""
import os
import re
import signal
import threading
import time

import pytest
import sqlalchemy as sa
from conftest import blocked_logins, free_port, ip_in, sightings_in_database, wait_for_log, walk

from pcclib.storage import Block, safe_url


def timed(client, login, country):
    started = time.monotonic()
    answer = client.ask_like_postfix(login, ip_in(country))
    return answer, time.monotonic() - started


@pytest.mark.parametrize("how", ["refuse", "blackhole"])
def test_database_outage_answers_at_once_and_recovers(start_daemon, proxied, smtp_sink, how):
    url, proxy, direct = proxied
    daemon = start_daemon(**{"db.dbcon": url, "policy.action": "REJECT", "mail.notice": "admin@example.com",
                             "mail.mailsrv": "127.0.0.1", "mail.mailport": smtp_sink.port})
    client = daemon.client()
    assert walk(client, "mallory@example.com", ["GB", "US", "FR", "DE"])[-1].startswith("REJECT")
    assert walk(client, "alice@example.com", ["GB", "US", "FR"]) == ["DUNNO"] * 3
    assert client.ask("bob@example.com", ip_in("GB")) == "DUNNO"
    smtp_sink.wait_for(1)

    proxy.cut(how)
    answers = {}
    for _round in range(3):
        for login, country in [("mallory@example.com", "GB"), ("bob@example.com", "GB"),
                               ("carol@example.com", "JP"), ("alice@example.com", "DE")]:
            answer, seconds = timed(client, login, country)
            assert seconds < 1.0, f"{login} answered after {seconds:.2f} s"
            answers.setdefault(login, []).append(answer)
    assert all(a.startswith("REJECT") for a in answers["mallory@example.com"])  # known blocked
    assert answers["bob@example.com"] == ["DUNNO"] * 3  # db_error_action
    assert answers["carol@example.com"] == ["DUNNO"] * 3
    assert all(a.startswith("REJECT") for a in answers["alice@example.com"]), (answers, daemon.log()[-4000:])
    assert daemon.log().count("failed, answering from memory") == 1
    if how == "blackhole":  # the watchdog answered for the request stuck in the database
        assert "no answer within 0.8 s" in daemon.log()
    assert "alice@example.com" not in blocked_logins(direct)

    proxy.restore()
    deadline = time.monotonic() + 15
    while "is back; pcc answers from it again" not in daemon.log():
        assert time.monotonic() < deadline, daemon.log()[-3000:]
        client.ask_like_postfix("dave@example.com", ip_in("GB"))
        time.sleep(0.2)
    # the block decided during the outage is written as soon as the database is back
    while "alice@example.com" not in blocked_logins(direct):
        assert time.monotonic() < deadline, daemon.log()[-3000:]
        time.sleep(0.1)
    assert client.ask_like_postfix("alice@example.com", ip_in("GB")).startswith("REJECT")
    mails = smtp_sink.wait_for(2)
    assert [m["Subject"] for _r, m in mails].count("pcc: account alice@example.com blocked (REJECT)") == 1
    assert daemon.log().count("is back; pcc answers from it again") == 1
    assert daemon.log().count("failed, answering from memory") == 1


def test_db_error_action_defer(start_daemon, proxied):
    url, proxy, _direct = proxied
    daemon = start_daemon(**{"db.dbcon": url, "db.db_error_action": "DEFER_IF_PERMIT"})
    client = daemon.client()
    assert client.ask("bob@example.com", ip_in("GB")) == "DUNNO"
    proxy.cut()
    assert client.ask("bob@example.com", ip_in("GB")) == "DEFER_IF_PERMIT"
    assert client.ask("zed@example.com", ip_in("GB")) == "DEFER_IF_PERMIT"


def test_a_block_spooled_during_an_outage_survives_kill_9(start_daemon, proxied, tmp_path):
    url, proxy, direct = proxied
    spool = str(tmp_path / "outage-spool.jsonl")
    daemon = start_daemon(**{"db.dbcon": url, "db.spool_file": spool, "policy.action": "REJECT"})
    client = daemon.client()
    walk(client, "alice@example.com", ["GB", "US", "FR"])
    proxy.cut()
    assert client.ask("alice@example.com", ip_in("DE")).startswith("REJECT")
    daemon.process.kill()
    daemon.process.wait()
    proxy.restore()
    restarted = start_daemon(**{"db.dbcon": url, "db.spool_file": spool, "policy.action": "REJECT"})
    assert "alice@example.com" in blocked_logins(direct)
    assert restarted.client().ask("alice@example.com", ip_in("GB")).startswith("REJECT")
    assert open(spool).read() == ""


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_kill_9_under_load_loses_no_block(start_daemon, tmp_path, backend):
    from conftest import SERVER_DATABASES, fresh_database

    url = f"sqlite:///{tmp_path}/crash.sqlite3" if backend == "sqlite" else fresh_database(
        SERVER_DATABASES["postgresql"])
    daemon = start_daemon(**{"db.dbcon": url, "policy.action": "HOLD"})
    rejected, lock, stop = set(), threading.Lock(), threading.Event()

    def load(worker):
        client = daemon.client()
        n = 0
        try:
            while not stop.is_set():
                login = f"user{worker}-{n // 5}@example.com"
                if client.ask(login, ip_in(["GB", "US", "FR", "DE", "SE"][n % 5])).startswith("HOLD"):
                    with lock:
                        rejected.add(login)
                n += 1
        except (OSError, ConnectionError, AssertionError):
            pass

    threads = [threading.Thread(target=load, args=(worker,)) for worker in range(8)]
    for thread in threads:
        thread.start()
    time.sleep(2.0)
    daemon.process.kill()
    stop.set()
    for thread in threads:
        thread.join()
    assert len(rejected) > 10
    # The same spool: a block answered while its commit waited is there (start_daemon gives each daemon a
    # spool of its own; a restart's must be the killed daemon's).
    spool = next(line.split("=", 1)[1].strip() for line in open(daemon.config_path) if line.startswith("spool_file"))
    restarted = start_daemon(**{"db.dbcon": url, "policy.action": "HOLD", "db.spool_file": spool})
    client = restarted.client()
    still = {login for login in rejected if client.ask(login, ip_in("GB")).startswith("HOLD")}
    assert still == rejected


def test_sigterm_answers_the_request_in_flight_then_exits_0(start_daemon):
    daemon = start_daemon()
    idle = daemon.client()  # an idle connection must not hold the exit up
    busy = daemon.client()
    busy.send(b"request=smtpd_access_policy\nsasl_username=alice@example.com\nclient_address=20.1.0.1\n")
    time.sleep(0.2)
    daemon.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert daemon.process.poll() is None  # waiting for the request in flight
    busy.send(b"\n")
    assert busy.reply() == "DUNNO"
    assert daemon.process.wait(timeout=10) == 0
    assert "pcc stopped" in daemon.log()
    idle.close()


def test_sighup_reloads_without_dropping_connections(start_daemon):
    daemon = start_daemon(**{"policy.action": "REJECT"})
    client = daemon.client()
    assert walk(client, "alice@example.com", ["GB", "US"]) == ["DUNNO", "DUNNO"]
    text = open(daemon.config_path).read()
    open(daemon.config_path, "w").write(text.replace("how_many_different_countries = 3",
                                                     "how_many_different_countries = 1"))
    daemon.process.send_signal(signal.SIGHUP)
    wait_for_log(daemon, "reloaded")
    assert client.ask("bob@example.com", ip_in("GB")) == "DUNNO"
    assert client.ask("bob@example.com", ip_in("US")).startswith("REJECT")  # same connection, new rule
    open(daemon.config_path, "w").write(text.replace("action = REJECT", "action = DROP"))
    daemon.process.send_signal(signal.SIGHUP)
    wait_for_log(daemon, "reload refused, the running configuration stays in force")
    assert "[policy] action: must be one of REJECT, HOLD, got 'DROP'" in daemon.log()
    assert client.ask("carol@example.com", ip_in("GB")) == "DUNNO"
    assert client.ask("carol@example.com", ip_in("US")).startswith("REJECT")  # the reloaded rule stays


def test_notification_retried_until_the_smtp_server_is_back(start_daemon):
    from aiosmtpd.controller import Controller
    from conftest import SmtpSink

    port = free_port()
    daemon = start_daemon(**{"mail.notice": "admin@example.com", "mail.mailsrv": "127.0.0.1",
                             "mail.mailport": port, "policy.action": "REJECT"})
    assert walk(daemon.client(), "alice@example.com", ["GB", "US", "FR", "DE"])[-1].startswith("REJECT")
    wait_for_log(daemon, "not sent (retrying in 5 s)")
    sink = SmtpSink()
    controller = Controller(sink, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        mails = sink.wait_for(1, timeout=30)
        assert len(mails) == 1 and "alice@example.com" in mails[0][1]["Subject"]
    finally:
        controller.stop()
    wait_for_log(daemon, "notification sent to admin@example.com")


def test_warns_when_the_config_with_a_password_is_world_readable(start_daemon, tmp_path):
    from conftest import SERVER_DATABASES, fresh_database

    url = fresh_database(SERVER_DATABASES["postgresql"].replace("postgres@", "postgres:Pw-for-test@"))
    daemon = start_daemon(**{"db.dbcon": url})
    os.chmod(daemon.config_path, 0o644)
    daemon.stop()
    restarted = start_daemon(**{"db.dbcon": url})
    os.chmod(restarted.config_path, 0o644)
    restarted.stop()
    restarted.start()
    assert ("holds a secret (a password, a key, [dovecot] api_header or a URL's credentials) and is readable by "
            "every user"
            in restarted.log())
    assert "Pw-for-test" not in restarted.log()


def test_sighup_rereads_the_geoip_database(start_daemon, tmp_path):
    from mmdb_writer import MMDBWriter
    from netaddr import IPSet

    def write_geoip(path, country):
        writer = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="GeoLite2-Country")
        writer.insert_network(IPSet(["20.1.0.0/16"]), {"country": {"iso_code": country}})
        writer.to_db_file(str(path))

    geoip = tmp_path / "swapped.mmdb"
    write_geoip(geoip, "GB")
    daemon = start_daemon(**{"geoip.database": str(geoip), "policy.how_many_different_countries": "1",
                             "policy.action": "REJECT"})
    client = daemon.client()
    assert client.ask("alice@example.com", "20.1.0.1") == "DUNNO"  # GB
    write_geoip(geoip, "FR")  # the address now belongs to France
    daemon.process.send_signal(signal.SIGHUP)
    wait_for_log(daemon, "reloaded")
    assert client.ask("alice@example.com", "20.1.0.1").startswith("REJECT")  # GB, then FR: 2 > 1
    assert "country=FR" in daemon.log()


def test_monitor_mode_flag_decided_during_an_outage_is_written_later(start_daemon, proxied, smtp_sink):
    url, proxy, direct = proxied
    daemon = start_daemon(**{"db.dbcon": url, "policy.mode": "monitor", "mail.notice": "admin@example.com",
                             "mail.mailsrv": "127.0.0.1", "mail.mailport": smtp_sink.port})
    client = daemon.client()
    assert walk(client, "alice@example.com", ["GB", "US", "FR"]) == ["DUNNO"] * 3
    proxy.cut()
    assert client.ask_like_postfix("alice@example.com", ip_in("DE")) == "DUNNO"  # monitor: mail flows
    assert "would block (monitor mode): 4 of at most 3" in daemon.log()
    proxy.restore()
    deadline = time.monotonic() + 15
    while "alice@example.com" not in blocked_logins(direct):
        assert time.monotonic() < deadline, daemon.log()[-3000:]
        client.ask_like_postfix("dave@example.com", ip_in("GB"))
        time.sleep(0.2)
    engine = sa.create_engine(direct)
    with engine.connect() as connection:
        actions = connection.execute(sa.select(Block.action)).scalars().all()
    engine.dispose()
    assert actions == ["MONITOR"]
    (mail,) = [m for _r, m in smtp_sink.wait_for(1)]
    assert mail["Subject"] == "pcc: account alice@example.com would be blocked (monitor mode)"
    assert client.ask_like_postfix("alice@example.com", ip_in("SE")) == "DUNNO"


def test_a_reload_that_changes_the_database_names_it_and_closes_the_old_pool(start_daemon, postgresql_url):
    """SIGHUP with a new [db] dbcon: the log line names the new database (and
    the old), the old database's connections are closed, the new one gets
    the tables and the sightings."""
    old = sa.engine.make_url(postgresql_url)
    new = old.set(database=f"{old.database}_reloaded")
    admin = sa.create_engine(old, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{new.database}" WITH (FORCE)'))
            connection.execute(sa.text(f'CREATE DATABASE "{new.database}"'))

        def connections_to(database: str) -> int:
            with admin.connect() as connection:
                return connection.execute(sa.text("SELECT count(*) FROM pg_stat_activity WHERE datname = :name "
                                                  "AND pid <> pg_backend_pid()"), {"name": database}).scalar()

        daemon = start_daemon(**{"db.dbcon": postgresql_url, "policy.action": "REJECT"})
        client = daemon.client()
        assert walk(client, "alice@example.com", ["GB", "US"]) == ["DUNNO", "DUNNO"]
        assert connections_to(old.database) >= 1
        new_url = new.render_as_string(hide_password=False)
        text = open(daemon.config_path).read()
        open(daemon.config_path, "w").write(re.sub(r"(?m)^dbcon = .*$", f"dbcon = {new_url}", text))
        daemon.process.send_signal(signal.SIGHUP)
        wait_for_log(daemon, "reloaded")
        assert f"reloaded; database {safe_url(new_url)} (was {safe_url(postgresql_url)})" in daemon.log()
        assert client.ask("bob@example.com", ip_in("FR")) == "DUNNO"  # the same connection, the new database
        deadline = time.monotonic() + 5
        while connections_to(old.database) > 0:
            assert time.monotonic() < deadline, "the old database's pool is still open"
            time.sleep(0.1)
        assert ("bob@example.com", "FR") in sightings_in_database(new_url, "bob@example.com")
        daemon.stop()
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{new.database}" WITH (FORCE)'))
    finally:
        admin.dispose()
