"""pcc's code, one module per job; pcc.py (beside this package) is the script
administrators run.  Imports run one way, each module using only those above
it in this list:

  common     the clock, the logger, cleaning untrusted text
  config     /etc/pcc.conf -> Settings
  protocol   Postfix's attribute lines -> PolicyRequest; an action -> the reply
  ports      what every listening port shares: caps, deadlines, back-off
  geoip      client address -> country (and place)
  networks   client address -> the network lists it is on, its AS
  decision   decide(request, history, settings, now): the rules, pure
  rules      rules per domain and account (--rule) -> the Settings an account is decided by
  notify     the administrators' mail
  mailqueue  Postfix's queues: an account's messages, held, released, deleted
  respond    what follows a block: sessions ended, webhooks, the owner told
  storage    the database: models, Store, what an error means
  writer     sightings written behind the answer; a new place committed before it
  memory     histories and the blocked list kept in memory, the poll of changes
  volume     what each account sent, for the [limits]: counted here, summed across daemons
  outage     the outage state machine; the spool of blocks decided while the database fails
  board      what a daemon's worker processes tell each other: health and metrics, on shared pages
  metrics    the Prometheus endpoint
  database   the Store, its tables, outage in and out, the spool written, the probe
  upkeep     memory kept current: the blocked list, the poll of changes, the trim
  late       the late answer: RequestTicket, the Watchdog, answer_in_time()
  service    one request's path, top to bottom
  report     what the daemon says of itself: the metrics' snapshot, --health's words
  server     the Postfix port
  dovecot    the Dovecot auth policy port, an adapter onto the service
  logs       syslog/stderr, secrets masked, through a queue
  daemon     pcc.py -d: the parts built, start, reload, housekeeping, stop
  workers    [server] processes: the master, its workers on one port, their restarts
  admin      -l -s -b -u -r -e -c --allow --only-from
  replay     --replay of Postfix and Dovecot logs
  update     --update-geoip, --update-lists: download, check, install
  health     --health, in the monitoring-plugin conventions
  checkup    --check-config: what the daemon checks at start, as its user
  cli        the options, and which of the above each runs

docs/architecture.md walks a request through them.
"""
