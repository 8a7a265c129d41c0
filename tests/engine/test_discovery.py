"""Discovery: exact, live, nearest-first answers from the geo indexes, cached or not.

The property test builds random worlds of deals in every state around awkward places
(the antimeridian, the edges of the geo band, a city) and compares every answer with a
brute-force Haversine over the deals that are active, on one node and on a cluster.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from engine import claims
from engine.deals import LAT_MAX, cancel_deal, create_deal, get_deal
from engine.discovery import Discovery, Nearby, haversine_km, render
from engine.errors import StoreUnavailable
from engine.settings import Settings
from engine.store import Store, make_client
from engine.times import now_ms
from flashsale.embedded import free_port
from tests.conftest import flush
from tests.helpers import HOUR_MS, new_deal

STATES = (
    "active",
    "scheduled",
    "ended",
    "sold_out",  # the last voucher claimed: the claim script drops it from the index
    "cancelled",  # cancelled: the cancel script drops it from the index
    "stale_sold_out",  # stock gone but still indexed: only the live filter stands in the way
    "stale_cancelled",
    "starting",  # scheduled to start START_SOON_MS after it is created: during the test
)
START_SOON_MS = 1_500
# Places where geometry goes wrong: a city, the antimeridian (both sides), the edges of
# the band a geo index holds, the antimeridian at the edge of the band.
CENTRES = [
    (12.9716, 77.5946),
    (0.0, 180.0),
    (-33.9, -180.0),
    (LAT_MAX, 0.0),
    (-LAT_MAX, 179.999),
    (84.9, -179.99),
]


@dataclass
class Placed:
    id: str
    lat: float
    lng: float
    state: str


class Clock:
    """A monotonic clock the test moves by hand (cache expiry)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def wrap_lng(lng: float) -> float:
    return ((lng + 180.0) % 360.0) - 180.0 if not -180.0 <= lng <= 180.0 else lng


def clamp_lat(lat: float) -> float:
    return max(-LAT_MAX, min(LAT_MAX, lat))


def brute_force(
    world: list[Placed],
    lat: float,
    lng: float,
    radius_km: float,
    limit: int,
    active: tuple[str, ...] = ("active",),
) -> list[tuple[str, float]]:
    """The reference answer: every active deal by Haversine, nearest first, cut at limit."""
    hits = sorted(
        (haversine_km(lat, lng, p.lat, p.lng), p.id)
        for p in world
        if p.state in active and haversine_km(lat, lng, p.lat, p.lng) <= radius_km
    )
    return [(i, d) for d, i in hits[:limit]]


async def place(store: Store, lat: float, lng: float, state: str, inventory: int = 2) -> str:
    """Create a deal at a point and bring it into ``state``."""
    if state == "scheduled":
        spec = new_deal(inventory, lat=lat, lng=lng, starts_in_ms=HOUR_MS)
    elif state == "starting":
        spec = new_deal(inventory, lat=lat, lng=lng, starts_in_ms=START_SOON_MS)
    elif state == "ended":
        spec = new_deal(inventory, lat=lat, lng=lng, starts_in_ms=-2 * HOUR_MS)
    else:
        spec = new_deal(inventory, lat=lat, lng=lng)
    deal = await create_deal(store, spec)
    k = store.keys.for_deal(deal.id)
    if state == "sold_out":
        for i in range(inventory):
            await claims.claim(store, deal.id, f"u-{i}")
    elif state == "cancelled":
        await cancel_deal(store, deal.id, spec.merchant_id)
    elif state == "stale_sold_out":
        await store.client.hset(k.deal, "left", 0)
    elif state == "stale_cancelled":
        await store.client.hset(k.deal, "cancelled", now_ms())
    return deal.id


async def wait_until(store: Store, ms: int) -> None:
    """Until Redis's clock (the one the scripts judge by) has passed ``ms``."""
    for _ in range(100):
        now = await store.server_time_ms()
        if now > ms:
            return
        await asyncio.sleep((ms - now + 10) / 1000)
    raise AssertionError(f"Redis's clock did not pass {ms}")


def ids_and_distances(found: list[Nearby]) -> list[tuple[str, float]]:
    return [(n.deal.id, n.distance_km) for n in found]


