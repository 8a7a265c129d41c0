"""Redemptions: online at the till, or offline logs synced later.

Every decision is one Lua call (``redeem_voucher``) in the voucher's partition, keyed on
the voucher id (``jti``), never on the token string: an ECDSA signature has more than one
valid encoding, so two different strings can carry one voucher. First accepted wins; a
later redemption by another entry is a conflict, logged for review.

A voucher's first accepted redemption is kept in its deal's redemptions hash as
:func:`redemption_value` (``at|device|entry|merchant``); :func:`parse_redemption` reads it.

Sync uploads are idempotent per ``(merchant, entry_id)``: a per-merchant hash keeps the
first result of each entry that named a voucher of this merchant. An entry refused before
that (no entry id, no valid voucher, another merchant's voucher) leaves nothing behind and
is judged afresh if sent again, so that nothing a merchant uploads grows the server's
state beyond its own vouchers. The order is check, redeem, record; a crash between redeem
and record is healed because the script answers a voucher already redeemed by the same
entry with that same ``accepted`` result.

Bounds, whatever a merchant uploads:

- kept results: at most :data:`MAX_KEPT_PER_VOUCHER` entries per voucher (its first
  accepted redemption is kept beyond it), counted in the same hash (``#<voucher>``), so
  a merchant's sync hash holds at most ``(MAX_KEPT_PER_VOUCHER + 2)`` fields per voucher
  of its own that its entries named. An entry past that quota gets its answer like any
  other (in practice ``conflict``: the voucher's first redemption is always kept) but
  leaves nothing, so it is judged afresh if sent again: the contract's codes are kept.
  Real tills scan a voucher a handful of times; the quota only stops a loop or a forger.
- conflict events (``redeem_conflict``, kept in PostgreSQL for review): an entry past its
  voucher's quota is not sent to the script once the voucher is known to be redeemed by
  another entry, so a voucher logs at most the quota's worth of conflicts per upload
  (concurrent uploads of one voucher may each log theirs before the quota is recorded).
- CPU: each distinct token string in an upload is verified once (ES256 is ~0.1 ms).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from engine import feed
from engine.errors import (
    AlreadyRedeemed,
    BacklogFull,
    InvalidVoucher,
    NotYourVoucher,
)
from engine.keys import merchant_feed_key, sync_entries_key
from engine.store import Store
from engine.times import parse_rfc3339, to_rfc3339

if TYPE_CHECKING:  # engine.vouchers reads redemption values with parse_redemption
    from engine.vouchers import VoucherSigner, VoucherToken

MAX_SYNC_ENTRIES = 1000
# A merchant's entry results are kept this long after its last upload: longer than any
# voucher lives (120 days), so a re-sent entry is always recognised while it matters.
SYNC_ENTRIES_TTL_S = 180 * 86_400
# Verify this many tokens, then let other requests run (a token costs ~0.1 ms of CPU).
_VERIFY_SLICE = 64
# Entries naming one voucher whose results a merchant's sync hash keeps, at most.
MAX_KEPT_PER_VOUCHER = 10

ACCEPTED, DUPLICATE, CONFLICT, REJECTED = "accepted", "duplicate", "conflict", "rejected"
STATUSES = (ACCEPTED, DUPLICATE, CONFLICT, REJECTED)
# Rejections of an entry that named a voucher of this merchant: kept like accepted and
# conflict. The others (missing_entry_id, invalid_voucher, not_your_voucher) are not.
KEPT_REJECTIONS = ("expired", "implausible_time")
# Every code a rejected entry may carry.
SYNC_CODES = (
    "invalid_voucher",
    "not_your_voucher",
    "missing_entry_id",
    *KEPT_REJECTIONS,
)


def redemption_value(redeemed_at_ms: int, device_id: str, entry_id: str, merchant_id: str) -> str:
    """A redemptions-hash value, as ``redeem_voucher.lua`` writes it: ``at|device|entry|merchant``.

    Device and entry are URL-safe ids without ``|`` (empty online); the merchant goes last
    because a caller id may hold any character.
    """
    return f"{redeemed_at_ms}|{device_id}|{entry_id}|{merchant_id}"


def parse_redemption(value: str) -> tuple[int, str, str, str]:
    """``(redeemed_at_ms, device_id, entry_id, merchant_id)`` from a redemptions-hash value."""
    at, device_id, entry_id, merchant_id = value.split("|", 3)
    return int(at), device_id, entry_id, merchant_id


@dataclass(frozen=True, slots=True)
class Redemption:
    """An accepted online redemption."""

    voucher_id: str
    redeemed_at_ms: int

    def to_json(self) -> dict[str, Any]:
        return {
            "voucher_id": self.voucher_id,
            "redeemed_at": to_rfc3339(self.redeemed_at_ms),
            "status": "redeemed",
        }


async def _run(
    store: Store,
    verified: VoucherToken,
    merchant_id: str,
    device_id: str,
    entry_id: str,
    at_ms: int | None,
) -> tuple[str, int, int]:
    k = store.keys.for_deal(verified.deal_id)
    # Online, the time is Redis's own clock: no device drift to allow for.
    drift_ms = 0 if at_ms is None else store.settings.device_clock_drift_ms
    outcome, at, first_at = await store.run(
        "redeem_voucher",
        (
            k.redemptions,
            k.vouchers,
            k.claimers,
            k.events,
            merchant_feed_key(k.partition, merchant_id),
        ),
        (
            verified.voucher_id,
            verified.deal_id,
            verified.user_id,
            merchant_id,
            device_id,
            entry_id,
            "" if at_ms is None else at_ms,
            verified.expires_at_s * 1000,
            drift_ms,
            store.settings.stream_cap,
            feed.RETENTION_MS,
            feed.MIN_TTL_MS,
        ),
    )
    if outcome == "backlog_full":
        raise BacklogFull()
    return str(outcome), int(at), int(first_at)


async def redeem(
    store: Store, signer: VoucherSigner, token: object, merchant_id: str
) -> Redemption:
    """Redeem a voucher now, at ``merchant_id``'s till.

    Raises ``InvalidVoucher`` (422), ``NotYourVoucher`` (403), ``AlreadyRedeemed`` (409),
    or ``Unavailable`` (503).
    """
    verified = signer.verify(token)  # type: ignore[arg-type]
    if verified.merchant_id != merchant_id:
        raise NotYourVoucher()
    outcome, at, first_at = await _run(store, verified, merchant_id, "", "", None)
    if outcome == ACCEPTED:
        return Redemption(verified.voucher_id, at)
    if outcome == "already":
        raise AlreadyRedeemed(redeemed_at=to_rfc3339(first_at), voucher_id=verified.voucher_id)
    if outcome == "expired":
        raise InvalidVoucher("This voucher has expired.", reason="expired")
    if outcome == "unknown":
        raise InvalidVoucher("No such voucher was issued.", reason="unknown voucher")
    # 'implausible' online means Redis's clock is behind the claim (a failover): not yet.
    raise InvalidVoucher("This voucher is not valid yet.", reason="not yet valid")


# -- sync ---------------------------------------------------------------------


@dataclass(slots=True)
class _Entry:
    index: int
    entry_id: str | None
    token: object
    redeemed_at: object
    result: dict[str, Any] | None = None
    verified: VoucherToken | None = None
    at_ms: int = 0
    # Past its voucher's quota: answered, but its result is not remembered.
    unkept: bool = False


def _result(
    entry_id: str | None,
    status: str,
    code: str | None = None,
    first_ms: int | None = None,
    message: str | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "entry_id": entry_id,
        "status": status,
        "code": code,
        "first_redeemed_at": to_rfc3339(first_ms) if first_ms else None,
    }
    if message:
        out["message"] = message
    return out


def _rejected(entry_id: str | None, code: str, message: str) -> dict[str, Any]:
    return _result(entry_id, REJECTED, code, message=message)


def _pack(result: dict[str, Any], first_ms: int | None) -> bytes:
    return orjson.dumps({"s": result["status"], "c": result["code"], "f": first_ms or 0})


def _duplicate(entry_id: str, packed: str | bytes) -> dict[str, Any]:
    first = orjson.loads(packed)
    out = _result(entry_id, DUPLICATE, None, int(first.get("f") or 0) or None)
    out["first_status"] = first.get("s")
    out["first_code"] = first.get("c")
    return out


def _parse(raw: object, index: int, valid_id: Any) -> _Entry:
    if not isinstance(raw, dict):
        entry = _Entry(index, None, None, None)
        entry.result = _rejected(None, "missing_entry_id", "An entry must be a JSON object.")
        return entry
    entry_id = raw.get("entry_id")
    entry = _Entry(index, None, raw.get("token"), raw.get("redeemed_at"))
    if not isinstance(entry_id, str) or not valid_id(entry_id):
        shown = entry_id if isinstance(entry_id, str) and len(entry_id) <= 64 else None
        entry.result = _rejected(
            shown, "missing_entry_id", "entry_id must be 1..64 URL-safe characters."
        )
        return entry
    entry.entry_id = entry_id
    return entry


def _check(
    entry: _Entry,
    signer: VoucherSigner,
    merchant_id: str,
    seen: dict[str, VoucherToken | str],
) -> bool:
    """Verify the token and the device time; set ``entry.result`` if it is rejected.

    ``seen`` holds this upload's verdicts by token string (a token or why it is not one):
    each distinct token is verified once. Returns whether this one was verified now.
    """
    token = entry.token
    verdict = seen.get(token) if isinstance(token, str) else None
    fresh = verdict is None
    if verdict is None:
        try:
            verdict = signer.verify(token)  # type: ignore[arg-type]
        except InvalidVoucher as exc:
            verdict = exc.message
        if isinstance(token, str):
            seen[token] = verdict
    if isinstance(verdict, str):
        entry.result = _rejected(entry.entry_id, "invalid_voucher", verdict)
        return fresh
    entry.verified = verdict
    if entry.verified.merchant_id != merchant_id:
        entry.result = _rejected(
            entry.entry_id, "not_your_voucher", "This voucher belongs to another merchant."
        )
        return fresh
    try:
        if not isinstance(entry.redeemed_at, str):
            raise ValueError
        entry.at_ms = parse_rfc3339(entry.redeemed_at)
    except (ValueError, OverflowError):
        entry.result = _rejected(
            entry.entry_id, "implausible_time", "redeemed_at must be an RFC 3339 time."
        )
    return fresh


async def _redeem_in_order(
    store: Store, entries: list[_Entry], merchant_id: str, device_id: str, room: int
) -> None:
    """Redeem one voucher's entries in the order sent: the earlier one is first.

    ``room`` is how many more of this voucher's entries the merchant's sync hash may keep.
    Past it, an entry is sent to the script only while it could still be the voucher's
    first redemption (or that redemption replayed); its result would not be kept anyway.
    """
    # The voucher's first redemption, (entry, merchant), and its time once known; "" if
    # none yet.
    first: tuple[str, str] | str | None = None
    first_ms: int | None = None
    for entry in entries:
        assert entry.verified is not None and entry.entry_id is not None
        if room <= 0:
            if first is None:
                k = store.keys.for_deal(entry.verified.deal_id)
                value = await store.hget(k.redemptions, entry.verified.voucher_id)
                first = ""
                if value:
                    first_ms, _device, first_entry, first_merchant = parse_redemption(value)
                    first = (first_entry, first_merchant)
            if first and first != (entry.entry_id, merchant_id) and first_ms is not None:
                # A conflict, answered as one; neither remembered nor logged once more.
                entry.result = _result(entry.entry_id, CONFLICT, None, first_ms)
                entry.unkept = True
                continue
        outcome, _at, first_at = await _run(
            store, entry.verified, merchant_id, device_id, entry.entry_id, entry.at_ms
        )
        if outcome == ACCEPTED:
            first, first_ms = (entry.entry_id, merchant_id), first_at
        elif outcome == CONFLICT:
            first, first_ms = ("", ""), first_at  # another entry's: whose does not matter
        if outcome == ACCEPTED:
            entry.result = _result(entry.entry_id, ACCEPTED, None, first_at)
        elif outcome == CONFLICT:
            entry.result = _result(entry.entry_id, CONFLICT, None, first_at)
        elif outcome == "expired":
            entry.result = _rejected(
                entry.entry_id, "expired", "The voucher was redeemed after it expired."
            )
        elif outcome == "implausible":
            drift_s = store.settings.device_clock_drift_ms // 1000
            entry.result = _rejected(
                entry.entry_id,
                "implausible_time",
                f"redeemed_at is more than {drift_s} s ahead of the server's clock "
                f"or more than {drift_s} s before the voucher was claimed.",
            )
        else:  # 'unknown' ('already' is online only)
            entry.result = _rejected(
                entry.entry_id, "invalid_voucher", "No such voucher was issued."
            )
        if _kept(entry.result):
            entry.unkept = room <= 0 and outcome != ACCEPTED
            room -= 1


async def sync(
    store: Store,
    signer: VoucherSigner,
    merchant_id: str,
    device_id: str,
    raw_entries: Sequence[object],
    valid_id: Any,
) -> list[dict[str, Any]]:
    """Apply an offline log; one result per entry, in the order sent.

    ``valid_id`` tells a usable entry id (the API's identifier rule). A bad entry is
    rejected on its own; only Redis being unreachable fails the upload (503), and a
    retried upload then gets the same answers.
    """
    if len(raw_entries) > MAX_SYNC_ENTRIES:
        raise ValueError(f"at most {MAX_SYNC_ENTRIES} entries")
    entries = [_parse(raw, i, valid_id) for i, raw in enumerate(raw_entries)]
    key = sync_entries_key(merchant_id)

    # 1. Entries this merchant sent before: the first result stands.
    ids = list(dict.fromkeys(e.entry_id for e in entries if e.entry_id is not None))
    known: dict[str, Any] = {}
    if ids:
        values = await store.hmget(key, *ids)
        known = {i: v for i, v in zip(ids, values, strict=True) if v is not None}
    first_in_batch: dict[str, _Entry] = {}
    later_in_batch: list[_Entry] = []
    for entry in entries:
        if entry.result is not None or entry.entry_id is None:
            continue
        if entry.entry_id in known:
            entry.result = _duplicate(entry.entry_id, known[entry.entry_id])
        elif entry.entry_id in first_in_batch:
            later_in_batch.append(entry)
        else:
            first_in_batch[entry.entry_id] = entry

    # 2. Verify tokens and device times (CPU), each distinct token once, a slice at a time.
    fresh = list(first_in_batch.values())
    seen: dict[str, VoucherToken | str] = {}
    verified_now = 0
    for entry in fresh:
        if _check(entry, signer, merchant_id, seen):
            verified_now += 1
            if verified_now % _VERIFY_SLICE == 0:
                await asyncio.sleep(0)

    # 3. Redeem: vouchers in parallel (one pipeline), each voucher's entries in order,
    #    each voucher within the room its quota of kept entries leaves.
    by_voucher: dict[str, list[_Entry]] = {}
    for entry in fresh:
        if entry.result is None and entry.verified is not None:
            by_voucher.setdefault(entry.verified.voucher_id, []).append(entry)
    if by_voucher:
        counts = await store.hmget(key, *(_count_field(v) for v in by_voucher))
        rooms = [MAX_KEPT_PER_VOUCHER - int(c or 0) for c in counts]
        # gather, not a TaskGroup: a TaskGroup wraps StoreUnavailable / BacklogFull in an
        # ExceptionGroup, which would surface as a 500 instead of their 503.
        outcomes = await asyncio.gather(
            *(
                _redeem_in_order(store, group, merchant_id, device_id, room)
                for group, room in zip(by_voucher.values(), rooms, strict=True)
            ),
            return_exceptions=True,
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    # 4. Record the first results that are kept, within each voucher's quota (exactly:
    #    concurrent uploads meet in one script); the others are judged afresh when sent
    #    again. An entry a concurrent upload recorded first keeps that upload's result.
    kept = [
        entry
        for entry in fresh
        if entry.result is not None and _kept(entry.result) and not entry.unkept
    ]
    if kept:
        args: list[Any] = [MAX_KEPT_PER_VOUCHER, SYNC_ENTRIES_TTL_S]
        for entry in kept:
            assert entry.result is not None and entry.verified is not None
            packed = _pack(entry.result, _first_ms(entry.result))
            accepted = "1" if entry.result["status"] == ACCEPTED else "0"
            args += [entry.entry_id, entry.verified.voucher_id, packed, accepted]
        # An entry the script does not keep (a concurrent upload filled the quota first)
        # stays answered but not remembered, like any entry past the quota.
        await store.run("record_sync", (key,), args)
    for entry in later_in_batch:
        assert entry.entry_id is not None
        first = first_in_batch[entry.entry_id].result
        assert first is not None
        entry.result = _duplicate(entry.entry_id, _pack(first, _first_ms(first)))

    out = []
    for entry in entries:
        assert entry.result is not None
        out.append(entry.result)
    return out


def _count_field(voucher_id: str) -> str:
    """The sync-hash field counting a voucher's kept entries (``record_sync.lua``)."""
    return "#" + voucher_id


def _kept(result: dict[str, Any]) -> bool:
    """Whether an entry's first result is remembered (the entry named this merchant's voucher)."""
    return result["status"] in (ACCEPTED, CONFLICT) or result["code"] in KEPT_REJECTIONS


def _first_ms(result: dict[str, Any]) -> int | None:
    first = result.get("first_redeemed_at")
    return parse_rfc3339(first) if first else None
