"""What memory.py and the write-behind do, in the process (#14): the decision's
log line takes no lock, SQLite connections are kept, old tables get the
poll's index, a batch with one refused value writes the others, unwritten
sightings count, the poll of changes forgets exactly what another writer
changed (late commits, reads begun before a change, a long gap: start over),
a new place commits apart.  Real daemons sharing a database are
e2e/test_write_behind.py."""
import datetime as dt
import logging
import threading
import time

import sqlalchemy as sa
from conftest import (
    count_rows,
    counted_request,
    daemon_with_memory,
    sightings_in_database,
)

from pcclib.common import log, utcnow
from pcclib.decision import AccountHistory, CountrySeen
from pcclib import memory as memory_module
from pcclib.logs import queue_logging
from pcclib.memory import CHANGES_SETTLE_EVERY
from pcclib.writer import SightingWriter
from pcclib.storage import AdminStore, BlockedAccount, Change, Store, UTCDateTime


def test_the_log_line_takes_no_lock_the_other_threads_wait_on(caplog):
    """The daemon's handler only puts the record on a queue: a handler lock
    held elsewhere (a slow syslog, a thread formatting) does not stop it."""
    records = []

    class Slow(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))

    logger = log
    saved = logger.handlers[:]
    target = Slow()
    logger.handlers[:] = [target]
    listener = queue_logging()
    try:
        (queued,) = logger.handlers
        with queued.lock, target.lock:  # as if another thread were in the middle of a line
            done = threading.Event()
            thread = threading.Thread(target=lambda: (logger.warning("decision %s", 1), done.set()))
            thread.start()
            assert done.wait(2), "the log call waited for a handler lock"
    finally:
        listener.stop()
        logger.handlers[:] = saved
    assert records == ["decision 1"]


