"""Rules per domain and per account (pcc --rule): some of pcc.conf's keys set
for one domain (example.org) or one login (ceo@example.org), kept in the
database (pcc_rules) and read by every daemon at start and whenever the
change log says they changed.  The Settings in force for an account are
pcc.conf's, its domain's rules over them, its own over those.  Each value is
read by the very Key that reads pcc.conf, so a rule is refused for what the
file would be refused for.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import threading
from dataclasses import dataclass
from typing import Iterable

from .common import log
from .config import KEYS, ConfigError, Key, Settings, read_single_value

# The keys a rule may set, by the name a rule gives them -> (section, key) of
# pcc.conf.  [policy] action is "action", [limits] action "limits.action".
RULE_NAMES = {
    "how_many_different_countries": ("policy", "how_many_different_countries"),
    "in_how_much_time_in_days": ("policy", "in_how_much_time_in_days"),
    "action": ("policy", "action"),
    "mode": ("policy", "mode"),
    "ignorecountries": ("policy", "ignorecountries"),
    "notice": ("mail", "notice"),
    "messages_per_hour": ("limits", "messages_per_hour"),
    "messages_per_day": ("limits", "messages_per_day"),
    "recipients_per_hour": ("limits", "recipients_per_hour"),
    "recipients_per_day": ("limits", "recipients_per_day"),
    "limits.action": ("limits", "action"),
}
LIMIT_FIELDS = frozenset(("messages_per_hour", "messages_per_day", "recipients_per_hour", "recipients_per_day"))
RULE_KEYS = {name: next(key for key in KEYS if (key.section, key.name) == place) for name, place in RULE_NAMES.items()}


@dataclass(frozen=True)
class Rule:
    """One key set for one scope."""

    scope: str  # a domain, or a login
    name: str  # one of RULE_NAMES
    text: str  # as the administrator wrote it
    set_at: dt.datetime
    set_by: str


def rule_key(name: str) -> Key:
    """The Key a rule's name sets, or ConfigError naming those there are."""
    key = RULE_KEYS.get(name.strip().lower())
    if key is None:
        raise ConfigError(f"--rule: {name!r} is not a key a rule may set; those are: {', '.join(RULE_NAMES)}")
    return key


def read_rule(name: str, text: str) -> tuple:
    """(Settings field, value) of a rule, read as pcc.conf's key is read; a
    value pcc.conf would refuse raises ConfigError in one line."""
    key = rule_key(name)
    return key.field, read_single_value(key, text, "--rule")


def scope_of(text: str) -> str:
    """A rule's scope as stored: lower case, a domain or a login."""
    return text.strip().lower()


class RuleBook:
    """Every rule in force, and the Settings each account gets from them."""

    def __init__(self, rules: Iterable[Rule] = ()):
        self.rules = tuple(rules)
        self._values: dict = {}  # scope -> {field: value}
        for rule in self.rules:
            try:
                field, value = read_rule(rule.name, rule.text)
            except ConfigError as error:  # written by a newer pcc, or by hand: the rest stands
                log.warning("rule of %s ignored: %s", rule.scope, str(error).removeprefix("--rule: "))
                continue
            self._values.setdefault(rule.scope, {})[field] = value
        self._cache: dict = {}  # (login scope, domain scope) -> (the pcc.conf Settings, the effective ones)
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self._values)

    def limits_anywhere(self, settings: Settings) -> bool:
        """A limit is on, in pcc.conf or in some rule: the daemons count and share volume."""
        return bool(settings.volume_limits) or self.sets_limits

    @property
    def sets_limits(self) -> bool:
        """Some rule turns on a [limits] limit: the daemons count and share volume."""
        return any(value is not None and field in LIMIT_FIELDS for values in self._values.values()
                   for field, value in values.items())

    def settings_for(self, login: str, settings: Settings) -> Settings:
        """pcc.conf's settings with the rules of the login's domain and its own over them."""
        if not self._values:
            return settings
        domain = login.rpartition("@")[2] if "@" in login else ""
        own = login if login in self._values else None
        of_domain = domain if domain in self._values else None
        if own is None and of_domain is None:
            return settings
        cached = self._cache.get((own, of_domain))
        if cached is not None and cached[0] is settings:
            return cached[1]
        values = dict(self._values.get(of_domain, {})) if of_domain else {}
        values.update(self._values.get(own, {}) if own else {})
        values.pop("notice", None)  # told besides the site's admins (notice_for), not instead
        effective = dataclasses.replace(settings, **values)
        with self._lock:
            if len(self._cache) > 100_000:
                self._cache.clear()
            self._cache[own, of_domain] = (settings, effective)
        return effective

    def notice_for(self, login: str) -> tuple:
        """The addresses a rule adds for the blocks of `login` (its domain's
        own admins), besides pcc.conf's notice."""
        if not self._values:
            return ()
        domain = login.rpartition("@")[2] if "@" in login else ""
        addresses = self._values.get(domain, {}).get("notice", ()) + self._values.get(login, {}).get("notice", ())
        return tuple(dict.fromkeys(addresses))

    def where_from(self, login: str) -> dict:
        """Settings field -> the scope whose rule sets it for `login` (the
        login's own over its domain's); fields absent come from pcc.conf."""
        domain = login.rpartition("@")[2] if "@" in login else ""
        sources = {field: domain for field in self._values.get(domain, {})} if domain else {}
        sources.update({field: login for field in self._values.get(login, {})})
        return sources

    def of_scope(self, scope: str) -> list:
        return [rule for rule in self.rules if rule.scope == scope]


def shown_value(value) -> str:
    """A setting's value as pcc.conf would say it."""
    if value is None:
        return "off"
    if isinstance(value, (frozenset, tuple)):
        return ", ".join(sorted(str(item) for item in value)) or "none"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value).lower() if isinstance(value, str) and value.isupper() else str(value)


def field_name(field: str) -> str:
    """The rule name of a Settings field ("limit_action" -> "limits.action")."""
    return next(name for name, key in RULE_KEYS.items() if key.field == field)

