#!/usr/bin/env python3
"""pcc benchmark: decisions per second and latency, next to the protocol floor and a peer.

Run by hand (not part of the test suite), as root on a machine with the
PostgreSQL and MariaDB of the test setup:

    .venv/bin/python bench/bench.py            # everything, about 30 minutes
    .venv/bin/python bench/bench.py --quick    # short runs, no 1M growth, 1-minute soak

It starts, one after the other, on 127.0.0.1 only:
  floor   bench/floor.py: the same socketserver.ThreadingTCPServer answering
          DUNNO without doing anything (what the protocol alone costs)
  pcc     pcc.py -d on SQLite, PostgreSQL and MariaDB
  peer    policyd-rate-limit 1.2.0 (PyPI; SQL-backed Python policy daemon) with
          a per-account limit, on the same PostgreSQL and MariaDB (installed in
          bench/.venv-peer on first use)
and drives each with the same requests from separate load-generator processes
over persistent connections, as Postfix does, at 1, 8, 32 and 128
connections: decisions/s, p50/p99/p99.9 latency, the server's peak RSS, and
pcc's throughput as a ratio to the floor.  Then: pcc at a fixed offered load
of 1,000 decisions/s; pcc with 1k and with 1M accounts already in the
database; and a soak whose RSS must not grow.  Results go to bench/RESULTS.md.
"""
import argparse
import datetime as dt
import json
import multiprocessing
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
import sqlalchemy as sa  # noqa: E402

from pcclib.common import __version__
from pcclib.geoip import GeoIP
from pcclib.storage import Base, Sighting

