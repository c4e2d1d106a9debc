#!/usr/bin/env python3
"""Where a decision's time goes, in the process: a request's lines to its
reply, as a connection's thread runs it (parse_request, answer_in_time with
the Watchdog standing by, the log record, format_reply, the metrics), on the
warm path and on the first sighting.  For each: CPU time of the answering
thread per decision (the best of --rounds rounds: the other threads, the
write-behind and the log writer, are not in it, nor is a busy machine's
waiting), wall time, and cProfile's function calls per decision (a count
does not drift with the machine: compare it between two versions).

Run by hand (not part of the test suite):

    .venv/bin/python bench/decision_profile.py                  # SQLite, 10,000 decisions each
    .venv/bin/python bench/decision_profile.py --top 30 --decisions 50000
    .venv/bin/python bench/decision_profile.py --limits         # [limits] on, none reached
    .venv/bin/python bench/decision_profile.py --metrics        # the metrics port's counters on

warm:        2,000 accounts that sent before, each from its home country
             alone (the poll, run between requests as often as its thread
             would, keeps their histories current: no database read, no
             commit; bench/traffic.py's sporadic workload sends 2% from
             elsewhere, each a new place committed before its answer).
first-sight: every request from an account never seen (a read, a commit
             before the answer, a read again).

The daemon's parts are built as the daemon builds them (daemon.build_parts),
on the shipped pcc.conf, in this process; the log records go through the
daemon's queue to its writer thread, into /dev/null; the answers go nowhere.
"""
import argparse
import configparser
import cProfile
import logging
import os
import pstats
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402
import traffic  # noqa: E402
from pcclib.common import utcnow  # noqa: E402
from pcclib.config import load_settings  # noqa: E402
from pcclib.daemon import build_parts  # noqa: E402
from pcclib.decision import decide  # noqa: E402
from pcclib.geoip import GeoIP  # noqa: E402
from pcclib.late import RequestTicket, answer_in_time  # noqa: E402
from pcclib.logs import queue_logging, setup_logging  # noqa: E402
from pcclib.memory import CHANGES_POLL_INTERVAL  # noqa: E402
from pcclib.metrics import Metrics  # noqa: E402
from pcclib.notify import Notifier  # noqa: E402
from pcclib.protocol import format_reply, parse_request  # noqa: E402
from pcclib.storage import Store  # noqa: E402

BATCH = 20  # requests answered between two looks at the clock: the poll runs as often as the daemon's


def daemon_parts(limits: bool, metrics: bool):
    """A daemon's parts on a fresh SQLite file, the blocked list loaded, the
    write-behind running; the poll is run by the caller (answer_all)."""
    workdir = tempfile.mkdtemp(prefix="pcc-profile-")
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(os.path.join(bench.ROOT, "pcc.conf"))
    parser["db"]["dbcon"] = f"sqlite:///{workdir}/pcc.sqlite3"
    parser["db"]["spool_file"] = f"{workdir}/spool.jsonl"
    parser["postfix"]["hold_queued"] = "no"
    if limits:
        for key in ("messages_per_hour", "messages_per_day", "recipients_per_hour", "recipients_per_day"):
            parser["limits"][key] = "10000000"
    path = os.path.join(workdir, "pcc.conf")
    with open(path, "w") as config:
        parser.write(config)
    settings = load_settings(path)
    parts = build_parts(settings, Store(settings.dbcon), GeoIP(settings.geoip_database), Notifier(settings),
                        metrics=Metrics(enabled=metrics))
    parts.database.ensure()
    parts.upkeep.load_blocked_list()
    parts.database.sightings.start()
    return parts


def answer_all(parts, requests: list) -> tuple:
    """(thread CPU seconds, wall seconds) to answer `requests` (each a list of
    lines) as a connection's thread does."""
    service, metrics, poll = parts.service, parts.service.metrics, parts.upkeep.poll_changes
    cpu = wall = 0.0
    polled = float("-inf")
    for start in range(0, len(requests), BATCH):
        if time.monotonic() - polled >= CHANGES_POLL_INTERVAL:
            poll()  # the poll's own thread in the daemon: not counted
            polled = time.monotonic()
        began_cpu, began = time.thread_time(), time.perf_counter()
        for lines in requests[start:start + BATCH]:
            request_began = time.monotonic()
            action = answer_in_time(service, RequestTicket(parse_request(lines)), _nowhere)
            reply = format_reply(action)
            metrics.answered(reply, time.monotonic() - request_began)
        cpu += time.thread_time() - began_cpu
        wall += time.perf_counter() - began
    return cpu, wall


def _nowhere(action: str) -> None:
    """A late answer's delivery (none is expected here)."""


