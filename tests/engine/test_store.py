"""The Redis boundary: script cache loss, unsafe servers, Redis going away, and that no
other module crosses it."""

from __future__ import annotations

import ast
import asyncio
from importlib import resources
from pathlib import Path

import pytest

from engine import claims
from engine.deals import create_deal, get_deal
from engine.errors import StartupError, StoreUnavailable, StreamGroupMissing
from engine.settings import Settings
from engine.store import SCRIPT_NAMES, Store, load_scripts
from flashsale.embedded import EmbeddedRedis
from tests.helpers import new_deal

ROOT = Path(__file__).resolve().parents[2]


async def _script_flush(store: Store, cluster: bool) -> None:
    if cluster:
        await store.client.execute_command("SCRIPT FLUSH", target_nodes=store.client.PRIMARIES)
    else:
        await store.client.script_flush()


async def _script_cached(store: Store, sha: str) -> bool:
    """Whether the node holding the deal's partition has the script cached."""
    if not store.settings.redis_cluster:
        return bool((await store.client.script_exists(sha))[0])
    # A cluster client ANDs SCRIPT EXISTS over its nodes; ask each primary itself.
    answers = [await n.execute_command("SCRIPT EXISTS", sha) for n in store.client.get_primaries()]
    return any(a[0] for a in answers)


async def test_script_flush_mid_run_costs_only_a_retry(store: Store, settings: Settings) -> None:
    """SCRIPT FLUSH between and during claim bursts: every claim still succeeds."""
    deal = await create_deal(store, new_deal(300))
    issued = 0
    for burst in range(3):
        users = [f"u-{burst}-{i}" for i in range(100)]
        flusher = asyncio.ensure_future(_script_flush(store, settings.redis_cluster))
        results = await asyncio.gather(*(claims.claim(store, deal.id, u) for u in users))
        await flusher
        issued += sum(r.is_new for r in results)
    assert issued == 300
    await _script_flush(store, settings.redis_cluster)
    sha = store.scripts["read_deal"].sha
    assert await _script_cached(store, sha) is False
    await get_deal(store, deal.id)
    assert await _script_cached(store, sha) is True
    assert (await get_deal(store, deal.id)).inventory_left == 0


async def test_an_evicting_redis_is_refused_at_start(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """maxmemory-policy allkeys-lru could evict stock or unpersisted claims: refuse, clearly."""
    server = EmbeddedRedis(tmp_path / "lru", config={"maxmemory-policy": "allkeys-lru"}).start()
    try:
        with pytest.raises(StartupError, match="maxmemory-policy is allkeys-lru"):
            await Store.connect(Settings(redis_url=server.url))
    finally:
        server.stop()


async def test_unreachable_redis_at_start_is_a_clear_startup_error() -> None:
    with pytest.raises(StartupError, match="cannot reach Redis"):
        await Store.connect(Settings(redis_url="redis://127.0.0.1:1/0"))


async def test_stopped_redis_refuses_fast_then_recovers(own_redis: EmbeddedRedis) -> None:
    """Redis really stopped: calls fail as StoreUnavailable within 2 s; restarted: they work."""
    store = await Store.connect(Settings(redis_url=own_redis.url))
    try:
        deal = await create_deal(store, new_deal(10))
        await claims.claim(store, deal.id, "u-1")
        own_redis.stop()
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(StoreUnavailable):
            await claims.claim(store, deal.id, "u-2")
        assert loop.time() - started < 2.0
        own_redis.start()  # same port, same AOF: the deal survived
        # While Valkey replays its AOF it answers LOADING: unavailable, as a client sees it,
        # for as long as that takes (seconds on a loaded machine). Then the claim goes in.
        deadline = loop.time() + 20
        while True:
            try:
                again = await claims.claim(store, deal.id, "u-2")
                break
            except StoreUnavailable:
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.1)
        assert again.is_new and again.voucher.seq == 2
    finally:
        await store.close()


async def _waitaof_calls(store: Store) -> int:
    stats = await store.client.info("commandstats")
    return int(stats.get("cmdstat_waitaof", {}).get("calls", 0))


async def test_aof_durability_confirms_claims_with_waitaof(own_redis: EmbeddedRedis) -> None:
    """In aof mode claims are answered only after WAITAOF; a concurrent burst shares waits."""
    store = await Store.connect(Settings(redis_url=own_redis.url, durability="aof"))
    try:
        deal = await create_deal(store, new_deal(50))
        before = await _waitaof_calls(store)
        results = await asyncio.gather(*(claims.claim(store, deal.id, f"u-{i}") for i in range(50)))
        assert sum(r.is_new for r in results) == 50
        waits = await _waitaof_calls(store) - before
        assert 1 <= waits < 10, waits  # one WAITAOF per batch, not one per claim
    finally:
        await store.close()


