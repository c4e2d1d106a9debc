"""The database outage: when one starts and ends (OutageState, the one state
machine the log, the metrics and --health read), and what pcc decided
meanwhile (OutageJournal: the spool of blocks, on disk before Postfix is
answered, replayed once the database is back).
"""
from __future__ import annotations

import collections
import datetime as dt
import json
import os
import threading
import time

from sqlalchemy import exc as sa_exc

from .common import first_line, log, replace_with_lines
from .config import MONITOR_ACTION, Settings
from .storage import Store, is_data_error, safe_url

# While the database fails, it is tried again once a second, by the service's
# probe thread or by a request, whichever comes first; the other requests are
# answered at once from memory.
DB_PROBE_INTERVAL = 1.0

# While the database fails, an ERROR line this often (seconds).
OUTAGE_REPORT_INTERVAL = 60.0

# The replay rewrites the spool after this many blocks are written (and at its
# end), not after each: a crash between costs writing some again (harmless,
# they are blocked already); a rewrite per block made a spool of a thousand
# blocks take half a minute.
SPOOL_REWRITE_EVERY = 100

# A spooled block's keys and their types: an entry without them is set aside.
SPOOL_ENTRY_KEYS = {"login": str, "at": str, "action": str, "reason": str, "countries": list,
                    "trigger": dict, "sighting": list}

# The most worker processes a daemon has ([server] processes): the spools a
# daemon with fewer looks for, left by one that had more.
MOST_SPOOLS = 256


def worker_spool(spool_file: str, index: int) -> str:
    """Worker process `index`'s spool (counted from 0): spool_file for the
    first (and for a daemon of one process), spool_file.2, .3... for the
    others, numbered as the log and the metrics number the processes."""
    return spool_file if not spool_file or index == 0 else f"{spool_file}.{index + 1}"


def valid_spool_entry(entry) -> bool:
    if not isinstance(entry, dict) or not all(isinstance(entry.get(key), kind)
                                              for key, kind in SPOOL_ENTRY_KEYS.items()):
        return False
    try:
        dt.datetime.fromisoformat(entry["at"])
    except ValueError:
        return False
    # [country, ip]; [null, ip] when the block came from a network list and
    # the address has no country (nothing to merge)
    return len(entry["sighting"]) == 2


class OutageState:
    """Whether this daemon's database is failing, since when and why, and how
    requests were answered meanwhile.

    A failure starts an outage (one ERROR line, then one a minute while it
    lasts); while it lasts, the database is probed once a second (probe_due),
    with or without requests.  A failure to write ends only with a successful
    write."""

    def __init__(self, settings: Settings, clock=time.monotonic):
        self.settings = settings
        self._clock = clock  # monotonic seconds; a test's own clock
        self._lock = threading.Lock()
        self.failing = False  # read without the lock: a bool, set under it
        self._next_probe = 0.0
        self._since = 0.0  # monotonic
        self._on_write = False
        self._problem = ""
        self._answers: collections.Counter = collections.Counter()  # "db_error_action" / "memory"
        self._reported = 0.0  # monotonic time of its latest ERROR line
        self._error_answers_total = 0  # requests answered db_error_action since the start
        self.on_change = lambda started, problem: None  # told when an outage starts (True) or ends

    def probe_due(self) -> bool:
        with self._lock:
            if self._clock() < self._next_probe:
                return False
            self._next_probe = self._clock() + DB_PROBE_INTERVAL
            return True

    def failed(self, problem: str, on_write: bool = False) -> None:
        now = self._clock()
        with self._lock:
            starting, self.failing = not self.failing, True
            self._next_probe = now + DB_PROBE_INTERVAL
            self._problem = problem
            self._on_write = self._on_write or on_write
            if starting:
                self._since = self._reported = now
                self._answers.clear()
        if starting:
            log.error("database %s failed, answering from memory (else %s) until it is back: %s",
                      safe_url(self.settings.dbcon), self.settings.db_error_action, problem)
            self.on_change(True, problem)

    def failed_on_write(self) -> bool:
        """A write failed and none has succeeded since: only a write proves the database works."""
        return self._on_write

    def ok(self, wrote: bool = False) -> bool:
        """The database answered; True when that ends an outage."""
        if not self.failing:  # nearly every request: no lock (an outage that starts now is not ended by this)
            return False
        with self._lock:
            ending = self.failing and (wrote or not self._on_write)
            if ending:
                self.failing = self._on_write = False
            lasted, answers = self._clock() - self._since, dict(self._answers)
        if ending:
            log.warning("database %s is back; pcc answers from it again (the outage lasted %.0f s: %d requests "
                        "got %s, %d were decided from memory)", safe_url(self.settings.dbcon), lasted,
                        answers.get("db_error_action", 0), self.settings.db_error_action, answers.get("memory", 0))
            self.on_change(False, "")
        return ending

    def count_answer(self, kind: str) -> None:
        """kind: "memory" or "db_error_action"."""
        with self._lock:
            self._answers[kind] += 1
            if kind == "db_error_action":
                self._error_answers_total += 1

    def report(self, spooled_blocks: int) -> None:
        """While pcc decides without its database, an ERROR line a minute: an
        outage that lasts is a fault to fix, not a blip."""
        now = self._clock()
        with self._lock:
            if not self.failing or now - self._reported < OUTAGE_REPORT_INTERVAL:
                return
            self._reported = now
            lasted, answers, problem = now - self._since, dict(self._answers), self._problem
        log.error("database %s still failing after %.0f s (%s): %d requests answered %s, %d decided from "
                  "memory, %d blocks waiting in the spool; protection is partly OFF until it is fixed",
                  safe_url(self.settings.dbcon), lasted, problem, answers.get("db_error_action", 0),
                  self.settings.db_error_action, answers.get("memory", 0), spooled_blocks)

    def snapshot(self) -> dict:
        """What the metrics and --health say of the database, as this daemon sees it."""
        with self._lock:
            return {"failing": self.failing,
                    "failing_seconds": self._clock() - self._since if self.failing else 0.0,
                    "problem": self._problem if self.failing else "",
                    "error_answers": self._answers.get("db_error_action", 0),
                    "error_answers_total": self._error_answers_total}


