"""Postfix's queues as pcc sees them: the messages of one account, found by
the SASL login their queue file records (whatever the envelope sender), held
at a block, released (-r) or deleted (-e) after it.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import subprocess
from typing import Callable, Optional

from .common import normalise_login

# A held message whose arrival is this much older than the block was held by
# something else (the clocks of the database and Postfix hosts may differ a little).
HOLD_CLOCK_SKEW = dt.timedelta(seconds=60)
# The queues whose messages are still to be delivered: what a block holds.
WAITING_QUEUES = ("incoming", "active", "deferred")


class QueueError(Exception):
    """A Postfix command failed; the message says which and why."""


class PostfixQueue:
    """Postfix's queues, through postqueue, postcat and postsuper; the last two
    through `sudo -n` when pcc does not run as root (README gives the sudoers
    lines, check_sudo() that they are there)."""

    def __init__(self, config_directory: str = ""):
        self.config_directory = config_directory
        self.sudo = os.geteuid() != 0

    def queued_by(self, login: str) -> list:
        """Queue IDs of `login`'s messages not yet delivered nor held (incoming,
        active, deferred): what a thief queued before the block."""
        return self._messages_of(login, lambda entry: entry.get("queue_name") in WAITING_QUEUES)

    def hold(self, queue_ids: list) -> int:
        return self._postsuper("-h", queue_ids, r"Placed on hold: (\d+)")

    def check_sudo(self) -> str:
        """What is missing for an unprivileged pcc to read and hold queued
        mail (a sudoers line), or ""."""
        if not self.sudo:
            return ""
        needed = [("postcat", ["-e", "-q", "ID"]), ("postsuper", ["-h", "-"])]
        if self.config_directory:
            needed.append(("postqueue", ["-j"]))
        for program, arguments in needed:
            command = ["sudo", "-n", "-l", *self._command(program, arguments)[2:]]
            try:
                allowed = subprocess.run(command, capture_output=True, timeout=30).returncode == 0
            except (OSError, subprocess.SubprocessError):
                allowed = False
            if not allowed:
                return (f"[postfix] hold_queued: this user may not run `sudo -n {' '.join(command[3:])}`: add the "
                        "sudoers lines of README (When an account is blocked)")
        return ""

    def _entries(self) -> list:
        entries = []
        for line in self._run("postqueue", "-j").splitlines():
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue
        return entries

    def held_by(self, login: str, since: dt.datetime) -> list:
        """Queue IDs of held messages submitted by `login` (its SASL login, as the
        queue file records it, whatever the envelope sender) since `since`."""
        earliest = (since - HOLD_CLOCK_SKEW).timestamp()
        return self._messages_of(login, lambda entry: entry.get("queue_name") == "hold"
                                 and entry.get("arrival_time", 0) >= earliest)

    def _messages_of(self, login: str, wanted: Callable[[dict], bool]) -> list:
        """Queue IDs of the queue entries `wanted` keeps whose queue file names
        `login` as its SASL login (postcat runs for those only)."""
        return [entry["queue_id"] for entry in self._entries()
                if wanted(entry) and self._sasl_username(entry["queue_id"]) == login]

    def release(self, queue_ids: list) -> int:
        return self._postsuper("-H", queue_ids, r"Released from hold: (\d+)")

    def delete(self, queue_ids: list) -> int:
        return self._postsuper("-d", queue_ids, r"Deleted: (\d+)")

    def _sasl_username(self, queue_id: str) -> Optional[str]:
        try:
            envelope = self._run("postcat", "-e", "-q", queue_id)
        except QueueError:
            return None  # the message left the queue meanwhile
        found = re.search(r"^named_attribute: sasl_username=(.*)$", envelope, re.MULTILINE)
        return normalise_login(found.group(1)) if found else None

    def _postsuper(self, option: str, queue_ids: list, pattern: str) -> int:
        if not queue_ids:
            return 0
        report = self._run("postsuper", option, "-", stdin="\n".join(queue_ids) + "\n", report_stderr=True)
        return sum(int(number) for number in re.findall(pattern, report))

    def _command(self, program: str, arguments) -> list:
        """postcat and postsuper read and move queue files: root's, through
        sudo; so does postqueue with another configuration directory than the
        default (Postfix lets only root name one main.cf does not list)."""
        path = shutil.which(program, path=os.environ.get("PATH", "") + ":/usr/sbin:/usr/local/sbin") or program
        privileged = program in ("postcat", "postsuper") or (program == "postqueue" and self.config_directory)
        prefix = ["sudo", "-n"] if self.sudo and privileged else []
        return prefix + [path] + (["-c", self.config_directory] if self.config_directory else []) + list(arguments)

    def _run(self, program: str, *arguments: str, stdin: Optional[str] = None, report_stderr: bool = False) -> str:
        command = self._command(program, arguments)
        try:
            result = subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=120)
        except FileNotFoundError:
            raise QueueError(f"{program} not found: is Postfix installed and on PATH?") from None
        except subprocess.TimeoutExpired:
            raise QueueError(f"{' '.join(command)} did not finish within 120 s") from None
        if result.returncode != 0:
            detail = (result.stderr.strip().splitlines() or ["no message"])[-1]
            raise QueueError(f"{' '.join(command)} failed: {detail}")
        return result.stderr if report_stderr else result.stdout
