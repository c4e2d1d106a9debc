"""What follows a block beyond the answer (#22): webhooks to chat and incident
tools, against a real local HTTP receiver: every receiver gets every event,
signed; one that fails or is down gets it again later; one that hangs
delays no other and no caller; an event kept past its time is dropped, said."""
import base64
import datetime as dt
import hashlib
import hmac
import json
import logging
import time

import pytest
from conftest import free_port

from pcclib.respond import Webhooks, doveadm_mask_problem, encode_event, event


def hooks(make_settings, urls, secret="", **options):
    settings = make_settings(**{"notify.webhook_urls": ", ".join(urls), "notify.webhook_secret": secret})
    outcomes = []
    return Webhooks(settings, outcomes.append, **options), outcomes, settings


def outcomes_when(outcomes: list, count: int, timeout: float = 5.0) -> list:
    """The outcomes once there are `count` of them: the receiver has the body
    before the sender has read the answer and counted it."""
    deadline = time.monotonic() + timeout
    while len(outcomes) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    return list(outcomes)


def test_every_receiver_gets_every_event_signed(make_settings, receivers):
    one, two = receivers(), receivers()
    secret = "0123456789abcdef0123456789abcdef"
    webhooks, outcomes, settings = hooks(make_settings, [one.url, two.url], secret)
    sent = event(settings, "block", dt.datetime(2026, 11, 30, 3, 0), account="alice@example.com",
                 text="pcc blocked alice@example.com")
    webhooks.send(sent)
    for receiver in (one, two):
        ((headers, body),) = receiver.wait()
        assert json.loads(body) == json.loads(encode_event(sent))
        assert json.loads(body)["text"] == "pcc blocked alice@example.com"  # what chat bridges show
        expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        assert headers["X-Pcc-Signature"] == f"sha256={expected}"
        assert headers["Content-Type"] == "application/json"
    assert outcomes_when(outcomes, 2) == ["delivered", "delivered"]


def test_a_receiver_that_answers_500_gets_the_event_again(make_settings, receivers):
    failing = receivers(statuses=[500, 503])
    webhooks, outcomes, settings = hooks(make_settings, [failing.url], first_retry=0.1)
    webhooks.send(event(settings, "outage_start", dt.datetime(2026, 11, 30), text="down"))
    ((_headers, body),) = failing.wait()
    assert json.loads(body)["event"] == "outage_start"
    assert outcomes_when(outcomes, 3) == ["failed", "failed", "delivered"]


def test_a_receiver_down_for_a_while_gets_the_events_in_order_when_back(make_settings, receivers):
    port = free_port()
    webhooks, outcomes, settings = hooks(make_settings, [f"http://127.0.0.1:{port}/hook"], first_retry=0.2)
    for number in range(3):
        webhooks.send(event(settings, "block", dt.datetime(2026, 11, 30), number=number))
    time.sleep(1.0)  # refused, tried again, refused...
    assert webhooks.waiting() == 3 and "failed" in outcomes
    back = receivers(port=port)
    posts = back.wait(3)
    assert [json.loads(body)["number"] for _headers, body in posts] == [0, 1, 2]
    deadline = time.monotonic() + 5
    while webhooks.waiting():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_a_hanging_receiver_delays_no_other_and_no_caller(make_settings, receivers, monkeypatch):
    import pcclib.respond

    monkeypatch.setattr(pcclib.respond, "WEBHOOK_TIMEOUT", 1.0)
    hanging, working = receivers(hang=True), receivers()
    webhooks, outcomes, settings = hooks(make_settings, [hanging.url, working.url], first_retry=30, keep=5)
    started = time.monotonic()
    webhooks.send(event(settings, "block", dt.datetime(2026, 11, 30)))
    assert time.monotonic() - started < 0.1
    working.wait(timeout=2)
    assert time.monotonic() - started < 1.0  # not behind the hanging one
    deadline = time.monotonic() + 5
    while not {"failed", "dropped"} & set(outcomes):  # the hanging one timed out (and, kept 5 s, gave up)
        assert time.monotonic() < deadline, outcomes
        time.sleep(0.05)


