"""Configuration: every key present, every value checked, one clear line on error."""
import os
import pathlib
import pwd
import shutil
import subprocess

import pytest
import sqlalchemy as sa
from conftest import ROOT, config_without, free_port, run_pcc, write_config


def test_missing_key_stops_the_daemon_with_one_line_and_non_zero_exit(tmp_path):
    result = run_pcc("-d", "--config", config_without(tmp_path, "policy", "action"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "broken.conf: [policy] action: key is missing" in result.stderr


def test_missing_file_and_garbage_file(tmp_path):
    result = run_pcc("-d", "--config", str(tmp_path / "nope.conf"))
    assert result.returncode == 2 and "nope.conf: cannot read the configuration" in result.stderr
    garbage = tmp_path / "garbage.conf"
    garbage.write_bytes(b"\xff\xfe not ini at all\n")
    result = run_pcc("-d", "--config", str(garbage))
    assert result.returncode == 2 and "garbage.conf" in result.stderr and "Traceback" not in result.stderr


def test_check_config_command(tmp_path, city_geoip_path):
    result = run_pcc("--check-config", "--config", str(ROOT / "pcc.conf"))
    assert result.returncode == 0 and "OK" in result.stdout
    assert "rule: more than 3 countries in 3 days -> HOLD" in result.stdout
    assert "impossible travel" not in result.stdout and "MONITOR" not in result.stdout
    both = write_config(tmp_path, {"policy.mode": "monitor", "policy.max_travel_speed_kmh": "900",
                                   "geoip.database": city_geoip_path}, name="both.conf")
    result = run_pcc("--check-config", "--config", both)
    assert result.returncode == 0, result.stderr
    assert "impossible travel: faster than 900 km/h -> notify" in result.stdout
    assert "MONITOR MODE: new blocks are only recorded and notified, mail flows" in result.stdout
    country_only = write_config(tmp_path, {"policy.max_travel_speed_kmh": "900"}, name="country.conf")
    result = run_pcc("--check-config", "--config", country_only)
    assert result.returncode == 2
    assert "[policy] max_travel_speed_kmh: needs City-level GeoIP data" in result.stderr


def test_help_explains_every_option():
    result = run_pcc("-h")
    assert result.returncode == 0
    for option in ("-d", "--config", "-v", "--stderr", "--check-config", "--allow", "--country", "--days"):
        assert option in result.stdout


# Several PostgreSQL hosts, as a standby's failover needs them: the forms
# SQLAlchemy and libpq take, and those refused with the form to write instead.
PG = "postgresql+psycopg://postgres@"
FORMS_REFUSED = {
    f"{PG}/test?host=127.0.0.1:5440,127.0.0.1:5432": "which libpq cannot resolve; several PostgreSQL hosts go in "
                                                     "the query: ?host=a:5432&host=b:5432",
    f"{PG}127.0.0.1:5440,127.0.0.1:5432/test": "has a port that is not a number; several PostgreSQL hosts go in "
                                               "the query",
    f"{PG}/test?host=127.0.0.1:5440&host=127.0.0.1:5432": "without target_session_attrs=read-write",
    f"{PG}/test?host=127.0.0.1,127.0.0.1&port=5440,5432": "without target_session_attrs=read-write",
    f"{PG}127.0.0.1/test?prepare_threshold=never": "has prepare_threshold=never is neither none nor a count",
    "mysql+pymysql://root@127.0.0.1/test?prepare_threshold=none": "which only postgresql+psycopg:// takes",
    # Drivers pcc does not install: named, with the forms to write (was a traceback at the daemon's start).
    "mysql+mysqldb://root@127.0.0.1/test": "uses mysql+mysqldb://, which pcc has no driver for: write sqlite:",
    "postgresql+psycopg2://postgres@127.0.0.1/test": "uses postgresql+psycopg2://, which pcc has no driver for",
    "oracle://scott@127.0.0.1/orcl": "uses oracle://, which pcc has no driver for",
}
# The schemes admins copy from other tools, taken as the drivers pcc installs.
FORMS_TAKEN = {"postgres": "postgresql+psycopg", "postgresql": "postgresql+psycopg", "mysql": "mysql+pymysql",
               "mariadb": "mysql+pymysql"}


def test_every_database_url_form_is_taken_or_refused_in_one_line_by_check_config_and_the_daemon(tmp_path):
    for n, (url, problem) in enumerate(FORMS_REFUSED.items()):
        config = write_config(tmp_path, {"db.dbcon": url}, name=f"form{n}.conf")
        for command in ("--check-config", "-d"):
            result = run_pcc(command, "--config", config, timeout=30)
            assert result.returncode == 2, (url, result.stdout, result.stderr)
            assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr, result.stderr
            assert "[db] dbcon: " in result.stderr and problem in result.stderr, result.stderr


def test_check_config_connect_says_which_server_answered_and_whether_it_takes_writes(tmp_path, postgresql_url,
                                                                                     shared_db_url):
    """With a dead first host, libpq goes on to the next; --connect says which
    one answered.  On each server database: reached, takes writes."""
    url = sa.engine.make_url(postgresql_url)
    several = (f"{url.drivername}://{url.username}@/{url.database}?host=127.0.0.1:{free_port()}"
               f"&host=127.0.0.1:{url.port}&target_session_attrs=read-write")
    config = write_config(tmp_path, {"db.dbcon": several}, name="several.conf")
    result = run_pcc("--check-config", "--connect", "--config", config, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "database reached: PostgreSQL " in result.stdout and f" at 127.0.0.1:{url.port}; it takes writes" \
        in result.stdout
    config = write_config(tmp_path, {"db.dbcon": shared_db_url}, name="shared.conf")
    result = run_pcc("--check-config", "--connect", "--config", config, timeout=60)
    assert result.returncode == 0 and "database reached: " in result.stdout and "it takes writes" in result.stdout
    down = write_config(tmp_path, {"db.dbcon": f"{url.drivername}://{url.username}@127.0.0.1:{free_port()}/x"},
                        name="down.conf")
    result = run_pcc("--check-config", "--connect", "--config", down, timeout=60)
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "the database cannot be used as the daemon uses it: OperationalError" in result.stderr


def test_check_config_connect_follows_no_link_to_the_sqlite_file(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (tmp_path / "pcc.sqlite3").symlink_to(victim)
    config = write_config(tmp_path, {"db.dbcon": f"sqlite:///{tmp_path}/pcc.sqlite3"}, name="linked.conf")
    result = run_pcc("--check-config", "--connect", "--config", config, timeout=60)
    assert result.returncode == 1 and "is a symbolic link; pcc does not follow links" in result.stderr
    assert victim.read_text() == "precious\n" and not (tmp_path / "pcc.sqlite3-wal").exists()


def test_the_database_url_schemes_of_other_tools_are_taken_as_pccs_drivers(tmp_path, postgresql_url, mariadb_url):
    for n, (scheme, driver) in enumerate(FORMS_TAKEN.items()):
        url = postgresql_url if driver.startswith("postgresql") else mariadb_url
        written = scheme + "://" + url.partition("://")[2]
        config = write_config(tmp_path, {"db.dbcon": written}, name=f"taken{n}.conf")
        result = run_pcc("--check-config", "--connect", "--config", config, timeout=60)
        assert result.returncode == 0, (written, result.stderr)
        assert f"database {driver}://" in result.stdout and "it takes writes" in result.stdout, result.stdout


def test_check_config_run_as_root_checks_as_the_daemons_user(tmp_path, geoip_path, shared_dir):
    """What the daemon would trip over at its start, as its user: found from
    the owner of pcc's state (or --user), one line each, exit 1."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    shared = shared_dir
    state = pathlib.Path(shared, "state")
    state.mkdir()
    nobody = pwd.getpwnam("nobody")
    os.chown(state, nobody.pw_uid, nobody.pw_gid)
    geoip = pathlib.Path(shared, "country.mmdb")
    shutil.copy(geoip_path, geoip)
    os.chmod(geoip, 0o644)
    values = {"db.dbcon": f"sqlite:///{state}/pcc.sqlite3", "db.spool_file": f"{state}/spool",
              "geoip.database": str(geoip)}
    config = write_config(pathlib.Path(shared), values)
    os.chmod(config, 0o644)
    result = run_pcc("--check-config", "--config", config)
    assert result.returncode == 0, result.stderr
    assert f"checked as user nobody (the owner of {state}): configuration readable, names resolve, files " \
           "readable, state writable; the database was not asked (add --connect)" in result.stdout
    # the mistakes a root's --check-config used to call OK
    os.chmod(geoip, 0o600)
    typo = write_config(pathlib.Path(shared), {**values, "server.host": "127.0.0.l",
                                               "db.spool_file": f"{shared}/spool"}, name="typo.conf")
    os.chmod(typo, 0o600)
    result = run_pcc("--check-config", "--config", typo)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"{typo}: cannot be read: Permission denied (pcc.conf is root:pcc, mode 640, in the Debian package)",
        f"{typo}: [server] host '127.0.0.l' does not resolve: Name or service not known",
        f"{typo}: [geoip] database {geoip}: cannot be read: Permission denied",
        # the daemon's own line for it, with the command that fixes it
        f"{typo}: {shared} is owned by root and not writable by user nobody (left by a run as root?): "
        f"chown -R nobody:nogroup {shared}",
    ], result.stderr
    # --connect: the SQLite file opened for writing, as nobody
    import sqlite3

    os.chmod(geoip, 0o644)
    sqlite3.connect(state / "pcc.sqlite3").execute("CREATE TABLE t (a)")
    os.chown(state / "pcc.sqlite3", nobody.pw_uid, nobody.pw_gid)
    result = run_pcc("--check-config", "--connect", "--config", config)
    assert result.returncode == 0, result.stderr
    assert f"database reached: SQLite file {state}/pcc.sqlite3; it takes writes" in result.stdout
    assert f"checked as user nobody (the owner of {state}/pcc.sqlite3)" in result.stdout
    assert all(path.owner() == "nobody" for path in state.iterdir())  # root left nothing of its own there
    os.unlink(state / "pcc.sqlite3")
    # named with --user; as that user, --connect opens the database too
    result = run_pcc("--check-config", "--connect", "--user", "root", "--config", config)
    assert result.returncode == 0, result.stderr
    assert "checked as user root (--user)" in result.stdout
    assert "the SQLite file" in result.stdout and "is not there yet" in result.stdout
    result = run_pcc("--check-config", "--user", "no-such-user-pcc", "--config", config)
    assert result.returncode == 1 and f"{config}: no user 'no-such-user-pcc' on this host" in result.stderr


def test_check_config_as_a_uid_without_a_passwd_entry_names_it_by_number(as_nobody, shared_dir):
    """A container's daemon may run under a bare uid: --check-config run by it
    checks as itself and names it "uid N" (was a KeyError traceback)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv")
    uid = 54321
    try:
        pwd.getpwuid(uid)
        pytest.skip(f"uid {uid} has a passwd entry here")
    except KeyError:
        pass
    shared = shared_dir
    state = pathlib.Path(shared, "state")
    state.mkdir()
    os.chown(state, uid, uid)
    config = write_config(pathlib.Path(shared), {"db.dbcon": f"sqlite:///{state}/pcc.sqlite3",
                                                 "db.spool_file": f"{state}/spool"})
    os.chmod(config, 0o644)
    command = as_nobody(["--check-config", "--config", config], shared)
    assert command[:4] == ["runuser", "-u", "nobody", "--"]
    command[:4] = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert f"checked as user uid {uid} (this user): configuration readable" in result.stdout
