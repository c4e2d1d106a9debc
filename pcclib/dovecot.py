"""Dovecot's authentication policy port: a thin HTTP adapter that turns
Dovecot's JSON into a PolicyRequest for the same service and decision.

Dovecot posts JSON before a login's password is checked (?command=allow), once
more after a good password, and reports the outcome (?command=report, with
"success").  pcc answers {"status": -1, "msg": reason} for a blocked account,
else {"status": 0}; a successful login counts its country when count_logins
is on.  Failed logins never count: anybody could otherwise lock anybody out.
"""
from __future__ import annotations

import concurrent.futures
import hmac
import http
import http.server
import json
import queue
import re
import socket
import urllib.parse
from typing import Optional, cast

from .common import json_nesting_within, log
from .config import BLOCK_ACTIONS, Settings
from .ports import BoundedHttpHandler, BoundedHttpPort, RateLimitedWarning, connection_caps
from .protocol import DOVECOT_DOORS, DOVECOT_LOGIN, PolicyRequest, clean_value, client_allowed
from .late import LATE_ANSWER_WAIT, RequestTicket, answer_in_time
from .service import PolicyService

# Dovecot's bodies are a few hundred bytes; anything much larger is not Dovecot.
DOVECOT_MAX_BODY = 16384
# Dovecot keeps its connections open between logins; one idle this long
# (seconds) is closed (Dovecot opens another when it needs one).
DOVECOT_IDLE_TIMEOUT = 10.0

# Logins answered at once; more wait for a worker (each answered within
# DB_ANSWER_DEADLINE all the same, from memory when the database is slow).
DOVECOT_WORKERS = 32


def dovecot_login_request(command: str, fields: dict) -> Optional[PolicyRequest]:
    """The PolicyRequest for one Dovecot call, or None when it asks nothing of
    the rules (a report of a failed login)."""
    if command == "report" and fields.get("success") is not True:
        return None
    protocol = str(fields.get("protocol", ""))
    attributes = {name: clean_value(str(value)) for name, value in fields.items() if name != "pwhash"}
    attributes["command"] = command
    return PolicyRequest(request=DOVECOT_LOGIN, sasl_username=clean_value(str(fields.get("login", ""))),
                         client_address=clean_value(str(fields.get("remote", ""))),
                         door=DOVECOT_DOORS.get(protocol.lower(), re.sub(r"[^a-z0-9-]", "", protocol.lower())[:16] or "unknown"),
                         check_only=command == "allow", attributes=attributes)


class DovecotPolicyHandler(BoundedHttpHandler, http.server.BaseHTTPRequestHandler):
    """One HTTP request of Dovecot's auth policy client."""

    protocol_version = "HTTP/1.1"  # Dovecot keeps its connections alive
    server: DovecotPolicyServer
    idle_timeout = DOVECOT_IDLE_TIMEOUT
    max_body = DOVECOT_MAX_BODY

    def do_POST(self) -> None:
        server = self.server
        settings = server.service.settings
        framing = self._framing_problem()
        if framing:
            self._refuse(400, "bad_request", framing)
            return
        command = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query).get("command", [""])[0]
        if not self._authorised(settings.dovecot_api_header):
            self._refuse(401, "unauthorised", f"without the [dovecot] api_header (command={command[:20]!r})")
            return
        if command not in ("allow", "report"):
            self._refuse(400, "bad_request", f"unknown command {command[:20]!r}")
            return
        fields = self._json_body()
        if fields is None:
            return
        request = dovecot_login_request(command, fields)
        if request is None or (command == "report" and not settings.count_logins):
            server.service.metrics.dovecot(command, "not_counted")
            self._reply(200, {"status": 0})
            return
        refused = server.answer_login(request)
        server.service.metrics.dovecot(command, "refused" if refused else "allowed")
        self._reply(200, {"status": -1, "msg": settings.reason or "account blocked"} if refused else {"status": 0})

    def do_GET(self) -> None:
        self._refuse(405, "bad_request", "GET (Dovecot POSTs)")

    def _authorised(self, api_header: str) -> bool:
        if not api_header:
            return True
        name, _colon, value = api_header.partition(":")
        sent = self.headers.get(name.strip(), "")
        return hmac.compare_digest(sent.strip().encode(), value.strip().encode())

    def _framing_problem(self) -> str:
        """Why the body cannot be told apart from what follows it, if it cannot:
        one plain Content-Length is all pcc reads (as Dovecot sends)."""
        if self.headers.get("Transfer-Encoding") is not None:
            return "a Transfer-Encoding (pcc reads bodies of one Content-Length only)"
        lengths = self.headers.get_all("Content-Length") or []
        if len(lengths) > 1:
            return f"{len(lengths)} Content-Length headers"
        if lengths and not re.fullmatch(r"[0-9]{1,9}", lengths[0].strip()):
            return f"a Content-Length that is not a number: {lengths[0][:20]!r}"
        return ""

    def _json_body(self) -> Optional[dict]:
        if self.headers.get("Content-Length") is None:
            self._refuse(411, "bad_request", "no Content-Length")
            return None
        length = int(self.headers["Content-Length"])
        if length > DOVECOT_MAX_BODY:
            self._refuse(413, "bad_request", f"a body of {length} bytes (at most {DOVECOT_MAX_BODY})")
            return None
        body = self.rfile.read(length)
        try:
            text = body.decode("utf-8")
            # Dovecot's object is flat: one nested deeper (a list or object as a value too) never reaches json,
            # which recurses on the thread's stack (SIGSEGV on 3.13, RecursionError before).
            fields = json.loads(text) if json_nesting_within(text, 1) else None
        except ValueError:  # UnicodeDecodeError and json's errors alike
            fields = None
        if not isinstance(fields, dict):
            self._refuse(400, "bad_request", f"a body that is not a JSON object of plain values: {body[:60]!r}")
            return None
        return fields

    def _refuse(self, code: int, status: str, what: str) -> None:
        self.server.refused(code, f"from {self.client_address[0]}: {what}")
        self.server.service.metrics.dovecot("-", status)
        # Closed after the answer: the body, if any, was not read.
        self._reply(code, {"error": http.HTTPStatus(code).phrase}, close=True)

    def _reply(self, code: int, answer: dict, close: bool = False) -> None:
        body = json.dumps(answer).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)



