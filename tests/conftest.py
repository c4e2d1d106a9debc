"""Shared test fixtures: real databases, a real SMTP listener, a test GeoIP
database, and pcc daemons started as real processes.

A service that is not reachable skips its tests on a developer's laptop, but
fails them under CI (CI=true): CI must never pass by testing nothing.
"""
from __future__ import annotations

import configparser
import datetime
import contextlib
import glob
import http.server
import itertools
import json
import os
import pathlib
import re
import shutil
import smtplib
import socket
import struct
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from typing import Optional

import pytest
import sqlalchemy as sa

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pcclib.common import first_line, utcnow  # noqa: E402
from pcclib.config import Settings, load_settings  # noqa: E402
from pcclib.decision import CountrySeen  # noqa: E402
from pcclib.geoip import GeoIP  # noqa: E402
from pcclib.protocol import PolicyRequest  # noqa: E402
from pcclib.storage import Base, BlockedAccount, Sighting, safe_url  # noqa: E402

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# Tests run in parallel (pytest-xdist, pytest.ini): each worker tests on a
# database of its own, test_gw0, test_gw1... (made on first use), so that no
# test drops another's tables.
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")


def _for_this_worker(url: str) -> str:
    if not WORKER:
        return url
    parsed = sa.engine.make_url(url)
    return parsed.set(database=f"{parsed.database}_{WORKER}").render_as_string(hide_password=False)


SERVER_DATABASES = {
    "mariadb": _for_this_worker(os.environ.get("PCC_TEST_MARIADB", "mysql+pymysql://root@127.0.0.1:3306/test")),
    "postgresql": _for_this_worker(os.environ.get("PCC_TEST_POSTGRESQL",
                                                  "postgresql+psycopg://postgres@127.0.0.1:5432/test")),
}
_MADE: set = set()


def _make_worker_database(url: str) -> None:
    """CREATE DATABASE test_gwN, connected to the database it is named after."""
    if not WORKER or url in _MADE:
        return
    parsed = sa.engine.make_url(url)
    base = parsed.set(database=parsed.database[:-len(WORKER) - 1])
    engine = sa.create_engine(base, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as connection:
            if parsed.get_backend_name() == "postgresql":
                if not connection.execute(sa.text("SELECT 1 FROM pg_database WHERE datname = :name"),
                                          {"name": parsed.database}).scalar():
                    connection.execute(sa.text(f'CREATE DATABASE "{parsed.database}"'))
            else:
                connection.execute(sa.text(f"CREATE DATABASE IF NOT EXISTS `{parsed.database}`"))
    finally:
        engine.dispose()
    _MADE.add(url)

# The test GeoIP database: one IPv4 /16 and one IPv6 /32 per country, all in
# publicly routable space (pcc never looks up private addresses).
COUNTRIES = ["GB", "US", "FR", "DE", "SE", "JP", "BR", "CN", "RU", "NL", "IT", "ES", "CA", "AU", "IN", "ZA"]
COUNTRY_NETWORKS = {
    code: (f"{20 + index}.1.0.0/16", f"2a0c:{index + 1:x}::/32") for index, code in enumerate(COUNTRIES)
}
NOT_IN_GEOIP = "60.1.2.3"  # public, but absent from the test database


def ip_in(country: str, host: int = 1, version: int = 4) -> str:
    """An address of `country` in the test GeoIP database."""
    v4, v6 = COUNTRY_NETWORKS[country]
    if version == 6:
        return v6.split("::")[0] + f"::{host:x}"
    return v4.rsplit(".", 2)[0] + f".{host // 256}.{host % 256 or 1}"


def unavailable(what: str) -> None:
    if IN_CI:
        pytest.fail(f"{what} is not available, and CI must test it")
    pytest.skip(f"{what} is not available on this machine")


# Ports for the tests' servers: below the kernel's ephemeral range (a socket
# bound to port 0 elsewhere, a webhook receiver of another worker, could else
# take the port free_port() just found before the daemon binds it: seen once,
# a daemon's test talked to another worker's HTTP server), a range per worker.
_WORKER_INDEX = int(WORKER[2:]) if WORKER.startswith("gw") and WORKER[2:].isdigit() else 0
_PORT_CANDIDATES = itertools.cycle(range(20000 + 1500 * _WORKER_INDEX, 21500 + 1500 * _WORKER_INDEX))


def free_port() -> int:
    """A port nothing listens on, that no other test worker and no port-0
    bind will take meanwhile."""
    for port in _PORT_CANDIDATES:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def counted_request(country: str, login: str = "alice@example.com") -> PolicyRequest:
    """A request as the decision sees it, GeoIP done: `login` sending from `country`."""
    return PolicyRequest(request="smtpd_access_policy", sasl_username=login, client_address=ip_in(country),
                             client_country=country)


def seen_an_hour_before(now, *countries) -> tuple:
    """Sightings of `countries`, the last an hour before `now`."""
    hour = datetime.timedelta(hours=1)
    return tuple(CountrySeen(code, now - 2 * hour, now - hour, ip_in(code)) for code in countries)


@contextlib.contextmanager
def busy_cores(count: Optional[int] = None, limit: float = 600.0):
    """Every core (or `count` of them) kept busy by other processes, as a busy
    MTA's are, while the block runs; each stops by itself after `limit` s."""
    spin = f"import time\nend = time.monotonic() + {limit}\nwhile time.monotonic() < end: pass\n"
    spinners = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(count or os.cpu_count() or 2)]
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def all_at_once(count: int, work) -> list:
    """work(0) ... work(count - 1), each in its own thread, all released
    together by a barrier; their results, in order."""
    barrier = threading.Barrier(count)
    results = [None] * count

    def run(n):
        barrier.wait()
        results[n] = work(n)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


