"""Discovery: active deals near a point, from the partition geo indexes, exact and live,
at a bounded cost whatever the point, radius, limit, area or the requests before it.

How an answer is made:

1. **The index holds what can be claimed.** A deal enters its partition's geo index when
   it starts and leaves when it ends, sells out or is cancelled: scheduled deals wait in a
   sorted set by start time, and indexed ones are listed by end time, both moved on by
   every search (``search_geo``, a bounded chunk) and by ``advance`` every second.
2. **Candidates** for a quantized cell come from one ``search_geo`` call per partition,
   from the cell's centre, far enough for any point of the cell, returning at most
   ``first_count`` members (the nearest) per partition, at the widest radius whose
   geohash boxes hold at most ``scan_budget`` members (counted first: ``engine.geohash``).
   The entry is cached (bounded in bytes) with how far it is complete (``covered_km``).
3. **Exact order** for the caller's own point: candidates are measured in order of
   distance from the centre until none left can beat the n-th nearest (triangle
   inequality), by Haversine with Earth radius 6371.0088 km.
4. **Live state** of the nearest ``limit`` is read on every response (``read_deals``,
   ``left``, ``cancelled``, ``seq`` and the deal's own Redis clock, as claims judge it);
   only ``active`` deals are kept, at the distance of the hash's own coordinates.
5. **Bounded widening**: if the entry cannot settle the caller's answer, the cell is
   searched once more with ``wide_count`` per partition (if the first search was cut by
   its count), then once from the caller's own point; that third search's answer is final.
   Past the bounds (``read_budget`` deal hashes, or a radius whose boxes hold more than
   ``scan_budget`` members per partition) the answer keeps only what is certain: the
   nearest deals, exact, up to the distance that was fully searched.

Work per request, at most (P partitions, defaults from ``Settings``):
``search_geo`` calls 3 P; geo members returned P x (64 + 256 + 256); geo members scanned
3 P x 1024 (each call at most 1024, about 0.3 ms of Redis); deal hashes read 512 for live
state + 3 P x ``SEARCH_ADVANCE_CHUNK`` moving the timeline. ``Discovery.work`` counts them.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import functools
import heapq
import logging
import math
import operator
import sys
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any, NamedTuple, cast

import orjson

from engine import geohash
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
from engine.keys import deal_key_prefix, geo_ends_key, geo_key, geo_starts_key, geo_sweep_key
from engine.store import Store

log = logging.getLogger(__name__)

EARTH_RADIUS_KM = 6371.0088  # the API's Haversine radius (IUGG mean radius)
_RADIUS_STEP_KM = 0.5  # cache entries are keyed by the radius rounded up to this
_LIMIT_STEPS = (10, 20, 50, 100)  # ... and by the limit rounded up to one of these
REDIS_EARTH_RADIUS_KM = 6372.797560856  # what GEOSEARCH measures with
# Geo-index coordinates are a 52-bit geohash cell's centre: at most ~0.35 m off the
# deal's own. Every bound that mixes the two kinds of coordinates allows this much.
GEO_SLACK_KM = 0.002
# Distances in Redis's radius and in ours differ by a constant factor, to float error:
# every radius handed to GEOSEARCH allows this much more, every coverage this much less.
_FLOAT_KM = 1e-6
_REDIS_SCALE = REDIS_EARTH_RADIUS_KM / EARTH_RADIUS_KM
_DIAMETER_KM = 2 * EARTH_RADIUS_KM
# A search's ladder offers at most this many radii per centre, each half the one before
# (engine/geohash.py): the narrowest is under the widest / 2 ** 7.
_MAX_RUNGS = 8
# A search asks for the radius that should hold this many times the deals a cell's
# callers need (limit + 2 near ties) at the density it finds (in the first partition of
# the call: deal ids, and so partitions, are random).
_DENSITY_MARGIN = 2.0
# On one node, partitions searched per search_geo call: fewer calls cost less in all,
# smaller ones keep each script short (claims queue behind a running script).
CALL_PARTITIONS = 4
# Scheduled deals moved into the index (each one deal hash read) and ended ones dropped
# by each search_geo call, per partition; and by ``advance``, per call, with at most
# ``ADVANCE_CALLS`` calls per partition per round.
SEARCH_ADVANCE_CHUNK = 8
ADVANCE_CHUNK = 256
ADVANCE_CALLS = 8
# An entry built while the timeline had a backlog (more due than one chunk) lives this
# long at most, so that deals whose start has come still appear within the cache time.
_BACKLOG_TTL_S = 1.0
# What a cache entry costs, counted high: the entry with its four arrays, list, key and
# LRU slot; then per candidate a list slot, four doubles and a slot in its ``dead`` set
# (as if every candidate were dead), plus the id string (as if not shared).
_ENTRY_BYTES = 1_024
_CANDIDATE_BYTES = 8 + 4 * 8 + 64
# A remembered deal's fixed part, over its strings: the object, its numbers and its dict
# slot.
_FIXED_BYTES = 480
SWEEP_CHUNK = 500  # members read per ZSCAN step (one sweep_geo call each)
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
    # ``haversine_km``'s own terms for the deal's side: ``radians(lat)`` and its cosine.
    rlat: float
    coslat: float
    total: int
    starts_ms: int
    ends_ms: int
    redeem_ms: int
    # ``Deal.to_json`` as bytes, cut around its live fields (see ``render``).
    json_head: bytes  # '{"id":...,"inventory_total":N,'
    json_mid: bytes  # '"starts_at":...,"redeem_until":"...",'
    cost: int  # bytes it holds, counted high (``Discovery.fixed_bytes``)

    @classmethod
    def of(cls, deal: Deal, key: str) -> _Fixed:
        """The fixed part of ``deal``, whose hash is ``key``."""
        items = list(deal.to_json().items())
        names = [name for name, _ in items]
        left, status = names.index("inventory_left"), names.index("status")
        head = orjson.dumps(dict(items[:left]))[:-1] + b","
        mid = orjson.dumps(dict(items[left + 1 : status]))[1:-1] + b","
        merchant = sys.intern(deal.merchant_id)
        cost = _FIXED_BYTES + sum(
            sys.getsizeof(x)
            for x in (deal.id, key, merchant, deal.title, deal.description, head, mid)
        )
        rlat = math.radians(deal.lat)
        return cls(
            deal.id,
            key,
            merchant,
            deal.title,
            deal.description,
            deal.lat,
            deal.lng,
            rlat,
            math.cos(rlat),
            deal.inventory_total,
            deal.starts_at_ms,
            deal.ends_at_ms,
            deal.redeem_until_ms,
            head,
            mid,
            cost,
        )


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
            f.id,
            f.merchant_id,
            f.title,
            f.description,
            f.lat,
            f.lng,
            f.total,
            max(self.left, 0),
            self.seq,
            f.starts_ms,
            f.ends_ms,
            f.redeem_ms,
            self.cancelled_at_ms,
            self.now_ms,
        )

    @property
    def status(self) -> str:
        f = self.fixed
        return deal_status(
            self.now_ms, f.starts_ms, f.ends_ms, self.left, self.cancelled_at_ms is not None
        )

    def to_json(self) -> dict[str, Any]:
        """The API's ``Deal`` object plus ``distance_km`` (what ``render`` writes)."""
        return {**self.deal.to_json(), "distance_km": self.distance_km}


