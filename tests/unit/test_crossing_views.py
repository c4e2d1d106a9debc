"""The crossing on one database shared by two daemons (two PolicyServices in
one process here, on SQLite, MariaDB and PostgreSQL): a new country is in the
database before its answer; one decided from memory reads the rows first; two
added on views read before each other's commit are caught after it."""
import datetime as dt

from conftest import counted_request, daemon_with_memory, sightings_in_database

from pcclib.storage import Store

NOW = dt.datetime(2026, 12, 3, 13, 57, tzinfo=dt.timezone.utc)
LOGIN = "alice@example.com"


def two_daemons(db_url, make_settings, geoip) -> tuple:
    settings = make_settings(**{"db.dbcon": db_url, "policy.action": "REJECT", "db.spool_file": ""})
    daemons = tuple(daemon_with_memory(settings, Store(db_url), geoip) for _ in range(2))
    services = tuple(parts.service for parts in daemons)
    for service in services:
        service.database.sightings._thread = object()  # as if started: only a commit writes at once
        service.memory._polled_at = float("inf")  # as if the poll were current: memory is trusted
    return services


def answer(service, country, minutes=0) -> str:
    return service.answer(counted_request(country, LOGIN), NOW + dt.timedelta(minutes=minutes))


def stop(*services) -> None:
    for service in services:
        service.database.store.dispose()


def test_a_new_country_is_in_the_database_before_its_answer_a_known_one_waits_behind(db_url, make_settings, geoip):
    a, b = two_daemons(db_url, make_settings, geoip)
    assert answer(a, "GB") == "DUNNO"
    assert sightings_in_database(db_url, LOGIN) == {(LOGIN, "GB")}  # no batch ran: the request committed it
    assert answer(a, "GB", minutes=2) == "DUNNO"  # its refresh goes behind the answer
    assert a.database.sightings.waiting() == 1
    stop(a, b)


def test_a_new_country_decided_from_memory_reads_what_another_daemon_answered(db_url, make_settings, geoip):
    a, b = two_daemons(db_url, make_settings, geoip)
    assert [answer(b, c, n) for n, c in enumerate(["GB", "US"])] == ["DUNNO"] * 2  # in B's memory
    assert answer(a, "FR", 3) == "DUNNO"  # B's memory does not have it
    assert b.memory.current(LOGIN) is not None
    assert answer(b, "DE", 4).startswith("REJECT")  # read again: GB, US, FR and DE
    assert answer(b, "US", 5).startswith("REJECT")
    stop(a, b)


def test_two_new_countries_on_views_read_before_each_others_commit(db_url, make_settings, geoip):
    """A and B each read GB and US, then A commits FR and B DE: the later to
    read again after its commit sees four countries and blocks."""
    a, b = two_daemons(db_url, make_settings, geoip)
    assert [answer(a, c, n) for n, c in enumerate(["GB", "US"])] == ["DUNNO"] * 2
    real_load = b.database.store.load_history
    stale = real_load(LOGIN, NOW - dt.timedelta(days=3))
    reads = []

    def load_before_a_commits(login, since):  # B's first read began before A's commit
        reads.append(login)
        return stale if len(reads) == 1 else real_load(login, since)

    b.database.store.load_history = load_before_a_commits
    b.memory.histories.clear()
    assert answer(a, "FR", 3) == "DUNNO"
    assert answer(b, "DE", 3).startswith("REJECT")
    assert len(reads) == 2
    assert sightings_in_database(db_url, LOGIN) == {(LOGIN, c) for c in ("GB", "US", "FR", "DE")}
    stop(a, b)


def test_an_account_new_to_both_daemons_is_decided_without_a_read_and_still_crosses(db_url, make_settings, geoip):
    """#34: each daemon has loaded the logins the database knows (none of
    this account), so each decides its first request of it on an empty
    history without a read; the commit of each new place and the read after
    it still bring the other's countries in, and the fourth blocks."""
    settings = make_settings(**{"db.dbcon": db_url, "policy.action": "REJECT", "db.spool_file": ""})
    daemons = [daemon_with_memory(settings, Store(db_url), geoip) for _ in range(2)]
    for parts in daemons:
        parts.database.store.create_tables()
        assert parts.upkeep.poll_changes() and parts.service.memory.known.loaded
        parts.database.sightings._thread = object()  # as if started: only a commit writes at once
        parts.service.memory._polled_at = float("inf")  # no poll from here on: neither sees the other's changes
    a, b = (parts.service for parts in daemons)
    reads = [lambda service=service: service.database.store.operation_counts().get("history_read", 0)
             for service in (a, b)]
    assert answer(a, "GB") == "DUNNO" and reads[0]() == 1  # never seen: only the read after the commit
    assert answer(b, "US", 1) == "DUNNO" and reads[1]() == 1  # never seen by B either (no poll since)
    assert answer(a, "FR", 2) == "DUNNO"  # read again after its commit: GB, US, FR
    assert answer(b, "DE", 3).startswith("REJECT")  # read again after its commit: four
    assert answer(b, "GB", 4).startswith("REJECT")
    assert daemons[0].upkeep.poll_changes()  # A learns of B's block from the change log
    assert answer(a, "GB", 5).startswith("REJECT")
    stop(a, b)
