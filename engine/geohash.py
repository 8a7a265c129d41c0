"""The geohash boxes a Redis ``GEOSEARCH`` reads, so that a search's cost is known first.

A geo index is a sorted set scored by 52-bit geohashes: 26 bits of latitude (over
[-85.05112878, 85.05112878]) in the even bit positions, 26 of longitude (over [-180, 180])
in the odd ones. ``GEOSEARCH ... BYRADIUS r`` picks a step ``s`` (bits per coordinate)
from ``r`` and the centre's latitude, then reads every member of the 3 x 3 boxes of that
step around the centre, whatever ``COUNT`` says (valkey ``geohash_helper.c``,
``geohashCalculateAreasByShapeWGS84``): its cost is the members in those boxes, not the
members it returns.

Each box at step ``s`` is one score range of the set, so ``ZCOUNT`` over the boxes says in
O(log n) how many members a search would read. Redis uses step ``est(r)``, or
``est(r) - 1`` when a neighbouring box falls short of the circle's bounding box
(``decrease_step``; ``searched_step`` repeats that test exactly: it can only happen next
to the edges of the band). The 3 x 3 boxes around a point at any step lie inside the
3 x 3 boxes around it at any coarser step, and a smaller radius never makes Redis pick
a coarser step: so the boxes of the step Redis searches a radius at hold every member it
can read at that radius or any smaller one. ``ladder`` offers a search those boxes for
ever smaller radii, one rung per step.
"""

from __future__ import annotations

import math
from array import array
from typing import NamedTuple

LAT_MIN, LAT_MAX = -85.05112878, 85.05112878  # Redis GEO_LAT_MIN / GEO_LAT_MAX
LNG_MIN, LNG_MAX = -180.0, 180.0
MERCATOR_MAX_M = 20037726.37  # Redis MERCATOR_MAX, in metres
REDIS_EARTH_RADIUS_M = 6372797.560856  # Redis EARTH_RADIUS_IN_METERS
STEP_MAX = 26  # bits per coordinate in a stored score
# A rung's radius stays this fraction under the largest radius of its step, so that the
# km Redis parses from our decimal string cannot round into a coarser step.
_RADIUS_MARGIN = 1e-9


class Rung(NamedTuple):
    """A radius (km, as Redis measures) and the score ranges of every box it can read."""

    radius_km: float
    step: int  # the boxes' step
    ranges: tuple[tuple[int, int], ...]  # [low, high) score ranges, sorted, merged


def redis_step(radius_m: float, lat: float) -> int:
    """``geohashEstimateStepsByRadius``: the step Redis first picks for a radius."""
    if radius_m == 0:
        return STEP_MAX
    step = 1
    while radius_m < MERCATOR_MAX_M:
        radius_m *= 2
        step += 1
    step -= 2
    if lat > 66 or lat < -66:
        step -= 1
        if lat > 80 or lat < -80:
            step -= 1
    return max(1, min(STEP_MAX, step))


def _spread(x: int) -> int:
    """The bits of ``x`` (< 2**32) moved to the even positions of a 64-bit word."""
    x &= 0xFFFFFFFF
    x = (x | (x << 16)) & 0x0000FFFF0000FFFF
    x = (x | (x << 8)) & 0x00FF00FF00FF00FF
    x = (x | (x << 4)) & 0x0F0F0F0F0F0F0F0F
    x = (x | (x << 2)) & 0x3333333333333333
    return (x | (x << 1)) & 0x5555555555555555


def cell(lng: float, lat: float, step: int) -> tuple[int, int]:
    """The box (latitude row, longitude column) a point falls in at ``step``, computed as
    ``geohashEncode`` does; the top edge (lat = LAT_MAX, lng = 180) gives ``2 ** step``."""
    lat_offset = (lat - LAT_MIN) / (LAT_MAX - LAT_MIN) * (1 << step)
    lng_offset = (lng - LNG_MIN) / (LNG_MAX - LNG_MIN) * (1 << step)
    return int(lat_offset), int(lng_offset)


def score(lng: float, lat: float) -> int:
    """The score Redis stores for a point (its 52-bit geohash)."""
    row, col = cell(lng, lat, STEP_MAX)
    return _spread(row) | (_spread(col) << 1)


def boxes(lng: float, lat: float, step: int) -> tuple[tuple[int, int], ...]:
    """The score ranges of the 3 x 3 boxes around a point at ``step`` (merged).

    Redis's neighbour arithmetic wraps in both coordinates. A point on the top edge
    (lat = LAT_MAX or lng = 180) encodes one past the last box: Redis reads that box
    (where members stored on the edge itself are, scored past 2**52), and the last and
    first boxes beside it.
    """
    n = 1 << step
    row, col = cell(lng, lat, step)
    rows = {(row - 1) % n, row % n, (row + 1) % n, row}
    cols = {(col - 1) % n, col % n, (col + 1) % n, col}
    spread_rows = [_spread(r) for r in rows]
    spread_cols = [_spread(c) << 1 for c in cols]
    shift = 2 * (STEP_MAX - step)
    merged: list[list[int]] = []
    for h in sorted(r | c for r in spread_rows for c in spread_cols):
        low = h << shift
        if merged and merged[-1][1] == low:
            merged[-1][1] = (h + 1) << shift
        else:
            merged.append([low, (h + 1) << shift])
    return tuple((low, high) for low, high in merged)


