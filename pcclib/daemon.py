"""`pcc.py -d`: start (database, ports, helper threads), reload on SIGHUP,
housekeeping (a replaced GeoIP file, an outage that lasts), and an orderly
stop.
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import signal
import stat
import threading
import time
from typing import Optional

from sqlalchemy import exc as sa_exc

from .common import (DAEMON_SIGNALS, __version__, file_signature, first_line, log, start_thread, symlink_refusal,
                     user_name)
from .config import ConfigError, Settings, load_settings
from .dovecot import DovecotPolicyServer
from .geoip import GeoIP, warn_about_geoip
from .networks import Networks
from .logs import MaskingFormatter, refuse_to_start, secrets_of
from .mailqueue import PostfixQueue
from .board import HEALTH, METRICS, WorkerSeat, whole_daemon_metrics
from .database import Database
from .memory import CHANGES_TRIM_INTERVAL, AccountMemory
from .metrics import Metrics
from .notify import Notifier
from .outage import OutageJournal
from .ports import connection_caps
from .report import SelfReport
from .respond import Responder
from .server import PolicyListener, PolicyServer, PolicySocketServer
from .service import PolicyService
from .storage import Store, permanent_database_fault, safe_url, sqlite_path
from .upkeep import MemoryUpkeep

# How often pcc looks whether the GeoIP file was replaced (a stat() call).
GEOIP_CHECK_INTERVAL = 5.0
# How soon the accept loop notices SIGTERM (seconds): a stop, a restart by
# supervisord or systemd, waits this long at most before the in-flight
# requests are finished.
STOP_POLL_INTERVAL = 0.05


@dataclasses.dataclass(frozen=True)
class Parts:
    """A daemon's parts, built together by build_parts()."""

    service: PolicyService  # the request path
    database: Database  # the Store, the outage, the spool, the write-behind, the probe
    upkeep: MemoryUpkeep  # the blocked list and the poll of changes
    report: SelfReport  # the metrics' snapshot and --health's words


def build_parts(settings: Settings, store: Store, geoip: GeoIP, notifier: Notifier,
                journal: Optional[OutageJournal] = None, networks: Optional[Networks] = None,
                metrics: Optional[Metrics] = None) -> Parts:
    """The one place a daemon's parts are made and wired, each whole when made
    (the daemon, --replay and the tests build theirs here)."""
    metrics = metrics or Metrics()
    journal = journal or OutageJournal()
    memory = AccountMemory(blocked_file=f"{journal.spool_path}.blocked" if journal.spool_path else "")
    # The responder names a client's network with the lists in force: the
    # service's, which a reload replaces.
    responder = Responder(settings, notifier, metrics.responded, lambda ip: service.network_of(ip))
    database = Database(settings, store, journal, memory, metrics, responder)
    responder.notice_for = lambda login: database.rules.notice_for(login)
    service = PolicyService(settings, database, geoip, networks or Networks(settings), responder, metrics)
    return Parts(service, database, MemoryUpkeep(memory, database, lambda: service.settings), SelfReport(service))


