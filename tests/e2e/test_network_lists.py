"""Network lists, the ASN database and --only-from, end to end: lists served
over HTTP in their real formats (the Tor Project's bulk exit list, a CIDR list
with IPv4 and IPv6), installed by `pcc.py --update-lists`, picked up by the
running daemon, and answered on the Postfix and Dovecot ports; an ASN .mmdb
with DB-IP's field names; the per-account countries set by an administrator."""
import http.server
import json
import os
import threading
import time

import pytest
from conftest import free_port, ip_in, list_path, pcc_command, run_pcc, scrape, wait_for_log, wait_until_visible, \
    write_config

from e2e.test_dovecot import API_HEADER, login_body, post

# Tor exits and VPN exits inside the test GeoIP database's countries: a thief
# who picks an exit in the account's own country.
TOR_EXITS = [ip_in("ES", host=200 + n) for n in range(5)] + [f"185.220.101.{n}" for n in range(1, 120)]
TOR_BULK_LIST = "".join(f"{address}\n" for address in TOR_EXITS)
VPN_NETWORK_ES, VPN_NETWORK_V6 = ip_in("ES", host=512).rsplit(".", 1)[0] + ".0/24", "2a0c:c:1::/48"
VPN_CIDR_LIST = f"{VPN_NETWORK_ES}\n{VPN_NETWORK_V6}\n" + "".join(f"146.70.{n}.0/24\n" for n in range(120))
ASN_OF_ES = (64500, "Example Hosting B.V.")


class ListServer:
    """Serves list files by path, as check.torproject.org and GitHub do."""

    def __init__(self):
        self.files = {}
        self.before_answer = lambda path: None  # what a test does while pcc waits for a download
        files, server = self.files, self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.before_answer(self.path)
                body = files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_arguments):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def list_server():
    server = ListServer()
    yield server
    server.close()


def write_asn_database(path) -> str:
    """An ASN .mmdb with the field names of DB-IP's ASN Lite and GeoLite2-ASN."""
    from mmdb_writer import MMDBWriter
    from netaddr import IPSet

    writer = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="DBIP-ASN-Lite (compat=GeoLite2-ASN)",
                        languages=["en"], description="pcc test ASN data")
    networks = {ASN_OF_ES: [ip_in("ES").rsplit(".", 2)[0] + ".0.0/16"], (15169, "Google LLC"): ["8.8.8.0/24"],
                (13335, "Cloudflare, Inc."): ["1.1.1.0/24"], (19281, "Quad9"): ["9.9.9.0/24"]}
    for (number, organisation), ranges in networks.items():
        writer.insert_network(IPSet(ranges), {"autonomous_system_number": number,
                                              "autonomous_system_organization": organisation})
    writer.to_db_file(str(path))
    return str(path)


def lists_config(tmp_path, server, **overrides) -> dict:
    return {"list tor.url": f"{server.url}/torbulkexitlist", "list vpn.url": f"{server.url}/vpn/ipv4.txt",
            "list hosting.url": "", **overrides}


def test_update_lists_installs_real_formats_and_keeps_the_old_file_when_a_download_is_broken(tmp_path, list_server):
    config = write_config(tmp_path, lists_config(tmp_path, list_server))
    list_server.files.update({"/torbulkexitlist": TOR_BULK_LIST.encode(), "/vpn/ipv4.txt": VPN_CIDR_LIST.encode()})
    result = run_pcc("--config", config, "--update-lists", expect=0)
    assert "list tor: installed" in result.stdout and "124 entries" in result.stdout
    assert "list vpn: installed" in result.stdout and "122 entries" in result.stdout
    assert open(list_path(tmp_path, "tor")).read() == TOR_BULK_LIST
    for broken, why in ((TOR_BULK_LIST[:-2].encode(), "truncated download"),
                        (b"<html><body>429 Too Many Requests</body></html>\n", "not an IP address"),
                        ("".join(TOR_BULK_LIST.splitlines(keepends=True)[:10]).encode(), "fewer than min_entries")):
        list_server.files["/torbulkexitlist"] = broken
        list_server.files["/vpn/ipv4.txt"] = b"10.0.0.0/8\n" + VPN_CIDR_LIST.encode()
        result = run_pcc("--config", config, "--update-lists", expect=1)
        assert "list tor: update failed, the installed file is unchanged" in result.stderr and why in result.stderr
        assert "list vpn: update failed" in result.stderr and "private, reserved" in result.stderr
        assert "Traceback" not in result.stderr
        assert open(list_path(tmp_path, "tor")).read() == TOR_BULK_LIST
        assert open(list_path(tmp_path, "vpn")).read() == VPN_CIDR_LIST
    del list_server.files["/torbulkexitlist"]
    assert "HTTP 404" in run_pcc("--config", config, "--update-lists", expect=1).stderr


