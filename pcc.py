#!/usr/bin/env python3
"""pcc - Postfix Country Control.

A Postfix policy service (``check_policy_service inet:127.0.0.1:9999``) that stops
mail from accounts whose password was stolen.  For every authenticated message it
looks up the country of the client IP.  A real person sends from two or three
countries in a few days; a spammer with a stolen password logs in through proxies
all over the world.  When one account (the SASL login, kept whole as user@domain)
has sent from more than ``how_many_different_countries`` countries within
``in_how_much_time_in_days`` days, pcc puts it on the blocked list, answers that
message and every later one with REJECT or HOLD until an administrator unblocks
it, and emails the administrators.

Two optional additions: an impossible-travel rule (two consecutive messages
from places farther apart than anybody can travel in the time between, from
City-level GeoIP data), and monitor mode, in which pcc records and notifies
what it would block but answers DUNNO.  Administrators can pre-approve a trip
with a travel pass.

How the pieces fit, in the order data flows (and the order of this file):

  configuration   /etc/pcc.conf -> Settings (every key required, validated once)
  policy protocol bytes from Postfix -> PolicyRequest; Decision -> "action=..."
  GeoIP lookup    client_address -> country, and a place with City-level data
                  (MaxMind .mmdb via maxminddb, or the GeoLite2-Country data
                  embedded in the geoip2fast package); a replaced file is reloaded
  storage         SQLAlchemy models: per-account per-country sightings (rows grow
                  with accounts x countries, never with messages), the accounts
                  that are blocked (or flagged, in monitor mode), the history of
                  every block, and travel passes
  the decision    decide(request, history, settings, now): a pure function
  notifications   one email per new block or impossible journey, sent by a
                  background thread with retries
  the server      socketserver.ThreadingTCPServer, one loop of requests per connection;
                  PolicyService decides in the connection's thread, one request per
                  account at a time, on the account's history in memory while a poll
                  of the database's changes (4 a second) keeps it current, else read
                  from the database; blocks are written before the answer, sightings
                  behind it in batches (SightingWriter); a Watchdog answers any
                  request still there after 0.8 s, with its decision when that is
                  made (the block synced to a spool file first), else from memory;
                  during an outage blocks go to the spool file; log lines go through
                  a queue to a thread of their own; optional Prometheus metrics
  admin commands  list, show, block, unblock (and release/delete held mail), cleanup,
                  travel passes, --replay of Postfix logs through the same
                  service and decision, --health (asks the daemon what it sees)
                  and --update-geoip

Only the decision knows the rules; everything around it does I/O.  The file is
long (about 4,550 lines) but each section stands alone; the admin command line
(with the replay, --health and --update-geoip, about 1,000 lines) has outgrown
it and is the first candidate for a module of its own.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import configparser
import contextlib
import dataclasses
import datetime as dt
import email.message
import email.utils
import functools
import hmac
import http
import http.server
import ipaddress
import json
import logging
import logging.handlers
import math
import os
import queue
import re
import shlex
import signal
import smtplib
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass, field
from typing import Iterable, Optional

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

__version__ = "1.3.0"

log = logging.getLogger("pcc")

DEFAULT_CONFIG_PATH = "/etc/pcc.conf"
UTC = dt.timezone.utc


def utcnow() -> dt.datetime:
    return dt.datetime.now(UTC)


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

BLOCK_ACTIONS = ("REJECT", "HOLD")
# What Postfix is told when the database cannot be asked.  DUNNO lets mail flow
# (an outage of pcc must not stop a whole organisation's mail); DEFER_IF_PERMIT
# makes Postfix answer 450 so clients retry later.
DB_ERROR_ACTIONS = ("DUNNO", "DEFER_IF_PERMIT")
# enforce: blocked accounts get `action`.  monitor: pcc records and notifies
# exactly as it would when enforcing, but answers DUNNO (to roll out and tune).
MODES = ("ENFORCE", "MONITOR")
# What an impossible journey does: BLOCK the account, or only NOTIFY the admins.
TRAVEL_ACTIONS = ("BLOCK", "NOTIFY")
# The action stored with a block that monitor mode decided: nothing was enforced.
MONITOR_ACTION = "MONITOR"

# ISO 3166-1 alpha-2, plus XK (Kosovo) and EU/AP, which MaxMind data uses too.
COUNTRY_CODES = frozenset(
    """AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL
    BM BN BO BQ BR BS BT BV BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW
    CX CY CZ DE DJ DK DM DO DZ EC EE EG EH ER ES ET FI FJ FK FM FO FR GA GB GD GE GF
    GG GH GI GL GM GN GP GQ GR GS GT GU GW GY HK HM HN HR HT HU ID IE IL IM IN IO IQ
    IR IS IT JE JM JO JP KE KG KH KI KM KN KP KR KW KY KZ LA LB LC LI LK LR LS LT LU
    LV LY MA MC MD ME MF MG MH MK ML MM MN MO MP MQ MR MS MT MU MV MW MX MY MZ NA NC
    NE NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL PM PN PR PS PT PW PY QA RE
    RO RS RU RW SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV SX SY SZ TC TD
    TF TG TH TJ TK TL TM TN TO TR TT TV TW TZ UA UG UM US UY UZ VA VC VE VG VI VN VU
    WF WS YE YT ZA ZM ZW XK EU AP""".split()
)


class ConfigError(Exception):
    """A configuration problem; the message names file, section and key."""


@dataclass(frozen=True)
class Settings:
    """Everything /etc/pcc.conf says, validated.  See pcc.conf for each key."""

    config_path: str
    # [server]
    host: str
    port: int
    max_request_bytes: int
    idle_timeout: float
    max_connections: int
    allowed_clients: tuple  # of ipaddress networks; empty = anyone who can connect
    metrics_port: Optional[int]  # Prometheus endpoint on host:metrics_port; None = off
    # [db]
    dbcon: str
    db_error_action: str
    spool_file: str  # blocks decided during a database outage wait here; "" = memory only
    # [geoip]
    geoip_database: str  # "" = the embedded default data
    geoip_update_url: str  # where --update-geoip downloads from; "" = DB-IP's free monthly file
    # [mail]
    domains: frozenset  # lower-case domains; empty = every account
    mailsrv: str
    mailport: int
    notice: tuple  # addresses to notify; empty = send nothing
    # [policy]
    action: str
    how_many_different_countries: int
    in_how_much_time_in_days: float
    ignorecountries: frozenset
    whitelisted: frozenset  # lower-case logins
    whitelistedips: tuple  # of ipaddress networks
    reason: str
    mode: str  # ENFORCE or MONITOR
    max_travel_speed_kmh: Optional[float]  # None = impossible-travel rule off
    travel_accuracy_radius_km: float  # journeys shorter than this are never judged
    impossible_travel_action: str  # BLOCK or NOTIFY
    # [postfix]
    postfix_config_directory: str
    # [dovecot]
    dovecot_policy_port: Optional[int] = None  # Dovecot's authentication policy (HTTP); None = off
    count_logins: bool = False  # a successful Dovecot login counts its country like a submission
    dovecot_api_header: str = ""  # "Name: value" Dovecot must send; "" = none

    @property
    def country_window(self) -> dt.timedelta:
        return dt.timedelta(days=self.in_how_much_time_in_days)

    @property
    def block_reply(self) -> str:
        """What Postfix is told for a blocked account: "<action> <reason>"."""
        return f"{self.action} {self.reason}".strip()

    @property
    def monitoring(self) -> bool:
        return self.mode == "MONITOR"

    @property
    def recorded_action(self) -> str:
        """The action a new block is recorded with: what pcc answers for it."""
        return MONITOR_ACTION if self.monitoring else self.action


# Control characters (CR, LF, NUL, DEL...) never belong in a value pcc reads.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")
# configparser keeps "port = 9999  # the port" whole: the comment would become
# part of the value (and of the reason sent to clients).
INLINE_COMMENT = re.compile(r"\s[#;]")


# Only ASCII letters are lower-cased: str.lower() would also turn the Kelvin
# sign into "k" and make two different accounts one.
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def escape_controls(text: str) -> str:
    """Control characters shown as \\xNN: never deleted (ali<TAB>ce is not
    alice), never passed on (no CR/LF reaches a reply, a log line or a mail)."""
    if text.isprintable():  # nearly always; isprintable() is false for every control character
        return text
    return CONTROL_CHARACTERS.sub(lambda found: f"\\x{ord(found.group()):02x}", text)


def normalise_login(text: str) -> str:
    """How pcc names an account, from a SASL login, a config list or the
    command line alike: surrounding white space dropped, ASCII letters
    lower-cased, control characters escaped; nothing else changes."""
    return escape_controls(text.strip()).translate(_ASCII_LOWER)


def _split_list(value: str) -> list:
    return [item for item in re.split(r"[\s,]+", value) if item]


class _ConfigReader:
    """Reads one key at a time and turns every problem into one clear line."""

    def __init__(self, path: str):
        self.path = path
        self.read_keys: set = set()  # (section, key) asked for: anything else in the file is unknown
        self.parser = configparser.ConfigParser(interpolation=None)
        try:
            with open(path, encoding="utf-8") as config_file:
                self.parser.read_file(config_file)
        except OSError as error:
            raise ConfigError(f"{path}: cannot read the configuration: {error.strerror}") from None
        except (configparser.Error, UnicodeDecodeError) as error:
            first_line = str(error).splitlines()[0]
            raise ConfigError(f"{path}: not a valid INI file: {first_line}") from None

    def refuse_unknown_keys(self) -> None:
        """A key pcc does not know is most likely a typo of one it does: say so."""
        for section in self.parser.sections():
            for key in self.parser.options(section):
                if (section, key) not in self.read_keys:
                    known = sorted(k for s, k in self.read_keys if s == section)
                    if not known:
                        raise ConfigError(f"{self.path}: unknown section [{section}]")
                    raise self.fail(section, key, f"unknown key (a typo? known keys: {', '.join(known)})")

    def fail(self, section: str, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.path}: [{section}] {key}: {problem}")

    def text(self, section: str, key: str, *, required: bool = False) -> str:
        if not self.parser.has_section(section):
            raise ConfigError(f"{self.path}: section [{section}] is missing (it must hold '{key}')")
        if not self.parser.has_option(section, key):
            raise self.fail(section, key, "key is missing (every key must be present; leave it blank for none)")
        self.read_keys.add((section, key))
        value = self.parser.get(section, key).strip()
        if INLINE_COMMENT.search(value):
            raise self.fail(section, key, "has a comment after the value; put comments on lines of their own "
                            "(starting with # or ;)")
        if required and not value:
            raise self.fail(section, key, "must not be blank")
        if CONTROL_CHARACTERS.search(value):
            raise self.fail(section, key, "must be one line without control characters")
        return value

    def integer(self, section: str, key: str, low: int, high: int, blank: Optional[int] = None) -> int:
        value = self.text(section, key, required=blank is None)
        if not value:
            return blank
        try:
            number = int(value)
        except ValueError:
            raise self.fail(section, key, f"must be a whole number, got {value!r}") from None
        if not low <= number <= high:
            raise self.fail(section, key, f"must be between {low} and {high}, got {number}")
        return number

    def number(self, section: str, key: str, low: float, high: float, *, required: bool = True,
               blank: Optional[float] = None, low_inclusive: bool = False) -> Optional[float]:
        """A number in (low, high], or [low, high] with low_inclusive; `blank`
        when the value is blank and not required."""
        value = self.text(section, key, required=required)
        if not value:
            return blank
        try:
            number = float(value)
        except ValueError:
            raise self.fail(section, key, f"must be a number, got {value!r}") from None
        above_low = number >= low if low_inclusive else number > low
        if not (above_low and number <= high):
            at_least = "at least" if low_inclusive else "more than"
            raise self.fail(section, key, f"must be {at_least} {low:g} and at most {high:g}, got {value}")
        return number

    def choice(self, section: str, key: str, choices: tuple, blank: Optional[str] = None) -> str:
        value = self.text(section, key, required=blank is None).upper() or blank
        if value not in choices:
            raise self.fail(section, key, f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def networks(self, section: str, key: str) -> tuple:
        networks = []
        for item in _split_list(self.text(section, key)):
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise self.fail(section, key, f"{item!r} is not an IP address or CIDR network") from None
        return tuple(networks)

    def countries(self, section: str, key: str) -> frozenset:
        codes = [item.upper() for item in _split_list(self.text(section, key))]
        for code in codes:
            if code not in COUNTRY_CODES:
                raise self.fail(section, key, f"{code!r} is not an ISO 3166 two-letter country code")
        return frozenset(codes)

    def logins(self, section: str, key: str) -> frozenset:
        return frozenset(normalise_login(item) for item in _split_list(self.text(section, key)))

    def addresses(self, section: str, key: str) -> tuple:
        addresses = tuple(_split_list(self.text(section, key)))
        for address in addresses:
            if "@" not in address.strip("@"):
                raise self.fail(section, key, f"{address!r} is not an email address")
        return addresses


def load_settings(path: str, geoip_file_needed: bool = True) -> Settings:
    """Read and validate the whole configuration, or raise ConfigError."""
    config = _ConfigReader(path)
    settings = Settings(
        config_path=path,
        host=config.text("server", "host", required=True),
        port=config.integer("server", "port", 1, 65535),
        max_request_bytes=config.integer("server", "max_request_bytes", 1024, 16 * 1024 * 1024, blank=65536),
        idle_timeout=float(config.integer("server", "idle_timeout", 1, 86400, blank=600)),
        max_connections=config.integer("server", "max_connections", 1, 100000, blank=4000),
        allowed_clients=config.networks("server", "allowed_clients"),
        metrics_port=config.integer("server", "metrics_port", 1, 65535, blank=0) or None,
        dbcon=config.text("db", "dbcon", required=True),
        db_error_action=config.choice("db", "db_error_action", DB_ERROR_ACTIONS),
        spool_file=config.text("db", "spool_file"),
        geoip_database=config.text("geoip", "database"),
        geoip_update_url=config.text("geoip", "update_url"),
        domains=config.logins("mail", "domains"),
        mailsrv=config.text("mail", "mailsrv"),
        mailport=config.integer("mail", "mailport", 1, 65535, blank=25),
        notice=config.addresses("mail", "notice"),
        action=config.choice("policy", "action", BLOCK_ACTIONS),
        how_many_different_countries=config.integer("policy", "how_many_different_countries", 1, 300),
        in_how_much_time_in_days=config.number("policy", "in_how_much_time_in_days", 0, 3650),
        ignorecountries=config.countries("policy", "ignorecountries"),
        whitelisted=config.logins("policy", "whitelisted"),
        whitelistedips=config.networks("policy", "whitelistedips"),
        reason=config.text("policy", "reason"),
        mode=config.choice("policy", "mode", MODES, blank="ENFORCE"),
        max_travel_speed_kmh=config.number("policy", "max_travel_speed_kmh", 0, 100000, required=False),
        travel_accuracy_radius_km=config.number("policy", "travel_accuracy_radius_km", 0, 20000, required=False,
                                                blank=0.0, low_inclusive=True),
        impossible_travel_action=config.choice("policy", "impossible_travel_action", TRAVEL_ACTIONS, blank="NOTIFY"),
        postfix_config_directory=config.text("postfix", "config_directory"),
        dovecot_policy_port=config.integer("dovecot", "policy_port", 1, 65535, blank=0) or None,
        count_logins=config.choice("dovecot", "count_logins", ("YES", "NO"), blank="NO") == "YES",
        dovecot_api_header=config.text("dovecot", "api_header"),
    )
    config.refuse_unknown_keys()
    _check_ports(config, settings)
    if settings.dovecot_api_header and not re.fullmatch(r"[!-9;-~]+:\s*\S.*", settings.dovecot_api_header):
        raise config.fail("dovecot", "api_header", "must be one HTTP header, 'Name: value' (as Dovecot's "
                          "auth_policy_server_api_header), e.g. 'Authorization: Basic cGNjOnNlY3JldA=='")
    if settings.notice and not settings.mailsrv:
        raise config.fail("mail", "mailsrv", "must name an SMTP server when [mail] notice is set")
    try:
        sa.engine.make_url(settings.dbcon)
    except sa_exc.ArgumentError:
        raise config.fail("db", "dbcon", "is not an SQLAlchemy database URL "
                          "(e.g. sqlite:////var/lib/pcc/pcc.sqlite3)") from None
    if settings.geoip_update_url and urllib.parse.urlsplit(settings.geoip_update_url).scheme not in ("http", "https"):
        raise config.fail("geoip", "update_url", f"must be an http:// or https:// URL, got {settings.geoip_update_url!r}")
    if not geoip_file_needed and not os.path.exists(settings.geoip_database):
        return settings  # --update-geoip installs it
    kind = _geoip_database_type(config, settings.geoip_database) if settings.geoip_database else None
    if settings.max_travel_speed_kmh is not None:
        _require_places(config, settings.geoip_database, kind)
    return settings


def _check_ports(config: _ConfigReader, settings: Settings) -> None:
    if settings.metrics_port is not None and settings.metrics_port == settings.port:
        raise config.fail("server", "metrics_port", f"must differ from [server] port ({settings.port})")
    if settings.dovecot_policy_port is not None and settings.dovecot_policy_port in (settings.port,
                                                                                     settings.metrics_port):
        raise config.fail("dovecot", "policy_port", "must differ from [server] port and metrics_port")


def _geoip_database_type(config: _ConfigReader, path: str) -> str:
    """The type of the .mmdb at `path` (GeoLite2-Country...), or one clear line
    for a file that is missing or not a MaxMind-format database."""
    import maxminddb

    if not os.path.isfile(path):
        raise config.fail("geoip", "database", f"no such file: {path}")
    try:
        with maxminddb.open_database(path) as reader:
            return reader.metadata().database_type
    except (OSError, ValueError, RuntimeError) as error:  # RuntimeError: maxminddb's InvalidDatabaseError
        raise config.fail("geoip", "database", f"{path} is not a MaxMind-format database: {error}") from None


def _require_places(config: _ConfigReader, path: str, kind: Optional[str]) -> None:
    """The impossible-travel rule needs coordinates: a City-level database."""
    problem = "it has countries only" if path else "the embedded default data has countries only"
    if path:
        if is_city_level(kind):
            return
        problem = f"{path} is a {kind} database"
    raise config.fail("policy", "max_travel_speed_kmh", f"needs City-level GeoIP data in [geoip] database, but "
                      f"{problem} (use GeoLite2-City or DB-IP City Lite, or leave this blank)")


# ---------------------------------------------------------------------------
# Policy protocol
# ---------------------------------------------------------------------------

# Postfix never sends values this long; postgrey caps them the same way.  Longer
# values are cut so a hostile client cannot make us store megabytes.
MAX_ATTRIBUTE_VALUE = 512
# An account name longer than this is not a real login; it is not counted.
MAX_LOGIN_LENGTH = 255


@dataclass(frozen=True)
class PolicyRequest:
    """One Postfix policy request (the attributes pcc uses, plus all of them)."""

    request: str = ""
    sasl_username: str = ""  # as sent; `login` is the normalised account name
    client_address: str = ""
    sender: str = ""
    recipient: str = ""
    queue_id: str = ""
    instance: str = ""
    protocol_state: str = ""
    attributes: dict = field(default_factory=dict, compare=False, repr=False)
    # Filled in by the GeoIP lookup before the decision.
    client_country: Optional[str] = None
    country_note: str = ""
    client_place: Optional["Place"] = None  # only with City-level GeoIP data
    # A Dovecot login (request DOVECOT_LOGIN): the door ("imap", "pop3", "smtp"
    # for SMTP AUTH, "doveadm"), and whether only the blocked list is asked
    # (before the password is checked) or a successful login is to be counted.
    door: str = ""
    check_only: bool = False

    # Computed once per request and kept in the instance's dict (a frozen
    # dataclass allows that).  Not functools.cached_property: on Python 3.11 it
    # takes one lock shared by every instance, i.e. by all connection threads.
    @property
    def login(self) -> str:
        login = self.__dict__.get("_login")
        if login is None:
            login = self.__dict__["_login"] = normalise_login(self.sasl_username)
        return login

    @property
    def client_ip(self):
        """The client address as an ipaddress object (IPv4-mapped IPv6 unwrapped), or None."""
        if "_client_ip" not in self.__dict__:
            self.__dict__["_client_ip"] = _client_ip(self.client_address)
        return self.__dict__["_client_ip"]

    def with_country(self, found: "Country") -> "PolicyRequest":
        """This request with what the GeoIP lookup found (what was computed kept)."""
        return _replaced(self, client_country=found.code, country_note=found.note, client_place=found.place)


def _replaced(instance, **changes):
    """dataclasses.replace() for the hot path, a few times faster: a copy of a
    frozen dataclass instance's fields (and of what its properties computed),
    with `changes`; no __init__, so nothing but field values may change."""
    copy = object.__new__(type(instance))
    copy.__dict__.update(instance.__dict__)
    copy.__dict__.update(changes)
    return copy


def _client_ip(client_address: str):
    try:
        # A zone id (fe80::1%eth0) names a local link, never a country, and
        # would make the address longer than any stored one.
        address = ipaddress.ip_address(client_address.strip().split("%", 1)[0])
    except ValueError:
        return None
    return unwrap_ipv4(address)


# NAT64's well-known prefix (RFC 6052): the IPv4 client is the last 32 bits.
NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")


def unwrap_ipv4(address):
    """The IPv4 client inside an IPv6 address that carries one (IPv4-mapped,
    6to4, Teredo, NAT64), so that it gets the country of that IPv4 address;
    any other address as it is."""
    if address.version == 4:
        return address
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]  # (server, client)
    if address in NAT64_PREFIX:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


_FILLED_IN_LATER = ("attributes", "client_country", "country_note", "client_place", "door", "check_only")
_REQUEST_FIELDS = frozenset(f.name for f in dataclasses.fields(PolicyRequest) if f.name not in _FILLED_IN_LATER)


def parse_request(lines: Iterable[str]) -> PolicyRequest:
    """Turn the attribute lines of one request into a PolicyRequest.

    Lines without '=' are logged and skipped; unknown attributes are kept in
    `attributes` but otherwise ignored; a repeated attribute keeps its last value.
    """
    attributes = {}
    skipped, first_skipped = 0, ""
    for line in lines:
        name, separator, value = line.partition("=")
        if not separator or not name:
            skipped, first_skipped = skipped + 1, first_skipped or line
            continue
        # _clean_value(), written out: this loop runs 30 times a request
        if len(value) > MAX_ATTRIBUTE_VALUE:
            value = value[:MAX_ATTRIBUTE_VALUE]
        attributes[name[:64]] = value if value.isprintable() else escape_controls(value)
    if skipped:  # one line per request, however many it sent
        log.warning("policy request: skipped %d line%s that %s not name=value, the first: %r", skipped,
                    "s" if skipped != 1 else "", "are" if skipped != 1 else "is", first_skipped[:80])
    known = {name: value for name, value in attributes.items() if name in _REQUEST_FIELDS}
    return PolicyRequest(attributes=attributes, **known)


def _clean_value(value: str) -> str:
    return escape_controls(value[:MAX_ATTRIBUTE_VALUE])


def format_reply(action: str) -> bytes:
    """The reply block for Postfix; the action text can never span two lines."""
    one_line = " ".join(action.split())
    return f"action={one_line}\n\n".encode("utf-8", "replace")


# ---------------------------------------------------------------------------
# GeoIP lookup
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Place:
    """Where a City-level database puts an address, give or take accuracy_km."""

    latitude: float
    longitude: float
    accuracy_km: float  # 0 when the database does not say
    name: str  # "Tokyo, JP", for people

    def distance_km(self, other: "Place") -> float:
        """Great-circle distance (haversine, mean Earth radius)."""
        lat1, lat2 = math.radians(self.latitude), math.radians(other.latitude)
        half_dlat = (lat2 - lat1) / 2
        half_dlon = math.radians(other.longitude - self.longitude) / 2
        h = math.sin(half_dlat) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin(half_dlon) ** 2
        return 2 * 6371.0088 * math.asin(min(1.0, math.sqrt(h)))


@dataclass(frozen=True)
class Country:
    code: Optional[str]  # ISO code, or None when there is none to count
    note: str  # why there is none, for people
    place: Optional[Place] = None  # only from a City-level database
    missing: str = ""  # why there is none, for metrics: not an IP address / not public / not in database


def is_city_level(database_type: str) -> bool:
    """Whether an .mmdb of this type has places (GeoLite2-City, DBIP-City-Lite...)."""
    return "city" in database_type.lower()


class GeoIP:
    """Country (and, from City-level data, place) of an IP address.  Opened
    once, read by every thread; replaced whole when its file changes.

    With a path, reads a MaxMind-format .mmdb (GeoLite2-Country/City, DB-IP)
    with maxminddb.  Without one, uses the GeoLite2-Country data that ships in
    the geoip2fast package, so pcc works offline on a fresh machine.
    """

    def __init__(self, path: str = ""):
        self.path = path
        self.has_places = False
        self.ipv4_only = False
        self.database_type = "GeoLite2-Country"
        if path:
            import maxminddb

            self.file_signature = self.signature_of(path)
            self._reader = maxminddb.open_database(path)
            metadata = self._reader.metadata()
            built = dt.datetime.fromtimestamp(metadata.build_epoch, UTC)
            self.built = built.date()
            self.database_type = metadata.database_type
            self.has_places = is_city_level(metadata.database_type)
            self.ipv4_only = metadata.ip_version == 4
            self.description = f"{path} ({metadata.database_type}, built {self.built.isoformat()})"
            self._lookup = self._lookup_mmdb
        else:
            from geoip2fast import GeoIP2Fast

            self.file_signature = None
            self._reader = GeoIP2Fast(geoip2fast_data_file="geoip2fast-ipv6.dat.gz")
            source = self._reader.get_database_info().get("source_info", "")
            stamp = re.search(r"(\d{8})$", source)
            self.built = dt.datetime.strptime(stamp.group(1), "%Y%m%d").date() if stamp else None
            built_text = self.built.isoformat() if self.built else "unknown date"
            self.description = f"embedded GeoLite2-Country data of {built_text} (geoip2fast package)"
            self._lookup = self._lookup_embedded
        self._cached_country = functools.lru_cache(maxsize=16384)(self._country)

    def close(self) -> None:
        if self.path:
            self._reader.close()

    @staticmethod
    def signature_of(path: str) -> Optional[tuple]:
        """What changes when the file is rewritten or replaced (geoipupdate
        writes a new file and renames it over the old one)."""
        try:
            status = os.stat(path)
        except OSError:
            return None
        return status.st_ino, status.st_size, status.st_mtime_ns

    def changed_on_disk(self) -> bool:
        return bool(self.path) and self.signature_of(self.path) not in (None, self.file_signature)

    def country(self, address) -> Country:
        """`address` is an ipaddress object or None.  Answers are cached per
        address: Postfix asks about the same few clients over and over."""
        return self._cached_country(address)

    def _country(self, address) -> Country:
        if address is None:
            return Country(None, "client address is not an IP address", missing="not an IP address")
        if not address.is_global:
            kind = "loopback" if address.is_loopback else "private" if address.is_private else "non-public"
            return Country(None, f"{kind} address has no country", missing="not public")
        try:
            code, place = self._lookup(address)
        except Exception as error:  # e.g. an IPv6 address in an IPv4-only file: no country, never a crash
            log.error("GeoIP lookup of %s in %s failed: %s", address, self.description, error)
            return Country(None, "GeoIP lookup failed", missing="lookup failed")
        if code is None:
            return Country(None, "address not in the GeoIP database", missing="not in database")
        return Country(code, "", place)

    def _lookup_mmdb(self, address) -> tuple:
        record = self._reader.get(address)
        if not isinstance(record, dict):
            return None, None
        for key in ("country", "registered_country"):
            code = (record.get(key) or {}).get("iso_code")
            if code:
                code = code.upper()
                return code, self._place(record, code)
        return None, None

    @staticmethod
    def _place(record: dict, code: str) -> Optional[Place]:
        location = record.get("location")
        if not isinstance(location, dict):
            return None
        latitude, longitude = location.get("latitude"), location.get("longitude")
        if not isinstance(latitude, (int, float)) or not isinstance(longitude, (int, float)):
            return None
        city = ((record.get("city") or {}).get("names") or {}).get("en")
        accuracy = location.get("accuracy_radius")
        return Place(float(latitude), float(longitude), float(accuracy) if isinstance(accuracy, (int, float)) else 0.0,
                     f"{city}, {code}" if city else code)

    def _lookup_embedded(self, address) -> tuple:
        code = self._reader.lookup(str(address)).country_code
        return (code, None) if code and len(code) == 2 and code.isalpha() else (None, None)


# ---------------------------------------------------------------------------
# Storage (SQLAlchemy models)
# ---------------------------------------------------------------------------


class UTCDateTime(sa.types.TypeDecorator):
    """Aware UTC datetimes in Python, naive UTC in every database.

    MySQL and SQLite have no time zones; storing naive UTC everywhere keeps
    comparisons in SQL right on all three databases.
    """

    impl = sa.DateTime
    cache_ok = True

    def load_dialect_impl(self, dialect):
        if dialect.name in ("mysql", "mariadb"):
            from sqlalchemy.dialects import mysql

            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(sa.DateTime())

    def process_bind_param(self, value, dialect):
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value

    def process_result_value(self, value, dialect):
        return value.replace(tzinfo=UTC) if value is not None else None


def _login_type() -> sa.types.TypeEngine:
    """A login column: compared byte for byte everywhere.  MariaDB's default
    collation would make alicé@ equal alice@ and Alice@ equal alice@."""
    from sqlalchemy.dialects import mysql

    return sa.String(MAX_LOGIN_LENGTH).with_variant(
        mysql.VARCHAR(MAX_LOGIN_LENGTH, charset="utf8mb4", collation="utf8mb4_bin"), "mysql", "mariadb")


class Base(DeclarativeBase):
    """pcc's tables.  Indexes are only those declared inside CREATE TABLE (primary
    keys, unique constraints): a separate CREATE INDEX would need MariaDB's INDEX
    grant, and pcc promises to need only SELECT, INSERT, UPDATE and CREATE."""


class Sighting(Base):
    """An account seen sending from a country: one row per (login, country)."""

    __tablename__ = "pcc_sightings"
    # (last_seen, id) is unique anyway: the constraint is the one way to get an
    # index on last_seen inside CREATE TABLE on all three databases, for the
    # daemons' poll of what changed (Store.changes_since) and for cleanup.
    __table_args__ = (sa.UniqueConstraint("login", "country", name="uq_pcc_sightings_login_country"),
                      sa.UniqueConstraint("last_seen", "id", name="uq_pcc_sightings_recent"))

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    login: Mapped[str] = mapped_column(_login_type())
    country: Mapped[str] = mapped_column(sa.String(2))
    first_seen: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    last_seen: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    last_ip: Mapped[str] = mapped_column(sa.String(45))


class BlockedAccount(Base):
    """The blocked list: an account is blocked while blocked_since is set.

    A row exists only for accounts that were ever blocked.  Unblocking clears
    blocked_since and sets counting_since, so sightings from before the unblock
    no longer count.  pcc never DELETEs here: the daemon needs no DELETE grant,
    and "exactly one block" is a conditional UPDATE that only one writer wins.
    """

    __tablename__ = "pcc_blocked_accounts"

    login: Mapped[str] = mapped_column(_login_type(), primary_key=True)
    blocked_since: Mapped[Optional[dt.datetime]] = mapped_column(UTCDateTime(), nullable=True)
    block_id: Mapped[Optional[int]] = mapped_column(sa.Integer, nullable=True)
    counting_since: Mapped[Optional[dt.datetime]] = mapped_column(UTCDateTime(), nullable=True)


class Block(Base):
    """Every block ever made, kept after the unblock for the record."""

    __tablename__ = "pcc_blocks"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    login: Mapped[str] = mapped_column(_login_type())
    blocked_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    source: Mapped[str] = mapped_column(sa.String(16))  # "policy" or "admin"
    action: Mapped[str] = mapped_column(sa.String(16))
    reason: Mapped[str] = mapped_column(sa.Text)
    countries: Mapped[list] = mapped_column(sa.JSON)  # [{country, last_ip, first_seen, last_seen}]
    trigger: Mapped[Optional[dict]] = mapped_column(sa.JSON, nullable=True)  # the request that crossed the line
    unblocked_at: Mapped[Optional[dt.datetime]] = mapped_column(UTCDateTime(), nullable=True)


class TravelPass(Base):
    """An administrator's pre-approval of a trip: until expires_at, sending from
    `country` does not count for `login`.  One row per (login, country); a new
    pass for the same country replaces the old one."""

    __tablename__ = "pcc_travel_passes"
    __table_args__ = (sa.UniqueConstraint("login", "country", name="uq_pcc_travel_passes_login_country"),)

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    login: Mapped[str] = mapped_column(_login_type())
    country: Mapped[str] = mapped_column(sa.String(2))
    granted_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    granted_by: Mapped[str] = mapped_column(sa.String(64))


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


@dataclass(frozen=True)
class AccountHistory:
    """What the database knows about one account, as the decision needs it."""

    blocked_since: Optional[dt.datetime] = None
    counting_since: Optional[dt.datetime] = None
    sightings: tuple = ()  # of CountrySeen, the recent ones (possibly more than the window)
    block_action: Optional[str] = None  # the action of the block in force; MONITOR_ACTION = only flagged
    travel_passes: dict = field(default_factory=dict)  # country -> expires_at (possibly expired)
    # Where the account's latest sighting's IP is (filled in by the service from
    # GeoIP when the impossible-travel rule is on).
    last_place: Optional[Place] = None

    @property
    def latest_sighting(self) -> Optional[CountrySeen]:
        return max(self.sightings, key=lambda seen: seen.last_seen, default=None)

    @property
    def enforced_block(self) -> bool:
        """Blocked for real, not only flagged by monitor mode."""
        return self.blocked_since is not None and self.block_action != MONITOR_ACTION


def safe_url(url) -> str:
    """A database URL fit for a log line: the password is masked."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except sa_exc.ArgumentError:
        return "<invalid database URL>"


