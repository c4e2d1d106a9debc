"""Storage on SQLite, MariaDB and PostgreSQL: the same tests on each."""
import datetime as dt
import threading

import pytest
import sqlalchemy as sa
from conftest import all_at_once, ip_in, policy_request

from pcclib.decision import CountrySeen
from pcclib.notify import Notifier
from pcclib.protocol import parse_request
from pcclib.storage import CLOCK_SAMPLES, Block, Sighting

T0 = dt.datetime(2026, 11, 25, 8, 0, tzinfo=dt.timezone.utc)


@pytest.fixture
def settings(make_settings, db_url):
    return make_settings(**{"db.dbcon": db_url, "policy.action": "HOLD", "policy.reason": "held by pcc"})


@pytest.fixture
def service(settings, service_on):
    return service_on(settings)


def ask(service, login, country, now, host=1, version=4):
    return service.answer(parse_request(
        f"{k}={v}" for k, v in policy_request(login, ip_in(country, host, version)).items()), now)


def record(store, login, country, ip, when):
    """One sighting written as the daemon's writer writes them."""
    store.merge_sightings([(login, CountrySeen(country, when, when, ip))])


def count(store, model, **where):
    with store.engine.connect() as connection:
        statement = sa.select(sa.func.count()).select_from(model)
        for column, value in where.items():
            statement = statement.where(getattr(model, column) == value)
        return connection.execute(statement).scalar()


def test_rows_grow_with_countries_not_messages(service):
    now = T0
    for message in range(300):
        now += dt.timedelta(seconds=61)  # every message old enough to refresh last_seen
        assert ask(service, "alice@example.com", "GB", now, host=message % 7 + 1) == "DUNNO"
    assert ask(service, "alice@example.com", "US", now) == "DUNNO"
    assert count(service.database.store, Sighting) == 2
    history = service.database.store.load_history("alice@example.com", T0)
    gb = next(seen for seen in history.sightings if seen.country == "GB")
    assert gb.first_seen == T0 + dt.timedelta(seconds=61)
    assert gb.last_seen == now and gb.last_ip == ip_in("GB", 300 % 7 + 0)


def test_timestamps_round_trip_in_utc_to_the_microsecond(service):
    moment = dt.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=dt.timezone.utc)
    record(service.database.store, "alice@example.com", "GB", "20.1.0.1", moment)
    (seen,) = service.database.store.load_history("alice@example.com", moment).sightings
    assert seen.last_seen == moment and seen.last_seen.tzinfo is not None


def test_the_fourth_country_blocks_and_the_block_is_kept(service, settings, service_on):
    answers = [ask(service, "alice@example.com", country, T0 + dt.timedelta(minutes=i))
               for i, country in enumerate(["GB", "US", "FR", "DE", "GB"])]
    assert answers == ["DUNNO"] * 3 + ["HOLD held by pcc"] * 2
    ((login, since, block),) = service.database.store.blocked_accounts()
    assert login == "alice@example.com" and since == T0 + dt.timedelta(minutes=3)
    assert [c["country"] for c in block.countries] == ["GB", "US", "FR", "DE"]
    assert block.countries[3]["last_ip"] == ip_in("DE")
    assert block.trigger["sasl_username"] == "alice@example.com"
    assert block.trigger["client_address"] == ip_in("DE")
    assert block.action == "HOLD" and block.source == "policy"
    # a restarted daemon (new engine) still enforces it
    restarted = service_on(settings)
    assert ask(restarted, "alice@example.com", "GB", T0 + dt.timedelta(days=30)) == "HOLD held by pcc"


def test_logins_sharing_a_local_part_are_separate_accounts(service):
    for i, country in enumerate(["GB", "US", "FR", "DE"]):
        ask(service, "alice@example.com", country, T0 + dt.timedelta(minutes=i))
    assert ask(service, "alice@example.com", "GB", T0 + dt.timedelta(hours=1)) == "HOLD held by pcc"
    assert ask(service, "alice@example.org", "GB", T0 + dt.timedelta(hours=1)) == "DUNNO"
    assert ask(service, "alice", "US", T0 + dt.timedelta(hours=1)) == "DUNNO"
    assert [row.login for row in service.database.store.blocked_accounts()] == ["alice@example.com"]
    assert count(service.database.store, Sighting, login="alice@example.org") == 1


