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
import socket
import urllib.error
import urllib.parse
import urllib.request
from typing import Optional

from .common import escape_controls, log
from .config import Settings
from .metrics import METRICS_TIMEOUT
from .protocol import DOVECOT_LOGIN, PolicyRequest, clean_value, client_allowed
from .service import DB_ANSWER_DEADLINE, PolicyService, RequestTicket

#
# Dovecot posts JSON before a login's password is checked (?command=allow), once
# more after a good password, and reports the outcome (?command=report, with
# "success").  pcc answers {"status": -1, "msg": reason} for a blocked account,
# else {"status": 0}; a successful login counts its country when count_logins
# is on.  Failed logins never count: anybody could otherwise lock anybody out.

# Dovecot's bodies are a few hundred bytes; anything much larger is not Dovecot.
DOVECOT_MAX_BODY = 16384

# Logins answered at once; more wait for a worker (each answered within
# DB_ANSWER_DEADLINE all the same, from memory when the database is slow).
DOVECOT_WORKERS = 32

# Dovecot's protocol names -> the door named in log lines, blocks and mails.
DOVECOT_DOORS = {"imap": "imap", "pop3": "pop3", "smtp": "smtp", "submission": "smtp", "lmtp": "lmtp",
                 "doveadm": "doveadm", "sieve": "sieve", "managesieve": "sieve"}


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
                         door=DOVECOT_DOORS.get(protocol.lower(), escape_controls(protocol[:16]) or "unknown"),
                         check_only=command == "allow", attributes=attributes)


class DovecotPolicyHandler(http.server.BaseHTTPRequestHandler):
    """One HTTP request of Dovecot's auth policy client."""

    protocol_version = "HTTP/1.1"  # Dovecot keeps its connections alive
    timeout = METRICS_TIMEOUT  # a client that stops sending does not keep its thread

    def do_POST(self) -> None:
        server = self.server
        settings = server.service.settings
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

    def _json_body(self) -> Optional[dict]:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._refuse(411, "bad_request", "no Content-Length")
            return None
        if not 0 <= length <= DOVECOT_MAX_BODY:
            self._refuse(413, "bad_request", f"a body of {length} bytes (at most {DOVECOT_MAX_BODY})")
            return None
        body = self.rfile.read(length)
        try:
            fields = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            fields = None
        if not isinstance(fields, dict):
            self._refuse(400, "bad_request", f"a body that is not a JSON object: {body[:60]!r}")
            return None
        return fields

    def _refuse(self, code: int, status: str, what: str) -> None:
        log.warning("dovecot policy request from %s refused (HTTP %d): %s", self.client_address[0], code, what)
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

    def log_message(self, *_arguments) -> None:  # pcc logs decisions and refusals itself
        pass


class DovecotPolicyServer(http.server.ThreadingHTTPServer):
    """Dovecot's auth policy port: a thin adapter onto the PolicyService."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, settings: Settings, service: "PolicyService"):
        self.service = service
        self.allowed_clients = settings.allowed_clients
        infos = socket.getaddrinfo(settings.host, settings.dovecot_policy_port, type=socket.SOCK_STREAM)
        self.address_family = infos[0][0]
        super().__init__(infos[0][4][:2], DovecotPolicyHandler)
        self._workers = concurrent.futures.ThreadPoolExecutor(DOVECOT_WORKERS, "pcc-dovecot")

    def answer_login(self, request: PolicyRequest) -> bool:
        """Whether a Dovecot login is refused: decided like a Postfix request,
        within DB_ANSWER_DEADLINE whatever the database does (then from memory:
        an account known to be blocked is refused, any other gets in)."""
        service = self.service
        ticket = RequestTicket(request)
        answer = self._workers.submit(service.answer, request, None, ticket)
        try:
            action = answer.result(timeout=DB_ANSWER_DEADLINE)
        except concurrent.futures.TimeoutError:
            action = service.answer_late(ticket)
        except Exception:  # a bug costs one answer, never the listener, and never opens the blocked list
            action = service.answer_after_error(request)
        return action == service.settings.block_reply

    def verify_request(self, request, client_address) -> bool:
        if client_allowed(client_address[0], self.allowed_clients):
            return True
        log.warning("dovecot policy connection from %s refused: not in [server] allowed_clients", client_address[0])
        return False

    def handle_error(self, request, client_address) -> None:
        log.exception("dovecot policy connection from %s: internal error", client_address[0])