def _is_transient_conflict(error: sa_exc.DBAPIError) -> bool:
    """A deadlock or lock timeout between concurrent writers: worth one more try."""
    original = error.orig
    if getattr(original, "sqlstate", None) in ("40001", "40P01"):  # PostgreSQL
        return True
    arguments = getattr(original, "args", ())
    if arguments and arguments[0] in (1205, 1213):  # MariaDB/MySQL lock wait, deadlock
        return True
    return "database is locked" in str(original)  # SQLite


def _retry_on_conflict(method):
    @functools.wraps(method)
    def retrying(*args, **kwargs):
        for attempt in range(1, 5):
            try:
                return method(*args, **kwargs)
            except sa_exc.DBAPIError as error:
                if attempt == 4 or not _is_transient_conflict(error):
                    raise
                log.debug("database conflict (%s), trying again", _first_line(error))
                time.sleep(0.01 * attempt)
    return retrying


class Store:
    """All database access.  One engine per process, shared by the threads."""

    def __init__(self, url: str, create_directory: bool = True):
        self.url = sa.engine.make_url(url)
        options = self._engine_options(create_directory)
        self.engine = sa.create_engine(self.url, **options)
        # The hot path (one read, now and then one upsert) runs in autocommit on
        # a pool of its own: no BEGIN/ROLLBACK round trips, and each of those
        # statements is atomic by itself.  Blocks and admin changes use `engine`.
        if self.url.get_backend_name() == "sqlite" and self.url.database in (None, "", ":memory:"):
            self.fast_engine = self.engine  # one in-memory database: one pool
        else:
            self.fast_engine = sa.create_engine(self.url, isolation_level="AUTOCOMMIT",
                                                pool_reset_on_return=None, **options)
        if self.url.get_backend_name() == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
            if self.fast_engine is not self.engine:
                sa.event.listen(self.fast_engine, "connect", _sqlite_pragmas_for_sightings)
        self.dialect = self.engine.dialect.name
        # What the daemon asked of the database, for the metrics: reads of an
        # account's history, sighting writes, block transactions (retries too).
        self.operations: collections.Counter = collections.Counter()
        self._operations_lock = threading.Lock()
        self._history_query = self._build_history_query()
        self._sighting_upsert = self._build_sighting_upsert()
        self._sighting_merge = self._build_sighting_merge()
        self._prepare_raw_history_query()

    def _engine_options(self, create_directory: bool) -> dict:
        backend = self.url.get_backend_name()
        if backend == "sqlite":
            database = self.url.database or ""
            if create_directory and database and database != ":memory:" and not database.startswith("file:"):
                directory = os.path.dirname(os.path.abspath(database))
                os.makedirs(directory, mode=0o750, exist_ok=True)
            # check_same_thread: the pool hands a connection to one thread at a time.
            options: dict = {"connect_args": {"timeout": 30, "check_same_thread": False}}
            if database and database != ":memory:":
                # Sized for the connection threads: SQLAlchemy's default (5 + 10
                # overflow, closed on return) opened a connection, with its
                # PRAGMAs, for most requests at 32 connections.
                options.update(pool_size=32, max_overflow=32, pool_timeout=5)
            return options
        # Bounds on a thread stuck in a database that went away (the Watchdog has
        # answered Postfix long before): the connect, and unacknowledged data.
        connect_args: dict = {"connect_timeout": 3}
        if backend == "mysql":
            connect_args.update(read_timeout=10, write_timeout=10)
        elif backend == "postgresql":
            connect_args.update(tcp_user_timeout=10000, keepalives=1, keepalives_idle=30,
                                keepalives_interval=5, keepalives_count=3)
        # No pre-ping (a round trip per request): a connection that died with the
        # database fails once, SQLAlchemy then empties the pool, and the outage
        # logic in PolicyService answers meanwhile.
        return {
            "connect_args": connect_args,
            "pool_size": 16,
            "max_overflow": 32,
            "pool_timeout": 5,
            "pool_recycle": 3600,
        }

    def has_tables(self) -> bool:
        return sa.inspect(self.engine).has_table(BlockedAccount.__tablename__)

    def create_tables(self) -> None:
        """CREATE TABLE for what is missing; needs no grant beyond CREATE."""
        Base.metadata.create_all(self.engine, checkfirst=True)
        self._ensure_recent_index()

    def _ensure_recent_index(self) -> None:
        """Tables made by pcc 1.2 and older have no index on pcc_sightings.last_seen,
        which the daemons' poll for changes needs: add one, or say how."""
        inspector = sa.inspect(self.engine)
        table = Sighting.__tablename__
        found = inspector.get_indexes(table) + inspector.get_unique_constraints(table)
        if any(list(index["column_names"])[:1] == ["last_seen"] for index in found):
            return
        try:
            # Plain DDL: an sa.Index on Sighting's column would join pcc's
            # metadata for good, and every later create_all would add it again.
            with self.engine.begin() as connection:
                connection.execute(sa.text(f"CREATE INDEX ix_pcc_sightings_last_seen ON {table} (last_seen)"))
            log.warning("added the index ix_pcc_sightings_last_seen to %s (tables of pcc 1.2 and older lack it)",
                        table)
        except sa_exc.SQLAlchemyError as error:
            log.warning("%s has no index on last_seen and pcc may not add one (%s): every daemon's poll for "
                        "changes reads the whole table; run as the database owner: CREATE INDEX "
                        "ix_pcc_sightings_last_seen ON %s (last_seen)", table, _first_line(error), table)

    def dispose(self) -> None:
        self.engine.dispose()
        self.fast_engine.dispose()

    def prove_writable(self) -> None:
        """Write what the daemon writes, then roll back: a database the daemon
        could read but not write fails here, at start, not at the first block."""
        probe, now = "pcc-start-up-probe@invalid", utcnow()
        with self.engine.connect() as connection:
            self._upsert_sighting(connection, probe, "ZZ", "::", now)
            self._insert_ignore(connection, BlockedAccount, {"login": probe})
            block_id = connection.execute(sa.insert(Block).values(
                login=probe, blocked_at=now, source="policy", action="HOLD", reason="start-up probe",
                countries=[])).inserted_primary_key[0]
            self._swap_block(connection, probe, BlockedAccount.blocked_since.is_(None), now, block_id)
            connection.rollback()  # nothing of it is ever seen

    @staticmethod
    def _build_history_query():
        """One round trip for an account's history: its recent sightings (kind
        's'), its row on the blocked list with its block's action if it has one
        ('a'), and its travel passes that ended no earlier than `since` ('p')."""
        login = sa.bindparam("login", type_=sa.String())
        since = sa.bindparam("since", type_=UTCDateTime())
        sightings = sa.select(sa.literal_column("'s'").label("kind"), Sighting.country,
                              Sighting.first_seen.label("time1"), Sighting.last_seen.label("time2"),
                              Sighting.last_ip).where(Sighting.login == login, Sighting.last_seen >= since)
        account = (sa.select(sa.literal_column("'a'"), sa.null(), BlockedAccount.blocked_since,
                             BlockedAccount.counting_since, Block.action)
                   .outerjoin(Block, Block.id == BlockedAccount.block_id).where(BlockedAccount.login == login))
        passes = sa.select(sa.literal_column("'p'"), TravelPass.country, TravelPass.granted_at,
                           TravelPass.expires_at, sa.null()).where(TravelPass.login == login,
                                                                   TravelPass.expires_at >= since)
        return sa.union_all(sightings, account, passes)

    def _build_sighting_upsert(self):
        names = ("login", "country", "first_seen", "last_seen", "last_ip")
        insert = self._dialect_insert(Sighting).values({name: sa.bindparam(name) for name in names})
        if self.dialect in ("mysql", "mariadb"):
            new = insert.inserted
            return insert.on_duplicate_key_update(last_seen=new.last_seen, last_ip=new.last_ip)
        new = insert.excluded
        return insert.on_conflict_do_update(index_elements=["login", "country"],
                                            set_={"last_seen": new.last_seen, "last_ip": new.last_ip})

    def _build_sighting_merge(self):
        """An upsert that merges: the earliest first_seen and the latest
        last_seen (with its IP) of what is there and what comes, so batches
        written late, or by several daemons, never move a sighting back."""
        names = ("login", "country", "first_seen", "last_seen", "last_ip")
        insert = self._dialect_insert(Sighting).values({name: sa.bindparam(name) for name in names})
        if self.dialect in ("mysql", "mariadb"):
            new = insert.inserted
            # MySQL applies these in order, each seeing the ones before: last_ip
            # first (a list keeps the order; a dict would follow the table's).
            return insert.on_duplicate_key_update([
                ("last_ip", sa.case((new.last_seen > Sighting.last_seen, new.last_ip), else_=Sighting.last_ip)),
                ("first_seen", sa.func.least(Sighting.first_seen, new.first_seen)),
                ("last_seen", sa.func.greatest(Sighting.last_seen, new.last_seen)),
            ])
        new = insert.excluded
        earliest, latest = (sa.func.min, sa.func.max) if self.dialect == "sqlite" else (sa.func.least,
                                                                                         sa.func.greatest)
        return insert.on_conflict_do_update(index_elements=["login", "country"], set_={
            "last_ip": sa.case((new.last_seen > Sighting.last_seen, new.last_ip), else_=Sighting.last_ip),
            "first_seen": earliest(Sighting.first_seen, new.first_seen),
            "last_seen": latest(Sighting.last_seen, new.last_seen),
        })

    # --- the daemon's reads and writes -------------------------------------

    def _prepare_raw_history_query(self) -> None:
        """The history query is the one statement of every request.  It runs on
        the driver's cursor, compiled once here, with SQLAlchemy's own converters
        for the times: that halves its cost (measured: 146 -> 70 us on
        PostgreSQL, 256 -> 119 us on MariaDB) and keeps the same SQL."""
        dialect = self.fast_engine.dialect
        compiled = self._history_query.compile(dialect=dialect)
        self._history_sql = str(compiled)
        self._history_positions = compiled.positiontup  # None for named parameters
        time_type = UTCDateTime().dialect_impl(dialect)
        self._time_to_db = time_type.bind_processor(dialect) or (lambda value: value)
        from_db = time_type.result_processor(dialect, None)
        self._time_from_db = from_db or (lambda value: value)

    def _count(self, operation: str) -> None:
        with self._operations_lock:
            self.operations[operation] += 1

    def operation_counts(self) -> dict:
        with self._operations_lock:
            return dict(self.operations)

    def load_history(self, login: str, since: dt.datetime) -> AccountHistory:
        self._count("history_read")
        parameters = {"login": login, "since": self._time_to_db(since)}
        if self._history_positions is not None:
            parameters = [parameters[name] for name in self._history_positions]
        connection = self.fast_engine.raw_connection()  # pooled; close() gives it back
        try:
            cursor = connection.cursor()
            cursor.execute(self._history_sql, parameters)
            rows = cursor.fetchall()
            cursor.close()
        except self.fast_engine.dialect.loaded_dbapi.Error as error:
            if self.fast_engine.dialect.is_disconnect(error, connection.dbapi_connection, None):
                connection.invalidate(error)
            raise sa_exc.DBAPIError.instance(self._history_sql, parameters, error,
                                             self.fast_engine.dialect.loaded_dbapi.Error) from error
        finally:
            connection.close()
        return self._history_from_rows(rows)

    def _history_from_rows(self, rows: list) -> AccountHistory:
        to_time = self._time_from_db
        sightings = tuple(CountrySeen(country, to_time(first), to_time(last), ip)
                          for kind, country, first, last, ip in rows if kind == "s")
        passes = {country: to_time(expires) for kind, country, _granted, expires, _ip in rows if kind == "p"}
        for kind, _country, blocked_since, counting_since, action in rows:
            if kind == "a":
                return AccountHistory(to_time(blocked_since), to_time(counting_since), sightings,
                                      action if blocked_since is not None else None, passes)
        return AccountHistory(sightings=sightings, travel_passes=passes)

    @_retry_on_conflict
    def record_sighting(self, login: str, country: str, ip: str, now: dt.datetime) -> None:
        self._count("sighting_write")
        with self.fast_engine.connect() as connection:
            self._upsert_sighting(connection, login, country, ip, now)

    @_retry_on_conflict
    def write_sightings(self, rows: list) -> None:
        """Merge many sightings in one transaction (one commit, one fsync).
        rows: dicts with Sighting's columns, in (login, country) order so that
        two daemons writing overlapping batches take the row locks in the same
        order and cannot deadlock."""
        self._count("sighting_write")
        with self.engine.begin() as connection:
            connection.execute(self._sighting_merge, rows)

    def changes_since(self, since: dt.datetime) -> "DatabaseChanges":
        """What changed from `since` on, as the daemons' poll needs it: sightings
        written, blocks made or ended, travel passes granted or ended."""
        with self.fast_engine.connect() as connection:
            sightings = connection.execute(
                sa.select(Sighting.login, Sighting.country, Sighting.last_seen).where(Sighting.last_seen >= since)
            ).all()
            accounts = connection.execute(
                sa.select(BlockedAccount.login, BlockedAccount.blocked_since, BlockedAccount.counting_since,
                          Block.action).outerjoin(Block, Block.id == BlockedAccount.block_id)
                .where(sa.or_(BlockedAccount.blocked_since >= since, BlockedAccount.counting_since >= since))
            ).all()
            passes = connection.execute(
                sa.select(TravelPass.login, TravelPass.country, TravelPass.expires_at)
                .where(TravelPass.granted_at >= since)
            ).all()
        return DatabaseChanges(sightings, accounts, passes)

    @_retry_on_conflict
    def record_block(self, login: str, now: dt.datetime, *, source: str, action: str, reason: str,
                     countries: list, trigger: Optional[dict] = None, sighting: Optional[tuple] = None,
                     replace_flag: bool = False) -> Optional[int]:
        """Put `login` on the blocked list.  Returns the new block's id, or None
        when the account was blocked already (by another thread or daemon).

        replace_flag: the account may be flagged by monitor mode, and a real
        block (action other than MONITOR_ACTION) then replaces the flag.
        The sighting that triggered the block is written in the same
        transaction: the block is committed before Postfix is answered.
        """
        self._count("block_transaction")
        with self.engine.connect() as connection:
            if sighting is not None:
                self._upsert_sighting(connection, login, *sighting, now)
            self._insert_ignore(connection, BlockedAccount, {"login": login})
            block_id = connection.execute(
                sa.insert(Block).values(
                    login=login, blocked_at=now, source=source, action=action, reason=reason,
                    countries=countries, trigger=trigger,
                )
            ).inserted_primary_key[0]
            # Compare-and-swap: of concurrent writers, only one moves the row.
            won = self._swap_block(connection, login, BlockedAccount.blocked_since.is_(None), now, block_id)
            if not won and replace_flag and action != MONITOR_ACTION:
                won = self._replace_flag(connection, login, now, block_id)
            if not won:
                connection.rollback()
                return None
            connection.commit()
        return block_id

    @staticmethod
    def _swap_block(connection, login: str, unchanged, now: dt.datetime, block_id: int) -> bool:
        return connection.execute(
            sa.update(BlockedAccount).where(BlockedAccount.login == login, unchanged)
            .values(blocked_since=now, block_id=block_id)
        ).rowcount == 1

    def _replace_flag(self, connection, login: str, now: dt.datetime, block_id: int) -> bool:
        """A real block replaces a monitor-mode flag (which then ends); nothing
        else replaces a block."""
        flag_id = connection.execute(
            sa.select(BlockedAccount.block_id).join(Block, Block.id == BlockedAccount.block_id)
            .where(BlockedAccount.login == login, Block.action == MONITOR_ACTION)
        ).scalar()
        if flag_id is None or not self._swap_block(connection, login, BlockedAccount.block_id == flag_id, now,
                                                   block_id):
            return False
        connection.execute(sa.update(Block).where(Block.id == flag_id).values(unblocked_at=now))
        return True

    def _upsert_sighting(self, connection, login: str, country: str, ip: str, now: dt.datetime) -> None:
        connection.execute(self._sighting_upsert, {"login": login, "country": country, "first_seen": now,
                                                   "last_seen": now, "last_ip": ip})

    def _insert_ignore(self, connection, model, values: dict) -> None:
        insert = self._dialect_insert(model).values(**values)
        if self.dialect in ("mysql", "mariadb"):
            key = next(iter(values))
            statement = insert.on_duplicate_key_update({key: insert.inserted[key]})
        else:
            statement = insert.on_conflict_do_nothing()
        connection.execute(statement)

    def _dialect_insert(self, model):
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        elif self.dialect in ("mysql", "mariadb"):
            from sqlalchemy.dialects.mysql import insert
        elif self.dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        else:
            raise ConfigError(f"database {self.dialect!r} is not supported (use SQLite, MariaDB/MySQL or PostgreSQL)")
        return insert(model)

    # --- the administrator's reads and writes ------------------------------

    def blocked_accounts(self) -> list:
        """(BlockedAccount, Block) for every account on the blocked list, oldest first."""
        with Session(self.engine) as session:
            rows = session.execute(
                sa.select(BlockedAccount.login, BlockedAccount.blocked_since, Block)
                .join(Block, Block.id == BlockedAccount.block_id)
                .where(BlockedAccount.blocked_since.is_not(None))
                .order_by(BlockedAccount.blocked_since)
            ).all()
        return rows

    def account(self, login: str):
        with Session(self.engine) as session:
            account = session.execute(sa.select(BlockedAccount).where(BlockedAccount.login == login)).scalar()
            sightings = session.execute(
                sa.select(Sighting.country, Sighting.first_seen, Sighting.last_seen, Sighting.last_ip)
                .where(Sighting.login == login)
                .order_by(Sighting.last_seen)
            ).all()
            blocks = session.execute(
                sa.select(Block).where(Block.login == login).order_by(Block.blocked_at, Block.id)
            ).scalars().all()
        return account, [CountrySeen(*row) for row in sightings], list(blocks)

    def count_blocked(self) -> dict:
        """{"enforce": blocked accounts, "monitor": accounts only flagged}."""
        monitor = sa.case((Block.action == MONITOR_ACTION, "monitor"), else_="enforce")
        with self.fast_engine.connect() as connection:
            rows = connection.execute(
                sa.select(monitor, sa.func.count()).select_from(BlockedAccount)
                .join(Block, Block.id == BlockedAccount.block_id)
                .where(BlockedAccount.blocked_since.is_not(None)).group_by(monitor)
            ).all()
        return dict(rows)

    def travel_passes(self, login: str) -> list:
        """Every travel pass of `login` (expired ones too), by expiry."""
        with Session(self.engine) as session:
            return list(session.execute(
                sa.select(TravelPass).where(TravelPass.login == login).order_by(TravelPass.expires_at)
            ).scalars())

    @_retry_on_conflict
    def grant_travel_pass(self, login: str, countries: Iterable[str], now: dt.datetime,
                          expires_at: dt.datetime, granted_by: str) -> None:
        """One pass per country (a new one replaces an older one); an expiry of
        `now` ends the passes at once."""
        rows = [{"login": login, "country": country, "granted_at": now, "expires_at": expires_at,
                 "granted_by": granted_by[:64]} for country in countries]
        insert = self._dialect_insert(TravelPass).values(rows)
        changed = ("granted_at", "expires_at", "granted_by")
        if self.dialect in ("mysql", "mariadb"):
            statement = insert.on_duplicate_key_update({name: insert.inserted[name] for name in changed})
        else:
            statement = insert.on_conflict_do_update(index_elements=["login", "country"],
                                                     set_={name: insert.excluded[name] for name in changed})
        with self.engine.begin() as connection:
            connection.execute(statement)

    @_retry_on_conflict
    def unblock(self, login: str, now: dt.datetime) -> Optional[int]:
        """Take `login` off the blocked list; its earlier sightings stop counting.
        Returns the id of the block that ended, or None if it was not blocked."""
        with self.engine.begin() as connection:
            block_id = connection.execute(
                sa.select(BlockedAccount.block_id).where(
                    BlockedAccount.login == login, BlockedAccount.blocked_since.is_not(None)
                )
            ).scalar()
            if block_id is None:
                return None
            ended = connection.execute(
                sa.update(BlockedAccount)
                .where(BlockedAccount.login == login, BlockedAccount.block_id == block_id)
                .values(blocked_since=None, block_id=None, counting_since=now)
            ).rowcount
            if ended != 1:
                return None
            connection.execute(sa.update(Block).where(Block.id == block_id).values(unblocked_at=now))
        return block_id

    def merge_sightings(self, sightings: Iterable[tuple]) -> int:
        """Write (login, CountrySeen) pairs, keeping the earliest first_seen and
        the latest last_seen (with its IP) of what is there and what comes."""
        rows = sighting_rows(sightings)
        for start in range(0, len(rows), 1000):
            self.write_sightings(rows[start:start + 1000])
        return len(rows)

    def delete_sightings_before(self, cutoff: dt.datetime) -> int:
        with self.engine.begin() as connection:
            return connection.execute(sa.delete(Sighting).where(Sighting.last_seen < cutoff)).rowcount


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


