"""Monitor mode: pcc records and notifies as it would when enforcing, answers
DUNNO, and lists such accounts as "would be blocked"; switching to enforce
judges them afresh."""
import json
import signal
import subprocess
import sys
import time

from conftest import ROOT, all_at_once, ip_in, write_config

from pcclib.storage import Block

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
        actions = connection.execute(sa.select(Block.action).order_by(Block.id)).scalars().all()
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
