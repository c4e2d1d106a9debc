"""Helpers every other module uses: the clock, the logger, how a login and
any untrusted text are cleaned, one-line error messages, and what pcc does
with files (regular ones only, replaced whole) and URLs (shown without their
secrets) and with JSON a peer sent (never nested deeper than asked).
Imports nothing of pcc's.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import re
import signal
import stat
import sys
import tempfile
import threading
import urllib.parse
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Optional

__version__ = "1.6.0"
# The name administrators run pcc by, for the commands its messages name:
# pcc from the Debian package (/usr/sbin/pcc), pcc.py from a checkout.
PROGRAM = "pcc" if os.path.basename(sys.argv[0] if sys.argv else "") == "pcc" else "pcc.py"
log = logging.getLogger("pcc")
UTC = dt.timezone.utc


# pcc keeps the database server's time, not this host's: storage.DatabaseClock
# measures the difference and sets it here.
_clock_offset = dt.timedelta(0)

# The signals the daemon acts on (stop, reload).  Only the main thread may
# take them: the kernel hands a process-wide signal to any thread that does
# not block it, and before pcc's handlers are set the default action of
# SIGHUP is to end the process.
DAEMON_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})

# Control characters (CR, LF, NUL, DEL...) never belong in a value pcc reads.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")


def utcnow() -> dt.datetime:
    """The time pcc stamps and decides by: the database's, as last measured."""
    return dt.datetime.now(UTC) + _clock_offset


def set_clock_offset(seconds: float) -> None:
    global _clock_offset
    _clock_offset = dt.timedelta(seconds=seconds)


@contextmanager
def daemon_signals_blocked() -> Iterator[None]:
    """Threads started inside inherit a mask that blocks DAEMON_SIGNALS."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, DAEMON_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def start_thread(target: Callable, name: str, *args) -> threading.Thread:
    """A daemon thread of pcc's own, which never takes a stop or a reload."""
    thread = threading.Thread(target=target, args=args, name=name, daemon=True)
    with daemon_signals_blocked():
        thread.start()
    return thread


# Only ASCII letters are lower-cased: str.lower() would also turn the Kelvin
# sign into "k" and make two different accounts one.
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def escape_controls(text: str) -> str:
    """Every character that is not printable shown as \\xNN or \\uXXXX: the
    controls (Cc: CR, LF, NUL, NEL, CSI), the format and bidi characters (Cf:
    U+202E turns the rest of a line around), the line and paragraph
    separators (Zl, Zp) and the spaces other than the ASCII one.  Never
    deleted (ali<TAB>ce is not alice), never passed on (no such character
    reaches a reply, a log line, a mail or a terminal); the escaped form is
    the one the admin commands take."""
    if text.isprintable():  # nearly always; false for each of the characters above
        return text
    return "".join(character if character.isprintable() else _escaped(character) for character in text)


