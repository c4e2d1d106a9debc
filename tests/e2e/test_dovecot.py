"""The account's other door: Dovecot logins through Dovecot's authentication
policy, on a real Dovecot (see ../shared/dovecot-e2e.md), driven by
`doveadm auth test -x rip=` and by real IMAP logins that name their client
address with the IMAP ID command; and Postfix authenticating through that
Dovecot."""
import imaplib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

import pytest
from conftest import (
    PostfixInstance,
    dovecot_post,
    free_port,
    ip_in,
    pcc_command,
    scrape,
    unavailable,
    wait_until_visible,
    wait_for_log,
    walk,
)

PASSWORD = "secret"


USERS = ("alice@example.com", "bob@example.com", "carol@example.com")


API_HEADER = "Authorization: Basic cGNjOnRlc3Q="
DOVEADM_API_KEY = "pcc-test-doveadm-key-4f2a"


POLICY_ATTRIBUTES_2_3 = ("login=%{requested_username} pwhash=%{hashed_password} remote=%{rip} device_id=%{client_id} "
                         "protocol=%s")


def dovecot_version() -> tuple:
    """(2, 3) or (2, 4)...: the installed Dovecot's version (doveconf -d says it too)."""
    output = subprocess.run(["dovecot", "--version"], capture_output=True, text=True, timeout=30).stdout
    return tuple(int(part) for part in output.split()[0].split("-")[0].split(".")[:3])  # "2.4.1-4 (7d8c0e5759)"


def version_header() -> str:
    """Dovecot 2.4 refuses a configuration that does not say which version it is written for."""
    version = dovecot_version()
    if version < (2, 4):
        return ""
    written_for = ".".join(map(str, version))
    return f"dovecot_config_version = {written_for}\ndovecot_storage_version = {written_for}\n"


def accounts(d: str) -> str:
    """The users file as password and user database, plaintext logins allowed,
    and the policy request's attributes: in 2.3's words, or in 2.4's (whose
    defaults already send login, pwhash, remote, device_id and protocol)."""
    if dovecot_version() < (2, 4):
        return f"""disable_plaintext_auth = no
passdb {{
  driver = passwd-file
  args = {d}/users
}}
userdb {{
  driver = passwd-file
  args = {d}/users
}}
auth_policy_request_attributes = {POLICY_ATTRIBUTES_2_3}
mail_location = maildir:{d}/home/%u
"""
    return f"""auth_allow_cleartext = yes
passdb passwd-file {{
  passwd_file_path = {d}/users
}}
userdb passwd-file {{
  passwd_file_path = {d}/users
}}
mail_driver = maildir
mail_path = {d}/home/%{{user}}
"""


