"""The API starts on a real socket and answers its basic routes."""

from __future__ import annotations

import httpx

from tests.api.conftest import RunningApi


def test_healthz_answers_ok_while_the_process_is_up(client: httpx.Client) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_create_read_claim_round_trip(api: RunningApi, client: httpx.Client) -> None:
    body = {
        "title": "espresso",
        "lat": 12.97,
        "lng": 77.59,
        "inventory": 2,
        "ends_at": "2099-01-01T00:00:00Z",
        "starts_at": "2098-12-31T00:00:00Z",
    }
    r = client.post("/v1/deals", json=body, headers=api.auth("merchant", "m-1"))
    assert r.status_code == 201, r.text
    deal = r.json()["deal"]
    assert deal["status"] == "scheduled" and deal["merchant_id"] == "m-1"
    assert client.get(f"/v1/deals/{deal['id']}").json()["deal"]["id"] == deal["id"]
    r = client.post(f"/v1/deals/{deal['id']}/claims", headers=api.auth("user", "u-1"))
    assert r.status_code == 409 and r.json()["error"]["code"] == "not_started"
