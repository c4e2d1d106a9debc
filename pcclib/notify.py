"""Mail to the administrators: the text of each notice (new block, impossible
journey) and the Notifier that sends them from a thread of its own, retrying,
so that no request ever waits for an SMTP server.
"""
from __future__ import annotations

import collections
import datetime as dt
import email.message
import email.utils
import os
import queue
import shlex
import smtplib
import ssl
import socket
import sys
import threading
import time
from typing import Callable, Iterable, Optional

from .common import PROGRAM, log, start_thread
from .config import MONITOR_ACTION, Settings
from .decision import CountrySeen, Journey

# Impossible-travel mails about one account are sent at most this often (an
# account that flips between a VPN and its home line would cause one a flip).
TRAVEL_NOTICE_INTERVAL = dt.timedelta(hours=6)
# Accounts whose latest travel mail is remembered; beyond, the memory starts afresh.
TRAVEL_NOTICES_REMEMBERED = 20000
# Mails waiting for the SMTP server; beyond, a new one is dropped (ERROR): a
# relay down during a flood of blocks must not grow the daemon without end.
OUTBOX_SIZE = 10000


class Notifier:
    """Sends admin emails from a background thread, so Postfix never waits.

    A message that cannot be sent is retried with a growing pause (up to
    `max_backoff` seconds) for as long as the daemon runs; each failure is logged.
    """

    def __init__(self, settings: Settings, *, first_backoff: float = 5.0, max_backoff: float = 300.0):
        self.settings = settings
        self.first_backoff = first_backoff
        self.max_backoff = max_backoff
        self.sender = settings.sender or f"pcc@{socket.getfqdn()}"
        self._outbox: queue.Queue = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self._start_lock = threading.Lock()
        self._queued_at: collections.deque = collections.deque()  # monotonic times of the unsent, oldest first
        self._travel_noticed: dict = {}  # login -> when its last impossible-travel mail went

    def send(self, subject: str, body: str) -> None:
        """Queue a notification to the administrators; returns at once."""
        if self.settings.notice:
            self._queue(self._compose(subject, body))

    def send_to(self, recipients: Iterable[str], subject: str, body: str, now: bool = False) -> bool:
        """A mail to others than the administrators (an account's owner):
        queued, or with `now` sent in this thread (False when it failed)."""
        message = self._compose(subject, body, recipients)
        if not now:
            self._queue(message)
            return True
        return self._deliver_now(message, "mail")

    def _deliver_now(self, message: email.message.EmailMessage, what: str) -> bool:
        try:
            self._deliver(message)
            return True
        except (OSError, smtplib.SMTPException) as error:
            log.error("%s to %s not sent: %s", what, message["To"], error)
            return False

    def _queue(self, message: email.message.EmailMessage) -> None:
        with self._start_lock:
            if len(self._queued_at) >= OUTBOX_SIZE:
                log.error("mail to %s dropped (%d wait for the SMTP server): %s", message["To"], OUTBOX_SIZE,
                          message["Subject"])
                return
            self._queued_at.append(time.monotonic())
        self._outbox.put(message)
        with self._start_lock:
            if self._thread is None:
                self._thread = start_thread(self._run, "pcc-notifier")

    def send_journey(self, login: str, journey: Journey, now: dt.datetime) -> bool:
        """The impossible-travel mail, at most one per account every
        TRAVEL_NOTICE_INTERVAL; False when one went too recently."""
        with self._start_lock:
            last = self._travel_noticed.get(login)
            if last is not None and now - last < TRAVEL_NOTICE_INTERVAL:
                return False
            if len(self._travel_noticed) > TRAVEL_NOTICES_REMEMBERED:
                self._travel_noticed.clear()
            self._travel_noticed[login] = now
        self.send(*travel_notice(self.settings, login, journey))
        return True

    def send_now(self, subject: str, body: str) -> bool:
        """For the admin commands: send in this thread, report success."""
        if not self.settings.notice:
            return True
        return self._deliver_now(self._compose(subject, body), "notification")

    def backlog(self) -> tuple:
        """(notifications not sent yet, seconds the oldest of them has waited)."""
        with self._start_lock:
            if not self._queued_at:
                return 0, 0.0
            return len(self._queued_at), time.monotonic() - self._queued_at[0]

    def _compose(self, subject: str, body: str, recipients: Iterable[str] = ()) -> email.message.EmailMessage:
        message = email.message.EmailMessage()
        message["From"] = self.sender
        message["To"] = ", ".join(recipients or self.settings.notice)
        message["Subject"] = header_safe(subject)
        message["Date"] = email.utils.formatdate(localtime=True)
        message["Message-ID"] = email.utils.make_msgid(domain=socket.gethostname())
        message["Auto-Submitted"] = "auto-generated"
        message.set_content(body)
        return message

    def _run(self) -> None:
        while True:
            message = self._outbox.get()
            backoff = self.first_backoff
            while True:
                try:
                    self._deliver(message)
                    log.info("notification sent to %s: %s", message["To"], message["Subject"])
                    with self._start_lock:
                        self._queued_at.popleft()
                    break
                except (OSError, smtplib.SMTPException) as error:
                    log.error("notification to %s not sent (retrying in %.0f s): %s",
                              message["To"], backoff, error)
                    time.sleep(backoff)
                    backoff = min(backoff * 2, self.max_backoff)

    def _deliver(self, message: email.message.EmailMessage) -> None:
        settings = self.settings
        with smtplib.SMTP(settings.mailsrv, settings.mailport, timeout=30) as smtp:
            if settings.mail_starttls:  # refused (SMTPNotSupportedError) by a server that does not offer it
                smtp.starttls(context=ssl.create_default_context(cafile=settings.mail_tls_ca_file or None))
            if settings.mail_user:
                smtp.login(settings.mail_user, settings.mail_password)
            smtp.send_message(message)  # to its To: the administrators, or an account's owner