class DovecotInstance:
    """A private Dovecot whose auth policy server is pcc's Dovecot port."""

    def __init__(self, policy_port: int, api_header: str = "", auth_socket: str = "", doveadm_port: int = 0):
        self.policy_port = policy_port
        self.api_header = api_header
        self.doveadm_port = doveadm_port  # its doveadm HTTP API, with DOVEADM_API_KEY; 0 = none
        self.auth_socket = auth_socket  # a unix listener of the auth service, for Postfix
        self.imap_port = free_port()
        self.directory = tempfile.mkdtemp(prefix="pcc-dovecot-")
        self.config = os.path.join(self.directory, "dovecot.conf")

    def start(self) -> "DovecotInstance":
        d = self.directory
        for sub in ("run", "state", "home"):
            os.makedirs(f"{d}/{sub}")
        os.chmod(d, 0o755)
        os.chmod(f"{d}/home", 0o777)
        with open(f"{d}/users", "w") as users:
            for login in USERS:
                users.write(f"{login}:{{PLAIN}}{PASSWORD}:5000:5000::{d}/home/{login}\n")
        header = f"auth_policy_server_api_header = {self.api_header}\n" if self.api_header else ""
        listener = (f"service auth {{\n  unix_listener {self.auth_socket} {{\n    mode = 0666\n  }}\n}}\n"
                    if self.auth_socket else "")
        if self.doveadm_port:
            listener += (f"doveadm_api_key = {DOVEADM_API_KEY}\nservice doveadm {{\n  inet_listener http {{\n"
                         f"    port = {self.doveadm_port}\n  }}\n}}\n")
        with open(self.config, "w") as config:
            config.write(f"""{version_header()}base_dir = {d}/run
state_dir = {d}/state
instance_name = pcc-test-{os.path.basename(d)}
log_path = {d}/dovecot.log
protocols = imap
listen = 127.0.0.1
service imap-login {{
  inet_listener imap {{
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
{listener}ssl = no
auth_mechanisms = plain login
default_internal_user = dovecot
default_login_user = dovenull
auth_policy_server_url = http://127.0.0.1:{self.policy_port}/
{header}auth_policy_hash_nonce = pcc-test-nonce
auth_policy_report_after_auth = yes
login_trusted_networks = 127.0.0.0/8
{accounts(d)}""")
        # Its master stays in the background holding what it was given: no pipes.
        subprocess.run(["dovecot", "-c", self.config], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=60)
        deadline = time.monotonic() + 20
        while not os.path.exists(f"{d}/run/master.pid") and time.monotonic() < deadline:
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        try:
            with open(f"{self.directory}/run/master.pid") as pid_file:
                os.kill(int(pid_file.readline()), signal.SIGTERM)
            time.sleep(0.3)
        except (OSError, ValueError):
            pass
        shutil.rmtree(self.directory, ignore_errors=True)

    def auth(self, login: str, ip: str, password: str = PASSWORD) -> tuple:
        """doveadm auth test from `ip`: (logged in, what doveadm printed)."""
        result = subprocess.run(["doveadm", "-c", self.config, "auth", "test", "-x", f"rip={ip}", login, password],
                                capture_output=True, text=True, timeout=60)
        return result.returncode == 0, result.stdout + result.stderr

    def open_session(self, login: str, ip: str) -> imaplib.IMAP4:
        """An IMAP session logged in from `ip` and left open (a mail client's)."""
        imaplib.Commands["ID"] = ("NONAUTH", "AUTH", "SELECTED")
        connection = imaplib.IMAP4("127.0.0.1", self.imap_port, timeout=10)
        connection._simple_command("ID", f'("x-originating-ip" "{ip}")')
        connection.login(login, PASSWORD)
        connection.select("INBOX")
        return connection

    def imap_login(self, login: str, ip: str, password: str = PASSWORD) -> str:
        """A real IMAP login that names its client address: "OK", or the error."""
        imaplib.Commands["ID"] = ("NONAUTH", "AUTH", "SELECTED")
        connection = imaplib.IMAP4("127.0.0.1", self.imap_port, timeout=30)
        try:
            connection._simple_command("ID", f'("x-originating-ip" "{ip}")')
            connection.login(login, password)
            return "OK"
        except imaplib.IMAP4.error as error:
            return str(error)
        finally:
            try:
                connection.logout()
            except (imaplib.IMAP4.error, OSError):
                pass


@pytest.fixture
def dovecot_pcc(start_daemon, sqlite_url, smtp_sink):
    """start(**pcc overrides, api_header=...) -> (pcc daemon, Dovecot)."""
    if shutil.which("dovecot") is None or shutil.which("doveadm") is None:
        unavailable("Dovecot (Debian packages dovecot-core, dovecot-imapd)")
    instances = []

    def start(api_header: str = API_HEADER, dovecot_header: str = None, auth_socket: str = "", doveadm_port: int = 0,
              **overrides):
        policy_port = free_port()
        daemon = start_daemon(**{
            "db.dbcon": sqlite_url, "policy.action": "REJECT", "policy.reason": "Blocked: contact support",
            "mail.notice": "admin@example.com", "mail.mailsrv": "127.0.0.1", "mail.mailport": smtp_sink.port,
            "dovecot.policy_port": policy_port, "dovecot.count_logins": "yes", "dovecot.api_header": api_header,
            **overrides})
        header = api_header if dovecot_header is None else dovecot_header
        instance = DovecotInstance(policy_port, header, auth_socket, doveadm_port).start()
        instances.append(instance)
        return daemon, instance

    yield start
    for instance in instances:
        instance.stop()


