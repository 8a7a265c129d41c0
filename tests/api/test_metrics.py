"""/metrics exports discovery's own counts (``Discovery.work``) and its caches' bytes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from api.metrics import DISCOVERY_WORK_KINDS
from engine.discovery import Discovery
from engine.settings import Settings
from tests.api.conftest import RunningApi
from tests.api.test_discovery import LAT, LNG, create
from tests.conftest import flush

# Small bounds, so that the requests below ask more of each cache than it may hold: every
# candidate entry counts at least 1 KiB (docs/discovery.md), every deal's fixed fields
# at least 400 B.
CACHE_BYTES = 64 * 1024
FIXED_BYTES = 8 * 1024
OCEAN_CELLS = 100  # distinct cells asked, one entry each: over 100 KiB in all
CROWD = 60  # deals at one spot, over first_count (2) per partition: searched again


@pytest.fixture
def small_api(
    make_api: Callable[..., RunningApi], redis_url: str, migrated_database_url: str
) -> RunningApi:
    flush(redis_url, False)
    settings = Settings(
        redis_url=redis_url,
        database_url=migrated_database_url,
        discovery_cache_bytes=CACHE_BYTES,
        discovery_fixed_bytes=FIXED_BYTES,
        discovery_first_count_members=2,
    )
    return make_api(settings)


def discovery_of(api: RunningApi) -> Discovery:
    if not isinstance(api.server, uvicorn.Server):
        pytest.skip("reads Discovery.work: needs the API in the test's process")
    discovery: Discovery = api.server.config.app.state.services.discovery
    return discovery


def scrape(client: httpx.Client) -> tuple[dict[str, float], dict[str, float]]:
    """flashsale_discovery_work_total by kind, and the discovery gauges by name."""
    work: dict[str, float] = {}
    gauges: dict[str, float] = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "flashsale_discovery_work_total":
                work[sample.labels["kind"]] = sample.value
            elif family.name in (
                "flashsale_discovery_cache_bytes",
                "flashsale_discovery_fixed_bytes",
            ):
                gauges[family.name] = sample.value
    return work, gauges


def test_discovery_work_in_metrics_moves_by_exactly_what_discovery_counts(
    small_api: RunningApi,
) -> None:
    discovery = discovery_of(small_api)
    with httpx.Client(base_url=small_api.url, timeout=10) as client:
        before, _ = scrape(client)
        counted_before = asdict(discovery.work)
        for i in range(CROWD):
            create(small_api, client, LAT + 0.00001 * i, LNG)
        for _ in range(3):  # a miss, then hits
            r = client.get(f"/v1/deals?lat={LAT}&lng={LNG}&limit=100")
            assert r.status_code == 200 and r.json()["count"] == CROWD
        for i in range(OCEAN_CELLS):  # far from any deal, each in a cell of its own
            assert client.get(f"/v1/deals?lat={-40 + 0.1 * i}&lng=-140").status_code == 200
        after, gauges = scrape(client)
        counted_after = asdict(discovery.work)

    assert set(before) == set(after) == set(DISCOVERY_WORK_KINDS) == set(counted_after)
    moved = {kind: after[kind] - before[kind] for kind in after}
    assert moved == {k: counted_after[k] - counted_before[k] for k in DISCOVERY_WORK_KINDS}
    assert after == counted_after  # this API's only Discovery: the totals agree too
    for kind in ("searches", "geosearches", "geo_returned", "geo_scan_bound", "deals_read"):
        assert moved[kind] > 0, kind
    assert moved["rewidened"] >= 1  # the crowded spot was searched again

    # Each cache was asked for more than it may hold, and holds at most its bound.
    assert 0 < gauges["flashsale_discovery_cache_bytes"] <= CACHE_BYTES
    assert gauges["flashsale_discovery_cache_bytes"] == discovery.cache_used_bytes
    assert 0 < gauges["flashsale_discovery_fixed_bytes"] <= FIXED_BYTES
    assert gauges["flashsale_discovery_fixed_bytes"] == discovery.fixed_used_bytes
