"""Logging: syslog (mail facility) or standard error, secrets masked in every
line, and the queue that lets connection threads log without waiting on a
handler lock.
"""
from __future__ import annotations

import logging
import logging.handlers
import os
import queue
import sys
from typing import Iterable

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from .common import daemon_signals_blocked, escape_controls, first_line, log, url_secrets, user_name
from .config import Settings

# What the database drivers and SQLAlchemy say themselves (psycopg's "error
# ignored terminating <psycopg.Pipeline [BAD]>" when a server goes away) goes
# into pcc's log, masked like every line, never to standard error beside it.
DRIVER_LOGGERS = ("psycopg", "pymysql", "sqlalchemy")
# The administrators' trail: what each admin command changed, to which
# account, who ran it, and the result, in the mail log beside the daemon's lines.
AUDIT_LOGGER = "pcc-audit"


class MaskingFormatter(logging.Formatter):
    """Formats a record, then blanks out every secret (database passwords)."""

    secrets: set = set()

    def format(self, record: logging.LogRecord) -> str:
        return mask_secrets(super().format(record), self.secrets)


def mask_secrets(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


class _QueueHandler(logging.handlers.QueueHandler):
    """Hands records to the QueueListener's thread, which formats and writes
    them.  The queue is thread-safe: no handler lock (the stock handle() takes
    one, and formats the message under it), so the connection threads never
    queue behind each other for the line every decision writes."""

    targets: tuple = ()  # where its records end up (refuse_to_start looks)

    def handle(self, record: logging.LogRecord) -> bool:
        if self.filter(record):
            self.enqueue(record)
            return True
        return False


class _IntoPccLog(logging.Handler):
    """Hands a driver's record to pcc's logger as one line, named after its
    source (an exception it carries: its first line, not its traceback)."""

    def emit(self, record: logging.LogRecord) -> None:
        text = f"{record.name}: {record.getMessage()}"
        if record.exc_info and record.exc_info[1] is not None:
            text += f": {first_line(record.exc_info[1])}"
        record.msg, record.args, record.exc_info, record.exc_text = text, None, None, None
        log.handle(record)


def queue_logging() -> logging.handlers.QueueListener:
    """The daemon's logging: records go through a queue to the handlers set up
    by setup_logging, in a thread of their own.  Stop the listener to flush."""
    records: queue.SimpleQueue = queue.SimpleQueue()
    listener = logging.handlers.QueueListener(records, *log.handlers, respect_handler_level=True)
    handler = _QueueHandler(records)
    handler.targets = tuple(log.handlers)  # where its records end up (refuse_to_start looks)
    log.handlers[:] = [handler]
    # The file and line of every log call (a stack walk per record) are not in
    # pcc's log format: the logging documentation's way to skip finding them.
    logging._srcfile = None
    # Nor are the thread's and the multiprocessing process's names: not
    # looking them up makes each record (one a decision) 2-3 us cheaper.
    logging.logThreads = False
    logging.logMultiprocessing = False
    with daemon_signals_blocked():  # the log writer never takes a stop or reload
        listener.start()
    return listener


def setup_logging(verbose: bool, to_stderr: bool, secrets: Iterable[str] = ()) -> None:
    MaskingFormatter.secrets = {secret for secret in secrets if secret}
    if not to_stderr and os.path.exists("/dev/log"):
        handler: logging.Handler = logging.handlers.SysLogHandler(
            address="/dev/log", facility=logging.handlers.SysLogHandler.LOG_MAIL
        )
        handler.setFormatter(MaskingFormatter("pcc[%(process)d]: %(levelname)s %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(MaskingFormatter("%(asctime)s pcc[%(process)d]: %(levelname)s %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False
    for name in DRIVER_LOGGERS:
        driver = logging.getLogger(name)
        driver.handlers[:] = [_IntoPccLog()]
        driver.propagate = False


def secrets_of(settings: Settings) -> list:
    """What must never reach a log line: the database and SMTP passwords, the
    credentials in the Dovecot api_header, the doveadm API key, the webhooks'
    secret and what a URL holds of a credential (user, password, query,
    tokens in its path)."""
    secrets = [settings.mail_password] if settings.mail_password else []  # any length: it is only ever one
    credentials = settings.dovecot_api_header.partition(":")[2].strip()
    urls = (*settings.webhook_urls, settings.doveadm_url, settings.geoip_update_url, settings.asn_update_url,
            *(network_list.url for network_list in settings.network_lists))
    in_urls = [secret for url in urls if url for secret in url_secrets(url)]  # a chat hook's token, a license key
    for secret in (credentials, settings.doveadm_api_key, settings.webhook_secret, *in_urls):
        if len(secret) >= 8:  # a short value would mask innocent words too (URLs are shown masked anyway)
            secrets.append(secret)
    try:
        password = sa.engine.make_url(settings.dbcon).password
    except sa_exc.ArgumentError:
        return secrets
    return secrets + ([str(password)] if password else [])


def refuse_to_start(line: str) -> None:
    """The one line that says why the daemon will not run: on standard error
    (supervisord and systemd keep it) and in the log."""
    print(mask_secrets(line, MaskingFormatter.secrets), file=sys.stderr, flush=True)
    handlers = [target for handler in log.handlers for target in getattr(handler, "targets", (handler,))]
    if not any(isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) is sys.stderr
               for handler in handlers):
        log.critical("%s", line)


def setup_audit(to_stderr: bool, secrets: Iterable[str] = ()) -> None:
    """The trail goes to syslog (facility mail) where there is one, and to
    standard error too with --stderr."""
    handlers: list = []
    if os.path.exists("/dev/log"):
        handlers.append(logging.handlers.SysLogHandler(address="/dev/log",
                                                       facility=logging.handlers.SysLogHandler.LOG_MAIL))
        handlers[-1].setFormatter(MaskingFormatter("pcc[%(process)d]: INFO %(message)s"))
    if to_stderr:
        handlers.append(logging.StreamHandler(sys.stderr))
        handlers[-1].setFormatter(MaskingFormatter("%(asctime)s pcc[%(process)d]: INFO %(message)s"))
    MaskingFormatter.secrets |= {secret for secret in secrets if secret}
    audit_log = logging.getLogger(AUDIT_LOGGER)
    audit_log.handlers[:] = handlers
    audit_log.setLevel(logging.INFO)
    audit_log.propagate = False


def audit(line: str) -> None:
    logging.getLogger(AUDIT_LOGGER).info("%s", escape_controls(line))


def who_ran_it() -> str:
    """The user running an admin command, and the one behind sudo."""
    name = user_name(os.getuid())
    behind = os.environ.get("SUDO_USER", "") if os.getuid() == 0 else ""
    return f"{name} (sudo from {escape_controls(behind)[:64]})" if behind and behind != name else name
