"""Deals: create, read and cancel, each one atomic Lua call on the deal's partition."""

from __future__ import annotations

import functools
import secrets
from dataclasses import dataclass
from typing import Any

from engine.errors import BacklogFull, DealNotFound, Forbidden
from engine.store import Store
from engine.times import MS_PER_DAY, to_rfc3339

SCHEDULED, ACTIVE, SOLD_OUT, ENDED, CANCELLED = (
    "scheduled",
    "active",
    "sold_out",
    "ended",
    "cancelled",
)


# A deal's time rules (API.md); voucher key retirement derives from them too.
MAX_WINDOW_MS = 30 * MS_PER_DAY  # ends_at - starts_at
MAX_REDEEM_AFTER_END_MS = 90 * MS_PER_DAY  # redeem_until - ends_at
DEFAULT_REDEEM_AFTER_END_MS = 7 * MS_PER_DAY
# Lifecycle (docs/lifecycle.md): the backstop deadline on a deal's keys comes at least this
# long, and at least the grace, after the archiver may first take the deal.
ARCHIVE_BACKSTOP_MIN_MS = 7 * MS_PER_DAY
# A deal's place: the latitude band a Redis geo index can hold (its longitude is any).
LAT_MAX = 85.05112878
LNG_MAX = 180.0
# A deal's size (API.md): what a merchant may publish.
TITLE_MAX_CHARS = 200
DESCRIPTION_MAX_CHARS = 2000
INVENTORY_MAX = 1_000_000


class DealHash:
    """The deal hash ``fs:{pNN}:deal:<id>``, field by field: the one definition of its layout.

    The Lua scripts name these fields literally (and ``read_deals`` returns ``LIVE`` then
    ``FIXED``, in these orders); ``tests/engine/test_deals.py`` checks every script here.
    """

    MERCHANT = "merchant"
    TITLE = "title"
    DESC = "desc"
    LAT = "lat"
    LNG = "lng"
    TOTAL = "total"  # inventory
    STARTS = "starts"  # ms since the epoch, as every time here
    ENDS = "ends"
    REDEEM = "redeem"  # redeem_until
    CREATED = "created"
    LEFT = "left"  # inventory left; claims decrement it
    SEQ = "seq"  # vouchers issued; claims increment it
    CANCELLED = "cancelled"  # absent until the deal is cancelled

    # Written by create_deal and never changed after.
    FIXED = (MERCHANT, TITLE, DESC, LAT, LNG, TOTAL, STARTS, ENDS, REDEEM)
    # Changed by claims and cancellation.
    LIVE = (LEFT, CANCELLED, SEQ)
    ALL = (*FIXED, CREATED, *LIVE)


def new_deal_id() -> str:
    """A fresh, URL-safe deal id (64 random bits)."""
    return "d_" + secrets.token_hex(8)


# Deals share their times (on the hour, a campaign's end): 7 us each, worth remembering.
_rfc3339 = functools.lru_cache(maxsize=8_192)(to_rfc3339)


@dataclass(frozen=True, slots=True)
class NewDeal:
    """A validated request to create a deal; times in ms since the epoch."""

    merchant_id: str
    title: str
    description: str
    lat: float
    lng: float
    inventory: int
    starts_at_ms: int
    ends_at_ms: int
    redeem_until_ms: int


