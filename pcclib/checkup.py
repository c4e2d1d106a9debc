"""`pcc.py --check-config`: what the daemon checks at its start, checked as
the daemon's user.  Run as root it forks, and the child drops to that user
(--user, else the owner of pcc's state files), so that a file
only root can read, a directory only root can write or a database only root
can open is found before the daemon fails on it.  Each problem is one line;
what it could not check, it says.
"""
from __future__ import annotations

import os
import pwd
import socket
import sqlite3
import sys
import urllib.parse
from typing import Optional

import sqlalchemy as sa

from .common import first_line, user_name
from .config import Settings
from .storage import AdminStore, permanent_database_fault, safe_url, sqlite_path
from .daemon import describe_rules, files_refused


def check_config(settings: Settings, named_user: Optional[str], connect: bool) -> int:
    """0 when the daemon would start with this configuration as its user, 1
    with a line for each problem (the configuration itself was valid: 2 is
    load_settings').  A server database is asked as this process (its user is
    in dbcon); everything on this host's disk as the daemon's user."""
    print(f"{settings.config_path}: OK; database {safe_url(settings.dbcon)}; {describe_rules(settings)}")
    me = os.geteuid()
    user, found_how = daemon_user(settings, named_user) if me == 0 or named_user else (None, "this user")
    if named_user and user is None:
        print(f"{settings.config_path}: no user {named_user!r} on this host", file=sys.stderr)
        return 1
    if me == 0:
        name = user.pw_name
        on_disk = _as_user(user, settings, connect) if user.pw_uid != 0 else _report(settings, connect)
    else:  # only root can check as another user (and this one may have no passwd entry)
        name, found_how = user_name(me), "this user"
        if user is not None and user.pw_uid != me:
            print(f"{settings.config_path}: checked as {name}, not as {user.pw_name} "
                  f"(only root can check as another user)")
        on_disk = _report(settings, connect)
    if on_disk != 0:
        return on_disk
    status = check_database(settings) if connect and not sqlite_path(settings.dbcon) else 0
    if status == 0:
        print(f"{settings.config_path}: checked as user {name} ({found_how}): configuration readable, "
              "names resolve, files readable, state writable"
              + ("" if connect else "; the database was not asked (add --connect)"))
    return status


def daemon_user(settings: Settings, named_user: Optional[str]) -> tuple:
    """(the daemon's passwd entry or None, how it was found): --user, else
    (for root) the owner of pcc's state files, else root."""
    if named_user:
        try:
            return pwd.getpwnam(named_user), "--user"
        except KeyError:
            return None, ""
    database = sqlite_path(settings.dbcon)
    for path in (database, database and os.path.dirname(database), settings.spool_file,
                 settings.spool_file and os.path.dirname(settings.spool_file)):
        try:
            owner = os.stat(path).st_uid if path else 0
        except OSError:
            continue
        if owner != 0:
            try:
                return pwd.getpwuid(owner), f"the owner of {path}"
            except KeyError:
                continue
    return pwd.getpwuid(0), "pcc's state files name no other user; name the daemon's with --user"


def _as_user(user: pwd.struct_passwd, settings: Settings, connect: bool) -> int:
    """_report() in a child that runs as `user` (with its groups).  What the
    child needs is imported here first: as another user it may not be able to
    read the directories Python's own modules are in."""
    import encodings.idna  # noqa: F401  (getaddrinfo() encodes host names with it)

    sys.stdout.flush()
    child = os.fork()
    if child == 0:
        status = 1
        try:
            os.setgroups(os.getgrouplist(user.pw_name, user.pw_gid))
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            status = _report(settings, connect)
        except Exception as error:  # the child must never return into the parent's code
            print(f"{settings.config_path}: cannot check as {user.pw_name}: {first_line(error)}", file=sys.stderr)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    _pid, wait_status = os.waitpid(child, 0)
    return os.waitstatus_to_exitcode(wait_status)


def _report(settings: Settings, connect: bool) -> int:
    """The checks on this host's disk, as this process's user: 0, or 1 with a line each."""
    problems = problems_as_this_user(settings)
    if connect and not problems:
        problems += _sqlite_not_writable(settings)
    for problem in problems:
        print(f"{settings.config_path}: {problem}", file=sys.stderr)
    return 1 if problems else 0


