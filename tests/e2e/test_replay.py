"""pcc.py --replay: Postfix logs through the daemon's own decision."""
import datetime as dt
import gzip
import json
import os
import subprocess
import sys

import pytest
import sqlalchemy as sa
from conftest import (
    NOT_IN_GEOIP,
    ROOT,
    SERVER_DATABASES,
    fresh_database,
    ip_in,
    shifted_clock_environment,
    write_config,
)

from pcclib.storage import Block, Sighting

START = dt.datetime(2025, 12, 30, 22, 0, 0, tzinfo=dt.timezone.utc)  # the classic log crosses new year
# The day the replays run on (their clock, through libfaketime): classic stamps
# have no year, so what a replay reports depends on it, never on today's date.
# The log above ends on 5 January 2026; each of these days is after it.
REPLAY_DAYS = ["2026-01-06 09:00:00", "2026-03-01 00:30:00", "2026-12-03 13:57:00", "2026-12-29 23:00:00"]


def classic(moment, ip, login, service="postfix/submission/smtpd"):
    return (f"{moment:%b} {moment.day:2d} {moment:%H:%M:%S} mx {service}[4242]: 4F3A21C0: "
            f"client=unknown[{ip}], sasl_method=LOGIN, sasl_username={login}\n")


def rfc3339(moment, ip, login, service="postfix/smtpd"):
    local = moment.astimezone(dt.timezone(dt.timedelta(hours=2)))
    return (f"{local.isoformat(timespec='microseconds')} mx {service}[77]: 5B2C: client=mail.example[{ip}]:5432,"
            f" sasl_method=PLAIN, sasl_username={login}, sasl_sender=\n")


def scenario():
    """(moment, ip, login) submissions: a home user, a traveller who stays
    within the rule, a compromised account, and one whose countries are spread
    wider than the window."""
    events = []
    hour = dt.timedelta(hours=1)
    for n in range(30):
        events.append((START + n * hour, ip_in("GB", n % 3 + 1), "home@example.com"))
    for n, country in enumerate(["GB", "FR", "DE", "FR", "GB"]):
        events.append((START + n * 5 * hour, ip_in(country), "traveller@example.com"))
    for n, country in enumerate(["US", "BR", "CN", "RU", "NL", "JP"]):  # blocked at the 4th: RU
        events.append((START + dt.timedelta(hours=3, minutes=7 * n), ip_in(country, version=6 if n % 2 else 4),
                       "victim@example.com"))
    for n, country in enumerate(["GB", "US", "FR", "DE"]):  # one country every 2 days: never 4 in 3 days
        events.append((START + dt.timedelta(days=2 * n), ip_in(country), "slow@example.com"))
    events.append((START + 2 * hour, NOT_IN_GEOIP, "home@example.com"))
    events.sort()
    return events


def write_logs(directory, events):
    """The same events as a classic syslog file (plain) and an RFC 3339 file (gz)."""
    noise = "Dec 30 22:00:00 mx postfix/qmgr[9]: 4F3A21C0: from=<a@b>, size=1, nrcpt=1 (queue active)\n"
    garbage = [
        "Dec 30 22:00:01 mx postfix/smtpd[1]: 4F3A21C0: client=unknown[], sasl_username=bad@example.com\n",
        "Dez 30 22:00:01 mx postfix/smtpd[1]: 4F3A21C0: client=unknown[1.2.3.4], sasl_username=x@example.com\n",
    ]
    classic_path = directory / "maillog"
    with open(classic_path, "w") as out:
        out.write(noise)
        out.writelines(garbage)
        out.writelines(classic(*event) for event in events)
    iso_path = directory / "maillog.json.gz"
    with gzip.open(iso_path, "wt") as out:
        out.write(noise)
        out.writelines(rfc3339(*event) for event in events)
    return str(classic_path), str(iso_path)


