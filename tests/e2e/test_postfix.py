"""The whole loop on a real Postfix: XCLIENT makes one machine send "from" any
country as any SASL login (see ../shared/postfix-e2e.md); pcc answers; Postfix
queues, holds or rejects; the admin commands release or delete held mail."""
import grp
import json
import os
import pathlib
import pwd
import re
import shutil
import smtplib
import subprocess
import sys
import tempfile
import time

import pytest
from conftest import (
    ROOT,
    Daemon,
    PostfixInstance,
    free_port,
    ip_in,
    unavailable,
    wait_for_log,
    wait_until_visible,
    write_config,
)

ALICE, BOB, CAROL = "alice@example.com", "bob@example.com", "carol@example.org"


@pytest.fixture(scope="module")
def postfix():
    if shutil.which("postfix") is None or shutil.which("postqueue") is None:
        unavailable("Postfix (Debian package postfix)")
    instance = PostfixInstance(free_port())
    instance.start()
    yield instance
    instance.stop()


@pytest.fixture
def pcc_for(postfix, start_daemon, sqlite_url, smtp_sink):
    """pcc.py -d for the Postfix instance, in the given action mode."""
    postfix.empty_queue()

    def start(action: str, **extra):
        return start_daemon(**{
            "server.port": postfix.pcc_port, "db.dbcon": sqlite_url, "postfix.config_directory": postfix.directory,
            "policy.action": action, "policy.reason": "Too many countries, contact support",
            "mail.notice": "admin@example.com", "mail.mailsrv": "127.0.0.1", "mail.mailport": smtp_sink.port,
            **extra,
        })

    return start