# ``Nearby(*fields)`` without the call of the generated ``__new__``.
_nearby: Callable[[tuple[_Fixed, int, int, int | None, int, float]], Nearby] = functools.partial(
    tuple.__new__, Nearby
)

_STATUS_JSON = {s: orjson.dumps(s) for s in (SCHEDULED, ACTIVE, SOLD_OUT, ENDED, CANCELLED)}
_ACTIVE_JSON = _STATUS_JSON[ACTIVE]


def render(found: list[Nearby]) -> bytes:
    """``{"deals": [n.to_json() ...], "count": n}`` as orjson writes it, from fragments.

    The fixed part of each deal was serialized once, when this process first read it; the
    distances are serialized in one call (orjson writes a float alike in a list or alone).
    """
    if not found:
        return b'{"deals":[],"count":0}'
    distances = orjson.dumps([n.distance_km for n in found])[1:-1].split(b",")
    parts = []
    for (f, left, _seq, cancelled, now, _km), km in zip(found, distances, strict=True):
        if cancelled is None and left > 0 and f.starts_ms <= now < f.ends_ms:
            status = _ACTIVE_JSON  # deal_status(...), spelt out for the usual answer
        else:
            status = _STATUS_JSON[
                deal_status(now, f.starts_ms, f.ends_ms, left, cancelled is not None)
            ]
            left = max(left, 0)
        parts.append(
            b'%s"inventory_left":%d,%s"status":%s,"distance_km":%s}'
            % (f.json_head, left, f.json_mid, status, km)
        )
    return b'{"deals":[%s],"count":%d}' % (b",".join(parts), len(found))


# One live read: the fixed part, left, seq, cancelled_at_ms, the node's clock (ms).
_Live = tuple[_Fixed, int, int, int | None, int]