# --- GeoIP ------------------------------------------------------------------


@pytest.fixture(scope="session")
def geoip_path(tmp_path_factory) -> str:
    from mmdb_writer import MMDBWriter
    from netaddr import IPSet

    writer = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="GeoLite2-Country",
                        languages=["en"], description="pcc test data")
    for code, networks in COUNTRY_NETWORKS.items():
        writer.insert_network(IPSet(list(networks)), {"country": {"iso_code": code, "names": {"en": code}}})
    path = tmp_path_factory.mktemp("geoip") / "test-country.mmdb"
    writer.to_db_file(str(path))
    return str(path)


@pytest.fixture(scope="session")
def geoip(geoip_path) -> GeoIP:
    return GeoIP(geoip_path)


# A City-level test database: places with coordinates and accuracy radii, in
# networks of their own (distances from public data: London-Paris 344 km,
# London-New York 5,570 km, Paris-Lyon 392 km, London-Tokyo 9,560 km).
PLACES = {
    # name: (country, latitude, longitude, accuracy radius km, network)
    "London": ("GB", 51.5072, -0.1276, 5, "90.1.0.0/16"),
    "Paris": ("FR", 48.8566, 2.3522, 5, "90.2.0.0/16"),
    "Lyon": ("FR", 45.7640, 4.8357, 5, "90.3.0.0/16"),
    "New York": ("US", 40.7128, -74.0060, 5, "90.4.0.0/16"),
    "Tokyo": ("JP", 35.6762, 139.6503, 5, "90.5.0.0/16"),
    "Somewhere in FR": ("FR", 46.0, 2.0, 500, "90.6.0.0/16"),  # a country-level guess
}


def ip_at(place: str, host: int = 1) -> str:
    return PLACES[place][4].rsplit(".", 2)[0] + f".0.{host}"


def write_city_database(path, places: dict = PLACES, database_type: str = "GeoLite2-City") -> str:
    from mmdb_writer import MMDBWriter
    from netaddr import IPSet

    writer = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type=database_type,
                        languages=["en"], description="pcc test city data")
    for name, (code, latitude, longitude, radius, network) in places.items():
        writer.insert_network(IPSet([network]), {
            "country": {"iso_code": code}, "city": {"names": {"en": name}},
            "location": {"latitude": latitude, "longitude": longitude, "accuracy_radius": radius},
        })
    writer.to_db_file(str(path))
    return str(path)


@pytest.fixture(scope="session")
def city_geoip_path(tmp_path_factory) -> str:
    return write_city_database(tmp_path_factory.mktemp("geoip") / "test-city.mmdb")


@pytest.fixture(scope="session")
def geolite2_city_2015() -> str:
    """The real GeoLite2-City data of March 2015 that the python-geoip-geolite2
    package carries (.ci/run installs it without its broken dependency)."""
    try:
        import _geoip_geolite2
    except ImportError:
        unavailable("python-geoip-geolite2 (GeoLite2-City 2015 data)")
    return str(pathlib.Path(_geoip_geolite2.__file__).parent / "GeoLite2-City.mmdb")


# --- databases --------------------------------------------------------------