def test_an_event_undelivered_for_too_long_is_dropped_with_an_error(make_settings, caplog):
    webhooks, outcomes, settings = hooks(make_settings, [f"http://127.0.0.1:{free_port()}/hook"], first_retry=0.2,
                                         keep=0.5)
    with caplog.at_level(logging.ERROR, logger="pcc"):
        webhooks.send(event(settings, "block", dt.datetime(2026, 11, 30)))
        deadline = time.monotonic() + 5
        while "dropped" not in outcomes:
            assert time.monotonic() < deadline, outcomes
            time.sleep(0.05)
    assert "undelivered for" in caplog.text and "is dropped" in caplog.text
    assert webhooks.waiting() == 0


def test_a_replay_tells_nobody_and_ends_no_session(make_settings, geoip, receivers):
    """--replay runs the daemon's own service: its would-be blocks reach no
    webhook, no owner and no Dovecot."""
    from conftest import counted_request

    from pcclib.replay import replay_service

    hook = receivers()
    settings = make_settings(**{"notify.webhook_urls": hook.url, "dovecot.doveadm_command": "doveadm",
                                "notify.notify_account": "yes", "mail.domains": "example.com"})
    service = replay_service(settings, geoip)
    now = dt.datetime(2026, 11, 30, 3, 0, tzinfo=dt.timezone.utc)
    for minute, country in enumerate(["GB", "US", "FR", "DE"]):
        answer = service.answer(counted_request(country), now + dt.timedelta(minutes=minute))
    assert answer.startswith("HOLD")
    deadline = time.monotonic() + 2
    while service.responder.backlog() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    assert hook.posts == []
    assert not service.responder.sessions.configured and not service.responder.settings.notify_account


def test_a_block_decided_during_an_outage_ends_the_sessions_at_once(make_settings, geoip, tmp_path):
    """The mail and the webhook wait for the database (another daemon may have
    made the same block); the thief's sessions do not."""
    from conftest import counted_request, daemon_parts

    from pcclib.storage import Store

    kicked = tmp_path / "kicked"
    doveadm = tmp_path / "doveadm"
    doveadm.write_text(f"#!/bin/sh\necho \"$@\" >> {kicked}\n")
    doveadm.chmod(0o755)
    settings = make_settings(**{"dovecot.doveadm_command": str(doveadm)})
    service = daemon_parts(settings, geoip=geoip).service
    now = dt.datetime(2026, 11, 30, 3, 0, tzinfo=dt.timezone.utc)
    for minute, country in enumerate(["GB", "US", "FR"]):
        assert service.answer(counted_request(country), now + dt.timedelta(minutes=minute)) == "DUNNO"
    service.database.store.dispose()
    service.database.store = Store(f"sqlite:///{tmp_path}/missing-directory/pcc.sqlite3", create_directory=False)
    assert service.answer(counted_request("DE"), now + dt.timedelta(minutes=5)).startswith("HOLD")
    assert service.database.outage.failing
    deadline = time.monotonic() + 5
    # The script's shell creates the file before echo writes its line: wait for the line.
    while not (kicked.exists() and kicked.read_text().endswith("\n")):
        assert time.monotonic() < deadline, "no session was ended"
        time.sleep(0.05)
    assert kicked.read_text() == "kick -- alice@example.com\n"


def test_while_dovecot_cannot_end_sessions_a_burst_of_blocks_does_not_queue_behind_it(make_settings, monkeypatch):
    """The first block tries for KICK_TRY_FOR; the next ones, within a minute,
    try once: their mails and webhooks are not held up 30 s each."""
    import pcclib.respond
    from pcclib.respond import SessionEnder

    monkeypatch.setattr(pcclib.respond, "KICK_TIMEOUT", 1.0)
    settings = make_settings(**{"dovecot.doveadm_url": f"http://127.0.0.1:{free_port()}/doveadm/v1",
                                "dovecot.doveadm_api_key": "a-key-for-the-test"})
    sessions = SessionEnder(settings)
    started = time.monotonic()
    assert sessions.end("alice@example.com", try_for=1.5)[0] is False  # refused, tried again, given up
    first = time.monotonic() - started
    started = time.monotonic()
    ended, why = sessions.end("bob@example.com", try_for=30)
    assert ended is False and "refused" in why.lower()
    assert first >= 1.0 and time.monotonic() - started < 0.5