def sighting_rows(sightings: Iterable[tuple]) -> list:
    """(login, CountrySeen) pairs as Store.write_sightings takes them: rows in
    (login, country) order, so that two daemons writing overlapping batches
    take the row locks in the same order and cannot deadlock."""
    rows = [{"login": login, "country": seen.country, "first_seen": seen.first_seen,
             "last_seen": seen.last_seen, "last_ip": seen.last_ip} for login, seen in sightings]
    rows.sort(key=lambda row: (row["login"], row["country"]))
    return rows


def merge_seen(first: Optional[CountrySeen], second: CountrySeen) -> CountrySeen:
    """One sighting of a country from two: the earliest first_seen, the latest
    last_seen with its IP (the merge the database does too)."""
    if first is None:
        return second
    latest = second if second.last_seen >= first.last_seen else first
    return CountrySeen(latest.country, min(first.first_seen, second.first_seen), latest.last_seen, latest.last_ip)


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
        self._thread = threading.Thread(target=self._run, name="pcc-sightings", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Write what is pending (at the daemon's orderly stop)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self.flush()

    def add(self, login: str, seen: CountrySeen) -> None:
        with self._lock:
            countries = self._pending.setdefault(login, {})
            if seen.country not in countries:
                self._count += 1
            countries[seen.country] = merge_seen(countries.get(seen.country), seen)
            if self._pending_since is None:
                self._pending_since = time.monotonic()
            if self._count > SIGHTINGS_KEPT_UNWRITTEN:
                self._drop_oldest()
        if self._thread is None or (self._lagging() and not self._failing):
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
                self._stop.wait(DB_PROBE_INTERVAL)  # a failing database is tried once a second

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
                self.on_failed(_first_line(error))
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
                              row["country"], _first_line(row_error))

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


@dataclass(frozen=True)
class DatabaseChanges:
    """Rows changed in a stretch of time (Store.changes_since)."""

    sightings: list  # (login, country, last_seen)
    accounts: list  # (login, blocked_since, counting_since, action of the block in force)
    passes: list  # (login, country, expires_at)


def _sqlite_pragmas(dbapi_connection, _record, synchronous: str = "FULL") -> None:
    # WAL lets readers go on while one thread writes; several pcc processes on
    # one SQLite file (daemon + admin command) wait for each other, up to 30 s.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute(f"PRAGMA synchronous={synchronous}")
    cursor.close()


def _sqlite_pragmas_for_sightings(dbapi_connection, record) -> None:
    # Sightings need not reach the disk before the answer: in WAL mode NORMAL
    # survives a crash of pcc (kill -9), only a power cut may lose the last
    # few, and the next block's FULL commit syncs them too.  Blocks stay FULL.
    _sqlite_pragmas(dbapi_connection, record, synchronous="NORMAL")


# ---------------------------------------------------------------------------
# The decision
# ---------------------------------------------------------------------------

# What pcc decides on: Postfix's policy requests, and Dovecot's logins as the
# Dovecot adapter hands them over.
DOVECOT_LOGIN = "dovecot_login"
COUNTED_REQUESTS = ("smtpd_access_policy", DOVECOT_LOGIN)

# A sighting's last_seen (and last_ip) is refreshed at most this often, so an
# account sending thousands of messages from one country, even from several
# addresses, costs reads, not writes.  It is far below any useful window (a day
# or more), so counting stays exact in practice; a block records exact IPs.
SIGHTING_REFRESH = dt.timedelta(seconds=60)


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
    action: str  # "DUNNO", or the configured block action
    reason: str  # for the log line and, when blocking, the admins
    counted: bool = False  # the request's country counts for the account
    record_sighting: bool = False  # the database must learn about this sighting
    new_block: bool = False  # this request puts the account on the blocked list (or flags it, in monitor mode)
    countries: tuple = ()  # CountrySeen in the window, this request's included
    journey: Optional[Journey] = None  # an impossible journey that ends with this request
    replaces_flag: bool = False  # the new block replaces a monitor-mode flag

    @property
    def blocks(self) -> bool:
        return self.action != "DUNNO"

    @property
    def rule(self) -> str:
        """Which rule a new block comes from (the country rule blocks before
        a journey is ever looked at)."""
        return "travel" if self.journey is not None else "countries"


def not_counted_reason(request: PolicyRequest, settings: Settings) -> Optional[str]:
    """Why this request is no business of pcc's, before any database work."""
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
    skip = not_counted_reason(request, settings)
    if skip is not None:
        return Decision("DUNNO", skip)
    history = history or AccountHistory()
    if history.blocked_since is not None:
        since = f"{history.blocked_since:%Y-%m-%d %H:%M:%S} UTC"
        if history.enforced_block:  # blocks in force stay enforced in monitor mode too
            return Decision(settings.block_reply, f"account blocked since {since}")
        if settings.monitoring:
            return Decision("DUNNO", f"would be blocked since {since} (monitor mode)")
        # enforce mode and only a monitor-mode flag: the account is judged afresh
    if request.check_only:
        return Decision("DUNNO", "not blocked (asked before the password is checked)")
    skip = _not_counted_here(request, history, settings, now)
    if skip is not None:
        return Decision("DUNNO", skip)
    decision = _count(request, history, settings, now)
    if decision.new_block and history.blocked_since is not None:
        decision = dataclasses.replace(decision, replaces_flag=True)
    return decision


def _not_counted_here(request: PolicyRequest, history: AccountHistory, settings: Settings,
                      now: dt.datetime) -> Optional[str]:
    """Why this message's place does not count for the account."""
    address = request.client_ip
    if address is not None and any(address in network for network in settings.whitelistedips):
        return "whitelisted client address"
    country = request.client_country
    if country is None:
        return f"not counted: {request.country_note or 'no country'}"
    if country in settings.ignorecountries:
        return f"not counted: {country} is in ignorecountries"
    pass_ends = history.travel_passes.get(country)
    if pass_ends is not None and pass_ends > now:
        return f"not counted: travel pass for {country} until {pass_ends:%Y-%m-%d %H:%M} UTC"
    return None


def _count(request: PolicyRequest, history: AccountHistory, settings: Settings, now: dt.datetime) -> Decision:
    country, ip = request.client_country, str(request.client_ip)
    recent = _countries_in_window(history, settings, now)
    previous = recent.get(country)
    recent[country] = CountrySeen(country, previous.first_seen if previous else now, now, ip)
    limit = settings.how_many_different_countries
    summary = f"{len(recent)} of at most {limit} countries in {settings.in_how_much_time_in_days:g} days"
    if request.door:
        summary = f"{request.door} login: {summary}"
    countries = tuple(sorted(recent.values(), key=lambda seen: seen.first_seen))
    if len(recent) > limit:
        listed = ", ".join(seen.country for seen in countries)
        return _new_block(settings, f"{summary} ({listed})", countries)
    journey = impossible_journey(request, history, settings, now)
    if journey is not None and settings.impossible_travel_action == "BLOCK":
        return _new_block(settings, f"impossible travel: {journey.describe()}", countries, journey)
    if journey is not None:
        summary += f"; impossible travel noticed: {journey.describe()}"
    stale = previous is None or now - previous.last_seen >= SIGHTING_REFRESH
    # With the travel rule on, every move to another place is written, so the
    # next message is judged against where the account really was last.
    moved = settings.max_travel_speed_kmh is not None and not stale and _moved(request, history)
    return Decision("DUNNO", summary, counted=True, record_sighting=stale or moved, countries=countries,
                    journey=journey)


def _moved(request: PolicyRequest, history: AccountHistory) -> bool:
    latest = history.latest_sighting
    if latest is None or latest.country != request.client_country:
        return True
    return latest.last_ip != str(request.client_ip) and history.last_place != request.client_place


def _new_block(settings: Settings, reason: str, countries: tuple, journey: Optional[Journey] = None) -> Decision:
    if settings.monitoring:
        action, reason = "DUNNO", f"would block (monitor mode): {reason}"
    else:
        action, reason = settings.block_reply, f"blocking: {reason}"
    return Decision(action, reason, counted=True, record_sighting=True, new_block=True, countries=countries,
                    journey=journey)


def impossible_journey(request: PolicyRequest, history: AccountHistory, settings: Settings,
                       now: dt.datetime) -> Optional[Journey]:
    """The journey from the account's previous sighting to this request, if no
    one can travel that fast.  Places closer than travel_accuracy_radius_km, or
    than both places' own accuracy radii, are never judged."""
    latest, origin, destination = history.latest_sighting, history.last_place, request.client_place
    if settings.max_travel_speed_kmh is None or latest is None or origin is None or destination is None:
        return None
    if history.counting_since is not None and latest.last_seen < history.counting_since:
        return None  # unblocked since: the owner's next message starts afresh, like the country count
    ip = str(request.client_ip)
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
        return _replaced(history, blocked_since=now, block_action=settings.recorded_action,
                         sightings=merge_sightings_by_country(history.sightings, decision.countries))
    if decision.counted:
        return _replaced(history, sightings=merge_sightings_by_country(history.sightings, decision.countries))
    return history


def merge_sightings_by_country(known: Iterable[CountrySeen], new: Iterable[CountrySeen]) -> tuple:
    """One CountrySeen per country of both (merge_seen), those outside the
    counting window (ignored countries, travel passes) kept: they count again
    once the pass ends."""
    merged = {seen.country: seen for seen in known}
    for seen in new:
        merged[seen.country] = merge_seen(merged.get(seen.country), seen)
    return tuple(merged.values())


def _countries_in_window(history: AccountHistory, settings: Settings, now: dt.datetime) -> dict:
    start = now - settings.country_window
    if history.counting_since is not None:
        start = max(start, history.counting_since)
    passes = history.travel_passes
    return {
        seen.country: seen
        for seen in history.sightings
        if seen.last_seen >= start and seen.country not in settings.ignorecountries
        and not (seen.country in passes and passes[seen.country] > now)
    }


# ---------------------------------------------------------------------------
# Notifications
# ---------------------------------------------------------------------------


class Notifier:
    """Sends admin emails from a background thread, so Postfix never waits.

    A message that cannot be sent is retried with a growing pause (up to
    `max_backoff` seconds) for as long as the daemon runs; each failure is logged.
    """

    def __init__(self, settings: Settings, *, first_backoff: float = 5.0, max_backoff: float = 300.0):
        self.settings = settings
        self.first_backoff = first_backoff
        self.max_backoff = max_backoff
        self.sender = f"pcc@{socket.gethostname()}"
        self._outbox: queue.Queue = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self._start_lock = threading.Lock()
        self._queued_at: collections.deque = collections.deque()  # monotonic times of the unsent, oldest first

    def send(self, subject: str, body: str) -> None:
        """Queue a notification; returns at once."""
        if not self.settings.notice:
            return
        with self._start_lock:
            self._queued_at.append(time.monotonic())
        self._outbox.put(self._compose(subject, body))
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pcc-notifier", daemon=True)
                self._thread.start()

    def send_now(self, subject: str, body: str) -> bool:
        """For the admin commands: send in this thread, report success."""
        if not self.settings.notice:
            return True
        message = self._compose(subject, body)
        try:
            self._deliver(message)
            return True
        except (OSError, smtplib.SMTPException) as error:
            log.error("notification to %s not sent: %s", message["To"], error)
            return False

    def backlog(self) -> tuple:
        """(notifications not sent yet, seconds the oldest of them has waited)."""
        with self._start_lock:
            if not self._queued_at:
                return 0, 0.0
            return len(self._queued_at), time.monotonic() - self._queued_at[0]

    def _compose(self, subject: str, body: str) -> email.message.EmailMessage:
        message = email.message.EmailMessage()
        message["From"] = self.sender
        message["To"] = ", ".join(self.settings.notice)
        message["Subject"] = header_safe(subject)
        message["Date"] = email.utils.formatdate(localtime=True)
        message["Message-ID"] = email.utils.make_msgid(domain=socket.gethostname())
        message["Auto-Submitted"] = "auto-generated"
        message.set_content(body)
        return message

    def _run(self) -> None:
        while True:
            message = self._outbox.get()
            backoff = self.first_backoff
            while True:
                try:
                    self._deliver(message)
                    log.info("notification sent to %s: %s", message["To"], message["Subject"])
                    with self._start_lock:
                        self._queued_at.popleft()
                    break
                except (OSError, smtplib.SMTPException) as error:
                    log.error("notification to %s not sent (retrying in %.0f s): %s",
                              message["To"], backoff, error)
                    time.sleep(backoff)
                    backoff = min(backoff * 2, self.max_backoff)

    def _deliver(self, message: email.message.EmailMessage) -> None:
        with smtplib.SMTP(self.settings.mailsrv, self.settings.mailport, timeout=30) as smtp:
            smtp.send_message(message, to_addrs=list(self.settings.notice))


def header_safe(text: str) -> str:
    """A header value from untrusted text (a SASL login): one line, and no RFC
    2047 encoded word, which the email package would decode, CR/LF included,
    into headers of the attacker's choosing."""
    return " ".join(text.split()).replace("=?", "=\\?")


def pcc_command(settings: Settings, option: str, login: str) -> str:
    """The admin command line an email tells the reader to run, quoted for a
    shell: a login with `...` or $(...) must not run when pasted."""
    program = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0].endswith("pcc.py") else "pcc.py"
    return shlex.join([program, "--config", settings.config_path, option, login])


