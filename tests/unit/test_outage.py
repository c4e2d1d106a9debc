"""The outage state machine (outage.OutageState), on a clock the test turns:
one ERROR line when an outage starts, one a minute while it lasts, one line
when it ends; a failed write ends only with a write; one probe a second."""
import logging

import pytest

from pcclib.outage import DB_PROBE_INTERVAL, OUTAGE_REPORT_INTERVAL, OutageState


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def outage(make_settings):
    clock = Clock()
    state = OutageState(make_settings(**{"db.db_error_action": "DEFER_IF_PERMIT"}), clock=clock)
    return state, clock


def lines(caplog, level) -> list:
    return [record.getMessage() for record in caplog.records if record.levelno == level]


def test_an_outage_is_one_error_line_then_one_a_minute_then_one_line_when_it_ends(outage, caplog):
    state, clock = outage
    caplog.set_level(logging.INFO, logger="pcc")
    state.failed("OperationalError: connection refused")
    state.failed("OperationalError: connection refused")  # the next request: no second line
    assert len(lines(caplog, logging.ERROR)) == 1 and "failed, answering from memory" in caplog.text
    for _ in range(30):
        state.count_answer("db_error_action")
    clock.now += OUTAGE_REPORT_INTERVAL - 1
    state.report(spooled_blocks=2)
    assert len(lines(caplog, logging.ERROR)) == 1  # not yet a minute
    clock.now += 1
    state.report(spooled_blocks=2)
    (repeated,) = lines(caplog, logging.ERROR)[1:]
    assert "still failing after 60 s (OperationalError: connection refused): 30 requests answered " \
           "DEFER_IF_PERMIT, 0 decided from memory, 2 blocks waiting in the spool; protection is partly OFF" \
           in repeated
    state.report(spooled_blocks=2)
    assert len(lines(caplog, logging.ERROR)) == 2  # once a minute, not once a call
    clock.now += OUTAGE_REPORT_INTERVAL
    state.report(spooled_blocks=0)
    assert len(lines(caplog, logging.ERROR)) == 3
    snapshot = state.snapshot()
    assert snapshot["failing"] and snapshot["failing_seconds"] == 2 * OUTAGE_REPORT_INTERVAL
    assert snapshot["error_answers"] == snapshot["error_answers_total"] == 30
    assert state.ok() is True
    assert "is back; pcc answers from it again (the outage lasted 120 s: 30 requests got DEFER_IF_PERMIT" \
        in lines(caplog, logging.WARNING)[-1]
    assert state.snapshot()["failing_seconds"] == 0 and not state.failing
    clock.now += OUTAGE_REPORT_INTERVAL
    state.report(spooled_blocks=0)
    assert len(lines(caplog, logging.ERROR)) == 3  # over: nothing more


def test_a_failed_write_ends_only_with_a_write(outage):
    state, _clock = outage
    state.failed("permission denied for table pcc_blocks", on_write=True)
    assert state.failed_on_write()
    assert state.ok(wrote=False) is False and state.failing  # a read that works proves nothing
    assert state.ok(wrote=True) is True and not state.failing and not state.failed_on_write()


def test_one_probe_a_second_while_it_fails(outage):
    state, clock = outage
    state.failed("timeout")
    assert not state.probe_due()
    clock.now += DB_PROBE_INTERVAL
    assert state.probe_due()
    assert not state.probe_due()  # the next request within the second decides from memory


def test_the_replay_writes_the_blocks_spooled_while_it_ran(tmp_path):
    """No request may come after the database is back: a block spooled while
    the replay wrote the others is written by the same replay, and the spool
    is left empty."""
    from conftest import blocked_logins, spool_entry

    from pcclib.outage import SPOOL_REWRITE_EVERY, OutageJournal
    from pcclib.storage import Store

    url = f"sqlite:///{tmp_path}/pcc.sqlite3"
    store = Store(url)
    store.create_tables()
    journal = OutageJournal(str(tmp_path / "spool.jsonl"))
    first = [f"user{n}@example.com" for n in range(SPOOL_REWRITE_EVERY + 5)]
    for login in first:
        journal.add_block(spool_entry(login))
    record_block = store.record_block

    def spooled_meanwhile(login, *args, **kwargs):
        if login == first[-1]:
            journal.add_block(spool_entry("late@example.com"))
        return record_block(login, *args, **kwargs)

    store.record_block = spooled_meanwhile
    written = []
    journal.replay(store, lambda entry, block_id: written.append((entry["login"], block_id)))
    assert blocked_logins(url) == set(first) | {"late@example.com"}
    assert [login for login, _block_id in written] == first + ["late@example.com"]
    assert not journal.pending() and (tmp_path / "spool.jsonl").read_text() == ""
    store.dispose()
