"""Networks: whether a client address is on one of the administrator's network
lists ([list tor], [list vpn]...: Tor exits, VPN and data-centre ranges) and
which network (AS number and organisation) it belongs to, from an ASN .mmdb.
Also what makes a list file one pcc may use: --update-lists and the daemon
check a file the same way, and a file that fails is never used.
"""
from __future__ import annotations

import array
import bisect
import functools
import io
import ipaddress
import os
import socket
import time
from typing import Optional

from .common import PROGRAM, file_signature, log, open_maxmind, open_regular_file
from .config import NetworkList, Settings
from .protocol import NetworkFacts, unwrap_ipv4

# A list file larger than this is no list of addresses (an error page, a dump).
MAX_LIST_BYTES = 64 << 20
# A list covering more than this share of the public IPv4 addresses, or of the
# IPv6 space the RIRs hand out, is broken, not a list of VPNs: it would make
# pcc block or count most of the world.
MAX_ADDRESS_SHARE = 0.25
# The answers kept per address: Postfix asks about the same few clients.
LOOKUP_CACHE_SIZE = 16384
# The facts of an address on no list, of no known AS.
NO_FACTS = NetworkFacts()


class ListError(ValueError):
    """Why a list file cannot be used; the one used before stays."""


def _merged(ranges: list) -> list:
    merged: list = []
    for low, high in ranges:
        if merged and low <= merged[-1][1] + 1:
            if high > merged[-1][1]:
                merged[-1] = (merged[-1][0], high)
        else:
            merged.append((low, high))
    return merged


def _special(*networks: str) -> tuple:
    """Sorted, merged (low, high) of networks, for bisection."""
    return tuple(_merged(sorted((int(n.network_address), int(n.broadcast_address))
                                for n in map(ipaddress.ip_network, networks))))


# What no list of public networks may touch (RFC 6890's special-purpose
# addresses, multicast and reserved space): a list naming them would catch
# the administrator's own clients.  IPv6 entries must lie in global unicast
# 2000::/3, outside the documentation and IETF protocol blocks.
SPECIAL_IPV4 = _special("0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
                        "172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24", "192.31.196.0/24", "192.52.193.0/24",
                        "192.88.99.0/24", "192.168.0.0/16", "192.175.48.0/24", "198.18.0.0/15", "198.51.100.0/24",
                        "203.0.113.0/24", "224.0.0.0/3")
SPECIAL_IPV6 = _special("::/3", "4000::/2", "8000::/1", "2001::/23", "2001:db8::/32")

# What IANA has given the five RIRs of 2000::/3 (its IPv6 Global Unicast
# Address Assignments, unchanged since 2019-11-06): where IPv6 users are.
# A share of all 2000::/3, 97% of it unassigned, said nothing: a list of
# these blocks' /17s covered "1%" and caught every IPv6 client.
RIR_IPV6 = _special(
    "2001:200::/23", "2001:400::/23", "2001:600::/23", "2001:800::/22", "2001:c00::/23", "2001:e00::/23",
    "2001:1200::/23", "2001:1400::/22", "2001:1800::/23", "2001:1a00::/23", "2001:1c00::/22", "2001:2000::/19",
    "2001:4000::/23", "2001:4200::/23", "2001:4400::/23", "2001:4600::/23", "2001:4800::/23", "2001:4a00::/23",
    "2001:4c00::/23", "2001:5000::/20", "2001:8000::/19", "2001:a000::/20", "2001:b000::/20", "2003::/18",
    "2400::/12", "2600::/12", "2610::/23", "2620::/23", "2630::/12", "2800::/12", "2a00::/12", "2a10::/12",
    "2c00::/12")
RIR_IPV6_SIZE = sum(high - low + 1 for low, high in RIR_IPV6)
PUBLIC_IPV4_SIZE = (1 << 32) - sum(high - low + 1 for low, high in SPECIAL_IPV4)