def test_the_window_expires(service):
    for i, country in enumerate(["GB", "US", "FR"]):
        ask(service, "alice@example.com", country, T0 + dt.timedelta(minutes=i))
    later = T0 + dt.timedelta(days=3, seconds=30)  # GB has left the window, US and FR have not
    assert ask(service, "alice@example.com", "DE", later) == "DUNNO"
    assert ask(service, "alice@example.com", "SE", later) == "HOLD held by pcc"


def test_unblock_ends_the_block_and_starts_a_fresh_window(service):
    for i, country in enumerate(["GB", "US", "FR", "DE"]):
        ask(service, "alice@example.com", country, T0 + dt.timedelta(minutes=i))
    block_id = service.database.store.unblock("alice@example.com", T0 + dt.timedelta(hours=1))
    assert block_id is not None
    assert service.database.store.unblock("alice@example.com", T0 + dt.timedelta(hours=1)) is None  # repeatable
    assert service.database.store.blocked_accounts() == []
    now = T0 + dt.timedelta(hours=2)
    assert [ask(service, "alice@example.com", c, now) for c in ["GB", "US", "FR"]] == ["DUNNO"] * 3
    assert ask(service, "alice@example.com", "SE", now) == "HOLD held by pcc"
    account, sightings, blocks = service.database.store.account("alice@example.com")
    assert [b.unblocked_at is not None for b in blocks] == [True, False]  # history stays


