"""Commands for the daemon's surroundings: `--update-geoip` (download, check
and install current GeoIP data) and `--health` (ask the running daemon, in
the monitoring-plugin conventions).
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import socket
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from typing import Optional

from .common import __version__, utcnow
from .config import Settings
from .geoip import GEOIP_STALE_AFTER, GeoIP
from .service import HEALTH_REQUEST

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
