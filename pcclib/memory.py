"""What a daemon keeps in memory so that most requests need no database read:
the recent accounts' histories and the accounts known to be blocked
(AccountMemory, kept current by a poll of the database's changes), and the
sightings counted but not yet written (SightingWriter, which writes them
behind the answer in batches).
"""
from __future__ import annotations

import collections
import datetime as dt
import os
import tempfile
import threading
import time
from typing import Optional

from sqlalchemy import exc as sa_exc

from .common import first_line, log, start_thread
from .config import MONITOR_ACTION
from .decision import AccountHistory, CountrySeen, merge_seen
from .storage import DatabaseChanges, Store, is_data_error, sighting_rows

# Recently active accounts kept in memory: decided on without a database read
# while the poll of changes keeps them current, and during an outage.
HISTORY_CACHE_SIZE = 20000

# Every daemon asks the database what changed (sightings written by other
# daemons, blocks, unblocks, travel passes) this often, and decides from memory
# only while its latest successful poll began less than CHANGES_STALE_AFTER
# seconds ago: what one daemon or an administrator changes counts everywhere
# within a second.  Each poll reaches CHANGES_OVERLAP back behind the previous
# one, for sightings written late (SightingWriter) and clocks a little apart.
CHANGES_POLL_INTERVAL = 0.25
CHANGES_STALE_AFTER = 0.7
CHANGES_OVERLAP = dt.timedelta(seconds=3)

# The whole blocked list is read again this often (seconds), whatever the poll
# says: a block written with an old time (a late spool, another host's clock)
# reaches every daemon's memory within this bound at worst.
BLOCKED_LIST_RELOAD = 30.0

# ...and reads an account again after this many seconds whatever the poll says
# (rows written with old times, by --replay --record or a late spool, are
# missed by the poll; this bounds how long).
HISTORY_MAX_AGE = 60.0

# Sightings gather in memory this long (seconds) and are then written together
# (the next decisions of this daemon count them at once; blocks never wait).
# What a crash can lose is bounded by MAX_UNWRITTEN_AGE below.
SIGHTING_FLUSH_INTERVAL = 0.05

# A batch that takes longer than this (seconds) to write is logged.
SLOW_SIGHTING_WRITE = 0.2

# When the oldest unwritten sighting is older than this (seconds), the request
# that adds one more writes them before it is answered: under a load that
# starves the writer thread (it gets its share of one GIL), this is what keeps
# a crash from losing more than the last moments of sightings.
MAX_UNWRITTEN_AGE = 0.1

# Sightings kept in memory while the database cannot take them; beyond this the
# oldest are dropped (with an ERROR line): they cost some counting, never a block.
SIGHTINGS_KEPT_UNWRITTEN = 200000
# While the database fails, the writer tries it again this often (seconds).
SIGHTING_RETRY_INTERVAL = 1.0


