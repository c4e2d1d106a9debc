"""What one daemon sees of another does not depend on any host's clock (#19):
changes travel by the ids the database gives them (the change log), and
every daemon and admin command keeps the database's time.  The clocks are
moved with libfaketime, on the two databases several daemons share."""
from conftest import ip_in, pcc_command, wait_for_log, wait_until_visible, walk


def test_daemons_and_admins_with_clocks_apart_decide_as_if_they_agreed(start_daemon, shared_db_url):
    settings = {"db.dbcon": shared_db_url, "policy.action": "REJECT"}
    exact = start_daemon(**settings)
    behind = start_daemon(clock_shift="-600s", **settings)
    wait_for_log(behind, "this host's clock is 600")  # said, and the database's time kept
    exact_client, behind_client = exact.client(), behind.client()

    # Sightings by the daemon whose clock is 10 minutes behind count in the
    # other's memory (it polled "rows newer than my clock - 3 s": it never saw them).
    assert exact_client.ask("alice@example.com", ip_in("GB")) == "DUNNO"
    assert walk(behind_client, "alice@example.com", ["US", "FR"]) == ["DUNNO", "DUNNO"]
    wait_until_visible()
    assert exact_client.ask("alice@example.com", ip_in("DE")).startswith("REJECT")

    # Its block reaches the other daemon, which had the account in memory, within a second.
    assert exact_client.ask("bob@example.com", ip_in("GB")) == "DUNNO"
    wait_until_visible()
    assert walk(behind_client, "bob@example.com", ["US", "FR", "DE"])[-1].startswith("REJECT")
    wait_until_visible()
    assert exact_client.ask("bob@example.com", ip_in("GB")).startswith("REJECT")

    # An administrator whose clock is an hour ahead unblocks: counting starts
    # at the unblock by the database's clock (by the admin's, nothing would
    # count for an hour), and the sightings of the daemon behind count too.
    pcc_command(exact.config_path, "-u", "bob@example.com", clock_shift="+3600s")
    wait_until_visible()
    assert walk(exact_client, "bob@example.com", ["JP", "BR", "AU"]) == ["DUNNO"] * 3
    wait_until_visible()
    assert behind_client.ask("bob@example.com", ip_in("CA")).startswith("REJECT")
    shown = pcc_command(exact.config_path, "-s", "bob@example.com").stdout
    assert "CA" in shown and "US" in shown  # the old countries are kept for the record