def test_a_list_of_every_ipv6_user_is_refused_by_update_lists_and_by_the_daemon(tmp_path, list_server, start_daemon,
                                                                               sqlite_url):
    """175 /17s of the RIRs' main blocks passed as "1.0%" of 2000::/3, and as
    [list tor] the daemon blocked Google's, Cloudflare's and Deutsche
    Telekom's IPv6 clients on their first message."""
    from unit.test_networks import RIR_SEVENTEENS

    config = write_config(tmp_path, lists_config(tmp_path, list_server, **{"list vpn.url": "",
                                                                           "list tor.min_entries": "10"}))
    list_server.files["/torbulkexitlist"] = RIR_SEVENTEENS
    result = run_pcc("--config", config, "--update-lists", expect=1)
    assert "of the RIRs' IPv6 address space" in result.stderr and not os.path.exists(list_path(tmp_path, "tor"))
    path = list_path(tmp_path, "tor")
    open(path, "w").write(TOR_BULK_LIST)
    daemon = start_daemon(**{"db.dbcon": sqlite_url, "policy.action": "REJECT", "list tor.min_entries": "10"})
    open(path + ".new", "wb").write(RIR_SEVENTEENS)  # copied in by hand
    os.replace(path + ".new", path)
    wait_for_log(daemon, "network list tor: " + path + " cannot be used")
    google, cloudflare, telekom = "2a00:1450:4001:82b::200e", "2606:4700::6810:84e5", "2003:e2:a70b::1"
    for number, client in enumerate((google, cloudflare, telekom)):
        assert daemon.client().ask(f"user{number}@example.com", client) == "DUNNO"


def test_a_tor_exit_in_the_home_country_blocks_on_both_doors(tmp_path, start_daemon, sqlite_url, smtp_sink,
                                                              list_server):
    """tor = block: the list is off until its file comes, the daemon picks the
    file up without a restart, then a Tor exit in the account's own country
    blocks it (Postfix port) or its login (Dovecot port); the decision line,
    the mail, the metrics and -s name the list and the network."""
    metrics_port, dovecot_port = free_port(), free_port()
    daemon = start_daemon(**lists_config(tmp_path, list_server), **{
        "db.dbcon": sqlite_url, "policy.action": "REJECT", "list tor.action": "block",
        "mail.notice": "admin@example.com", "mail.mailsrv": "127.0.0.1", "mail.mailport": smtp_sink.port,
        "server.metrics_port": metrics_port, "dovecot.policy_port": dovecot_port, "dovecot.count_logins": "yes",
        "dovecot.api_header": API_HEADER, "networks.asn_database": write_asn_database(tmp_path / "asn.mmdb")})
    client = daemon.client()
    assert client.ask("alice@example.com", ip_in("ES")) == "DUNNO"
    assert client.ask("alice@example.com", TOR_EXITS[0]) == "DUNNO"  # no list file yet: off
    assert "tor (block, off until pcc.py --update-lists installs its file)" in daemon.log()
    list_server.files["/torbulkexitlist"] = TOR_BULK_LIST.encode()
    pcc_command(daemon.config_path, "--update-lists", expect=1)  # vpn's url serves nothing: 404
    wait_for_log(daemon, "network files changed")
    assert client.ask("alice@example.com", TOR_EXITS[1]).startswith("REJECT")
    assert client.ask("alice@example.com", ip_in("ES")).startswith("REJECT")  # blocked stays blocked
    log = daemon.log()
    assert f'client={TOR_EXITS[1]} country=ES network=tor asn=AS64500 org="Example Hosting B.V." ' \
           f'decision=REJECT reason=blocking: client address {TOR_EXITS[1]} is on the network list tor' in log
    (_to, mail), = smtp_sink.wait_for(1)
    body = mail.get_content()
    assert "alice@example.com blocked" in mail["Subject"] and "is on the network list tor" in body
    assert "Network of the request that crossed the line: AS64500 Example Hosting B.V. (lists: tor)" in body
    shown = pcc_command(daemon.config_path, "-s", "alice@example.com").stdout
    assert "AS64500 Example Hosting B.V., list tor" in shown
    # the Dovecot door: a good password from a Tor exit blocks the account
    assert post(dovecot_port, "report", login_body("bob@example.com", "ES", success=True))[1] == {"status": 0}
    bob_from_tor = json.dumps({"login": "bob@example.com", "remote": TOR_EXITS[2], "protocol": "imap",
                               "success": True}).encode()
    post(dovecot_port, "report", bob_from_tor)
    assert post(dovecot_port, "allow", login_body("bob@example.com", "ES"))[1]["status"] == -1
    assert "via=dovecot door=imap NEW BLOCK" in daemon.log()
    metrics = scrape(metrics_port)
    assert metrics[("pcc_network_list_requests_total", (("list", "tor"),))] >= 2
    assert metrics[("pcc_network_list_blocks_total", (("list", "tor"),))] == 2
    assert metrics[("pcc_new_blocks_total", (("mode", "enforce"), ("rule", "network")))] == 2
    assert metrics[("pcc_network_list_entries", (("list", "tor"),))] == len(TOR_EXITS)