def admin(daemon, *arguments):
    result = subprocess.run([sys.executable, str(ROOT / "pcc.py"), "--config", daemon.config_path, *arguments],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def wait_until_held(postfix, queue_ids, timeout=10.0):
    deadline = time.monotonic() + timeout
    while any(postfix.queue().get(queue_id) != "hold" for queue_id in queue_ids):
        assert time.monotonic() < deadline, postfix.queue()
        time.sleep(0.1)


def walk(postfix, login, countries, sender=None):
    return [postfix.send(login, ip_in(country), sender) for country in countries]


def test_hold_then_release_exactly_that_accounts_mail(postfix, pcc_for, smtp_sink):
    daemon = pcc_for("HOLD")
    first_three = walk(postfix, ALICE, ["GB", "US", "FR"])
    assert [code for code, _text, _id in first_three] == [250, 250, 250]
    _code, _text, fourth = postfix.send(ALICE, ip_in("DE"))
    # later mail of alice, under another envelope sender, is held too
    _code, _text, later = postfix.send(ALICE, ip_in("GB"), sender="newsletter@example.net")
    # bob keeps sending; carol is blocked by hand and her mail is held as well
    _code, _text, bobs = postfix.send(BOB, ip_in("GB"))
    admin(daemon, "-b", CAROL)
    _code, _text, carols = postfix.send(CAROL, ip_in("GB"), sender=ALICE)
    # what she had queued before the block (deferred: the relay is down) is held by it
    wait_until_held(postfix, [queue_id for _c, _t, queue_id in first_three])
    queue = postfix.queue()
    assert queue[fourth] == queue[later] == queue[carols] == "hold"
    assert queue[bobs] != "hold"
    mails = smtp_sink.wait_for(2)
    about_alice = [m for _rcpt, m in mails if ALICE in m["Subject"]]
    assert len(about_alice) == 1 and "blocked" in about_alice[0]["Subject"]
    assert "Queued mail: 3 messages it had queued put on hold" in about_alice[0].get_content()

    output = admin(daemon, "-r", ALICE)
    assert "released 5 held messages" in output
    queue = postfix.queue()
    assert queue.get(fourth) != "hold" and queue.get(later) != "hold"
    assert all(queue.get(queue_id) != "hold" for _c, _t, queue_id in first_three)
    assert queue[carols] == "hold"  # another account's held mail stays held
    # alice sends normally again, in a fresh window (the daemon had her in
    # memory, blocked: the unblock reaches it within a second)
    wait_until_visible()
    _code, _text, again = postfix.send(ALICE, ip_in("GB"))
    assert postfix.queue()[again] != "hold"
    assert "released 0 held messages" in admin(daemon, "-r", ALICE)  # safe to repeat
    assert any("unblocked" in m["Subject"] for _r, m in smtp_sink.wait_for(3))


def test_erase_deletes_exactly_that_accounts_held_mail(postfix, pcc_for):
    daemon = pcc_for("HOLD")
    queued = [queue_id for _c, _t, queue_id in walk(postfix, ALICE, ["GB", "US", "FR"])]
    held = [postfix.send(ALICE, ip_in(country))[2] for country in ("DE", "SE")]
    walk(postfix, CAROL, ["GB", "US", "FR"])
    carols = postfix.send(CAROL, ip_in("JP"))[2]
    assert postfix.queue()[carols] == "hold"
    wait_until_held(postfix, queued)
    output = admin(daemon, "-e", ALICE)
    assert "deleted 5 held messages" in output  # the three queued before the block too
    queue = postfix.queue()
    assert held[0] not in queue and held[1] not in queue
    assert queue[carols] == "hold"
    assert "not blocked" in admin(daemon, "-e", ALICE)


def send_with_parameters(postfix, xclient: str, sender: str, recipients: list) -> str:
    """One message whose RCPT commands carry the given parameters, as any SMTP
    client may send them; returns its queue ID."""
    with smtplib.SMTP("127.0.0.1", postfix.smtp_port, timeout=60) as smtp:
        smtp.ehlo("client.example")
        assert smtp.docmd("XCLIENT", xclient)[0] == 220
        smtp.ehlo("client.example")
        assert smtp.docmd(f"MAIL FROM:<{sender}>")[0] == 250
        for recipient in recipients:
            code, text = smtp.docmd(f"RCPT TO:{recipient}")
            assert code == 250, text  # Postfix takes them: what it records must not move the message
        code, text = smtp.data(b"Subject: not alice's\r\n\r\nspam\r\n")
        return re.search(r"queued as (\w+)", text.decode()).group(1)


def queued_from(postfix, sender: str, timeout: float = 20.0) -> str:
    """The queue ID of the message of `sender` (once pickup has queued it)."""
    deadline = time.monotonic() + timeout
    while True:
        output = subprocess.run(["postqueue", "-c", postfix.directory, "-j"], capture_output=True, text=True,
                                check=True).stdout
        found = [entry["queue_id"] for entry in map(json.loads, output.splitlines()) if entry["sender"] == sender]
        if found:
            return found[0]
        assert time.monotonic() < deadline, output
        time.sleep(0.2)


SMUGGLED = "named_attribute: sasl_username=alice@example.com"


def test_no_text_a_client_sends_ties_its_message_to_an_account(postfix, pcc_for):
    """A queued message belongs to an account by what smtpd recorded of its
    SASL login, never by a line a client or a local user printed into the
    queue file (an ORCPT with +0A or +0D, a full name with a newline, bytes
    that are no UTF-8): alice's block holds her mail and nothing of theirs,
    and -r alice releases nothing they had held."""
    daemon = pcc_for("HOLD")
    orcpt = "ORCPT=rfc822;a+0A" + SMUGGLED.replace(" ", "+20")
    spam = [
        send_with_parameters(postfix, "ADDR=81.2.69.160", "spam@evil.test", [
            f"<bob@remote.test> {orcpt}", f"<bob2@remote.test> {orcpt.replace('+0A', '+0D')}",
            "<bob3@remote.test> ORCPT=rfc822;a+FF+FE"]),
        # an account of its own that names alice's: its own login counts
        send_with_parameters(postfix, "ADDR=81.2.69.160 LOGIN=mallory@example.com", "mallory@example.com",
                             [f"<bob@remote.test> {orcpt}"]),
    ]
    # A local user's sendmail (as root here: only root may name a private instance's configuration; the
    # full name takes the same path through postdrop and pickup)
    subprocess.run(["/usr/sbin/sendmail", "-C", postfix.directory,
                    "-F", f"Local User\n{SMUGGLED}", "-f", "local@example.test", "bob@remote.test"],
                   input=b"Subject: local\n\nspam\n", check=True, timeout=60)
    spam.append(queued_from(postfix, "local@example.test"))
    envelopes = [subprocess.run(["postcat", "-c", postfix.directory, "-e", "-q", queue_id], capture_output=True,
                                check=True).stdout for queue_id in spam]
    assert all(SMUGGLED.encode() in envelope.replace(b"\r", b"\n") for envelope in envelopes)  # the bait is there
    queued = [queue_id for _c, _t, queue_id in walk(postfix, ALICE, ["GB", "US", "FR"])]
    crossing = postfix.send(ALICE, ip_in("DE"))[2]
    wait_until_held(postfix, queued + [crossing])
    wait_for_log(daemon, "queued mail of alice@example.com: 3 messages put on hold")
    queue = postfix.queue()
    assert [queue[queue_id] for queue_id in spam] == ["deferred"] * len(spam)
    # a quarantine of the admin's holds one; alice's release leaves it there
    subprocess.run(["postsuper", "-c", postfix.directory, "-h", spam[0]], check=True, capture_output=True)
    assert "released 4 held messages" in admin(daemon, "-r", ALICE)
    assert postfix.queue()[spam[0]] == "hold"
    assert "Traceback" not in daemon.log()


def test_reject_mode_answers_554_with_the_reason(postfix, pcc_for):
    pcc_for("REJECT")
    codes = [code for code, _text, _id in walk(postfix, ALICE, ["GB", "US", "FR"])]
    assert codes == [250, 250, 250]
    code, text, queue_id = postfix.send(ALICE, ip_in("DE"))
    assert code == 554 and queue_id is None
    assert "Too many countries, contact support" in text
    assert postfix.send(ALICE, ip_in("GB"))[0] == 554
    assert postfix.send(BOB, ip_in("DE"))[0] == 250


def test_manual_block_is_enforced_on_the_next_message(postfix, pcc_for):
    daemon = pcc_for("REJECT")
    assert postfix.send(BOB, ip_in("GB"))[0] == 250
    assert "blocked" in admin(daemon, "-b", BOB)
    wait_until_visible()  # bob is in the daemon's memory; the block reaches it within a second
    assert postfix.send(BOB, ip_in("GB"))[0] == 554
    assert "already blocked" in admin(daemon, "-b", BOB)
    admin(daemon, "-u", BOB)
    wait_until_visible()
    assert postfix.send(BOB, ip_in("GB"))[0] == 250


def test_impossible_travel_is_rejected(postfix, pcc_for, smtp_sink, geolite2_city_2015):
    """Real 2015 GeoLite2-City data: Princeton, then Stanford (4,100 km) a few
    seconds later, in the same country."""
    pcc_for("REJECT", **{"geoip.database": geolite2_city_2015, "policy.max_travel_speed_kmh": "1000",
                         "policy.impossible_travel_action": "block"})
    assert postfix.send(ALICE, "128.112.0.1")[0] == 250
    assert postfix.send(ALICE, "128.112.0.9")[0] == 250  # same place, another address: not a journey
    code, text, _queue_id = postfix.send(ALICE, "171.64.0.1")
    assert code == 554 and "Too many countries, contact support" in text
    assert postfix.send(ALICE, "128.112.0.1")[0] == 554  # blocked now, from anywhere
    assert postfix.send(BOB, "171.64.0.1")[0] == 250
    (mail,) = [m for _rcpt, m in smtp_sink.wait_for(1)]
    body = mail.get_content()
    assert mail["Subject"] == f"pcc: account {ALICE} blocked (REJECT)"
    # the move within Princeton was not written (same place), so the journey starts at the first address
    assert "Why: blocking: impossible travel: Princeton, US (128.112.0.1)" in body
    assert "Stanford, US" in body and "the limit is 1,000 km/h" in body


def test_travel_pass_lets_a_trip_through(postfix, pcc_for):
    daemon = pcc_for("REJECT")
    admin(daemon, "--allow", ALICE, "--country", "FR,DE", "--days", "14")
    codes = [code for code, _text, _id in walk(postfix, ALICE, ["GB", "US", "FR", "DE", "JP"])]
    assert codes == [250] * 5  # FR and DE do not count: GB, US, JP are three
    assert postfix.send(ALICE, ip_in("BR"))[0] == 554
    assert "travel pass FR: active until" in admin(daemon, "-s", ALICE)


def test_monitor_mode_holds_nothing(postfix, pcc_for, smtp_sink):
    daemon = pcc_for("HOLD", **{"policy.mode": "monitor"})
    sent = walk(postfix, ALICE, ["GB", "US", "FR", "DE", "SE"])
    assert [code for code, _text, _id in sent] == [250] * 5
    queue = postfix.queue()
    assert all(queue.get(queue_id) != "hold" for _c, _t, queue_id in sent)
    (mail,) = [m for _rcpt, m in smtp_sink.wait_for(1)]
    assert mail["Subject"] == f"pcc: account {ALICE} would be blocked (monitor mode)"
    assert "would be blocked" in admin(daemon, "-l")


def test_monitor_mode_with_warn_puts_what_pcc_would_do_in_postfixs_log(postfix, pcc_for):
    pcc_for("REJECT", **{"policy.mode": "monitor", "policy.monitor_answer": "warn"})
    sent = walk(postfix, ALICE, ["GB", "US", "FR", "DE", "SE"], sender="sender@example.com")
    assert [code for code, _text, _id in sent] == [250] * 5  # every message accepted
    maillog = pathlib.Path(postfix.directory) / "maillog"
    expected = ["pcc would reject: 4 of at most 3 countries in 3 days (GB, US, FR, DE) (monitor mode); "
                "from=<sender@example.com> to=<bob@remote.test>",
                "pcc would reject: flagged since "]
    deadline = time.monotonic() + 15  # postlogd writes behind smtpd
    while not all(text in maillog.read_text() for text in expected) and time.monotonic() < deadline:
        time.sleep(0.2)
    warnings = [line for line in maillog.read_text().splitlines() if "pcc would" in line]
    assert len(warnings) == 2, warnings  # the fourth message (flagged) and the fifth (flagged already)
    for line, country, text in zip(warnings, ("DE", "SE"), expected):
        assert re.search(r"warn: RCPT from \S*\[" + re.escape(ip_in(country)) + r"\]: " + re.escape(text), line), line


def test_postfix_asks_through_the_unix_socket_in_its_queue_directory(start_daemon, smtp_sink):
    """check_policy_service unix:pcc/policy, as pcc.conf says: the socket in
    a directory of Postfix's queue directory (smtpd may be chrooted there),
    group postfix, mode 0660."""
    if shutil.which("postfix") is None:
        unavailable("Postfix (Debian package postfix)")
    if os.geteuid() != 0:
        pytest.skip("a private Postfix needs root")
    instance = PostfixInstance(free_port())
    instance.policy_service = "unix:pcc/policy"
    instance.start()
    try:
        directory = pathlib.Path(instance.directory, "queue", "pcc")
        directory.mkdir(mode=0o750)
        os.chown(directory, 0, grp.getgrnam("postfix").gr_gid)  # install -d -o pcc -g postfix -m 0750
        daemon = start_daemon(**{"server.socket": str(directory / "policy"), "server.socket_group": "postfix",
                                 "postfix.config_directory": instance.directory, "policy.action": "REJECT",
                                 "policy.reason": "Too many countries, contact support"})
        sent = walk(instance, ALICE, ["GB", "US", "FR", "DE"])
        assert [code for code, _text, _id in sent] == [250, 250, 250, 554], sent
        assert "Too many countries, contact support" in sent[-1][1]
        assert "decision=REJECT" in daemon.log() and f"login={ALICE}" in daemon.log()
        assert "problem talking to server" not in (pathlib.Path(instance.directory) / "maillog").read_text()
    finally:
        instance.stop()


def readme_sudoers_lines(user: str, config_directory: str) -> str:
    """The sudoers lines of docs/operations.md, for `user` and Postfix's `config_directory`."""
    readme = (ROOT / "docs" / "operations.md").read_text()
    lines = re.findall(r"^\s+(pcc ALL=\(root\) NOPASSWD: .*)$", readme, re.MULTILINE)
    assert len(lines) == 3, lines  # postcat, postsuper; postqueue with a config directory
    lines = [line.replace(" -c DIR", "") for line in lines]
    after_program = rf"\1 -c {config_directory} "
    regex_after_program = rf"\1 ^-c {re.escape(config_directory)} "  # a regular expression: the directory's dots
    lines = [re.sub(r"(/usr/sbin/post\w+) \^", regex_after_program, line) if " ^" in line
             else re.sub(r"(/usr/sbin/post\w+) ", after_program, line) for line in lines]
    return "".join(re.sub(r"^pcc ", f"{user} ", line) + "\n" for line in lines)


def test_readmes_sudoers_lines_allow_holding_and_reading_one_envelope_only(postfix, tmp_path):
    """What docs/operations.md asks of root is what pcc needs: the envelope of one queue ID
    and holding (postqueue -j with a configuration directory); no other
    option, no second argument, another configuration directory, a message's
    headers or body."""
    if shutil.which("sudo") is None or shutil.which("visudo") is None:
        unavailable("sudo (Debian package sudo)")
    sudoers = pathlib.Path("/etc/sudoers.d/pcc-test-lines")
    candidate = tmp_path / "sudoers"
    candidate.write_text(readme_sudoers_lines("nobody", postfix.directory))
    subprocess.run(["visudo", "-cf", str(candidate)], check=True, capture_output=True)
    d = postfix.directory

    def allowed(*command: str) -> bool:
        listed = subprocess.run(["runuser", "-u", "nobody", "--", "sudo", "-n", "-l", *command],
                                capture_output=True, timeout=30)
        return listed.returncode == 0

    try:
        shutil.copy(candidate, sudoers)
        os.chmod(sudoers, 0o440)
        assert allowed("/usr/sbin/postcat", "-c", d, "-e", "-q", "B125620C1A2")
        assert allowed("/usr/sbin/postcat", "-c", d, "-e", "-q", "4Kp1qX2ZfXz9vNa")  # a long queue ID
        assert allowed("/usr/sbin/postsuper", "-c", d, "-h", "-")
        assert allowed("/usr/sbin/postqueue", "-c", d, "-j")
        for refused in (["/usr/sbin/postcat", "-c", d, "-e", "-q", "-bh", "B125620C1A2"],
                        ["/usr/sbin/postcat", "-c", d, "-e", "-q", "B125620C1A2", "-bh"],
                        ["/usr/sbin/postcat", "-c", d, "-e", "-q", "B125620C1A2", "B125620C1A3"],
                        ["/usr/sbin/postcat", "-c", d, "-e", "-q", "-c", "/tmp", "-bh", "B125620C1A2"],
                        ["/usr/sbin/postcat", "-c", "/etc/postfix", "-e", "-q", "B125620C1A2"],
                        ["/usr/sbin/postcat", "-c", d, "-bh", "-q", "B125620C1A2"],
                        ["/usr/sbin/postcat", "-c", d, "-e", "-q", "../../etc/shadow"],
                        ["/usr/sbin/postsuper", "-c", d, "-h", "-", "-d", "ALL"],
                        ["/usr/sbin/postsuper", "-c", d, "-d", "-"],
                        ["/usr/sbin/postqueue", "-c", d, "-j", "-f"]):
            assert not allowed(*refused), refused
    finally:
        sudoers.unlink(missing_ok=True)


def home_of_nobody(postfix, geoip_path, prefix: str) -> tuple:
    """(a directory for a daemon of the user nobody, with the GeoIP file; nobody's
    passwd entry), Postfix's queue empty and its configuration readable to nobody."""
    postfix.empty_queue()
    os.chmod(postfix.directory, 0o755)  # as /etc/postfix: postqueue -j runs as the daemon's user
    home = pathlib.Path(tempfile.mkdtemp(prefix=prefix))
    nobody = pwd.getpwnam("nobody")
    os.chmod(home, 0o755)
    os.chown(home, nobody.pw_uid, nobody.pw_gid)
    shutil.copy(geoip_path, home / "country.mmdb")
    return home, nobody


def test_an_unprivileged_daemon_holds_the_queued_mail_through_readmes_sudoers_lines(postfix, geoip_path, as_nobody):
    """pcc as an unprivileged user, with hold_queued = yes: without the docs'
    sudoers lines it refuses to start; with them, a block holds what the
    account had queued (deferred: the relay is down), and nothing of another
    account."""
    if shutil.which("sudo") is None or shutil.which("visudo") is None:
        unavailable("sudo (Debian package sudo)")
    home, nobody = home_of_nobody(postfix, geoip_path, "pcc-unprivileged-")
    values = {"server.port": postfix.pcc_port, "db.dbcon": f"sqlite:///{home}/pcc.sqlite3",
              "db.spool_file": str(home / "spool.jsonl"), "geoip.database": home / "country.mmdb",
              "postfix.config_directory": postfix.directory, "policy.action": "REJECT", "postfix.hold_queued": "yes"}
    config = write_config(home, values)
    os.chmod(config, 0o644)
    daemon = Daemon(config, home / "pcc.log", postfix.pcc_port)
    sudoers = pathlib.Path("/etc/sudoers.d/pcc-test")
    by_default = Daemon(write_config(home, {**values, "policy.action": "HOLD", "postfix.hold_queued": ""},
                                     name="default.conf"), home / "default.log", postfix.pcc_port)
    try:
        os.chmod(by_default.config_path, 0o644)
        # On by default with HOLD: starts, and says what it cannot do.
        by_default.start(command=as_nobody(["--config", by_default.config_path, "-d", "--stderr"], str(home)))
        wait_for_log(by_default, "until then a block does not hold the mail the account had queued")
        by_default.stop()
        as_daemon = as_nobody(["--config", config, "-d", "--stderr"], str(home))
        with pytest.raises(RuntimeError, match="may not run `sudo -n .*postcat") as refused:
            daemon.start(command=as_daemon)
        assert "\npcc: [postfix] hold_queued: this user may not run" in str(refused.value)  # one line
        candidate = home / "sudoers"
        candidate.write_text(readme_sudoers_lines("nobody", postfix.directory))
        subprocess.run(["visudo", "-cf", str(candidate)], check=True, capture_output=True)
        shutil.copy(candidate, sudoers)
        os.chmod(sudoers, 0o440)
        daemon.start(command=as_daemon)
        queued = [queue_id for _c, _t, queue_id in walk(postfix, ALICE, ["GB", "US", "FR"])]
        _code, _text, bobs = postfix.send(BOB, ip_in("GB"))
        assert postfix.send(ALICE, ip_in("DE"))[0] == 554  # REJECT: the crossing message is refused
        wait_until_held(postfix, queued)
        assert postfix.queue()[bobs] != "hold"
        assert "queued mail of alice@example.com: 3 messages put on hold" in daemon.log()
    finally:
        sudoers.unlink(missing_ok=True)
        daemon.stop()
        by_default.stop()
        shutil.rmtree(home, ignore_errors=True)
        postfix.empty_queue()


def test_an_unprivileged_daemon_holds_the_queued_mail_through_the_queue_helper(postfix, geoip_path, as_nobody):
    """The Debian package's way, without sudo: systemd's own socket activation
    (systemd-socket-activate --accept --inetd, as pcc-queue.socket with
    Accept=yes) runs `pcc.py --queue-helper` as root for each request of the
    daemon (user nobody, the socket 0660 and of nobody's group, as the unit
    makes it).  Without the helper listening, the daemon refuses to start with
    one line; with it, a block holds the account's queued mail and nothing of
    another account, and the helper logs who asked."""
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        unavailable("systemd-socket-activate (Debian package systemd)")
    home, nobody = home_of_nobody(postfix, geoip_path, "pcc-helper-")
    socket_path = home / "queue.sock"
    values = {"server.port": postfix.pcc_port, "db.dbcon": f"sqlite:///{home}/pcc.sqlite3",
              "db.spool_file": str(home / "spool.jsonl"), "geoip.database": home / "country.mmdb",
              "postfix.config_directory": postfix.directory, "policy.action": "REJECT",
              "postfix.hold_queued": "yes", "postfix.queue_helper": socket_path}
    config = write_config(home, values)
    os.chmod(config, 0o644)
    helper_config = write_config(home, values, name="helper.conf")  # root's, 0600
    daemon = Daemon(config, home / "pcc.log", postfix.pcc_port)
    helper_log = open(home / "helper.log", "wb")
    helper = None
    try:
        as_daemon = as_nobody(["--config", config, "-d", "--stderr"], str(home))
        with pytest.raises(RuntimeError, match=r"\[postfix\] queue_helper: the queue helper at .* cannot be asked"):
            daemon.start(command=as_daemon)
        helper = subprocess.Popen([activate, "-l", str(socket_path), "--accept", "--inetd", "--",
                                   sys.executable, str(ROOT / "pcc.py"), "--config", helper_config,
                                   "--queue-helper", "--stderr"], stdout=subprocess.DEVNULL, stderr=helper_log)
        deadline = time.monotonic() + 10
        while not socket_path.exists():
            assert time.monotonic() < deadline and helper.poll() is None, "systemd-socket-activate never listened"
            time.sleep(0.05)
        os.chown(socket_path, 0, nobody.pw_gid)
        os.chmod(socket_path, 0o660)
        daemon.start(command=as_daemon)
        queued = [queue_id for _c, _t, queue_id in walk(postfix, ALICE, ["GB", "US", "FR"])]
        _code, _text, bobs = postfix.send(BOB, ip_in("GB"))
        assert postfix.send(ALICE, ip_in("DE"))[0] == 554  # REJECT: the crossing message is refused
        wait_until_held(postfix, queued)
        assert postfix.queue()[bobs] != "hold"
        assert "queued mail of alice@example.com: 3 messages put on hold" in daemon.log()
        deadline = time.monotonic() + 10
        while f"3 queued messages of {ALICE} put on hold, asked by uid {nobody.pw_uid}" \
                not in (home / "helper.log").read_text():
            assert time.monotonic() < deadline, (home / "helper.log").read_text()
            time.sleep(0.1)
    finally:
        daemon.stop()
        if helper is not None:
            helper.terminate()
            helper.wait(timeout=10)
        helper_log.close()
        shutil.rmtree(home, ignore_errors=True)
        postfix.empty_queue()


def send_to_many(postfix, login: str, ip: str, recipients: int) -> list:
    """One message of `login` to `recipients` recipients: the code of each RCPT, then DATA's (None if none
    was taken)."""
    with smtplib.SMTP("127.0.0.1", postfix.smtp_port, timeout=60) as smtp:
        smtp.ehlo("client.example")
        assert smtp.docmd("XCLIENT", f"ADDR={ip} LOGIN={login}")[0] == 220
        smtp.ehlo("client.example")
        smtp.mail(login)
        codes = [smtp.rcpt(f"r{n}@remote.test") for n in range(recipients)]
        taken = [code for code, _text in codes if code == 250]
        data = smtp.data(b"Subject: newsletter\r\n\r\nhello\r\n")[0] if taken else None
        return [(code, text.decode()) for code, text in codes] + [data]


def test_a_limit_defers_then_blocks_an_account_through_smtpd_relay_restrictions(postfix, pcc_for, smtp_sink):
    """A spam run from the account's own country: recipients over the hour's
    limit get 450 (the client may retry later); once the domain's rule says
    block, the next recipient blocks the account (554), the admins are told
    why, and every later message is refused."""
    daemon = pcc_for("REJECT", **{"limits.recipients_per_hour": "5", "limits.action": "defer"})
    first = send_to_many(postfix, ALICE, ip_in("GB"), 3)
    assert [code for code, _text in first[:3]] == [250, 250, 250] and first[3] == 250
    second = send_to_many(postfix, ALICE, ip_in("GB"), 3)
    assert [code for code, _text in second[:3]] == [250, 250, 450], second
    assert "6 recipients in the last hour (limit 5): try again later" in second[2][1]
    assert second[3] == 250  # the two recipients taken are sent
    assert send_to_many(postfix, BOB, ip_in("GB"), 2)[:2] == [(250, "2.1.5 Ok")] * 2  # bob has his own count
    admin(daemon, "--rule", "example.com", "limits.action=block")
    time.sleep(1.0)
    blocked = send_to_many(postfix, ALICE, ip_in("GB"), 2)
    assert [code for code, _text in blocked[:2]] == [554, 554] and blocked[2] is None, blocked
    assert "Too many countries, contact support" in blocked[0][1]
    mails = [message for _to, message in smtp_sink.wait_for(1) if ALICE in message["Subject"]]
    assert mails, smtp_sink.messages
    body = mails[0].get_content()
    assert "6 recipients in the last hour (limit 5); 1 country in 3 days (GB)" in body, body
    assert send_to_many(postfix, ALICE, ip_in("GB"), 1)[0][0] == 554  # blocked stays blocked
    assert "limits.action = block (rule of example.com)" in admin(daemon, "-s", ALICE)
