"""The Postfix port: a ThreadingTCPServer, one loop of requests per
connection, and the limits on what a client may send.  Requests go to the
PolicyService through late.answer_in_time(); a late answer comes back through
deliver_late().
"""
from __future__ import annotations

import errno
import logging
import os
import socket
import socketserver
import stat
import threading
import time
from typing import Optional, cast

from .common import log, replaced
from .config import Settings
from .ports import BoundedPort, RateLimitedWarning, connect_unix, connection_caps
from .protocol import HEALTH_REQUEST, PolicyRequest, client_allowed, format_reply, parse_request, peer_address
from .late import LATE_ANSWER_WAIT, RequestTicket, answer_in_time
from .report import SelfReport
from .service import PolicyService

# What the policy port answers: Postfix's requests and `pcc.py --health`'s.
POLICY_PORT_REQUESTS = ("smtpd_access_policy", HEALTH_REQUEST)

# Once a request has begun, all of it must arrive within this many seconds
# (or idle_timeout, if shorter): Postfix sends a request in one go, and a client
# that trickles bytes must not hold a connection for ever.
REQUEST_DEADLINE = 30.0

class _Successor(threading.Thread):
    """Reads a connection on after a late answer (PolicyHandler.handle)."""

    def __init__(self, handler: "PolicyHandler"):
        super().__init__(name="pcc-connection", daemon=True)
        self.handler = handler
        self.handed_on = False

    def run(self) -> None:
        try:
            self.handed_on = self.handler._serve()
        except Exception:  # one connection's fault, never the daemon's
            log.exception("connection from %s: internal error", self.handler.client_address[0])


class PolicyHandler(socketserver.BaseRequestHandler):
    """One Postfix connection: a loop of requests, each ended by an empty line.

    Reads the socket itself rather than through a buffered file, so that the
    time limits hold for a whole request, not for each recv().
    """

    server: PolicyServer

    def setup(self) -> None:
        self._buffer = b""
        self._started: Optional[float] = None  # when the request being read began
        self._handover = threading.Event()  # set once a late answer was sent and the reading handed on
        self._successors: list = []  # threads that took the connection over, in order (None: it ended)
        host, port = self.client_address[:2]  # an IPv6 peer has four
        self._peer = f"{host}:{port}" if port else host  # a UNIX socket's peer: the socket (port 0)

    def handle(self) -> None:
        """Serve the connection; when the Watchdog answered a request whose
        thread the database keeps, another thread reads the next requests on
        the same connection (in order, each answered within the deadline) and
        this one waits for the connection to end before socketserver closes it."""
        handed_on = self._serve()
        for successor in self._successors:
            if not handed_on or successor is None:
                break
            successor.join()
            handed_on = successor.handed_on

    def _serve(self) -> bool:
        """The loop of requests; True when it stopped because a late answer
        handed the connection to a successor."""
        server = self.server
        while not server.stopping.is_set():
            lines = self._read_request(self._peer)
            if lines is None:
                return False
            server.answering(self.request, True)  # a whole request: this connection is not cut now
            handed_on, answered_at = False, None
            try:
                began = self._started or time.monotonic()
                # This request's own: a successor thread replaces the attributes.
                handover = self._handover = threading.Event()
                reply = server.answer_request(lines, self)
                if reply is None:
                    handover.wait(LATE_ANSWER_WAIT)  # the Watchdog's answer is sent, a successor reads on
                    handed_on = True
                    return True
                answered_at = time.monotonic()
                server.service.metrics.answered(reply, answered_at - began)
                self.request.sendall(reply)
            except OSError as error:
                log.info("connection from %s: cannot send the answer: %s", self._peer, error)
                return False
            finally:
                if not handed_on:  # else the late answer has finished this request already
                    self._finish_request()
                    server.answering(self.request, False, answered_at)
        return False

    def deliver_late(self, action: str) -> None:
        """The Watchdog's answer, while this connection's thread waits for the
        database; then a new thread reads the connection's next requests, so
        that Postfix's next request on it is answered in time too."""
        try:
            reply = format_reply(action)
            answered_at = time.monotonic()
            self.server.service.metrics.answered(reply, answered_at - (self._started or answered_at))
            self.request.sendall(reply)
        except OSError as error:
            log.info("connection from %s: cannot send the answer: %s", self.client_address[0], error)
            self._successors.append(None)
            self._handover.set()
            return
        self._finish_request()
        self.server.answering(self.request, False, answered_at)
        successor = _Successor(self)
        self._successors.append(successor)
        successor.start()  # before the handover: the waiting thread joins it at once
        self._handover.set()

    def _read_request(self, peer: str) -> Optional[list]:
        """The lines of the next request, or None when the connection should end.
        A request is in flight from its first byte until it is answered."""
        settings = self.server.settings
        limit = settings.max_request_bytes
        deadline = min(REQUEST_DEADLINE, settings.idle_timeout)
        lines: list = []
        size = 0
        while True:
            newline = self._buffer.find(b"\n")
            if newline < 0:
                if size + len(self._buffer) > limit:
                    log.warning("connection from %s: request larger than max_request_bytes (%d), closing",
                                peer, limit)
                    return self._abandon()
                if self._buffer:
                    self._start_request()
                problem = self._receive(deadline, settings.idle_timeout)
                if problem:
                    # a client closing between requests is normal; anything else is worth a line
                    level = logging.DEBUG if problem == "closed" else logging.INFO
                    if self._started is not None:
                        level = logging.WARNING
                    log.log(level, "connection from %s %s", peer, problem)
                    return self._abandon()
                continue
            raw, self._buffer = self._buffer[:newline], self._buffer[newline + 1:]
            size += newline + 1
            if size > limit:
                log.warning("connection from %s: request larger than max_request_bytes (%d), closing", peer, limit)
                return self._abandon()
            line = raw.decode("utf-8", "replace").rstrip("\r")
            if line:
                self._start_request()
                lines.append(line)
            elif lines:
                return lines
            elif not self._buffer:
                self._finish_request()  # a stray empty line between requests

    def _receive(self, deadline: float, idle_timeout: float) -> Optional[str]:
        """Append what the client sends to the buffer; say what went wrong, if anything."""
        if self._started is None:
            timeout = idle_timeout
        else:
            timeout = self._started + deadline - time.monotonic()
            if timeout <= 0:
                return f"did not complete its request within {deadline:.0f} s, closing"
        self.request.settimeout(timeout)
        try:
            chunk = self.request.recv(65536)
        except (socket.timeout, TimeoutError):
            if self._started is None:
                return f"idle for {idle_timeout:.0f} s, closing"
            return f"did not complete its request within {deadline:.0f} s, closing"
        except OSError as error:
            return f"failed: {error}"
        if not chunk:
            return "closed in the middle of a request" if self._started is not None else "closed"
        self._buffer += chunk
        return None

    def _start_request(self) -> None:
        if self._started is None:
            self._started = time.monotonic()
            self.server.in_flight.enter()

    def _finish_request(self) -> None:
        if self._started is not None:
            self._started = None
            self.server.in_flight.leave()

    def _abandon(self) -> Optional[list]:
        self._finish_request()
        return None


