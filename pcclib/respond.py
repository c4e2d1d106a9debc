"""What follows a new block beyond the answer, on every channel a thief or an
on-call team uses: the account's open Dovecot sessions are ended, chat and
incident tools get a webhook, the administrators a mail that says what was
done, and (if asked) the account's owner a plain notice.  Nothing here runs on
a request's path: each channel has a thread of its own and retries with
back-off for a bounded time; each outcome is one log line and a metric.
"""
from __future__ import annotations

import base64
import collections
import datetime as dt
import hashlib
import hmac
import http.client
import ipaddress
import json
import queue
import re
import shlex
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
from typing import Callable, Iterable, Optional

from .common import json_nesting_within, log, start_thread, url_for_people, utcnow
from .config import MONITOR_ACTION, Settings
from .decision import CountrySeen, Journey
from .mailqueue import PostfixQueue, QueueError
from .notify import Notifier, block_notice, pcc_command

# A webhook receiver gets this long (seconds) for all of one POST: connecting,
# taking the body, answering (one that trickles its answer is cut there).
WEBHOOK_TIMEOUT = 10.0
# Dovecot's admin command: on this host's PATH, the site has Dovecot.
DOVEADM = "doveadm"
# Of an answer, pcc reads this much at most.
ANSWER_READ_LIMIT = 65536
# An event it could not take is tried again after this pause, doubled each
# time up to WEBHOOK_MAX_RETRY, for WEBHOOK_KEEP seconds; then dropped (ERROR).
WEBHOOK_FIRST_RETRY = 5.0
WEBHOOK_MAX_RETRY = 300.0
WEBHOOK_KEEP = 2 * 3600.0
# Events waiting for one receiver; beyond, the oldest are dropped (ERROR).
WEBHOOK_QUEUE_SIZE = 10000

# Ending a blocked account's Dovecot sessions: each try gets KICK_TIMEOUT
# seconds; failed tries are repeated (1, 2, 4... s apart) for KICK_TRY_FOR
# seconds, after which the administrators' mail says it failed and how to do it.
KICK_TIMEOUT = 10.0
KICK_TRY_FOR = 30.0
# How doveadm kick says it ended nothing: 2.3's command, 2.4's command and API.
NOTHING_KICKED = re.compile(r'^no users kicked|^0 connections kicked|^\[\{"count": "0"\}\]$')
# doveadm's answer is [["doveadmResponse", [{...}], "tag"]]: this deep at most.
DOVEADM_ANSWER_DEPTH = 4

# Blocks waiting for their actions (sessions, queued mail, mails, webhooks);
# beyond, a new one's actions are dropped (ERROR): a flood of made-up accounts
# must not grow the daemon without end.  The blocks themselves are unaffected.
RESPONDER_QUEUE_SIZE = 10000

# The account's owner is told at most this often (and this daemon remembers
# that many owners; beyond, it starts afresh).
OWNER_NOTICE_INTERVAL = dt.timedelta(days=1)
OWNERS_REMEMBERED = 20000
# The admins hear of an account on a NOTIFY network list at most this often per list.
LIST_NOTICE_INTERVAL = dt.timedelta(days=1)


# What a receiver, or doveadm's HTTP server, can fail with: all mean "not done".
NETWORK_ERRORS = (OSError, ValueError, http.client.HTTPException)