@pytest.fixture
def config(tmp_path, geoip_path):
    return write_config(tmp_path, {"db.dbcon": f"sqlite:///{tmp_path}/live.sqlite3", "geoip.database": geoip_path,
                                   "db.spool_file": "", "policy.action": "REJECT"})


def replay(config, *arguments, stdin=None, today=REPLAY_DAYS[0]):
    """pcc.py --replay run on the day `today` (UTC), its clock set by libfaketime."""
    result = subprocess.run([sys.executable, str(ROOT / "pcc.py"), "--config", config, "--replay", *arguments],
                            capture_output=True, text=True, timeout=120, input=stdin,
                            env={**shifted_clock_environment(f"@{today}"), "TZ": "UTC"})
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("today", REPLAY_DAYS)
def test_report_in_both_time_stamp_formats(tmp_path, config, today):
    classic_path, iso_path = write_logs(tmp_path, scenario())
    for path in (classic_path, iso_path):
        report = json.loads(replay(config, path, "--json", today=today))
        assert [block["login"] for block in report["would_block"]] == ["victim@example.com"]
        (block,) = report["would_block"]
        assert block["blocked_at"] == (START + dt.timedelta(hours=3, minutes=21)).isoformat()
        assert [seen["country"] for seen in block["countries"]] == ["US", "BR", "CN", "RU"]
        assert block["countries"][1]["last_ip"] == ip_in("BR", version=6)
        assert "sasl_username=victim@example.com" in block["log_line"] and ip_in("RU", version=6) in block["log_line"]
        assert report["submissions"] == len(scenario())
        assert report["accounts_by_most_countries"] == {"1": 1, "2": 1, "3": 1, "4": 1, "5+": 0}
        assert report["first"] == START.isoformat()
    assert json.loads(replay(config, classic_path, "--json", today=today))["unparseable_lines"] == 2
    assert not os.path.exists(tmp_path / "live.sqlite3")  # the live database is never touched


@pytest.mark.parametrize("today", REPLAY_DAYS)
def test_text_report(tmp_path, config, today):
    classic_path, _ = write_logs(tmp_path, scenario())
    text = replay(config, classic_path, today=today)
    assert f"{len(scenario()) + 3} lines, {len(scenario())} authenticated submissions" in text
    assert "2 unparseable lines skipped" in text
    assert "Would have blocked 1 account (1 for too many countries):" in text
    assert "victim@example.com  at 2025-12-31 01:21:00 UTC  from US" in text
    assert "    why: blocking: 4 of at most 3 countries in 3 days (US, " in text
    assert "   4 countries 1" in text


def test_threshold_and_days_overrides(tmp_path, config):
    classic_path, _ = write_logs(tmp_path, scenario())

    def blocked(*extra):
        report = json.loads(replay(config, classic_path, "--json", *extra))
        return sorted(block["login"] for block in report["would_block"])

    assert blocked("--threshold", "2") == ["traveller@example.com", "victim@example.com"]
    assert blocked("--days", "7") == ["slow@example.com", "victim@example.com"]
    assert blocked("--threshold", "6") == []


def test_whitelists_ignored_countries_and_domains_apply(tmp_path, geoip_path):
    classic_path, _ = write_logs(tmp_path, scenario())
    for overrides in ({"policy.whitelisted": "victim@example.com"}, {"policy.ignorecountries": "RU"},
                      {"mail.domains": "example.org"}, {"policy.whitelistedips": "2a0c::/16, 30.1.0.0/16"}):
        config = write_config(tmp_path, {"db.dbcon": "sqlite://", "geoip.database": geoip_path, **overrides})
        report = json.loads(replay(config, classic_path, "--json"))
        blocked = [b["login"] for b in report["would_block"]]
        if "policy.ignorecountries" in overrides:
            assert blocked == ["victim@example.com"]  # still blocked, one country later (NL)
            assert [c["country"] for c in report["would_block"][0]["countries"]] == ["US", "BR", "CN", "NL"]
        else:
            assert blocked == [], overrides