async def test_aof_durability_refused_without_appendonly(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """aof mode on a server that keeps no AOF cannot confirm anything: refuse to start."""
    server = EmbeddedRedis(tmp_path / "noaof", config={"appendonly": "no"}).start()
    try:
        with pytest.raises(StartupError, match="WAITAOF"):
            await Store.connect(Settings(redis_url=server.url, durability="aof"))
    finally:
        server.stop()


async def test_aof_durability_needs_waitaof_on_the_server(redis_url: str) -> None:
    """A server without WAITAOF (Redis < 7.2, e.g. CI's Redis 7.0 pass) refuses aof mode."""
    import redis.asyncio as aioredis
    import redis.exceptions

    probe = aioredis.Redis.from_url(redis_url)
    try:
        await probe.execute_command("WAITAOF", 0, 0, 0)
        has_waitaof = True
    except redis.exceptions.ResponseError as exc:
        has_waitaof = "unknown command" not in str(exc).lower()
    finally:
        await probe.aclose()
    if has_waitaof:
        pytest.skip("this server has WAITAOF: the refusal is exercised by the Redis 7.0 pass")
    with pytest.raises(StartupError, match="needs WAITAOF"):
        await Store.connect(Settings(redis_url=redis_url, durability="aof"))


async def test_refusing_replies_are_unavailable_not_bugs(own_redis: EmbeddedRedis) -> None:
    """NOREPLICAS (min-replicas-to-write unmet) and the like answer 503, never 500."""
    store = await Store.connect(Settings(redis_url=own_redis.url))
    try:
        deal = await create_deal(store, new_deal(5))
        await store.client.config_set("min-replicas-to-write", 1)
        with pytest.raises(StoreUnavailable):
            await claims.claim(store, deal.id, "u-1")
        await store.client.config_set("min-replicas-to-write", 0)
        assert (await claims.claim(store, deal.id, "u-1")).is_new
    finally:
        await store.close()


async def test_an_unpackable_argument_fails_only_its_own_call(store: Store) -> None:
    """One call whose argument cannot be sent fails alone; the batch around it lands."""
    deal = await create_deal(store, new_deal(5))
    k = store.keys.for_deal(deal.id)
    good = [claims.claim(store, deal.id, f"u-{i}") for i in range(3)]
    bad = store.run("read_deal", (k.deal,), (object(),))
    results = await asyncio.gather(*good, bad, return_exceptions=True)
    assert all(isinstance(r, claims.ClaimResult) and r.is_new for r in results[:3])
    assert isinstance(results[3], Exception)


async def test_a_burst_larger_than_a_batch_leaves_as_several(store: Store) -> None:
    """2,500 calls in one loop turn: all answered, in batches of at most MAX_BATCH_CALLS."""
    from engine.store import MAX_BATCH_CALLS

    deal = await create_deal(store, new_deal(2500))
    sizes: list[int] = []
    send = store._send

    async def spy(calls: list, *, by_sha: bool) -> list:  # type: ignore[type-arg]
        if by_sha:  # not the EVAL resend after a node's first NOSCRIPT
            sizes.append(len(calls))
        return await send(calls, by_sha=by_sha)

    store._send = spy  # type: ignore[method-assign]
    results = await asyncio.gather(*(claims.claim(store, deal.id, f"u-{i}") for i in range(2500)))
    assert sum(r.is_new for r in results) == 2500
    assert sum(sizes) == 2500 and max(sizes) <= MAX_BATCH_CALLS and len(sizes) >= 3


def test_load_scripts_refuses_a_missing_script_file() -> None:
    """A registered script with no file in lua/ is a packaging bug: loud, not skipped."""
    with pytest.raises(FileNotFoundError, match="no_such_script"):
        load_scripts(("claim_voucher", "no_such_script"))


def test_every_lua_file_is_registered_and_headed_by_its_contract() -> None:
    """lua/ holds exactly the registered scripts, each opening with its name and contract."""
    files = {p.name[:-4]: p for p in resources.files("lua").iterdir() if p.name.endswith(".lua")}
    assert set(files) == set(SCRIPT_NAMES)
    for name, path in files.items():
        head = path.read_text(encoding="utf-8").split("\nlocal ", 1)[0]
        assert head.startswith(f"-- {name}: "), name
        assert "KEYS[" in head and "Returns" in head, name


def test_only_the_store_imports_redis_or_reaches_its_client() -> None:
    """The Redis boundary is whole: no other module imports redis or uses ``.client``."""
    offenders = []
    for folder in ("engine", "api", "persister", "flashsale"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == ROOT / "engine" / "store.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [node.module or ""]
                if any(n == "redis" or n.startswith("redis.") for n in names):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} imports redis")
                if isinstance(node, ast.Attribute) and node.attr == "client":
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} uses .client")
    assert offenders == []


async def test_group_commands_name_a_missing_group_and_stream(store: Store) -> None:
    """NOGROUP is StreamGroupMissing; a missing stream has no groups; creating twice is
    no error."""
    key = store.keys.all_events()[0]
    assert await store.stream_groups(key) == []
    assert await store.create_group(key, "g") is True
    assert await store.create_group(key, "g") is False
    assert [g["name"] for g in await store.stream_groups(key)] == ["g"]
    with pytest.raises(StreamGroupMissing):
        await store.read_group("other", "c", {key: ">"}, count=1)
    with pytest.raises(StreamGroupMissing):
        await store.pending_entries(key, "other", "-", "+", 10)


async def test_every_store_command_is_store_unavailable_while_redis_is_down(
    own_redis: EmbeddedRedis,
) -> None:
    """Plain commands, pipelines, scans and stream reads all fail as StoreUnavailable."""
    store = await Store.connect(Settings(redis_url=own_redis.url, partitions=2))
    try:
        key = store.keys.all_events()[0]
        await store.create_group(key, "g")
        own_redis.stop()
        pipe = store.pipeline()
        pipe.hget("k", "f")
        calls = [
            store.hget("k", "f"),
            store.hmget("k", "a", "b"),
            store.server_time_ms(),
            store.scan_keys("fs:*"),
            store.stream_groups(key),
            store.read_group("g", "c", {key: ">"}, count=1),
            pipe.execute(),
        ]
        for call in calls:
            with pytest.raises(StoreUnavailable):
                await call
    finally:
        await store.close()