def fresh_database(url: str) -> str:
    """Check that `url` answers, drop pcc's tables, return the URL."""
    engine = sa.create_engine(url, connect_args={"connect_timeout": 3} if not url.startswith("sqlite") else {})
    try:
        _make_worker_database(url)
        Base.metadata.drop_all(engine)
    except sa.exc.OperationalError as error:
        unavailable(f"{safe_url(url)} ({first_line(error)})")
    finally:
        engine.dispose()
    return url


@pytest.fixture(scope="session", autouse=True)
def compiled_package():
    """pcclib compiled once: with PYTHONDONTWRITEBYTECODE set (as on CI's
    machines) every pcc.py the tests start would compile it again, 0.2 s of
    CPU each, hundreds of times."""
    import compileall

    compileall.compile_dir(str(ROOT / "pcclib"), quiet=1)


@pytest.fixture(scope="session", autouse=True)
def worker_databases():
    """This worker's databases exist before any test names them (a server that
    is down is reported by the tests that need it)."""
    for url in SERVER_DATABASES.values():
        try:
            _make_worker_database(url)
        except sa.exc.SQLAlchemyError:
            pass


@pytest.fixture(params=["sqlite", "mariadb", "postgresql"])
def db_url(request, tmp_path) -> str:
    """Each storage test runs on SQLite, MariaDB and PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/pcc.sqlite3"
    return fresh_database(SERVER_DATABASES[request.param])


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    """For tests of a door, a rule or a command whose outcome does not depend
    on the database: one run, on SQLite (storage has tests of its own on all three)."""
    return f"sqlite:///{tmp_path}/pcc.sqlite3"


@pytest.fixture(params=["mariadb", "postgresql"])
def shared_db_url(request) -> str:
    """A database several daemons can share."""
    return fresh_database(SERVER_DATABASES[request.param])


@pytest.fixture
def postgresql_url() -> str:
    return fresh_database(SERVER_DATABASES["postgresql"])


@pytest.fixture
def mariadb_url() -> str:
    return fresh_database(SERVER_DATABASES["mariadb"])


# --- configuration ----------------------------------------------------------


def write_config(directory: pathlib.Path, overrides: dict, name: str = "pcc.conf") -> str:
    """The shipped pcc.conf with some keys changed ("section.key": value)."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(ROOT / "pcc.conf", encoding="utf-8")
    for section in parser.sections():  # never this machine's /var/lib/pcc/lists: list_path() names them
        if section.startswith("list "):
            parser.set(section, "file", list_path(directory, section[5:]))
    for dotted, value in overrides.items():
        section, key = dotted.split(".", 1)
        if not parser.has_section(section):
            parser.add_section(section)
        parser.set(section, key, str(value))
    path = directory / name
    with open(path, "w", encoding="utf-8") as config_file:
        parser.write(config_file)
    return str(path)


def list_path(directory, label: str) -> str:
    """Where a test configuration keeps the network list `label` (absent: the list is off)."""
    return str(pathlib.Path(directory) / f"list-{label}.txt")


def config_without(tmp_path, section, key):
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(ROOT / "pcc.conf", encoding="utf-8")
    parser.remove_option(section, key)
    path = tmp_path / "broken.conf"
    with open(path, "w") as config_file:
        parser.write(config_file)
    return str(path)


@pytest.fixture
def make_settings(tmp_path, geoip_path):
    def make(**overrides) -> Settings:
        values = {"db.dbcon": f"sqlite:///{tmp_path}/pcc.sqlite3", "geoip.database": geoip_path,
                  "db.spool_file": str(tmp_path / "spool.jsonl")}
        values.update({key.replace("__", "."): value for key, value in overrides.items()})
        return load_settings(write_config(tmp_path, values, name="settings.conf"))

    return make


# --- the policy protocol ----------------------------------------------------


def daemon_parts(settings: Settings, store=None, geoip: Optional[GeoIP] = None, **options):
    """A daemon's parts in the process, made as the daemon makes them
    (daemon.build_parts; no thread started, no port opened): .service answers,
    .database, .upkeep, .report.  store: a Store (default: an AdminStore of
    settings.dbcon, so that a test can read the blocked list as -l does)."""
    from pcclib.daemon import build_parts
    from pcclib.notify import Notifier
    from pcclib.storage import AdminStore

    return build_parts(settings, store if store is not None else AdminStore(settings.dbcon),
                       geoip or GeoIP(settings.geoip_database), Notifier(settings), **options)


def daemon_with_memory(settings: Settings, store, geoip: GeoIP, **options):
    """daemon_parts() with the blocked list loaded, as before a port opens:
    the poll of changes starts where the list was read."""
    parts = daemon_parts(settings, store, geoip, **options)
    parts.upkeep.load_blocked_list()
    return parts


