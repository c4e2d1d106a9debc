"""What the worker processes of one daemon ([server] processes) tell each
other: a page of shared memory per process, made by the master before it
forks, where each worker leaves its --health words and its metrics when
asked.  Whichever worker a scrape or `pcc.py --health` reaches answers for the
whole daemon from it: the metrics of every process labelled process="N", the
health of every process combined, a process that did not answer named.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
import time
from typing import Callable, Optional

from .common import first_line, log
from .outage import worker_spool

# Room for one process's report (its metrics text is a few KB; the rest of a
# slot is never touched, so never resident).
SLOT_BYTES = 1 << 20
# How often a worker looks whether a report is wanted (seconds): the wait of
# a scrape or a health check for the other processes.
PUBLISH_POLL = 0.05
# How long a scrape or a health check waits for every process's report.
GATHER_TIMEOUT = 1.0
# What is asked, each on a channel of its own, answered by a thread of its
# own in each worker: --health's words never wait for the metrics, whose
# gauges ask the database (a hung database must not make a worker look hung).
HEALTH, METRICS = 0, 1
CHANNELS = 2

# The board's first page: per channel, the generation wanted (a request for
# fresh reports).
_WANTED = struct.Struct("=Q")
# A slot's head: sequence (odd while written), generation answered, pid,
# serving (the worker's ports are open), length of the JSON that follows.
# The pid and serving of a worker are those of its HEALTH slot.
_HEAD = struct.Struct("=QQqQI")
_PAGE = mmap.PAGESIZE


class WorkerBoard:
    """The shared pages: made by the master (before any fork), inherited by
    every worker, a restarted one included.  A slot per worker and channel."""

    def __init__(self, processes: int):
        self.processes = processes
        self._memory = mmap.mmap(-1, _PAGE + processes * CHANNELS * SLOT_BYTES)  # MAP_SHARED | MAP_ANONYMOUS

    # The master's side, and a worker's first step ------------------------

    def seat(self, index: int, pid: int) -> None:
        """Worker `index` is now process `pid` (0: none, it ended)."""
        for channel in range(CHANNELS):
            self._write_head(index, channel, sequence=0, generation=0, pid=pid, serving=0, length=0)

    def serving(self, index: int) -> bool:
        return bool(self._read_head(index, HEALTH)[3])

    # A worker's side ------------------------------------------------------

    def now_serving(self, index: int) -> None:
        sequence, generation, pid, _serving, length = self._read_head(index, HEALTH)
        self._write_head(index, HEALTH, sequence, generation, pid, 1, length)

    def wanted(self, channel: int) -> int:
        return _WANTED.unpack_from(self._memory, channel * _WANTED.size)[0]

    def answered(self, index: int, channel: int) -> int:
        return self._read_head(index, channel)[1]

    def publish(self, index: int, channel: int, generation: int, report: dict) -> None:
        """Leave this process's report on `channel` for generation `generation`."""
        data = json.dumps(report).encode()
        if len(data) > SLOT_BYTES - _HEAD.size:  # never: a report is KBs; then it is left out
            data = b"{}"
        sequence, _generation, pid, serving, _length = self._read_head(index, channel)
        self._write_head(index, channel, sequence + 1, generation, pid, serving, 0)  # odd: being written
        offset = self._slot(index, channel) + _HEAD.size
        self._memory[offset:offset + len(data)] = data
        self._write_head(index, channel, sequence + 2, generation, pid, serving, len(data))

    def gather(self, channel: int, timeout: float = GATHER_TIMEOUT, clock: Callable[[], float] = time.monotonic,
               sleep: Callable[[float], None] = time.sleep) -> list:
        """Ask every worker for a fresh report on `channel`; [(index, report
        or None)], None for a process that is not running or did not answer
        within `timeout`."""
        generation = self.wanted(channel) + 1
        # Two askers at once may ask the same generation: both are answered.
        _WANTED.pack_into(self._memory, channel * _WANTED.size, generation)
        deadline = clock() + timeout
        reports: dict = {}
        while True:
            for index in range(self.processes):
                if index not in reports:
                    report = self._fresh_report(index, channel, generation)
                    if report is not None:
                        reports[index] = report
            if len(reports) == self.processes or clock() >= deadline:
                return [(index, reports.get(index)) for index in range(self.processes)]
            sleep(PUBLISH_POLL / 5)

    def _fresh_report(self, index: int, channel: int, generation: int) -> Optional[dict]:
        if self._read_head(index, HEALTH)[2] <= 0:
            return None  # no process in this seat
        for _attempt in range(3):
            before = self._read_head(index, channel)
            if before[1] < generation or before[0] % 2:
                return None
            offset = self._slot(index, channel) + _HEAD.size
            data = bytes(self._memory[offset:offset + before[4]])
            if self._read_head(index, channel)[0] == before[0]:  # not rewritten while read
                try:
                    return json.loads(data)
                except ValueError:
                    return None
        return None

    def _slot(self, index: int, channel: int) -> int:
        return _PAGE + (index * CHANNELS + channel) * SLOT_BYTES

    def _read_head(self, index: int, channel: int) -> tuple:
        return _HEAD.unpack_from(self._memory, self._slot(index, channel))

    def _write_head(self, index: int, channel: int, sequence: int, generation: int, pid: int, serving: int,
                    length: int) -> None:
        _HEAD.pack_into(self._memory, self._slot(index, channel), sequence, generation, pid, serving, length)