@pytest.mark.parametrize("login", ["*", "*@example.com", "al?ce@example.com", "10.0.0.0/8", "127.0.0.1", "::",
                                   "[::1]", "2001:db8::/32", "fe80::1%eth0"])
def test_no_login_reaches_doveadm_as_a_mask(login):
    assert doveadm_mask_problem(login)


@pytest.mark.parametrize("login", ["alice@example.com", "-x", "alice", "1.2.3.4@example.com", "a/b@example.com"])
def test_an_ordinary_login_is_asked_of_doveadm(login):
    assert doveadm_mask_problem(login) == ""


def test_a_webhook_url_is_its_own_credential_and_no_log_line_shows_it(make_settings, receivers, caplog):
    """A chat hook's path token and a user:password are masked in every line
    (the password travels as HTTP basic authentication, as a browser would
    send it); the masking formatter has them too."""
    from pcclib.logs import mask_secrets, secrets_of

    receiver = receivers()
    url = receiver.url.replace("http://", "http://pcc:pa%40ss-w0rd@") + "/T01ABCDEF/B02GHIJKL/x9ZkQ3hV7tL2mN8pR4sW6yB1"
    webhooks, _outcomes, settings = hooks(make_settings, [url])
    with caplog.at_level(logging.INFO, logger="pcc"):
        assert webhooks.send_now(event(settings, "block", dt.datetime(2026, 11, 30), account="alice@example.com"))
    ((headers, _body),) = receiver.wait()
    assert headers["Authorization"] == "Basic " + base64.b64encode(b"pcc:pa@ss-w0rd").decode()
    logged = caplog.text
    assert "webhook http://***@127.0.0.1:" in logged and "/hook/T01ABCDEF/B02GHIJKL/***: block delivered" in logged
    for secret in ("pa%40ss-w0rd", "pa@ss-w0rd", "x9ZkQ3hV7tL2mN8pR4sW6yB1"):
        assert secret not in logged
        assert secret not in mask_secrets(f"an error naming {url}", secrets_of(settings))


def test_a_receiver_that_trickles_its_answer_is_cut_at_the_deadline(make_settings, monkeypatch):
    """WEBHOOK_TIMEOUT bounds all of one POST: a receiver sending a byte a
    second kept one for two minutes (each read had its own timeout)."""
    import socket
    import threading

    import pcclib.respond

    monkeypatch.setattr(pcclib.respond, "WEBHOOK_TIMEOUT", 1.0)
    listener = socket.create_server(("127.0.0.1", 0))

    def trickle():
        connection, _peer = listener.accept()
        with connection:
            connection.recv(65536)
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 120\r\n\r\n")
            for _ in range(120):
                try:
                    connection.sendall(b"x")
                except OSError:
                    return
                time.sleep(1.0)

    threading.Thread(target=trickle, daemon=True).start()
    webhooks, _outcomes, settings = hooks(make_settings, [f"http://127.0.0.1:{listener.getsockname()[1]}/hook"])
    started = time.monotonic()
    assert webhooks.send_now(event(settings, "block", dt.datetime(2026, 11, 30))) is False
    assert time.monotonic() - started < 3.0
    listener.close()


def test_the_blocks_waiting_for_their_actions_are_bounded(make_settings, monkeypatch):
    """A flood of made-up accounts, each blocked, while the actions are slow:
    the queue stops at RESPONDER_QUEUE_SIZE and says what it dropped."""
    import threading

    import pcclib.respond
    from pcclib.notify import Notifier

    monkeypatch.setattr(pcclib.respond, "RESPONDER_QUEUE_SIZE", 2)
    taken, release = threading.Event(), threading.Event()

    def slow(_self, _job):
        taken.set()
        release.wait(10)

    monkeypatch.setattr(pcclib.respond.Responder, "_do", slow)
    settings = make_settings()
    outcomes = []
    responder = pcclib.respond.Responder(settings, Notifier(settings), lambda *outcome: outcomes.append(outcome))
    responder.end_sessions_soon("first@example.com", "REJECT")
    assert taken.wait(5)
    for number in range(4):
        responder.end_sessions_soon(f"made-up-{number}@example.com", "REJECT")
    assert outcomes == [("responder", "dropped")] * 2 and responder.backlog() == 2
    release.set()
    deadline = time.monotonic() + 5  # drained while _do is the test's: no Postfix command runs in a later test
    while responder.backlog() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)  # the last job taken off the queue returns from slow()


