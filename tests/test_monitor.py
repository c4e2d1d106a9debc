"""Monitor mode: pcc records and notifies as it would when enforcing, answers
DUNNO, and lists such accounts as "would be blocked"; switching to enforce
judges them afresh."""
import datetime as dt
import json
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, all_at_once, ip_in, seen_an_hour_before, write_config
from conftest import counted_request as request

import pcc

NOW = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.timezone.utc)
HOUR = dt.timedelta(hours=1)


@pytest.fixture
def settings(make_settings):
    def make(mode):
        return make_settings(**{"policy.mode": mode, "policy.action": "REJECT", "policy.reason": "blocked"})

    return make


# --- the rule, pure -----------------------------------------------------------


def test_monitor_flags_instead_of_blocking(settings):
    past = pcc.AccountHistory(sightings=seen_an_hour_before(NOW, "US", "FR", "DE"))
    decision = pcc.decide(request("GB"), past, settings("monitor"), NOW)
    assert decision.action == "DUNNO" and decision.new_block and decision.record_sighting
    assert decision.reason == "would block (monitor mode): 4 of at most 3 countries in 3 days (US, FR, DE, GB)"
    enforced = pcc.decide(request("GB"), past, settings("enforce"), NOW)
    assert enforced.action == "REJECT blocked" and enforced.reason.startswith("blocking: 4 of at most 3")


def test_a_flagged_account_is_not_flagged_again(settings):
    flagged = pcc.AccountHistory(blocked_since=NOW - HOUR, sightings=seen_an_hour_before(NOW, "US", "FR", "DE", "GB"),
                                 block_action=pcc.MONITOR_ACTION)
    decision = pcc.decide(request("SE"), flagged, settings("monitor"), NOW)
    assert decision.action == "DUNNO" and not decision.new_block
    assert decision.reason == "would be blocked since 2026-11-25 11:00:00 UTC (monitor mode)"


def test_enforce_judges_a_flagged_account_afresh(settings):
    still_over = pcc.AccountHistory(blocked_since=NOW - HOUR, sightings=seen_an_hour_before(NOW, "US", "FR", "DE"),
                                    block_action=pcc.MONITOR_ACTION)
    decision = pcc.decide(request("GB"), still_over, settings("enforce"), NOW)
    assert decision.action == "REJECT blocked" and decision.new_block and decision.replaces_flag
    back_home = pcc.AccountHistory(blocked_since=NOW - HOUR, sightings=seen_an_hour_before(NOW, "GB"),
                                   block_action=pcc.MONITOR_ACTION)
    assert pcc.decide(request("GB"), back_home, settings("enforce"), NOW).action == "DUNNO"


def test_blocks_in_force_stay_enforced_in_monitor_mode(settings):
    blocked = pcc.AccountHistory(blocked_since=NOW - HOUR, block_action="REJECT")
    assert pcc.decide(request("GB"), blocked, settings("monitor"), NOW).action == "REJECT blocked"


def test_mode_is_validated(settings):
    with pytest.raises(pcc.ConfigError, match=r"\[policy\] mode: must be one of ENFORCE, MONITOR, got 'AUDIT'"):
        settings("audit")


# --- storage, on each database ------------------------------------------------------


def test_a_real_block_replaces_a_monitor_flag_exactly_once(db_url):
    store = pcc.Store(db_url)
    store.create_tables()
    try:
        login = "alice@example.com"
        flag = store.record_block(login, NOW, source="policy", action=pcc.MONITOR_ACTION, reason="r", countries=[])
        assert flag is not None
        assert store.record_block(login, NOW, source="policy", action=pcc.MONITOR_ACTION, reason="r",
                                  countries=[]) is None
        history = store.load_history(login, NOW - HOUR)
        assert history.blocked_since == NOW and history.block_action == pcc.MONITOR_ACTION
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
        assert [(b.action, b.unblocked_at) for b in blocks] == [(pcc.MONITOR_ACTION, NOW + HOUR), ("HOLD", None)]
        assert store.count_blocked() == {"enforce": 1}
        assert store.unblock(login, NOW + 2 * HOUR) == real
        assert store.count_blocked() == {}
    finally:
        store.dispose()


