"""`pcc.py -d` with [server] processes > 1: a master process binds the ports,
one socket per worker process on each (SO_REUSEPORT: the kernel spreads the
connections), forks the workers, passes them SIGHUP and SIGTERM, and starts
again one that died.  Each worker is a whole daemon (daemon.run_daemon) on
the one database, as several pcc hosts are: blocked stays blocked, a burst
split between them is held whole.  The master never touches the database
and answers nothing itself; it holds the sockets, so the connections that
wait for a worker being restarted wait in its socket's queue, not refused.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import socket
import time
from typing import Optional

from .board import WorkerBoard, WorkerSeat
from .common import DAEMON_SIGNALS, __version__, log
from .config import ConfigError, Settings, load_settings
from .daemon import files_refused, listening_on, run_daemon
from .logs import queue_logging, refuse_to_start
from .outage import worker_spool

# How often the master looks after its workers (seconds).
MASTER_TICK = 0.1
# A worker that ended is started again after this long, doubled for each
# one that ends within RESTART_STABLE of its start, up to RESTART_DELAY_MOST.
RESTART_DELAY = 1.0
RESTART_DELAY_MOST = 30.0
RESTART_STABLE = 30.0
# A stop gives the workers this long (their own wait for requests in flight
# is 20 s), then kills what is left: within the 30 s supervisord and systemd
# give the master (stopwaitsecs, TimeoutStopSec).
STOP_GRACE = 25.0
# The listen() backlog the master gives each socket until its worker takes
# it over (the worker sets its port's own).
MASTER_BACKLOG = 128
# What a reload cannot change without a restart of the whole daemon (the
# workers keep the same and say so in their log).
RESTART_FIELDS = ("host", "port", "socket", "socket_owner", "socket_group", "socket_mode", "spool_file",
                  "metrics_port", "dovecot_policy_port", "processes")


def run_workers(settings: Settings) -> int:
    """The master: 0 after a stop, 1 when the daemon could not start."""
    refusal = files_refused(settings, tuple(worker_spool(settings.spool_file, index)
                                            for index in range(settings.processes)))
    if refusal:
        refuse_to_start(f"pcc: {refusal}")
        return 1
    try:
        sockets = bind_ports(settings)
    except OSError as error:
        log.error("cannot listen on %s: %s", getattr(error, "where", settings.host), error.strerror or error)
        return 1
    return Master(settings, sockets, WorkerBoard(settings.processes)).run()


def bind_ports(settings: Settings) -> list:
    """For each worker, {port name: a listening socket} for the policy,
    Dovecot and metrics ports, SO_REUSEPORT.  A port another process
    listens on is refused, as a daemon of one process is (a second pcc
    started by mistake must not share the port unseen)."""
    ports = {"policy": settings.port, "dovecot": settings.dovecot_policy_port, "metrics": settings.metrics_port}
    seats: list = [{} for _index in range(settings.processes)]
    try:
        for name, port in ports.items():
            if not port:
                continue
            family, address = _address_of(settings.host, port)
            try:
                _refuse_if_taken(family, address)
                for seat in seats:
                    seat[name] = _shared_socket(family, address)
            except OSError as error:
                error.where = f"{settings.host}:{port}"  # type: ignore[attr-defined]
                raise
    except OSError:
        close_sockets(seats)
        raise
    return seats


def _address_of(host: str, port: int) -> tuple:
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    return info[0], info[4][:2]


def _refuse_if_taken(family: int, address: tuple) -> None:
    """EADDRINUSE when anything listens on `address` already (a bind without
    SO_REUSEPORT fails beside any listener, SO_REUSEPORT or not)."""
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a stopped pcc's TIME_WAIT is no owner
        probe.bind(address)


def _shared_socket(family: int, address: tuple) -> socket.socket:
    shared = socket.socket(family, socket.SOCK_STREAM)
    try:
        shared.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        shared.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        shared.bind(address)
        shared.listen(MASTER_BACKLOG)
    except OSError:
        shared.close()
        raise
    return shared


def close_sockets(seats: list) -> None:
    for seat in seats:
        for shared in seat.values():
            shared.close()


@dataclasses.dataclass
class _Worker:
    pid: int
    started: float


class Master:
    """The workers' parent: starts them, passes signals on, starts again one
    that ended, and stops them all on SIGTERM or SIGINT."""

    def __init__(self, settings: Settings, sockets: list, board: WorkerBoard):
        self.settings = settings
        self.sockets = sockets
        self.board = board
        self.workers: dict = {}  # index -> _Worker
        self.restart_at: dict = {}  # index -> when it starts again (monotonic)
        self.delay = [RESTART_DELAY] * settings.processes
        self.stop_wanted = False
        self.reload_wanted = False
        self.all_served = False  # every worker has opened its ports once: the daemon has started

    def run(self) -> int:
        signal.pthread_sigmask(signal.SIG_BLOCK, DAEMON_SIGNALS)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_reload)
        self.start(0)  # alone first: it makes the tables of a new database, the others find them
        waiting = list(range(1, self.settings.processes))
        signal.pthread_sigmask(signal.SIG_UNBLOCK, DAEMON_SIGNALS)
        log.info("pcc %s master (pid %d): %d worker processes on %s", __version__, os.getpid(),
                 self.settings.processes, listening_on(self.settings))
        status = 0
        while not self.stop_wanted:
            time.sleep(MASTER_TICK)
            if self.reload_wanted:
                self.reload_wanted = False
                self.reload()
            if not self.reap():
                status = 1
                break
            self.restart_due()
            if waiting and self.board.serving(0):
                for index in waiting:
                    self.start(index)
                waiting = []
            if not self.all_served and not waiting and all(self.board.serving(index) for index in self.workers) \
                    and len(self.workers) == self.settings.processes:
                self.all_served = True
        self.stop()
        return status

    def _on_stop(self, _signum, _frame) -> None:
        self.stop_wanted = True

    def _on_reload(self, _signum, _frame) -> None:
        self.reload_wanted = True

    def start(self, index: int) -> None:
        """Fork worker `index`; it serves its sockets until told to stop."""
        with_signals = signal.pthread_sigmask(signal.SIG_BLOCK, DAEMON_SIGNALS)  # until its own handlers
        try:
            pid = os.fork()
            if pid == 0:
                os._exit(self._worker(index))
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, with_signals)
        self.workers[index] = _Worker(pid, time.monotonic())

    def _worker(self, index: int) -> int:
        """In the child: a daemon on this worker's sockets."""
        status = 1
        try:
            for signum in DAEMON_SIGNALS:
                signal.signal(signum, signal.SIG_DFL)  # the master's handlers are not this process's
            for other, seat in enumerate(self.sockets):
                if other != index:
                    for shared in seat.values():
                        shared.close()
            self.board.seat(index, os.getpid())
            listener = queue_logging()
            try:
                status = run_daemon(self.settings, WorkerSeat(index, self.board, os.getppid(), self.sockets[index]))
            finally:
                listener.stop()
        except BaseException:  # never back into the master's loop in a child
            log.exception("worker process %d: internal error", index + 1)
        return status

    def reap(self) -> bool:
        """Collect the workers that ended; False when one ended without ever
        serving while the daemon was starting (its log says why: the daemon
        stops, as a daemon of one process that cannot start does)."""
        while True:
            ended = self._next_ended()
            if ended is None:
                return True
            index, worker, code = ended
            pid = worker.pid
            served = self.board.serving(index)
            self.board.seat(index, 0)
            how = _ended(code)
            if not served and not self.all_served:
                # Judged by this worker's own state, not all_served, which the
                # loop sets up to a tick late: a worker killed right after it
                # began to serve is started again, not taken for a failed start.
                log.error("worker process %d (pid %d) %s before it served, while the daemon was starting; "
                          "stopping", index + 1, pid, how)
                return False
            lived = time.monotonic() - worker.started
            delay = RESTART_DELAY if lived >= RESTART_STABLE and served else self.delay[index]
            self.delay[index] = min(delay * 2, RESTART_DELAY_MOST)  # the next, if this one ends soon too
            self.restart_at[index] = time.monotonic() + delay
            log.error("worker process %d (pid %d) %s after %.0f s; another starts in %g s (its connections "
                      "wait in the port's queue)", index + 1, pid, how, lived, delay)

    def restart_due(self) -> None:
        now = time.monotonic()
        for index, when in list(self.restart_at.items()):
            if when <= now:
                del self.restart_at[index]
                self.start(index)

    def reload(self) -> None:
        """SIGHUP: each worker reloads (and logs what it did); the master keeps
        the new settings for a worker it starts again later."""
        try:
            new = load_settings(self.settings.config_path)
        except ConfigError:
            new = None  # the workers refuse it too, and say why
        if new is not None:
            self.settings = dataclasses.replace(new, **{name: getattr(self.settings, name)
                                                        for name in RESTART_FIELDS})
        self._signal_workers(signal.SIGHUP)

    def stop(self) -> None:
        """Close the master's copies of the sockets (a worker's close then
        stops its port), stop every worker, wait for them, kill what stays."""
        close_sockets(self.sockets)
        self._signal_workers(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        while self.workers and time.monotonic() < deadline:
            ended = self._next_ended()
            if ended is None:
                time.sleep(MASTER_TICK / 2)
                continue
            index, worker, code = ended
            if code != 0:
                log.warning("worker process %d (pid %d) %s while stopping", index + 1, worker.pid, _ended(code))
        for index, worker in self.workers.items():
            log.error("worker process %d (pid %d) did not stop within %g s: killed", index + 1, worker.pid,
                      STOP_GRACE)
            _signal(worker.pid, signal.SIGKILL)
            os.waitpid(worker.pid, 0)
        self.workers.clear()
        log.info("pcc master stopped")

    def _next_ended(self) -> Optional[tuple]:
        """(index, worker, exit code) of a worker that ended, taken off the
        list, or None while none has (reap and stop both collect this way)."""
        while self.workers:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return None
            if pid == 0:
                return None
            index = next((index for index, worker in self.workers.items() if worker.pid == pid), None)
            if index is not None:
                return index, self.workers.pop(index), os.waitstatus_to_exitcode(wait_status)
        return None

    def _signal_workers(self, signum: int) -> None:
        for worker in self.workers.values():
            _signal(worker.pid, signum)


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass  # ended already: reap() or stop() collects it


def _ended(code: int) -> str:
    """How a worker ended, in words."""
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"

