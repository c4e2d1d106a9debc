"""Keeping the daemon's memory current: the blocked list loaded whole before
the ports open and read again every BLOCKED_LIST_RELOAD seconds, its copy on
disk, the poll of the change log every CHANGES_POLL_INTERVAL (which keeps the
database's clock too), and the change log trimmed; with [limits] on, the
volume counts shared (volume.VolumeLedger.sync) every VOLUME_SYNC_INTERVAL.  The timings are
memory.py's, beside what they keep current.

And the other way: a block the database lost (memory.AccountMemory.lost_blocks:
a failover to a standby that was behind, a restore from a backup) is written
again, with an ERROR line and pcc_blocks_restored_total; refused meanwhile.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

from sqlalchemy import exc as sa_exc

from .common import first_line, log, start_thread, utcnow
from .config import MONITOR_ACTION, Settings
from .database import Database
from .rules import Rule, RuleBook
from .memory import BLOCKED_LIST_RELOAD, CHANGES_POLL_INTERVAL, AccountMemory
from .storage import is_data_error
from .volume import VOLUME_SYNC_INTERVAL

# Lost blocks written again: one ERROR line each for this many a round, the
# rest named this many to a line (a daemon pointed at an empty database
# restores them all).
RESTORED_LINES_PER_ROUND = 20


class MemoryUpkeep:
    """The helpers that keep AccountMemory in step with the database."""

    def __init__(self, memory: AccountMemory, database: Database, settings: Callable[[], Settings]):
        self.memory = memory
        self.database = database
        self.settings = settings  # those in force: a reload replaces them
        self._trim_failing = False
        self._restoring = threading.Lock()  # the poll's thread and the blocked list's both restore

    def start(self, stopping: threading.Event) -> None:
        start_thread(self._poll_changes_until, "pcc-changes", stopping)
        start_thread(self._keep_blocked_list, "pcc-blocked-list", stopping)
        start_thread(self._share_volume_until, "pcc-volume", stopping)

    def load_blocked_list(self) -> None:
        """Before the ports open: the whole blocked list, from the database or,
        while it cannot be asked, from the copy on disk; and the blocks in the
        spool either way."""
        database, memory = self.database, self.memory
        problem = "it failed at start" if database.outage.failing else ""
        # The copy first: an account on it that the database lacks stays
        # blocked unless the database ended its block while pcc was down.
        loaded = memory.load_blocked_copy()
        if not problem:
            try:
                database.ensure()
                database.clock.follow(database.store)
                memory.reload_blocked(database.store, database.journal.blocked_logins())
                self.load_rules()
            except sa_exc.SQLAlchemyError as error:
                problem = first_line(error)
        source = "the database"
        if problem:
            source = (f"{memory.blocked_file or 'nowhere (no spool_file)'}, {loaded} accounts (the database "
                      f"cannot be asked: {problem})")
        for entry in database.journal.entries():
            if entry["action"] != MONITOR_ACTION:
                memory.set_blocked(entry["login"], True)
        log.info("blocked list: %d accounts, from %s and the spool", memory.blocked_count(), source)
        if not problem:
            self.restore_lost_blocks()
        memory.save_blocked_copy()

    def _keep_blocked_list(self, stopping: threading.Event) -> None:
        database, reloaded = self.database, time.monotonic()
        while not stopping.wait(1.0):
            if time.monotonic() - reloaded >= BLOCKED_LIST_RELOAD and not database.outage.failing \
                    and database.tables_ready:
                reloaded = time.monotonic()
                try:
                    self.memory.reload_blocked(database.store, database.journal.blocked_logins())
                    self.load_rules()  # a change the poll missed (its log trimmed meanwhile) is read here
                except sa_exc.SQLAlchemyError as error:
                    log.debug("blocked list reload failed: %s", first_line(error))
            self.restore_lost_blocks()
            self.memory.save_blocked_copy()

    def _poll_changes_until(self, stopping: threading.Event) -> None:
        while not stopping.wait(CHANGES_POLL_INTERVAL):
            self.poll_changes()

    def poll_changes(self) -> bool:
        """Forget the accounts in memory that the database knows more about;
        keep the database's time."""
        database = self.database
        if not database.tables_ready:
            return False
        asked = time.time()
        changes = self.memory.poll(database.store, database.journal.blocked_logins())
        if changes is None:
            return False
        database.clock.measured(changes.database_now, asked, time.time())
        if changes.rules_changed:
            try:
                self.load_rules()
            except sa_exc.SQLAlchemyError as error:
                log.debug("reading the rules failed: %s", first_line(error))
        self.restore_lost_blocks()
        return True

    def load_rules(self) -> None:
        """pcc --rule's rules, read whole; said when they change."""
        database = self.database
        book = RuleBook(Rule(*row) for row in database.store.load_rules())
        if book.rules != database.rules.rules:
            scopes = sorted({rule.scope for rule in book.rules})
            log.info("rules: %d for %d domains and accounts%s", len(book.rules), len(scopes),
                     f" ({', '.join(scopes[:10])}{', ...' if len(scopes) > 10 else ''})" if scopes else "")
        database.rules = book

    def _share_volume_until(self, stopping: threading.Event) -> None:
        while not stopping.wait(VOLUME_SYNC_INTERVAL):
            self.share_volume()

    def share_volume(self) -> bool:
        """With [limits] on: this daemon's counts written, the others' read,
        the old ones trimmed.  Nothing while the database fails (the counts
        wait in memory; each daemon limits on its own meanwhile)."""
        database = self.database
        if not database.rules.limits_anywhere(self.settings()) or not database.tables_ready or database.outage.failing:
            return False
        now = utcnow()
        if not database.volume.sync(database.store, now):
            return False
        database.volume.trim(database.store, now)
        return True

    def restore_lost_blocks(self) -> None:
        """Write again the blocks the database lost; what fails waits for the
        next round (the accounts stay refused meanwhile)."""
        if not self.memory.lost_blocks() or self.database.outage.failing:
            return
        if not self._restoring.acquire(blocking=False):
            return  # the other thread is at it
        try:
            self._restore(self.memory.lost_blocks())
        finally:
            self._restoring.release()

    def _restore(self, lost: dict) -> None:
        restored: list = []  # (login, lost id, new id)
        for done, (login, block_id) in enumerate(sorted(lost.items())):
            try:
                new_id = self.database.store.record_block(
                    login, utcnow(), source="restored", action=self.settings().action, countries=[],
                    reason=f"written again: the database lost block #{block_id} (no unblock recorded there)",
                    replace_flag=True)  # a monitor-mode flag made since is no block: the block replaces it
            except sa_exc.SQLAlchemyError as error:
                if is_data_error(error):  # refused for good: said once a reload (it stays refused here)
                    log.error("%s: its block, lost by the database, is refused by it: %s", login, first_line(error))
                    self.memory.written_again(login, None)
                    continue
                log.error("%d blocks the database lost cannot be written again yet (the accounts stay refused): %s",
                          len(lost) - done, first_line(error))
                self.database.failed(first_line(error), on_write=True)  # tried again once it takes writes
                break
            self.memory.written_again(login, new_id)
            if new_id is None:
                log.info("%s: its lost block is in the database again (another daemon or an administrator wrote "
                         "it first)", login)
            else:
                restored.append((login, block_id, new_id))
        self.database.metrics.blocks_restored(len(restored))
        for login, block_id, new_id in restored[:RESTORED_LINES_PER_ROUND]:
            log.error("%s: the database lost its block (#%s; no unblock recorded there: a failover to a standby "
                      "that was behind, or a restore from a backup?); written again as block #%d", login, block_id,
                      new_id)
        rest = restored[RESTORED_LINES_PER_ROUND:]
        for start in range(0, len(rest), RESTORED_LINES_PER_ROUND):
            log.error("the database lost the blocks of these accounts too, written again: %s",
                      ", ".join(login for login, _block_id, _new_id in rest[start:start + RESTORED_LINES_PER_ROUND]))

    def trim_changes(self) -> None:
        """Delete the change log's rows every daemon has long read."""
        up_to = self.memory.trimmable_changes(time.monotonic())
        if up_to is None or self.database.outage.failing:
            return
        try:
            self.database.store.trim_changes(up_to)
        except sa_exc.SQLAlchemyError as error:
            (log.debug if self._trim_failing else log.warning)(
                "cannot trim the change log pcc_changes, which grows until it is (GRANT DELETE ON pcc_changes "
                "TO the daemon's user: see docs/administration.md, Databases): %s", first_line(error))
            self._trim_failing = True
            return
        self._trim_failing = False