def test_count_makes_a_vpn_hop_the_crossing_country_and_monitor_mode_only_flags(tmp_path, start_daemon, sqlite_url):
    open(list_path(tmp_path, "vpn"), "w").write(VPN_CIDR_LIST)
    open(list_path(tmp_path, "tor"), "w").write(TOR_BULK_LIST)
    daemon = start_daemon(**{"db.dbcon": sqlite_url, "policy.action": "REJECT", "list vpn.action": "count",
                             "list tor.action": "block", "policy.how_many_different_countries": "2"})
    client = daemon.client()
    vpn_exit_in_spain = VPN_NETWORK_ES.rsplit(".", 1)[0] + ".77"
    assert client.ask("alice@example.com", ip_in("ES")) == "DUNNO"
    assert client.ask("alice@example.com", ip_in("FR")) == "DUNNO"  # 2 of at most 2
    assert client.ask("alice@example.com", vpn_exit_in_spain).startswith("REJECT")  # ES again, but through a VPN
    assert "(ES, FR, vpn network)" in daemon.log() and "network=vpn" in daemon.log()
    # an IPv6 VPN hop counts for another account, without blocking on its own
    assert client.ask("bob@example.com", "2a0c:c:1::9") == "DUNNO"
    assert "bob@example.com" in daemon.log() and "1 of at most 2 countries" in daemon.log()
    shown = pcc_command(daemon.config_path, "-s", "alice@example.com").stdout
    assert "vpn network  last IP " + vpn_exit_in_spain in shown
    # monitor mode: a Tor exit would have blocked; mail flows
    config = open(daemon.config_path).read().replace("mode = enforce", "mode = monitor")
    open(daemon.config_path, "w").write(config)
    daemon.process.send_signal(1)
    wait_for_log(daemon, "reloaded")
    assert client.ask("carol@example.com", TOR_EXITS[3]) == "DUNNO"
    assert "would block (monitor mode): client address" in daemon.log()
    assert "carol@example.com" in pcc_command(daemon.config_path, "-l").stdout


def test_notify_tells_the_admins_once_and_changes_nothing(tmp_path, start_daemon, sqlite_url, smtp_sink, receivers):
    open(list_path(tmp_path, "vpn"), "w").write(VPN_CIDR_LIST)
    receiver = receivers()
    daemon = start_daemon(**{"db.dbcon": sqlite_url, "list vpn.action": "notify", "mail.notice": "admin@example.com",
                             "mail.mailsrv": "127.0.0.1", "mail.mailport": smtp_sink.port,
                             "notify.webhook_urls": receiver.url})
    client = daemon.client()
    for host in (10, 11, 12):
        assert client.ask("alice@example.com", f"146.70.3.{host}") == "DUNNO"
    (_to, mail), = smtp_sink.wait_for(1)
    assert "alice@example.com on network list vpn" in mail["Subject"]
    receiver.wait(1)
    time.sleep(0.5)
    events = [json.loads(body) for _headers, body in receiver.posts]
    assert [event["event"] for event in events] == ["network_list"]  # once a day per account and list
    assert events[0]["lists"] == ["vpn"] and events[0]["client"] == "146.70.3.10"
    assert len(smtp_sink.messages) == 1


