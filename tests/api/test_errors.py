"""Every bad request gets the status API.md gives and a JSON error body, never a 500."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest

from tests.api.conftest import SECRET, RunningApi

FUTURE_START = "2099-01-01T00:00:00Z"
FUTURE_END = "2099-01-02T00:00:00Z"
GOOD: dict[str, Any] = {
    "title": "espresso",
    "lat": 12.97,
    "lng": 77.59,
    "inventory": 5,
    "starts_at": FUTURE_START,
    "ends_at": FUTURE_END,
}


def deal(**changes: Any) -> dict[str, Any]:
    body = {**GOOD, **changes}
    return {k: v for k, v in body.items() if v is not ...}


def raw(text: str | bytes) -> bytes:
    return text.encode() if isinstance(text, str) else text


def _tok(claims: dict[str, Any], key: str = SECRET, alg: str = "HS256") -> str:
    return jwt.encode(claims, key, alg)


def _none_alg(claims: dict[str, Any]) -> str:
    import base64
    import json

    def b64(d: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()

    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims)}."


NOW = int(time.time())
MERCHANT = {"sub": "m-1", "role": "merchant", "exp": NOW + 3600}
NESTED = "[" * 100 + "]" * 100
VERY_NESTED = '{"a":' * 5000 + "1" + "}" * 5000

# (name, method, path, body (json / bytes / None), token (role or raw string or None),
#  expected status, expected code)
CASES: list[tuple[str, str, str, Any, Any, int, str]] = [
    # -- body is not JSON -> 400
    ("truncated json", "POST", "/v1/deals", raw("{"), "merchant", 400, "invalid_json"),
    ("empty body", "POST", "/v1/deals", raw(""), "merchant", 400, "invalid_json"),
    (
        "invalid utf-8",
        "POST",
        "/v1/deals",
        raw(b'{"title": "\xff\xfe"}'),
        "merchant",
        400,
        "invalid_json",
    ),
    (
        "NaN",
        "POST",
        "/v1/deals",
        raw('{"title": "x", "lat": NaN}'),
        "merchant",
        400,
        "invalid_json",
    ),
    (
        "Infinity",
        "POST",
        "/v1/deals",
        raw('{"title": "x", "lat": Infinity}'),
        "merchant",
        400,
        "invalid_json",
    ),
    ("-Infinity", "POST", "/v1/deals", raw('{"lng": -Infinity}'), "merchant", 400, "invalid_json"),
    (
        "nested 100 deep",
        "POST",
        "/v1/deals",
        raw('{"title": ' + NESTED + "}"),
        "merchant",
        400,
        "invalid_json",
    ),
    ("nested 5000 deep", "POST", "/v1/deals", raw(VERY_NESTED), "merchant", 400, "invalid_json"),
    (
        "trailing garbage",
        "POST",
        "/v1/deals",
        raw('{"title": "x"} x'),
        "merchant",
        400,
        "invalid_json",
    ),
    # -- JSON of the wrong shape -> 422
    ("json array", "POST", "/v1/deals", [1, 2], "merchant", 422, "invalid_request"),
    ("json string", "POST", "/v1/deals", "hello", "merchant", 422, "invalid_request"),
    ("json null", "POST", "/v1/deals", raw("null"), "merchant", 422, "invalid_request"),
    # -- fields -> 422
    ("title missing", "POST", "/v1/deals", deal(title=...), "merchant", 422, "invalid_request"),
    ("title empty", "POST", "/v1/deals", deal(title=""), "merchant", 422, "invalid_request"),
    ("title blank", "POST", "/v1/deals", deal(title="   "), "merchant", 422, "invalid_request"),
    (
        "title too long",
        "POST",
        "/v1/deals",
        deal(title="x" * 201),
        "merchant",
        422,
        "invalid_request",
    ),
    ("title number", "POST", "/v1/deals", deal(title=5), "merchant", 422, "invalid_request"),
    ("title null", "POST", "/v1/deals", deal(title=None), "merchant", 422, "invalid_request"),
    (
        "title lone surrogate",
        "POST",
        "/v1/deals",
        raw(
            '{"title": "\\ud800", "lat": 1, "lng": 1, "inventory": 1, "ends_at": "'
            + FUTURE_END
            + '", "starts_at": "'
            + FUTURE_START
            + '"}'
        ),
        "merchant",
        422,
        "invalid_request",
    ),
    (
        "description too long",
        "POST",
        "/v1/deals",
        deal(description="d" * 2001),
        "merchant",
        422,
        "invalid_request",
    ),
    (
        "description object",
        "POST",
        "/v1/deals",
        deal(description={"a": 1}),
        "merchant",
        422,
        "invalid_request",
    ),
    ("lat string", "POST", "/v1/deals", deal(lat="12.97"), "merchant", 422, "invalid_request"),
    ("lat boolean", "POST", "/v1/deals", deal(lat=True), "merchant", 422, "invalid_request"),
    ("lat above band", "POST", "/v1/deals", deal(lat=85.06), "merchant", 422, "invalid_request"),
    ("lat below band", "POST", "/v1/deals", deal(lat=-85.0512), "merchant", 422, "invalid_request"),
    (
        "lat hundreds of digits",
        "POST",
        "/v1/deals",
        raw(
            '{"title": "x", "lat": 1'
            + "0" * 400
            + ', "lng": 1, "inventory": 1, "ends_at": "'
            + FUTURE_END
            + '"}'
        ),
        "merchant",
        422,
        "invalid_request",
    ),
    ("lng out of range", "POST", "/v1/deals", deal(lng=180.5), "merchant", 422, "invalid_request"),
    ("lng list", "POST", "/v1/deals", deal(lng=[1]), "merchant", 422, "invalid_request"),
    ("inventory zero", "POST", "/v1/deals", deal(inventory=0), "merchant", 422, "invalid_request"),
    (
        "inventory negative",
        "POST",
        "/v1/deals",
        deal(inventory=-3),
        "merchant",
        422,
        "invalid_request",
    ),
    (
        "inventory over a million",
        "POST",
        "/v1/deals",
        deal(inventory=1_000_001),
        "merchant",
        422,
        "invalid_request",
    ),
    (
        "inventory fractional",
        "POST",
        "/v1/deals",
        deal(inventory=1.5),
        "merchant",
        422,
        "invalid_request",
    ),
    (
        "inventory boolean",
        "POST",
        "/v1/deals",
        deal(inventory=True),
        "merchant",
        422,
        "invalid_request",
    ),
    (
        "inventory string",
        "POST",
        "/v1/deals",
        deal(inventory="100"),
        "merchant",
        422,
        "invalid_request",
    ),
    (
        "inventory hundreds of digits",
        "POST",
        "/v1/deals",
        raw(
            '{"title": "x", "lat": 1, "lng": 1, "inventory": 9'
            + "9" * 300
            + ', "ends_at": "'
            + FUTURE_END
            + '"}'
        ),
        "merchant",
        422,
        "invalid_request",
    ),
    ("ends_at missing", "POST", "/v1/deals", deal(ends_at=...), "merchant", 422, "invalid_request"),
    (
        "ends_at garbage",
        "POST",
        "/v1/deals",
        deal(ends_at="tomorrow"),
        "merchant",
        422,
        "invalid_request",
    ),
    (
        "ends_at impossible date",
        "POST",
        "/v1/deals",
        deal(ends_at="2099-02-30T10:00:00Z"),
        "merchant",
        422,
        "invalid_request",
    ),
    (
        "ends_at hour 25",
        "POST",
        "/v1/deals",
        deal(ends_at="2099-01-02T25:00:00Z"),
        "merchant",
        422,
        "invalid_request",
    ),
    (
        "ends_at without zone",
        "POST",
        "/v1/deals",
        deal(ends_at="2099-01-02T00:00:00"),
        "merchant",
        422,
        "invalid_request",
    ),
    (
        "ends_at date only",
        "POST",
        "/v1/deals",
        deal(ends_at="2099-01-02"),
        "merchant",
        422,
        "invalid_request",
    ),
    (
        "ends_at number",
        "POST",
        "/v1/deals",
        deal(ends_at=4070908800),
        "merchant",
        422,
        "invalid_request",
    ),
    (
        "starts_at year 0",
        "POST",
        "/v1/deals",
        deal(starts_at="0000-01-01T00:00:00Z"),
        "merchant",
        422,
        "invalid_request",
    ),
    (
        "ends before starts",
        "POST",
        "/v1/deals",
        deal(ends_at="2098-12-31T00:00:00Z"),
        "merchant",
        422,
        "invalid_request",
    ),
    (
        "ends equals starts",
        "POST",
        "/v1/deals",
        deal(ends_at=FUTURE_START),
        "merchant",
        422,
        "invalid_request",
    ),
    (
        "window over 30 days",
        "POST",
        "/v1/deals",
        deal(ends_at="2099-02-01T00:00:01Z"),
        "merchant",
        422,
        "invalid_request",
    ),
    (
        "ends in the past",
        "POST",
        "/v1/deals",
        deal(starts_at="2020-01-01T00:00:00Z", ends_at="2020-01-02T00:00:00Z"),
        "merchant",
        422,
        "invalid_request",
    ),
    (
        "redeem before end",
        "POST",
        "/v1/deals",
        deal(redeem_until="2099-01-01T12:00:00Z"),
        "merchant",
        422,
        "invalid_request",
    ),
    (
        "redeem over 90 days after end",
        "POST",
        "/v1/deals",
        deal(redeem_until="2099-04-03T00:00:00Z"),
        "merchant",
        422,
        "invalid_request",
    ),
    ("unknown field", "POST", "/v1/deals", deal(price=10), "merchant", 422, "invalid_request"),
    (
        "NUL in title",
        "POST",
        "/v1/deals",
        deal(title="a\u0000b"),
        "merchant",
        422,
        "invalid_request",
    ),
    (
        "escape character in description",
        "POST",
        "/v1/deals",
        deal(description="\u001b[2J"),
        "merchant",
        422,
        "invalid_request",
    ),
    (
        "year 9999",
        "POST",
        "/v1/deals",
        deal(starts_at="9999-12-30T00:00:00Z", ends_at="9999-12-31T00:00:00Z"),
        "merchant",
        422,
        "invalid_request",
    ),
    (
        "token sub with a space",
        "POST",
        "/v1/deals",
        deal(),
        "Bearer " + _tok({**MERCHANT, "sub": "m 1"}),
        401,
        "unauthenticated",
    ),
    (
        "token sub with NUL",
        "POST",
        "/v1/deals",
        deal(),
        "Bearer " + _tok({**MERCHANT, "sub": "m\u00001"}),
        401,
        "unauthenticated",
    ),
    # -- size -> 413
    (
        "body over 64 KiB",
        "POST",
        "/v1/deals",
        deal(description="x" * 70_000),
        "merchant",
        413,
        "payload_too_large",
    ),
    # -- identity -> 401 / 403
    ("no token", "POST", "/v1/deals", deal(), None, 401, "unauthenticated"),
    ("basic auth", "POST", "/v1/deals", deal(), "Basic dXNlcjpwYXNz", 401, "unauthenticated"),
    ("bearer without token", "POST", "/v1/deals", deal(), "Bearer", 401, "unauthenticated"),
    ("garbled token", "POST", "/v1/deals", deal(), "Bearer abc.def.ghi", 401, "unauthenticated"),
    (
        "expired token",
        "POST",
        "/v1/deals",
        deal(),
        "Bearer " + _tok({**MERCHANT, "exp": NOW - 10}),
        401,
        "unauthenticated",
    ),
    (
        "wrongly signed token",
        "POST",
        "/v1/deals",
        deal(),
        "Bearer " + _tok(MERCHANT, key="another-secret-of-32-bytes-or-more!!"),
        401,
        "unauthenticated",
    ),
    (
        "alg none token",
        "POST",
        "/v1/deals",
        deal(),
        "Bearer " + _none_alg(MERCHANT),
        401,
        "unauthenticated",
    ),
    (
        "HS512 token",
        "POST",
        "/v1/deals",
        deal(),
        "Bearer " + _tok(MERCHANT, alg="HS512"),
        401,
        "unauthenticated",
    ),
    (
        "token without role",
        "POST",
        "/v1/deals",
        deal(),
        "Bearer " + _tok({"sub": "m-1", "exp": NOW + 60}),
        401,
        "unauthenticated",
    ),
    (
        "token with unknown role",
        "POST",
        "/v1/deals",
        deal(),
        "Bearer " + _tok({**MERCHANT, "role": "root"}),
        401,
        "unauthenticated",
    ),
    (
        "token without exp",
        "POST",
        "/v1/deals",
        deal(),
        "Bearer " + _tok({"sub": "m-1", "role": "merchant"}),
        401,
        "unauthenticated",
    ),
    (
        "token with long sub",
        "POST",
        "/v1/deals",
        deal(),
        "Bearer " + _tok({**MERCHANT, "sub": "m" * 65}),
        401,
        "unauthenticated",
    ),
    ("user creates a deal", "POST", "/v1/deals", deal(), "user", 403, "forbidden"),
    ("merchant claims", "POST", "/v1/deals/d_x/claims", None, "merchant", 403, "forbidden"),
    ("user cancels", "POST", "/v1/deals/d_x/cancel", None, "user", 403, "forbidden"),
    ("admin cancels", "POST", "/v1/deals/d_x/cancel", None, "admin", 403, "forbidden"),
    ("claim without token", "POST", "/v1/deals/d_x/claims", None, None, 401, "unauthenticated"),
    # -- routes
    ("unknown route", "GET", "/v2/nothing", None, None, 404, "not_found"),
    ("unknown deal", "GET", "/v1/deals/d_0000000000000000", None, None, 404, "deal_not_found"),
    ("deal id too long", "GET", "/v1/deals/" + "d" * 65, None, None, 404, "deal_not_found"),
    ("deal id odd characters", "GET", "/v1/deals/%F0%9F%92%A5", None, None, 404, "deal_not_found"),
    (
        "claim unknown deal",
        "POST",
        "/v1/deals/d_0000000000000000/claims",
        None,
        "user",
        404,
        "deal_not_found",
    ),
    (
        "cancel unknown deal",
        "POST",
        "/v1/deals/d_0000000000000000/cancel",
        None,
        "merchant",
        404,
        "deal_not_found",
    ),
    ("delete deals", "DELETE", "/v1/deals", None, None, 405, "method_not_allowed"),
    ("put claim", "PUT", "/v1/deals/d_x/claims", None, "user", 405, "method_not_allowed"),
    ("get claims", "GET", "/v1/deals/d_x/claims", None, "user", 405, "method_not_allowed"),
    ("post healthz", "POST", "/healthz", None, None, 405, "method_not_allowed"),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "token", "status", "code"),
    [pytest.param(*c[1:], id=c[0]) for c in CASES],
)
def test_bad_request_gets_its_status_and_a_json_error(
    api: RunningApi,
    client: httpx.Client,
    method: str,
    path: str,
    body: Any,
    token: Any,
    status: int,
    code: str,
) -> None:
    headers: dict[str, str] = {}
    if token in ("user", "merchant", "admin"):
        headers.update(api.auth(token, "m-1" if token == "merchant" else "u-1"))
    elif isinstance(token, str):
        headers["Authorization"] = token
    kwargs: dict[str, Any] = {"headers": headers}
    if isinstance(body, bytes):
        kwargs["content"] = body
        headers["Content-Type"] = "application/json"
    elif body is not None:
        kwargs["json"] = body
    r = client.request(method, path, **kwargs)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert err["code"] == code
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["details"], dict)
    assert "Traceback" not in r.text


def test_table_has_at_least_fifty_cases() -> None:
    assert len(CASES) >= 50


def test_unknown_fields_are_named(api: RunningApi, client: httpx.Client) -> None:
    r = client.post(
        "/v1/deals", json=deal(price=1, colour="red"), headers=api.auth("merchant", "m-1")
    )
    fields = r.json()["error"]["details"]["fields"]
    assert fields == {"price": "unknown field", "colour": "unknown field"}


def test_every_bad_field_is_named_at_once(api: RunningApi, client: httpx.Client) -> None:
    r = client.post(
        "/v1/deals", json=deal(title="", lat=99, inventory=0), headers=api.auth("merchant", "m-1")
    )
    assert r.status_code == 422
    assert set(r.json()["error"]["details"]["fields"]) == {"title", "lat", "inventory"}


def test_oversized_body_is_refused_before_it_is_read(api: RunningApi) -> None:
    """A declared Content-Length over 64 KiB gets 413 without the server reading the body."""
    import socket

    host, port = api.url.removeprefix("http://").split(":")
    token = api.token("merchant", "m-1")
    head = (
        "POST /v1/deals HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {token}\r\nContent-Length: 10000000\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(head.encode() + b"{")  # 1 byte of a declared 10 MB
        reply = ""
        while "payload_too_large" not in reply and "}}" not in reply:
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk.decode(errors="replace")
    assert reply.startswith("HTTP/1.1 413")
    assert "payload_too_large" in reply


def test_chunked_body_over_limit_is_refused(api: RunningApi, client: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"title": "'
        for _ in range(80):
            yield b"x" * 1024
        yield b'"}'

    r = client.post(
        "/v1/deals",
        content=chunks(),
        headers={**api.auth("merchant", "m-1"), "Content-Type": "application/json"},
    )
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "payload_too_large"


def test_405_names_every_method_of_the_path(client: httpx.Client) -> None:
    """GET and POST /v1/deals live in different area modules; Allow names both."""
    r = client.delete("/v1/deals")
    assert r.status_code == 405
    assert set(r.headers["Allow"].split(", ")) >= {"GET", "POST"}
    assert r.json()["error"]["details"]["allow"] == r.headers["Allow"]


def test_description_keeps_newlines_and_tabs(api: RunningApi, client: httpx.Client) -> None:
    r = client.post(
        "/v1/deals",
        json=deal(description="line 1\n\tline 2\r\n"),
        headers=api.auth("merchant", "m-1"),
    )
    assert r.status_code == 201
    assert r.json()["deal"]["description"] == "line 1\n\tline 2\r\n"
