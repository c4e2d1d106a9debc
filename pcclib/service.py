"""One request's path, top to bottom: GeoIP, the account's history (memory or
database), decide(), record (a block before the answer, a sighting behind
it), the log line and the notice.  Then the two ways a request can leave that
path: the late answer (the database kept it longer than DB_ANSWER_DEADLINE;
late.py has the protocol, answer_late() the answer) and the answers while the
database fails (OutageAnswers, below the path).

Both doors (the Postfix port in server.py, the Dovecot port in dovecot.py) hand
their requests to late.answer_in_time(), which calls PolicyService.answer();
neither knows a rule.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import threading
import time
from typing import Optional


from .common import first_line, log, quoted, replaced, utcnow
from .config import Settings
from .decision import (
    AccountHistory,
    CountrySeen,
    Decision,
    decide,
    history_after,
    merge_sightings_by_country,
    ignored_request_reason,
)
from .database import Database
from .geoip import GeoIP
from .late import DB_ANSWER_DEADLINE, RequestTicket, Watchdog
from .networks import Networks
from .metrics import Metrics
from .respond import Responder
from .protocol import DOVECOT_LOGIN, PolicyRequest
from .storage import is_data_error, is_database_error

class _Lane:
    __slots__ = ("lock", "users")

    def __init__(self):
        self.lock = threading.Lock()
        self.users = 0  # requests in the lane: the one deciding and those queued behind it


class _InLane:
    """One request in its account's lane, as a context manager (a class: a
    generator-based one costs twice as much, on every request)."""

    __slots__ = ("lanes", "lock", "login", "lane")

    def __init__(self, lanes: dict, lock: threading.Lock, login: str):
        self.lanes, self.lock, self.login = lanes, lock, login

    def __enter__(self) -> _Lane:
        with self.lock:
            lane = self.lanes.get(self.login)
            if lane is None:
                lane = self.lanes[self.login] = _Lane()
            lane.users += 1
        lane.lock.acquire()
        self.lane = lane
        return lane

    def __exit__(self, *_exception) -> None:
        lane = self.lane
        lane.lock.release()
        with self.lock:
            lane.users -= 1
            if lane.users == 0:
                del self.lanes[self.login]


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

    def enter(self, login: str) -> _InLane:
        """`with lanes.enter(login):` one request of the account at a time."""
        lanes, lock = self._shards[hash(login) % self.SHARDS]
        return _InLane(lanes, lock, login)


class PolicyService:
    """Answers one parsed request: GeoIP, history, decision, records, log line.

    The database is asked in the caller's own thread, one request per account
    at a time (AccountLanes); the Watchdog answers for any request still there
    after DB_ANSWER_DEADLINE seconds (answer_late).  When the database fails
    or is slow, OutageAnswers answers from memory.
    """

    def __init__(self, settings: Settings, database: Database, geoip: GeoIP, networks: Networks,
                 responder: Responder, metrics: Metrics):
        self.settings = settings  # these four are replaced whole by a reload (daemon.reconfigure)
        self.database = database
        self.geoip = geoip
        self.networks = networks
        self.responder = responder
        self.metrics = metrics
        self.memory = database.memory
        self.watchdog = Watchdog(self.answer_late, self.answer_after_error)  # both doors' late answers
        self._lanes = AccountLanes()
        self.outage_answers = OutageAnswers(self)

    def network_of(self, ip: str) -> str:
        """An address's network for people ("AS3320 Deutsche Telekom AG"), "" when unknown."""
        return self.networks.facts_of(ip).describe()

    # --- one request, top to bottom -----------------------------------------

    def answer(self, request: PolicyRequest, now: Optional[dt.datetime] = None,
               ticket: Optional[RequestTicket] = None) -> str:
        request, decision = self.decide_request(request, now or utcnow(), ticket=ticket)
        self._log_decision(request, decision)
        return decision.action

    def decide_request(self, request: PolicyRequest, now: dt.datetime, use_database: bool = True,
                       ticket: Optional[RequestTicket] = None) -> tuple:
        """(the request with its country, the decision), recorded in the database
        (or, without it, in memory and the spool)."""
        ignored = ignored_request_reason(request, self.settings_of(request.login))  # before any GeoIP or database work
        if ignored is not None:
            return request, Decision("DUNNO", ignored)
        found = self.geoip.country(request.client_ip)
        if found.code is None:
            self.metrics.no_country(found.missing)
        request = request.with_country(found, self.networks.lookup(request.client_ip))
        for label in request.network_lists:
            self.metrics.on_network_list(label)
        if use_database:
            return request, self._decide_counted(request, now, ticket or RequestTicket(request))
        # The late answer: the request's own thread, still at work, counts it.
        return request, self.outage_answers.answer(request, now)

    def counts_volume(self, request: PolicyRequest) -> bool:
        """[limits] are on and this is a Postfix request (a message, a recipient)."""
        return request.request == "smtpd_access_policy" and bool(self.settings_of(request.login).volume_limits)

    def _count_volume(self, request: PolicyRequest, decision: Decision, now: dt.datetime) -> None:
        """What a limit does beyond the answer; the request counted if let through."""
        settings = self.settings_of(request.login)
        if decision.limit_hit:
            self.metrics.limit_hit(decision.limit_hit, settings.limit_action)
        if decision.notify_limit:
            hours = next(hours for name, _counted, hours, _limit in settings.volume_limits
                         if name == decision.limit_hit)
            self.database.volume.notified(request.login, decision.limit_hit, hours, now)
            self.responder.limit_reached(request.login, decision.notify_limit, request.client_address, now)
        if not decision.blocks and not decision.action.startswith("DEFER"):
            self.database.volume.add(request, now)

    def _decide_counted(self, request: PolicyRequest, now: dt.datetime, ticket: RequestTicket) -> Decision:
        if request.check_only:  # before the password: the blocked list alone, never the database
            return self._check_blocked(request)
        with self._lanes.enter(request.login):
            decision = self._decide_in_lane(request, now, ticket)
            if self.counts_volume(request):  # in the lane: the account's next request sees this one's count
                self._count_volume(request, decision, now)
            return decision

    def _decide_in_lane(self, request: PolicyRequest, now: dt.datetime, ticket: RequestTicket) -> Decision:
        probing = self.database.outage.failing
        if probing and not self.database.outage.probe_due():
            return self.outage_answers.answer(request, now)
        settings = self.settings_of(request.login)
        history, read_at, decision = self._current_history(request.login), None, None
        if history is not None:
            decision = decide(request, self.judged(history, request, now), settings, now)
            if decision.new_place and not decision.new_block:
                # Memory may miss what another daemon answered a moment
                # ago (the poll is up to a second behind, and a burst is
                # dozens of messages in that second): a new place is
                # decided on the database's view.
                history = decision = None
        if history is None:
            # Queued behind a request that found the database failing: no
            # second try, unless a probe is due.
            if self.database.outage.failing and not probing and not self.database.outage.probe_due():
                return self.outage_answers.answer(request, now)
            if self.memory.never_seen(request.login):
                history, read_at = self._never_seen_history(request.login)
            else:
                read_at = time.monotonic()
                history = self._read_or_answer(request, now, ticket)
                if isinstance(history, Decision):
                    return history
        if not history.enforced_block and self.database.journal.pending() and request.login in self.database.journal.blocked_logins():
            # The database is back but this block is not in it yet (the
            # spool is being written): the database's history must not
            # let the account through meanwhile.
            return Decision(settings.block_reply, "account blocked (its block waits in the spool)")
        if decision is None:
            decision = decide(request, self.judged(history, request, now), settings, now)
        recorded = self._carry_out(request, history, read_at, decision, now, ticket)
        if decision.new_place and not decision.new_block and not self.database.outage.failing:
            return self._decide_after_commit(request, recorded, now, ticket)
        return recorded

    def _read_or_answer(self, request: PolicyRequest, now: dt.datetime, ticket: RequestTicket):
        """The account's history from the database, or, when it cannot be
        read, the answer without it."""
        try:
            return self._read_history(request.login, now, ticket)
        except Exception as error:  # one classifier: the database's, the driver's, or pcc's own
            if not is_database_error(error):
                raise
            if is_data_error(error):
                return self.outage_answers.refused_data(request, error)
            self.database.failed(first_line(error))
            return self.outage_answers.answer(request, now)

    def _carry_out(self, request: PolicyRequest, history: AccountHistory, read_at: Optional[float],
                   decision: Decision, now: dt.datetime, ticket: RequestTicket) -> Decision:
        """Remember and record `decision`, made on `history` (read at read_at,
        None: from memory)."""
        self.remember(request.login, history, decision, now, read_at)
        if decision.new_block:
            # On disk before anyone can answer with it: a late answer then
            # needs no I/O, and a crash during the commit loses no block.
            ticket.spooled = spool_entry(request, decision, now, self.settings_of(request.login).recorded_action)
            self.database.journal.add_block(ticket.spooled, in_flight=True)
        ticket.decided = (request, decision, now)
        return self._record_decided(request, decision, now, ticket)

    def _decide_after_commit(self, request: PolicyRequest, decision: Decision, now: dt.datetime,
                             ticket: RequestTicket) -> Decision:
        """A new place is committed: the account's rows read again.  Two
        daemons can each add a country on views read before the other's
        commit; the later of the two sees both here, and blocks if they cross
        the line together.  The earlier one's decision stands."""
        read_at = time.monotonic()
        try:
            history = self._read_history(request.login, now, ticket)
        except Exception as error:
            if not is_database_error(error):
                raise
            if not is_data_error(error):
                self.database.failed(first_line(error))
            return decision  # recorded already: it stands
        again = decide(request, self.judged(history, request, now), self.settings_of(request.login), now)
        if again.new_block:
            return self._carry_out(request, history, read_at, again, now, ticket)
        self.remember(request.login, history, again, now, read_at)  # the fresher view
        return again if again.blocks else decision  # blocked meanwhile by another daemon or an administrator

    def _check_blocked(self, request: PolicyRequest) -> Decision:
        """A name anyone can send (Dovecot asks before the password) costs no
        database read and takes no room in memory."""
        if self.memory.is_blocked(request.login):
            return Decision(self.settings_of(request.login).block_reply, "account blocked (pcc's blocked list)")
        return Decision("DUNNO", "not blocked (asked before the password is checked)")

    def _current_history(self, login: str) -> Optional[AccountHistory]:
        """The account's history from memory, if it is known to be current."""
        if self.database.outage.failing:
            return None
        return self.memory.current(login)

    def _read_history(self, login: str, now: dt.datetime, ticket: RequestTicket) -> AccountHistory:
        ticket.reading_database = True
        try:
            self.database.ensure()
            unwritten = self.database.sightings.pending_for(login)  # before the read: none can slip between
            history = self.database.store.load_history(login, now - self.settings_of(login).country_window)
        finally:
            ticket.reading_database = False
        return _with_unwritten(history, unwritten)

    def _never_seen_history(self, login: str) -> tuple:
        """(the history, as of when) of an account the database has nothing
        of: what this daemon counted and has not written yet, if anything;
        as of the poll that says so."""
        return _with_unwritten(AccountHistory(), self.database.sightings.pending_for(login)), self.memory.polled_at

    def settings_of(self, login: str) -> Settings:
        """pcc.conf's settings with the rules (pcc --rule) of the account's
        domain and its own over them: what the account is decided by."""
        return self.database.rules.settings_for(login, self.settings)

    def judged(self, history: AccountHistory, request: PolicyRequest, now: dt.datetime) -> AccountHistory:
        """The history decide() is given: with the place of its latest
        sighting (travel rule) and the account's volume ([limits])."""
        history = self.with_last_place(history)
        if self.counts_volume(request):
            history = replaced(history, volume=self.database.volume.volume(request, now))
        return history

    def with_last_place(self, history: AccountHistory) -> AccountHistory:
        """The place of the account's latest sighting, for the impossible-travel rule."""
        if self.settings.max_travel_speed_kmh is None:  # pcc.conf's: a rule cannot set it
            return history
        latest = history.latest_sighting
        if latest is None:
            return history
        try:
            address = ipaddress.ip_address(latest.last_ip)
        except ValueError:
            return history
        return replaced(history, last_place=self.geoip.country(address).place)

    def remember(self, login: str, history: AccountHistory, decision: Decision, now: dt.datetime,
                  read_at: Optional[float] = None) -> None:
        """Keep the account's history as `decision` leaves it, for the requests
        after it and for an outage.  read_at: when the database read of
        `history` began (None: it came from memory)."""
        self.memory.remember(login, history_after(history, decision, self.settings_of(login), now), decision.blocks,
                             read_at)

    def _record_decided(self, request: PolicyRequest, decision: Decision, now: dt.datetime,
                        ticket: RequestTicket) -> Decision:
        """Record a decision made on the database's history; if the database
        fails now, the decision stands and what it changes waits in the journal."""
        wrote = decision.new_block  # a sighting is written behind the answer (SightingWriter)
        try:
            recorded = self._record(request, decision, now)
            if not wrote and self.database.outage.failed_on_write():  # only a write proves it works again
                self.database.store.prove_writable()
                wrote = True
        except Exception as error:
            if not is_database_error(error):
                raise
            if is_data_error(error):  # it would be refused again: no journal; the decision stands
                if ticket.spooled is not None:
                    self.database.journal.release_block(ticket.spooled)  # the replay sets it aside, with a line
                self.outage_answers.refused_data(request, error)
                return decision
            self.database.failed(first_line(error), on_write=True)
            if ticket.spooled is None:
                return self.outage_answers.journal(request, decision, now)
            self.database.journal.release_block(ticket.spooled)  # spooled before its transaction: the replay writes it
            return replaced(decision, reason=decision.reason + " (database failing: block spooled)")
        self.database.ok(wrote)
        if ticket.spooled is not None:  # the transaction did what the spool entry was kept for
            self.database.journal.discard_block(ticket.spooled)
        return recorded

    def _record(self, request: PolicyRequest, decision: Decision, now: dt.datetime) -> Decision:
        login, ip = request.login, request.client_ip_text
        if decision.journey is not None:
            self.metrics.journey()
        if decision.notify_lists:
            self.responder.network_seen(login, decision.notify_lists, request.client_address,
                                        request.client_country, _network_text(request), now)
        if decision.new_block:
            action = self.settings_of(login).recorded_action
            block_id = self.database.store.record_block(
                login, now, source=block_source(request), action=action, reason=decision.reason,
                countries=[seen.as_json() for seen in decision.countries],
                trigger=dict(request.attributes), sighting=(decision.sighted[0], ip) if decision.sighted else None,
                replace_flag=decision.replaces_flag,
            )
            if block_id is None:
                return replaced(decision, new_block=False,
                                reason=decision.reason + " (already blocked by a concurrent request)")
            if decision.blocks:  # its id: were the database to lose it, pcc would know which (upkeep.py)
                self.memory.set_blocked(login, True, block_id)
            for code in decision.sighted[1:]:  # the COUNT lists' markers, for -s and the next window
                self.database.sightings.add(login, CountrySeen(code, now, now, ip))
            self._count_block(request, decision, action)
            self.responder.blocked(login, decision.countries, decision.reason, block_source(request), action,
                                   decision.journey, _network_text(request))
            return decision
        if decision.record_sighting:
            # A new place is committed before the answer (with the other
            # requests' waiting then: one transaction), so that every daemon's
            # next read holds it; the rest is written behind the answer.
            last = len(decision.sighted) - 1
            for n, code in enumerate(decision.sighted):
                self.database.sightings.add(login, CountrySeen(code, now, now, ip), commit=decision.new_place and n == last)
        if decision.journey is not None:
            self.responder.journey(login, decision.journey, now)
        return decision

    def _count_block(self, request: PolicyRequest, decision: Decision, action: str) -> None:
        self.metrics.new_block(decision.rule, action)
        for label in request.network_lists:
            self.metrics.network_block(label)

    def _log_decision(self, request: PolicyRequest, decision: Decision) -> None:
        network = request.network
        log.info(
            "login=%s client=%s country=%s%s decision=%s reason=%s%s%s",
            quoted(request.login or "-"), quoted(request.client_address or "-"), request.client_country or "-",
            "" if network is None else _network_words(network), decision.action.split()[0], decision.reason,
            f" via=dovecot door={request.door}" if request.request == DOVECOT_LOGIN else "",
            " NEW BLOCK" if decision.new_block else "",
        )

    # --- the late answer ------------------------------------------------------

    def answer_late(self, ticket: RequestTicket, now: Optional[dt.datetime] = None) -> str:
        """The answer for a request still in its thread after DB_ANSWER_DEADLINE
        (the Watchdog calls this while that thread goes on): its decision if it
        is made, only its recording waits; otherwise decided from memory."""
        if ticket.decided is not None:  # a new block among them is in the spool already
            request, decision, _decided_at = ticket.decided
            # Its own thread logs the outcome (NEW BLOCK included) when the recording ends.
            self._log_decision(request, replaced(
                decision, new_block=False, reason=decision.reason + " (answered while the database records it)"))
            return decision.action
        if ticket.reading_database:
            self.database.failed(f"no answer within {DB_ANSWER_DEADLINE} s")
        request, decision = self.decide_request(ticket.request, now or utcnow(), use_database=False)
        self._log_decision(request, decision)
        return decision.action

    def answer_after_error(self, request: Optional[PolicyRequest]) -> str:
        """The answer when answering raised (a bug, or a part that failed in a
        way nobody foresaw): what the blocked list in memory says, else
        db_error_action; never an open door for an account known to be blocked.
        Called from an exception handler: logs the traceback."""
        action = self.fallback_action(request)
        log.exception("internal error while answering %s; answering %s",
                      request.login if request is not None and request.login else "a request", action.split()[0])
        return action

    def fallback_action(self, request: Optional[PolicyRequest]) -> str:
        """The answer without a decision: the blocked list in memory's, else
        db_error_action."""
        if request is None or not request.login or not self.memory.is_blocked(request.login):
            return self.settings.db_error_action
        return self.settings_of(request.login).block_reply