def profile(label: str, fresh_parts, rounds: int, top: int) -> None:
    """The best of `rounds` timed rounds, each on fresh parts (fresh_parts(n):
    the parts, and the requests of round n), then one round under cProfile."""
    best_cpu = best_wall = float("inf")
    for n in range(rounds):
        parts, batch = fresh_parts(n)
        cpu, wall = answer_all(parts, batch)
        best_cpu, best_wall = min(best_cpu, cpu / len(batch)), min(best_wall, wall / len(batch))
    print(f"\n{label}: {best_cpu * 1e6:.1f} us a decision (CPU of the answering thread, best of {rounds}), "
          f"{best_wall * 1e6:.1f} us wall; {len(batch):,} decisions a round")
    parts, batch = fresh_parts(rounds)
    profiler = cProfile.Profile()
    profiler.enable()
    answer_all(parts, batch)
    profiler.disable()
    stats = pstats.Stats(profiler)
    calls = sum(entry[1] for entry in stats.stats.values())  # type: ignore[attr-defined]
    print(f"{label}: {calls / len(batch):.0f} function calls a decision")
    stats.sort_stats("tottime").print_stats(top)


def stages(parts, requests: list, rounds: int) -> None:
    """The warm path's stages one at a time, each over every request (the
    poll run before each; CPU of this thread, the best of `rounds`), and what
    the whole path costs beyond their sum (the lane, the ticket and the
    Watchdog, recording)."""
    service = parts.service
    parsed = [parse_request(lines) for lines in requests]
    located = [request.with_country(service.geoip.country(request.client_ip),
                                    service.networks.lookup(request.client_ip)) for request in parsed]
    now = utcnow()
    parts.upkeep.poll_changes()
    histories = [service.memory.current(request.login) for request in located]
    if any(history is None for history in histories):
        print("stages: some accounts are not in memory; run with more --decisions")
        return
    judged = [service.judged(history, request, now) for history, request in zip(histories, located)]
    decisions = [decide(request, history, service.settings_of(request.login), now)
                 for request, history in zip(located, judged)]
    replies = [format_reply(decision.action) for decision in decisions]
    steps = [
        ("parse_request", lambda: [parse_request(lines) for lines in requests]),
        ("GeoIP and network lists", lambda: [request.with_country(service.geoip.country(request.client_ip),
                                                                  service.networks.lookup(request.client_ip))
                                             for request in parsed]),
        ("history from memory", lambda: [service.judged(service.memory.current(request.login), request, now)
                                         for request in located]),
        ("decide", lambda: [decide(request, history, service.settings_of(request.login), now)
                            for request, history in zip(located, judged)]),
        ("remember", lambda: [service.remember(request.login, history, decision, now)
                              for request, history, decision in zip(located, histories, decisions)]),
        ("log line", lambda: [service._log_decision(request, decision)
                              for request, decision in zip(located, decisions)]),
        ("reply and metrics", lambda: [(format_reply(decision.action), service.metrics.answered(reply, 0.001))
                                       for decision, reply in zip(decisions, replies)]),
        ("whole path", lambda: answer_all(parts, requests)),
    ]
    print(f"\nwarm path by stage (CPU of this thread a request, best of {rounds}):")
    costs = {}
    for label, run in steps:
        best = float("inf")
        for _round in range(rounds):
            parts.upkeep.poll_changes()
            began = time.thread_time()
            run()
            best = min(best, time.thread_time() - began)
        costs[label] = best / len(requests) * 1e6
        print(f"  {label:26s} {costs[label]:6.1f} us")
    rest = costs["whole path"] - sum(cost for label, cost in costs.items() if label != "whole path")
    print(f"  {'the rest (lane, ticket, Watchdog, record)':26s} {rest:6.1f} us")


def lines_of(raw: list) -> list:
    """Each request's lines as the policy port reads them."""
    return [request.decode().strip().splitlines() for request in raw]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decisions", type=int, default=10000, help="decisions a round, of each kind")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of each kind; the best counts")
    parser.add_argument("--top", type=int, default=15, help="entries of each profile shown")
    parser.add_argument("--limits", action="store_true", help="[limits] on (none reached)")
    parser.add_argument("--metrics", action="store_true", help="the metrics port's counters on")
    args = parser.parse_args()
    setup_logging(verbose=False, to_stderr=True)
    for handler in logging.getLogger("pcc").handlers:
        handler.setStream(open(os.devnull, "w"))  # type: ignore[attr-defined]
    queue_logging()
    pools = bench.country_pools(GeoIP(""))
    n = args.decisions

    warm_parts = daemon_parts(args.limits, args.metrics)
    warm = lines_of(traffic.sporadic_requests(pools, 2000, (args.rounds + 2) * n, elsewhere=0))
    answer_all(warm_parts, warm[:n])  # every account seen once or more
    profile("warm", lambda k: (warm_parts, warm[(k + 1) * n:(k + 2) * n]), args.rounds, args.top)
    stages(warm_parts, warm[n:2 * n], args.rounds)

    fresh = lines_of(traffic.first_sight_requests(pools, (args.rounds + 1) * n, offset=0))
    profile("first-sight", lambda k: (daemon_parts(args.limits, args.metrics), fresh[k * n:(k + 1) * n]),
            args.rounds, args.top)


if __name__ == "__main__":
    main()