def run_daemon(settings: Settings, seat: Optional[WorkerSeat] = None) -> int:
    """The daemon, or (seat) one worker process of a daemon of several
    ([server] processes, workers.py): the same, on the sockets its master bound."""
    refusal = files_refused(settings, (seat.spool_path(settings.spool_file),) if seat else ())
    if not refusal:
        settings, refusal = queue_holding(settings)
    if refusal:
        refuse_to_start(f"pcc: {refusal}")
        return 1
    _warn_if_readable(settings)
    _raise_file_limit(settings.max_connections + 256)
    threading.stack_size(512 * 1024)  # thousands of idle Postfix connections stay cheap
    geoip = GeoIP(settings.geoip_database)
    warn_about_geoip(geoip)
    networks = Networks(settings)
    metrics = Metrics(enabled=settings.metrics_port is not None)
    journal = OutageJournal(seat.spool_path(settings.spool_file) if seat else settings.spool_file)
    if seat is None or seat.index == 0:
        journal.adopt_spools_beyond(seat.processes if seat else 1)
    parts = build_parts(settings, Store(settings.dbcon), geoip, Notifier(settings), journal, networks, metrics)
    service, database = parts.service, parts.database
    metrics.report_from(parts.report.state, parts.report.count_blocked)
    try:
        database.ensure()
        database.store.prove_writable()
    except sa_exc.SQLAlchemyError as error:
        fault = permanent_database_fault(settings, error)
        if fault is not None:  # it would protect nobody: refuse to run
            refuse_to_start(f"pcc: {fault}")
            return 1
        database.unreachable_at_start(settings.dbcon, first_line(error))
    parts.upkeep.load_blocked_list()  # whole before a port opens
    # A signal that comes as soon as a port is open (a reload, a stop) waits
    # until its handler is in place: by default SIGHUP would end the daemon.
    signal.pthread_sigmask(signal.SIG_BLOCK, DAEMON_SIGNALS)
    listeners = open_listeners(settings, service, parts.report, seat)
    if listeners is None:
        return 1
    # server: the listener served in this thread (the port; the socket
    # when there is no port); policy_socket: the socket beside the port.
    server, dovecot, policy_socket = listeners
    parts.report.ports = tuple(port for port in (server, policy_socket, dovecot) if port is not None)
    start_thread(housekeeping, "pcc-housekeeping", parts, server.stopping)
    database.sightings.start()
    parts.upkeep.start(server.stopping)
    start_thread(database.probe_while_failing, "pcc-probe", server.stopping)
    if seat is not None:
        start_board(seat, parts, server.stopping)

    def on_stop(_signum, _frame):
        if not server.stopping.is_set():
            server.stopping.set()
            start_thread(server.shutdown, "pcc-stop")
            if dovecot is not None:
                start_thread(dovecot.shutdown, "pcc-stop-dovecot")
            if policy_socket is not None:
                start_thread(policy_socket.shutdown, "pcc-stop-socket")

    def on_reload(_signum, _frame):
        start_thread(reload_settings, "pcc-reload", server, policy_socket)

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_reload)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, DAEMON_SIGNALS)  # the helper threads keep them blocked
    extra_ports = [f"metrics on port {settings.metrics_port}"] if settings.metrics_port else []
    if settings.dovecot_policy_port:
        extra_ports.append(f"Dovecot auth policy on port {settings.dovecot_policy_port}, logins "
                           f"{'counted' if settings.count_logins else 'checked against the blocked list only'}")
    if seat is not None:
        extra_ports.append(f"worker process {seat.index + 1} of {seat.processes}")
    log.info("pcc %s listening on %s%s; database %s; GeoIP %s; %s", __version__, listening_on(settings),
             f" ({'; '.join(extra_ports)})" if extra_ports else "",
             safe_url(settings.dbcon), geoip.description, describe_rules(settings))
    log.info("%s", networks.describe())
    server.serve_forever(poll_interval=STOP_POLL_INTERVAL)
    # Stopped: accept nothing new, answer the requests in flight, then exit.
    for listener in (server, policy_socket):
        if listener is not None:
            listener.stop_listening()
    if not server.in_flight.wait_until_none(timeout=20):
        log.warning("stopping with requests still unanswered after 20 s")
    database.sightings.stop()  # the sightings still in memory are written
    unwritten = database.sightings.waiting()
    if unwritten:
        log.error("stopping with %d sightings the database did not take (they are not counted)", unwritten)
    log.info("pcc stopped")
    database.store.dispose()
    return 0


def queue_holding(settings: Settings) -> tuple:
    """(the settings to run with, a refusal or ""): holding a blocked account's
    queued mail needs root, the queue helper or the sudoers lines of
    docs/operations.md.  Asked for (hold_queued
    = yes) without them, pcc refuses to start; on by default (action = HOLD),
    it starts without it, saying so."""
    if not settings.holds_queued_mail or settings.monitoring:
        return settings, ""
    problem = PostfixQueue(settings.postfix_config_directory, settings.queue_helper).check_access()
    if not problem:
        return settings, ""
    if settings.hold_queued == "YES":
        return settings, problem
    log.warning("%s; until then a block does not hold the mail the account had queued (or set [postfix] "
                "hold_queued = no)", problem)
    return dataclasses.replace(settings, hold_queued="NO"), ""


