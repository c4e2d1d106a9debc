"""The Postfix policy protocol: the attribute lines of one request become a
PolicyRequest, a decided action becomes the "action=..." reply.  Also what a
request's client address means (IPv4 inside IPv6, zone ids), what is known of
its client (Country, Place, NetworkFacts: filled in by geoip and networks,
which come after this module) and who may connect at all (allowed_clients).
"""
from __future__ import annotations

import dataclasses
import ipaddress
import math
from dataclasses import dataclass, field
from typing import Iterable, Optional

from .common import escape_controls, log, normalise_login, replaced

# Postfix never sends values this long; postgrey caps them the same way.  Longer
# values are cut so a hostile client cannot make us store megabytes.
MAX_ATTRIBUTE_VALUE = 512

# An account name longer than this is not a real login; it is not counted.
MAX_LOGIN_LENGTH = 255

# What pcc decides on: Postfix's policy requests, and Dovecot's logins as the
# Dovecot adapter hands them over.
DOVECOT_LOGIN = "dovecot_login"
# The request `pcc.py --health` sends the daemon (Postfix never sends it):
# the answer is DUNNO followed by what the daemon sees of itself.
HEALTH_REQUEST = "pcc_health"
# Dovecot's protocol names -> the door named in log lines, blocks and mails
# (the Dovecot port's and --replay's of Dovecot's log alike).
DOVECOT_DOORS = {"imap": "imap", "pop3": "pop3", "smtp": "smtp", "submission": "smtp", "lmtp": "lmtp",
                 "doveadm": "doveadm", "sieve": "sieve", "managesieve": "sieve"}

# Client addresses parsed and kept (ipaddress costs about 10 us an address;
# the same ones come again and again: a few per account, one per recipient).
CLIENT_IPS_KEPT = 16384

# NAT64's well-known prefix (RFC 6052): the IPv4 client is the last 32 bits.
NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")


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


@dataclass(frozen=True)
class NetworkFacts:
    """What pcc knows of a client address's network."""

    labels: tuple = ()  # the network lists it is on, in pcc.conf's order
    asn: Optional[int] = None
    organisation: str = ""

    def describe(self) -> str:
        """"AS13335 Cloudflare, Inc.", for people; "" when unknown."""
        if self.asn is None:
            return ""
        return f"AS{self.asn} {self.organisation}".strip()


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
    client_place: Optional[Place] = None  # only with City-level GeoIP data
    network: Optional[NetworkFacts] = None  # the network lists it is on, its AS (filled in with the country)
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
        return self._client_ip_parsed()[0]

    @property
    def client_ip_text(self) -> str:
        """client_ip as stored with a sighting ("None" without one, as str() made it)."""
        return self._client_ip_parsed()[1]

    def _client_ip_parsed(self) -> tuple:
        parsed = self.__dict__.get("_client_ip_pair")  # not the method's name: the instance's dict would hide it
        if parsed is None:
            parsed = self.__dict__["_client_ip_pair"] = client_ip_of(self.client_address)
        return parsed

    def with_country(self, found: Country, network: Optional[NetworkFacts] = None) -> "PolicyRequest":
        """This request with what the GeoIP lookup found (what was computed kept)."""
        return replaced(self, client_country=found.code, country_note=found.note, client_place=found.place,
                        network=network)

    @property
    def network_lists(self) -> tuple:
        """The labels of the network lists the client address is on."""
        return self.network.labels if self.network is not None else ()


_CLIENT_IPS: dict = {}  # client_address -> (what _client_ip() made of it, as text)


def client_ip_of(client_address: str) -> tuple:
    """(_client_ip(), its str()), remembered (the whole memory dropped when
    full: no bookkeeping on the hot path; a dict's get and set are atomic)."""
    found = _CLIENT_IPS.get(client_address)
    if found is None:
        address = _client_ip(client_address)
        found = (address, str(address))
        if len(_CLIENT_IPS) >= CLIENT_IPS_KEPT:
            _CLIENT_IPS.clear()
        _CLIENT_IPS[client_address] = found
    return found


def _client_ip(client_address: str):
    try:
        # A zone id (fe80::1%eth0) names a local link, never a country, and
        # would make the address longer than any stored one.
        address = ipaddress.ip_address(client_address.strip().split("%", 1)[0])
    except ValueError:
        return None
    return unwrap_ipv4(address)


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


_FILLED_IN_LATER = ("attributes", "client_country", "country_note", "client_place", "network", "door", "check_only")
_REQUEST_FIELDS = tuple(f.name for f in dataclasses.fields(PolicyRequest) if f.name not in _FILLED_IN_LATER)
# A new request's fields before parse_request() fills them in: a frozen
# dataclass's __init__ sets each field through object.__setattr__, a third of
# parsing; a request is made from this and its attributes instead (as
# common.replaced() copies one).
_EMPTY_REQUEST = dict(PolicyRequest().__dict__)


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
        # clean_value(), written out: this loop runs 30 times a request
        if len(value) > MAX_ATTRIBUTE_VALUE:
            value = value[:MAX_ATTRIBUTE_VALUE]
        attributes[name[:64]] = value if value.isprintable() else escape_controls(value)
    if skipped:  # one line per request, however many it sent
        log.warning("policy request: skipped %d line%s that %s not name=value, the first: %r", skipped,
                    "s" if skipped != 1 else "", "are" if skipped != 1 else "is", first_skipped[:80])
    request = object.__new__(PolicyRequest)
    fields = request.__dict__
    fields.update(_EMPTY_REQUEST)
    for name in _REQUEST_FIELDS:  # all str
        if name in attributes:
            fields[name] = attributes[name]
    fields["attributes"] = attributes
    return request


def clean_value(value: str) -> str:
    return escape_controls(value[:MAX_ATTRIBUTE_VALUE])


def format_reply(action: str) -> bytes:
    """The reply block for Postfix; the action text can never span two lines."""
    one_line = " ".join(action.split())
    return f"action={one_line}\n\n".encode("utf-8", "replace")


def peer_address(address_text: str):
    """The address of a peer of pcc's ports (a socket's view of it), or None.
    Only an IPv4-mapped address is an IPv4 peer (a dual-stack socket's view
    of it).  Not unwrap_ipv4(): a 6to4, Teredo or NAT64 address merely names
    an IPv4 address, which anyone can put in one (2002:7f00:1:: "is"
    127.0.0.1); fine for a country, never for a door."""
    try:
        address = ipaddress.ip_address(address_text.split("%")[0])
    except ValueError:
        return None
    if address.version == 6 and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def client_allowed(address_text: str, allowed_clients: tuple) -> bool:
    """Whether a peer may talk to pcc: anyone when allowed_clients is empty."""
    if not allowed_clients:
        return True
    address = peer_address(address_text)
    return address is not None and any(address in network for network in allowed_clients)
