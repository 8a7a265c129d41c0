"""reconcile names every difference; replay restores rows; rebuild-redis restores Redis."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from engine import claims
from engine.deals import cancel_deal, create_deal, get_deal
from engine.errors import SoldOut
from engine.settings import Settings
from engine.store import Store
from flashsale import cli as flashsale_cli
from persister import cli
from tests.helpers import new_deal
from tests.persister.conftest import env_for, running_persister, wait_caught_up


async def _reconcile(
    settings: Settings, capsys: pytest.CaptureFixture[str], wait: float = 5.0
) -> tuple[int, str]:
    code = await cli.reconcile(settings, wait_s=wait)
    return code, capsys.readouterr().out


async def test_a_deleted_row_is_named_by_reconcile_and_restored_by_replay(
    psettings: Settings, pstore: Store, pg: asyncpg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    deal = await create_deal(pstore, new_deal(10))
    held = [(await claims.claim(pstore, deal.id, f"u-{i}")).voucher for i in range(6)]
    async with running_persister(psettings):
        await wait_caught_up(pstore)
        code, out = await _reconcile(psettings, capsys)
        assert code == 0, out
        assert "0 difference(s) over 1 deal(s) and 6 voucher(s)" in out
        await pg.execute("DELETE FROM vouchers WHERE id = $1", held[2].voucher_id)
        await pg.execute("UPDATE deals SET cancelled_at = NULL WHERE id = $1", deal.id)
        code, out = await _reconcile(psettings, capsys)
        assert code == 1
        assert f"voucher_missing_in_postgres deal={deal.id} voucher={held[2].voucher_id}" in out
        assert "seq=3 user=u-2" in out
        assert "seq_gap" not in out or "missing seq [3]" in out
        code = await cli.replay(psettings, from_id="-", to_id="+")
        assert code == 0
        assert "1 voucher(s) written again" in capsys.readouterr().out
        code, out = await _reconcile(psettings, capsys)
        assert code == 0, out


async def test_reconcile_reports_each_kind_of_difference(
    psettings: Settings, pstore: Store, pg: asyncpg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    deal = await create_deal(pstore, new_deal(10))
    other = await create_deal(pstore, new_deal(10))
    v = (await claims.claim(pstore, deal.id, "u-1")).voucher
    async with running_persister(psettings):
        await wait_caught_up(pstore)
    await pg.execute("UPDATE vouchers SET user_id = 'mallory' WHERE id = $1", v.voucher_id)
    await pg.execute("UPDATE deals SET inventory_total = 11 WHERE id = $1", deal.id)
    await pg.execute("INSERT INTO vouchers VALUES ('vghost', $1, 7, 'ghost', now())", other.id)
    await pg.execute("INSERT INTO deals (id, cancelled_at) VALUES ('d_only_in_pg', now())")
    await cancel_deal(pstore, other.id, "m-1")  # not persisted: no persister running
    code, out = await _reconcile(psettings, capsys, wait=0.5)
    assert code == 1
    assert f"voucher_differs deal={deal.id} voucher={v.voucher_id}" in out
    assert f"deal_field_differs deal={deal.id} total: redis=10 postgres=11" in out
    assert f"voucher_missing_in_redis deal={other.id} voucher=vghost" in out
    assert "deal_missing_in_redis deal=d_only_in_pg" in out
    # The cancel is still in the stream after the wait: lag, not a difference.
    assert "deal_cancel_differs" not in out
    assert "entries still in flight" in out


async def test_rebuild_redis_restores_inventory_winners_and_no_sold_stock(
    psettings: Settings,
    pstore: Store,
    pg: asyncpg.Connection,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Redis flushed, rebuilt from PostgreSQL: the same deal hashes (field for field, as
    create_deal.lua and the claims left them), same vouchers, nothing resold."""
    deal = await create_deal(pstore, new_deal(5))
    gone = await create_deal(pstore, new_deal(3))
    won = {u: (await claims.claim(pstore, deal.id, u)).voucher for u in ("a", "b", "c")}
    for u in ("x", "y", "z"):
        await claims.claim(pstore, gone.id, u)
    await cancel_deal(pstore, gone.id, "m-1")
    async with running_persister(psettings):
        await wait_caught_up(pstore)
    # Redis is not empty: `flashsale rebuild-redis` refuses, exit 2, in one line.
    for name, value in env_for(psettings).items():
        if name.startswith("FLASHSALE_"):
            monkeypatch.setenv(name, value)
    assert await asyncio.to_thread(flashsale_cli.main, ["rebuild-redis"]) == 2
    err = capsys.readouterr().err
    assert "flashsale rebuild-redis: Redis already holds deals; use --force" in err
    assert "Traceback" not in err
    hashes = [await pstore.client.hgetall(pstore.keys.for_deal(d.id).deal) for d in (deal, gone)]
    await pstore.client.flushall()
    assert await cli.rebuild_redis(psettings) == 0
    assert "restored 2 deal(s), 6 voucher(s)" in capsys.readouterr().out
    for d, before in zip((deal, gone), hashes, strict=True):
        assert await pstore.client.hgetall(pstore.keys.for_deal(d.id).deal) == before
    again = await get_deal(pstore, deal.id)
    assert (again.inventory_left, again.seq, again.status) == (2, 3, "active")
    assert (await get_deal(pstore, gone.id)).status == "cancelled"
    assert deal.id in await pstore.client.zrange(pstore.keys.for_deal(deal.id).geo, 0, -1)
    assert gone.id not in await pstore.client.zrange(pstore.keys.for_deal(gone.id).geo, 0, -1)
    for u, first in won.items():
        back = await claims.claim(pstore, deal.id, u)
        assert (back.is_new, back.voucher) == (False, first)
    new = [await claims.claim(pstore, deal.id, u) for u in ("d", "e")]
    assert [r.voucher.seq for r in new] == [4, 5]  # no seq reused
    with pytest.raises(SoldOut):
        await claims.claim(pstore, deal.id, "f")
    async with running_persister(psettings):
        await wait_caught_up(pstore)
    code, out = await _reconcile(psettings, capsys)
    assert code == 0, out
    assert await pg.fetchval("SELECT count(*) FROM vouchers") == 8
