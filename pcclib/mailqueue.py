"""Postfix's queues as pcc sees them: the messages of one account, found by
the SASL login their queue file records (whatever the envelope sender), held
at a block, released (-r) or deleted (-e) after it.

Only Postfix's own words tie a message to an account.  postcat prints each
queue file record on a line, but a record can hold a newline: an SMTP
client's ORCPT (xtext +0A), a local user's full name (sendmail -F) print a
line of their choosing, "named_attribute: sasl_username=victim" included.
smtpd writes the SASL login at the top of the envelope, among records only
Postfix words, before the sender; pcc reads that preamble and nothing after.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import socket
import struct
import subprocess
from typing import BinaryIO, Callable, Optional

from .common import log, normalise_login

# A held message whose arrival is this much older than the block was held by
# something else (the clocks of the database and Postfix hosts may differ a little).
HOLD_CLOCK_SKEW = dt.timedelta(seconds=60)
# The queues whose messages are still to be delivered: what a block holds.
WAITING_QUEUES = ("incoming", "active", "deferred")
# The envelope records that open a queue file, worded by Postfix alone (the
# named attributes there are smtpd's, or the few postdrop lets a local user
# give, which cleanup checks): the first record of any other kind (the
# sender's full name, the sender...) ends what pcc reads.
PREAMBLE_RECORDS = (b"message_size: ", b"message_arrival_time: ", b"create_time: ", b"named_attribute: ")
SASL_LOGIN_RECORD = b"named_attribute: sasl_username="
# What a Postfix queue ID looks like (short: hex; long: letters and digits):
# nothing else reaches postcat or postsuper as an argument.
QUEUE_ID = re.compile(r"[0-9A-Za-z]{6,32}")
# The queue helper (pcc --queue-helper, started as root by systemd for each
# connection to pcc-queue.socket): how a daemon without root's rights holds a
# blocked account's queued mail without sudo, so its own unit keeps
# NoNewPrivileges.  It takes one line, "hold LOGIN" (or "ping"), and answers
# one: "held N", "pong" or "error WHY".
HELPER_REQUEST_BYTES = 1024
HELPER_READ_TIMEOUT = 10.0  # seconds for the request line
HELPER_ANSWER_TIMEOUT = 300.0  # postqueue, a postcat a queued message, postsuper


class QueueError(Exception):
    """A Postfix command failed; the message says which and why."""


class PostfixQueue:
    """Postfix's queues, through postqueue, postcat and postsuper; the last two
    through `sudo -n` when pcc does not run as root (docs/operations.md gives
    the sudoers lines, check_access() that they are there), or the queue helper."""

    def __init__(self, config_directory: str = "", helper: str = ""):
        self.config_directory = config_directory
        self.sudo = os.geteuid() != 0
        self.helper = helper if self.sudo else ""  # root holds mail itself

    def hold_queued_of(self, login: str) -> int:
        """Put `login`'s queued mail on hold (see queued_by); how many messages."""
        if self.helper:
            return int(self._ask_helper(f"hold {login}", "held"))
        return self.hold(self.queued_by(login))

    def _ask_helper(self, request: str, expected: str) -> str:
        """The queue helper's answer to one request line, after `expected`."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
                connection.settimeout(HELPER_ANSWER_TIMEOUT)
                connection.connect(self.helper)
                connection.sendall(request.encode() + b"\n")
                answer = connection.makefile("rb").readline(HELPER_REQUEST_BYTES).decode("utf-8", "replace").strip()
        except OSError as error:
            raise QueueError(f"the queue helper at {self.helper} cannot be asked: {error.strerror or error} "
                             "(systemctl enable --now pcc-queue.socket)") from None
        word, _, rest = answer.partition(" ")
        if word == expected and (expected == "pong" or rest.isdigit()):
            return rest
        raise QueueError(f"the queue helper at {self.helper} answered {answer[:200]!r}" if word != "error"
                         else f"the queue helper: {rest}")

    def queued_by(self, login: str) -> list:
        """Queue IDs of `login`'s messages not yet delivered nor held (incoming,
        active, deferred): what a thief queued before the block."""
        return self._messages_of(login, lambda entry: entry.get("queue_name") in WAITING_QUEUES)

    def hold(self, queue_ids: list) -> int:
        return self._postsuper("-h", queue_ids, r"Placed on hold: (\d+)")

    def check_access(self) -> str:
        """What is missing for an unprivileged pcc to read and hold queued
        mail (the queue helper, a sudoers line), or ""."""
        if not self.sudo:
            return ""
        if self.helper:
            try:
                self._ask_helper("ping", "pong")
            except QueueError as error:
                return f"[postfix] queue_helper: {error}"
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
                        "sudoers lines of docs/operations.md (When an account is blocked), or use the queue helper")
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
        if not QUEUE_ID.fullmatch(queue_id):
            return None
        try:
            envelope = self._run_binary("postcat", "-e", "-q", queue_id)
        except QueueError:
            return None  # the message left the queue meanwhile
        return recorded_sasl_login(envelope)

    def _postsuper(self, option: str, queue_ids: list, pattern: str) -> int:
        queue_ids = [queue_id for queue_id in queue_ids if QUEUE_ID.fullmatch(queue_id)]
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
        output = self._run_binary(program, *arguments, stdin=stdin, report_stderr=report_stderr)
        return output.decode("utf-8", "replace")  # a client's bytes in an address are not an error of pcc's

    def _run_binary(self, program: str, *arguments: str, stdin: Optional[str] = None,
                    report_stderr: bool = False) -> bytes:
        command = self._command(program, arguments)
        try:
            result = subprocess.run(command, input=stdin.encode() if stdin is not None else None,
                                    capture_output=True, timeout=120)
        except FileNotFoundError:
            raise QueueError(f"{program} not found: is Postfix installed and on PATH?") from None
        except subprocess.TimeoutExpired:
            raise QueueError(f"{' '.join(command)} did not finish within 120 s") from None
        if result.returncode != 0:
            detail = (result.stderr.decode("utf-8", "replace").strip().splitlines() or ["no message"])[-1]
            raise QueueError(f"{' '.join(command)} failed: {detail}")
        return result.stderr if report_stderr else result.stdout


def recorded_sasl_login(envelope: bytes) -> Optional[str]:
    """The SASL login `postcat -e` shows in the envelope's preamble, or None
    (no login there, or two: nothing Postfix writes)."""
    logins, lines = [], envelope.split(b"\n")
    if lines[0].startswith(b"*** ENVELOPE RECORDS "):
        del lines[0]
    for line in lines:
        if not line.startswith(PREAMBLE_RECORDS):
            break
        if line.startswith(SASL_LOGIN_RECORD):
            logins.append(line[len(SASL_LOGIN_RECORD):])
    if len(logins) != 1:
        return None
    return normalise_login(logins[0].decode("utf-8", "replace"))


def serve_helper(config_directory: str, requests: BinaryIO, answers: BinaryIO, peer: str) -> int:
    """pcc --queue-helper: one request of an unprivileged daemon, read from
    `requests` (systemd's accepted connection), answered on `answers`, as
    root.  It can only hold a login's queued mail; the socket's mode (0660,
    group pcc) says who may ask."""
    line = requests.readline(HELPER_REQUEST_BYTES).decode("utf-8", "replace").strip()
    command, _, login = line.partition(" ")
    if command == "ping" and not login:
        answer = "pong"
    elif command == "hold" and login and not re.search(r"[\s\x00-\x1f\x7f]", login):
        login = normalise_login(login)
        try:
            held = PostfixQueue(config_directory).hold_queued_of(login)
            answer = f"held {held}"
            log.info("queue helper: %d queued messages of %s put on hold, asked by %s", held, login, peer)
        except QueueError as error:
            answer = f"error {error}"
            log.error("queue helper: holding the queued mail of %s failed: %s", login, error)
    else:
        answer = "error the request is neither 'ping' nor 'hold LOGIN'"
        log.warning("queue helper: a request that is neither ping nor hold LOGIN, from %s", peer)
    answers.write(answer.encode() + b"\n")
    answers.flush()
    return 0 if not answer.startswith("error") else 1


def helper_peer(descriptor: int) -> str:
    """Who is on the other end of the helper's connection, for its log line."""
    try:
        with socket.socket(fileno=os.dup(descriptor)) as connection:
            pid, uid, _gid = struct.unpack("3i", connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                       struct.calcsize("3i")))
        return f"uid {uid} (pid {pid})"
    except OSError:  # not a UNIX socket: run by hand
        return "an unknown peer"