def test_standard_input_and_several_files(tmp_path, config):
    classic_path, _ = write_logs(tmp_path, scenario())
    text = open(classic_path).read()
    assert json.loads(replay(config, "-", "--json", stdin=text))["would_block"][0]["login"] == "victim@example.com"
    half = len(text.splitlines()) // 2
    first, second = tmp_path / "maillog.1", tmp_path / "maillog.0"
    first.write_text("".join(text.splitlines(True)[:half]))
    second.write_text("".join(text.splitlines(True)[half:]))
    report = json.loads(replay(config, str(first), str(second), "--json"))
    assert [b["login"] for b in report["would_block"]] == ["victim@example.com"]


def test_predictions_match_the_live_daemon(tmp_path, config, start_daemon, geoip_path):
    # a short log (within one window), so the daemon's real clock and the log's agree
    events = [(START + dt.timedelta(minutes=n), ip, login) for n, (_t, ip, login) in enumerate(scenario())
              if login != "slow@example.com"]
    events += [(START + dt.timedelta(hours=5, minutes=n), ip_in(c), "slow@example.com")
               for n, c in enumerate(["GB", "US", "FR"])]
    classic_path, _ = write_logs(tmp_path, events)
    predicted = json.loads(replay(config, classic_path, "--json"))["would_block"]
    daemon = start_daemon(**{"policy.action": "REJECT"})
    client = daemon.client()
    live_blocks = {}
    for _moment, ip, login in events:
        if client.ask(login, ip).startswith("REJECT") and login not in live_blocks:
            live_blocks[login] = ip
    assert {b["login"]: b["countries"][-1]["last_ip"] for b in predicted} == live_blocks


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_record_writes_sightings_a_new_daemon_knows(tmp_path, geoip_path, start_daemon, backend):
    url = f"sqlite:///{tmp_path}/record.sqlite3" if backend == "sqlite" else fresh_database(
        SERVER_DATABASES["postgresql"])
    now = dt.datetime.now(dt.timezone.utc)
    events = [(now - dt.timedelta(hours=5 - n), ip_in(c), "alice@example.com")
              for n, c in enumerate(["GB", "US", "FR"])]
    events.append((now - dt.timedelta(hours=1), ip_in("GB", 9), "alice@example.com"))
    _, log_path = write_logs(tmp_path, events)  # RFC 3339 stamps: the daemon's clock is the real one
    config = write_config(tmp_path, {"db.dbcon": url, "geoip.database": geoip_path, "db.spool_file": ""},
                          name="record.conf")
    output = replay(config, log_path, "--record", today=f"{now:%Y-%m-%d %H:%M:%S}")
    assert "recorded 3 sightings of 1 accounts from 4 submissions" in output
    engine = sa.create_engine(url)
    with engine.connect() as connection:
        rows = connection.execute(sa.select(Sighting.country, Sighting.last_ip, Sighting.first_seen)
                                  .order_by(Sighting.country)).all()
        blocks = connection.execute(sa.select(sa.func.count()).select_from(Block)).scalar()
    engine.dispose()
    assert [(r.country, r.last_ip) for r in rows] == [("FR", ip_in("FR")), ("GB", ip_in("GB", 9)),
                                                        ("US", ip_in("US"))]
    assert blocks == 0  # sightings, never blocks
    # recording again merges: nothing doubles, the earliest first_seen stays
    replay(config, log_path, "--record", today=f"{now:%Y-%m-%d %H:%M:%S}")
    daemon = start_daemon(**{"db.dbcon": url, "policy.action": "REJECT"})
    assert daemon.client().ask("alice@example.com", ip_in("DE")).startswith("REJECT")


