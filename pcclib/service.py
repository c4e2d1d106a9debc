"""One request's path, top to bottom: GeoIP, the account's history (memory or
database), decide(), record (block before the answer, sighting behind it),
log line, notice.  Also the answer for a request the database keeps too
long (answer_late) and the answers when the database fails.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime as dt
import ipaddress
import threading
import time
from typing import Optional

from sqlalchemy import exc as sa_exc

from .common import first_line, log, utcnow
from .config import MONITOR_ACTION, Settings
from .decision import (
    AccountHistory,
    CountrySeen,
    Decision,
    Journey,
    decide,
    history_after,
    merge_sightings_by_country,
    not_counted_reason,
)
from .geoip import GeoIP
from .memory import (
    CHANGES_OVERLAP,
    CHANGES_POLL_INTERVAL,
    CHANGES_STALE_AFTER,
    HISTORY_CACHE_SIZE,
    HISTORY_MAX_AGE,
    HistoryCache,
    SightingWriter,
)
from .metrics import Metrics
from .notify import TRAVEL_NOTICE_INTERVAL, Notifier, block_notice, travel_notice
from .outage import DB_PROBE_INTERVAL, OUTAGE_REPORT_INTERVAL, OutageJournal
from .protocol import DOVECOT_LOGIN, PolicyRequest
from .storage import DatabaseChanges, Store, is_data_error, safe_url

# How long a request may wait for the database before pcc answers without it
# (see Watchdog).  The database work goes on (a block still gets written).
DB_ANSWER_DEADLINE = 0.8

# The request `pcc.py --health` sends the daemon (Postfix never sends it):
# the answer is DUNNO followed by what the daemon sees of itself.
HEALTH_REQUEST = "pcc_health"


class RequestTicket:
    """One request on its way through PolicyService, shared with the Watchdog.

    Once the decision is made it is the answer, however long the database then
    takes to record it: a late answer repeats it rather than guessing again."""

    __slots__ = ("request", "decided", "reading_database", "lock", "recorded", "spooled")

    def __init__(self, request: PolicyRequest):
        self.request = request
        self.decided: Optional[tuple] = None  # (the request with its country, the Decision, now)
        self.reading_database = False  # waiting for the account's history
        # Between the two threads that may answer: a new block answered before
        # its transaction ended is spooled first, and the spool entry dropped
        # once that transaction has committed it.
        self.lock = threading.Lock()
        self.recorded = False  # the request's thread is done with the database
        self.spooled: Optional[dict] = None  # the Watchdog's spool entry for a decided new block


class _Lane:
    __slots__ = ("lock", "users")

    def __init__(self):
        self.lock = threading.Lock()
        self.users = 0  # requests in the lane: the one deciding and those queued behind it


class AccountLanes:
    """One request at a time per account, inside this daemon.

    Sharded by login: the lock that finds an account's lane is shared by the
    accounts of one shard only, not by every connection thread.

    A stolen account's burst (dozens of SMTP sessions at once) would otherwise
    run as many transactions against the same rows, queue on their locks, and
    outlast the Watchdog.  In a lane, the first request reads the history,
    decides and records; the requests queued behind it are decided in memory on
    its result (HistoryCache).  Across daemons the database stays the one truth
    (a block is a compare-and-swap)."""

    SHARDS = 64

    def __init__(self):
        self._shards = [({}, threading.Lock()) for _ in range(self.SHARDS)]

    @contextlib.contextmanager
    def enter(self, login: str):
        lanes, lock = self._shards[hash(login) % self.SHARDS]
        with lock:
            lane = lanes.get(login)
            if lane is None:
                lane = lanes[login] = _Lane()
            lane.users += 1
        try:
            with lane.lock:
                yield lane
        finally:
            with lock:
                lane.users -= 1
                if lane.users == 0:
                    del lanes[login]


class PolicyService:
    """Answers one parsed request: GeoIP, history, decision, records, log line.

    The database is asked in the connection's own thread, one request per
    account at a time (AccountLanes); the server's Watchdog answers for any
    request still there after DB_ANSWER_DEADLINE seconds: with its decision
    when that is made (the recording goes on), else from memory.  When the
    database fails or is slow, pcc answers from memory: accounts known to be
    blocked get the action, accounts it has seen recently are decided on what
    it remembers (a new block is spooled and written later), and the rest get
    `db_error_action`.
    """

    def __init__(self, settings: Settings, store: Store, geoip: GeoIP, notifier: Notifier,
                 journal: Optional[OutageJournal] = None):
        self.settings = settings
        self.store = store
        self.geoip = geoip
        self.notifier = notifier
        self.journal = journal or OutageJournal()
        self.tables_ready = False
        self._cache = HistoryCache(HISTORY_CACHE_SIZE)
        self._known_blocked: set = set()
        self._lanes = AccountLanes()
        self._state_lock = threading.Lock()
        self._db_failing = False
        self._next_probe = 0.0
        # The outage in course, for the log, the metrics and --health.
        self._failing_since = 0.0  # monotonic
        self._failed_on_write = False  # then only a successful write ends it
        self._outage_problem = ""
        self._outage_answers: collections.Counter = collections.Counter()  # "db_error_action" / "memory"
        self._outage_reported = 0.0  # monotonic time of its latest ERROR line
        self._error_answers_total = 0  # requests answered db_error_action since the start
        self.metrics = Metrics()  # off; run_daemon turns it on for [server] metrics_port
        self._travel_noticed: dict = {}  # login -> when its last impossible-travel mail went
        self.sightings = SightingWriter(store, on_written=lambda: self._database_ok(wrote=True),
                                        on_failed=lambda problem: self._database_failed(problem, on_write=True))
        self._changes_from: Optional[dt.datetime] = None  # where the next poll of changes starts
        self._changes_polled_at = float("-inf")  # monotonic start of the latest successful poll

    def start_background(self, stopping: threading.Event) -> None:
        """The daemon's helpers: the sighting writer and the poll of changes."""
        self.sightings.start()
        threading.Thread(target=self._poll_changes_until, args=(stopping,), name="pcc-changes",
                         daemon=True).start()

    def stop_background(self) -> None:
        self.sightings.stop()

    def answer(self, request: PolicyRequest, now: Optional[dt.datetime] = None,
               ticket: Optional[RequestTicket] = None) -> str:
        request, decision = self.decide_request(request, now or utcnow(), ticket=ticket)
        self._log_decision(request, decision)
        return decision.action

    def decide_request(self, request: PolicyRequest, now: dt.datetime, use_database: bool = True,
                       ticket: Optional[RequestTicket] = None) -> tuple:
        """(the request with its country, the decision), recorded in the database
        (or, without it, in memory and the spool)."""
        if request.request == HEALTH_REQUEST:
            return request, Decision(f"DUNNO {self.health_report()}", "health check")
        skip = not_counted_reason(request, self.settings)
        if skip is not None:
            return request, Decision("DUNNO", skip)
        found = self.geoip.country(request.client_ip)
        if found.code is None:
            self.metrics.no_country(found.missing)
        request = request.with_country(found)
        if use_database:
            return request, self._decide_counted(request, now, ticket or RequestTicket(request))
        return request, self._decide_offline(request, now)

    def _decide_counted(self, request: PolicyRequest, now: dt.datetime, ticket: RequestTicket) -> Decision:
        probing = self._db_failing
        if probing and not self._probe_due():
            return self._decide_offline(request, now)
        with self._lanes.enter(request.login):
            history, read_at = self._current_history(request.login), None
            if history is None:
                # Queued behind a request that found the database failing: no
                # second try, unless a probe is due.
                if self._db_failing and not probing and not self._probe_due():
                    return self._decide_offline(request, now)
                read_at = time.monotonic()
                try:
                    history = self._read_history(request.login, now, ticket)
                except sa_exc.SQLAlchemyError as error:
                    if is_data_error(error):
                        return self._refused_data(request, error)
                    self._database_failed(first_line(error))
                    return self._decide_offline(request, now)
            decision = decide(request, self._with_last_place(history), self.settings, now)
            self._remember(request.login, history, decision, now, read_at)
            ticket.decided = (request, decision, now)
            return self._record_decided(request, decision, now, ticket)

    def _current_history(self, login: str) -> Optional[AccountHistory]:
        """The account's history from memory, if it is known to be current."""
        if self._db_failing or time.monotonic() - self._changes_polled_at > CHANGES_STALE_AFTER:
            return None
        return self._cache.fresh(login, HISTORY_MAX_AGE)

    def _read_history(self, login: str, now: dt.datetime, ticket: RequestTicket) -> AccountHistory:
        ticket.reading_database = True
        try:
            self.ensure_database()
            unwritten = self.sightings.pending_for(login)  # before the read: none can slip between
            history = self.store.load_history(login, now - self.settings.country_window)
        finally:
            ticket.reading_database = False
        if not unwritten:
            return history
        return dataclasses.replace(history, sightings=merge_sightings_by_country(history.sightings, unwritten))

    def _poll_changes_until(self, stopping: threading.Event) -> None:
        while not stopping.wait(CHANGES_POLL_INTERVAL):
            self.poll_changes()

    def poll_changes(self) -> bool:
        """Forget the accounts in memory that the database knows more about."""
        started, now = time.monotonic(), utcnow()
        since = self._changes_from or now - CHANGES_OVERLAP
        try:
            if not self.tables_ready:
                return False
            changes = self.store.changes_since(since)
        except sa_exc.SQLAlchemyError as error:
            log.debug("poll of database changes failed: %s", first_line(error))
            return False
        self.apply_changes(changes)
        self._changes_from = now - CHANGES_OVERLAP
        self._changes_polled_at = started
        return True

    def apply_changes(self, changes: DatabaseChanges) -> None:
        stale = set()
        for login, country, last_seen in changes.sightings:
            history = self._cache.get(login)
            if history is not None and not any(seen.country == country and seen.last_seen >= last_seen
                                               for seen in history.sightings):
                stale.add(login)
        for login, blocked_since, counting_since, action in changes.accounts:
            if blocked_since is None:
                self._known_blocked.discard(login)  # unblocked
            elif action != MONITOR_ACTION:
                self._known_blocked.add(login)  # also blocked here, should the database fail
            history = self._cache.get(login)
            if history is not None and (history.blocked_since, history.counting_since) != (blocked_since,
                                                                                           counting_since):
                stale.add(login)
        for login, country, expires_at in changes.passes:
            history = self._cache.get(login)
            if history is not None and history.travel_passes.get(country) != expires_at:
                stale.add(login)
        for login in stale:
            self._cache.forget(login)

    def _record_decided(self, request: PolicyRequest, decision: Decision, now: dt.datetime,
                        ticket: RequestTicket) -> Decision:
        """Record a decision made on the database's history; if the database
        fails now, the decision stands and what it changes waits in the journal."""
        wrote = decision.new_block  # a sighting is written behind the answer (SightingWriter)
        try:
            recorded = self._record(request, decision, now)
            if not wrote and self._failed_on_write:  # a write failed before: only a write proves it works
                self.store.prove_writable()
                wrote = True
        except sa_exc.SQLAlchemyError as error:
            if is_data_error(error):  # it would be refused again: no journal; the decision stands
                with ticket.lock:
                    ticket.recorded = True
                if ticket.spooled is not None:
                    self.journal.release_block(ticket.spooled)  # the replay sets it aside, with a line
                self._refused_data(request, error)
                return decision
            self._database_failed(first_line(error), on_write=True)
            with ticket.lock:
                ticket.recorded = True
                if ticket.spooled is None:
                    return self._journal(request, decision, now)
            self.journal.release_block(ticket.spooled)  # spooled by the Watchdog already
            return dataclasses.replace(decision, reason=decision.reason + " (database failing: block spooled)")
        self._database_ok(wrote)
        with ticket.lock:
            ticket.recorded = True
        if ticket.spooled is not None:  # the transaction did what the spool entry was kept for
            self.journal.discard_block(ticket.spooled)
        return recorded

    def answer_late(self, ticket: RequestTicket, now: Optional[dt.datetime] = None) -> str:
        """The answer for a request still in its thread after DB_ANSWER_DEADLINE
        (the Watchdog calls this while that thread goes on): its decision if it
        is made, only its recording waits; otherwise decided from memory."""
        if ticket.decided is not None:
            request, decision, decided_at = ticket.decided
            if decision.new_block:
                self._spool_unrecorded_block(ticket, request, decision, decided_at)
            # Its own thread logs the outcome (NEW BLOCK included) when the recording ends.
            self._log_decision(request, dataclasses.replace(
                decision, new_block=False, reason=decision.reason + " (answered while the database records it)"))
            return decision.action
        if ticket.reading_database:
            self._database_failed(f"no answer within {DB_ANSWER_DEADLINE} s")
        request, decision = self.decide_request(ticket.request, now or utcnow(), use_database=False)
        self._log_decision(request, decision)
        return decision.action

    def _with_last_place(self, history: AccountHistory) -> AccountHistory:
        """The place of the account's latest sighting, for the impossible-travel rule."""
        latest = history.latest_sighting
        if self.settings.max_travel_speed_kmh is None or latest is None:
            return history
        try:
            address = ipaddress.ip_address(latest.last_ip)
        except ValueError:
            return history
        return dataclasses.replace(history, last_place=self.geoip.country(address).place)

    def ensure_database(self) -> None:
        """Create missing tables once; write what an outage left behind."""
        if not self.tables_ready:
            self.store.create_tables()
            self.tables_ready = True
        if self.journal.pending():
            self.journal.replay(self.store, self._notify_spooled_block)

    def _refused_data(self, request: PolicyRequest, error: sa_exc.SQLAlchemyError) -> Decision:
        """The database refused a value of this request: one ERROR line, and an
        answer from memory, without declaring the database down for everyone."""
        self.metrics.database_failed()
        log.error("database refused the values of a request by %r from %s (not an outage; this request is "
                  "decided from memory): %s", request.login, request.client_address, first_line(error))
        if request.login in self._known_blocked:
            return Decision(self.settings.block_reply, "account known to be blocked (database refused the request)")
        return Decision(self.settings.db_error_action, "database refused this request's values")

    def answer_after_error(self, request: Optional[PolicyRequest]) -> str:
        """The answer when answering raised (a bug, or a part that failed in a
        way nobody foresaw): what the blocked list in memory says, else
        db_error_action; never an open door for an account known to be blocked.
        Called from an exception handler: logs the traceback."""
        login = request.login if request is not None else ""
        action = self.settings.block_reply if login in self._known_blocked else self.settings.db_error_action
        log.exception("internal error while answering %s; answering %s", login or "a request", action.split()[0])
        return action

    def _spool_unrecorded_block(self, ticket: RequestTicket, request: PolicyRequest, decision: Decision,
                                now: dt.datetime) -> None:
        """A block is on disk before Postfix hears of it: while its transaction
        still waits, the spool keeps it (a crash then loses no block)."""
        with ticket.lock:
            if not ticket.recorded:
                ticket.spooled = self._block_entry(request, decision, now)
                self.journal.add_block(ticket.spooled, in_flight=True)

    def _decide_offline(self, request: PolicyRequest, now: dt.datetime) -> Decision:
        login = request.login
        if login in self._known_blocked:
            self._count_outage_answer("memory")
            return Decision(self.settings.block_reply, "account known to be blocked (database failing)")
        history = self._cache.get(login)
        if history is None:
            self._count_outage_answer("db_error_action")
            return Decision(self.settings.db_error_action, "database failing, account not in memory")
        self._count_outage_answer("memory")
        decision = decide(request, self._with_last_place(history), self.settings, now)
        self._remember(login, history, decision, now)
        decision = self._journal(request, decision, now)
        if decision.new_block:
            return decision
        return Decision(self.settings.db_error_action, f"database failing; {decision.reason}")

    def _journal(self, request: PolicyRequest, decision: Decision, now: dt.datetime) -> Decision:
        """Keep what `decision` changes for the database's return: a new block
        in the spool (on disk before the answer), a sighting in memory."""
        if decision.new_block:
            self.journal.add_block(self._block_entry(request, decision, now))
            return dataclasses.replace(decision, reason=decision.reason + " (database failing: block spooled)")
        if decision.record_sighting:
            self.sightings.add(request.login, CountrySeen(request.client_country, now, now, str(request.client_ip)))
        return decision

    def _block_entry(self, request: PolicyRequest, decision: Decision, now: dt.datetime) -> dict:
        """A new block as the spool keeps it."""
        return {
            "login": request.login, "at": now.isoformat(), "action": self.settings.recorded_action,
            "source": block_source(request),
            "rule": decision.rule, "replaces_flag": decision.replaces_flag,
            "reason": decision.reason, "countries": [seen.as_json() for seen in decision.countries],
            "trigger": dict(request.attributes), "sighting": [request.client_country, str(request.client_ip)],
        }

    def _remember(self, login: str, history: AccountHistory, decision: Decision, now: dt.datetime,
                  read_at: Optional[float] = None) -> None:
        """Keep the account's history as `decision` leaves it, for the requests
        after it and for an outage.  read_at: when the database read of
        `history` began (None: it came from memory)."""
        if decision.blocks:
            self._known_blocked.add(login)
        else:
            self._known_blocked.discard(login)
        self._cache.put(login, history_after(history, decision, self.settings, now), read_at)

    def _record(self, request: PolicyRequest, decision: Decision, now: dt.datetime) -> Decision:
        login, country, ip = request.login, request.client_country, str(request.client_ip)
        if decision.journey is not None:
            self.metrics.journey()
        if decision.new_block:
            action = self.settings.recorded_action
            block_id = self.store.record_block(
                login, now, source=block_source(request), action=action, reason=decision.reason,
                countries=[seen.as_json() for seen in decision.countries],
                trigger=dict(request.attributes), sighting=(country, ip), replace_flag=decision.replaces_flag,
            )
            if block_id is None:
                return dataclasses.replace(decision, new_block=False,
                                           reason=decision.reason + " (already blocked by a concurrent request)")
            self.metrics.new_block(decision.rule, action)
            subject, body = block_notice(self.settings, login, decision.countries, decision.reason, block_source(request),
                                         action, decision.journey)
            self.notifier.send(subject, body)
            return decision
        if decision.record_sighting:
            self.sightings.add(login, CountrySeen(country, now, now, ip))
        if decision.journey is not None:
            self._notify_journey(login, decision.journey, now)
        return decision

    def _notify_journey(self, login: str, journey: Journey, now: dt.datetime) -> None:
        with self._state_lock:
            last = self._travel_noticed.get(login)
            if last is not None and now - last < TRAVEL_NOTICE_INTERVAL:
                return
            if len(self._travel_noticed) > HISTORY_CACHE_SIZE:
                self._travel_noticed.clear()
            self._travel_noticed[login] = now
        self.notifier.send(*travel_notice(self.settings, login, journey))

    def _notify_spooled_block(self, entry: dict) -> None:
        countries = [CountrySeen(seen["country"], dt.datetime.fromisoformat(seen["first_seen"]),
                                 dt.datetime.fromisoformat(seen["last_seen"]), seen["last_ip"])
                     for seen in entry["countries"]]
        self.metrics.new_block(entry.get("rule", "countries"), entry["action"])
        subject, body = block_notice(self.settings, entry["login"], countries, entry["reason"], "policy",
                                     entry["action"])
        self.notifier.send(subject, body)

    def _probe_due(self) -> bool:
        with self._state_lock:
            if time.monotonic() < self._next_probe:
                return False
            self._next_probe = time.monotonic() + DB_PROBE_INTERVAL
            return True

    def _database_failed(self, problem: str, on_write: bool = False) -> None:
        # One line when an outage starts, not one per request; report_outage()
        # repeats it every minute while it lasts.
        self.metrics.database_failed()
        now = time.monotonic()
        with self._state_lock:
            starting, self._db_failing = not self._db_failing, True
            self._next_probe = now + DB_PROBE_INTERVAL
            self._outage_problem = problem
            self._failed_on_write = self._failed_on_write or on_write
            if starting:
                self._failing_since = self._outage_reported = now
                self._outage_answers.clear()
        if starting:
            log.error("database %s failed, answering from memory (else %s) until it is back: %s",
                      safe_url(self.settings.dbcon), self.settings.db_error_action, problem)

    def _database_ok(self, wrote: bool = False) -> None:
        """The database answered; a failure to write ends only with a write."""
        with self._state_lock:
            ending = self._db_failing and (wrote or not self._failed_on_write)
            if ending:
                self._db_failing = self._failed_on_write = False
            lasted, answers = time.monotonic() - self._failing_since, dict(self._outage_answers)
        if ending:
            log.warning("database %s is back; pcc answers from it again (the outage lasted %.0f s: %d requests "
                        "got %s, %d were decided from memory)", safe_url(self.settings.dbcon), lasted,
                        answers.get("db_error_action", 0), self.settings.db_error_action, answers.get("memory", 0))
            threading.Thread(target=self._write_journal, name="pcc-journal", daemon=True).start()

    def _count_outage_answer(self, kind: str) -> None:
        with self._state_lock:
            self._outage_answers[kind] += 1
            if kind == "db_error_action":
                self._error_answers_total += 1

    def database_unreachable_at_start(self, problem: str) -> None:
        """A server that is down or unreachable at boot is an outage, not a
        misconfiguration: serve as in an outage, and say so."""
        log.error("database %s is unreachable at start-up; pcc serves as in an outage until it answers: %s",
                  safe_url(self.settings.dbcon), problem)
        self._database_failed(problem)

    def report_outage(self) -> None:
        """While pcc decides without its database, an ERROR line a minute: an
        outage that lasts is a fault to fix, not a blip."""
        now = time.monotonic()
        with self._state_lock:
            if not self._db_failing or now - self._outage_reported < OUTAGE_REPORT_INTERVAL:
                return
            self._outage_reported = now
            lasted, answers, problem = now - self._failing_since, dict(self._outage_answers), self._outage_problem
        log.error("database %s still failing after %.0f s (%s): %d requests answered %s, %d decided from "
                  "memory, %d blocks waiting in the spool; protection is partly OFF until it is fixed",
                  safe_url(self.settings.dbcon), lasted, problem, answers.get("db_error_action", 0),
                  self.settings.db_error_action, answers.get("memory", 0), self.journal.blocks_waiting())

    def health_report(self) -> str:
        """What `pcc.py --health` asks the running daemon: name=value words."""
        state = self.database_state()
        unsent, waited = self.notifier.backlog()
        built = self.geoip.built.isoformat() if self.geoip.built else "unknown"
        return (f"{HEALTH_REQUEST} database={'failing' if state['failing'] else 'ok'} "
                f"failing_seconds={state['failing_seconds']:.0f} error_answers={state['error_answers']} "
                f"spooled_blocks={self.journal.blocks_waiting()} unsent_notices={unsent} "
                f"oldest_unsent_seconds={waited:.0f} geoip_built={built}")

    def database_state(self) -> dict:
        """What the metrics and --health say of the database, as this daemon sees it."""
        with self._state_lock:
            return {"failing": self._db_failing,
                    "failing_seconds": time.monotonic() - self._failing_since if self._db_failing else 0.0,
                    "problem": self._outage_problem if self._db_failing else "",
                    "error_answers": self._outage_answers.get("db_error_action", 0),
                    "error_answers_total": self._error_answers_total}

    def _write_journal(self) -> None:
        try:
            self.ensure_database()
        except sa_exc.SQLAlchemyError as error:
            log.error("writing what was decided during the outage failed, will try again: %s", first_line(error))

    def _log_decision(self, request: PolicyRequest, decision: Decision) -> None:
        log.info(
            "login=%s client=%s country=%s decision=%s reason=%s%s%s",
            request.login or "-", request.client_address or "-", request.client_country or "-",
            decision.action.split()[0], decision.reason,
            f" via=dovecot door={request.door}" if request.request == DOVECOT_LOGIN else "",
            " NEW BLOCK" if decision.new_block else "",
        )


def block_source(request: PolicyRequest) -> str:
    """Who made a block, as -l shows it: "policy" (Postfix) or "dovecot/<door>"."""
    return f"dovecot/{request.door}"[:16] if request.request == DOVECOT_LOGIN else "policy"