def assert_well_formed(found: list[Nearby], radius_km: float, limit: int) -> None:
    assert len(found) <= limit
    distances = [n.distance_km for n in found]
    assert distances == sorted(distances)
    for n in found:
        assert n.deal.status == "active"
        assert n.distance_km <= radius_km


@pytest.fixture
async def discover(store: Store) -> AsyncIterator[Callable[..., Discovery]]:
    """Make ``Discovery`` objects on the test's store; their background work ends with it."""
    made: list[Discovery] = []

    def make(**options: Any) -> Discovery:
        made.append(Discovery(store, **options))
        return made[-1]

    yield make
    for d in made:
        await d.close()


# -- the formula --------------------------------------------------------------------


def test_haversine_uses_the_mean_earth_radius() -> None:
    """One degree along a meridian is 6371.0088 km x pi/180; a half turn is half the globe."""
    assert haversine_km(0, 0, 1, 0) == pytest.approx(6371.0088 * math.pi / 180, rel=1e-12)
    assert haversine_km(0, 179.5, 0, -179.5) == pytest.approx(haversine_km(0, 0, 0, 1), rel=1e-12)
    assert haversine_km(0, 0, 0, 180) == pytest.approx(6371.0088 * math.pi, rel=1e-12)


# -- the property ------------------------------------------------------------------

world_strategy = st.tuples(
    st.sampled_from(CENTRES),
    st.lists(
        st.tuples(
            st.floats(-0.3, 0.3),  # lat offset, degrees (about +-33 km)
            st.floats(-0.6, 0.6),  # lng offset, degrees
            st.sampled_from(STATES),
        ),
        min_size=0,
        max_size=40,
    ),
    st.lists(
        st.tuples(
            st.floats(-0.25, 0.25),
            st.floats(-0.5, 0.5),
            st.one_of(st.just(50.0), st.floats(0.05, 50.0)),
            st.one_of(st.integers(1, 5), st.integers(1, 100)),
        ),
        min_size=1,
        max_size=4,
    ),
    st.booleans(),  # ask again once the "starting" deals have started
)


@pytest.mark.timeout(150)
@hsettings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(world=world_strategy)
def test_answers_match_brute_force_haversine_over_active_deals(
    settings: Settings, world: tuple[Any, ...]
) -> None:
    """Same deals, nearest first, within the radius, limit respected; cached or not; and
    deals that start during the test appear once started."""
    (clat, clng), deals, queries, later = world

    async def ask(store: Store, placed: list[Placed], active: tuple[str, ...]) -> None:
        cached = Discovery(store)
        uncached = Discovery(store, cache_s=0)
        for qdlat, qdlng, radius, limit in queries:
            lat, lng = clamp_lat(clat + qdlat), wrap_lng(clng + qdlng)
            want = brute_force(placed, lat, lng, radius, limit, active)
            for d in (cached, uncached, cached):  # the second `cached` is a hit
                found = await d.nearby(lat, lng, radius, limit)
                assert_well_formed(found, radius, limit)
                assert ids_and_distances(found) == want, (
                    f"{d.cache_s=} {lat=} {lng=} {radius=} {limit=} {placed=}"
                )
        assert cached.hits >= len(queries)
        assert cached.work.short_answers == uncached.work.short_answers == 0
        await cached.close()
        await uncached.close()

    async def scenario() -> None:
        flush(settings.redis_url or "", settings.redis_cluster)
        store = await Store.connect(settings)
        try:
            placed = []
            # Deals that start during the test last, so they are still scheduled at first.
            for dlat, dlng, state in sorted(deals, key=lambda d: d[2] == "starting"):
                lat, lng = clamp_lat(clat + dlat), wrap_lng(clng + dlng)
                placed.append(Placed(await place(store, lat, lng, state), lat, lng, state))
            await ask(store, placed, ("active",))
            starting = [p for p in placed if p.state == "starting"]
            if later and starting:
                starts = max([(await get_deal(store, p.id)).starts_at_ms for p in starting])
                await wait_until(store, starts)
                await ask(store, placed, ("active", "starting"))
        finally:
            await store.close()

    asyncio.run(scenario())


# -- edges ---------------------------------------------------------------------------