@dataclass(slots=True)
class _Candidates:
    """A candidate list around one centre: ids and where the index puts them, no state."""

    lat: float  # the search centre
    lng: float
    ids: list[str]
    dist_km: array[float]  # from the centre, ascending
    # Where the index puts them, as points of the unit sphere (the walk: ``_Nearest``).
    xs: array[float]
    ys: array[float]
    zs: array[float]
    # Every indexed deal within this distance of the centre was in the index's answer.
    covered_km: float
    expires_at: float
    count: int  # the COUNT each partition's search had
    truncated: bool  # some partition returned COUNT members (more lay within the radius)
    cost: int  # bytes, counted high (``Discovery.cache_bytes``)
    # Ids seen in a terminal state (ended, cancelled, sold out, gone): never read again.
    dead: set[str] = field(default_factory=set)


class _Budget:
    """Deal hashes one request may still read."""

    __slots__ = ("left",)

    def __init__(self, deals: int) -> None:
        self.left = deals


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
        self.x, self.y, self.z = _unit(lat, lng)
        self.a_max = _a_of(max_km)

    def take(self, n: int, up_to_km: float, tail_km: float = 0.0, cap: int = 1 << 30) -> list[str]:
        """Up to ``n`` next nearest ids at most ``up_to_km`` away, and after them any
        within ``tail_km`` of the last (so a near tie is read now, not in another trip),
        ``cap`` in all at most.

        Candidates are measured in order of distance from the centre until none left
        unmeasured can beat the ``n``-th nearest measured (triangle inequality). Distances
        are compared as Haversine's ``a`` term (``sin(d / 2R) ** 2``, monotonic in the
        distance), which is a quarter of the squared chord between the two points on the
        unit sphere: no trigonometry per candidate (their points are computed once per
        entry), and ``asin`` and ``sqrt`` only when a bound moves. The same order as
        ``haversine_km`` to ~1e-12 km, far inside ``GEO_SLACK_KM``.
        """
        n = min(n, cap)
        c, heap, count, start = self.c, self.heap, len(self.c.ids), self.i
        dist, ids = c.dist_km, c.ids
        offset = self.offset
        # A candidate farther than this from the centre cannot be among the n nearest.
        reach = min(self.max_km, up_to_km) + offset
        if start < count and dist[start] <= reach:  # (else none is left to measure)
            self.i = self._walk(n, reach, tail_km)
        out: list[str] = []
        pop, a_up = heapq.heappop, _a_of(up_to_km)
        last = 0.0
        while heap and len(out) < n and heap[0][0] <= a_up:
            last, k = pop(heap)
            out.append(ids[k])
        if tail_km and len(out) == n:
            a_tail = min(a_up, _a_of(_km_of(last) + tail_km))
            while heap and heap[0][0] <= a_tail and len(out) < cap:
                out.append(ids[pop(heap)[1]])
        return out

    def _walk(self, n: int, reach: float, tail_km: float) -> int:
        """Measure candidates from ``self.i`` on, into the heap, until none left can beat
        the ``n``-th nearest measured, nor lies within ``reach`` of the centre; return
        where it stopped."""
        c, heap, count = self.c, self.heap, len(self.c.ids)
        dist, xs, ys, zs = c.dist_km, c.xs, c.ys, c.zs
        ids, dead = c.ids, c.dead
        offset, x, y, z = self.offset, self.x, self.y, self.z
        a_max = self.a_max
        # The n nearest measured and not yet taken, as a max-heap (negated ``a``).
        best = [-a for a, _ in heapq.nsmallest(n, heap)] if heap else []
        heapq.heapify(best)
        if len(best) >= n:
            reach = min(reach, _km_of(-best[0]) + tail_km + offset)
        push, replace = heapq.heappush, heapq.heapreplace
        asin, sqrt, diameter = math.asin, math.sqrt, _DIAMETER_KM  # ``_km_of``, inlined
        for i in range(self.i, count):
            if dist[i] > reach:
                return i
            if ids[i] in dead:
                continue
            dx = xs[i] - x
            dy = ys[i] - y
            dz = zs[i] - z
            a = (dx * dx + dy * dy + dz * dz) * 0.25
            if a <= a_max:
                push(heap, (a, i))
                if len(best) < n:
                    push(best, -a)
                    if len(best) == n:
                        km = diameter * asin(min(1.0, sqrt(-best[0])))
                        reach = min(reach, km + tail_km + offset)
                elif a < -best[0]:
                    replace(best, -a)
                    km = diameter * asin(min(1.0, sqrt(-best[0])))
                    reach = min(reach, km + tail_km + offset)
        return count

    def frontier_km(self) -> float:
        """No candidate not yet taken is nearer the caller than this (index coordinates)."""
        c = self.c
        near = _km_of(self.heap[0][0]) if self.heap else math.inf
        if self.i < len(c.ids):
            near = min(near, c.dist_km[self.i] - self.offset)
        return near


