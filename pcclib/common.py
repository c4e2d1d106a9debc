"""Helpers every other module uses: the clock, the logger, how a login and
any untrusted text are cleaned, and one-line error messages.  Imports nothing
of pcc's.
"""
from __future__ import annotations

import datetime as dt
import logging
import logging.handlers
import re
from typing import Optional

__version__ = "1.3.0"
log = logging.getLogger("pcc")
UTC = dt.timezone.utc


def utcnow() -> dt.datetime:
    return dt.datetime.now(UTC)


# Control characters (CR, LF, NUL, DEL...) never belong in a value pcc reads.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")

# Only ASCII letters are lower-cased: str.lower() would also turn the Kelvin
# sign into "k" and make two different accounts one.
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def escape_controls(text: str) -> str:
    """Control characters shown as \\xNN: never deleted (ali<TAB>ce is not
    alice), never passed on (no CR/LF reaches a reply, a log line or a mail)."""
    if text.isprintable():  # nearly always; isprintable() is false for every control character
        return text
    return CONTROL_CHARACTERS.sub(lambda found: f"\\x{ord(found.group()):02x}", text)


def normalise_login(text: str) -> str:
    """How pcc names an account, from a SASL login, a config list or the
    command line alike: surrounding white space dropped, ASCII letters
    lower-cased, control characters escaped; nothing else changes."""
    return escape_controls(text.strip()).translate(_ASCII_LOWER)


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