class OutageJournal:
    """What pcc decided while the database failed, written when it returns.

    Blocks go to the spool file, flushed to disk before Postfix is answered, so
    a crash loses none; the next start writes them.  (Sightings wait in the
    SightingWriter's memory: losing one costs a little counting, never a block.)  An entry that cannot be
    read or that the database refuses is moved to `<spool>.rejected` with an
    ERROR line: one bad entry never holds up the others.
    """

    def __init__(self, spool_path: str = ""):
        self.spool_path = spool_path
        self._lock = threading.Lock()
        self._replaying = threading.Lock()
        self._blocks: list = []
        self._in_flight: set = set()  # id() of blocks whose own transaction still runs
        if spool_path and os.path.lexists(spool_path):
            self._load()

    def _load(self) -> None:
        descriptor = os.open(self.spool_path, os.O_RDONLY | os.O_NOFOLLOW)  # never a planted link
        with open(descriptor, encoding="utf-8", errors="replace") as spool:
            text = spool.read()
        damaged = not text.endswith("\n") and bool(text)  # a torn last line: rewrite before appending
        for line in text.splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                entry = None
            if valid_spool_entry(entry):
                self._blocks.append(entry)
            elif line.strip():
                damaged = True
                self._set_aside(line, "cannot be read as a block")
        if damaged:
            self._rewrite_spool()

    def adopt_spools_beyond(self, processes: int) -> None:
        """Take in the spools of worker processes a daemon of more processes
        left (its blocks are in this spool, on disk, before theirs go)."""
        if not self.spool_path:
            return
        for index in range(max(processes, 1), MOST_SPOOLS):
            orphan = worker_spool(self.spool_path, index)
            if not os.path.lexists(orphan):
                continue
            try:
                adopted = OutageJournal(orphan)  # read and checked like this daemon's own; never a link
            except OSError as error:
                log.error("spool %s cannot be read (%s); its blocks wait for a person", orphan,
                          error.strerror or error)
                continue
            with self._lock:
                self._blocks += adopted._blocks
                self._rewrite_spool()
            for path in (orphan, f"{orphan}.blocked"):
                try:
                    os.unlink(path)  # removes a link, never what it points to
                except FileNotFoundError:
                    pass
            log.warning("spool %s: %d blocks of a worker process this daemon no longer has, taken from %s",
                        self.spool_path, len(adopted._blocks), orphan)

    def entries(self) -> list:
        """The blocks waiting in the spool, oldest first."""
        with self._lock:
            return list(self._blocks)

    def pending(self) -> bool:
        return bool(self._blocks)

    def blocked_logins(self) -> frozenset:
        """The accounts a block in the spool refuses (a monitor-mode flag refuses none)."""
        with self._lock:
            return frozenset(entry["login"] for entry in self._blocks if entry["action"] != MONITOR_ACTION)

    def blocks_waiting(self) -> int:
        with self._lock:
            return len(self._blocks)

    def add_block(self, entry: dict, in_flight: bool = False) -> None:
        """Keep a block (on disk first).  in_flight: its own transaction is
        still running; the replay leaves it alone until release_block()."""
        with self._lock:
            self._blocks.append(entry)
            if in_flight:
                self._in_flight.add(id(entry))
            if not self.spool_path:
                return
            try:
                os.makedirs(os.path.dirname(os.path.abspath(self.spool_path)), mode=0o750, exist_ok=True)
                descriptor = os.open(self.spool_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW,
                                     0o640)
                with open(descriptor, "a", encoding="utf-8") as spool:
                    spool.write(json.dumps(entry) + "\n")
                    spool.flush()
                    os.fsync(spool.fileno())
            except OSError as error:  # the block stands; only its survival of a crash is lost
                log.error("spool %s cannot be written (%s): the block of %s is kept in memory only and "
                          "is lost if pcc stops before the database takes it", self.spool_path,
                          error.strerror or error, entry["login"])

    def replay(self, store: "Store", on_new_block) -> None:
        """Write everything to the database; what fails stays for the next try.
        One thread replays at a time; others go on without waiting."""
        if not self._replaying.acquire(blocking=False):
            return
        try:
            self._replay(store, on_new_block)
        finally:
            self._replaying.release()

    def _replay(self, store: "Store", on_new_block) -> None:
        """Until none is left: the blocks spooled while it ran too (no request
        may come to start another replay)."""
        while True:
            with self._lock:
                blocks = [entry for entry in self._blocks if id(entry) not in self._in_flight]
            if not blocks:
                return
            self._replay_these(store, blocks, on_new_block)

    def _replay_these(self, store: "Store", blocks: list, on_new_block) -> None:
        written: list = []  # or set aside
        try:
            for entry in blocks:
                self._replay_one(store, entry, on_new_block)
                written.append(entry)
                if len(written) >= SPOOL_REWRITE_EVERY:
                    self.discard_blocks(written)
                    written = []
        finally:
            self.discard_blocks(written)

    def _replay_one(self, store: "Store", entry: dict, on_new_block) -> None:
        try:
            block_id = store.record_block(
                entry["login"], dt.datetime.fromisoformat(entry["at"]), source=entry.get("source", "policy"),
                action=entry["action"], reason=entry["reason"], countries=entry["countries"],
                trigger=entry["trigger"],
                sighting=tuple(entry["sighting"]) if entry["sighting"][0] else None,
                replace_flag=entry.get("replaces_flag", False))
        except sa_exc.SQLAlchemyError as error:
            if not is_data_error(error):
                raise  # the database is down again: everything stays for the next try
            self._set_aside(json.dumps(entry), f"refused by the database: {first_line(error)}")
            return
        log.warning("block of %s decided during the database outage is now written%s", entry["login"],
                    "" if block_id else " (it was blocked already)")
        if block_id is not None:
            on_new_block(entry, block_id)

    def release_block(self, entry: dict) -> None:
        """The block's own transaction failed: replay it like any other."""
        with self._lock:
            self._in_flight.discard(id(entry))

    def discard_block(self, entry: dict) -> None:
        """Forget a spooled block that is in the database now."""
        self.discard_blocks([entry])

    def discard_blocks(self, entries: list) -> None:
        """Forget spooled blocks that are in the database now (or set aside):
        the spool rewritten once."""
        gone = {id(entry) for entry in entries}
        with self._lock:
            self._in_flight -= gone
            kept = [block for block in self._blocks if id(block) not in gone]
            if len(kept) != len(self._blocks):
                self._blocks = kept
                self._rewrite_spool()

    def _set_aside(self, line: str, why: str) -> None:
        """Keep an entry pcc cannot write in <spool>.rejected, for a person."""
        log.error("spool %s: an entry %s; moved to %s.rejected: %s", self.spool_path or "(memory)", why,
                  self.spool_path, line[:300])
        if not self.spool_path:
            return
        try:
            descriptor = os.open(self.spool_path + ".rejected",
                                 os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
            with open(descriptor, "a", encoding="utf-8") as rejected:
                rejected.write(line.rstrip("\n") + "\n")
        except OSError as error:
            log.error("cannot write %s.rejected: %s", self.spool_path, error.strerror or error)

    def _rewrite_spool(self) -> None:
        if not self.spool_path:
            return
        try:
            replace_with_lines(self.spool_path, [json.dumps(entry) + "\n" for entry in self._blocks])
        except OSError as error:
            log.error("spool %s cannot be rewritten (%s): blocks already in the database may be written "
                      "again at the next start (harmless)", self.spool_path, error.strerror or error)
