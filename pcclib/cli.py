"""The command line: options, their checks, and which part of pcc each mode
runs.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Optional

from .common import __version__, log, utcnow
from .config import DEFAULT_CONFIG_PATH, GEOIP_DOWNLOAD_TIMEOUT, ConfigError, Settings, load_settings
from .health import HEALTH_UNKNOWN, check_health
from .logs import queue_logging, secrets_of, setup_audit, setup_logging

# What a mode needs is imported when that mode runs: an admin command does not
# pay for the daemon's modules (each run of pcc.py is a new process).


def build_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Postfix Country Control: a Postfix policy service that blocks accounts "
        "sending from more than X countries within Y days.",
        epilog="Postfix: smtpd_relay_restrictions = permit_mynetworks, "
        "check_policy_service inet:127.0.0.1:9999, permit_sasl_authenticated, reject_unauth_destination",
    )
    parser.add_argument("--config", default=DEFAULT_CONFIG_PATH, metavar="PATH",
                        help=f"configuration file (default {DEFAULT_CONFIG_PATH})")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages too")
    parser.add_argument("-V", "--version", action="version", version=f"pcc {__version__}",
                        help="print pcc's version and exit")
    parser.add_argument("--stderr", action="store_true",
                        help="log to standard error instead of syslog (mail facility); with an admin command, "
                        "its audit line goes to standard error too")
    commands = parser.add_mutually_exclusive_group(required=True)
    commands.add_argument("-d", "--daemon", action="store_true",
                          help="run the policy service (in the foreground, as supervisord expects)")
    commands.add_argument("--check-config", action="store_true",
                          help="read and validate the configuration, print a summary, and exit")
    commands.add_argument("--update-geoip", action="store_true",
                          help="download current GeoIP data ([geoip] update_url; blank = DB-IP Lite, no account "
                          "needed), check it, and install it as [geoip] database; the daemon picks it up")
    commands.add_argument("--update-lists", action="store_true",
                          help="download every [list <label>] network list from its url, check it, and install it "
                          "as its file; a list that fails keeps its old file; the daemon picks them up")
    commands.add_argument("--health", action="store_true",
                          help="ask the running daemon how it is, for Nagios/Icinga/monit/cron: one line, "
                          "exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN")
    commands.add_argument("-l", "--list", action="store_true",
                          help="list blocked accounts: login, blocked since, action, countries with last IP and time")
    commands.add_argument("-s", "--show", metavar="LOGIN",
                          help="show an account: state, countries in the window, how close to the threshold, blocks")
    commands.add_argument("-b", "--block", metavar="LOGIN",
                          help="block an account by hand (e.g. reported compromised); notifies the admins")
    commands.add_argument("-u", "--unblock", metavar="LOGIN",
                          help="unblock an account; its earlier countries stop counting; notifies the admins")
    commands.add_argument("-r", "--release", metavar="LOGIN",
                          help="unblock, and release the account's held mail from the Postfix hold queue")
    commands.add_argument("-e", "--erase", metavar="LOGIN",
                          help="unblock, and delete the account's held mail from the Postfix hold queue")
    commands.add_argument("-c", "--cleanup", metavar="DAYS", type=cleanup_days,
                          help="delete sightings older than DAYS days (needs the DELETE grant)")
    commands.add_argument("--allow", metavar="LOGIN",
                          help="grant a travel pass: with --country and --days, those countries do not count "
                          "for LOGIN until the pass expires (--days 0 ends them now); notifies the admins")
    commands.add_argument("--only-from", nargs="+", metavar=("LOGIN", "CC,CC"),
                          help="the countries LOGIN may send from (e.g. ES,PT): any other blocks it at once; "
                          "LOGIN alone shows them, '' clears them; notifies the admins")
    commands.add_argument("--rule", nargs="+", metavar=("SCOPE", "KEY=VALUE"),
                          help="rules for a domain (example.org) or a login (ceo@example.org): KEY=VALUE... sets "
                          "pcc.conf's keys for it (how_many_different_countries, in_how_much_time_in_days, action, "
                          "mode, ignorecountries, notice, the [limits] keys, limits.action), SCOPE alone shows "
                          "them, with --clear removes them; every daemon applies them within a second")
    commands.add_argument("--rules", action="store_true",
                          help="list every rule of every domain and login")
    commands.add_argument("--queue-helper", action="store_true",
                          help="as root, answer one request of an unprivileged daemon on standard input and output "
                          "(systemd's pcc-queue.socket runs it): hold a blocked account's queued mail")
    commands.add_argument("--replay", nargs="+", metavar="FILE",
                          help="replay Postfix logs (plain, .gz, or - for stdin; oldest first) through the "
                          "decision, against a throw-away in-memory database, and report whom pcc would "
                          "have blocked")
    parser.add_argument("--threshold", type=int, metavar="N",
                        help="with --replay: use this how_many_different_countries instead of the config's")
    parser.add_argument("--days", type=float, metavar="D",
                        help="with --replay: use this in_how_much_time_in_days instead of the config's; "
                        "with --allow: how long the travel pass lasts")
    parser.add_argument("--country", metavar="CC[,CC...]",
                        help="with --allow: the countries of the trip, ISO codes, e.g. FR,DE")
    parser.add_argument("--record", action="store_true",
                        help="with --replay: write the sightings (not the blocks) into the configured "
                        "database, so a new pcc starts knowing each account's recent countries")
    parser.add_argument("--connect", action="store_true",
                        help="with --check-config: connect to the database too, and say which server answered "
                        "and whether it takes writes (a standby does not)")
    parser.add_argument("--user", metavar="NAME",
                        help="with --check-config run as root: check as this user (default: the owner of pcc's "
                        "state files), the one the daemon runs as")
    parser.add_argument("--clear", action="store_true", help="with --rule SCOPE: remove all its rules")
    parser.add_argument("--json", action="store_true", help="with -l, -s, --rules or --replay: print JSON for scripts")
    parser.add_argument("--force", action="store_true",
                        help="with --update-geoip: install a file even though it moves many addresses to other "
                        "countries than the installed file, or is older (after a person looked at it); with -b, "
                        "-u, -r, -e, --allow, --only-from: take a login without a domain on a site whose logins "
                        "have one")
    parser.add_argument("--timeout", type=float, metavar="SECONDS",
                        help=f"with --update-geoip: give up a download after this long (default "
                        f"{GEOIP_DOWNLOAD_TIMEOUT:g})")
    return parser


def cleanup_days(text: str) -> float:
    """-c's DAYS; -c is not the configuration file (many tools' -c is)."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of days (-c is --cleanup DAYS; the "
                                         "configuration file goes with --config PATH)") from None