def test_only_from_blocks_any_other_country_on_both_doors(start_daemon, db_url):
    dovecot_port = free_port()
    daemon = start_daemon(**{"db.dbcon": db_url, "policy.action": "REJECT", "dovecot.policy_port": dovecot_port,
                             "dovecot.count_logins": "yes", "dovecot.api_header": API_HEADER})
    config = daemon.config_path
    assert "may send from any country" in pcc_command(config, "--only-from", "ceo@example.com").stdout
    assert "only from ES, PT" in pcc_command(config, "--only-from", "CEO@example.com", "es,pt").stdout
    pcc_command(config, "--only-from", "cfo@example.com", "ES")
    assert "ZZ is not an ISO 3166" in pcc_command(config, "--only-from", "x@example.com", "ZZ", expect=1).stderr
    wait_until_visible()
    assert "may send only from: ES, PT" in pcc_command(config, "-s", "ceo@example.com").stdout
    client = daemon.client()
    assert client.ask("ceo@example.com", ip_in("ES")) == "DUNNO"
    assert client.ask("ceo@example.com", ip_in("FR")).startswith("REJECT")
    assert "sent from FR, but it may send only from ES, PT (--only-from)" in daemon.log()
    assert post(dovecot_port, "report", login_body("cfo@example.com", "US", success=True))[1]["status"] in (0, -1)
    assert post(dovecot_port, "allow", login_body("cfo@example.com", "ES"))[1]["status"] == -1
    # cleared: any country again (after the unblock)
    pcc_command(config, "--only-from", "ceo@example.com", "")
    pcc_command(config, "-u", "ceo@example.com")
    wait_until_visible()
    assert client.ask("ceo@example.com", ip_in("FR")) == "DUNNO"
    assert "may send only from:" not in pcc_command(config, "-s", "ceo@example.com").stdout


def test_health_warns_when_a_list_is_older_than_its_maximum_age(tmp_path, start_daemon, sqlite_url):
    path = list_path(tmp_path, "tor")
    open(path, "w").write(TOR_BULK_LIST)
    daemon = start_daemon(**{"db.dbcon": sqlite_url})
    assert run_pcc("--config", daemon.config_path, "--health").returncode == 0
    three_days_ago = time.time() - 3 * 86400
    with open(path + ".new", "w") as fresh:
        fresh.write(TOR_BULK_LIST)
    os.utime(path + ".new", (three_days_ago, three_days_ago))
    os.replace(path + ".new", path)
    wait_for_log(daemon, "network files changed")
    result = run_pcc("--config", daemon.config_path, "--health")
    assert result.returncode == 1 and "network list tor is 3.0 days old (at most 2)" in result.stdout


def test_a_refused_file_is_loud_in_the_log_health_and_metrics(tmp_path, start_daemon, sqlite_url):
    """A list file the daemon cannot use (copied by hand, half written) turns
    no protection off silently: the ranges it had stay, and everyone hears."""
    path = list_path(tmp_path, "tor")
    open(path, "w").write(TOR_BULK_LIST)
    metrics_port = free_port()
    daemon = start_daemon(**{"db.dbcon": sqlite_url, "server.metrics_port": metrics_port,
                             "policy.action": "REJECT"})
    open(path + ".new", "w").write(TOR_BULK_LIST[:40])
    os.replace(path + ".new", path)
    wait_for_log(daemon, "network list tor: " + path + " cannot be used")
    assert "still using the 2 ranges loaded before" in daemon.log()
    assert daemon.client().ask("eve@example.com", TOR_EXITS[0]).startswith("REJECT")
    health = run_pcc("--config", daemon.config_path, "--health")
    assert health.returncode == 1 and f"network list tor: its file {path} was refused; the daemon uses the " \
        "ranges it had" in health.stdout
    assert scrape(metrics_port)[("pcc_network_list_file_refused", (("list", "tor"),))] == 1
    assert "Traceback" not in daemon.log()


