"""The worker processes' board ([server] processes): a report asked of
another process comes back through the shared pages, a process that does not
answer is named, the metrics of all processes make one valid exposition, the
health of all one report; a daemon with fewer processes takes in the spools
of the ones it no longer has; the key itself."""
import json
import os
import signal
import threading
import time

import pytest
from conftest import write_config
from prometheus_client.parser import text_string_to_metric_families

from pcclib.board import HEALTH, METRICS, WorkerBoard, WorkerSeat, combined_health, labelled_metrics
from pcclib.config import ConfigError, load_settings
from pcclib.health import HEALTH_CRITICAL, HEALTH_OK, check_health
from pcclib.outage import OutageJournal, worker_spool

ONE = """# HELP pcc_decisions_total Answers
# TYPE pcc_decisions_total counter
pcc_decisions_total{action="DUNNO"} 3.0
# HELP pcc_impossible_travel_total Journeys
# TYPE pcc_impossible_travel_total counter
pcc_impossible_travel_total 0.0
"""
TWO = """# HELP pcc_decisions_total Answers
# TYPE pcc_decisions_total counter
pcc_decisions_total{action="DUNNO"} 5.0
pcc_decisions_total{action="HOLD"} 1.0
# HELP pcc_impossible_travel_total Journeys
# TYPE pcc_impossible_travel_total counter
pcc_impossible_travel_total 2.0
"""


def test_the_metrics_of_every_process_make_one_exposition_labelled_by_process():
    text = labelled_metrics([(1, ONE), (2, TWO)])
    samples = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
               for family in text_string_to_metric_families(text) for sample in family.samples}
    assert samples == {
        ("pcc_decisions_total", (("action", "DUNNO"), ("process", "1"))): 3.0,
        ("pcc_decisions_total", (("action", "DUNNO"), ("process", "2"))): 5.0,
        ("pcc_decisions_total", (("action", "HOLD"), ("process", "2"))): 1.0,
        ("pcc_impossible_travel_total", (("process", "1"),)): 0.0,
        ("pcc_impossible_travel_total", (("process", "2"),)): 2.0,
    }
    assert text.count("# TYPE pcc_decisions_total counter") == 1  # a family once, all its samples together


def test_the_daemons_health_is_the_worst_and_the_sum_of_its_processes():
    ok = ("pcc_health database=ok failing_seconds=0 error_answers=0 spooled_blocks=0 unsent_notices=1 "
          "oldest_unsent_seconds=5 geoip_built=2026-11-01 volume_sharing=ok")
    failing = ("pcc_health database=failing failing_seconds=42 error_answers=7 spooled_blocks=2 unsent_notices=3 "
               "oldest_unsent_seconds=900 geoip_built=2026-10-01 volume_sharing=failing")
    words = dict(word.split("=", 1) for word in combined_health([(0, ok), (1, failing)]).split()[1:])
    assert words == {"database": "failing", "failing_seconds": "42", "error_answers": "7", "spooled_blocks": "2",
                     "unsent_notices": "4", "oldest_unsent_seconds": "900", "geoip_built": "2026-10-01",
                     "volume_sharing": "failing", "processes": "2/2"}
    silent = combined_health([(0, ok), (1, None), (2, ok)])
    assert "processes=2/3" in silent and "silent_processes=2" in silent and "database=ok" in silent


def test_health_is_critical_when_a_process_did_not_answer(tmp_path, monkeypatch):
    settings = load_settings(write_config(tmp_path, {}))
    words = {"database": "ok", "geoip_built": "2026-12-01", "processes": "2/2"}
    monkeypatch.setattr("pcclib.health.ask_daemon_health", lambda _settings: dict(words))
    monkeypatch.setattr("pcclib.health.utcnow", lambda: __import__("datetime").datetime(2026, 12, 5))
    status, line = check_health(settings)
    assert status == HEALTH_OK and "pcc_worker_processes=2;;;0;2" in line, line
    words.update(processes="1/2", silent_processes="2")
    status, line = check_health(settings)
    assert status == HEALTH_CRITICAL and "1 of 2 worker processes did not answer (process 2:" in line, line


def test_a_report_is_asked_of_another_process_through_the_shared_pages():
    board = WorkerBoard(2)
    child = os.fork()
    if child == 0:  # worker 2: answers health at once; its metrics hang (a database that does not answer)
        board.seat(1, os.getpid())
        seat = WorkerSeat(1, board, os.getppid(), {})
        threading.Thread(target=seat.publish_when_asked, daemon=True,
                         args=(METRICS, lambda: time.sleep(3600), threading.Event())).start()
        seat.publish_when_asked(HEALTH, lambda: {"health": f"pcc_health pid={os.getpid()}"}, threading.Event(),
                                lambda: os._exit(0))
        os._exit(0)
    stopping = threading.Event()
    try:
        board.seat(0, os.getpid())
        threading.Thread(target=WorkerSeat(0, board, os.getppid(), {}).publish_when_asked,
                         args=(HEALTH, lambda: {"health": "mine"}, stopping), daemon=True).start()
        for _attempt in range(3):  # fresh each time: a generation each
            reports = board.gather(HEALTH, timeout=5)
            assert reports == [(0, {"health": "mine"}), (1, {"health": f"pcc_health pid={child}"})]
        # Its metrics never come; its health still does, on a channel of its own.
        assert board.gather(METRICS, timeout=0.3)[1] == (1, None)
        assert board.gather(HEALTH, timeout=5)[1] == (1, {"health": f"pcc_health pid={child}"})
    finally:
        stopping.set()
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
    board.seat(1, 0)  # the master saw it end
    assert board.gather(HEALTH, timeout=0.2)[1] == (1, None)


