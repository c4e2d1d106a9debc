"""`pcc.py --replay`: Postfix (and Dovecot) log lines run through the daemon's
own service and decision against a throw-away in-memory store, to see whom
pcc would have blocked; --record writes the sightings for a new pcc to start
from.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import re
import sys
from dataclasses import dataclass, field
from typing import Optional, cast

from .admin import AdminError, on_admin_store
from .common import UTC, escape_controls, utcnow, when
from .config import MONITOR_ACTION, Settings
from .daemon import build_parts
from .decision import AccountHistory, CountrySeen, merge_seen
from .geoip import GeoIP
from .notify import Notifier
from .protocol import DOVECOT_DOORS, DOVECOT_LOGIN, PolicyRequest
from .service import PolicyService
from .storage import AdminStore, Store, safe_url

# One authenticated submission as Postfix's smtpd logs it, e.g.
#   Nov 25 18:43:13 mx postfix/submission/smtpd[1234]: 4F3A21C0: client=unknown[203.0.113.9],
#   sasl_method=LOGIN, sasl_username=alice@example.com
# with a classic syslog time stamp (no year) or an RFC 3339 one (journald,
# rsyslog high precision), under any postfix*/.../smtpd service name.
_SUBMISSION_LINE = re.compile(
    r"^(?:(?P<classic>[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d)|(?P<iso>\d{4}-\d\d-\d\dT\S+)) \S+ "
    r"postfix[^\s/\[]*(?:/[^\s/\[]+)*/smtpd\[\d+\]: (?P<queue_id>[0-9A-Za-z]+): "
    r"client=[^\[\s]*\[(?:IPv6:)?(?P<ip>[^\]]+)\](?::\d+)?, (?:.*?, )?sasl_username=(?P<login>[^,\s]*)"
)

# A message's recipients, as Postfix's queue manager logs it once queued:
#   Nov 25 18:43:14 mx postfix/qmgr[99]: 4F3A21C0: from=<alice@example.com>, size=1234, nrcpt=3 (queue active)
_QUEUED_LINE = re.compile(r"postfix[^\s/\[]*(?:/[^\s/\[]+)*/qmgr\[\d+\]: (?P<queue_id>[0-9A-Za-z]+): from=<[^>]*>, "
                          r"size=\d+, nrcpt=(?P<nrcpt>\d+)")
# The volume report: the accounts shown, and the percentile of all accounts.
BUSIEST_SHOWN = 10
VOLUME_PERCENTILE = 99.9
VOLUME_WINDOWS = (("messages_per_hour", 0, 3600), ("messages_per_day", 0, 86400),
                  ("recipients_per_hour", 1, 3600), ("recipients_per_day", 1, 86400))

# A successful Dovecot login (replayed when [dovecot] count_logins = yes), as
# syslog or Dovecot's own log_path has it:
#   Nov 25 18:40:02 mx dovecot: imap-login: Login: user=<alice@example.com>, method=PLAIN, rip=203.0.113.9, ...
#   Nov 25 18:40:02 imap-login: Info: Logged in: user=<alice@example.com>, method=PLAIN, rip=203.0.113.9, ...
_DOVECOT_LOGIN_LINE = re.compile(
    r"^(?:(?P<classic>[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d)|(?P<iso>\d{4}-\d\d-\d\dT\S+)) "
    r"(?:\S+ dovecot(?:\[\d+\])?: )?(?P<door>imap|pop3|submission|managesieve)-login: (?:Info: )?"
    r"(?:Login|Logged in): user=<(?P<login>[^>]*)>, (?:.*?, )?rip=(?P<ip>[^,\s]+)"
)
# How far after "today" a classic stamp may be and still be this year's: a log
# copied from a host in another time zone (up to 14 hours ahead of UTC) or
# with its clock off.  Farther ahead, it is last year's.
FUTURE_SLACK = dt.timedelta(hours=14)

_MONTHS = {name: number for number, name in enumerate(
    "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split(), start=1)}


class LogClock:
    """Turns log time stamps into aware UTC datetimes.

    Classic syslog stamps have no year.  The first one goes in the latest year
    that does not put it after `today` (by more than FUTURE_SLACK: the log's
    host may be some hours ahead in its zone or its clock), so "Dec 30" read
    on 3 December is last year's and "Feb 29" lands in a leap year; after
    that the year goes up each time the month goes back (December, then
    January).  Stamps without a zone are local time, as syslog writes them.
    `today` is the caller's clock (aware): nothing here reads the host's."""

    def __init__(self, today: dt.datetime):
        self.today = today
        self.year: Optional[int] = None
        self.month = 0

    def parse(self, classic: Optional[str], iso: Optional[str]) -> dt.datetime:
        if iso:
            moment = dt.datetime.fromisoformat(iso)
        else:
            classic = classic or ""  # neither stamp: KeyError, an unparseable line
            month, fields = _MONTHS[classic[:3]], (int(classic[4:6]), int(classic[7:9]), int(classic[10:12]),
                                                   int(classic[13:15]))
            if self.year is None:
                self.year = self._first_year(month, fields)
            elif month < self.month:
                self.year += 1
            self.month = month
            moment = dt.datetime(self.year, month, *fields)
        return _as_utc(moment)

    def _first_year(self, month: int, fields: tuple) -> int:
        """The latest year in which month and fields (day, hour, minute,
        second) are a real moment no later than today + FUTURE_SLACK."""
        latest = self.today + FUTURE_SLACK
        for year in range(latest.year, latest.year - 9, -1):  # a leap day is at most 8 years back
            try:
                moment = dt.datetime(year, month, *fields)
            except ValueError:  # 29 February of a common year
                continue
            if _as_utc(moment) <= latest:
                return year
        raise ValueError(f"no year has {month}/{fields[0]}")


def _as_utc(moment: dt.datetime) -> dt.datetime:
    if moment.tzinfo is None:
        moment = moment.astimezone()  # local time
    return moment.astimezone(UTC)  # OverflowError for a stamp near year 1 or 9999: the caller skips the line


class MemoryStore:
    """A throw-away in-memory database with Store's interface, for --replay.

    The replay runs the daemon's own service and decision code against it, so
    the live database is never touched; it holds one entry per account and
    country, whatever the number of log lines."""

    def __init__(self) -> None:
        self.sightings: dict = {}  # login -> {country: CountrySeen}
        self.blocks: dict = {}  # login -> dict describing the block

    def create_tables(self) -> None:
        pass

    def dispose(self) -> None:
        pass

    def load_history(self, login: str, since: dt.datetime) -> AccountHistory:
        seen = self.sightings.get(login)
        recent = tuple(s for s in seen.values() if s.last_seen >= since) if seen else ()
        block = self.blocks.get(login)
        if block is None:
            return AccountHistory(sightings=recent)
        return AccountHistory(block["blocked_at"], None, recent, block["action"])

    def record_sighting(self, login: str, country: str, ip: str, now: dt.datetime) -> None:
        countries = self.sightings.setdefault(login, {})
        countries[country] = merge_seen(countries.get(country), CountrySeen(country, now, now, ip))

    def write_sightings(self, rows: list) -> None:
        for row in rows:
            countries = self.sightings.setdefault(row["login"], {})
            countries[row["country"]] = merge_seen(countries.get(row["country"]), CountrySeen(
                row["country"], row["first_seen"], row["last_seen"], row["last_ip"]))

    def record_block(self, login: str, now: dt.datetime, *, source: str, action: str, reason: str,
                     countries: list, trigger: Optional[dict] = None, sighting: Optional[tuple] = None,
                     replace_flag: bool = False) -> Optional[int]:
        if sighting is not None:
            country, ip = sighting
            self.record_sighting(login, country, ip, now)
        flagged = login in self.blocks and self.blocks[login]["action"] == MONITOR_ACTION
        if login in self.blocks and not (replace_flag and flagged and action != MONITOR_ACTION):
            return None
        self.blocks[login] = {"login": login, "blocked_at": now, "reason": reason, "action": action,
                              "countries": countries, "log_line": (trigger or {}).get("log_line", "")}
        return len(self.blocks)


def replay_service(settings: Settings, geoip: GeoIP, store: Optional[MemoryStore] = None) -> PolicyService:
    """The daemon's own PolicyService, on `store` (a new MemoryStore by
    default) and mailing nobody; it answers in the caller's thread (no helper
    threads are started)."""
    # A replay tells nobody and touches nothing outside itself: no mail, no
    # webhook, no Dovecot session ended.
    # The limits are the volume report's (exact windows, recipients from the
    # queue manager's lines, which come after the decision).
    quiet = dataclasses.replace(settings, notice=(), webhook_urls=(), notify_account=False, doveadm_url="",
                                doveadm_command="", messages_per_hour=None, messages_per_day=None,
                                recipients_per_hour=None, recipients_per_day=None)
    return build_parts(quiet, cast(Store, store or MemoryStore()), geoip, Notifier(quiet)).service  # Store's interface


@dataclass
class ReplayResult:
    settings: Settings
    files: list
    store: MemoryStore  # what the replay wrote, instead of the database
    service: PolicyService  # the daemon's own, on that store
    lines: int = 0
    submissions: int = 0
    unparseable: int = 0
    first: Optional[dt.datetime] = None
    last: Optional[dt.datetime] = None
    most_countries: dict = field(default_factory=dict)  # login -> the most countries seen within the window
    accounts_by_list: dict = field(default_factory=dict)  # network list label -> logins seen from it
    accounts_by_network: dict = field(default_factory=dict)  # "AS3320 Deutsche Telekom AG" -> logins
    sent: dict = field(default_factory=dict)  # login -> [[when, recipients], ...] of its messages, in order
    waiting_for_recipients: dict = field(default_factory=dict)  # queue id -> its message's entry in `sent`

    def volume_peaks(self) -> dict:
        """login -> {limit name: the most its messages (or recipients) came to in any such window}."""
        return {login: {name: _peak(messages, column, seconds) for name, column, seconds in VOLUME_WINDOWS}
                for login, messages in self.sent.items()}

    def would_stop(self) -> list:
        """(login, limit name, limit, when) for the first message of each
        account that a [limits] limit as configured would have stopped."""
        stopped = []
        for login, messages in sorted(self.sent.items()):
            for name, _counted, hours, limit in self.settings.volume_limits:
                column = 0 if name.startswith("messages") else 1
                moment = _first_over(messages, column, hours * 3600, limit)
                if moment is not None:
                    stopped.append((login, name, limit, moment))
        return sorted(stopped, key=lambda item: item[3])

    def volume_json(self) -> dict:
        peaks = self.volume_peaks()
        return {
            "busiest": [dict(login=login, **peaks[login]) for login in _busiest(peaks)],
            f"percentile_{VOLUME_PERCENTILE:g}": {name: _percentile([peak[name] for peak in peaks.values()])
                                                  for name, _column, _seconds in VOLUME_WINDOWS},
            "would_stop": [{"login": login, "limit": name, "value": limit, "at": moment.isoformat()}
                           for login, name, limit, moment in self.would_stop()],
        }

    def blocks_by_rule(self) -> dict:
        """"countries", "travel", "only_from", "network list tor"... -> accounts it would have blocked."""
        counts: dict = {}
        for block in self.store.blocks.values():
            why = block.get("rule", "countries")
            if why == "network":
                why = f"network list {','.join(block.get('lists', ())) or '?'}"
            counts[why] = counts.get(why, 0) + 1
        return counts

    def top_networks(self, how_many: int = 10) -> list:
        """(network, accounts) of the networks the most accounts came from."""
        ranked = sorted(self.accounts_by_network.items(), key=lambda item: (-len(item[1]), item[0]))
        return [(network, len(logins)) for network, logins in ranked[:how_many]]

    def country_buckets(self) -> dict:
        buckets = {"1": 0, "2": 0, "3": 0, "4": 0, "5+": 0}
        for most in self.most_countries.values():
            buckets[str(most) if most < 5 else "5+"] += 1
        return buckets

    def as_json(self) -> dict:
        return {
            "files": self.files, "lines": self.lines, "submissions": self.submissions,
            "unparseable_lines": self.unparseable,
            "first": self.first.isoformat() if self.first else None,
            "last": self.last.isoformat() if self.last else None,
            "threshold": self.settings.how_many_different_countries,
            "window_days": self.settings.in_how_much_time_in_days,
            "would_block": [
                {"login": block["login"], "blocked_at": block["blocked_at"].isoformat(),
                 "countries": block["countries"], "log_line": block["log_line"], "rule": block.get("rule"),
                 "lists": list(block.get("lists", ())), "network": block.get("network") or None}
                for block in self.store.blocks.values()
            ],
            "would_block_by_rule": self.blocks_by_rule(),
            "accounts_by_most_countries": self.country_buckets(),
            "accounts_by_network_list": {label: len(logins) for label, logins in self.accounts_by_list.items()},
            "accounts_by_network": [{"network": network, "accounts": count} for network, count in self.top_networks()],
            "volume": self.volume_json(),
        }


def _open_log(path: str):
    if path == "-":
        return open(sys.stdin.fileno(), encoding="utf-8", errors="replace", closefd=False)
    if path.endswith(".gz"):
        import gzip

        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def replay_logs(paths: list, settings: Settings, geoip: GeoIP, today: Optional[dt.datetime] = None) -> ReplayResult:
    """Run every authenticated submission in `paths` (oldest first) through the
    daemon's decision, with the log's own time stamps as "now"."""
    store = MemoryStore()
    result = ReplayResult(settings, list(paths), store, replay_service(settings, geoip, store))
    decide_request, most_countries = result.service.decide_request, result.most_countries
    clock = LogClock(today or utcnow())
    for path in paths:
        try:
            log_file = _open_log(path)
        except OSError as error:
            raise AdminError(f"cannot read {path}: {error.strerror}") from None
        with log_file:
            for line in log_file:
                result.lines += 1
                if "nrcpt=" in line:
                    _note_recipients(result, line)
                    continue
                if "sasl_username=" in line:
                    found = _SUBMISSION_LINE.match(line)
                elif settings.count_logins and "-login: " in line and " user=<" in line:
                    found = _DOVECOT_LOGIN_LINE.match(line)
                else:
                    continue
                try:
                    when = clock.parse(found["classic"], found["iso"]) if found else None
                except (ValueError, KeyError, OverflowError):
                    when = None
                if found is None or when is None or not found["login"]:
                    result.unparseable += 1
                    continue
                result.submissions += 1
                result.first = result.first or when
                result.last = when
                request, decision = decide_request(_replayed_request(found, line), when)
                if request.request != DOVECOT_LOGIN and not decision.blocks:
                    _note_message(result, request.login, found["queue_id"], when)
                if decision.counted:
                    most_countries[request.login] = max(most_countries.get(request.login, 0),
                                                        len(decision.countries))
                if request.network is not None:
                    _note_network(result, request, decision)
    return result


def _note_message(result: ReplayResult, login: str, queue_id: str, when: dt.datetime) -> None:
    entry = [when, 1]  # one recipient until the queue manager's line says how many
    result.sent.setdefault(login, []).append(entry)
    result.waiting_for_recipients[queue_id] = entry


def _note_recipients(result: ReplayResult, line: str) -> None:
    found = _QUEUED_LINE.search(line)
    if found is not None:
        entry = result.waiting_for_recipients.pop(found["queue_id"], None)
        if entry is not None:
            entry[1] = max(1, int(found["nrcpt"]))


def _peak(messages: list, column: int, seconds: int) -> int:
    """The most messages (column 0) or recipients (1) in any `seconds` long window."""
    return max((total for _moment, total in _window_totals(messages, column, seconds)), default=0)


def _first_over(messages: list, column: int, seconds: int, limit: int) -> Optional[dt.datetime]:
    """When the account's count in the window first went over `limit`."""
    return next((moment for moment, total in _window_totals(messages, column, seconds) if total > limit), None)