def block_notice(settings: Settings, login: str, countries: Iterable[CountrySeen], reason: str,
                 source: str, action: str, journey: Optional[Journey] = None) -> tuple:
    """Subject and body of the mail about a new block (`action` as recorded:
    MONITOR_ACTION when monitor mode only flagged the account)."""
    if action == MONITOR_ACTION:
        subject = f"pcc: account {login} would be blocked (monitor mode)"
        lines = [f"pcc would have blocked the account {login}; it runs in monitor mode, so its mail still flows.",
                 "", f"Why: {reason}",
                 f"In enforce mode every message of this account would now be answered: {settings.block_reply}"]
    else:
        subject = f"pcc: account {login} blocked ({action})"
        lines = [f"pcc has blocked the account {login}.", "", f"Why: {reason}",
                 f"Every message of this account is now answered: {action} {settings.reason}".rstrip()]
        if settings.dovecot_policy_port:
            lines.append("Its Dovecot logins (IMAP, POP3, SMTP AUTH) are refused too.")
        if source.startswith("dovecot/"):
            lines.append(f"The login that crossed the line was granted before pcc heard of it; end its session: "
                         f"doveadm kick {shlex.quote(login)}")
    if journey is not None:
        lines += ["", *journey_lines(settings, journey)]
    lines += ["", "Countries it sent from (last client IP, first and last time seen, UTC):"]
    for seen in countries:
        lines.append(f"  {seen.country}  {seen.last_ip:<39}  {seen.first_seen:%Y-%m-%d %H:%M:%S}"
                     f"  {seen.last_seen:%Y-%m-%d %H:%M:%S}")
    if action == MONITOR_ACTION:
        lines += ["", "To clear the flag (its earlier countries then stop counting):"]
    else:
        lines += ["", "If the account is compromised, change its password first.  Then unblock it with:"]
    lines += [f"  {pcc_command(settings, '-u', login)}", "", f"Decided by: {source} on {socket.gethostname()}"]
    return subject, "\n".join(lines) + "\n"


def journey_lines(settings: Settings, journey: Journey) -> list:
    minutes = (journey.arrived - journey.departed).total_seconds() / 60
    origin, destination = journey.origin.name, journey.destination.name
    return [
        "The impossible journey:",
        f"  from  {origin:<30} {journey.origin_ip:<39} at {journey.departed:%Y-%m-%d %H:%M:%S} UTC",
        f"  to    {destination:<30} {journey.destination_ip:<39} at {journey.arrived:%Y-%m-%d %H:%M:%S} UTC",
        f"  {journey.distance_km:,.0f} km in {minutes:,.1f} minutes: at least {journey.speed_kmh:,.0f} km/h "
        f"(allowing for GeoIP accuracy); the limit is {settings.max_travel_speed_kmh:,.0f} km/h",
    ]


def travel_notice(settings: Settings, login: str, journey: Journey) -> tuple:
    """The mail for impossible_travel_action = notify: nothing is blocked."""
    lines = [f"The account {login} sent mail from two places no one can travel between in the time between them.",
             "It is NOT blocked (impossible_travel_action = notify).  A VPN or a mobile carrier can explain this;",
             "a stolen password can too.", "", *journey_lines(settings, journey), "",
             "To block the account:", f"  {pcc_command(settings, '-b', login)}"]
    return f"pcc: impossible travel by {login}", "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------


# How long a request may wait for the database before pcc answers without it
# (see Watchdog).  The database work goes on (a block still gets written).
DB_ANSWER_DEADLINE = 0.8
# While the database fails, one request a second tries it again; the others
# are answered at once from memory.
DB_PROBE_INTERVAL = 1.0
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
# ...and reads an account again after this many seconds whatever the poll says
# (rows written with old times, by --replay --record or a late spool, are
# missed by the poll; this bounds how long).
HISTORY_MAX_AGE = 60.0
# The request `pcc.py --health` sends the daemon (Postfix never sends it):
# the answer is DUNNO followed by what the daemon sees of itself.
HEALTH_REQUEST = "pcc_health"
# While the database fails, an ERROR line this often (seconds).
OUTAGE_REPORT_INTERVAL = 60.0


# Impossible-travel mails about one account are sent at most this often (an
# account that flips between a VPN and its home line would cause one a flip).
TRAVEL_NOTICE_INTERVAL = dt.timedelta(hours=6)


# The metrics port serves a scraper or two: this many connections at once,
# each done within this many seconds.
METRICS_CONNECTIONS = 8
METRICS_TIMEOUT = 10.0