def test_a_report_too_large_for_its_page_is_left_out(monkeypatch):
    monkeypatch.setattr("pcclib.board.SLOT_BYTES", 4096 * 4)
    board = WorkerBoard(1)
    board.seat(0, os.getpid())
    board.publish(0, METRICS, 1, {"metrics": "x" * 100_000})
    assert board._fresh_report(0, METRICS, 1) == {}


def test_a_report_that_fails_costs_that_report_not_the_thread():
    board = WorkerBoard(1)
    board.seat(0, os.getpid())
    failures = iter([RuntimeError("metrics broke")])

    def report():
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return {"metrics": "fine"}

    stopping = threading.Event()
    threading.Thread(target=WorkerSeat(0, board, os.getppid(), {}).publish_when_asked,
                     args=(METRICS, report, stopping), daemon=True).start()
    try:
        assert board.gather(METRICS, timeout=5) == [(0, {})]  # answered, with nothing
        assert board.gather(METRICS, timeout=5) == [(0, {"metrics": "fine"})]
    finally:
        stopping.set()


def test_a_daemon_of_fewer_processes_takes_in_the_spools_it_no_longer_has(tmp_path):
    spool = str(tmp_path / "spool.jsonl")
    entry = {"login": "gone@example.com", "at": "2026-12-01T10:00:00+00:00", "action": "HOLD", "reason": "r",
             "countries": ["GB"], "trigger": {}, "sighting": ["GB", "81.2.69.160"]}
    with open(worker_spool(spool, 3), "w") as orphan:
        orphan.write(json.dumps(entry) + "\n")
    open(worker_spool(spool, 3) + ".blocked", "w").close()
    with open(worker_spool(spool, 1), "w") as kept:  # worker 2 of 2 still has its own
        kept.write(json.dumps(dict(entry, login="kept@example.com")) + "\n")
    journal = OutageJournal(spool)
    journal.adopt_spools_beyond(2)
    assert [block["login"] for block in journal.entries()] == ["gone@example.com"]
    assert not os.path.exists(worker_spool(spool, 3)) and not os.path.exists(worker_spool(spool, 3) + ".blocked")
    assert os.path.exists(worker_spool(spool, 1))
    assert [block["login"] for block in OutageJournal(spool).entries()] == ["gone@example.com"]  # on disk first


def test_a_spool_of_a_gone_process_that_is_a_link_is_never_followed(tmp_path):
    spool = str(tmp_path / "spool.jsonl")
    target = tmp_path / "elsewhere"
    target.write_text("precious\n")
    os.symlink(target, worker_spool(spool, 2))
    journal = OutageJournal(spool)
    journal.adopt_spools_beyond(1)
    assert journal.entries() == [] and target.read_text() == "precious\n"
    assert os.path.islink(worker_spool(spool, 2))  # left for a person, with an ERROR line


def test_processes_is_a_number_or_auto_and_needs_the_tcp_port(tmp_path):
    assert load_settings(write_config(tmp_path, {})).processes == 1
    assert load_settings(write_config(tmp_path, {"server.processes": "3"})).processes == 3
    assert load_settings(write_config(tmp_path, {"server.processes": "auto"})).processes == \
        len(os.sched_getaffinity(0))
    for bad, words in (("0", "between 1 and 256"), ("many", "whole number")):
        with pytest.raises(ConfigError, match=words):
            load_settings(write_config(tmp_path, {"server.processes": bad}))
    with pytest.raises(ConfigError, match="processes share TCP ports only"):
        load_settings(write_config(tmp_path, {"server.processes": "2", "server.socket": str(tmp_path / "s")}))


def test_a_link_where_a_worker_keeps_its_spool_refuses_the_start(tmp_path):
    from pcclib.daemon import files_refused

    spool = str(tmp_path / "spool.jsonl")
    settings = load_settings(write_config(tmp_path, {"db.spool_file": spool, "server.processes": "3",
                                                     "db.dbcon": f"sqlite:///{tmp_path}/pcc.sqlite3"}))
    spools = tuple(worker_spool(spool, index) for index in range(3))
    assert files_refused(settings, spools) == ""
    os.symlink("/etc/passwd", worker_spool(spool, 2) + ".blocked")
    refusal = files_refused(settings, spools)
    assert worker_spool(spool, 2) + ".blocked" in refusal and "link" in refusal, refusal