def header_safe(text: str) -> str:
    """A header value from untrusted text (a SASL login): one line, and no RFC
    2047 encoded word, which the email package would decode, CR/LF included,
    into headers of the attacker's choosing."""
    return " ".join(text.split()).replace("=?", "=\\?")


def pcc_command(settings: Settings, option: str, login: str) -> str:
    """The admin command line an email tells the reader to run, quoted for a
    shell: a login with `...` or $(...) must not run when pasted."""
    ran_as = sys.argv[0] if sys.argv else ""
    program = os.path.abspath(ran_as) if os.path.basename(ran_as) in ("pcc", "pcc.py") else PROGRAM
    return shlex.join([program, "--config", settings.config_path, option, login])


def block_notice(settings: Settings, login: str, countries: Iterable[CountrySeen], reason: str,
                 source: str, action: str, journey: Optional[Journey] = None,
                 network_of: Callable[[str], str] = lambda ip: "") -> tuple:
    """Subject and body of the mail about a new block (`action` as recorded:
    MONITOR_ACTION when monitor mode only flagged the account)."""
    if action == MONITOR_ACTION:
        subject = f"pcc: account {login} would be blocked (monitor mode)"
        lines = [f"pcc would have blocked the account {login}; it runs in monitor mode, so its mail still flows.",
                 "", f"Why: {reason}",
                 f"In enforce mode every message of this account would now be answered: {settings.block_reply}"]
    else:
        subject = f"pcc: account {login} blocked ({action})"
        lines = [f"pcc has blocked the account {login}.", "", f"Why: {reason}",
                 f"Every message of this account is now answered: {action} {settings.reason}".rstrip()]
        if settings.dovecot_policy_port:
            lines.append("Its Dovecot logins (IMAP, POP3, SMTP AUTH) are refused too.")
        if source.startswith("dovecot/"):
            lines.append("The login that crossed the line was granted before pcc heard of it (see Sessions).")
    if journey is not None:
        lines += ["", *journey_lines(settings, journey)]
    lines += ["", "Countries it sent from (last client IP, first and last time seen UTC, network):"]
    for seen in countries:
        lines.append(f"  {settings.place_name(seen.country)}  {seen.last_ip:<39}  {seen.first_seen:%Y-%m-%d %H:%M:%S}"
                     f"  {seen.last_seen:%Y-%m-%d %H:%M:%S}  {network_of(seen.last_ip)}".rstrip())
    if action == MONITOR_ACTION:
        lines += ["", "To clear the flag (its earlier countries then stop counting):"]
    else:
        lines += ["", "If the account is compromised, change its password first.  Then unblock it with:"]
    lines += [f"  {pcc_command(settings, '-u', login)}", "", f"Decided by: {source} on {socket.gethostname()}"]
    return subject, "\n".join(lines) + "\n"


def journey_lines(settings: Settings, journey: Journey) -> list:
    minutes = (journey.arrived - journey.departed).total_seconds() / 60
    origin, destination = journey.origin.name, journey.destination.name
    return [
        "The impossible journey:",
        f"  from  {origin:<30} {journey.origin_ip:<39} at {journey.departed:%Y-%m-%d %H:%M:%S} UTC",
        f"  to    {destination:<30} {journey.destination_ip:<39} at {journey.arrived:%Y-%m-%d %H:%M:%S} UTC",
        f"  {journey.distance_km:,.0f} km in {minutes:,.1f} minutes: at least {journey.speed_kmh:,.0f} km/h "
        f"(allowing for GeoIP accuracy); the limit is {settings.max_travel_speed_kmh:,.0f} km/h",
    ]


def travel_notice(settings: Settings, login: str, journey: Journey) -> tuple:
    """The mail for impossible_travel_action = notify: nothing is blocked."""
    lines = [f"The account {login} sent mail from two places no one can travel between in the time between them.",
             "It is NOT blocked (impossible_travel_action = notify).  A VPN or a mobile carrier can explain this;",
             "a stolen password can too.", "", *journey_lines(settings, journey), "",
             "To block the account:", f"  {pcc_command(settings, '-b', login)}"]
    return f"pcc: impossible travel by {login}", "\n".join(lines) + "\n"
