"""PgBouncer in front of PostgreSQL (#36), Debian's pgbouncer on this
machine's PostgreSQL: session pooling needs nothing; transaction pooling
hands each transaction whichever server connection is free, where psycopg's
prepared statements are unknown or taken.  With ?prepare_threshold=none in
dbcon pcc never prepares one; without it, the first such error turns
preparing off with one WARNING, and traffic goes on.  Host only (the Debian
13 root has no pgbouncer)."""
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time

import pytest
import sqlalchemy as sa
from conftest import IN_CI, PolicyClient, blocked_logins, free_port, ip_in, unavailable

CLIENTS = 4
ACCOUNTS = 30  # per client, each walked through three countries (the third blocks)


@pytest.fixture
def pgbouncer(postgresql_url):
    """A transaction-pooling PgBouncer before this worker's database, as user
    postgres when the tests run as root (PgBouncer refuses root)."""
    program = shutil.which("pgbouncer") or ("/usr/sbin/pgbouncer" if os.path.exists("/usr/sbin/pgbouncer") else "")
    if not program:
        if os.environ.get("PCC_CI_ROOT") == "debian13":
            pytest.skip("PgBouncer is tried on the host only")
        unavailable("pgbouncer (Debian package pgbouncer)")
    url = sa.engine.make_url(postgresql_url)
    directory = tempfile.mkdtemp(prefix="pcc-pgbouncer-")
    port = free_port()
    with open(f"{directory}/users.txt", "w") as users:
        users.write(f'"{url.username}" ""\n')
    with open(f"{directory}/pgbouncer.ini", "w") as ini:
        ini.write(f"[databases]\n{url.database} = host={url.host} port={url.port} dbname={url.database}\n"
                  f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
                  f"auth_type = trust\nauth_file = {directory}/users.txt\npool_mode = transaction\n"
                  f"default_pool_size = 3\nmax_client_conn = 500\nlogfile = {directory}/pgbouncer.log\n"
                  f"pidfile = {directory}/pgbouncer.pid\n")
    command = [program, f"{directory}/pgbouncer.ini"]
    if os.geteuid() == 0:
        shutil.chown(directory, "postgres", "postgres")
        for name in os.listdir(directory):
            shutil.chown(f"{directory}/{name}", "postgres", "postgres")
        command.insert(1, "--user=postgres")  # pgbouncer itself (not runuser) gets the signal that stops it
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                engine = sa.create_engine(f"postgresql+psycopg://{url.username}@127.0.0.1:{port}/{url.database}")
                with engine.connect() as connection:
                    connection.execute(sa.text("SELECT 1"))
                engine.dispose()
                break
            except sa.exc.OperationalError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"pgbouncer did not start: {process.stderr.read().decode()[-500:]}" if IN_CI
                                or process.poll() is not None else "pgbouncer did not start")
                time.sleep(0.1)
        yield f"postgresql+psycopg://{url.username}@127.0.0.1:{port}/{url.database}"
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
        shutil.rmtree(directory, ignore_errors=True)


def traffic(port: int, round_name: str) -> tuple:
    """CLIENTS connections walking ACCOUNTS accounts each: (refused accounts, problems)."""
    refused, problems = set(), []

    def client(number: int) -> None:
        talk = PolicyClient(port)
        for account in range(ACCOUNTS):
            login = f"{round_name}{number}-{account}@example.com"
            for country in ("GB", "US", "FR"):
                try:
                    answer = talk.ask(login, ip_in(country, host=number * 100 + account + 1))
                except (OSError, AssertionError) as error:
                    problems.append(f"{login}: {error}")
                    return
                if answer.startswith("REJECT"):
                    refused.add(login)
        talk.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return refused, problems


@pytest.mark.parametrize("asked", [True, False], ids=["prepare_threshold=none", "found out"])
def test_transaction_pooling_works_when_asked_and_when_found_out(start_daemon, pgbouncer, postgresql_url, asked):
    dbcon = pgbouncer + ("?prepare_threshold=none" if asked else "")
    daemon = start_daemon(**{"db.dbcon": dbcon, "policy.how_many_different_countries": 2, "policy.action": "REJECT"})
    refused, problems = traffic(daemon.port, "first")
    first_round = len(daemon.log())
    again, more_problems = traffic(daemon.port, "second")  # what the first round found out holds
    assert not problems + more_problems, (problems + more_problems)[:3]
    # Found out, the requests that met the error were answered as in an
    # outage (an account not in memory gets db_error_action, uncounted): a
    # few of the first round may lack a country.  None of the second.
    assert len(again) == CLIENTS * ACCOUNTS
    assert len(refused) == CLIENTS * ACCOUNTS if asked else len(refused) >= CLIENTS * ACCOUNTS - 2 * CLIENTS
    refused |= again
    deadline = time.monotonic() + 10
    while blocked_logins(postgresql_url) != refused and time.monotonic() < deadline:
        time.sleep(0.2)
    assert blocked_logins(postgresql_url) == refused
    log = daemon.log()
    warnings = log.count("forgets or mixes up prepared statements")
    if asked:
        assert warnings == 0 and " ERROR " not in log, log[-2000:]
    else:
        assert warnings == 1, log[-3000:]
        assert "as PgBouncer does in transaction pooling: pcc prepares none from now on" in log[:first_round]
    second_round = log[first_round:]
    assert "prepared statement" not in second_round and " ERROR " not in second_round, second_round[-2000:]
