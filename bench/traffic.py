#!/usr/bin/env python3
"""Throughput on three kinds of traffic, side by side in one run.

Run by hand (not part of the test suite), as root on a machine with the
PostgreSQL and MariaDB of the test setup:

    .venv/bin/python bench/traffic.py                 # about 25 minutes
    .venv/bin/python bench/traffic.py --duration 4    # shorter cells
    .venv/bin/python bench/traffic.py --only "pcc SQLite" --workloads sporadic
    .venv/bin/python bench/traffic.py --limits --only "pcc SQLite,pcc SQLite +limits"
    .venv/bin/python bench/traffic.py --only "pcc SQLite,pcc SQLite x2" --processes 1,2

Workloads (the same requests for every server):
  read-mostly   bench.py's: half of the requests from a few heavy accounts
                (Pareto), so nearly every request finds its account's
                sighting refreshed less than a minute ago.
  sporadic      10,000 accounts drawn uniformly, each from its home country
                (2% of the requests from elsewhere), after a warm-up that
                has sent for every account: real submission traffic, where
                most accounts send a few messages a day.
  first-sight   a fresh database and every request from an account never
                seen before: every request is a first sighting (a write).

Servers: the protocol floor (bench/floor.py), pcc on SQLite, PostgreSQL and
MariaDB (with 1 and 2 worker processes, [server] processes: "x2"), and the peer policyd-rate-limit 1.2.0 on the same three databases,
each driven at 1, 8, 32 and 128 persistent connections by one load-generator
process.  Printed as it goes; the table replaces the "Traffic" section of
bench/RESULTS.md.
"""
import argparse
import os
import random
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402
from pcclib.common import __version__  # noqa: E402
from pcclib.geoip import GeoIP  # noqa: E402

WORKLOADS = ("read-mostly", "sporadic", "first-sight")
SECTION = "## Traffic: read-mostly, sporadic and first-sight"


def request_bytes(login: str, ip: str, n: int) -> bytes:
    return ("request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n"
            f"client_address={ip}\nclient_name=unknown\nreverse_client_name=unknown\n"
            "helo_name=client.example\n"
            f"sender={login}\nrecipient=rcpt{n % 97}@remote.example\nrecipient_count=0\nqueue_id=\n"
            f"instance=traffic.{n:x}\nsize=0\nsasl_method=PLAIN\nsasl_username={login}\nsasl_sender=\n"
            "encryption_protocol=TLSv1.3\nencryption_cipher=TLS_AES_256_GCM_SHA384\n\n").encode()


def sporadic_requests(pools: dict, accounts: int, count: int, seed: int = 3, elsewhere: float = 0.02) -> list:
    """Uniform accounts, each with a home country and address; `elsewhere`
    of the requests (2%) from another country."""
    rng = random.Random(seed)
    countries = sorted(pools, key=lambda code: -len(pools[code]))
    homes = [countries[min(int(rng.expovariate(0.3)), len(countries) - 1)] for _ in range(accounts)]
    requests = []
    for n in range(count):
        account = rng.randrange(accounts)
        country = homes[account] if rng.random() >= elsewhere else rng.choice(countries[:30])
        ip = pools[country][account % min(3, len(pools[country]))]
        requests.append(request_bytes(f"sporadic{account}@example.com", ip, n))
    return requests


def first_sight_requests(pools: dict, count: int, offset: int, seed: int = 4) -> list:
    """Every request from an account of its own."""
    rng = random.Random(seed + offset)
    countries = sorted(pools)
    requests = []
    for n in range(count):
        country = rng.choice(countries)
        requests.append(request_bytes(f"new{offset + n}@example.com", rng.choice(pools[country]), n))
    return requests


def servers(workdir: str, limits: bool = False, processes: tuple = (1,)) -> list:
    """(label, kind, factory) for every server of the run; `limits`: pcc with
    [limits] on too ("pcc SQLite +limits"), limits no account reaches;
    `processes`: pcc with each of these [server] processes ("pcc SQLite x2")."""
    sqlite_url = f"sqlite:///{workdir}/traffic.sqlite3"
    made = [("floor", "floor", bench.floor_server)]
    for name, url in (("SQLite", sqlite_url), ("PostgreSQL", bench.PG_URL), ("MariaDB", bench.MY_URL)):
        for count in processes:
            more = {"processes = 1\n": f"processes = {count}\n"}
            made.append((f"pcc {name}" + (f" x{count}" if count > 1 else ""), "pcc",
                         lambda name=name, url=url, count=count, more=more: (
                             bench.reset_pcc_tables(url),
                             bench.pcc_server(name + (f"-x{count}" if count > 1 else ""), url, workdir, more))[1]))
        if limits:
            made.append((f"pcc {name} +limits", "pcc", lambda name=name, url=url: (
                bench.reset_pcc_tables(url), bench.pcc_server(f"{name}-limits", url, workdir, bench.LIMITS_ON))[1]))
    for name, backend in (("SQLite", "sqlite"), ("PostgreSQL", "pgsql"), ("MariaDB", "mysql")):
        made.append((f"peer {name}", "peer", lambda name=name, backend=backend: bench.peer_server(
            f"peer-{backend}", backend, workdir)))
    return made