class Metrics:
    """The Prometheus metrics ([server] metrics_port).  With metrics off every
    method returns at once and prometheus_client is not even imported."""

    def __init__(self, service: Optional["PolicyService"] = None):
        self.enabled = service is not None
        if not self.enabled:
            return
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self._decisions = Counter("pcc_decisions", "Answers given to Postfix, by action", ["action"],
                                  registry=self.registry)
        self._decisions_by_action: dict = {}
        self._new_blocks = Counter("pcc_new_blocks", "Accounts newly blocked, or flagged in monitor mode, by "
                                   "rule and mode", ["rule", "mode"], registry=self.registry)
        self._journeys = Counter("pcc_impossible_travel", "Impossible journeys noticed", registry=self.registry)
        self._latency = Histogram("pcc_request_duration_seconds", "Time from a whole request to its answer",
                                  buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.8,
                                           1.0, 2.5), registry=self.registry)
        self._database_errors = Counter("pcc_database_errors", "Database operations that failed",
                                        registry=self.registry)
        self._no_country = Counter("pcc_geoip_lookups_without_country", "Counted requests whose client address "
                                   "has no country, by why", ["why"], registry=self.registry)
        self._dovecot = Counter("pcc_dovecot_requests", "Dovecot auth policy requests, by command (allow, report; "
                                "- when refused before it was read) and status (allowed, refused, not_counted, "
                                "unauthorised, bad_request)", ["command", "status"], registry=self.registry)
        self.registry.register(_StateCollector(service))

    def serve(self, host: str, port: int, allowed_clients: tuple) -> None:
        """Serve /metrics from a thread of its own; `allowed_clients` (when set)
        guards it as it guards the policy port."""
        from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

        from prometheus_client import make_wsgi_app

        app = make_wsgi_app(self.registry)
        scrapes = threading.BoundedSemaphore(METRICS_CONNECTIONS)

        class MetricsServer(socketserver.ThreadingMixIn, WSGIServer):
            """Bounded like the policy port: clients checked before a thread
            is started, a few connections at a time, each with a time limit."""

            daemon_threads = True
            address_family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]

            def verify_request(self, request, client_address) -> bool:
                if not client_allowed(client_address[0], allowed_clients):
                    log.warning("metrics connection from %s refused: not in [server] allowed_clients",
                                client_address[0])
                    return False
                if not scrapes.acquire(blocking=False):
                    log.warning("metrics connection from %s refused: %d already open", client_address[0],
                                METRICS_CONNECTIONS)
                    return False
                return True

            def process_request_thread(self, request, client_address) -> None:
                try:
                    super().process_request_thread(request, client_address)
                finally:
                    scrapes.release()

        class QuietHandler(WSGIRequestHandler):
            timeout = METRICS_TIMEOUT  # a client that sends nothing does not keep its thread

            def log_message(self, *_arguments) -> None:  # one line per scrape is noise
                pass

        server = make_server(host, port, app, MetricsServer, QuietHandler)
        threading.Thread(target=server.serve_forever, name="pcc-metrics", daemon=True).start()

    def answered(self, reply: bytes, seconds: float) -> None:
        """A reply went to Postfix `seconds` after its request began."""
        if not self.enabled:
            return
        action = reply[len(b"action="):].split(maxsplit=1)[0]
        counter = self._decisions_by_action.get(action)
        if counter is None:  # labels() takes a lock and builds a key: once per action
            counter = self._decisions_by_action.setdefault(action, self._decisions.labels(action.decode()))
        counter.inc()
        self._latency.observe(seconds)

    def new_block(self, rule: str, action: str) -> None:
        if self.enabled:
            self._new_blocks.labels(rule, "monitor" if action == MONITOR_ACTION else "enforce").inc()

    def journey(self) -> None:
        if self.enabled:
            self._journeys.inc()

    def database_failed(self) -> None:
        if self.enabled:
            self._database_errors.inc()

    def no_country(self, why: str) -> None:
        if self.enabled:
            self._no_country.labels(why).inc()

    def dovecot(self, command: str, status: str) -> None:
        if self.enabled:
            self._dovecot.labels(command, status).inc()


class _StateCollector:
    """Metrics read at scrape time: the blocked list (one COUNT query) and the
    GeoIP data in use."""

    def __init__(self, service: "PolicyService"):
        self.service = service

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        state = self.service.database_state()
        yield GaugeMetricFamily("pcc_database_up", "1 while this daemon can use its database, 0 while it decides "
                                "without it", value=0 if state["failing"] else 1)
        yield GaugeMetricFamily("pcc_database_failing_seconds", "How long the database has been failing (0 when "
                                "it is not)", value=state["failing_seconds"])
        yield CounterMetricFamily("pcc_database_error_answers", "Requests answered db_error_action because the "
                                  "database failed", value=state["error_answers_total"])
        yield GaugeMetricFamily("pcc_spooled_blocks", "Blocks waiting in the spool for the database",
                                value=self.service.journal.blocks_waiting())
        yield GaugeMetricFamily("pcc_unwritten_sightings", "Sightings counted but not yet in the database "
                                "(written every 50 ms; they pile up while it fails)",
                                value=self.service.sightings.waiting())
        operations = self.service.store.operation_counts()
        family = CounterMetricFamily("pcc_database_operations", "What the daemon asked of the database: "
                                     "history reads, sighting writes (one transaction per batch), block "
                                     "transactions", labels=["operation"])
        for operation in ("history_read", "sighting_write", "block_transaction"):
            family.add_metric([operation], operations.get(operation, 0))
        yield family
        built = self.service.geoip.built
        if built is not None:
            yield GaugeMetricFamily("pcc_geoip_build_timestamp_seconds", "When the GeoIP data in use was built",
                                    value=dt.datetime(built.year, built.month, built.day, tzinfo=UTC).timestamp())
        try:
            counts = self.service.store.count_blocked()
        except sa_exc.SQLAlchemyError as error:
            self.service.metrics.database_failed()
            log.warning("metrics: cannot count blocked accounts: %s", _first_line(error))
            return
        family = GaugeMetricFamily("pcc_blocked_accounts", "Accounts on the blocked list, by mode", labels=["mode"])
        family.add_metric(["enforce"], counts.get("enforce", 0))
        family.add_metric(["monitor"], counts.get("monitor", 0))
        yield family


# A spooled block's keys and their types: an entry without them is set aside.
SPOOL_ENTRY_KEYS = {"login": str, "at": str, "action": str, "reason": str, "countries": list,
                    "trigger": dict, "sighting": list}


def valid_spool_entry(entry) -> bool:
    if not isinstance(entry, dict) or not all(isinstance(entry.get(key), kind)
                                              for key, kind in SPOOL_ENTRY_KEYS.items()):
        return False
    try:
        dt.datetime.fromisoformat(entry["at"])
    except ValueError:
        return False
    return len(entry["sighting"]) == 2


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
        if spool_path and os.path.exists(spool_path):
            self._load()

    def _load(self) -> None:
        with open(self.spool_path, encoding="utf-8", errors="replace") as spool:
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

    def pending(self) -> bool:
        return bool(self._blocks)

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
                descriptor = os.open(self.spool_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
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
        with self._lock:
            blocks = [entry for entry in self._blocks if id(entry) not in self._in_flight]
        for entry in blocks:
            try:
                block_id = store.record_block(
                    entry["login"], dt.datetime.fromisoformat(entry["at"]), source=entry.get("source", "policy"),
                    action=entry["action"], reason=entry["reason"], countries=entry["countries"],
                    trigger=entry["trigger"], sighting=tuple(entry["sighting"]),
                    replace_flag=entry.get("replaces_flag", False))
            except sa_exc.SQLAlchemyError as error:
                if not is_data_error(error):
                    raise  # the database is down again: everything stays for the next try
                self._set_aside(json.dumps(entry), f"refused by the database: {_first_line(error)}")
                self.discard_block(entry)
                continue
            self.discard_block(entry)
            log.warning("block of %s decided during the database outage is now written%s", entry["login"],
                        "" if block_id else " (it was blocked already)")
            if block_id is not None:
                on_new_block(entry)

    def release_block(self, entry: dict) -> None:
        """The block's own transaction failed: replay it like any other."""
        with self._lock:
            self._in_flight.discard(id(entry))

    def discard_block(self, entry: dict) -> None:
        """Forget a spooled block that is in the database now."""
        with self._lock:
            self._in_flight.discard(id(entry))
            kept = [block for block in self._blocks if block is not entry]
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
            descriptor = os.open(self.spool_path + ".rejected", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            with open(descriptor, "a", encoding="utf-8") as rejected:
                rejected.write(line.rstrip("\n") + "\n")
        except OSError as error:
            log.error("cannot write %s.rejected: %s", self.spool_path, error.strerror or error)

    def _rewrite_spool(self) -> None:
        if not self.spool_path:
            return
        directory = os.path.dirname(os.path.abspath(self.spool_path))
        temporary = None
        try:
            # A new file of our own (never a name someone could have put a link at), then renamed over.
            descriptor, temporary = tempfile.mkstemp(prefix=".spool-", dir=directory)
            with open(descriptor, "w", encoding="utf-8") as spool:
                spool.writelines(json.dumps(entry) + "\n" for entry in self._blocks)
                spool.flush()
                os.fsync(spool.fileno())
            os.replace(temporary, self.spool_path)
        except OSError as error:
            if temporary is not None and os.path.exists(temporary):
                os.unlink(temporary)
            log.error("spool %s cannot be rewritten (%s): blocks already in the database may be written "
                      "again at the next start (harmless)", self.spool_path, error.strerror or error)


class HistoryCache:
    """A bounded map login -> AccountHistory, least recently used out first.

    Each entry remembers when the database read it came from began: a daemon
    decides on an entry without reading the database again while it is younger
    than HISTORY_MAX_AGE and the poll of changes (PolicyService.poll_changes)
    is keeping it current."""

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
        self._login_workers: Optional[concurrent.futures.ThreadPoolExecutor] = None  # Dovecot's logins
        self._login_workers_lock = threading.Lock()
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
                    self._database_failed(_first_line(error))
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
            log.debug("poll of database changes failed: %s", _first_line(error))
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
            self._database_failed(_first_line(error), on_write=True)
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

    def answer_login(self, request: PolicyRequest) -> bool:
        """Whether a Dovecot login is refused: decided like a Postfix request,
        within DB_ANSWER_DEADLINE whatever the database does (then from memory:
        an account known to be blocked is refused, any other gets in)."""
        ticket = RequestTicket(request)
        with self._login_workers_lock:
            if self._login_workers is None:
                self._login_workers = concurrent.futures.ThreadPoolExecutor(DOVECOT_WORKERS, "pcc-dovecot")
        answer = self._login_workers.submit(self.answer, request, None, ticket)
        try:
            action = answer.result(timeout=DB_ANSWER_DEADLINE)
        except concurrent.futures.TimeoutError:
            action = self.answer_late(ticket)
        except Exception:  # a bug costs one answer, never the listener, and never opens the blocked list
            action = self.answer_after_error(request)
        return action == self.settings.block_reply

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
                  "decided from memory): %s", request.login, request.client_address, _first_line(error))
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
            log.error("writing what was decided during the outage failed, will try again: %s", _first_line(error))

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


def is_data_error(error: BaseException) -> bool:
    """The database refused this request's values (too long, not encodable...):
    a fault of one request, not an outage of the database."""
    return isinstance(error, (sa_exc.DataError, sa_exc.IntegrityError))


def _first_line(error: BaseException) -> str:
    original = getattr(error, "orig", None) or error
    text = str(original).strip().splitlines()
    return f"{type(original).__name__}: {text[0] if text else ''}"


# Once a request has begun, all of it must arrive within this many seconds
# (or idle_timeout, if shorter): Postfix sends a request in one go, and a client
# that trickles bytes must not hold a connection for ever.
REQUEST_DEADLINE = 30.0
# How long a connection's thread keeps the socket open for the Watchdog's
# answer (from memory: it takes milliseconds, a spool fsync included).
LATE_ANSWER_WAIT = 10.0


class PolicyHandler(socketserver.BaseRequestHandler):
    """One Postfix connection: a loop of requests, each ended by an empty line.

    Reads the socket itself rather than through a buffered file, so that the
    time limits hold for a whole request, not for each recv().
    """

    def setup(self) -> None:
        self._buffer = b""
        self._started: Optional[float] = None  # when the request being read began
        self._reply_lock = threading.Lock()
        self._answered = False
        self._late_answer_sent = threading.Event()  # the Watchdog is done with this socket
        self.ticket: Optional[RequestTicket] = None  # the request being answered, for the Watchdog

    def handle(self) -> None:
        server = self.server
        peer = f"{self.client_address[0]}:{self.client_address[1]}"
        while not server.stopping.is_set():
            lines = self._read_request(peer)
            if lines is None:
                return
            try:
                self._answered = False
                began = self._started or time.monotonic()
                reply = server.answer(lines, self)
                if not self._claim_reply():
                    # The Watchdog answers this one and closes the connection;
                    # returning now would close the socket under it.
                    self._late_answer_sent.wait(LATE_ANSWER_WAIT)
                    return
                server.service.metrics.answered(reply, time.monotonic() - began)
                self.request.sendall(reply)
            except OSError as error:
                log.info("connection from %s: cannot send the answer: %s", peer, error)
                return
            finally:
                self._finish_request()

    def _claim_reply(self) -> bool:
        """True for whichever of this thread and the Watchdog answers first."""
        with self._reply_lock:
            if self._answered:
                return False
            self._answered = True
            return True

    def answer_late(self, ticket: RequestTicket) -> None:
        """Called by the Watchdog while this connection's thread waits for the
        database: answer (with the decision if it is made, else from memory),
        then close, so that Postfix sends its next
        request on a new connection instead of waiting behind this one."""
        if ticket is not self.ticket or not self._claim_reply():
            return  # that request was answered, and this connection is on to another
        try:
            self._send_late_answer()
        finally:
            self._late_answer_sent.set()

    def _send_late_answer(self) -> None:
        try:
            action = self.server.service.answer_late(self.ticket)
        except Exception:  # never leave Postfix without an answer
            action = self.server.service.answer_after_error(self.ticket.request)
        try:
            reply = format_reply(action)
            self.server.service.metrics.answered(reply, time.monotonic() - (self._started or time.monotonic()))
            self.request.sendall(reply)
            self.request.shutdown(socket.SHUT_RDWR)
        except OSError as error:
            log.info("connection from %s: cannot send the answer: %s", self.client_address[0], error)

    def _read_request(self, peer: str) -> Optional[list]:
        """The lines of the next request, or None when the connection should end.
        A request is in flight from its first byte until it is answered."""
        settings = self.server.settings
        limit = settings.max_request_bytes
        deadline = min(REQUEST_DEADLINE, settings.idle_timeout)
        lines: list = []
        size = 0
        while True:
            newline = self._buffer.find(b"\n")
            if newline < 0:
                if size + len(self._buffer) > limit:
                    log.warning("connection from %s: request larger than max_request_bytes (%d), closing",
                                peer, limit)
                    return self._abandon()
                if self._buffer:
                    self._start_request()
                problem = self._receive(deadline, settings.idle_timeout)
                if problem:
                    # a client closing between requests is normal; anything else is worth a line
                    level = logging.DEBUG if problem == "closed" else logging.INFO
                    if self._started is not None:
                        level = logging.WARNING
                    log.log(level, "connection from %s %s", peer, problem)
                    return self._abandon()
                continue
            raw, self._buffer = self._buffer[:newline], self._buffer[newline + 1:]
            size += newline + 1
            if size > limit:
                log.warning("connection from %s: request larger than max_request_bytes (%d), closing", peer, limit)
                return self._abandon()
            line = raw.decode("utf-8", "replace").rstrip("\r")
            if line:
                self._start_request()
                lines.append(line)
            elif lines:
                return lines
            elif not self._buffer:
                self._finish_request()  # a stray empty line between requests

    def _receive(self, deadline: float, idle_timeout: float) -> Optional[str]:
        """Append what the client sends to the buffer; say what went wrong, if anything."""
        if self._started is None:
            timeout = idle_timeout
        else:
            timeout = self._started + deadline - time.monotonic()
            if timeout <= 0:
                return f"did not complete its request within {deadline:.0f} s, closing"
        self.request.settimeout(timeout)
        try:
            chunk = self.request.recv(65536)
        except (socket.timeout, TimeoutError):
            if self._started is None:
                return f"idle for {idle_timeout:.0f} s, closing"
            return f"did not complete its request within {deadline:.0f} s, closing"
        except OSError as error:
            return f"failed: {error}"
        if not chunk:
            return "closed in the middle of a request" if self._started is not None else "closed"
        self._buffer += chunk
        return None

    def _start_request(self) -> None:
        if self._started is None:
            self._started = time.monotonic()
            self.server.in_flight.enter()

    def _finish_request(self) -> None:
        if self._started is not None:
            self._started = None
            self.server.in_flight.leave()

    def _abandon(self) -> None:
        self._finish_request()
        return None


class Watchdog:
    """Makes sure every request is answered within DB_ANSWER_DEADLINE seconds.

    Requests are answered in their connection's thread, database work included
    (no hand-over to another thread: that cost a quarter of the throughput).
    This one thread looks at the requests in flight twenty times a second and
    answers, from memory, any that the database has kept too long."""

    def __init__(self):
        self._deadlines: dict = {}  # handler -> (monotonic deadline, its request's ticket)
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None

    def watch(self, handler: PolicyHandler) -> None:
        with self._lock:
            self._deadlines[handler] = (time.monotonic() + DB_ANSWER_DEADLINE, handler.ticket)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pcc-watchdog", daemon=True)
                self._thread.start()

    def unwatch(self, handler: PolicyHandler) -> None:
        with self._lock:
            self._deadlines.pop(handler, None)

    def _run(self) -> None:
        while True:
            time.sleep(0.05)
            now = time.monotonic()
            with self._lock:
                late = [(handler, ticket) for handler, (deadline, ticket) in self._deadlines.items()
                        if deadline <= now]
                for handler, _ticket in late:
                    del self._deadlines[handler]
            for handler, ticket in late:  # the ticket: that request, not a later one on the connection
                handler.answer_late(ticket)


class InFlight:
    """Counts requests between their first line and their answer."""

    def __init__(self):
        self._count = 0
        self._changed = threading.Condition()

    def enter(self) -> None:
        with self._changed:
            self._count += 1

    def leave(self) -> None:
        with self._changed:
            self._count -= 1
            self._changed.notify_all()

    def wait_until_none(self, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self._count <= 0, timeout=timeout)


def client_allowed(address_text: str, allowed_clients: tuple) -> bool:
    """Whether a peer may talk to pcc: anyone when allowed_clients is empty."""
    if not allowed_clients:
        return True
    try:
        address = ipaddress.ip_address(address_text.split("%")[0])
    except ValueError:
        return False
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in allowed_clients)


class PolicyServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024

    def __init__(self, settings: Settings, service: PolicyService):
        self.settings = settings
        self.service = service
        self.stopping = threading.Event()
        self.in_flight = InFlight()
        self.watchdog = Watchdog()
        self._connections = threading.BoundedSemaphore(settings.max_connections)
        infos = socket.getaddrinfo(settings.host, settings.port, type=socket.SOCK_STREAM)
        self.address_family = infos[0][0]
        super().__init__(infos[0][4][:2], PolicyHandler)

    def answer(self, lines: list, handler: Optional[PolicyHandler] = None) -> bytes:
        ticket = None
        try:
            ticket = RequestTicket(parse_request(lines))
            if handler is not None:
                handler.ticket = ticket
                self.watchdog.watch(handler)
            return format_reply(self.service.answer(ticket.request, ticket=ticket))
        except Exception:  # a bug must cost one answer, never the daemon, and never open the blocked list
            return format_reply(self.service.answer_after_error(ticket.request if ticket else None))
        finally:
            if handler is not None:
                self.watchdog.unwatch(handler)

    def verify_request(self, request, client_address) -> bool:
        if client_allowed(client_address[0], self.settings.allowed_clients):
            return True
        log.warning("connection from %s refused: not in [server] allowed_clients", client_address[0])
        return False

    def process_request(self, request, client_address) -> None:
        if not self._connections.acquire(blocking=False):
            log.warning("connection from %s refused: max_connections (%d) reached",
                        client_address[0], self.settings.max_connections)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except RuntimeError as error:  # no thread could be started
            self._connections.release()
            log.error("connection from %s refused: %s", client_address[0], error)
            self.shutdown_request(request)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connections.release()

    def handle_error(self, request, client_address) -> None:
        log.exception("connection from %s: internal error", client_address[0])