# --- the daemon: monitor, then enforce --------------------------------------------


def pcc_command(config, *arguments):
    result = subprocess.run([sys.executable, str(ROOT / "pcc.py"), "--config", config, *arguments],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_monitor_then_enforce(start_daemon, db_url, smtp_sink, tmp_path):
    daemon = start_daemon(**{"db.dbcon": db_url, "policy.mode": "monitor", "policy.action": "REJECT",
                             "mail.notice": "admin@example.com", "mail.mailsrv": "127.0.0.1",
                             "mail.mailport": smtp_sink.port})
    client = daemon.client()
    answers = [client.ask("alice@example.com", ip_in(country)) for country in ("GB", "US", "FR", "DE", "SE")]
    assert answers == ["DUNNO"] * 5
    log = daemon.log()
    assert "MONITOR MODE" in log
    assert "decision=DUNNO reason=would block (monitor mode): 4 of at most 3 countries" in log
    assert "reason=would be blocked since" in log  # the fifth message: flagged already, not flagged again
    (mail,) = [m for _r, m in smtp_sink.wait_for(1)]
    assert mail["Subject"] == "pcc: account alice@example.com would be blocked (monitor mode)"
    assert "its mail still flows" in mail.get_content()

    listing = pcc_command(daemon.config_path, "-l")
    assert "would be blocked" in listing and "MONITOR" in listing
    assert "0 blocked accounts, 1 would be blocked" in listing
    (entry,) = json.loads(pcc_command(daemon.config_path, "-l", "--json"))
    assert entry["state"] == "would be blocked" and entry["action"] == "MONITOR"
    assert "would be blocked since" in pcc_command(daemon.config_path, "-s", "alice@example.com")

    # the admin is convinced: enforce (SIGHUP), and the account is judged afresh
    write_config(tmp_path, _config_values(daemon.config_path, {"policy.mode": "enforce"}),
                 name=daemon.config_path.rsplit("/", 1)[1])
    daemon.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "reloaded" not in daemon.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client.ask("alice@example.com", ip_in("GB")).startswith("REJECT")
    listing = pcc_command(daemon.config_path, "-l")
    assert "1 blocked account" in listing and "would be blocked" not in listing
    subjects = [m["Subject"] for _r, m in smtp_sink.wait_for(2)]
    assert subjects[-1] == "pcc: account alice@example.com blocked (REJECT)"


def test_concurrent_requests_replace_a_flag_with_exactly_one_block(start_daemon, shared_db_url, smtp_sink):
    """Two daemons, 32 requests at once, all over the limit of an account that
    monitor mode flagged: one block replaces the flag, one email."""
    import sqlalchemy as sa

    common = {"db.dbcon": shared_db_url, "policy.action": "HOLD", "policy.reason": "held",
              "mail.notice": "admin@example.com", "mail.mailsrv": "127.0.0.1", "mail.mailport": smtp_sink.port}
    monitor = start_daemon(**dict(common, **{"policy.mode": "monitor"})).client()
    assert [monitor.ask("alice@example.com", ip_in(c)) for c in ("GB", "US", "FR", "DE")] == ["DUNNO"] * 4
    smtp_sink.wait_for(1)
    daemons = [start_daemon(**common), start_daemon(**common)]
    clients = [daemons[n % 2].client() for n in range(32)]
    answers = all_at_once(32, lambda n: clients[n].ask("alice@example.com", ip_in(["SE", "JP"][n % 2], host=n + 1)))
    assert answers == ["HOLD held"] * 32
    engine = sa.create_engine(shared_db_url)
    with engine.connect() as connection:
        actions = connection.execute(sa.select(pcc.Block.action).order_by(pcc.Block.id)).scalars().all()
    engine.dispose()
    assert actions == ["MONITOR", "HOLD"]
    assert len(smtp_sink.wait_for(2)) == 2 and len(smtp_sink.wait_for(3, timeout=2)) == 2


def _config_values(path, changes):
    import configparser

    parser = configparser.ConfigParser(interpolation=None)
    parser.read(path)
    values = {f"{section}.{key}": value for section in parser.sections() for key, value in parser[section].items()}
    values.update(changes)
    return values
