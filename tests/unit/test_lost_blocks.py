"""A block pcc answered never silently vanishes (#36), on each database: when
the database stops listing a blocked account and has no unblock for its
block (a failover to a standby that was behind, a restore from a backup),
the daemon keeps refusing it, writes the block again, says so in one ERROR
line and counts it; an administrator's unblock is believed.  The same with
a real primary and a standby cut behind: e2e/test_failover.py."""
import logging

import sqlalchemy as sa
from conftest import blocked_logins, daemon_with_memory, query

from pcclib.common import utcnow
from pcclib.config import MONITOR_ACTION
from pcclib.metrics import Metrics
from pcclib.outage import OutageJournal
from pcclib.storage import AdminStore, Block, BlockedAccount, Change

ALICE, BOB = "alice@example.com", "bob@example.com"


def lose(url: str, *logins: str) -> None:
    """The database as a backup taken before these accounts' blocks has it."""
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        for model in (BlockedAccount, Block):
            connection.execute(sa.delete(model).where(model.login.in_(logins)))
    engine.dispose()


def restored_count(parts) -> float:
    return parts.database.metrics.registry.get_sample_value("pcc_blocks_restored_total")


def block(store, login: str, action: str = "REJECT") -> int:
    """A block as a daemon (or -b) records it: its id."""
    return store.record_block(login, utcnow(), source="policy", action=action, reason="t", countries=[])


def own_block(parts, login: str) -> int:
    """A block of this daemon's, its id known to its memory (as service._record leaves it)."""
    block_id = block(parts.database.store, login)
    parts.service.memory.set_blocked(login, True, block_id)
    return block_id


def daemon(make_settings, url, geoip, **overrides):
    settings = make_settings(**{"db.dbcon": url, "policy.action": "REJECT", **overrides})
    return daemon_with_memory(settings, AdminStore(url), geoip, metrics=Metrics(enabled=True),
                              journal=OutageJournal(settings.spool_file))


def reload_now(parts) -> None:
    """What the blocked-list thread does every BLOCKED_LIST_RELOAD seconds."""
    database = parts.database
    parts.service.memory.reload_blocked(database.store, database.journal.blocked_logins())
    parts.upkeep.restore_lost_blocks()


def test_a_block_the_database_lost_is_refused_throughout_and_written_again(db_url, make_settings, geoip, caplog):
    parts = daemon(make_settings, db_url, geoip)
    other = AdminStore(db_url)  # another daemon
    own = own_block(parts, ALICE)
    learnt = block(other, BOB)
    assert parts.upkeep.poll_changes() and parts.service.memory.is_blocked(BOB)
    lose(db_url, ALICE, BOB)
    assert blocked_logins(db_url) == set()
    with caplog.at_level(logging.ERROR, logger="pcc"):
        parts.service.memory.reload_blocked(parts.database.store, frozenset())
        assert parts.service.memory.is_blocked(ALICE) and parts.service.memory.is_blocked(BOB)  # not yet written
        parts.upkeep.restore_lost_blocks()
    assert blocked_logins(db_url) == {ALICE, BOB}
    lines = [record.getMessage() for record in caplog.records if record.levelno == logging.ERROR]
    assert len(lines) == 2
    assert any(line.startswith(f"{ALICE}: the database lost its block (#{own};") for line in lines)
    assert any(line.startswith(f"{BOB}: the database lost its block (#{learnt};") for line in lines)
    assert restored_count(parts) == 2
    (reason,) = query(db_url, sa.select(Block.reason).where(Block.login == ALICE, Block.source == "restored"))[0]
    assert reason == f"written again: the database lost block #{own} (no unblock recorded there)"
    reload_now(parts)  # the new ids are known: nothing lost twice
    assert restored_count(parts) == 2 and parts.service.memory.is_blocked(ALICE)
    other.dispose()
    parts.database.store.dispose()


