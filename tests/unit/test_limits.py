"""Volume limits ([limits]): the rule (decide(), pure, the volume given) and
the ledger that counts messages and recipients (volume.VolumeLedger), shared
between daemons through a real database on SQLite, MariaDB and PostgreSQL."""
import datetime as dt

import pytest
from conftest import counted_request, policy_request

from pcclib.common import replaced
from pcclib.decision import AccountHistory, CountrySeen, Volume, decide
from pcclib.protocol import parse_request
from pcclib.storage import Store
from pcclib.volume import VolumeLedger

NOW = dt.datetime(2026, 3, 10, 12, 0, 30, tzinfo=dt.timezone.utc)


def over(messages_hour=0, messages_day=0, recipients_hour=0, recipients_day=0, notified=frozenset()):
    return AccountHistory(volume=Volume(messages_hour, messages_day, recipients_hour, recipients_day, notified))


@pytest.fixture
def limited(make_settings):
    def make(action="block", **extra):
        return make_settings(limits__messages_per_hour="100", limits__recipients_per_day="1000",
                             limits__action=action, **extra)
    return make


def test_under_every_limit_the_account_sends(limited):
    decision = decide(counted_request("GB"), over(100, 100, 300, 1000), limited(), NOW)
    assert decision.action == "DUNNO" and not decision.limit_hit


def test_over_a_limit_blocks_with_the_whole_picture(limited):
    decision = decide(counted_request("GB"), over(101, 150, 300, 400), limited(), NOW)
    assert decision.new_block and decision.blocks and decision.rule == "limit"
    assert decision.limit_hit == "messages_per_hour"
    assert decision.reason == ("blocking: 101 messages in the last hour (limit 100); 400 recipients in the last "
                               "24 hours (limit 1000); 1 country in 3 days (GB)")


def test_over_a_limit_defers_without_a_block(limited):
    decision = decide(counted_request("GB"), over(1, 1, 1001, 1001), limited("defer"), NOW)
    assert decision.action == ("DEFER_IF_PERMIT 1001 recipients in the last 24 hours (limit 1000): "
                               "try again later")
    assert not decision.new_block and not decision.blocks and decision.limit_hit == "recipients_per_day"


def test_over_a_limit_notifies_once_per_window(limited):
    settings = limited("notify")
    told = decide(counted_request("GB"), over(101, 101), settings, NOW)
    assert told.action == "DUNNO" and told.notify_limit.startswith("101 messages in the last hour (limit 100)")
    again = decide(counted_request("GB"), over(102, 102, notified=frozenset({"messages_per_hour"})), settings, NOW)
    assert again.action == "DUNNO" and not again.notify_limit and again.limit_hit == "messages_per_hour"


def test_monitor_mode_only_flags_or_warns(limited):
    flagged = decide(counted_request("GB"), over(101, 101), limited(policy__mode="monitor"), NOW)
    assert flagged.action == "DUNNO" and flagged.new_block and "would block (monitor mode)" in flagged.reason
    warned = decide(counted_request("GB"), over(101, 101),
                    limited("defer", policy__mode="monitor", policy__monitor_answer="warn"), NOW)
    assert warned.action.startswith("WARN pcc would defer: 101 messages in the last hour") and not warned.blocks


def test_a_blocked_account_stays_blocked_under_its_limits(limited):
    history = replaced(over(), blocked_since=NOW - dt.timedelta(days=1), block_action="REJECT")
    assert decide(counted_request("GB"), history, limited("notify"), NOW).blocks


def test_a_country_block_names_the_volume_too(limited):
    seen = tuple(CountrySeen(code, NOW - dt.timedelta(hours=1), NOW - dt.timedelta(hours=1), "192.0.2.1")
                 for code in ("FR", "DE", "US"))
    history = replaced(over(40, 90, 300, 500), sightings=seen)
    decision = decide(counted_request("GB"), history, limited(), NOW)
    assert decision.rule == "countries"
    assert decision.reason.endswith("(FR, DE, US, GB); 40 messages in the last hour (limit 100); "
                                    "500 recipients in the last 24 hours (limit 1000)")


def test_no_limits_no_volume_words(make_settings):
    decision = decide(counted_request("GB"), AccountHistory(), make_settings(), NOW)
    assert decision.action == "DUNNO" and "messages" not in decision.reason


# --- the ledger -------------------------------------------------------------


def request(login="alice@example.com", instance="m1", state="RCPT", **extra):
    attributes = policy_request(login, instance=instance, protocol_state=state, **extra)
    return parse_request(f"{name}={value}" for name, value in attributes.items())


def test_a_message_is_one_transaction_and_each_rcpt_a_recipient():
    ledger = VolumeLedger()
    for instance, recipients in (("m1", 3), ("m2", 2)):
        for _ in range(recipients):
            ledger.add(request(instance=instance), NOW)
    ledger.add(request(instance="m2", state="END-OF-MESSAGE", recipient_count="2"), NOW)  # counted at RCPT
    ledger.add(request(instance="m3", state="END-OF-MESSAGE", recipient_count="7"), NOW)  # only at the end
    volume = ledger.volume(request(instance="m4"), NOW)
    assert (volume.messages_hour, volume.recipients_hour) == (4, 13)  # m4's first RCPT included
    assert ledger.volume(request(login="bob@example.com"), NOW).messages_hour == 1


def test_what_is_older_than_the_window_does_not_count():
    ledger = VolumeLedger()
    ledger.add(request(instance="early"), NOW - dt.timedelta(hours=2))
    ledger.add(request(instance="yesterday"), NOW - dt.timedelta(hours=25))
    volume = ledger.volume(request(instance="now"), NOW)
    assert (volume.messages_hour, volume.messages_day) == (1, 2)


def test_two_daemons_see_each_others_counts_through_the_database(db_url):
    stores = [Store(db_url), Store(db_url)]
    stores[0].create_tables()
    ledgers = [VolumeLedger(), VolumeLedger()]
    try:
        for n in range(5):
            ledgers[n % 2].add(request(instance=f"m{n}"), NOW)
        ledgers[1].add(request(instance="old"), NOW - dt.timedelta(minutes=90))
        for ledger, store in zip(ledgers, stores):
            assert ledger.sync(store, NOW)
        for ledger, store in zip(ledgers, stores):  # each read what the other wrote after it read
            assert ledger.sync(store, NOW + dt.timedelta(seconds=1))
        for ledger in ledgers:
            volume = ledger.volume(request(instance="next"), NOW)
            assert (volume.messages_hour, volume.messages_day) == (6, 7)
        # counts written again are the same counts: nothing doubles
        ledgers[0].add(request(instance="m0"), NOW)  # a recipient more of m0
        for ledger, store in zip(ledgers, stores):
            assert ledger.sync(store, NOW + dt.timedelta(seconds=2))
        assert ledgers[1].sync(stores[1], NOW + dt.timedelta(seconds=3))
        volume = ledgers[1].volume(request(instance="next"), NOW)
        assert (volume.messages_hour, volume.recipients_hour) == (6, 7)
        # a day later the rows are trimmed and forgotten
        later = NOW + dt.timedelta(days=2)
        ledgers[0].trim(stores[0], later)
        assert ledgers[0].volume(request(instance="next"), later).messages_day == 1
        with stores[0].engine.connect() as connection:
            assert connection.exec_driver_sql("SELECT COUNT(*) FROM pcc_volume").scalar() == 0
    finally:
        for store in stores:
            store.dispose()