class Webhooks:
    """Posts events to every [notify] webhook_urls receiver, each from a
    thread of its own, in order, so that a receiver that hangs or fails
    delays no other and no request."""

    def __init__(self, settings: Settings, on_outcome: Callable[[str], None] = lambda outcome: None,
                 first_retry: float = WEBHOOK_FIRST_RETRY, keep: float = WEBHOOK_KEEP):
        self.settings = settings
        self.on_outcome = on_outcome
        self.first_retry, self.keep = first_retry, keep
        self._queues: dict = {}  # url -> deque of (monotonic time queued, body)
        self._wake: dict = {}  # url -> threading.Condition
        self._lock = threading.Lock()

    def send(self, event: dict) -> None:
        """Queue `event` for every receiver; returns at once."""
        body = encode_event(event)
        for url in self.settings.webhook_urls:
            with self._lock:
                if url not in self._queues:
                    self._queues[url] = collections.deque()
                    self._wake[url] = threading.Condition()
                    start_thread(self._run, "pcc-webhook", url)
                waiting, wake = self._queues[url], self._wake[url]
            with wake:
                if len(waiting) >= WEBHOOK_QUEUE_SIZE:
                    waiting.popleft()
                    log.error("webhook %s: %d events wait; dropped the oldest", url_for_people(url),
                              WEBHOOK_QUEUE_SIZE)
                    self.on_outcome("dropped")
                waiting.append((time.monotonic(), body))
                wake.notify()

    def send_now(self, event: dict) -> bool:
        """For the admin commands: one try per receiver, in this thread."""
        body, delivered = encode_event(event), True
        for url in self.settings.webhook_urls:
            try:
                self._post(url, body)
                log.info("webhook %s: %s delivered", url_for_people(url), event["event"])
            except NETWORK_ERRORS as error:
                log.error("webhook %s: %s not delivered: %s", url_for_people(url), event["event"], _why(error))
                delivered = False
        return delivered

    def waiting(self) -> int:
        with self._lock:
            return sum(len(waiting) for waiting in self._queues.values())

    def _run(self, url: str) -> None:
        waiting, wake = self._queues[url], self._wake[url]
        while True:
            with wake:
                while not waiting:
                    wake.wait()
                queued_at, body = waiting[0]
            self._deliver(url, queued_at, body)
            with wake:
                if waiting and waiting[0][1] is body:
                    waiting.popleft()

    def _deliver(self, url: str, queued_at: float, body: bytes) -> None:
        retry = self.first_retry
        while True:
            try:
                self._post(url, body)
                self.on_outcome("delivered")
                return
            except NETWORK_ERRORS as error:
                if time.monotonic() - queued_at + retry > self.keep:
                    log.error("webhook %s: an event undelivered for %.0f s is dropped: %s", url_for_people(url),
                              time.monotonic() - queued_at, _why(error))
                    self.on_outcome("dropped")
                    return
                log.warning("webhook %s: not delivered (trying again in %.0f s): %s", url_for_people(url), retry,
                            _why(error))
                self.on_outcome("failed")
                time.sleep(retry)
                retry = min(retry * 2, WEBHOOK_MAX_RETRY)

    def _post(self, url: str, body: bytes) -> None:
        headers = {"Content-Type": "application/json", "User-Agent": "pcc"}
        if self.settings.webhook_secret:
            headers["X-Pcc-Signature"] = "sha256=" + signature(body, self.settings.webhook_secret)
        post_within(url, body, headers, WEBHOOK_TIMEOUT)


class HttpRefused(ValueError):
    """An HTTP answer that did not take what was posted (not 2xx)."""


def post_within(url: str, body: bytes, headers: dict, seconds: float) -> bytes:
    """POST `body` to `url` and return the answer's body: all of it, from
    connecting to the answer's last byte, within `seconds` (the connection is
    cut then).  A 3xx is not followed: like any answer but 2xx it is
    HttpRefused.  A user:password in the URL is sent as HTTP basic
    authentication.  https certificates are verified."""
    parts = urllib.parse.urlsplit(url)
    headers = dict(headers)
    userinfo = parts.netloc.rpartition("@")[0]
    if userinfo:
        user, _colon, password = userinfo.partition(":")
        credentials = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(credentials).decode()
    # The port always given: http.client would read the last group of an IPv6 address as one.
    connection: http.client.HTTPConnection
    if parts.scheme == "https":
        connection = http.client.HTTPSConnection(parts.hostname or "", parts.port or 443, timeout=seconds,
                                                 context=ssl.create_default_context())
    else:
        connection = http.client.HTTPConnection(parts.hostname or "", parts.port or 80, timeout=seconds)
    cut = threading.Event()
    timer = threading.Timer(seconds, _cut, (connection, cut))
    timer.daemon = True
    timer.start()
    try:
        connection.request("POST", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""), body, headers)
        response = connection.getresponse()
        answer = response.read(ANSWER_READ_LIMIT)
    except NETWORK_ERRORS:
        if not cut.is_set():
            raise
    finally:
        timer.cancel()
        connection.close()
    if cut.is_set():  # a read cut short returns what it had, without an error
        raise TimeoutError(f"no whole answer within {seconds:.0f} s")
    if not 200 <= response.status < 300:
        raise HttpRefused(f"HTTP {response.status}")
    return answer


