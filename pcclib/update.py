"""`pcc.py --update-geoip` and `--update-lists`: download current GeoIP
data (and the ASN database) or the network lists over https, check that each
is a file pcc can use and not one that would silently turn pcc off or on for
everyone (everything in one country, a forged build date, a file that moves a
large share of the world; an emptied, truncated or world-wide list), and
install it atomically where the daemon picks it up.  Anything wrong leaves
the installed file as it was.
"""
from __future__ import annotations

import datetime as dt
import fcntl
import glob
import ipaddress
import os
import random
import re
import sys
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
import zlib
from typing import Optional

from .common import __version__, symlink_refusal, url_for_people
from .config import Settings, is_loopback_url
from .geoip import GeoIP
from .networks import MAX_LIST_BYTES, ListError, parse_list

# DB-IP's free "Lite" databases (CC BY 4.0), one file a month, MaxMind format.
DBIP_LITE_URL = "https://download.db-ip.com/free/dbip-{kind}-lite-{month}.mmdb.gz"
GEOIP_DOWNLOAD_LIMIT = 1 << 30  # bytes once uncompressed; the City Lite file is about 130 MB

# A list of addresses is far smaller than a GeoIP file.
LIST_DOWNLOAD_LIMIT = MAX_LIST_BYTES
# Every real GeoIP file places these in a country; a file that does not is no
# file to count with (an error page, a truncated or foreign file).
WELL_KNOWN_ADDRESSES = ("8.8.8.8", "1.1.1.1", "9.9.9.9")
# A file built further ahead than this claims a date no real file has, and
# would be kept over every honest update that follows.
FUTURE_MARGIN = dt.timedelta(days=2)
# Addresses sampled (IPv4, IPv6; the same every run) to compare the download
# with the installed file.  A real file places them in some 240 countries; a
# monthly update moves far under 1% of them.
SAMPLED_IPV4, SAMPLED_IPV6 = 20000, 5000
FEWEST_COUNTRIES = 100
MOST_MOVED_SHARE = 0.03


class UpdateError(Exception):
    """Why a GeoIP update failed; the installed file is untouched."""


def default_geoip_urls(needs_places: bool, now: dt.datetime) -> list:
    """This month's DB-IP Lite file, then last month's (a new one appears in
    the first days of a month)."""
    kind = "city" if needs_places else "country"
    last_month = now.replace(day=1) - dt.timedelta(days=1)
    return [DBIP_LITE_URL.format(kind=kind, month=f"{moment:%Y-%m}") for moment in (now, last_month)]


def update_geoip(settings: Settings, timeout: float, now: dt.datetime, force: bool = False) -> str:
    """Download, check, and rename over [geoip] database; what was installed.
    force: install a file the comparison with the installed one refuses (a
    person looked at it), never one that is no usable GeoIP file."""
    target = settings.geoip_database
    if not target:
        raise UpdateError("[geoip] database is blank (the embedded data cannot be updated): set it to the path "
                          "pcc keeps its GeoIP file at, e.g. /var/lib/pcc/dbip-country-lite.mmdb, and run this again")
    refusal = symlink_refusal(target, "[geoip] database")
    if refusal:
        raise UpdateError(refusal)
    needs_places = settings.max_travel_speed_kmh is not None
    directory = os.path.dirname(os.path.abspath(target))
    urls = [settings.geoip_update_url] if settings.geoip_update_url else default_geoip_urls(needs_places, now)
    with _one_update_at_a_time(directory):
        _remove_leftovers(directory)
        temporary, url = _first_download(urls, directory, timeout)
        try:
            description = check_geoip_file(temporary, target, needs_places, now, force)
            os.replace(temporary, target)  # the daemon sees a new file and reads it; readers never see half of one
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
    return f"installed {target}: {description}, from {url_for_people(url)}"


