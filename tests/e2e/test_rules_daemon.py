"""Rules per domain and per account (pcc --rule), through two real daemons on
SQLite, MariaDB and PostgreSQL: set by the command, in force in both daemons
within a second, the account's over its domain's over pcc.conf's, shown by -s
with where each value comes from, cleared; bad keys and values refused in
one line before anything is stored."""
import time

import sqlalchemy as sa
from conftest import dovecot_allow, free_port, ip_in, pcc_command, query, send_message, walk

DEFERRED = "DEFER_IF_PERMIT"
API_HEADER = "Authorization: Basic cGNjOnJ1bGVz"


def first_deferred(daemons, login: str, start: int, within: float = 1.0) -> float:
    """Seconds until a new message of `login` is deferred by every daemon."""
    started, n = time.monotonic(), start
    pending = list(daemons)
    while pending:
        assert time.monotonic() - started < within, f"not applied within {within} s by {len(pending)} daemons"
        client = pending[0].client()
        answer = send_message(client, login, f"probe{n}")[0]
        client.close()
        n += 1
        if answer.startswith(DEFERRED):
            pending.pop(0)
        else:
            time.sleep(0.02)
    return time.monotonic() - started


def test_a_rule_is_in_force_in_every_daemon_within_a_second(start_daemon, db_url):
    daemons = [start_daemon(**{"db.dbcon": db_url}) for _ in range(2)]
    config = daemons[0].config_path
    clients = [daemon.client() for daemon in daemons]
    for n in range(4):  # no limit in pcc.conf: everybody sends
        assert send_message(clients[n % 2], "bob@example.org", f"b{n}") == ["DUNNO"]
        assert send_message(clients[n % 2], "ceo@example.org", f"c{n}") == ["DUNNO"]
        assert send_message(clients[n % 2], "eve@example.net", f"e{n}") == ["DUNNO"]
    pcc_command(config, "--rule", "example.org", "messages_per_hour=3", "limits.action=defer")
    pcc_command(config, "--rule", "ceo@example.org", "messages_per_hour=100")
    assert first_deferred(daemons, "bob@example.org", 10) < 1.0
    for client in clients:  # the account's rule over its domain's; another domain keeps pcc.conf's
        assert send_message(client, "ceo@example.org", f"c{time.monotonic_ns()}") == ["DUNNO"]
        assert send_message(client, "eve@example.net", f"e{time.monotonic_ns()}") == ["DUNNO"]
    deadline = time.monotonic() + 5
    while True:  # both daemons write their counts within half a second
        shown = pcc_command(config, "-s", "ceo@example.org").stdout
        # counted since a limit is on for it: the two messages after the rules, not the four before
        if "volume (every daemon, as last written): 2 messages in the last hour (limit 100)" in shown:
            break
        assert time.monotonic() < deadline, shown
        time.sleep(0.2)
    assert ("messages_per_hour = 100 (rule of ceo@example.org)" in shown
            and "limits.action = defer (rule of example.org)" in shown
            and "how_many_different_countries = 3 (pcc.conf)" in shown), shown
    assert "rules cleared" in pcc_command(config, "--rule", "example.org", "--clear").stdout
    time.sleep(1.0)
    for client in clients:
        assert send_message(client, "bob@example.org", f"b{time.monotonic_ns()}") == ["DUNNO"]
        client.close()
    assert "example.org" not in pcc_command(config, "--rules").stdout.replace("ceo@example.org", "")


def test_one_domain_in_monitor_mode_while_the_others_are_enforced(start_daemon, sqlite_url):
    daemon = start_daemon(**{"db.dbcon": sqlite_url, "policy.how_many_different_countries": "2",
                             "policy.action": "REJECT", "policy.reason": "stopped"})
    pcc_command(daemon.config_path, "--rule", "new.example", "mode=monitor")
    time.sleep(1.0)
    client = daemon.client()
    assert walk(client, "thief@new.example", ["GB", "US", "FR", "DE"]) == ["DUNNO"] * 4  # flagged only
    assert walk(client, "thief@old.example", ["GB", "US", "FR"]) == ["DUNNO", "DUNNO", "REJECT stopped"]
    client.close()
    listed = pcc_command(daemon.config_path, "-l").stdout
    assert "thief@new.example" in listed and "would be blocked" in listed, listed


def test_a_bad_rule_is_refused_in_one_line_and_nothing_is_stored(start_daemon, sqlite_url):
    daemon = start_daemon(**{"db.dbcon": sqlite_url})
    for arguments, message in [
        (["example.org", "messages_per_hour=lots"], "[limits] messages_per_hour: must be a whole number"),
        (["example.org", "colour=blue"], "'colour' is not a key a rule may set"),
        (["example.org", "mode=sometimes"], "[policy] mode: must be one of ENFORCE, MONITOR"),
        (["example.org", "ignorecountries=XX"], "'XX' is not an ISO 3166 two-letter country code"),
        (["example.org", "messages_per_hour=5", "action=drop"], "[policy] action: must be one of REJECT, HOLD"),
        (["not a domain", "mode=monitor"], "is neither a domain"),
    ]:
        result = pcc_command(daemon.config_path, "--rule", *arguments, expect=1)
        assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert query(sqlite_url, sa.text("SELECT COUNT(*) FROM pcc_rules"))[0][0] == 0
    client = daemon.client()
    assert client.ask("alice@example.org", ip_in("GB")) == "DUNNO"
    client.close()


def test_a_domains_hold_blocks_at_both_doors_on_a_reject_site(start_daemon, sqlite_url):
    """pcc.conf says REJECT, the domain's rule HOLD: its blocked account gets
    HOLD from Postfix and is refused by Dovecot; another domain's gets REJECT."""
    dovecot_port = free_port()
    daemon = start_daemon(**{"db.dbcon": sqlite_url, "policy.action": "REJECT", "policy.reason": "stopped",
                             "dovecot.policy_port": dovecot_port, "dovecot.api_header": API_HEADER})
    pcc_command(daemon.config_path, "--rule", "held.example", "action=hold")
    time.sleep(1.0)
    client = daemon.client()
    assert walk(client, "thief@held.example", ["GB", "US", "FR", "DE"])[-1] == "HOLD stopped"
    assert walk(client, "thief@other.example", ["GB", "US", "FR", "DE"])[-1] == "REJECT stopped"
    client.close()
    for login in ("thief@held.example", "thief@other.example"):
        assert dovecot_allow(dovecot_port, login, API_HEADER) == -1, login
    assert dovecot_allow(dovecot_port, "honest@held.example", API_HEADER) == 0