# --- Dovecot's authentication policy: the same service for logins --------------
#
# Dovecot posts JSON before a login's password is checked (?command=allow), once
# more after a good password, and reports the outcome (?command=report, with
# "success").  pcc answers {"status": -1, "msg": reason} for a blocked account,
# else {"status": 0}; a successful login counts its country when count_logins
# is on.  Failed logins never count: anybody could otherwise lock anybody out.

# Dovecot's bodies are a few hundred bytes; anything much larger is not Dovecot.
DOVECOT_MAX_BODY = 16384
# Logins answered at once; more wait for a worker (each answered within
# DB_ANSWER_DEADLINE all the same, from memory when the database is slow).
DOVECOT_WORKERS = 32
# Dovecot's protocol names -> the door named in log lines, blocks and mails.
DOVECOT_DOORS = {"imap": "imap", "pop3": "pop3", "smtp": "smtp", "submission": "smtp", "lmtp": "lmtp",
                 "doveadm": "doveadm", "sieve": "sieve", "managesieve": "sieve"}


def dovecot_login_request(command: str, fields: dict) -> Optional[PolicyRequest]:
    """The PolicyRequest for one Dovecot call, or None when it asks nothing of
    the rules (a report of a failed login)."""
    if command == "report" and fields.get("success") is not True:
        return None
    protocol = str(fields.get("protocol", ""))
    attributes = {name: _clean_value(str(value)) for name, value in fields.items() if name != "pwhash"}
    attributes["command"] = command
    return PolicyRequest(request=DOVECOT_LOGIN, sasl_username=_clean_value(str(fields.get("login", ""))),
                         client_address=_clean_value(str(fields.get("remote", ""))),
                         door=DOVECOT_DOORS.get(protocol.lower(), escape_controls(protocol[:16]) or "unknown"),
                         check_only=command == "allow", attributes=attributes)


class DovecotPolicyHandler(http.server.BaseHTTPRequestHandler):
    """One HTTP request of Dovecot's auth policy client."""

    protocol_version = "HTTP/1.1"  # Dovecot keeps its connections alive
    timeout = METRICS_TIMEOUT  # a client that stops sending does not keep its thread

    def do_POST(self) -> None:
        server = self.server
        settings = server.service.settings
        command = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query).get("command", [""])[0]
        if not self._authorised(settings.dovecot_api_header):
            self._refuse(401, "unauthorised", f"without the [dovecot] api_header (command={command[:20]!r})")
            return
        if command not in ("allow", "report"):
            self._refuse(400, "bad_request", f"unknown command {command[:20]!r}")
            return
        fields = self._json_body()
        if fields is None:
            return
        request = dovecot_login_request(command, fields)
        if request is None or (command == "report" and not settings.count_logins):
            server.service.metrics.dovecot(command, "not_counted")
            self._reply(200, {"status": 0})
            return
        refused = server.service.answer_login(request)
        server.service.metrics.dovecot(command, "refused" if refused else "allowed")
        self._reply(200, {"status": -1, "msg": settings.reason or "account blocked"} if refused else {"status": 0})

    def do_GET(self) -> None:
        self._refuse(405, "bad_request", "GET (Dovecot POSTs)")

    def _authorised(self, api_header: str) -> bool:
        if not api_header:
            return True
        name, _colon, value = api_header.partition(":")
        sent = self.headers.get(name.strip(), "")
        return hmac.compare_digest(sent.strip().encode(), value.strip().encode())

    def _json_body(self) -> Optional[dict]:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._refuse(411, "bad_request", "no Content-Length")
            return None
        if not 0 <= length <= DOVECOT_MAX_BODY:
            self._refuse(413, "bad_request", f"a body of {length} bytes (at most {DOVECOT_MAX_BODY})")
            return None
        body = self.rfile.read(length)
        try:
            fields = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            fields = None
        if not isinstance(fields, dict):
            self._refuse(400, "bad_request", f"a body that is not a JSON object: {body[:60]!r}")
            return None
        return fields

    def _refuse(self, code: int, status: str, what: str) -> None:
        log.warning("dovecot policy request from %s refused (HTTP %d): %s", self.client_address[0], code, what)
        self.server.service.metrics.dovecot("-", status)
        # Closed after the answer: the body, if any, was not read.
        self._reply(code, {"error": http.HTTPStatus(code).phrase}, close=True)

    def _reply(self, code: int, answer: dict, close: bool = False) -> None:
        body = json.dumps(answer).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_arguments) -> None:  # pcc logs decisions and refusals itself
        pass