@dataclass(frozen=True, slots=True)
class Deal:
    """A deal as Redis holds it, read at ``now_ms`` (Redis's clock)."""

    id: str
    merchant_id: str
    title: str
    description: str
    lat: float
    lng: float
    inventory_total: int
    inventory_left: int
    seq: int
    starts_at_ms: int
    ends_at_ms: int
    redeem_until_ms: int
    cancelled_at_ms: int | None
    now_ms: int

    @classmethod
    def from_hash(cls, deal_id: str, h: dict[str, str], now_ms: int) -> Deal:
        """Build from the deal hash's fields (:class:`DealHash`)."""
        cancelled = h.get(DealHash.CANCELLED)
        return cls(
            id=deal_id,
            merchant_id=h[DealHash.MERCHANT],
            title=h[DealHash.TITLE],
            description=h.get(DealHash.DESC) or "",
            lat=float(h[DealHash.LAT]),
            lng=float(h[DealHash.LNG]),
            inventory_total=int(h[DealHash.TOTAL]),
            inventory_left=max(int(h[DealHash.LEFT]), 0),
            seq=int(h.get(DealHash.SEQ) or 0),
            starts_at_ms=int(h[DealHash.STARTS]),
            ends_at_ms=int(h[DealHash.ENDS]),
            redeem_until_ms=int(h[DealHash.REDEEM]),
            cancelled_at_ms=int(cancelled) if cancelled else None,
            now_ms=now_ms,
        )

    @property
    def status(self) -> str:
        """Live status; a sold-out deal past ``ends_at`` is ``ended``."""
        return deal_status(
            self.now_ms,
            self.starts_at_ms,
            self.ends_at_ms,
            self.inventory_left,
            self.cancelled_at_ms is not None,
        )

    def to_json(self) -> dict[str, Any]:
        """The API's ``Deal`` object (discovery serves it too, cut in fragments: ``render``)."""
        return {
            "id": self.id,
            "merchant_id": self.merchant_id,
            "title": self.title,
            "description": self.description,
            "lat": self.lat,
            "lng": self.lng,
            "inventory_total": self.inventory_total,
            "inventory_left": self.inventory_left,
            "starts_at": _rfc3339(self.starts_at_ms),
            "ends_at": _rfc3339(self.ends_at_ms),
            "redeem_until": _rfc3339(self.redeem_until_ms),
            "status": self.status,
        }


def deal_status(now_ms: int, starts_ms: int, ends_ms: int, left: int, cancelled: bool) -> str:
    """The status rule, in the API's order of precedence."""
    if cancelled:
        return CANCELLED
    if now_ms >= ends_ms:
        return ENDED
    if now_ms < starts_ms:
        return SCHEDULED
    if left <= 0:
        return SOLD_OUT
    return ACTIVE


def archive_times(redeem_until_ms: int, grace_ms: int) -> tuple[int, int]:
    """``(archive time, deadline)`` of a deal: the archiver may take it from the first
    (``redeem_until`` + grace); its Redis keys expire at the second if none did.

    The rule: the deadline is the archive time + max(grace, 7 days), so it never comes
    before every archiver had a whole grace period (and at least a week) to take the deal.
    """
    due = redeem_until_ms + grace_ms
    return due, due + max(grace_ms, ARCHIVE_BACKSTOP_MIN_MS)


def _pairs(flat: list[Any]) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


async def create_deal(store: Store, new: NewDeal, deal_id: str | None = None) -> Deal:
    """Store a deal, index it for discovery and log it for the persister."""
    deal_id = deal_id or new_deal_id()
    k = store.keys.for_deal(deal_id)
    due, deadline = archive_times(new.redeem_until_ms, int(store.settings.archive_grace_s * 1000))
    outcome, _created = await store.run(
        "create_deal",
        (k.deal, k.events, k.geo, k.geo_starts, k.geo_ends, k.archive),
        (
            store.settings.stream_cap,
            deal_id,
            new.merchant_id,
            new.title,
            new.description,
            repr(new.lat),
            repr(new.lng),
            new.inventory,
            new.starts_at_ms,
            new.ends_at_ms,
            new.redeem_until_ms,
            due,
            deadline,
        ),
    )
    if outcome == "backlog_full":
        raise BacklogFull()
    # 'exists' only follows a retried call that had already landed (ids are random).
    return await get_deal(store, deal_id)


async def get_deal(store: Store, deal_id: str) -> Deal:
    """Read a deal with live status; ``DealNotFound`` if there is none."""
    k = store.keys.for_deal(deal_id)
    reply = await store.run("read_deal", (k.deal,), ())
    if len(reply) < 2:
        raise DealNotFound(deal_id=deal_id)
    return Deal.from_hash(deal_id, _pairs(reply[1:]), int(reply[0]))


async def cancel_deal(store: Store, deal_id: str, merchant_id: str) -> Deal:
    """Stop new claims at once (idempotent); only the owning merchant may."""
    k = store.keys.for_deal(deal_id)
    outcome, _at = await store.run(
        "cancel_deal", (k.deal, k.events, k.geo), (merchant_id, deal_id, store.settings.stream_cap)
    )
    if outcome == "not_found":
        raise DealNotFound(deal_id=deal_id)
    if outcome == "forbidden":
        raise Forbidden("Only the merchant who owns this deal may cancel it.")
    if outcome == "backlog_full":
        raise BacklogFull()
    return await get_deal(store, deal_id)