def test_an_unblock_is_believed_whether_the_poll_or_the_reload_sees_it(db_url, make_settings, geoip):
    parts = daemon(make_settings, db_url, geoip)
    admin = AdminStore(db_url)
    now = utcnow()
    for login in (ALICE, BOB):
        admin.record_block(login, now, source="admin", action="REJECT", reason="t", countries=[])
    assert parts.upkeep.poll_changes()
    assert parts.service.memory.is_blocked(ALICE) and parts.service.memory.is_blocked(BOB)
    admin.unblock(ALICE, now)
    assert parts.upkeep.poll_changes() and not parts.service.memory.is_blocked(ALICE)
    admin.unblock(BOB, now)
    reload_now(parts)  # as if the poll had missed it
    assert not parts.service.memory.is_blocked(BOB)
    assert restored_count(parts) is None or restored_count(parts) == 0
    assert blocked_logins(db_url) == set()
    admin.dispose()
    parts.database.store.dispose()


def test_a_change_that_shows_a_lost_block_unblocked_does_not_unblock_it(db_url, make_settings, geoip):
    """Another daemon writes a sighting of an account whose block the database
    lost: the poll sees it changed and not blocked, and asks why."""
    parts = daemon(make_settings, db_url, geoip)
    other = AdminStore(db_url)
    block(other, ALICE)
    assert parts.upkeep.poll_changes() and parts.service.memory.is_blocked(ALICE)
    lose(db_url, ALICE)
    block(other, BOB)
    with other.engine.begin() as connection:
        connection.execute(sa.insert(Change), [{"login": ALICE, "writer": "other"}])
    assert parts.upkeep.poll_changes()
    assert parts.service.memory.is_blocked(ALICE) and ALICE in blocked_logins(db_url)
    assert restored_count(parts) == 1
    other.dispose()
    parts.database.store.dispose()


def test_a_restart_on_a_database_restored_from_a_backup_writes_the_lost_blocks_again(
        db_url, make_settings, geoip, caplog):
    """The copy of the blocked list beside the spool knows each block's id:
    what the database lost while pcc was down is written again at start, and
    a block an administrator ended meanwhile stays ended."""
    parts = daemon(make_settings, db_url, geoip)
    now = utcnow()
    for login in (ALICE, BOB):
        own_block(parts, login)
    parts.service.memory.save_blocked_copy()
    parts.database.store.dispose()
    lose(db_url, ALICE)
    admin = AdminStore(db_url)
    admin.unblock(BOB, now)
    admin.dispose()
    with caplog.at_level(logging.ERROR, logger="pcc"):
        again = daemon(make_settings, db_url, geoip)  # loads the copy, then the database's list
    assert again.service.memory.is_blocked(ALICE) and not again.service.memory.is_blocked(BOB)
    assert blocked_logins(db_url) == {ALICE}
    assert f"{ALICE}: the database lost its block" in caplog.text and BOB not in caplog.text
    assert restored_count(again) == 1
    again.database.store.dispose()


def test_a_change_log_that_went_back_is_read_again_from_its_newest_id(db_url, make_settings, geoip, caplog):
    """A standby promoted behind gives ids this daemon has read already, to
    other rows: it starts over instead of skipping them."""
    parts = daemon(make_settings, db_url, geoip)
    other = AdminStore(db_url)
    for login in (BOB, ALICE):
        block(other, login)
    assert parts.upkeep.poll_changes()
    newest = other.newest_change()
    lose(db_url, ALICE)
    with other.engine.begin() as connection:
        connection.execute(sa.delete(Change).where(Change.id >= newest))
    with caplog.at_level(logging.WARNING, logger="pcc"):
        assert parts.upkeep.poll_changes()
    assert f"change log went back from id {newest} to " in caplog.text
    assert ALICE in blocked_logins(db_url)  # found lost by the reload that starts over
    other.dispose()
    parts.database.store.dispose()


