"""The fault matrix (#19): what every kind of account gets on both doors while
the database fails in each way, from a daemon that keeps running and from
one restarted in the middle of the fault.  docs/operations.md's table ("What each fault
answers") is this test's expectations.

Daemon A reaches the database through a TCP proxy the test controls, as a
user with only the grants pcc needs; daemon B (its clock 10 minutes behind)
uses it directly and is never cut off.  Accounts:
  before    blocked by an administrator before A started
  this      blocked by A
  other     blocked by B
  crossing  three countries in A's memory; sends from a fourth during the fault
  never     never seen
  steady    like crossing, on daemon C (also through the proxy), which keeps
            running through the fault

When the fault ends no request reaches A (restarted) or C: each must find
the database by itself, write its spooled block, and say the outage ended,
in the log and in --health.
"""
import signal
import threading
import time

import pytest
import sqlalchemy as sa
from conftest import (
    SERVER_DATABASES,
    WORKER,
    TcpProxy,
    blocked_logins,
    dovecot_allow,
    free_port,
    fresh_database,
    ip_in,
    pcc_command,
    run_pcc,
    wait_for_log,
    wait_until_visible,
    walk,
)

from pcclib.storage import Base, Store

API_HEADER = "Authorization: Basic cGNjOm1hdHJpeA=="
BLOCKED = ("before", "this", "other", "crossing")
LOCK_SECONDS = 10.0
# From the fault's end, with no request: the spool written, the outage over.
# docs/operations.md says "within 2 s" (a probe a second); the rest is this test's margin
# on a machine whose both cores are busy.
OUTAGE_ENDS_WITHIN = 5.0
FAULTS = ["refused", "black hole", "reset mid-query", "lock held 10 s", "grants revoked", "restarted"]


def login(name: str) -> str:
    return f"{name}@example.com"


def allow(port: int, name: str) -> int:
    """Dovecot's question before the password: -1 refused, 0 let in."""
    return dovecot_allow(port, login(name), API_HEADER)