def test_the_fourth_country_blocks_and_later_logins_are_refused(dovecot_pcc, smtp_sink):
    daemon, dovecot = dovecot_pcc()
    for country in ("GB", "US", "FR"):
        assert dovecot.auth("alice@example.com", ip_in(country))[0], country
    # The crossing login is reported after Dovecot granted it: it gets in...
    assert dovecot.auth("alice@example.com", ip_in("DE"))[0]
    # ...and every later one is refused with the reason, from any country.
    logged_in, output = dovecot.auth("alice@example.com", ip_in("GB"))
    assert not logged_in and "Blocked: contact support" in output
    listed = pcc_command(daemon.config_path, "-l").stdout
    assert "alice@example.com" in listed and "dovecot/doveadm" in listed
    (mail,) = [m for _r, m in smtp_sink.wait_for(1)]
    assert "alice@example.com" in mail["Subject"] and "doveadm login" in mail.get_content()
    lines = [line for line in daemon.log().splitlines() if "login=alice@example.com " in line]
    assert any("via=dovecot door=doveadm" in line and "NEW BLOCK" in line for line in lines)
    # One blocked list: the Postfix policy port answers the action too.
    assert daemon.client().ask("alice@example.com", ip_in("GB")).startswith("REJECT")
    # -u opens both doors.
    pcc_command(daemon.config_path, "-u", "alice@example.com")
    wait_until_visible()
    assert dovecot.auth("alice@example.com", ip_in("GB"))[0]
    assert daemon.client().ask("alice@example.com", ip_in("GB")) == "DUNNO"


def test_failed_logins_never_count(dovecot_pcc):
    daemon, dovecot = dovecot_pcc()
    for country in ("GB", "US", "FR", "DE", "SE"):
        assert not dovecot.auth("bob@example.com", ip_in(country), password="guessed")[0]
    assert dovecot.auth("bob@example.com", ip_in("JP"))[0]
    assert "bob@example.com" not in pcc_command(daemon.config_path, "-l").stdout
    assert "1 of at most 3 countries" in [line for line in daemon.log().splitlines()
                                          if "login=bob@example.com " in line][-1]


def test_a_block_by_hand_or_by_postfix_refuses_logins(dovecot_pcc):
    daemon, dovecot = dovecot_pcc(**{"dovecot.count_logins": "no"})
    pcc_command(daemon.config_path, "-b", "carol@example.com")
    wait_until_visible()
    logged_in, output = dovecot.auth("carol@example.com", ip_in("GB"))
    assert not logged_in and "Blocked: contact support" in output
    client = daemon.client()
    for country in ("GB", "US", "FR", "DE"):  # blocked through the Postfix door
        client.ask("bob@example.com", ip_in(country))
    assert not dovecot.auth("bob@example.com", ip_in("GB"))[0]
    # count_logins = no: logins from many countries block nothing
    for country in ("GB", "US", "FR", "DE", "SE"):
        assert dovecot.auth("alice@example.com", ip_in(country))[0]


def test_real_imap_logins(dovecot_pcc):
    daemon, dovecot = dovecot_pcc()
    for country in ("GB", "US", "FR", "DE"):
        assert dovecot.imap_login("alice@example.com", ip_in(country)) == "OK", country
    answer = dovecot.imap_login("alice@example.com", ip_in("GB"))
    assert "Blocked: contact support" in answer, answer
    assert "imap login" in pcc_command(daemon.config_path, "-s", "alice@example.com").stdout
    assert daemon.client().ask("alice@example.com", ip_in("GB")).startswith("REJECT")