def test_while_the_database_fails_a_lost_block_waits_refused(sqlite_url, make_settings, geoip, caplog):
    parts = daemon(make_settings, sqlite_url, geoip)
    block_id = own_block(parts, ALICE)
    lose(sqlite_url, ALICE)
    parts.service.memory.reload_blocked(parts.database.store, frozenset())
    parts.database.failed("test: down")
    parts.upkeep.restore_lost_blocks()
    assert parts.service.memory.lost_blocks() == {ALICE: block_id}
    assert parts.service.memory.is_blocked(ALICE) and blocked_logins(sqlite_url) == set()
    parts.database.outage.ok(wrote=True)
    parts.upkeep.restore_lost_blocks()
    assert blocked_logins(sqlite_url) == {ALICE} and parts.service.memory.lost_blocks() == {}
    parts.database.store.dispose()


def test_a_lost_block_replaces_a_monitor_mode_flag_made_since(db_url, make_settings, geoip):
    """Another daemon in monitor mode flagged the account on the database that
    lost its block: the block written again is a block, not a second flag."""
    parts = daemon(make_settings, db_url, geoip)
    own_block(parts, ALICE)
    lose(db_url, ALICE)
    flagger = AdminStore(db_url)
    block(flagger, ALICE, MONITOR_ACTION)
    reload_now(parts)
    assert set(parts.database.store.enforced_blocks()) == {ALICE} and parts.service.memory.is_blocked(ALICE)
    assert restored_count(parts) == 1
    reload_now(parts)
    assert restored_count(parts) == 1
    flagger.dispose()
    parts.database.store.dispose()


def test_a_database_that_refuses_writes_is_an_outage_not_a_line_a_poll(postgresql_url, make_settings, geoip,
                                                                        caplog):
    """A promoted standby still read-only (or a pooler before the old primary):
    the restore fails once, the outage begins, nothing is tried until the
    database takes writes again; then it is written."""
    parts = daemon(make_settings, postgresql_url, geoip)
    own_block(parts, ALICE)
    lose(postgresql_url, ALICE)
    read_only = True

    def maybe_read_only(dbapi_connection, _record, _proxy):
        with dbapi_connection.cursor() as cursor:
            cursor.execute(f"SET default_transaction_read_only = {'on' if read_only else 'off'}")
        dbapi_connection.commit()  # the transactions after this one

    sa.event.listen(parts.database.store.engine, "checkout", maybe_read_only)
    parts.service.memory.reload_blocked(parts.database.store, frozenset())
    with caplog.at_level(logging.ERROR, logger="pcc"):
        for _round in range(5):
            parts.upkeep.restore_lost_blocks()
    assert parts.database.outage.failing
    assert caplog.text.count("cannot be written again yet") == 1 and "read-only transaction" in caplog.text
    assert parts.service.memory.is_blocked(ALICE) and blocked_logins(postgresql_url) == set()
    read_only = False
    assert parts.database.probe()
    parts.upkeep.restore_lost_blocks()
    assert blocked_logins(postgresql_url) == {ALICE} and restored_count(parts) == 1
    parts.database.store.dispose()


def test_a_copy_written_by_pcc_1_5_without_ids_is_judged_by_each_accounts_newest_block(
        db_url, make_settings, geoip, tmp_path):
    """Lines of the copy without an id (pcc 1.5 wrote logins only): an account
    whose newest block ended was unblocked while pcc was down; one the
    database has no block of was lost."""
    admin = AdminStore(db_url)
    admin.create_tables()
    now = utcnow()
    admin.record_block(BOB, now, source="admin", action="REJECT", reason="t", countries=[])
    admin.unblock(BOB, now)
    admin.dispose()
    (tmp_path / "spool.jsonl.blocked").write_text(f"{ALICE}\n{BOB}\n")
    parts = daemon(make_settings, db_url, geoip)
    assert parts.service.memory.is_blocked(ALICE) and not parts.service.memory.is_blocked(BOB)
    assert blocked_logins(db_url) == {ALICE} and restored_count(parts) == 1
    parts.database.store.dispose()
