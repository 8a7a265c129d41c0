"""Claims under real concurrency: never oversell, never two vouchers for one person."""

from __future__ import annotations

import asyncio

import pytest

from engine import claims
from engine.deals import cancel_deal, create_deal, get_deal
from engine.errors import (
    BacklogFull,
    DealCancelled,
    DealEnded,
    DealNotFound,
    DealNotStarted,
    SoldOut,
)
from engine.settings import Settings
from engine.store import Store
from tests.helpers import new_deal


async def _claim_or_refusal(store: Store, deal_id: str, user: str) -> claims.ClaimResult | str:
    try:
        return await claims.claim(store, deal_id, user)
    except SoldOut:
        return "sold_out"


async def test_5000_claimers_over_100_connections_get_exactly_the_inventory(
    settings: Settings,
) -> None:
    """5,000 people race for 100 vouchers over 100 separate connections: exactly 100 win."""
    stores = [await Store.connect(settings) for _ in range(100)]
    try:
        deal = await create_deal(stores[0], new_deal(100))

        async def storm(i: int, store: Store) -> list[claims.ClaimResult | str]:
            users = [f"u-{i}-{j}" for j in range(50)]
            return await asyncio.gather(*(_claim_or_refusal(store, deal.id, u) for u in users))

        results = [
            r for batch in await asyncio.gather(*map(storm, range(100), stores)) for r in batch
        ]
    finally:
        for s in stores:
            await s.close()

    won = [r.voucher for r in results if isinstance(r, claims.ClaimResult)]
    assert len(results) == 5000
    assert len(won) == 100
    assert all(r.is_new for r in results if isinstance(r, claims.ClaimResult))
    assert len({c.user_id for c in won}) == 100
    assert len({c.voucher_id for c in won}) == 100
    assert sorted(c.seq for c in won) == list(range(1, 101))
    assert all(r.inventory_left >= 0 for r in results if isinstance(r, claims.ClaimResult))
    assert results.count("sold_out") == 4900
    store = await Store.connect(settings)
    try:
        after = await get_deal(store, deal.id)
        k = store.keys.for_deal(deal.id)
        raw_left = await store.client.hget(k.deal, "left")
        holders = await store.client.hlen(k.claimers)
        events = await store.client.xrange(k.events)
    finally:
        await store.close()
    assert after.inventory_left == 0 and int(raw_left) == 0
    assert after.status == "sold_out"
    assert holders == 100
    claim_events = [f for _, f in events if f["type"] == "claim"]
    assert len(claim_events) == 100
    assert {e["voucher"] for e in claim_events} == {c.voucher_id for c in won}


async def test_one_person_firing_25_concurrent_claims_gets_one_voucher(store: Store) -> None:
    """25 concurrent claims by one user: one new voucher, 24 answers of that same voucher."""
    deal = await create_deal(store, new_deal(10))
    results = await asyncio.gather(*(claims.claim(store, deal.id, "u-1") for _ in range(25)))
    assert sum(r.is_new for r in results) == 1
    assert {r.voucher.voucher_id for r in results} == {results[0].voucher.voucher_id}
    assert {r.voucher.seq for r in results} == {1}
    assert (await get_deal(store, deal.id)).inventory_left == 9


async def test_retry_returns_the_same_voucher_whatever_the_deal_state(store: Store) -> None:
    """A holder's retry answers the same voucher after sell-out and after cancellation."""
    deal = await create_deal(store, new_deal(1))
    first = await claims.claim(store, deal.id, "u-1")
    assert first.is_new and first.inventory_left == 0
    with pytest.raises(SoldOut):
        await claims.claim(store, deal.id, "u-2")
    again = await claims.claim(store, deal.id, "u-1")
    assert (again.is_new, again.voucher) == (False, first.voucher)
    assert again.outcome == "already" and first.voucher.seq == 1
    await cancel_deal(store, deal.id, "m-1")
    after_cancel = await claims.claim(store, deal.id, "u-1")
    assert after_cancel.voucher == first.voucher