async def test_antimeridian_deals_on_both_sides_are_found(
    store: Store, discover: Callable[..., Discovery]
) -> None:
    """From lng 180, -180 or just beside it, deals on either side are neighbours."""
    east = await place(store, 10.0, 179.99, "active")
    west = await place(store, 10.0, -179.99, "active")
    d = discover()
    for lng in (180.0, -180.0, 179.995, -179.9999):
        found = await d.nearby(10.0, lng, 5.0, 10)
        assert {n.deal.id for n in found} == {east, west}
        for n in found:
            assert n.distance_km == pytest.approx(haversine_km(10.0, lng, n.deal.lat, n.deal.lng))
            assert n.distance_km < 2.2


async def test_deals_and_callers_at_the_edges_of_the_geo_band_are_served(
    store: Store, discover: Callable[..., Discovery]
) -> None:
    """Deals and callers at +-85.05112878 (the band a geo index holds) are served."""
    north = await place(store, LAT_MAX, 10.0, "active")
    north_near = await place(store, LAT_MAX - 0.01, 10.05, "active")
    south = await place(store, -LAT_MAX, -179.0, "active")
    d = discover()
    found = await d.nearby(LAT_MAX, 10.0, 5.0, 20)
    assert [n.deal.id for n in found] == [north, north_near]
    assert found[0].distance_km == 0.0
    found = await d.nearby(-LAT_MAX, 180.0, 50.0, 20)
    assert [n.deal.id for n in found] == [south]
    assert found[0].distance_km == pytest.approx(haversine_km(-LAT_MAX, 180.0, -LAT_MAX, -179.0))


async def test_a_50_km_radius_includes_49_9_and_excludes_50_1_km(
    store: Store, discover: Callable[..., Discovery]
) -> None:
    lat, lng = 12.9716, 77.5946
    per_deg = haversine_km(lat, lng, lat + 1, lng)
    inside = await place(store, lat + 49.9 / per_deg, lng, "active")
    outside = await place(store, lat - 50.1 / per_deg, lng, "active")
    for d in (discover(), discover(cache_s=0)):
        found = await d.nearby(lat, lng, 50.0, 100)
        assert [n.deal.id for n in found] == [inside]
        assert outside not in {n.deal.id for n in found}


async def test_a_deal_exactly_on_the_circle_is_included(
    store: Store, discover: Callable[..., Discovery]
) -> None:
    """radius == the deal's exact distance: in; the next float below: out."""
    lat, lng = 48.8566, 2.3522
    deal_lat, deal_lng = 48.8566 + 0.031415, 2.3522 - 0.027183
    deal = await place(store, deal_lat, deal_lng, "active")
    exact = haversine_km(lat, lng, deal_lat, deal_lng)
    for d in (discover(), discover(cache_s=0)):
        found = await d.nearby(lat, lng, exact, 5)
        assert [(n.deal.id, n.distance_km) for n in found] == [(deal, exact)]
        assert await d.nearby(lat, lng, math.nextafter(exact, 0.0), 5) == []


async def test_an_empty_area_answers_nothing(
    store: Store, discover: Callable[..., Discovery]
) -> None:
    await place(store, 12.9716, 77.5946, "active")
    d = discover()
    assert await d.nearby(-33.8688, 151.2093, 50.0, 100) == []
    assert await d.nearby(-33.8688, 151.2093, 50.0, 100) == []  # and cached


async def test_a_limit_larger_than_the_matches_returns_them_all(
    store: Store, discover: Callable[..., Discovery]
) -> None:
    lat, lng = 40.7128, -74.0060
    ids = [await place(store, lat + i * 0.002, lng, "active") for i in range(3)]
    await place(store, lat + 0.001, lng, "scheduled")
    found = await discover().nearby(lat, lng, 5.0, 100)
    assert [n.deal.id for n in found] == ids