def test_the_mails_waiting_for_the_smtp_server_are_bounded(make_settings, monkeypatch, caplog):
    import pcclib.notify
    from pcclib.notify import Notifier

    monkeypatch.setattr(pcclib.notify, "OUTBOX_SIZE", 3)
    settings = make_settings(**{"mail.notice": "admin@example.com", "mail.mailsrv": "127.0.0.1",
                                "mail.mailport": str(free_port())})  # nobody listens: every try fails
    notifier = Notifier(settings, first_backoff=60.0)
    with caplog.at_level(logging.ERROR, logger="pcc"):
        for number in range(5):
            notifier.send(f"pcc: block {number}", "text")
    assert notifier.backlog()[0] == 3
    assert caplog.text.count("dropped (3 wait for the SMTP server)") == 2


def test_an_ipv6_receiver_without_a_port_is_reached_on_its_address():
    """http.client reads a bare IPv6 host's last group as a port: pcc gives
    the scheme's port itself (here nothing listens on [::1]:80, or something
    answers; never a name that does not resolve)."""
    import socket

    from pcclib.respond import NETWORK_ERRORS, post_within

    try:
        post_within("http://[::1]/hook", b"{}", {}, 2.0)
    except NETWORK_ERRORS as error:
        assert not isinstance(error, socket.gaierror), error


def test_what_a_url_shows_and_what_it_hides():
    from pcclib.common import url_for_people, url_secrets

    url = "https://u:p%40ss@h.example:8443/services/T0001/x9ZkQ3hV7tL2mN8pR4sW6yB1?key=abc123#frag-secret"
    assert url_for_people(url) == "https://***@h.example:8443/services/T0001/***?***#***"
    assert {"p@ss", "p%40ss", "key=abc123", "frag-secret", "x9ZkQ3hV7tL2mN8pR4sW6yB1"} <= set(url_secrets(url))
    public = "https://raw.githubusercontent.com/X4BNet/lists_vpn/main/output/datacenter/ipv4.txt"
    assert url_for_people(public) == public and url_secrets(public) == []


@pytest.mark.parametrize("doveadm_here, dovecot_settings, named", [
    (False, {}, False),  # no Dovecot anywhere: the mail names no sessions
    (True, {}, True),  # Dovecot on this host, pcc not set up to end sessions: the mail says how
    (False, {"dovecot.doveadm_command": "doveadm"}, True),
])
def test_the_block_mail_names_dovecot_sessions_only_on_a_site_with_dovecot(make_settings, monkeypatch,
                                                                           doveadm_here, dovecot_settings, named):
    import pcclib.respond
    from pcclib.decision import CountrySeen
    from pcclib.notify import Notifier

    monkeypatch.setattr(pcclib.respond, "DOVEADM", "doveadm" if doveadm_here else "no-such-doveadm-here")
    monkeypatch.setattr(pcclib.respond.SessionEnder, "end", lambda _self, _login, _try_for: (True, "ended"))
    settings = make_settings(**dovecot_settings)
    responder = pcclib.respond.Responder(settings, Notifier(settings), lambda *outcome: None)
    sessions = responder._end_sessions("alice@example.com", "REJECT")
    seen = CountrySeen("GB", dt.datetime(2026, 12, 1), dt.datetime(2026, 12, 1), "81.2.69.160")
    _subject, body = responder._block_mail("alice@example.com", [seen], "4 of at most 3 countries", "policy",
                                           "REJECT", None, sessions)
    text = pcclib.respond.block_event(settings, "alice@example.com", [seen], "4 of at most 3 countries", "policy",
                                      "REJECT", sessions, dt.datetime(2026, 12, 1))["text"]
    assert ("Sessions:" in body) is named and ("Sessions:" in text) is named
    if not named:
        assert "Dovecot" not in body and "doveadm" not in body + text and sessions == ""
