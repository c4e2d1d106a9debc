"""What every listening port shares, so that no client of one port can take
what another needs: a cap on connections derived from the open-file limit,
room made by cutting the connection that has kept its slot longest without
completing a request, a back-off when the process is out of descriptors,
HTTP reads with a whole-request deadline and a size budget, and warnings
that cannot flood the log.
"""
from __future__ import annotations

import errno
import socket
import threading
import time
from typing import TYPE_CHECKING, Optional

from .common import log

# Descriptors kept for everything but client connections: the database pools
# (up to 48 on a server database), log, GeoIP and spool files, the sockets of
# Postfix's postqueue and of outgoing mail, Python's own.
RESERVED_DESCRIPTORS = 128
# Of the rest, the HTTP ports (Dovecot's and the metrics port) get this share
# together; the Postfix port gets the remainder.
HTTP_PORTS_SHARE = 0.25
# When accept() finds no descriptor left, the accept loop waits this long
# (seconds) before trying again, instead of spinning on a readable socket.
ACCEPT_BACKOFF = 0.1
# One warning line per kind of refusal this often (seconds); the lines in
# between are counted and the count given with the next one.
WARNING_INTERVAL = 10.0
# An HTTP request (headers and body) must arrive whole within this many
# seconds of its first byte; Dovecot sends one in a single write.
HTTP_REQUEST_DEADLINE = 5.0
# Request line and headers of one HTTP request, at most (bytes).
HTTP_HEADER_BUDGET = 8192


def open_file_limit() -> int:
    try:
        import resource

        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, ValueError, OSError):
        return 1024
    return 1 << 20 if soft == resource.RLIM_INFINITY else soft


