"""The geohash boxes: the scores Redis stores, and the boxes a GEOSEARCH may read.

``lua/search_geo.lua`` counts the members of a rung's boxes before searching at its
radius; that bounds the search's cost only if every member GEOSEARCH can read lies in
those boxes. Redis does not report what it read, so the tests check what it returns
(every member within the radius must lie in the boxes) on real servers, around awkward
places, and the nesting that makes counts shrink down a ladder.
"""

from __future__ import annotations

import random

import pytest

from engine import geohash
from engine.geohash import LAT_MAX, ladder, redis_step, score, searched_step
from engine.store import Store

# Around the antimeridian, the poles' band edges, the equator and a city.
PLACES = [
    (77.5946, 12.9716),
    (180.0, 0.0),
    (-179.99, -33.9),
    (10.0, LAT_MAX - 0.01),
    (-179.999, -LAT_MAX + 0.02),
    (0.0, 0.0),
    (-0.001, 51.5),
    (179.9, 70.0),
]


def test_the_step_redis_picks_for_a_radius() -> None:
    """geohashEstimateStepsByRadius: doublings to reach MERCATOR_MAX, less 2, less near poles."""
    assert redis_step(5_000, 0.0) == 11  # 5 km * 2**12 reaches 20,037,726 m
    assert redis_step(4_891, 0.0) == 12
    assert redis_step(5_000, 70.0) == 10
    assert redis_step(5_000, -81.0) == 9
    assert redis_step(0, 0.0) == 26
    assert redis_step(1e-3, 0.0) == 26
    assert redis_step(1e8, 0.0) == 1


def test_redis_steps_one_coarser_when_a_neighbour_falls_short() -> None:
    """decrease_step: near the right edge of the last column (whose east neighbour wraps
    to the far west), and when the radius passes the box's edge by more than a box."""
    assert searched_step(179.5523, -14.4364, 25163.8) == redis_step(25163.8, -14.4364) - 1
    h = (LAT_MAX - geohash.LAT_MIN) / (1 << 20)  # 0.000162 degrees, 18.0 m
    row, _ = geohash.cell(-154.26, -14.36, 20)
    top = geohash.LAT_MIN + (row + 1) * h - h / 100  # just under the top of its box
    assert redis_step(18.6, top) == 20
    assert searched_step(-154.26, top, 18.6) == 19  # the north neighbour ends 18.2 m up
    assert searched_step(-154.26, top - h / 2, 18.6) == 20
    assert searched_step(77.5946, 12.9716, 5000.0) == redis_step(5000.0, 12.9716)


def test_every_radius_of_a_rung_is_searched_at_its_step_or_finer() -> None:
    """A rung's boxes hold whatever Redis reads at its radius or any smaller one."""
    rnd = random.Random(5)
    places = PLACES + [(rnd.uniform(-180, 180), rnd.uniform(-85, 85)) for _ in range(300)]
    for lng, lat in places:
        for km in (0.01, 0.8, 5.8, 51.0, 102.0):
            rungs = ladder(lng, lat, km)
            radii = [r.radius_km for r in rungs]
            assert radii == sorted(radii, reverse=True) and radii[0] == km
            assert [r.step for r in rungs] == sorted(r.step for r in rungs)
            for rung in rungs:
                for f in (1.0, 0.9, 0.7, 0.5, 0.3):
                    m = float(repr(rung.radius_km * f)) * 1000
                    assert searched_step(lng, lat, m) >= rung.step, (lng, lat, km, rung, f)


async def test_scores_are_the_ones_redis_stores(store: Store) -> None:
    rnd = random.Random(7)
    points = [(rnd.uniform(-180, 180), rnd.uniform(-LAT_MAX, LAT_MAX)) for _ in range(300)]
    points += [(lng + rnd.uniform(-0.01, 0.01), lat) for lng, lat in PLACES if abs(lng) < 180]
    key = store.keys.all_geo()[0]
    await store.client.geoadd(
        key, [x for i, (lng, lat) in enumerate(points) for x in (lng, lat, f"m{i}")]
    )
    for i, (lng, lat) in enumerate(points):
        assert int(await store.client.zscore(key, f"m{i}")) == score(lng, lat), (lng, lat)


