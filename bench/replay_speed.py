#!/usr/bin/env python3
"""How fast is `pcc.py --replay`?  Run by hand:  .venv/bin/python bench/replay_speed.py [LINES]

Writes a synthetic Postfix log (classic syslog stamps, a year change, 10,000
accounts, most from one or two IPs, some travellers, a few compromised
accounts hopping countries, and 40% other Postfix lines), then replays it
through pcc's real code path with the embedded GeoIP data and prints lines/s
and peak RSS."""
import logging
import datetime
import dataclasses
import datetime as dt
import os
import random
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from pcclib.common import UTC, log
from pcclib.config import load_settings
from pcclib.geoip import GeoIP
from pcclib.replay import replay_logs


def public_ip(rng):
    while True:
        first = rng.randint(1, 223)
        if first not in (10, 127, 100, 169, 172, 192, 198, 203):
            return f"{first}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"


def write_log(path, lines, accounts=10000, seed=7):
    rng = random.Random(seed)
    home = [[public_ip(rng) for _ in range(rng.choice((1, 1, 2)))] for _ in range(accounts)]
    moment = dt.datetime(2025, 12, 20, 0, 0, 0)
    step = dt.timedelta(days=20) / lines
    with open(path, "w") as out:
        for n in range(lines):
            moment += step
            stamp = moment.strftime("%b %e %H:%M:%S")
            if n % 5 in (1, 3):
                out.write(f"{stamp} mx postfix/qmgr[812]: 4F3A{n:08X}: from=<x@example.com>, size=1234, "
                          "nrcpt=1 (queue active)\n")
                continue
            account = rng.randrange(accounts)
            if account < 20:  # compromised: a new country every time
                ip = public_ip(rng)
            elif account < 500 and rng.random() < 0.05:  # travellers
                ip = public_ip(rng)
            else:
                ip = rng.choice(home[account])
            out.write(f"{stamp} mx postfix/submission/smtpd[{1000 + n % 50}]: 4F3A{n:08X}: "
                      f"client=unknown[{ip}], sasl_method=LOGIN, sasl_username=user{account}@example.com\n")


def main():
    lines = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    directory = tempfile.mkdtemp(prefix="pcc-replay-bench-")
    path = os.path.join(directory, "maillog")
    write_log(path, lines)
    config = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "pcc.conf")
    settings = dataclasses.replace(load_settings(config), dbcon="sqlite://")
    geoip = GeoIP(settings.geoip_database)
    log.setLevel(logging.WARNING)
    started = time.perf_counter()
    result = replay_logs([path], settings, geoip, today=datetime.datetime(2026, 1, 15, tzinfo=UTC))
    seconds = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{result.lines:,} lines ({result.submissions:,} submissions, {len(result.most_countries):,} "
          f"accounts) replayed in {seconds:.1f} s = {result.lines / seconds:,.0f} lines/s; "
          f"would block {len(result.store.blocks)}; peak RSS {peak_mb:.0f} MB")
    os.remove(path)


if __name__ == "__main__":
    main()
