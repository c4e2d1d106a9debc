"""`pcc.py --health`: ask the running daemon how it is, on its own port, and
say so in one line in the monitoring-plugin conventions (Nagios, Icinga,
monit): exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.
"""
from __future__ import annotations

import datetime as dt
import socket
import time

from .common import PROGRAM, utcnow
from .config import Settings
from .geoip import GEOIP_STALE_AFTER
from .ports import connect_unix
from .protocol import HEALTH_REQUEST

HEALTH_OK, HEALTH_WARNING, HEALTH_CRITICAL, HEALTH_UNKNOWN = 0, 1, 2, 3
HEALTH_LABELS = ("OK", "WARNING", "CRITICAL", "UNKNOWN")

# The daemon must answer within this many seconds, as Postfix would need it to.
HEALTH_TIMEOUT = 2.0

# GeoIP data built more days ahead than this is not genuine.
GEOIP_FUTURE_DAYS = 2
# Notifications that have waited longer than this mean the admins hear nothing.
UNSENT_NOTICE_WARNING = 600


def ask_daemon_health(settings: Settings) -> dict:
    """Send the health request to the daemon on host:port (its socket, when it
    has no port); its name=value words.  Raises OSError (TimeoutError
    included) when no whole answer comes in time."""
    deadline = time.monotonic() + HEALTH_TIMEOUT
    with _connect(settings) as connection:
        connection.sendall(f"request={HEALTH_REQUEST}\n\n".encode())
        reply = b""
        while not reply.endswith(b"\n\n"):
            connection.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = connection.recv(4096)
            if not chunk:
                raise ConnectionError("the connection was closed without an answer")
            reply += chunk
    return dict(word.split("=", 1) for word in reply.decode("utf-8", "replace").split() if "=" in word)


def _connect(settings: Settings) -> socket.socket:
    if settings.port:
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(settings.host, settings.host)
        return socket.create_connection((host, settings.port), timeout=HEALTH_TIMEOUT)
    return connect_unix(settings.socket, HEALTH_TIMEOUT)


def daemon_address(settings: Settings) -> str:
    return f"{settings.host}:{settings.port}" if settings.port else settings.socket


def check_health(settings: Settings) -> tuple:
    """(exit status, the one line) of `pcc.py --health`."""
    started = time.monotonic()
    try:
        report = ask_daemon_health(settings)
    except OSError as error:
        return HEALTH_CRITICAL, (f"PCC CRITICAL - no answer from {daemon_address(settings)} within "
                                 f"{HEALTH_TIMEOUT:g} s: {error.strerror or error or 'timed out'} | "
                                 f"response_time={time.monotonic() - started:.3f}s;;{HEALTH_TIMEOUT:g}")
    seconds = time.monotonic() - started
    if "database" not in report:
        return HEALTH_UNKNOWN, (f"PCC UNKNOWN - {daemon_address(settings)} answered, but not with a "
                                f"pcc health report (another service, or a pcc older than 1.2) | "
                                f"response_time={seconds:.3f}s;;{HEALTH_TIMEOUT:g}")
    critical, warnings = [], []
    failing = int(float(report.get("failing_seconds", 0)))
    if report["database"] != "ok":
        critical.append(f"the daemon cannot use its database for {failing} s "
                        f"({report.get('error_answers', '?')} requests answered {settings.db_error_action})")
    answered, _slash, processes = report.get("processes", "1/1").partition("/")
    if answered != processes:
        critical.append(f"{int(processes) - int(answered)} of {processes} worker processes did not answer "
                        f"(process {report.get('silent_processes', '?')}: restarting, or stuck; see the log)")
    built = report.get("geoip_built", "unknown")
    age = (utcnow().date() - dt.date.fromisoformat(built)).days if built != "unknown" else None
    if age is None or age > GEOIP_STALE_AFTER.days:
        warnings.append(f"GeoIP data is {age if age is not None else 'of unknown'} days old: {PROGRAM} --update-geoip")
    elif age < -GEOIP_FUTURE_DAYS:
        warnings.append(f"GeoIP data claims to be built {-age} days from now: a broken or forged file; reinstall "
                        f"it from a trusted source ({PROGRAM} --update-geoip --force)")
    spooled = int(report.get("spooled_blocks", 0))
    if spooled:
        warnings.append(f"{spooled} blocks wait in the spool for the database")
    unsent, waited = int(report.get("unsent_notices", 0)), int(report.get("oldest_unsent_seconds", 0))
    if unsent and waited > UNSENT_NOTICE_WARNING:
        warnings.append(f"{unsent} notifications unsent, the oldest for {waited // 60} min (check [mail] mailsrv)")
    if report.get("volume_sharing") == "failing":
        warnings.append("the [limits] counts are not shared with the other daemons (the database takes no volume "
                        "writes; each daemon limits on its own counts; see the daemon's log)")
    warnings += list_warnings(settings, report.get("lists", ""))
    status = HEALTH_CRITICAL if critical else HEALTH_WARNING if warnings else HEALTH_OK
    summary = "; ".join(critical + warnings) or "answering, database in use"
    # Named as the metrics are (pcc_spooled_blocks...), so a graph of either reads the same.
    perfdata = (f"response_time={seconds:.3f}s;;{HEALTH_TIMEOUT:g} pcc_database_failing_seconds={failing}s "
                f"pcc_spooled_blocks={spooled};1 pcc_unsent_notifications={unsent} "
                f"pcc_geoip_age_days={age if age is not None else 'U'};{GEOIP_STALE_AFTER.days}"
                + (f" pcc_worker_processes={answered};;;0;{processes}" if "processes" in report else ""))
    return status, f"PCC {HEALTH_LABELS[status]} - {summary} | {perfdata}"


def list_warnings(settings: Settings, reported: str) -> list:
    """A network list the daemon uses that is older than its max_age_days (a
    Tor list of last week misses this week's exits), or one whose file came
    and was refused."""
    warnings = []
    ages: dict = {}
    problems: dict = {}
    for item in filter(None, reported.split(",")):
        label, entries, age, problem = (item.split(":") + ["", "", ""])[:4]
        ages[label] = float(age) if entries != "off" and age not in ("", "-") else None
        problems[label] = (problem, entries)
    for network_list in settings.network_lists:
        problem, entries = problems.get(network_list.label, ("ok", ""))
        if problem not in ("ok", ""):
            warnings.append(f"network list {network_list.label}: its file {network_list.file} was {problem}; "
                            + ("the list is off" if entries == "off" else "the daemon uses the ranges it had")
                            + " (see its log)")
        days_old = ages.get(network_list.label)
        if days_old is not None and days_old > network_list.max_age_days:
            warnings.append(f"network list {network_list.label} is {days_old:.1f} days old (at most "
                            f"{network_list.max_age_days:g}): {PROGRAM} --update-lists")
    return warnings
