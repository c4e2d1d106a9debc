"""The late answer: every request gets exactly one answer within
DB_ANSWER_DEADLINE, whatever the database does.  Written once here; both
doors (server.py, dovecot.py) call answer_in_time() and only read requests
and write answers.

A door runs the service's answer() in the request's own thread (no hand-over:
that cost a quarter of the throughput) while the Watchdog stands by with the
request's RequestTicket and a way to deliver a late answer.  Whoever claims
the ticket first answers: the request's thread when it is done in time, else
the Watchdog, with the service's answer_late(): the decision if it is made
(its recording goes on; a new block was put in the spool before the decision
was published), else one decided from memory.  A late answer takes no lock
that database work holds and never waits for the database: sightings go to
memory without waiting for a batch; only a block it decides from memory is
synced to the spool (a local file) first.  Should answering raise, the
answer is the fallback: what the blocked list in memory says, never an open
door for an account known to be blocked.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Optional, Protocol

from .common import start_thread
from .protocol import PolicyRequest

# How long a request may wait for the database before pcc answers without it
# (the Watchdog's deadline).  The database work goes on (a block still gets written).
DB_ANSWER_DEADLINE = 0.8
# How often the Watchdog looks for requests past their deadline (seconds).
WATCHDOG_INTERVAL = 0.05
# The longest a door's thread waits for a request's answer, on time or late
# (from memory: milliseconds, a spool fsync included); past it, only a fault of
# pcc's own, answered as one (never an open door for a blocked account).
LATE_ANSWER_WAIT = 10.0


class RequestTicket:
    """One request on its way through the service, shared with the Watchdog.

    Once the decision is made it is the answer, however long the database then
    takes to record it: a late answer repeats it rather than guessing again."""

    __slots__ = ("request", "decided", "reading_database", "lock", "spooled", "_claimed")

    def __init__(self, request: PolicyRequest):
        self.request = request
        # (the request with its country, the Decision, now); set once a new
        # block is in the spool, so that a late answer needs no I/O
        self.decided: Optional[tuple] = None
        self.reading_database = False  # waiting for the account's history
        self.lock = threading.Lock()
        self.spooled: Optional[dict] = None  # a decided new block's spool entry, until its commit
        self._claimed = False

    def claim(self) -> bool:
        """True for the one of the request's thread and the Watchdog that answers."""
        with self.lock:
            if self._claimed:
                return False
            self._claimed = True
            return True


class Answering(Protocol):
    """What the late answer needs of the service (service.PolicyService)."""

    watchdog: "Watchdog"

    def answer(self, request: PolicyRequest, now=None, ticket: Optional[RequestTicket] = None) -> str: ...

    def answer_after_error(self, request: Optional[PolicyRequest]) -> str: ...


def answer_in_time(service: Answering, ticket: RequestTicket,
                   deliver: Optional[Callable[[str], None]] = None) -> Optional[str]:
    """Answer `ticket`'s request in this thread while the service's Watchdog
    stands by: the action when this thread answers first; None when the
    Watchdog did (it delivered its own; this thread's, late, is not sent).
    deliver: how the Watchdog delivers, from now on; None when it has been
    watching since the request was queued (or nobody stands by)."""
    if deliver is not None:
        service.watchdog.watch(ticket, deliver)
    try:
        action = service.answer(ticket.request, ticket=ticket)
    except Exception:  # a bug costs one answer, never the door, and never opens the blocked list
        action = service.answer_after_error(ticket.request)
    finally:
        service.watchdog.unwatch(ticket)
    return action if ticket.claim() else None


class Watchdog:
    """Answers, through its door's `deliver`, every request whose ticket is
    still unclaimed DB_ANSWER_DEADLINE seconds after it was watched: with
    late_answer(ticket), or after_error(request) should that raise."""

    def __init__(self, late_answer: Callable[[RequestTicket], str],
                 after_error: Callable[[Optional[PolicyRequest]], str]):
        self.late_answer = late_answer
        self.after_error = after_error
        self._deadlines: dict = {}  # ticket -> (monotonic deadline, deliver)
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None

    def watch(self, ticket: RequestTicket, deliver: Callable[[str], None]) -> None:
        with self._lock:
            self._deadlines[ticket] = (time.monotonic() + DB_ANSWER_DEADLINE, deliver)
            if self._thread is None:
                self._thread = start_thread(self._run, "pcc-watchdog")

    def unwatch(self, ticket: RequestTicket) -> None:
        with self._lock:
            self._deadlines.pop(ticket, None)

    def _run(self) -> None:
        while True:
            time.sleep(WATCHDOG_INTERVAL)
            now = time.monotonic()
            with self._lock:
                late = [(ticket, deliver) for ticket, (deadline, deliver) in self._deadlines.items()
                        if deadline <= now]
                for ticket, _deliver in late:
                    del self._deadlines[ticket]
            for ticket, deliver in late:
                if ticket.claim():
                    deliver(self.late_action(ticket))

    def late_action(self, ticket: RequestTicket) -> str:
        try:
            return self.late_answer(ticket)
        except Exception:  # never leave a door without an answer
            return self.after_error(ticket.request)