async def test_dense_area_from_the_corner_of_a_cell_matches_brute_force(
    store: Store, discover: Callable[..., Discovery]
) -> None:
    """Hundreds of deals per cell: the cached COUNT-limited candidates get widened as needed."""
    lat0, lng0 = 52.52, 13.40
    world: list[Placed] = []
    specs = []
    for i in range(400):
        lat = lat0 + ((i * 37) % 100) / 2000.0
        lng = lng0 + ((i * 53) % 100) / 2000.0
        state = "ended" if i % 7 == 0 else "scheduled" if i % 11 == 0 else "active"
        specs.append((lat, lng, state))
    ids = await asyncio.gather(*(place(store, a, b, s) for a, b, s in specs))
    world = [Placed(i, a, b, s) for i, (a, b, s) in zip(ids, specs, strict=True)]
    d = discover(cell_deg=0.01)
    # Corners and the centre of one cell, then a far corner of another.
    for lat, lng in [
        (52.5200001, 13.4000001),
        (52.5299999, 13.4099999),
        (52.525, 13.405),
        (52.5399999, 13.4399999),
    ]:
        for radius, limit in [(0.3, 20), (5.0, 20), (5.0, 100), (0.05, 3)]:
            found = await d.nearby(lat, lng, radius, limit)
            assert ids_and_distances(found) == brute_force(world, lat, lng, radius, limit)


async def test_the_response_is_what_the_deals_own_json_would_be(
    store: Store, discover: Callable[..., Discovery]
) -> None:
    """``render`` (cached fragments) == orjson of ``Deal.to_json`` + distance, byte for byte."""
    lat, lng = 41.9028, 12.4964
    for i in range(5):
        await place(store, lat + 0.0013 * i, lng - 0.0007 * i, "active", inventory=3 + i)
    await claims.claim(store, (await discover().nearby(lat, lng, 3.0, 1))[0].deal.id, "u-1")
    d = discover()
    for _ in range(2):  # the first read learns the fixed fields, the second reuses them
        found = await d.nearby(lat, lng, 3.0, 10)
        assert len(found) == 5
        want = []
        for n in found:
            deal = await get_deal(store, n.deal.id)
            assert n.deal == dataclasses.replace(deal, now_ms=n.now_ms)
            want.append({**deal.to_json(), "distance_km": n.distance_km})
            assert n.to_json() == want[-1]
        assert render(found) == orjson.dumps({"deals": want, "count": 5})
    assert render([]) == orjson.dumps({"deals": [], "count": 0})


# -- liveness and the cache --------------------------------------------------------


@pytest.mark.parametrize("cache_s", [30.0, 0.0], ids=["cached", "uncached"])
async def test_a_deal_that_sells_out_is_gone_from_the_very_next_response(
    store: Store, discover: Callable[..., Discovery], cache_s: float
) -> None:
    lat, lng = 35.6762, 139.6503
    first = await place(store, lat + 0.001, lng, "active", inventory=2)
    second = await place(store, lat + 0.002, lng, "active", inventory=2)
    d = discover(cache_s=cache_s)
    assert [n.deal.id for n in await d.nearby(lat, lng, 2.0, 10)] == [first, second]
    await claims.claim(store, first, "u-a")
    answer = await d.nearby(lat, lng, 2.0, 10)
    assert [(n.deal.id, n.deal.inventory_left) for n in answer] == [(first, 1), (second, 2)]
    await claims.claim(store, first, "u-b")  # the last voucher
    assert [n.deal.id for n in await d.nearby(lat, lng, 2.0, 10)] == [second]
    assert [n.deal.id for n in await d.nearby(lat + 0.0001, lng, 2.0, 10)] == [second]


async def test_a_deal_sold_out_behind_the_index_is_still_never_shown(
    store: Store, discover: Callable[..., Discovery]
) -> None:
    """Even if the index still lists it, the live state decides (and the entry goes)."""
    lat, lng = 35.6762, 139.6503
    deal = await place(store, lat, lng, "active")
    d = discover()
    assert len(await d.nearby(lat, lng, 1.0, 5)) == 1
    k = store.keys.for_deal(deal)
    await store.client.hset(k.deal, "left", 0)
    assert await d.nearby(lat, lng, 1.0, 5) == []
    await d.close()
    assert await store.client.zscore(k.geo, deal) is None


async def test_a_deal_whose_hash_vanished_is_not_shown_though_its_fixed_part_is_known(
    store: Store, discover: Callable[..., Discovery]
) -> None:
    """The per-process memory of fixed fields never stands in for the live read."""
    lat, lng = 35.6762, 139.6503
    gone = await place(store, lat, lng, "active")
    kept = await place(store, lat + 0.001, lng, "active")
    probe = discover()
    await probe.nearby(lat, lng, 1.0, 5)
    d = discover()
    # Bounded in bytes: room for one deal's fixed part, so the older one is forgotten and
    # read in full again.
    d.fixed_bytes = max(f.cost for f in probe._fixed.values())
    assert [n.deal.id for n in await d.nearby(lat, lng, 1.0, 5)] == [gone, kept]
    assert len(d._fixed) == 1
    assert d.fixed_used_bytes <= d.fixed_bytes
    await store.client.delete(store.keys.for_deal(gone).deal)
    for _ in range(2):
        assert [n.deal.id for n in await d.nearby(lat, lng, 1.0, 5)] == [kept]


