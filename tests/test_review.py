"""What a review of pcc 1.1 found (#15 items 4-13): commands that said one
thing and did another, untrusted text in mail and shell lines, logins that
merged, wrapped IPv4 clients, noisy or crashing input, unbounded ports, file
modes, and configuration typos that went unnoticed."""
import json
import os
import shutil
import stat
import subprocess
import sys

import pytest
from conftest import ROOT, encode_request, ip_in, policy_request, write_config
from test_admin import pcc as run_command
from test_faults import blocked_logins, walk

import pcc

# --- 4: -b on a login pcc never blocks ----------------------------------------

@pytest.mark.parametrize("setting, login, why", [
    ({"policy.whitelisted": "boss@example.com"}, "boss@example.com", "whitelisted login"),
    ({"mail.domains": "example.com"}, "carol@other.example", "login not in [mail] domains"),
])
def test_block_refuses_a_login_pcc_never_blocks(start_daemon, setting, login, why):
    daemon = start_daemon(**{"policy.action": "REJECT", **setting})
    result = run_command(daemon.config_path, "-b", login, expect=1)
    assert result.stderr.strip() == f"pcc: {login} is not blocked: pcc never blocks it ({why}); change that first"
    assert daemon.client().ask(login, ip_in("GB")) == "DUNNO"
    assert "No account is blocked." in run_command(daemon.config_path, "-l").stdout


# --- 5: untrusted text in the admins' mail -------------------------------------

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


# --- 6: one normalisation, distinct logins stay distinct ------------------------

def test_logins_are_lower_cased_in_ascii_only_and_keep_their_control_characters():
    assert pcc.normalise_login(" Alice@Example.COM ") == "alice@example.com"
    assert pcc.normalise_login("\u212aarl@example.com") != "karl@example.com"
    assert pcc.normalise_login("ali\tce@example.com") == "ali\\x09ce@example.com"
    assert pcc.parse_request(["sasl_username=ali\tce@example.com"]).login == "ali\\x09ce@example.com"


def test_logins_that_differ_are_different_accounts_on_every_database(start_daemon, db_url):
    daemon = start_daemon(**{"db.dbcon": db_url, "policy.action": "REJECT"})
    client = daemon.client()
    assert walk(client, "alice@example.com", ["GB", "US", "FR", "DE"])[-1].startswith("REJECT")
    for other in ("alicé@example.com", "ali\tce@example.com", "\u212aarl@example.com"):
        assert client.ask(other, ip_in("GB")) == "DUNNO", other
    assert walk(client, "alicé@example.com", ["US", "FR"]) == ["DUNNO", "DUNNO"]
    assert blocked_logins(db_url) == {"alice@example.com"}
    # the admin commands name every login the daemon records
    shown = run_command(daemon.config_path, "-s", "ali\\x09ce@example.com").stdout
    assert "ali\\x09ce@example.com: not blocked" in shown


# --- 7: IPv4 clients inside IPv6 addresses ---------------------------------------

@pytest.mark.parametrize("wrapped", [
    "2002:1401:0001::1",  # 6to4 of 20.1.0.1
    "64:ff9b::1401:1",  # NAT64 of 20.1.0.1
    "2001:0:4136:e378:8000:63bf:ebfe:fefe",  # Teredo; client 20.1.1.1 (bits inverted)
    "::ffff:20.1.0.1",
])
def test_ipv4_inside_ipv6_counts_as_the_ipv4_address(wrapped, geoip):
    request = pcc.PolicyRequest(client_address=wrapped)
    assert request.client_ip.version == 4
    assert geoip.country(request.client_ip).code == "GB"


# --- 8: noisy and crashing input ---------------------------------------------------

def test_one_warning_per_request_of_bare_lines(start_daemon):
    daemon = start_daemon(**{"server.max_request_bytes": 1024 * 1024})
    client = daemon.client()
    client.send(b"x\n" * 32000 + encode_request(policy_request("alice@example.com", ip_in("GB"))))
    assert client.reply() == "DUNNO"
    assert daemon.log().count("skipped 32000 lines that are not name=value") == 1
    assert daemon.log().count("policy request:") == 1


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


# --- 9: file modes and the systemd unit ----------------------------------------------

def test_the_daemon_creates_its_files_private(start_daemon, tmp_path):
    state = tmp_path / "state"
    daemon = start_daemon(**{"db.dbcon": f"sqlite:///{state}/pcc.sqlite3", "db.spool_file": str(state / "spool")})
    daemon.client().ask("alice@example.com", ip_in("GB"))
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o750
    assert stat.S_IMODE(os.stat(state / "pcc.sqlite3").st_mode) == 0o640


def test_the_systemd_unit_is_hardened():
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", str(ROOT / "pcc.service")],
                            capture_output=True, text=True, timeout=60)
    exposure = float(result.stdout.rsplit("Overall exposure level for pcc.service:", 1)[1].split()[0])
    assert exposure <= 4.0, result.stdout[-2000:]


# --- 13: comments after values, unknown keys -------------------------------------------

@pytest.mark.parametrize("dotted, value, message", [
    ("server.port", "9999  # the port", "[server] port: has a comment after the value"),
    ("policy.reason", "Go away ; ask the admin", "[policy] reason: has a comment after the value"),
])
def test_a_comment_after_a_value_is_refused(tmp_path, dotted, value, message):
    with pytest.raises(pcc.ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        pcc.load_settings(write_config(tmp_path, {dotted: value}))


def test_an_unknown_key_or_section_is_refused(tmp_path):
    with pytest.raises(pcc.ConfigError, match=r"\[policy\] how_many_diferent_countries: unknown key \(a typo\?"):
        pcc.load_settings(write_config(tmp_path, {"policy.how_many_diferent_countries": "3"}))
    path = write_config(tmp_path, {})
    with open(path, "a") as config_file:
        config_file.write("\n[polcy]\naction = REJECT\n")
    with pytest.raises(pcc.ConfigError, match=r"unknown section \[polcy\]"):
        pcc.load_settings(path)


# --- 10, 11: README and pcc.conf say what the code does ---------------------------------

def test_one_rule_for_the_config_files_mode():
    readme, shipped = (ROOT / "README.md").read_text(), (ROOT / "pcc.conf").read_text()
    for text in (readme, shipped):
        assert "mode 600" not in text and "chmod 600" not in text
    assert "chown root:pcc /etc/pcc.conf; chmod 640 /etc/pcc.conf" in shipped
    assert "`chown root:pcc`" in readme and "`chmod 640`" in readme


def test_readme_names_every_long_option():
    readme = (ROOT / "README.md").read_text()
    options = [option for action in pcc.build_argument_parser()._actions for option in action.option_strings
               if option.startswith("--") and option != "--help"]
    assert len(options) > 15
    missing = [option for option in options if f"`{option}" not in readme and f"/`{option}`" not in readme]
    assert missing == []


def test_timeout_goes_with_update_geoip_only():
    for arguments in (["-l", "--timeout", "3"], ["--update-geoip", "--timeout", "0"]):
        with pytest.raises(SystemExit) as refused:
            pcc.main(["--config", str(ROOT / "pcc.conf"), *arguments])
        assert refused.value.code == 2
