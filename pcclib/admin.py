"""The administrator's commands (-l, -s, -b, -u, -r, -e, -c, --allow,
--only-from, --rule, --rules): what
each does to the database and the Postfix hold queue, and what it prints.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import json
import os
import re
import socket
import stat
import sys
from typing import Callable, Optional

from sqlalchemy import exc as sa_exc

from .common import first_line, normalise_login, split_list, symlink_refusal, when
from .config import COUNTRY_CODES, MONITOR_ACTION, ConfigError, Settings
from .decision import AccountHistory, countries_in_window, exempt_login_reason, volume_words
from .logs import audit, mask_secrets, secrets_of, who_ran_it
from .mailqueue import PostfixQueue, QueueError
from .notify import Notifier
from .protocol import MAX_LOGIN_LENGTH
from .respond import Responder
from .rules import RULE_KEYS, RULE_NAMES, Rule, RuleBook, field_name, read_rule, rule_key, scope_of, shown_value
from .networks import Networks
from .storage import AdminStore, Block, DatabaseClock, RuleRow, TravelPass, VolumeCount, safe_url, sqlite_path
from .volume import DAY_BUCKETS, bucket_of, window_sums

# A travel pass is for a trip, not a standing exception (that is ignorecountries).
MAX_TRAVEL_PASS_DAYS = 366


class AdminError(Exception):
    """An admin command cannot do what was asked; the message says why."""


class Admin:
    """The administrator's commands.  Each prints what it did; those that change
    state notify the `notice` addresses.  All are safe to run while the daemon
    serves, and safe to repeat."""

    def __init__(self, settings: Settings, store: AdminStore, notifier: Notifier, postfix: PostfixQueue,
                 out=None):
        self.settings = settings
        self.store = store
        self.notifier = notifier
        self.responder = Responder(settings, notifier, network_of=self.network_of)
        self.postfix = postfix
        self.out = out or sys.stdout
        self.force = False  # --force: a bare login on a site of user@domain logins is meant
        self.said: list = []  # what the command printed: its result, for the audit line

    @functools.cached_property
    def networks(self) -> Networks:
        """Read only by the commands that name networks (-s, -b's mail): a list
        of a million ranges takes seconds to read, -l or -u need none of it."""
        return Networks(self.settings)

    def network_of(self, ip: str) -> str:
        """"AS3320 Deutsche Telekom AG, list vpn" for an address; "" when nothing is known."""
        facts = self.networks.facts_of(ip)
        text = facts.describe()
        if facts.labels:
            text = f"{text}, list {','.join(facts.labels)}".strip(", ")
        return text

    def say(self, text: str = "") -> None:
        self.said.append(text)
        print(text, file=self.out)

    def list_blocked(self, as_json: bool) -> None:
        rows = self.store.blocked_accounts()
        if as_json:
            self.say(json.dumps([dict(_block_json(block), state=_block_state(block))
                                 for _login, _since, block in rows], indent=2))
            return
        if not rows:
            self.say("No account is blocked.")
            return
        self.say(f"{'LOGIN':<32} {'STATE':<16} {'SINCE (UTC)':<20} {'ACTION':<7} {'BY':<15} "
                 f"{'COUNTRY':<8}{'LAST IP':<40} LAST SEEN (UTC)")
        for login, since, block in rows:
            first = f"{login:<32} {_block_state(block):<16} {when(since):<20} {block.action:<7} {block.source:<15} "
            countries = block.countries or [{"country": "-", "last_ip": "-", "last_seen": None}]
            for index, seen in enumerate(countries):
                lead = first if index == 0 else " " * len(first)
                last_seen = seen["last_seen"][:19].replace("T", " ") if seen.get("last_seen") else "-"
                self.say(f"{lead}{seen['country']:<8}{seen['last_ip']:<40} {last_seen}")
        flagged = sum(1 for _login, _since, block in rows if block.action == MONITOR_ACTION)
        blocked = len(rows) - flagged
        summary = f"{blocked} blocked account{'s' if blocked != 1 else ''}"
        if flagged:
            summary += f", {flagged} would be blocked (flagged in monitor mode, mail flows)"
        self.say(summary)

    def show(self, login: str, as_json: bool, now: dt.datetime) -> None:
        account, sightings, blocks, passes = self._known_account(login)
        in_force = next((block for block in blocks if account and block.id == account.block_id), None)
        history = AccountHistory(account.blocked_since if account else None,
                                 account.counting_since if account else None, tuple(sightings),
                                 in_force.action if in_force else None,
                                 travel_passes={p.country: p.expires_at for p in passes})
        restriction = self.store.allowed_countries(login)
        only_from = restriction.countries.split(",") if restriction else []
        counted = countries_in_window(history, self.settings, now)
        limit = self.settings.how_many_different_countries
        blocked_since = history.blocked_since
        state = "not blocked"
        if history.enforced_block:
            state = f"blocked since {when(blocked_since)} UTC"
        elif blocked_since:
            state = f"would be blocked since {when(blocked_since)} UTC (flagged in monitor mode; mail flows)"
        if as_json:
            self.say(json.dumps({
                "login": login, "blocked": blocked_since is not None, "state": state,
                "blocked_since": blocked_since.isoformat() if blocked_since else None,
                "counting_since": history.counting_since.isoformat() if history.counting_since else None,
                "countries_in_window": [dict(seen.as_json(), place=self.settings.place_name(seen.country),
                                             network=self.network_of(seen.last_ip) or None)
                                        for seen in counted.values()],
                "only_from": only_from,
                "threshold": limit, "window_days": self.settings.in_how_much_time_in_days,
                "travel_passes": [_pass_json(travel_pass, now) for travel_pass in passes],
                "blocks": [_block_json(block) for block in blocks],
                "last_admin_action": _admin_action_json(self.store.last_admin_action(login)),
                "rules": [{"key": name, "value": value, "from": where}
                          for name, value, where in self.effective_rules(login)],
                "volume": self.volume_words(login, now) or None,
            }, indent=2))
            return
        self.say(f"{login}: {state}")
        self.say(f"countries in the last {self.settings.in_how_much_time_in_days:g} days: {len(counted)} "
                 f"(blocked at more than {limit}"
                 + (f"; {limit - len(counted) + 1} more would block)" if not blocked_since else ")"))
        for seen in sorted(counted.values(), key=lambda s: s.first_seen):
            network = self.network_of(seen.last_ip)
            self.say(f"  {self.settings.place_name(seen.country)}  last IP {seen.last_ip:<39}  first seen "
                     f"{when(seen.first_seen)}  last seen {when(seen.last_seen)}{'  ' + network if network else ''}")
        if restriction:
            self.say(f"may send only from: {', '.join(only_from)} (set {when(restriction.set_at)} UTC by "
                     f"{restriction.set_by}; any other country blocks it at once)")
        for travel_pass in passes:
            status = "active" if travel_pass.expires_at > now else "expired"
            self.say(f"travel pass {travel_pass.country}: {status} until {when(travel_pass.expires_at)} UTC "
                     f"(granted {when(travel_pass.granted_at)} by {travel_pass.granted_by})")
        for block in blocks:
            ended = f", ended {when(block.unblocked_at)}" if block.unblocked_at else " (in force)"
            self.say(f"block #{block.id}: {when(block.blocked_at)} by {block.source}, {block.action}{ended}: "
                     f"{block.reason}")
        volume = self.volume_words(login, now)
        if volume:
            self.say(f"volume (every daemon, as last written): {volume}")
        rules = self.effective_rules(login)
        if any(where != "pcc.conf" for _name, _value, where in rules):
            self.say("rules in force: " + "; ".join(f"{name} = {value} ({where})" for name, value, where in rules))
        action = self.store.last_admin_action(login)
        if action is not None:
            self.say(f"last admin action: {action.action}, {when(action.done_at)} UTC by {action.done_by}: "
                     f"{action.result}")

    def allow(self, login: str, countries: list, days: float, now: dt.datetime) -> None:
        """A travel pass: `countries` do not count for `login` for `days` days
        (0 ends its passes for those countries now)."""
        if not 0 <= days <= MAX_TRAVEL_PASS_DAYS:
            raise AdminError(f"--days {days:g}: a travel pass lasts 0 to {MAX_TRAVEL_PASS_DAYS} days "
                             "(for countries that never count, use [policy] ignorecountries)")
        _check_login(login)  # an account never seen may get a pass
        expires_at = now + dt.timedelta(days=days)
        self.store.grant_travel_pass(login, countries, now, expires_at, _who())
        listed = ", ".join(countries)
        if days == 0:
            report = f"travel pass of {login} for {listed} ended"
        else:
            report = (f"travel pass for {login}: {listed} do{'es' if len(countries) == 1 else ''} not count "
                      f"until {when(expires_at)} UTC")
        self.say(report)
        body = f"{report}.\nGranted by {_who()} on {socket.gethostname()} at {when(now)} UTC.\n"
        self._notify(f"pcc: travel pass for {login} ({listed})", body)

    def only_from(self, login: str, countries: Optional[str], now: dt.datetime) -> None:
        """--only-from: show (countries None), set, or clear ("") the countries
        `login` may send from."""
        _check_login(login)
        if countries is None:
            restriction = self.store.allowed_countries(login)
            self.say(f"{login} may send only from {restriction.countries.replace(',', ', ')} (set "
                     f"{when(restriction.set_at)} UTC by {restriction.set_by})" if restriction
                     else f"{login} may send from any country (no --only-from)")
            return
        codes = allowed_countries(countries) if countries.strip() else []
        self.store.set_allowed_countries(login, codes, now, _who())
        report = (f"{login} may now send only from {', '.join(codes)}; any other country blocks it at once"
                  if codes else f"{login} may send from any country again")
        self.say(report)
        self._notify(f"pcc: countries of {login}: {', '.join(codes) or 'any'}",
                     f"{report}.\nSet by {_who()} on {socket.gethostname()} at {when(now)} UTC.\n")

    def rule(self, scope: str, assignments: list, clear: bool, now: dt.datetime) -> None:
        """--rule: show (no assignment), set (KEY=VALUE...) or clear the rules of a domain or a login."""
        _check_scope(scope, self.settings)
        if clear:
            names = self.store.rules_of(scope)
            if not names:
                self.say(f"{scope} has no rules")
                return
            self.store.set_rules(scope, dict.fromkeys(names), now, _who())
            self.say(f"{scope}: rules cleared ({', '.join(sorted(names))}); pcc.conf's settings apply")
            return
        if not assignments:
            self._show_rules(scope)
            return
        values = {}
        for assignment in assignments:
            name, equals, text = assignment.partition("=")
            if not equals:
                raise AdminError(f"--rule {scope}: {assignment!r} is not KEY=VALUE (e.g. messages_per_hour=300)")
            name = name.strip().lower()
            try:
                read_rule(name, text)
            except ConfigError as error:
                raise AdminError(str(error)) from None
            if RULE_KEYS[name].field == "notice" and text.strip() and not self.settings.mailsrv:
                raise AdminError("--rule: notice needs [mail] mailsrv in pcc.conf (without it no mail is sent)")
            values[name] = text.strip()
        self.store.set_rules(scope, values, now, _who())
        said = ", ".join(f"{name} = {text or '(blank)'}" for name, text in values.items())
        self.say(f"{scope}: {said} (every daemon applies it from its next request, within a second)")

    def _show_rules(self, scope: str) -> None:
        rules = self.rule_book.of_scope(scope)
        if not rules:
            self.say(f"{scope} has no rules: pcc.conf's settings apply")
            return
        for rule in rules:
            self.say(f"{scope}: {rule.name} = {rule.text or '(blank)'} (set {when(rule.set_at)} UTC by {rule.set_by})")

    def list_rules(self, as_json: bool) -> None:
        rules = self.rule_book.rules
        if as_json:
            self.say(json.dumps([{"scope": rule.scope, "key": rule.name, "value": rule.text,
                                  "set_at": rule.set_at.isoformat(), "set_by": rule.set_by} for rule in rules],
                                indent=2))
            return
        if not rules:
            self.say("No rules: pcc.conf's settings apply to every account.")
            return
        self.say(f"{'SCOPE':<32} {'KEY':<30} {'VALUE':<24} SET (UTC) BY")
        for rule in rules:
            self.say(f"{rule.scope:<32} {rule.name:<30} {rule.text or '(blank)':<24} {when(rule.set_at)} "
                     f"{rule.set_by}")

    @functools.cached_property
    def rule_book(self) -> RuleBook:
        """The rules in the database (none before the first daemon of 1.6 made their table)."""
        if not self.store.has_table_of(RuleRow):
            return RuleBook()
        return RuleBook(Rule(*row) for row in self.store.load_rules())

    def volume_words(self, login: str, now: dt.datetime) -> str:
        """"12 messages in the last hour (limit 300); ..." for the limits in force, "" with none."""
        limits = self.rule_book.settings_for(login, self.settings).volume_limits
        if not limits or not self.store.has_table_of(VolumeCount):
            return ""
        current = bucket_of(now)
        counts = [(bucket, int(messages or 0), int(recipients or 0))
                  for bucket, messages, recipients in self.store.volume_of(login, current - DAY_BUCKETS + 1)]
        volume = window_sums(counts, current)
        return "; ".join(f"{volume_words(name, volume.count(name))} (limit {limit})"
                         for name, _counted, _hours, limit in limits)

    def effective_rules(self, login: str) -> list:
        """-s: (key, value, where from) of every key a rule may set, as in force for `login`."""
        book = self.rule_book
        settings = book.settings_for(login, self.settings)
        sources = book.where_from(login)
        shown = []
        for name in RULE_NAMES:
            field = rule_key(name).field
            if field == "notice":
                value = ", ".join(self.settings.notice + book.notice_for(login)) or "nobody"
            else:
                value = shown_value(getattr(settings, field))
            where = sources.get(field)
            shown.append((field_name(field), value, f"rule of {where}" if where else "pcc.conf"))
        return shown

    def block(self, login: str, now: dt.datetime) -> None:
        exempt = exempt_login_reason(login, self.settings)
        if exempt is not None:
            raise AdminError(f"{login} is not blocked: pcc never blocks it ({exempt}); change that first")
        _account, sightings, _blocks = self._account(login)
        recent = countries_in_window(AccountHistory(sightings=tuple(sightings)), self.settings, now)
        reason = "blocked by an administrator"
        block_id = self.store.record_block(login, now, source="admin", action=self.settings.action,
                                           reason=reason, countries=[s.as_json() for s in recent.values()],
                                           replace_flag=True)
        if block_id is None:
            self.say(f"{login} is already blocked; nothing changed")
            return
        self.say(f"{login} blocked: its messages now get {self.settings.action}")
        if not self.responder.blocked_now(login, recent.values(), reason, f"admin ({_who()})", self.settings.action):
            self.say(f"warning: the notification to {', '.join(self.settings.notice)} was not sent")

    def unblock(self, login: str, held: Optional[str], now: dt.datetime) -> None:
        """held: None (leave held mail alone), "release" or "delete"."""
        _account, _sightings, blocks, _passes = self._known_account(login)
        block_id = self.store.unblock(login, now)
        if block_id is None:
            report = [self._say_line(f"{login} is not blocked; nothing to unblock")]
        else:
            report = [self._say_line(f"{login} unblocked (block #{block_id}); "
                                     "its earlier countries no longer count")]
        if blocks and held:
            report.append(self._say_line(self._handle_held_mail(login, blocks[-1].blocked_at, held)))
        if block_id is not None:
            body = (f"pcc account {login} was unblocked by {_who()} on {socket.gethostname()} "
                    f"at {when(now)} UTC.\n\n" + "\n".join(report) + "\n")
            self._notify(f"pcc: account {login} unblocked", body)
            self.responder.unblocked(login, _who(), now)

    def _say_line(self, line: str) -> str:
        self.say(line)
        return line

    def _handle_held_mail(self, login: str, blocked_at: dt.datetime, held: str) -> str:
        # Messages queued in the window before the block were held by it too.
        queue_ids = self.postfix.held_by(login, blocked_at - self.settings.country_window)
        plural = "s" if len(queue_ids) != 1 else ""
        if held == "release":
            count = self.postfix.release(queue_ids)
            return f"released {count} held message{plural} of {login} from the hold queue"
        count = self.postfix.delete(queue_ids)
        return f"deleted {count} held message{plural} of {login} from the hold queue"

    def cleanup(self, days: float, now: dt.datetime) -> None:
        if days < self.settings.in_how_much_time_in_days:
            raise AdminError(f"-c {days:g}: refusing to delete sightings younger than the window "
                             f"({self.settings.in_how_much_time_in_days:g} days); they still count")
        deleted = self.store.delete_sightings_before(now - dt.timedelta(days=days))
        self.say(f"deleted {deleted} sighting{'s' if deleted != 1 else ''} older than {days:g} days")

    def _account(self, login: str):
        _check_login(login)
        return self.store.account(login)

    def check_domain(self, login: str) -> None:
        """A login without a domain, on a site whose logins have one, is most
        likely a slip (`-b root`): refused, unless --force."""
        if "@" in login or self.force:
            return
        if self.settings.domains:
            example = f"{login}@{sorted(self.settings.domains)[0]}"
        else:
            known = self.store.a_login_with_a_domain()
            if known is None:
                return  # a site of bare names, or nothing recorded yet
            example = f"{login}@{known.rpartition('@')[2]}"
        raise AdminError(f"{login} has no domain, but this site's logins have one: write it whole (e.g. {example}), "
                         "or add --force to mean the bare name")

    def _known_account(self, login: str):
        """(its blocked-list row, sightings, blocks, travel passes) of an account
        pcc knows anything about."""
        account, sightings, blocks = self._account(login)
        passes = self.store.travel_passes(login)
        if account is None and not sightings and not blocks and not passes and not self.store.allowed_countries(login):
            raise AdminError(f"unknown login {login}: pcc has never counted nor blocked it")
        return account, sightings, blocks, passes

    def _notify(self, subject: str, body: str) -> None:
        if self.settings.notice and not self.notifier.send_now(subject, body):
            self.say(f"warning: the notification to {', '.join(self.settings.notice)} was not sent")


def _block_json(block: Block) -> dict:
    return {
        "id": block.id, "login": block.login, "blocked_at": block.blocked_at.isoformat(),
        "source": block.source, "action": block.action, "reason": block.reason,
        "countries": block.countries, "trigger": block.trigger,
        "unblocked_at": block.unblocked_at.isoformat() if block.unblocked_at else None,
    }


def _check_scope(scope: str, settings: Settings) -> None:
    """A rule's scope: a domain (example.org) or a login (ceo@example.org)."""
    domain = scope.rpartition("@")[2]
    if not scope or len(scope) > MAX_LOGIN_LENGTH or not re.fullmatch(r"[a-z0-9.-]+", domain) \
            or any(ord(c) < 33 for c in scope):
        raise AdminError(f"--rule: {scope!r} is neither a domain (example.org) nor a login (ceo@example.org)")
    if settings.domains and domain not in settings.domains:
        raise AdminError(f"--rule: {domain} is not in [mail] domains: pcc never counts its logins")


def _check_login(login: str) -> None:
    if not login or len(login) > MAX_LOGIN_LENGTH or any(ord(c) < 33 for c in login):
        raise AdminError(f"{login!r} is not a login")


def _block_state(block: Block) -> str:
    return "would be blocked" if block.action == MONITOR_ACTION else "blocked"


def _pass_json(travel_pass: TravelPass, now: dt.datetime) -> dict:
    return {"country": travel_pass.country, "granted_at": travel_pass.granted_at.isoformat(),
            "expires_at": travel_pass.expires_at.isoformat(), "granted_by": travel_pass.granted_by,
            "active": travel_pass.expires_at > now}


def _who() -> str:
    return who_ran_it()


def country_codes(text: str) -> tuple:
    """(the ISO codes of "fr, DE", sorted and once each; those that are no country code)."""
    codes = sorted({code.upper() for code in split_list(text)})
    return codes, [code for code in codes if code not in COUNTRY_CODES]


def trip_countries(text: str) -> list:
    codes, unknown = country_codes(text)
    if not codes or unknown:
        raise AdminError(f"--country {text!r}: give ISO 3166 two-letter country codes, e.g. FR,DE"
                         + (f" ({', '.join(unknown)} is not one)" if unknown else ""))
    return codes


def allowed_countries(text: str) -> list:
    codes, unknown = country_codes(text)
    if unknown:
        raise AdminError(f"--only-from: {', '.join(unknown)} is not an ISO 3166 two-letter country code "
                         f"(give them as ES,PT; '' clears)")
    return codes


def missing_sqlite_file(settings: Settings) -> Optional[str]:
    """The path of the configured SQLite file if it does not exist yet."""
    path = sqlite_path(settings.dbcon)
    return path if path and not os.path.lexists(path) else None


def start_the_daemon_first(path: str) -> str:
    return (f"neither {path} nor its directory exist yet: start the daemon first (it creates them as its "
            f"own user), then run this again")


@contextlib.contextmanager
def admin_store(settings: Settings):
    """The Store a command run by an administrator writes through.  It never
    creates the SQLite file's directory (root's directory would stop the
    daemon); a file it creates as root is the directory owner's from the
    start, and it refuses a symbolic link where a file of pcc's should be."""
    path = sqlite_path(settings.dbcon)
    if path:
        for name in (path, path + "-wal", path + "-shm"):
            refusal = symlink_refusal(name, "the SQLite database")
            if refusal:
                raise AdminError(refusal)
    missing = missing_sqlite_file(settings)
    if missing and not os.path.isdir(os.path.dirname(os.path.abspath(missing))):
        raise AdminError(start_the_daemon_first(missing))
    if missing:
        create_as_directory_owner(missing)
    store = AdminStore(settings.dbcon, create_directory=False)
    try:
        yield store
    finally:
        store.dispose()
        if path:
            hand_over_to_directory_owner(path)


def _nothing_recorded_yet(arguments: argparse.Namespace) -> int:
    """-l, -s or --only-from LOGIN before the daemon ever ran: answered without creating anything."""
    if arguments.list:
        print("[]" if arguments.json else "No account is blocked.")
        return 0
    if arguments.only_from:
        print(f"{normalise_login(arguments.only_from[0])} may send from any country (no --only-from)")
        return 0
    print(f"pcc: unknown login {normalise_login(arguments.show)}: pcc has never counted nor blocked it",
          file=sys.stderr)
    return 1


def on_admin_store(settings: Settings, work: Callable[[AdminStore], Optional[int]]) -> int:
    """work(store)'s exit status (None: 0), or 1 with one line on standard
    error when it fails (an AdminError, or the database's error)."""
    try:
        with admin_store(settings) as store:
            return work(store) or 0
    except (AdminError, QueueError) as error:
        print(f"pcc: {error}", file=sys.stderr)
    except sa_exc.SQLAlchemyError as error:
        print(database_failure(settings, error), file=sys.stderr)
    return 1


def run_admin_command(settings: Settings, arguments: argparse.Namespace) -> int:
    """The admin commands.  -l and -s only read, and answer without creating anything."""
    reading = bool(arguments.list or arguments.show or (arguments.only_from and len(arguments.only_from) == 1))
    if reading and missing_sqlite_file(settings):
        return _nothing_recorded_yet(arguments)

    def run(store: AdminStore) -> Optional[int]:
        if reading and not store.has_tables():
            return _nothing_recorded_yet(arguments)
        if not reading:
            store.create_tables()
        admin = Admin(settings, store, Notifier(settings), PostfixQueue(settings.postfix_config_directory))
        admin.force = arguments.force
        _run_one(admin, arguments, DatabaseClock().follow(store))  # the database's time, not this host's
        return 0

    return on_admin_store(settings, run)


def changed_by_command(arguments: argparse.Namespace) -> Optional[tuple]:
    """(what the command does, to whom) for the commands that change
    something, None for those that only read."""
    if arguments.only_from and len(arguments.only_from) > 1:
        return "only-from " + (arguments.only_from[1] or "''"), arguments.only_from[0]
    if arguments.rule and (len(arguments.rule) > 1 or arguments.clear):
        return ("rules cleared" if arguments.clear else "rule " + " ".join(arguments.rule[1:])), arguments.rule[0]
    for option, what in (("block", "block"), ("unblock", "unblock"), ("release", "unblock and release"),
                         ("erase", "unblock and erase"), ("allow", "travel pass")):
        if getattr(arguments, option):
            return what, getattr(arguments, option)
    if arguments.cleanup is not None:
        return f"cleanup of sightings older than {arguments.cleanup:g} days", None
    return None


def _admin_action_json(action) -> Optional[dict]:
    if action is None:
        return None
    return {"action": action.action, "at": action.done_at.isoformat(), "by": action.done_by, "result": action.result}


def _run_one(admin: Admin, arguments: argparse.Namespace, now: dt.datetime) -> None:
    """The command; one syslog line for each that changes something (what,
    to which account, who ran it, the result), refused or done; what was done
    to an account is also kept for its -s."""
    changing = changed_by_command(arguments)
    if changing is None:
        _run_command(admin, arguments, now)
        return
    what, target = changing
    detail = f" ({arguments.country}, {arguments.days:g} days)" if what == "travel pass" else ""
    login = normalise_login(target) if target is not None else None
    subject = f"{what} of {login}{detail}" if login is not None else what
    try:
        if login is not None and not arguments.rule:  # a rule's scope may be a domain
            admin.check_domain(login)
        _run_command(admin, arguments, now)
    except AdminError as error:
        audit(f"admin: {subject} by {who_ran_it()}: refused: {error}")
        raise
    result = "; ".join(line for line in admin.said if line) or "done"
    audit(f"admin: {subject} by {who_ran_it()}: {result}")
    if login is not None:
        admin.store.record_admin_action(login, now, what + detail, who_ran_it(), result)


def _run_command(admin: Admin, arguments: argparse.Namespace, now: dt.datetime) -> None:
    login = normalise_login
    if arguments.list:
        admin.list_blocked(arguments.json)
    elif arguments.show:
        admin.show(login(arguments.show), arguments.json, now)
    elif arguments.block:
        admin.block(login(arguments.block), now)
    elif arguments.unblock:
        admin.unblock(login(arguments.unblock), None, now)
    elif arguments.release:
        admin.unblock(login(arguments.release), "release", now)
    elif arguments.erase:
        admin.unblock(login(arguments.erase), "delete", now)
    elif arguments.cleanup is not None:
        admin.cleanup(arguments.cleanup, now)
    elif arguments.only_from:
        admin.only_from(login(arguments.only_from[0]), (arguments.only_from + [None])[1], now)
    elif arguments.allow:
        admin.allow(login(arguments.allow), trip_countries(arguments.country), arguments.days, now)
    elif arguments.rule:
        admin.rule(scope_of(arguments.rule[0]), arguments.rule[1:], arguments.clear, now)
    elif arguments.rules:
        admin.list_rules(arguments.json)


def create_as_directory_owner(path: str) -> None:
    """Create the missing SQLite file for SQLite to open: a new file (never
    one a link points at: O_EXCL and O_NOFOLLOW), given, through its
    descriptor, to whoever owns the directory (the daemon's user,
    /var/lib/pcc) when pcc runs as root: root's file would stop the daemon."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640)
    try:
        if os.geteuid() == 0:
            directory = os.stat(os.path.dirname(os.path.abspath(path)))
            os.fchown(descriptor, directory.st_uid, directory.st_gid)
    finally:
        os.close(descriptor)


def hand_over_to_directory_owner(path: str) -> None:
    """SQLite's -wal and -shm files that a command run as root created go to
    the directory's owner too (SQLite gives them the main file's owner when it
    can; this makes sure).  Each is changed through a descriptor opened without
    following links."""
    if os.geteuid() != 0:
        return
    directory = os.stat(os.path.dirname(os.path.abspath(path)))
    for name in (path, path + "-wal", path + "-shm"):
        try:
            descriptor = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue  # not there (SQLite removes -wal and -shm at close), or a link: left alone
        try:
            status = os.fstat(descriptor)
            if stat.S_ISREG(status.st_mode) and status.st_uid == 0:
                os.fchown(descriptor, directory.st_uid, directory.st_gid)
        finally:
            os.close(descriptor)


def database_failure(settings: Settings, error: Exception) -> str:
    """One line for a command whose database failed, without its password."""
    return f"pcc: database {safe_url(settings.dbcon)} failed: " + mask_secrets(first_line(error),
                                                                             secrets_of(settings))