async def test_deals_met_before_are_judged_by_what_each_read_finds(
    store: Store, discover: Callable[..., Discovery]
) -> None:
    """With every deal's fixed part known, a deal sold out, cancelled or deleted since the
    last answer is dropped from the next (a cache hit), and a hash without ``seq`` reads
    as 0: whatever the read finds, not what the process remembers."""
    lat, lng = 48.8566, 2.3522
    ids = [await place(store, lat + 0.0005 * i, lng, "active") for i in range(6)]
    d = discover()
    assert [n.deal.id for n in await d.nearby(lat, lng, 2.0, 20)] == ids
    assert all(i in d._fixed for i in ids)
    sold, cancelled, gone, no_seq = ids[1:5]
    keys = {i: store.keys.for_deal(i).deal for i in ids}
    await store.client.hset(keys[sold], "left", 0)
    await store.client.hset(keys[cancelled], "cancelled", now_ms())
    await store.client.delete(keys[gone])
    await store.client.hdel(keys[no_seq], "seq")
    found = await d.nearby(lat, lng, 2.0, 20)
    assert d.hits == 1
    assert [n.deal.id for n in found] == [ids[0], no_seq, ids[5]]
    assert [n.deal.seq for n in found] == [0, 0, 0]
    assert render(found) == orjson.dumps({"deals": [n.to_json() for n in found], "count": 3})
    # Deals met before, all there: the same answer, read by either way.
    assert [n.deal.id for n in await d.nearby(lat, lng, 2.0, 20)] == [ids[0], no_seq, ids[5]]


async def test_cancelled_and_ended_deals_are_never_shown(
    store: Store, discover: Callable[..., Discovery]
) -> None:
    lat, lng = -23.5505, -46.6333
    live = await place(store, lat, lng, "active")
    for state in ("cancelled", "stale_cancelled", "ended", "scheduled"):
        await place(store, lat + 0.001, lng, state)
    found = await discover().nearby(lat, lng, 5.0, 100)
    assert [n.deal.id for n in found] == [live]


async def test_neighbours_share_a_cell_entry_and_new_deals_appear_when_it_expires(
    store: Store,
    discover: Callable[..., Discovery],
) -> None:
    lat, lng = 51.5072, -0.1276
    await place(store, lat, lng, "active")
    clock = Clock()
    d = discover(cache_s=30.0, cell_deg=0.01, clock=clock)
    assert len(await d.nearby(51.5071, -0.1271, 3.0, 20)) == 1
    assert len(await d.nearby(51.5079, -0.1279, 3.0, 20)) == 1  # same cell: a hit
    assert (d.hits, d.misses) == (1, 1)
    newer = await place(store, lat + 0.001, lng, "active")
    clock.now += 31.0
    found = await d.nearby(51.5071, -0.1271, 3.0, 20)
    assert newer in {n.deal.id for n in found}
    assert d.misses == 2


async def test_nearby_radii_and_limits_share_an_entry_and_stay_exact(
    store: Store,
    discover: Callable[..., Discovery],
) -> None:
    """Radii of 2.1-2.4 km and limits of 11-20 share one entry; each answer is exact."""
    lat, lng = 51.5072, -0.1276
    near = await place(store, lat + 0.018, lng, "active")  # ~2.0 km north
    far = await place(store, lat + 0.0207, lng, "active")  # ~2.3 km north
    d = discover(cache_s=30.0, cell_deg=0.01, clock=Clock())
    assert [n.deal.id for n in await d.nearby(lat, lng, 2.1, 20)] == [near]
    assert [n.deal.id for n in await d.nearby(lat, lng, 2.4, 15)] == [near, far]
    assert [n.deal.id for n in await d.nearby(lat, lng, 2.2, 11)] == [near]
    assert (d.hits, d.misses) == (2, 1)


