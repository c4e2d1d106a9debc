"""Never silently off (#12): a daemon that cannot write its database refuses to
run, an outage that lasts is said again every minute, admin commands never
leave a file the daemon cannot use, `--health` reports what the daemon sees,
and `--update-geoip` installs current GeoIP data, or nothing."""
import os
import pathlib
import shutil
import socket
import subprocess
import time

import pytest
import sqlalchemy as sa
from conftest import (
    SERVER_DATABASES,
    TcpProxy,
    free_port,
    fresh_database,
    ip_in,
    run_pcc,
    scrape,
    walk,
    write_config,
)

from pcclib.storage import Base

# --- running as an unprivileged user ------------------------------------------------


def nobody_config(directory: str, **overrides) -> str:
    values = {"db.dbcon": f"sqlite:///{directory}/state/pcc.sqlite3", "db.spool_file": f"{directory}/state/spool",
              "server.port": free_port(), **overrides}
    path = write_config(pathlib.Path(directory), values)
    os.chmod(path, 0o644)
    return path


def test_the_daemon_refuses_a_database_file_it_cannot_write(shared_dir, as_nobody):
    import sqlite3

    state = os.path.join(shared_dir, "state")
    os.makedirs(state)
    os.chmod(state, 0o777)  # the directory is not the problem here: the file is
    path = os.path.join(state, "pcc.sqlite3")
    sqlite3.connect(path).execute("CREATE TABLE t (a)")  # made by root, as `pcc.py -b` of pcc 1.1 did
    result = subprocess.run(as_nobody(["--config", nobody_config(shared_dir), "-d", "--stderr"], shared_dir),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result
    assert f"pcc: {path} is owned by root and not writable by user nobody (left by a run as root?): " \
        f"chown -R nobody:nogroup {state}" in result.stderr.splitlines()


@pytest.mark.parametrize("left_by_root", ["spool", "spool.blocked", "pcc.sqlite3-wal", "."])
def test_state_the_quick_start_left_as_root_gets_one_line_whose_command_fixes_it(shared_dir, as_nobody,
                                                                                  left_by_root):
    """README's quick start runs as root; an admin then runs the daemon as its
    own user after a `chown` without -R: never a traceback, one line, and
    the command in it is all it takes."""
    state = os.path.join(shared_dir, "state")
    os.makedirs(state)
    os.chmod(state, 0o750)
    for name in ("spool", "spool.blocked", "pcc.sqlite3-wal"):
        with open(os.path.join(state, name), "w") as left:
            left.write("" if name != "spool.blocked" else "alice@example.com\t1\n")
        os.chmod(os.path.join(state, name), 0o600)
    if left_by_root != ".":
        shutil.chown(state, "nobody", "nogroup")
        for name in ("spool", "spool.blocked", "pcc.sqlite3-wal"):
            if name != left_by_root:
                shutil.chown(os.path.join(state, name), "nobody", "nogroup")
    config = nobody_config(shared_dir)
    result = subprocess.run(as_nobody(["--config", config, "-d", "--stderr"], shared_dir),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("pcc: ")]
    culprit = os.path.normpath(os.path.join(state, left_by_root))
    assert line.startswith(f"pcc: {culprit} is owned by root and not writable by user nobody")
    fix = line.rpartition(": ")[2]
    assert fix == f"chown -R nobody:nogroup {state}"
    subprocess.run(fix, shell=True, check=True)
    daemon = subprocess.Popen(as_nobody(["--config", config, "-d", "--stderr"], shared_dir),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while "listening on" not in (line := daemon.stderr.readline()):
            assert line and time.monotonic() < deadline, "the daemon did not start after the fix"
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)


def test_list_on_a_missing_database_creates_nothing(shared_dir):
    config = nobody_config(shared_dir)
    result = run_pcc("--config", config, "-l")
    assert result.returncode == 0 and result.stdout.strip() == "No account is blocked."
    assert run_pcc("--config", config, "-s", "alice@example.com").returncode == 1
    assert os.listdir(shared_dir) == ["pcc.conf"]  # no state directory, no database


def test_a_command_run_as_root_leaves_the_database_to_the_daemons_user(shared_dir, as_nobody):
    state = os.path.join(shared_dir, "state")
    os.makedirs(state)
    shutil.chown(state, "nobody", "nogroup")
    port = free_port()
    config = nobody_config(shared_dir, **{"server.port": port})
    result = run_pcc("--config", config, "--allow", "alice@example.com", "--country", "FR", "--days", "3")
    assert result.returncode == 0, result.stderr
    assert os.listdir(state)
    for name in os.listdir(state):
        assert os.stat(os.path.join(state, name)).st_uid == pwd_uid("nobody"), name
    # and the daemon, as nobody, runs on that database
    process = subprocess.Popen(as_nobody(["--config", config, "-d", "--stderr"], shared_dir),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert process.poll() is None, process.stdout.read()
                assert time.monotonic() < deadline
                time.sleep(0.1)
    finally:
        process.terminate()
        process.wait(timeout=20)


def pwd_uid(name: str) -> int:
    import pwd

    return pwd.getpwnam(name).pw_uid


# --- permanent faults and outages at start ---------------------------------------------

def test_an_unknown_database_is_refused_and_an_unreachable_one_is_an_outage(start_daemon, tmp_path):
    for url in ("postgresql+psycopg://postgres@127.0.0.1:5432/no_such_database",
                "mysql+pymysql://root:wrong-Secret-1@127.0.0.1:3306/test"):
        config = write_config(tmp_path, {"db.dbcon": url, "server.port": free_port()})
        result = run_pcc("--config", config, "-d", "--stderr", timeout=30)
        assert result.returncode == 1, result
        refusal = [line for line in result.stderr.splitlines() if line.startswith("pcc: database")]
        assert len(refusal) == 1 and "refuses pcc" in refusal[0], result.stderr
        assert "wrong-Secret-1" not in result.stderr
    unreachable = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/test"
    daemon = start_daemon(**{"db.dbcon": unreachable, "db.db_error_action": "DEFER_IF_PERMIT"})
    assert "unreachable at start-up; pcc serves as in an outage" in daemon.log()
    assert daemon.client().ask("alice@example.com", ip_in("GB")) == "DEFER_IF_PERMIT"


# --- a permanent fault while running: loud, every minute ---------------------------------

def test_a_lost_grant_is_an_outage_in_the_log_the_metrics_and_health(start_daemon):
    """(That the ERROR line comes again every minute: tests/unit/test_outage.py.)"""
    url = sa.engine.make_url(fresh_database(SERVER_DATABASES["postgresql"]))
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text("DROP ROLE IF EXISTS pcc_limited"))
        connection.execute(sa.text("CREATE ROLE pcc_limited LOGIN"))
        connection.execute(sa.text("GRANT CREATE, USAGE ON SCHEMA public TO pcc_limited"))
    try:
        metrics_port = free_port()
        daemon = start_daemon(**{"db.dbcon": url.set(username="pcc_limited").render_as_string(hide_password=False),
                                 "server.metrics_port": metrics_port})
        client = daemon.client()
        assert client.ask("alice@example.com", ip_in("GB")) == "DUNNO"
        with admin.connect() as connection:
            connection.execute(sa.text("REVOKE INSERT, UPDATE ON pcc_sightings, pcc_blocks, pcc_blocked_accounts "
                                       "FROM pcc_limited"))
        started = time.monotonic()
        while time.monotonic() - started < 6:
            client.ask_like_postfix(f"user{int(time.monotonic() * 10)}@example.com", ip_in("US"))
            time.sleep(0.2)
        log = daemon.log()
        assert log.count("failed, answering from memory") == 1, log[-3000:]
        metrics = scrape(metrics_port)
        assert metrics[("pcc_database_up", ())] == 0
        assert metrics[("pcc_database_error_answers_total", ())] > 10
        health = run_pcc("--config", daemon.config_path, "--health")
        assert health.returncode == 2 and health.stdout.startswith("PCC CRITICAL - the daemon cannot use its database")
        with admin.connect() as connection:
            connection.execute(sa.text("GRANT INSERT, UPDATE ON pcc_sightings, pcc_blocks, pcc_blocked_accounts "
                                       "TO pcc_limited"))
        deadline = time.monotonic() + 15
        while "is back; pcc answers from it again" not in daemon.log():
            assert time.monotonic() < deadline, daemon.log()[-3000:]
            client.ask_like_postfix("zed@example.com", ip_in("FR"))
            time.sleep(0.3)
        assert scrape(metrics_port)[("pcc_database_up", ())] == 1
    finally:
        with admin.connect() as connection:
            Base.metadata.drop_all(connection)
            connection.execute(sa.text("REVOKE ALL ON SCHEMA public FROM pcc_limited"))
            connection.execute(sa.text("DROP ROLE IF EXISTS pcc_limited"))
        admin.dispose()


# --- pcc.py --health -------------------------------------------------------------------

def health(config):
    result = run_pcc("--config", config, "--health")
    assert len(result.stdout.splitlines()) == 1 and " | " in result.stdout, result
    return result.returncode, result.stdout


def test_health_up_down_and_with_its_database_cut(start_daemon, shared_db_url, tmp_path):
    url = sa.engine.make_url(shared_db_url)
    proxy = TcpProxy(url.host, url.port)
    try:
        daemon = start_daemon(**{"db.dbcon": url.set(host="127.0.0.1", port=proxy.port).render_as_string(
            hide_password=False)})
        status, line = health(daemon.config_path)
        assert status == 0 and line.startswith("PCC OK - answering, database in use | response_time="), line
        walk(daemon.client(), "alice@example.com", ["GB", "US", "FR"])
        proxy.cut()
        daemon.client().ask_like_postfix("alice@example.com", ip_in("DE"))  # decided from memory, spooled
        status, line = health(daemon.config_path)
        assert status == 2 and line.startswith("PCC CRITICAL - the daemon cannot use its database"), line
        assert "1 blocks wait in the spool" in line and "pcc_spooled_blocks=1" in line
        proxy.restore()
        deadline = time.monotonic() + 15
        while health(daemon.config_path)[0] != 0:
            assert time.monotonic() < deadline
            daemon.client().ask_like_postfix("dave@example.com", ip_in("GB"))
            time.sleep(0.3)
        daemon.stop()
        status, line = health(daemon.config_path)
        assert status == 2 and line.startswith(f"PCC CRITICAL - no answer from 127.0.0.1:{daemon.port} within 2 s")
    finally:
        proxy.close()


def test_health_warns_of_stale_geoip_data_and_unknown_for_a_bad_config(start_daemon, tmp_path):
    daemon = start_daemon(**{"geoip.database": ""})  # the embedded data is from 2024
    status, line = health(daemon.config_path)
    assert status == 1 and line.startswith("PCC WARNING - GeoIP data is ") and "--update-geoip" in line
    broken = write_config(tmp_path, {"server.port": "many"}, name="broken.conf")
    status, line = health(broken)
    assert status == 3 and line.startswith("PCC UNKNOWN - ")


def test_health_of_a_port_that_is_not_pcc(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as silent:
        config = write_config(tmp_path, {"server.port": silent.getsockname()[1]})
        started = time.monotonic()
        status, line = health(config)  # accepts, never answers
        assert status == 2 and "within 2 s" in line and time.monotonic() - started < 4


def test_a_missing_grant_at_start_is_refused_with_the_grant_to_give(tmp_path):
    url = sa.engine.make_url(fresh_database(SERVER_DATABASES["mariadb"]))
    admin = sa.create_engine(url)
    with admin.begin() as connection:
        connection.execute(sa.text("DROP USER IF EXISTS 'pcc_reader'@'%'"))
        connection.execute(sa.text("CREATE USER 'pcc_reader'@'%' IDENTIFIED BY 'Reader-Pw-7'"))
        connection.execute(sa.text(f"GRANT SELECT, CREATE ON {url.database}.* TO 'pcc_reader'@'%'"))
    try:
        limited = url.set(username="pcc_reader", password="Reader-Pw-7").render_as_string(hide_password=False)
        config = write_config(tmp_path, {"db.dbcon": limited, "server.port": free_port()})
        result = run_pcc("--config", config, "-d", "--stderr")
        assert result.returncode == 1, result
        (refusal,) = [line for line in result.stderr.splitlines() if line.startswith("pcc: database")]
        assert "refuses pcc" in refusal and "GRANT SELECT, INSERT, UPDATE, CREATE" in refusal
        assert "Reader-Pw-7" not in result.stderr
    finally:
        with admin.begin() as connection:
            connection.execute(sa.text("DROP USER IF EXISTS 'pcc_reader'@'%'"))
        admin.dispose()