def searched_step(lng: float, lat: float, radius_m: float) -> int:
    """The step of the boxes ``GEOSEARCH ... BYRADIUS`` reads (``est``, or one coarser).

    ``geohashCalculateAreasByShapeWGS84``: the circle's bounding box, then one step
    coarser if the centre box's north, south, east or west neighbour does not reach it.
    """
    step = redis_step(radius_m, lat)
    if step <= 1:
        return step
    lat_delta = math.degrees(radius_m / REDIS_EARTH_RADIUS_M)
    top = math.degrees(radius_m / REDIS_EARTH_RADIUS_M / math.cos(math.radians(lat + lat_delta)))
    bottom = math.degrees(radius_m / REDIS_EARTH_RADIUS_M / math.cos(math.radians(lat - lat_delta)))
    half_width = bottom if lat < 0 else top
    n = 1 << step
    row, col = cell(lng, lat, step)
    height, width = (LAT_MAX - LAT_MIN) / n, (LNG_MAX - LNG_MIN) / n
    north_max = LAT_MIN + ((row + 1) % n + 1) * height
    south_min = LAT_MIN + ((row - 1) % n) * height
    east_max = LNG_MIN + ((col + 1) % n + 1) * width
    west_min = LNG_MIN + ((col - 1) % n) * width
    if (
        north_max < lat + lat_delta
        or south_min > lat - lat_delta
        or east_max < lng + half_width
        or west_min > lng - half_width
    ):
        return step - 1
    return step


def radius_for_step_km(step: int, lat: float) -> float:
    """The largest radius (km) for which Redis first picks ``step`` or a finer one."""
    adjust = 2 if (lat > 80 or lat < -80) else 1 if (lat > 66 or lat < -66) else 0
    if not 1 <= step <= STEP_MAX:
        raise ValueError(f"no step {step}")
    return MERCATOR_MAX_M / 2 ** (step + adjust) / 1000 * (1 - _RADIUS_MARGIN)


def ladder(lng: float, lat: float, radius_km: float, rungs_max: int = STEP_MAX) -> list[Rung]:
    """``radius_km`` and ever smaller radii, each with the boxes it may read.

    Rung ``k`` is the largest radius Redis first searches at step ``est(r) + k`` or finer,
    with the boxes of the step it does search that radius at (``searched_step``): every
    smaller radius reads only inside them, and the counts in them never grow down the
    ladder. At most ``rungs_max`` rungs, to step 26.
    """
    rungs: list[Rung] = []
    km = radius_km
    first = redis_step(float(repr(km)) * 1000, lat)
    for est in range(first, STEP_MAX + 1):
        if est > first:
            km = min(km, radius_for_step_km(est, lat))
        step = searched_step(lng, lat, float(repr(km)) * 1000)
        rungs.append(Rung(km, step, boxes(lng, lat, step)))
        if len(rungs) >= rungs_max:
            break
    return rungs


def boxes_km2(lat: float, step: int) -> float:
    """About the area (km2) of the 3 x 3 boxes of ``step`` around latitude ``lat``."""
    km_per_deg = 111.19  # on the 6371 km sphere
    height = (LAT_MAX - LAT_MIN) / (1 << step) * km_per_deg
    width = (LNG_MAX - LNG_MIN) / (1 << step) * km_per_deg * math.cos(math.radians(lat))
    return 9 * height * max(width, 1e-9)


def _split_table() -> array[int]:
    """For each 16-bit word: its even bits as a byte, then its odd bits as a byte."""
    table = array("H", bytes(2 << 16))
    for x in range(1 << 16):
        even = odd = 0
        for i in range(8):
            even |= ((x >> (2 * i)) & 1) << i
            odd |= ((x >> (2 * i + 1)) & 1) << i
        table[x] = even | (odd << 8)
    return table


_SPLIT = _split_table()
_LAT_CELL = (LAT_MAX - LAT_MIN) / (1 << STEP_MAX)  # a box's size at step 26, degrees
_LNG_CELL = (LNG_MAX - LNG_MIN) / (1 << STEP_MAX)


def decode(score: int) -> tuple[float, float]:
    """``(lng, lat)`` of a stored score: its box's centre, as ``GEOPOS``/``WITHCOORD``
    give it (``geohashDecodeWGS84``, ``geohashDecodeAreaToLongLat``) to 1e-12 degrees."""
    t = _SPLIT
    a, b, c, d = t[score & 0xFFFF], t[score >> 16 & 0xFFFF], t[score >> 32 & 0xFFFF], t[score >> 48]
    row = (a & 0xFF) | (b & 0xFF) << 8 | (c & 0xFF) << 16 | (d & 0xFF) << 24
    col = a >> 8 | (b >> 8) << 8 | (c >> 8) << 16 | (d >> 8) << 24
    lat = LAT_MIN + (row + 0.5) * _LAT_CELL
    lng = LNG_MIN + (col + 0.5) * _LNG_CELL
    return min(lng, LNG_MAX), min(lat, LAT_MAX)
