"""service.py's request path in the process, one step at a time, on each
database: what it asks of GeoIP and the database for an ignored request, a
known country and a new one; the block committed before its answer; the
answers while the database fails; the late answer and the fallback."""
import datetime as dt

import pytest
from conftest import counted_request, sightings_in_database

from pcclib.decision import Decision
from pcclib.late import RequestTicket
from pcclib.protocol import PolicyRequest

NOW = dt.datetime(2026, 12, 6, 10, 0, tzinfo=dt.timezone.utc)
LOGIN = "alice@example.com"


@pytest.fixture
def service(make_settings, db_url, service_on):
    service = service_on(make_settings(**{"db.dbcon": db_url, "policy.action": "REJECT",
                                          "db.db_error_action": "DEFER_IF_PERMIT", "db.spool_file": ""}))
    service.memory._polled_at = float("inf")  # as if the poll were current: memory is trusted
    return service


def reads(service) -> int:
    return service.database.store.operation_counts().get("history_read", 0)


def at(minutes: int) -> dt.datetime:
    return NOW + dt.timedelta(minutes=minutes)


class NoGeoIP:
    """A GeoIP that fails the test if it is asked."""

    def country(self, address):
        raise AssertionError(f"GeoIP asked for {address}")


def test_a_request_that_is_none_of_pccs_business_costs_no_lookup_and_no_read(service):
    service.geoip = NoGeoIP()
    for request in (PolicyRequest(request="smtpd_access_policy", client_address="81.2.69.160"),
                    PolicyRequest(request="junk", sasl_username=LOGIN, client_address="81.2.69.160")):
        assert service.answer(request, NOW) == "DUNNO"
    assert reads(service) == 0


def test_a_new_country_is_read_and_committed_before_its_answer_a_known_one_is_decided_from_memory(service, db_url):
    assert service.answer(counted_request("GB", LOGIN), at(0)) == "DUNNO"
    assert reads(service) >= 1
    assert sightings_in_database(db_url, LOGIN) == {(LOGIN, "GB")}  # no batch ran: committed by the request
    before = reads(service)
    assert service.answer(counted_request("GB", LOGIN), at(1)) == "DUNNO"
    assert reads(service) == before  # known, current: memory
    assert service.answer(counted_request("US", LOGIN), at(2)) == "DUNNO"
    assert reads(service) > before  # a new place: the database's view
    assert sightings_in_database(db_url, LOGIN) == {(LOGIN, "GB"), (LOGIN, "US")}


def test_the_crossing_is_committed_before_its_answer_and_every_later_answer_refuses(service):
    for minute, country in enumerate(["GB", "US", "FR"]):
        assert service.answer(counted_request(country, LOGIN), at(minute)) == "DUNNO"
    assert service.answer(counted_request("DE", LOGIN), at(3)).startswith("REJECT")
    assert set(service.database.store.enforced_blocks()) == {LOGIN}
    assert service.memory.is_blocked(LOGIN)
    assert service.answer(counted_request("GB", LOGIN), at(4)).startswith("REJECT")


def test_while_the_database_fails_a_known_block_refuses_and_an_unknown_account_gets_db_error_action(service):
    for minute, country in enumerate(["GB", "US", "FR", "DE"]):
        service.answer(counted_request(country, LOGIN), at(minute))
    service.database.failed("stopped by the test")
    assert service.answer(counted_request("GB", LOGIN), at(5)).startswith("REJECT")
    assert service.answer(counted_request("GB", "bob@example.com"), at(5)) == "DEFER_IF_PERMIT"
    assert service.database.outage.snapshot()["error_answers"] >= 1


def test_while_the_database_fails_a_crossing_seen_only_in_memory_is_blocked_and_spooled(service):
    for minute, country in enumerate(["GB", "US", "FR"]):
        service.answer(counted_request(country, LOGIN), at(minute))
    service.database.failed("stopped by the test")
    assert service.answer(counted_request("DE", LOGIN), at(5)).startswith("REJECT")
    assert service.database.journal.blocked_logins() == {LOGIN}
    assert service.memory.is_blocked(LOGIN)


def test_a_late_answer_repeats_a_decision_already_made_and_decides_from_memory_otherwise(service):
    for minute, country in enumerate(["GB", "US", "FR", "DE"]):
        service.answer(counted_request(country, LOGIN), at(minute))
    ticket = RequestTicket(counted_request("GB", "bob@example.com"))
    ticket.decided = (ticket.request, Decision("HOLD decided before", "decided"), at(5))
    assert service.answer_late(ticket, at(5)) == "HOLD decided before"  # not decided again
    undecided = RequestTicket(counted_request("GB", LOGIN))
    assert service.answer_late(undecided, at(5)).startswith("REJECT")  # memory knows the block


def test_the_fallback_never_opens_the_door_for_an_account_known_to_be_blocked(service):
    for minute, country in enumerate(["GB", "US", "FR", "DE"]):
        service.answer(counted_request(country, LOGIN), at(minute))
    assert service.fallback_action(counted_request("GB", LOGIN)).startswith("REJECT")
    assert service.fallback_action(counted_request("GB", "bob@example.com")) == "DEFER_IF_PERMIT"
    assert service.fallback_action(None) == "DEFER_IF_PERMIT"
