"""What each account sent, for the [limits]: counted in memory as this daemon
answers, per bucket of BUCKET_SECONDS on the database's clock; written to
pcc_volume behind the answer and the other daemons' rows read back, both
every VOLUME_SYNC_INTERVAL by one thread (upkeep.py runs it).  An account's
volume is the sum of every daemon's buckets in the window.

How far a limit can be overshot: a daemon does not see what another let
through in the last VOLUME_SYNC_INTERVAL (its write) + VOLUME_SYNC_INTERVAL
(this one's read) + the commit, so N daemons can together let through about
(N - 1) x the account's rate x that (half a second) beyond a limit; one
daemon never overshoots.

A message is one `instance` of the request (Postfix's name for one mail
transaction; its queue id comes only after the first RCPT); a recipient is
one request at RCPT, or recipient_count at DATA and END-OF-MESSAGE for a
message not counted at RCPT.  What was refused
(blocked, deferred) is not counted: a client that keeps retrying a deferred
message must not keep its own window full.
"""
from __future__ import annotations

import collections
import datetime as dt
import threading
from typing import Optional

from sqlalchemy import exc as sa_exc

from .common import first_line, log
from .decision import Volume
from .protocol import PolicyRequest
from .storage import Store

# The windows move in steps of this many seconds ("the last hour" is the
# current bucket and the 11 before it: between 55 and 60 minutes).
BUCKET_SECONDS = 300
HOUR_BUCKETS = 3600 // BUCKET_SECONDS
DAY_BUCKETS = 86400 // BUCKET_SECONDS
# How often this daemon's counts are written and the others' read (seconds).
VOLUME_SYNC_INTERVAL = 0.25
# A read looks back this far behind the last one (seconds): a row written
# just before it may commit just after.
READ_BACK = 5.0
# Rows untouched this long are deleted (every VOLUME_TRIM_INTERVAL seconds).
VOLUME_KEPT = dt.timedelta(seconds=86400 + 2 * BUCKET_SECONDS)
VOLUME_TRIM_INTERVAL = 600.0
# The messages of an account remembered as counted (their instances): a
# message's recipients come one request each, in a row.
MESSAGES_REMEMBERED = 32
# Postfix's states in which a request is about one message with all its recipients.
WHOLE_MESSAGE_STATES = ("DATA", "END-OF-MESSAGE")
COUNTED_STATES = ("RCPT", "MAIL") + WHOLE_MESSAGE_STATES


def bucket_of(now: dt.datetime) -> int:
    return int(now.timestamp()) // BUCKET_SECONDS


def window_sums(counts, bucket: int, messages: int = 0, recipients: int = 0,
                notified: frozenset = frozenset()) -> Volume:
    """The Volume of (bucket, messages, recipients) counts as seen from
    `bucket`, plus `messages` and `recipients` (the request at hand)."""
    hour_messages = day_messages = messages
    hour_recipients = day_recipients = recipients
    hour_start, day_start = bucket - HOUR_BUCKETS, bucket - DAY_BUCKETS
    for counted_at, sent, reached in counts:
        if counted_at > day_start:
            day_messages += sent
            day_recipients += reached
            if counted_at > hour_start:
                hour_messages += sent
                hour_recipients += reached
    return Volume(hour_messages, day_messages, hour_recipients, day_recipients, notified)


