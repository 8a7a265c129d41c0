"""Discovery: active deals near a point, from the partition geo indexes, exact and live.

How an answer is made:

1. **Candidates** come from the geo indexes (one per partition, ``fs:{pNN}:geo``), searched
   from the centre of the caller's quantized cell by ``search_geo`` (``GEOSEARCH ...
   WITHCOORD`` in Lua: one call for every partition on one node, one per partition on a
   cluster, all in the store's one round trip). The search is wide enough for any point
   of the cell, so neighbours share one cached entry: ids, geo-index coordinates and
   distances from the cell centre, never stock or status. An entry first covers only the
   distance that should hold enough deals at the density seen last; it records how far
   it is complete (``covered_km``) and is widened when a caller needs more.
2. **Exact order** for the caller's own point: candidates are measured in order of
   distance from the centre until none left can beat the n-th nearest (triangle
   inequality), by Haversine with Earth radius 6371.0088 km.
3. **Live state** of the nearest ``limit`` is read on every response (``read_deals``: one
   Lua call, per partition on a cluster, returning ``left``, ``cancelled``, ``seq`` and
   the deal's own Redis clock, as claims judge it); only ``active`` deals are kept, and
   the exact distance is taken from the hash's coordinates (the geo index rounds them to
   its 52-bit geohash, well under ``GEO_SLACK_KM``). A deal's fixed fields (title, place,
   times, total) never change after creation: each process reads them once, with the
   first live read, and keeps them with their JSON (``render``).

Terminal deals (ended, cancelled, sold out) seen on the way leave the index at once;
``sweep`` removes the ended ones nobody looked at, so the index does not grow.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import math
import sys
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson

from engine.deals import (
    ACTIVE,
    CANCELLED,
    ENDED,
    LAT_MAX,
    SCHEDULED,
    SOLD_OUT,
    Deal,
    DealHash,
    deal_status,
)
from engine.errors import StoreUnavailable
from engine.keys import geo_key, geo_sweep_key
from engine.store import Store
from engine.times import now_ms

log = logging.getLogger(__name__)

EARTH_RADIUS_KM = 6371.0088  # the API's Haversine radius (IUGG mean radius)
_RADIUS_STEP_KM = 0.5  # cache entries are keyed by the radius rounded up to this
_LIMIT_STEPS = (10, 20, 50, 100)  # ... and by the limit rounded up to one of these
REDIS_EARTH_RADIUS_KM = 6372.797560856  # what GEOSEARCH measures with
# Geo-index coordinates are a 52-bit geohash cell's centre: at most ~0.35 m off the
# deal's own. Every bound that mixes the two kinds of coordinates allows this much.
GEO_SLACK_KM = 0.002
_REDIS_SCALE = REDIS_EARTH_RADIUS_KM / EARTH_RADIUS_KM
_DIAMETER_KM = 2 * EARTH_RADIUS_KM

# GEOSEARCH's cost grows with the area it scans (about 0.4 ms per 6k-deal partition at
# 5.8 km, 0.03 ms at 1 km), so an entry first covers only the distance that should hold
# this many times ``limit`` deals at the density seen last; it is widened by this
# factor (up to the full radius) when a caller needs more.
_DENSITY_MARGIN = 2.0
_WIDEN_FACTOR = 3.0
CACHE_ENTRIES = 4_096  # entries kept per process (least recently used go first)
# Deals whose fixed fields (title, place, times, total: never changed after creation) this
# process remembers, so a response reads only ``left``, ``cancelled`` and ``seq`` live.
FIXED_ENTRIES = 65_536
SWEEP_CHUNK = 500  # members read per ZSCAN step
# A deal is swept as ended only once this process's clock is this far past ``ends``:
# the claim script judges by Redis's clock, and the sweep must never be early.
SWEEP_CLOCK_MARGIN_MS = 10_000
_TERMINAL_LEFT = 0


def haversine_km(lat1: float, lng1: float, lat2: float, lng2: float) -> float:
    """Great-circle distance in km (Haversine, Earth radius 6371.0088 km)."""
    p1 = math.radians(lat1)
    p2 = math.radians(lat2)
    a = (
        math.sin((p2 - p1) / 2) ** 2
        + math.cos(p1) * math.cos(p2) * math.sin(math.radians(lng2 - lng1) / 2) ** 2
    )
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(a)))


# ``read_deals`` returns, per deal, its ``DealHash.LIVE`` fields and then, for a deal this
# process has not met yet, its ``DealHash.FIXED`` ones.
_LIVE, _FIXED = len(DealHash.LIVE), len(DealHash.FIXED)
_LEFT, _CANCELLED, _SEQ = (
    DealHash.LIVE.index(f) for f in (DealHash.LEFT, DealHash.CANCELLED, DealHash.SEQ)
)
_READ_ALL = (*DealHash.LIVE, *DealHash.FIXED)


@dataclass(frozen=True, slots=True)
class _Fixed:
    """What never changes in a deal after it is created (and its JSON, but the live part)."""

    id: str
    key: str  # the deal hash
    merchant_id: str
    title: str
    description: str
    lat: float
    lng: float
    total: int
    starts_ms: int
    ends_ms: int
    redeem_ms: int
    # ``Deal.to_json`` as bytes, cut around its live fields (see ``render``).
    json_head: bytes  # '{"id":...,"inventory_total":N,'
    json_mid: bytes  # '"starts_at":...,"redeem_until":"...",'

    @classmethod
    def of(cls, deal: Deal, key: str) -> _Fixed:
        """The fixed part of ``deal``, whose hash is ``key``."""
        items = list(deal.to_json().items())
        names = [name for name, _ in items]
        left, status = names.index("inventory_left"), names.index("status")
        head = orjson.dumps(dict(items[:left]))[:-1] + b","
        mid = orjson.dumps(dict(items[left + 1 : status]))[1:-1] + b","
        return cls(
            deal.id, key, sys.intern(deal.merchant_id), deal.title, deal.description,
            deal.lat, deal.lng, deal.inventory_total, deal.starts_at_ms, deal.ends_at_ms,
            deal.redeem_until_ms, head, mid,
        )  # fmt: skip


class Nearby(NamedTuple):
    """An active deal and its exact distance from the caller."""

    fixed: _Fixed
    left: int
    seq: int
    cancelled_at_ms: int | None
    now_ms: int  # the deal's Redis node clock when it was read
    distance_km: float

    @property
    def deal(self) -> Deal:
        """The deal as ``engine.deals`` reads it."""
        f = self.fixed
        return Deal(
            f.id, f.merchant_id, f.title, f.description, f.lat, f.lng, f.total,
            max(self.left, 0), self.seq, f.starts_ms, f.ends_ms, f.redeem_ms,
            self.cancelled_at_ms, self.now_ms,
        )  # fmt: skip

    @property
    def status(self) -> str:
        f = self.fixed
        return deal_status(
            self.now_ms, f.starts_ms, f.ends_ms, self.left, self.cancelled_at_ms is not None
        )

    def to_json(self) -> dict[str, Any]:
        """The API's ``Deal`` object plus ``distance_km`` (what ``render`` writes)."""
        return {**self.deal.to_json(), "distance_km": self.distance_km}