def _escaped(character: str) -> str:
    code = ord(character)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def quoted(value: str) -> str:
    """A value for a log line of name=value fields: as it is when it has no
    space, quote or backslash, else in double quotes with those escaped, so
    that no value can pass for more fields (login="x country=RU")."""
    if value and not _NEEDS_QUOTES.search(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


_NEEDS_QUOTES = re.compile(r'[\s"\\=]')


def normalise_login(text: str) -> str:
    """How pcc names an account, from a SASL login, a config list or the
    command line alike: surrounding white space dropped, ASCII letters
    lower-cased, control characters escaped; nothing else changes."""
    if text.isascii() and text.isprintable():  # nearly every login: str.lower() is ASCII's there, and quicker
        return text.strip().lower()
    return escape_controls(text.strip()).translate(_ASCII_LOWER)


# A path segment of a URL shown as is in a log line: a short one ("services",
# "v1", "ipv4.txt", an account ID) or a word; a long one with digits (a Slack,
# Mattermost or Discord hook's token) is masked.
_PLAIN_URL_SEGMENT = re.compile(r"[^/]{0,15}|[A-Za-z_.-]{16,23}")


def url_for_people(url: str) -> str:
    """A URL fit for a log line, a mail or --check-config: its user name and
    password, its query and every path segment that is no plain word are
    `***` (a chat hook's URL is its own credential)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    path = "/".join(segment if _PLAIN_URL_SEGMENT.fullmatch(segment) else "***"
                    for segment in parts.path.split("/"))
    return urllib.parse.urlunsplit((parts.scheme, ("***@" if "@" in parts.netloc else "") + host, path,
                                    "***" if parts.query else "", "***" if parts.fragment else ""))


def url_secrets(url: str) -> list:
    """The parts of `url` that url_for_people masks: what no log line may show."""
    parts = urllib.parse.urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    hidden = [segment for segment in parts.path.split("/") if segment and not _PLAIN_URL_SEGMENT.fullmatch(segment)]
    secrets = [userinfo, *userinfo.split(":"), parts.query, parts.fragment, *hidden]
    return [secret for secret in {*secrets, *map(urllib.parse.unquote, secrets)} if secret]


_JSON_SYNTAX = re.compile(r'["\\\[\]{}]')


def json_nesting_within(text: str, limit: int) -> bool:
    """Whether the JSON `text` nests arrays and objects at most `limit` deep
    (brackets inside strings do not count).  Ask before json.loads on what a
    peer sent: json descends on the C stack, and on Python 3.13 a thread's
    512 KB ends before json's own limit does (8 KB of nested [ killed the
    daemon with SIGSEGV).  One pass over the quotes, escapes and brackets."""
    depth, in_string, escaped_until = 0, False, -1
    for token in _JSON_SYNTAX.finditer(text):
        position, character = token.start(), token.group()
        if position <= escaped_until:
            continue  # the character after a backslash
        if in_string:
            if character == "\\":
                escaped_until = position + 1
            elif character == '"':
                in_string = False
        elif character == '"':
            in_string = True
        elif character in "[{":
            depth += 1
            if depth > limit:
                return False
        elif character in "]}":
            depth -= 1
    return True


def replace_with_lines(path: str, lines: Iterable[str], mode: int = 0o600) -> None:
    """Write `lines` to a new file of pcc's own beside `path` (never a name
    someone could have put a link at), synced, then renamed over `path`: a
    reader sees the old file or the new one, never half of one.  OSError when
    it cannot; nothing is left behind."""
    descriptor, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}-",
                                             dir=os.path.dirname(os.path.abspath(path)))
    try:
        with open(descriptor, "w", encoding="utf-8") as new:  # closes the descriptor whatever happens
            os.fchmod(new.fileno(), mode)
            new.writelines(lines)
            new.flush()
            os.fsync(new.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.lexists(temporary):
            os.unlink(temporary)
        raise


def file_signature(path: str) -> Optional[tuple]:
    """What changes when the file at `path` is rewritten or replaced (an
    updater writes a new file and renames it over the old one), or None when
    there is none."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_ino, status.st_size, status.st_mtime_ns


def open_regular_file(path: str, flags: int = os.O_RDONLY, mode: int = 0o644, dir_fd: Optional[int] = None) -> int:
    """A descriptor of `path`, which must be a regular file: opened without
    waiting (a FIFO or a device put where pcc keeps a list, a GeoIP file or
    its lock would hold the open, or the first read, until someone writes),
    then refused unless fstat says it is a file.  OSError either way."""
    descriptor = os.open(path, flags | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise OSError(f"{path}: not a regular file (a FIFO, a device or a directory put there?)")
        os.set_blocking(descriptor, True)
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor


def open_maxmind(path: str):
    """A maxminddb reader of the regular file at `path` (open_regular_file's
    checks), read through its descriptor: the checked file, not whatever a
    rename puts at the path meanwhile."""
    import maxminddb

    descriptor = open_regular_file(path)
    try:
        return maxminddb.open_database(f"/proc/self/fd/{descriptor}")
    finally:
        os.close(descriptor)  # the reader keeps its own (or its mapping)


def symlink_refusal(path: str, what: str) -> str:
    """The one line refusing a symbolic link where pcc keeps a file of its own,
    or "" when there is none: pcc run as root must not write where a link
    planted by another user points."""
    if not os.path.islink(path):
        return ""
    return (f"{path} ({what}) is a symbolic link; pcc does not follow links to the files it writes: "
            f"point the configuration at the real file")


def user_name(uid: int) -> str:
    """A user's name for a message; "uid N" for a uid without a passwd entry
    (a container's)."""
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def split_list(value: str) -> list:
    return [item for item in re.split(r"[\s,]+", value) if item]


def first_line(error: BaseException) -> str:
    original = getattr(error, "orig", None) or error
    text = str(original).strip().splitlines()
    return f"{type(original).__name__}: {text[0] if text else ''}"


def replaced(instance, **changes):
    """dataclasses.replace() for the hot path, a few times faster: a copy of a
    frozen dataclass instance's fields (and of what its properties computed),
    with `changes`; no __init__, so nothing but field values may change."""
    copy = object.__new__(type(instance))
    copy.__dict__.update(instance.__dict__)
    copy.__dict__.update(changes)
    return copy


def when(moment: Optional[dt.datetime]) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment else "-"