def _window_totals(messages: list, column: int, seconds: int):
    """(moment, the count in the `seconds` up to it) at each of the account's
    messages: messages (column 0) or recipients (1)."""
    total = start = 0
    for moment, recipients in messages:
        total += 1 if column == 0 else recipients
        while (moment - messages[start][0]).total_seconds() >= seconds:
            total -= 1 if column == 0 else messages[start][1]
            start += 1
        yield moment, total


def _busiest(peaks: dict) -> list:
    return sorted(peaks, key=lambda login: (-peaks[login]["messages_per_hour"], -peaks[login]["recipients_per_hour"],
                                            login))[:BUSIEST_SHOWN]


def _percentile(values: list) -> int:
    """The value VOLUME_PERCENTILE % of the accounts stay at or under."""
    if not values:
        return 0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(len(ordered) * VOLUME_PERCENTILE / 100) - 1)]


def _note_network(result: ReplayResult, request: PolicyRequest, decision) -> None:
    network = request.network
    if network is None:
        return
    for label in network.labels:
        result.accounts_by_list.setdefault(label, set()).add(request.login)
    if network.asn is not None:
        result.accounts_by_network.setdefault(network.describe(), set()).add(request.login)
    block = result.store.blocks.get(request.login)
    if decision.new_block and block is not None:
        block.update(rule=decision.rule, lists=network.labels, network=network.describe())


