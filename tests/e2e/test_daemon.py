"""The daemon end to end: real processes, real databases, a real SMTP listener."""
import os
import stat
import subprocess
import time

import pytest
import sqlalchemy as sa
from conftest import ROOT, SERVER_DATABASES, blocked_logins, free_port, ip_in, pcc_command, wait_until_visible, walk

from pcclib.common import first_line
from pcclib.storage import Base

COUNTRIES = ["GB", "US", "FR", "DE"]


def test_block_notification_reaches_the_admins(start_daemon, smtp_sink):
    daemon = start_daemon(**{"mail.notice": "admin@example.com, security@example.com",
                             "mail.mailsrv": "127.0.0.1", "mail.mailport": smtp_sink.port,
                             "policy.action": "HOLD", "policy.reason": "held for review"})
    client = daemon.client()
    answers = walk(client, "alice@example.com", COUNTRIES, version=6)
    assert answers == ["DUNNO"] * 3 + ["HOLD held for review"]
    walk(client, "alice@example.com", ["SE", "JP"])  # later messages: no more email
    ((recipients, message),) = smtp_sink.wait_for(1)
    assert sorted(recipients) == ["admin@example.com", "security@example.com"]
    assert message["From"].startswith("pcc@")
    assert "alice@example.com" in message["Subject"]
    body = message.get_content()
    for country in COUNTRIES:
        assert country in body and ip_in(country, version=6) in body
    assert "HOLD held for review" in body
    assert f"--config {daemon.config_path} -u alice@example.com" in body
    time.sleep(0.5)
    assert len(smtp_sink.messages) == 1
    # The undo line runs as printed, from a shell whose python3 lacks pcc's packages.
    (undo,) = [line.strip() for line in body.splitlines() if line.strip().endswith("-u alice@example.com")]
    assert undo.startswith(str(ROOT / "pcc.py"))
    ran = subprocess.run(undo, shell=True, capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
    assert ran.returncode == 0, ran.stderr
    assert "unblocked" in ran.stdout
    wait_until_visible()  # the daemon had alice in memory, blocked; the unblock comes by its poll
    assert walk(client, "alice@example.com", ["SE"]) == ["DUNNO"]


def test_a_dead_smtp_server_never_delays_the_answer(start_daemon):
    dead_port = free_port()  # nothing listens here
    daemon = start_daemon(**{"mail.notice": "admin@example.com", "mail.mailsrv": "127.0.0.1",
                             "mail.mailport": dead_port, "policy.action": "REJECT"})
    client = daemon.client()
    walk(client, "alice@example.com", COUNTRIES[:3])
    started = time.monotonic()
    assert client.ask("alice@example.com", ip_in("DE")).startswith("REJECT")
    assert client.ask("alice@example.com", ip_in("GB")).startswith("REJECT")
    assert time.monotonic() - started < 0.5
    deadline = time.monotonic() + 10
    while "notification to admin@example.com not sent" not in daemon.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "notification to admin@example.com not sent (retrying" in daemon.log()


def test_a_slow_smtp_server_never_delays_the_answer(start_daemon):
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))  # accepts, never greets
    threading.Thread(target=lambda: listener.accept(), daemon=True).start()
    daemon = start_daemon(**{"mail.notice": "admin@example.com", "mail.mailsrv": "127.0.0.1",
                             "mail.mailport": listener.getsockname()[1], "policy.action": "REJECT"})
    client = daemon.client()
    walk(client, "alice@example.com", COUNTRIES[:3])
    started = time.monotonic()
    assert client.ask("alice@example.com", ip_in("DE")).startswith("REJECT")
    assert client.ask("bob@example.com", ip_in("DE")) == "DUNNO"
    assert time.monotonic() - started < 0.5
    listener.close()


def test_blank_notice_sends_nothing(start_daemon, smtp_sink):
    daemon = start_daemon(**{"mail.notice": "", "mail.mailsrv": "127.0.0.1", "mail.mailport": smtp_sink.port})
    assert walk(daemon.client(), "alice@example.com", COUNTRIES)[-1].startswith("HOLD")
    assert smtp_sink.wait_for(1, timeout=1.5) == []


def test_blocks_survive_a_restart(start_daemon, tmp_path):
    first = start_daemon(**{"policy.action": "REJECT"})
    assert walk(first.client(), "alice@example.com", COUNTRIES)[-1].startswith("REJECT")
    first.stop()
    second = start_daemon(**{"policy.action": "REJECT"})
    assert second.client().ask("alice@example.com", ip_in("GB")).startswith("REJECT")


def test_two_daemons_share_one_database(start_daemon, shared_db_url):
    a = start_daemon(**{"db.dbcon": shared_db_url, "policy.action": "REJECT"})
    b = start_daemon(**{"db.dbcon": shared_db_url, "policy.action": "REJECT"})
    client_a, client_b = a.client(), b.client()
    # countries seen through A and B add up (within a second of being seen)
    assert client_a.ask("alice@example.com", ip_in("GB")) == "DUNNO"
    wait_until_visible()
    assert client_b.ask("alice@example.com", ip_in("US")) == "DUNNO"
    wait_until_visible()
    assert client_a.ask("alice@example.com", ip_in("FR")) == "DUNNO"
    wait_until_visible()
    assert client_b.ask("alice@example.com", ip_in("DE")).startswith("REJECT")
    # a block made through B is answered by A, and one made through A by B
    wait_until_visible()
    assert client_a.ask("alice@example.com", ip_in("GB")).startswith("REJECT")
    walk(client_a, "bob@example.com", COUNTRIES)
    wait_until_visible()
    assert client_b.ask("bob@example.com", ip_in("GB")).startswith("REJECT")
    assert client_b.ask("carol@example.com", ip_in("GB")) == "DUNNO"


