"""Stream retention (persister/retention.py): what is trimmed, and what never is."""

from __future__ import annotations

import asyncio

from engine import claims
from engine.deals import create_deal
from engine.keys import STREAM_GROUP
from engine.settings import Settings
from engine.store import Store
from tests.helpers import new_deal
from tests.persister.conftest import running_persister, wait_caught_up


async def _claim_many(store: Store, deal_id: str, users: int) -> None:
    await asyncio.gather(*(claims.claim(store, deal_id, f"u-{i}") for i in range(users)))


async def test_trims_only_acknowledged_entries_past_retention_or_near_the_cap(
    psettings: Settings, pstore: Store
) -> None:
    """Retention keeps acked history for replay; near the cap acked entries go anyway."""
    deal = await create_deal(pstore, new_deal(40))
    k = pstore.keys.for_deal(deal.id)
    await _claim_many(pstore, deal.id, 10)
    async with running_persister(psettings.with_(stream_retention_s=3600.0)):
        await wait_caught_up(pstore)
        await asyncio.sleep(0.5)  # a few trim rounds
        assert await pstore.client.xlen(k.events) == 11  # acked, but inside the retention
    await _claim_many(pstore, deal.id, 20)  # 10 more new ones, not yet persisted
    assert await pstore.client.xlen(k.events) == 21
    async with running_persister(psettings.with_(stream_retention_s=0.0), "second") as p:
        await wait_caught_up(pstore)
        await asyncio.sleep(0.5)
        assert await pstore.client.xlen(k.events) == 0
        assert p.stats.trimmed == 21
    await _claim_many(pstore, deal.id, 25)  # 5 new
    near_cap = psettings.with_(stream_cap=8, stream_retention_s=3600.0)
    async with running_persister(near_cap, "third"):
        await wait_caught_up(pstore)
        await asyncio.sleep(0.5)
        assert await pstore.client.xlen(k.events) == 0  # young, but acked and past cap/2
    # An entry delivered but not acknowledged is never trimmed, whatever the pressure.
    await _claim_many(pstore, deal.id, 30)  # 5 new: u-25..u-29
    await pstore.client.xreadgroup(STREAM_GROUP, "holder", {k.events: ">"}, count=1)
    async with running_persister(near_cap, "fourth"):
        await asyncio.sleep(1.0)
        first = await pstore.client.xrange(k.events, count=1)
        assert first and first[0][1]["user"] == "u-25"
        assert await pstore.client.xlen(k.events) == 5