class InFlight:
    """Counts requests between their first line and their answer."""

    def __init__(self):
        self._count = 0
        self._changed = threading.Condition()

    def enter(self) -> None:
        with self._changed:
            self._count += 1

    def leave(self) -> None:
        with self._changed:
            self._count -= 1
            self._changed.notify_all()

    def wait_until_none(self, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self._count <= 0, timeout=timeout)


class PolicyListener(BoundedPort):
    """What the TCP port and the UNIX-domain socket share: the limits, the
    requests they answer and how (the rest is the address)."""

    port_name = "policy port"
    daemon_threads = True
    request_queue_size = 1024
    settings: Settings
    service: PolicyService
    stopping: threading.Event
    in_flight: InFlight

    def init_policy_port(self, settings: Settings, service: PolicyService, report: Optional[SelfReport],
                         listeners: int, sibling: Optional[PolicyListener]) -> None:
        """sibling: the daemon's other policy listener, whose stop and count of
        requests in flight this one shares (one daemon, one stop)."""
        self.settings = settings
        self.service = service
        self.report = report  # answers `pcc.py --health` (without it, nobody does)
        self.stopping = sibling.stopping if sibling else threading.Event()
        self.in_flight = sibling.in_flight if sibling else InFlight()
        cap = connection_caps(settings.max_connections, listeners=listeners)["postfix"]
        limit = f"max_connections ({settings.max_connections})"
        self.init_bounds(cap, limit if cap == settings.max_connections else f"{cap} connections (max_connections "
                         f"{settings.max_connections}, cut to fit the open-file limit)")

    def answer_request(self, lines: list, handler: Optional[PolicyHandler] = None) -> Optional[bytes]:
        """The reply to one request; with a handler, the Watchdog may answer it
        first (late.py): then None, and the handler sends nothing (the
        Watchdog delivered through handler.deliver_late)."""
        try:
            request = self._policy_request(parse_request(lines), handler)
            if request.request == HEALTH_REQUEST and self.report is not None:
                return format_reply(f"DUNNO {self.report.health_report()}")
        except Exception:  # a bug must cost one answer, never the daemon, and never open the blocked list
            return format_reply(self.service.answer_after_error(None))
        action = answer_in_time(self.service, RequestTicket(request), handler.deliver_late if handler else None)
        return format_reply(action) if action is not None else None

    def _policy_request(self, request: PolicyRequest, handler: Optional[PolicyHandler]) -> PolicyRequest:
        """The request as this port serves it: one it does not answer is nobody's business."""
        if request.request not in POLICY_PORT_REQUESTS:
            # A dovecot_login here would count as a login (count_logins or not) and
            # claim the Dovecot door: only the Dovecot port's adapter makes those.
            return replaced(request, request="")
        if request.request == HEALTH_REQUEST and (self.report is None or (handler is not None
                                                                      and not self.is_local(handler))):
            # What the daemon says of itself (an outage, its length) tells an
            # attacker when protection is partly off: for this host only.
            return replaced(request, request="")
        return request

    def is_local(self, handler: PolicyHandler) -> bool:
        raise NotImplementedError

    def stop_listening(self) -> None:
        """After the stop: accept nothing more (the requests in flight go on)."""
        raise NotImplementedError

    def handle_error(self, request, client_address) -> None:
        log.exception("connection from %s: internal error", client_address[0])