def test_database_password_never_reaches_the_log(start_daemon, tmp_path):
    secret = "s3cret-Pa55"
    # trust authentication accepts any password, so the daemon works with it
    url = SERVER_DATABASES["postgresql"].replace("postgres@", f"postgres:{secret}@")
    from conftest import fresh_database
    fresh_database(url)
    daemon = start_daemon(**{"db.dbcon": url})
    assert daemon.client().ask("alice@example.com", ip_in("GB")) == "DUNNO"
    unreachable = f"postgresql+psycopg://pcc:{secret}@127.0.0.1:{free_port()}/pcc"
    broken = start_daemon(**{"db.dbcon": unreachable})
    assert broken.client().ask("alice@example.com", ip_in("GB")) == "DUNNO"  # db_error_action
    for log in (daemon.log(), broken.log()):
        assert secret not in log
        assert "***" in log
    assert "database postgresql+psycopg://pcc:***@127.0.0.1" in broken.log()
    assert broken.log().count("failed, answering from memory (else DUNNO) until it is back") == 1


@pytest.fixture
def limited_mariadb_user():
    """A MariaDB user with only SELECT, INSERT, UPDATE and CREATE."""
    admin = sa.create_engine(SERVER_DATABASES["mariadb"], connect_args={"connect_timeout": 3})
    try:
        with admin.begin() as connection:
            Base.metadata.drop_all(connection)
            connection.execute(sa.text("DROP USER IF EXISTS 'pcc_limited'@'%'"))
            connection.execute(sa.text("CREATE USER 'pcc_limited'@'%' IDENTIFIED BY 'Lim1ted-pw'"))
            database = sa.engine.make_url(SERVER_DATABASES["mariadb"]).database
            connection.execute(sa.text(f"GRANT SELECT, INSERT, UPDATE, CREATE ON {database}.* TO 'pcc_limited'@'%'"))
    except sa.exc.OperationalError as error:
        from conftest import unavailable
        unavailable(f"MariaDB ({first_line(error)})")
    url = sa.engine.make_url(SERVER_DATABASES["mariadb"]).set(username="pcc_limited", password="Lim1ted-pw")
    yield url.render_as_string(hide_password=False)
    with admin.begin() as connection:
        connection.execute(sa.text("DROP USER IF EXISTS 'pcc_limited'@'%'"))
    admin.dispose()


def test_the_daemon_needs_only_select_insert_update_create(start_daemon, limited_mariadb_user, smtp_sink):
    daemon = start_daemon(**{"db.dbcon": limited_mariadb_user, "policy.action": "REJECT"})
    client = daemon.client()
    assert walk(client, "alice@example.com", COUNTRIES)[-1].startswith("REJECT")
    assert client.ask("alice@example.com", ip_in("GB")).startswith("REJECT")
    assert "ERROR" not in daemon.log()


def test_startup_log_names_the_geoip_data_and_the_rule(start_daemon, geoip_path):
    daemon = start_daemon()
    assert f"GeoIP {geoip_path} (GeoLite2-Country, built " in daemon.log()
    assert "rule: more than 3 countries in 3 days -> HOLD" in daemon.log()
    assert "GeoIP data is" not in daemon.log()  # the test database was built today


def test_startup_warns_about_stale_geoip_data(start_daemon):
    daemon = start_daemon(**{"geoip.database": ""})  # the embedded data, built 2024-06-18
    assert "GeoIP embedded GeoLite2-Country data of 2024-06-18 (geoip2fast package)" in daemon.log()
    assert "GeoIP data is" in daemon.log() and "days old (built 2024-06-18)" in daemon.log()


def test_a_port_in_use_is_a_clear_error(start_daemon):
    import socket
    import subprocess
    import sys

    from conftest import ROOT, write_config

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        daemon = start_daemon()
        config = write_config(daemon.log_path.parent, {"server.port": port, "db.dbcon": "sqlite:///:memory:"},
                              name="taken.conf")
        result = subprocess.run([sys.executable, str(ROOT / "pcc.py"), "-d", "--stderr", "--config", config],
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_logins_that_differ_are_different_accounts_on_every_database(start_daemon, db_url):
    daemon = start_daemon(**{"db.dbcon": db_url, "policy.action": "REJECT"})
    client = daemon.client()
    assert walk(client, "alice@example.com", ["GB", "US", "FR", "DE"])[-1].startswith("REJECT")
    for other in ("alicé@example.com", "ali\tce@example.com", "\u212aarl@example.com"):
        assert client.ask(other, ip_in("GB")) == "DUNNO", other
    assert walk(client, "alicé@example.com", ["US", "FR"]) == ["DUNNO", "DUNNO"]
    assert blocked_logins(db_url) == {"alice@example.com"}
    # the admin commands name every login the daemon records
    shown = pcc_command(daemon.config_path, "-s", "ali\\x09ce@example.com").stdout
    assert "ali\\x09ce@example.com: not blocked" in shown


def test_the_daemon_creates_its_files_private(start_daemon, tmp_path):
    state = tmp_path / "state"
    daemon = start_daemon(**{"db.dbcon": f"sqlite:///{state}/pcc.sqlite3", "db.spool_file": str(state / "spool")})
    daemon.client().ask("alice@example.com", ip_in("GB"))
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o750
    assert stat.S_IMODE(os.stat(state / "pcc.sqlite3").st_mode) == 0o640