def _unit(lat: float, lng: float) -> tuple[float, float, float]:
    """The point of the unit sphere at ``lat``, ``lng`` (degrees)."""
    rlat, rlng = math.radians(lat), math.radians(lng)
    cos_lat = math.cos(rlat)
    return cos_lat * math.cos(rlng), cos_lat * math.sin(rlng), math.sin(rlat)


def _a_of(km: float) -> float:
    """Haversine's ``a`` term of a distance (its inverse is ``_km_of``)."""
    return math.sin(min(km / _DIAMETER_KM, math.pi / 2)) ** 2


def _km_of(a: float) -> float:
    return _DIAMETER_KM * math.asin(min(1.0, math.sqrt(a)))


@dataclass(slots=True)
class Work:
    """What this ``Discovery`` has asked of Redis, for tests and metrics."""

    searches: int = 0  # search_geo calls
    geosearches: int = 0  # GEOSEARCH calls in them (per partition and centre)
    geo_returned: int = 0  # geo members those searches returned
    geo_scan_bound: int = 0  # members in the boxes they searched (>= members GEOSEARCH read)
    deals_read: int = 0  # deal hashes read for live state (read_deals)
    timeline_read: int = 0  # deal hashes read moving scheduled deals into the index
    short_answers: int = 0  # answers cut to what was certain at a bound
    rewidened: int = 0  # crowded cells searched again with wide_count (round 2)
    from_caller: int = 0  # answers searched from the caller's own point (round 3)