def test_the_api_header_is_required(dovecot_pcc):
    metrics_port = free_port()
    daemon, dovecot = dovecot_pcc(api_header=API_HEADER, dovecot_header="Authorization: Basic d3Jvbmc6d3Jvbmc=",
                                  **{"server.metrics_port": metrics_port})
    dovecot.auth("alice@example.com", ip_in("GB"))
    assert "dovecot policy request refused (HTTP 401): from 127.0.0.1" in daemon.log()
    port = int(dict(line.split(" = ", 1) for line in open(daemon.config_path).read().splitlines()
                    if " = " in line)["policy_port"])
    body = json.dumps({"login": "alice@example.com", "remote": ip_in("GB"), "protocol": "imap"}).encode()
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/?command=allow", body), timeout=5)
    assert refused.value.code == 401
    name, value = API_HEADER.split(": ", 1)
    allowed = urllib.request.Request(f"http://127.0.0.1:{port}/?command=allow", body, headers={name: value})
    assert json.load(urllib.request.urlopen(allowed, timeout=5)) == {"status": 0}
    bad = urllib.request.Request(f"http://127.0.0.1:{port}/?command=allow", b"{not json", headers={name: value})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(bad, timeout=5)
    assert refused.value.code == 400 and "not a JSON object" in daemon.log()
    assert API_HEADER.split()[-1] not in daemon.log()  # the credentials never reach a log line
    metrics = scrape(metrics_port)
    assert metrics[("pcc_dovecot_requests_total", (("command", "-"), ("status", "unauthorised")))] >= 2
    assert metrics[("pcc_dovecot_requests_total", (("command", "allow"), ("status", "allowed")))] == 1


def test_postfix_auth_through_dovecot_is_refused_for_a_blocked_account(dovecot_pcc):
    from conftest import PostfixInstance

    if shutil.which("postfix") is None:
        unavailable("Postfix (Debian package postfix)")
    postfix = PostfixInstance(free_port())
    postfix.extra_settings = ["smtpd_sasl_auth_enable=yes", "smtpd_sasl_type=dovecot",
                              "smtpd_sasl_path=private/dovecot-auth"]
    postfix.start()
    try:
        daemon, _dovecot = dovecot_pcc(auth_socket=f"{postfix.directory}/queue/private/dovecot-auth",
                                       **{"server.port": postfix.pcc_port})
        pcc_command(daemon.config_path, "-b", "alice@example.com")
        wait_until_visible()
        assert swaks_auth(postfix.smtp_port, "bob@example.com", ip_in("GB")) == 0
        assert swaks_auth(postfix.smtp_port, "alice@example.com", ip_in("GB")) != 0
    finally:
        postfix.stop()