def main(argv: Optional[list] = None) -> int:
    """pcc.py's exit status: 0 done, 1 failed, 2 bad configuration; --health
    follows the monitoring-plugin conventions (0-3)."""
    parser = build_argument_parser()
    arguments = parser.parse_args(argv)
    check_arguments(parser, arguments)
    # Files pcc creates (SQLite, spool) are for its own user and group only.
    os.umask(0o027)
    if arguments.list or arguments.show or (arguments.replay and not arguments.record):
        # Output that only reads: `pcc.py --replay ... | head` ends quietly, as any Unix filter does.
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        settings = load_settings(arguments.config, geoip_file_needed=not arguments.update_geoip)
    except ConfigError as error:
        if arguments.health:
            print(f"PCC UNKNOWN - {error} | ")  # no perfdata to give
            return HEALTH_UNKNOWN
        print(f"pcc: {error}", file=sys.stderr)
        return 2
    return run_mode(settings, arguments)


def check_arguments(parser: argparse.ArgumentParser, arguments: argparse.Namespace) -> None:
    """Options that go with one mode only (parser.error exits 2 with usage)."""
    if arguments.allow:
        if arguments.country is None or arguments.days is None:
            parser.error("--allow needs --country and --days")
        if arguments.threshold is not None or arguments.record:
            parser.error("--threshold and --record go with --replay")
    elif arguments.country is not None:
        parser.error("--country goes with --allow")
    elif not arguments.replay and (arguments.threshold is not None or arguments.days is not None
                                   or arguments.record):
        parser.error("--threshold, --days and --record go with --replay")
    if (arguments.user or arguments.connect) and not arguments.check_config:
        parser.error("--user and --connect go with --check-config")
    if arguments.clear and not (arguments.rule and len(arguments.rule) == 1):
        parser.error("--clear goes with --rule SCOPE alone (it removes all of SCOPE's rules)")
    if arguments.only_from is not None and len(arguments.only_from) > 2:
        parser.error("--only-from takes a login and at most one list of countries (ES,PT; '' clears)")
    if arguments.timeout is not None and not ((arguments.update_geoip or arguments.update_lists)
                                              and arguments.timeout > 0):
        parser.error("--timeout takes a number of seconds above 0 and goes with --update-geoip or --update-lists")
    if arguments.force and not (arguments.update_geoip or arguments.block or arguments.unblock or arguments.release
                                or arguments.erase or arguments.allow or arguments.only_from):
        parser.error("--force goes with --update-geoip, or with -b, -u, -r, -e, --allow, --only-from "
                     "(a login without a domain)")


def run_mode(settings: Settings, arguments: argparse.Namespace) -> int:
    if arguments.health:
        status, line = check_health(settings)
        print(line)
        return status
    if arguments.update_geoip:
        from .update import UpdateError, update_asn, update_geoip

        timeout, status = arguments.timeout or GEOIP_DOWNLOAD_TIMEOUT, 0
        jobs = [("GeoIP", update_geoip)] if settings.geoip_database or not settings.asn_database else []
        if settings.asn_database:  # [networks] asn_database: its ASN Lite too
            jobs.append(("ASN", lambda *args: update_asn(*args[:3])))
        for what, update in jobs:
            try:
                print(update(settings, timeout, utcnow(), arguments.force))
            except UpdateError as error:
                print(f"pcc: {what} update failed, the installed file is unchanged: {error}", file=sys.stderr)
                status = 1
        return status
    if arguments.update_lists:
        from .update import update_lists

        return update_lists(settings, arguments.timeout or GEOIP_DOWNLOAD_TIMEOUT)
    if arguments.check_config:
        from .checkup import check_config

        return check_config(settings, arguments.user, arguments.connect)
    if arguments.daemon:
        from .daemon import run_daemon

        setup_logging(arguments.verbose, arguments.stderr, secrets_of(settings))
        if settings.processes > 1:
            from .workers import run_workers

            return run_workers(settings)  # each worker process logs through a queue of its own
        listener = queue_logging()
        try:
            return run_daemon(settings)
        finally:
            listener.stop()  # every line written before the exit
    if arguments.queue_helper:
        from .mailqueue import helper_peer, serve_helper

        setup_logging(arguments.verbose, arguments.stderr, secrets_of(settings))
        return serve_helper(settings.postfix_config_directory, sys.stdin.buffer, sys.stdout.buffer,
                            helper_peer(sys.stdin.fileno()))
    # The commands print what they did; their log shows only problems (or all, with -v).
    setup_logging(arguments.verbose, True, secrets_of(settings))
    log.setLevel(logging.DEBUG if arguments.verbose else logging.WARNING)
    setup_audit(arguments.stderr, secrets_of(settings))
    if arguments.replay:
        from .replay import run_replay

        return run_replay(settings, arguments)
    from .admin import run_admin_command

    return run_admin_command(settings, arguments)