def files_refused(settings: Settings, spools: tuple = ()) -> str:
    """A symbolic link where pcc writes a file of its own, or a file or
    directory of its state this user cannot write (most often left by a run
    as root, the quick start's): one line with the command that fixes it.
    spools: the spool files to look at (the worker processes'), else [db] spool_file."""
    database = sqlite_path(settings.dbcon)
    state = [(database, "the SQLite database"), (database and database + "-wal", "the SQLite database"),
             (database and database + "-shm", "the SQLite database")]
    for spool in spools or (settings.spool_file,):
        state += [(spool, "[db] spool_file"), (spool and spool + ".blocked", "the blocked list's copy")]
    for path, what in state:
        refusal = path and symlink_refusal(path, what)
        if refusal:
            return refusal
    for path, _what in state:
        refusal = path and not_writable(path)
        if refusal:
            return refusal
    return ""


def not_writable(path: str) -> str:
    """Why this user cannot write `path` (or the directory it goes in), with
    the fix, or ""."""
    import grp

    directory = os.path.dirname(os.path.abspath(path))
    for name, kind, needed in ((path, stat.S_ISREG, os.R_OK | os.W_OK),
                               (directory, stat.S_ISDIR, os.R_OK | os.W_OK | os.X_OK)):
        try:
            status = os.stat(name)
        except OSError:
            continue  # not there (yet), or not reachable: the directory's turn says why
        if not kind(status.st_mode) or status.st_uid == os.geteuid() or os.access(name, needed):
            continue  # another problem than another user's file: the code that opens it says which
        user, group, owner = user_name(os.geteuid()), grp.getgrgid(os.getegid()).gr_name, user_name(status.st_uid)
        return (f"{name} is owned by {owner} and not writable by user {user} (left by a run as {owner}?): "
                f"chown -R {user}:{group} {shlex.quote(directory)}")
    return ""


def open_listeners(settings: Settings, service: PolicyService, report: SelfReport,
                   seat: Optional[WorkerSeat] = None) -> Optional[tuple]:
    """(the policy server, the Dovecot server or None, the policy socket or
    None), or None when one cannot be opened (logged).  The policy port
    opens last: a daemon that exits for want of another port never accepted
    a connection from Postfix.  A worker process (seat) serves the sockets
    its master bound, and speaks for the whole daemon on --health and /metrics."""
    adopted = seat.sockets if seat else {}
    if seat is not None:
        report.board = seat.board
    if settings.metrics_port is not None:
        try:
            service.metrics.serve(settings.host, settings.metrics_port, lambda: service.settings.allowed_clients,
                                  connection_caps(settings.max_connections)["metrics"], adopted.get("metrics"),
                                  (lambda: whole_daemon_metrics(seat.board)) if seat else None)
        except OSError as error:
            log.error("cannot serve metrics on %s:%s: %s", settings.host, settings.metrics_port,
                      error.strerror or error)
            return None
    dovecot = None
    if settings.dovecot_policy_port is not None:
        try:
            dovecot = DovecotPolicyServer(settings, service, adopted.get("dovecot"))
        except OSError as error:
            log.error("cannot listen for Dovecot on %s:%s: %s", settings.host, settings.dovecot_policy_port,
                      error.strerror or error)
            return None
    policy_socket, listeners = None, bool(settings.socket) + bool(settings.port)
    server: Optional[PolicyListener] = None
    try:
        if settings.socket:
            policy_socket = PolicySocketServer(settings, service, report, listeners)
        if not settings.port:
            server, policy_socket = policy_socket, None  # the socket alone, served in the main thread
        else:
            server = PolicyServer(settings, service, report, listeners, sibling=policy_socket,
                                  adopt=adopted.get("policy"))
    except OSError as error:
        where = settings.socket if settings.socket and policy_socket is None else f"{settings.host}:{settings.port}"
        log.error("cannot listen on %s: %s", where, error.strerror or error)
        if dovecot is not None:
            dovecot.server_close()
        if policy_socket is not None:
            policy_socket.remove()
        return None
    if dovecot is not None:
        start_thread(dovecot.serve_forever, "pcc-dovecot")
    if policy_socket is not None:
        start_thread(policy_socket.serve_forever, "pcc-policy-socket", STOP_POLL_INTERVAL)
    return server, dovecot, policy_socket