def test_sqlite_connections_are_kept_across_requests(tmp_path):
    """32 threads reading at once reuse pooled connections instead of opening
    one (with its PRAGMAs) per request."""
    store = Store(f"sqlite:///{tmp_path}/pcc.sqlite3")
    store.create_tables()
    opened = []
    sa.event.listen(store.fast_engine, "connect", lambda *_args: opened.append(1))
    barrier = threading.Barrier(32)

    def reader():
        barrier.wait()
        for _ in range(50):
            store.load_history("alice@example.com", utcnow())

    threads = [threading.Thread(target=reader) for _ in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(opened) <= 32, f"{len(opened)} connections opened for 1,600 reads"
    store.dispose()


def test_tables_of_pcc_1_2_get_the_index_the_poll_needs(db_url):
    engine = sa.create_engine(db_url)
    old_sightings = sa.Table(  # pcc 1.2's table: no index on last_seen
        "pcc_sightings", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("login", sa.String(255)), sa.Column("country", sa.String(2)),
        sa.Column("first_seen", UTCDateTime()), sa.Column("last_seen", UTCDateTime()),
        sa.Column("last_ip", sa.String(45)),
        sa.UniqueConstraint("login", "country", name="uq_pcc_sightings_login_country"))
    old_sightings.create(engine)
    engine.dispose()
    store = Store(db_url)
    store.create_tables()
    inspector = sa.inspect(store.engine)
    indexes = inspector.get_indexes("pcc_sightings") + inspector.get_unique_constraints("pcc_sightings")
    assert any(list(index["column_names"])[:1] == ["last_seen"] for index in indexes), indexes
    store.dispose()


def test_a_batch_with_a_value_the_database_refuses_writes_the_others(db_url, caplog):
    store = Store(db_url)
    store.create_tables()
    writer = SightingWriter(store)
    now = utcnow()
    writer._thread = object()  # as if started: add() only queues
    writer.add("alice@example.com", CountrySeen("GB", now, now, "20.1.0.1"))
    writer.add("bob@example.com", CountrySeen("US", now, now, "x" * 400))  # longer than last_ip's 45
    writer._thread = None
    with caplog.at_level(logging.ERROR, logger="pcc"):
        written = writer.flush()
    rows = sightings_in_database(db_url)
    if store.dialect == "sqlite":  # SQLite keeps what it is given
        assert written and rows == {("alice@example.com", "GB"), ("bob@example.com", "US")}
    else:
        assert written and rows == {("alice@example.com", "GB")}
        assert "database refused the sighting of 'bob@example.com'" in caplog.text
    assert writer.waiting() == 0
    store.dispose()


def test_unwritten_sightings_count_for_the_next_read(db_url):
    """A sighting waiting in memory (the database refused to take it for now)
    counts when the account's history is read from the database."""
    store = Store(db_url)
    store.create_tables()
    writer = SightingWriter(store)
    now = utcnow()
    writer._thread = object()
    writer.add("alice@example.com", CountrySeen("JP", now, now, "20.1.0.1"))
    assert [seen.country for seen in writer.pending_for("alice@example.com")] == ["JP"]
    assert writer.pending_for("bob@example.com") == ()
    writer._thread = None
    assert writer.flush() and writer.pending_for("alice@example.com") == ()
    store.dispose()


def test_the_poll_forgets_what_another_writer_changed_and_only_that(db_url, make_settings, geoip):
    settings = make_settings(**{"db.dbcon": db_url})
    mine, other = AdminStore(db_url), AdminStore(db_url)
    parts = daemon_with_memory(settings, mine, geoip)  # the poll starts where the blocked list was read
    service = parts.service
    memory, now = service.memory, utcnow()
    history = AccountHistory(sightings=(CountrySeen("GB", now, now, "20.1.0.1"),))

    def remembered(login):
        memory.histories.put(login, history, time.monotonic())
        return login

    alice, bob = remembered("alice@example.com"), remembered("bob@example.com")
    mine.merge_sightings([(alice, CountrySeen("GB", now, now, "20.1.0.1"))])
    assert parts.upkeep.poll_changes() and memory.histories.get(alice) is history  # its own write: nothing new
    other.merge_sightings([(alice, CountrySeen("US", now, now, "20.2.0.1"))])
    assert parts.upkeep.poll_changes() and memory.histories.get(alice) is None  # another daemon's: read again
    assert memory.histories.get(bob) is history
    remembered(alice)
    other.record_block(alice, now, source="policy", action="REJECT", reason="test", countries=[])
    parts.upkeep.poll_changes()
    assert memory.histories.get(alice) is None and memory.is_blocked(alice)
    other.unblock(alice, now)
    parts.upkeep.poll_changes()
    assert not memory.is_blocked(alice)
    other.grant_travel_pass(bob, ["JP"], now, now + dt.timedelta(days=1), "test")
    parts.upkeep.poll_changes()
    assert memory.histories.get(bob) is None  # a new travel pass
    for store in (mine, other):
        store.dispose()


def test_a_change_committed_after_a_newer_one_still_reaches_the_poll(shared_db_url, make_settings, geoip):
    """A change id is taken before its commit: a transaction that commits
    after a later one's (a slow commit, another Galera node) is read by the
    settling polls, not skipped.  (SQLite has one writer at a time: its ids
    are committed in order.)"""
    db_url = shared_db_url
    settings = make_settings(**{"db.dbcon": db_url})
    mine, other = AdminStore(db_url), AdminStore(db_url)
    parts = daemon_with_memory(settings, mine, geoip)
    service = parts.service
    now = utcnow()
    with other.engine.connect() as late:
        late.execute(sa.insert(BlockedAccount).values(login="carol@example.com", blocked_since=now))
        other._log_changes(late, ["carol@example.com"])  # its id, not yet committed
        other.merge_sightings([("dave@example.com", CountrySeen("US", now, now, "20.2.0.1"))])  # a higher id
        assert parts.upkeep.poll_changes() and not service.memory.is_blocked("carol@example.com")
        late.commit()
    for _ in range(CHANGES_SETTLE_EVERY):
        parts.upkeep.poll_changes()
    assert service.memory.is_blocked("carol@example.com")
    for store in (mine, other):
        store.dispose()


def test_a_read_that_began_before_a_change_is_not_remembered(db_url, make_settings, geoip):
    """A request that read an account's history before another daemon's change,
    and remembers it after the poll saw that change, would keep the old
    history as current: it is dropped."""
    settings = make_settings(**{"db.dbcon": db_url})
    mine, other = AdminStore(db_url), AdminStore(db_url)
    parts = daemon_with_memory(settings, mine, geoip)
    service = parts.service
    now, read_at = utcnow(), time.monotonic()
    stale = mine.load_history("alice@example.com", now - dt.timedelta(days=1))
    other.merge_sightings([("alice@example.com", CountrySeen("US", now, now, "20.2.0.1"))])
    assert parts.upkeep.poll_changes()
    service.memory.remember("alice@example.com", stale, False, read_at)
    assert service.memory.histories.get("alice@example.com") is None
    for store in (mine, other):
        store.dispose()


def test_each_daemon_trims_the_change_log_it_read_long_ago(db_url, make_settings, geoip, monkeypatch):
    import pcclib.memory

    settings = make_settings(**{"db.dbcon": db_url})
    mine, other = AdminStore(db_url), AdminStore(db_url)
    parts = daemon_with_memory(settings, mine, geoip)
    now = utcnow()
    other.merge_sightings([("alice@example.com", CountrySeen("US", now, now, "20.2.0.1"))])
    assert parts.upkeep.poll_changes()
    parts.upkeep.trim_changes()  # read just now: kept
    assert count_rows(db_url, Change) == 1
    monkeypatch.setattr(pcclib.memory, "CHANGES_KEPT", 0.0)
    other.merge_sightings([("bob@example.com", CountrySeen("US", now, now, "20.2.0.1"))])  # not read yet
    parts.upkeep.trim_changes()
    with mine.engine.connect() as connection:
        assert connection.execute(sa.select(Change.login)).scalars().all() == ["bob@example.com"]
    for store in (mine, other):
        store.dispose()


def test_a_daemon_that_could_not_poll_for_long_starts_over(db_url, make_settings, geoip, monkeypatch, caplog):
    """Rows it never read may have been trimmed by another daemon: it reads
    the blocked list whole and forgets every history."""
    import pcclib.memory

    settings = make_settings(**{"db.dbcon": db_url})
    mine, other = AdminStore(db_url), AdminStore(db_url)
    parts = daemon_with_memory(settings, mine, geoip)
    service = parts.service
    now = utcnow()
    service.memory.histories.put("alice@example.com", AccountHistory(), time.monotonic())
    other.record_block("bob@example.com", now, source="admin", action="REJECT", reason="test", countries=[])
    other.trim_changes(other.newest_change())  # as if another daemon had trimmed what this one missed
    monkeypatch.setattr(pcclib.memory, "CHANGES_RESYNC_AFTER", 0.0)
    with caplog.at_level(logging.WARNING, logger="pcc"):
        assert parts.upkeep.poll_changes()
    assert "reading the blocked list again" in caplog.text
    assert service.memory.is_blocked("bob@example.com")
    assert service.memory.histories.get("alice@example.com") is None
    for store in (mine, other):
        store.dispose()


def test_a_new_place_is_committed_apart_and_kept_when_the_commit_fails(tmp_path):
    """commit=True writes the sighting before returning, without the batch
    waiting behind the answers; when the database fails it returns False and
    the sighting waits behind the answers, counted by the next read."""
    url = f"sqlite:///{tmp_path}/pcc.sqlite3"
    store = Store(url)
    store.create_tables()
    writer = SightingWriter(store)
    writer._thread = object()  # as if started: add() only queues
    now = utcnow()
    writer.add("bob@example.com", CountrySeen("GB", now, now, "20.1.0.1"))  # behind the answers
    assert writer.add("alice@example.com", CountrySeen("JP", now, now, "20.1.0.2"), commit=True)
    assert sightings_in_database(url) == {("alice@example.com", "JP")}
    assert writer.waiting() == 1  # bob's still waits for its batch
    writer.store = Store(f"sqlite:///{tmp_path}/missing/pcc.sqlite3", create_directory=False)
    assert not writer.add("alice@example.com", CountrySeen("FR", now, now, "20.1.0.3"), commit=True)
    assert {seen.country for seen in writer.pending_for("alice@example.com")} == {"FR"}
    assert writer.waiting() == 2
    writer.store = store
    assert writer.flush() and writer.waiting() == 0
    assert sightings_in_database(url) == {("alice@example.com", "JP"), ("alice@example.com", "FR"),
                                          ("bob@example.com", "GB")}
    store.dispose()


def _reads(parts) -> int:
    return parts.database.store.operation_counts().get("history_read", 0)


def test_an_account_nobody_has_seen_is_decided_without_a_read_then_read_once_its_place_is_committed(
        db_url, make_settings, geoip):
    """#34: a first sighting costs the commit of its place and the one read
    after it (where two daemons' new places meet), not a read before too."""
    settings = make_settings(**{"db.dbcon": db_url, "policy.action": "REJECT"})
    old = AdminStore(db_url)
    old.create_tables()
    now = utcnow()
    old.merge_sightings([("old@example.com", CountrySeen("GB", now, now, "20.1.0.1"))])
    parts = daemon_with_memory(settings, AdminStore(db_url), geoip)
    assert parts.upkeep.poll_changes()
    assert parts.service.answer(counted_request("GB", "new@example.com"), now) == "DUNNO"
    assert _reads(parts) == 1, "a login no daemon has seen was read before its decision"
    assert sightings_in_database(db_url, "new@example.com") == {("new@example.com", "GB")}
    assert parts.service.answer(counted_request("US", "old@example.com"), now) == "DUNNO"
    assert _reads(parts) == 3, "a login the database had before the daemon started was not read"
    old.dispose()


def test_what_another_writer_or_an_administrator_did_to_a_new_account_is_read_before_its_decision(
        db_url, make_settings, geoip):
    """The set of known logins follows the poll: --only-from set for an
    account that never sent, or a sighting another daemon wrote, makes the
    account's next request read the database."""
    settings = make_settings(**{"db.dbcon": db_url, "policy.action": "REJECT"})
    other = AdminStore(db_url)
    other.create_tables()
    parts = daemon_with_memory(settings, AdminStore(db_url), geoip)
    assert parts.upkeep.poll_changes()
    now = utcnow()
    other.set_allowed_countries("ceo@example.com", ["ES"], now, "root")
    other.merge_sightings([("bob@example.com", CountrySeen("GB", now, now, "20.1.0.1"))])
    assert parts.upkeep.poll_changes()
    assert parts.service.answer(counted_request("GB", "ceo@example.com"), now).startswith("REJECT")
    assert _reads(parts) == 1  # read before its decision (the block needs no read after)
    assert parts.service.answer(counted_request("US", "bob@example.com"), now) == "DUNNO"
    assert _reads(parts) == 3  # read before its decision, and after its new place's commit
    other.dispose()


def test_without_a_current_poll_every_account_is_read(db_url, make_settings, geoip):
    """The set is trusted only while the poll is: a daemon that cannot poll
    (or has not yet loaded the set) reads as before."""
    settings = make_settings(**{"db.dbcon": db_url})
    parts = daemon_with_memory(settings, AdminStore(db_url), geoip)
    parts.database.store.create_tables()
    now = utcnow()
    assert parts.service.answer(counted_request("GB", "first@example.com"), now) == "DUNNO"
    assert _reads(parts) == 2, "decided without a read before the set of known logins was loaded"
    assert parts.upkeep.poll_changes()
    parts.service.memory._polled_at -= 10  # as if the poll had stopped 10 s ago
    assert parts.service.answer(counted_request("GB", "second@example.com"), now) == "DUNNO"
    assert _reads(parts) == 4, "decided without a read on a stale poll"


def test_the_known_logins_are_every_login_loaded_or_added_and_no_other(monkeypatch):
    monkeypatch.setattr(memory_module, "KNOWN_LOGINS_SORT_RUN", 3)  # several runs to merge
    known = memory_module.KnownLogins()
    known.add("early@example.com")  # a decision while the set loads
    loaded = [f"user{n}@example.org" for n in range(20)] + ["user3@example.org"]
    known.load(loaded)
    known.add("later@example.com")
    assert known.loaded
    assert all(login in known for login in loaded + ["early@example.com", "later@example.com"])
    assert not any(f"user{n}@example.org" in known for n in range(20, 200))
    assert list(known._loaded) == sorted(known._loaded)
    for login in loaded:  # what every decision does: a login loaded already takes no more room
        known.add(login)
    assert len(known._added) == 1  # later@ alone


def test_logins_that_cannot_be_read_cost_reads_not_the_poll(tmp_path, make_settings, geoip, caplog, monkeypatch):
    """A failing read of the known logins (a grant missing, a timeout) leaves
    the poll working and every account read as before, with one WARNING."""
    db_url = f"sqlite:///{tmp_path}/pcc.sqlite3"
    settings = make_settings(**{"db.dbcon": db_url})
    store = AdminStore(db_url)
    store.create_tables()
    parts = daemon_with_memory(settings, store, geoip)

    def refused():
        raise sa.exc.OperationalError("SELECT login", {}, Exception("permission denied"))

    monkeypatch.setattr(store, "known_logins", refused)
    with caplog.at_level(logging.WARNING, logger="pcc"):
        assert parts.upkeep.poll_changes() and parts.upkeep.poll_changes()
    assert caplog.text.count("cannot read the logins the database knows") == 1  # retried a minute later
    assert parts.service.answer(counted_request("GB", "new@example.com"), utcnow()) == "DUNNO"
    assert _reads(parts) == 2
