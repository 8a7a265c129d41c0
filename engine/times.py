"""Time on the wire: RFC 3339 in, UTC ``Z`` with milliseconds out; integers of ms inside."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta, timezone
from functools import lru_cache

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)

MS_PER_DAY = 86_400_000
_YEAR_10000_MS = 253_402_300_800_000  # 10000-01-01T00:00:00Z

# RFC 3339 section 5.6 ``date-time``, ASCII digits only (``\d`` would take any script's).
_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]+))?"
    r"([Zz]|[+-]([0-9]{2}):([0-9]{2}))"
)


def now_ms() -> int:
    """This process's wall clock in ms (Redis's clock decides claims)."""
    return time.time_ns() // 1_000_000


def to_rfc3339(ms: int) -> str:
    """``1764007200000`` -> ``2025-11-24T18:00:00.000Z``."""
    second, milli = divmod(ms, 1000)
    return f"{_second_text(second)}{milli:03d}Z"


# Every new voucher writes two instants (claimed, expires), and strftime was a twentieth
# of a claim's CPU: the seconds repeat (one deal's expiry, the claims of one second), so
# their text is kept, 4,096 of them (about 0.5 MiB).
@lru_cache(maxsize=4096)
def _second_text(second: int) -> str:
    """``YYYY-MM-DDTHH:MM:SS.`` of a second since the epoch (UTC)."""
    return (_EPOCH + timedelta(seconds=second)).strftime("%Y-%m-%dT%H:%M:%S.")


def parse_rfc3339(text: str) -> int:
    """Parse an RFC 3339 date-time (section 5.6) into ms; ``ValueError`` otherwise.

    Only RFC 3339's own grammar: seconds present, a dot before a fraction, a zone of
    ``Z`` or ``+hh:mm`` (``T`` and ``Z`` in either case, as its ABNF allows). Other ISO
    8601 spellings that ``datetime.fromisoformat`` takes (week dates, basic format,
    hour-only times, comma fractions, ``+05``/``+0530``) are refused. Digits beyond the
    millisecond are dropped, not rounded; leap seconds (``:60``) are refused.
    """
    match = _RFC3339.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError("not an RFC 3339 timestamp with a zone")
    year, month, day, hour, minute, second, frac, zone, off_h, off_m = match.groups()
    offset = timedelta(0)
    if zone not in ("Z", "z"):
        if int(off_h) > 23 or int(off_m) > 59:
            raise ValueError("not a zone offset")
        offset = timedelta(hours=int(off_h), minutes=int(off_m))
        if zone[0] == "-":
            offset = -offset
    # datetime() refuses what the pattern lets through: month 13, February 30, hour 24.
    fields = (int(year), int(month), int(day), int(hour), int(minute), int(second))
    dt = datetime(*fields, tzinfo=timezone(offset))
    ms = (dt - _EPOCH) // _MS + int((frac or "0")[:3].ljust(3, "0"))
    if not 0 <= ms < _YEAR_10000_MS:
        raise ValueError("out of range: 1970 to 9999 (UTC)")
    return ms