def connection_caps(max_connections: int, limit: Optional[int] = None, listeners: int = 1) -> dict:
    """How many connections each port may hold under the open-file limit:
    {"postfix": n, "dovecot": n, "metrics": n}; every port gets at least a few.
    Postfix's share is split between its `listeners` (the port, the socket)."""
    spare = max(16, (limit or open_file_limit()) - RESERVED_DESCRIPTORS)
    http = max(4, int(spare * HTTP_PORTS_SHARE))
    metrics = max(2, min(8, http // 4))
    return {"postfix": min(max_connections, max(8, (spare - http) // listeners)), "dovecot": max(2, http - metrics),
            "metrics": metrics}


def connect_unix(path: str, timeout: float) -> socket.socket:
    """A connection to the UNIX-domain socket at `path` (a pcc's policy socket)."""
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.settimeout(timeout)
        connection.connect(path)
    except OSError:
        connection.close()
        raise
    return connection


if TYPE_CHECKING:  # what the mixins below are mixed into, for the type checker only
    import http.server
    import socketserver

    _Server = socketserver.ThreadingTCPServer
    _HttpHandler = http.server.BaseHTTPRequestHandler
else:
    _Server = _HttpHandler = object


class RateLimitedWarning:
    """A warning that says once every WARNING_INTERVAL how often it happened."""

    def __init__(self, what: str):
        self.what = what
        self._lock = threading.Lock()
        self._last = float("-inf")
        self._suppressed = 0

    def __call__(self, detail: str) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last < WARNING_INTERVAL:
                self._suppressed += 1
                return
            suppressed, self._suppressed, self._last = self._suppressed, 0, now
        more = f" ({suppressed} more since the last such line)" if suppressed else ""
        log.warning("%s: %s%s", self.what, detail, more)


class _Slot:
    __slots__ = ("socket", "since", "answering")

    def __init__(self, sock, since: float):
        self.socket = sock
        self.since = since  # when it last began to wait for a client's bytes
        self.answering = False  # a whole request is being answered: never cut


class BoundedPort(_Server):
    """Mixin for a socketserver TCP server: at most `cap` connections; when full,
    the connection that has waited longest for its client's bytes is cut to
    make room (a trickling client loses to a real one), and when none can be
    cut the new one is refused.  accept() out of descriptors backs off."""

    port_name = "port"
    cap = 64
    # A socket bound and listening already, made by the master of several
    # worker processes ([server] processes): the port uses it instead of
    # binding its own (server_bind).
    adopted: Optional[socket.socket] = None

    def server_bind(self) -> None:
        if self.adopted is None:
            super().server_bind()
            return
        self.socket.close()
        self.socket = self.adopted
        self.server_address = self.adopted.getsockname()

    def init_bounds(self, cap: int, limit_name: str) -> None:
        """limit_name: what the cap is, for the log line ("max_connections (2)")."""
        self.cap = cap
        self._slots: dict = {}  # request socket -> _Slot
        self._slots_lock = threading.Lock()
        self._full = RateLimitedWarning(f"{self.port_name}: {limit_name} reached")
        self._no_descriptors = RateLimitedWarning(f"{self.port_name}: accept failed")

    def get_request(self):
        try:
            return super().get_request()
        except OSError as error:
            if error.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                self._no_descriptors(f"{error.strerror}; waiting {ACCEPT_BACKOFF:g} s")
                time.sleep(ACCEPT_BACKOFF)
            raise

    def process_request(self, request, client_address) -> None:
        if not self._admit(request, client_address[0]):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except RuntimeError as error:  # no thread could be started
            self._release(request)
            log.error("%s: connection from %s refused: %s", self.port_name, client_address[0], error)
            self.shutdown_request(request)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(request)

    def _admit(self, request, peer: str) -> bool:
        # Taken before the cut below: what the cut lets happen (the cut
        # client's next connection, another client answered meanwhile) must
        # look newer than this one, however long this thread is then kept
        # from running.  (Taken after, a connection answered while this
        # thread waited for the GIL could be cut in place of this idle one.)
        admitted = time.monotonic()
        with self._slots_lock:
            if len(self._slots) >= self.cap:
                waiting = [slot for slot in self._slots.values() if not slot.answering]
                if not waiting:
                    self._full(f"all busy answering; connection from {peer} refused")
                    return False
                victim = min(waiting, key=lambda slot: slot.since)
                self._full(f"cut the connection that waited longest for its client "
                           f"({time.monotonic() - victim.since:.1f} s) to admit {peer}")
                del self._slots[victim.socket]
                _cut(victim.socket)
            self._slots[request] = _Slot(request, admitted)
            return True

    def _release(self, request) -> None:
        with self._slots_lock:
            self._slots.pop(request, None)

    def connection_states(self) -> dict:
        """{"answering": connections being answered, "waiting": the others}."""
        with self._slots_lock:
            answering = sum(1 for slot in self._slots.values() if slot.answering)
            return {"answering": answering, "waiting": len(self._slots) - answering}

    def answering(self, request, busy: bool, since: Optional[float] = None) -> None:
        """The handler of `request` says a whole request is in (True) or that it
        waits for the client again (False), since `since` (monotonic; the
        moment before its answer was sent: taken later, a thread the machine
        kept waiting would look newer than one answered after it).  No lock:
        each is one attribute of the connection's own slot, set by its own
        thread (the hot path)."""
        slot = self._slots.get(request)
        if slot is not None:
            if not busy:
                slot.since = time.monotonic() if since is None else since
            slot.answering = busy


def _cut(sock) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)  # its thread's recv() returns at once; the thread closes it
    except OSError:
        pass


class RequestTooLarge(Exception):
    """An HTTP request's headers or body beyond what pcc reads."""


class HttpRequestReader:
    """The socket's bytes for an http.server handler (as its rfile): idle
    between requests up to `idle_timeout`, then the whole request (line,
    headers, body) within HTTP_REQUEST_DEADLINE of its first byte, its
    headers within HTTP_HEADER_BUDGET bytes and its body within `max_body`."""

    def __init__(self, sock, idle_timeout: float, max_body: int):
        self.socket = sock
        self.idle_timeout = idle_timeout
        self.budget = HTTP_HEADER_BUDGET + max_body
        self._buffer = b""
        self._deadline: Optional[float] = None
        self._used = 0

    def next_request(self) -> None:
        self._deadline, self._used = None, 0

    def _fill(self) -> bool:
        if self._deadline is None and not self._buffer:
            timeout = self.idle_timeout
        else:
            if self._deadline is None:
                self._deadline = time.monotonic() + HTTP_REQUEST_DEADLINE
            timeout = self._deadline - time.monotonic()
            if timeout <= 0:
                raise TimeoutError(f"request not complete within {HTTP_REQUEST_DEADLINE:g} s")
        self.socket.settimeout(timeout)
        chunk = self.socket.recv(8192)  # TimeoutError: http.server closes the connection
        if not chunk:
            return False
        if self._deadline is None:
            self._deadline = time.monotonic() + HTTP_REQUEST_DEADLINE
        self._buffer += chunk
        return True

    def _take(self, size: int) -> bytes:
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        self._used += len(data)
        if self._used > self.budget:
            raise RequestTooLarge(f"more than {self.budget} bytes in one request")
        return data

    def readline(self, limit: int = -1) -> bytes:
        while True:
            newline = self._buffer.find(b"\n")
            if newline >= 0 and (limit < 0 or newline < limit):
                return self._take(newline + 1)
            if 0 <= limit <= len(self._buffer):
                return self._take(limit)
            if self._used + len(self._buffer) > self.budget:
                raise RequestTooLarge(f"more than {self.budget} bytes in one request")
            if not self._fill():
                return self._take(len(self._buffer))

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            raise RequestTooLarge("a body without a length")
        while len(self._buffer) < size:
            if self._used + len(self._buffer) > self.budget:
                raise RequestTooLarge(f"more than {self.budget} bytes in one request")
            if not self._fill():
                break
        return self._take(size)

    def close(self) -> None:
        pass  # the handler closes the socket


class BoundedHttpHandler(_HttpHandler):
    """Mixin for an http.server handler on a BoundedPort: reads through an
    HttpRequestReader, tells the port while a whole request is answered, and
    turns what a client does wrong (too slow, too large, gone) into one
    rate-limited line instead of a traceback."""

    idle_timeout = 10.0  # seconds between two requests of one connection
    max_body = 0  # bytes of body a request may carry
    server: BoundedHttpPort
    rfile: HttpRequestReader  # type: ignore[assignment]  # read like the file http.server expects

    def setup(self) -> None:
        super().setup()
        self.rfile = HttpRequestReader(self.connection, self.idle_timeout, self.max_body)

    def parse_request(self) -> bool:
        whole = super().parse_request()
        if whole:
            self.server.answering(self.request, True)
        return whole

    def handle_one_request(self) -> None:
        self.rfile.next_request()
        try:
            super().handle_one_request()  # closes the connection itself on a TimeoutError
        except (RequestTooLarge, OSError) as error:
            self.close_connection = True
            self.server.client_fault(self.client_address[0], error)
        finally:
            self.server.answering(self.request, False)

    def log_message(self, *_arguments) -> None:  # pcc logs what matters itself
        pass


class BoundedHttpPort(BoundedPort):
    """A BoundedPort that speaks HTTP: a client's fault is one rate-limited line."""

    def server_bind(self) -> None:
        if self.adopted is None:
            super().server_bind()  # http.server's: binds, and names the server
            return
        BoundedPort.server_bind(self)
        host, port = self.server_address[:2]
        vars(self).update(server_name=host, server_port=port)  # what http.server's own bind sets
        setup_environ = getattr(self, "setup_environ", None)  # wsgiref's server: its environment, from the name
        if setup_environ is not None:
            setup_environ()

    def init_bounds(self, cap: int, limit_name: str) -> None:
        super().init_bounds(cap, limit_name)
        self._client_faults = RateLimitedWarning(f"{self.port_name}: client")

    def client_fault(self, peer: str, error: BaseException) -> None:
        self._client_faults(f"{peer}: {type(error).__name__}: {error}"[:200])

    def handle_error(self, request, client_address) -> None:
        import sys

        error = sys.exc_info()[1]
        if isinstance(error, (OSError, RequestTooLarge)):  # a broken pipe, a reset, a slow or huge request
            self.client_fault(client_address[0], error)
        else:
            log.exception("%s: connection from %s: internal error", self.port_name, client_address[0])
