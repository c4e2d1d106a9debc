"""`pcc.py --update-geoip` and `--update-lists`: download current GeoIP
data (and the ASN database) or the network lists over https, check that each
is a file pcc can use and not one that would silently turn pcc off or on for
everyone (everything in one country, a forged build date, a file that moves a
large share of the world; an emptied, truncated or world-wide list), and
install it atomically where the daemon picks it up.  Anything wrong leaves
the installed file as it was.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import ipaddress
import os
import random
import re
import secrets
import stat
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
import zlib
from typing import Any, Iterator, Optional

from .common import __version__, open_maxmind, open_regular_file, url_for_people, user_name
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

# What the lock and the temporary files of an update are called in the
# target's directory.
LOCK_NAME = ".pcc-geoip.lock"

# Every real ASN file names the network of these.
WELL_KNOWN_NETWORKS = {"8.8.8.8": 15169, "1.1.1.1": 13335, "9.9.9.9": 19281}


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
    needs_places = settings.max_travel_speed_kmh is not None
    urls = [settings.geoip_update_url] if settings.geoip_update_url else default_geoip_urls(needs_places, now)
    with InstallDirectory(target, "[geoip] database") as directory:
        temporary, url = _first_download(urls, directory, timeout)
        current = directory.installed()
        try:
            with directory.opened(temporary) as downloaded:
                description = check_geoip_file(downloaded, current, needs_places, now, force)
        finally:
            if current is not None:
                current.close()
        directory.install(temporary)  # the daemon sees a new file and reads it; readers never see half of one
    return f"installed {target}: {description}, from {url_for_people(url)}"


def _first_download(urls: list, directory: "InstallDirectory", timeout: float) -> tuple:
    for number, url in enumerate(urls, 1):
        try:
            return download_geoip(url, directory, timeout), url
        except UpdateError as error:
            if number == len(urls) or "HTTP 404" not in str(error):
                raise
    raise AssertionError("unreachable")


TEMPORARY_PREFIX, TEMPORARY_SUFFIX = ".pcc-geoip-", ".mmdb"


class InstallDirectory:
    """The directory a download is installed in, opened once, no link the
    daemon's user could have made followed on the way (it may own the
    directory; root runs the update): the lock, the temporary file, the
    rename and the removals all go through this descriptor, so a directory
    swapped for a link after the check changes nothing of where root writes.
    A second run waits for the first (the lock).  Leaving it removes what
    the run left behind."""

    def __init__(self, target: str, what: str):
        self.target_path = os.path.abspath(target)
        self.what = what
        self.name = os.path.basename(self.target_path)
        self.descriptor = open_directory(os.path.dirname(self.target_path), f"the directory of {what}")
        self._temporaries: list = []

    def __enter__(self) -> "InstallDirectory":
        self._lock: Optional[int] = None
        try:
            try:
                mode = os.stat(self.name, dir_fd=self.descriptor, follow_symlinks=False).st_mode
            except FileNotFoundError:
                mode = stat.S_IFREG  # none yet
            if stat.S_ISLNK(mode):
                raise UpdateError(f"{self.target_path} ({self.what}) is a symbolic link; pcc does not follow links "
                                  "to the files it writes: point the configuration at the real file")
            if not stat.S_ISREG(mode):
                raise UpdateError(f"{self.target_path} ({self.what}) is not a regular file (a FIFO, a device or a "
                                  "directory put there?)")
            try:
                self._lock = open_regular_file(LOCK_NAME, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644,
                                               dir_fd=self.descriptor)
            except OSError as error:  # a link or a FIFO planted there, a directory not ours
                raise self._failed(LOCK_NAME, error) from None
            fcntl.flock(self._lock, fcntl.LOCK_EX)
            self._remove_leftovers()
        except BaseException:
            if self._lock is not None:
                os.close(self._lock)
            os.close(self.descriptor)
            raise
        return self

    def __exit__(self, *_exc) -> None:
        for name in self._temporaries:
            self._unlink(name)
        if self._lock is not None:
            os.close(self._lock)  # releases the lock
        os.close(self.descriptor)

    @contextlib.contextmanager
    def opened(self, name: str) -> Iterator[str]:
        """A path to the regular file `name` of this directory, opened here
        without following a link: /proc/self/fd/N, which names that very
        file whatever is renamed meanwhile (for maxminddb, which opens paths)."""
        try:
            descriptor = open_regular_file(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=self.descriptor)
        except OSError as error:
            raise self._failed(name, error) from None
        try:
            yield f"/proc/self/fd/{descriptor}"
        finally:
            os.close(descriptor)

    def new_temporary(self) -> tuple:
        """(descriptor, name) of a new empty file here, 0644."""
        while True:
            name = f"{TEMPORARY_PREFIX}{secrets.token_hex(8)}{TEMPORARY_SUFFIX}"
            try:
                descriptor = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                                     0o600, dir_fd=self.descriptor)
            except FileExistsError:
                continue
            except OSError as error:  # a directory this user may not write to
                raise self._failed(name, error) from None
            self._temporaries.append(name)
            os.fchmod(descriptor, 0o644)  # on the descriptor: never on a path someone could swap
            return descriptor, name

    def installed(self) -> Optional[GeoIP]:
        """The GeoIP file installed now, or None (none yet, or broken)."""
        try:
            with self.opened(self.name) as path:
                return GeoIP(path)
        except (UpdateError, OSError, ValueError, RuntimeError, OverflowError):
            return None  # a file that passes the checks replaces it

    def read(self, name: str, limit: int) -> bytes:
        try:
            with os.fdopen(open_regular_file(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=self.descriptor),
                           "rb") as file:
                return file.read(limit)
        except OSError as error:
            raise self._failed(name, error) from None

    def install(self, name: str) -> None:
        try:
            os.replace(name, self.name, src_dir_fd=self.descriptor, dst_dir_fd=self.descriptor)
        except OSError as error:
            raise self._failed(self.name, error) from None
        self._temporaries.remove(name)

    def _failed(self, name: str, error: OSError) -> UpdateError:
        """One line for what the filesystem refused (never a traceback)."""
        return UpdateError(f"{os.path.join(os.path.dirname(self.target_path), name)}: {error.strerror or error}")

    def _unlink(self, name: str) -> None:
        try:
            os.unlink(name, dir_fd=self.descriptor)
        except OSError:
            pass

    def _remove_leftovers(self) -> None:
        """Temporary files of a run that was killed (holding the lock, no run is going on)."""
        for name in os.listdir(self.descriptor):
            if name.startswith(TEMPORARY_PREFIX) and name.endswith(TEMPORARY_SUFFIX):
                self._unlink(name)


def open_directory(path: str, what: str) -> int:
    """A descriptor of directory `path`, reached from / one name at a time:
    a name in a directory that anyone but root may write to is never
    followed if it is a link (the daemon's user could have put it there),
    and the last name never is."""
    names = [name for name in os.path.abspath(path).split("/") if name]
    descriptor = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for number, name in enumerate(names, 1):
            parent = os.fstat(descriptor)
            root_only = parent.st_uid == 0 and not parent.st_mode & 0o022
            no_link = os.O_NOFOLLOW if number == len(names) or not root_only else 0
            try:
                child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | no_link, dir_fd=descriptor)
            except OSError as error:
                if error.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink("/" + "/".join(names[:number])):
                    raise UpdateError(f"{'/' + '/'.join(names[:number])} ({what}) is a symbolic link; pcc does "
                                      "not follow links to the files it writes: point the configuration at the "
                                      "real file") from None
                if error.errno == errno.ENOENT:
                    raise UpdateError(f"the directory {path} does not exist (create it, writable by "
                                      f"{user_name(os.geteuid())}, who "
                                      "runs the update, and readable by the daemon's user)") from None
                raise UpdateError(f"{path}: {error.strerror}") from None
            os.close(descriptor)
            descriptor = child
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor


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


def download_geoip(url: str, directory: InstallDirectory, timeout: float, limit: int = GEOIP_DOWNLOAD_LIMIT) -> str:
    """The file at `url`, uncompressed if it is gzip, in a new file of
    `directory`; its name there.  All of it within `timeout` seconds, however
    the server trickles."""
    if not allowed_update_url(url):
        raise UpdateError(f"{url_for_people(url)}: not an https URL")
    descriptor, temporary = directory.new_temporary()
    outcome: dict = {}
    worker = threading.Thread(target=_download_into, args=(url, descriptor, timeout, outcome, limit), daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive() or "error" in outcome:  # a worker still writing writes to a file removed at the end
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
    inflate: Any = None  # a zlib decompressor, or False for a plain file
    written = 0
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


def check_geoip_file(path: str, current: Optional[GeoIP], needs_places: bool, now: dt.datetime,
                     force: bool = False) -> str:
    """Use a downloaded file only if it is what pcc needs (and, unless
    forced, close to the `current` one); its description."""
    try:
        fresh = GeoIP(path)
    except (OSError, ValueError, RuntimeError, OverflowError) as error:  # RuntimeError: InvalidDatabaseError
        raise UpdateError(f"the download is not a MaxMind-format database (an error page, or truncated?): "
                          f"{error}") from None
    try:
        _check_usable(fresh, needs_places, now)
        if current is not None and not force:
            _check_against(fresh, current)
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
        draw, found = random.Random(20261130), list[ipaddress.IPv4Address | ipaddress.IPv6Address]()
        while len(found) < SAMPLED_IPV4:
            address = ipaddress.IPv4Address(draw.getrandbits(32))
            if address.is_global:
                found.append(address)
        while len(found) < SAMPLED_IPV4 + SAMPLED_IPV6:  # 2000::/4, where the allocations are
            found.append(ipaddress.IPv6Address((0x2 << 124) | draw.getrandbits(124)))
        _SAMPLE = found
    return _SAMPLE


# --- the ASN database -----------------------------------------------------------


def update_asn(settings: Settings, timeout: float, now: dt.datetime) -> str:
    """Download, check and install [networks] asn_database (DB-IP's ASN Lite
    unless asn_update_url says otherwise); what was installed."""
    target = settings.asn_database
    urls = [settings.asn_update_url] if settings.asn_update_url else [
        DBIP_LITE_URL.format(kind="asn", month=f"{moment:%Y-%m}")
        for moment in (now, now.replace(day=1) - dt.timedelta(days=1))]
    with InstallDirectory(target, "[networks] asn_database") as directory:
        temporary, url = _first_download(urls, directory, timeout)
        with directory.opened(temporary) as downloaded:
            description = check_asn_file(downloaded)
        directory.install(temporary)
    return f"installed {target}: {description}, from {url_for_people(url)}"


def check_asn_file(path: str) -> str:
    try:
        reader = open_maxmind(path)
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
    with InstallDirectory(target, f"[list {network_list.label}] file") as directory:
        temporary = download_geoip(network_list.url, directory, timeout, LIST_DOWNLOAD_LIMIT)
        try:
            ranges = parse_list(directory.read(temporary, LIST_DOWNLOAD_LIMIT + 1), network_list.min_entries,
                                "the download")
        except ListError as error:
            raise UpdateError(str(error)) from None
        directory.install(temporary)  # the daemon reads it at its next look (within seconds)
    return (f"installed {target}: {ranges.entries} entries ({ranges.ranges} ranges once merged), "
            f"from {url_for_people(network_list.url)}")