@pytest.fixture
def service_on(geoip):
    """service_on(settings): the PolicyService of daemon_parts(settings), its
    tables made; its store is disposed of after the test."""
    made = []

    def make(settings: Settings, **options):
        parts = daemon_parts(settings, geoip=options.pop("geoip", geoip), **options)
        parts.database.store.create_tables()
        made.append(parts)
        return parts.service

    yield make
    for parts in made:
        parts.database.store.dispose()


def policy_request(login: str = "", ip: str = "81.2.69.160", **extra) -> dict:
    """The attributes Postfix sends for one RCPT (see ../shared/postfix-e2e.md)."""
    attributes = {
        "request": "smtpd_access_policy", "protocol_state": "RCPT", "protocol_name": "ESMTP",
        "client_address": ip, "client_name": "unknown", "reverse_client_name": "unknown",
        "client_port": "35422", "server_address": "127.0.0.1", "server_port": "25", "helo_name": "vm",
        "sender": login, "recipient": "bob@remote.test", "recipient_count": "0", "queue_id": "",
        "instance": "bd9.6b07243a.befbf.0", "size": "0", "etrn_domain": "", "stress": "",
        "sasl_method": "PLAIN" if login else "", "sasl_username": login, "sasl_sender": "",
        "ccert_subject": "", "ccert_issuer": "", "ccert_fingerprint": "", "ccert_pubkey_fingerprint": "",
        "encryption_protocol": "", "encryption_cipher": "", "encryption_keysize": "0", "policy_context": "",
    }
    attributes.update(extra)
    return attributes


def dovecot_post(port: int, command: str, body: bytes, api_header: str, timeout: float = 5.0) -> tuple:
    """One request as Dovecot's auth policy client sends it to pcc's Dovecot
    port: (HTTP status, JSON answer or None, seconds)."""
    started = time.monotonic()
    name, _colon, value = api_header.partition(":")
    request = urllib.request.Request(f"http://127.0.0.1:{port}/?command={command}", body,
                                     headers={"Content-Type": "application/json", name: value.strip()})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.load(response), time.monotonic() - started
    except urllib.error.HTTPError as error:
        return error.code, None, time.monotonic() - started


def dovecot_allow(port: int, login: str, api_header: str) -> int:
    """Dovecot's question before the password, from GB: -1 refused, 0 let in."""
    status, answer, _seconds = dovecot_post(port, "allow", json.dumps({"login": login, "remote": ip_in("GB")}).encode(),
                                            api_header)
    assert status == 200, status
    return answer["status"]


def encode_request(attributes: dict) -> bytes:
    return "".join(f"{name}={value}\n" for name, value in attributes.items()).encode() + b"\n"


class PolicyClient:
    """A Postfix-like client: one connection, many requests.  Like Postfix, it
    can reconnect and ask again once when pcc has closed the connection."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1", timeout: float = 10.0, path: str = ""):
        """host:port, or with `path` the UNIX-domain socket there."""
        self.address = path or (host, port)
        self.timeout = timeout
        self.sock = self._connect()
        self.pending = b""

    def _connect(self) -> socket.socket:
        if isinstance(self.address, tuple):
            return socket.create_connection(self.address, timeout=self.timeout)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.address)
        return sock

    def ask_like_postfix(self, login: str = "", ip: str = "81.2.69.160", **extra) -> str:
        try:
            return self.ask(login, ip, **extra)
        except (ConnectionError, OSError):
            self.sock.close()
            self.sock = self._connect()
            self.pending = b""
            return self.ask(login, ip, **extra)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> str:
        """The action of the next reply."""
        while b"\n\n" not in self.pending:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError(f"connection closed; unread: {self.pending!r}")
            self.pending += chunk
        block, self.pending = self.pending.split(b"\n\n", 1)
        lines = block.decode().split("\n")
        assert len(lines) == 1 and lines[0].startswith("action="), block
        return lines[0][len("action="):]

    def ask(self, login: str = "", ip: str = "81.2.69.160", **extra) -> str:
        self.send(encode_request(policy_request(login, ip, **extra)))
        return self.reply()

    def close(self) -> None:
        self.sock.close()


# What one daemon records, or an administrator changes, counts in every
# running daemon within this many seconds (pcc's poll of the database).
VISIBLE_WITHIN = 1.0


def wait_until_visible() -> None:
    """Let what was just recorded reach the other daemons' memory."""
    time.sleep(VISIBLE_WITHIN)


