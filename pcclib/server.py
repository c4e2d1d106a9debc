"""The Postfix port: a ThreadingTCPServer, one loop of requests per
connection, the limits on what a client may send, and the Watchdog that
answers any request the database keeps longer than DB_ANSWER_DEADLINE.
"""
from __future__ import annotations

import logging
import logging.handlers
import socket
import socketserver
import threading
import time
from typing import Optional

from .common import log
from .config import Settings
from .protocol import client_allowed, format_reply, parse_request
from .service import DB_ANSWER_DEADLINE, PolicyService, RequestTicket

# Once a request has begun, all of it must arrive within this many seconds
# (or idle_timeout, if shorter): Postfix sends a request in one go, and a client
# that trickles bytes must not hold a connection for ever.
REQUEST_DEADLINE = 30.0

# How long a connection's thread keeps the socket open for the Watchdog's
# answer (from memory: it takes milliseconds, a spool fsync included).
LATE_ANSWER_WAIT = 10.0


class PolicyHandler(socketserver.BaseRequestHandler):
    """One Postfix connection: a loop of requests, each ended by an empty line.

    Reads the socket itself rather than through a buffered file, so that the
    time limits hold for a whole request, not for each recv().
    """

    def setup(self) -> None:
        self._buffer = b""
        self._started: Optional[float] = None  # when the request being read began
        self._reply_lock = threading.Lock()
        self._answered = False
        self._late_answer_sent = threading.Event()  # the Watchdog is done with this socket
        self.ticket: Optional[RequestTicket] = None  # the request being answered, for the Watchdog

    def handle(self) -> None:
        server = self.server
        peer = f"{self.client_address[0]}:{self.client_address[1]}"
        while not server.stopping.is_set():
            lines = self._read_request(peer)
            if lines is None:
                return
            try:
                self._answered = False
                began = self._started or time.monotonic()
                reply = server.answer(lines, self)
                if not self._claim_reply():
                    # The Watchdog answers this one and closes the connection;
                    # returning now would close the socket under it.
                    self._late_answer_sent.wait(LATE_ANSWER_WAIT)
                    return
                server.service.metrics.answered(reply, time.monotonic() - began)
                self.request.sendall(reply)
            except OSError as error:
                log.info("connection from %s: cannot send the answer: %s", peer, error)
                return
            finally:
                self._finish_request()

    def _claim_reply(self) -> bool:
        """True for whichever of this thread and the Watchdog answers first."""
        with self._reply_lock:
            if self._answered:
                return False
            self._answered = True
            return True

    def answer_late(self, ticket: RequestTicket) -> None:
        """Called by the Watchdog while this connection's thread waits for the
        database: answer (with the decision if it is made, else from memory),
        then close, so that Postfix sends its next
        request on a new connection instead of waiting behind this one."""
        if ticket is not self.ticket or not self._claim_reply():
            return  # that request was answered, and this connection is on to another
        try:
            self._send_late_answer()
        finally:
            self._late_answer_sent.set()

    def _send_late_answer(self) -> None:
        try:
            action = self.server.service.answer_late(self.ticket)
        except Exception:  # never leave Postfix without an answer
            action = self.server.service.answer_after_error(self.ticket.request)
        try:
            reply = format_reply(action)
            self.server.service.metrics.answered(reply, time.monotonic() - (self._started or time.monotonic()))
            self.request.sendall(reply)
            self.request.shutdown(socket.SHUT_RDWR)
        except OSError as error:
            log.info("connection from %s: cannot send the answer: %s", self.client_address[0], error)

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

    def _abandon(self) -> None:
        self._finish_request()
        return None


class Watchdog:
    """Makes sure every request is answered within DB_ANSWER_DEADLINE seconds.

    Requests are answered in their connection's thread, database work included
    (no hand-over to another thread: that cost a quarter of the throughput).
    This one thread looks at the requests in flight twenty times a second and
    answers, from memory, any that the database has kept too long."""

    def __init__(self):
        self._deadlines: dict = {}  # handler -> (monotonic deadline, its request's ticket)
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None

    def watch(self, handler: PolicyHandler) -> None:
        with self._lock:
            self._deadlines[handler] = (time.monotonic() + DB_ANSWER_DEADLINE, handler.ticket)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pcc-watchdog", daemon=True)
                self._thread.start()

    def unwatch(self, handler: PolicyHandler) -> None:
        with self._lock:
            self._deadlines.pop(handler, None)

    def _run(self) -> None:
        while True:
            time.sleep(0.05)
            now = time.monotonic()
            with self._lock:
                late = [(handler, ticket) for handler, (deadline, ticket) in self._deadlines.items()
                        if deadline <= now]
                for handler, _ticket in late:
                    del self._deadlines[handler]
            for handler, ticket in late:  # the ticket: that request, not a later one on the connection
                handler.answer_late(ticket)


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


class PolicyServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024

    def __init__(self, settings: Settings, service: PolicyService):
        self.settings = settings
        self.service = service
        self.stopping = threading.Event()
        self.in_flight = InFlight()
        self.watchdog = Watchdog()
        self._connections = threading.BoundedSemaphore(settings.max_connections)
        infos = socket.getaddrinfo(settings.host, settings.port, type=socket.SOCK_STREAM)
        self.address_family = infos[0][0]
        super().__init__(infos[0][4][:2], PolicyHandler)

    def answer(self, lines: list, handler: Optional[PolicyHandler] = None) -> bytes:
        ticket = None
        try:
            ticket = RequestTicket(parse_request(lines))
            if handler is not None:
                handler.ticket = ticket
                self.watchdog.watch(handler)
            return format_reply(self.service.answer(ticket.request, ticket=ticket))
        except Exception:  # a bug must cost one answer, never the daemon, and never open the blocked list
            return format_reply(self.service.answer_after_error(ticket.request if ticket else None))
        finally:
            if handler is not None:
                self.watchdog.unwatch(handler)

    def verify_request(self, request, client_address) -> bool:
        if client_allowed(client_address[0], self.settings.allowed_clients):
            return True
        log.warning("connection from %s refused: not in [server] allowed_clients", client_address[0])
        return False

    def process_request(self, request, client_address) -> None:
        if not self._connections.acquire(blocking=False):
            log.warning("connection from %s refused: max_connections (%d) reached",
                        client_address[0], self.settings.max_connections)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except RuntimeError as error:  # no thread could be started
            self._connections.release()
            log.error("connection from %s refused: %s", client_address[0], error)
            self.shutdown_request(request)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connections.release()

    def handle_error(self, request, client_address) -> None:
        log.exception("connection from %s: internal error", client_address[0])