class DovecotPolicyServer(http.server.ThreadingHTTPServer):
    """Dovecot's auth policy port: a thin adapter onto the PolicyService."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, settings: Settings, service: "PolicyService"):
        self.service = service
        self.allowed_clients = settings.allowed_clients
        infos = socket.getaddrinfo(settings.host, settings.dovecot_policy_port, type=socket.SOCK_STREAM)
        self.address_family = infos[0][0]
        super().__init__(infos[0][4][:2], DovecotPolicyHandler)

    def verify_request(self, request, client_address) -> bool:
        if client_allowed(client_address[0], self.allowed_clients):
            return True
        log.warning("dovecot policy connection from %s refused: not in [server] allowed_clients", client_address[0])
        return False

    def handle_error(self, request, client_address) -> None:
        log.exception("dovecot policy connection from %s: internal error", client_address[0])


# ---------------------------------------------------------------------------
# Admin command line
# ---------------------------------------------------------------------------


class AdminError(Exception):
    """An admin command cannot do what was asked; the message says why."""


# A held message whose arrival is this much older than the block was held by
# something else (the clocks of the database and Postfix hosts may differ a little).
HOLD_CLOCK_SKEW = dt.timedelta(seconds=60)


class PostfixQueue:
    """The Postfix hold queue, through postqueue, postcat and postsuper."""

    def __init__(self, config_directory: str = ""):
        self.config_directory = config_directory

    def held_by(self, login: str, since: dt.datetime) -> list:
        """Queue IDs of held messages submitted by `login` (its SASL login, as the
        queue file records it, whatever the envelope sender) since `since`."""
        earliest = (since - HOLD_CLOCK_SKEW).timestamp()
        held = []
        for line in self._run("postqueue", "-j").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("queue_name") != "hold" or entry.get("arrival_time", 0) < earliest:
                continue
            if self._sasl_username(entry["queue_id"]) == login:
                held.append(entry["queue_id"])
        return held

    def release(self, queue_ids: list) -> int:
        return self._postsuper("-H", queue_ids, r"Released from hold: (\d+)")

    def delete(self, queue_ids: list) -> int:
        return self._postsuper("-d", queue_ids, r"Deleted: (\d+)")

    def _sasl_username(self, queue_id: str) -> Optional[str]:
        try:
            envelope = self._run("postcat", "-e", "-q", queue_id)
        except AdminError:
            return None  # the message left the queue meanwhile
        found = re.search(r"^named_attribute: sasl_username=(.*)$", envelope, re.MULTILINE)
        return normalise_login(found.group(1)) if found else None

    def _postsuper(self, option: str, queue_ids: list, pattern: str) -> int:
        if not queue_ids:
            return 0
        report = self._run("postsuper", option, "-", stdin="\n".join(queue_ids) + "\n", report_stderr=True)
        return sum(int(number) for number in re.findall(pattern, report))

    def _run(self, program: str, *arguments: str, stdin: Optional[str] = None, report_stderr: bool = False) -> str:
        command = [program] + (["-c", self.config_directory] if self.config_directory else []) + list(arguments)
        try:
            result = subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=120)
        except FileNotFoundError:
            raise AdminError(f"{program} not found: is Postfix installed and on PATH?") from None
        except subprocess.TimeoutExpired:
            raise AdminError(f"{' '.join(command)} did not finish within 120 s") from None
        if result.returncode != 0:
            detail = (result.stderr.strip().splitlines() or ["no message"])[-1]
            raise AdminError(f"{' '.join(command)} failed: {detail}")
        return result.stderr if report_stderr else result.stdout


def _when(moment: Optional[dt.datetime]) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


class Admin:
    """The administrator's commands.  Each prints what it did; those that change
    state notify the `notice` addresses.  All are safe to run while the daemon
    serves, and safe to repeat."""

    def __init__(self, settings: Settings, store: Store, notifier: Notifier, postfix: PostfixQueue,
                 out=None):
        self.settings = settings
        self.store = store
        self.notifier = notifier
        self.postfix = postfix
        self.out = out or sys.stdout

    def say(self, text: str = "") -> None:
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
            first = f"{login:<32} {_block_state(block):<16} {_when(since):<20} {block.action:<7} {block.source:<15} "
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
        counted = _countries_in_window(history, self.settings, now)
        limit = self.settings.how_many_different_countries
        blocked_since = history.blocked_since
        state = "not blocked"
        if history.enforced_block:
            state = f"blocked since {_when(blocked_since)} UTC"
        elif blocked_since:
            state = f"would be blocked since {_when(blocked_since)} UTC (flagged in monitor mode; mail flows)"
        if as_json:
            self.say(json.dumps({
                "login": login, "blocked": blocked_since is not None, "state": state,
                "blocked_since": blocked_since.isoformat() if blocked_since else None,
                "counting_since": history.counting_since.isoformat() if history.counting_since else None,
                "countries_in_window": [seen.as_json() for seen in counted.values()],
                "threshold": limit, "window_days": self.settings.in_how_much_time_in_days,
                "travel_passes": [_pass_json(travel_pass, now) for travel_pass in passes],
                "blocks": [_block_json(block) for block in blocks],
            }, indent=2))
            return
        self.say(f"{login}: {state}")
        self.say(f"countries in the last {self.settings.in_how_much_time_in_days:g} days: {len(counted)} "
                 f"(blocked at more than {limit}"
                 + (f"; {limit - len(counted) + 1} more would block)" if not blocked_since else ")"))
        for seen in sorted(counted.values(), key=lambda s: s.first_seen):
            self.say(f"  {seen.country}  last IP {seen.last_ip:<39}  first seen {_when(seen.first_seen)}"
                     f"  last seen {_when(seen.last_seen)}")
        for travel_pass in passes:
            status = "active" if travel_pass.expires_at > now else "expired"
            self.say(f"travel pass {travel_pass.country}: {status} until {_when(travel_pass.expires_at)} UTC "
                     f"(granted {_when(travel_pass.granted_at)} by {travel_pass.granted_by})")
        for block in blocks:
            ended = f", ended {_when(block.unblocked_at)}" if block.unblocked_at else " (in force)"
            self.say(f"block #{block.id}: {_when(block.blocked_at)} by {block.source}, {block.action}{ended}: "
                     f"{block.reason}")

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
                      f"until {_when(expires_at)} UTC")
        self.say(report)
        body = f"{report}.\nGranted by {_who()} on {socket.gethostname()} at {_when(now)} UTC.\n"
        self._notify(f"pcc: travel pass for {login} ({listed})", body)

    def block(self, login: str, now: dt.datetime) -> None:
        exempt = exempt_login_reason(login, self.settings)
        if exempt is not None:
            raise AdminError(f"{login} is not blocked: pcc never blocks it ({exempt}); change that first")
        _account, sightings, _blocks = self._account(login)
        recent = _countries_in_window(AccountHistory(sightings=tuple(sightings)), self.settings, now)
        reason = "blocked by an administrator"
        block_id = self.store.record_block(login, now, source="admin", action=self.settings.action,
                                           reason=reason, countries=[s.as_json() for s in recent.values()],
                                           replace_flag=True)
        if block_id is None:
            self.say(f"{login} is already blocked; nothing changed")
            return
        self.say(f"{login} blocked: its messages now get {self.settings.action}")
        subject, body = block_notice(self.settings, login, recent.values(), reason, f"admin ({_who()})",
                                     self.settings.action)
        self._notify(subject, body)

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
                    f"at {_when(now)} UTC.\n\n" + "\n".join(report) + "\n")
            self._notify(f"pcc: account {login} unblocked", body)

    def _say_line(self, line: str) -> str:
        self.say(line)
        return line

    def _handle_held_mail(self, login: str, blocked_at: dt.datetime, held: str) -> str:
        queue_ids = self.postfix.held_by(login, blocked_at)
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

    def _known_account(self, login: str):
        """(its blocked-list row, sightings, blocks, travel passes) of an account
        pcc knows anything about."""
        account, sightings, blocks = self._account(login)
        passes = self.store.travel_passes(login)
        if account is None and not sightings and not blocks and not passes:
            raise AdminError(f"unknown login {login}: pcc has never counted nor blocked it")
        return account, sightings, blocks, passes

    def _notify(self, subject: str, body: str) -> None:
        if self.settings.notice and not self.notifier.send_now(subject, body):
            self.say(f"warning: the notification to {', '.join(self.settings.notice)} was not sent")


# --- Replaying Postfix logs: what would pcc have done? ----------------------

# One authenticated submission as Postfix's smtpd logs it, e.g.
#   Nov 25 18:43:13 mx postfix/submission/smtpd[1234]: 4F3A21C0: client=unknown[203.0.113.9],
#   sasl_method=LOGIN, sasl_username=alice@example.com
# with a classic syslog time stamp (no year) or an RFC 3339 one (journald,
# rsyslog high precision), under any postfix*/.../smtpd service name.
_SUBMISSION_LINE = re.compile(
    r"^(?:(?P<classic>[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d)|(?P<iso>\d{4}-\d\d-\d\dT\S+)) \S+ "
    r"postfix[^\s/\[]*(?:/[^\s/\[]+)*/smtpd\[\d+\]: [0-9A-Za-z]+: "
    r"client=[^\[\s]*\[(?:IPv6:)?(?P<ip>[^\]]+)\](?::\d+)?, (?:.*?, )?sasl_username=(?P<login>[^,\s]*)"
)
# A successful Dovecot login (replayed when [dovecot] count_logins = yes), as
# syslog or Dovecot's own log_path has it:
#   Nov 25 18:40:02 mx dovecot: imap-login: Login: user=<alice@example.com>, method=PLAIN, rip=203.0.113.9, ...
#   Nov 25 18:40:02 imap-login: Info: Logged in: user=<alice@example.com>, method=PLAIN, rip=203.0.113.9, ...
_DOVECOT_LOGIN_LINE = re.compile(
    r"^(?:(?P<classic>[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d)|(?P<iso>\d{4}-\d\d-\d\dT\S+)) "
    r"(?:\S+ dovecot(?:\[\d+\])?: )?(?P<door>imap|pop3|submission|managesieve)-login: (?:Info: )?"
    r"(?:Login|Logged in): user=<(?P<login>[^>]*)>, (?:.*?, )?rip=(?P<ip>[^,\s]+)"
)
_MONTHS = {name: number for number, name in enumerate(
    "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split(), start=1)}


class LogClock:
    """Turns log time stamps into aware UTC datetimes.

    Classic syslog stamps have no year: the first one is taken to be in the
    current year (the previous one if that would put it in the future), and the
    year goes up each time the month goes back (December, then January).
    Stamps without a zone are local time, as syslog writes them."""

    def __init__(self, today: dt.datetime):
        self.today = today
        self.year: Optional[int] = None
        self.month = 0

    def parse(self, classic: Optional[str], iso: Optional[str]) -> dt.datetime:
        if iso:
            moment = dt.datetime.fromisoformat(iso)
        else:
            month = _MONTHS[classic[:3]]
            if self.year is None:
                self.year = self.today.year - (1 if month > self.today.month else 0)
            elif month < self.month:
                self.year += 1
            self.month = month
            moment = dt.datetime(self.year, month, int(classic[4:6]), int(classic[7:9]),
                                 int(classic[10:12]), int(classic[13:15]))
        if moment.tzinfo is None:
            moment = moment.astimezone()  # local time
        return moment.astimezone(UTC)  # OverflowError for a stamp near year 1 or 9999: the caller skips the line


class MemoryStore:
    """A throw-away in-memory database with Store's interface, for --replay.

    The replay runs the daemon's own service and decision code against it, so
    the live database is never touched; it holds one entry per account and
    country, whatever the number of log lines."""

    def __init__(self):
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
            self.record_sighting(login, *sighting, now)
        flagged = login in self.blocks and self.blocks[login]["action"] == MONITOR_ACTION
        if login in self.blocks and not (replace_flag and flagged and action != MONITOR_ACTION):
            return None
        self.blocks[login] = {"login": login, "blocked_at": now, "reason": reason, "action": action,
                              "countries": countries, "log_line": (trigger or {}).get("log_line", "")}
        return len(self.blocks)


class ReplayService(PolicyService):
    """PolicyService on a MemoryStore, answering in the caller's thread and
    remembering, per account, the most countries it saw within the window."""

    def __init__(self, settings: Settings, geoip: GeoIP):
        quiet = dataclasses.replace(settings, notice=())  # a replay never emails anyone
        super().__init__(quiet, MemoryStore(), geoip, Notifier(quiet))
        self.most_countries: dict = {}

    def _decide_counted(self, request: PolicyRequest, now: dt.datetime, ticket: RequestTicket) -> Decision:
        decision = super()._decide_counted(request, now, ticket)
        if decision.counted:
            login = request.login
            self.most_countries[login] = max(self.most_countries.get(login, 0), len(decision.countries))
        return decision


@dataclass
class ReplayResult:
    settings: Settings
    files: list
    lines: int = 0
    submissions: int = 0
    unparseable: int = 0
    first: Optional[dt.datetime] = None
    last: Optional[dt.datetime] = None
    service: Optional[ReplayService] = None

    def country_buckets(self) -> dict:
        buckets = {"1": 0, "2": 0, "3": 0, "4": 0, "5+": 0}
        for most in self.service.most_countries.values():
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
                 "countries": block["countries"], "log_line": block["log_line"]}
                for block in self.service.store.blocks.values()
            ],
            "accounts_by_most_countries": self.country_buckets(),
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
    result = ReplayResult(settings, list(paths), service=ReplayService(settings, geoip))
    decide_request = result.service.decide_request
    clock = LogClock(today or utcnow())
    for path in paths:
        try:
            log_file = _open_log(path)
        except OSError as error:
            raise AdminError(f"cannot read {path}: {error.strerror}") from None
        with log_file:
            for line in log_file:
                result.lines += 1
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
                if when is None or not found["login"]:
                    result.unparseable += 1
                    continue
                result.submissions += 1
                result.first = result.first or when
                result.last = when
                decide_request(_replayed_request(found, line), when)
    return result


def _replayed_request(found: re.Match, line: str) -> PolicyRequest:
    attributes = {"log_line": line.rstrip("\n")}
    if "door" not in found.groupdict():
        return PolicyRequest(request="smtpd_access_policy", sasl_username=found["login"],
                             client_address=found["ip"], attributes=attributes)
    door = DOVECOT_DOORS.get(found["door"], found["door"])
    return PolicyRequest(request=DOVECOT_LOGIN, sasl_username=found["login"], client_address=found["ip"],
                         door=door, attributes=attributes)


def print_replay_report(result: ReplayResult, out) -> None:
    settings = result.settings
    span = f" from {_when(result.first)} to {_when(result.last)} UTC" if result.first else ""
    logins = " and Dovecot logins" if settings.count_logins else ""
    print(f"Replayed {len(result.files)} file(s): {result.lines} lines, {result.submissions} authenticated "
          f"submissions{logins}{span}; {result.unparseable} unparseable lines skipped.", file=out)
    print(f"Rule: more than {settings.how_many_different_countries} countries in "
          f"{settings.in_how_much_time_in_days:g} days -> {settings.action}.", file=out)
    blocks = list(result.service.store.blocks.values())
    print(f"\nWould have blocked {len(blocks)} account{'s' if len(blocks) != 1 else ''}:", file=out)
    for block in blocks:
        places = ", ".join(f"{seen['country']} {seen['last_ip']}" for seen in block["countries"])
        print(f"  {block['login']}  at {_when(block['blocked_at'])} UTC  from {places}", file=out)
        print(f"    why: {block['reason']}", file=out)
        print(f"    {block['log_line']}", file=out)
    print(f"\nAccounts by the most countries seen within {settings.in_how_much_time_in_days:g} days:", file=out)
    for bucket, count in result.country_buckets().items():
        print(f"  {bucket:>2} {'country' if bucket == '1' else 'countries':<9} {count}", file=out)


def _block_json(block: Block) -> dict:
    return {
        "id": block.id, "login": block.login, "blocked_at": block.blocked_at.isoformat(),
        "source": block.source, "action": block.action, "reason": block.reason,
        "countries": block.countries, "trigger": block.trigger,
        "unblocked_at": block.unblocked_at.isoformat() if block.unblocked_at else None,
    }


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
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        return f"uid {os.getuid()}"


# ---------------------------------------------------------------------------
# Logging and the command line
# ---------------------------------------------------------------------------


class MaskingFormatter(logging.Formatter):
    """Formats a record, then blanks out every secret (database passwords)."""

    secrets: set = set()

    def format(self, record: logging.LogRecord) -> str:
        return mask_secrets(super().format(record), self.secrets)


def mask_secrets(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


class _QueueHandler(logging.handlers.QueueHandler):
    """Hands records to the QueueListener's thread, which formats and writes
    them.  The queue is thread-safe: no handler lock (the stock handle() takes
    one, and formats the message under it), so the connection threads never
    queue behind each other for the line every decision writes."""

    def handle(self, record: logging.LogRecord) -> bool:
        if self.filter(record):
            self.enqueue(record)
            return True
        return False


def queue_logging() -> logging.handlers.QueueListener:
    """The daemon's logging: records go through a queue to the handlers set up
    by setup_logging, in a thread of their own.  Stop the listener to flush."""
    records: queue.SimpleQueue = queue.SimpleQueue()
    listener = logging.handlers.QueueListener(records, *log.handlers, respect_handler_level=True)
    handler = _QueueHandler(records)
    handler.targets = tuple(log.handlers)  # where its records end up (refuse_to_start looks)
    log.handlers[:] = [handler]
    # The file and line of every log call (a stack walk per record) are not in
    # pcc's log format: the logging documentation's way to skip finding them.
    logging._srcfile = None
    listener.start()
    return listener


def setup_logging(verbose: bool, to_stderr: bool, secrets: Iterable[str] = ()) -> None:
    MaskingFormatter.secrets = {secret for secret in secrets if secret}
    if not to_stderr and os.path.exists("/dev/log"):
        handler: logging.Handler = logging.handlers.SysLogHandler(
            address="/dev/log", facility=logging.handlers.SysLogHandler.LOG_MAIL
        )
        handler.setFormatter(MaskingFormatter("pcc[%(process)d]: %(levelname)s %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(MaskingFormatter("%(asctime)s pcc[%(process)d]: %(levelname)s %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False


def secrets_of(settings: Settings) -> list:
    """What must never reach a log line: the database password and the
    credentials in the Dovecot api_header."""
    secrets = []
    credentials = settings.dovecot_api_header.partition(":")[2].strip()
    if len(credentials) >= 8:  # a short value would mask innocent words too
        secrets.append(credentials)
    try:
        password = sa.engine.make_url(settings.dbcon).password
    except sa_exc.ArgumentError:
        return secrets
    return secrets + ([str(password)] if password else [])


def run_daemon(settings: Settings) -> int:
    _warn_if_readable(settings)
    _raise_file_limit(settings.max_connections + 256)
    threading.stack_size(512 * 1024)  # thousands of idle Postfix connections stay cheap
    geoip = GeoIP(settings.geoip_database)
    _warn_about_geoip(geoip)
    service = PolicyService(settings, Store(settings.dbcon), geoip, Notifier(settings),
                            OutageJournal(settings.spool_file))
    if settings.metrics_port is not None:
        service.metrics = Metrics(service)
    try:
        service.ensure_database()
        service.store.prove_writable()
    except sa_exc.SQLAlchemyError as error:
        fault = permanent_database_fault(settings, error)
        if fault is not None:  # it would protect nobody: refuse to run
            refuse_to_start(f"pcc: {fault}")
            return 1
        service.database_unreachable_at_start(_first_line(error))
    listeners = open_listeners(settings, service)
    if listeners is None:
        return 1
    server, dovecot = listeners
    threading.Thread(target=housekeeping, args=(service, server.stopping), name="pcc-housekeeping",
                     daemon=True).start()
    service.start_background(server.stopping)

    def on_stop(_signum, _frame):
        if not server.stopping.is_set():
            server.stopping.set()
            threading.Thread(target=server.shutdown, daemon=True).start()
            if dovecot is not None:
                threading.Thread(target=dovecot.shutdown, daemon=True).start()

    def on_reload(_signum, _frame):
        threading.Thread(target=reload_settings, args=(server,), daemon=True).start()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_reload)
    extra_ports = [f"metrics on port {settings.metrics_port}"] if settings.metrics_port else []
    if settings.dovecot_policy_port:
        extra_ports.append(f"Dovecot auth policy on port {settings.dovecot_policy_port}, logins "
                           f"{'counted' if settings.count_logins else 'checked against the blocked list only'}")
    log.info("pcc %s listening on %s port %d%s; database %s; GeoIP %s; %s", __version__, settings.host,
             settings.port, f" ({'; '.join(extra_ports)})" if extra_ports else "",
             safe_url(settings.dbcon), geoip.description, describe_rules(settings))
    server.serve_forever(poll_interval=0.5)
    # Stopped: accept nothing new, answer the requests in flight, then exit.
    server.socket.close()
    if not server.in_flight.wait_until_none(timeout=20):
        log.warning("stopping with requests still unanswered after 20 s")
    service.stop_background()  # the sightings still in memory are written
    unwritten = service.sightings.waiting()
    if unwritten:
        log.error("stopping with %d sightings the database did not take (they are not counted)", unwritten)
    log.info("pcc stopped")
    service.store.dispose()
    return 0


def open_listeners(settings: Settings, service: PolicyService) -> Optional[tuple]:
    """(the policy server, the Dovecot server or None), or None when a port
    cannot be opened (logged).  The policy port opens last: a daemon that
    exits for want of another port never accepted a connection from Postfix."""
    if settings.metrics_port is not None:
        try:
            service.metrics.serve(settings.host, settings.metrics_port, settings.allowed_clients)
        except OSError as error:
            log.error("cannot serve metrics on %s:%s: %s", settings.host, settings.metrics_port,
                      error.strerror or error)
            return None
    dovecot = None
    if settings.dovecot_policy_port is not None:
        try:
            dovecot = DovecotPolicyServer(settings, service)
        except OSError as error:
            log.error("cannot listen for Dovecot on %s:%s: %s", settings.host, settings.dovecot_policy_port,
                      error.strerror or error)
            return None
    try:
        server = PolicyServer(settings, service)
    except OSError as error:
        log.error("cannot listen on %s:%s: %s", settings.host, settings.port, error.strerror or error)
        if dovecot is not None:
            dovecot.server_close()
        return None
    if dovecot is not None:
        threading.Thread(target=dovecot.serve_forever, name="pcc-dovecot", daemon=True).start()
    return server, dovecot


def refuse_to_start(line: str) -> None:
    """The one line that says why the daemon will not run: on standard error
    (supervisord and systemd keep it) and in the log."""
    print(mask_secrets(line, MaskingFormatter.secrets), file=sys.stderr, flush=True)
    handlers = [target for handler in log.handlers for target in getattr(handler, "targets", (handler,))]
    if not any(isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) is sys.stderr
               for handler in handlers):
        log.critical("%s", line)


# Database errors that no retry fixes: (MariaDB error number, or PostgreSQL
# SQLSTATE) -> what the administrator must do.
_PERMANENT_FAULTS = {
    1044: "grant the database to the user in [db] dbcon",
    1045: "check the user and password in [db] dbcon",
    1049: "create the database (CREATE DATABASE ...) or correct its name in [db] dbcon",
    1142: "GRANT SELECT, INSERT, UPDATE, CREATE ON <database>.* TO <user> (see README, Databases)",
    "28P01": "check the user and password in [db] dbcon",
    "28000": "allow the user in pg_hba.conf, or correct it in [db] dbcon",
    "3D000": "create the database (CREATE DATABASE ...) or correct its name in [db] dbcon",
    "42501": "GRANT SELECT, INSERT, UPDATE ON pcc's tables (and CREATE) TO the user (see README, Databases)",
}


_POSTGRESQL_CONNECTION_FAULTS = (
    ("password authentication failed", "28P01"),
    ("no pg_hba.conf entry", "28000"),
    ("role \"", "28000"),  # role "x" does not exist
    ("database \"", "3D000"),  # database "x" does not exist
)


def permanent_database_fault(settings: Settings, error: sa_exc.SQLAlchemyError) -> Optional[str]:
    """One line naming a fault that no retry fixes and its fix, or None for
    what may pass by itself (a server down or unreachable)."""
    original = getattr(error, "orig", None) or error
    url = sa.engine.make_url(settings.dbcon)
    if url.get_backend_name() == "sqlite":
        return _sqlite_fault(url.database or "", original)
    arguments = getattr(original, "args", None) or [None]
    # MariaDB's error number first (PyMySQL also sets a vague SQLSTATE such as 42000)
    code = arguments[0] if isinstance(arguments[0], int) else getattr(original, "sqlstate", None)
    if code is None:  # libpq reports a refused connection in words only
        code = next((state for words, state in _POSTGRESQL_CONNECTION_FAULTS if words in str(original)), None)
    fix = _PERMANENT_FAULTS.get(code)
    if fix is None:
        return None
    return f"database {safe_url(settings.dbcon)} refuses pcc: {_first_line(error)}: {fix}"


def _sqlite_fault(path: str, error: BaseException) -> Optional[str]:
    import grp
    import pwd

    text = str(error)
    if not any(word in text for word in ("readonly", "read-only", "unable to open", "disk I/O")):
        return None
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    user = pwd.getpwuid(os.geteuid()).pw_name
    group = grp.getgrgid(os.getegid()).gr_name
    try:
        if os.statvfs(directory).f_flag & os.ST_RDONLY:
            return f"{directory} is on a read-only file system: put [db] dbcon's SQLite file on a writable one"
    except OSError:
        pass
    for name in (path, path + "-wal", path + "-shm"):
        if os.path.exists(name) and not os.access(name, os.R_OK | os.W_OK):
            owner = pwd.getpwuid(os.stat(name).st_uid).pw_name
            return (f"{name} is owned by {owner} and not writable by user {user}: "
                    f"chown {user}:{group} {shlex.quote(name)}")
    if not os.access(directory, os.W_OK | os.X_OK):
        owner = pwd.getpwuid(os.stat(directory).st_uid).pw_name if os.path.exists(directory) else "nobody"
        return (f"{directory} is owned by {owner} and not writable by user {user} (SQLite writes its -wal and "
                f"-shm files there): chown {user}:{group} {shlex.quote(directory)}")
    return f"{path} cannot be written by user {user}: {text}"


def reload_settings(server: PolicyServer) -> None:
    """SIGHUP: re-read the configuration and the GeoIP data.  Open connections
    stay; a broken new configuration is refused and the old one stays in force."""
    old = server.settings
    try:
        new = load_settings(old.config_path)
        geoip = GeoIP(new.geoip_database)
    except (ConfigError, OSError, ValueError, RuntimeError) as error:  # maxminddb: InvalidDatabaseError
        log.error("reload refused, the running configuration stays in force: %s", error)
        return
    service = server.service
    if (new.host, new.port) != (old.host, old.port):
        log.warning("reload: a new host/port needs a restart; still listening on %s port %d", old.host, old.port)
        new = dataclasses.replace(new, host=old.host, port=old.port)
    if new.dbcon != old.dbcon:
        service.sightings.flush()  # what the old database was to get, it gets
        service.store, service.tables_ready = Store(new.dbcon), False
        service.sightings.store = service.store
    if new.spool_file != old.spool_file:
        log.warning("reload: a new spool_file needs a restart; still using %s", old.spool_file or "memory")
    if new.metrics_port != old.metrics_port:
        log.warning("reload: a new metrics_port needs a restart; metrics stay %s",
                    f"on port {old.metrics_port}" if old.metrics_port else "off")
    if new.dovecot_policy_port != old.dovecot_policy_port:
        log.warning("reload: a new [dovecot] policy_port needs a restart; the Dovecot port stays %s",
                    f"{old.dovecot_policy_port}" if old.dovecot_policy_port else "off")
    MaskingFormatter.secrets |= set(secrets_of(new))
    service.geoip = geoip
    service.notifier.settings = new
    service.settings = new
    server.settings = new
    log.info("configuration %s reloaded; GeoIP %s; %s", new.config_path, geoip.description, describe_rules(new))
    _warn_about_geoip(geoip)


def describe_rules(settings: Settings) -> str:
    """The rules in force, in one line for the log and --check-config."""
    text = (f"rule: more than {settings.how_many_different_countries} countries in "
            f"{settings.in_how_much_time_in_days:g} days -> {settings.action}")
    if settings.max_travel_speed_kmh is not None:
        text += (f"; impossible travel: faster than {settings.max_travel_speed_kmh:g} km/h -> "
                 f"{settings.impossible_travel_action.lower()}")
    if settings.monitoring:
        text += "; MONITOR MODE: new blocks are only recorded and notified, mail flows"
    return text


# How often pcc looks whether the GeoIP file was replaced (a stat() call).
GEOIP_CHECK_INTERVAL = 5.0


def housekeeping(service: PolicyService, stopping: threading.Event) -> None:
    """Every few seconds: use a replaced GeoIP file without a restart
    (geoipupdate renames a new file over the old one; a file that cannot be
    used is logged once and the data in use stays), and say again that the
    database is failing, if it still is."""
    while not stopping.wait(GEOIP_CHECK_INTERVAL):
        reload_geoip_if_replaced(service)
        service.report_outage()


def reload_geoip_if_replaced(service: PolicyService) -> bool:
    current = service.geoip
    if not current.changed_on_disk():
        return False
    signature = GeoIP.signature_of(current.path)
    try:
        fresh = GeoIP(current.path)
        if service.settings.max_travel_speed_kmh is not None and not fresh.has_places:
            raise ValueError("it has no places (a Country database), and max_travel_speed_kmh needs them")
    except Exception as error:  # a half-written or foreign file must not stop the daemon
        current.file_signature = signature  # say it once, until the file changes again
        log.error("GeoIP file %s changed but cannot be used; still using the data loaded before: %s",
                  current.path, error)
        return False
    service.geoip = fresh
    log.warning("GeoIP file %s was replaced; now using %s", fresh.path, fresh.description)
    _warn_about_geoip(fresh)
    return True


# IP blocks change hands every week; country data older than this misplaces
# enough addresses to matter.
GEOIP_STALE_AFTER = dt.timedelta(days=60)


def _warn_about_geoip(geoip: GeoIP) -> None:
    """What makes GeoIP data miss countries: age, and no IPv6 data."""
    _warn_if_stale(geoip)
    if geoip.ipv4_only:
        log.warning("GeoIP %s has no IPv6 data: messages from IPv6 clients get no country and are not "
                    "counted (blocked accounts stay blocked); use a file with IPv6 data", geoip.description)


def _warn_if_stale(geoip: GeoIP) -> None:
    if geoip.built is None:
        log.warning("GeoIP %s: its build date is unknown; keep it current", geoip.description)
    elif utcnow().date() - geoip.built > GEOIP_STALE_AFTER:
        log.warning("GeoIP data is %d days old (built %s): countries of moved IP blocks will be wrong; "
                    "set [geoip] database and run pcc.py --update-geoip monthly (see README)",
                    (utcnow().date() - geoip.built).days, geoip.built.isoformat())


def _warn_if_readable(settings: Settings) -> None:
    try:
        mode = os.stat(settings.config_path).st_mode
    except OSError:
        return
    if secrets_of(settings) and mode & 0o004:
        log.warning("%s holds a database password and is readable by every user: "
                    "chown root:pcc %s; chmod 640 %s", settings.config_path, settings.config_path,
                    settings.config_path)


def _raise_file_limit(wanted: int) -> None:
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, ValueError, OSError) as error:
        log.warning("cannot raise the open files limit to %d: %s", wanted, error)


def build_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pcc.py",
        description="Postfix Country Control: a Postfix policy service that blocks accounts "
        "sending from more than X countries within Y days.",
        epilog="Postfix: smtpd_relay_restrictions = permit_mynetworks, "
        "check_policy_service inet:127.0.0.1:9999, permit_sasl_authenticated, reject_unauth_destination",
    )
    parser.add_argument("--config", default=DEFAULT_CONFIG_PATH, metavar="PATH",
                        help=f"configuration file (default {DEFAULT_CONFIG_PATH})")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages too")
    parser.add_argument("--stderr", action="store_true",
                        help="log to standard error instead of syslog (mail facility)")
    commands = parser.add_mutually_exclusive_group(required=True)
    commands.add_argument("-d", "--daemon", action="store_true",
                          help="run the policy service (in the foreground, as supervisord expects)")
    commands.add_argument("--check-config", action="store_true",
                          help="read and validate the configuration, print a summary, and exit")
    commands.add_argument("--update-geoip", action="store_true",
                          help="download current GeoIP data ([geoip] update_url; blank = DB-IP Lite, no account "
                          "needed), check it, and install it as [geoip] database; the daemon picks it up")
    commands.add_argument("--health", action="store_true",
                          help="ask the running daemon how it is, for Nagios/Icinga/monit/cron: one line, "
                          "exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN")
    commands.add_argument("-l", "--list", action="store_true",
                          help="list blocked accounts: login, blocked since, action, countries with last IP and time")
    commands.add_argument("-s", "--show", metavar="LOGIN",
                          help="show an account: state, countries in the window, how close to the threshold, blocks")
    commands.add_argument("-b", "--block", metavar="LOGIN",
                          help="block an account by hand (e.g. reported compromised); notifies the admins")
    commands.add_argument("-u", "--unblock", metavar="LOGIN",
                          help="unblock an account; its earlier countries stop counting; notifies the admins")
    commands.add_argument("-r", "--release", metavar="LOGIN",
                          help="unblock, and release the account's held mail from the Postfix hold queue")
    commands.add_argument("-e", "--erase", metavar="LOGIN",
                          help="unblock, and delete the account's held mail from the Postfix hold queue")
    commands.add_argument("-c", "--cleanup", metavar="DAYS", type=float,
                          help="delete sightings older than DAYS days (needs the DELETE grant)")
    commands.add_argument("--allow", metavar="LOGIN",
                          help="grant a travel pass: with --country and --days, those countries do not count "
                          "for LOGIN until the pass expires (--days 0 ends them now); notifies the admins")
    commands.add_argument("--replay", nargs="+", metavar="FILE",
                          help="replay Postfix logs (plain, .gz, or - for stdin; oldest first) through the "
                          "decision, against a throw-away in-memory database, and report whom pcc would "
                          "have blocked")
    parser.add_argument("--threshold", type=int, metavar="N",
                        help="with --replay: use this how_many_different_countries instead of the config's")
    parser.add_argument("--days", type=float, metavar="D",
                        help="with --replay: use this in_how_much_time_in_days instead of the config's; "
                        "with --allow: how long the travel pass lasts")
    parser.add_argument("--country", metavar="CC[,CC...]",
                        help="with --allow: the countries of the trip, ISO codes, e.g. FR,DE")
    parser.add_argument("--record", action="store_true",
                        help="with --replay: write the sightings (not the blocks) into the configured "
                        "database, so a new pcc starts knowing each account's recent countries")
    parser.add_argument("--json", action="store_true", help="with -l, -s or --replay: print JSON for scripts")
    parser.add_argument("--timeout", type=float, metavar="SECONDS",
                        help=f"with --update-geoip: give up a download after this long (default "
                        f"{GEOIP_DOWNLOAD_TIMEOUT:g})")
    return parser


def main(argv: Optional[list] = None) -> int:
    parser = build_argument_parser()
    arguments = parser.parse_args(argv)
    # Files pcc creates (SQLite, spool) are for its own user and group only.
    os.umask(0o027)
    if arguments.list or arguments.show or (arguments.replay and not arguments.record):
        # Output that only reads: `pcc.py --replay ... | head` ends quietly, as any Unix filter does.
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    if arguments.allow:
        if arguments.country is None or arguments.days is None:
            parser.error("--allow needs --country and --days")
        if arguments.threshold is not None or arguments.record:
            parser.error("--threshold and --record go with --replay")
    elif arguments.country is not None:
        parser.error("--country goes with --allow")
    elif not arguments.replay and (arguments.threshold is not None or arguments.days is not None
                                   or arguments.record):
        parser.error("--threshold, --days and --record go with --replay")
    if arguments.timeout is not None and not (arguments.update_geoip and arguments.timeout > 0):
        parser.error("--timeout takes a number of seconds above 0 and goes with --update-geoip")
    try:
        settings = load_settings(arguments.config, geoip_file_needed=not arguments.update_geoip)
    except ConfigError as error:
        if arguments.health:
            print(f"PCC UNKNOWN - {error} | ")  # no perfdata to give
            return HEALTH_UNKNOWN
        print(f"pcc: {error}", file=sys.stderr)
        return 2
    if arguments.health:
        status, line = check_health(settings)
        print(line)
        return status
    if arguments.update_geoip:
        try:
            print(update_geoip(settings, arguments.timeout or GEOIP_DOWNLOAD_TIMEOUT, utcnow()))
        except UpdateError as error:
            print(f"pcc: GeoIP update failed, the installed file is unchanged: {error}", file=sys.stderr)
            return 1
        return 0
    if arguments.check_config:
        print(f"{settings.config_path}: OK; database {safe_url(settings.dbcon)}; {describe_rules(settings)}")
        return 0
    if arguments.daemon:
        setup_logging(arguments.verbose, arguments.stderr, secrets_of(settings))
        listener = queue_logging()
        try:
            return run_daemon(settings)
        finally:
            listener.stop()  # every line written before the exit
    # The commands print what they did; their log shows only problems (or all, with -v).
    setup_logging(arguments.verbose, True, secrets_of(settings))
    log.setLevel(logging.DEBUG if arguments.verbose else logging.WARNING)
    if arguments.replay:
        return run_replay(settings, arguments)
    return run_admin_command(settings, arguments)


# --- pcc.py --update-geoip: current data without an account -------------------

# DB-IP's free "Lite" databases (CC BY 4.0), one file a month, MaxMind format.
DBIP_LITE_URL = "https://download.db-ip.com/free/dbip-{kind}-lite-{month}.mmdb.gz"
GEOIP_DOWNLOAD_TIMEOUT = 60.0
GEOIP_DOWNLOAD_LIMIT = 1 << 30  # bytes once uncompressed; the City Lite file is about 130 MB
# Every real GeoIP file places these in a country; a file that does not is no
# file to count with (an error page, a truncated or foreign file).
WELL_KNOWN_ADDRESSES = ("8.8.8.8", "1.1.1.1", "9.9.9.9")


class UpdateError(Exception):
    """Why a GeoIP update failed; the installed file is untouched."""


def default_geoip_urls(needs_places: bool, now: dt.datetime) -> list:
    """This month's DB-IP Lite file, then last month's (a new one appears in
    the first days of a month)."""
    kind = "city" if needs_places else "country"
    last_month = now.replace(day=1) - dt.timedelta(days=1)
    return [DBIP_LITE_URL.format(kind=kind, month=f"{moment:%Y-%m}") for moment in (now, last_month)]


def update_geoip(settings: Settings, timeout: float, now: dt.datetime) -> str:
    """Download, check, and rename over [geoip] database; what was installed."""
    target = settings.geoip_database
    if not target:
        raise UpdateError("[geoip] database is blank (the embedded data cannot be updated): set it to the path "
                          "pcc keeps its GeoIP file at, e.g. /var/lib/pcc/dbip-country-lite.mmdb, and run this again")
    needs_places = settings.max_travel_speed_kmh is not None
    directory = os.path.dirname(os.path.abspath(target))
    urls = [settings.geoip_update_url] if settings.geoip_update_url else default_geoip_urls(needs_places, now)
    temporary = None
    for number, url in enumerate(urls, 1):
        try:
            temporary = download_geoip(url, directory, timeout)
            break
        except UpdateError as error:
            if number == len(urls) or "HTTP 404" not in str(error):
                raise
    try:
        description = check_geoip_file(temporary, target, needs_places)
        os.chmod(temporary, 0o644)
        os.replace(temporary, target)  # the daemon sees a new file and reads it; readers never see half of one
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return f"installed {target}: {description}, from {url}"


def download_geoip(url: str, directory: str, timeout: float) -> str:
    """The file at `url`, uncompressed if it is gzip, in a new file of
    `directory`; its path."""
    request = urllib.request.Request(url, headers={"User-Agent": f"pcc/{__version__}"})
    deadline = time.monotonic() + timeout
    try:
        response = urllib.request.urlopen(request, timeout=timeout)  # proxies from the environment
    except urllib.error.HTTPError as error:
        raise UpdateError(f"{url}: HTTP {error.code} {error.reason}") from None
    except (urllib.error.URLError, OSError) as error:
        raise UpdateError(f"{url}: {getattr(error, 'reason', None) or error}") from None
    descriptor, temporary = tempfile.mkstemp(prefix=".pcc-geoip-", suffix=".mmdb", dir=directory)
    try:
        with response, open(descriptor, "wb") as out:
            _copy_uncompressed(response, out, deadline)
    except (OSError, zlib.error, UpdateError) as error:
        os.unlink(temporary)
        if isinstance(error, UpdateError):
            raise
        raise UpdateError(f"{url}: {error}") from None
    return temporary


def _copy_uncompressed(response, out, deadline: float) -> None:
    inflate, written = None, 0
    while True:
        if time.monotonic() > deadline:
            raise UpdateError("the download took longer than --timeout")
        chunk = response.read(1 << 16)
        if not chunk:
            break
        if inflate is None and written == 0:
            inflate = zlib.decompressobj(16 + zlib.MAX_WBITS) if chunk[:2] == b"\x1f\x8b" else False
        data = inflate.decompress(chunk) if inflate else chunk
        written += len(data)
        if written > GEOIP_DOWNLOAD_LIMIT:
            raise UpdateError(f"more than {GEOIP_DOWNLOAD_LIMIT >> 20} MB: not a GeoIP file")
        out.write(data)
    if inflate and not inflate.eof:
        raise UpdateError("the gzip data ends early (a truncated download)")
    out.flush()
    os.fsync(out.fileno())


def check_geoip_file(path: str, installed: str, needs_places: bool) -> str:
    """Use a downloaded file only if it is what pcc needs; its description."""
    try:
        fresh = GeoIP(path)
    except (OSError, ValueError, RuntimeError) as error:  # RuntimeError: maxminddb's InvalidDatabaseError
        raise UpdateError(f"the download is not a MaxMind-format database (an error page, or truncated?): "
                          f"{error}") from None
    try:
        kind = fresh.database_type
        if needs_places and not fresh.has_places:
            raise UpdateError(f"it is a {kind} database, and max_travel_speed_kmh needs City-level data "
                              "(use an update_url of a City file)")
        unplaced = [address for address in WELL_KNOWN_ADDRESSES
                    if not re.fullmatch(r"[A-Z]{2}", fresh.country(ipaddress.ip_address(address)).code or "")]
        if unplaced:
            raise UpdateError(f"it places no country for {', '.join(unplaced)}: not a usable GeoIP file")
        current = _installed_build_date(installed)
        if current is not None and fresh.built < current:
            raise UpdateError(f"it was built on {fresh.built}, before the installed file ({current})")
        return f"{kind}, built {fresh.built}"
    finally:
        fresh.close()


def _installed_build_date(path: str) -> Optional[dt.date]:
    try:
        installed = GeoIP(path)
    except (OSError, ValueError, RuntimeError):
        return None  # none yet, or broken: anything that passes the checks is better
    installed.close()
    return installed.built


# --- pcc.py --health: the monitoring-plugin conventions ---------------------

HEALTH_OK, HEALTH_WARNING, HEALTH_CRITICAL, HEALTH_UNKNOWN = 0, 1, 2, 3
HEALTH_LABELS = ("OK", "WARNING", "CRITICAL", "UNKNOWN")
# The daemon must answer within this many seconds, as Postfix would need it to.
HEALTH_TIMEOUT = 2.0
# Notifications that have waited longer than this mean the admins hear nothing.
UNSENT_NOTICE_WARNING = 600


def ask_daemon_health(settings: Settings) -> dict:
    """Send the health request to the daemon on host:port; its name=value words.
    Raises OSError (TimeoutError included) when no whole answer comes in time."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(settings.host, settings.host)
    deadline = time.monotonic() + HEALTH_TIMEOUT
    with socket.create_connection((host, settings.port), timeout=HEALTH_TIMEOUT) as connection:
        connection.sendall(f"request={HEALTH_REQUEST}\n\n".encode())
        reply = b""
        while not reply.endswith(b"\n\n"):
            connection.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = connection.recv(4096)
            if not chunk:
                raise ConnectionError("the connection was closed without an answer")
            reply += chunk
    return dict(word.split("=", 1) for word in reply.decode("utf-8", "replace").split() if "=" in word)


