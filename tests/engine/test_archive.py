"""The archive, Redis side: the index, the keys' deadline, and archive_deal's refusals."""

from __future__ import annotations

import pytest
from redis.crc import key_slot

from engine import claims, redemptions
from engine.archive import count_due, deal_states, due_deals, redeemed_vouchers, remove_deal
from engine.deals import ARCHIVE_BACKSTOP_MIN_MS, archive_times, cancel_deal, create_deal
from engine.keys import archive_key
from engine.store import Store
from engine.times import MS_PER_DAY
from engine.vouchers import VoucherSigner
from tests.helpers import new_deal


def _keys(store: Store, deal_id: str) -> list[str]:
    k = store.keys.for_deal(deal_id)
    return [k.deal, k.claimers, k.vouchers, k.redemptions]


def test_the_deadline_comes_at_least_the_grace_and_a_week_after_the_archive_time() -> None:
    for grace_ms in (0, 1000, 14 * MS_PER_DAY, 60 * MS_PER_DAY):
        due, deadline = archive_times(1_000_000, grace_ms)
        assert due == 1_000_000 + grace_ms
        assert deadline - due == max(grace_ms, ARCHIVE_BACKSTOP_MIN_MS)


async def test_a_deals_keys_share_its_slot_and_carry_its_deadline(store: Store) -> None:
    """create, claim and redeem stamp the deadline on every key they create; the index
    holds the archive time, in the deal's slot."""
    spec = new_deal(5)
    deal = await create_deal(store, spec)
    k = store.keys.for_deal(deal.id)
    assert len({key_slot(x.encode()) for x in [*_keys(store, deal.id), k.archive]}) == 1
    held = (await claims.claim(store, deal.id, "u-1")).voucher
    signer = VoucherSigner(store.settings.signing_keys_dir)
    await redemptions.redeem(store, signer, signer.sign(held), "m-1")
    due, deadline = archive_times(spec.redeem_until_ms, int(store.settings.archive_grace_s * 1000))
    for key in _keys(store, deal.id):
        assert await store.client.pexpiretime(key) == deadline, key
    assert await store.client.zscore(k.archive, deal.id) == due
    assert due == spec.redeem_until_ms + 14 * MS_PER_DAY  # the default grace


async def test_due_deals_are_those_whose_archive_time_has_come(store: Store) -> None:
    first = await create_deal(store, new_deal(1, lasts_ms=1000))
    later = await create_deal(store, new_deal(1, lasts_ms=5000))
    due_first = int(await store.client.zscore(store.keys.for_deal(first.id).archive, first.id))
    assert await count_due(store, due_first - 1) == 0
    assert await count_due(store, due_first) == 1
    assert await count_due(store, due_first + 10_000) == 2
    p = store.keys.partition_of(first.id)
    assert await due_deals(store, p, due_first, count=10) == [first.id]
    assert later.id not in await due_deals(store, p, due_first, count=10)


async def test_archive_deal_removes_the_four_keys_and_every_index_entry(store: Store) -> None:
    """The archive index and discovery's three (geo and its ends for a started deal, the
    scheduled starts for one that waits: an archiver may come before any search moved it)."""
    deal = await create_deal(store, new_deal(3))
    scheduled = await create_deal(store, new_deal(3, starts_in_ms=3_600_000))
    await claims.claim(store, deal.id, "u-1")
    k = store.keys.for_deal(deal.id)
    ks = store.keys.for_deal(scheduled.id)
    assert await store.client.zscore(k.geo_ends, deal.id) is not None
    assert await store.client.zscore(ks.geo_starts, scheduled.id) is not None
    states = await deal_states(store, [deal.id, scheduled.id])
    assert (states[0].exists, states[0].seq, states[0].holders, states[0].redeemed) == (
        True,
        1,
        1,
        0,
    )
    for state, keys in ((states[0], k), (states[1], ks)):
        assert await remove_deal(store, state) == ("archived", "")
        assert await store.client.exists(*_keys(store, state.deal_id)) == 0
        for index in (keys.archive, keys.geo, keys.geo_starts, keys.geo_ends):
            assert await store.client.zscore(index, state.deal_id) is None, index
        # Twice (a second archiver, or a retry): nothing left to do.
        assert await remove_deal(store, state) == ("gone", "")


@pytest.mark.parametrize("change", ["seq", "cancelled", "redemptions"])
async def test_archive_deal_refuses_a_deal_that_changed_since_it_was_read(
    store: Store, change: str
) -> None:
    deal = await create_deal(store, new_deal(3))
    held = (await claims.claim(store, deal.id, "u-1")).voucher
    (state,) = await deal_states(store, [deal.id])
    if change == "seq":
        await claims.claim(store, deal.id, "u-2")
    elif change == "cancelled":
        await cancel_deal(store, deal.id, "m-1")
    else:
        signer = VoucherSigner(store.settings.signing_keys_dir)
        await redemptions.redeem(store, signer, signer.sign(held), "m-1")
    assert await remove_deal(store, state) == ("changed", change)
    assert await store.client.exists(store.keys.for_deal(deal.id).deal) == 1
    partition = store.keys.partition_of(deal.id)
    assert await store.client.zscore(archive_key(partition), deal.id) is not None


async def test_redeemed_vouchers_come_a_page_at_a_time(store: Store) -> None:
    deal = await create_deal(store, new_deal(30))
    k = store.keys.for_deal(deal.id)
    await store.client.hset(k.redemptions, mapping={f"v{i}": "1|||m-1" for i in range(2500)})
    pages = [page async for page in redeemed_vouchers(store, deal.id, page=1000)]
    assert len({v for page in pages for v in page}) == 2500
    assert max(len(page) for page in pages) < 2500