def test_the_admin_mail_goes_through_a_submission_port_with_starttls_and_smtp_auth(dovecot_pcc, tmp_path):
    """[mail] starttls, tls_ca_file, user, password, from: a real Postfix that
    offers AUTH (Dovecot SASL) only after STARTTLS and relays only what is
    authenticated takes the block mail; its queue file records the SASL
    login.  A wrong password is one line a try, and the password none."""
    from conftest import PostfixInstance

    if shutil.which("postfix") is None or shutil.which("openssl") is None:
        unavailable("Postfix and openssl (Debian packages postfix, openssl)")
    certificate, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key),
                    "-out", str(certificate)], check=True, capture_output=True, timeout=60)
    os.chmod(tmp_path, 0o755)
    os.chmod(key, 0o644)  # Postfix's smtpd reads it as postfix
    postfix = PostfixInstance(free_port())
    postfix.extra_settings = ["smtpd_sasl_auth_enable=yes", "smtpd_sasl_type=dovecot",
                              "smtpd_sasl_path=private/dovecot-auth", f"smtpd_tls_cert_file={certificate}",
                              f"smtpd_tls_key_file={key}", "smtpd_tls_security_level=may", "smtpd_tls_auth_only=yes",
                              "mynetworks=", "smtpd_relay_restrictions=permit_sasl_authenticated, reject"]
    postfix.start()
    try:
        mail = {"mail.mailsrv": "localhost", "mail.mailport": postfix.smtp_port, "mail.notice": "admin@example.com",
                "mail.from": "pcc-notices@example.com", "mail.starttls": "yes", "mail.tls_ca_file": str(certificate),
                "mail.user": "bob@example.com"}
        daemon, dovecot = dovecot_pcc(auth_socket=f"{postfix.directory}/queue/private/dovecot-auth",
                                      **{**mail, "mail.password": PASSWORD, "server.port": free_port()})
        for country in ("GB", "US", "FR", "DE"):
            dovecot.auth("alice@example.com", ip_in(country))
        deadline = time.monotonic() + 30
        while not postfix.queue():
            assert time.monotonic() < deadline, daemon.log()[-2000:]
            time.sleep(0.2)
        (queue_id,) = postfix.queue()
        envelope = subprocess.run(["postcat", "-c", postfix.directory, "-q", queue_id], capture_output=True,
                                  text=True, timeout=60).stdout
        assert "named_attribute: sasl_username=bob@example.com" in envelope
        assert "From: pcc-notices@example.com" in envelope and "account alice@example.com blocked" in envelope
        assert "sender: pcc-notices@example.com" in envelope
        postfix.empty_queue()

        wrong, _dovecot = dovecot_pcc(**{**mail, "mail.password": "wrong-password-1", "server.port": free_port(),
                                         "db.dbcon": f"sqlite:///{tmp_path}/wrong.sqlite3"})
        wrong_client = wrong.client()
        for country in ("GB", "US", "FR", "DE"):
            wrong_client.ask("carol@example.com", ip_in(country))
        wait_for_log(wrong, "not sent (retrying in")
        line = next(line for line in wrong.log().splitlines() if "not sent (retrying in" in line)
        assert "Authentication" in line or "535" in line, line
        assert "wrong-password-1" not in wrong.log() and not postfix.queue()
    finally:
        postfix.stop()


def swaks_auth(port: int, login: str, ip: str) -> int:
    """swaks: XCLIENT ADDR=ip, then AUTH PLAIN as `login`; its exit code (0: authenticated and sent)."""
    result = subprocess.run(["swaks", "--server", f"127.0.0.1:{port}", "--xclient-addr", ip, "--auth", "PLAIN",
                             "--auth-user", login, "--auth-password", PASSWORD, "--from", login,
                             "--to", "bob@remote.test", "--timeout", "30"],
                            capture_output=True, text=True, timeout=90)
    return result.returncode


def test_replay_counts_dovecot_logins(tmp_path, geoip_path):
    from conftest import write_config

    log_file = tmp_path / "mail.log"
    lines = [f"Nov 25 18:4{n}:02 mx dovecot: imap-login: Login: user=<alice@example.com>, method=PLAIN, "
             f"rip={ip_in(country)}, lip=192.0.2.1, mpid=123{n}, TLS, session=<abc{n}>"
             for n, country in enumerate(("GB", "US", "FR"))]
    lines.append(f"Nov 25 18:49:02 imap-login: Info: Logged in: user=<alice@example.com>, method=PLAIN, "
                 f"rip={ip_in('DE')}, lip=192.0.2.1, mpid=1239, TLS")
    log_file.write_text("\n".join(lines) + "\n")
    config = write_config(tmp_path, {"db.dbcon": f"sqlite:///{tmp_path}/pcc.sqlite3", "geoip.database": geoip_path,
                                     "dovecot.count_logins": "yes"})
    output = pcc_command(config, "--replay", str(log_file)).stdout
    assert "alice@example.com" in output and "4 authenticated submissions and Dovecot logins" in output
    config_off = write_config(tmp_path, {"db.dbcon": f"sqlite:///{tmp_path}/pcc.sqlite3",
                                         "geoip.database": geoip_path}, name="off.conf")
    assert "alice@example.com" not in pcc_command(config_off, "--replay", str(log_file)).stdout