def _sqlite_not_writable(settings: Settings) -> list:
    """--connect on SQLite: the file opened for writing and a write lock taken
    (then given back), as the daemon's user would; the standard library's
    sqlite3, which needs nothing read from disk by then."""
    path = sqlite_path(settings.dbcon)
    if not path:
        return []
    if not os.path.exists(path):
        print(f"{settings.config_path}: the SQLite file {path} is not there yet (the daemon makes it at its start)")
        return []
    try:
        connection = sqlite3.connect(f"file:{urllib.parse.quote(path)}?mode=rw", uri=True, timeout=5)
        try:
            connection.execute("BEGIN IMMEDIATE")
            connection.rollback()
        finally:
            connection.close()
    except sqlite3.Error as error:
        return [f"the database cannot be used as the daemon uses it: the SQLite file {path}: {error}"]
    print(f"{settings.config_path}: database reached: SQLite file {path}; it takes writes")
    return []


def problems_as_this_user(settings: Settings) -> list:
    """What would stop or cripple the daemon, run as this process's user."""
    problems = []
    try:
        with open(settings.config_path, "rb"):
            pass
    except OSError as error:
        problems.append(f"cannot be read: {error.strerror} (pcc.conf is root:pcc, mode 640, in the Debian package)")
    problems += _names_that_do_not_resolve(settings)
    problems += _files_not_readable(settings)
    refusal = files_refused(settings) or _state_not_writable(settings)
    if refusal:
        problems.append(refusal)
    return problems


def _names_that_do_not_resolve(settings: Settings) -> list:
    names = [("[server] host", settings.host, settings.port)]
    url = sa.engine.make_url(settings.dbcon)
    if url.host and "," not in url.host:
        names.append(("[db] dbcon's host", url.host, url.port or 0))
    if settings.mailsrv:
        names.append(("[mail] mailsrv", settings.mailsrv, settings.mailport))
    problems = []
    for what, name, port in names:
        try:
            socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as error:
            problems.append(f"{what} {name!r} does not resolve: {getattr(error, 'strerror', None) or error}")
    return problems


def _files_not_readable(settings: Settings) -> list:
    files = [("[geoip] database", settings.geoip_database), ("[networks] asn_database", settings.asn_database),
             ("[mail] tls_ca_file", settings.mail_tls_ca_file)]
    files += [(f"[list {network_list.label}] file", network_list.file) for network_list in settings.network_lists
              if os.path.lexists(network_list.file)]  # a list's file may come later (--update-lists)
    problems = []
    for what, path in files:
        if not path:
            continue
        try:
            with open(path, "rb") as readable:
                readable.read(1)
        except OSError as error:
            problems.append(f"{what} {path}: cannot be read: {error.strerror}")
    return problems


def _state_not_writable(settings: Settings) -> str:
    """A directory pcc must create its state in that this user cannot write."""
    for what, path in (("the SQLite database", sqlite_path(settings.dbcon)), ("[db] spool_file", settings.spool_file),
                       ("[server] socket", settings.socket)):
        if not path or os.path.exists(path):
            continue
        directory = os.path.dirname(os.path.abspath(path))
        if what == "[server] socket" and not os.path.isdir(directory):
            return f"{what} {path}: the directory {directory} does not exist (pcc makes the socket, not its directory)"
        while not os.path.exists(directory):  # the daemon makes the SQLite file's directories
            directory = os.path.dirname(directory)
        if not os.access(directory, os.W_OK | os.X_OK):
            return f"{what} {path}: the directory {directory} is not writable by this user"
    return ""


def check_database(settings: Settings) -> int:
    """--check-config --connect: one line saying which server answered and
    whether it takes writes (a write rolled back, when pcc's tables are there),
    or why it cannot be used.  Creates nothing, not even the tables (a
    server database: SQLite is _sqlite_not_writable's, as the daemon's user)."""
    store = AdminStore(settings.dbcon, create_directory=False)
    try:
        server, writable = store.describe_server()
        tables = store.has_tables()
        if writable and tables:
            store.prove_writable()
    except sa.exc.SQLAlchemyError as error:
        problem = permanent_database_fault(settings, error) or first_line(error)
        print(f"{settings.config_path}: the database cannot be used as the daemon uses it: {problem}",
              file=sys.stderr)
        return 1
    finally:
        store.dispose()
    if not writable:
        print(f"{settings.config_path}: database reached: {server}; it takes no writes, so every block would "
              "fail (with several hosts, add target_session_attrs=read-write)", file=sys.stderr)
        return 1
    print(f"{settings.config_path}: database reached: {server}; it takes writes"
          + ("" if tables else " (pcc's tables are made at the daemon's first start)"))
    return 0