def listening_on(settings: Settings) -> str:
    """Where Postfix reaches the daemon, for its first log line."""
    port = f"{settings.host} port {settings.port}" if settings.port else ""
    return " and ".join(where for where in (port, settings.socket and f"socket {settings.socket}") if where)


def reload_settings(server: PolicyListener, policy_socket: Optional[PolicySocketServer] = None) -> None:
    """SIGHUP: re-read the configuration and the GeoIP data.  Open connections
    stay; a broken new configuration is refused and the old one stays in force."""
    old = server.settings
    try:
        new = load_settings(old.config_path)
        geoip = GeoIP(new.geoip_database)
        networks = Networks(new, server.service.networks)
    except (ConfigError, OSError, ValueError, RuntimeError) as error:  # maxminddb: InvalidDatabaseError
        log.error("reload refused, the running configuration stays in force: %s", error)
        return
    service = server.service
    if (new.host, new.port) != (old.host, old.port):
        log.warning("reload: a new host/port needs a restart; still listening on %s port %d", old.host, old.port)
        new = dataclasses.replace(new, host=old.host, port=old.port)
    if _socket_of(new) != _socket_of(old):
        log.warning("reload: a new [server] socket, socket_owner, socket_group or socket_mode needs a restart; "
                    "the socket stays %s", old.socket or "off")
        new = dataclasses.replace(new, socket=old.socket, socket_owner=old.socket_owner,
                                  socket_group=old.socket_group, socket_mode=old.socket_mode)
    if new.spool_file != old.spool_file:
        log.warning("reload: a new spool_file needs a restart; still using %s", old.spool_file or "memory")
    if new.metrics_port != old.metrics_port:
        log.warning("reload: a new metrics_port needs a restart; metrics stay %s",
                    f"on port {old.metrics_port}" if old.metrics_port else "off")
    if new.processes != old.processes:
        log.warning("reload: a new [server] processes needs a restart; still %d", old.processes)
        new = dataclasses.replace(new, processes=old.processes)
    if new.dovecot_policy_port != old.dovecot_policy_port:
        log.warning("reload: a new [dovecot] policy_port needs a restart; the Dovecot port stays %s",
                    f"{old.dovecot_policy_port}" if old.dovecot_policy_port else "off")
    MaskingFormatter.secrets |= set(secrets_of(new))
    new, queue_refusal = queue_holding(new)
    if queue_refusal:
        log.error("reload refused, the running configuration stays in force: %s", queue_refusal)
        return
    reconfigure(service, new, geoip, networks)  # the Dovecot and metrics ports read allowed_clients from it
    server.settings = new
    if policy_socket is not None:
        policy_socket.settings = new
    database = safe_url(new.dbcon) + ("" if new.dbcon == old.dbcon else f" (was {safe_url(old.dbcon)})")
    log.info("configuration %s reloaded; database %s; GeoIP %s; %s; %s", new.config_path, database,
             geoip.description, describe_rules(new), networks.describe())
    warn_about_geoip(geoip)


def start_board(seat: WorkerSeat, parts: Parts, stopping: threading.Event) -> None:
    """A worker's threads that leave its --health words and its metrics on
    the board when another process asks (one each: the metrics may wait for
    the database, the health never); the master gone, the worker stops."""
    metrics = parts.service.metrics

    def orphaned() -> None:
        log.error("the master process is gone (killed?); this worker stops")
        os.kill(os.getpid(), signal.SIGTERM)

    seat.board.now_serving(seat.index)
    start_thread(seat.publish_when_asked, "pcc-board-health", HEALTH,
                 lambda: {"health": parts.report.own_health_report()}, stopping, orphaned)
    if metrics.enabled:
        start_thread(seat.publish_when_asked, "pcc-board-metrics", METRICS, lambda: {"metrics": metrics.text()},
                     stopping)


def _socket_of(settings: Settings) -> tuple:
    return settings.socket, settings.socket_owner, settings.socket_group, settings.socket_mode