def run_pcc(*arguments, expect=None, timeout=120, **options) -> subprocess.CompletedProcess:
    """pcc.py run as an administrator runs it; with `expect`, it must exit so."""
    result = subprocess.run([sys.executable, str(ROOT / "pcc.py"), *arguments], capture_output=True, text=True,
                            timeout=timeout, **options)
    if expect is not None:
        assert result.returncode == expect, (result.stdout, result.stderr)
    return result


def pcc_command(config, *arguments, expect=0, clock_shift: str = "") -> subprocess.CompletedProcess:
    """An admin command (pcc.py --config CONFIG ARGUMENTS...) that must exit
    `expect`; clock_shift: run with its wall clock moved ("+3600s")."""
    return run_pcc("--config", config, *arguments, expect=expect, env=shifted_clock_environment(clock_shift))


def shifted_clock_environment(shift: str) -> Optional[dict]:
    """An environment whose programs see their wall clock moved by `shift`
    ("-600s"; libfaketime preloaded: the faketime wrapper would stand between
    the test and the daemon, and outlive its terminate()), their monotonic
    clock, which pcc's timeouts use, untouched."""
    if not shift:
        return None
    library = glob.glob("/usr/lib/*/faketime/libfaketime.so.1")
    if not library:
        unavailable("libfaketime (Debian package faketime)")
    return dict(os.environ, LD_PRELOAD=library[0], FAKETIME=shift, FAKETIME_DONT_FAKE_MONOTONIC="1")


def walk(client, login, countries, version=4) -> list:
    """`login` sends one message from each of `countries`, in order: the answers."""
    return [client.ask(login, ip_in(country, version=version)) for country in countries]


def send_message(client, login: str, instance: str, recipients: int = 1, country: str = "GB") -> list:
    """One message as Postfix asks at RCPT: one request per recipient, one
    `instance` for the message (what [limits] counts a message by)."""
    return [client.ask(login, ip_in(country), instance=instance, protocol_state="RCPT",
                       recipient=f"r{n}@remote.test") for n in range(recipients)]


