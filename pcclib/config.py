"""The configuration: /etc/pcc.conf read once into a frozen Settings, every
key required and validated, every problem one line naming file, section and
key.  The constants the settings choose among live here too.
"""
from __future__ import annotations

import configparser
import difflib
import datetime as dt
import grp
import ipaddress
import os
import pwd
import re
import urllib.parse
from dataclasses import dataclass
from typing import Any, Optional, Union, cast

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from .common import CONTROL_CHARACTERS, normalise_login, open_maxmind, split_list, url_for_people

DEFAULT_CONFIG_PATH = "/etc/pcc.conf"
# How long `pcc.py --update-geoip` may take, unless --timeout says (seconds).
GEOIP_DOWNLOAD_TIMEOUT = 60.0
BLOCK_ACTIONS = ("REJECT", "HOLD")

# What Postfix is told when the database cannot be asked.  DUNNO lets mail flow
# (an outage of pcc must not stop a whole organisation's mail); DEFER_IF_PERMIT
# makes Postfix answer 450 so clients retry later.
DB_ERROR_ACTIONS = ("DUNNO", "DEFER_IF_PERMIT")

# enforce: blocked accounts get `action`.  monitor: pcc records and notifies
# exactly as it would when enforcing, but answers DUNNO (to roll out and tune).
MODES = ("ENFORCE", "MONITOR")
# What monitor mode tells Postfix of a message it would have stopped: DUNNO
# (nothing), or WARN, which Postfix logs with the message's client, sender and
# recipient (its access(5) action for exactly this).
MONITOR_ANSWERS = ("DUNNO", "WARN")

YES_NO = ("YES", "NO")

# What an account over a [limits] volume limit gets: BLOCK (the [policy]
# action, and everything a block does), DEFER (DEFER_IF_PERMIT until the
# window has room; nothing stored), NOTIFY (the admins are told, once per
# account, limit and window; the mail flows).
LIMIT_ACTIONS = ("BLOCK", "DEFER", "NOTIFY")
# The [limits] keys: (Settings field, what is counted, the window in hours).
VOLUME_LIMITS = (("messages_per_hour", "messages", 1), ("messages_per_day", "messages", 24),
                 ("recipients_per_hour", "recipients", 1), ("recipients_per_day", "recipients", 24))

# The database drivers pcc installs, and the schemes other tools write for
# them ([db] dbcon postgres://... is taken as postgresql+psycopg://...).
DATABASE_DRIVERS = ("sqlite", "postgresql+psycopg", "mysql+pymysql")
DATABASE_SCHEMES = {"sqlite+pysqlite": "sqlite", "postgres": "postgresql+psycopg", "postgresql": "postgresql+psycopg",
                    "postgres+psycopg": "postgresql+psycopg", "mysql": "mysql+pymysql", "mariadb": "mysql+pymysql",
                    "mariadb+pymysql": "mysql+pymysql"}

# What an impossible journey does: BLOCK the account, or only NOTIFY the admins.
TRAVEL_ACTIONS = ("BLOCK", "NOTIFY")

# The action stored with a block that monitor mode decided: nothing was enforced.
MONITOR_ACTION = "MONITOR"

# What a request from an address on a network list ([list <label>]) does:
# IGNORE nothing; NOTIFY tells the admins (the decision is unchanged); COUNT
# counts the list as one more country in the window; BLOCK blocks at once.
LIST_ACTIONS = ("IGNORE", "NOTIFY", "COUNT", "BLOCK")
LIST_LABEL = re.compile(r"[a-z0-9][a-z0-9_-]{0,15}")
# A list that COUNTs is kept in the account's sightings as a country of its
# own, under one of the codes ISO 3166 leaves to users (never a country's).
LIST_MARKER_CODES = tuple([f"Q{letter}" for letter in "MNOPQRSTUVWXYZ"]
                          + [f"X{letter}" for letter in "ABCDEFGHIJLMNOPQRSTUVWXYZ"] + ["AA", "ZZ"])

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

# configparser keeps "port = 9999  # the port" whole: the comment would become
# part of the value (and of the reason sent to clients).
INLINE_COMMENT = re.compile(r"\s[#;]")


@dataclass(frozen=True)
class NetworkList:
    """One [list <label>] section: a file of addresses and CIDR ranges (a Tor
    exit list, a VPN or data-centre list) and what a request from it does."""

    label: str
    action: str  # one of LIST_ACTIONS
    file: str  # one address or CIDR range a line; missing = the list is off until --update-lists fetches it
    url: str  # where --update-lists refreshes it from; "" = by hand
    max_age_days: float  # --health warns when the file is older
    min_entries: int  # --update-lists refuses a download with fewer
    marker: str  # its code among an account's countries (COUNT)


class ConfigError(Exception):
    """A configuration problem; the message names file, section and key."""


