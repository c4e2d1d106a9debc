"""The daemon's database as the request path and its helpers share it: the
Store (replaced whole when a reload changes [db] dbcon), its tables made once,
the write-behind, the outage state (outage.OutageState), the spool of blocks
decided while it fails (written when it answers again), and the probe that
finds out, whether or not requests come.
"""
from __future__ import annotations

import datetime as dt
import threading

from sqlalchemy import exc as sa_exc

from .common import first_line, log, start_thread
from .config import MONITOR_ACTION, Settings
from .decision import CountrySeen
from .memory import AccountMemory
from .metrics import Metrics
from .outage import OutageJournal, OutageState
from .respond import Responder
from .rules import RuleBook
from .storage import DatabaseClock, Store, safe_url
from .volume import VolumeLedger
from .writer import SightingWriter

# While the database fails, how often the probe thread looks whether a probe
# is due (outage.DB_PROBE_INTERVAL: requests and this thread share it).
PROBE_CHECK_INTERVAL = 0.25


class Database:
    """What the daemon knows of its database and what waits for it.

    failed() and ok() are the only way in and out of an outage: every part
    that touches the database (a request, the write-behind, the probe) reports
    through them; the end of an outage writes the spool and reads the blocked
    list again."""

    def __init__(self, settings: Settings, store: Store, journal: OutageJournal, memory: AccountMemory,
                 metrics: Metrics, responder: Responder):
        self.store = store
        self.journal = journal
        self.memory = memory
        self.metrics = metrics
        self.responder = responder
        self.tables_ready = False
        self.outage = OutageState(settings)
        self.outage.on_change = responder.outage
        self.clock = DatabaseClock()
        self.volume = VolumeLedger()  # what each account sent, for the [limits]
        self.rules = RuleBook()  # pcc --rule's, as last read (replaced whole)
        self.sightings = SightingWriter(store, on_written=lambda: self.ok(wrote=True),
                                        on_failed=lambda problem: self.failed(problem, on_write=True))

    def replace_store(self, store: Store) -> None:
        """A reload changed [db] dbcon: what the old database was to get, it
        gets; the next request uses the new one (its tables made on first use)."""
        self.sightings.flush()
        old, self.store, self.tables_ready = self.store, store, False
        self.sightings.store = store
        old.dispose()  # its idle connections closed; one a request still holds closes when it is given back

    def failed(self, problem: str, on_write: bool = False) -> None:
        self.metrics.database_failed()
        self.outage.failed(problem, on_write)

    def ok(self, wrote: bool = False) -> None:
        """The database answered; a failure to write ends only with a write."""
        if self.outage.ok(wrote):
            start_thread(self._after_outage, "pcc-journal")

    def unreachable_at_start(self, dbcon: str, problem: str) -> None:
        """A server that is down or unreachable at boot is an outage, not a
        misconfiguration: serve as in an outage, and say so."""
        log.error("database %s is unreachable at start-up; pcc serves as in an outage until it answers: %s",
                  safe_url(dbcon), problem)
        self.failed(problem)

    def ensure(self) -> None:
        """Create missing tables once; write what an outage left behind."""
        if not self.tables_ready:
            self.store.create_tables()
            self.tables_ready = True
        if self.journal.pending():
            self.journal.replay(self.store, self._notify_spooled_block)

    def probe_while_failing(self, stopping: threading.Event) -> None:
        """While the database fails, try it about once a second, whether or
        not requests come: an outage ends when the database answers, not when
        the next mail arrives (at night, on a standby MTA, hours later)."""
        while not stopping.wait(PROBE_CHECK_INTERVAL):
            if self.outage.failing and self.outage.probe_due():
                self.probe()

    def probe(self) -> bool:
        """One try of what the daemon does with its database: the tables, the
        spool's blocks, a write (rolled back).  True when it all worked."""
        try:
            self.ensure()
            self.store.prove_writable()
        except sa_exc.SQLAlchemyError as error:
            self.failed(first_line(error))
            return False
        self.ok(wrote=True)
        return True

    def report_outage(self) -> None:
        self.outage.report(self.journal.blocks_waiting())

    def _after_outage(self) -> None:
        """The database is back: what was decided meanwhile is written, and the
        blocked list read again (other daemons and administrators may have
        blocked or unblocked accounts meanwhile)."""
        try:
            self.ensure()
            self.memory.reload_blocked(self.store, self.journal.blocked_logins())
        except sa_exc.SQLAlchemyError as error:
            log.error("writing what was decided during the outage failed, will try again: %s", first_line(error))

    def _notify_spooled_block(self, entry: dict, block_id: int) -> None:
        if entry["action"] != MONITOR_ACTION:
            self.memory.set_blocked(entry["login"], True, block_id)
        countries = [CountrySeen(seen["country"], dt.datetime.fromisoformat(seen["first_seen"]),
                                 dt.datetime.fromisoformat(seen["last_seen"]), seen["last_ip"])
                     for seen in entry["countries"]]
        self.metrics.new_block(entry.get("rule", "countries"), entry["action"])
        self.responder.blocked(entry["login"], countries, entry["reason"], "policy", entry["action"])