def wait_for_log(daemon, text, timeout=15.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in daemon.log():
        assert time.monotonic() < deadline, f"{text!r} never logged:\n{daemon.log()[-3000:]}"
        time.sleep(0.1)


def query(url, statement) -> list:
    """The rows of one SELECT, on a connection of its own."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(statement)]
    finally:
        engine.dispose()


def blocked_logins(url) -> set:
    return {login for (login,) in query(url, sa.select(BlockedAccount.login).where(
        BlockedAccount.blocked_since.is_not(None)))}


def count_rows(url, model) -> int:
    return query(url, sa.select(sa.func.count()).select_from(model))[0][0]


def sightings_in_database(url, login=None) -> set:
    statement = sa.select(Sighting.login, Sighting.country)
    if login is not None:
        statement = statement.where(Sighting.login == login)
    return set(query(url, statement))


def scrape(port) -> dict:
    """A daemon's metrics: {(sample name, sorted labels): value}."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


class WritersLockedOut:
    """Holds a lock that lets readers of pcc's tables go on but makes writers
    of `table` wait (on SQLite: writers of any table): another process's long
    transaction."""

    def __init__(self, url, table: str = "pcc_blocks"):
        self.url = sa.engine.make_url(url)
        self.table = table

    def __enter__(self):
        backend = self.url.get_backend_name()
        if backend == "sqlite":
            import sqlite3

            self.connection = sqlite3.connect(self.url.database, isolation_level=None)
            self.connection.execute("BEGIN IMMEDIATE")  # WAL: readers go on, writers wait
            self.release = lambda: self.connection.execute("ROLLBACK")
            return self
        self.engine = sa.create_engine(self.url)
        self.connection = self.engine.connect()
        if backend == "postgresql":
            self.connection.execute(sa.text(f"LOCK TABLE {self.table} IN EXCLUSIVE MODE"))  # SELECT goes on
            self.release = self.connection.rollback
        else:
            self.connection.execute(sa.text(f"LOCK TABLES {self.table} READ"))  # others read, none write
            self.release = lambda: self.connection.execute(sa.text("UNLOCK TABLES"))
        return self

    def __exit__(self, *_exc):
        self.release()
        self.connection.close()
        if hasattr(self, "engine"):
            self.engine.dispose()


def spool_entry(login: str) -> dict:
    now = utcnow()
    return {"login": login, "at": now.isoformat(), "action": "REJECT", "rule": "countries", "replaces_flag": False,
            "reason": "blocking: 4 of at most 3 countries",
            "countries": [{"country": "GB", "last_ip": ip_in("GB"), "first_seen": now.isoformat(),
                           "last_seen": now.isoformat()}],
            "trigger": {}, "sighting": ["GB", ip_in("GB")]}


# --- pcc as an unprivileged user ---------------------------------------------


# What pcc needs at run time, copied where the user nobody can read it.
RUNTIME_PACKAGES = ("sqlalchemy", "maxminddb", "geoip2fast", "pymysql", "psycopg", "psycopg_binary",
                    "psycopg_binary.libs", "prometheus_client", "typing_extensions.py", "greenlet")


@pytest.fixture(scope="session")
def readable_packages(tmp_path_factory) -> str:
    """pcc's run-time packages in a directory every user can read: the
    checkout and its venv may be anywhere (a 0700 directory, /root)."""
    source = pathlib.Path(sysconfig.get_paths()["purelib"])
    target = pathlib.Path(tempfile.mkdtemp(prefix="pcc-packages-"))
    for name in RUNTIME_PACKAGES:
        if (source / name).is_dir():
            shutil.copytree(source / name, target / name)
        elif (source / name).exists():
            shutil.copy(source / name, target / name)
    for metadata in source.glob("*.dist-info"):  # importlib.metadata asks versions of them
        shutil.copytree(metadata, target / metadata.name)
    for path in [target, *target.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    yield str(target)
    shutil.rmtree(target, ignore_errors=True)


@pytest.fixture
def shared_dir():
    """A directory every user can reach (pytest's own tmp_path is root's alone)."""
    directory = tempfile.mkdtemp(prefix="pcc-test-")
    os.chmod(directory, 0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def as_nobody(readable_packages):
    """as_nobody(arguments, directory): the command line to run pcc.py as the
    user nobody, with Debian's python3 and a readable copy of the packages;
    pcc.py and pcclib/ are copied into `directory`."""
    system_python = "/usr/bin/python3"
    version = subprocess.run([system_python, "-c", "import sys; print(tuple(sys.version_info[:2]))"],
                             capture_output=True, text=True).stdout.strip()
    if version != str(tuple(sys.version_info[:2])):
        pytest.fail(f"{system_python} is Python {version}, the test packages are for {sys.version_info[:2]}")

    def command(arguments: list, directory: str) -> list:
        program = os.path.join(directory, "pcc.py")
        shutil.copy(ROOT / "pcc.py", program)
        shutil.copytree(ROOT / "pcclib", os.path.join(directory, "pcclib"), dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
        for path in [program, *pathlib.Path(directory, "pcclib").rglob("*")]:
            os.chmod(path, 0o755 if os.path.isdir(path) else 0o644)
        os.chmod(os.path.join(directory, "pcclib"), 0o755)
        return ["runuser", "-u", "nobody", "--", "env", f"PYTHONPATH={readable_packages}",
                "PYTHONDONTWRITEBYTECODE=1", system_python, program, *arguments]

    return command



# --- webhook receivers --------------------------------------------------------


class WebhookReceiver:
    """A local webhook receiver: records each POST (headers, JSON body) and
    answers the statuses it is given, in turn (then 200); `hang` makes it
    never answer."""

    def __init__(self, port: int = 0, statuses=(), hang: bool = False):
        self.posts, self.statuses, self.hang = [], list(statuses), hang
        self.received = threading.Event()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if receiver.hang:
                    time.sleep(60)
                    return
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                if status == 200:
                    receiver.posts.append((dict(self.headers), body))
                    receiver.received.set()
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_arguments):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, count: int = 1, timeout: float = 10.0) -> list:
        deadline = time.monotonic() + timeout
        while len(self.posts) < count:
            assert time.monotonic() < deadline, f"{len(self.posts)} of {count} posts arrived"
            time.sleep(0.02)
        return self.posts

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers():
    """receivers(**options) -> a WebhookReceiver; all closed after the test."""
    made = []

    def make(**options):
        made.append(WebhookReceiver(**options))
        return made[-1]

    yield make
    for receiver in made:
        receiver.close()



# --- faults -----------------------------------------------------------------


class TcpProxy:
    """127.0.0.1:<port> -> target.  cut("refuse") closes every connection and
    refuses new ones; cut("blackhole") keeps them open but lets nothing through,
    like a network that went away; cut("reset") forwards each query and resets
    the connection when the answer comes; restore() forwards again;
    restart() resets every connection and goes on forwarding (a server that
    restarted)."""

    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.mode = "forward"
        self.sockets = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.mode == "refuse":
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)  # a query may wait on a lock for longer than any timeout here
            with self.lock:
                self.sockets += [client, upstream]
            for source, sink, answers in ((client, upstream, False), (upstream, client, True)):
                threading.Thread(target=self._pump, args=(source, sink, answers), daemon=True).start()

    def _pump(self, source, sink, answers: bool):
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if self.mode == "reset" and answers:
                    for end in (source, sink):  # RST, not FIN: SO_LINGER 0
                        end.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    break
                if self.mode in ("forward", "reset"):
                    sink.sendall(data)
        except OSError:
            pass
        for end in (source, sink):
            try:
                # shutdown() first: close() alone does not end a connection
                # that the other direction's thread is still blocked reading.
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            end.close()

    def cut(self, how: str = "refuse"):
        self.mode = how
        if how == "refuse":
            self._drop_connections()

    def restore(self):
        self._drop_connections()  # connections left from a blackhole are dead to the client
        self.mode = "forward"

    def restart(self):
        self.mode = "forward"
        self._drop_connections()

    def _drop_connections(self):
        with self.lock:
            for sock in self.sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                    sock.close()
                except OSError:
                    pass
            self.sockets = []

    def close(self):
        self.listener.close()
        self.cut("refuse")


@pytest.fixture
def proxied(shared_db_url):
    """(url through the proxy, proxy, direct url)."""
    url = sa.engine.make_url(shared_db_url)
    proxy = TcpProxy(url.host, url.port)
    yield url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False), proxy, shared_db_url
    proxy.close()


