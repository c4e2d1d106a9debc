#!/usr/bin/env python3
"""pcc - Postfix Country Control: the script administrators run.

A Postfix policy service (check_policy_service inet:127.0.0.1:9999) that stops
mail from accounts whose password was stolen: when one account sends from more
than X countries within Y days, every later message is answered REJECT or HOLD
until an administrator unblocks it, and the administrators are told.

  pcc.py -d                 the daemon (as supervisord or systemd run it)
  pcc.py -l / -s / -b / -u  the blocked list and the accounts (see --help)
  pcc.py --replay, --health, --update-geoip, --check-config

The code lives in pcclib/ beside this file, one module per job, imports running
one way, in the order pcclib/__init__.py maps them; README's "How pcc is built"
follows one request through them.
"""
import os
import sys

# pcclib sits beside this script, wherever it was installed or linked from.
HERE = os.path.dirname(os.path.realpath(__file__))
# In a checkout, the packages pcc needs are in the venv beside it: the command
# lines pcc prints (`/opt/pcc/pcc.py --config /etc/pcc.conf -u ...`) run as
# printed, whichever python3 the #! line finds first.
VENV_PYTHON = os.path.join(HERE, ".venv", "bin", "python")
if os.path.exists(VENV_PYTHON) and os.path.realpath(sys.prefix) != os.path.realpath(os.path.join(HERE, ".venv")):
    os.execv(VENV_PYTHON, [VENV_PYTHON, os.path.realpath(__file__), *sys.argv[1:]])
sys.path.insert(0, HERE)

from pcclib.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
