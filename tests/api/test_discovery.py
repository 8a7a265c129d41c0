"""``GET /v1/deals``: public, validated, shaped as API.md says, live over HTTP."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from starlette.datastructures import QueryParams

from api.discovery import query_values
from engine.discovery import haversine_km
from tests.api.conftest import RunningApi

LAT, LNG = 12.9716, 77.5946
DEAL_KEYS = {
    "id",
    "merchant_id",
    "title",
    "description",
    "lat",
    "lng",
    "inventory_total",
    "inventory_left",
    "starts_at",
    "ends_at",
    "redeem_until",
    "status",
    "distance_km",
}


def create(api: RunningApi, client: httpx.Client, lat: float, lng: float, **extra: object) -> str:
    ends = (datetime.now(UTC) + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    body = {"title": "espresso", "lat": lat, "lng": lng, "inventory": 1, "ends_at": ends, **extra}
    r = client.post("/v1/deals", json=body, headers=api.auth("merchant", "m-1"))
    assert r.status_code == 201, r.text
    deal_id: str = r.json()["deal"]["id"]
    return deal_id


@pytest.mark.parametrize(
    ("query", "bad"),
    [
        ("", {"lat", "lng"}),
        ("lat=12.9", {"lng"}),
        ("lat=85.06&lng=0", {"lat"}),
        ("lat=-85.0512&lng=0", {"lat"}),
        ("lat=0&lng=180.0001", {"lng"}),
        ("lat=0&lng=-181", {"lng"}),
        ("lat=nan&lng=inf", {"lat", "lng"}),
        ("lat=north&lng=0", {"lat"}),
        ("lat=0&lng=0&radius_km=0", {"radius_km"}),
        ("lat=0&lng=0&radius_km=-1", {"radius_km"}),
        ("lat=0&lng=0&radius_km=50.0001", {"radius_km"}),
        ("lat=0&lng=0&limit=0", {"limit"}),
        ("lat=0&lng=0&limit=101", {"limit"}),
        ("lat=0&lng=0&limit=2.5", {"limit"}),
        ("lat=0&lng=0&limit=99999999999999999999", {"limit"}),
        ("lat=100&lng=0&radius_km=99&limit=-3", {"lat", "radius_km", "limit"}),
    ],
)
def test_bad_or_missing_parameters_are_422_naming_each(
    client: httpx.Client, query: str, bad: set[str]
) -> None:
    r = client.get(f"/v1/deals?{query}")
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert error["code"] == "invalid_request"
    assert set(error["details"]["fields"]) == bad


def test_bounds_are_inclusive_where_api_md_says(client: httpx.Client) -> None:
    """lat +-85.05112878, lng +-180, radius 50 and limit 1..100 are all accepted."""
    for query in (
        "lat=85.05112878&lng=180",
        "lat=-85.05112878&lng=-180&radius_km=50",
        "lat=0&lng=0&limit=1",
        "lat=0&lng=0&limit=100&radius_km=0.001",
    ):
        r = client.get(f"/v1/deals?{query}")
        assert r.status_code == 200, (query, r.text)
        assert r.json() == {"deals": [], "count": 0}


def test_discovery_is_public_and_shaped_as_api_md_says(
    api: RunningApi, client: httpx.Client
) -> None:
    near = create(api, client, LAT + 0.001, LNG, description="two for one")
    far = create(api, client, LAT + 0.02, LNG)  # about 2.2 km
    r = client.get(f"/v1/deals?lat={LAT}&lng={LNG}")  # no Authorization header
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"deals", "count"}
    assert body["count"] == 2 == len(body["deals"])
    assert [d["id"] for d in body["deals"]] == [near, far]
    first = body["deals"][0]
    assert set(first) == DEAL_KEYS
    assert first["status"] == "active" and first["description"] == "two for one"
    assert first["distance_km"] == pytest.approx(haversine_km(LAT, LNG, LAT + 0.001, LNG))
    assert first["ends_at"].endswith("Z")
    # radius_km narrows it; limit cuts it; both nearest first.
    assert [
        d["id"] for d in client.get(f"/v1/deals?lat={LAT}&lng={LNG}&radius_km=1").json()["deals"]
    ] == [near]
    assert client.get(f"/v1/deals?lat={LAT}&lng={LNG}&limit=1").json()["count"] == 1


def test_defaults_are_5_km_and_20_deals(api: RunningApi, client: httpx.Client) -> None:
    for i in range(22):
        create(api, client, LAT + 0.0005 * i, LNG)  # 0 .. 1.2 km north
    create(api, client, LAT - 0.05, LNG)  # about 5.6 km south: outside the default
    body = client.get(f"/v1/deals?lat={LAT}&lng={LNG}").json()
    assert body["count"] == 20
    assert all(d["distance_km"] <= 5.0 for d in body["deals"])
    assert client.get(f"/v1/deals?lat={LAT}&lng={LNG}&limit=100").json()["count"] == 22
    wide = client.get(f"/v1/deals?lat={LAT}&lng={LNG}&limit=100&radius_km=6").json()
    assert wide["count"] == 23


def test_claiming_the_last_voucher_removes_the_deal_from_the_next_answer(
    api: RunningApi, client: httpx.Client
) -> None:
    deal = create(api, client, LAT, LNG)
    other = create(api, client, LAT + 0.001, LNG, starts_at=None)
    scheduled_start = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    create(api, client, LAT, LNG + 0.001, starts_at=scheduled_start)
    url = f"/v1/deals?lat={LAT}&lng={LNG}&radius_km=2"
    assert [d["id"] for d in client.get(url).json()["deals"]] == [deal, other]
    r = client.post(f"/v1/deals/{deal}/claims", headers=api.auth("user", "u-9"))
    assert r.status_code == 201 and r.json()["inventory_left"] == 0
    assert [d["id"] for d in client.get(url).json()["deals"]] == [other]
    r = client.post(f"/v1/deals/{other}/cancel", headers=api.auth("merchant", "m-1"))
    assert r.status_code == 200
    assert client.get(url).json() == {"deals": [], "count": 0}


def test_post_on_the_same_path_still_creates_and_other_methods_are_json_405(
    api: RunningApi, client: httpx.Client
) -> None:
    create(api, client, LAT, LNG)
    r = client.delete("/v1/deals")
    assert r.status_code == 405
    assert r.json()["error"]["code"] == "method_not_allowed"


# Pieces a query string is made of, the awkward ones included: separators, escapes (valid,
# truncated, invalid, UTF-8, not UTF-8), '+', raw non-ASCII bytes, and the names we read.
_QUERY_PIECES = st.sampled_from(
    [
        *(b"&", b"=", b"&&", b"==", b"%", b"%2", b"%2B", b"%26", b"%3D", b"%ZZ", b"%C3%A9"),
        *(b"%FF", b"%00", b"+", b";", b"\xe9", b"\xc3\xa9", b" ", b"lat", b"lng", b"limit"),
        *(b"radius_km", b"1", b"-2.5", b"nan", b"\xd9\xa3", b"%D9%A3"),
    ]
)


@given(st.lists(_QUERY_PIECES, max_size=24).map(b"".join) | st.binary(max_size=64))
def test_the_query_reads_as_starlettes_query_params(raw: bytes) -> None:
    """The endpoint's own parser: every name's last value, decoded as ``QueryParams`` does."""
    assert query_values(raw) == dict(QueryParams(raw).items())


@pytest.mark.parametrize(
    ("query", "count"),
    [
        ("limit=3&limit=1", 1),  # the last of a repeated name
        ("limit=%31", 1),  # percent-encoded
        ("limit=%2B2", 2),  # an encoded '+' is a sign
        ("limit=+2", None),  # a bare '+' is a space: not an integer
        ("lim%69t=1", 1),  # an encoded name
        ("limit", 3),  # no '=': blank, so the default
        ("limit=&radius_km=", 3),
        ("limit=2;radius_km=1", None),  # ';' separates nothing
    ],
)
def test_query_strings_decode_as_before(
    api: RunningApi, client: httpx.Client, query: str, count: int | None
) -> None:
    """Escapes, '+', repeats and blanks, over HTTP; ``None``: 422 naming ``limit``."""
    for i in range(3):
        create(api, client, LAT + 0.001 * i, LNG)
    r = client.get(f"/v1/deals?lat={LAT}&lng={LNG}&{query}")
    if count is None:
        assert r.status_code == 422, r.text
        assert set(r.json()["error"]["details"]["fields"]) == {"limit"}
    else:
        assert r.status_code == 200, r.text
        assert r.json()["count"] == count