def _replayed_request(found: re.Match, line: str) -> PolicyRequest:
    attributes = {"log_line": escape_controls(line.rstrip("\n"))}
    if "door" not in found.groupdict():
        return PolicyRequest(request="smtpd_access_policy", sasl_username=found["login"],
                             client_address=found["ip"], attributes=attributes)
    door = DOVECOT_DOORS.get(found["door"], found["door"])
    return PolicyRequest(request=DOVECOT_LOGIN, sasl_username=found["login"], client_address=found["ip"],
                         door=door, attributes=attributes)


def print_replay_report(result: ReplayResult, out) -> None:
    settings = result.settings
    span = f" from {when(result.first)} to {when(result.last)} UTC" if result.first else ""
    logins = " and Dovecot logins" if settings.count_logins else ""
    print(f"Replayed {len(result.files)} file(s): {result.lines} lines, {result.submissions} authenticated "
          f"submissions{logins}{span}; {result.unparseable} unparseable lines skipped.", file=out)
    print(f"Rule: more than {settings.how_many_different_countries} countries in "
          f"{settings.in_how_much_time_in_days:g} days -> {settings.action}.", file=out)
    blocks = list(result.store.blocks.values())
    by_rule = "; ".join(f"{count} for {_RULE_NAMES.get(rule, rule)}" for rule, count in result.blocks_by_rule().items())
    print(f"\nWould have blocked {len(blocks)} account{'s' if len(blocks) != 1 else ''}"
          f"{' (' + by_rule + ')' if by_rule else ''}:", file=out)
    for block in blocks:
        places = ", ".join(f"{settings.place_name(seen['country'])} {seen['last_ip']}" for seen in block["countries"])
        network = f"  network {block['network']}" if block.get("network") else ""
        print(f"  {block['login']}  at {when(block['blocked_at'])} UTC  from {places}{network}", file=out)
        print(f"    why: {block['reason']}", file=out)
        print(f"    {block['log_line']}", file=out)
    print(f"\nAccounts by the most countries seen within {settings.in_how_much_time_in_days:g} days:", file=out)
    for bucket, count in result.country_buckets().items():
        print(f"  {bucket:>2} {'country' if bucket == '1' else 'countries':<9} {count}", file=out)
    if settings.network_lists:
        print("\nAccounts seen from each network list (today's lists, not those of the log's days):", file=out)
        for network_list in settings.network_lists:
            count = len(result.accounts_by_list.get(network_list.label, ()))
            print(f"  {network_list.label:<16} {count:>6}  (action {network_list.action.lower()})", file=out)
    if result.accounts_by_network:
        print("\nNetworks the most accounts sent from:", file=out)
        for network, count in result.top_networks():
            print(f"  {count:>6}  {network}", file=out)
    print_volume_report(result, out)