async def test_terminal_deals_leave_the_index_when_seen_and_when_swept(
    store: Store, discover: Callable[..., Discovery]
) -> None:
    """An index written before the timeline (or rebuilt from PostgreSQL) is put right by
    the sweep: ended and stale deals leave, scheduled ones wait outside, active ones are
    listed by end."""
    seen = await place(store, 1.0, 1.0, "active")
    unseen = [await place(store, -1.0, -1.0 - i * 0.01, "ended") for i in range(5)]
    stale = await place(store, 20.0, 20.0, "stale_cancelled")
    active, scheduled = [await place(store, 30.0, 30.0, s) for s in ("active", "scheduled")]
    # The legacy layout: every deal in the geo index, none in the timeline.
    for deal_id in [*unseen, active, scheduled]:
        k = store.keys.for_deal(deal_id)
        deal = await get_deal(store, deal_id)
        await store.client.geoadd(k.geo, (deal.lng, deal.lat, deal_id))
        await store.client.zrem(k.geo_starts, deal_id)
        await store.client.zrem(k.geo_ends, deal_id)
    await store.client.hset(store.keys.for_deal(seen).deal, "left", 0)  # behind the index
    d = discover()
    assert await d.nearby(1.0, 1.0, 1.0, 5) == []
    await d.close()
    k = store.keys.for_deal(seen)
    assert await store.client.zscore(k.geo, seen) is None
    assert await d.sweep() == 7  # 5 ended, the stale one, the scheduled one moved out
    for deal_id in [*unseen, stale, scheduled]:
        assert await store.client.zscore(store.keys.for_deal(deal_id).geo, deal_id) is None
    k = store.keys.for_deal(scheduled)
    assert await store.client.zscore(k.geo_starts, scheduled) is not None
    k = store.keys.for_deal(active)
    assert await store.client.zscore(k.geo, active) is not None
    assert await store.client.zscore(k.geo_ends, active) is not None
    assert await d.sweep() == 0


async def test_the_sweep_lease_lets_one_process_sweep_a_partition(
    store: Store, discover: Callable[..., Discovery]
) -> None:
    ended = await place(store, 5.0, 5.0, "stale_cancelled")
    a, b = discover(), discover()
    assert await a.sweep(lease_ms=60_000) == 1
    await place(store, 5.0, 5.1, "stale_cancelled")
    assert await b.sweep(lease_ms=60_000) == 0  # every partition's lease is held
    assert await store.client.zscore(store.keys.for_deal(ended).geo, ended) is None


async def test_an_unreachable_store_is_unavailable_not_a_bug(redis_url: str) -> None:
    """Redis going away mid-query is a 503-shaped ``StoreUnavailable``, never a crash."""
    store = await Store.connect(Settings(redis_url=redis_url, redis_timeout_s=0.2))
    live = store.client
    store.client = make_client(store.settings, f"redis://127.0.0.1:{free_port()}/0")
    try:
        with pytest.raises(StoreUnavailable):
            await Discovery(store).nearby(1.0, 1.0, 1.0, 1)
    finally:
        await store.client.aclose()
        store.client = live
        await store.close()


# -- the timeline: scheduled deals wait outside the index, ended ones leave ----------


async def test_a_scheduled_deal_waits_outside_the_index_and_appears_once_started(
    store: Store, discover: Callable[..., Discovery]
) -> None:
    """Not in the geo index until it starts; then in at the next search, so it appears
    within the cache time of its start, like a new deal."""
    lat, lng = 40.4168, -3.7038
    spec = new_deal(3, lat=lat, lng=lng, starts_in_ms=1_000)
    deal = await create_deal(store, spec)
    k = store.keys.for_deal(deal.id)
    assert await store.client.zscore(k.geo, deal.id) is None
    assert await store.client.zscore(k.geo_starts, deal.id) == spec.starts_at_ms
    clock = Clock()
    d = discover(clock=clock)
    assert await d.nearby(lat, lng, 1.0, 5) == []
    await wait_until(store, spec.starts_at_ms)
    assert await d.nearby(lat, lng, 1.0, 5) == []  # the cell's entry from before the start
    clock.now += d.cache_s
    assert [n.deal.id for n in await d.nearby(lat, lng, 1.0, 5)] == [deal.id]
    assert await store.client.zscore(k.geo, deal.id) is not None
    assert await store.client.zscore(k.geo_starts, deal.id) is None
    assert await store.client.zscore(k.geo_ends, deal.id) == spec.ends_at_ms


