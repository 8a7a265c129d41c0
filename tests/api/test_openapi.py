"""The OpenAPI document matches the running app: its routes, and every answer fuzzing gets."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from starlette.routing import Mount, Route

from api.app import _area_modules
from tests.api.conftest import RunningApi
from tests.vouchers.helpers import claim, create_deal


def _app_routes() -> set[tuple[str, str]]:
    out = set()
    for module in _area_modules():
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
            exe, "run", f"{api.url}/openapi.json",
            "--checks", ",".join(CHECKS),
            "--phases", "examples,fuzzing",  # coverage trips a hypothesis bug on 3.11
            "--max-examples", "40",
            "--max-time", "45",
            "--workers", "2",
            "--report-dir", str(tmp_path),
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=110,
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-2000:]
    ran = re.search(r"(\d+) generated, (\d+) passed", proc.stdout)
    assert ran, proc.stdout[-3000:]
    assert int(ran.group(1)) == int(ran.group(2)) >= 200