def print_volume_report(result: ReplayResult, out) -> None:
    """The busiest accounts' peaks, the 99.9th percentile, and what the
    configured [limits] would have stopped: limits picked from the site's own traffic."""
    peaks = result.volume_peaks()
    if not peaks:
        return
    print("\nBusiest accounts (most messages / recipients in any hour; in any 24 hours; recipients from "
          "Postfix's nrcpt):", file=out)
    for login in _busiest(peaks):
        peak = peaks[login]
        print(f"  {login:<40} hour {peak['messages_per_hour']:>6} / {peak['recipients_per_hour']:<7} "
              f"day {peak['messages_per_day']:>7} / {peak['recipients_per_day']}", file=out)
    percentile = {name: _percentile([peak[name] for peak in peaks.values()]) for name, _c, _s in VOLUME_WINDOWS}
    print(f"  {VOLUME_PERCENTILE:g}th percentile of {len(peaks)} accounts: hour {percentile['messages_per_hour']} / "
          f"{percentile['recipients_per_hour']}, day {percentile['messages_per_day']} / "
          f"{percentile['recipients_per_day']}", file=out)
    limits = result.settings.volume_limits
    if not limits:
        print("  ([limits] are off: a limit above the percentile stops only the exceptional)", file=out)
        return
    stopped = result.would_stop()
    said = ", ".join(f"{name} = {limit}" for name, _counted, _hours, limit in limits)
    accounts = len({login for login, _name, _limit, _moment in stopped})
    print(f"\nWith [limits] {said}: {accounts} account{'s' if accounts != 1 else ''} would have been "
          f"stopped ({result.settings.limit_action.lower()}), each at the first message over a limit:", file=out)
    for login, name, limit, moment in stopped:
        print(f"  {login}  at {when(moment)} UTC  over {name} = {limit}", file=out)


