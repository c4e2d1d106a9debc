"""The admin command line (without Postfix; the held-mail commands are proven
against a real Postfix in test_postfix_e2e.py)."""
import json
import os
import re

import pytest
from conftest import free_port, ip_in, pcc_command, run_pcc, wait_until_visible, walk, write_config


@pytest.fixture
def setup(start_daemon, db_url, smtp_sink):
    daemon = start_daemon(**{"db.dbcon": db_url, "policy.action": "REJECT", "mail.notice": "admin@example.com",
                             "mail.mailsrv": "127.0.0.1", "mail.mailport": smtp_sink.port})
    client = daemon.client()
    for country in ("GB", "US", "FR", "DE"):
        client.ask("alice@example.com", ip_in(country))
    client.ask("bob@example.com", ip_in("GB"))
    client.ask("bob@example.com", ip_in("US"))
    smtp_sink.wait_for(1)
    return daemon, client, smtp_sink


pcc = pcc_command


def test_list_shows_blocked_accounts_with_countries(setup):
    daemon, _client, _sink = setup
    output = pcc(daemon.config_path, "-l").stdout
    assert "alice@example.com" in output and "bob@example.com" not in output
    for country in ("GB", "US", "FR", "DE"):
        assert f"{country}      {ip_in(country)}" in output
    assert "REJECT" in output and "1 blocked account" in output
    (entry,) = json.loads(pcc(daemon.config_path, "-l", "--json").stdout)
    assert entry["login"] == "alice@example.com" and entry["action"] == "REJECT"
    assert [c["country"] for c in entry["countries"]] == ["GB", "US", "FR", "DE"]
    assert entry["trigger"]["client_address"] == ip_in("DE")


def test_show_tells_how_close_an_account_is(setup):
    daemon, _client, _sink = setup
    output = pcc(daemon.config_path, "-s", "Bob@Example.com").stdout
    assert "bob@example.com: not blocked" in output
    assert "countries in the last 3 days: 2 (blocked at more than 3; 2 more would block)" in output
    assert f"GB  last IP {ip_in('GB')}" in output
    shown = json.loads(pcc(daemon.config_path, "-s", "alice@example.com", "--json").stdout)
    assert shown["blocked"] is True and len(shown["countries_in_window"]) == 4
    assert shown["threshold"] == 3 and len(shown["blocks"]) == 1


def test_unblock_while_the_daemon_serves_and_repeat(setup):
    daemon, client, sink = setup
    assert client.ask("alice@example.com", ip_in("GB")).startswith("REJECT")
    output = pcc(daemon.config_path, "-u", "alice@example.com").stdout
    assert "alice@example.com unblocked" in output
    wait_until_visible()  # the daemon had alice in memory, blocked
    assert client.ask("alice@example.com", ip_in("GB")) == "DUNNO"
    assert "not blocked" in pcc(daemon.config_path, "-u", "alice@example.com").stdout
    subjects = [m["Subject"] for _r, m in sink.wait_for(2)]
    assert "pcc: account alice@example.com unblocked" in subjects
    # the history of the block stays
    shown = json.loads(pcc(daemon.config_path, "-s", "alice@example.com", "--json").stdout)
    assert shown["blocked"] is False and shown["blocks"][0]["unblocked_at"] is not None
    assert [c["country"] for c in shown["countries_in_window"]] == ["GB"]


def test_manual_block_notifies(setup):
    daemon, client, sink = setup
    assert "carol@example.com blocked" in pcc(daemon.config_path, "-b", "carol@example.com").stdout
    assert client.ask("carol@example.com", ip_in("GB")).startswith("REJECT")
    mails = sink.wait_for(2)
    (manual,) = [m for _r, m in mails if "carol@example.com" in m["Subject"]]
    assert "blocked by an administrator" in manual.get_content()


