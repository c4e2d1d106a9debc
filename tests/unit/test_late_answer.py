"""The late answer (late.RequestTicket, the Watchdog), in the process: the
Watchdog's answer and the database's, arriving together, make exactly one
reply.  The doors' late answers under real faults are e2e/test_faults.py."""
import threading
import time

from conftest import free_port, ip_in

from pcclib.metrics import Metrics
from pcclib.server import PolicyServer
from pcclib.late import DB_ANSWER_DEADLINE, Watchdog


def test_the_watchdogs_answer_arrives_when_the_database_returns_while_it_is_sent(make_settings):
    """The request's own thread gets its (late) database answer while the
    Watchdog is still working out the answer from memory: the connection must
    stay open until the Watchdog's answer is sent (found by test_races under
    load: 'cannot send the answer: Bad file descriptor' and a client left with
    no answer)."""

    from conftest import PolicyClient

    class SlowDatabaseService:
        """The two ways PolicyService answers, with the timing of the race."""

        metrics = Metrics()

        def __init__(self):
            self.watchdog = Watchdog(self.answer_late, self.answer_after_error)

        def answer(self, request, ticket=None):
            time.sleep(DB_ANSWER_DEADLINE + 0.4)  # the database answers after the Watchdog took over
            return "DUNNO"

        def answer_late(self, ticket):
            time.sleep(0.6)  # ...and before the Watchdog has sent its own answer
            return "DEFER_IF_PERMIT"

        def answer_after_error(self, request):
            return "DEFER_IF_PERMIT"

    settings = make_settings(**{"server.port": free_port()})
    server = PolicyServer(settings, SlowDatabaseService())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = PolicyClient(settings.port)
        assert client.ask("alice@example.com", ip_in("GB")) == "DEFER_IF_PERMIT"
        client.close()
    finally:
        server.shutdown()
        server.server_close()
