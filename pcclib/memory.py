"""What a daemon keeps in memory so that most requests need no database read:
the recent accounts' histories and the accounts known to be blocked
(AccountMemory, kept current by a poll of the database's changes).  The
sightings counted but not yet written are writer.py's.
"""
from __future__ import annotations

import bisect
import collections
import heapq
import itertools
import os
import threading
import time
from array import array
from typing import Iterable, Optional

from sqlalchemy import exc as sa_exc

from .common import first_line, log, replace_with_lines
from .config import MONITOR_ACTION
from .decision import AccountHistory
from .storage import DatabaseChanges, Store

# Recently active accounts kept in memory: decided on without a database read
# while the poll of changes keeps them current, and during an outage.
HISTORY_CACHE_SIZE = 20000

# Every daemon reads the change log (storage.Change: what other daemons and the
# administrators changed, in the order of ids the database gave) this often,
# and decides from memory only while its latest successful poll began less
# than CHANGES_STALE_AFTER seconds ago: a change counts everywhere within a
# second of its commit, whenever it is committed and whatever the clocks say.
CHANGES_POLL_INTERVAL = 0.25
CHANGES_STALE_AFTER = 0.7
# An id is taken by a transaction's last statement, but its commit (or, with
# several primaries, another node's apply) can still show it after a higher
# one: every CHANGES_SETTLE_EVERY-th poll reads again from the newest id this
# daemon had seen CHANGES_SETTLE seconds before (by its own monotonic clock).
CHANGES_SETTLE = 5.0
CHANGES_SETTLE_EVERY = 4
# Each daemon deletes the change log's rows it read more than CHANGES_KEPT
# seconds ago, every CHANGES_TRIM_INTERVAL seconds; one that could not poll for
# CHANGES_RESYNC_AFTER seconds may have missed rows trimmed by another, and
# starts over (histories forgotten, the blocked list read whole).
CHANGES_KEPT = 600.0
CHANGES_TRIM_INTERVAL = 60.0
CHANGES_RESYNC_AFTER = 300.0

# The whole blocked list is read again this often (seconds), whatever the poll
# says: a safety net, not the way blocks travel.
BLOCKED_LIST_RELOAD = 30.0

# ...and an account is read again after this many seconds whatever the poll says.
HISTORY_MAX_AGE = 60.0

# The logins the database knows are sorted this many at a time when loaded,
# and read again this many seconds after a read that failed.
KNOWN_LOGINS_SORT_RUN = 65536
KNOWN_LOGINS_RETRY = 60.0

class HistoryCache:
    """A bounded map login -> AccountHistory, least recently used out first.

    Each entry remembers when the database read it came from began: a daemon
    decides on an entry without reading the database again while it is younger
    than HISTORY_MAX_AGE and the poll of changes (AccountMemory.poll) is
    keeping it current."""

    def __init__(self, size: int):
        self.size = size
        self._entries: collections.OrderedDict = collections.OrderedDict()  # login -> (history, read at)
        self._forgotten: dict = {}  # login -> monotonic time the poll forgot it
        self._lock = threading.Lock()

    def get(self, login: str) -> Optional[AccountHistory]:
        with self._lock:
            entry = self._entries.get(login)
            if entry is None:
                return None
            self._entries.move_to_end(login)
            return entry[0]

    def fresh(self, login: str, max_age: float) -> Optional[AccountHistory]:
        with self._lock:
            entry = self._entries.get(login)
            if entry is None or time.monotonic() - entry[1] > max_age:
                return None
            self._entries.move_to_end(login)
            return entry[0]

    def put(self, login: str, history: AccountHistory, read_at: Optional[float] = None) -> None:
        """read_at: when the database read began; None keeps the entry's (a
        decision on a cached history is no newer than that history)."""
        with self._lock:
            if read_at is None:
                previous = self._entries.get(login)
                read_at = previous[1] if previous is not None else float("-inf")
            elif read_at < self._forgotten.get(login, float("-inf")):
                return  # read before a change the poll has since seen: already stale
            self._entries[login] = (history, read_at)
            self._entries.move_to_end(login)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def forget(self, login: str) -> None:
        """The database has something newer: read it again.  A read that began
        before now, still under way, is not kept either."""
        with self._lock:
            self._entries.pop(login, None)
            self._forgotten[login] = time.monotonic()

    def prune_forgotten(self, before: float) -> None:
        with self._lock:
            self._forgotten = {login: when for login, when in self._forgotten.items() if when >= before}

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