def test_unknown_login_and_bad_arguments(setup):
    daemon, _client, _sink = setup
    result = pcc(daemon.config_path, "-u", "nobody@example.com", expect=1)
    assert result.stderr.strip() == "pcc: unknown login nobody@example.com: pcc has never counted nor blocked it"
    assert pcc(daemon.config_path, "-s", "nobody@example.com", expect=1).stderr.startswith("pcc: unknown login")
    assert "'many' is not a number of days (-c is --cleanup DAYS; the configuration file goes with --config" \
        in pcc(daemon.config_path, "-c", "many", expect=2).stderr
    assert "is not a number of days" in pcc("/etc/pcc.conf", "-c", daemon.config_path, expect=2).stderr
    assert "not allowed with argument" in pcc(daemon.config_path, "-l", "-u", "x", expect=2).stderr
    assert "--record go with --replay" in pcc(daemon.config_path, "-l", "--record", expect=2).stderr


def test_cleanup_deletes_old_sightings_only(setup):
    daemon, _client, _sink = setup
    result = pcc(daemon.config_path, "-c", "1", expect=1)
    assert "refusing to delete sightings younger than the window" in result.stderr
    assert "deleted 0 sightings older than 30 days" in pcc(daemon.config_path, "-c", "30").stdout


def test_unreachable_database_is_one_clear_line(tmp_path):
    url = f"postgresql+psycopg://pcc:Secret-Pw-9@127.0.0.1:{free_port()}/pcc"
    config = write_config(tmp_path, {"db.dbcon": url})
    result = pcc(config, "-l", expect=1)
    assert result.stderr.startswith("pcc: database postgresql+psycopg://pcc:***@127.0.0.1")
    assert "Secret-Pw-9" not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("setting, login, why", [
    ({"policy.whitelisted": "boss@example.com"}, "boss@example.com", "whitelisted login"),
    ({"mail.domains": "example.com"}, "carol@other.example", "login not in [mail] domains"),
])
def test_block_refuses_a_login_pcc_never_blocks(start_daemon, setting, login, why):
    daemon = start_daemon(**{"policy.action": "REJECT", **setting})
    result = pcc_command(daemon.config_path, "-b", login, expect=1)
    assert result.stderr.strip() == f"pcc: {login} is not blocked: pcc never blocks it ({why}); change that first"
    assert daemon.client().ask(login, ip_in("GB")) == "DUNNO"
    assert "No account is blocked." in pcc_command(daemon.config_path, "-l").stdout


def test_a_login_cannot_add_mail_headers_nor_run_from_a_pasted_command(start_daemon, smtp_sink):
    daemon = start_daemon(**{"policy.action": "REJECT", "mail.notice": "admin@example.com",
                             "mail.mailsrv": "127.0.0.1", "mail.mailport": smtp_sink.port})
    import base64

    header = base64.b64encode(b"x\r\nBcc: victim@example.net\r\nX-Evil: 1").decode()
    evil = f"=?utf-8?b?{header}?=$(touch${{IFS}}/tmp/pcc-pwned)@example.com"
    walk(daemon.client(), evil, ["GB", "US", "FR", "DE"])
    ((recipients, message),) = smtp_sink.wait_for(1)
    assert recipients == ["admin@example.com"]
    assert message["Bcc"] is None and message["X-Evil"] is None
    unblock_line = next(line for line in message.get_content().splitlines() if " -u " in line)
    assert unblock_line.strip().endswith(f"-u '{evil.lower()}'")


def audit_lines(result) -> list:
    return [line.split(": INFO ", 1)[1] for line in result.stderr.splitlines() if ": INFO admin: " in line]