def _overlap(ranges: list, space: tuple) -> int:
    """How many addresses of merged, sorted `ranges` lie in `space` (the same)."""
    total, position = 0, 0
    for low, high in ranges:
        while position < len(space) and space[position][1] < low:
            position += 1
        scan = position
        while scan < len(space) and space[scan][0] <= high:
            total += min(high, space[scan][1]) - max(low, space[scan][0]) + 1
            scan += 1
    return total


class AddressRanges:
    """A set of IPv4 and IPv6 ranges, merged and sorted, looked up by bisection:
    O(log n).  IPv4 bounds live in arrays of 32-bit integers (8 bytes a
    range); IPv6 bounds in lists of Python integers (about 100 bytes a range)."""

    def __init__(self, v4: array.array, v6: list, entries: int):
        """v4: low << 32 | high of each IPv4 range (8 bytes each, not a tuple
        of 120: a million-line list is read in far less memory); v6: (low,
        high) integer bounds; both in any order."""
        self.entries = entries
        lows, highs = array.array("I"), array.array("I")
        for packed in sorted(v4):
            low, high = packed >> 32, packed & 0xFFFFFFFF
            if highs and low <= highs[-1] + 1:
                highs[-1] = max(highs[-1], high)
            else:
                lows.append(low)
                highs.append(high)
        self._v4 = (lows, highs)
        v6 = _merged(sorted(v6))
        self._v6 = ([low for low, _ in v6], [high for _, high in v6])
        # Lists hold no special-purpose IPv4 (parse_list refuses it): every address counts.
        self.ipv4_share = sum(high - low + 1 for low, high in zip(lows, highs)) / PUBLIC_IPV4_SIZE
        self.ipv6_share = _overlap(v6, RIR_IPV6) / RIR_IPV6_SIZE
        self.ranges = len(lows) + len(v6)

    def __contains__(self, address) -> bool:
        lows, highs = self._v4 if address.version == 4 else self._v6
        return _inside(lows, highs, int(address))


def _inside(lows, highs, value: int) -> bool:
    position = bisect.bisect_right(lows, value) - 1
    return position >= 0 and value <= highs[position]


def _overlaps(special: tuple, low: int, high: int) -> bool:
    position = bisect.bisect_right(special, (high, 1 << 128)) - 1
    return position >= 0 and special[position][1] >= low


def _bounds(entry: str) -> tuple:
    """(IP version, low, high) of "192.0.2.1" or "2001:db8::/32"; ValueError
    for anything else.  socket.inet_pton, not ipaddress: a million lines in
    seconds, not minutes."""
    address, slash, prefix = entry.partition("/")
    try:
        if ":" in address:
            version, bits, value = 6, 128, int.from_bytes(socket.inet_pton(socket.AF_INET6, address), "big")
        else:
            version, bits, value = 4, 32, int.from_bytes(socket.inet_pton(socket.AF_INET, address), "big")
    except OSError:
        raise ValueError(entry) from None
    length = int(prefix) if slash and prefix.isdigit() and len(prefix) <= 3 else (bits if not slash else -1)
    if not 0 <= length <= bits:
        raise ValueError(entry)
    host_bits = bits - length
    low = value >> host_bits << host_bits
    return version, low, low | ((1 << host_bits) - 1)