def post(port: int, command: str, body: bytes, timeout: float = 5.0, api_header: str = API_HEADER) -> tuple:
    """One request as Dovecot sends it: (HTTP status, JSON answer or None, seconds)."""
    return dovecot_post(port, command, body, api_header, timeout)


def login_body(login: str, country: str, **extra) -> bytes:
    return json.dumps({"login": login, "remote": ip_in(country), "protocol": "imap", "pwhash": "0ee9",
                       "device_id": "", "tls": False, **extra}).encode()


def test_answers_within_a_second_while_the_database_hangs(start_daemon, shared_db_url):
    """The database stops answering (a black hole): a blocked account is still
    refused and an unknown one let in, each within a second."""
    import sqlalchemy as sa
    from conftest import TcpProxy

    url = sa.engine.make_url(shared_db_url)
    proxy = TcpProxy(url.host, url.port)
    try:
        port = free_port()
        daemon = start_daemon(**{
            "db.dbcon": url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False),
            "policy.action": "REJECT", "dovecot.policy_port": port, "dovecot.count_logins": "yes",
            "dovecot.api_header": API_HEADER})
        pcc_command(daemon.config_path, "-b", "alice@example.com")
        wait_until_visible()
        assert post(port, "allow", login_body("alice@example.com", "GB"))[1]["status"] == -1
        proxy.cut("blackhole")
        time.sleep(1.0)  # the poll of changes goes stale: every account needs the database now
        for login, status in (("alice@example.com", -1), ("dave@example.com", 0)):
            code, answer, seconds = post(port, "allow", login_body(login, "GB"))
            assert code == 200 and answer["status"] == status and seconds < 1.0, (login, answer, seconds)
        proxy.restore()
    finally:
        proxy.close()


def test_oversized_bodies_and_other_methods_are_refused(start_daemon, sqlite_url):
    port = free_port()
    daemon = start_daemon(**{"db.dbcon": sqlite_url, "dovecot.policy_port": port, "dovecot.api_header": API_HEADER})
    code, _answer, _seconds = post(port, "allow", b"{" + b" " * 20000 + b"}")
    assert code == 413
    assert post(port, "shutdown", login_body("alice@example.com", "GB"))[0] == 400
    assert post(port, "allow", b"[1, 2]")[0] == 400
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/?command=allow", timeout=5)
    assert refused.value.code == 405
    # still serving, and a login without an account name is nobody's business
    assert post(port, "allow", login_body("", "GB"))[1] == {"status": 0}
    assert "refused (HTTP 413)" in daemon.log() and "refused (HTTP 405)" in daemon.log()


def test_a_body_of_any_shape_gets_400_and_one_line(start_daemon, sqlite_url):
    """Unauthenticated or not, no body makes a traceback: nested 16 KB deep
    (json's RecursionError), nested values where Dovecot sends plain ones; a
    flood of them is one line (and a count), and the port goes on serving."""
    port = free_port()
    daemon = start_daemon(**{"db.dbcon": sqlite_url, "dovecot.policy_port": port, "dovecot.api_header": API_HEADER})
    deep = b"[" * 16000
    nested = json.dumps({"login": [[["alice@example.com"]]], "remote": ip_in("GB")}).encode()
    deep_value = b"{\"login\": " + b"[" * 8000 + b"]" * 8000 + b"}"
    for body in [deep, nested, deep_value] * 20:
        assert post(port, "allow", body)[0] == 400
        assert post(port, "allow", body, api_header="X-Other: header")[0] == 401
    assert post(port, "allow", login_body("alice@example.com", "GB"))[1] == {"status": 0}
    log = daemon.log()
    assert "Traceback" not in log and "internal error" not in log
    assert log.count("dovecot policy request refused (HTTP 400)") == 1
    assert log.count("dovecot policy request refused (HTTP 401)") == 1


