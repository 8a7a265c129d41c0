"""Claims dispatched by api/fastpath.py answer exactly as the router would have them."""

from __future__ import annotations

import httpx
import pytest

from tests.api.conftest import RunningApi


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/v1/deals/a/b/claims", 404, "not_found"),
        ("/v1/deals//claims", 404, "not_found"),
        ("/v1/deals/claims", 405, "method_not_allowed"),  # GET /v1/deals/{deal_id}
    ],
)
def test_paths_that_only_look_like_a_claim_are_routed_as_before(
    api: RunningApi, client: httpx.Client, path: str, status: int, code: str
) -> None:
    r = client.post(path, headers=api.auth("user", "u-1"))
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code


def test_a_refused_claim_has_the_same_answer_as_any_other_error(
    api: RunningApi, client: httpx.Client
) -> None:
    """JSON body, content type and length as error_response builds them; counted by route."""
    r = client.post("/v1/deals/d_missing/claims", headers=api.auth("user", "u-1"))
    assert r.status_code == 404
    assert r.headers["content-type"] == "application/json"
    assert int(r.headers["content-length"]) == len(r.content)
    assert r.json() == {
        "error": {
            "code": "deal_not_found",
            "message": "No such deal.",
            "details": {"deal_id": "d_missing"},
        }
    }
    unauthenticated = client.post("/v1/deals/d_missing/claims")
    assert unauthenticated.status_code == 401
    assert unauthenticated.json()["error"]["code"] == "unauthenticated"
    text = client.get("/metrics").text
    line = next(
        x
        for x in text.splitlines()
        if x.startswith("flashsale_http_requests_total{")
        and 'route="/v1/deals/{deal_id}/claims"' in x
        and 'status="404"' in x
    )
    assert float(line.rsplit(" ", 1)[1]) == 1.0


def _count(text: str, route: str, method: str, status: int) -> float:
    for x in text.splitlines():
        if (
            x.startswith("flashsale_http_requests_total{")
            and f'route="{route}"' in x
            and f'method="{method}"' in x
            and f'status="{status}"' in x
        ):
            return float(x.rsplit(" ", 1)[1])
    return 0.0


def test_discovery_past_the_router_answers_and_counts_as_routed(
    client: httpx.Client,
) -> None:
    """GET /v1/deals (fast path) and HEAD (the router) answer alike; both counted by route."""
    query = "/v1/deals?lat=12.9716&lng=77.5946"
    got = client.get(query)
    assert got.status_code == 200
    assert got.content == b'{"deals":[],"count":0}'
    assert got.headers["content-type"] == "application/json"
    assert int(got.headers["content-length"]) == len(got.content)
    head = client.head(query)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-type"] == "application/json"
    assert head.headers["content-length"] == got.headers["content-length"]
    bad = client.get("/v1/deals?lat=91")
    assert bad.status_code == 422
    assert bad.json()["error"]["details"]["fields"] == {
        "lat": "must be a number in [-85.05112878, 85.05112878]",
        "lng": "required",
    }
    assert int(bad.headers["content-length"]) == len(bad.content)
    text = client.get("/metrics").text
    assert _count(text, "/v1/deals", "GET", 200) == 1.0
    assert _count(text, "/v1/deals", "HEAD", 200) == 1.0
    assert _count(text, "/v1/deals", "GET", 422) == 1.0
