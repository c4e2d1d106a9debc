"""--update-geoip's choice of source: DB-IP Lite of this month, then of the
last (the downloads and checks are e2e/test_update_geoip.py)."""
import datetime

from pcclib.common import UTC
from pcclib.update import default_geoip_urls


def test_the_default_source_is_dbip_lite_of_this_month_then_the_last():
    now = datetime.datetime(2026, 3, 2, tzinfo=UTC)
    assert default_geoip_urls(False, now) == [
        "https://download.db-ip.com/free/dbip-country-lite-2026-03.mmdb.gz",
        "https://download.db-ip.com/free/dbip-country-lite-2026-02.mmdb.gz"]
    assert default_geoip_urls(True, now)[0] == "https://download.db-ip.com/free/dbip-city-lite-2026-03.mmdb.gz"
