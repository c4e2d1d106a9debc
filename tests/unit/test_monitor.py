"""Monitor mode as pure rules (decision.py): an account is flagged instead of
blocked, not flagged twice, judged afresh in enforce mode; blocks in force
stay enforced.  The daemon's side is e2e/test_monitor_mode.py."""
import datetime as dt

import pytest
from conftest import counted_request as request
from conftest import seen_an_hour_before

from pcclib.config import MONITOR_ACTION, ConfigError
from pcclib.decision import AccountHistory, decide
from pcclib.storage import AdminStore

NOW = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.timezone.utc)


HOUR = dt.timedelta(hours=1)


@pytest.fixture
def settings(make_settings):
    def make(mode):
        return make_settings(**{"policy.mode": mode, "policy.action": "REJECT", "policy.reason": "blocked"})

    return make


# --- the rule, pure -----------------------------------------------------------


def test_monitor_flags_instead_of_blocking(settings):
    past = AccountHistory(sightings=seen_an_hour_before(NOW, "US", "FR", "DE"))
    decision = decide(request("GB"), past, settings("monitor"), NOW)
    assert decision.action == "DUNNO" and decision.new_block and decision.record_sighting
    assert decision.reason == "would block (monitor mode): 4 of at most 3 countries in 3 days (US, FR, DE, GB)"
    enforced = decide(request("GB"), past, settings("enforce"), NOW)
    assert enforced.action == "REJECT blocked" and enforced.reason.startswith("blocking: 4 of at most 3")


def test_a_flagged_account_is_not_flagged_again(settings):
    flagged = AccountHistory(blocked_since=NOW - HOUR, sightings=seen_an_hour_before(NOW, "US", "FR", "DE", "GB"),
                                 block_action=MONITOR_ACTION)
    decision = decide(request("SE"), flagged, settings("monitor"), NOW)
    assert decision.action == "DUNNO" and not decision.new_block
    assert decision.reason == "would be blocked since 2026-11-25 11:00:00 UTC (monitor mode)"


def test_enforce_judges_a_flagged_account_afresh(settings):
    still_over = AccountHistory(blocked_since=NOW - HOUR, sightings=seen_an_hour_before(NOW, "US", "FR", "DE"),
                                    block_action=MONITOR_ACTION)
    decision = decide(request("GB"), still_over, settings("enforce"), NOW)
    assert decision.action == "REJECT blocked" and decision.new_block and decision.replaces_flag
    back_home = AccountHistory(blocked_since=NOW - HOUR, sightings=seen_an_hour_before(NOW, "GB"),
                                   block_action=MONITOR_ACTION)
    assert decide(request("GB"), back_home, settings("enforce"), NOW).action == "DUNNO"


def test_blocks_in_force_stay_enforced_in_monitor_mode(settings):
    blocked = AccountHistory(blocked_since=NOW - HOUR, block_action="REJECT")
    assert decide(request("GB"), blocked, settings("monitor"), NOW).action == "REJECT blocked"


def test_mode_is_validated(settings):
    with pytest.raises(ConfigError, match=r"\[policy\] mode: must be one of ENFORCE, MONITOR, got 'AUDIT'"):
        settings("audit")


def test_monitor_answer_warn_tells_postfix_what_pcc_would_have_done(make_settings):
    warn = make_settings(**{"policy.mode": "monitor", "policy.action": "HOLD", "policy.reason": "blocked",
                            "policy.monitor_answer": "warn"})
    past = AccountHistory(sightings=seen_an_hour_before(NOW, "US", "FR", "DE"))
    new_flag = decide(request("GB"), past, warn, NOW)
    assert new_flag.action == "WARN pcc would hold: 4 of at most 3 countries in 3 days (US, FR, DE, GB) (monitor mode)"
    assert new_flag.new_block and not new_flag.blocks  # flagged, recorded, notified; the mail flows
    flagged = AccountHistory(blocked_since=NOW - HOUR, block_action=MONITOR_ACTION,
                             sightings=seen_an_hour_before(NOW, "US", "FR", "DE", "GB"))
    again = decide(request("SE"), flagged, warn, NOW)
    assert again.action == "WARN pcc would hold: flagged since 2026-11-25 11:00:00 UTC (monitor mode)"
    assert not again.blocks and not again.new_block
    # what pcc would let through is DUNNO; blocks in force stay enforced
    assert decide(request("GB"), AccountHistory(), warn, NOW).action == "DUNNO"
    blocked = AccountHistory(blocked_since=NOW - HOUR, block_action="HOLD")
    assert decide(request("GB"), blocked, warn, NOW).action == "HOLD blocked"


# --- storage, on each database ------------------------------------------------------


def test_a_real_block_replaces_a_monitor_flag_exactly_once(db_url):
    store = AdminStore(db_url)
    store.create_tables()
    try:
        login = "alice@example.com"
        flag = store.record_block(login, NOW, source="policy", action=MONITOR_ACTION, reason="r", countries=[])
        assert flag is not None
        assert store.record_block(login, NOW, source="policy", action=MONITOR_ACTION, reason="r",
                                  countries=[]) is None
        history = store.load_history(login, NOW - HOUR)
        assert history.blocked_since == NOW and history.block_action == MONITOR_ACTION
        assert not history.enforced_block
        assert store.count_blocked() == {"monitor": 1}
        # only a caller that judged the flag afresh replaces it
        assert store.record_block(login, NOW + HOUR, source="policy", action="HOLD", reason="r", countries=[]) is None
        real = store.record_block(login, NOW + HOUR, source="policy", action="HOLD", reason="r", countries=[],
                                  replace_flag=True)
        assert real is not None and real != flag
        assert store.record_block(login, NOW + HOUR, source="admin", action="HOLD", reason="r", countries=[],
                                  replace_flag=True) is None  # a real block is never replaced
        history = store.load_history(login, NOW - HOUR)
        assert history.enforced_block and history.block_action == "HOLD" and history.blocked_since == NOW + HOUR
        _account, _sightings, blocks = store.account(login)
        assert [(b.action, b.unblocked_at) for b in blocks] == [(MONITOR_ACTION, NOW + HOUR), ("HOLD", None)]
        assert store.count_blocked() == {"enforce": 1}
        assert store.unblock(login, NOW + 2 * HOUR) == real
        assert store.count_blocked() == {}
    finally:
        store.dispose()
