"""[server] socket: the policy service on a UNIX-domain socket beside the TCP
port, as Postfix reaches it from its (chrooted) queue directory.  The real
Postfix test is in test_postfix.py; these are the daemon's side: the same
answers, the owner, group and mode given, what is left at the path, a reload
and a stop."""
import grp
import os
import pathlib
import signal
import stat
import subprocess
import sys
import time

import pytest
from conftest import ROOT, PolicyClient, free_port, ip_in, run_pcc, wait_for_log, walk, write_config


def socket_settings(tmp_path, **more) -> dict:
    directory = tmp_path / "spool"
    directory.mkdir(exist_ok=True)
    return {"server.socket": str(directory / "policy"), "policy.action": "REJECT", **more}


def test_the_socket_answers_like_the_port_with_the_owner_group_and_mode_given(start_daemon, tmp_path):
    group = "mail" if os.geteuid() == 0 else grp.getgrgid(os.getegid()).gr_name  # root: another group than its own
    settings = socket_settings(tmp_path, **{"server.socket_group": group, "server.socket_mode": "0620"})
    daemon = start_daemon(**settings)
    path = settings["server.socket"]
    status = os.lstat(path)
    assert stat.S_ISSOCK(status.st_mode) and stat.S_IMODE(status.st_mode) == 0o620
    assert (status.st_uid, grp.getgrgid(status.st_gid).gr_name) == (os.geteuid(), group)
    assert f"and socket {path}" in daemon.log()
    # one account, one count, whichever way Postfix asks
    over_socket, over_port = PolicyClient(path=path), daemon.client()
    assert walk(over_socket, "alice@example.com", ["GB", "US"]) == ["DUNNO", "DUNNO"]
    assert over_port.ask("alice@example.com", ip_in("FR")) == "DUNNO"
    assert over_socket.ask("alice@example.com", ip_in("DE")).startswith("REJECT")
    assert over_port.ask("alice@example.com", ip_in("GB")).startswith("REJECT")
    # --health may ask through the socket: its peers are this host
    assert "database=ok" in over_socket.ask(request="pcc_health")
    # a reload keeps the socket
    os.kill(daemon.process.pid, signal.SIGHUP)
    wait_for_log(daemon, "reloaded")
    assert PolicyClient(path=path).ask("bob@example.com", ip_in("GB")) == "DUNNO"
    # a stop removes it
    daemon.stop()
    assert daemon.process.returncode == 0
    assert not os.path.lexists(path)


def test_a_socket_left_by_a_killed_daemon_is_replaced(start_daemon, tmp_path):
    settings = socket_settings(tmp_path)
    first = start_daemon(**settings)
    first.process.kill()
    first.process.wait()
    path = settings["server.socket"]
    assert stat.S_ISSOCK(os.lstat(path).st_mode)  # left behind, nobody answering
    start_daemon(**settings)  # a second port, the same socket
    assert PolicyClient(path=path).ask("alice@example.com", ip_in("GB")) == "DUNNO"


def start_refused(tmp_path, settings: dict) -> str:
    """pcc.py -d with these settings must exit 1 with one line: that line."""
    config = write_config(tmp_path, {"db.dbcon": "sqlite:///:memory:", **settings}, name="refused.conf")
    result = subprocess.run([sys.executable, str(ROOT / "pcc.py"), "-d", "--stderr", "--config", config],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if "cannot listen" in line]
    return line


def test_what_is_at_the_path_is_never_removed_unless_it_is_a_dead_socket(start_daemon, tmp_path):
    settings = socket_settings(tmp_path)
    path = settings["server.socket"]
    running = start_daemon(**settings)
    assert f"another process answers on {path} (a pcc still running?)" in start_refused(tmp_path, settings)
    assert PolicyClient(path=path).ask("alice@example.com", ip_in("GB")) == "DUNNO"  # the first one's, untouched
    running.stop()
    for make in (lambda: open(path, "w").write("a file of somebody's"), lambda: os.symlink("/etc/passwd", path)):
        make()
        line = start_refused(tmp_path, settings)
        assert f"cannot listen on {path}: {path} exists and is not a socket; pcc removes nothing it did not make" \
            in line
        assert os.path.lexists(path)
        os.unlink(path)
    missing = str(tmp_path / "nowhere" / "policy")
    assert f"the directory {tmp_path}/nowhere does not exist (make it" in start_refused(
        tmp_path, {**settings, "server.socket": missing})


