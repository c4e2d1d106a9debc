"""Faults that must never open the blocked list, in the process (#15): the
spool's rewrite follows no link, an exception nobody foresaw keeps a known
blocked account blocked, a block waiting in the spool refuses the account
before the database has it.  The daemon's side is e2e/test_fail_closed_daemon.py."""
import os

from conftest import daemon_parts, encode_request, ip_in, policy_request, spool_entry

import pcclib.service
from pcclib.outage import OutageJournal
from pcclib.protocol import parse_request
from pcclib.server import PolicyServer


def test_rewriting_the_spool_never_follows_a_link(tmp_path):
    spool = tmp_path / "spool.jsonl"
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.symlink(victim, str(spool) + ".tmp")  # where pcc 1.1 wrote its temporary file
    journal = OutageJournal(str(spool))
    entry = spool_entry("alice@example.com")
    journal.add_block(entry)
    journal.discard_block(entry)
    assert victim.read_text() == "precious\n"
    assert spool.read_text() == ""


def test_an_unforeseen_error_keeps_a_known_blocked_account_blocked(make_settings, monkeypatch):
    settings = make_settings(**{"policy.action": "REJECT", "db.db_error_action": "DEFER_IF_PERMIT"})
    service = daemon_parts(settings).service
    server = PolicyServer.__new__(PolicyServer)  # answer() only: no socket
    server.service, server.settings = service, settings

    def ask(login):
        lines = encode_request(policy_request(login, ip_in("GB"))).decode().splitlines()
        return server.answer_request([line for line in lines if line]).decode()

    for country in ("GB", "US", "FR", "DE"):
        service.answer(parse_request(f"{k}={v}" for k, v in policy_request("alice@example.com",
                                                                                ip_in(country)).items()))
    monkeypatch.setattr(pcclib.service, "decide", lambda *_arguments: 1 / 0)
    assert ask("alice@example.com").startswith("action=REJECT")
    assert ask("bob@example.com") == "action=DEFER_IF_PERMIT\n\n"


def test_a_block_waiting_in_the_spool_refuses_the_account_while_the_database_has_no_record_of_it(make_settings,
                                                                                                tmp_path):
    """While another thread writes the spool to the database that is back (a
    request does not wait for it), the database's history of the account
    knows nothing of the block: its next message is refused all the same."""
    settings = make_settings(**{"policy.action": "REJECT"})
    journal = OutageJournal(str(tmp_path / "spool.jsonl"))
    journal.add_block(spool_entry("alice@example.com"))
    service = daemon_parts(settings, journal=journal).service
    service.database.store.create_tables()
    service.database.tables_ready = True
    request = parse_request(f"{k}={v}" for k, v in policy_request("alice@example.com", ip_in("GB")).items())
    with journal._replaying:  # another thread is writing the spool: a request does not wait for it
        assert service.answer(request).startswith("REJECT")
    other = parse_request(f"{k}={v}" for k, v in policy_request("bob@example.com", ip_in("GB")).items())
    assert service.answer(other) == "DUNNO"