def test_rules_apply_to_logins_as_to_submissions(start_daemon, sqlite_url):
    """Whitelisted logins and ignored countries do not count; in monitor mode
    a flagged account is not refused; after SIGHUP the new rules apply."""
    port = free_port()
    daemon = start_daemon(**{"db.dbcon": sqlite_url, "policy.action": "REJECT", "dovecot.policy_port": port,
                             "dovecot.count_logins": "yes", "dovecot.api_header": API_HEADER,
                             "policy.whitelisted": "boss@example.com",
                             "policy.ignorecountries": "SE", "policy.mode": "monitor"})
    for country in ("GB", "US", "FR", "DE", "JP"):
        post(port, "report", login_body("boss@example.com", country, success=True))
        post(port, "report", login_body("alice@example.com", country, success=True))
    assert post(port, "allow", login_body("alice@example.com", "GB"))[1] == {"status": 0}  # flagged only
    assert "would be blocked" in pcc_command(daemon.config_path, "-l").stdout
    assert "boss@example.com" not in pcc_command(daemon.config_path, "-l").stdout
    for country in ("SE", "SE"):
        post(port, "report", login_body("carol@example.com", country, success=True))
    assert "not counted: SE is in ignorecountries" in daemon.log()
    config = open(daemon.config_path).read().replace("mode = monitor", "mode = enforce")
    open(daemon.config_path, "w").write(config)
    daemon.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "reloaded" not in daemon.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    for country in ("GB", "US", "FR", "DE"):  # judged afresh in enforce mode: the 4th blocks
        post(port, "report", login_body("alice@example.com", country, success=True))
    assert post(port, "allow", login_body("alice@example.com", "GB"))[1]["status"] == -1


def session_open(session: imaplib.IMAP4) -> bool:
    try:
        session.noop()
        return True
    except (imaplib.IMAP4.abort, imaplib.IMAP4.error, OSError):
        return False


def dovecot_with_doveadm(dovecot_pcc, through: str):
    """pcc and a Dovecot whose sessions pcc ends through `through`."""
    doveadm_port = free_port()
    api = {"dovecot.doveadm_url": f"http://127.0.0.1:{doveadm_port}/doveadm/v1",
           "dovecot.doveadm_api_key": DOVEADM_API_KEY} if through == "doveadm HTTP API" else {}
    daemon, dovecot = dovecot_pcc(doveadm_port=doveadm_port, **{"dovecot.count_logins": "no", **api})
    if through == "doveadm command":  # it names Dovecot's config, made after the daemon: restart with it
        daemon.stop()
        config = open(daemon.config_path).read().replace("doveadm_command =",
                                                         f"doveadm_command = doveadm -c {dovecot.config}")
        open(daemon.config_path, "w").write(config)
        daemon.start()
    return daemon, dovecot


@pytest.mark.parametrize("through", ["doveadm HTTP API", "doveadm command"])
def test_a_block_through_postfix_ends_the_accounts_open_sessions_and_no_other(dovecot_pcc, smtp_sink, through):
    """The thief's IMAP session, logged in before the block, is closed within
    2 s of the message that crosses the line; another account's stays."""
    daemon, dovecot = dovecot_with_doveadm(dovecot_pcc, through)
    thief, other = dovecot.open_session("alice@example.com", ip_in("RU")), dovecot.open_session(
        "bob@example.com", ip_in("GB"))
    assert session_open(thief) and session_open(other)
    client = daemon.client()
    assert walk(client, "alice@example.com", ["GB", "US", "FR"]) == ["DUNNO"] * 3
    crossed = time.monotonic()
    assert client.ask("alice@example.com", ip_in("DE")).startswith("REJECT")
    while session_open(thief):
        assert time.monotonic() - crossed < 2.0, "the blocked account's session is still open"
        time.sleep(0.05)
    ended_after = time.monotonic() - crossed
    assert session_open(other)
    ((_recipients, mail),) = smtp_sink.wait_for(1)
    assert "Sessions: its sessions were ended" in mail.get_content(), mail.get_content()
    assert "Dovecot sessions of alice@example.com: its sessions were ended" in daemon.log()
    print(f"session ended {ended_after:.2f} s after the crossing message")


