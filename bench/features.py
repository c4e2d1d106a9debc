#!/usr/bin/env python3
"""What the optional features cost: pcc on SQLite, same requests, four configurations.

Run by hand (not part of the test suite), after `bash .ci/run` has installed
the real GeoLite2-City 2015 data (python-geoip-geolite2):

    .venv/bin/python bench/features.py [--duration SECONDS] [--rounds N]

  baseline                  the shipped pcc.conf (embedded country data)
  metrics on                [server] metrics_port set
  City .mmdb, travel off    [geoip] database = GeoLite2-City, rule off
  travel on                 the same file, max_travel_speed_kmh = 1000
  network lists, ASN        the shipped [list tor] (block) with 1,500 exits,
                            [list vpn] (notify) with 1,000,000 IPv4 /24
                            ranges, and an ASN .mmdb of 20,000 networks

The workload is bench.py's: random accounts, each message from a random
address of a random country, so nearly every message of an account comes from
another place.  That is the worst case for the impossible-travel rule, which
writes every move to another place at once; real accounts move far less.
The configurations alternate for --rounds rounds so that drift of the machine
shows up as spread, not as a difference.
"""
import argparse
import os
import tempfile

import bench


def city_database() -> str:
    import _geoip_geolite2

    return os.path.join(os.path.dirname(_geoip_geolite2.__file__), "GeoLite2-City.mmdb")


def network_files(workdir: str) -> dict:
    """A Tor list, a 1M-range VPN list and an ASN database, written once."""
    import random

    rng = random.Random(7)
    tor, vpn, asn = (os.path.join(workdir, name) for name in ("tor.txt", "vpn.txt", "asn.mmdb"))
    if not os.path.exists(asn):
        firsts = [n for n in range(1, 224) if n not in (10, 100, 127, 169, 172, 192, 198, 203)]
        with open(tor, "w") as out:
            out.writelines(f"185.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}\n"
                           for _ in range(1500))
        with open(vpn, "w") as out:
            out.writelines(f"{rng.choice(firsts)}.{rng.randrange(256)}.{rng.randrange(256)}.0/24\n"
                           for _ in range(1_000_000))
        from mmdb_writer import MMDBWriter
        from netaddr import IPSet

        writer = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="DBIP-ASN-Lite (compat=GeoLite2-ASN)")
        for number in range(20000):
            network = f"{rng.choice(firsts)}.{rng.randrange(256)}.0.0/16"
            writer.insert_network(IPSet([network]), {"autonomous_system_number": 64512 + number % 1000,
                                                     "autonomous_system_organization": f"Bench Network {number}"})
        writer.to_db_file(asn)
    return {"file = /var/lib/pcc/lists/tor-exits.txt\n": f"file = {tor}\n",
            "file = /var/lib/pcc/lists/vpn-ipv4.txt\n": f"file = {vpn}\n",
            "asn_database =\n": f"asn_database = {asn}\n"}


def configurations(workdir: str) -> dict:
    city = city_database()
    return {
        "baseline": {},
        "metrics on": {"metrics_port =\n": f"metrics_port = {bench.free_port()}\n"},
        "City .mmdb, travel off": {"database =\n": f"database = {city}\n"},
        "travel on": {"database =\n": f"database = {city}\n",
                      "max_travel_speed_kmh =\n": "max_travel_speed_kmh = 1000\n"},
        "network lists, ASN": network_files(workdir),
    }


def server(name: str, changes: dict, url: str, workdir: str) -> bench.Server:
    port = bench.free_port()
    with open(os.path.join(bench.ROOT, "pcc.conf")) as shipped:
        text = shipped.read()
    changes = dict(changes, **{"port = 9999\n": f"port = {port}\n",
                               "dbcon = sqlite:////var/lib/pcc/pcc.sqlite3\n": f"dbcon = {url}\n",
                               "spool_file = /var/lib/pcc/spool.jsonl\n": f"spool_file = {workdir}/spool.jsonl\n"})
    for old, new in changes.items():
        if old not in text:
            raise SystemExit(f"pcc.conf has no line {old.strip()!r} to change")
        text = text.replace(old, new)
    config = os.path.join(workdir, "features.conf")
    with open(config, "w") as out:
        out.write(text)
    return bench.Server(name, [bench.sys.executable, os.path.join(bench.ROOT, "pcc.py"), "-d", "--stderr",
                               "--config", config], port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    requests = bench.build_requests(10000, 100000)
    workdir = tempfile.mkdtemp(prefix="pcc-features-")
    url = f"sqlite:///{workdir}/features.sqlite3"
    print(f"{'configuration':24} {'round':>5}  {'c=1 /s':>8} {'p99 ms':>7}  {'c=8 /s':>8} {'p99 ms':>7}  RSS MB")
    for round_number in range(1, args.rounds + 1):
        for name, changes in configurations(workdir).items():
            bench.reset_pcc_tables(url)
            with server(name, changes, url, workdir) as running:
                one = bench.run_load(running.port, requests, 1, args.duration)
                eight = bench.run_load(running.port, requests, 8, args.duration)
                print(f"{name:24} {round_number:>5}  {one['per_second']:8.0f} {one['p99']:7.2f}  "
                      f"{eight['per_second']:8.0f} {eight['p99']:7.2f}  {running.rss_mb():6.0f}", flush=True)


if __name__ == "__main__":
    main()
