"""Write-heavy traffic (#14): sightings are written behind the answer in
batches and counted from memory at once; blocks are still written before the
answer; several daemons on one database see each other's sightings, blocks,
unblocks and travel passes within a second; a kill -9 loses at most the last
moments of sightings, never a block."""
import logging
import threading
import time

import sqlalchemy as sa
from conftest import (
    sightings_in_database,
)

from pcclib.common import log, utcnow
from pcclib.decision import AccountHistory, CountrySeen
from pcclib.logs import queue_logging
from pcclib.memory import SightingWriter
from pcclib.notify import Notifier
from pcclib.service import PolicyService
from pcclib.storage import DatabaseChanges, Store, UTCDateTime


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


def test_poll_of_changes_forgets_only_what_memory_does_not_know(db_url, make_settings, geoip):
    settings = make_settings(**{"db.dbcon": db_url})
    store = Store(db_url)
    service = PolicyService(settings, store, geoip, Notifier(settings))
    now = utcnow()
    history = AccountHistory(sightings=(CountrySeen("GB", now, now, "20.1.0.1"),))
    service.memory.histories.put("alice@example.com", history, time.monotonic())
    service.memory.apply(DatabaseChanges([("alice@example.com", "GB", now)], [], []))
    assert service.memory.histories.get("alice@example.com") is history  # its own write: nothing new
    service.memory.apply(DatabaseChanges([("alice@example.com", "US", now)], [], []))
    assert service.memory.histories.get("alice@example.com") is None  # another daemon's: read again
    service.memory.histories.put("alice@example.com", history, time.monotonic())
    service.memory.apply(DatabaseChanges([], [("alice@example.com", now, None, "REJECT")], []))
    assert service.memory.histories.get("alice@example.com") is None and service.memory.is_blocked("alice@example.com")
    service.memory.apply(DatabaseChanges([], [("alice@example.com", None, now, None)], []))
    assert not service.memory.is_blocked("alice@example.com")
    service.memory.histories.put("bob@example.com", history, time.monotonic())
    service.memory.apply(DatabaseChanges([], [], [("bob@example.com", "JP", now)]))
    assert service.memory.histories.get("bob@example.com") is None  # a new travel pass
    store.dispose()