class LimitedUser:
    """A database user with SELECT, INSERT, UPDATE and DELETE on pcc's tables
    (granted table by table: a revoke then reaches open connections at once)."""

    def __init__(self, admin_url: str):
        self.admin = sa.engine.make_url(admin_url)
        self.name = f"pcc_matrix_{WORKER or 'main'}"
        self.engine = sa.create_engine(self.admin, isolation_level="AUTOCOMMIT")
        self.postgresql = self.admin.get_backend_name() == "postgresql"
        with self.engine.connect() as connection:
            if self.postgresql:
                exists = connection.execute(sa.text("SELECT 1 FROM pg_roles WHERE rolname = :name"),
                                            {"name": self.name}).scalar()
                if not exists:
                    connection.execute(sa.text(f"CREATE ROLE {self.name} LOGIN"))
                connection.execute(sa.text(f"GRANT USAGE ON SCHEMA public TO {self.name}"))
            else:
                for host in ("%", "localhost"):
                    connection.execute(sa.text(f"CREATE USER IF NOT EXISTS '{self.name}'@'{host}'"))
        self.grant()

    def url(self, port: int) -> str:
        return self.admin.set(username=self.name, password=None, host="127.0.0.1", port=port).render_as_string(
            hide_password=False)

    def _run(self, *statements: str) -> None:
        with self.engine.connect() as connection:
            for statement in statements:
                connection.execute(sa.text(statement))

    def _mariadb_tables(self, template: str) -> list:
        return [template.format(table=f"{self.admin.database}.{table}", who=f"'{self.name}'@'{host}'")
                for table in Base.metadata.tables for host in ("%", "localhost")]

    def grant(self) -> None:
        if self.postgresql:
            self._run(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {self.name}",
                      f"GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA public TO {self.name}")
        else:
            self._run(*self._mariadb_tables("GRANT SELECT, INSERT, UPDATE, DELETE ON {table} TO {who}"))

    def revoke(self) -> None:
        if self.postgresql:
            self._run(f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {self.name}",
                      f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {self.name}")
        else:
            self._run(*self._mariadb_tables("REVOKE ALL PRIVILEGES ON {table} FROM {who}"))

    def dispose(self) -> None:
        self.engine.dispose()


class TablesLocked:
    """Another connection holds every pcc table locked, readers and writers
    shut out, until released or LOCK_SECONDS have passed."""

    def __init__(self, admin_url: str):
        self.engine = sa.create_engine(admin_url)
        self.released = threading.Event()
        self.locked = threading.Event()
        self.thread = threading.Thread(target=self._hold, daemon=True)
        self.thread.start()
        assert self.locked.wait(10)

    def _hold(self) -> None:
        tables = list(Base.metadata.tables)
        with self.engine.connect() as connection:
            if self.engine.dialect.name == "postgresql":
                connection.execute(sa.text(f"LOCK TABLE {', '.join(tables)} IN ACCESS EXCLUSIVE MODE"))
                self.locked.set()
                self.released.wait(LOCK_SECONDS)
                connection.rollback()
            else:
                connection.execute(sa.text("LOCK TABLES " + ", ".join(f"{table} WRITE" for table in tables)))
                self.locked.set()
                self.released.wait(LOCK_SECONDS)
                connection.execute(sa.text("UNLOCK TABLES"))

    def release(self) -> None:
        self.released.set()
        self.thread.join(15)
        self.engine.dispose()


class Fault:
    def __init__(self, kind: str, proxy: TcpProxy, user: LimitedUser, admin_url: str):
        self.kind, self.proxy, self.user, self.admin_url = kind, proxy, user, admin_url
        self.lock = None

    def begin(self) -> None:
        if self.kind == "refused":
            self.proxy.cut("refuse")
        elif self.kind == "black hole":
            self.proxy.cut("blackhole")
        elif self.kind == "reset mid-query":
            self.proxy.cut("reset")
        elif self.kind == "lock held 10 s":
            self.lock = TablesLocked(self.admin_url)
        elif self.kind == "grants revoked":
            self.user.revoke()
        else:  # restarted: every connection reset, and the server back at once
            self.proxy.restart()

    def end(self) -> None:
        if self.lock is not None:
            self.lock.release()
        if self.kind == "grants revoked":
            self.user.grant()
        self.proxy.restore()


def ask_timed(client, name: str, country: str) -> str:
    started = time.monotonic()
    answer = client.ask_like_postfix(login(name), ip_in(country))
    took = time.monotonic() - started
    assert took < 2.0, f"{name} answered after {took:.2f} s"
    return answer


def assert_cell(daemon, dovecot_port: int, fault: str, state: str) -> None:
    """What the table of docs/operations.md says: the block action for every blocked account
    (the crossing one included), db_error_action (DUNNO here) for the one never
    seen, on the Postfix port; -1 and 0 on the Dovecot port."""
    client = daemon.client()
    if state == "running":
        assert ask_timed(client, "crossing", "DE").startswith("REJECT"), (fault, state, daemon.log()[-2000:])
    for name in BLOCKED:
        assert ask_timed(client, name, "GB").startswith("REJECT"), (fault, state, name, daemon.log()[-2000:])
        assert allow(dovecot_port, name) == -1, (fault, state, name)
    assert ask_timed(client, "never", "GB") == "DUNNO", (fault, state)
    assert allow(dovecot_port, "never") == 0, (fault, state)


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
def test_every_account_on_both_doors_in_every_fault(start_daemon, tmp_path, backend, fault):
    admin_url = fresh_database(SERVER_DATABASES[backend])
    Store(admin_url).create_tables()
    user = LimitedUser(admin_url)
    direct = sa.engine.make_url(admin_url)
    proxy = TcpProxy(direct.host, direct.port)
    dovecot_port = free_port()
    config = {"db.dbcon": user.url(proxy.port), "db.spool_file": str(tmp_path / "a-spool.jsonl"),
              "policy.action": "REJECT", "dovecot.policy_port": dovecot_port, "dovecot.api_header": API_HEADER}
    fault_now = Fault(fault, proxy, user, admin_url)
    try:
        other_daemon = start_daemon(clock_shift="-600s", **{"db.dbcon": admin_url, "policy.action": "REJECT"})
        pcc_command(other_daemon.config_path, "-b", login("before"))
        this_daemon = start_daemon(**config)
        assert walk(this_daemon.client(), login("this"), ["GB", "US", "FR", "DE"])[-1].startswith("REJECT")
        assert walk(other_daemon.client(), login("other"), ["GB", "US", "FR", "DE"])[-1].startswith("REJECT")
        assert walk(this_daemon.client(), login("crossing"), ["GB", "US", "FR"]) == ["DUNNO"] * 3
        steady = start_daemon(**dict(config, **{"db.spool_file": str(tmp_path / "c-spool.jsonl"),
                                                "dovecot.policy_port": free_port(),
                                                "dovecot.api_header": "Authorization: Basic cGNjOmZhdWx0"}))
        assert walk(steady.client(), login("steady"), ["GB", "US", "FR"]) == ["DUNNO"] * 3
        wait_until_visible()
        time.sleep(1.0)  # the blocked list's copy on disk is rewritten within a second of a change

        fault_now.begin()
        assert_cell(this_daemon, dovecot_port, fault, "running")
        assert ask_timed(steady.client(), "steady", "DE").startswith("REJECT"), steady.log()[-2000:]
        this_daemon.process.send_signal(signal.SIGKILL)
        this_daemon.process.wait()
        if fault == "grants revoked":  # no grant, no protection: refuses to start, Postfix defers
            with pytest.raises(RuntimeError, match="refuses pcc: .*(GRANT|grant)"):
                start_daemon(**config)
        else:
            restarted = start_daemon(**config)
            assert_cell(restarted, dovecot_port, fault, "restarted")
    finally:
        fault_now.end()
    # No request now: every block reaches the database once it is back, and
    # both daemons say the outage ended (a probe a second, of their own).
    ended = time.monotonic()
    survivors = [steady, start_daemon(**config) if fault == "grants revoked" else restarted]
    expected = {login(name) for name in BLOCKED + ("steady",)}
    while not expected <= blocked_logins(admin_url):
        assert time.monotonic() < ended + OUTAGE_ENDS_WITHIN, "".join(d.log()[-2000:] for d in survivors)
        time.sleep(0.1)
    for daemon in survivors:
        if "failed, answering from memory" in daemon.log():  # a daemon restarted once it was over had none
            wait_for_log(daemon, "is back; pcc answers from it again",
                         timeout=max(ended + OUTAGE_ENDS_WITHIN - time.monotonic(), 0.5))
        health = run_pcc("--config", daemon.config_path, "--health")
        assert "cannot use its database" not in health.stdout and "pcc_spooled_blocks=0;" in health.stdout, (
            health.stdout, daemon.log()[-2000:])
        assert "still failing" not in daemon.log()
    for daemon in survivors:
        wait_for_log(daemon, "listening")
    proxy.close()
    user.dispose()