class KnownLogins:
    """Every login the database has history of (its sightings, the blocked
    list, travel passes, --only-from), so that an account no daemon has ever
    seen is decided without a read: loaded by the poll's thread, then fed by
    the poll (other writers' changes) and by this daemon's own decisions.

    Kept as hashes: a sorted array of those loaded (8 bytes a login: a million
    accounts in 8 MB) and a set of those added since.  A collision only costs
    a read that was not needed; a login is never missing while `loaded`."""

    def __init__(self) -> None:
        self._loaded: array = array("q")  # sorted
        self._added: set = set()
        self.loaded = False  # complete up to the poll's cursor (False again when the poll starts over)

    def __contains__(self, login: str) -> bool:
        code = hash(login)
        return code in self._added or self._was_loaded(code)

    def _was_loaded(self, code: int) -> bool:
        loaded = self._loaded
        at = bisect.bisect_left(loaded, code)
        return at < len(loaded) and loaded[at] == code

    def add(self, login: str) -> None:
        """(Every decision adds its login: only a new one takes room.)"""
        code = hash(login)
        if code not in self._added and not self._was_loaded(code):
            self._added.add(code)  # one C call: atomic for the other threads

    def load(self, logins: Iterable[str]) -> None:
        """The database's logins (read after the poll's cursor was taken): the
        set is complete from now on, the poll keeping it so."""
        added = set(self._added)
        self._loaded = _sorted_codes(itertools.chain((hash(login) for login in logins), added))
        self._added.difference_update(added)
        self.loaded = True

    def __len__(self) -> int:
        return len(self._loaded) + len(self._added)


def _sorted_codes(codes: Iterable[int]) -> array:
    """`codes` sorted (a repeated one does no harm), a run at a time: sorted()
    over a million makes a million int objects at once, 40 MB more at the
    daemon's start; a run's are a few."""
    runs, run = [], array("q")
    for code in codes:
        run.append(code)
        if len(run) == KNOWN_LOGINS_SORT_RUN:
            runs.append(array("q", sorted(run)))
            run = array("q")
    runs.append(array("q", sorted(run)))
    return array("q", heapq.merge(*runs))


