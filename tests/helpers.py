"""Small builders shared by the tests."""

from __future__ import annotations

from engine.deals import NewDeal
from engine.store import Script
from engine.times import MS_PER_DAY, now_ms

HOUR_MS = 3_600_000


def new_deal(
    inventory: int = 10,
    *,
    merchant_id: str = "m-1",
    starts_in_ms: int = -60_000,
    lasts_ms: int = HOUR_MS,
    lat: float = 12.9716,
    lng: float = 77.5946,
    title: str = "2-for-1 espresso",
) -> NewDeal:
    """A deal relative to now: active for an hour by default."""
    starts = now_ms() + starts_in_ms
    ends = starts + lasts_ms
    return NewDeal(
        merchant_id=merchant_id,
        title=title,
        description="",
        lat=lat,
        lng=lng,
        inventory=inventory,
        starts_at_ms=starts,
        ends_at_ms=ends,
        redeem_until_ms=ends + 7 * MS_PER_DAY,
    )


def lua_source(script: str) -> str:
    """The text of ``lua/<script>.lua``, as the store loads it (its libraries pasted in)."""
    return Script.load(script).source