async def test_decoding_a_score_gives_the_coordinates_redis_gives(store: Store) -> None:
    """``decode`` is ``GEOPOS`` (and ``WITHCOORD``), edges included: to 1e-12 degrees,
    (Redis prints 17 places after the point, ``%.17Lf``; decode takes the centre as
    ``(row + 1/2) * size``, not ``(min + max) / 2``: both far inside GEO_SLACK_KM)."""
    rnd = random.Random(8)
    points = [(rnd.uniform(-180, 180), rnd.uniform(-LAT_MAX, LAT_MAX)) for _ in range(300)]
    points += [(180.0, 0.0), (-180.0, 0.0), (0.0, LAT_MAX), (0.0, -LAT_MAX), (180.0, LAT_MAX)]
    key = store.keys.all_geo()[0]
    await store.client.geoadd(
        key, [x for i, (lng, lat) in enumerate(points) for x in (lng, lat, f"m{i}")]
    )
    names = [f"m{i}" for i in range(len(points))]
    positions = await store.client.geopos(key, *names)
    for name, (lng, lat), pos in zip(names, points, positions, strict=True):
        stored = int(await store.client.zscore(key, name))
        assert stored == score(lng, lat)
        d_lng, d_lat = geohash.decode(stored)
        assert d_lng == pytest.approx(float(pos[0]), rel=0, abs=1e-12), (lng, lat)
        assert d_lat == pytest.approx(float(pos[1]), rel=0, abs=1e-12), (lng, lat)


@pytest.mark.timeout(120)
async def test_every_member_geosearch_returns_lies_in_the_counted_boxes(store: Store) -> None:
    """For each rung of each ladder, GEOSEARCH at the rung's radius finds nothing outside
    its boxes, and the boxes' counts never grow down the ladder."""
    rnd = random.Random(11)
    key = store.keys.all_geo()[0]
    members = []
    for lng, lat in PLACES:
        for _ in range(150):
            m_lat = max(-LAT_MAX, min(LAT_MAX, lat + rnd.uniform(-1.5, 1.5)))
            m_lng = lng + rnd.uniform(-3, 3)
            m_lng = (m_lng + 180) % 360 - 180 if abs(m_lng) > 180 else m_lng
            members += [m_lng, m_lat, f"m{len(members)}"]
    for lng, lat in PLACES[:4]:  # members exactly on the lines, too
        members += [lng, lat, f"m{len(members)}"]
    await store.client.geoadd(key, members)
    c = store.client
    for lng, lat in PLACES:
        for km in (0.3, 2.0, 5.8, 20.0, 51.0, 150.0):
            counts = []
            for rung in ladder(lng, lat, km):
                found = await c.execute_command(
                    "GEOSEARCH",
                    key,
                    "FROMLONLAT",
                    repr(lng),
                    repr(lat),
                    "BYRADIUS",
                    repr(rung.radius_km),
                    "km",
                    "WITHHASH",
                )
                for name, h in found:
                    assert any(lo <= int(h) < hi for lo, hi in rung.ranges), (lng, lat, km, name)
                counts.append(sum([await c.zcount(key, lo, f"({hi}") for lo, hi in rung.ranges]))
                assert counts[-1] >= len(found)
            assert counts == sorted(counts, reverse=True), (lng, lat, km)


def test_boxes_wrap_around_the_antimeridian_and_take_in_the_top_edge() -> None:
    """Nine boxes, wrapped; on the top edge (lng 180, lat LAT_MAX) also the box one past
    the last, where Redis keeps members stored exactly on that edge."""
    box = 1 << (2 * (26 - 5))
    assert sum(hi - lo for lo, hi in geohash.boxes(-180.0, 0.0, 5)) == 9 * box
    assert sum(hi - lo for lo, hi in geohash.boxes(12.0, 40.0, 5)) == 9 * box
    for lng, lat in ((180.0, 0.0), (0.0, LAT_MAX)):
        spans = geohash.boxes(lng, lat, 5)
        assert sum(hi - lo for lo, hi in spans) == 12 * box
        assert max(hi for _, hi in spans) > 1 << 52
    assert score(180.0, 0.0) >= 1 << 52 and score(0.0, LAT_MAX) >= 1 << 52
