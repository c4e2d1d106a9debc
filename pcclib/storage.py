"""The database: SQLAlchemy models (sightings, the blocked list, the history
of blocks, travel passes, the change log the daemons poll), the Store that
reads and writes them on SQLite, MariaDB and PostgreSQL, the database's
clock, and how a database error is classified (a refused value, a transient
conflict, a fault no retry fixes).
"""
from __future__ import annotations

import collections
import datetime as dt
import functools
import os
import secrets
import shlex
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, cast

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from .common import UTC, first_line, log, set_clock_offset, user_name, utcnow
from .config import MONITOR_ACTION, ConfigError, Settings, prepare_threshold_of
from .decision import AccountHistory, CountrySeen
from .protocol import MAX_LOGIN_LENGTH

# The change log's writer for a change of the rules (pcc --rule): every
# daemon reads the rules again when it sees one.
RULES_WRITER = "rules"

# Logins per IN (...) list: well under every database's limit on parameters.
IN_LIST_SIZE = 500
# Rows fetched at a time when a daemon reads every login the database knows.
KNOWN_LOGINS_BATCH = 10000

# The database's clock and this host's may differ by this much (seconds)
# before pcc moves to the database's; from CLOCK_WARN_OFFSET on it says so.
CLOCK_TOLERANCE = 0.2
CLOCK_WARN_OFFSET = 2.0
# A reading of the database's clock is only as good as its round trip is
# short: the database may have read its clock anywhere in it (the answer then
# waiting in a pooler's queue, on a busy server, for a thread kept from the
# interpreter), so the offset is known to half the round trip.  The fastest
# of the last CLOCK_SAMPLES readings counts, and it moves the offset in force
# only when that lies outside what the reading allows.
CLOCK_SAMPLES = 8

# psycopg prepares a statement on the server once a connection has run it
# this often (its default).  Behind PgBouncer in transaction pooling (before
# its max_prepared_statements, 1.21) a client's statements run on whichever
# server connection the pool hands it, and preparing fails ("prepared
# statement ... already exists" / "does not exist"): dbcon's
# ?prepare_threshold=none turns preparing off, and so does the first such
# error (these SQLSTATEs), with a WARNING.
PREPARE_THRESHOLD = 5
PREPARED_STATEMENT_ERRORS = ("42P05", "26000")


class UTCDateTime(sa.types.TypeDecorator):
    """Aware UTC datetimes in Python, naive UTC in every database.

    MySQL and SQLite have no time zones; storing naive UTC everywhere keeps
    comparisons in SQL right on all three databases.
    """

    impl = sa.DateTime
    cache_ok = True

    def load_dialect_impl(self, dialect):
        if dialect.name in ("mysql", "mariadb"):
            from sqlalchemy.dialects import mysql

            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(sa.DateTime())

    def process_bind_param(self, value, dialect):
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value

    def process_result_value(self, value, dialect):
        return value.replace(tzinfo=UTC) if value is not None else None


def _login_type() -> sa.types.TypeEngine:
    """A login column: compared byte for byte everywhere.  MariaDB's default
    collation would make alicé@ equal alice@ and Alice@ equal alice@."""
    from sqlalchemy.dialects import mysql

    return sa.String(MAX_LOGIN_LENGTH).with_variant(
        mysql.VARCHAR(MAX_LOGIN_LENGTH, charset="utf8mb4", collation="utf8mb4_bin"), "mysql", "mariadb")


class Base(DeclarativeBase):
    """pcc's tables.  Indexes are only those declared inside CREATE TABLE (primary
    keys, unique constraints): a separate CREATE INDEX would need MariaDB's INDEX
    grant, and pcc promises to need only SELECT, INSERT, UPDATE and CREATE."""


class Sighting(Base):
    """An account seen sending from a country: one row per (login, country)."""

    __tablename__ = "pcc_sightings"
    # (last_seen, id) is unique anyway: the constraint is the one way to get an
    # index on last_seen inside CREATE TABLE on all three databases, for
    # cleanup (-c) and the history read's window.
    __table_args__ = (sa.UniqueConstraint("login", "country", name="uq_pcc_sightings_login_country"),
                      sa.UniqueConstraint("last_seen", "id", name="uq_pcc_sightings_recent"))

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    login: Mapped[str] = mapped_column(_login_type())
    country: Mapped[str] = mapped_column(sa.String(2))
    first_seen: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    last_seen: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    last_ip: Mapped[str] = mapped_column(sa.String(45))


class BlockedAccount(Base):
    """The blocked list: an account is blocked while blocked_since is set.

    A row exists only for accounts that were ever blocked.  Unblocking clears
    blocked_since and sets counting_since, so sightings from before the unblock
    no longer count.  pcc never DELETEs here: the daemon needs no DELETE grant,
    and "exactly one block" is a conditional UPDATE that only one writer wins.
    """

    __tablename__ = "pcc_blocked_accounts"

    login: Mapped[str] = mapped_column(_login_type(), primary_key=True)
    blocked_since: Mapped[Optional[dt.datetime]] = mapped_column(UTCDateTime(), nullable=True)
    block_id: Mapped[Optional[int]] = mapped_column(sa.Integer, nullable=True)
    counting_since: Mapped[Optional[dt.datetime]] = mapped_column(UTCDateTime(), nullable=True)


class Block(Base):
    """Every block ever made, kept after the unblock for the record."""

    __tablename__ = "pcc_blocks"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    login: Mapped[str] = mapped_column(_login_type())
    blocked_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    source: Mapped[str] = mapped_column(sa.String(16))  # "policy" or "admin"
    action: Mapped[str] = mapped_column(sa.String(16))
    reason: Mapped[str] = mapped_column(sa.Text)
    countries: Mapped[list] = mapped_column(sa.JSON)  # [{country, last_ip, first_seen, last_seen}]
    trigger: Mapped[Optional[dict]] = mapped_column(sa.JSON, nullable=True)  # the request that crossed the line
    unblocked_at: Mapped[Optional[dt.datetime]] = mapped_column(UTCDateTime(), nullable=True)