class Discovery:
    """Answers "active deals near here", with a per-process cache of candidate ids."""

    def __init__(
        self,
        store: Store,
        *,
        cache_s: float | None = None,
        cell_deg: float | None = None,
        cache_bytes: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        first_count: int | None = None,
        wide_count: int | None = None,
        scan_budget: int | None = None,
        read_budget: int | None = None,
    ) -> None:
        s = store.settings
        self.store = store
        self.cache_s = s.discovery_cache_s if cache_s is None else cache_s
        self.cell_deg = s.discovery_cell_deg if cell_deg is None else cell_deg
        self.cache_bytes = s.discovery_cache_bytes if cache_bytes is None else cache_bytes
        self.first_count = s.discovery_first_count_members if first_count is None else first_count
        self.wide_count = s.discovery_wide_count_members if wide_count is None else wide_count
        self.scan_budget = s.discovery_scan_budget_members if scan_budget is None else scan_budget
        self.read_budget = s.discovery_read_budget_deals if read_budget is None else read_budget
        self.fixed_bytes = s.discovery_fixed_bytes
        self.clock = clock
        self._cache: OrderedDict[tuple[int, int, float, int], _Candidates] = OrderedDict()
        self._cache_used = 0  # bytes, as the entries count themselves
        self._loading: dict[tuple[int, int, float, int], asyncio.Future[_Candidates]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._cluster = s.redis_cluster
        partitions = range(store.keys.partitions)
        # Per partition: its indexes' keys, and the deal hash name prefix its ids take.
        self._partitions = [
            ((geo_key(p), geo_starts_key(p), geo_ends_key(p)), deal_key_prefix(p))
            for p in partitions
        ]
        # search_geo calls: one per CALL_PARTITIONS partitions on one node (so that claims
        # wait behind no long script); one per partition on a cluster (a script's keys
        # share a hash slot there). Keys, then prefixes.
        size = 1 if self._cluster else CALL_PARTITIONS
        groups = [list(partitions[i : i + size]) for i in range(0, len(partitions), size)]
        self._calls = [
            (
                tuple(k for p in group for k in self._partitions[p][0]),
                tuple(self._partitions[p][1] for p in group),
            )
            for group in groups
        ]
        # Per latitude row of cells (and whether it is the last, maybe narrower, column).
        self._half_diag: dict[tuple[int, bool], float] = {}
        self._fixed: dict[str, _Fixed] = {}  # insertion-ordered: the oldest go first
        self._fixed_used = 0  # bytes
        self.hits = 0
        self.misses = 0
        self.work = Work()

    def bounds(self, centres: int = 1) -> dict[str, int]:
        """The most one ``nearby`` call can ask of Redis, whatever the request.

        Args:
            centres: search centres per search: 1, but up to 6 within reach of the
                antimeridian or the edges of the geo band (``_centres``).
        """
        p, calls, rounds = len(self._partitions), len(self._calls), 3
        # ZCOUNT probes of a rung's boxes (at most 16 ranges: 3 x 3, or 4 x 4 on the top
        # edges, geohash.boxes): up to 1 + DENSITY_ROUNDS (3) per call and centre to size
        # the radius, then per partition and centre one (one more ZCOUNT first, over the
        # enclosing range), and a binary search down the ladder if that one is over.
        binary = math.ceil(math.log2(_MAX_RUNGS + 1))
        zcounts = centres * (calls * (1 + 3) * 16 + p * (1 + binary) * 17)
        return {
            "search_geo calls": rounds * calls,
            "GEOSEARCH calls": rounds * p * centres,
            "ZCOUNT calls": rounds * zcounts,
            "geo members returned": p * centres * (self.first_count + 2 * self.wide_count),
            "geo members scanned": rounds * p * centres * self.scan_budget,
            "deal hashes read": self.read_budget + rounds * p * SEARCH_ADVANCE_CHUNK,
        }

    # -- the query -------------------------------------------------------------

    async def nearby(self, lat: float, lng: float, radius_km: float, limit: int) -> list[Nearby]:
        """Active deals within ``radius_km`` of the point, nearest first, at most ``limit``."""
        # Cache entries are shared by callers whose radius and limit round up to the same
        # step, so varying them slightly cannot force a miss each time; each caller's own
        # radius and limit then filter the shared superset exactly.
        shared_km = math.ceil(radius_km / _RADIUS_STEP_KM) * _RADIUS_STEP_KM
        shared_limit = _LIMIT_STEPS[bisect.bisect_left(_LIMIT_STEPS, limit)]
        key, clat, clng, half_diag_km = self._cell(lat, lng, shared_km, shared_limit)
        full_km = shared_km + half_diag_km
        budget = _Budget(self.read_budget)
        # 1. The cell's entry: at most first_count per partition, cached.
        want = _DENSITY_MARGIN * (shared_limit + 2)
        entry = self._cached(key)
        if entry is None:
            entry = await self._entry(key, clat, clng, full_km, want, half_diag_km)
        found = await self._answer(entry, lat, lng, radius_km, limit, budget, final=False)
        if found is not None:
            return found
        if entry.truncated and entry.count < self.wide_count:
            # 2. A crowded cell: search it again with wide_count per partition, for every
            # caller in it.
            self.work.rewidened += 1
            entry = await self._load(
                clat, clng, full_km, self.wide_count, entry.dead, 4 * want, half_diag_km
            )
            self._remember(key, entry)
            found = await self._answer(entry, lat, lng, radius_km, limit, budget, final=False)
            if found is not None:
                return found
        # 3. From the caller's own point (no half-diagonal to cover); final.
        self.work.from_caller += 1
        want = 2 * _DENSITY_MARGIN * (limit + 2)
        entry = await self._load(lat, lng, radius_km, self.wide_count, entry.dead, want, 0.0)
        found = await self._answer(entry, lat, lng, radius_km, limit, budget, final=True)
        assert found is not None
        return found

    async def _answer(
        self,
        c: _Candidates,
        lat: float,
        lng: float,
        radius_km: float,
        limit: int,
        budget: _Budget,
        *,
        final: bool,
    ) -> list[Nearby] | None:
        """The answer from ``c``, or ``None`` if ``c`` might miss a nearer active deal.

        ``final``, or with the read budget spent: the answer, cut to what is certain.
        """
        walk = _Nearest(c, lat, lng, radius_km + GEO_SLACK_KM)
        found: list[tuple[float, str, Nearby]] = []
        threshold = radius_km  # a deal farther than this cannot be in the answer
        first = True
        spent = False
        # ``haversine_km(lat, lng, f.lat, f.lng)`` inlined term for term (so the very same
        # float): the caller's terms once here, the deal's once per process (``_Fixed``).
        p1 = math.radians(lat)
        cos1 = math.cos(p1)
        sin, radians, sqrt, asin = math.sin, math.radians, math.sqrt, math.asin
        diameter = _DIAMETER_KM
        ordered = True  # ``found`` is sorted
        while True:
            # Most candidates are active (the index holds claimable deals only, but for
            # those that ended since): read exactly ``limit`` first, then twice what is
            # missing.
            want = limit if first else max(limit - len(found), 4) * 2
            first = False
            if budget.left <= 0:
                spent = True
                break
            # Index coordinates are up to GEO_SLACK_KM off: a candidate that close behind
            # the last one taken may still be nearer in truth, so it is read as well.
            ids = walk.take(want, threshold + GEO_SLACK_KM, 2 * GEO_SLACK_KM, budget.left)
            if not ids:
                break
            budget.left -= len(ids)
            for deal_id, live in zip(ids, await self._read(ids), strict=True):
                if live is None:  # gone: for good
                    c.dead.add(deal_id)
                    self._forget(deal_id)
                    continue
                f, left, seq, cancelled, now = live
                # ``deal_status(...) == ACTIVE``, spelt out: the common case costs no call.
                if cancelled is not None or not f.starts_ms <= now < f.ends_ms or left <= 0:
                    status = deal_status(now, f.starts_ms, f.ends_ms, left, cancelled is not None)
                    if status != SCHEDULED:  # ended, cancelled or sold out: for good
                        c.dead.add(deal_id)
                        self._forget(deal_id)
                    continue
                a = (
                    sin((f.rlat - p1) / 2) ** 2
                    + cos1 * f.coslat * sin(radians(f.lng - lng) / 2) ** 2
                )
                d = diameter * asin(min(1.0, sqrt(a)))
                if d <= radius_km:
                    found.append((d, deal_id, _nearby((f, left, seq, cancelled, now, d))))
                    ordered = False
            if len(found) >= limit:
                found.sort(key=_by_distance)
                ordered = True
                del found[limit:]
                threshold = found[-1][0]
        # Every deal truly nearer the caller than this was among the candidates (deals
        # the index did not return lie beyond ``covered_km`` from the centre)...
        sure_km = c.covered_km - walk.offset - GEO_SLACK_KM
        if spent:  # ... and was read, or is farther than every candidate not read
            sure_km = min(sure_km, walk.frontier_km() - GEO_SLACK_KM)
        if not ordered:
            found.sort(key=_by_distance)
        if sure_km >= threshold:
            return [n for _, _, n in found[:limit]]
        if not final and not spent:
            return None
        self.work.short_answers += 1
        return [n for d, _, n in found[:limit] if d <= sure_km]

    async def _read(self, ids: list[str]) -> list[_Live | None]:
        """Live deals (``None`` for gone ones), judged by their own Redis node's clock.

        One ``read_deals`` call in all on one node; on a cluster one per partition (a
        script's keys share a hash slot there), all in one round trip. A deal's fixed
        fields are read only the first time this process meets it.
        """
        self.work.deals_read += len(ids)
        known = list(map(self._fixed.get, ids))
        # (all(), not ``None not in known``: ``in`` calls the dataclass's ``__eq__``.)
        if not self._cluster and all(known):
            # The usual read: one node, every deal met before, so only the live fields
            # come back; and when every deal is there, not cancelled, with its ``seq``,
            # the tuples are built by ``zip`` (what the loop below builds, value for value).
            every = cast(list[_Fixed], known)  # no None in it
            hkeys = [f.key for f in every]
            reply = await self.store.run("read_deals", hkeys, ["0"] * len(ids))
            lefts = reply[1 + _LEFT :: _LIVE]
            cancelled = reply[1 + _CANCELLED :: _LIVE]
            seqs = reply[1 + _SEQ :: _LIVE]
            if None not in lefts and all(seqs) and cancelled.count(None) == len(cancelled):
                now = int(reply[0])
                return list(zip(every, map(int, lefts), map(int, seqs), cancelled, repeat(now)))
            return self._lives(ids, known, hkeys, [range(len(ids))], [reply])
        keys = self.store.keys
        hkeys = [
            keys.for_deal(i).deal if f is None else f.key for i, f in zip(ids, known, strict=True)
        ]
        flags = ["1" if f is None else "0" for f in known]
        groups: list[range] | list[list[int]]
        if self._cluster:
            by_partition: dict[int, list[int]] = {}
            for n, deal_id in enumerate(ids):
                by_partition.setdefault(keys.for_deal(deal_id).partition, []).append(n)
            groups = list(by_partition.values())
            calls = [
                self.store.run("read_deals", [hkeys[n] for n in group], [flags[n] for n in group])
                for group in groups
            ]
            replies = [await calls[0]] if len(calls) == 1 else await asyncio.gather(*calls)
        else:
            groups = [range(len(ids))]
            replies = [await self.store.run("read_deals", hkeys, flags)]
        return self._lives(ids, known, hkeys, groups, replies)

    def _lives(
        self,
        ids: list[str],
        known: list[_Fixed | None],
        hkeys: list[str],
        groups: list[range] | list[list[int]],
        replies: list[Any],
    ) -> list[_Live | None]:
        """``_read``'s answer from its ``read_deals`` replies, one per group of ``ids``."""
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
        known = _Fixed.of(Deal.from_hash(deal_id, h, now), key)
        old = self._fixed.pop(deal_id, None)
        if old is not None:
            self._fixed_used -= old.cost
        self._fixed[deal_id] = known
        self._fixed_used += known.cost
        while self._fixed_used > self.fixed_bytes and self._fixed:
            self._fixed_used -= self._fixed.pop(next(iter(self._fixed))).cost
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

    def _cached(self, key: tuple[int, int, float, int]) -> _Candidates | None:
        """The cell's live cache entry (a hit), or ``None``: no coroutine for the usual case."""
        entry = self._cache.get(key)
        if entry is not None and entry.expires_at > self.clock():
            self.hits += 1
            self._cache.move_to_end(key)
            return entry
        return None

    async def _entry(
        self,
        key: tuple[int, int, float, int],
        clat: float,
        clng: float,
        full_km: float,
        want: float,
        half_diag_km: float,
    ) -> _Candidates:
        """The cell's entry, on a miss: loaded, or awaited from a neighbour loading it."""
        self.misses += 1
        loading = self._loading.get(key)
        if loading is not None:  # a neighbour is fetching this cell right now
            return await asyncio.shield(loading)
        future: asyncio.Future[_Candidates] = asyncio.get_running_loop().create_future()
        self._loading[key] = future
        try:
            entry = await self._load(
                clat, clng, full_km, self.first_count, set(), want, half_diag_km
            )
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
        if self.cache_s <= 0 or entry.cost > self.cache_bytes:
            return
        old = self._cache.pop(key, None)
        if old is not None:
            self._cache_used -= old.cost
        self._cache[key] = entry
        self._cache_used += entry.cost
        while self._cache_used > self.cache_bytes:
            self._cache_used -= self._cache.popitem(last=False)[1].cost

    @property
    def cache_used_bytes(self) -> int:
        """What the cached entries hold, counted high; never above ``cache_bytes``."""
        return self._cache_used

    @property
    def fixed_used_bytes(self) -> int:
        """What the remembered fixed parts hold; never above ``fixed_bytes``."""
        return self._fixed_used

    async def _load(
        self,
        lat: float,
        lng: float,
        reach_km: float,
        count: int,
        dead: set[str],
        want: float,
        extra_km: float,
    ) -> _Candidates:
        """The indexed deals nearest the point, up to ``reach_km``, within the bounds.

        One ``search_geo`` call per partition (all in one round trip): at most ``count``
        members each, at the radius that should hold ``want`` deals in all at the density
        the partition shows there, plus ``extra_km``, if its boxes hold at most
        ``scan_budget`` members; else the widest radius whose boxes do. The entry records
        how far it is complete.
        """
        centres = _centres(lat, lng, reach_km + 2 * GEO_SLACK_KM)
        per_partition = want / len(self._partitions)
        spec: list[Any] = [len(centres)]
        for c_lat, c_lng, c_km in centres:
            rungs = geohash.ladder(c_lng, c_lat, (c_km + 2 * _FLOAT_KM) * _REDIS_SCALE, _MAX_RUNGS)
            # An extra centre (``_centres``) stands that much farther out.
            e_extra = (extra_km + c_km - centres[0][2] + 2 * GEO_SLACK_KM) * _REDIS_SCALE
            spec += (repr(c_lng), repr(c_lat), repr(per_partition), repr(e_extra), len(rungs))
            for r in rungs:
                spec += (repr(r.radius_km), geohash.boxes_km2(c_lat, r.step), len(r.ranges))
                for lo, hi in r.ranges:
                    spec += (lo, hi)
        head = (SEARCH_ADVANCE_CHUNK, count, self.scan_budget)
        calls = [
            self.store.run("search_geo", keys, (*head, *fixes, *spec))
            for keys, fixes in self._calls
        ]
        replies = [await calls[0]] if len(calls) == 1 else await asyncio.gather(*calls)
        # Every deal within ``covered`` of the main centre is in: per partition and centre,
        # the radius searched, or just short of the farthest returned if COUNT cut it;
        # an extra centre (``_centres``) stands that much farther out.
        covered = reach_km + 2 * GEO_SLACK_KM
        truncated = backlog = False
        rows: list[tuple[float, str, float, float, float]] = []  # km, id, x, y, z
        seen: set[str] = set()
        # Haversine inlined as in ``_Nearest.take`` (the same formula to ~1e-12 km).
        c_rlat, c_rlng = math.radians(lat), math.radians(lng)
        c_cos, sin, cos, radians = math.cos(c_rlat), math.sin, math.cos, math.radians
        decode = geohash.decode
        work = self.work
        work.searches += len(replies)
        for reply, (_keys, fixes) in zip(replies, self._calls, strict=True):
            backlog = backlog or bool(reply[1])
            work.timeline_read += int(reply[2])
            pos = 3
            for _ in fixes:  # per partition
                for e_lat, e_lng, e_km in centres:
                    km, in_boxes, n = float(reply[pos]), int(reply[pos + 1]), int(reply[pos + 2])
                    pos += 3
                    extra_km = e_km - centres[0][2]
                    if km == 0:  # no radius within the scan budget
                        covered = 0.0
                    else:
                        work.geosearches += 1
                        work.geo_scan_bound += in_boxes
                        work.geo_returned += n
                        reach = km / _REDIS_SCALE - _FLOAT_KM
                        if n >= count:  # cut by COUNT: complete to just short of the last
                            truncated = True
                            last_lng, last_lat = decode(int(reply[pos + 2 * n - 1]))
                            last_km = haversine_km(e_lat, e_lng, last_lat, last_lng)
                            reach = min(reach, last_km - _FLOAT_KM)
                        covered = min(covered, reach - extra_km)
                    for k in range(pos, pos + n):
                        member = reply[k]
                        if member not in seen:
                            seen.add(member)
                            m_lng, m_lat = decode(int(reply[k + n]))
                            rlng, rlat = radians(m_lng), radians(m_lat)
                            m_cos = cos(rlat)
                            s_lat = sin((rlat - c_rlat) * 0.5)
                            s_lng = sin((rlng - c_rlng) * 0.5)
                            a = s_lat * s_lat + c_cos * m_cos * s_lng * s_lng
                            x, y, z = m_cos * cos(rlng), m_cos * sin(rlng), sin(rlat)
                            rows.append((_km_of(a), member, x, y, z))
                    pos += 2 * n
        rows.sort()
        ids = [sys.intern(r[1]) for r in rows]
        cost = _ENTRY_BYTES + len(ids) * _CANDIDATE_BYTES + sum(map(sys.getsizeof, ids))
        ttl = self.cache_s if not backlog else min(self.cache_s, _BACKLOG_TTL_S)
        return _Candidates(
            lat=lat,
            lng=lng,
            ids=ids,
            dist_km=array("d", [r[0] for r in rows]),
            xs=array("d", [r[2] for r in rows]),
            ys=array("d", [r[3] for r in rows]),
            zs=array("d", [r[4] for r in rows]),
            covered_km=max(0.0, covered),
            expires_at=self.clock() + ttl,
            count=count,
            truncated=truncated,
            cost=cost,
            dead=dead & seen,
        )

    # -- keeping the index to what can be claimed -------------------------------

    def _forget(self, deal_id: str) -> None:
        """Drop a deal seen in a terminal state from its index, in the background."""
        task = asyncio.get_running_loop().create_task(self._zrem(deal_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _zrem(self, deal_id: str) -> None:
        with contextlib.suppress(StoreUnavailable):  # the timeline or the sweep will get it
            await self.store.zrem(self.store.keys.for_deal(deal_id).geo, deal_id)

    async def advance(self) -> int:
        """Move every partition's timeline on: scheduled deals whose start has come enter
        the geo index, ended ones leave (``search_geo`` does it too, a chunk per search).

        At most ``ADVANCE_CALLS`` calls of ``ADVANCE_CHUNK`` due deals per partition
        each.

        Returns:
            How many scheduled deals were read (moved in, or dropped if no longer
            claimable).
        """

        async def one(keys: tuple[str, ...], fixes: tuple[str, ...]) -> int:
            read = 0
            for _ in range(ADVANCE_CALLS):
                reply = await self.store.run("search_geo", keys, (ADVANCE_CHUNK, 0, 0, *fixes, 0))
                read += int(reply[2])
                if not int(reply[1]):
                    break
            return read

        return sum(await asyncio.gather(*(one(keys, fixes) for keys, fixes in self._calls)))

    async def sweep(self, *, lease_ms: int = 0) -> int:
        """Check every geo index member against its deal: remove ended, cancelled,
        sold-out and vanished deals; move scheduled ones (from an older index, or a
        rebuild from PostgreSQL) out to wait for their start; list the rest by end.

        Args:
            lease_ms: if set, sweep a partition only if no other process has in the last
                ``lease_ms`` (a ``SET NX PX`` lease), so N API processes do the work once.

        Returns:
            How many index entries were removed or moved out.
        """
        removed = 0
        for p in range(self.store.keys.partitions):
            removed += await self._sweep_partition(p, lease_ms)
        return removed

    async def _sweep_partition(self, partition: int, lease_ms: int) -> int:
        store = self.store
        keys, prefix = self._partitions[partition]
        if lease_ms and not await store.set_if_absent(
            geo_sweep_key(partition), "1", ttl_ms=lease_ms
        ):
            return 0
        removed = cursor = 0
        while True:
            cursor, ids = await store.zscan(keys[0], cursor, count=SWEEP_CHUNK)
            if ids:
                gone, moved = await store.run("sweep_geo", keys, (prefix, *ids))
                removed += int(gone) + int(moved)
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


# Rows of an answer, (distance, id, Nearby), by distance then id.
_by_distance = operator.itemgetter(0, 1)
