"""Shared test fixtures: real databases, a real SMTP listener, a test GeoIP
database, and pcc daemons started as real processes.

A service that is not reachable skips its tests on a developer's laptop, but
fails them under CI (CI=true): CI must never pass by testing nothing.
"""
from __future__ import annotations

import configparser
import datetime
import os
import pathlib
import socket
import subprocess
import sys
import threading
import time

import pytest
import sqlalchemy as sa

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pcc  # noqa: E402

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

SERVER_DATABASES = {
    "mariadb": os.environ.get("PCC_TEST_MARIADB", "mysql+pymysql://root@127.0.0.1:3306/test"),
    "postgresql": os.environ.get("PCC_TEST_POSTGRESQL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
}

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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def counted_request(country: str, login: str = "alice@example.com") -> pcc.PolicyRequest:
    """A request as the decision sees it, GeoIP done: `login` sending from `country`."""
    return pcc.PolicyRequest(request="smtpd_access_policy", sasl_username=login, client_address=ip_in(country),
                             client_country=country)


def seen_an_hour_before(now, *countries) -> tuple:
    """Sightings of `countries`, the last an hour before `now`."""
    hour = datetime.timedelta(hours=1)
    return tuple(pcc.CountrySeen(code, now - 2 * hour, now - hour, ip_in(code)) for code in countries)


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
def geoip(geoip_path) -> pcc.GeoIP:
    return pcc.GeoIP(geoip_path)


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
        pcc.Base.metadata.drop_all(engine)
    except sa.exc.OperationalError as error:
        unavailable(f"{pcc.safe_url(url)} ({pcc.first_line(error)})")
    finally:
        engine.dispose()
    return url


@pytest.fixture(params=["sqlite", "mariadb", "postgresql"])
def db_url(request, tmp_path) -> str:
    """Each storage test runs on SQLite, MariaDB and PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/pcc.sqlite3"
    return fresh_database(SERVER_DATABASES[request.param])


@pytest.fixture(params=["mariadb", "postgresql"])
def shared_db_url(request) -> str:
    """A database several daemons can share."""
    return fresh_database(SERVER_DATABASES[request.param])


@pytest.fixture
def postgresql_url() -> str:
    return fresh_database(SERVER_DATABASES["postgresql"])


# --- configuration ----------------------------------------------------------


def write_config(directory: pathlib.Path, overrides: dict, name: str = "pcc.conf") -> str:
    """The shipped pcc.conf with some keys changed ("section.key": value)."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(ROOT / "pcc.conf", encoding="utf-8")
    for dotted, value in overrides.items():
        section, key = dotted.split(".", 1)
        parser.set(section, key, str(value))
    path = directory / name
    with open(path, "w", encoding="utf-8") as config_file:
        parser.write(config_file)
    return str(path)


@pytest.fixture
def make_settings(tmp_path, geoip_path):
    def make(**overrides) -> pcc.Settings:
        values = {"db.dbcon": f"sqlite:///{tmp_path}/pcc.sqlite3", "geoip.database": geoip_path,
                  "db.spool_file": str(tmp_path / "spool.jsonl")}
        values.update({key.replace("__", "."): value for key, value in overrides.items()})
        return pcc.load_settings(write_config(tmp_path, values, name="settings.conf"))

    return make


# --- the policy protocol ----------------------------------------------------


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


def encode_request(attributes: dict) -> bytes:
    return "".join(f"{name}={value}\n" for name, value in attributes.items()).encode() + b"\n"


class PolicyClient:
    """A Postfix-like client: one connection, many requests.  Like Postfix, it
    can reconnect and ask again once when pcc has closed the connection."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0):
        self.address = (host, port)
        self.timeout = timeout
        self.sock = socket.create_connection(self.address, timeout=timeout)
        self.pending = b""

    def ask_like_postfix(self, login: str = "", ip: str = "81.2.69.160", **extra) -> str:
        try:
            return self.ask(login, ip, **extra)
        except (ConnectionError, OSError):
            self.sock.close()
            self.sock = socket.create_connection(self.address, timeout=self.timeout)
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


def pcc_command(config, *arguments, expect=0) -> subprocess.CompletedProcess:
    """An admin command (pcc.py --config CONFIG ARGUMENTS...) that must exit `expect`."""
    result = subprocess.run([sys.executable, str(ROOT / "pcc.py"), "--config", config, *arguments],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == expect, (result.stdout, result.stderr)
    return result


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


# --- daemons ----------------------------------------------------------------


class Daemon:
    """`pcc.py -d` as a real process on a free port."""

    def __init__(self, config_path: str, log_path: pathlib.Path, port: int, host: str = "127.0.0.1"):
        self.host = host
        self.config_path = config_path
        self.log_path = log_path
        self.port = port
        self.process = None

    def start(self) -> "Daemon":
        log_file = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "pcc.py"), "-d", "--stderr", "--config", self.config_path],
            stdout=log_file, stderr=log_file, cwd=str(ROOT),
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

    def start(**overrides) -> Daemon:
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
        return daemon.start()

    yield start
    for daemon in daemons:
        daemon.stop()


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