def check_health(settings: Settings) -> tuple:
    """(exit status, the one line) of `pcc.py --health`."""
    started = time.monotonic()
    try:
        report = ask_daemon_health(settings)
    except OSError as error:
        return HEALTH_CRITICAL, (f"PCC CRITICAL - no answer from {settings.host}:{settings.port} within "
                                 f"{HEALTH_TIMEOUT:g} s: {error.strerror or error or 'timed out'} | "
                                 f"response_time={time.monotonic() - started:.3f}s;;{HEALTH_TIMEOUT:g}")
    seconds = time.monotonic() - started
    if "database" not in report:
        return HEALTH_UNKNOWN, (f"PCC UNKNOWN - {settings.host}:{settings.port} answered, but not with a "
                                f"pcc health report (another service, or a pcc older than 1.2) | "
                                f"response_time={seconds:.3f}s;;{HEALTH_TIMEOUT:g}")
    critical, warnings = [], []
    failing = int(float(report.get("failing_seconds", 0)))
    if report["database"] != "ok":
        critical.append(f"the daemon cannot use its database for {failing} s "
                        f"({report.get('error_answers', '?')} requests answered {settings.db_error_action})")
    built = report.get("geoip_built", "unknown")
    age = (utcnow().date() - dt.date.fromisoformat(built)).days if built != "unknown" else None
    if age is None or age > GEOIP_STALE_AFTER.days:
        warnings.append(f"GeoIP data is {age if age is not None else 'of unknown'} days old: pcc.py --update-geoip")
    spooled = int(report.get("spooled_blocks", 0))
    if spooled:
        warnings.append(f"{spooled} blocks wait in the spool for the database")
    unsent, waited = int(report.get("unsent_notices", 0)), int(report.get("oldest_unsent_seconds", 0))
    if unsent and waited > UNSENT_NOTICE_WARNING:
        warnings.append(f"{unsent} notifications unsent, the oldest for {waited // 60} min (check [mail] mailsrv)")
    status = HEALTH_CRITICAL if critical else HEALTH_WARNING if warnings else HEALTH_OK
    summary = "; ".join(critical + warnings) or "answering, database in use"
    perfdata = (f"response_time={seconds:.3f}s;;{HEALTH_TIMEOUT:g} database_failing_seconds={failing}s "
                f"spooled_blocks={spooled};1 unsent_notices={unsent} geoip_age_days={age if age is not None else 'U'};"
                f"{GEOIP_STALE_AFTER.days}")
    return status, f"PCC {HEALTH_LABELS[status]} - {summary} | {perfdata}"


def missing_sqlite_file(settings: Settings) -> Optional[str]:
    """The path of the configured SQLite file if it does not exist yet."""
    url = sa.engine.make_url(settings.dbcon)
    path = url.database or ""
    if url.get_backend_name() != "sqlite" or path in ("", ":memory:") or path.startswith("file:"):
        return None
    return None if os.path.exists(path) else path


def start_the_daemon_first(path: str) -> str:
    return (f"pcc: neither {path} nor its directory exist yet: start the daemon first (it creates them as its "
            f"own user), then run this again")


def _nothing_recorded_yet(arguments: argparse.Namespace, login) -> int:
    """-l or -s before the daemon ever ran: answered without creating anything."""
    if arguments.list:
        print("[]" if arguments.json else "No account is blocked.")
        return 0
    print(f"pcc: unknown login {login(arguments.show)}: pcc has never counted nor blocked it", file=sys.stderr)
    return 1


def run_admin_command(settings: Settings, arguments: argparse.Namespace) -> int:
    """The admin commands.  None of them creates the database: a file made by
    root would stop the daemon that runs as its own user.  -l and -s only read."""
    reading = bool(arguments.list or arguments.show)
    missing = missing_sqlite_file(settings)
    login = normalise_login
    if missing and reading:
        return _nothing_recorded_yet(arguments, login)
    if missing and not os.path.isdir(os.path.dirname(os.path.abspath(missing))):
        print(start_the_daemon_first(missing), file=sys.stderr)
        return 1
    store = Store(settings.dbcon, create_directory=False)
    admin = Admin(settings, store, Notifier(settings), PostfixQueue(settings.postfix_config_directory))
    now = utcnow()
    try:
        if reading and not store.has_tables():
            return _nothing_recorded_yet(arguments, login)
        if not reading:
            store.create_tables()
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
        elif arguments.allow:
            admin.allow(login(arguments.allow), trip_countries(arguments.country), arguments.days, now)
    except AdminError as error:
        print(f"pcc: {error}", file=sys.stderr)
        return 1
    except sa_exc.SQLAlchemyError as error:
        print(_database_failure(settings, error), file=sys.stderr)
        return 1
    finally:
        store.dispose()
        if missing:
            hand_over_to_directory_owner(missing)
    return 0


def hand_over_to_directory_owner(path: str) -> None:
    """A SQLite file a command made as root belongs to whoever owns its
    directory (the daemon's user, /var/lib/pcc): root's file would stop the
    daemon.  SQLite gives its -wal and -shm files the main file's owner."""
    if os.geteuid() != 0 or not os.path.exists(path):
        return
    directory = os.stat(os.path.dirname(os.path.abspath(path)))
    for name in (path, path + "-wal", path + "-shm"):
        if os.path.exists(name):
            os.chown(name, directory.st_uid, directory.st_gid)


# A travel pass is for a trip, not a standing exception (that is ignorecountries).
MAX_TRAVEL_PASS_DAYS = 366


def trip_countries(text: str) -> list:
    codes = sorted({code.upper() for code in _split_list(text)})
    unknown = [code for code in codes if code not in COUNTRY_CODES]
    if not codes or unknown:
        raise AdminError(f"--country {text!r}: give ISO 3166 two-letter country codes, e.g. FR,DE"
                         + (f" ({', '.join(unknown)} is not one)" if unknown else ""))
    return codes


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
    missing = missing_sqlite_file(settings)
    if missing and not os.path.isdir(os.path.dirname(os.path.abspath(missing))):
        print(start_the_daemon_first(missing), file=sys.stderr)
        return 1
    store = Store(settings.dbcon, create_directory=False)
    sightings = ((login, seen) for login, countries in result.service.store.sightings.items()
                 for seen in countries.values())
    try:
        store.create_tables()
        written = store.merge_sightings(sightings)
    except sa_exc.SQLAlchemyError as error:
        print(_database_failure(settings, error), file=sys.stderr)
        return 1
    finally:
        store.dispose()
        if missing:
            hand_over_to_directory_owner(missing)
    print(f"recorded {written} sightings of {len(result.service.store.sightings)} accounts from "
          f"{result.submissions} submissions into {safe_url(settings.dbcon)} "
          f"({result.unparseable} unparseable lines skipped)")
    return 0


def _database_failure(settings: Settings, error: Exception) -> str:
    """One line for a command whose database failed, without its password."""
    return f"pcc: database {safe_url(settings.dbcon)} failed: " + mask_secrets(_first_line(error),
                                                                             secrets_of(settings))


if __name__ == "__main__":
    sys.exit(main())
