"""The rules, as pure functions of (request, history, settings, now): no I/O,
no clock, no database.  Also the values the rules work on: an account's
history (CountrySeen, AccountHistory) and what a decision says (Decision,
Journey).  Everything else in pcc exists to feed decide() and carry out what
it returns.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Iterable, NamedTuple, Optional

from .common import replaced
from .config import BLOCK_ACTIONS, MONITOR_ACTION, Settings
from .protocol import DOVECOT_LOGIN, MAX_LOGIN_LENGTH, Place, PolicyRequest

COUNTED_REQUESTS = ("smtpd_access_policy", DOVECOT_LOGIN)

# A sighting's last_seen (and last_ip) is refreshed at most this often, so an
# account sending thousands of messages from one country, even from several
# addresses, costs reads, not writes.  It is far below any useful window (a day
# or more), so counting stays exact in practice; a block records exact IPs.
SIGHTING_REFRESH = dt.timedelta(seconds=60)


@dataclass(frozen=True)
class CountrySeen:
    country: str
    first_seen: dt.datetime
    last_seen: dt.datetime
    last_ip: str

    def as_json(self) -> dict:
        return {
            "country": self.country,
            "last_ip": self.last_ip,
            "first_seen": self.first_seen.isoformat(),
            "last_seen": self.last_seen.isoformat(),
        }


class Volume(NamedTuple):
    """What an account has sent, this request included as if it went through:
    the sums of every daemon's counts over the last hour and day.  (A tuple:
    made for every request of an account with limits, in a few hundred ns.)"""

    messages_hour: int = 0
    messages_day: int = 0
    recipients_hour: int = 0
    recipients_day: int = 0
    notified: frozenset = frozenset()  # the limits the admins were told of in their current window

    def count(self, limit: str) -> int:
        """The count a [limits] key limits ("messages_per_hour" -> messages_hour)."""
        counted, _per, window = limit.partition("_per_")
        return getattr(self, f"{counted}_{window}")


@dataclass(frozen=True)
class AccountHistory:
    """What the database knows about one account, as the decision needs it."""

    blocked_since: Optional[dt.datetime] = None
    counting_since: Optional[dt.datetime] = None
    sightings: tuple = ()  # of CountrySeen, the recent ones (possibly more than the window)
    block_action: Optional[str] = None  # the action of the block in force; MONITOR_ACTION = only flagged
    travel_passes: dict = field(default_factory=dict)  # country -> expires_at (possibly expired)
    only_from: frozenset = frozenset()  # the countries an administrator allows it (--only-from); empty = any
    # Where the account's latest sighting's IP is (filled in by the service from
    # GeoIP when the impossible-travel rule is on).
    last_place: Optional[Place] = None
    # Its volume (filled in by the service when [limits] are on; None: not counted).
    volume: Optional[Volume] = None

    @property
    def latest_sighting(self) -> Optional[CountrySeen]:
        return max(self.sightings, key=lambda seen: seen.last_seen, default=None)

    @property
    def enforced_block(self) -> bool:
        """Blocked for real, not only flagged by monitor mode."""
        return self.blocked_since is not None and self.block_action != MONITOR_ACTION


def merge_seen(first: Optional[CountrySeen], second: CountrySeen) -> CountrySeen:
    """One sighting of a country from two: the earliest first_seen, the latest
    last_seen with its IP (the merge the database does too)."""
    if first is None:
        return second
    latest = second if second.last_seen >= first.last_seen else first
    return CountrySeen(latest.country, min(first.first_seen, second.first_seen), latest.last_seen, latest.last_ip)


@dataclass(frozen=True)
class Journey:
    """Two consecutive sightings of an account farther apart than anybody can
    travel in the time between them."""

    origin: Place
    origin_ip: str
    departed: dt.datetime
    destination: Place
    destination_ip: str
    arrived: dt.datetime
    distance_km: float
    speed_kmh: float  # over the distance less both places' accuracy radii

    def describe(self) -> str:
        minutes = (self.arrived - self.departed).total_seconds() / 60
        return (f"{self.origin.name} ({self.origin_ip}) at {self.departed:%Y-%m-%d %H:%M:%S} UTC, then "
                f"{self.destination.name} ({self.destination_ip}) at {self.arrived:%Y-%m-%d %H:%M:%S} UTC: "
                f"{self.distance_km:,.0f} km in {minutes:,.0f} min, {self.speed_kmh:,.0f} km/h")


@dataclass(frozen=True)
class Decision:
    action: str  # "DUNNO", the configured block action, or monitor mode's "WARN ..." (monitor_answer)
    reason: str  # for the log line and, when blocking, the admins
    counted: bool = False  # the request's country counts for the account
    record_sighting: bool = False  # the database must learn about this sighting
    new_block: bool = False  # this request puts the account on the blocked list (or flags it, in monitor mode)
    countries: tuple = ()  # CountrySeen in the window, this request's included
    journey: Optional[Journey] = None  # an impossible journey that ends with this request
    replaces_flag: bool = False  # the new block replaces a monitor-mode flag
    sighted: tuple = ()  # the codes this request is seen under: its country, the COUNT lists' markers
    notify_lists: tuple = ()  # the NOTIFY network lists the client is on: the admins are told
    blocking_rule: str = ""  # a new block's rule when not the country count or travel: "network", "only_from", "limit"
    limit_hit: str = ""  # the [limits] key this request is over ("messages_per_hour"), whatever the limit action
    notify_limit: str = ""  # limit action notify, the admins not yet told in this window: what to tell them
    # This request adds a place to the account's count (a country or marker
    # not in the window) or, with the travel rule on, moves the account: every
    # daemon's next decision must see it, so it is decided on a fresh read of
    # the database and its sighting committed before the answer.
    new_place: bool = False

    @property
    def blocks(self) -> bool:
        """Postfix is told to stop the mail (not DUNNO, not monitor mode's WARN)."""
        return self.action.split(" ", 1)[0] in BLOCK_ACTIONS

    @property
    def rule(self) -> str:
        """Which rule a new block comes from (the country rule blocks before
        a journey is ever looked at)."""
        return self.blocking_rule or ("travel" if self.journey is not None else "countries")


def ignored_request_reason(request: PolicyRequest, settings: Settings) -> Optional[str]:
    """Why this request is no business of pcc's (nothing about it is counted
    or looked up), or None."""
    if request.request not in COUNTED_REQUESTS:
        return "not an smtpd_access_policy request"
    login = request.login
    if not login:
        return "no SASL login"
    if len(login) > MAX_LOGIN_LENGTH:
        return f"SASL login longer than {MAX_LOGIN_LENGTH} characters"
    return exempt_login_reason(login, settings)


def exempt_login_reason(login: str, settings: Settings) -> Optional[str]:
    """Why pcc never counts nor blocks this login, or None."""
    if settings.domains and login.rpartition("@")[2] not in settings.domains:
        return "login not in [mail] domains"
    if login in settings.whitelisted:
        return "whitelisted login"
    return None


def decide(request: PolicyRequest, history: Optional[AccountHistory], settings: Settings,
           now: dt.datetime) -> Decision:
    """The rules, as a pure function.

    Blocked when, counting this request's country, the account has sent from more
    than `how_many_different_countries` distinct counted countries within the last
    `in_how_much_time_in_days` days; or, with `max_travel_speed_kmh` set and
    `impossible_travel_action = block`, when it could not have travelled from its
    previous place to this one in the time between.  A blocked account stays
    blocked until an administrator unblocks it.  In monitor mode a new block is
    only flagged (recorded and notified) and the answer is DUNNO.
    """
    ignored = ignored_request_reason(request, settings)  # the service asked before its GeoIP work: microseconds
    if ignored is not None:
        return Decision("DUNNO", ignored)
    history = history or AccountHistory()
    if history.blocked_since is not None:
        since = f"{history.blocked_since:%Y-%m-%d %H:%M:%S} UTC"
        if history.enforced_block:  # blocks in force stay enforced in monitor mode too
            return Decision(settings.block_reply, f"account blocked since {since}")
        if settings.monitoring:
            return Decision(monitor_answer(settings, f"flagged since {since}"),
                            f"would be blocked since {since} (monitor mode)")
        # enforce mode and only a monitor-mode flag: the account is judged afresh
    if request.check_only:
        return Decision("DUNNO", "not blocked (asked before the password is checked)")
    address = request.client_ip
    if settings.whitelistedips and address is not None and any(address in network
                                                                for network in settings.whitelistedips):
        return Decision("DUNNO", "whitelisted client address")
    lists = request.network_lists  # mostly none: no generator then (this runs on every request)
    notify = tuple(label for label in lists if settings.list_action(label) == "NOTIFY") if lists else ()
    decision = _blocked_at_once(request, history, settings, now) or _count(request, history, settings, now)
    if not decision.new_block and history.volume is not None:
        decision = _over_limit(request, history, settings, decision)
    if notify:
        decision = replaced(decision, notify_lists=notify)
    if decision.new_block and history.blocked_since is not None:
        decision = replaced(decision, replaces_flag=True)
    return decision


def _blocked_at_once(request: PolicyRequest, history: AccountHistory, settings: Settings,
                     now: dt.datetime) -> Optional[Decision]:
    """The rules that need no count: a country the account is not allowed to
    send from (--only-from), a network list whose action is BLOCK."""
    country = request.client_country
    if history.only_from and country is not None and country not in history.only_from \
            and not _has_pass(history, country, now):
        allowed = ", ".join(sorted(history.only_from))
        return _block_at_once(request, history, settings, now, "only_from",
                              f"sent from {country}, but it may send only from {allowed} (--only-from)")
    for label in request.network_lists:
        if settings.list_action(label) == "BLOCK":
            return _block_at_once(request, history, settings, now, "network",
                                  f"client address {request.client_address} is on the network list {label}")
    return None


def _block_at_once(request: PolicyRequest, history: AccountHistory, settings: Settings, now: dt.datetime,
                   rule: str, reason: str) -> Decision:
    codes = _codes(request, settings)
    countries = _window_with(request, history, settings, now, codes)
    reason = _with_signals(reason, request, history, settings, countries, rule)
    return replaced(_new_block(settings, reason, countries, rule=rule), sighted=codes)


def _with_signals(reason: str, request: PolicyRequest, history: AccountHistory, settings: Settings,
                  countries: tuple, rule: str) -> str:
    """A rule's reason, followed by every other signal the account shows."""
    others = signals(request, history, settings, countries, leave_out=rule)
    if rule == "network":
        others = [said for said in others if not said.startswith("network ")]
    return "; ".join([reason] + others)


def _has_pass(history: AccountHistory, country: str, now: dt.datetime) -> bool:
    pass_ends = history.travel_passes.get(country)
    return pass_ends is not None and pass_ends > now


def _codes(request: PolicyRequest, settings: Settings) -> tuple:
    """What this request counts as: its country, and one marker for each COUNT
    network list it is on (counted whatever the country: a VPN exit in a
    home or ignored country is one more place all the same)."""
    country = request.client_country
    codes = (country,) if country is not None else ()
    if not request.network_lists:
        return codes
    return codes + tuple(network_list.marker for network_list in settings.network_lists
                         if network_list.action == "COUNT" and network_list.label in request.network_lists)


def _uncounted_country_reason(request: PolicyRequest, history: AccountHistory, settings: Settings,
                        now: dt.datetime) -> Optional[str]:
    """Why this message's country does not count for the account."""
    country = request.client_country
    if country is None:
        return f"not counted: {request.country_note or 'no country'}"
    if country in settings.ignorecountries:
        return f"not counted: {country} is in ignorecountries"
    pass_ends = history.travel_passes.get(country)
    if pass_ends is not None and pass_ends > now:
        return f"not counted: travel pass for {country} until {pass_ends:%Y-%m-%d %H:%M} UTC"
    return None


def _window_with(request: PolicyRequest, history: AccountHistory, settings: Settings, now: dt.datetime,
                 codes: tuple, recent: Optional[dict] = None) -> tuple:
    """The account's places in the window once this request's `codes` are in
    (`recent`: the window without them, when the caller has it)."""
    recent = dict(recent) if recent is not None else countries_in_window(history, settings, now)
    ip = request.client_ip_text
    for code in codes:
        previous = recent.get(code)
        recent[code] = CountrySeen(code, previous.first_seen if previous else now, now, ip)
    return tuple(sorted(recent.values(), key=lambda seen: seen.first_seen))


def _count(request: PolicyRequest, history: AccountHistory, settings: Settings, now: dt.datetime) -> Decision:
    skip = _uncounted_country_reason(request, history, settings, now)
    codes = _codes(request, settings)
    if skip is not None:
        codes = codes[1:] if request.client_country is not None else codes  # the markers alone
        if not codes:
            return Decision("DUNNO", skip)
    before = countries_in_window(history, settings, now)
    countries = _window_with(request, history, settings, now, codes, before)
    limit = settings.how_many_different_countries
    summary = f"{len(countries)} of at most {limit} countries in {settings.in_how_much_time_in_days:g} days"
    if request.door:
        summary = f"{request.door} login: {summary}"
    if len(countries) > limit:
        listed = ", ".join(settings.place_name(seen.country) for seen in countries)
        why = _with_signals(f"{summary} ({listed})", request, history, settings, countries, "countries")
        return replaced(_new_block(settings, why, countries), sighted=codes)
    journey = impossible_journey(request, history, settings, now)
    if journey is not None and settings.impossible_travel_action == "BLOCK":
        why = _with_signals(f"impossible travel: {journey.describe()}", request, history, settings, countries,
                            "travel")
        return replaced(_new_block(settings, why, countries, journey), sighted=codes)
    if journey is not None:
        summary += f"; impossible travel noticed: {journey.describe()}"
    new_code = any(code not in before for code in codes)
    stale = any(code in before and now - before[code].last_seen >= SIGHTING_REFRESH for code in codes)
    # With the travel rule on, every move to another place is written, so the
    # next message is judged against where the account really was last.
    moved = settings.max_travel_speed_kmh is not None and _moved(request, history)
    return Decision("DUNNO", summary, counted=True, record_sighting=new_code or stale or moved,
                    countries=countries, journey=journey, sighted=codes, new_place=new_code or moved)


def _moved(request: PolicyRequest, history: AccountHistory) -> bool:
    latest = history.latest_sighting
    if latest is None or latest.country != request.client_country:
        return True
    return latest.last_ip != request.client_ip_text and history.last_place != request.client_place


def _new_block(settings: Settings, reason: str, countries: tuple, journey: Optional[Journey] = None,
               rule: str = "") -> Decision:
    if settings.monitoring:
        action, reason = monitor_answer(settings, reason), f"would block (monitor mode): {reason}"
    else:
        action, reason = settings.block_reply, f"blocking: {reason}"
    return Decision(action, reason, counted=True, record_sighting=True, new_block=True, countries=countries,
                    journey=journey, blocking_rule=rule)


def _over_limit(request: PolicyRequest, history: AccountHistory, settings: Settings,
                decision: Decision) -> Decision:
    """`decision` (the country rules' DUNNO) as the [limits] change it: the
    first limit the account's volume, this request included, is over."""
    volume = history.volume
    assert volume is not None
    for name, _counted, _hours, limit in settings.volume_limits:
        if volume.count(name) <= limit:
            continue
        over = f"{volume_words(name, volume.count(name))} (limit {limit})"
        others = "; ".join(signals(request, history, settings, decision.countries, leave_out=name))
        why = f"{over}; {others}" if others else over
        if settings.limit_action == "BLOCK":
            return replaced(_new_block(settings, why, decision.countries, rule="limit"), sighted=decision.sighted,
                            limit_hit=name)
        if settings.limit_action == "DEFER":
            if settings.monitoring:
                return replaced(decision, action=monitor_answer(settings, why, "defer"), limit_hit=name,
                                reason=f"would defer (monitor mode): {why}")
            return replaced(decision, action=f"DEFER_IF_PERMIT {over[0].upper()}{over[1:]}: try again later",
                            reason=f"deferred: {why}", limit_hit=name)
        if name in volume.notified:  # told once per window
            return replaced(decision, reason=f"{decision.reason}; {over}, the admins told already", limit_hit=name)
        return replaced(decision, reason=f"{decision.reason}; {over}, the admins told", limit_hit=name,
                        notify_limit=why)
    return decision


def volume_words(limit: str, count: int) -> str:
    """"412 messages in the last hour": a [limits] key's count for people."""
    counted, _per, window = limit.partition("_per_")
    return f"{count} {counted} in the last {'hour' if window == 'hour' else '24 hours'}"


def signals(request: PolicyRequest, history: AccountHistory, settings: Settings, countries: tuple,
            leave_out: str = "") -> list:
    """Everything the account shows at this request, for people: its volume
    against each limit, its countries in the window, the client's network
    lists.  One explanation names them all, whichever rule fires (leave_out:
    that rule's own, said already)."""
    said = []
    if history.volume is not None:
        for name, _counted, _hours, limit in settings.volume_limits:
            if name != leave_out:
                said.append(f"{volume_words(name, history.volume.count(name))} (limit {limit})")
    if leave_out != "countries" and countries:
        said.append(f"{len(countries)} {'country' if len(countries) == 1 else 'countries'} in "
                    f"{settings.in_how_much_time_in_days:g} days ({', '.join(settings.place_name(seen.country) for seen in countries)})")
    if request.network_lists:
        said.append(f"network {', '.join(request.network_lists)}")
    return said


def monitor_answer(settings: Settings, why: str, action: str = "") -> str:
    """Monitor mode's answer for a message it would have stopped: DUNNO, or
    the WARN line Postfix logs beside the message's client, sender and recipient."""
    if settings.monitor_answer != "WARN":
        return "DUNNO"
    return f"WARN pcc would {action or settings.action.lower()}: {why} (monitor mode)"


def impossible_journey(request: PolicyRequest, history: AccountHistory, settings: Settings,
                       now: dt.datetime) -> Optional[Journey]:
    """The journey from the account's previous sighting to this request, if no
    one can travel that fast.  Places closer than travel_accuracy_radius_km, or
    than both places' own accuracy radii, are never judged."""
    if settings.max_travel_speed_kmh is None:  # before latest_sighting, a max() over the sightings
        return None
    latest, origin, destination = history.latest_sighting, history.last_place, request.client_place
    if latest is None or origin is None or destination is None:
        return None
    if history.counting_since is not None and latest.last_seen < history.counting_since:
        return None  # unblocked since: the owner's next message starts afresh, like the country count
    ip = request.client_ip_text
    if latest.last_ip == ip:
        return None
    distance = origin.distance_km(destination)
    beyond_doubt = distance - origin.accuracy_km - destination.accuracy_km
    if distance < settings.travel_accuracy_radius_km or beyond_doubt <= 0:
        return None
    hours = max((now - latest.last_seen).total_seconds(), 1.0) / 3600
    speed = beyond_doubt / hours
    if speed <= settings.max_travel_speed_kmh:
        return None
    return Journey(origin, latest.last_ip, latest.last_seen, destination, ip, now, distance, speed)


def history_after(history: AccountHistory, decision: Decision, settings: Settings,
                  now: dt.datetime) -> AccountHistory:
    """The account's history once `decision` is recorded: what the next
    request of the account is decided on when it comes before the database
    has been read again."""
    if decision.new_block:
        return replaced(history, blocked_since=now, block_action=settings.recorded_action,
                         sightings=merge_sightings_by_country(history.sightings, decision.countries))
    if decision.counted:
        return replaced(history, sightings=merge_sightings_by_country(history.sightings, decision.countries))
    return history


def merge_sightings_by_country(known: Iterable[CountrySeen], new: Iterable[CountrySeen]) -> tuple:
    """One CountrySeen per country of both (merge_seen), those outside the
    counting window (ignored countries, travel passes) kept: they count again
    once the pass ends."""
    merged = {seen.country: seen for seen in known}
    for seen in new:
        merged[seen.country] = merge_seen(merged.get(seen.country), seen)
    return tuple(merged.values())


def countries_in_window(history: AccountHistory, settings: Settings, now: dt.datetime) -> dict:
    start = now - settings.country_window
    if history.counting_since is not None:
        start = max(start, history.counting_since)
    passes = history.travel_passes
    not_counted = settings.not_counted_codes
    return {
        seen.country: seen
        for seen in history.sightings
        if seen.last_seen >= start and seen.country not in not_counted
        and not (seen.country in passes and passes[seen.country] > now)
    }