class DovecotPolicyServer(BoundedHttpPort, http.server.ThreadingHTTPServer):
    """Dovecot's auth policy port: a thin adapter onto the PolicyService."""

    port_name = "dovecot policy port"
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, settings: Settings, service: "PolicyService", adopt: Optional[socket.socket] = None):
        """adopt: the socket the master bound for this worker process ([server] processes)."""
        self.adopted = adopt
        self.service = service
        self.init_bounds(connection_caps(settings.max_connections)["dovecot"],
                         "its share of the open-file limit")
        self._not_allowed = RateLimitedWarning("dovecot policy port: connection refused, not in [server] "
                                               "allowed_clients")
        self._refusals: dict = {}  # HTTP status -> its RateLimitedWarning: a flood of one hides no other
        infos = socket.getaddrinfo(settings.host, settings.dovecot_policy_port, type=socket.SOCK_STREAM)
        self.address_family = infos[0][0]
        super().__init__(cast(tuple, infos[0][4][:2]), DovecotPolicyHandler)  # (host, port) of an AF_INET(6) address
        self._workers = concurrent.futures.ThreadPoolExecutor(DOVECOT_WORKERS, "pcc-dovecot")

    def refused(self, code: int, detail: str) -> None:
        """One line, rate-limited per status, for a request refused with `code`."""
        warning = self._refusals.get(code)
        if warning is None:
            warning = self._refusals.setdefault(code, RateLimitedWarning(f"dovecot policy request refused (HTTP "
                                                                         f"{code})"))
        warning(detail)

    def answer_login(self, request: PolicyRequest) -> bool:
        """Whether a Dovecot login is refused: decided like a Postfix request,
        by a worker, and answered late like one (late.py) when the database
        keeps it: an account known to be blocked is refused, any other gets in.
        The HTTP thread only waits for whichever answer comes first."""
        service = self.service
        ticket, answers = RequestTicket(request), queue.SimpleQueue[str]()
        service.watchdog.watch(ticket, answers.put)  # from now: a login waiting for a worker is watched too
        self._workers.submit(self._answer_in_worker, ticket, answers.put)
        try:
            action = answers.get(timeout=LATE_ANSWER_WAIT)
        except queue.Empty:  # neither answered: a fault of pcc's own; never an open door
            log.error("dovecot policy request of %r: no answer within %.0f s", request.login, LATE_ANSWER_WAIT)
            action = service.fallback_action(request)
        # A block's answer, whichever action it carries (a domain's rule may
        # say HOLD where pcc.conf says REJECT).
        return action.split(" ", 1)[0] in BLOCK_ACTIONS

    def _answer_in_worker(self, ticket: RequestTicket, deliver) -> None:
        action = answer_in_time(self.service, ticket)
        if action is not None:
            deliver(action)

    def verify_request(self, request, client_address) -> bool:
        if client_allowed(client_address[0], self.service.settings.allowed_clients):  # as reloaded
            return True
        self._not_allowed(client_address[0])
        return False