def test_replay_reports_blocks_and_accounts_by_network(tmp_path, geoip_path):
    open(list_path(tmp_path, "tor"), "w").write(TOR_BULK_LIST)
    config = write_config(tmp_path, {"db.dbcon": f"sqlite:///{tmp_path}/pcc.sqlite3", "geoip.database": geoip_path,
                                     "networks.asn_database": write_asn_database(tmp_path / "asn.mmdb")})
    log_file = tmp_path / "mail.log"
    lines = [("alice@example.com", ip_in("ES")), ("alice@example.com", TOR_EXITS[0]),
             ("bob@example.com", ip_in("ES", host=9)), ("carol@example.com", ip_in("FR"))]
    log_file.write_text("".join(
        f"Nov 25 18:4{n}:13 mx postfix/submission/smtpd[1234]: 4F3A21C{n}: client=unknown[{ip}], "
        f"sasl_method=PLAIN, sasl_username={login}\n" for n, (login, ip) in enumerate(lines)))
    output = pcc_command(config, "--replay", str(log_file)).stdout
    assert "Would have blocked 1 account (1 for network list tor)" in output
    assert "network AS64500 Example Hosting B.V." in output
    assert "tor                   1  (action block)" in output
    assert "     2  AS64500 Example Hosting B.V." in output
    report = json.loads(pcc_command(config, "--json", "--replay", str(log_file)).stdout)
    assert report["would_block_by_rule"] == {"network list tor": 1}
    assert report["would_block"][0]["lists"] == ["tor"]


def test_update_lists_follows_no_link_planted_where_the_lists_live(tmp_path, list_server):
    """The daemon's user may own the lists' directory; root's --update-lists
    must not write where a link planted there points."""
    list_server.files["/torbulkexitlist"] = TOR_BULK_LIST.encode()
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.symlink(victim, list_path(tmp_path, "tor"))
    config = write_config(tmp_path, lists_config(tmp_path, list_server, **{"list vpn.url": ""}))
    result = run_pcc("--config", config, "--update-lists", expect=1)
    assert "is a symbolic link; pcc does not follow links" in result.stderr
    assert victim.read_text() == "precious\n"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, tmp_path / "linked")
    config = write_config(tmp_path, lists_config(tmp_path, list_server, **{
        "list vpn.url": "", "list tor.file": str(tmp_path / "linked" / "tor.txt")}), name="linked.conf")
    result = run_pcc("--config", config, "--update-lists", expect=1)
    assert "(the directory of [list tor] file) is a symbolic link" in result.stderr
    assert list(elsewhere.iterdir()) == []


def daemons_own_lists_directory(tmp_path):
    """/var/lib/pcc as the daemon's user (nobody) owns it, a lists directory
    in it, and a directory of root's only that nobody may write to."""
    import pwd

    nobody = pwd.getpwnam("nobody")
    home, secret = tmp_path / "var-lib-pcc", tmp_path / "root-only"
    (home / "lists").mkdir(parents=True)
    secret.mkdir(mode=0o700)
    for directory in (home, home / "lists"):
        os.chown(directory, nobody.pw_uid, nobody.pw_gid)
    return home, secret


def test_root_writes_where_it_checked_even_when_the_directory_is_swapped_for_a_link(tmp_path, list_server):
    """The daemon's user owns the lists' directory: while root's --update-lists
    downloads, it moves the directory away and puts a link to a root-only
    directory in its place.  Root's temporary file, rename and removals stay
    in the directory it opened."""
    home, secret = daemons_own_lists_directory(tmp_path)
    lists = home / "lists"

    def swap(_path):
        os.rename(lists, home / "lists.moved")
        os.symlink(secret, lists)

    list_server.before_answer = swap
    list_server.files["/torbulkexitlist"] = TOR_BULK_LIST.encode()
    config = write_config(tmp_path, lists_config(tmp_path, list_server, **{
        "list vpn.url": "", "list tor.file": str(lists / "tor-exits.txt")}))
    result = run_pcc("--config", config, "--update-lists", timeout=60)
    assert list(secret.iterdir()) == [], result.stderr
    assert (home / "lists.moved" / "tor-exits.txt").read_text() == TOR_BULK_LIST
    assert sorted(path.name for path in (home / "lists.moved").iterdir()) == [".pcc-geoip.lock", "tor-exits.txt"]