def test_an_unprivileged_daemon_cannot_give_its_socket_away(as_nobody, shared_dir):
    shared = shared_dir
    os.chmod(shared, 0o777)
    config = write_config(pathlib.Path(shared), {
        "server.port": free_port(), "server.socket": f"{shared}/policy", "server.socket_owner": "root",
        "db.dbcon": f"sqlite:///{shared}/pcc.sqlite3", "db.spool_file": ""})
    os.chmod(config, 0o644)
    result = subprocess.run(as_nobody(["-d", "--stderr", "--config", config], shared),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert f"cannot listen on {shared}/policy: cannot give it owner root, group (unchanged): " \
           "Operation not permitted (pcc runs as uid 65534: only root gives a socket to another owner" \
           in result.stderr
    assert "Traceback" not in result.stderr
    assert not os.path.lexists(f"{shared}/policy")  # nothing left half made


@pytest.mark.parametrize("key, value, message", [
    ("socket", "pcc/policy", "[server] socket: must be an absolute path (Postfix's unix:NAME is relative to its "
                             "queue directory, pcc's is not), got 'pcc/policy'"),
    ("socket_group", "no-such-group-pcc", "[server] socket_group: no group 'no-such-group-pcc' on this host"),
    ("socket_owner", "no-such-user-pcc", "[server] socket_owner: no user 'no-such-user-pcc' on this host"),
    ("socket_mode", "rw-rw----", "[server] socket_mode: must be an octal file mode such as 0660, got 'rw-rw----'"),
    ("socket", "/" + "x" * 120, "[server] socket: is longer than the 107 bytes a UNIX-domain socket's path may have"),
])
def test_socket_settings_are_checked_with_one_line(tmp_path, key, value, message):
    settings = {"server.socket": str(tmp_path / "policy"), f"server.{key}": value}
    result = run_pcc("--check-config", "--config", write_config(tmp_path, settings))
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert result.stderr.strip().count("\n") == 0


def test_the_socket_alone_with_port_0(tmp_path, geoip_path):
    """port = 0: no TCP port; Postfix and --health reach pcc through the socket."""
    settings = socket_settings(tmp_path, **{"server.port": "0", "db.dbcon": f"sqlite:///{tmp_path}/pcc.sqlite3",
                                            "db.spool_file": "", "geoip.database": geoip_path})
    config = write_config(tmp_path, settings, name="socket-only.conf")
    log_path = tmp_path / "socket-only.log"
    with open(log_path, "wb") as log_file:
        daemon = subprocess.Popen([sys.executable, str(ROOT / "pcc.py"), "-d", "--stderr", "--config", config],
                                  stdout=log_file, stderr=log_file)
    try:
        path = settings["server.socket"]
        deadline = time.monotonic() + 30
        while not os.path.exists(path):
            assert daemon.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        client = PolicyClient(path=path)
        assert walk(client, "alice@example.com", ["GB", "US", "FR", "DE"])[-1].startswith("REJECT")
        health = run_pcc("--config", config, "--health")
        assert health.returncode == 0 and health.stdout.startswith("PCC OK"), health.stdout
        assert f"listening on socket {path}; database" in log_path.read_text()
    finally:
        daemon.terminate()
        assert daemon.wait(timeout=30) == 0, log_path.read_text()
    assert not os.path.lexists(path)
    stopped = run_pcc("--config", config, "--health")
    assert stopped.returncode == 2 and stopped.stdout.startswith(f"PCC CRITICAL - no answer from {path} within")