class HistoryCache:
    """A bounded map login -> AccountHistory, least recently used out first.

    Each entry remembers when the database read it came from began: a daemon
    decides on an entry without reading the database again while it is younger
    than HISTORY_MAX_AGE and the poll of changes (AccountMemory.poll) is
    keeping it current."""

    def __init__(self, size: int):
        self.size = size
        self._entries: collections.OrderedDict = collections.OrderedDict()  # login -> (history, read at)
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
            self._entries[login] = (history, read_at)
            self._entries.move_to_end(login)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def forget(self, login: str) -> None:
        with self._lock:
            self._entries.pop(login, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


class AccountMemory:
    """What this daemon knows of accounts without asking the database.

    The histories of the accounts it served lately, trusted only while the
    poll of the database's changes keeps them current; and the blocked list,
    always whole: loaded before the ports open (from the database, else from
    the copy on local disk beside the spool), fed by this daemon's blocks, the
    poll and a full reload every BLOCKED_LIST_RELOAD seconds, and written back
    to that copy, so that a blocked account stays refused whatever the
    database does, a restart during an outage included."""

    def __init__(self, size: int = HISTORY_CACHE_SIZE, blocked_file: str = ""):
        self.histories = HistoryCache(size)
        self.blocked_file = blocked_file
        self._blocked: set = set()
        self._blocked_lock = threading.Lock()
        self._blocked_changed = False  # since the copy on disk was written
        self._blocked_since_reload: set = set()  # added while a full reload ran
        self._changes_from: Optional[dt.datetime] = None  # where the next poll of changes starts
        self._polled_at = float("-inf")  # monotonic start of the latest successful poll

    def is_blocked(self, login: str) -> bool:
        return login in self._blocked

    def blocked_count(self) -> int:
        return len(self._blocked)

    def set_blocked(self, login: str, blocked: bool) -> None:
        with self._blocked_lock:
            if blocked and login not in self._blocked:
                self._blocked.add(login)
                self._blocked_since_reload.add(login)
                self._blocked_changed = True
            elif not blocked and login in self._blocked:
                self._blocked.discard(login)
                self._blocked_since_reload.discard(login)
                self._blocked_changed = True

    def reload_blocked(self, store: Store) -> None:
        """The whole blocked list from the database (raises its errors).  Blocks
        this daemon made while the query ran are kept."""
        with self._blocked_lock:
            self._blocked_since_reload = set()
        logins = store.enforced_blocks()
        with self._blocked_lock:
            fresh = logins | self._blocked_since_reload
            if fresh != self._blocked:
                self._blocked, self._blocked_changed = fresh, True

    def load_blocked_copy(self) -> int:
        """At start, when the database cannot be asked: the copy on disk."""
        if not self.blocked_file or not os.path.lexists(self.blocked_file):
            return 0
        descriptor = os.open(self.blocked_file, os.O_RDONLY | os.O_NOFOLLOW)
        with open(descriptor, encoding="utf-8", errors="replace") as copy:
            logins = {line.rstrip("\n") for line in copy if line.strip()}
        with self._blocked_lock:
            self._blocked |= logins
        return len(logins)

    def save_blocked_copy(self) -> None:
        """Rewrite the copy on disk if the list changed (a new file of pcc's
        own, synced, renamed over the old one; mode 0640)."""
        if not self.blocked_file or not self._blocked_changed:
            return
        with self._blocked_lock:
            logins, self._blocked_changed = sorted(self._blocked), False
        directory = os.path.dirname(os.path.abspath(self.blocked_file))
        temporary = None
        try:
            descriptor, temporary = tempfile.mkstemp(prefix=".blocked-", dir=directory)
            os.fchmod(descriptor, 0o640)
            with open(descriptor, "w", encoding="utf-8") as copy:
                copy.writelines(login + "\n" for login in logins)
                copy.flush()
                os.fsync(copy.fileno())
            os.replace(temporary, self.blocked_file)
        except OSError as error:
            self._blocked_changed = True  # try again next time
            if temporary is not None and os.path.exists(temporary):
                os.unlink(temporary)
            log.error("the blocked list's copy %s cannot be written (%s): a restart while the database is down "
                      "would not know the accounts blocked since", self.blocked_file, error.strerror or error)

    def current(self, login: str) -> Optional[AccountHistory]:
        """The account's history, if the poll keeps it current."""
        if time.monotonic() - self._polled_at > CHANGES_STALE_AFTER:
            return None
        return self.histories.fresh(login, HISTORY_MAX_AGE)

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

    def poll(self, store: Store, now: dt.datetime) -> bool:
        """Forget the accounts the database knows more about; False when it
        could not be asked."""
        started = time.monotonic()
        since = self._changes_from or now - CHANGES_OVERLAP
        try:
            changes = store.changes_since(since)
        except sa_exc.SQLAlchemyError as error:
            log.debug("poll of database changes failed: %s", first_line(error))
            return False
        self.apply(changes)
        self._changes_from = now - CHANGES_OVERLAP
        self._polled_at = started
        return True

    def apply(self, changes: DatabaseChanges) -> None:
        stale = set()
        histories = self.histories
        for login, country, last_seen in changes.sightings:
            history = histories.get(login)
            if history is not None and not any(seen.country == country and seen.last_seen >= last_seen
                                               for seen in history.sightings):
                stale.add(login)
        for login, blocked_since, counting_since, action in changes.accounts:
            if blocked_since is None:
                self.set_blocked(login, False)  # unblocked
            elif action != MONITOR_ACTION:
                self.set_blocked(login, True)  # blocked by another daemon or an administrator
            history = histories.get(login)
            if history is not None and (history.blocked_since, history.counting_since) != (blocked_since,
                                                                                           counting_since):
                stale.add(login)
        for login, country, expires_at in changes.passes:
            history = histories.get(login)
            if history is not None and history.travel_passes.get(country) != expires_at:
                stale.add(login)
        for login in stale:
            histories.forget(login)


class SightingWriter:
    """Writes sightings behind the answer: a request adds its sighting here and
    is answered; a thread writes what gathered every SIGHTING_FLUSH_INTERVAL in
    one transaction (group commit).  Should that thread fall more than
    MAX_UNWRITTEN_AGE behind, the requests write instead of it.  Until
    written, pending_for() gives them to the account's next read, so counting
    never misses one.  While the database fails they stay (merged per account
    and country) and are written when it is back.  Not started (tests,
    replays), add() writes at once."""

    def __init__(self, store, on_written=None, on_failed=None):
        self.store = store
        self.on_written = on_written or (lambda: None)
        self.on_failed = on_failed or (lambda problem: None)
        self._pending: dict = {}  # login -> {country: CountrySeen}, not yet taken by a write
        self._writing: dict = {}  # the same, for the batch being written
        self._count = 0  # entries in _pending
        self._pending_since: Optional[float] = None  # monotonic time of the oldest entry in _pending
        self._writing_since: Optional[float] = None  # ...and in _writing
        self._failing = False  # the last write failed: requests do not wait for the next
        self._lock = threading.Lock()
        self._flushing = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._dropped = 0

    def start(self) -> None:
        self._thread = start_thread(self._run, "pcc-sightings")

    def stop(self) -> None:
        """Write what is pending (at the daemon's orderly stop)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self.flush()

    def add(self, login: str, seen: CountrySeen, may_wait: bool = True) -> None:
        """may_wait: the caller may write a lagging batch itself (a request's
        own thread); False for answers that must not wait (late answers, the
        answers during an outage)."""
        with self._lock:
            countries = self._pending.setdefault(login, {})
            if seen.country not in countries:
                self._count += 1
            countries[seen.country] = merge_seen(countries.get(seen.country), seen)
            if self._pending_since is None:
                self._pending_since = time.monotonic()
            if self._count > SIGHTINGS_KEPT_UNWRITTEN:
                self._drop_oldest()
        if self._thread is None or (may_wait and self._lagging() and not self._failing):
            self.flush()  # waits for a batch being written, then writes what is left

    def _lagging(self) -> bool:
        oldest = min((since for since in (self._writing_since, self._pending_since) if since is not None),
                     default=None)
        return oldest is not None and time.monotonic() - oldest > MAX_UNWRITTEN_AGE

    def _drop_oldest(self) -> None:
        oldest = next(iter(self._pending))
        self._count -= len(self._pending.pop(oldest))
        self._dropped += 1
        if self._dropped == 1 or self._dropped % 10000 == 0:
            log.error("%d sightings are waiting for the database; dropping the oldest (%d accounts so far): "
                      "they are not counted", SIGHTINGS_KEPT_UNWRITTEN, self._dropped)

    def pending_for(self, login: str) -> tuple:
        """The account's sightings not yet known to be in the database."""
        with self._lock:
            waiting = list(self._writing.get(login, {}).values()) + list(self._pending.get(login, {}).values())
        return tuple(waiting)

    def waiting(self) -> int:
        with self._lock:
            return self._count + sum(len(countries) for countries in self._writing.values())

    def _run(self) -> None:
        while not self._stop.wait(SIGHTING_FLUSH_INTERVAL):
            if not self.flush():
                self._stop.wait(SIGHTING_RETRY_INTERVAL)  # a failing database is tried once a second

    def flush(self) -> bool:
        """Write what is pending; False when the database failed (it all stays)."""
        with self._flushing:
            with self._lock:
                if not self._pending:
                    return True
                self._writing, self._pending, self._count = self._pending, {}, 0
                self._writing_since, self._pending_since = self._pending_since, None
            rows = sighting_rows((login, seen) for login, countries in self._writing.items()
                                 for seen in countries.values())
            started = time.monotonic()
            try:
                self._write(rows)
            except sa_exc.SQLAlchemyError as error:
                self._failing = True
                self._keep_writing()
                self.on_failed(first_line(error))
                return False
            self._failing = False
            with self._lock:
                self._writing, self._writing_since = {}, None
            took = time.monotonic() - started
            if took > SLOW_SIGHTING_WRITE:  # what a crash may lose grows with it
                log.warning("writing %d sightings took %.2f s", len(rows), took)
            self.on_written()
            return True

    def _write(self, rows: list) -> None:
        try:
            self.store.write_sightings(rows)
        except sa_exc.SQLAlchemyError as error:
            if not is_data_error(error):
                raise
            for row in rows:  # one value the database refuses must not hold up the others
                try:
                    self.store.write_sightings([row])
                except sa_exc.SQLAlchemyError as row_error:
                    if not is_data_error(row_error):
                        raise
                    log.error("database refused the sighting of %r from %s (dropped): %s", row["login"],
                              row["country"], first_line(row_error))

    def _keep_writing(self) -> None:
        """Put a batch that failed back in front of what came since."""
        with self._lock:
            kept = {login: dict(countries) for login, countries in self._writing.items()}  # oldest first
            for login, countries in self._pending.items():
                merged = kept.setdefault(login, {})
                for country, seen in countries.items():
                    merged[country] = merge_seen(merged.get(country), seen)
            self._pending, self._writing = kept, {}
            self._count = sum(len(countries) for countries in kept.values())
            self._pending_since = min((since for since in (self._writing_since, self._pending_since)
                                       if since is not None), default=None)
            self._writing_since = None
