"""logs.py: what the database drivers and SQLAlchemy say themselves reaches
pcc's log (its format, secrets masked), never standard error beside it."""
import logging

import pytest

from pcclib.logs import DRIVER_LOGGERS, MaskingFormatter, setup_logging


@pytest.fixture
def restored_logging():
    saved = {name: (logging.getLogger(name).handlers[:], logging.getLogger(name).propagate)
             for name in ("pcc", *DRIVER_LOGGERS)}
    secrets, level = set(MaskingFormatter.secrets), logging.getLogger("pcc").level
    yield
    MaskingFormatter.secrets = secrets
    logging.getLogger("pcc").setLevel(level)
    for name, (handlers, propagate) in saved.items():
        logging.getLogger(name).handlers[:] = handlers
        logging.getLogger(name).propagate = propagate


@pytest.mark.parametrize("driver", DRIVER_LOGGERS)
def test_a_drivers_message_is_one_line_of_pccs_log_with_its_secrets_masked(driver, restored_logging, capsys):
    setup_logging(verbose=False, to_stderr=True, secrets=["s3cret-password"])
    logging.getLogger(f"{driver}.pool").warning("error ignored terminating %s for %s",
                                                 "<psycopg.Pipeline [BAD]>", "postgresql://pcc:s3cret-password@db")
    (line,) = capsys.readouterr().err.splitlines()
    assert " pcc[" in line and f"WARNING {driver}.pool: error ignored terminating <psycopg.Pipeline [BAD]>" in line
    assert "s3cret-password" not in line and "pcc:***@db" in line


def test_a_drivers_exception_is_its_first_line_not_a_traceback(restored_logging, capsys):
    setup_logging(verbose=False, to_stderr=True)
    try:
        raise ConnectionError("server closed the connection unexpectedly\nThis probably means...")
    except ConnectionError:
        logging.getLogger("sqlalchemy.pool.impl.QueuePool").error("Exception during reset", exc_info=True)
    (line,) = capsys.readouterr().err.splitlines()
    assert line.endswith("ERROR sqlalchemy.pool.impl.QueuePool: Exception during reset: ConnectionError: server "
                         "closed the connection unexpectedly")
