"""The metrics port's configuration: it must differ from the policy port.  The
endpoint scraped from a running daemon is e2e/test_metrics_endpoint.py."""

import pytest

from pcclib.config import ConfigError


def test_metrics_port_must_differ_from_the_policy_port(make_settings):
    with pytest.raises(ConfigError, match=r"\[server\] metrics_port: must differ from \[server\] port"):
        make_settings(**{"server.port": "9999", "server.metrics_port": "9999"})