def _cut(connection: http.client.HTTPConnection, cut: threading.Event) -> None:
    cut.set()
    sock = connection.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in a read or a write
        except OSError:
            pass


def signature(body: bytes, secret: str) -> str:
    """HMAC-SHA256 of the body with [notify] webhook_secret, in hex."""
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def encode_event(event: dict) -> bytes:
    return json.dumps(event, ensure_ascii=False, sort_keys=True).encode()


def _why(error: BaseException) -> str:
    return str(getattr(error, "reason", None) or error) or type(error).__name__


class NotExactly(ValueError):
    """doveadm cannot be told to end the sessions of exactly this login."""


def doveadm_mask_problem(login: str) -> str:
    """Why `login` cannot go to doveadm kick as a user name, or "".
    doveadm reads its argument as a mask: `*` and `?` are wildcards (with no
    escape), an address or a.b.c.d/bits a client range; any of these would end
    other accounts' sessions.  (A leading `-` is safe: the command gets `--`
    before it, the HTTP API takes it as a value.)"""
    if "*" in login or "?" in login:
        return "it has a doveadm wildcard (* or ?)"
    try:
        ipaddress.ip_network(login.strip("[]").split("%")[0], strict=False)  # a zone id names an address too
    except ValueError:
        return ""
    return "doveadm reads it as a client address range"


