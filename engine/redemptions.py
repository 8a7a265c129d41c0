"""Redemptions: online at the till, or offline logs synced later.

Every decision is one Lua call (``redeem_voucher``) in the voucher's partition, keyed on
the voucher id (``jti``), never on the token string: an ECDSA signature has more than one
valid encoding, so two different strings can carry one voucher. First accepted wins; a
later redemption by another entry is a conflict, logged for review.

A voucher's first accepted redemption is kept in its deal's redemptions hash as
:func:`redemption_value` (``at|device|entry|merchant``); :func:`parse_redemption` reads it.

Sync uploads are idempotent per ``(merchant, entry_id)``: per-merchant hashes keep the
first result of each entry that named a voucher of this merchant, one hash per month in
which those vouchers expire (the token's ``exp``: signed, so trustworthy once verified,
and at most 120 days after the claim), each kept until :data:`SYNC_RESULTS_KEPT_MS` after
its month ends and never renewed: a merchant's sync state is bounded in time, however
often it uploads. An entry refused before
that (no entry id, no valid voucher, another merchant's voucher) leaves nothing behind and
is judged afresh if sent again, so that nothing a merchant uploads grows the server's
state beyond its own vouchers. The order is check, redeem, record; a crash between redeem
and record is healed because the script answers a voucher already redeemed by the same
entry with that same ``accepted`` result.

Bounds, whatever a merchant uploads:

- kept results: at most :data:`MAX_KEPT_PER_VOUCHER` entries per voucher (its first
  accepted redemption is kept beyond it), counted in the same hash (``#<voucher>``), so
  a merchant's sync hashes hold at most ``(MAX_KEPT_PER_VOUCHER + 2)`` fields per voucher
  of its own that its entries named. An entry past that quota gets its answer like any
  other (in practice ``conflict``: the voucher's first redemption is always kept) but
  leaves nothing, so it is judged afresh if sent again: the contract's codes are kept.
  Real tills scan a voucher a handful of times; the quota only stops a loop or a forger.
- conflict events (``redeem_conflict``, kept in PostgreSQL for review): an entry past its
  voucher's quota is not sent to the script once the voucher is known to be redeemed by
  another entry, so a voucher logs at most the quota's worth of conflicts per upload
  (concurrent uploads of one voucher may each log theirs before the quota is recorded).
- CPU: each distinct token string in an upload is verified once (ES256 is ~0.1 ms).

A voucher whose deal was archived (docs/lifecycle.md) is no longer in Redis: the script
answers ``unknown``, and an :class:`ArchivedVouchers` (PostgreSQL, given by the API)
decides it by the same rules, so that a late upload gets the answer it would have got.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from engine import base64url, feed
from engine.errors import (
    AlreadyRedeemed,
    BacklogFull,
    InvalidVoucher,
    NotYourVoucher,
)
from engine.keys import merchant_feed_key, sync_entries_key
from engine.store import Store
from engine.times import MS_PER_DAY, parse_rfc3339, to_rfc3339

if TYPE_CHECKING:  # engine.vouchers reads redemption values with parse_redemption
    from engine.vouchers import VoucherSigner, VoucherToken

MAX_SYNC_ENTRIES = 1000
# A merchant's entry results are kept this long after the end of the month in which their
# voucher expires (API.md: 180 days). A result that has gone is judged afresh if its entry
# comes again, with the same answer: accepted (the first redemption names this entry),
# conflict, or the same rejection.
SYNC_RESULTS_KEPT_MS = 180 * MS_PER_DAY
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


class ArchivedVouchers(Protocol):
    """Decides redemptions of vouchers whose deal has left Redis, as ``redeem_voucher.lua``
    would have (``api/archive.py``, in PostgreSQL)."""

    async def redeem(
        self,
        verified: VoucherToken,
        merchant_id: str,
        device_id: str,
        entry_id: str,
        at_ms: int | None,
        now_ms: int,
        drift_ms: int,
    ) -> tuple[str, int, int] | None:
        """``(outcome, at_ms, first_at_ms)`` as the script returns them; None if the
        voucher's deal is not archived (Redis's ``unknown`` stands)."""
        ...


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
    archive: ArchivedVouchers | None,
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
    if outcome == "unknown" and archive is not None:
        now = await store.server_time_ms()
        decided = await archive.redeem(
            verified, merchant_id, device_id, entry_id, at_ms, now, drift_ms
        )
        if decided is not None:
            return decided
    return str(outcome), int(at), int(first_at)


async def redeem(
    store: Store,
    signer: VoucherSigner,
    token: object,
    merchant_id: str,
    archive: ArchivedVouchers | None = None,
) -> Redemption:
    """Redeem a voucher now, at ``merchant_id``'s till.

    Raises ``InvalidVoucher`` (422), ``NotYourVoucher`` (403), ``AlreadyRedeemed`` (409),
    or ``Unavailable`` (503).
    """
    verified = signer.verify(token)  # type: ignore[arg-type]
    if verified.merchant_id != merchant_id:
        raise NotYourVoucher()
    outcome, at, first_at = await _run(store, verified, merchant_id, "", "", None, archive)
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
    store: Store,
    entries: list[_Entry],
    merchant_id: str,
    device_id: str,
    room: int,
    archive: ArchivedVouchers | None,
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
            store, entry.verified, merchant_id, device_id, entry.entry_id, entry.at_ms, archive
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
    archive: ArchivedVouchers | None = None,
) -> list[dict[str, Any]]:
    """Apply an offline log; one result per entry, in the order sent.

    ``valid_id`` tells a usable entry id (the API's identifier rule). A bad entry is
    rejected on its own; only Redis being unreachable fails the upload (503), and a
    retried upload then gets the same answers.
    """
    if len(raw_entries) > MAX_SYNC_ENTRIES:
        raise ValueError(f"at most {MAX_SYNC_ENTRIES} entries")
    entries = [_parse(raw, i, valid_id) for i, raw in enumerate(raw_entries)]

    # 1. Entries this merchant sent before: the first result stands. Each is looked up in
    #    the month its token says the voucher expires (unverified: a forged exp only picks
    #    which hash is read, at most one per entry).
    by_key: dict[str, list[str]] = {}
    for e in entries:
        if e.entry_id is not None and e.result is None:
            exp_s = _peek_exp_s(e.token)
            if exp_s is not None:
                by_key.setdefault(sync_results_key(merchant_id, exp_s), []).append(e.entry_id)
    known: dict[str, Any] = {}
    if by_key:
        pipe = store.pipeline()
        keys = list(by_key.items())
        for key, ids in keys:
            pipe.hmget(key, *ids)
        for (_key, ids), values in zip(keys, await pipe.execute(), strict=True):
            known.update({i: v for i, v in zip(ids, values, strict=True) if v is not None})
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
        # A voucher's results and its count live in the hash of the month it expires (its
        # verified exp: every token of one voucher carries the same).
        pipe = store.pipeline()
        for voucher_id, group in by_voucher.items():
            verified = group[0].verified
            assert verified is not None
            pipe.hget(
                sync_results_key(merchant_id, verified.expires_at_s), _count_field(voucher_id)
            )
        counts = await pipe.execute()
        rooms = [MAX_KEPT_PER_VOUCHER - int(c or 0) for c in counts]
        # gather, not a TaskGroup: a TaskGroup wraps StoreUnavailable / BacklogFull in an
        # ExceptionGroup, which would surface as a 500 instead of their 503.
        outcomes = await asyncio.gather(
            *(
                _redeem_in_order(store, group, merchant_id, device_id, room, archive)
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
    #    One script call per month's hash (the hashes have no common hash tag: on a
    #    cluster they may live on different nodes); each expires at a fixed time, the
    #    same on every write: never renewed.
    kept: dict[str, list[_Entry]] = {}
    for entry in fresh:
        if entry.result is not None and _kept(entry.result) and not entry.unkept:
            assert entry.verified is not None  # kept results named a verified voucher
            key = sync_results_key(merchant_id, entry.verified.expires_at_s)
            kept.setdefault(key, []).append(entry)
    if kept:
        # An entry the script does not keep (a concurrent upload filled the quota first)
        # stays answered but not remembered, like any entry past the quota.
        recorded = await asyncio.gather(
            *(_record(store, key, group) for key, group in kept.items()),
            return_exceptions=True,
        )
        for outcome in recorded:
            if isinstance(outcome, BaseException):
                raise outcome
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


async def _record(store: Store, key: str, entries: list[_Entry]) -> None:
    """Keep these entries' first results in one month's sync hash (``record_sync.lua``)."""
    first = entries[0].verified
    assert first is not None
    expires_at_ms = _month_end_ms(_month(first.expires_at_s)) + SYNC_RESULTS_KEPT_MS
    args: list[Any] = [MAX_KEPT_PER_VOUCHER, expires_at_ms]
    for entry in entries:
        assert entry.result is not None and entry.verified is not None
        packed = _pack(entry.result, _first_ms(entry.result))
        accepted = "1" if entry.result["status"] == ACCEPTED else "0"
        args += [entry.entry_id, entry.verified.voucher_id, packed, accepted]
    await store.run("record_sync", (key,), args)


def _count_field(voucher_id: str) -> str:
    """The sync-hash field counting a voucher's kept entries (``record_sync.lua``)."""
    return "#" + voucher_id


def _peek_exp_s(token: object) -> int | None:
    """The ``exp`` a token's payload claims, unverified (None if there is none to read)."""
    from engine.vouchers import MAX_TIME_S, MAX_TOKEN_CHARS  # engine.vouchers imports us

    if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS:
        return None
    parts = token.strip().split(".")
    if len(parts) != 3:
        return None
    try:
        payload = orjson.loads(base64url.decode(parts[1]))
    except (ValueError, orjson.JSONDecodeError):
        return None
    exp = payload.get("exp") if isinstance(payload, dict) else None
    if not isinstance(exp, int) or isinstance(exp, bool) or not 0 <= exp <= MAX_TIME_S:
        return None
    return exp


def sync_results_key(merchant_id: str, expires_at_s: int) -> str:
    """Where a merchant's results about vouchers expiring at ``expires_at_s`` are kept."""
    return sync_entries_key(merchant_id, _month(expires_at_s))


def _month(exp_s: int) -> str:
    """``YYYYMM`` (UTC) of a time in seconds."""
    return time.strftime("%Y%m", time.gmtime(exp_s))


def _month_end_ms(month: str) -> int:
    """The first instant after ``month`` (``YYYYMM``), in ms."""
    year, mon = int(month[:4]), int(month[4:])
    year, mon = (year + 1, 1) if mon == 12 else (year, mon + 1)
    if year > 9999:  # a voucher expiring in December 9999
        return 253_402_300_800_000
    return int(datetime(year, mon, 1, tzinfo=UTC).timestamp() * 1000)


def _kept(result: dict[str, Any]) -> bool:
    """Whether an entry's first result is remembered (the entry named this merchant's voucher)."""
    return result["status"] in (ACCEPTED, CONFLICT) or result["code"] in KEPT_REJECTIONS


def _first_ms(result: dict[str, Any]) -> int | None:
    first = result.get("first_redeemed_at")
    return parse_rfc3339(first) if first else None
