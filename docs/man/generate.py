#!/usr/bin/env python3
"""Writes pcc(8) and pcc.conf(5) beside this script from the definitions the
code itself uses: the option parser of pcclib/cli.py and the key table of
pcclib/config.py (KEYS, LIST_KEYS).  The pages are committed (a Debian build
needs no Python packages to install them); tests/unit/test_man_pages.py fails
when they differ from what this script writes now.

    .venv/bin/python docs/man/generate.py
"""
import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from pcclib.cli import build_argument_parser  # noqa: E402
from pcclib.common import __version__  # noqa: E402
from pcclib.config import KEYS, LIST_KEYS, Key  # noqa: E402

SECTION_TITLES = {
    "server": "The policy port",
    "db": "The database",
    "geoip": "Country data",
    "mail": "Notices to the administrators",
    "policy": "The rules",
    "limits": "Volume limits per account (the sum over every daemon; a message is one mail transaction, a recipient one RCPT)",
    "postfix": "Postfix's queues",
    "dovecot": "Dovecot logins",
    "notify": "Webhooks and the account's owner",
    "networks": "Networks",
    "list <label>": "Network lists, one section each",
}


def roff(text: str) -> str:
    """Text as troff reads it literally."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line[:1] in (".", "'") else line for line in text.splitlines())


def header(name: str, section: int, title: str) -> list:
    return [f'.TH {name.upper()} {section} "" "pcc {__version__}" "{title}"']


def option_lines(parser: argparse.ArgumentParser) -> list:
    lines = []
    for action in parser._actions:  # argparse keeps no public list of its options
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        names = ", ".join(f"\\fB{roff(name)}\\fR" for name in action.option_strings)
        if action.nargs != 0:
            metavar = action.metavar or action.dest.upper()
            names += " \\fI" + roff(" ".join(metavar) if isinstance(metavar, tuple) else metavar) + "\\fR"
        lines += [".TP", names, roff(action.help or "")]
    return lines


def pcc_8() -> str:
    parser = build_argument_parser()
    lines = header("pcc", 8, "System Manager's Manual") + [
        ".SH NAME", "pcc \\- Postfix Country Control, a policy service that stops stolen mail accounts",
        ".SH SYNOPSIS",
        ".B pcc", "[\\fB\\-\\-config\\fR \\fIPATH\\fR] \\fB\\-d\\fR", ".br",
        ".B pcc", "[\\fB\\-\\-config\\fR \\fIPATH\\fR] \\fB\\-l\\fR | \\fB\\-s\\fR|\\fB\\-b\\fR|\\fB\\-u\\fR"
        "|\\fB\\-r\\fR|\\fB\\-e\\fR \\fILOGIN\\fR | \\fB\\-\\-health\\fR | \\fB\\-\\-check\\-config\\fR | ...",
        ".SH DESCRIPTION",
        roff("pcc answers Postfix's policy delegation (check_policy_service) for every message of an "
             "authenticated account. It looks up the country of the client's address and blocks an account "
             "that sends from more countries than [policy] how_many_different_countries within "
             "in_how_much_time_in_days: every later message is answered with [policy] action (REJECT or HOLD) "
             "until an administrator unblocks it, and the administrators are told."),
        ".PP",
        roff("With -d, pcc runs the daemon in the foreground (systemd and supervisord run it so); the other "
             "modes are the administrator's commands, run against the same configuration and database as "
             "the daemon, which sees their changes within a second."),
        ".SH OPTIONS", *option_lines(parser),
        ".SH EXIT STATUS",
        ".TP", "0", "Done.", ".TP", "1", "Failed; the reason is printed on one line.",
        ".TP", "2", "The configuration or the command line is wrong; the line names the file, section and key.",
        ".PP", roff("--health follows the monitoring-plugin conventions: 0 OK, 1 WARNING, 2 CRITICAL, "
                    "3 UNKNOWN, with the metrics as perfdata."),
        ".SH SIGNALS",
        ".TP", ".B SIGHUP", roff("The daemon reads its configuration and GeoIP data again; a bad new "
                                 "configuration is refused in one line and the old one kept. With [server] "
                                 "processes above 1, send it to the master: every worker process reloads."),
        ".TP", ".BR SIGTERM \", \" SIGINT", roff("The daemon answers the requests in flight, then exits (with "
                                                "several processes, the master stops every worker first)."),
        ".SH FILES",
        ".TP", ".I /etc/pcc.conf", "The configuration, see \\fBpcc.conf\\fR(5).",
        ".TP", ".I /var/lib/pcc/", roff("The state: the SQLite database, the outage spool (spool.jsonl; "
                                        "spool.jsonl.2... for further worker processes) and its copy of the "
                                        "blocked list, downloaded GeoIP data and network lists."),
        ".TP", ".I /usr/share/pcc/dbip\\-country\\-lite.mmdb",
        roff("The country data the package ships (DB-IP IP to Country Lite, CC BY 4.0), used while "
             "[geoip] database is blank."),
        ".SH EXAMPLES",
        "In Postfix's main.cf:", ".PP", ".nf", ".RS",
        roff("smtpd_relay_restrictions = permit_mynetworks,\n"
             "    check_policy_service inet:127.0.0.1:9999,\n"
             "    permit_sasl_authenticated, reject_unauth_destination\n"
             "smtpd_policy_service_default_action = DUNNO"),
        ".RE", ".fi", ".PP", "The blocked accounts, one account, and its unblocking:", ".PP", ".nf", ".RS",
        roff("pcc -l\npcc -s user@example.org\npcc -u user@example.org"), ".RE", ".fi",
        ".SH SEE ALSO",
        "\\fBpcc.conf\\fR(5), \\fBpostconf\\fR(5), \\fBpostsuper\\fR(1), \\fBdoveadm\\fR(1)",
    ]
    return "\n".join(lines) + "\n"


def key_lines(key: Key) -> list:
    kind = key.kind
    values = roff(kind.values)
    blank = f"blank: {kind.blank}" if kind.blank else "required"
    return [".TP", f"\\fB{roff(key.name)}\\fR = \\fI{values}\\fR ({roff(blank)})", roff(key.meaning)]


def pcc_conf_5() -> str:
    lines = header("pcc.conf", 5, "File Formats Manual") + [
        ".SH NAME", "pcc.conf \\- configuration of pcc, Postfix Country Control",
        ".SH DESCRIPTION",
        roff("pcc reads /etc/pcc.conf (or the file --config names) at start and at SIGHUP. It is an INI file: "
             "[section] lines, then key = value lines; comments are lines of their own starting with # or ;. "
             "Every key below must be present: a blank value means what its entry says, and a required key "
             "may not be blank. A missing key, an unknown one (most often a typo, which pcc names) or a bad "
             "value stops pcc with one line naming the file, section and key; pcc --check-config checks a "
             "file before a reload."),
        ".PP",
        roff("An account (its SASL login) is blocked when, counting the message at hand, it has sent from more "
             "than how_many_different_countries countries within the last in_how_much_time_in_days days."),
    ]
    for section in dict.fromkeys(key.section for key in KEYS + LIST_KEYS):
        lines += [".SH " + roff(f"[{section}]").replace("\\-", "-"), roff(SECTION_TITLES[section]) + "."]
        for key in KEYS + LIST_KEYS:
            if key.section == section:
                lines += key_lines(key)
    lines += [".SH FILES", ".I /etc/pcc.conf",
              ".SH SEE ALSO", "\\fBpcc\\fR(8), \\fBpostconf\\fR(5)"]
    return "\n".join(lines) + "\n"


PAGES = {"pcc.8": pcc_8, "pcc.conf.5": pcc_conf_5}


def main() -> None:
    for name, write in PAGES.items():
        with open(os.path.join(HERE, name), "w", encoding="utf-8") as page:
            page.write(write())


if __name__ == "__main__":
    main()