class SessionEnder:
    """Ends an account's Dovecot sessions: through the doveadm HTTP API
    ([dovecot] doveadm_url), else the doveadm command on this host."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._failed_at = float("-inf")  # monotonic time of the latest try that failed for good

    @property
    def configured(self) -> bool:
        return bool(self.settings.doveadm_url or self.settings.doveadm_command)

    def end(self, login: str, try_for: float = KICK_TRY_FOR) -> tuple:
        """(True, what was ended) or (False, why not), after trying with
        back-off for up to `try_for` seconds; once only while the previous
        account's tries failed less than a minute ago (a burst of blocks
        must not queue behind a Dovecot that is down, 30 s each)."""
        if time.monotonic() - self._failed_at < 60:
            try_for = 0.0
        deadline, pause = time.monotonic() + try_for, 1.0
        while True:
            try:
                return True, self._kick(login)
            except NotExactly as refusal:
                return False, str(refusal)  # trying again would not change it
            except NETWORK_ERRORS + (subprocess.SubprocessError,) as error:
                problem = _why(error)
                if time.monotonic() + pause > deadline:
                    self._failed_at = time.monotonic()
                    return False, problem
                log.warning("ending the Dovecot sessions of %s failed (trying again in %.0f s): %s", login, pause,
                            problem)
                time.sleep(pause)
                pause *= 2

    def _kick(self, login: str) -> str:
        problem = doveadm_mask_problem(login)
        if problem:
            raise NotExactly(f"not asked of doveadm: {problem}, and would end other accounts' sessions")
        if self.settings.doveadm_url:
            return self._kick_over_http(login)
        # No shell: the login is one argument, after `--` so that none is an option.
        command = shlex.split(self.settings.doveadm_command) + ["kick", "--", login]
        result = subprocess.run(command, capture_output=True, text=True, timeout=KICK_TIMEOUT)
        if result.returncode not in (0, 68):  # 68 (EX_NOUSER): no session to end
            raise ValueError(f"{command[0]} exited with {result.returncode}: "
                             f"{(result.stderr or result.stdout).strip()[:200]}")
        return _sessions_text(result.stdout if result.returncode == 0 else "")

    def _kick_over_http(self, login: str) -> str:
        key = base64.b64encode(self.settings.doveadm_api_key.encode()).decode()
        body = json.dumps([["kick", {"mask": [login]}, "pcc"]]).encode()
        text = post_within(self.settings.doveadm_url, body, {
            "Content-Type": "application/json", "Authorization": f"X-Dovecot-API {key}"}, KICK_TIMEOUT).decode()
        if not json_nesting_within(text, DOVEADM_ANSWER_DEPTH):  # json descends on this thread's small stack
            raise ValueError(f"doveadm answered JSON nested deeper than {DOVEADM_ANSWER_DEPTH}: {text[:100]!r}")
        answer = json.loads(text or "null")
        if not isinstance(answer, list) or not answer or not isinstance(answer[0], list):
            raise ValueError(f"doveadm answered {str(answer)[:200]!r}")
        kind, payload = answer[0][0], answer[0][1] if len(answer[0]) > 1 else None
        if kind == "error":
            exit_code = payload.get("exitCode") if isinstance(payload, dict) else None
            if exit_code == 68:  # no such user logged in
                return "no session was open"
            raise ValueError(f"doveadm kick failed: {json.dumps(payload)[:200]}")
        return _sessions_text(json.dumps(payload))


def _sessions_text(output: str) -> str:
    """What doveadm kick said, as a short phrase for the log and the mail."""
    output = output.strip()
    if not output or output in ("[]", "null", "{}") or NOTHING_KICKED.search(output):
        return "no session was open"
    return f"its sessions were ended (doveadm: {' '.join(output.split())[:200]})"


class Responder:
    """The one place a new block (and the other events on-call teams watch)
    turns into actions beyond the answer.  The service and the admin
    commands call it; it never blocks them."""

    def __init__(self, settings: Settings, notifier: Notifier,
                 on_outcome: Callable[[str, str], None] = lambda channel, outcome: None,
                 network_of: Callable[[str], str] = lambda ip: ""):
        self.settings = settings
        self.network_of = network_of  # an IP address -> its network for people ("AS3320 Deutsche Telekom AG")
        self._lists_told: dict = {}  # (login, list label) -> when the admins were last told
        self.notifier = notifier
        self.on_outcome = on_outcome
        self.webhooks = Webhooks(settings, lambda outcome: on_outcome("webhook", outcome))
        self.sessions = SessionEnder(settings)
        self.queue = PostfixQueue(settings.postfix_config_directory, settings.queue_helper)
        self._blocks: queue.Queue = queue.Queue(RESPONDER_QUEUE_SIZE)
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self._owners_told: dict = {}  # login -> when its owner was last told
        # The addresses a rule (pcc --rule DOMAIN notice=...) adds for an
        # account's blocks: its domain's own admins, besides the site's.
        self.notice_for: Callable[[str], tuple] = lambda login: ()

    def reconfigure(self, settings: Settings) -> None:
        self.settings = self.webhooks.settings = self.sessions.settings = settings
        self.queue.config_directory = settings.postfix_config_directory

    # --- events -------------------------------------------------------------

    def blocked(self, login: str, countries: Iterable[CountrySeen], reason: str, source: str, action: str,
                journey: Optional[Journey] = None, network: str = "") -> None:
        """A new block (or a monitor-mode flag): done from this object's thread.
        network: the blocking request's network, for people."""
        self._enqueue(("block", login, tuple(countries), reason, source, action, journey, utcnow(), network))

    def _enqueue(self, job: tuple) -> None:
        try:
            self._blocks.put_nowait(job)
        except queue.Full:
            log.error("the actions on the block of %s are dropped: %d blocks wait for theirs", job[1],
                      RESPONDER_QUEUE_SIZE)
            self.on_outcome("responder", "dropped")
            return
        with self._lock:
            if self._thread is None:
                self._thread = start_thread(self._run, "pcc-responder")

    def end_sessions_soon(self, login: str, action: str) -> None:
        """A block decided while the database fails: its mail and webhook wait
        for the database (another daemon may have made it); its sessions and
        queued mail do not."""
        self._enqueue(("contain", login, action))

    def blocked_now(self, login: str, countries: Iterable[CountrySeen], reason: str, source: str,
                    action: str) -> bool:
        """For the admin commands (-b): everything in this thread; False when
        the administrators' mail could not be sent."""
        sessions = self._end_sessions(login, action, try_for=KICK_TIMEOUT)
        held = self._hold_queued(login, action)
        subject, body = self._block_mail(login, countries, reason, source, action, None, sessions, held)
        self.webhooks.send_now(block_event(self.settings, login, countries, reason, source, action, sessions,
                                           utcnow(), held=held, network_of=self.network_of))
        self._tell_owner(login, countries, action, utcnow(), now_please=True)
        return self.notifier.send_now(subject, body)

    def unblocked(self, login: str, by: str, now: dt.datetime) -> None:
        """For -u: the webhook, in this thread (the mail is the admin command's)."""
        self.webhooks.send_now(event(self.settings, "unblock", now, account=login, source=by,
                                     text=f"pcc: {login} was unblocked by {by}; its earlier countries no longer "
                                          "count."))

    def journey(self, login: str, journey: Journey, now: dt.datetime) -> None:
        """An impossible journey that blocks nothing (impossible_travel_action = notify)."""
        if self.notifier.send_journey(login, journey, now):
            self.webhooks.send(event(self.settings, "impossible_travel", now, account=login, journey=_journey(journey),
                                     text=f"pcc: impossible journey of {login}: {journey.origin.name} -> "
                                          f"{journey.destination.name} at {journey.speed_kmh:,.0f} km/h"))

    def network_seen(self, login: str, labels: tuple, address: str, country: Optional[str], network: str,
                     now: dt.datetime) -> None:
        """A request from an address on a NOTIFY network list: the admins'
        mail and a webhook, once a day per account and list."""
        with self._lock:
            labels = tuple(label for label in labels
                           if now - self._lists_told.get((login, label), now - LIST_NOTICE_INTERVAL)
                           >= LIST_NOTICE_INTERVAL)
            if len(self._lists_told) > OWNERS_REMEMBERED:
                self._lists_told.clear()
            for label in labels:
                self._lists_told[(login, label)] = now
        if not labels:
            return
        listed = ", ".join(labels)
        where = f"{address} ({country or 'no country'}{'; ' + network if network else ''})"
        monitor = " (monitor mode)" if self.settings.monitoring else ""
        text = (f"pcc: {login} used an address on the network list{'s' if len(labels) > 1 else ''} {listed}: "
                f"{where}. It is not blocked for that (action notify){monitor}.")
        body = (f"{text}\n\nA VPN, a proxy or a rented server can be the owner's own; a stolen password "
                f"can explain it too.\n\nTo block the account:\n  {pcc_command(self.settings, '-b', login)}\n"
                f"To see its countries:\n  {pcc_command(self.settings, '-s', login)}\n")
        self.notifier.send(f"pcc: {login} on network list {listed}", body)
        self.webhooks.send(event(self.settings, "network_list", now, account=login, lists=list(labels),
                                 client=address, country=country, network=network or None, text=text))

    def limit_reached(self, login: str, why: str, address: str, now: dt.datetime) -> None:
        """An account over a [limits] limit whose action is notify: the
        admins' mail and a webhook (the ledger asks once per limit and window)."""
        monitor = " (monitor mode)" if self.settings.monitoring else ""
        text = f"pcc: {login} is over a volume limit: {why}. Its mail still flows (action notify){monitor}."
        body = (f"{text}\n\nLast client: {address}\n\nA newsletter or a busy week can explain it; a stolen "
                f"password sending spam from the owner's own country can too.\n\nTo block the account:\n  "
                f"{pcc_command(self.settings, '-b', login)}\nTo see what it sent and from where:\n  "
                f"{pcc_command(self.settings, '-s', login)}\n")
        self.notifier.send(f"pcc: {login} over a volume limit", body)
        self.webhooks.send(event(self.settings, "limit_reached", now, account=login, client=address, text=text))

    def outage(self, started: bool, problem: str) -> None:
        """The database failed (started) or is back."""
        what = "outage_start" if started else "outage_end"
        text = (f"pcc on {socket.gethostname()}: the database failed; answering from memory: {problem}" if started
                else f"pcc on {socket.gethostname()}: the database is back")
        self.webhooks.send(event(self.settings, what, utcnow(), problem=problem, text=text))

    def backlog(self) -> int:
        return self._blocks.qsize() + self.webhooks.waiting()

    # --- the thread ---------------------------------------------------------

    def _run(self) -> None:
        while True:
            job = self._blocks.get()
            try:
                self._do(job)
            except Exception:  # a bug here must not stop the next block's actions
                log.exception("acting on the block of %s failed", job[1])

    def _do(self, job: tuple) -> None:
        if job[0] == "contain":
            self._end_sessions(job[1], job[2])
            self._hold_queued(job[1], job[2])
            return
        login, countries, reason, source, action, journey, at, network = job[1:]
        sessions = self._end_sessions(login, action)
        held = self._hold_queued(login, action)
        subject, body = self._block_mail(login, countries, reason, source, action, journey, sessions, held, network)
        self.notifier.send(subject, body)
        domain_admins = self.notice_for(login)
        if domain_admins:
            self.notifier.send_to(domain_admins, subject, body)
        self.webhooks.send(block_event(self.settings, login, countries, reason, source, action, sessions, at, journey,
                                       held, self.network_of, network))
        self._tell_owner(login, countries, action, at)

    def _end_sessions(self, login: str, action: str, try_for: float = KICK_TRY_FOR) -> str:
        """One line for the mail and the webhook: what happened to the account's sessions."""
        manual = (f"run: doveadm kick -- {shlex.quote(login)}" if not doveadm_mask_problem(login)
                  else "doveadm kick cannot name it alone: see doveadm who")
        if not self.sessions.configured and not site_has_dovecot(self.settings):
            return ""  # a site without Dovecot: the mail and the webhook's text say nothing of sessions
        if action == MONITOR_ACTION:
            return ("monitor mode: its Dovecot sessions would have been ended" if self.sessions.configured
                    else "monitor mode: nothing was done")
        if not self.sessions.configured:
            return f"its Dovecot sessions were not ended (pcc is not set up to: see docs/operations.md); {manual}"
        ended, what = self.sessions.end(login, try_for)
        if ended:
            log.info("Dovecot sessions of %s: %s", login, what)
            self.on_outcome("sessions", "ended")
            return what
        log.error("ending the Dovecot sessions of %s failed: %s; %s", login, what, manual)
        self.on_outcome("sessions", "failed")
        return f"ending its Dovecot sessions FAILED ({what}); {manual}"

    def _hold_queued(self, login: str, action: str) -> tuple:
        """(messages held or None, one line for the mail): the account's mail
        already in Postfix's queues, put on hold."""
        # A domain's rule may make its blocks HOLD on a site whose pcc.conf says REJECT.
        if not self.settings.holds_queued_mail and not (self.settings.hold_queued == "" and action == "HOLD"):
            return None, ""
        if action == MONITOR_ACTION:
            return None, "monitor mode: its queued mail would have been held"
        try:
            held = self.queue.hold_queued_of(login)
        except QueueError as error:
            log.error("holding the queued mail of %s failed: %s", login, error)
            self.on_outcome("queue", "failed")
            return None, f"holding its queued mail FAILED ({error}); see -r and postqueue -p"
        log.info("queued mail of %s: %d messages put on hold", login, held)
        self.on_outcome("queue", "held")
        return held, f"{held} message{'s' if held != 1 else ''} it had queued put on hold (-r releases, -e deletes)"

    def _block_mail(self, login, countries, reason, source, action, journey, sessions, held=(None, ""),
                    network: str = "") -> tuple:
        subject, body = block_notice(self.settings, login, countries, reason, source, action, journey,
                                     self.network_of)
        queued = f"Queued mail: {held[1]}\n" if held[1] else ""
        network = f"Network of the request that crossed the line: {network}\n" if network else ""
        sessions = f"Sessions: {sessions}\n" if sessions else ""
        return subject, body.replace("\n\n", f"\n\n{network}{sessions}{queued}\n", 1)

    def _tell_owner(self, login: str, countries: Iterable[CountrySeen], action: str, now: dt.datetime,
                    now_please: bool = False) -> None:
        """[notify] notify_account: one plain mail to the account itself, at
        most one a day, only for accounts of [mail] domains."""
        settings = self.settings
        domain = login.rpartition("@")[2]
        if not settings.notify_account or action == MONITOR_ACTION or "@" not in login or not settings.domains \
                or domain not in settings.domains:
            return
        with self._lock:
            last = self._owners_told.get(login)
            if last is not None and now - last < OWNER_NOTICE_INTERVAL:
                return
            if len(self._owners_told) > OWNERS_REMEMBERED:
                self._owners_told.clear()
            self._owners_told[login] = now
        names = ", ".join(sorted({seen.country for seen in countries}))
        contact = ", ".join(settings.notice) or "your mail administrator"
        subject = "Sending from your mail account was stopped"
        body = (f"Sending mail from your account {login} was stopped at {now:%Y-%m-%d %H:%M} UTC, because it was "
                f"used from too many countries in a short time ({names}).\n\nIf that was not you, someone may "
                f"know your password.  Contact {contact} to change it and to have sending turned back on.\n")
        sent = self.notifier.send_to([login], subject, body, now=now_please)
        log.info("the owner of %s %s told that its sending was stopped", login, "was" if sent else "could not be")