@dataclass(frozen=True)
class Settings:
    """Everything /etc/pcc.conf says, validated.  See pcc.conf for each key."""

    config_path: str
    # [server]
    host: str
    port: int  # 0: none (the policy socket only)
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
    hold_queued: str = ""  # YES / NO: a block also holds the account's mail already queued; "" = with HOLD
    queue_helper: str = ""  # the socket of pcc's root queue helper (pcc-queue.socket); "" = sudo when not root
    # [dovecot]
    dovecot_policy_port: Optional[int] = None  # Dovecot's authentication policy (HTTP); None = off
    count_logins: bool = False  # a successful Dovecot login counts its country like a submission
    dovecot_api_header: str = ""  # "Name: value" Dovecot must send; "" = none
    doveadm_url: str = ""  # Dovecot's doveadm HTTP API, to end a blocked account's sessions; "" = not used
    doveadm_api_key: str = ""  # its doveadm_api_key
    doveadm_command: str = ""  # else this doveadm on this host ("doveadm -c /etc/dovecot/dovecot.conf"); "" = none
    # [notify]
    webhook_urls: tuple = ()  # each gets a JSON POST for every event; empty = none
    webhook_secret: str = ""  # signs each body (HMAC-SHA256); "" = unsigned
    notify_account: bool = False  # tell a blocked account's owner (accounts of [mail] domains only)
    # [networks] and each [list <label>]
    asn_database: str = ""  # an ASN .mmdb (DB-IP ASN Lite, GeoLite2-ASN); "" = no networks named
    asn_update_url: str = ""  # where --update-geoip fetches it from; "" = DB-IP's monthly ASN Lite
    network_lists: tuple = ()  # of NetworkList
    # [mail], since 1.6
    sender: str = ""  # From: of pcc's mail; "" = pcc@<this host's FQDN>
    mail_starttls: bool = False  # STARTTLS before anything is sent, the certificate verified
    mail_tls_ca_file: str = ""  # the CA certificates that verify the SMTP server's; "" = the system's
    mail_user: str = ""  # SMTP AUTH login; "" = no AUTH
    mail_password: str = ""
    # [server], since 1.6
    socket: str = ""  # a UNIX-domain policy socket beside the port; "" = none
    socket_owner: str = ""  # its owner; "" = the daemon's user
    socket_group: str = ""  # its group; "" = the daemon's group
    socket_mode: int = 0o660
    processes: int = 1  # worker processes on the ports (SO_REUSEPORT); auto resolved to the cores
    # [policy], since 1.6
    monitor_answer: str = "DUNNO"  # DUNNO or WARN: monitor mode's answer for what it would have stopped
    # [limits], since 1.6: None = that limit off
    messages_per_hour: Optional[int] = None
    messages_per_day: Optional[int] = None
    recipients_per_hour: Optional[int] = None
    recipients_per_day: Optional[int] = None
    limit_action: str = "BLOCK"  # one of LIMIT_ACTIONS

    def _kept(self, name: str, compute):
        """What a property below computes, kept in the instance's dict (a
        frozen dataclass allows that; dataclasses.replace() starts afresh):
        each is asked several times a request."""
        value = self.__dict__.get(name)
        if value is None:
            value = self.__dict__[name] = compute()
        return value

    @property
    def volume_limits(self) -> tuple:
        """The limits on: (name, what is counted, window in hours, the limit)."""
        return self._kept("_volume_limits", lambda: tuple(
            (name, counted, hours, getattr(self, name)) for name, counted, hours in VOLUME_LIMITS
            if getattr(self, name) is not None))

    @property
    def not_counted_codes(self) -> frozenset:
        """What an account's sightings hold that does not count: ignorecountries,
        and the markers of network lists that no longer COUNT (a list whose
        action changed, or that is gone, counts no more)."""
        return self._kept("_not_counted_codes", lambda: self.ignorecountries | (set(LIST_MARKER_CODES) - {
            network_list.marker for network_list in self.network_lists if network_list.action == "COUNT"}))

    @property
    def socket_uid(self) -> int:
        """socket_owner's uid, -1 (unchanged) when blank."""
        return pwd.getpwnam(self.socket_owner).pw_uid if self.socket_owner else -1

    @property
    def socket_gid(self) -> int:
        """socket_group's gid, -1 (unchanged) when blank."""
        return grp.getgrnam(self.socket_group).gr_gid if self.socket_group else -1

    def list_action(self, label: str) -> str:
        for network_list in self.network_lists:
            if network_list.label == label:
                return network_list.action
        return "IGNORE"

    def place_name(self, code: str) -> str:
        """A code among an account's countries, for people: a country code, or
        the network list a COUNT marker stands for."""
        for network_list in self.network_lists:
            if network_list.marker == code:
                return f"{network_list.label} network"
        return code

    @property
    def country_window(self) -> dt.timedelta:
        return self._kept("_country_window", lambda: dt.timedelta(days=self.in_how_much_time_in_days))

    @property
    def block_reply(self) -> str:
        """What Postfix is told for a blocked account: "<action> <reason>"."""
        return self._kept("_block_reply", lambda: f"{self.action} {self.reason}".strip())

    @property
    def holds_queued_mail(self) -> bool:
        """A new block holds the account's mail already in Postfix's queues."""
        return self.hold_queued == "YES" or (self.hold_queued == "" and self.action == "HOLD")

    @property
    def monitoring(self) -> bool:
        return self.mode == "MONITOR"

    @property
    def recorded_action(self) -> str:
        """The action a new block is recorded with: what pcc answers for it."""
        return MONITOR_ACTION if self.monitoring else self.action


def is_city_level(database_type: str) -> bool:
    """Whether an .mmdb of this type has places (GeoLite2-City, DBIP-City-Lite...)."""
    return "city" in database_type.lower()