def parse_list(data: bytes, min_entries: int = 1, source: str = "the list") -> AddressRanges:
    """The ranges of a list file (one address or CIDR range a line; # comments
    and blank lines allowed), or ListError naming the first problem."""
    if len(data) > MAX_LIST_BYTES:
        raise ListError(f"{source}: more than {MAX_LIST_BYTES >> 20} MB: not a list of addresses")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise ListError(f"{source}: not plain text (an error page or a binary file?)") from None
    v4, v6 = array.array("Q"), []
    for number, line in enumerate(io.StringIO(text), 1):  # one line at a time: no list of a million strings
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        try:
            version, low, high = _bounds(entry)
        except ValueError:
            raise ListError(f"{source}: line {number} is not an IP address or CIDR range: {entry[:60]!r}") from None
        if _overlaps(SPECIAL_IPV4 if version == 4 else SPECIAL_IPV6, low, high) \
                or high - low >= (1 << (24 if version == 4 else 112)):
            raise ListError(f"{source}: line {number}: {entry} is a private, reserved or far too wide range "
                            f"(a list like this would catch your own clients)")
        if version == 4:
            v4.append(low << 32 | high)
        else:
            v6.append((low, high))
    if data and not data.endswith(b"\n"):
        raise ListError(f"{source}: its last line has no end: a truncated download")
    entries = len(v4) + len(v6)
    if entries < min_entries:
        raise ListError(f"{source}: {entries} entries, fewer than min_entries ({min_entries}): "
                        f"a truncated or emptied list")
    ranges = AddressRanges(v4, v6, entries)
    if ranges.ipv4_share > MAX_ADDRESS_SHARE or ranges.ipv6_share > MAX_ADDRESS_SHARE:
        which, share = (("public IPv4", ranges.ipv4_share) if ranges.ipv4_share >= ranges.ipv6_share
                        else ("RIRs' IPv6", ranges.ipv6_share))
        raise ListError(f"{source}: covers {share:.0%} of the {which} address space (at most "
                        f"{MAX_ADDRESS_SHARE:.0%}): not a list of networks to single out")
    return ranges


class LoadedList:
    """One list file as loaded: its ranges, and when its file was written."""

    def __init__(self, spec: NetworkList, ranges: Optional[AddressRanges], signature: Optional[tuple],
                 written: Optional[float], problem: str = ""):
        self.spec = spec
        self.problem = problem  # "refused" or "gone": the file on disk is not what is in use
        self.ranges = ranges  # None: the list is off (no file yet)
        self.signature = signature
        self.written = written  # the file's mtime (this host's clock, as `now` is)

    def age_days(self, now: float) -> Optional[float]:
        return None if self.written is None else max(0.0, now - self.written) / 86400

    def stale(self, now: float) -> bool:
        age = self.age_days(now)
        return age is not None and age > self.spec.max_age_days


def load_list(spec: NetworkList, previous: Optional[LoadedList] = None) -> LoadedList:
    """The list as its file is now.  A missing file leaves the list off (or,
    once it was loaded, the old ranges in use, with an ERROR); a file that
    fails the checks is refused, with an ERROR, and the old ranges stay."""
    signature = file_signature(spec.file)
    if signature is None:
        if previous is not None and previous.ranges is not None:
            log.error("network list %s: %s is gone; still using the %d ranges loaded before (run %s "
                      "--update-lists)", spec.label, spec.file, previous.ranges.ranges, PROGRAM)
            return LoadedList(spec, previous.ranges, None, previous.written, "gone")
        return LoadedList(spec, None, None, None)
    try:
        with os.fdopen(open_regular_file(spec.file), "rb") as list_file:  # a FIFO there froze the housekeeping
            data = list_file.read(MAX_LIST_BYTES + 1)
        ranges = parse_list(data, spec.min_entries, spec.file)
    except (OSError, ListError) as error:
        kept = previous.ranges if previous is not None else None
        log.error("network list %s: %s cannot be used (%s); %s", spec.label, spec.file,
                  getattr(error, "strerror", None) or error,
                  f"still using the {kept.ranges} ranges loaded before" if kept else "the list stays off")
        return LoadedList(spec, kept, signature, previous.written if previous is not None else None, "refused")
    return LoadedList(spec, ranges, signature, signature[2] / 1e9)


