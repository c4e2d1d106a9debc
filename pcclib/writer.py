"""The write-behind: sightings written after the answer, in batches (one
transaction for what gathered in SIGHTING_FLUSH_INTERVAL), and a new place
committed before its answer, the new places waiting at one moment sharing one
transaction.  Until written, a sighting is handed to its account's next read.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Optional

from sqlalchemy import exc as sa_exc

from .common import first_line, log, start_thread
from .decision import CountrySeen, merge_seen
from .storage import Store, is_data_error, sighting_rows

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


class SightingWriter:
    """Writes sightings behind the answer: a request adds its sighting here and
    is answered; a thread writes what gathered every SIGHTING_FLUSH_INTERVAL in
    one transaction (group commit).  Should that thread fall more than
    MAX_UNWRITTEN_AGE behind, the requests write instead of it.  Until
    written, pending_for() gives them to the account's next read, so counting
    never misses one.  While the database fails they stay (merged per account
    and country) and are written when it is back.  Not started (tests,
    replays), add() writes at once.

    A sighting that other daemons must see before the answer (a new place:
    Decision.new_place) is added with commit=True and written by its own
    request, apart from the batches behind the answers (so that it never
    waits for a large batch of refreshes): the requests waiting at one moment
    share one transaction (group commit), and each is answered once it is
    committed."""

    def __init__(self, store: Store, on_written: Optional[Callable[[], None]] = None,
                 on_failed: Optional[Callable[[str], None]] = None):
        self.store = store
        self.on_written = on_written or (lambda: None)
        self.on_failed = on_failed or (lambda problem: None)
        self._pending: dict = {}  # login -> {country: CountrySeen}, not yet taken by a write
        self._writing: dict = {}  # the same, for the batch being written
        self._count = 0  # entries in _pending
        self._pending_since: Optional[float] = None  # monotonic time of the oldest entry in _pending
        self._writing_since: Optional[float] = None  # ...and in _writing
        self._failing = False  # the last write failed: requests do not wait for the next
        self._places: dict = {}  # login -> {country: CountrySeen}: new places waiting for their commit
        self._places_writing: dict = {}  # the same, in the commit under way
        self._places_batch = 0  # the number of the commit that _places will go in
        self._places_committed = -1  # the number of the latest one committed...
        self._places_failed = -1  # ...and of the latest that failed (its sightings went to _pending)
        self._committing = threading.Lock()
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

    def add(self, login: str, seen: CountrySeen, may_wait: bool = True, commit: bool = False) -> bool:
        """may_wait: the caller may write a lagging batch itself (a request's
        own thread); False for answers that must not wait (late answers, the
        answers during an outage).  commit: return only once the sighting is
        committed; False when the database failed (it stays pending)."""
        if commit:
            return self._commit_place(login, seen)
        with self._lock:
            self._queue(login, seen)
        if self._thread is None or (may_wait and self._lagging() and not self._failing):
            self.flush()  # waits for a batch being written, then writes what is left
        return True

    def _queue(self, login: str, seen: CountrySeen) -> None:
        """Into the next batch behind the answers (the caller holds _lock)."""
        countries = self._pending.setdefault(login, {})
        if seen.country not in countries:
            self._count += 1
        countries[seen.country] = merge_seen(countries.get(seen.country), seen)
        if self._pending_since is None:
            self._pending_since = time.monotonic()
        if self._count > SIGHTINGS_KEPT_UNWRITTEN:
            self._drop_oldest()

    def _commit_place(self, login: str, seen: CountrySeen) -> bool:
        """Until the sighting is committed, by this request or one that
        took it into its own commit; False when that commit failed (the
        sighting then waits behind the answers like any other)."""
        with self._lock:
            countries = self._places.setdefault(login, {})
            countries[seen.country] = merge_seen(countries.get(seen.country), seen)
            batch = self._places_batch
        with self._committing:
            if self._places_committed >= batch:
                return True
            if self._places_failed >= batch:
                return False
            return self._write_places()

    def _write_places(self) -> bool:
        """The new places waiting now, in one transaction (the caller holds
        _committing; every commit numbered below theirs was taken before they
        came)."""
        with self._lock:
            self._places_writing, self._places = self._places, {}
            number, self._places_batch = self._places_batch, self._places_batch + 1
        rows = sighting_rows((login, seen) for login, countries in self._places_writing.items()
                             for seen in countries.values())
        try:
            self._write(rows)
        except sa_exc.SQLAlchemyError as error:
            with self._lock:  # behind the answers, written when the database takes them
                for login, countries in self._places_writing.items():
                    for seen in countries.values():
                        self._queue(login, seen)
                self._places_writing, self._places_failed = {}, number
            self._failing = True
            self.on_failed(first_line(error))
            return False
        with self._lock:
            self._places_writing, self._places_committed = {}, number
        self.on_written()
        return True

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
            waiting = [seen for batch in (self._writing, self._pending, self._places_writing, self._places)
                       for seen in batch.get(login, {}).values()]
        return tuple(waiting)

    def waiting(self) -> int:
        with self._lock:
            return self._count + sum(len(countries) for batch in (self._writing, self._places_writing, self._places)
                                     for countries in batch.values())

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