def test_every_change_an_admin_makes_leaves_one_line_saying_what_whom_who_and_the_result(setup):
    """The trail in the mail log (syslog; --stderr shows it on standard error
    too): each command that changes something, refused or done, with the
    user behind sudo; reading commands leave none."""
    daemon, _client, _sink = setup
    as_sudo = {"env": {**os.environ, "SUDO_USER": "bob"}}
    config = daemon.config_path
    unblocked = run_pcc("--config", config, "--stderr", "-u", "alice@example.com", expect=0, **as_sudo)
    (line,) = audit_lines(unblocked)
    assert re.fullmatch(r"admin: unblock of alice@example.com by root \(sudo from bob\): alice@example.com unblocked "
                        r"\(block #\d+\); its earlier countries no longer count", line), line
    assert audit_lines(run_pcc("--config", config, "--stderr", "-s", "alice@example.com", expect=0)) == []
    assert audit_lines(run_pcc("--config", config, "--stderr", "-l", expect=0)) == []
    refused = run_pcc("--config", config, "--stderr", "-u", "nobody@example.com", expect=1)
    assert audit_lines(refused) == ["admin: unblock of nobody@example.com by root: refused: unknown login "
                                    "nobody@example.com: pcc has never counted nor blocked it"]
    passed = run_pcc("--config", config, "--stderr", "--allow", "bob@example.com", "--country", "FR", "--days", "2",
                     expect=0)
    (line,) = audit_lines(passed)
    assert line.startswith("admin: travel pass of bob@example.com (FR, 2 days) by root: travel pass for "
                           "bob@example.com: FR does not count until ")
    blocked = run_pcc("--config", config, "--stderr", "-b", "Bob@Example.com", expect=0)
    assert audit_lines(blocked) == ["admin: block of bob@example.com by root: bob@example.com blocked: its "
                                    "messages now get REJECT"]


def test_a_login_without_a_domain_is_refused_where_the_sites_logins_have_one(setup, start_daemon, tmp_path):
    """-b root on a site of user@domain logins is most likely a slip; a site
    whose logins are bare names (its own database) is never asked."""
    daemon, client, _sink = setup
    for option in ("-b", "-u", "--allow"):
        extra = ["--country", "FR", "--days", "1"] if option == "--allow" else []
        result = pcc(daemon.config_path, option, "root", *extra, expect=1)
        assert result.stderr.strip() == ("pcc: root has no domain, but this site's logins have one: write it whole "
                                         "(e.g. root@example.com), or add --force to mean the bare name")
    assert pcc(daemon.config_path, "-b", "root", "--force").stdout.startswith("root blocked")
    wait_until_visible()
    assert client.ask("root", ip_in("GB")).startswith("REJECT")
    bare = start_daemon(**{"policy.action": "REJECT", "db.dbcon": f"sqlite:///{tmp_path}/bare.sqlite3"})
    assert bare.client().ask("carol", ip_in("GB")) == "DUNNO"  # a first country is written before the answer
    assert pcc(bare.config_path, "-b", "dave").stdout.startswith("dave blocked")


def test_show_names_the_last_thing_an_administrator_did_to_the_account(setup):
    daemon, _client, _sink = setup
    config = daemon.config_path
    as_sudo = {"env": {**os.environ, "SUDO_USER": "bob"}}
    assert "last admin action" not in run_pcc("--config", config, "-s", "alice@example.com", expect=0).stdout
    run_pcc("--config", config, "-u", "alice@example.com", expect=0, **as_sudo)
    shown = run_pcc("--config", config, "-s", "alice@example.com", expect=0).stdout
    assert re.search(r"^last admin action: unblock, \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC by root \(sudo from bob\): "
                     r"alice@example.com unblocked \(block #\d+\); its earlier countries no longer count$",
                     shown, re.MULTILINE), shown
    run_pcc("--config", config, "--allow", "alice@example.com", "--country", "FR", "--days", "2", expect=0)
    as_json = json.loads(run_pcc("--config", config, "-s", "alice@example.com", "--json", expect=0).stdout)
    last = as_json["last_admin_action"]
    assert (last["action"], last["by"]) == ("travel pass (FR, 2 days)", "root")
    assert last["result"].startswith("travel pass for alice@example.com: FR does not count until ")
    # a refused command changed nothing: the last action stays the travel pass
    run_pcc("--config", config, "--allow", "alice@example.com", "--country", "FR", "--days", "99999", expect=1)
    assert "last admin action: travel pass (FR, 2 days)" in run_pcc("--config", config, "-s", "alice@example.com",
                                                                    expect=0).stdout