class _ConfigReader:
    """Reads one key at a time and turns every problem into one clear line."""

    def __init__(self, path: str):
        self.path = path
        self.parser = configparser.ConfigParser(interpolation=None)
        self.may_be_absent: set = set()  # (section, key) of keys newer than 1.5: absent = blank
        try:
            with open(path, encoding="utf-8") as config_file:
                self.parser.read_file(config_file)
        except OSError as error:
            raise ConfigError(f"{path}: cannot read the configuration: {error.strerror}") from None
        except (configparser.Error, UnicodeDecodeError) as error:
            first_line = str(error).splitlines()[0]
            raise ConfigError(f"{path}: not a valid INI file: {first_line}") from None

    def refuse_unknown_keys(self, known: dict) -> None:
        """A key pcc does not know is most likely a typo of one it does: say
        which, before a key it replaces is reported missing.  `known`: each
        section's keys ("list" for every [list <label>])."""
        for section in self.parser.sections():
            names = known.get("list" if section.startswith("list") else section)
            if names is None:
                guess = difflib.get_close_matches(section, list(known), n=1)
                raise ConfigError(f"{self.path}: unknown section [{section}]"
                                  + (f"; did you mean [{guess[0]}]?" if guess else ""))
            for key in self.parser.options(section):
                if key not in names:
                    guess = difflib.get_close_matches(key, names, n=1, cutoff=0.7)
                    hint = f"did you mean {guess[0]}?" if guess else f"known keys: {', '.join(sorted(names))}"
                    raise self.fail(section, key, f"unknown key (a typo? {hint})")

    def fail(self, section: str, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.path}: [{section}] {key}: {problem}")

    def text(self, section: str, key: str, *, required: bool = False) -> str:
        if not self.parser.has_section(section):
            if (section, key) in self.may_be_absent:
                return ""
            raise ConfigError(f"{self.path}: section [{section}] is missing (it must hold '{key}')")
        if not self.parser.has_option(section, key):
            if (section, key) in self.may_be_absent:
                return ""
            raise self.fail(section, key, "key is missing (every key must be present; leave it blank for none)")
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
            return cast(int, blank)  # None only when required, and text() refused the blank
        try:
            number = int(value)
        except ValueError:
            raise self.fail(section, key, f"must be a whole number, got {value!r}") from None
        if not low <= number <= high:
            raise self.fail(section, key, f"must be between {low} and {high}, got {number}")
        return number

    def number(self, section: str, key: str, low: float, high: float, *, blank: Optional[float] = None,
               low_inclusive: bool = False) -> float:
        """A number in (low, high], or [low, high] with low_inclusive; `blank`
        when the value is blank (without it, a blank is refused)."""
        value = self.text(section, key, required=blank is None)
        if not value:
            return cast(float, blank)  # None only when required, and text() refused the blank
        try:
            number = float(value)
        except ValueError:
            raise self.fail(section, key, f"must be a number, got {value!r}") from None
        above_low = number >= low if low_inclusive else number > low
        if not (above_low and number <= high):
            at_least = "at least" if low_inclusive else "more than"
            raise self.fail(section, key, f"must be {at_least} {low:g} and at most {high:g}, got {value}")
        return number

    def optional_number(self, section: str, key: str, low: float, high: float) -> Optional[float]:
        """number(), or None when the value is blank."""
        return self.number(section, key, low, high) if self.text(section, key) else None

    def choice(self, section: str, key: str, choices: tuple, blank: Optional[str] = None) -> str:
        value = self.text(section, key, required=blank is None).upper() or cast(str, blank)
        if value not in choices:
            raise self.fail(section, key, f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def networks(self, section: str, key: str) -> tuple:
        networks = []
        for item in split_list(self.text(section, key)):
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise self.fail(section, key, f"{item!r} is not an IP address or CIDR network") from None
        return tuple(networks)

    def countries(self, section: str, key: str) -> frozenset:
        codes = [item.upper() for item in split_list(self.text(section, key))]
        for code in codes:
            if code not in COUNTRY_CODES:
                raise self.fail(section, key, f"{code!r} is not an ISO 3166 two-letter country code")
        return frozenset(codes)

    def logins(self, section: str, key: str) -> frozenset:
        return frozenset(normalise_login(item) for item in split_list(self.text(section, key)))

    def addresses(self, section: str, key: str) -> tuple:
        addresses = tuple(split_list(self.text(section, key)))
        for address in addresses:
            if "@" not in address.strip("@"):
                raise self.fail(section, key, f"{address!r} is not an email address")
        return addresses


@dataclass(frozen=True)
class Text:
    """Any one line; `blank` says what an empty value means ("" = required)."""

    blank: str = ""
    values: str = "text"

    def read(self, config: _ConfigReader, section: str, key: str) -> Any:
        return config.text(section, key, required=not self.blank)


@dataclass(frozen=True)
class Whole:
    """A whole number in [low, high]; a blank is `default`, or refused when None."""

    low: int
    high: int
    default: Optional[int] = None
    blank: str = ""

    @property
    def values(self) -> str:
        return f"a whole number, {self.low} to {self.high}"

    def read(self, config: _ConfigReader, section: str, key: str) -> Any:
        number = config.integer(section, key, self.low, self.high, blank=self.default)
        return number if self.default != 0 else (number or None)  # 0: "off", kept as None


@dataclass(frozen=True)
class Number:
    """A number in (low, high] ([low, high] with low_inclusive)."""

    low: float
    high: float
    default: Optional[float] = None
    blank: str = ""
    low_inclusive: bool = False
    optional: bool = False  # a blank is None (the rule it sets is off)

    @property
    def values(self) -> str:
        return f"a number, {'at least' if self.low_inclusive else 'more than'} {self.low:g}, at most {self.high:g}"

    def read(self, config: _ConfigReader, section: str, key: str) -> Any:
        if self.optional:
            return config.optional_number(section, key, self.low, self.high)
        return config.number(section, key, self.low, self.high, blank=self.default,
                             low_inclusive=self.low_inclusive)


@dataclass(frozen=True)
class Choice:
    """One of `choices` (any case); a blank is `default`, or refused when None."""

    choices: tuple
    default: Optional[str] = None
    blank: str = ""
    yes_no: bool = False  # read as a bool: YES is True

    @property
    def values(self) -> str:
        return " or ".join(choice.lower() for choice in self.choices if choice)

    def read(self, config: _ConfigReader, section: str, key: str) -> Any:
        value = config.choice(section, key, self.choices, blank=self.default)
        return value == "YES" if self.yes_no else value


@dataclass(frozen=True)
class ListOf:
    """A comma-separated list of networks, countries, logins, addresses or URLs."""

    item: str  # "network", "country", "login", "address", "url"
    blank: str = "none"

    @property
    def values(self) -> str:
        return {"network": "IP addresses and CIDR networks", "country": "ISO 3166 two-letter country codes",
                "login": "logins (user@domain) or domains", "address": "email addresses",
                "url": "URLs"}[self.item] + ", comma-separated"

    def read(self, config: _ConfigReader, section: str, key: str) -> Any:
        if self.item == "network":
            return config.networks(section, key)
        if self.item == "country":
            return config.countries(section, key)
        if self.item == "login":
            return config.logins(section, key)
        if self.item == "address":
            return config.addresses(section, key)
        return tuple(split_list(config.text(section, key)))


@dataclass(frozen=True)
class FileMode:
    """A file mode in octal (0660); a blank is `default`."""

    default: int
    blank: str = ""
    values: str = "an octal file mode, e.g. 0660"

    def read(self, config: _ConfigReader, section: str, key: str) -> Any:
        text = config.text(section, key)
        if not text:
            return self.default
        if not re.fullmatch(r"0?[0-7]{3}", text):
            raise config.fail(section, key, f"must be an octal file mode such as 0660, got {text!r}")
        return int(text, 8)


@dataclass(frozen=True)
class Processes:
    """A number of processes, or auto: one per core this process may run on."""

    low: int = 1
    high: int = 256
    blank: str = "1"
    values: str = "a whole number, 1 to 256, or auto (one per core)"

    def read(self, config: _ConfigReader, section: str, key: str) -> Any:
        if config.text(section, key).lower() == "auto":
            return max(1, min(self.high, len(os.sched_getaffinity(0))))
        return config.integer(section, key, self.low, self.high, blank=1)


Kind = Union[Text, Whole, Number, Choice, ListOf, FileMode, Processes]


@dataclass(frozen=True)
class Key:
    """One key of pcc.conf: where it is, what it takes, what it means.  The
    daemon reads with these and pcc.conf(5) is written from them."""

    section: str
    name: str
    field: str  # the Settings attribute it fills
    kind: Kind
    meaning: str
    since: str = ""  # a key newer than 1.5 may be absent (blank): configurations of 1.5 still start


KEYS = (
    Key("server", "host", "host", Text(values="an IP address or a host name"),
        "The address the policy port listens on (Postfix: check_policy_service inet:127.0.0.1:9999)."),
    Key("server", "port", "port", Whole(0, 65535),
        "The policy port; 0: none, the policy socket only ([server] socket)."),
    Key("server", "max_request_bytes", "max_request_bytes", Whole(1024, 16 * 1024 * 1024, 65536, "65536"),
        "The largest request accepted; a bigger one closes its connection (Postfix's are about 1 KB)."),
    Key("server", "idle_timeout", "idle_timeout", Whole(1, 86400, 600, "600"),
        "Seconds a connection may stay idle; keep it above Postfix's smtpd_policy_service_max_idle (300)."),
    Key("server", "max_connections", "max_connections", Whole(1, 100000, 4000, "4000"),
        "Connections served at once; at the limit the one idle longest is closed, with a log line."),
    Key("server", "allowed_clients", "allowed_clients", ListOf("network", "whoever can reach host:port"),
        "The clients that may connect to the policy, Dovecot and metrics ports."),
    Key("server", "metrics_port", "metrics_port", Whole(1, 65535, 0, "off"),
        "A Prometheus endpoint, http://host:PORT/metrics, on the same address."),
    Key("server", "socket", "socket", Text(blank="none", values="a file path"),
        "Also listen on this UNIX-domain socket (Postfix: check_policy_service unix:NAME, NAME relative to "
        "its queue directory, e.g. /var/spool/postfix/pcc/policy as unix:pcc/policy).", since="1.6"),
    Key("server", "socket_owner", "socket_owner", Text(blank="the daemon's user", values="a user name"),
        "The socket's owner (another user than the daemon's only when it runs as root).", since="1.6"),
    Key("server", "socket_group", "socket_group", Text(blank="the daemon's group", values="a group name"),
        "The socket's group: Postfix's (postfix) with mode 0660; the daemon's user must be in it.", since="1.6"),
    Key("server", "socket_mode", "socket_mode", FileMode(0o660, "0660"),
        "The socket's mode: who may connect (write permission).", since="1.6"),
    Key("server", "processes", "processes", Processes(),
        "Worker processes answering on the policy, Dovecot and metrics ports (SO_REUSEPORT), each a daemon "
        "of its own on the one database, under one master process; more than 1 needs a TCP port (not the "
        "socket). A process decides about 4,000 requests a second on one core.", since="1.6"),
    Key("db", "dbcon", "dbcon", Text(values="an SQLAlchemy URL: sqlite:////path, mysql+pymysql://, "
                                            "postgresql+psycopg://"),
        "The database. The user needs SELECT, INSERT, UPDATE and CREATE; tables are made on first start."),
    Key("db", "db_error_action", "db_error_action", Choice(DB_ERROR_ACTIONS),
        "The answer for an account pcc cannot judge while the database fails (accounts known to be blocked "
        "stay blocked): dunno lets mail flow, defer_if_permit makes clients retry."),
    Key("db", "spool_file", "spool_file", Text(blank="blocks of an outage kept in memory only",
                                               values="a file path"),
        "Where a block decided while the database fails waits, synced to disk, until the database takes it."),
    Key("geoip", "database", "geoip_database", Text(blank="the packaged country data", values="a .mmdb file"),
        "A MaxMind-format country or city database (GeoLite2, DB-IP Lite)."),
    Key("geoip", "update_url", "geoip_update_url", Text(blank="DB-IP's monthly Lite file", values="an https URL"),
        "Where pcc --update-geoip downloads database from (gzip or plain .mmdb)."),
    Key("mail", "domains", "domains", ListOf("login", "every authenticated account"),
        "The domains whose accounts pcc counts."),
    Key("mail", "mailsrv", "mailsrv", Text(blank="no mail", values="a host name or address"),
        "The SMTP server that carries the notices to the administrators."),
    Key("mail", "mailport", "mailport", Whole(1, 65535, 25, "25"), "Its port."),
    Key("mail", "notice", "notice", ListOf("address", "nobody"),
        "Who is told when an account is blocked."),
    Key("mail", "from", "sender", Text(blank="pcc@ and this host's full name", values="an email address"),
        "The sender of pcc's mail (its From: and the envelope's).", since="1.6"),
    Key("mail", "starttls", "mail_starttls", Choice(YES_NO, "NO", "no", yes_no=True),
        "yes: STARTTLS before anything is sent, the server's certificate verified (a submission port, an "
        "authenticated smarthost); a server that does not offer it gets nothing.", since="1.6"),
    Key("mail", "tls_ca_file", "mail_tls_ca_file", Text(blank="the system's certificate authorities",
                                                        values="a PEM file"),
        "The certificate authorities that verify the SMTP server's certificate.", since="1.6"),
    Key("mail", "user", "mail_user", Text(blank="no SMTP AUTH", values="a login"),
        "The SMTP AUTH login (with starttls = yes, unless mailsrv is this host).", since="1.6"),
    Key("mail", "password", "mail_password", Text(blank="none", values="text"),
        "Its password (keep pcc.conf mode 640, group pcc; never logged).", since="1.6"),
    Key("policy", "action", "action", Choice(BLOCK_ACTIONS),
        "What a blocked account's mail gets: reject (the client sees an error) or hold (accepted into "
        "Postfix's hold queue)."),
    Key("policy", "how_many_different_countries", "how_many_different_countries", Whole(1, 300),
        "Block an account that sends from more than this many countries..."),
    Key("policy", "in_how_much_time_in_days", "in_how_much_time_in_days", Number(0, 3650),
        "...within this many days (fractions allowed)."),
    Key("policy", "ignorecountries", "ignorecountries", ListOf("country"), "Countries that never count."),
    Key("policy", "whitelisted", "whitelisted", ListOf("login"), "Logins never counted nor blocked."),
    Key("policy", "whitelistedips", "whitelistedips", ListOf("network"),
        "Client addresses never counted (a webmail host); a blocked account stays blocked from them."),
    Key("policy", "reason", "reason", Text(blank="no text", values="text"),
        "The text Postfix gives with the action (logged; sent to the client with reject)."),
    Key("policy", "mode", "mode", Choice(MODES, "ENFORCE", "enforce"),
        "monitor: count, record and notify as when enforcing, but answer DUNNO (to roll out and tune)."),
    Key("policy", "monitor_answer", "monitor_answer", Choice(MONITOR_ANSWERS, "DUNNO", "dunno"),
        "In monitor mode, Postfix's answer for a message pcc would have stopped: dunno, or warn (Postfix "
        "logs \"warn: ... pcc would reject: <why>\" with the client, sender and recipient; mail flows).",
        since="1.6"),
    Key("policy", "max_travel_speed_kmh", "max_travel_speed_kmh",
        Number(0, 100000, blank="the impossible-travel rule off", optional=True),
        "The fastest believable journey between two messages of an account (needs City-level GeoIP data)."),
    Key("policy", "travel_accuracy_radius_km", "travel_accuracy_radius_km",
        Number(0, 20000, 0.0, "0", low_inclusive=True), "Journeys shorter than this are never judged."),
    Key("policy", "impossible_travel_action", "impossible_travel_action",
        Choice(TRAVEL_ACTIONS, "NOTIFY", "notify"), "What an impossible journey does: block, or notify only."),
    Key("limits", "messages_per_hour", "messages_per_hour", Whole(1, 100_000_000, 0, "off"),
        "The most messages an account may send in an hour (one per mail transaction, however many recipients).",
        since="1.6"),
    Key("limits", "messages_per_day", "messages_per_day", Whole(1, 100_000_000, 0, "off"),
        "The most messages an account may send in 24 hours.", since="1.6"),
    Key("limits", "recipients_per_hour", "recipients_per_hour", Whole(1, 100_000_000, 0, "off"),
        "The most recipients an account's messages may have in an hour.", since="1.6"),
    Key("limits", "recipients_per_day", "recipients_per_day", Whole(1, 100_000_000, 0, "off"),
        "The most recipients in 24 hours.", since="1.6"),
    Key("limits", "action", "limit_action", Choice(LIMIT_ACTIONS, "BLOCK", "block"),
        "What an account over a limit gets: block (the [policy] action and all a block does), defer "
        "(DEFER_IF_PERMIT until the window has room) or notify (the admins, once per account, limit and window).",
        since="1.6"),
    Key("postfix", "config_directory", "postfix_config_directory",
        Text(blank="Postfix's default", values="a directory"),
        "The Postfix configuration directory of the queues pcc holds, releases and deletes mail in."),
    Key("postfix", "hold_queued", "hold_queued", Choice(("YES", "NO", ""), "", "yes with action = hold"),
        "yes: a new block also holds the account's mail already queued (-r releases it, -e deletes it)."),
    Key("postfix", "queue_helper", "queue_helper",
        Text(blank="sudo -n with the sudoers lines of docs/operations.md, when pcc does not run as root", values="a socket path"),
        "The socket of pcc's queue helper (the Debian package's pcc-queue.socket, /run/pcc-queue.sock), "
        "which holds the queued mail for a daemon without root's rights.", since="1.6"),
    Key("dovecot", "policy_port", "dovecot_policy_port", Whole(1, 65535, 0, "off"),
        "Answer Dovecot's authentication policy (auth_policy_server_url) on this port."),
    Key("dovecot", "count_logins", "count_logins", Choice(YES_NO, "NO", "no", yes_no=True),
        "yes: a successful login counts its country like a message."),
    Key("dovecot", "api_header", "dovecot_api_header", Text(blank="none; required with policy_port",
                                                            values="Name: value"),
        "The exact auth_policy_server_api_header of dovecot.conf; a request without it is refused."),
    Key("dovecot", "doveadm_url", "doveadm_url", Text(blank="not used", values="an https URL"),
        "Dovecot's doveadm HTTP API, through which a block ends the account's sessions."),
    Key("dovecot", "doveadm_api_key", "doveadm_api_key", Text(blank="none", values="text"),
        "dovecot.conf's doveadm_api_key, for doveadm_url."),
    Key("dovecot", "doveadm_command", "doveadm_command", Text(blank="none", values="a command"),
        "Else this doveadm on this host (\"kick <account>\" is added)."),
    Key("notify", "webhook_urls", "webhook_urls", ListOf("url"),
        "Each gets a JSON POST for every block, unblock, impossible journey and outage (https)."),
    Key("notify", "webhook_secret", "webhook_secret", Text(blank="unsigned", values="text"),
        "Signs each POST: X-Pcc-Signature: sha256=<HMAC-SHA256 of the body>."),
    Key("notify", "notify_account", "notify_account", Choice(YES_NO, "NO", "no", yes_no=True),
        "yes: a blocked account's owner gets one plain mail a day at most."),
    Key("networks", "asn_database", "asn_database", Text(blank="networks unnamed", values="a .mmdb file"),
        "An ASN database: log lines, mails and webhooks name the network beside the country."),
    Key("networks", "asn_update_url", "asn_update_url", Text(blank="DB-IP's monthly ASN Lite",
                                                              values="an https URL"),
        "Where pcc --update-geoip downloads asn_database from."),
)
# The keys of each [list <label>] section (read by _network_lists).
LIST_KEYS = (
    Key("list <label>", "action", "action", Choice(LIST_ACTIONS),
        "What a request from an address on the list does: ignore, notify the admins, count the list as one "
        "more country, or block at once."),
    Key("list <label>", "file", "file", Text(values="a file path"),
        "One IP address or CIDR range a line; the list is off until the file is there."),
    Key("list <label>", "url", "url", Text(blank="refreshed by hand", values="an https URL"),
        "Where pcc --update-lists fetches the file from."),
    Key("list <label>", "max_age_days", "max_age_days", Number(0, 3650), "--health warns when the file is older."),
    Key("list <label>", "min_entries", "min_entries", Whole(1, 10_000_000),
        "--update-lists refuses a download with fewer entries."),
)


def read_single_value(key: Key, text: str, where: str) -> Any:
    """One key's value from `text`, read as pcc.conf's is (a rule's); a value
    the file would refuse raises ConfigError: "<where>: [section] key: why"."""
    reader = _ConfigReader.__new__(_ConfigReader)
    reader.path, reader.may_be_absent = where, set()
    reader.parser = configparser.ConfigParser(interpolation=None)
    reader.parser.read_dict({key.section: {key.name: text}})
    return key.kind.read(reader, key.section, key.name)


def load_settings(path: str, geoip_file_needed: bool = True) -> Settings:
    """Read and validate the whole configuration, or raise ConfigError."""
    config = _ConfigReader(path)
    known: dict = {"list": [key.name for key in LIST_KEYS]}
    for key in KEYS:
        known.setdefault(key.section, []).append(key.name)
    config.refuse_unknown_keys(known)
    config.may_be_absent = {(key.section, key.name) for key in KEYS if key.since}
    values = {key.field: key.kind.read(config, key.section, key.name) for key in KEYS}
    values["dbcon"] = canonical_database_url(values["dbcon"])
    settings = Settings(config_path=path, network_lists=_network_lists(config), **values)
    _check_ports(config, settings)
    if settings.dovecot_api_header and not re.fullmatch(r"[!-9;-~]+:\s*\S.*", settings.dovecot_api_header):
        raise config.fail("dovecot", "api_header", "must be one HTTP header, 'Name: value' (as Dovecot's "
                          "auth_policy_server_api_header), e.g. 'Authorization: Basic cGNjOnNlY3JldA=='")
    if settings.dovecot_policy_port and not settings.dovecot_api_header:
        # Without it anyone who can reach the port could report logins "from"
        # any country and block any account, or ask whether one is blocked.
        raise config.fail("dovecot", "api_header", "must be set with a policy_port: make a secret with "
                          "`printf 'pcc:%s' \"$(openssl rand -hex 16)\" | base64`, put 'Authorization: Basic "
                          "<that>' here and the same in dovecot.conf's auth_policy_server_api_header")
    for url in settings.webhook_urls:
        if urllib.parse.urlsplit(url).scheme != "https" and not is_loopback_url(url):
            raise config.fail("notify", "webhook_urls", f"{url_for_people(url)!r}: must be an https:// URL (plain "
                              "http only to this host)")
    if settings.doveadm_url and urllib.parse.urlsplit(settings.doveadm_url).scheme != "https" \
            and not is_loopback_url(settings.doveadm_url):
        # The API key travels with every request: in clear only on this host.
        raise config.fail("dovecot", "doveadm_url", "must be an https:// URL (plain http only to this host, "
                          f"e.g. http://127.0.0.1:8080/doveadm/v1), got {url_for_people(settings.doveadm_url)!r}")
    if settings.doveadm_url and not settings.doveadm_api_key:
        raise config.fail("dovecot", "doveadm_api_key", "must be set with doveadm_url (dovecot.conf's doveadm_api_key)")
    if settings.notify_account and not settings.mailsrv:
        raise config.fail("mail", "mailsrv", "must name an SMTP server when [notify] notify_account = yes")
    if settings.notice and not settings.mailsrv:
        raise config.fail("mail", "mailsrv", "must name an SMTP server when [mail] notice is set")
    _check_mail_sending(config, settings)
    problem = database_url_problem(settings.dbcon)
    if problem:
        raise config.fail("db", "dbcon", problem)
    for section, key, url in [("geoip", "update_url", settings.geoip_update_url),
                              ("networks", "asn_update_url", settings.asn_update_url)] + [
            (f"list {network_list.label}", "url", network_list.url) for network_list in settings.network_lists]:
        if url and urllib.parse.urlsplit(url).scheme != "https" and not is_loopback_url(url):
            raise config.fail(section, key, f"must be an https:// URL (plain http only to this host, for "
                              f"tests), got {url_for_people(url)[:100]!r}")
    if not geoip_file_needed:
        return settings  # --update-geoip installs it, or replaces a broken one
    kind = _geoip_database_type(config, settings.geoip_database) if settings.geoip_database else None
    if settings.max_travel_speed_kmh is not None:
        _require_places(config, settings.geoip_database, kind)
    return settings


def _check_mail_sending(config: _ConfigReader, settings: Settings) -> None:
    """[mail] from, starttls, tls_ca_file, user, password make sense together."""
    if settings.sender and (not re.fullmatch(r"[^@\s<>]+@[^@\s<>]+", settings.sender)):
        raise config.fail("mail", "from", f"{settings.sender!r} is not an email address")
    if bool(settings.mail_user) != bool(settings.mail_password):
        raise config.fail("mail", "user" if settings.mail_password else "password",
                          "user and password go together (SMTP AUTH), or are both blank")
    loopback = settings.mailsrv in ("localhost", "127.0.0.1", "::1")
    if settings.mail_user and not settings.mail_starttls and not loopback:
        raise config.fail("mail", "starttls", f"must be yes with [mail] user: the password would cross the "
                          f"network to {settings.mailsrv} in clear")
    if settings.mail_tls_ca_file and not os.access(settings.mail_tls_ca_file, os.R_OK):
        raise config.fail("mail", "tls_ca_file", f"cannot read {settings.mail_tls_ca_file}")


def _network_lists(config: _ConfigReader) -> tuple:
    """Every [list <label>] section, in the file's order, each with its own
    COUNT marker: the same label always gets the same code (unless two labels
    want one, when the first in alphabetical order keeps it)."""
    lists, taken = {}, set()
    for section in config.parser.sections():
        if not section.startswith("list"):
            continue
        label = section[4:].strip()
        if not section.startswith("list ") or not LIST_LABEL.fullmatch(label):
            raise ConfigError(f"{config.path}: [{section}]: a network list's section is [list <label>], the label "
                              f"1-16 of a-z 0-9 _ - (e.g. [list tor])")
        lists[label] = section
    markers = {}
    for label in sorted(lists):
        start = int.from_bytes(label.encode(), "big") % len(LIST_MARKER_CODES)
        for step in range(len(LIST_MARKER_CODES)):
            code = LIST_MARKER_CODES[(start + step) % len(LIST_MARKER_CODES)]
            if code not in taken:
                taken.add(code)
                markers[label] = code
                break
        else:
            raise ConfigError(f"{config.path}: more than {len(LIST_MARKER_CODES)} network lists")
    return tuple(NetworkList(label=label, marker=markers[label],
                             **{key.field: key.kind.read(config, section, key.name) for key in LIST_KEYS})
                 for label, section in lists.items())


def is_loopback_url(url: str) -> bool:
    """An http:// URL of this host (tests serve files there)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http":
        return False
    try:
        return parts.hostname == "localhost" or ipaddress.ip_address(parts.hostname or "").is_loopback
    except ValueError:
        return False


def _check_ports(config: _ConfigReader, settings: Settings) -> None:
    _check_socket(config, settings)
    if settings.metrics_port is not None and settings.metrics_port == settings.port:
        raise config.fail("server", "metrics_port", f"must differ from [server] port ({settings.port})")
    if settings.dovecot_policy_port is not None and settings.dovecot_policy_port in (settings.port,
                                                                                     settings.metrics_port):
        raise config.fail("dovecot", "policy_port", "must differ from [server] port and metrics_port")


def _geoip_database_type(config: _ConfigReader, path: str) -> str:
    """The type of the .mmdb at `path` (GeoLite2-Country...), or one clear line
    for a file that is missing, not a MaxMind-format database, or of no date."""
    if not os.path.exists(path):
        raise config.fail("geoip", "database", f"no such file: {path}")
    try:
        with open_maxmind(path) as reader:
            metadata = reader.metadata()
    except (OSError, ValueError, RuntimeError) as error:  # RuntimeError: maxminddb's InvalidDatabaseError
        raise config.fail("geoip", "database", f"{path} is not a MaxMind-format database: {error}") from None
    try:
        dt.datetime.fromtimestamp(metadata.build_epoch, dt.timezone.utc)
    except (OverflowError, OSError, ValueError, TypeError):
        raise config.fail("geoip", "database", f"{path}: its build_epoch {str(metadata.build_epoch)[:30]} "
                          f"is no date (a broken or forged file)") from None
    return metadata.database_type


def prepare_threshold_of(url: sa.engine.URL, default: Optional[int]) -> tuple:
    """(the URL without pcc's ?prepare_threshold=, psycopg's prepare_threshold:
    a count, or None for never; `default` when not given).  ValueError for a
    value that is neither."""
    given = url.query.get("prepare_threshold")
    if given is None:
        return url, default
    value = (given if isinstance(given, str) else given[-1]).lower()
    if value not in ("none", "off") and not value.isdigit():
        raise ValueError(f"prepare_threshold={value} is neither none nor a count")
    return url.difference_update_query(["prepare_threshold"]), None if value in ("none", "off") else int(value)


def canonical_database_url(dbcon: str) -> str:
    """[db] dbcon with the scheme admins copy from other tools (postgres://,
    mysql://, mariadb://) written as the driver pcc installs for it."""
    scheme, separator, rest = dbcon.partition("://")
    taken = DATABASE_SCHEMES.get(scheme.lower())
    return f"{taken}{separator}{rest}" if separator and taken else dbcon


def database_url_problem(dbcon: str) -> str:
    """Why [db] dbcon cannot be used as written, or "": what SQLAlchemy would
    take and libpq then fail on (a host it cannot resolve), or take and
    settle on a read-only standby with, is refused here, with the form to use."""
    several = "several PostgreSQL hosts go in the query: ?host=a:5432&host=b:5432&target_session_attrs=read-write"
    try:
        url = sa.engine.make_url(canonical_database_url(dbcon))
    except sa_exc.ArgumentError:
        return "is not an SQLAlchemy database URL (e.g. sqlite:////var/lib/pcc/pcc.sqlite3)"
    except ValueError:  # its port is no number: most often several hosts in the address
        return f"has a port that is not a number; {several}" if "," in dbcon.partition("?")[0] \
            else "has a port that is not a number"
    if url.drivername not in DATABASE_DRIVERS:
        return (f"uses {url.drivername}://, which pcc has no driver for: write sqlite:////path, "
                "postgresql+psycopg://user:password@host/database or mysql+pymysql://user:password@host/database "
                "(MariaDB too)")
    if "prepare_threshold" in url.query:
        if url.drivername != "postgresql+psycopg":
            return "has prepare_threshold=, which only postgresql+psycopg:// takes"
        try:
            prepare_threshold_of(url, None)
        except ValueError as error:
            return f"has {error} (none: never prepare statements, as PgBouncer's transaction pooling needs)"
    if url.get_backend_name() != "postgresql":
        return ""
    given = url.query.get("host", ())
    hosts = [given] if isinstance(given, str) else list(given)
    if any("," in host and ":" in host for host in hosts):
        return f"names its hosts as host=a:port,b:port, which libpq cannot resolve; {several}"
    if len([name for host in hosts for name in host.split(",")]) > 1 \
            and url.query.get("target_session_attrs") not in ("read-write", "primary"):
        return ("names several hosts without target_session_attrs=read-write: pcc could settle on a standby, "
                "where every write fails")
    return ""


def _require_places(config: _ConfigReader, path: str, kind: Optional[str]) -> None:
    """The impossible-travel rule needs coordinates: a City-level database."""
    problem = "it has countries only" if path else "the embedded default data has countries only"
    if path:
        if is_city_level(kind or ""):
            return
        problem = f"{path} is a {kind} database"
    raise config.fail("policy", "max_travel_speed_kmh", f"needs City-level GeoIP data in [geoip] database, but "
                      f"{problem} (use GeoLite2-City or DB-IP City Lite, or leave this blank)")


def _check_socket(config: _ConfigReader, settings: Settings) -> None:
    if settings.port == 0 and not settings.socket:
        raise config.fail("server", "port", "0 (no TCP port) needs a [server] socket to listen on")
    if settings.processes > 1 and settings.socket:
        raise config.fail("server", "processes", f"{settings.processes} processes share TCP ports only: leave "
                                                 f"[server] socket blank (Postfix: check_policy_service inet:) "
                                                 f"or set processes = 1")
    if (settings.socket_owner or settings.socket_group) and not settings.socket:
        raise config.fail("server", "socket", "must be set with socket_owner or socket_group")
    if settings.socket and not os.path.isabs(settings.socket):
        raise config.fail("server", "socket", f"must be an absolute path (Postfix's unix:NAME is relative to its "
                                             f"queue directory, pcc's is not), got {settings.socket!r}")
    if len(os.fsencode(settings.socket)) > 107:
        raise config.fail("server", "socket", "is longer than the 107 bytes a UNIX-domain socket's path may have")
    if settings.socket_owner:
        try:
            pwd.getpwnam(settings.socket_owner)
        except KeyError:
            raise config.fail("server", "socket_owner", f"no user {settings.socket_owner!r} on this host") from None
    if settings.socket_group:
        try:
            grp.getgrnam(settings.socket_group)
        except KeyError:
            raise config.fail("server", "socket_group", f"no group {settings.socket_group!r} on this host") from None
