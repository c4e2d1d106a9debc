"""Volume limits through the real daemon, on SQLite, MariaDB and PostgreSQL:
messages and recipients counted per account, deferred or blocked over a
limit, summed across two daemons on one database (the overshoot measured
against the bound docs/administration.md states), a reload turning defer
into block, metrics per limit."""
import json
import os
import signal
import time

import sqlalchemy as sa
from conftest import TcpProxy, blocked_logins, free_port, query, scrape, send_message, wait_for_log

from pcclib.volume import VOLUME_SYNC_INTERVAL

DEFERRED = "DEFER_IF_PERMIT"


def test_a_limit_defers_then_a_reload_makes_it_block(start_daemon, db_url, tmp_path):
    daemon = start_daemon(**{"db.dbcon": db_url, "limits.messages_per_hour": "3",
                             "limits.recipients_per_hour": "100", "limits.action": "defer",
                             "policy.action": "REJECT", "policy.reason": "stopped"})
    client = daemon.client()
    for n in range(3):  # three messages of two recipients each: three messages
        assert send_message(client, "alice@example.com", f"a{n}", recipients=2) == ["DUNNO", "DUNNO"]
    answer = send_message(client, "alice@example.com", "a3")[0]
    assert answer.startswith(f"{DEFERRED} 4 messages in the last hour (limit 3)"), answer
    assert send_message(client, "bob@example.com", "b0") == ["DUNNO"]  # another account has its own count
    assert send_message(client, "alice@example.com", "a4")[0].startswith(DEFERRED)  # deferred: still over
    with open(daemon.config_path) as config:
        text = config.read().replace("action = defer", "action = block")
    with open(daemon.config_path, "w") as config:
        config.write(text)
    os.kill(daemon.process.pid, signal.SIGHUP)
    wait_for_log(daemon, "reloaded")
    assert send_message(client, "alice@example.com", "a5") == ["REJECT stopped"]
    wait_for_log(daemon, "NEW BLOCK")
    line = [line for line in daemon.log().splitlines() if "NEW BLOCK" in line][0]
    # a3 and a4 were deferred, not counted: a5 is the fourth message, its recipient the seventh
    assert ("reason=blocking: 4 messages in the last hour (limit 3); 7 recipients in the last hour (limit 100); "
            "1 country in 3 days (GB)") in line, line
    assert send_message(client, "alice@example.com", "a6") == ["REJECT stopped"]  # blocked stays blocked
    client.close()


def test_one_daemon_lets_through_exactly_the_limit(start_daemon, sqlite_url):
    metrics_port = free_port()
    daemon = start_daemon(**{"db.dbcon": sqlite_url, "limits.recipients_per_day": "20", "limits.action": "defer",
                             "server.metrics_port": str(metrics_port)})
    client = daemon.client()
    answers = [answer for n in range(8) for answer in send_message(client, "carol@example.com", f"c{n}", 3)]
    assert answers.count("DUNNO") == 20 and all(answer.startswith(DEFERRED) for answer in answers[20:])
    client.close()
    hits = scrape(metrics_port)[("pcc_limit_hits_total", (("action", "defer"), ("limit", "recipients_per_day")))]
    assert hits == 4


def test_two_daemons_overshoot_a_limit_by_at_most_the_stated_bound(start_daemon, db_url):
    """Two daemons, one account sending RATE messages a second alternately
    through each: together they let through the limit and at most what the
    other sent in the last 2 x VOLUME_SYNC_INTERVAL plus a write (bounded
    here by a whole second of the account's rate)."""
    limit, rate = 40, 20.0
    daemons = [start_daemon(**{"db.dbcon": db_url, "limits.messages_per_hour": str(limit),
                               "limits.action": "defer"}) for _ in range(2)]
    clients = [daemon.client() for daemon in daemons]
    accepted, started = 0, time.monotonic()
    for n in range(3 * limit):
        time.sleep(max(0.0, started + n / rate - time.monotonic()))
        if send_message(clients[n % 2], "dave@example.com", f"d{n}")[0] == "DUNNO":
            accepted += 1
    for client in clients:
        client.close()
    bound = rate * (2 * VOLUME_SYNC_INTERVAL + 0.5)
    print(f"limit {limit}, accepted {accepted}, overshoot {accepted - limit}, bound {bound:g}")
    assert limit <= accepted <= limit + bound, (accepted, daemons[0].log()[-3000:])



