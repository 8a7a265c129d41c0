"""The OpenAPI document matches the running app: its routes, and every answer fuzzing gets."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.routing import Mount, Route

from api.app import AREAS
from tests.api.conftest import RunningApi
from tests.vouchers.helpers import FUTURE_DEAL, claim, create_deal


def _app_routes() -> set[tuple[str, str]]:
    out = set()
    for module in AREAS:
        for route in module.routes:
            if isinstance(route, Mount):
                continue  # static files (the till at /verifier/): a web page, not an operation
            assert isinstance(route, Route)
            for method in route.methods or ():
                if method != "HEAD":
                    out.add((re.sub(r"\{(\w+)(:\w+)?\}", r"{\1}", route.path), method.lower()))
    return out


def test_document_lists_exactly_the_routes_served(client: httpx.Client) -> None:
    doc = client.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    documented = {(path, m) for path, ops in doc["paths"].items() for m in ops}
    assert documented == _app_routes()


def test_every_reference_resolves(client: httpx.Client) -> None:
    text = client.get("/openapi.json").text
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    for ref in set(re.findall(r'"\$ref":"#/components/schemas/(\w+)"', text)):
        assert ref in schemas


# -- the document's bounds are the ones the validators enforce ----------------------
# Each bound is read from the served document, then tried on the running API: a value at
# the bound is taken, one just past it is a 422 naming the field.


def _refused(r: httpx.Response) -> set[str]:
    """The fields a 422 invalid_request names (none for any other answer)."""
    if r.status_code != 422 or r.json()["error"]["code"] != "invalid_request":
        return set()
    return set(r.json()["error"]["details"]["fields"])


def _past(bound: float, low: bool) -> float:
    return math.nextafter(bound, -math.inf if low else math.inf)


def test_the_new_deal_bounds_in_the_document_are_the_ones_enforced(
    api: RunningApi, client: httpx.Client
) -> None:
    schema = client.get("/openapi.json").json()["components"]["schemas"]["NewDeal"]
    props = schema["properties"]
    ends = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    headers = api.auth("merchant", "m-1")

    def refused(field: str, value: Any) -> bool:
        body = {**FUTURE_DEAL, "ends_at": ends, field: value}
        r = client.post("/v1/deals", json=body, headers=headers)
        assert r.status_code in (201, 422), r.text
        return field in _refused(r)

    for field in ("title", "description"):
        n = props[field]["maxLength"]
        assert not refused(field, "x" * n) and refused(field, "x" * (n + 1)), field
    assert props["title"]["minLength"] == 1 and refused("title", "")
    for field in ("lat", "lng", "inventory"):
        for key, low in (("minimum", True), ("maximum", False)):
            bound = props[field][key]
            past = bound + (-1 if low else 1) if field == "inventory" else _past(bound, low)
            assert not refused(field, bound) and refused(field, past), (field, key)


def _query_refused(
    client: httpx.Client, path: str, headers: dict[str, str], params: dict[str, str]
) -> set[str]:
    r = client.get(path, params=params, headers=headers)
    assert r.status_code in (200, 422), r.text
    return _refused(r)


@pytest.mark.parametrize(
    ("path", "role", "base"),
    [("/v1/deals", None, {"lat": "12.97", "lng": "77.59"}), ("/v1/me/vouchers", "user", {})],
)
def test_the_query_bounds_in_the_document_are_the_ones_enforced(
    api: RunningApi, client: httpx.Client, path: str, role: str | None, base: dict[str, str]
) -> None:
    operation = client.get("/openapi.json").json()["paths"][path]["get"]
    headers = api.auth(role, "u-1") if role else {}

    def refused(name: str, value: object) -> bool:
        return name in _query_refused(client, path, headers, {**base, name: str(value)})

    for p in operation["parameters"]:
        name, schema = p["name"], p["schema"]
        if schema["type"] == "string":  # an opaque cursor: only its length is a bound
            assert refused(name, "c" * (schema["maxLength"] + 1)), name
            continue
        low, high = schema["minimum"], schema["maximum"]
        if schema["type"] == "integer":
            below, above = low - 1, high + 1
        else:
            below, above = _past(low, True), _past(high, False)
        if schema.get("exclusiveMinimum"):
            assert refused(name, low) and not refused(name, _past(low, False)), name
        else:
            assert not refused(name, low) and refused(name, below), name
        assert not refused(name, high) and refused(name, above), name


def test_the_redemption_bounds_in_the_document_are_the_ones_enforced(
    api: RunningApi, client: httpx.Client
) -> None:
    doc = client.get("/openapi.json").json()
    headers = api.auth("merchant", "m-1")
    token = doc["paths"]["/v1/redemptions"]["post"]["requestBody"]["content"]
    n = token["application/json"]["schema"]["properties"]["token"]["maxLength"]
    at = client.post("/v1/redemptions", json={"token": "t" * n}, headers=headers)
    assert at.status_code == 422 and at.json()["error"]["code"] == "invalid_voucher", at.text
    past = client.post("/v1/redemptions", json={"token": "t" * (n + 1)}, headers=headers)
    assert _refused(past) == {"token"}, past.text

    sync = doc["components"]["schemas"]["SyncRequest"]["properties"]
    entry = {"entry_id": "e", "token": "t", "redeemed_at": "2026-01-01T00:00:00Z"}
    most, longest = sync["entries"]["maxItems"], sync["device_id"]["maxLength"]
    for device, count, refused in (
        ("d" * longest, most, set()),
        ("d" * longest, most + 1, {"entries"}),
        ("d" * (longest + 1), 1, {"device_id"}),
    ):
        body = {"device_id": device, "entries": [entry] * count}
        r = client.post("/v1/redemptions/sync", json=body, headers=headers)
        assert _refused(r) == refused and r.status_code == (422 if refused else 200), r.text
    assert str(most) in doc["paths"]["/v1/redemptions/sync"]["post"]["summary"]


def test_the_body_limits_in_the_document_are_the_ones_enforced(
    api: RunningApi, client: httpx.Client
) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    with_limit = {
        p: ops["post"]
        for p, ops in paths.items()
        if "413" in ops.get("post", {}).get("responses", {})
    }
    assert set(with_limit) == {"/v1/deals", "/v1/redemptions", "/v1/redemptions/sync"}
    for path, op in with_limit.items():
        size = op["responses"]["413"]["description"].removeprefix("Body over ")
        number, unit = size.split()
        limit = int(number) * {"KiB": 1024, "MiB": 1024 * 1024}[unit]
        headers = {**api.auth("merchant", "m-1"), "Content-Type": "application/json"}
        r = client.post(path, content=b" " * (limit + 1), headers=headers)
        assert r.status_code == 413, r.text
        error = r.json()["error"]
        assert error["message"] == f"The request body is over {size}."
        assert error["details"] == {"limit_bytes": limit}


# What schemathesis holds every answer to (not only "no 5xx"): a documented status, a
# documented content type, a body and headers that match the document.
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
)
USER_PATHS = r"^/v1/(me/vouchers|vouchers/.*|deals/\{deal_id\}/claims)$"


def _config(api: RunningApi, client: httpx.Client) -> str:
    """schemathesis.toml: each operation asked with the role it serves, and real ids,
    tokens and times offered half the time, so that generated requests reach the
    answers that carry data (a deal, a voucher, a redemption), not only 404 and 422."""
    merchant, user = api.token("merchant", "m-1"), api.token("user", "u-1")
    deal = create_deal(client, merchant)
    voucher = claim(client, deal["id"], user)
    now = datetime.now(UTC)
    values = {
        "deal": deal["id"],
        "voucher": voucher["id"],
        "token": voucher["token"],
        "starts": (now + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "ends": (now + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%S.5+05:30"),
        "redeem": (now + timedelta(days=3)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "now": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    bindings = {
        "path.deal_id": "deal",
        "path.voucher_id": "voucher",
        "body.token": "token",
        "body.entries[*].token": "token",
        "body.entries[*].redeemed_at": "now",
        "body.starts_at": "starts",
        "body.ends_at": "ends",
        "body.redeem_until": "redeem",
    }
    lines = [f'headers = {{ Authorization = "Bearer {merchant}" }}']
    lines += ["[warnings]", 'fail-on = ["missing_auth", "missing_test_data"]']
    for name, value in values.items():
        lines += [f"[dictionaries.{name}]", f'values = ["{value}"]']
    lines.append("[parameters]")
    lines += [f'"{k}" = {{ dictionary = "{v}", probability = 0.5 }}' for k, v in bindings.items()]
    lines += [
        "[[operations]]",
        f"include-path-regex = '{USER_PATHS}'",
        f'headers = {{ Authorization = "Bearer {user}" }}',
    ]
    return "\n".join(lines) + "\n"


def test_the_running_app_answers_as_its_document_says(
    api: RunningApi, client: httpx.Client, tmp_path: Path
) -> None:
    """schemathesis generates requests from /openapi.json and checks every answer against
    the document: status code, content type, body schema and headers; never a 5xx."""
    exe = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert exe, "schemathesis is a dev dependency (pip install -e '.[dev]')"
    (tmp_path / "schemathesis.toml").write_text(_config(api, client))
    proc = subprocess.run(
        [
            exe,
            "run",
            f"{api.url}/openapi.json",
            "--checks",
            ",".join(CHECKS),
            "--phases",
            "examples,fuzzing",  # coverage trips a hypothesis bug on 3.11
            "--max-examples",
            "40",
            "--max-time",
            "45",
            "--workers",
            "2",
            "--report-dir",
            str(tmp_path),
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=110,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-2000:]
    ran = re.search(r"(\d+) generated, (\d+) passed", proc.stdout)
    assert ran, proc.stdout[-3000:]
    assert int(ran.group(1)) == int(ran.group(2)) >= 200


def test_every_limited_route_documents_429_and_every_body_408(client: httpx.Client) -> None:
    """Rate limits reach every route but health and metrics; the body deadline every body."""
    doc = client.get("/openapi.json").json()
    unlimited = {"/healthz", "/readyz", "/metrics"}
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            if path not in unlimited:
                assert "Retry-After" in op["responses"]["429"]["headers"], (method, path)
            if "requestBody" in op:
                assert "408" in op["responses"], (method, path)
