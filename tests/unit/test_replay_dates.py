"""--replay's classic syslog stamps (no year) land in the right year on every
day of the year: each test names the day it runs on (LogClock's `today`)."""
import datetime as dt

import pytest

from pcclib.replay import LogClock

UTC = dt.timezone.utc


def local(moment: dt.datetime) -> dt.datetime:
    """A parsed stamp as the log wrote it (local time, no zone)."""
    return moment.astimezone().replace(tzinfo=None)


def read_on(today, *stamps) -> list:
    clock = LogClock(today)
    return [local(clock.parse(stamp, None)) for stamp in stamps]


@pytest.mark.parametrize("today, stamp, year", [
    (dt.datetime(2026, 12, 3, 13, 57, tzinfo=UTC), "Dec 30 22:00:00", 2025),  # later this month: last year's
    (dt.datetime(2026, 12, 3, 13, 57, tzinfo=UTC), "Dec  3 08:00:00", 2026),  # this morning
    (dt.datetime(2026, 12, 3, 13, 57, tzinfo=UTC), "Nov 25 18:43:13", 2026),
    (dt.datetime(2027, 1, 1, 0, 30, tzinfo=UTC), "Dec 31 23:59:59", 2026),  # just before new year
    (dt.datetime(2027, 1, 1, 0, 30, tzinfo=UTC), "Jan  1 00:10:00", 2027),
    (dt.datetime(2027, 1, 1, 0, 30, tzinfo=UTC), "Dec 30 22:00:00", 2026),
    (dt.datetime(2027, 3, 1, 9, 0, tzinfo=UTC), "Mar 20 10:00:00", 2026),  # later this month: last year's
    (dt.datetime(2027, 3, 1, 9, 0, tzinfo=UTC), "Feb 28 10:00:00", 2027),
    (dt.datetime(2027, 3, 1, 9, 0, tzinfo=UTC), "Feb 29 10:00:00", 2024),  # the latest leap day
    (dt.datetime(2028, 2, 29, 12, 0, tzinfo=UTC), "Feb 29 06:00:00", 2028),  # on a leap day
    (dt.datetime(2028, 2, 29, 12, 0, tzinfo=UTC), "Mar  2 06:00:00", 2027),
    (dt.datetime(2028, 2, 27, 12, 0, tzinfo=UTC), "Feb 29 06:00:00", 2024),  # two days before one
])
def test_first_stamp_goes_in_the_latest_year_not_in_the_future(today, stamp, year):
    (moment,) = read_on(today, stamp)
    assert moment.year == year
    assert f"{moment:%b} {moment.day:2d} {moment:%H:%M:%S}" == stamp


def test_hours_ahead_of_today_stay_this_year():
    """A log host a zone or a clock ahead writes a stamp some hours after this host's now."""
    today = dt.datetime(2026, 12, 3, 13, 57, tzinfo=UTC)
    assert read_on(today, "Dec  3 23:30:00")[0].year == 2026
    assert read_on(today, "Dec  4 08:00:00")[0].year == 2025  # 18 hours ahead: last year's


@pytest.mark.parametrize("today", [dt.datetime(2026, 1, 6, tzinfo=UTC), dt.datetime(2026, 3, 1, tzinfo=UTC),
                                   dt.datetime(2026, 12, 3, tzinfo=UTC), dt.datetime(2026, 12, 29, tzinfo=UTC)])
def test_a_log_that_crosses_new_year_goes_up_one_year_there(today):
    moments = read_on(today, "Dec 30 22:00:00", "Dec 31 23:59:00", "Jan  1 00:01:00", "Jan  5 03:00:00")
    assert [(m.year, m.month, m.day) for m in moments] == [(2025, 12, 30), (2025, 12, 31), (2026, 1, 1),
                                                           (2026, 1, 5)]


def test_leap_day_inside_a_log():
    today = dt.datetime(2028, 3, 10, tzinfo=UTC)
    moments = read_on(today, "Feb 28 10:00:00", "Feb 29 10:00:00", "Mar  1 10:00:00")
    assert [(m.month, m.day) for m in moments] == [(2, 28), (2, 29), (3, 1)] and moments[0].year == 2028


def test_stamps_with_a_year_are_taken_as_they_are():
    clock = LogClock(dt.datetime(2026, 12, 3, tzinfo=UTC))
    assert clock.parse(None, "2030-06-01T10:00:00+02:00") == dt.datetime(2030, 6, 1, 8, 0, tzinfo=UTC)
