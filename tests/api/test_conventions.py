"""API.md's Conventions on every route: body shapes, RFC 3339 times, GET parameters, sizes."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest
from starlette.routing import Route

from api.app import AREAS
from engine.settings import Settings
from tests.api.conftest import SECRET, RunningApi, serve_in_thread, stop_thread
from tests.conftest import flush
from tests.vouchers.helpers import claim, create_deal

KIB, MIB = 1024, 1024 * 1024

# Every route that takes a body, with a valid body for it (a voucher token, if one is
# needed, is filled in by the test).
BODY_ROUTES: dict[str, dict[str, Any]] = {
    "/v1/deals": {
        "title": "espresso",
        "lat": 12.97,
        "lng": 77.59,
        "inventory": 5,
        "starts_at": "2099-01-01T00:00:00Z",
        "ends_at": "2099-01-02T00:00:00Z",
    },
    "/v1/redemptions": {"token": "<voucher>"},
    "/v1/redemptions/sync": {
        "device_id": "till-1",
        "entries": [{"entry_id": "e-1", "token": "<voucher>", "redeemed_at": "<now>"}],
    },
}

WRONG_SHAPES = {
    "array": b"[]",
    "array holding a valid body": b"[<valid>]",
    "array of numbers": b"[1, 2]",
    "string": b'"{}"',
    "integer": b"42",
    "negative fraction": b"-1.5e3",
    "integer past 64 bits": b"1" + b"0" * 400,
    "true": b"true",
    "false": b"false",
    "null": b"null",
    "null in whitespace": b" \n null \t",
}
NOT_JSON = {
    "empty": b"",
    "whitespace": b"  \n",
    "truncated object": b"{",
    "bare word": b"hello",
    "single quotes": b"{'title': 'x'}",
    "trailing comma": b"[1,]",
    "NaN": b"NaN",
    "two values": b"{} {}",
    "invalid utf-8": b'"\xff"',
}


@pytest.fixture(scope="module")
def api(
    redis_url: str, migrated_database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningApi]:
    """One API for the module: each test makes its own deals and vouchers, so no test
    needs a clean keyspace, and 150 of them do not each start a server."""
    flush(redis_url, False)
    settings = Settings(
        redis_url=redis_url,
        database_url=migrated_database_url,
        auth_secret=SECRET,
        data_dir=tmp_path_factory.mktemp("conventions"),
        rate_caller_per_s=0,  # one merchant sends hundreds of bodies a second here
    )
    server, thread, url = serve_in_thread(settings)
    try:
        yield RunningApi(url, settings, server)
    finally:
        stop_thread(server, thread)


@pytest.fixture(scope="module")
def client(api: RunningApi) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api.url, timeout=10) as c:
        yield c


@pytest.fixture
def voucher_token(api: RunningApi, client: httpx.Client) -> str:
    deal = create_deal(client, api.token("merchant", "m-1"))
    return str(claim(client, deal["id"], api.token("user", "u-1"))["token"])


def valid_body(path: str, token: str) -> bytes:
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    text = orjson.dumps(BODY_ROUTES[path]).decode()
    return text.replace("<voucher>", token).replace("<now>", now).encode()


def post(api: RunningApi, client: httpx.Client, path: str, body: Any) -> httpx.Response:
    headers = {**api.auth("merchant", "m-1"), "Content-Type": "application/json"}
    return client.post(path, content=body, headers=headers)


def test_the_tables_cover_every_route_that_takes_a_body(client: httpx.Client) -> None:
    doc = client.get("/openapi.json").json()
    with_body = {
        path for path, ops in doc["paths"].items() for op in ops.values() if "requestBody" in op
    }
    assert with_body == set(BODY_ROUTES)


@pytest.mark.parametrize("shape", WRONG_SHAPES)
@pytest.mark.parametrize("path", BODY_ROUTES)
def test_json_of_the_wrong_shape_is_422_naming_the_body(
    api: RunningApi, client: httpx.Client, voucher_token: str, path: str, shape: str
) -> None:
    body = WRONG_SHAPES[shape].replace(b"<valid>", valid_body(path, voucher_token))
    r = post(api, client, path, body)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert error["code"] == "invalid_request"
    assert list(error["details"]["fields"]) == ["body"]
    # The same route takes the valid body: the shape alone was refused.
    assert post(api, client, path, valid_body(path, voucher_token)).status_code in (200, 201)


@pytest.mark.parametrize("text", NOT_JSON)
@pytest.mark.parametrize("path", BODY_ROUTES)
def test_a_body_that_is_not_json_is_400_invalid_json(
    api: RunningApi, client: httpx.Client, path: str, text: str
) -> None:
    r = post(api, client, path, NOT_JSON[text])
    assert r.status_code == 400, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.json()["error"]["code"] == "invalid_json"


# -- times ------------------------------------------------------------------------

# A deal whose times are valid: each field's instant is spelled below in other ways.
INSTANTS = {
    "starts_at": datetime(2099, 1, 1, 0, 0, 0, tzinfo=UTC),
    "ends_at": datetime(2099, 1, 2, 12, 0, 0, tzinfo=UTC),
    "redeem_until": datetime(2099, 1, 5, 18, 30, 0, tzinfo=UTC),
}


def rfc3339(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def deal_with(field: str, spelling: str) -> dict[str, Any]:
    times = {name: rfc3339(dt) for name, dt in INSTANTS.items()}
    return {**BODY_ROUTES["/v1/deals"], **times, field: spelling}


def refused_spellings(dt: datetime) -> dict[str, str]:
    """The instant ``dt`` in ISO 8601 spellings that RFC 3339 does not allow."""
    date, time = dt.strftime("%Y-%m-%d"), dt.strftime("%H:%M:%S")
    year, week, weekday = dt.isocalendar()
    plus5, plus530 = dt + timedelta(hours=5), dt + timedelta(hours=5, minutes=30)
    return {
        "week date": f"{year}-W{week:02d}-{weekday}T{time}Z",
        "basic format": dt.strftime("%Y%m%dT%H%M%SZ"),
        "basic time": dt.strftime("%Y-%m-%dT%H%M%SZ"),
        "hour only": dt.strftime("%Y-%m-%dT%HZ"),
        "no seconds": dt.strftime("%Y-%m-%dT%H:%MZ"),
        "comma fraction": f"{date}T{time},5Z",
        "dot without digits": f"{date}T{time}.Z",
        "+05 offset": plus5.strftime("%Y-%m-%dT%H:%M:%S+05"),
        "+0530 offset": plus530.strftime("%Y-%m-%dT%H:%M:%S+0530"),
        "offset with seconds": plus530.strftime("%Y-%m-%dT%H:%M:%S+05:30:00"),
        "no zone": f"{date}T{time}",
        "date only": date,
        "space for T": f"{date} {time}Z",
    }


def accepted_spellings(dt: datetime) -> dict[str, tuple[str, str]]:
    """RFC 3339 spellings of ``dt`` (plus a fraction) and the UTC answer for each."""
    date, time = dt.strftime("%Y-%m-%d"), dt.strftime("%H:%M:%S")
    utc = f"{date}T{time}.000Z"
    plus530, minus3 = dt + timedelta(hours=5, minutes=30), dt - timedelta(hours=3)
    return {
        "Z": (f"{date}T{time}Z", utc),
        "lowercase t and z": (f"{date}t{time}z", utc),
        "+05:30": (plus530.strftime("%Y-%m-%dT%H:%M:%S+05:30"), utc),
        "-03:00": (minus3.strftime("%Y-%m-%dT%H:%M:%S-03:00"), utc),
        "-00:00": (f"{date}T{time}-00:00", utc),
        "fraction": (f"{date}T{time}.123456Z", utc.replace(".000", ".123")),
        "fraction and offset": (
            plus530.strftime("%Y-%m-%dT%H:%M:%S.5+05:30"),
            utc.replace(".000", ".500"),
        ),
    }


@pytest.mark.parametrize("spelling", refused_spellings(INSTANTS["ends_at"]))
@pytest.mark.parametrize("field", INSTANTS)
def test_other_iso_8601_spellings_of_a_time_are_422_naming_the_field(
    api: RunningApi, client: httpx.Client, field: str, spelling: str
) -> None:
    text = refused_spellings(INSTANTS[field])[spelling]
    r = client.post("/v1/deals", json=deal_with(field, text), headers=api.auth("merchant"))
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_request"
    assert list(error["details"]["fields"]) == [field]
    assert "RFC 3339" in error["details"]["fields"][field]


@pytest.mark.parametrize("spelling", accepted_spellings(INSTANTS["ends_at"]))
@pytest.mark.parametrize("field", INSTANTS)
def test_rfc3339_spellings_of_a_time_are_201_and_answered_in_utc(
    api: RunningApi, client: httpx.Client, field: str, spelling: str
) -> None:
    text, utc = accepted_spellings(INSTANTS[field])[spelling]
    r = client.post("/v1/deals", json=deal_with(field, text), headers=api.auth("merchant"))
    assert r.status_code == 201, r.text
    deal = r.json()["deal"]
    assert deal[field] == utc
    for other, dt in INSTANTS.items():
        if other != field:
            assert deal[other] == dt.strftime("%Y-%m-%dT%H:%M:%S.000Z")


# -- query parameters -------------------------------------------------------------

UNKNOWN_PARAMS = {"foo": "bar", "_": "1764007200000", "utm_source": "poster", "limit_": "x"}


def _get_paths() -> set[str]:
    return {
        route.path
        for module in AREAS
        for route in module.routes
        if isinstance(route, Route) and "GET" in (route.methods or ())
    }


# Each GET route: who asks, the parameters it needs, and its answer.
GETS: dict[str, tuple[str | None, dict[str, str], int]] = {
    "/v1/deals": (None, {"lat": "12.97", "lng": "77.59"}, 200),
    "/v1/deals/{deal_id}": (None, {}, 200),
    "/v1/vouchers/{voucher_id}": ("user", {}, 200),
    "/v1/vouchers/{voucher_id}/qr.svg": ("user", {}, 200),
    "/v1/vouchers/{voucher_id}/qr.png": ("user", {}, 200),
    "/v1/me/vouchers": ("user", {"limit": "5"}, 200),
    "/v1/redemptions": ("merchant", {"limit": "5"}, 200),
    "/.well-known/jwks.json": (None, {}, 200),
    "/healthz": (None, {}, 200),
    "/readyz": (None, {}, 200),
    "/metrics": (None, {}, 200),
    "/openapi.json": (None, {}, 200),
}


def test_the_table_covers_every_get_route() -> None:
    assert set(GETS) == _get_paths()


@pytest.mark.parametrize("route", GETS)
def test_unknown_query_parameters_on_a_get_are_ignored(
    api: RunningApi, client: httpx.Client, route: str
) -> None:
    deal = create_deal(client, api.token("merchant", "m-1"))
    voucher = claim(client, deal["id"], api.token("user", "u-1"))
    path = route.format(deal_id=deal["id"], voucher_id=voucher["id"])
    role, params, status = GETS[route]
    headers = api.auth(role, "u-1") if role else {}
    plain = client.get(path, params=params, headers=headers)
    extra = client.get(path, params={**params, **UNKNOWN_PARAMS}, headers=headers)
    assert plain.status_code == extra.status_code == status, extra.text
    assert extra.headers["content-type"] == plain.headers["content-type"]
    if route == "/v1/me/vouchers":
        assert extra.json() == plain.json() == {"vouchers": [], "next_cursor": None}


def test_my_vouchers_with_an_unknown_parameter_is_200(
    api: RunningApi, client: httpx.Client
) -> None:
    r = client.get("/v1/me/vouchers?foo=bar", headers=api.auth("user", "u-1"))
    assert r.status_code == 200, r.text
    assert r.json() == {"vouchers": [], "next_cursor": None}


# -- body sizes -------------------------------------------------------------------

LIMITS = {"/v1/deals": 64 * KIB, "/v1/redemptions": 64 * KIB, "/v1/redemptions/sync": MIB}


def padded(body: bytes, size: int) -> bytes:
    """``body`` followed by JSON whitespace, ``size`` bytes in all."""
    assert len(body) <= size
    return body + b" " * (size - len(body))


def test_the_limits_cover_every_route_that_takes_a_body() -> None:
    assert set(LIMITS) == set(BODY_ROUTES)


@pytest.mark.parametrize("path", LIMITS)
def test_a_body_of_exactly_the_limit_is_taken_and_one_byte_more_is_413(
    api: RunningApi, client: httpx.Client, voucher_token: str, path: str
) -> None:
    limit = LIMITS[path]
    body = valid_body(path, voucher_token)
    over = post(api, client, path, padded(body, limit + 1))
    assert over.status_code == 413, over.text
    assert over.headers["content-type"] == "application/json"
    error = over.json()["error"]
    assert error["code"] == "payload_too_large"
    assert error["details"] == {"limit_bytes": limit}
    size = "1 MiB" if limit == MIB else "64 KiB"
    assert error["message"] == f"The request body is over {size}."
    at = post(api, client, path, padded(body, limit))
    assert at.status_code in (200, 201), at.text


@pytest.mark.parametrize("path", LIMITS)
def test_a_chunked_body_over_the_limit_is_413(
    api: RunningApi, client: httpx.Client, voucher_token: str, path: str
) -> None:
    """No Content-Length: the server counts what arrives and stops at the limit."""
    body = padded(valid_body(path, voucher_token), LIMITS[path] + 1)

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 16 * KIB):
            yield body[start : start + 16 * KIB]

    r = post(api, client, path, chunks())
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "payload_too_large"