_RULE_NAMES = {"countries": "too many countries", "travel": "impossible travel",
               "only_from": "a country outside --only-from"}


def run_replay(settings: Settings, arguments: argparse.Namespace) -> int:
    if arguments.threshold is not None:
        if not 1 <= arguments.threshold <= 300:
            print("pcc: --threshold must be between 1 and 300", file=sys.stderr)
            return 2
        settings = dataclasses.replace(settings, how_many_different_countries=arguments.threshold)
    if arguments.days is not None:
        if not 0 < arguments.days <= 3650:
            print("pcc: --days must be more than 0 and at most 3650", file=sys.stderr)
            return 2
        settings = dataclasses.replace(settings, in_how_much_time_in_days=arguments.days)
    try:
        result = replay_logs(arguments.replay, settings, GeoIP(settings.geoip_database))
    except AdminError as error:
        print(f"pcc: {error}", file=sys.stderr)
        return 1
    if arguments.record:
        return record_replayed_sightings(settings, result)
    if arguments.json:
        print(json.dumps(result.as_json(), indent=2))
    else:
        print_replay_report(result, sys.stdout)
    return 0


def record_replayed_sightings(settings: Settings, result: ReplayResult) -> int:
    sightings = ((login, seen) for login, countries in result.store.sightings.items()
                 for seen in countries.values())
    written = []

    def record(store: AdminStore) -> None:
        store.create_tables()
        written.append(store.merge_sightings(sightings))

    if on_admin_store(settings, record):
        return 1
    print(f"recorded {written[0]} sightings of {len(result.store.sightings)} accounts from "
          f"{result.submissions} submissions into {safe_url(settings.dbcon)} "
          f"({result.unparseable} unparseable lines skipped)")
    return 0