_STATUS_JSON = {s: orjson.dumps(s) for s in (SCHEDULED, ACTIVE, SOLD_OUT, ENDED, CANCELLED)}


def render(found: list[Nearby]) -> bytes:
    """``{"deals": [n.to_json() ...], "count": n}`` as orjson writes it, from fragments.

    The fixed part of each deal was serialized once, when this process first read it.
    """
    parts = [
        b'%s"inventory_left":%d,%s"status":%s,"distance_km":%s}'
        % (
            n.fixed.json_head,
            max(n.left, 0),
            n.fixed.json_mid,
            _STATUS_JSON[n.status],
            orjson.dumps(n.distance_km),
        )
        for n in found
    ]
    return b'{"deals":[%s],"count":%d}' % (b",".join(parts), len(found))


# One live read: the fixed part, left, seq, cancelled_at_ms, the node's clock (ms).
_Live = tuple[_Fixed, int, int, int | None, int]


@dataclass(slots=True)
class _Candidates:
    """A cached candidate list for one cell: ids and where the index puts them, no state."""

    lat: float  # the search centre
    lng: float
    ids: list[str]
    dist_km: array[float]  # from the centre, ascending
    # Where the index puts them, in radians, and the cosines of the latitudes (the walk).
    rlats: array[float]
    rlngs: array[float]
    coslats: array[float]
    # Every indexed deal within this distance of the centre was in the index's answer.
    covered_km: float
    expires_at: float
    # Ids seen in a terminal state (ended, cancelled, sold out, gone): never read again.
    dead: set[str] = field(default_factory=set)