class PolicyServer(PolicyListener, socketserver.ThreadingTCPServer):
    """The policy port: check_policy_service inet:HOST:PORT."""

    allow_reuse_address = True

    def __init__(self, settings: Settings, service: PolicyService, report: Optional[SelfReport] = None,
                 listeners: int = 1, sibling: Optional[PolicyListener] = None,
                 adopt: Optional[socket.socket] = None):
        """adopt: the socket the master bound for this worker process ([server] processes)."""
        self.adopted = adopt
        self.init_policy_port(settings, service, report, listeners, sibling)
        self._not_allowed = RateLimitedWarning("policy port: connection refused, not in [server] allowed_clients")
        infos = socket.getaddrinfo(settings.host, settings.port, type=socket.SOCK_STREAM)
        self.address_family = infos[0][0]
        super().__init__(cast(tuple, infos[0][4][:2]), PolicyHandler)  # (host, port) of an AF_INET(6) address

    def is_local(self, handler: PolicyHandler) -> bool:
        """Whether the peer is this host: loopback, or the address pcc listens on."""
        peer = handler.client_address[0].split("%")[0]
        address = peer_address(peer)
        return address is not None and (address.is_loopback or peer == self.server_address[0])

    def stop_listening(self) -> None:
        self.socket.close()

    def verify_request(self, request, client_address) -> bool:
        if client_allowed(client_address[0], self.settings.allowed_clients):
            return True
        self._not_allowed(client_address[0])
        return False


class PolicySocketServer(PolicyListener, socketserver.ThreadingUnixStreamServer):
    """The policy socket, beside the port: check_policy_service unix:NAME
    ([server] socket).  Who may connect is the socket's owner, group and mode
    (allowed_clients is for addresses); its peers are this host."""

    port_name = "policy socket"

    def __init__(self, settings: Settings, service: PolicyService, report: Optional[SelfReport] = None,
                 listeners: int = 2):
        self.init_policy_port(settings, service, report, listeners, None)
        self.path = settings.socket
        self.peer_name = f"unix:{self.path}"
        clear_the_way(self.path)
        # bind() makes the file with the mode the umask leaves: the one given,
        # from the start (a chmod after it would follow a link swapped in).
        previous = os.umask(0o777 & ~settings.socket_mode)
        try:
            super().__init__(self.path, PolicyHandler)
        finally:
            os.umask(previous)
        self._made = os.lstat(self.path).st_ino  # what remove() may unlink: this socket, not a successor's
        try:
            os.chown(self.path, settings.socket_uid, settings.socket_gid, follow_symlinks=False)
        except OSError as error:
            self.remove()
            raise OSError(error.errno, f"cannot give it owner {settings.socket_owner or '(unchanged)'}, group "
                                       f"{settings.socket_group or '(unchanged)'}: {error.strerror} (pcc runs as "
                                       f"uid {os.geteuid()}: only root gives a socket to another owner, or to a "
                                       f"group it is not in)") from None

    def get_request(self):
        connection, _address = super().get_request()
        return connection, (self.peer_name, 0)  # a UNIX peer has no address: the socket stands for it

    def is_local(self, handler: PolicyHandler) -> bool:
        return True

    def stop_listening(self) -> None:
        self.shutdown()  # its accept loop, in a thread of its own beside the port, ended (at once if it has)
        self.remove()

    def remove(self) -> None:
        """Close, and remove the socket file if it is still the one this daemon made."""
        self.server_close()
        try:
            status = os.lstat(self.path)
            if stat.S_ISSOCK(status.st_mode) and status.st_ino == self._made:
                os.unlink(self.path)
        except OSError:
            pass


def clear_the_way(path: str) -> None:
    """Remove a socket a stopped pcc left at `path`; raise OSError when a
    live one answers there, or when the path is anything but a socket (never
    removed: a file, a directory or a link pcc did not make)."""
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        raise OSError(errno.ENOENT, f"the directory {directory} does not exist (make it, owned by pcc's user "
                                    f"and reachable by Postfix: install -d -o pcc -g postfix -m 0750 {directory})")
    try:
        status = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(status.st_mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket; pcc removes nothing it did not make")
    try:
        connect_unix(path, 1.0).close()
    except OSError:
        os.unlink(path)  # nobody answers: a socket left by a pcc that did not stop cleanly
        return
    raise OSError(errno.EADDRINUSE, f"another process answers on {path} (a pcc still running?)")