PG_URL = os.environ.get("PCC_BENCH_POSTGRESQL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
MY_URL = os.environ.get("PCC_BENCH_MARIADB", "mysql+pymysql://root@127.0.0.1:3306/test")
PEER_VENV = os.path.join(HERE, ".venv-peer")
PEER_PACKAGES = ["policyd-rate-limit==1.2.0", "psycopg2-binary==2.9.13", "mysqlclient==2.3.2"]
CONCURRENCY = [1, 8, 32, 128]


# --- the workload -------------------------------------------------------------

def country_pools(geoip: GeoIP, seed: int = 1) -> dict:
    """Public IPv4 and IPv6 addresses grouped by their country in pcc's GeoIP data."""
    rng = random.Random(seed)
    pools: dict = {}
    import ipaddress
    for _ in range(60000):
        if rng.random() < 0.25:
            address = ipaddress.IPv6Address((0x2 << 124) | rng.getrandbits(124))
        else:
            address = ipaddress.IPv4Address(rng.getrandbits(32))
        found = geoip.country(address)
        if found.code:
            pools.setdefault(found.code, []).append(str(address))
    return {code: ips for code, ips in pools.items() if len(ips) >= 3}


def build_requests(accounts: int, count: int, seed: int = 2) -> list:
    """Policy requests (bytes) in the order they will be sent.

    Most accounts send from one or two addresses of one country, 8% from two
    countries, 1.5% travel through several, and 0.5% are compromised and hop
    countries with every message (pcc blocks them after the fourth)."""
    geoip = GeoIP("")
    pools = country_pools(geoip)
    countries = sorted(pools, key=lambda code: -len(pools[code]))
    rng = random.Random(seed)
    profiles = []
    for _account in range(accounts):
        kind = rng.random()
        home = countries[min(int(rng.expovariate(0.3)), len(countries) - 1)]
        if kind < 0.005:
            profiles.append(("compromised", None))
        elif kind < 0.02:
            profiles.append(("traveller", [home] + rng.sample(countries[:40], 4)))
        elif kind < 0.10:
            profiles.append(("two", [home, rng.choice(countries[:20])]))
        else:
            profiles.append(("home", [home]))
    requests = []
    compromised = [n for n, (kind, _homes) in enumerate(profiles) if kind == "compromised"]
    for n in range(count):
        if rng.random() < 0.03:  # a compromised account sends a lot
            account = rng.choice(compromised)
        elif rng.random() < 0.5:
            account = min(int(rng.paretovariate(1.2)) - 1, accounts - 1)
        else:
            account = rng.randrange(accounts)
        kind, homes = profiles[account]
        country = rng.choice(countries) if kind == "compromised" else rng.choice(homes)
        ip = rng.choice(pools[country][:3] if kind == "home" else pools[country])
        login = f"user{account}@example.com"
        requests.append(
            ("request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n"
             f"client_address={ip}\nclient_name=unknown\nreverse_client_name=unknown\n"
             "helo_name=client.example\n"
             f"sender={login}\nrecipient=rcpt{n % 97}@remote.example\nrecipient_count=0\nqueue_id=\n"
             f"instance=bench.{n:x}\nsize=0\nsasl_method=PLAIN\nsasl_username={login}\nsasl_sender=\n"
             "encryption_protocol=TLSv1.3\nencryption_cipher=TLS_AES_256_GCM_SHA384\n\n").encode())
    return requests


# --- the load generator (separate processes) ---------------------------------

def _connection_loop(port, requests, stop_at, interval, latencies, answers):
    try:
        _requests_on_one_connection(port, requests, stop_at, interval, latencies, answers)
    except OSError as error:  # a server that stops answering costs its numbers, not the run
        answers["ERROR " + type(error).__name__] = answers.get("ERROR " + type(error).__name__, 0) + 1


def _requests_on_one_connection(port, requests, stop_at, interval, latencies, answers):
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    pending = b""
    index = 0
    # Open loop: each connection sends as a Poisson process (random gaps, as
    # mail arrives), so that connections do not all fire at the same instant.
    arrivals = random.Random(id(latencies) ^ hash(requests[0]) ^ threading.get_ident())
    next_send = time.perf_counter() + (arrivals.uniform(0, interval) if interval else 0.0)
    try:
        while True:
            now = time.perf_counter()
            if now >= stop_at:
                break
            if interval:  # latency counts from the planned send time
                if now < next_send:
                    time.sleep(next_send - now)
                planned = next_send
                next_send += arrivals.expovariate(1.0 / interval)
            else:
                planned = time.perf_counter()
            sock.sendall(requests[index % len(requests)])
            index += 1
            while b"\n\n" not in pending:
                chunk = sock.recv(4096)
                if not chunk:
                    raise ConnectionError("server closed the connection")
                pending += chunk
            reply, pending = pending.split(b"\n\n", 1)
            latencies.append(time.perf_counter() - planned)
            verb = reply.split(b" ", 1)[0].split(b"=", 1)[1].upper().decode()
            answers[verb] = answers.get(verb, 0) + 1
    finally:
        sock.close()


def _client_process(port, connections, requests, start_at, duration, rate, results):
    stop_at = start_at + duration
    latencies: list = []
    answers: dict = {}
    interval = connections / rate if rate else 0.0
    slices = [requests[n::connections] for n in range(connections)]
    while time.perf_counter() < start_at:
        time.sleep(0.001)
    threads = [threading.Thread(target=_connection_loop,
                                args=(port, slices[n], stop_at, interval, latencies, answers))
               for n in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results.put((latencies, answers))


def run_load(port, requests, connections, duration, rate=None, processes=2):
    """Drive the server; returns decisions/s and latency percentiles in ms."""
    processes = min(processes, connections)
    results = multiprocessing.Queue()
    start_at = time.perf_counter() + 1.0
    shares = [connections // processes + (1 if n < connections % processes else 0) for n in range(processes)]
    chunk = len(requests) // processes
    workers = [multiprocessing.Process(target=_client_process, args=(
        port, share, requests[n * chunk:(n + 1) * chunk], start_at, duration,
        rate * share / connections if rate else None, results)) for n, share in enumerate(shares)]
    for worker in workers:
        worker.start()
    latencies, answers = [], {}
    for _ in workers:
        part, counts = results.get()
        latencies += part
        for key, value in counts.items():
            answers[key] = answers.get(key, 0) + value
    for worker in workers:
        worker.join()
    latencies.sort()

    def percentile(p):
        return latencies[min(len(latencies) - 1, int(len(latencies) * p))] * 1000 if latencies else float("nan")

    return {"decisions": len(latencies), "per_second": len(latencies) / duration, "p50": percentile(0.50),
            "p99": percentile(0.99), "p999": percentile(0.999), "answers": answers}


# --- the servers ---------------------------------------------------------------

class Server:
    def __init__(self, name, command, port, env=None, log_path=None):
        self.name, self.command, self.port = name, command, port
        self.env = env
        self.log_path = log_path or os.path.join(tempfile.gettempdir(), f"pcc-bench-{name}.log")
        self.process = None

    def __enter__(self):
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen(self.command, stdout=log, stderr=log, env=self.env, cwd=ROOT)
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {open(self.log_path).read()[-2000:]}")
            try:
                if self._answering():
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not listen on {self.port}")

    def _answering(self):
        """Whether the server answers; with several worker processes
        (processes=N/N in pcc's health words), every one of them."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as connection:
            if not self.name.startswith("pcc") or "-x" not in self.name:
                return True
            connection.sendall(b"request=pcc_health\n\n")
            reply = b""
            while not reply.endswith(b"\n\n"):
                chunk = connection.recv(4096)
                if not chunk:
                    return False
                reply += chunk
        words = dict(word.split("=", 1) for word in reply.decode().split() if "=" in word)
        answered, _slash, processes = words.get("processes", "0/1").partition("/")
        return answered == processes

    def rss_mb(self, key="VmHWM"):
        """The peak RSS of the server's process, or of the largest of its
        worker processes (pcc's [server] processes: per process)."""
        pids = [self.process.pid]
        try:
            with open(f"/proc/{self.process.pid}/task/{self.process.pid}/children") as children:
                pids += [int(pid) for pid in children.read().split()]
        except OSError:
            pass
        sizes = [_status_mb(pid, key) for pid in pids]
        return max(sizes) if sizes else float("nan")

    def __exit__(self, *exc):
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _status_mb(pid, key):
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# [limits] high enough that no account of the benchmarks reaches them: the
# cost of counting, not of deferring.
LIMITS_ON = {"messages_per_hour =\n": "messages_per_hour = 10000000\n",
             "messages_per_day =\n": "messages_per_day = 10000000\n",
             "recipients_per_hour =\n": "recipients_per_hour = 10000000\n",
             "recipients_per_day =\n": "recipients_per_day = 10000000\n"}


def pcc_server(name, dbcon, workdir, more=None):
    """pcc.py -d on the shipped pcc.conf; `more`: further replacements in its text."""
    port = free_port()
    config = os.path.join(workdir, f"{name}.conf")
    text = open(os.path.join(ROOT, "pcc.conf")).read()
    for old, new in {"port = 9999": f"port = {port}",
                     "dbcon = sqlite:////var/lib/pcc/pcc.sqlite3": f"dbcon = {dbcon}",
                     "spool_file = /var/lib/pcc/spool.jsonl": f"spool_file = {workdir}/{name}.spool",
                     **(more or {})}.items():
        text = text.replace(old, new)
    with open(config, "w") as out:
        out.write(text)
    return Server(name, [sys.executable, os.path.join(ROOT, "pcc.py"), "-d", "--stderr", "--config", config], port)


def floor_server():
    port = free_port()
    return Server("floor", [sys.executable, os.path.join(HERE, "floor.py"), str(port)], port)


def peer_server(name, backend, workdir):
    ensure_peer()
    port = free_port()
    url = sa.engine.make_url(PG_URL if backend == "pgsql" else MY_URL)
    config = {
        "debug": False, "user": "root", "group": "root", "pidfile": f"{workdir}/{name}.pid",
        "backend": {"sqlite": 0, "pgsql": 2, "mysql": 1}[backend],
        "sqlite_config": {"database": f"{workdir}/{name}.sqlite3"},
        "pgsql_config": {"database": url.database, "user": url.username or "postgres", "host": url.host,
                         "port": url.port or 5432},
        "mysql_config": {"db": url.database, "user": url.username or "root", "passwd": url.password or "",
                         "host": url.host, "port": url.port or 3306, "charset": "utf8"},
        "SOCKET": ["127.0.0.1", port], "socket_permission": 0o666,
        "limits": [[150, 86400]], "limits_by_id": {}, "sql_limits_by_id": "",
        "limit_by_sasl": True, "limit_by_sender": False, "limit_by_ip": False, "limited_networks": [],
        "success_action": "dunno", "fail_action": "defer_if_permit Rate limit reach, retry later",
        "db_error_action": "dunno", "report": False, "delay_to_close": 300, "count_mode": 0,
    }
    path = os.path.join(workdir, f"{name}.yaml")
    with open(path, "w") as out:
        json.dump(config, out)  # JSON is YAML
    if backend == "sqlite":
        for suffix in ("", "-wal", "-shm", "-journal"):
            if os.path.exists(f"{workdir}/{name}.sqlite3{suffix}"):
                os.unlink(f"{workdir}/{name}.sqlite3{suffix}")
    else:
        engine = sa.create_engine(PG_URL if backend == "pgsql" else MY_URL)
        with engine.begin() as connection:
            connection.execute(sa.text("DROP TABLE IF EXISTS mail_count"))
        engine.dispose()
    return Server(name, [os.path.join(PEER_VENV, "bin", "python"),
                         os.path.join(PEER_VENV, "bin", "policyd-rate-limit"), "--file", path], port)


def ensure_peer():
    if os.path.exists(os.path.join(PEER_VENV, "bin", "policyd-rate-limit")):
        return
    if shutil.which("mariadb_config") is None and shutil.which("mysql_config") is None:
        subprocess.run(["apt-get", "install", "-y", "-qq", "libmariadb-dev", "pkg-config"], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    subprocess.run([sys.executable, "-m", "venv", PEER_VENV], check=True)
    subprocess.run([os.path.join(PEER_VENV, "bin", "pip"), "install", "-q", *PEER_PACKAGES], check=True)


def reset_pcc_tables(url):
    engine = sa.create_engine(url)
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    engine.dispose()


def prefill(url, accounts, countries_each=2):
    """`accounts` other accounts with `countries_each` recent sightings each."""
    reset_pcc_tables(url)
    engine = sa.create_engine(url)
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    codes = ["DE", "FR", "GB", "US", "NL", "IT", "ES", "SE"]
    batch = []
    with engine.begin() as connection:
        for n in range(accounts):
            for k in range(countries_each):
                batch.append({"login": f"old{n}@example.net", "country": codes[(n + k) % len(codes)],
                              "first_seen": now - dt.timedelta(hours=30), "last_seen": now - dt.timedelta(hours=k),
                              "last_ip": f"192.0.2.{k + 1}"})
            if len(batch) >= 20000:
                connection.execute(sa.insert(Sighting.__table__), batch)
                batch = []
        if batch:
            connection.execute(sa.insert(Sighting.__table__), batch)
    engine.dispose()


# --- the run ---------------------------------------------------------------------

def machine():
    memory = "?"
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    versions = {"Python": platform.python_version(), "pcc": __version__, "SQLAlchemy": sa.__version__}
    from importlib import metadata
    for distribution in ("psycopg", "PyMySQL", "maxminddb", "geoip2fast"):
        try:
            versions[distribution] = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            pass
    for name, url in (("PostgreSQL", PG_URL), ("MariaDB", MY_URL)):
        try:
            engine = sa.create_engine(url)
            with engine.connect() as connection:
                versions[name] = connection.execute(sa.text("SELECT version()")).scalar().split(" on ")[0]
            engine.dispose()
        except sa.exc.SQLAlchemyError:
            versions[name] = "unavailable"
    versions["policyd-rate-limit"] = "1.2.0"
    return {"cores": os.cpu_count(), "memory": memory, "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "cpu": platform.processor() or platform.machine(), "versions": versions}


def measure_matrix(requests, duration, workdir, log):
    rows = {}
    servers = [("floor", floor_server)]
    servers += [(f"pcc {name}", lambda name=name, url=url: (reset_pcc_tables(url), pcc_server(
        name.split()[0], url, workdir))[1]) for name, url in (("SQLite", f"sqlite:///{workdir}/bench.sqlite3"),
                                                              ("PostgreSQL", PG_URL), ("MariaDB", MY_URL))]
    servers += [("peer PostgreSQL", lambda: peer_server("peer-pg", "pgsql", workdir)),
                ("peer MariaDB", lambda: peer_server("peer-my", "mysql", workdir))]
    for label, make in servers:
        try:
            with make() as server:
                for connections in CONCURRENCY:
                    result = run_load(server.port, requests, connections, duration)
                    result["rss"] = server.rss_mb()
                    rows[(label, connections)] = result
                    log(f"{label:16} c={connections:<4} {result['per_second']:8.0f}/s  p50 {result['p50']:6.2f} ms"
                        f"  p99 {result['p99']:7.2f} ms  p99.9 {result['p999']:7.2f} ms  RSS {result['rss']:.0f} MB"
                        f"  {result['answers']}")
        except Exception as error:  # one server failing must not lose the others' numbers
            log(f"{label}: FAILED: {error}")
    return rows


def measure_offered(requests, workdir, log, duration):
    url = f"sqlite:///{workdir}/offered.sqlite3"
    reset_pcc_tables(url)
    with pcc_server("offered", url, workdir) as server:
        result = run_load(server.port, requests, 32, duration, rate=1000)
        result["rss"] = server.rss_mb()
    log(f"pcc SQLite at 1,000/s offered, 32 connections: p50 {result['p50']:.2f} ms p99 {result['p99']:.2f} ms "
        f"p99.9 {result['p999']:.2f} ms ({result['per_second']:.0f}/s done)")
    return result


def measure_growth(requests, workdir, log, sizes, duration):
    rows = {}
    for label, url in (("SQLite", f"sqlite:///{workdir}/growth.sqlite3"), ("PostgreSQL", PG_URL),
                       ("MariaDB", MY_URL)):
        for size in sizes:
            started = time.monotonic()
            prefill(url, size)
            log(f"growth {label}: {size:,} accounts prefilled in {time.monotonic() - started:.0f} s")
            with pcc_server(f"growth-{label}", url, workdir) as server:
                run_load(server.port, requests, 8, 3)  # warm up caches
                result = run_load(server.port, requests, 8, duration, rate=500)
                result["rss"] = server.rss_mb()
            rows[(label, size)] = result
            log(f"growth {label:10} {size:>9,} accounts: p50 {result['p50']:.2f} ms p99 {result['p99']:.2f} ms "
                f"RSS {result['rss']:.0f} MB")
    return rows


def measure_soak(requests, workdir, log, seconds, accounts):
    url = f"sqlite:///{workdir}/soak.sqlite3"
    prefill(url, accounts)
    samples = []
    with pcc_server("soak", url, workdir) as server:
        run_load(server.port, requests, 8, 5)
        start_rss = server.rss_mb("VmRSS")
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            run_load(server.port, requests, 8, min(60, max(5, deadline - time.monotonic())), rate=800)
            samples.append(server.rss_mb("VmRSS"))
            log(f"soak: RSS {samples[-1]:.1f} MB after {seconds - (deadline - time.monotonic()):.0f} s")
    return {"seconds": seconds, "start": start_rss, "samples": samples}


def write_results(path, info, args, matrix, offered, growth, soak, notes):
    floor = {c: matrix.get(("floor", c), {}).get("per_second") for c in CONCURRENCY}
    lines = [
        "# pcc benchmark results", "",
        f"Measured {info['date']} on {info['cores']} cores ({info['cpu']}), {info['memory']} memory; "
        "load generator and servers share the machine, all on 127.0.0.1.", "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()) + ".", "",
        f"Workload: {args.accounts:,} accounts (90% from one country, 8% two, 1.5% travellers, 0.5% "
        "compromised), 25% IPv6, persistent connections, "
        f"{args.duration:g} s per cell, the same requests for every server.", "",
        "## Throughput and latency", "",
        "| server | connections | decisions/s | vs floor | p50 ms | p99 ms | p99.9 ms | peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (label, connections), r in matrix.items():
        ratio = f"{r['per_second'] / floor[connections]:.2f}" if floor.get(connections) else "-"
        lines.append(f"| {label} | {connections} | {r['per_second']:.0f} | {ratio} | {r['p50']:.2f} | "
                     f"{r['p99']:.2f} | {r['p999']:.2f} | {r['rss']:.0f} |")
    if offered:
        lines += ["", "## Fixed offered load", "",
                  f"pcc on SQLite, 1,000 decisions/s offered over 32 connections: p50 {offered['p50']:.2f} ms, "
                  f"p99 {offered['p99']:.2f} ms, p99.9 {offered['p999']:.2f} ms "
                  f"({offered['per_second']:.0f} decisions/s served)."]
    if growth:
        lines += ["", "## Growth: history already in the database", "",
                  "500 decisions/s offered over 8 connections; the prefilled accounts have 2 recent countries each.",
                  "", "| database | accounts in DB | p50 ms | p99 ms | peak RSS MB |", "|---|---:|---:|---:|---:|"]
        for (label, size), r in growth.items():
            lines.append(f"| {label} | {size:,} | {r['p50']:.2f} | {r['p99']:.2f} | {r['rss']:.0f} |")
    if soak:
        lines += ["", "## Soak", "",
                  f"pcc on SQLite, {soak['seconds']:.0f} s at 800 decisions/s: RSS {soak['start']:.1f} MB after "
                  "warm-up, then " + ", ".join(f"{s:.1f}" for s in soak["samples"]) + " MB."]
    lines += ["", "## Notes", ""] + notes
    with open(path, "w") as out:
        out.write("\n".join(lines) + "\n")


def _to_json(value):
    if isinstance(value, dict) and any(isinstance(key, tuple) for key in value):
        return {"__pairs__": [[list(key), item] for key, item in value.items()]}
    return value


def _from_json(value):
    if isinstance(value, dict) and "__pairs__" in value:
        return {tuple(key): item for key, item in value["__pairs__"]}
    return value


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short runs, growth up to 100k, 1-minute soak")
    parser.add_argument("--accounts", type=int, default=10000)
    parser.add_argument("--duration", type=float, default=None, help="seconds per measurement")
    parser.add_argument("--soak", type=float, default=None, help="soak seconds (default 600, quick 60)")
    parser.add_argument("--skip", default="", help="comma list of parts to skip: matrix,offered,growth,soak")
    parser.add_argument("--output", default=os.path.join(HERE, "RESULTS.md"))
    args = parser.parse_args()
    args.duration = args.duration or (4.0 if args.quick else 10.0)
    soak_seconds = args.soak if args.soak is not None else (60 if args.quick else 600)
    skip = set(filter(None, args.skip.split(",")))
    workdir = tempfile.mkdtemp(prefix="pcc-bench-")
    notes = []

    def log(text):
        print(text, flush=True)

    info = machine()
    log(f"machine: {info}")
    requests = build_requests(args.accounts, 200000)
    log(f"{len(requests):,} requests built")
    sizes = [1000, 100000] if args.quick else [1000, 1000000]
    parts = {
        "matrix": lambda: measure_matrix(requests, args.duration, workdir, log),
        "offered": lambda: measure_offered(requests, workdir, log, args.duration),
        "growth": lambda: measure_growth(requests, workdir, log, sizes, args.duration),
        "soak": lambda: measure_soak(requests, workdir, log, soak_seconds, sizes[-1]),
    }
    results = {}
    for name, measure in parts.items():
        saved = os.path.join(HERE, f"results-{name}.json")  # a skipped part keeps its last numbers
        if name in skip:
            if os.path.exists(saved):
                with open(saved) as previous:
                    results[name] = _from_json(json.load(previous))
                notes.append(f"- The {name} numbers are from an earlier run of this script (skipped this time).")
            else:
                results[name] = None
            continue
        results[name] = measure()
        with open(saved, "w") as out:
            json.dump(_to_json(results[name]), out)
    write_results(args.output, info, args, results["matrix"] or {}, results["offered"], results["growth"] or {},
                  results["soak"], notes)
    log(f"wrote {args.output}")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