def test_replay_skips_a_time_stamp_out_of_range(tmp_path, geoip_path):
    config = write_config(tmp_path, {"geoip.database": geoip_path, "db.dbcon": f"sqlite:///{tmp_path}/r.db"})
    log = tmp_path / "mail.log"
    log.write_text("0001-01-01T00:00:00+05:00 mx postfix/submission/smtpd[1]: 4F3A21C0: "
                   f"client=unknown[{ip_in('GB')}], sasl_method=LOGIN, sasl_username=alice@example.com\n")
    result = subprocess.run([sys.executable, str(ROOT / "pcc.py"), "--config", config, "--replay", str(log),
                             "--json"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["lines"] == 1 and report["submissions"] == 0 and report["unparseable_lines"] == 1


def test_replay_into_head_ends_quietly(tmp_path, geoip_path):
    config = write_config(tmp_path, {"geoip.database": geoip_path, "db.dbcon": f"sqlite:///{tmp_path}/r.db"})
    log = tmp_path / "mail.log"
    with open(log, "w") as out:
        for n in range(3000):
            out.write(f"Nov 25 18:{n // 60 % 60:02d}:{n % 60:02d} mx postfix/submission/smtpd[1]: X: "
                      f"client=unknown[{ip_in(['GB', 'US', 'FR', 'DE'][n % 4])}], sasl_method=LOGIN, "
                      f"sasl_username=user{n}@example.com\n")
    pipeline = subprocess.run(f"{sys.executable} {ROOT / 'pcc.py'} --config {config} --replay {log} --json | head -1",
                              shell=True, capture_output=True, text=True, timeout=60)
    assert pipeline.stdout.strip() == "{"
    assert pipeline.stderr == ""


def test_replay_suggests_limits_from_the_sites_own_traffic(tmp_path, geoip_path):
    """The busiest accounts' peaks (recipients from the queue manager's
    nrcpt), the 99.9th percentile, and whom the configured limits would
    have stopped, and when."""
    lines, minute = [], dt.timedelta(minutes=1)
    for n in range(50):  # a spam run: 50 messages of 10 recipients in 50 minutes
        moment, queue_id = START + n * minute, f"5A{n:04X}"
        lines.append(classic(moment, ip_in("GB"), "spammer@example.com").replace("4F3A21C0", queue_id))
        lines.append(f"{moment:%b} {moment.day:2d} {moment:%H:%M:%S} mx postfix/qmgr[9]: {queue_id}: "
                     f"from=<spammer@example.com>, size=900, nrcpt=10 (queue active)\n")
    for user in range(20):  # ordinary users: two messages each, hours apart, one recipient
        for n in range(2):
            moment = START + dt.timedelta(hours=3 * n, minutes=user)
            lines.append(classic(moment, ip_in("GB"), f"user{user}@example.com").replace("4F3A21C0", f"6B{user:02X}{n}"))
    lines.sort(key=lambda line: line[:15])
    log_path = tmp_path / "maillog"
    log_path.write_text("".join(lines))
    config = write_config(tmp_path, {"db.dbcon": f"sqlite:///{tmp_path}/live.sqlite3", "geoip.database": geoip_path,
                                     "db.spool_file": "", "limits.messages_per_hour": "30",
                                     "limits.recipients_per_day": "400"})
    volume = json.loads(replay(config, str(log_path), "--json"))["volume"]
    assert volume["busiest"][0] == {"login": "spammer@example.com", "messages_per_hour": 50,
                                    "messages_per_day": 50, "recipients_per_hour": 500, "recipients_per_day": 500}
    assert volume["busiest"][1]["messages_per_hour"] == 1 and len(volume["busiest"]) == 10
    assert volume["percentile_99.9"]["messages_per_hour"] == 50  # 21 accounts: the top one is the 99.9th
    stops = {(stop["login"], stop["limit"]): stop["at"] for stop in volume["would_stop"]}
    assert stops == {("spammer@example.com", "messages_per_hour"): (START + 30 * minute).isoformat(),
                     ("spammer@example.com", "recipients_per_day"): (START + 40 * minute).isoformat()}
    text = replay(config, str(log_path))
    assert "With [limits] messages_per_hour = 30, recipients_per_day = 400: 1 account would have been stopped" in text
    assert "spammer@example.com  at 2025-12-30 22:30:00 UTC  over messages_per_hour = 30" in text, text
