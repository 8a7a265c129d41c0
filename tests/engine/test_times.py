"""RFC 3339 in (its own grammar only), UTC ``Z`` with milliseconds out."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.times import parse_rfc3339, to_rfc3339

INSTANT = "2026-11-24T18:00:00.000Z"


@pytest.mark.parametrize(
    ("text", "utc"),
    [
        ("2026-11-24T18:00:00Z", INSTANT),
        ("2026-11-24t18:00:00z", INSTANT),
        ("2026-11-24T23:30:00+05:30", INSTANT),
        ("2026-11-24T15:00:00-03:00", INSTANT),
        ("2026-11-24T18:00:00-00:00", INSTANT),
        ("2026-11-24T18:00:00+00:00", INSTANT),
        ("2026-11-24T18:00:00.5Z", "2026-11-24T18:00:00.500Z"),
        ("2026-11-24T18:00:00.123456Z", "2026-11-24T18:00:00.123Z"),
        ("2026-11-24T18:00:00.999999999999Z", "2026-11-24T18:00:00.999Z"),  # dropped, not rounded
        ("2026-11-24T23:30:00.25+05:30", "2026-11-24T18:00:00.250Z"),
        ("2026-11-25T00:30:00+06:30", INSTANT),  # another local date
        ("1970-01-01T00:00:00Z", "1970-01-01T00:00:00.000Z"),
        ("9999-12-31T23:59:59.999Z", "9999-12-31T23:59:59.999Z"),
    ],
)
def test_rfc3339_spellings_parse_to_the_same_utc_instant(text: str, utc: str) -> None:
    assert to_rfc3339(parse_rfc3339(text)) == utc


@pytest.mark.parametrize(
    "text",
    [
        "2026-W48-2T18:00:00Z",  # ISO week date
        "2026-328T18:00:00Z",  # ISO ordinal date
        "20261124T180000Z",  # basic format
        "2026-11-24T180000Z",  # basic time
        "2026-11-24T18Z",  # hour only
        "2026-11-24T18:00Z",  # no seconds
        "2026-11-24T18:00:00,5Z",  # comma fraction
        "2026-11-24T18:00:00.Z",  # dot without digits
        "2026-11-24T23:00:00+05",  # hour-only offset
        "2026-11-24T23:30:00+0530",  # offset without colon
        "2026-11-24T23:30:00+05:30:00",  # offset with seconds
        "2026-11-24T18:00:00+05:60",  # offset minute 60
        "2026-11-24T18:00:00+24:00",  # offset hour 24
        "2026-11-24T18:00:00",  # no zone
        "2026-11-24",  # date only
        "2026-11-24 18:00:00Z",  # space for T
        "2026-11-24T18:00:00 Z",
        "2026-11-24T18:00:00UTC",
        " 2026-11-24T18:00:00Z",
        "2026-11-24T18:00:00Z\n",
        "+2026-11-24T18:00:00Z",  # expanded year
        "26-11-24T18:00:00Z",
        "2026-1-24T18:00:00Z",
        "\u0662\u0660\u0662\u0666-11-24T18:00:00Z",  # Arabic-Indic digits
        "\uff12\uff10\uff12\uff16-11-24T18:00:00Z",  # full-width digits
        "2026-02-29T18:00:00Z",  # not a leap year
        "2026-13-01T18:00:00Z",
        "2026-11-24T24:00:00Z",
        "2026-11-24T18:00:60Z",  # leap second
        "0000-01-01T00:00:00Z",
        "1969-12-31T23:59:59Z",
        "1970-01-01T00:30:00+01:00",  # 1969 in UTC
        "9999-12-31T23:59:59-00:01",  # year 10000 in UTC
        "",
        "yesterday",
    ],
)
def test_other_iso_8601_spellings_and_impossible_times_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_rfc3339(text)


@given(st.integers(0, 253_402_300_799_999))
def test_instants_are_written_as_datetime_writes_them_and_read_back(ms: int) -> None:
    """Any instant 1970..9999: the text datetime's exact arithmetic gives, and back."""
    exact = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)
    text = to_rfc3339(ms)
    assert text == exact.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    assert parse_rfc3339(text) == ms