class WorkerSeat:
    """One worker's place in the daemon: its index, the board, the master,
    and the sockets the master bound for it (port name -> socket)."""

    def __init__(self, index: int, board: WorkerBoard, master_pid: int, sockets: dict):
        self.index = index
        self.board = board
        self.master_pid = master_pid
        self.sockets = sockets

    @property
    def processes(self) -> int:
        return self.board.processes

    def spool_path(self, spool_file: str) -> str:
        """Each worker's own spool (the first keeps pcc.conf's name)."""
        return worker_spool(spool_file, self.index)

    def publish_when_asked(self, channel: int, report: Callable[[], dict], stopping,
                           on_orphaned: Optional[Callable[[], None]] = None) -> None:
        """A worker's thread for one channel: a report each time one is
        wanted; with on_orphaned, it also watches the master (gone, killed:
        the worker stops too)."""
        answered = self.board.answered(self.index, channel)
        while not stopping.wait(PUBLISH_POLL):
            if on_orphaned is not None and os.getppid() != self.master_pid:
                on_orphaned()
                return
            wanted = self.board.wanted(channel)
            if wanted > answered:
                try:
                    fresh = report()
                except Exception as error:  # one report lost (the asker names this process), never the thread
                    log.warning("worker process %d: its report for the others failed: %s", self.index + 1,
                                first_line(error))
                    fresh = {}
                self.board.publish(self.index, channel, wanted, fresh)
                answered = wanted


def labelled_metrics(reports: list) -> str:
    """The metrics of every process ([(its number, its text)]) as one
    exposition: each family's help and type once, then its samples from each
    process with process="N"."""
    families: dict = {}  # name -> [header lines, sample lines]
    for index, text in reports:
        family = None
        for line in text.splitlines():
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                family = families.setdefault(line.split(" ", 3)[2], [[], []])
                if line not in family[0]:
                    family[0].append(line)
            elif line and not line.startswith("#") and family is not None:
                family[1].append(_with_label(line, f'process="{index}"'))
    return "".join("\n".join(header + samples) + "\n" for header, samples in families.values())


def _with_label(sample: str, label: str) -> str:
    name_end = min(position for position in (sample.find("{"), sample.find(" ")) if position >= 0)
    if sample[name_end] == "{":
        closing = "" if sample[name_end + 1] == "}" else ","
        return f"{sample[:name_end + 1]}{label}{closing}{sample[name_end + 1:]}"
    return f"{sample[:name_end]}{{{label}}}{sample[name_end:]}"


def whole_daemon_metrics(board: WorkerBoard) -> str:
    """What a scrape of any worker gets: every process's metrics, and how
    many processes answered for them."""
    reports = board.gather(METRICS)
    answering = [(index + 1, report["metrics"]) for index, report in reports if report and "metrics" in report]
    return labelled_metrics(answering) + (
        "# HELP pcc_worker_processes Worker processes ([server] processes): configured, and answering this scrape\n"
        "# TYPE pcc_worker_processes gauge\n"
        f'pcc_worker_processes{{state="configured"}} {board.processes}\n'
        f'pcc_worker_processes{{state="answering"}} {len(answering)}\n')


# --health's words, and how the processes' values make the daemon's.
_SUMMED = ("error_answers", "spooled_blocks", "unsent_notices")
_LARGEST = ("failing_seconds", "oldest_unsent_seconds")
_WORST_FIRST = {"database": ("failing", "ok"), "volume_sharing": ("failing", "ok", "off")}


def combined_health(reports: list) -> str:
    """One --health report for the daemon from its processes' words
    ([(index, words or None)]): counts summed, ages the largest, a state the
    worst, the GeoIP data the oldest, processes=ANSWERED/ALL (the health
    check is CRITICAL when a process did not answer)."""
    answered = [words for _index, words in reports if words is not None]
    silent = [str(index + 1) for index, words in reports if words is None]  # numbered from 1, as the log does
    if not answered:
        return f"processes=0/{len(reports)}"
    parsed = [dict(word.split("=", 1) for word in words.split() if "=" in word) for words in answered]
    combined = dict(parsed[0])
    for name in _SUMMED:
        combined[name] = str(sum(int(float(words.get(name, 0))) for words in parsed))
    for name in _LARGEST:
        combined[name] = str(max(int(float(words.get(name, 0))) for words in parsed))
    for name, order in _WORST_FIRST.items():
        values = [words.get(name, order[-1]) for words in parsed]
        combined[name] = next((value for value in order if value in values), values[0])
    built = sorted(words.get("geoip_built", "unknown") for words in parsed)
    combined["geoip_built"] = "unknown" if "unknown" in built else built[0]
    combined["processes"] = f"{len(answered)}/{len(reports)}"
    if silent:
        combined["silent_processes"] = ",".join(silent)
    head = answered[0].split()[0]  # the request's name, as a single process answers
    return " ".join([head] + [f"{name}={value}" for name, value in combined.items()])
