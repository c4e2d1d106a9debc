"""When an account is blocked (#22), beyond the answer: the on-call team's
webhook (signed, with what was done and how to undo it), the administrators'
mail saying what happened to the account's sessions, and the account's owner
told once a day; in monitor mode all of it says "would have"."""
import hashlib
import hmac
import json

from conftest import ip_in, pcc_command, wait_until_visible, walk

SECRET = "5b1f0c2e9d7a4e3f8a6b1c0d2e3f4a5b"


def responding_daemon(start_daemon, sqlite_url, smtp_sink, hook, **overrides):
    return start_daemon(**{
        "db.dbcon": sqlite_url, "policy.action": "HOLD", "mail.notice": "admin@example.com",
        "mail.mailsrv": "127.0.0.1", "mail.mailport": smtp_sink.port, "mail.domains": "example.com",
        "notify.webhook_urls": hook.url, "notify.webhook_secret": SECRET, "notify.notify_account": "yes",
        **overrides})


def test_a_block_reaches_the_webhook_the_admins_and_the_owner(start_daemon, sqlite_url, smtp_sink, receivers):
    hook = receivers()
    daemon = responding_daemon(start_daemon, sqlite_url, smtp_sink, hook)
    assert walk(daemon.client(), "alice@example.com", ["GB", "US", "FR", "DE"])[-1].startswith("HOLD")

    ((headers, body),) = hook.wait()
    assert headers["X-Pcc-Signature"] == "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    block = json.loads(body)
    assert (block["event"], block["account"], block["action"], block["mode"], block["would_have"]) == (
        "block", "alice@example.com", "HOLD", "enforce", False)
    assert sorted(seen["country"] for seen in block["countries"]) == ["DE", "FR", "GB", "US"]
    assert {seen["last_ip"] for seen in block["countries"]} == {ip_in(c) for c in ("GB", "US", "FR", "DE")}
    assert block["door"] == "policy" and "4 of at most 3 countries" in block["reason"]
    assert "not ended" in block["sessions"] and "doveadm kick -- alice@example.com" in block["sessions"]
    assert block["undo"] and block["undo"][0].endswith("-u alice@example.com")
    assert block["text"].startswith("pcc blocked alice@example.com (HOLD)")

    mails = {tuple(recipients): message for recipients, message in smtp_sink.wait_for(2)}
    admins = mails[("admin@example.com",)].get_content()
    assert "Sessions: its Dovecot sessions were not ended" in admins
    owner = mails[("alice@example.com",)]
    assert owner["Subject"] == "Sending from your mail account was stopped"
    assert "DE, FR, GB, US" in owner.get_content() and "admin@example.com" in owner.get_content()

    # Unblocked by an administrator: the webhook says so.  Blocked again the
    # same day: the owner is not told twice.
    pcc_command(daemon.config_path, "-u", "alice@example.com")
    assert json.loads(hook.wait(2)[1][1])["event"] == "unblock"
    wait_until_visible()
    assert walk(daemon.client(), "alice@example.com", ["SE", "JP", "BR", "CN"])[-1].startswith("HOLD")
    assert json.loads(hook.wait(3)[2][1])["event"] == "block"
    smtp_sink.wait_for(4)  # the unblock's mail to the admins and the second block's
    assert [recipients for recipients, _message in smtp_sink.messages].count(["alice@example.com"]) == 1


def test_monitor_mode_says_what_would_have_been_done(start_daemon, sqlite_url, smtp_sink, receivers):
    hook = receivers()
    daemon = responding_daemon(start_daemon, sqlite_url, smtp_sink, hook, **{"policy.mode": "monitor"})
    assert walk(daemon.client(), "bob@example.com", ["GB", "US", "FR", "DE"]) == ["DUNNO"] * 4
    block = json.loads(hook.wait()[0][1])
    assert block["would_have"] is True and block["action"] is None and block["mode"] == "monitor"
    assert block["text"].startswith("pcc would have blocked bob@example.com")
    assert block["sessions"] == "monitor mode: nothing was done"
    ((recipients, mail),) = smtp_sink.wait_for(1)
    assert recipients == ["admin@example.com"] and "would be blocked" in mail["Subject"]  # the owner is not told