def test_a_fifo_planted_as_the_lock_holds_no_update_and_as_a_list_no_daemon(tmp_path, list_server, start_daemon,
                                                                            sqlite_url):
    """A FIFO named .pcc-geoip.lock held root's open until the planter swapped
    the directory for a link and opened the FIFO: root then wrote into a
    root-only directory.  A FIFO as a list file froze the daemon's
    housekeeping until a writer opened it.  Neither is opened now: one line
    each, and the daemon goes on (a real file put there later is used)."""
    home, secret = daemons_own_lists_directory(tmp_path)
    os.mkfifo(home / "lists" / ".pcc-geoip.lock")
    list_server.files["/torbulkexitlist"] = TOR_BULK_LIST.encode()
    config = write_config(tmp_path, lists_config(tmp_path, list_server, **{
        "list vpn.url": "", "list tor.file": str(home / "lists" / "tor-exits.txt")}))
    started = time.monotonic()
    result = run_pcc("--config", config, "--update-lists", expect=1, timeout=30)
    assert time.monotonic() - started < 20 and ".pcc-geoip.lock" in result.stderr and "Traceback" not in result.stderr
    assert list(secret.iterdir()) == [] and not (home / "lists" / "tor-exits.txt").exists()

    path = list_path(tmp_path, "tor")
    os.mkfifo(path)
    daemon = start_daemon(**{"db.dbcon": sqlite_url, "policy.action": "REJECT"})
    wait_for_log(daemon, f"network list tor: {path} cannot be used ({path}: not a regular file")
    os.unlink(path)
    open(path + ".new", "w").write(TOR_BULK_LIST)
    os.replace(path + ".new", path)
    wait_for_log(daemon, "network files changed")
    assert daemon.client().ask("eve@example.com", TOR_EXITS[0]).startswith("REJECT")


def test_a_tor_exit_blocks_while_the_database_is_down_and_the_block_lands_after(tmp_path, start_daemon,
                                                                                 shared_db_url):
    """The database refuses: a Tor exit still blocks an account the daemon has
    never seen (no history needed), the block waits in the spool, blocks every
    later message and reaches the database when it is back."""
    import sqlalchemy as sa
    from conftest import TcpProxy

    open(list_path(tmp_path, "tor"), "w").write(TOR_BULK_LIST)
    direct = sa.engine.make_url(shared_db_url)
    proxy = TcpProxy(direct.host, direct.port)
    try:
        url = direct.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        daemon = start_daemon(**{"db.dbcon": url, "policy.action": "REJECT", "list tor.action": "block",
                                 "db.spool_file": str(tmp_path / "spool.jsonl")})
        client = daemon.client()
        proxy.cut("refuse")
        time.sleep(1.5)
        assert client.ask_like_postfix("mallory@example.com", TOR_EXITS[4]).startswith("REJECT")
        assert client.ask_like_postfix("mallory@example.com", ip_in("ES")).startswith("REJECT")
        assert "block spooled" in daemon.log()
        proxy.restore()
        deadline = time.monotonic() + 15
        while "mallory@example.com" not in pcc_command(daemon.config_path, "-l").stdout:
            assert time.monotonic() < deadline, daemon.log()[-3000:]
            client.ask_like_postfix("dave@example.com", ip_in("GB"))  # a probe finds the database back
            time.sleep(0.3)
        assert "is on the network list tor" in pcc_command(daemon.config_path, "-s", "mallory@example.com").stdout
    finally:
        proxy.close()


def test_update_geoip_installs_the_asn_database_and_refuses_one_that_names_no_network(tmp_path, list_server):
    """[networks] asn_database set: --update-geoip fetches it too (alone when
    [geoip] database is blank), checks it names the networks of well-known
    addresses, and keeps the installed file otherwise."""
    import gzip

    good = write_asn_database(tmp_path / "served.mmdb")
    target = tmp_path / "asn.mmdb"
    config = write_config(tmp_path, {"networks.asn_database": str(target),
                                     "networks.asn_update_url": f"{list_server.url}/dbip-asn-lite.mmdb.gz"})
    list_server.files["/dbip-asn-lite.mmdb.gz"] = gzip.compress(open(good, "rb").read())
    result = run_pcc("--config", config, "--update-geoip", expect=0)
    assert f"installed {target}: DBIP-ASN-Lite" in result.stdout
    assert open(target, "rb").read() == open(good, "rb").read()
    from conftest import write_city_database
    list_server.files["/dbip-asn-lite.mmdb.gz"] = open(write_city_database(tmp_path / "city.mmdb"), "rb").read()
    result = run_pcc("--config", config, "--update-geoip", expect=1)
    assert "ASN update failed, the installed file is unchanged" in result.stderr
    assert "not an ASN database" in result.stderr and "Traceback" not in result.stderr
    assert open(target, "rb").read() == open(good, "rb").read()