def _first_download(urls: list, directory: str, timeout: float) -> tuple:
    for number, url in enumerate(urls, 1):
        try:
            return download_geoip(url, directory, timeout), url
        except UpdateError as error:
            if number == len(urls) or "HTTP 404" not in str(error):
                raise
    raise AssertionError("unreachable")


class _one_update_at_a_time:
    """A lock file in the target's directory: a second run waits for the first."""

    def __init__(self, directory: str):
        self.path = os.path.join(directory, ".pcc-geoip.lock")

    def __enter__(self):
        try:
            self.descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as error:  # a link planted there, a directory not ours
            raise UpdateError(f"{self.path}: {error.strerror}") from None
        fcntl.flock(self.descriptor, fcntl.LOCK_EX)
        return self

    def __exit__(self, *_exc):
        os.close(self.descriptor)  # releases the lock


def _remove_leftovers(directory: str) -> None:
    """Temporary files of a run that was killed (holding the lock, no run is going on)."""
    for path in glob.glob(os.path.join(glob.escape(directory), ".pcc-geoip-*.mmdb")):
        try:
            os.unlink(path)
        except OSError:
            pass


class _SameSchemeRedirects(urllib.request.HTTPRedirectHandler):
    """Redirects stay on https (or on http to this host, for tests): a
    download never leaves for ftp:, file: or plain http elsewhere."""

    def redirect_request(self, request, fp, code, message, headers, new_url):
        if not allowed_update_url(new_url):
            raise UpdateError(f"{url_for_people(request.full_url)}: redirected to {url_for_people(new_url)[:100]}, "
                              "which is not https")
        return super().redirect_request(request, fp, code, message, headers, new_url)


def allowed_update_url(url: str) -> bool:
    return urllib.parse.urlsplit(url).scheme == "https" or is_loopback_url(url)