class VolumeLedger:
    """Every account's counts: this daemon's (written) and the others' (read)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._own: dict = {}  # login -> {bucket: [messages, recipients]}
        self._others: dict = {}  # login -> {(bucket, writer): (messages, recipients)}
        self._messages: dict = {}  # login -> OrderedDict of its last counted messages' keys
        self._unwritten: set = set()  # (login, bucket) of own counts not yet written
        self._notified: dict = {}  # login -> {limit: the bucket from which the admins may be told again}
        self._read_until: Optional[dt.datetime] = None  # the database's time of the last read
        self.failing = ""  # why the last write or read failed; "" when they work
        self._trimmed_at: Optional[dt.datetime] = None
        self._trim_failing = False

    # --- the request path ---------------------------------------------------

    def volume(self, request: PolicyRequest, now: dt.datetime) -> Volume:
        """The account's volume with this request in, as if let through."""
        login, bucket = request.login, bucket_of(now)
        messages, recipients = self._adds(request)
        with self._lock:
            own, others, told = self._own.get(login), self._others.get(login), self._notified.get(login)
            counts = [(counted_at, sent, reached) for counted_at, (sent, reached) in own.items()] if own else []
            if others:
                counts += [(counted_at, sent, reached) for (counted_at, _writer), (sent, reached) in others.items()]
            notified = frozenset(limit for limit, until in told.items() if until > bucket) if told else frozenset()
        return window_sums(counts, bucket, messages, recipients, notified)

    def add(self, request: PolicyRequest, now: dt.datetime) -> None:
        """Count a request that was let through."""
        login, bucket = request.login, bucket_of(now)
        with self._lock:
            messages, recipients = self._adds(request, remember=True)
            if not messages and not recipients:
                return
            counts = self._own.setdefault(login, {})
            if bucket not in counts:
                counts[bucket] = [0, 0]
                if len(counts) > DAY_BUCKETS + 1:
                    for old in [counted_at for counted_at in counts if counted_at <= bucket - DAY_BUCKETS]:
                        del counts[old]
            counts[bucket][0] += messages
            counts[bucket][1] += recipients
            self._unwritten.add((login, bucket))

    def notified(self, login: str, limit: str, hours: int, now: dt.datetime) -> None:
        """The admins were told `login` is over `limit`: not again in that window."""
        with self._lock:
            self._notified.setdefault(login, {})[limit] = bucket_of(now) + hours * HOUR_BUCKETS

    def _adds(self, request: PolicyRequest, remember: bool = False) -> tuple:
        """(messages, recipients) this request adds to its account's counts."""
        state = request.protocol_state.upper() or "RCPT"  # Postfix always says; a test client may not
        if state not in COUNTED_STATES:
            return 0, 0
        # instance, not queue_id: Postfix has no queue id yet at the first RCPT
        key = request.instance or request.queue_id
        seen = self._messages.get(request.login)
        new_message = not key or seen is None or key not in seen
        if remember and key and new_message:
            if seen is None:
                seen = self._messages[request.login] = collections.OrderedDict()
            seen[key] = None
            if len(seen) > MESSAGES_REMEMBERED:
                seen.popitem(last=False)
        if state in WHOLE_MESSAGE_STATES:
            if not new_message:
                return 0, 0  # counted at RCPT already
            return 1, max(1, _whole_number(request.attributes.get("recipient_count", "")))
        return (1 if new_message else 0), (1 if state == "RCPT" else 0)

    # --- the sync thread ------------------------------------------------------

    def sync(self, store: Store, now: dt.datetime) -> bool:
        """Write this daemon's new counts, read the others'.  False when the
        database failed (said once, until it works again)."""
        try:
            self._write(store, now)
            self._read(store, now)
        except sa_exc.SQLAlchemyError as error:
            problem = first_line(error)
            if not self.failing:
                log.warning("the volume counts cannot be shared through the database (each daemon limits on "
                            "what it counted itself until they can): %s", problem)
            self.failing = problem
            return False
        if self.failing:
            log.info("the volume counts are shared through the database again")
            self.failing = ""
        return True

    def _write(self, store: Store, now: dt.datetime) -> None:
        with self._lock:
            unwritten, self._unwritten = self._unwritten, set()
            rows = [{"login": login, "bucket": bucket, "writer": store.writer, "messages": counts[0],
                     "recipients": counts[1], "touched_at": now}
                    for login, bucket in unwritten
                    for counts in [self._own.get(login, {}).get(bucket)] if counts is not None]
        if not rows:
            return
        try:
            store.write_volume(rows)
        except sa_exc.SQLAlchemyError:
            with self._lock:
                self._unwritten |= unwritten  # written with the next round
            raise

    def _read(self, store: Store, now: dt.datetime) -> None:
        since = now - VOLUME_KEPT if self._read_until is None else self._read_until - dt.timedelta(seconds=READ_BACK)
        first_bucket = bucket_of(now) - DAY_BUCKETS
        rows = store.volume_touched_since(since, first_bucket)
        with self._lock:
            for login, bucket, writer, messages, recipients in rows:
                self._others.setdefault(login, {})[bucket, writer] = (messages, recipients)
        self._read_until = now

    def forget_old(self, now: dt.datetime) -> None:
        """Drop the buckets out of every window, and the accounts left with none."""
        oldest = bucket_of(now) - DAY_BUCKETS
        with self._lock:
            for login in list(self._own):
                counts = self._own[login]
                for counted_at in [counted_at for counted_at in counts if counted_at <= oldest]:
                    del counts[counted_at]
                if not counts:
                    del self._own[login]
                    self._messages.pop(login, None)
            for login in list(self._others):
                others = self._others[login]
                for key in [key for key in others if key[0] <= oldest]:
                    del others[key]
                if not others:
                    del self._others[login]
            current = bucket_of(now)
            self._notified = {login: told for login, told in self._notified.items()
                              if any(until > current for until in told.values())}

    def trim(self, store: Store, now: dt.datetime) -> None:
        """Every VOLUME_TRIM_INTERVAL: delete the rows out of every window."""
        if self._trimmed_at is not None and (now - self._trimmed_at).total_seconds() < VOLUME_TRIM_INTERVAL:
            return
        self._trimmed_at = now
        self.forget_old(now)
        try:
            store.trim_volume(now - VOLUME_KEPT)
        except sa_exc.SQLAlchemyError as error:
            (log.debug if self._trim_failing else log.warning)(
                "cannot trim the volume counts pcc_volume, which grow until they are (GRANT DELETE ON pcc_volume "
                "TO the daemon's user: see docs/administration.md, Databases): %s", first_line(error))
            self._trim_failing = True
            return
        self._trim_failing = False

    def accounts(self) -> int:
        with self._lock:
            return len(self._own.keys() | self._others.keys())


def _whole_number(text: str) -> int:
    return int(text) if text.isdigit() else 0
