"""Time on the wire: RFC 3339 in, UTC ``Z`` with milliseconds out; integers of ms inside."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)

MS_PER_DAY = 86_400_000


def now_ms() -> int:
    """This process's wall clock in ms (Redis's clock decides claims)."""
    return time.time_ns() // 1_000_000


def to_rfc3339(ms: int) -> str:
    """``1764007200000`` -> ``2025-11-24T18:00:00.000Z``."""
    dt = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def parse_rfc3339(text: str) -> int:
    """Parse an RFC 3339 timestamp that names its zone; ``ValueError`` otherwise."""
    if not isinstance(text, str) or len(text) > 40 or "T" not in text.upper():
        raise ValueError("not an RFC 3339 timestamp")
    normalized = text.strip()
    if normalized != text:
        raise ValueError("not an RFC 3339 timestamp")
    if normalized[-1] in "zZ":
        normalized = normalized[:-1] + "+00:00"
    dt = datetime.fromisoformat(normalized)
    if dt.tzinfo is None:
        raise ValueError("a timestamp must name its zone (Z or +hh:mm)")
    if not 1970 <= dt.year <= 9999:
        raise ValueError("year out of range")
    return (dt - _EPOCH) // _MS