class _Nearest:
    """The candidates in increasing distance from the caller, measured only when needed."""

    def __init__(self, c: _Candidates, lat: float, lng: float, max_km: float) -> None:
        self.c = c
        self.lat = lat
        self.lng = lng
        # The caller is this far from the centre: a candidate at ``d`` from the centre is
        # at least ``d - offset`` from the caller (triangle inequality).
        self.offset = haversine_km(lat, lng, c.lat, c.lng)
        self.max_km = max_km
        self.heap: list[tuple[float, int]] = []  # (Haversine's a, index)
        self.i = 0
        self.rlat = math.radians(lat)
        self.rlng = math.radians(lng)
        self.coslat = math.cos(self.rlat)

    def take(self, n: int, up_to_km: float, tail_km: float = 0.0) -> list[str]:
        """Up to ``n`` next nearest ids at most ``up_to_km`` away, and after them any
        within ``tail_km`` of the last (so a near tie is read now, not in another trip).

        Candidates are measured in order of distance from the centre until none left
        unmeasured can beat the ``n``-th nearest measured (triangle inequality). Haversine
        is inlined on radians and cosines computed once per entry, and compared as its
        ``a`` term (``sin(d / 2R) ** 2``, monotonic in the distance), so ``asin`` and
        ``sqrt`` run only when a bound moves: the same order as ``haversine_km`` to
        ~1e-12 km, far inside ``GEO_SLACK_KM``.
        """
        c, heap, count, start = self.c, self.heap, len(self.c.ids), self.i
        dist, rlats, rlngs, coslats = c.dist_km, c.rlats, c.rlngs, c.coslats
        ids, dead = c.ids, c.dead
        offset, rlat, rlng, coslat = self.offset, self.rlat, self.rlng, self.coslat
        a_max = _a_of(self.max_km)
        # A candidate farther than this from the centre cannot be among the n nearest.
        reach = min(self.max_km, up_to_km) + offset
        # The n nearest measured and not yet taken, as a max-heap (negated ``a``).
        best = [-a for a, _ in heapq.nsmallest(n, heap)]
        heapq.heapify(best)
        if len(best) >= n:
            reach = min(reach, _km_of(-best[0]) + tail_km + offset)
        sin, push, replace = math.sin, heapq.heappush, heapq.heapreplace
        stop = count
        for i in range(start, count):
            if dist[i] > reach:
                stop = i
                break
            if ids[i] in dead:
                continue
            s_lat = sin((rlats[i] - rlat) * 0.5)
            s_lng = sin((rlngs[i] - rlng) * 0.5)
            a = s_lat * s_lat + coslat * coslats[i] * s_lng * s_lng
            if a <= a_max:
                push(heap, (a, i))
                if len(best) < n:
                    push(best, -a)
                    if len(best) == n:
                        reach = min(reach, _km_of(-best[0]) + tail_km + offset)
                elif a < -best[0]:
                    replace(best, -a)
                    reach = min(reach, _km_of(-best[0]) + tail_km + offset)
        self.i = stop
        out: list[str] = []
        pop, a_up = heapq.heappop, _a_of(up_to_km)
        last = 0.0
        while heap and len(out) < n and heap[0][0] <= a_up:
            last, k = pop(heap)
            out.append(ids[k])
        if tail_km and len(out) == n:
            a_tail = min(a_up, _a_of(_km_of(last) + tail_km))
            while heap and heap[0][0] <= a_tail:
                out.append(ids[pop(heap)[1]])
        return out


