"""Claims: the race for a deal's vouchers, decided by one Lua call (``claim_voucher``).

Three names, three ideas: a :class:`Voucher` is what a user holds (as the claimers hash
stores it: :func:`holder_value`); a :class:`ClaimResult` is what one claim call decided
(the voucher, whether this call issued it, the stock left); a verified voucher *token*
is :class:`engine.vouchers.VoucherToken`.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from engine.errors import (
    BacklogFull,
    DealCancelled,
    DealEnded,
    DealNotFound,
    DealNotStarted,
    FlashsaleError,
    SoldOut,
)
from engine.store import Store

CLAIMED = "claimed"
ALREADY = "already"

# Refusals, by the script's outcome; the API's order of precedence lives in the script.
_REFUSALS: dict[str, type[FlashsaleError]] = {
    "not_found": DealNotFound,
    "cancelled": DealCancelled,
    "not_started": DealNotStarted,
    "ended": DealEnded,
    "sold_out": SoldOut,
    "backlog_full": BacklogFull,
}


def new_voucher_id(deal_id: str) -> str:
    """A fresh voucher id that names its deal, so a holder's lookup needs no index."""
    return f"v{secrets.token_hex(8)}.{deal_id}"


def deal_of_voucher(voucher_id: str) -> str | None:
    """The deal id inside a voucher id, or ``None`` if it is not one of ours."""
    head, sep, deal_id = voucher_id.partition(".")
    return deal_id if sep and head.startswith("v") and deal_id else None


def holder_value(voucher_id: str, seq: int, claimed_at_ms: int) -> str:
    """A claimers-hash value, as ``claim_voucher.lua`` writes it: ``voucher|seq|at``."""
    return f"{voucher_id}|{seq}|{claimed_at_ms}"


def parse_holder(value: str) -> tuple[str, int, int]:
    """``(voucher_id, seq, claimed_at_ms)`` from a claimers-hash value."""
    voucher_id, seq, claimed_at = value.split("|", 2)
    return voucher_id, int(seq), int(claimed_at)


@dataclass(frozen=True, slots=True)
class Voucher:
    """A voucher a user holds: one deal's ``seq``-th, claimed at ``claimed_at_ms``."""

    voucher_id: str
    deal_id: str
    user_id: str
    merchant_id: str
    seq: int
    claimed_at_ms: int
    redeem_until_ms: int


@dataclass(frozen=True, slots=True)
class ClaimResult:
    """What one claim call decided: the caller's voucher, and whether this call issued it."""

    voucher: Voucher
    is_new: bool
    inventory_left: int

    @property
    def outcome(self) -> str:
        """The script's outcome: ``claimed`` (issued now) or ``already`` (held before)."""
        return CLAIMED if self.is_new else ALREADY


async def claim(store: Store, deal_id: str, user_id: str) -> ClaimResult:
    """Take one voucher for ``user_id``, or return the one they hold.

    Raises the refusal's error (``SoldOut``, ``DealEnded``...) or ``StoreUnavailable``.
    """
    k = store.keys.for_deal(deal_id)
    reply = await store.run(
        "claim_voucher",
        (k.deal, k.claimers, k.events, k.geo, k.vouchers),
        (user_id, new_voucher_id(deal_id), store.settings.stream_cap, deal_id),
    )
    outcome = reply[0]
    if outcome != CLAIMED and outcome != ALREADY:
        raise _REFUSALS[outcome](deal_id=deal_id)
    voucher = Voucher(
        voucher_id=reply[1],
        deal_id=deal_id,
        user_id=user_id,
        merchant_id=reply[5],
        seq=int(reply[2]),
        claimed_at_ms=int(reply[3]),
        redeem_until_ms=int(reply[6]),
    )
    return ClaimResult(voucher, is_new=outcome == CLAIMED, inventory_left=max(int(reply[4]), 0))
