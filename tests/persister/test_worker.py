"""The persister against real Redis and PostgreSQL: batches, poison, kills, name leases."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg

from engine import claims
from engine.deals import cancel_deal, create_deal
from engine.keys import STREAM_GROUP, consumer_lease_key
from engine.settings import Settings
from engine.store import Store
from flashsale.embedded import EmbeddedRedis
from persister.leases import lease_consumer_name
from tests.helpers import new_deal
from tests.persister.conftest import (
    SECRET,
    HeldLock,
    PersisterProcess,
    running_persister,
    sigstop,
    wait_caught_up,
    wait_insert_blocked,
)


async def _claim_many(store: Store, deal_ids: list[str], users: int) -> dict[str, str]:
    """Claim concurrently; return voucher id -> user for the new vouchers."""
    results = await asyncio.gather(
        *(claims.claim(store, d, f"u-{i}") for d in deal_ids for i in range(users)),
        return_exceptions=True,
    )
    new = [r.voucher for r in results if isinstance(r, claims.ClaimResult) and r.is_new]
    return {v.voucher_id: v.user_id for v in new}


async def _vouchers(pg: asyncpg.Connection) -> dict[str, str]:
    return {r["id"]: r["user_id"] for r in await pg.fetch("SELECT id, user_id FROM vouchers")}


async def test_deals_claims_and_cancels_land_exactly(
    psettings: Settings, pstore: Store, pg: asyncpg.Connection
) -> None:
    """Every event kind lands once, with the fields Redis decided."""
    deals = [await create_deal(pstore, new_deal(30)) for _ in range(6)]
    issued = await _claim_many(pstore, [d.id for d in deals], 40)  # 40 users for 30 each
    assert len(issued) == 180
    await cancel_deal(pstore, deals[0].id, "m-1")
    async with running_persister(psettings) as p:
        await wait_caught_up(pstore)
        assert p.stats.vouchers_new == 180
    assert await _vouchers(pg) == issued
    rows = await pg.fetch("SELECT deal_id, count(*), max(seq) FROM vouchers GROUP BY deal_id")
    assert sorted((r["count"], r["max"]) for r in rows) == [(30, 30)] * 6
    cancelled = await pg.fetch("SELECT id FROM deals WHERE cancelled_at IS NOT NULL")
    assert [r["id"] for r in cancelled] == [deals[0].id]
    d = await pg.fetchrow(
        "SELECT merchant_id, inventory_total, fs_to_ms(ends_at) AS ends FROM deals WHERE id=$1",
        deals[1].id,
    )
    assert (d["merchant_id"], d["inventory_total"], d["ends"]) == ("m-1", 30, deals[1].ends_at_ms)
    assert await pg.fetchval("SELECT count(*) FROM dead_letters") == 0


async def test_poisoned_entries_go_to_dead_letters_and_the_rest_lands(
    psettings: Settings, pstore: Store, pg: asyncpg.Connection
) -> None:
    """A malformed entry, an unknown type and a row PostgreSQL refuses (NUL) inside one batch."""
    deal = await create_deal(pstore, new_deal(20))
    k = pstore.keys.for_deal(deal.id)
    first = await _claim_many(pstore, [deal.id], 5)
    c = pstore.client
    bad_seq = {"type": "claim", "deal": deal.id, "seq": "x", "voucher": "v", "user": "u", "at": "1"}
    await c.xadd(k.events, bad_seq)
    await c.xadd(k.events, {"type": "mystery", "deal": deal.id})
    await c.xadd(
        k.events,
        {
            "type": "claim",
            "deal": deal.id,
            "seq": "999",
            "voucher": "vnul",
            "user": "bad\x00user",
            "at": "1700000000000",
        },
    )
    rest = await _claim_many(pstore, [deal.id], 10)
    async with running_persister(psettings):
        await wait_caught_up(pstore)
    assert await _vouchers(pg) == {**first, **rest}
    dead = await pg.fetch("SELECT stream, fields, error FROM dead_letters ORDER BY id")
    errors = [r["error"] for r in dead]
    assert len(dead) == 3, errors
    assert any("'seq' is not an integer" in e for e in errors)
    assert any("unknown event type 'mystery'" in e for e in errors)
    assert any("CharacterNotInRepertoire" in e or "invalid byte" in e for e in errors)
    assert all(r["stream"] == k.events for r in dead)
    assert (await pstore.client.xpending(k.events, STREAM_GROUP))["pending"] == 0


async def _wait_vouchers(pg: asyncpg.Connection, n: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while await pg.fetchval("SELECT count(*) FROM vouchers") < n:
        assert time.monotonic() < deadline, f"fewer than {n} vouchers committed"
        await asyncio.sleep(0.05)


async def test_killed_after_commit_before_ack_writes_nothing_twice(
    own_redis: EmbeddedRedis,
    db_url: str,
    tmp_path: Path,
    pg: asyncpg.Connection,
    vouchers_locked: HeldLock,
    spawn_persister: Callable[..., PersisterProcess],
) -> None:
    """SIGKILL between the commit and the XACK: the restart re-writes the batch idempotently.

    The batch's INSERT waits on the test's lock while Redis is SIGSTOPped; released, the
    commit lands and the XACK cannot. Redis is then SIGKILLed as well (resumed, it would
    run the XACKs waiting in its sockets) and restarted from its AOF.
    """
    settings = Settings(
        redis_url=own_redis.url,
        database_url=db_url,
        partitions=4,
        data_dir=tmp_path,
        auth_secret=SECRET,
    )
    store = await Store.connect(settings)
    try:
        deal = await create_deal(store, new_deal(50))
        issued = await _claim_many(store, [deal.id], 50)
        p = spawn_persister(settings, FLASHSALE_PERSISTER_NAME="p-a")
        await wait_insert_blocked(pg, "vouchers")  # the batch is read, not committed
        assert own_redis.proc is not None
        sigstop(own_redis.proc)
        await vouchers_locked.release()
        await _wait_vouchers(pg, 50)  # committed...
        p.kill()
        own_redis.stop(kill=True)
        own_redis.start()  # same port, same AOF
        for _ in range(200):  # accepting connections, maybe still loading the AOF
            if (await store.client.info("persistence")).get("loading") == 0:
                break
            await asyncio.sleep(0.05)
        k = store.keys.for_deal(deal.id)
        pending = await store.client.xpending(k.events, STREAM_GROUP)
        assert pending["pending"] == 51  # ...and not acknowledged
        assert [(c["name"], c["pending"]) for c in pending["consumers"]] == [("p-a", 51)]
        again = spawn_persister(settings, FLASHSALE_PERSISTER_NAME="p-a")
        await wait_caught_up(store)
        assert again.proc.poll() is None
        assert await _vouchers(pg) == issued
        assert await pg.fetchval("SELECT count(*) FROM dead_letters") == 0
        assert await pg.fetchval("SELECT count(*) FROM parked_vouchers") == 0
        assert again.terminate() == 0
    finally:
        await store.close()


async def test_killed_after_read_before_commit_loses_nothing(
    psettings: Settings,
    pstore: Store,
    pg: asyncpg.Connection,
    vouchers_locked: HeldLock,
    spawn_persister: Callable[..., PersisterProcess],
) -> None:
    """SIGKILL between the read and the commit (its INSERT waiting on the test's lock):
    the entries stay pending to its name and land on restart."""
    deal = await create_deal(pstore, new_deal(40))
    issued = await _claim_many(pstore, [deal.id], 40)
    p = spawn_persister(psettings, FLASHSALE_PERSISTER_NAME="p-b")
    await wait_insert_blocked(pg, "vouchers")
    p.kill()
    await vouchers_locked.release()
    assert await _vouchers(pg) == {}
    k = pstore.keys.for_deal(deal.id)
    pending = await pstore.client.xpending(k.events, STREAM_GROUP)
    assert [(c["name"], c["pending"]) for c in pending["consumers"]] == [("p-b", 41)]
    again = spawn_persister(psettings, FLASHSALE_PERSISTER_NAME="p-b")
    await wait_caught_up(pstore)
    assert await _vouchers(pg) == issued
    assert again.terminate() == 0


async def test_two_persisters_over_several_partitions_count_exactly(
    psettings: Settings,
    pstore: Store,
    pg: asyncpg.Connection,
    spawn_persister: Callable[..., PersisterProcess],
) -> None:
    """Two processes drain four partitions while claims pour in: every voucher once."""
    procs = [spawn_persister(psettings, FLASHSALE_PERSISTER_BATCH="50") for _ in range(2)]
    for p in procs:  # else, one slow to start, the other may drain everything alone
        await p.wait_for_output(" starting")
    deals = [await create_deal(pstore, new_deal(150)) for _ in range(8)]
    assert len({pstore.keys.partition_of(d.id) for d in deals}) > 1
    issued: dict[str, str] = {}
    for wave in range(4):
        users = [f"u-{wave}-{i}" for i in range(50)]
        got = await asyncio.gather(
            *(claims.claim(pstore, d.id, u) for d in deals for u in users), return_exceptions=True
        )
        won = [r.voucher for r in got if isinstance(r, claims.ClaimResult)]
        issued.update({v.voucher_id: v.user_id for v in won})
        await asyncio.sleep(0.1)
    assert len(issued) == 8 * 150
    await wait_caught_up(pstore, 40)
    assert await _vouchers(pg) == issued
    names = set()
    for key in pstore.keys.all_events():
        names |= {c["name"] for c in await pstore.client.xinfo_consumers(key, STREAM_GROUP)}
    assert len(names) == 2, names  # two leased, distinct names
    codes = [p.terminate() for p in procs]
    assert codes == [0, 0], [p.output() for p in procs]


async def test_a_dead_consumers_entries_are_reclaimed_by_another(
    psettings: Settings,
    pstore: Store,
    pg: asyncpg.Connection,
    vouchers_locked: HeldLock,
    spawn_persister: Callable[..., PersisterProcess],
) -> None:
    """A persister killed holding entries, never restarted: another reclaims them."""
    deal = await create_deal(pstore, new_deal(30))
    issued = await _claim_many(pstore, [deal.id], 30)
    dead = spawn_persister(psettings, FLASHSALE_PERSISTER_NAME="gone")
    await wait_insert_blocked(pg, "vouchers")  # read, not committed
    dead.kill()
    await vouchers_locked.release()
    other = spawn_persister(
        psettings, FLASHSALE_PERSISTER_NAME="other", FLASHSALE_PERSISTER_CLAIM_IDLE_S="1"
    )
    await wait_caught_up(pstore, 30)
    assert await _vouchers(pg) == issued
    assert "reclaimed 31 idle entries" in other.output()


async def test_sigterm_stops_within_seconds_even_while_postgres_is_down(
    psettings: Settings, spawn_persister: Callable[..., PersisterProcess], pstore: Store
) -> None:
    """SIGTERM: a clean exit (0) within a few seconds, whether idle or backing off."""
    idle = spawn_persister(psettings)
    await idle.wait_for_output("persister")
    await asyncio.sleep(1.0)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert idle.terminate() == 0
    assert loop.time() - t0 < 5
    nowhere = psettings.with_(database_url="postgresql://postgres@127.0.0.1:1/none")
    stuck = spawn_persister(nowhere)
    await stuck.wait_for_output("PostgreSQL unavailable")
    t0 = loop.time()
    assert stuck.terminate() == 0
    assert loop.time() - t0 < 5


async def test_pipelined_rounds_land_exactly_and_stopping_leaves_nothing_read_ahead(
    psettings: Settings, pstore: Store, pg: asyncpg.Connection
) -> None:
    """Small batches (the next one read while the current one commits): every voucher
    once; a stop with a batch read ahead writes it, so nothing stays pending to the name."""
    deals = [await create_deal(pstore, new_deal(60)) for _ in range(4)]
    issued = await _claim_many(pstore, [d.id for d in deals], 60)
    async with running_persister(psettings.with_(persister_batch=7), "ahead") as p:
        assert p.pipeline
        await wait_caught_up(pstore)
        # 244 entries, at most 7 per partition stream (4 of them) per round.
        assert p.stats.rounds >= 244 // (7 * 4)
        for _ in range(3):  # stop while entries are still pouring in
            issued |= await _claim_many(pstore, [(await create_deal(pstore, new_deal(30))).id], 30)
    for key in pstore.keys.all_events():  # nothing left delivered-but-unwritten
        assert (await pstore.client.xpending(key, STREAM_GROUP))["pending"] == 0
    async with running_persister(psettings, "after"):
        await wait_caught_up(pstore)
    assert await _vouchers(pg) == issued


async def test_entries_a_lost_read_delivered_are_taken_back_at_once(
    psettings: Settings, pstore: Store, pg: asyncpg.Connection
) -> None:
    """Entries delivered to the persister's name by a read it never saw the reply of (as
    when a timed-out XREADGROUP is retried by the client) land without waiting for a
    reclaim (claim_idle 60 s here)."""
    deal = await create_deal(pstore, new_deal(100))
    k = pstore.keys.for_deal(deal.id)
    async with running_persister(psettings.with_(persister_claim_idle_s=60.0), "p-lost") as p:
        await wait_caught_up(pstore)
        pipe = pstore.client.pipeline(transaction=True)  # atomic: the persister cannot see them
        lost = {f"vlost{i}.{deal.id}": f"lost-{i}" for i in range(5)}
        for i, (voucher, user) in enumerate(lost.items()):
            entry = {"type": "claim", "deal": deal.id, "seq": 900 + i, "voucher": voucher}
            pipe.xadd(k.events, {**entry, "user": user, "at": 1_700_000_000_000})
        pipe.xreadgroup(STREAM_GROUP, p.name, {k.events: ">"}, count=100)
        await pipe.execute()
        issued = await _claim_many(pstore, [deal.id], 10)  # the next batch notices
        await wait_caught_up(pstore, 5)
    assert await _vouchers(pg) == {**issued, **lost}


async def test_a_persister_whose_name_is_taken_stops_with_a_clear_error(
    psettings: Settings, pstore: Store, spawn_persister: Callable[..., PersisterProcess]
) -> None:
    """Another process holds our leased name now: stop consuming under it, exit 1."""
    p = spawn_persister(psettings)
    await p.wait_for_output(" starting")
    match = re.search(r"persister (\S+) starting", p.output())
    assert match, p.output()
    await pstore.client.set(consumer_lease_key(match.group(1)), "intruder")
    assert await asyncio.to_thread(p.proc.wait, 15) == 1
    out = p.output()
    assert f"flashsale persist: another process took the consumer name {match.group(1)}" in out
    assert "Traceback" not in out
    assert await pstore.client.get(consumer_lease_key(match.group(1))) == "intruder"


async def test_persist_with_every_name_leased_exits_2_with_one_line(
    psettings: Settings, pstore: Store, spawn_persister: Callable[..., PersisterProcess]
) -> None:
    """NameTaken: a one-line error and exit 2, not a traceback."""
    for _ in range(64):
        await lease_consumer_name(pstore, 60_000)
    p = spawn_persister(psettings)
    assert await asyncio.to_thread(p.proc.wait, 20) == 2
    out = p.output()
    assert "flashsale persist: all 64 persister names on" in out
    assert "Traceback" not in out