class OutageAnswers:
    """The answers while the database fails, or refuses a request's values:
    from the blocked list and the histories in memory (the service's, with
    its settings as reloaded).  A new block goes to the spool, on disk before
    the answer, and is written when the database is back; a sighting waits
    in the write-behind."""

    def __init__(self, service: PolicyService):
        self.service = service

    def answer(self, request: PolicyRequest, now: dt.datetime) -> Decision:
        """Decided from the blocked list and the account's history in memory."""
        service = self.service
        login = request.login
        settings = service.settings_of(login)
        if service.memory.is_blocked(login):
            service.database.outage.count_answer("memory")
            return Decision(settings.block_reply, "account known to be blocked (database failing)")
        history = service.memory.last_known(login)
        if history is None:
            # Not decided, but counted: what this outage shows of the account is
            # remembered (never taken for its whole history: the next read of
            # the database replaces it) and its sighting written when the
            # database takes it; so a thief who sends from new countries while
            # the database fails is blocked from memory all the same.
            counted = decide(request, service.judged(AccountHistory(), request, now), settings, now)
            service.remember(login, AccountHistory(), counted, now)
            if counted.new_block:  # a rule that needs no history (a network list): it blocks as it would online
                service.database.outage.count_answer("memory")
                return self.journal(request, counted, now)
            if counted.action.startswith("DEFER"):  # over a limit, counted in memory: deferred as online
                service.database.outage.count_answer("memory")
                return counted
            service.database.outage.count_answer("db_error_action")
            if counted.record_sighting:
                self._add_sightings(login, counted, now, request.client_ip_text)
            return Decision(service.settings.db_error_action, "database failing, account not in memory")
        service.database.outage.count_answer("memory")
        decision = decide(request, service.judged(history, request, now), settings, now)
        service.remember(login, history, decision, now)
        decision = self.journal(request, decision, now)
        if decision.new_block or decision.action.startswith("DEFER"):
            return decision
        return Decision(service.settings.db_error_action, f"database failing; {decision.reason}")

    def journal(self, request: PolicyRequest, decision: Decision, now: dt.datetime) -> Decision:
        """Keep what `decision` changes for the database's return: a new block
        in the spool (on disk before the answer), a sighting in memory."""
        service = self.service
        if decision.new_block:
            action = service.settings_of(request.login).recorded_action
            service.database.journal.add_block(spool_entry(request, decision, now, action))
            service.responder.end_sessions_soon(request.login, action)
            return replaced(decision, reason=decision.reason + " (database failing: block spooled)")
        if decision.record_sighting:
            self._add_sightings(request.login, decision, now, request.client_ip_text)
        return decision

    def _add_sightings(self, login: str, decision: Decision, now: dt.datetime, ip: str) -> None:
        """Without waiting for a batch: the database is failing."""
        service = self.service
        for code in decision.sighted:
            service.database.sightings.add(login, CountrySeen(code, now, now, ip), may_wait=False)

    def refused_data(self, request: PolicyRequest, error: BaseException) -> Decision:
        """The database refused a value of this request: one ERROR line, and an
        answer from memory, without declaring the database down for everyone."""
        service = self.service
        service.metrics.database_failed()
        log.error("database refused the values of a request by %r from %s (not an outage; this request is "
                  "decided from memory): %s", request.login, request.client_address, first_line(error))
        if service.memory.is_blocked(request.login):
            return Decision(service.settings_of(request.login).block_reply,
                            "account known to be blocked (database refused the request)")
        return Decision(service.settings.db_error_action, "database refused this request's values")


