"""Every daemon agrees on the crossing: an account sends from three countries,
then a burst from four new ones arrives at once, split over two or three
daemons on one database (SQLite: one file they share), with every core kept
busy by other processes, as on a busy MTA.  Every message of every burst is
held: none is decided on a view that misses a country another daemon had
answered for the account."""
import pytest
from conftest import all_at_once, busy_cores, ip_in, walk

BURSTS = 10
NEW_COUNTRIES = ["DE", "JP", "BR", "CN"]
SEEN_COUNTRIES = ["GB", "US", "FR"]


@pytest.mark.parametrize("daemon_count, size", [(2, 64), (3, 64), (2, 256), (3, 256)])
def test_a_burst_split_over_daemons_right_after_the_third_country_is_held_whole(start_daemon, db_url,
                                                                                 daemon_count, size):
    daemons = [start_daemon(**{"db.dbcon": db_url, "policy.action": "HOLD", "policy.reason": "held"})
               for _ in range(daemon_count)]
    leaks = {}
    with busy_cores():
        for burst in range(BURSTS):
            login = f"burst{burst}@example.com"
            # The three countries through one daemon (even bursts) or one
            # each (odd: each daemon then has some of them in memory).
            for n, country in enumerate(SEEN_COUNTRIES):
                seeding = daemons[(burst + n * (burst % 2)) % daemon_count].client()
                assert walk(seeding, login, [country]) == ["DUNNO"], (burst, country)
                seeding.close()
            clients = [daemons[n % daemon_count].client() for n in range(size)]
            answers = all_at_once(size, lambda n: clients[n].ask(login, ip_in(NEW_COUNTRIES[n % 4], host=n + 1)))
            for client in clients:
                client.close()
            passed = [n for n, answer in enumerate(answers) if answer != "HOLD held"]
            if passed:
                leaks[burst] = (len(passed), sorted({n % daemon_count for n in passed}), answers[passed[0]])
    assert not leaks, (leaks, "".join(daemon.log()[-2000:] for daemon in daemons))