def event(settings: Settings, kind: str, at: dt.datetime, **fields) -> dict:
    """A webhook's body: what every event has, then its own fields."""
    return {"event": kind, "time": at.isoformat(timespec="seconds"), "host": socket.gethostname(),
            "mode": "monitor" if settings.monitoring else "enforce", **fields}


def site_has_dovecot(settings: Settings) -> bool:
    """Whether the site has Dovecot: pcc answers its policy or may end its
    sessions, or its doveadm is on this host.  Else the block's mail and
    webhook name no Dovecot sessions."""
    return bool(settings.dovecot_policy_port or settings.doveadm_url or settings.doveadm_command
                or shutil.which(DOVEADM))


def block_event(settings: Settings, login: str, countries: Iterable[CountrySeen], reason: str, source: str,
                action: str, sessions: str, at: dt.datetime, journey: Optional[Journey] = None,
                held: tuple = (None, ""), network_of: Callable[[str], str] = lambda ip: "",
                network: str = "") -> dict:
    monitor = action == MONITOR_ACTION
    countries = list(countries)
    names = ", ".join(settings.place_name(seen.country) for seen in countries)
    text = (f"pcc {'would have blocked' if monitor else 'blocked'} {login}"
            f"{'' if monitor else f' ({action})'}: {reason}. Countries: {names}. "
            f"{f'Sessions: {sessions}. ' if sessions else ''}Undo: {pcc_command(settings, '-u', login)}")
    return event(settings, "block", at, account=login, action=None if monitor else action,
                 would_have=monitor, reason=reason, door=source,
                 countries=[{"country": seen.country, "place": settings.place_name(seen.country),
                             "last_ip": seen.last_ip, "network": network_of(seen.last_ip) or None,
                             "first_seen": seen.first_seen.isoformat(timespec="seconds"),
                             "last_seen": seen.last_seen.isoformat(timespec="seconds")} for seen in countries],
                 network=network or None,
                 sessions=sessions, messages_held=held[0], queued_mail=held[1] or None,
                 journey=_journey(journey) if journey else None,
                 undo=[pcc_command(settings, "-u", login)], text=text)


def _journey(journey: Journey) -> dict:
    return {"from": journey.origin.name, "from_ip": journey.origin_ip, "to": journey.destination.name,
            "to_ip": journey.destination_ip, "km": round(journey.distance_km), "kmh": round(journey.speed_kmh),
            "departed": journey.departed.isoformat(timespec="seconds"),
            "arrived": journey.arrived.isoformat(timespec="seconds")}
