"""Never silently off (#12): a daemon that cannot write its database refuses to
run, an outage that lasts is said again every minute, admin commands never
leave a file the daemon cannot use, `--health` reports what the daemon sees,
and `--update-geoip` installs current GeoIP data, or nothing."""
import datetime

from pcclib.common import UTC
from pcclib.update import default_geoip_urls


def test_the_default_source_is_dbip_lite_of_this_month_then_the_last():
    now = datetime.datetime(2026, 3, 2, tzinfo=UTC)
    assert default_geoip_urls(False, now) == [
        "https://download.db-ip.com/free/dbip-country-lite-2026-03.mmdb.gz",
        "https://download.db-ip.com/free/dbip-country-lite-2026-02.mmdb.gz"]
    assert default_geoip_urls(True, now)[0] == "https://download.db-ip.com/free/dbip-city-lite-2026-03.mmdb.gz"