async def test_claim_carries_what_signing_needs(store: Store) -> None:
    """The claim reply names the merchant and the redeem-until time of the deal."""
    spec = new_deal(3, merchant_id="m-77")
    deal = await create_deal(store, spec)
    c = (await claims.claim(store, deal.id, "u-9")).voucher
    assert c.merchant_id == "m-77"
    assert c.redeem_until_ms == spec.redeem_until_ms
    assert claims.deal_of_voucher(c.voucher_id) == deal.id


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"starts_in_ms": 3_600_000}, DealNotStarted),
        ({"starts_in_ms": -7_200_000, "lasts_ms": 3_600_000}, DealEnded),
    ],
)
async def test_claims_outside_the_window_are_refused(
    store: Store, kwargs: dict[str, int], error: type[Exception]
) -> None:
    """Before starts_at and from ends_at on, a claim takes nothing."""
    deal = await create_deal(store, new_deal(5, **kwargs))
    with pytest.raises(error):
        await claims.claim(store, deal.id, "u-1")
    assert (await get_deal(store, deal.id)).inventory_left == 5


async def test_refusal_order_cancelled_before_window_and_stock(store: Store) -> None:
    """A cancelled deal answers `cancelled` even when it is also ended or sold out."""
    deal = await create_deal(store, new_deal(1, starts_in_ms=-7_200_000, lasts_ms=3_600_000))
    await cancel_deal(store, deal.id, "m-1")
    with pytest.raises(DealCancelled):
        await claims.claim(store, deal.id, "u-1")


async def test_sold_out_past_end_answers_ended(store: Store) -> None:
    """An ended deal answers `ended`, whatever its stock (the window is judged first)."""
    deal = await create_deal(store, new_deal(1, starts_in_ms=-100, lasts_ms=700))
    await claims.claim(store, deal.id, "u-1")
    await asyncio.sleep(0.7)
    with pytest.raises(DealEnded):
        await claims.claim(store, deal.id, "u-2")
    assert (await get_deal(store, deal.id)).status == "ended"


async def test_unknown_deal_is_not_found_not_a_script_error(store: Store) -> None:
    """A missing key means `no such deal`."""
    with pytest.raises(DealNotFound):
        await claims.claim(store, "d_nope", "u-1")


async def test_stream_cap_refuses_new_claims_but_not_retries(settings: Settings) -> None:
    """At the stream cap new claims are refused and take nothing; holders still get theirs."""
    store = await Store.connect(settings.with_(stream_cap=3))
    try:
        deal = await create_deal(store, new_deal(10))  # event 1
        held = await claims.claim(store, deal.id, "u-1")  # event 2
        await claims.claim(store, deal.id, "u-2")  # event 3: the stream is at its cap
        with pytest.raises(BacklogFull):
            await claims.claim(store, deal.id, "u-3")
        again = await claims.claim(store, deal.id, "u-1")
        assert again.voucher == held.voucher
        assert (await get_deal(store, deal.id)).inventory_left == 8
    finally:
        await store.close()


async def test_the_claimers_value_is_what_claim_voucher_lua_writes_and_reads(
    store: Store,
) -> None:
    """holder_value / parse_holder pair with the script: it writes one, and reads one back."""
    deal = await create_deal(store, new_deal(10))
    k = store.keys.for_deal(deal.id)
    won = (await claims.claim(store, deal.id, "u-1")).voucher
    written = await store.client.hget(k.claimers, "u-1")
    assert written == claims.holder_value(won.voucher_id, won.seq, won.claimed_at_ms)
    assert claims.parse_holder(written) == (won.voucher_id, won.seq, won.claimed_at_ms)
    # As rebuild-redis restores a holder: the script answers that voucher, issues nothing.
    restored = claims.new_voucher_id(deal.id)
    await store.client.hset(k.claimers, "u-2", claims.holder_value(restored, 7, 1_234_567))
    again = await claims.claim(store, deal.id, "u-2")
    assert not again.is_new
    assert (again.voucher.voucher_id, again.voucher.seq, again.voucher.claimed_at_ms) == (
        restored,
        7,
        1_234_567,
    )
