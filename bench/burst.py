#!/usr/bin/env python3
"""The burst of a stolen account: N messages at once from 4 new countries.

Run by hand (not part of the test suite), on a machine with the PostgreSQL and
MariaDB of the test setup:

    .venv/bin/python bench/burst.py                      # all databases, 1 and 2 daemons, 32/128/512
    .venv/bin/python bench/burst.py --db mariadb --burst 32

For each database, daemon count and burst size: fresh tables; the account
sends from 3 countries (one message each) through the first daemon; every
daemon is restarted, so none has the account in memory; then N connections
(spread over the daemons) each send one message at the same moment, from 4
countries none of the earlier 3.  Printed: the answers by action, the slowest
answer, the block rows written, and how many block transactions the daemons
ran (on MariaDB and PostgreSQL read from the block id's auto-increment
counter, which a rolled-back transaction advances too, so it is the same
measure before and after a change to pcc).
"""
import argparse
import collections
import os
import socket
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402
from bench import sa  # noqa: E402
from pcclib.geoip import GeoIP  # noqa: E402
from pcclib.storage import Block  # noqa: E402

DATABASES = {"sqlite": None, "mariadb": bench.MY_URL, "postgresql": bench.PG_URL}
LOGIN = "stolen@example.com"


def one_address_per_country(countries) -> dict:
    pools = bench.country_pools(GeoIP(""))
    return {code: pools[code] for code in countries}


def block_transactions(url: str, dialect: str):
    """Block transactions begun so far (committed or rolled back), or None."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            if dialect == "postgresql":
                return connection.execute(sa.text(
                    "SELECT pg_sequence_last_value(pg_get_serial_sequence('pcc_blocks', 'id'))")).scalar() or 0
            if dialect == "mariadb":
                next_id = connection.execute(sa.text(
                    "SELECT AUTO_INCREMENT FROM information_schema.TABLES "
                    "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'pcc_blocks'")).scalar()
                return (next_id or 1) - 1
            return None
    finally:
        engine.dispose()


def block_rows(url: str) -> int:
    engine = sa.create_engine(url)
    with engine.connect() as connection:
        count = connection.execute(sa.select(sa.func.count()).select_from(Block)).scalar()
    engine.dispose()
    return count


def ask(sock: socket.socket, ip: str) -> str:
    request = "".join(f"{k}={v}\n" for k, v in {
        "request": "smtpd_access_policy", "protocol_state": "RCPT", "client_address": ip,
        "sasl_method": "PLAIN", "sasl_username": LOGIN, "sender": LOGIN, "recipient": "x@remote.test",
    }.items()) + "\n"
    sock.sendall(request.encode())
    reply = b""
    while not reply.endswith(b"\n\n"):
        chunk = sock.recv(4096)
        if not chunk:
            return "(connection closed)"
        reply += chunk
    return reply.decode().split("\n")[0][len("action="):].split()[0]


def burst(ports: list, size: int, addresses: list) -> tuple:
    """(answers, seconds per answer): `size` connections, one message each, released together."""
    sockets = [socket.create_connection(("127.0.0.1", ports[n % len(ports)]), timeout=30) for n in range(size)]
    barrier = threading.Barrier(size)
    answers, seconds = [None] * size, [None] * size

    def run(n):
        barrier.wait()
        started = time.monotonic()
        try:
            answers[n] = ask(sockets[n], addresses[n % len(addresses)])
        except OSError as error:
            answers[n] = f"({error})"
        seconds[n] = time.monotonic() - started

    threads = [threading.Thread(target=run, args=(n,)) for n in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for sock in sockets:
        sock.close()
    return answers, seconds


def run_case(dialect: str, daemons: int, size: int, pools: dict, workdir: str) -> dict:
    url = DATABASES[dialect] or f"sqlite:///{workdir}/burst-{daemons}-{size}.sqlite3"
    bench.reset_pcc_tables(url)
    # A name (so a spool file) of each case's own: a block spooled in one case
    # must not be written into the next case's fresh tables.
    servers = [bench.pcc_server(f"burst-{dialect}-{daemons}x{size}-{n}", url, workdir) for n in range(daemons)]
    with servers[0]:
        with socket.create_connection(("127.0.0.1", servers[0].port)) as sock:
            seeded = [ask(sock, pools[code][0]) for code in ("GB", "US", "FR")]
    assert seeded == ["DUNNO"] * 3, seeded
    before = block_transactions(url, dialect)
    for server in servers:
        server.__enter__()
    try:
        new = [pools[code][n % len(pools[code])] for n in range(size) for code in ("DE", "SE", "JP", "BR")]
        answers, seconds = burst([server.port for server in servers], size, new)
    finally:
        for server in servers:
            server.__exit__(None, None, None)
    after = block_transactions(url, dialect)
    return {"answers": dict(collections.Counter(answers)), "slowest": max(seconds),
            "blocks": block_rows(url), "transactions": None if after is None else after - (before or 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", nargs="+", default=list(DATABASES), choices=list(DATABASES))
    parser.add_argument("--daemons", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--burst", nargs="+", type=int, default=[32, 128, 512])
    args = parser.parse_args()
    pools = one_address_per_country(["GB", "US", "FR", "DE", "SE", "JP", "BR"])
    print(f"{'database':<11} {'daemons':>7} {'burst':>5}  {'slowest':>8}  {'blocks':>6}  {'block txns':>10}  answers")
    with tempfile.TemporaryDirectory() as workdir:
        for dialect in args.db:
            for daemons in args.daemons:
                for size in args.burst:
                    result = run_case(dialect, daemons, size, pools, workdir)
                    transactions = "-" if result["transactions"] is None else result["transactions"]
                    print(f"{dialect:<11} {daemons:>7} {size:>5}  {result['slowest']:>7.3f}s  {result['blocks']:>6}"
                          f"  {transactions:>10}  {result['answers']}", flush=True)


if __name__ == "__main__":
    main()