def test_a_limit_is_decided_from_memory_while_the_database_fails(start_daemon, shared_db_url, tmp_path):
    """Counts live in memory: while the database refuses, an account known
    and one never seen are both blocked at the limit (the block spooled and
    written when the database is back); blocked stays blocked."""
    url = sa.engine.make_url(shared_db_url)
    proxy = TcpProxy(url.host, url.port)
    try:
        proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        daemon = start_daemon(**{"db.dbcon": proxied, "db.spool_file": str(tmp_path / "spool.jsonl"),
                                 "limits.messages_per_hour": "3", "policy.action": "REJECT",
                                 "policy.reason": "stopped"})
        client = daemon.client()
        assert [send_message(client, "alice@example.com", f"a{n}")[0] for n in range(2)] == ["DUNNO"] * 2
        proxy.cut("refuse")
        answers = {login: [send_message(client, login, f"{login}{n}")[0] for n in range(first, 5)]
                   for login, first in (("alice@example.com", 2), ("carol@example.com", 0))}
        assert answers["alice@example.com"] == ["DUNNO", "REJECT stopped", "REJECT stopped"], daemon.log()[-2000:]
        assert answers["carol@example.com"] == ["DUNNO"] * 3 + ["REJECT stopped"] * 2, daemon.log()[-2000:]
        proxy.restore()
        deadline = time.monotonic() + 15
        while blocked_logins(shared_db_url) != {"alice@example.com", "carol@example.com"}:
            assert time.monotonic() < deadline, daemon.log()[-3000:]
            # a probe finds it back (each from an account of its own: dave's would reach the limit)
            send_message(client, f"probe{time.monotonic_ns()}@example.com", "p")
            time.sleep(0.3)
        reasons = [row[0] for row in query(shared_db_url, sa.text("SELECT reason FROM pcc_blocks"))]
        assert all("4 messages in the last hour (limit 3)" in reason for reason in reasons), reasons
        assert send_message(client, "alice@example.com", "after")[0] == "REJECT stopped"
        client.close()
    finally:
        proxy.close()


def test_notify_tells_the_admins_once_per_limit_and_window(start_daemon, sqlite_url, smtp_sink, receivers):
    hook = receivers()
    daemon = start_daemon(**{"db.dbcon": sqlite_url, "limits.messages_per_hour": "2", "limits.action": "notify",
                             "mail.notice": "admin@example.com", "mail.mailsrv": "127.0.0.1",
                             "mail.mailport": smtp_sink.port, "notify.webhook_urls": hook.url})
    client = daemon.client()
    answers = [send_message(client, "erin@example.com", f"e{n}")[0] for n in range(6)]
    assert answers == ["DUNNO"] * 6  # notify lets the mail through
    client.close()
    events = [json.loads(body) for _headers, body in hook.wait(1)]
    mails = [message for _to, message in smtp_sink.wait_for(1)]
    time.sleep(1.0)  # a second notice would have come by now
    assert len(hook.posts) == 1 and len(smtp_sink.messages) == 1, (hook.posts, smtp_sink.messages)
    assert events[0]["event"] == "limit_reached" and events[0]["account"] == "erin@example.com"
    assert "3 messages in the last hour (limit 2)" in events[0]["text"]
    assert mails[0]["Subject"] == "pcc: erin@example.com over a volume limit"
    assert "the admins told already" in daemon.log()
