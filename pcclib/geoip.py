"""GeoIP: the country (and, with City-level data, the place) of a client
address, from a MaxMind-format .mmdb or the data embedded in geoip2fast, and
the warnings about data that misses countries.
"""
from __future__ import annotations

import datetime as dt
import functools
import re
from typing import Optional

from .common import PROGRAM, UTC, file_signature, log, open_maxmind, utcnow
from .config import is_city_level
from .protocol import Country, Place

# IP blocks change hands every week; country data older than this misplaces
# enough addresses to matter.
GEOIP_STALE_AFTER = dt.timedelta(days=60)


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
            self.file_signature = file_signature(path)  # geoipupdate renames a new file over the old one
            self._reader = open_maxmind(path)
            metadata = self._reader.metadata()
            try:
                built = dt.datetime.fromtimestamp(metadata.build_epoch, UTC)
            except (OverflowError, OSError, ValueError, TypeError):
                self._reader.close()
                raise ValueError(f"{path}: its build_epoch {str(metadata.build_epoch)[:30]} is no date") from None
            self.built: Optional[dt.date] = built.date()
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


    def changed_on_disk(self) -> bool:
        return bool(self.path) and file_signature(self.path) not in (None, self.file_signature)

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
        code = record.get("country_code")  # ip-location-db's layout (the Debian package's DB-IP data)
        if isinstance(code, str) and code:
            return code.upper(), None
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


def warn_about_geoip(geoip: GeoIP) -> None:
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
                    "set [geoip] database and run %s --update-geoip monthly (docs/administration.md, GeoIP data)",
                    (utcnow().date() - geoip.built).days, geoip.built.isoformat(), PROGRAM)