async def test_advance_moves_started_deals_in_and_ended_deals_out(
    store: Store, discover: Callable[..., Discovery]
) -> None:
    """Without any search: a started deal enters, an ended one leaves, a scheduled deal
    cancelled before its start never enters."""
    soon = new_deal(3, lat=1.0, lng=2.0, starts_in_ms=800)
    ending = new_deal(3, lat=1.0, lng=2.1, starts_in_ms=-60_000, lasts_ms=60_800)
    dropped = new_deal(3, lat=1.0, lng=2.2, starts_in_ms=800, merchant_id="m-2")
    ids = [(await create_deal(store, spec)).id for spec in (soon, ending, dropped)]
    await cancel_deal(store, ids[2], "m-2")
    keys = [store.keys.for_deal(i) for i in ids]
    assert await store.client.zscore(keys[1].geo, ids[1]) is not None
    await wait_until(store, max(soon.starts_at_ms, ending.ends_at_ms))
    assert await discover().advance() == 2  # the two scheduled deals' hashes were read
    k = keys[0]
    assert await store.client.zscore(k.geo, ids[0]) is not None
    assert await store.client.zscore(k.geo_starts, ids[0]) is None
    for k, deal_id in zip(keys[1:], ids[1:], strict=True):
        for index in (k.geo, k.geo_starts, k.geo_ends):
            assert await store.client.zscore(index, deal_id) is None
    assert await discover().advance() == 0


# -- the bounds -----------------------------------------------------------------------


async def command_calls(store: Store) -> Counter[str]:
    """Calls per command (scripts' inner commands included) over every primary."""
    if store.settings.redis_cluster:
        per_node = await store.client.info("commandstats", target_nodes=store.client.PRIMARIES)
        stats = list(per_node.values())
    else:
        stats = [await store.client.info("commandstats")]
    out: Counter[str] = Counter()
    for stat in stats:
        for name, v in stat.items():
            if name.startswith("cmdstat_"):
                out[name.removeprefix("cmdstat_").lower()] += int(v["calls"])
    return out


async def create_many(store: Store, specs: list[Any]) -> list[str]:
    ids: list[str] = []
    for i in range(0, len(specs), 500):
        made = await asyncio.gather(*(create_deal(store, s) for s in specs[i : i + 500]))
        ids += [m.id for m in made]
    return ids


@pytest.mark.timeout(300)
async def test_after_an_ocean_query_and_5000_scheduled_deals_any_request_stays_within_bounds(
    store: Store, discover: Callable[..., Discovery]
) -> None:
    """The issue's two attacks, then requests anywhere: each reads at most the stated
    bounds (counted by Redis's commandstats and by the scripts' replies), scheduled deals
    cost nothing, and every answer is still exact."""
    rnd = random.Random(12)
    city, spot = (48.8566, 2.3522), (48.8601, 2.3412)
    active = [
        new_deal(5, lat=city[0] + rnd.uniform(-0.2, 0.2), lng=city[1] + rnd.uniform(-0.3, 0.3))
        for _ in range(2_000)
    ]
    ids = await create_many(store, active)
    world = [Placed(i, s.lat, s.lng, "active") for i, s in zip(ids, active, strict=True)]
    await create_many(
        store, [new_deal(5, lat=spot[0], lng=spot[1], starts_in_ms=200 * 24 * HOUR_MS)] * 5_000
    )
    d = discover()
    bounds = d.bounds()
    requests = [
        (-30.0, -140.0, 50.0, 100),  # the ocean
        (*spot, 50.0, 100),  # on the 5,000 scheduled deals
        (*spot, 0.5, 20),
        (city[0] + 0.031, city[1] - 0.052, 50.0, 100),  # fresh cells of the city
        (city[0] - 0.117, city[1] + 0.203, 50.0, 100),
        (city[0] + 0.45, city[1], 50.0, 100),  # 50 km north: the city at the rim
        (city[0] + 0.19, city[1] + 0.29, 2.0, 10),
        (-30.0, -140.0, 50.0, 100),
    ]
    for lat, lng, radius, limit in requests:
        before, work = await command_calls(store), dataclasses.replace(d.work)
        found = await d.nearby(lat, lng, radius, limit)
        calls, after = await command_calls(store), d.work
        used = {
            "search_geo calls": after.searches - work.searches,
            "GEOSEARCH calls": calls["geosearch"] - before["geosearch"],
            "ZCOUNT calls": calls["zcount"] - before["zcount"],
            "geo members returned": after.geo_returned - work.geo_returned,
            "geo members scanned": after.geo_scan_bound - work.geo_scan_bound,
            "deal hashes read": calls["hmget"] - before["hmget"],
        }
        for name, most in bounds.items():
            assert used[name] <= most, (name, used, lat, lng, radius, limit)
        # Redis counts the scripts' inner commands: every deal hash read is a live read;
        # the 5,000 scheduled deals were never read, nor any promoted.
        assert used["deal hashes read"] == after.deals_read - work.deals_read <= 2 * limit + 8
        assert used["GEOSEARCH calls"] == after.geosearches - work.geosearches
        assert after.timeline_read == 0
        assert ids_and_distances(found) == brute_force(world, lat, lng, radius, limit)
    assert d.work.short_answers == 0