def reconfigure(service: PolicyService, settings: Settings, geoip: GeoIP, networks: Networks) -> None:
    """A reload: new settings, GeoIP data and lists for the next request, and
    a new database when [db] dbcon changed (what the old one was to get, it gets)."""
    old = service.settings
    if settings.dbcon != old.dbcon:
        service.database.replace_store(Store(settings.dbcon))
    if _rule_of(settings) != _rule_of(old):
        # The histories in memory were read for the old window; the next
        # request of each account reads its own again (the accounts known
        # to be blocked stay so).
        service.memory.histories.clear()
    service.geoip = geoip
    service.networks = networks
    service.responder.notifier.settings = settings
    service.responder.reconfigure(settings)
    service.database.outage.settings = settings
    service.settings = settings


def _rule_of(settings: Settings) -> tuple:
    """What a reload may change of the rule and its lists."""
    return (settings.how_many_different_countries, settings.in_how_much_time_in_days, settings.ignorecountries,
            settings.whitelisted, settings.whitelistedips, settings.domains, settings.mode, settings.action,
            settings.max_travel_speed_kmh, settings.travel_accuracy_radius_km, settings.impossible_travel_action,
            settings.count_logins, settings.network_lists)


def describe_rules(settings: Settings) -> str:
    """The rules in force, in one line for the log and --check-config."""
    text = (f"rule: more than {settings.how_many_different_countries} countries in "
            f"{settings.in_how_much_time_in_days:g} days -> {settings.action}")
    if settings.max_travel_speed_kmh is not None:
        text += (f"; impossible travel: faster than {settings.max_travel_speed_kmh:g} km/h -> "
                 f"{settings.impossible_travel_action.lower()}")
    if settings.network_lists:
        text += "; network lists: " + ", ".join(f"{network_list.label} -> {network_list.action.lower()}"
                                                for network_list in settings.network_lists)
    if settings.monitoring:
        text += "; MONITOR MODE: new blocks are only recorded and notified, mail flows"
    return text


def housekeeping(parts: Parts, stopping: threading.Event) -> None:
    """Every few seconds: use a replaced GeoIP file without a restart
    (geoipupdate renames a new file over the old one; a file that cannot be
    used is logged once and the data in use stays), say again that the
    database is failing, if it still is; every minute, trim the change log."""
    trimmed = time.monotonic()
    while not stopping.wait(GEOIP_CHECK_INTERVAL):
        reload_geoip_if_replaced(parts.service)
        reload_lists_if_replaced(parts.service)
        parts.database.report_outage()
        if time.monotonic() - trimmed >= CHANGES_TRIM_INTERVAL:
            trimmed = time.monotonic()
            parts.upkeep.trim_changes()


def reload_geoip_if_replaced(service: PolicyService) -> bool:
    current = service.geoip
    if not current.changed_on_disk():
        return False
    signature = file_signature(current.path)
    try:
        fresh = GeoIP(current.path)
        if service.settings.max_travel_speed_kmh is not None and not fresh.has_places:
            raise ValueError("it has no places (a Country database), and max_travel_speed_kmh needs them")
    except Exception as error:  # a half-written or foreign file must not stop the daemon
        current.file_signature = signature  # say it once, until the file changes again
        log.error("GeoIP file %s changed but cannot be used; still using the data loaded before: %s",
                  current.path, error)
        return False
    service.geoip = fresh
    log.warning("GeoIP file %s was replaced; now using %s", fresh.path, fresh.description)
    warn_about_geoip(fresh)
    return True


def reload_lists_if_replaced(service: PolicyService) -> bool:
    """A network list or the ASN file that --update-lists (or anything) wrote
    anew is used from the next request on; a file that fails its checks is
    logged (networks.load_list) and the ranges in use stay."""
    current = service.networks
    if not current.changed_on_disk():
        return False
    fresh = Networks(service.settings, current)
    service.networks = fresh
    log.info("network files changed; %s", fresh.describe())
    return True


def _warn_if_readable(settings: Settings) -> None:
    try:
        mode = os.stat(settings.config_path).st_mode
    except OSError:
        return
    if secrets_of(settings) and mode & 0o004:
        log.warning("%s holds a secret (a password, a key, [dovecot] api_header or a URL's credentials) and is "
                    "readable by every user: chown root:pcc %s; chmod 640 %s", settings.config_path,
                    settings.config_path, settings.config_path)


def _raise_file_limit(wanted: int) -> None:
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, ValueError, OSError) as error:
        log.warning("cannot raise the open files limit to %d: %s", wanted, error)
