#!/usr/bin/env python3
"""Fuzz pcc's whole request path with atheris (run by hand, not in CI).

Each input is what a client could send on one connection.  It goes through a
real socket pair into pcc's connection handler (reading, limits, parsing,
GeoIP, the decision, SQLite storage) and every reply must be one well-formed
`action=...` line.  Any exception that escapes, or a malformed reply, stops the
run with the input saved as a crash file.

    .venv/bin/pip install atheris
    .venv/bin/python fuzz/fuzz_request.py -max_total_time=600 -max_len=65536

Uses a throw-away SQLite file, and the GeoLite2-City 2015 data that .ci/run
installs with the impossible-travel rule on (else the embedded country data).
"""
import logging
import os
import socket
import sys
import tempfile
import threading

import atheris

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

with atheris.instrument_imports():
    from pcclib.config import load_settings
    from pcclib.geoip import GeoIP
    from pcclib.logs import setup_logging
    from pcclib.notify import Notifier
    from pcclib.server import InFlight, PolicyHandler, PolicyServer
    from pcclib.daemon import build_parts
    from pcclib.storage import Store
    from pcclib.common import log

WORKDIR = tempfile.mkdtemp(prefix="pcc-fuzz-")
SEEDS = [
    b"request=smtpd_access_policy\nsasl_username=alice@example.com\nclient_address=81.2.69.160\n\n",
    b"request=smtpd_access_policy\nsasl_username=a@b\nclient_address=::ffff:8.8.8.8\n\n" * 3,
    b"request=smtpd_access_policy\r\nsasl_username=\xff\xfe@x\r\nclient_address=unknown\r\n\r\n",
    # Princeton, then Stanford: one country, an impossible journey
    b"request=smtpd_access_policy\nsasl_username=t@x\nclient_address=128.112.0.1\n\n"
    b"request=smtpd_access_policy\nsasl_username=t@x\nclient_address=171.64.0.1\n\n",
]


def build() -> PolicyServer:
    config = os.path.join(WORKDIR, "conf")
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "conf")) as shipped:
        text = shipped.read()
    replacements = {
        "dbcon = sqlite:////var/lib/pcc/sqlite3": f"dbcon = sqlite:///{WORKDIR}/sqlite3",
        "spool_file = /var/lib/pcc/spool.jsonl": "spool_file =",
        "port = 9999": "port = 39999",
        "idle_timeout = 600": "idle_timeout = 1",
        "max_request_bytes = 65536": "max_request_bytes = 4096",
        "how_many_different_countries = 3": "how_many_different_countries = 1",
    }
    city = city_database()
    if city:  # places too: the impossible-travel rule is on, and blocks
        replacements.update({"database =\n": f"database = {city}\n",
                             "max_travel_speed_kmh =\n": "max_travel_speed_kmh = 1000\n",
                             "impossible_travel_action = notify": "impossible_travel_action = block"})
    for old, new in replacements.items():
        text = text.replace(old, new)
    with open(config, "w") as out:
        out.write(text)
    settings = load_settings(config)
    service = build_parts(settings, Store(settings.dbcon), GeoIP(settings.geoip_database), Notifier(settings)).service
    service.database.ensure()
    server = PolicyServer.__new__(PolicyServer)  # no listening socket needed
    server.settings, server.service = settings, service
    server.stopping = threading.Event()
    server.in_flight = InFlight()
    server.init_bounds(64, "connections")
    return server


def city_database() -> str:
    """The GeoLite2-City 2015 file that .ci/run installs, if it is here."""
    try:
        import _geoip_geolite2
    except ImportError:
        return ""
    return os.path.join(os.path.dirname(_geoip_geolite2.__file__), "GeoLite2-City.mmdb")


SERVER = None


def one_input(data: bytes) -> None:
    client, served = socket.socketpair()
    try:
        client.sendall(data)
        client.shutdown(socket.SHUT_WR)
        PolicyHandler(served, ("127.0.0.1", 4242), SERVER)  # runs setup/handle/finish
        served.close()
        replies = b""
        while True:
            chunk = client.recv(65536)
            if not chunk:
                break
            replies += chunk
    finally:
        client.close()
        served.close()
    for reply in replies.split(b"\n\n")[:-1]:
        if not reply.startswith(b"action=") or b"\n" in reply or b"\r" in reply:
            raise AssertionError(f"malformed reply {reply!r}")
    if replies and not replies.endswith(b"\n\n"):
        raise AssertionError(f"reply not terminated: {replies[-80:]!r}")


def main() -> None:
    global SERVER
    setup_logging(False, True)
    log.setLevel(logging.CRITICAL)  # the fuzzer's own output is what matters
    SERVER = build()
    corpus = os.path.join(WORKDIR, "corpus")
    os.makedirs(corpus, exist_ok=True)
    for index, seed in enumerate(SEEDS):
        with open(os.path.join(corpus, f"seed{index}"), "wb") as out:
            out.write(seed)
    atheris.Setup(sys.argv + [corpus], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
