#!/usr/bin/env python3
"""pcc - Postfix Country Control.

A Postfix policy service (``check_policy_service inet:127.0.0.1:9999``) that stops
mail from accounts whose password was stolen.  For every authenticated message it
looks up the country of the client IP.  A real person sends from two or three
countries in a few days; a spammer with a stolen password logs in through proxies
all over the world.  When one account (the SASL login, kept whole as user@domain)
has sent from more than ``how_many_different_countries`` countries within
``in_how_much_time_in_days`` days, pcc puts it on the blocked list, answers that
message and every later one with REJECT or HOLD until an administrator unblocks
it, and emails the administrators.

Two optional additions: an impossible-travel rule (two consecutive messages
from places farther apart than anybody can travel in the time between, from
City-level GeoIP data), and monitor mode, in which pcc records and notifies
what it would block but answers DUNNO.  Administrators can pre-approve a trip
with a travel pass.

How the pieces fit, in the order data flows (and the order of this file):

  configuration   /etc/pcc.conf -> Settings (every key required, validated once)
  policy protocol bytes from Postfix -> PolicyRequest; Decision -> "action=..."
  GeoIP lookup    client_address -> country, and a place with City-level data
                  (MaxMind .mmdb via maxminddb, or the GeoLite2-Country data
                  embedded in the geoip2fast package); a replaced file is reloaded
  storage         SQLAlchemy models: per-account per-country sightings (rows grow
                  with accounts x countries, never with messages), the accounts
                  that are blocked (or flagged, in monitor mode), the history of
                  every block, and travel passes
  the decision    decide(request, history, settings, now): a pure function
  notifications   one email per new block or impossible journey, sent by a
                  background thread with retries
  the server      socketserver.ThreadingTCPServer, one loop of requests per connection;
                  PolicyService decides in the connection's thread, one request per
                  account at a time, on the account's history in memory while a poll
                  of the database's changes (4 a second) keeps it current, else read
                  from the database; blocks are written before the answer, sightings
                  behind it in batches (SightingWriter); a Watchdog answers any
                  request still there after 0.8 s, with its decision when that is
                  made (the block synced to a spool file first), else from memory;
                  during an outage blocks go to the spool file; log lines go through
                  a queue to a thread of their own; optional Prometheus metrics
  admin commands  list, show, block, unblock (and release/delete held mail), cleanup,
                  travel passes, --replay of Postfix logs through the same
                  service and decision, --health (asks the daemon what it sees)
                  and --update-geoip

Only the decision knows the rules; everything around it does I/O.  The file is
long (about 4,550 lines) but each section stands alone; the admin command line
(with the replay, --health and --update-geoip, about 1,000 lines) has outgrown
it and is the first candidate for a module of its own.
"""
# Transitional: the code moved verbatim into pcclib/; these re-exports keep
# `import pcc` working until the tests import the modules themselves.
import sys

from pcclib.common import *  # noqa: F401,F403
from pcclib.config import *  # noqa: F401,F403
from pcclib.protocol import *  # noqa: F401,F403
from pcclib.geoip import *  # noqa: F401,F403
from pcclib.decision import *  # noqa: F401,F403
from pcclib.notify import *  # noqa: F401,F403
from pcclib.storage import *  # noqa: F401,F403
from pcclib.memory import *  # noqa: F401,F403
from pcclib.outage import *  # noqa: F401,F403
from pcclib.metrics import *  # noqa: F401,F403
from pcclib.service import *  # noqa: F401,F403
from pcclib.server import *  # noqa: F401,F403
from pcclib.dovecot import *  # noqa: F401,F403
from pcclib.logs import *  # noqa: F401,F403
from pcclib.daemon import *  # noqa: F401,F403
from pcclib.admin import *  # noqa: F401,F403
from pcclib.replay import *  # noqa: F401,F403
from pcclib.tools import *  # noqa: F401,F403
from pcclib.cli import *  # noqa: F401,F403
from pcclib.common import __version__, log  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
