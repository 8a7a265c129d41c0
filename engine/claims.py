"""Claims: the race for a deal's vouchers, decided by one Lua call (``claim_voucher``).

Three names, three ideas: a :class:`Voucher` is what a user holds (as the claimers hash
stores it: :func:`holder_value`); a :class:`ClaimResult` is what one claim call decided
(the voucher, whether this call issued it, the stock left); a verified voucher *token*
is :class:`engine.vouchers.VoucherToken`.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
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
from engine.limits import Charge, limit_args, refusal
from engine.store import Store

CLAIMED = "claimed"
ALREADY = "already"
RATE_LIMITED = "rate_limited"

# Refusals, by the script's outcome; the API's order of precedence lives in the script.
_REFUSALS: dict[str, type[FlashsaleError]] = {
    "not_found": DealNotFound,
    "cancelled": DealCancelled,
    "not_started": DealNotStarted,
    "ended": DealEnded,
    "sold_out": SoldOut,
    "backlog_full": BacklogFull,
}


def limiting_in_claims(store: Store) -> bool:
    """Whether a claim's rate limits ride in its own script call: on one node, where its
    limiter keys may sit beside its deal's (on a cluster each limiter key is its own
    slot, and the limits are a call of their own before the claim)."""
    return not store.settings.redis_cluster


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


async def claim(
    store: Store, deal_id: str, user_id: str, limits: Sequence[Charge] = ()
) -> ClaimResult:
    """Take one voucher for ``user_id``, or return the one they hold.

    ``limits``: rate limits to count this request against first, in the same call (one
    node only: ``limiting_in_claims``); over one of them, nothing else is read or written.
    Raises the refusal's error (``RateLimited``, ``SoldOut``, ``DealEnded``...) or
    ``StoreUnavailable``.
    """
    k = store.keys.for_deal(deal_id)
    keys = [k.deal, k.claimers, k.events, k.geo, k.vouchers]
    args: list[str | int] = [user_id, new_voucher_id(deal_id), store.settings.stream_cap, deal_id]
    if limits:
        if not limiting_in_claims(store):
            raise ValueError("a claim counts its own rate limits on one node only")
        limit_keys, limit_values = limit_args(limits)
        keys += limit_keys
        args += limit_values
    reply = await store.run("claim_voucher", keys, args)
    outcome = reply[0]
    if outcome != CLAIMED and outcome != ALREADY:
        if outcome == RATE_LIMITED:
            raise refusal(limits, int(reply[2]), int(reply[1]))
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