class Networks:
    """The network lists and the ASN database, read by every thread.  When a
    file changes (changed_on_disk), the daemon's housekeeping builds a new
    Networks from this one: unchanged lists are kept, changed ones read again."""

    def __init__(self, settings: Settings, previous: Optional["Networks"] = None):
        self.settings = settings
        before = {loaded.spec.label: loaded for loaded in previous.lists} if previous is not None else {}
        self.lists: list = []
        for spec in settings.network_lists:
            old = before.get(spec.label)
            if old is not None and old.spec == spec and old.signature == file_signature(spec.file):
                self.lists.append(old)
            else:
                self.lists.append(load_list(spec, old if old is not None and old.spec.file == spec.file else None))
        self.asn = None  # a maxminddb.Reader, opened by _open_asn
        self.asn_signature: Optional[tuple] = None
        if settings.asn_database:
            self._open_asn(previous)
        self.lookup = functools.lru_cache(maxsize=LOOKUP_CACHE_SIZE)(self._lookup)

    def _open_asn(self, previous: Optional["Networks"]) -> None:
        path = self.settings.asn_database
        signature = file_signature(path)
        if previous is not None and previous.asn is not None and previous.asn_signature == signature \
                and previous.settings.asn_database == path:
            self.asn, self.asn_signature = previous.asn, signature
            return
        if signature is None:
            log.warning("[networks] asn_database %s is missing: networks are not named (%s --update-geoip "
                        "fetches it)", path, PROGRAM)
            return
        self.asn_signature = signature  # a broken file is reported once, not at every look
        try:
            self.asn = open_maxmind(path)
        except (OSError, ValueError, RuntimeError) as error:
            log.error("[networks] asn_database %s cannot be used: %s%s", path, error,
                      "; still using the file loaded before" if previous is not None and previous.asn else "")
            if previous is not None and previous.asn is not None:
                self.asn = previous.asn

    def describe(self) -> str:
        """One line for the start and reload log lines."""
        parts = []
        for loaded in self.lists:
            state = (f"{loaded.ranges.ranges} ranges" if loaded.ranges is not None
                     else f"off: its file was {loaded.problem}" if loaded.problem
                     else f"off until {PROGRAM} --update-lists installs its file")
            parts.append(f"{loaded.spec.label} ({loaded.spec.action.lower()}, {state})")
        if self.settings.asn_database:
            parts.append(f"ASN {'from ' + self.settings.asn_database if self.asn else 'off'}")
        return "network lists: " + (", ".join(parts) if parts else "none")

    def changed_on_disk(self) -> bool:
        return any(file_signature(loaded.spec.file) != loaded.signature for loaded in self.lists) or (
            bool(self.settings.asn_database) and file_signature(self.settings.asn_database) != self.asn_signature)

    def facts_of(self, ip: str) -> NetworkFacts:
        """lookup() of an address as text (a stored last_ip); nothing for one that is no address."""
        try:
            return self.lookup(unwrap_ipv4(ipaddress.ip_address(ip)))
        except ValueError:
            return NO_FACTS

    def _lookup(self, address) -> NetworkFacts:
        """`address` an ipaddress object (or None)."""
        if address is None or not self.lists and self.asn is None:
            return NO_FACTS
        labels = tuple(loaded.spec.label for loaded in self.lists
                       if loaded.ranges is not None and address in loaded.ranges)
        asn, organisation = None, ""
        if self.asn is not None:  # not address.is_global: 5 us, and a private address is in no ASN file
            try:
                record = self.asn.get(address)
            except (ValueError, OSError) as error:  # an IPv6 address in an IPv4-only file
                log.debug("ASN lookup of %s failed: %s", address, error)
                record = None
            if isinstance(record, dict) and isinstance(record.get("autonomous_system_number"), int):
                asn = record["autonomous_system_number"]
                organisation = str(record.get("autonomous_system_organization") or "")[:100]
        if not labels and asn is None:
            return NO_FACTS
        return NetworkFacts(labels, asn, organisation)

    def state(self) -> dict:
        """label -> (entries or None, age in days or None, max_age_days, problem), for metrics and --health."""
        now = time.time()
        return {loaded.spec.label: (loaded.ranges.entries if loaded.ranges is not None else None,
                                    loaded.age_days(now), loaded.spec.max_age_days, loaded.problem)
                for loaded in self.lists}