@pytest.mark.parametrize("through", ["doveadm HTTP API", "doveadm command"])
def test_a_login_that_doveadm_reads_as_a_pattern_ends_nobodys_sessions(dovecot_pcc, through):
    """Anyone who can send a policy request (or an unauthenticated IMAP login
    before its password is checked) picks the login; doveadm reads `*` and
    `?` as wildcards and an address range as clients, and a leading `-` as an
    option.  Blocking such "accounts" must end exactly their sessions: none."""
    daemon, dovecot = dovecot_with_doveadm(dovecot_pcc, through)
    alice, bob = dovecot.open_session("alice@example.com", ip_in("GB")), dovecot.open_session(
        "bob@example.com", ip_in("GB"))
    client = daemon.client()
    hostile = ["*@example.com", "?*@example.com", "127.0.0.0/8", "-x"]
    for login in hostile:
        assert walk(client, login, ["GB", "US", "FR"]) == ["DUNNO"] * 3
        assert client.ask(login, ip_in("DE")).startswith("REJECT")
    for login in hostile[:3]:
        wait_for_log(daemon, f"ending the Dovecot sessions of {login} failed: not asked of doveadm")
    wait_for_log(daemon, "Dovecot sessions of -x: no session was open")  # the user named -x, exactly
    assert session_open(alice) and session_open(bob)
    assert "doveadm kick '*@example.com'" not in daemon.log()  # no advice to run the pattern by hand
    # and a real account is still contained, alone
    assert walk(client, "alice@example.com", ["GB", "US", "FR"]) == ["DUNNO"] * 3
    assert client.ask("alice@example.com", ip_in("DE")).startswith("REJECT")
    wait_for_log(daemon, "Dovecot sessions of alice@example.com: its sessions were ended")
    assert not session_open(alice) and session_open(bob)


def test_one_block_on_every_channel(dovecot_pcc, receivers, smtp_sink):
    """One block, end to end, with times: the message that crosses the line
    (real Postfix), the thief's IMAP session ended (real Dovecot, doveadm HTTP
    API), what the account had queued put on hold, the webhook received."""
    if shutil.which("postfix") is None:
        unavailable("Postfix (Debian package postfix)")
    postfix = PostfixInstance(free_port())
    postfix.start()
    try:
        hook, doveadm_port = receivers(), free_port()
        daemon, dovecot = dovecot_pcc(doveadm_port=doveadm_port, **{
            "server.port": postfix.pcc_port, "policy.action": "HOLD", "postfix.config_directory": postfix.directory,
            "dovecot.count_logins": "no", "dovecot.doveadm_url": f"http://127.0.0.1:{doveadm_port}/doveadm/v1",
            "dovecot.doveadm_api_key": DOVEADM_API_KEY, "notify.webhook_urls": hook.url})
        session = dovecot.open_session("alice@example.com", ip_in("RU"))
        queued = [postfix.send("alice@example.com", ip_in(country))[2] for country in ("GB", "US", "FR")]
        started = time.monotonic()
        times = {}
        _code, _text, crossing = postfix.send("alice@example.com", ip_in("DE"))
        times["crossing message answered HOLD"] = time.monotonic() - started
        while len(times) < 4:
            assert time.monotonic() - started < 10, times
            if "session ended" not in times and not session_open(session):
                times["session ended"] = time.monotonic() - started
            queue = postfix.queue()
            if "queued messages held" not in times and all(queue.get(queue_id) == "hold"
                                                          for queue_id in queued + [crossing]):
                times["queued messages held"] = time.monotonic() - started
            if "webhook received" not in times and hook.posts:
                times["webhook received"] = time.monotonic() - started
            time.sleep(0.01)
        block = json.loads(hook.posts[0][1])
        assert block["messages_held"] == 3 and "its sessions were ended" in block["sessions"]
        print("timeline of one block: " + ", ".join(f"{what} +{seconds:.2f} s" for what, seconds in times.items()))
    finally:
        postfix.stop()