def _a_of(km: float) -> float:
    """Haversine's ``a`` term of a distance (its inverse is ``_km_of``)."""
    return math.sin(min(km / _DIAMETER_KM, math.pi / 2)) ** 2


def _km_of(a: float) -> float:
    return _DIAMETER_KM * math.asin(min(1.0, math.sqrt(a)))


class Discovery:
    """Answers "active deals near here", with a per-process cache of candidate ids."""

    def __init__(
        self,
        store: Store,
        *,
        cache_s: float | None = None,
        cell_deg: float | None = None,
        cache_entries: int = CACHE_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.cache_s = store.settings.discovery_cache_s if cache_s is None else cache_s
        self.cell_deg = store.settings.discovery_cell_deg if cell_deg is None else cell_deg
        self.cache_entries = cache_entries
        self.clock = clock
        self._cache: OrderedDict[tuple[int, int, float, int], _Candidates] = OrderedDict()
        self._loading: dict[tuple[int, int, float, int], asyncio.Future[_Candidates]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._density = 0.0  # indexed deals per km2 around the last cell loaded
        self._geo_keys = store.keys.all_geo()
        self._cluster = store.settings.redis_cluster
        self._half_diag: dict[tuple[int, bool], float] = {}
        self._fixed: dict[str, _Fixed] = {}  # insertion-ordered: the oldest go first
        self.fixed_entries = FIXED_ENTRIES
        self.hits = 0
        self.misses = 0

    # -- the query -------------------------------------------------------------

    async def nearby(self, lat: float, lng: float, radius_km: float, limit: int) -> list[Nearby]:
        """Active deals within ``radius_km`` of the point, nearest first, at most ``limit``."""
        # Cache entries are shared by callers whose radius and limit round up to the same
        # step, so varying them slightly cannot force a miss each time; each caller's own
        # radius and limit then filter the shared superset exactly.
        shared_km = math.ceil(radius_km / _RADIUS_STEP_KM) * _RADIUS_STEP_KM
        shared_limit = next(b for b in _LIMIT_STEPS if b >= limit)
        key, clat, clng, half_diag_km = self._cell(lat, lng, shared_km, shared_limit)
        full_km = shared_km + half_diag_km
        entry = await self._entry(key, clat, clng, full_km, half_diag_km, shared_limit)
        while True:
            found = await self._answer(entry, lat, lng, radius_km, limit)
            if found is not None:
                return found
            if entry.covered_km >= full_km:
                break
            # Too few candidates for this corner of the cell: widen the shared entry.
            entry = await self._load(clat, clng, min(full_km, entry.covered_km * _WIDEN_FACTOR))
            self._remember(key, entry)
        # Still short (only if the cell geometry was misjudged): search from the caller.
        entry = await self._load(lat, lng, radius_km)
        found = await self._answer(entry, lat, lng, radius_km, limit)
        assert found is not None, "a complete search from the caller always suffices"
        return found

    async def _answer(
        self, c: _Candidates, lat: float, lng: float, radius_km: float, limit: int
    ) -> list[Nearby] | None:
        """The answer from ``c``, or ``None`` if ``c`` might miss a nearer active deal."""
        walk = _Nearest(c, lat, lng, radius_km + GEO_SLACK_KM)
        found: list[tuple[float, str, Nearby]] = []
        threshold = radius_km  # a deal farther than this cannot be in the answer
        first = True
        while True:
            # Most candidates are active (terminal ones leave the entry when first seen):
            # read exactly ``limit`` first, and twice what is missing after that.
            want = limit if first else max(limit - len(found), 4) * 2
            first = False
            # Index coordinates are up to GEO_SLACK_KM off: a candidate that close behind
            # the last one taken may still be nearer in truth, so it is read as well.
            ids = walk.take(want, threshold + GEO_SLACK_KM, 2 * GEO_SLACK_KM)
            if not ids:
                break
            for deal_id, live in zip(ids, await self._read(ids), strict=True):
                status = None
                if live is not None:
                    f, left, seq, cancelled, now = live
                    status = deal_status(now, f.starts_ms, f.ends_ms, left, cancelled is not None)
                if live is None or status != ACTIVE:
                    if status != SCHEDULED:  # ended, cancelled, sold out or gone: for good
                        c.dead.add(deal_id)
                        self._forget(deal_id)
                    continue
                d = haversine_km(lat, lng, f.lat, f.lng)
                if d <= radius_km:
                    found.append((d, deal_id, Nearby(f, left, seq, cancelled, now, d)))
            if len(found) >= limit:
                found.sort(key=_by_distance)
                del found[limit:]
                threshold = found[-1][0]
        # Deals the index did not return are beyond ``covered_km`` from the centre.
        if c.covered_km - walk.offset - GEO_SLACK_KM < threshold:
            return None
        found.sort(key=_by_distance)
        return [n for _, _, n in found[:limit]]

    async def _read(self, ids: list[str]) -> list[_Live | None]:
        """Live deals (``None`` for gone ones), judged by their own Redis node's clock.

        One ``read_deals`` call in all on one node; on a cluster one per partition (a
        script's keys share a hash slot there), all in one round trip. A deal's fixed
        fields are read only the first time this process meets it.
        """
        keys, fixed = self.store.keys, self._fixed
        known = [fixed.get(deal_id) for deal_id in ids]
        groups: list[list[int]]
        if self._cluster:
            by_partition: dict[int, list[int]] = {}
            for n, deal_id in enumerate(ids):
                by_partition.setdefault(keys.for_deal(deal_id).partition, []).append(n)
            groups = list(by_partition.values())
        else:
            groups = [list(range(len(ids)))]
        hkeys = [
            keys.for_deal(i).deal if f is None else f.key for i, f in zip(ids, known, strict=True)
        ]
        flags = ["1" if f is None else "0" for f in known]
        calls = [
            self.store.run("read_deals", [hkeys[n] for n in group], [flags[n] for n in group])
            for group in groups
        ]
        replies = [await calls[0]] if len(calls) == 1 else await asyncio.gather(*calls)
        out: list[_Live | None] = [None] * len(ids)  # None: gone
        for group, reply in zip(groups, replies, strict=True):
            now, pos = int(reply[0]), 1
            for n in group:
                live = reply[pos : pos + _LIVE]
                left, cancelled, seq = live[_LEFT], live[_CANCELLED], live[_SEQ]
                f = known[n]
                if f is None:
                    if left is not None:
                        f = self._learn(ids[n], hkeys[n], reply[pos : pos + _LIVE + _FIXED], now)
                    pos += _FIXED
                pos += _LIVE
                if left is not None and f is not None:
                    out[n] = (
                        f,
                        int(left),
                        int(seq or 0),
                        int(cancelled) if cancelled else None,
                        now,
                    )
        return out

    def _learn(self, deal_id: str, key: str, values: list[Any], now: int) -> _Fixed:
        """Remember a deal's fixed part, from its ``read_deals`` values (live, then fixed)."""
        h = {name: v for name, v in zip(_READ_ALL, values, strict=True) if v is not None}
        known = self._fixed[deal_id] = _Fixed.of(Deal.from_hash(deal_id, h, now), key)
        if len(self._fixed) > self.fixed_entries:
            del self._fixed[next(iter(self._fixed))]
        return known

    # -- candidates and the cache ---------------------------------------------

    def _cell(
        self, lat: float, lng: float, radius_km: float, limit: int
    ) -> tuple[tuple[int, int, float, int], float, float, float]:
        """The cache key, search centre and half-diagonal (km) of the point's cell."""
        step = self.cell_deg
        rows = math.ceil(2 * LAT_MAX / step)
        cols = math.ceil(360.0 / step)
        y = min(int((lat + LAT_MAX) // step), rows - 1)
        x = min(int((lng + 180.0) // step), cols - 1)
        lat0 = -LAT_MAX + y * step
        lat1 = min(lat0 + step, LAT_MAX)
        lng0 = -180.0 + x * step
        lng1 = min(lng0 + step, 180.0)
        clat, clng = (lat0 + lat1) / 2, (lng0 + lng1) / 2
        half = self._half_diag.get((y, x == cols - 1))
        if half is None:  # the same for every cell of a row (but the last, maybe narrower)
            corners = ((lat0, lng0), (lat0, lng1), (lat1, lng0), (lat1, lng1))
            half = max(haversine_km(clat, clng, a, b) for a, b in corners) * 1.0001 + 1e-6
            self._half_diag[y, x == cols - 1] = half
        return (y, x, radius_km, limit), clat, clng, half

    async def _entry(
        self, key: tuple[int, int, float, int], clat: float, clng: float, full_km: float,
        half_diag_km: float, limit: int,
    ) -> _Candidates:  # fmt: skip
        now = self.clock()
        entry = self._cache.get(key)
        if entry is not None and entry.expires_at > now:
            self.hits += 1
            self._cache.move_to_end(key)
            return entry
        self.misses += 1
        loading = self._loading.get(key)
        if loading is not None:  # a neighbour is fetching this cell right now
            return await asyncio.shield(loading)
        reach_km = full_km
        if self._density > 0:
            # The nearest ``limit`` from anywhere in the cell, at the density seen last.
            wanted = _DENSITY_MARGIN * (limit + 2)
            reach_km = min(full_km, math.sqrt(wanted / (math.pi * self._density)) + half_diag_km)
        future: asyncio.Future[_Candidates] = asyncio.get_running_loop().create_future()
        self._loading[key] = future
        try:
            entry = await self._load(clat, clng, reach_km)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, nobody else must
            raise
        finally:
            del self._loading[key]
        future.set_result(entry)
        self._remember(key, entry)
        return entry

    def _remember(self, key: tuple[int, int, float, int], entry: _Candidates) -> None:
        if self.cache_s <= 0:
            return
        self._cache[key] = entry
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_entries:
            self._cache.popitem(last=False)

    async def _load(self, lat: float, lng: float, reach_km: float) -> _Candidates:
        """Every indexed deal within ``reach_km`` of the point, nearest first."""
        args: list[str] = []
        for c_lat, c_lng, c_km in _centres(lat, lng, reach_km + 2 * GEO_SLACK_KM):
            args += (repr(c_lng), repr(c_lat), repr(c_km * _REDIS_SCALE + GEO_SLACK_KM))
        # One ``search_geo`` in all on one node; one per partition on a cluster (a
        # script's keys share a hash slot there), all in one round trip.
        if self._cluster:
            replies = await asyncio.gather(
                *(self.store.run("search_geo", (key,), args) for key in self._geo_keys)
            )
        else:
            replies = [await self.store.run("search_geo", self._geo_keys, args)]
        rows: list[tuple[float, str, float, float, float]] = []
        seen: set[str] = set()
        # Haversine inlined as in ``_Nearest.take`` (the same formula to ~1e-12 km).
        c_rlat, c_rlng = math.radians(lat), math.radians(lng)
        c_cos, sin, cos, radians = math.cos(c_rlat), math.sin, math.cos, math.radians
        for reply in replies:
            for k in range(0, len(reply), 3):
                member = reply[k]
                if member not in seen:
                    seen.add(member)
                    rlng, rlat = radians(float(reply[k + 1])), radians(float(reply[k + 2]))
                    m_cos = cos(rlat)
                    s_lat, s_lng = sin((rlat - c_rlat) * 0.5), sin((rlng - c_rlng) * 0.5)
                    a = s_lat * s_lat + c_cos * m_cos * s_lng * s_lng
                    rows.append((_km_of(a), member, rlat, rlng, m_cos))
        rows.sort()
        self._density = len(rows) / (math.pi * reach_km**2)
        return _Candidates(
            lat=lat,
            lng=lng,
            ids=[sys.intern(r[1]) for r in rows],
            dist_km=array("d", [r[0] for r in rows]),
            rlats=array("d", [r[2] for r in rows]),
            rlngs=array("d", [r[3] for r in rows]),
            coslats=array("d", [r[4] for r in rows]),
            covered_km=reach_km + 2 * GEO_SLACK_KM,
            expires_at=self.clock() + self.cache_s,
        )

    # -- keeping the index small ------------------------------------------------

    def _forget(self, deal_id: str) -> None:
        """Drop a deal seen in a terminal state from its index, in the background."""
        task = asyncio.get_running_loop().create_task(self._zrem(deal_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _zrem(self, deal_id: str) -> None:
        with contextlib.suppress(StoreUnavailable):  # the sweep will get it
            await self.store.zrem(self.store.keys.for_deal(deal_id).geo, deal_id)

    async def sweep(self, *, lease_ms: int = 0) -> int:
        """Remove ended, cancelled, sold-out and vanished deals from every geo index.

        Args:
            lease_ms: if set, sweep a partition only if no other process has in the last
                ``lease_ms`` (a ``SET NX PX`` lease), so N API processes do the work once.

        Returns:
            How many index entries were removed.
        """
        removed = 0
        for p in range(self.store.keys.partitions):
            removed += await self._sweep_partition(p, lease_ms)
        return removed

    async def _sweep_partition(self, partition: int, lease_ms: int) -> int:
        store, geo = self.store, geo_key(partition)
        removed = 0
        lease = geo_sweep_key(partition)
        if lease_ms and not await store.set_if_absent(lease, "1", ttl_ms=lease_ms):
            return 0
        cursor = 0
        while True:
            cursor, ids = await store.zscan(geo, cursor, count=SWEEP_CHUNK)
            if ids:
                pipe = store.pipeline()
                for deal_id in ids:
                    pipe.hmget(
                        store.keys.for_deal(deal_id).deal,
                        DealHash.ENDS,
                        DealHash.LEFT,
                        DealHash.CANCELLED,
                    )
                states = await pipe.execute()
                cutoff = now_ms() - SWEEP_CLOCK_MARGIN_MS
                dead = [
                    deal_id
                    for deal_id, (ends, left, cancelled) in zip(ids, states, strict=True)
                    if ends is None
                    or left is None
                    or cancelled
                    or int(ends) <= cutoff
                    or int(left) <= _TERMINAL_LEFT
                ]
                if dead:
                    removed += await store.zrem(geo, *dead)
            if cursor == 0:
                return removed

    async def close(self) -> None:
        """Wait for background index removals."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _centres(lat: float, lng: float, reach_km: float) -> list[tuple[float, float, float]]:
    """Where to search from (lat, lng, km) so that the index's blind spots are covered.

    Valkey/Redis (7.x, 8.x) ``GEOSEARCH`` has two: a member stored at longitude exactly
    180 is found only from a centre at exactly 180, and a centre at exactly 180 misses
    the western side; and a member at the very edge of the band (+-85.05112878) is
    often missed from a centre below it. So near those lines, search from them as well,
    with a radius that covers the caller's circle (triangle inequality).
    """
    centres = [(lat, -180.0 if lng >= 180.0 else lng, reach_km)]
    edges = [lat]
    for edge in (LAT_MAX, -LAT_MAX):
        to_edge_km = haversine_km(lat, lng, edge, lng)
        if to_edge_km <= reach_km + GEO_SLACK_KM:
            centres.append((edge, centres[0][1], reach_km + to_edge_km))
            edges.append(edge)
    turn = math.radians(180.0 - abs(lng))  # how far from the antimeridian, as an angle
    to_meridian_km = EARTH_RADIUS_KM * math.asin(
        min(1.0, math.sin(turn) * math.cos(math.radians(lat)))
    )
    if turn < math.pi / 2 and to_meridian_km <= reach_km + GEO_SLACK_KM:
        for edge_lat in edges:
            extra_km = haversine_km(lat, lng, edge_lat, 180.0)
            centres.append((edge_lat, 180.0, reach_km + extra_km))
    return centres


def _by_distance(row: tuple[float, str, Nearby]) -> tuple[float, str]:
    return row[0], row[1]