def download_geoip(url: str, directory: str, timeout: float, limit: int = GEOIP_DOWNLOAD_LIMIT) -> str:
    """The file at `url`, uncompressed if it is gzip, in a new file of
    `directory`; its path.  All of it within `timeout` seconds, however the
    server trickles."""
    if not allowed_update_url(url):
        raise UpdateError(f"{url_for_people(url)}: not an https URL")
    descriptor, temporary = tempfile.mkstemp(prefix=".pcc-geoip-", suffix=".mmdb", dir=directory)
    os.fchmod(descriptor, 0o644)  # on the descriptor: never on a path someone could swap
    outcome: dict = {}
    worker = threading.Thread(target=_download_into, args=(url, descriptor, timeout, outcome, limit), daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive() or "error" in outcome:
        os.unlink(temporary)  # a worker still writing writes to a file no one will find
        raise outcome.get("error") or UpdateError(f"{url_for_people(url)}: the download took longer than --timeout "
                                                  f"({timeout:g} s)")
    return temporary


def _download_into(url: str, descriptor: int, timeout: float, outcome: dict, limit: int) -> None:
    opener = urllib.request.build_opener(_SameSchemeRedirects)  # proxies from the environment
    request = urllib.request.Request(url, headers={"User-Agent": f"pcc/{__version__}"})
    try:
        with opener.open(request, timeout=timeout) as response, open(descriptor, "wb") as out:
            _copy_uncompressed(response, out, limit)
    except UpdateError as error:
        outcome["error"] = error
    except urllib.error.HTTPError as error:
        outcome["error"] = UpdateError(f"{url_for_people(url)}: HTTP {error.code} {error.reason}")
    except (urllib.error.URLError, OSError, zlib.error, ValueError) as error:
        reason = getattr(error, "reason", None) or error
        if isinstance(reason, TimeoutError):  # the server stalled: the same as a slow whole download
            reason = f"the download took longer than --timeout ({timeout:g} s)"
        outcome["error"] = UpdateError(f"{url_for_people(url)}: {reason}")


def _copy_uncompressed(response, out, limit: int) -> None:
    inflate, written = None, 0
    while True:
        chunk = response.read(1 << 16)
        if not chunk:
            break
        if inflate is None and written == 0:
            inflate = zlib.decompressobj(16 + zlib.MAX_WBITS) if chunk[:2] == b"\x1f\x8b" else False
        data = inflate.decompress(chunk) if inflate else chunk
        written += len(data)
        if written > limit:
            raise UpdateError(f"more than {limit >> 20} MB: not the file expected")
        out.write(data)
    if inflate and not inflate.eof:
        raise UpdateError("the gzip data ends early (a truncated download)")
    out.flush()
    os.fsync(out.fileno())


def check_geoip_file(path: str, installed: str, needs_places: bool, now: dt.datetime, force: bool = False) -> str:
    """Use a downloaded file only if it is what pcc needs; its description."""
    try:
        fresh = GeoIP(path)
    except (OSError, ValueError, RuntimeError, OverflowError) as error:  # RuntimeError: InvalidDatabaseError
        raise UpdateError(f"the download is not a MaxMind-format database (an error page, or truncated?): "
                          f"{error}") from None
    try:
        _check_usable(fresh, needs_places, now)
        current = _installed(installed)
        if current is not None:
            try:
                if not force:
                    _check_against(fresh, current)
            finally:
                current.close()
        return f"{fresh.database_type}, built {fresh.built}"
    finally:
        fresh.close()


def _check_usable(fresh: GeoIP, needs_places: bool, now: dt.datetime) -> None:
    kind = fresh.database_type
    if needs_places and not fresh.has_places:
        raise UpdateError(f"it is a {kind} database, and max_travel_speed_kmh needs City-level data "
                          "(use an update_url of a City file)")
    unplaced = [address for address in WELL_KNOWN_ADDRESSES
                if not re.fullmatch(r"[A-Z]{2}", fresh.country(ipaddress.ip_address(address)).code or "")]
    if unplaced:
        raise UpdateError(f"it places no country for {', '.join(unplaced)}: not a usable GeoIP file")
    if fresh.built is None or fresh.built > (now + FUTURE_MARGIN).date():
        raise UpdateError(f"it claims to be built on {fresh.built}, in the future: a broken or forged file")
    countries = {fresh.country(address).code for address in sample_addresses()} - {None}
    if len(countries) < FEWEST_COUNTRIES:
        raise UpdateError(f"it places the sampled addresses in {len(countries)} countries only (a real file: "
                          f"some 240): a file like this would stop pcc from counting")


def _check_against(fresh: GeoIP, current: GeoIP) -> None:
    if fresh.built is not None and current.built is not None and fresh.built < current.built:
        raise UpdateError(f"it was built on {fresh.built}, before the installed file ({current.built}); "
                          f"--force installs it")
    placed = moved = 0
    for address in sample_addresses():
        new, old = fresh.country(address).code, current.country(address).code
        if new or old:
            placed += 1
            moved += new != old
    if placed and moved / placed > MOST_MOVED_SHARE:
        raise UpdateError(f"it moves {moved / placed:.1%} of the sampled addresses to another country (a "
                          f"monthly update moves under 1%): check it, then install it with --force")


_SAMPLE: Optional[list] = None


def sample_addresses() -> list:
    """The same spread of public addresses every run, IPv4 and IPv6."""
    global _SAMPLE
    if _SAMPLE is None:
        draw, found = random.Random(20261130), []
        while len(found) < SAMPLED_IPV4:
            address = ipaddress.IPv4Address(draw.getrandbits(32))
            if address.is_global:
                found.append(address)
        while len(found) < SAMPLED_IPV4 + SAMPLED_IPV6:  # 2000::/4, where the allocations are
            found.append(ipaddress.IPv6Address((0x2 << 124) | draw.getrandbits(124)))
        _SAMPLE = found
    return _SAMPLE


def _installed(path: str) -> Optional[GeoIP]:
    try:
        return GeoIP(path)
    except (OSError, ValueError, RuntimeError, OverflowError):
        return None  # none yet, or broken: a file that passes the checks above replaces it


# --- the ASN database -----------------------------------------------------------

# Every real ASN file names the network of these.
WELL_KNOWN_NETWORKS = {"8.8.8.8": 15169, "1.1.1.1": 13335, "9.9.9.9": 19281}


def update_asn(settings: Settings, timeout: float, now: dt.datetime) -> str:
    """Download, check and install [networks] asn_database (DB-IP's ASN Lite
    unless asn_update_url says otherwise); what was installed."""
    target = settings.asn_database
    refusal = symlink_refusal(target, "[networks] asn_database")
    if refusal:
        raise UpdateError(refusal)
    directory = os.path.dirname(os.path.abspath(target))
    urls = [settings.asn_update_url] if settings.asn_update_url else [
        DBIP_LITE_URL.format(kind="asn", month=f"{moment:%Y-%m}")
        for moment in (now, now.replace(day=1) - dt.timedelta(days=1))]
    with _one_update_at_a_time(directory):
        _remove_leftovers(directory)
        temporary, url = _first_download(urls, directory, timeout)
        try:
            description = check_asn_file(temporary)
            os.replace(temporary, target)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
    return f"installed {target}: {description}, from {url_for_people(url)}"


def check_asn_file(path: str) -> str:
    import maxminddb

    try:
        reader = maxminddb.open_database(path)
    except (OSError, ValueError, RuntimeError) as error:
        raise UpdateError(f"the download is not a MaxMind-format database (an error page, or truncated?): "
                          f"{error}") from None
    with reader:
        named = 0
        for address in WELL_KNOWN_NETWORKS:
            record = reader.get(address)
            named += isinstance(record, dict) and isinstance(record.get("autonomous_system_number"), int)
        if named < 2:
            raise UpdateError(f"it names the network (autonomous_system_number) of {named} of "
                              f"{', '.join(WELL_KNOWN_NETWORKS)}: not an ASN database")
        return f"{reader.metadata().database_type}"


# --- the network lists ----------------------------------------------------------


def update_lists(settings: Settings, timeout: float) -> int:
    """`pcc.py --update-lists`: every list with a url; one line each.  Exit
    status 1 when any failed (its old file stays), else 0."""
    lists = [network_list for network_list in settings.network_lists if network_list.url]
    if not lists:
        print(f"pcc: no network list with a url in {settings.config_path} ([list <label>] sections)")
        return 0
    failed = 0
    for network_list in lists:
        try:
            print(f"list {network_list.label}: {update_list(network_list, timeout)}")
        except UpdateError as error:
            failed += 1
            print(f"pcc: list {network_list.label}: update failed, the installed file is unchanged: {error}",
                  file=sys.stderr)
    return 1 if failed else 0


def update_list(network_list, timeout: float) -> str:
    target = network_list.file
    refusal = symlink_refusal(target, f"[list {network_list.label}] file")
    if refusal:
        raise UpdateError(refusal)
    directory = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(directory):
        raise UpdateError(f"the directory {directory} does not exist (create it, owned by root, readable by pcc)")
    refusal = symlink_refusal(directory, f"the directory of [list {network_list.label}] file")
    if refusal:
        raise UpdateError(refusal)
    with _one_update_at_a_time(directory):
        _remove_leftovers(directory)
        temporary = download_geoip(network_list.url, directory, timeout, LIST_DOWNLOAD_LIMIT)
        try:
            with open(temporary, "rb") as downloaded:
                ranges = parse_list(downloaded.read(), network_list.min_entries, "the download")
            os.replace(temporary, target)  # the daemon reads it at its next look (within seconds)
        except ListError as error:
            raise UpdateError(str(error)) from None
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
    return (f"installed {target}: {ranges.entries} entries ({ranges.ranges} ranges once merged), "
            f"from {url_for_people(network_list.url)}")