def measure(args, log) -> dict:
    pools = bench.country_pools(GeoIP(""))
    streams = {"read-mostly": bench.build_requests(10000, 200000),
               "sporadic": sporadic_requests(pools, 10000, 200000)}
    per_cell = int(args.duration * 25000)  # more than any server answers: no account comes twice
    first_sight = {c: first_sight_requests(pools, per_cell, offset=c * 10_000_000) for c in bench.CONCURRENCY}
    log(f"requests built ({per_cell:,} first sightings per cell)")
    workdir = tempfile.mkdtemp(prefix="pcc-traffic-")
    rows = {}
    for label, kind, make in servers(workdir, args.limits, args.processes):
        if args.only and label not in args.only:
            continue
        for workload in args.workloads:
            if kind == "floor" and workload != "read-mostly":
                continue  # the floor does the same whatever comes
            try:
                with make() as server:
                    if workload == "sporadic":  # every account sent once or more before the measure
                        warm = bench.run_load(server.port, streams["sporadic"], 32, args.warmup, processes=1)
                        log(f"{label} warm-up: {warm['per_second']:.0f}/s")
                    for connections in bench.CONCURRENCY:
                        requests = first_sight[connections] if workload == "first-sight" else streams[workload]
                        result = bench.run_load(server.port, requests, connections, args.duration, processes=1)
                        result["rss"] = server.rss_mb()
                        rows[(label, workload, connections)] = result
                        log(f"{label:16} {workload:11} c={connections:<4} {result['per_second']:8.0f}/s  "
                            f"p50 {result['p50']:6.2f} ms  p99 {result['p99']:7.2f} ms  RSS {result['rss']:.0f} MB"
                            f"  {result['answers']}")
            except Exception as error:  # one server failing must not lose the others' numbers
                log(f"{label} {workload}: FAILED: {error}")
    return rows


def table(rows: dict, info: dict, args) -> list:
    floor = {c: rows.get(("floor", "read-mostly", c), {}).get("per_second") for c in bench.CONCURRENCY}
    peers = {key: result["per_second"] for key, result in rows.items() if key[0].startswith("peer")}
    lines = [SECTION, "",
             f"Measured {info['date']} by bench/traffic.py on {info['cores']} cores, one load-generator process, "
             f"{args.duration:g} s per cell, pcc {__version__}. `of floor`: decisions/s over the floor's at "
             "the same connections; `vs peer`: over policyd-rate-limit's on the same database and workload.", "",
             "| server | workload | connections | decisions/s | of floor | vs peer | p50 ms | p99 ms | peak RSS MB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for (label, workload, connections), r in rows.items():
        ratio = f"{r['per_second'] / floor[connections]:.2f}" if floor.get(connections) else "-"
        peer_label = label.replace("pcc", "peer").split(" x")[0]  # pcc's processes against the one peer
        peer = peers.get((peer_label, workload, connections)) if label.startswith("pcc") else None
        versus = f"{r['per_second'] / peer:.1f}x" if peer else "-"
        lines.append(f"| {label} | {workload} | {connections} | {r['per_second']:.0f} | {ratio} | {versus} | "
                     f"{r['p50']:.2f} | {r['p99']:.2f} | {r['rss']:.0f} |")
    return lines


def write_section(path: str, lines: list) -> None:
    text = open(path).read() if os.path.exists(path) else "# pcc benchmark results\n"
    start = text.find(SECTION)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + "\n".join(lines) + "\n"
    else:
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start] + "\n".join(lines) + "\n" + (text[end:] if end >= 0 else "")
    with open(path, "w") as out:
        out.write(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per cell")
    parser.add_argument("--warmup", type=float, default=8.0, help="seconds of sporadic traffic before measuring")
    parser.add_argument("--workloads", type=lambda text: text.split(","), default=list(WORKLOADS))
    parser.add_argument("--only", type=lambda text: text.split(","), default=None, help="server labels")
    parser.add_argument("--output", default=os.path.join(HERE, "RESULTS.md"))
    parser.add_argument("--limits", action="store_true", help="also pcc with [limits] on (none reached)")
    parser.add_argument("--processes", type=lambda text: tuple(int(n) for n in text.split(",")), default=(1, 2),
                        help="pcc's [server] processes, each a row (default 1,2)")
    args = parser.parse_args()

    def log(text):
        print(text, flush=True)

    info = bench.machine()
    rows = measure(args, log)
    lines = table(rows, info, args)
    print("\n".join(lines))
    if not args.only:
        write_section(args.output, lines)
        log(f"wrote the traffic section of {args.output}")


if __name__ == "__main__":
    main()