def test_exactly_one_block_when_writers_race(service):
    results = []
    barrier = threading.Barrier(16)

    def block():
        barrier.wait()
        results.append(service.database.store.record_block(
            "alice@example.com", T0, source="policy", action="HOLD", reason="race", countries=[],
            sighting=("GB", "20.1.0.1")))

    threads = [threading.Thread(target=block) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len([r for r in results if r is not None]) == 1
    assert len(results) == 16
    assert count(service.database.store, Block) == 1
    assert count(service.database.store, Sighting) == 1


def test_concurrent_requests_crossing_the_threshold_make_one_block(service, smtp_sink, make_settings, db_url):
    for i, country in enumerate(["GB", "US", "FR"]):
        ask(service, "alice@example.com", country, T0 + dt.timedelta(minutes=i))
    settings = make_settings(**{"db.dbcon": db_url, "mail.notice": "admin@example.com",
                                "mail.mailsrv": "127.0.0.1", "mail.mailport": smtp_sink.port,
                                "policy.action": "HOLD", "policy.reason": "held by pcc"})
    service.settings = settings
    service.responder.notifier = Notifier(settings)  # block mails go through the responder
    service.responder.reconfigure(settings)
    answers = all_at_once(32, lambda n: ask(service, "alice@example.com", ["DE", "SE", "JP", "BR"][n % 4],
                                            T0 + dt.timedelta(minutes=10), host=n + 1))
    assert answers == ["HOLD held by pcc"] * 32
    assert count(service.database.store, Block) == 1
    assert len(service.database.store.blocked_accounts()) == 1
    assert len(smtp_sink.wait_for(1)) == 1
    assert len(smtp_sink.wait_for(2, timeout=1)) == 1  # and no second email


def test_manual_block_is_enforced(service):
    assert service.database.store.record_block("mallory@example.com", T0, source="admin", action="HOLD",
                                      reason="reported", countries=[]) is not None
    assert ask(service, "Mallory@Example.com", "GB", T0) == "HOLD held by pcc"


def test_old_sightings_can_be_deleted(service):
    record(service.database.store, "alice@example.com", "GB", "20.1.0.1", T0 - dt.timedelta(days=40))
    record(service.database.store, "alice@example.com", "US", "21.1.0.1", T0)
    assert service.database.store.delete_sightings_before(T0 - dt.timedelta(days=30)) == 1
    assert count(service.database.store, Sighting) == 1


# --- the database's clock (DatabaseClock), readings given by hand ----------------


@pytest.fixture
def clock(caplog):
    from pcclib.common import set_clock_offset
    from pcclib.storage import DatabaseClock

    caplog.set_level("INFO", logger="pcc")
    yield DatabaseClock()
    set_clock_offset(0)  # the process's clock as it was


def read_at(clock, host: float, offset: float, round_trip: float, answered_after: float = None) -> None:
    """One reading: asked at `host` (this host's time), the database's clock
    `offset` ahead, read `answered_after` seconds after the question (default:
    half the round trip), the answer back `round_trip` seconds after it."""
    answered_after = round_trip / 2 if answered_after is None else answered_after
    database_now = dt.datetime.fromtimestamp(host + answered_after + offset, dt.timezone.utc)
    clock.measured(database_now, host, host + round_trip)


def test_a_reading_queued_in_front_of_the_database_moves_nothing_and_warns_of_nothing(clock, caplog):
    """A pooler that queues a query 15 s: the database read its clock at once,
    the answer waited.  The midpoint would say 7.5 s behind."""
    read_at(clock, 1_000_000.0, 0.0, 15.0, answered_after=0.0)
    assert clock.offset == 0.0
    assert "clock" not in caplog.text


def test_the_fastest_reading_gives_the_offset(clock, caplog):
    read_at(clock, 1_000_000.0, 10.0, 0.002)
    assert clock.offset == pytest.approx(10.0, abs=0.01)
    assert "this host's clock is 10.0 s behind the database's" in caplog.text
    read_at(clock, 1_000_001.0, 10.0, 3.0, answered_after=0.0)  # slow: the fast one still stands
    assert clock.offset == pytest.approx(10.0, abs=0.01)
    for n in range(CLOCK_SAMPLES - 2):  # the host's clock was put right; the old fast reading still counts...
        read_at(clock, 1_000_002.0 + n, 0.0, 0.01)
    assert clock.offset == pytest.approx(10.0, abs=0.01)
    read_at(clock, 1_000_010.0, 0.0, 0.01)  # ...until the last CLOCK_SAMPLES readings no longer hold it
    assert clock.offset == pytest.approx(0.0, abs=0.02)
    assert "agrees with the database's again" in caplog.text


def test_a_database_slow_to_answer_still_sets_the_time_to_within_half_its_round_trip(clock, caplog):
    """Every reading takes a second, the host's clock is ten minutes behind:
    pcc keeps the database's time all the same (never the host's), within
    half a second."""
    for n in range(3):
        read_at(clock, 1_000_000.0 + 10 * n, 600.0, 1.0, answered_after=0.1 * n)
    assert clock.offset == pytest.approx(600.0, abs=0.5)
    assert "s behind the database's: pcc keeps the database's time" in caplog.text


def test_a_reading_across_a_step_of_this_hosts_clock_is_no_reading(clock):
    read_at(clock, 1_000_000.0, 30.0, -5.0)
    assert clock.offset == 0.0


def test_sightings_commit_without_waiting_for_the_disk_and_blocks_with_it(service):
    """#34: a sighting's commit (a first sighting's, before its answer) does
    not wait for the disk (SQLite: synchronous=NORMAL) or the WAL flush and a
    synchronous standby (PostgreSQL: synchronous_commit off for that
    transaction); a block's commit waits as the server is configured."""
    store = service.database.store
    statements: list = []

    def seen(_connection, _cursor, statement, *_rest):
        statements.append(" ".join(statement.split()))

    for engine in {store.engine, store.sightings_engine}:
        sa.event.listen(engine, "before_cursor_execute", seen)
    record(store, "alice@example.com", "GB", "20.1.0.1", T0)
    wrote_sighting, statements[:] = list(statements), []
    store.record_block("alice@example.com", T0, source="policy", action="HOLD", reason="test", countries=[])
    wrote_block = list(statements)
    if store.dialect == "sqlite":
        with store.sightings_engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
        with store.engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL: blocks
    if store.dialect == "postgresql":
        assert wrote_sighting[0] == "SET LOCAL synchronous_commit TO OFF"
        assert not any("synchronous_commit" in statement for statement in wrote_block)
    assert count(store, Sighting, login="alice@example.com") == 1