def _with_unwritten(history: AccountHistory, unwritten: tuple) -> AccountHistory:
    """`history` with the sightings this daemon counted and has not written yet."""
    if not unwritten:
        return history
    return replaced(history, sightings=merge_sightings_by_country(history.sightings, unwritten))


def _network_words(network) -> str:
    """The log line's words for the client's network: network=tor,vpn asn=AS13335 org="Cloudflare"."""
    words = f" network={','.join(network.labels)}" if network.labels else ""
    if network.asn is not None:
        words += f" asn=AS{network.asn} org={quoted(network.organisation)}"
    return words


def _network_text(request: PolicyRequest) -> str:
    """The client's network for people: "AS13335 Cloudflare, Inc. (lists: tor)"; "" when unknown."""
    network = request.network
    if network is None:
        return ""
    text = network.describe()
    if network.labels:
        text = f"{text} (lists: {', '.join(network.labels)})".strip()
    return text


def block_source(request: PolicyRequest) -> str:
    """Who made a block, as -l shows it: "policy" (Postfix) or "dovecot/<door>"."""
    return f"dovecot/{request.door}"[:16] if request.request == DOVECOT_LOGIN else "policy"


def spool_entry(request: PolicyRequest, decision: Decision, now: dt.datetime, action: str) -> dict:
    """A new block as the spool keeps it."""
    return {
        "login": request.login, "at": now.isoformat(), "action": action,
        "source": block_source(request),
        "rule": decision.rule, "replaces_flag": decision.replaces_flag,
        "reason": decision.reason, "countries": [seen.as_json() for seen in decision.countries],
        "trigger": dict(request.attributes), "sighting": [decision.sighted[0] if decision.sighted else None, request.client_ip_text],
        "network": _network_text(request),
    }