# --- daemons ----------------------------------------------------------------


class Daemon:
    """`pcc.py -d` as a real process on a free port."""

    def __init__(self, config_path: str, log_path: pathlib.Path, port: int, host: str = "127.0.0.1"):
        self.host = host
        self.config_path = config_path
        self.log_path = log_path
        self.port = port
        self.process = None

    def start(self, open_files: Optional[int] = None, clock_shift: str = "",
              command: Optional[list] = None) -> "Daemon":
        """open_files: the daemon's open-file limit (soft and hard), else the
        runner's; clock_shift: its wall clock moved (libfaketime: "-600s");
        command: how to run it, else the runner's Python on this checkout
        (as_nobody's, for a daemon of an unprivileged user)."""
        def limit_open_files():
            import resource

            resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))

        log_file = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            command or [sys.executable, str(ROOT / "pcc.py"), "-d", "--stderr", "--config", self.config_path],
            stdout=log_file, stderr=log_file, cwd=str(ROOT), preexec_fn=limit_open_files if open_files else None,
            env=shifted_clock_environment(clock_shift),
        )
        log_file.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"pcc exited with {self.process.returncode}:\n{self.log()}")
            try:
                socket.create_connection((self.host, self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"pcc did not listen on {self.port}:\n{self.log()}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def client(self) -> PolicyClient:
        return PolicyClient(self.port, host=self.host)

    def log(self) -> str:
        """The daemon's log so far.  pcc writes its lines from a thread of its
        own (a queue): read once the file has stopped growing for 50 ms."""
        def read() -> str:
            return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

        text, deadline = read(), time.monotonic() + 1.0
        while time.monotonic() < deadline:
            time.sleep(0.05)
            newer = read()
            if newer == text:
                break
            text = newer
        return text


@pytest.fixture
def start_daemon(tmp_path, geoip_path):
    """start_daemon(**config overrides) -> a running Daemon; all stopped after the test."""
    daemons = []

    def start(open_files: Optional[int] = None, clock_shift: str = "", **overrides) -> Daemon:
        port = free_port()
        values = {
            "server.port": port,
            "db.dbcon": f"sqlite:///{tmp_path}/pcc.sqlite3",
            "db.spool_file": str(tmp_path / f"spool-{len(daemons)}.jsonl"),
            "geoip.database": geoip_path,
        }
        values.update({key.replace("__", "."): value for key, value in overrides.items()})
        index = len(daemons)
        config_path = write_config(tmp_path, values, name=f"pcc-{index}.conf")
        daemon = Daemon(config_path, tmp_path / f"pcc-{index}.log", int(values["server.port"]),
                        host=str(values.get("server.host", "127.0.0.1")))
        daemons.append(daemon)
        return daemon.start(open_files, clock_shift)

    yield start
    for daemon in daemons:
        daemon.stop()


# --- a real Postfix ------------------------------------------------------------


class PostfixInstance:
    """A private Postfix instance: its own config dir, queue and port."""

    def __init__(self, pcc_port: int):
        self.pcc_port = pcc_port
        self.smtp_port = free_port()
        self.directory = tempfile.mkdtemp(prefix="pcc-postfix-")
        self.extra_settings: list = []  # more main.cf settings ("name=value")
        self.policy_service = f"inet:127.0.0.1:{pcc_port}"  # check_policy_service's argument

    def start(self) -> None:
        d = self.directory
        for sub in ("queue", "data"):
            subprocess.run(["mkdir", "-p", f"{d}/{sub}"], check=True)
        shutil.copy("/etc/postfix/master.cf", d)
        shutil.copy("/etc/postfix/main.cf", d)
        master = open(f"{d}/master.cf").read()
        master = re.sub(r"^smtp      inet", f"{self.smtp_port}      inet", master, count=1, flags=re.MULTILINE)
        open(f"{d}/master.cf", "w").write(master)
        self.postconf(
            f"queue_directory={d}/queue", f"data_directory={d}/data",
            "maillog_file_prefixes=/var, /dev/stdout, /tmp", f"maillog_file={d}/maillog",
            "multi_instance_name=postfix-pcc-test", "syslog_name=postfix-pcc-test",
            "myhostname=mx.example.test", "mydestination=", "inet_interfaces=127.0.0.1",
            "inet_protocols=ipv4", "mynetworks=127.0.0.0/8", "relay_domains=remote.test",
            "relayhost=[127.0.0.1]:2525", "defer_transports=smtp",
            "smtpd_authorized_xclient_hosts=127.0.0.0/8",
            # each test starts its own pcc: do not keep policy connections long
            "smtpd_policy_service_max_idle=1s", "smtpd_policy_service_max_ttl=2s",
            "smtpd_relay_restrictions=permit_mynetworks, "
            f"check_policy_service {self.policy_service}, reject_unauth_destination",
            *self.extra_settings,
        )
        for command in (["set-permissions"], ["check"], ["start"]):
            subprocess.run(["postfix", "-c", d, *command], check=True, capture_output=True, timeout=120)

    def postconf(self, *settings: str) -> None:
        subprocess.run(["postconf", "-c", self.directory, "-e", *settings], check=True, timeout=60)

    def stop(self) -> None:
        subprocess.run(["postfix", "-c", self.directory, "stop"], capture_output=True, timeout=60)
        shutil.rmtree(self.directory, ignore_errors=True)

    def empty_queue(self) -> None:
        subprocess.run(["postsuper", "-c", self.directory, "-d", "ALL"], capture_output=True, timeout=60)

    def queue(self) -> dict:
        """queue_id -> queue name (hold, deferred, active, incoming, maildrop)."""
        output = subprocess.run(["postqueue", "-c", self.directory, "-j"], capture_output=True,
                                text=True, check=True, timeout=60).stdout
        return {entry["queue_id"]: entry["queue_name"] for entry in map(json.loads, output.splitlines())}

    def send(self, login: str, ip: str, sender: str = None):
        """Submit one message as `login` from `ip`.  Returns (code, text, queue_id)."""
        with smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=60) as smtp:
            smtp.ehlo("client.example")
            code, text = smtp.docmd("XCLIENT", f"ADDR={ip} LOGIN={login}")
            assert code == 220, text
            smtp.ehlo("client.example")
            smtp.mail(sender or login)
            code, text = smtp.rcpt("bob@remote.test")
            if code != 250:
                return code, text.decode(), None
            code, text = smtp.data(b"Subject: pcc end-to-end test\r\n\r\nhello\r\n")
            queue_id = re.search(r"queued as (\w+)", text.decode()).group(1)
            return code, text.decode(), queue_id


# --- a real SMTP listener for the notifications ----------------------------


class SmtpSink:
    def __init__(self):
        self.messages = []
        self.arrived = threading.Condition()
        self.port = None

    async def handle_DATA(self, server, session, envelope):
        import email
        import email.policy

        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        with self.arrived:
            self.messages.append((list(envelope.rcpt_tos), message))
            self.arrived.notify_all()
        return "250 Message accepted"

    def wait_for(self, count: int, timeout: float = 15.0) -> list:
        with self.arrived:
            self.arrived.wait_for(lambda: len(self.messages) >= count, timeout=timeout)
            return list(self.messages)


@pytest.fixture
def smtp_sink():
    from aiosmtpd.controller import Controller

    sink = SmtpSink()
    sink.port = free_port()
    controller = Controller(sink, hostname="127.0.0.1", port=sink.port)
    controller.start()
    yield sink
    controller.stop()