async def test_past_the_bounds_the_answer_is_the_exact_nearest_as_far_as_searched(
    store: Store, discover: Callable[..., Discovery]
) -> None:
    """A scan budget or a read budget too small for the answer: what is returned is the
    exact beginning of the full answer (nothing nearer is left out), never a guess."""
    rnd = random.Random(3)
    lat0, lng0 = -33.8688, 151.2093
    specs = [
        new_deal(5, lat=lat0 + rnd.uniform(-0.09, 0.09), lng=lng0 + rnd.uniform(-0.11, 0.11))
        for _ in range(600)
    ]
    ids = await create_many(store, specs)
    world = [Placed(i, s.lat, s.lng, "active") for i, s in zip(ids, specs, strict=True)]
    want = brute_force(world, lat0, lng0, 50.0, 100)
    scan = discover(scan_budget=20, cache_s=0)
    found = ids_and_distances(await scan.nearby(lat0, lng0, 50.0, 100))
    assert 0 < len(found) < 100 and found == want[: len(found)]
    assert scan.work.short_answers == 1
    assert scan.work.geo_scan_bound <= scan.bounds()["geo members scanned"] == 3 * 16 * 20
    read = discover(read_budget=15)
    found = ids_and_distances(await read.nearby(lat0, lng0, 50.0, 100))
    assert 0 < len(found) <= 15 and found == want[: len(found)]
    assert read.work.deals_read <= 15 and read.work.short_answers == 1


def entry_bytes(e: Any) -> int:
    """What an entry really holds (its strings counted whole, as if not shared)."""
    arrays = (e.dist_km, e.xs, e.ys, e.zs)
    return (
        sys.getsizeof(e)
        + sys.getsizeof(e.ids)
        + sum(map(sys.getsizeof, e.ids))
        + sum(map(sys.getsizeof, arrays))
        + sys.getsizeof(e.dead)
    )


async def test_the_cache_holds_at_most_its_bytes_whatever_cells_are_asked(
    store: Store, discover: Callable[..., Discovery]
) -> None:
    """Cells by the hundred, each a miss: the cache stays within its byte budget, and
    each entry counts itself at least at what it holds."""
    rnd = random.Random(9)
    lat0, lng0 = 52.52, 13.40
    await create_many(
        store,
        [
            new_deal(5, lat=lat0 + rnd.uniform(-0.05, 0.05), lng=lng0 + rnd.uniform(-0.08, 0.08))
            for _ in range(400)
        ],
    )
    d = discover(cache_bytes=96 * 1024)
    for i in range(120):
        await d.nearby(lat0 + (i % 12) * 0.011, lng0 + (i // 12) * 0.013, 5.0, 100)
    assert d.misses == 120
    assert 0 < d.cache_used_bytes <= 96 * 1024
    assert 0 < len(d._cache) < 120
    for e in d._cache.values():
        assert entry_bytes(e) <= e.cost
    assert d.cache_used_bytes == sum(e.cost for e in d._cache.values())
    assert d.fixed_used_bytes <= d.fixed_bytes