class Change(Base):
    """The change log: one row per account a write transaction changed, the
    last statement of that transaction.  Its id is given by the database, so
    the order in which daemons see each other's changes is the database's and
    no host's clock is in it; a lock wait comes before the id is taken.  With
    several primaries (Galera) ids interleave across nodes and leave gaps:
    the poll reads a few seconds back behind the newest id it saw
    (memory.CHANGES_SETTLE) instead of assuming them dense.  writer: the Store
    that wrote it (a daemon skips its own).  Old rows are trimmed by id."""

    __tablename__ = "pcc_changes"

    id: Mapped[int] = mapped_column(sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    login: Mapped[str] = mapped_column(_login_type())
    writer: Mapped[str] = mapped_column(sa.String(16))


class TravelPass(Base):
    """An administrator's pre-approval of a trip: until expires_at, sending from
    `country` does not count for `login`.  One row per (login, country); a new
    pass for the same country replaces the old one."""

    __tablename__ = "pcc_travel_passes"
    __table_args__ = (sa.UniqueConstraint("login", "country", name="uq_pcc_travel_passes_login_country"),)

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    login: Mapped[str] = mapped_column(_login_type())
    country: Mapped[str] = mapped_column(sa.String(2))
    granted_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    granted_by: Mapped[str] = mapped_column(sa.String(64))


class AllowedCountries(Base):
    """An administrator's restriction (--only-from): the account may send only
    from these countries; any other blocks it at once.  One row per account;
    cleared by setting `countries` to "" (the daemon needs no DELETE)."""

    __tablename__ = "pcc_allowed_countries"

    login: Mapped[str] = mapped_column(_login_type(), primary_key=True)
    countries: Mapped[str] = mapped_column(sa.String(255))  # "ES,PT"; "" = any
    set_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    set_by: Mapped[str] = mapped_column(sa.String(64))


class AdminAction(Base):
    """What an administrator did to an account (-b, -u, -r, -e, --allow,
    --only-from): who, when, and what pcc answered; -s shows the last.  The
    same line goes to syslog (mail.info)."""

    __tablename__ = "pcc_admin_actions"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    login: Mapped[str] = mapped_column(_login_type())
    done_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    action: Mapped[str] = mapped_column(sa.String(255))  # "unblock and release", "travel pass (FR, 3 days)"
    done_by: Mapped[str] = mapped_column(sa.String(255))  # "root (sudo from bob)"
    result: Mapped[str] = mapped_column(sa.Text)


class VolumeCount(Base):
    """What one daemon let an account send in one bucket of time
    (volume.BUCKET_SECONDS from `bucket` x that, on the database's clock):
    each daemon writes its own rows (`writer`) with its own counts, whole,
    and reads the others' (those touched lately); an account's volume is the
    sum.  Rows older than the longest window are deleted by the daemons
    (DELETE on pcc_volume, as on pcc_changes)."""

    __tablename__ = "pcc_volume"
    __table_args__ = (sa.UniqueConstraint("login", "bucket", "writer", name="uq_pcc_volume_login_bucket_writer"),
                      sa.UniqueConstraint("touched_at", "id", name="uq_pcc_volume_touched"))

    id: Mapped[int] = mapped_column(sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    login: Mapped[str] = mapped_column(_login_type())
    bucket: Mapped[int] = mapped_column(sa.Integer)
    writer: Mapped[str] = mapped_column(sa.String(16))
    messages: Mapped[int] = mapped_column(sa.Integer)
    recipients: Mapped[int] = mapped_column(sa.Integer)
    touched_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class RuleRow(Base):
    """A rule (pcc --rule): one key of pcc.conf set for one domain or one
    login.  Cleared by setting `value` to NULL (pcc needs no DELETE); each
    change is announced in the change log by RULES_WRITER."""

    __tablename__ = "pcc_rules"
    __table_args__ = (sa.UniqueConstraint("scope", "name", name="uq_pcc_rules_scope_name"),)

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    scope: Mapped[str] = mapped_column(_login_type())
    name: Mapped[str] = mapped_column(sa.String(64))
    value: Mapped[Optional[str]] = mapped_column(sa.Text, nullable=True)
    set_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    set_by: Mapped[str] = mapped_column(sa.String(255))


def sqlite_path(dbcon: str) -> str:
    """The SQLite file of a database URL, or "" for any other database."""
    url = sa.engine.make_url(dbcon)
    path = url.database or ""
    if url.get_backend_name() != "sqlite" or path in ("", ":memory:") or path.startswith("file:"):
        return ""
    return path


def safe_url(url) -> str:
    """A database URL fit for a log line: the password is masked."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except sa_exc.ArgumentError:
        return "<invalid database URL>"


def is_data_error(error: BaseException) -> bool:
    """The database refused this request's values (too long, not encodable...):
    a fault of one request, not an outage of the database."""
    return isinstance(error, (sa_exc.DataError, sa_exc.IntegrityError))


def is_database_error(error: BaseException) -> bool:
    """An error of the database or its driver, wrapped by SQLAlchemy or not
    (connect, pool checkout, read, write, commit): an outage unless it is a
    data error.  Anything else is a fault of pcc's own."""
    if isinstance(error, sa_exc.SQLAlchemyError):
        return True
    module = type(error).__module__.split(".")[0]
    return module in ("psycopg", "pymysql", "sqlite3", "MySQLdb", "psycopg2") and isinstance(error, Exception)


def _is_transient_conflict(error: sa_exc.DBAPIError) -> bool:
    """A deadlock or lock timeout between concurrent writers: worth one more try."""
    original = error.orig
    if getattr(original, "sqlstate", None) in ("40001", "40P01"):  # PostgreSQL
        return True
    arguments = getattr(original, "args", ())
    if arguments and arguments[0] in (1205, 1213):  # MariaDB/MySQL lock wait, deadlock
        return True
    return "database is locked" in str(original)  # SQLite


def _retry_on_conflict(method):
    @functools.wraps(method)
    def retrying(*args, **kwargs):
        for attempt in range(1, 5):
            try:
                return method(*args, **kwargs)
            except sa_exc.DBAPIError as error:
                if attempt == 4 or not _is_transient_conflict(error):
                    raise
                log.debug("database conflict (%s), trying again", first_line(error))
                time.sleep(0.01 * attempt)
    return retrying


def _inserted_id(result) -> int:
    """The id the database gave the row an INSERT wrote."""
    key = result.inserted_primary_key
    if key is None:
        raise sa_exc.InvalidRequestError("the INSERT returned no primary key")
    return key[0]


def sighting_rows(sightings: Iterable[tuple]) -> list:
    """(login, CountrySeen) pairs as Store.write_sightings takes them: rows in
    (login, country) order, so that two daemons writing overlapping batches
    take the row locks in the same order and cannot deadlock."""
    rows = [{"login": login, "country": seen.country, "first_seen": seen.first_seen,
             "last_seen": seen.last_seen, "last_ip": seen.last_ip} for login, seen in sightings]
    rows.sort(key=lambda row: (row["login"], row["country"]))
    return rows


@dataclass(frozen=True)
class DatabaseChanges:
    """What other writers changed after a change id (Store.changes_after)."""

    newest: int  # the highest change id the database had when asked (0: none)
    changes: Sequence  # (id, login) written by others
    accounts: Sequence  # (login, blocked_since, action and id of the block in force) of those logins that have a row
    database_now: dt.datetime  # the database's clock when asked
    rules_changed: bool = False  # an administrator changed the rules (pcc --rule)


class DatabaseClock:
    """pcc's time is the database server's: every daemon and admin command
    measures it (each poll, each command) and stamps and decides by it, so a
    host clock minutes off changes no decision.  (With several database
    servers each daemon follows the one it uses: keep those in NTP.)"""

    def __init__(self) -> None:
        self.offset = 0.0  # seconds the database's clock is ahead of this host's
        self._lock = threading.Lock()
        self._readings: collections.deque = collections.deque(maxlen=CLOCK_SAMPLES)  # (round trip, offset)

    def measured(self, database_now: dt.datetime, asked: float, answered: float) -> None:
        """database_now: the database's clock, read between the host's times
        asked and answered (time.time())."""
        if answered < asked:  # this host's clock was stepped back meanwhile: no reading
            return
        with self._lock:
            self._readings.append((answered - asked, database_now.timestamp() - (asked + answered) / 2))
            round_trip, offset = min(self._readings)
            if abs(offset - self.offset) < CLOCK_TOLERANCE + round_trip / 2:
                return
            was, self.offset = self.offset, offset
        set_clock_offset(offset)
        if abs(offset) >= CLOCK_WARN_OFFSET:
            log.warning("this host's clock is %.1f s %s the database's: pcc keeps the database's time", abs(offset),
                        "behind" if offset > 0 else "ahead of")
        elif abs(was) >= CLOCK_WARN_OFFSET:
            log.info("this host's clock agrees with the database's again")

    def follow(self, store: "Store") -> dt.datetime:
        """Measure now; the database's time."""
        asked = time.time()
        database_now = store.database_now()
        self.measured(database_now, asked, time.time())
        return database_now


def _sqlite_pragmas(dbapi_connection, _record, synchronous: str = "FULL") -> None:
    # WAL lets readers go on while one thread writes; several pcc processes on
    # one SQLite file (daemon + admin command) wait for each other, up to 30 s.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute(f"PRAGMA synchronous={synchronous}")
    cursor.close()


def _sqlite_pragmas_for_sightings(dbapi_connection, record) -> None:
    # Sightings need not reach the disk before the answer: in WAL mode NORMAL
    # survives a crash of pcc (kill -9), only a power cut may lose the last
    # few, and the next block's FULL commit syncs them too.  Blocks stay FULL.
    _sqlite_pragmas(dbapi_connection, record, synchronous="NORMAL")


class Store:
    """All database access.  One engine per process, shared by the threads."""

    def __init__(self, url: str, create_directory: bool = True):
        self.url = sa.engine.make_url(url)
        # Whether psycopg may prepare statements: dbcon's ?prepare_threshold
        # (pcc's to read, not libpq's), until the server shows it cannot.
        self.url, self.prepare_threshold = prepare_threshold_of(self.url, PREPARE_THRESHOLD)
        options = self._engine_options(create_directory)
        self.engine = sa.create_engine(self.url, **options)
        # The hot path (one read, now and then one upsert) runs in autocommit on
        # a pool of its own: no BEGIN/ROLLBACK round trips, and each of those
        # statements is atomic by itself.  Blocks and admin changes use `engine`.
        if self.url.get_backend_name() == "sqlite" and self.url.database in (None, "", ":memory:"):
            self.fast_engine = self.engine  # one in-memory database: one pool
        else:
            self.fast_engine = sa.create_engine(self.url, isolation_level="AUTOCOMMIT",
                                                pool_reset_on_return=None, **options)
        if self.url.drivername == "postgresql+psycopg":
            for engine in {self.engine, self.fast_engine}:
                sa.event.listen(engine, "checkout", self._set_prepare_threshold)
                sa.event.listen(engine, "handle_error", self._stop_preparing_if_pooled)
        # Sightings and volume counts, written in transactions of their own:
        # on SQLite a pool whose commits do not wait for the disk (see
        # _sqlite_pragmas_for_sightings; each costs a tenth of a FULL one),
        # elsewhere `engine`, each transaction asking for no wait itself
        # (write_sightings).
        self.sightings_engine = self.engine
        if self.url.get_backend_name() == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
            if self.fast_engine is not self.engine:
                sa.event.listen(self.fast_engine, "connect", _sqlite_pragmas_for_sightings)
                # Its writers take turns (the write-behind, a new place's commit, the volume counts): a few suffice.
                self.sightings_engine = sa.create_engine(self.url, **{**options, "pool_size": 4, "max_overflow": 4})
                sa.event.listen(self.sightings_engine, "connect", _sqlite_pragmas_for_sightings)
        self.dialect = self.engine.dialect.name
        # What the daemon asked of the database, for the metrics: reads of an
        # account's history, sighting writes, block transactions (retries too).
        self.operations: collections.Counter = collections.Counter()
        self._operations_lock = threading.Lock()
        # Names this Store's rows in the change log (each process has its own).
        self.writer = secrets.token_hex(8)
        self._history_query = self._build_history_query()
        self._sighting_merge = self._build_sighting_merge()
        self._prepare_raw_history_query()

    def _set_prepare_threshold(self, dbapi_connection, _record, _proxy) -> None:
        dbapi_connection.prepare_threshold = self.prepare_threshold

    def _stop_preparing_if_pooled(self, context) -> None:
        """A statement the server does not hold as prepared, or holds twice:
        statements are prepared no more, on any connection (each checkout
        sets it), and the administrator is told once."""
        if getattr(context.original_exception, "sqlstate", None) not in PREPARED_STATEMENT_ERRORS \
                or self.prepare_threshold is None:
            return
        self.prepare_threshold = None
        log.warning("database %s forgets or mixes up prepared statements (%s), as PgBouncer does in transaction "
                    "pooling: pcc prepares none from now on (add ?prepare_threshold=none to [db] dbcon to say so "
                    "from the start, or use session pooling)", safe_url(self.url),
                    first_line(context.original_exception))

    def _engine_options(self, create_directory: bool) -> dict:
        backend = self.url.get_backend_name()
        if backend == "sqlite":
            database = self.url.database or ""
            if create_directory and database and database != ":memory:" and not database.startswith("file:"):
                directory = os.path.dirname(os.path.abspath(database))
                os.makedirs(directory, mode=0o750, exist_ok=True)
            # check_same_thread: the pool hands a connection to one thread at a time.
            options: dict = {"connect_args": {"timeout": 30, "check_same_thread": False}}
            if database and database != ":memory:":
                # Sized for the connection threads: SQLAlchemy's default (5 + 10
                # overflow, closed on return) opened a connection, with its
                # PRAGMAs, for most requests at 32 connections.
                options.update(pool_size=32, max_overflow=32, pool_timeout=5)
            return options
        # Bounds on a thread stuck in a database that went away (the Watchdog has
        # answered Postfix long before): the connect, and unacknowledged data.
        connect_args: dict = {"connect_timeout": 3}
        if backend == "mysql":
            connect_args.update(read_timeout=10, write_timeout=10)
        elif backend == "postgresql":
            connect_args.update(tcp_user_timeout=10000, keepalives=1, keepalives_idle=30,
                                keepalives_interval=5, keepalives_count=3)
        # No pre-ping (a round trip per request): a connection that died with the
        # database fails once, SQLAlchemy then empties the pool, and the outage
        # logic in PolicyService answers meanwhile.
        return {
            "connect_args": connect_args,
            "pool_size": 16,
            "max_overflow": 32,
            "pool_timeout": 5,
            "pool_recycle": 3600,
        }

    def create_tables(self) -> None:
        """CREATE TABLE for what is missing; needs no grant beyond CREATE."""
        Base.metadata.create_all(self.engine, checkfirst=True)
        self._ensure_recent_index()

    def _ensure_recent_index(self) -> None:
        """Tables made by pcc 1.2 and older have no index on pcc_sightings.last_seen,
        which -c needs: add one, or say how."""
        inspector = sa.inspect(self.engine)
        table = Sighting.__tablename__
        found = inspector.get_indexes(table) + inspector.get_unique_constraints(table)
        if any(list(index["column_names"])[:1] == ["last_seen"] for index in found):
            return
        try:
            # Plain DDL: an sa.Index on Sighting's column would join pcc's
            # metadata for good, and every later create_all would add it again.
            with self.engine.begin() as connection:
                connection.execute(sa.text(f"CREATE INDEX ix_pcc_sightings_last_seen ON {table} (last_seen)"))
            log.warning("added the index ix_pcc_sightings_last_seen to %s (tables of pcc 1.2 and older lack it)",
                        table)
        except sa_exc.SQLAlchemyError as error:
            log.warning("%s has no index on last_seen and pcc may not add one (%s): -c reads the whole "
                        "table; run as the database owner: CREATE INDEX "
                        "ix_pcc_sightings_last_seen ON %s (last_seen)", table, first_line(error), table)

    def dispose(self) -> None:
        self.engine.dispose()
        self.fast_engine.dispose()
        self.sightings_engine.dispose()

    def prove_writable(self) -> None:
        """Write what the daemon writes, then roll back: a database the daemon
        could read but not write fails here, at start, not at the first block."""
        probe, now = "pcc-start-up-probe@invalid", utcnow()
        with self.engine.connect() as connection:
            self._merge_sighting(connection, probe, "ZZ", "::", now)
            connection.execute(self._upsert(BlockedAccount, {"login": probe}, ("login",)))
            block_id = _inserted_id(connection.execute(sa.insert(Block).values(
                login=probe, blocked_at=now, source="policy", action="HOLD", reason="start-up probe",
                countries=[])))
            self._swap_block(connection, probe, BlockedAccount.blocked_since.is_(None), now, block_id)
            self._log_changes(connection, [probe])
            connection.rollback()  # nothing of it is ever seen

    @staticmethod
    def _build_history_query():
        """One round trip for an account's history: its recent sightings (kind
        's'), its row on the blocked list with its block's action if it has one
        ('a'), its travel passes that ended no earlier than `since` ('p') and
        the countries it may send from ('o', when an administrator said)."""
        login = sa.bindparam("login", type_=sa.String())
        since = sa.bindparam("since", type_=UTCDateTime())
        sightings = sa.select(sa.literal_column("'s'").label("kind"), Sighting.country,
                              Sighting.first_seen.label("time1"), Sighting.last_seen.label("time2"),
                              Sighting.last_ip).where(Sighting.login == login, Sighting.last_seen >= since)
        account = (sa.select(sa.literal_column("'a'"), sa.null(), BlockedAccount.blocked_since,
                             BlockedAccount.counting_since, Block.action)
                   .outerjoin(Block, Block.id == BlockedAccount.block_id).where(BlockedAccount.login == login))
        passes = sa.select(sa.literal_column("'p'"), TravelPass.country, TravelPass.granted_at,
                           TravelPass.expires_at, sa.null()).where(TravelPass.login == login,
                                                                   TravelPass.expires_at >= since)
        only_from = sa.select(sa.literal_column("'o'"), AllowedCountries.countries, AllowedCountries.set_at,
                              sa.null(), sa.null()).where(AllowedCountries.login == login,
                                                          AllowedCountries.countries != sa.literal_column("''"))
        return sa.union_all(sightings, account, passes, only_from)

    def _build_sighting_merge(self):
        """An upsert that merges: the earliest first_seen and the latest
        last_seen (with its IP) of what is there and what comes, so batches
        written late, or by several daemons, never move a sighting back."""
        earliest, latest = (sa.func.min, sa.func.max) if self.dialect == "sqlite" else (sa.func.least,
                                                                                         sa.func.greatest)

        def merged(new) -> list:
            # MySQL applies these in order, each seeing the ones before: last_ip
            # first (a list keeps the order; a dict would follow the table's).
            return [("last_ip", sa.case((new.last_seen > Sighting.last_seen, new.last_ip), else_=Sighting.last_ip)),
                    ("first_seen", earliest(Sighting.first_seen, new.first_seen)),
                    ("last_seen", latest(Sighting.last_seen, new.last_seen))]

        names = ("login", "country", "first_seen", "last_seen", "last_ip")
        return self._upsert(Sighting, {name: sa.bindparam(name) for name in names}, ("login", "country"), merged)

    def _upsert(self, model, values, keys: tuple, updates=None):
        """INSERT that, where a row with the same `keys` exists, sets what
        updates(new) lists instead ([(column, expression)], `new` being the row
        that came), or does nothing when `updates` is None: in each dialect's
        own words (ON CONFLICT, ON DUPLICATE KEY UPDATE)."""
        insert = self._dialect_insert(model).values(values)
        if self.dialect in ("mysql", "mariadb"):
            new = insert.inserted
            return insert.on_duplicate_key_update(updates(new) if updates else [(keys[0], new[keys[0]])])
        if updates is None:
            return insert.on_conflict_do_nothing()
        return insert.on_conflict_do_update(index_elements=list(keys), set_=dict(updates(insert.excluded)))

    # --- the daemon's reads and writes -------------------------------------

    def _prepare_raw_history_query(self) -> None:
        """The history query is the one statement of every request.  It runs on
        the driver's cursor, compiled once here, with SQLAlchemy's own converters
        for the times: that halves its cost (measured: 146 -> 70 us on
        PostgreSQL, 256 -> 119 us on MariaDB) and keeps the same SQL."""
        dialect = self.fast_engine.dialect
        compiled = self._history_query.compile(dialect=dialect)
        self._history_sql = str(compiled)
        self._history_positions = compiled.positiontup  # None for named parameters
        time_type = UTCDateTime().dialect_impl(dialect)
        self._time_to_db = time_type.bind_processor(dialect) or (lambda value: value)
        from_db = time_type.result_processor(dialect, None)
        self._time_from_db = from_db or (lambda value: value)

    def _count(self, operation: str) -> None:
        with self._operations_lock:
            self.operations[operation] += 1

    def operation_counts(self) -> dict:
        with self._operations_lock:
            return dict(self.operations)

    def load_history(self, login: str, since: dt.datetime) -> AccountHistory:
        self._count("history_read")
        parameters: Any = {"login": login, "since": self._time_to_db(since)}
        if self._history_positions is not None:
            parameters = [parameters[name] for name in self._history_positions]
        dbapi_error = self.fast_engine.dialect.loaded_dbapi.Error
        try:
            connection = self.fast_engine.raw_connection()  # pooled; close() gives it back
        except dbapi_error as error:  # raw_connection() does not wrap the driver's own errors
            raise sa_exc.DBAPIError.instance(None, None, error, dbapi_error, connection_invalidated=True) from error
        try:
            cursor = connection.cursor()
            cursor.execute(self._history_sql, parameters)
            rows = cursor.fetchall()
            cursor.close()
        except self.fast_engine.dialect.loaded_dbapi.Error as error:
            if self.fast_engine.dialect.is_disconnect(error, connection.dbapi_connection, None):
                connection.invalidate(error)
            raise sa_exc.DBAPIError.instance(self._history_sql, parameters, error,
                                             self.fast_engine.dialect.loaded_dbapi.Error) from error
        finally:
            connection.close()
        return self._history_from_rows(rows)

    def _history_from_rows(self, rows: Sequence) -> AccountHistory:
        to_time = cast(Callable[[Any], dt.datetime], self._time_from_db)  # a time column is never NULL here
        sightings = tuple(CountrySeen(country, to_time(first), to_time(last), ip)
                          for kind, country, first, last, ip in rows if kind == "s")
        passes = {country: to_time(expires) for kind, country, _granted, expires, _ip in rows if kind == "p"}
        only_from = frozenset(code for kind, countries, *_rest in rows if kind == "o" for code in countries.split(","))
        for kind, _country, blocked_since, counting_since, action in rows:
            if kind == "a":
                return AccountHistory(to_time(blocked_since), to_time(counting_since), sightings,
                                      action if blocked_since is not None else None, passes, only_from=only_from)
        return AccountHistory(sightings=sightings, travel_passes=passes, only_from=only_from)

    @_retry_on_conflict
    def write_sightings(self, rows: list) -> None:
        """Merge many sightings in one transaction (one commit, one fsync).
        rows: dicts with Sighting's columns, in (login, country) order so that
        two daemons writing overlapping batches take the row locks in the same
        order and cannot deadlock."""
        self._count("sighting_write")
        with self.sightings_engine.begin() as connection:
            self._commit_without_waiting(connection)
            connection.execute(self._sighting_merge, rows)
            self._log_changes(connection, [row["login"] for row in rows])

    def _commit_without_waiting(self, connection) -> None:
        """This transaction's commit returns before the disk (and a synchronous
        standby) has it: sightings and counts, which every daemon sees at the
        commit all the same; a crash of the server may lose the last few,
        never a block (blocks commit as the server is configured).
        PostgreSQL: per transaction; SQLite: sightings_engine's PRAGMA;
        MariaDB has no such setting per transaction."""
        if self.dialect == "postgresql":
            connection.execute(sa.text("SET LOCAL synchronous_commit TO OFF"))

    def _log_changes(self, connection, logins: Iterable[str]) -> None:
        """The change log's rows for `logins`: the last statement of a write
        transaction, so that the id is taken after every lock it waited for."""
        rows = [{"login": login, "writer": self.writer} for login in sorted(set(logins))]
        if rows:
            connection.execute(sa.insert(Change), rows)

    def database_now(self) -> dt.datetime:
        """The database server's clock (UTC): the one time every daemon and
        every admin command agree on, whatever their hosts' clocks say."""
        with self.fast_engine.connect() as connection:
            return self._database_now(connection)

    def _database_now(self, connection) -> dt.datetime:
        if self.dialect == "postgresql":
            value = connection.execute(sa.text("SELECT clock_timestamp() AT TIME ZONE 'UTC'")).scalar()
        elif self.dialect in ("mysql", "mariadb"):
            value = connection.execute(sa.text("SELECT UTC_TIMESTAMP(6)")).scalar()
        else:  # SQLite's clock is this host's
            value = dt.datetime.fromisoformat(
                connection.execute(sa.text("SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')")).scalar())
        return value.replace(tzinfo=UTC)

    @_retry_on_conflict
    def write_volume(self, rows: list) -> None:
        """This daemon's counts (dicts of VolumeCount's columns but id), each
        row whole: written again, a row says the same."""
        self._count("volume_write")
        statement = self.__dict__.get("_volume_upsert")
        if statement is None:
            names = ("login", "bucket", "writer", "messages", "recipients", "touched_at")
            statement = self.__dict__["_volume_upsert"] = self._upsert(
                VolumeCount, {name: sa.bindparam(name) for name in names}, ("login", "bucket", "writer"),
                lambda new: [("messages", new.messages), ("recipients", new.recipients),
                             ("touched_at", new.touched_at)])
        rows = sorted(rows, key=lambda row: (row["login"], row["bucket"]))  # one lock order for every writer
        with self.sightings_engine.begin() as connection:
            self._commit_without_waiting(connection)
            connection.execute(statement, rows)

    def volume_touched_since(self, since: dt.datetime, from_bucket: int) -> Sequence:
        """Other writers' rows touched at or after `since`, of buckets from
        `from_bucket` on: (login, bucket, writer, messages, recipients)."""
        with self.fast_engine.connect() as connection:
            return connection.execute(
                sa.select(VolumeCount.login, VolumeCount.bucket, VolumeCount.writer, VolumeCount.messages,
                          VolumeCount.recipients)
                .where(VolumeCount.touched_at >= since, VolumeCount.bucket >= from_bucket,
                       VolumeCount.writer != self.writer)).all()

    def trim_volume(self, before: dt.datetime) -> int:
        """Delete the volume rows last touched before `before`."""
        with self.engine.begin() as connection:
            return connection.execute(sa.delete(VolumeCount).where(VolumeCount.touched_at < before)).rowcount

    def load_rules(self) -> list:
        """Every rule in force: (scope, name, value, set_at, set_by)."""
        with self.fast_engine.connect() as connection:
            return list(connection.execute(
                sa.select(RuleRow.scope, RuleRow.name, RuleRow.value, RuleRow.set_at, RuleRow.set_by)
                .where(RuleRow.value.is_not(None)).order_by(RuleRow.scope, RuleRow.name)).all())

    def known_logins(self) -> Iterator[str]:
        """Every login with a row of history (sightings, the blocked list,
        travel passes, --only-from), streamed: a million fit in no list."""
        query = sa.union(sa.select(Sighting.login), sa.select(BlockedAccount.login), sa.select(TravelPass.login),
                         sa.select(AllowedCountries.login))
        with self.engine.connect() as connection:  # a transaction: PostgreSQL's server-side cursor needs one
            for rows in connection.execution_options(yield_per=KNOWN_LOGINS_BATCH).execute(query).partitions():
                for (login,) in rows:
                    yield login

    def newest_change(self) -> int:
        with self.fast_engine.connect() as connection:
            return connection.execute(sa.select(sa.func.max(Change.id))).scalar() or 0

    def trim_changes(self, up_to: int) -> int:
        """Delete the change log's rows up to id `up_to` (needs DELETE on pcc_changes)."""
        with self.engine.begin() as connection:
            return connection.execute(sa.delete(Change).where(Change.id <= up_to)).rowcount

    def changes_after(self, after: int) -> "DatabaseChanges":
        """What other writers changed after change id `after`: the accounts,
        and the blocked-list row of those that have one, as it is now."""
        with self.fast_engine.connect() as connection:
            newest = connection.execute(sa.select(sa.func.max(Change.id))).scalar() or 0
            written = connection.execute(
                sa.select(Change.id, Change.login, Change.writer).where(Change.id > after,
                                                                        Change.writer != self.writer)
            ).all()
            changes = [(change_id, login) for change_id, login, writer in written if writer != RULES_WRITER]
            rules_changed = len(changes) < len(written)
            logins = sorted({login for _id, login in changes})
            accounts: list = []
            for start in range(0, len(logins), IN_LIST_SIZE):
                accounts += connection.execute(
                    sa.select(BlockedAccount.login, BlockedAccount.blocked_since, Block.action,
                              BlockedAccount.block_id)
                    .outerjoin(Block, Block.id == BlockedAccount.block_id)
                    .where(BlockedAccount.login.in_(logins[start:start + IN_LIST_SIZE]))
                ).all()
            database_now = self._database_now(connection)
        return DatabaseChanges(newest, changes, accounts, database_now, rules_changed)

    @_retry_on_conflict
    def record_block(self, login: str, now: dt.datetime, *, source: str, action: str, reason: str,
                     countries: list, trigger: Optional[dict] = None, sighting: Optional[tuple] = None,
                     replace_flag: bool = False) -> Optional[int]:
        """Put `login` on the blocked list.  Returns the new block's id, or None
        when the account was blocked already (by another thread or daemon).

        replace_flag: the account may be flagged by monitor mode, and a real
        block (action other than MONITOR_ACTION) then replaces the flag.
        The sighting that triggered the block is written in the same
        transaction: the block is committed before Postfix is answered.
        """
        self._count("block_transaction")
        with self.engine.connect() as connection:
            if sighting is not None:
                country, ip = sighting
                self._merge_sighting(connection, login, country, ip, now)
            connection.execute(self._upsert(BlockedAccount, {"login": login}, ("login",)))
            block_id = _inserted_id(connection.execute(
                sa.insert(Block).values(
                    login=login, blocked_at=now, source=source, action=action, reason=reason,
                    countries=countries, trigger=trigger,
                )
            ))
            # Compare-and-swap: of concurrent writers, only one moves the row.
            won = self._swap_block(connection, login, BlockedAccount.blocked_since.is_(None), now, block_id)
            if not won and replace_flag and action != MONITOR_ACTION:
                won = self._replace_flag(connection, login, now, block_id)
            if not won:
                connection.rollback()
                return None
            self._log_changes(connection, [login])
            connection.commit()
        return block_id

    @staticmethod
    def _swap_block(connection, login: str, unchanged, now: dt.datetime, block_id: int) -> bool:
        return connection.execute(
            sa.update(BlockedAccount).where(BlockedAccount.login == login, unchanged)
            .values(blocked_since=now, block_id=block_id)
        ).rowcount == 1

    def _replace_flag(self, connection, login: str, now: dt.datetime, block_id: int) -> bool:
        """A real block replaces a monitor-mode flag (which then ends); nothing
        else replaces a block."""
        flag_id = connection.execute(
            sa.select(BlockedAccount.block_id).join(Block, Block.id == BlockedAccount.block_id)
            .where(BlockedAccount.login == login, Block.action == MONITOR_ACTION)
        ).scalar()
        if flag_id is None or not self._swap_block(connection, login, BlockedAccount.block_id == flag_id, now,
                                                   block_id):
            return False
        connection.execute(sa.update(Block).where(Block.id == flag_id).values(unblocked_at=now))
        return True

    def _merge_sighting(self, connection, login: str, country: str, ip: str, now: dt.datetime) -> None:
        connection.execute(self._sighting_merge, {"login": login, "country": country, "first_seen": now,
                                                  "last_seen": now, "last_ip": ip})

    def _dialect_insert(self, model):
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        elif self.dialect in ("mysql", "mariadb"):
            from sqlalchemy.dialects.mysql import insert
        elif self.dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        else:
            raise ConfigError(f"database {self.dialect!r} is not supported (use SQLite, MariaDB/MySQL or PostgreSQL)")
        return insert(model)

    # --- what the daemon reads of the blocked list ------------------------------

    def enforced_blocks(self) -> dict:
        """The accounts blocked for real (not only flagged by monitor mode),
        each with its block's id: what each daemon keeps whole in memory."""
        with self.fast_engine.connect() as connection:
            rows = connection.execute(
                sa.select(BlockedAccount.login, BlockedAccount.block_id)
                .join(Block, Block.id == BlockedAccount.block_id)
                .where(BlockedAccount.blocked_since.is_not(None), Block.action != MONITOR_ACTION)
            ).all()
        return dict(rows)

    def block_fates(self, blocks: dict) -> dict:
        """What became of `blocks` (login -> the id of its block as a daemon
        learnt it, None if it never did), asked again: login -> the id of the
        block in force for an account blocked now, login -> None for one whose
        block the database ended (an unblock: that row, or for an unknown id
        the login's newest block).  A login left out was lost by the database
        (a failover to a standby behind, a restore from a backup)."""
        logins, ids = sorted(blocks), [block_id for block_id in blocks.values() if block_id is not None]
        unknown = sorted(login for login, block_id in blocks.items() if block_id is None)
        blocked: dict = {}
        rows: list = []
        with self.fast_engine.connect() as connection:
            for start in range(0, len(logins), IN_LIST_SIZE):
                blocked.update(connection.execute(
                    sa.select(BlockedAccount.login, BlockedAccount.block_id)
                    .join(Block, Block.id == BlockedAccount.block_id)
                    .where(BlockedAccount.login.in_(logins[start:start + IN_LIST_SIZE]),
                           BlockedAccount.blocked_since.is_not(None), Block.action != MONITOR_ACTION)).all())
            for start in range(0, len(ids), IN_LIST_SIZE):  # by primary key: pcc_blocks keeps every block ever
                rows += connection.execute(sa.select(Block.login, Block.id, Block.unblocked_at)
                                           .where(Block.id.in_(ids[start:start + IN_LIST_SIZE]))).all()
            for start in range(0, len(unknown), IN_LIST_SIZE):  # rare: a copy on disk written by pcc 1.5
                rows += connection.execute(sa.select(Block.login, Block.id, Block.unblocked_at)
                                           .where(Block.login.in_(unknown[start:start + IN_LIST_SIZE]))).all()
        ended = {(login, block_id): unblocked_at is not None for login, block_id, unblocked_at in rows}
        newest: dict = {}  # of the logins whose id is unknown
        for login, block_id, _unblocked_at in rows:
            if blocks.get(login, 0) is None and block_id > newest.get(login, 0):
                newest[login] = block_id
        fates = dict(blocked)
        for login, block_id in blocks.items():
            if login not in fates and ended.get((login, newest.get(login) if block_id is None else block_id), False):
                fates[login] = None
        return fates

    def count_blocked(self) -> dict:
        """{"enforce": blocked accounts, "monitor": accounts only flagged}."""
        monitor = sa.case((Block.action == MONITOR_ACTION, "monitor"), else_="enforce")
        with self.fast_engine.connect() as connection:
            rows = connection.execute(
                sa.select(monitor, sa.func.count()).select_from(BlockedAccount)
                .join(Block, Block.id == BlockedAccount.block_id)
                .where(BlockedAccount.blocked_since.is_not(None)).group_by(monitor)
            ).all()
        return dict(rows)


class AdminStore(Store):
    """The Store with the administrator's reads and writes (admin.py, and
    --replay --record's sightings): the daemon never needs them."""

    def has_tables(self) -> bool:
        return sa.inspect(self.engine).has_table(BlockedAccount.__tablename__)

    def has_table_of(self, model) -> bool:
        """Whether `model`'s table is there (one a newer pcc adds may not be yet, for a reading command)."""
        return sa.inspect(self.engine).has_table(model.__tablename__)

    def describe_server(self) -> tuple:
        """(the server that answered, for people; whether it takes writes: a
        PostgreSQL standby or a read_only MariaDB does not)."""
        with self.engine.connect() as connection:
            if self.dialect == "postgresql":
                address, port, standby, version = connection.execute(sa.text(
                    "SELECT inet_server_addr(), inet_server_port(), pg_is_in_recovery(), "
                    "current_setting('server_version')")).one()
                where = f"{address}:{port}" if address is not None else "its local socket"
                return f"PostgreSQL {version.split()[0]} at {where}{' (a standby)' if standby else ''}", not standby
            if self.dialect in ("mysql", "mariadb"):
                host, port, read_only, version = connection.execute(sa.text(
                    "SELECT @@hostname, @@port, @@read_only, VERSION()")).one()
                return f"MariaDB/MySQL {version} on {host}:{port}{' (read_only)' if read_only else ''}", \
                    not read_only
            return f"SQLite file {self.engine.url.database}", True

    def blocked_accounts(self) -> Sequence:
        """(BlockedAccount, Block) for every account on the blocked list, oldest first."""
        with Session(self.engine) as session:
            rows = session.execute(
                sa.select(BlockedAccount.login, BlockedAccount.blocked_since, Block)
                .join(Block, Block.id == BlockedAccount.block_id)
                .where(BlockedAccount.blocked_since.is_not(None))
                .order_by(BlockedAccount.blocked_since)
            ).all()
        return rows

    def account(self, login: str):
        with Session(self.engine) as session:
            account = session.execute(sa.select(BlockedAccount).where(BlockedAccount.login == login)).scalar()
            sightings = session.execute(
                sa.select(Sighting.country, Sighting.first_seen, Sighting.last_seen, Sighting.last_ip)
                .where(Sighting.login == login)
                .order_by(Sighting.last_seen)
            ).all()
            blocks = session.execute(
                sa.select(Block).where(Block.login == login).order_by(Block.blocked_at, Block.id)
            ).scalars().all()
        return account, [CountrySeen(*row) for row in sightings], list(blocks)

    def a_login_with_a_domain(self) -> Optional[str]:
        """One login with a domain pcc has counted or blocked, or None: whether
        this site's logins are user@domain or bare names."""
        with Session(self.engine) as session:
            for column in (Sighting.login, Block.login):
                login = session.execute(sa.select(column).where(column.contains("@")).limit(1)).scalar()
                if login is not None:
                    return login
        return None

    def travel_passes(self, login: str) -> list:
        """Every travel pass of `login` (expired ones too), by expiry."""
        with Session(self.engine) as session:
            return list(session.execute(
                sa.select(TravelPass).where(TravelPass.login == login).order_by(TravelPass.expires_at)
            ).scalars())

    @_retry_on_conflict
    def grant_travel_pass(self, login: str, countries: Iterable[str], now: dt.datetime,
                          expires_at: dt.datetime, granted_by: str) -> None:
        """One pass per country (a new one replaces an older one); an expiry of
        `now` ends the passes at once."""
        rows = [{"login": login, "country": country, "granted_at": now, "expires_at": expires_at,
                 "granted_by": granted_by[:64]} for country in countries]
        statement = self._upsert(TravelPass, rows, ("login", "country"),
                                 lambda new: [(name, new[name]) for name in ("granted_at", "expires_at", "granted_by")])
        with self.engine.begin() as connection:
            connection.execute(statement)
            self._log_changes(connection, [login])

    def set_rules(self, scope: str, values: dict, now: dt.datetime, set_by: str) -> None:
        """Set (value text) or clear (None) rules of `scope` in one
        transaction, announced to the daemons through the change log."""
        upsert = self._upsert(RuleRow, {name: sa.bindparam(name) for name in ("scope", "name", "value", "set_at",
                                                                             "set_by")},
                              ("scope", "name"), lambda new: [("value", new.value), ("set_at", new.set_at),
                                                              ("set_by", new.set_by)])
        with self.engine.begin() as connection:
            connection.execute(upsert, [{"scope": scope, "name": name, "value": value, "set_at": now,
                                         "set_by": set_by[:255]} for name, value in sorted(values.items())])
            connection.execute(sa.insert(Change), [{"login": scope, "writer": RULES_WRITER}])

    def rules_of(self, scope: str) -> list:
        """The names of `scope`'s rules in force."""
        with self.engine.connect() as connection:
            return list(connection.execute(sa.select(RuleRow.name).where(RuleRow.scope == scope,
                                                                         RuleRow.value.is_not(None))).scalars())

    def volume_of(self, login: str, since_bucket: int) -> list:
        """(bucket, messages, recipients) of every daemon's counts of `login` from `since_bucket` on."""
        with self.engine.connect() as connection:
            return list(connection.execute(
                sa.select(VolumeCount.bucket, sa.func.sum(VolumeCount.messages), sa.func.sum(VolumeCount.recipients))
                .where(VolumeCount.login == login, VolumeCount.bucket >= since_bucket)
                .group_by(VolumeCount.bucket)).all())

    def record_admin_action(self, login: str, now: dt.datetime, action: str, done_by: str, result: str) -> None:
        with self.engine.begin() as connection:
            connection.execute(sa.insert(AdminAction).values(login=login, done_at=now, action=action[:255],
                                                              done_by=done_by[:255], result=result))

    def last_admin_action(self, login: str) -> Optional[AdminAction]:
        """The latest administrator's action on `login`; None before any (or
        on a database of pcc 1.5, which has no such table until a command
        that changes something makes it)."""
        if not sa.inspect(self.engine).has_table(AdminAction.__tablename__):
            return None
        with Session(self.engine) as session:
            return session.execute(sa.select(AdminAction).where(AdminAction.login == login)
                                   .order_by(AdminAction.id.desc()).limit(1)).scalar()

    def allowed_countries(self, login: str) -> Optional[AllowedCountries]:
        with Session(self.engine) as session:
            row = session.get(AllowedCountries, login)
            return row if row is not None and row.countries else None

    @_retry_on_conflict
    def set_allowed_countries(self, login: str, countries: Iterable[str], now: dt.datetime, set_by: str) -> None:
        """--only-from: the countries `login` may send from; none = any again."""
        values = {"login": login, "countries": ",".join(sorted(countries)), "set_at": now, "set_by": set_by[:64]}
        statement = self._upsert(AllowedCountries, values, ("login",),
                                 lambda new: [(name, new[name]) for name in ("countries", "set_at", "set_by")])
        with self.engine.begin() as connection:
            connection.execute(statement)
            self._log_changes(connection, [login])

    @_retry_on_conflict
    def unblock(self, login: str, now: dt.datetime) -> Optional[int]:
        """Take `login` off the blocked list; its earlier sightings stop counting.
        Returns the id of the block that ended, or None if it was not blocked."""
        with self.engine.begin() as connection:
            block_id = connection.execute(
                sa.select(BlockedAccount.block_id).where(
                    BlockedAccount.login == login, BlockedAccount.blocked_since.is_not(None)
                )
            ).scalar()
            if block_id is None:
                return None
            ended = connection.execute(
                sa.update(BlockedAccount)
                .where(BlockedAccount.login == login, BlockedAccount.block_id == block_id)
                .values(blocked_since=None, block_id=None, counting_since=now)
            ).rowcount
            if ended != 1:
                return None
            connection.execute(sa.update(Block).where(Block.id == block_id).values(unblocked_at=now))
            self._log_changes(connection, [login])
        return block_id

    def merge_sightings(self, sightings: Iterable[tuple]) -> int:
        """Write (login, CountrySeen) pairs, keeping the earliest first_seen and
        the latest last_seen (with its IP) of what is there and what comes."""
        rows = sighting_rows(sightings)
        for start in range(0, len(rows), 1000):
            self.write_sightings(rows[start:start + 1000])
        return len(rows)

    def delete_sightings_before(self, cutoff: dt.datetime) -> int:
        with self.engine.begin() as connection:
            return connection.execute(sa.delete(Sighting).where(Sighting.last_seen < cutoff)).rowcount


# Database errors that no retry fixes: (MariaDB error number, or PostgreSQL
# SQLSTATE) -> what the administrator must do.
_PERMANENT_FAULTS = {
    1044: "grant the database to the user in [db] dbcon",
    1045: "check the user and password in [db] dbcon",
    1049: "create the database (CREATE DATABASE ...) or correct its name in [db] dbcon",
    1142: "GRANT SELECT, INSERT, UPDATE, CREATE ON <database>.* TO <user> (see docs/administration.md, Databases)",
    "28P01": "check the user and password in [db] dbcon",
    "28000": "allow the user in pg_hba.conf, or correct it in [db] dbcon",
    "no role": "create it, as PostgreSQL's superuser: CREATE ROLE <user> LOGIN PASSWORD '...'; then GRANT as "
               "docs/administration.md, Databases, says (or correct the user in [db] dbcon)",
    "3D000": "create the database (CREATE DATABASE ...) or correct its name in [db] dbcon",
    "42501": "GRANT SELECT, INSERT, UPDATE ON pcc's tables (and CREATE) TO the user (see docs/administration.md, Databases)",
}
_POSTGRESQL_CONNECTION_FAULTS = (
    ("password authentication failed", "28P01"),
    ("no pg_hba.conf entry", "28000"),
    ("role \"", "no role"),  # role "x" does not exist
    ("database \"", "3D000"),  # database "x" does not exist
)


def permanent_database_fault(settings: Settings, error: sa_exc.SQLAlchemyError) -> Optional[str]:
    """One line naming a fault that no retry fixes and its fix, or None for
    what may pass by itself (a server down or unreachable)."""
    original = getattr(error, "orig", None) or error
    url = sa.engine.make_url(settings.dbcon)
    if url.get_backend_name() == "sqlite":
        return _sqlite_fault(url.database or "", original)
    arguments = getattr(original, "args", None) or [None]
    # MariaDB's error number first (PyMySQL also sets a vague SQLSTATE such as 42000)
    code = arguments[0] if isinstance(arguments[0], int) else getattr(original, "sqlstate", None)
    if code in (None, "28000"):  # libpq reports a refused connection in words only
        code = next((state for words, state in _POSTGRESQL_CONNECTION_FAULTS if words in str(original)), code)
    fix = _PERMANENT_FAULTS.get(code)
    if fix is None:
        return None
    return f"database {safe_url(settings.dbcon)} refuses pcc: {first_line(error)}: {fix}"


def _sqlite_fault(path: str, error: BaseException) -> Optional[str]:
    import grp

    text = str(error)
    if not any(word in text for word in ("readonly", "read-only", "unable to open", "disk I/O")):
        return None
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    user = user_name(os.geteuid())
    group = grp.getgrgid(os.getegid()).gr_name
    try:
        if os.statvfs(directory).f_flag & os.ST_RDONLY:
            return f"{directory} is on a read-only file system: put [db] dbcon's SQLite file on a writable one"
    except OSError:
        pass
    for name in (path, path + "-wal", path + "-shm"):
        if os.path.exists(name) and not os.access(name, os.R_OK | os.W_OK):
            owner = user_name(os.stat(name).st_uid)
            return (f"{name} is owned by {owner} and not writable by user {user}: "
                    f"chown {user}:{group} {shlex.quote(name)}")
    if not os.access(directory, os.W_OK | os.X_OK):
        owner = user_name(os.stat(directory).st_uid) if os.path.exists(directory) else "nobody"
        return (f"{directory} is owned by {owner} and not writable by user {user} (SQLite writes its -wal and "
                f"-shm files there): chown {user}:{group} {shlex.quote(directory)}")
    return f"{path} cannot be written by user {user}: {text}"