class AccountMemory:
    """What this daemon knows of accounts without asking the database.

    The histories of the accounts it served lately, trusted only while the
    poll of the database's changes keeps them current; and the blocked list,
    always whole: loaded before the ports open (from the database, else from
    the copy on local disk beside the spool), fed by this daemon's blocks, the
    poll and a full reload every BLOCKED_LIST_RELOAD seconds, and written back
    to that copy, so that a blocked account stays refused whatever the
    database does, a restart during an outage included.

    Each blocked account is kept with the id of its block in the database
    (where this daemon learnt it).  When the database stops listing one, the
    account leaves the list only if the database also recorded the end of that
    block (an unblock); otherwise the database lost it (a failover to a standby
    that was behind, a restore from a backup): it stays refused, among
    lost_blocks() until written again (upkeep.py)."""

    def __init__(self, size: int = HISTORY_CACHE_SIZE, blocked_file: str = ""):
        self.histories = HistoryCache(size)
        self.blocked_file = blocked_file
        self._blocked: set = set()
        self._blocked_lock = threading.Lock()
        self._blocked_changed = False  # since the copy on disk was written
        self._block_ids: dict = {}  # login -> id of its block in the database, where learnt
        self._lost: dict = {}  # login -> id of a block the database lost (None: unknown), until written again
        self._list_changed_at: dict = {}  # login -> (monotonic time, blocked?) of its latest change here
        self._cursor: Optional[int] = None  # the newest change id read
        self._cursor_moved_at = float("-inf")  # monotonic time of the read that moved it last
        self._cursor_marks: collections.deque = collections.deque()  # (monotonic, cursor) as it moved
        self._applied: dict = {}  # change id -> monotonic time, for ids a settling poll may read again
        self._polls = 0
        self._polled_at = float("-inf")  # monotonic start of the latest successful poll
        self.known = KnownLogins()
        self._known_load_after = float("-inf")  # monotonic time of the next try, after a failed one

    def is_blocked(self, login: str) -> bool:
        return login in self._blocked

    def blocked_count(self) -> int:
        return len(self._blocked)

    def set_blocked(self, login: str, blocked: bool, block_id: Optional[int] = None) -> None:
        """block_id: the id of the block in the database, when known."""
        with self._blocked_lock:
            if not blocked:
                self._block_ids.pop(login, None)
                self._lost.pop(login, None)
            elif block_id is not None:
                self._block_ids[login] = block_id
                self._lost.pop(login, None)
            if blocked == (login in self._blocked):
                return
            (self._blocked.add if blocked else self._blocked.discard)(login)
            self._blocked_changed = True
            # When: a reload or a poll whose read began before does not undo it.
            self._list_changed_at[login] = (time.monotonic(), blocked)

    def lost_blocks(self) -> dict:
        """login -> id of the block the database lost (None: unknown): still
        refused, to be written again."""
        with self._blocked_lock:
            return dict(self._lost)

    def written_again(self, login: str, block_id: Optional[int]) -> None:
        """A lost block is in the database again (block_id None: the database
        had it blocked already, by another daemon or an administrator)."""
        with self._blocked_lock:
            self._lost.pop(login, None)
            if block_id is None:  # which block it is now, the next poll or reload says
                self._block_ids.pop(login, None)
            else:
                self._block_ids[login] = block_id

    def _may_unblock(self, login: str, read_at: float, keep: frozenset) -> bool:
        """The database said `login` is not blocked, in a read that began at
        read_at: to be believed unless a block came here since (or waits in
        the spool), and only once the database shows the block ended."""
        with self._blocked_lock:
            changed_at, blocked = self._list_changed_at.get(login, (float("-inf"), False))
        return login not in keep and not (blocked and changed_at >= read_at)

    def _settle_unblocks(self, store: Store, unblocked: set, read_at: float, keep: frozenset) -> None:
        """Of the blocked accounts the database no longer lists: off the list
        if it recorded their block's end, else among the lost blocks."""
        unblocked = {login for login in unblocked if login in self._blocked}
        if not unblocked:
            return
        with self._blocked_lock:
            blocks = {login: self._block_ids.get(login) for login in unblocked}
        fates = store.block_fates(blocks)
        for login, block_id in blocks.items():
            if login not in fates:
                with self._blocked_lock:
                    if login in self._blocked:
                        self._lost[login] = block_id
            elif fates[login] is not None:  # blocked after all (written since the list was read)
                self.set_blocked(login, True, fates[login])
            elif self._may_unblock(login, read_at, keep):
                self.set_blocked(login, False)

    def reload_blocked(self, store: Store, keep: frozenset = frozenset()) -> None:
        """The whole blocked list from the database (raises its errors), plus
        `keep` (the blocks waiting in the spool).  What changed here while the
        query ran stands; an account missing from the database's list leaves
        only if its block ended there.  The first reload also starts the
        change log's poll where the list was read."""
        started = time.monotonic()
        newest = store.newest_change() if self._cursor is None else None
        blocks = store.enforced_blocks()
        with self._blocked_lock:
            fresh = set(blocks) | keep
            for login, (changed_at, blocked) in list(self._list_changed_at.items()):
                if changed_at >= started:
                    (fresh.add if blocked else fresh.discard)(login)
                elif changed_at < started - 2 * BLOCKED_LIST_RELOAD:
                    del self._list_changed_at[login]
            missing = self._blocked - fresh
            fresh |= missing  # until the database says why
            self._block_ids.update(blocks)
            for login in set(blocks) & set(self._lost):
                del self._lost[login]
            if fresh != self._blocked:
                self._blocked, self._blocked_changed = fresh, True
        self._settle_unblocks(store, missing, started, keep)
        if newest is not None:
            self._move_cursor(newest, started)

    def load_blocked_copy(self) -> int:
        """At start: the copy on disk (login, a tab and its block's id, a line each)."""
        if not self.blocked_file or not os.path.lexists(self.blocked_file):
            return 0
        descriptor = os.open(self.blocked_file, os.O_RDONLY | os.O_NOFOLLOW)
        with open(descriptor, encoding="utf-8", errors="replace") as copy:
            blocks = dict(_copy_line(line.rstrip("\n")) for line in copy if line.strip())
        for login, block_id in blocks.items():
            self.set_blocked(login, True, block_id)
        return len(blocks)

    def save_blocked_copy(self) -> None:
        """Rewrite the copy on disk if the list changed (a new file of pcc's
        own, synced, renamed over the old one; mode 0640)."""
        if not self.blocked_file or not self._blocked_changed:
            return
        with self._blocked_lock:
            lines = [f"{login}\t{self._block_ids[login]}\n" if login in self._block_ids else f"{login}\n"
                     for login in sorted(self._blocked)]
            self._blocked_changed = False
        try:
            replace_with_lines(self.blocked_file, lines, 0o640)
        except OSError as error:
            self._blocked_changed = True  # try again next time
            log.error("the blocked list's copy %s cannot be written (%s): a restart while the database is down "
                      "would not know the accounts blocked since", self.blocked_file, error.strerror or error)

    def current(self, login: str) -> Optional[AccountHistory]:
        """The account's history, if the poll keeps it current."""
        if not self._poll_current():
            return None
        return self.histories.fresh(login, HISTORY_MAX_AGE)

    def _poll_current(self) -> bool:
        """What this daemon knows of the others is less than a second old."""
        return time.monotonic() - self._polled_at <= CHANGES_STALE_AFTER

    @property
    def polled_at(self) -> float:
        """When the latest successful poll began (monotonic)."""
        return self._polled_at

    def never_seen(self, login: str) -> bool:
        """No daemon and no administrator has written anything of this
        account, as far as a current poll says: its history is empty without
        a read.  (A new place decided on it is committed and read again
        before its answer, as any: the crossing stays decided on the
        database's view.)"""
        if not self.known.loaded or not self._poll_current():
            return False
        return login not in self.known and login not in self._blocked  # a blocked one always has rows: belt and braces

    def last_known(self, login: str) -> Optional[AccountHistory]:
        """The account's history however old: what an outage is decided on."""
        return self.histories.get(login)

    def remember(self, login: str, history: AccountHistory, blocked: bool, read_at: Optional[float] = None) -> None:
        """Keep `history` (as a decision left it), and the account on the
        blocked list if the decision refuses it.  read_at: when the database read it came from began
        (None: it came from memory)."""
        if blocked:  # only the poll and the full reload take an account off the list
            self.set_blocked(login, True)
        self.histories.put(login, history, read_at)
        self.known.add(login)  # what this daemon writes of it, its own poll skips

    def poll(self, store: Store, keep: frozenset = frozenset()) -> Optional[DatabaseChanges]:
        """Read what other writers changed since the last poll and forget or
        refuse accordingly; None when the database could not be asked.  keep:
        accounts whose block waits in the spool (never taken off the list)."""
        started = time.monotonic()
        try:
            if self._cursor is None or started - self._cursor_moved_at > CHANGES_RESYNC_AFTER:
                self._start_over(store, keep, started, "" if self._cursor is None else
                                 f"no poll of the database's changes for {started - self._cursor_moved_at:.0f} s")
            settling = self._polls % CHANGES_SETTLE_EVERY == 0
            changes = store.changes_after(self._settled_cursor(started) if settling else self._cursor or 0)
            if 0 < changes.newest < (self._cursor or 0):
                self._start_over(store, keep, started, (
                    f"the database's change log went back from id {self._cursor} to {changes.newest}: it lost "
                    "writes (a failover to a standby that was behind, or a restore from a backup?)"))
                changes = store.changes_after(self._cursor or 0)
            self._polls += 1
            self._settle_unblocks(store, self.apply(changes, started, keep), started, keep)
        except sa_exc.SQLAlchemyError as error:
            log.debug("poll of database changes failed: %s", first_line(error))
            return None
        self._polled_at = started
        if not self.known.loaded and started >= self._known_load_after:
            self._load_known(store)  # after the cursor is taken: the polls from it keep the set whole
        return changes

    def _load_known(self, store: Store) -> None:
        """Without it every account is read before its first decision, as
        before: a failure costs speed, not protection (one line, a retry later)."""
        loading = time.monotonic()
        try:
            self.known.load(store.known_logins())
        except sa_exc.SQLAlchemyError as error:
            self._known_load_after = loading + KNOWN_LOGINS_RETRY
            log.warning("cannot read the logins the database knows (every new account is read before its first "
                        "decision until then; again in %.0f s): %s", KNOWN_LOGINS_RETRY, first_line(error))
            return
        log.info("%d logins known to the database, read in %.1f s", len(self.known), time.monotonic() - loading)

    def _start_over(self, store: Store, keep: frozenset, started: float, why: str) -> None:
        """Read the blocked list whole and the change log from its newest id
        (why: said in a WARNING; "" at the first poll)."""
        if why:
            log.warning("%s: reading the blocked list again and forgetting the accounts' histories", why)
        self._cursor = None
        self.known.loaded = False  # the logins changed meanwhile may be missing: read again after this poll
        self._cursor_marks.clear()  # ids read before may be the database's again, for other rows
        self._applied.clear()
        self.histories.clear()
        self.reload_blocked(store, keep)

    def apply(self, changes: DatabaseChanges, read_at: float, keep: frozenset = frozenset()) -> set:
        """Forget every account another writer changed; put it on the blocked
        list as the database has it now.  Returns those the database no longer
        lists as blocked, whose block's end is still to be seen."""
        fresh = [(change_id, login) for change_id, login in changes.changes if change_id not in self._applied]
        for change_id, _login in fresh:
            self._applied[change_id] = read_at
        changed = {login for _change_id, login in fresh}
        states = {login: (blocked_since, action, block_id)
                  for login, blocked_since, action, block_id in changes.accounts}
        unblocked = set()
        for login in changed:
            self.known.add(login)  # before it is forgotten: never "never seen" in between
            self.histories.forget(login)
            blocked_since, action, block_id = states.get(login, (None, None, None))
            if blocked_since is not None and action != MONITOR_ACTION:
                self.set_blocked(login, True, block_id)  # blocked by another daemon or an administrator
            elif self._may_unblock(login, read_at, keep):
                unblocked.add(login)
        newest = max([changes.newest] + [change_id for change_id, _login in changes.changes])
        self._move_cursor(max(newest, self._cursor or 0), read_at)
        return unblocked

    def _move_cursor(self, cursor: int, now: float) -> None:
        self._cursor, self._cursor_moved_at = cursor, now
        marks = self._cursor_marks
        if not marks or marks[-1][1] != cursor:
            marks.append((now, cursor))
        while len(marks) > 1 and marks[1][0] < now - CHANGES_KEPT:
            marks.popleft()

    def _settled_cursor(self, now: float) -> int:
        """The newest id read CHANGES_SETTLE seconds ago (or the oldest known)."""
        cursor = self._cursor_marks[0][1] if self._cursor_marks else self._cursor or 0
        for marked_at, marked in self._cursor_marks:
            if marked_at > now - CHANGES_SETTLE:
                break
            cursor = marked
        self._applied = {change_id: at for change_id, at in self._applied.items() if change_id > cursor}
        self.histories.prune_forgotten(now - 2 * HISTORY_MAX_AGE)
        return cursor

    def trimmable_changes(self, now: float) -> Optional[int]:
        """The newest change id this daemon had read CHANGES_KEPT seconds ago, if any."""
        trimmable = None
        for marked_at, marked in self._cursor_marks:
            if marked_at > now - CHANGES_KEPT:
                break
            trimmable = marked
        return trimmable


def _copy_line(line: str) -> tuple:
    """(login, block id or None) from a line of the blocked list's copy."""
    login, _tab, block_id = line.rpartition("\t")
    return (login, int(block_id)) if login and block_id.isdigit() else (line, None)
