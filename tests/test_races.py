"""64 requests of one account from 4 new countries at once, through two
daemons on one database: exactly one block, exactly one email."""
import time

import pytest
import sqlalchemy as sa

import pcc
from conftest import SERVER_DATABASES, all_at_once, fresh_database, ip_in


@pytest.fixture(params=["sqlite", "mariadb", "postgresql"])
def any_db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/race.sqlite3"
    return fresh_database(SERVER_DATABASES[request.param])


def test_64_concurrent_requests_make_one_block_and_one_email(start_daemon, any_db_url, smtp_sink):
    common = {"db.dbcon": any_db_url, "policy.action": "HOLD", "policy.reason": "held",
              "mail.notice": "admin@example.com", "mail.mailsrv": "127.0.0.1", "mail.mailport": smtp_sink.port}
    daemons = [start_daemon(**common), start_daemon(**common)]
    seed = daemons[0].client()
    assert [seed.ask("alice@example.com", ip_in(c)) for c in ("GB", "US", "FR")] == ["DUNNO"] * 3

    clients = [daemons[n % 2].client() for n in range(64)]
    answers = all_at_once(64, lambda n: clients[n].ask("alice@example.com",
                                                       ip_in(["DE", "SE", "JP", "BR"][n % 4], host=n + 1)))
    assert answers == ["HOLD held"] * 64  # each saw more than 3 countries
    engine = sa.create_engine(any_db_url)
    with engine.connect() as connection:
        blocks = connection.execute(sa.select(sa.func.count()).select_from(pcc.Block)).scalar()
    engine.dispose()
    assert blocks == 1
    assert len(smtp_sink.wait_for(1)) == 1
    assert len(smtp_sink.wait_for(2, timeout=2)) == 1
    for daemon in daemons:  # every request after the block gets the action, on both daemons
        assert daemon.client().ask("alice@example.com", ip_in("GB")) == "HOLD held"
    # On a loaded machine the 64 transactions queue on one row for longer than
    # the watchdog's 0.8 s: a request answered meanwhile from memory spools its
    # block, which the database then reports as made already.
    written_already = "decided during the database outage is now written (it was blocked already)"
    deadline = time.monotonic() + 10
    while True:
        logs = daemons[0].log() + daemons[1].log()
        spooled = logs.count("(database failing: block spooled) NEW BLOCK")
        if logs.count(written_already) >= spooled or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert logs.count("NEW BLOCK") - spooled == 1
    assert logs.count(written_already) == spooled
