"""The OpenAPI document matches the running app, and fuzzing it finds no 5xx."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from starlette.routing import Mount, Route

from api.app import _area_modules
from tests.api.conftest import RunningApi


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


@pytest.mark.parametrize("role", ["merchant", "user"])
def test_fuzzing_the_api_from_its_own_document_finds_no_server_error(
    api: RunningApi, role: str, tmp_path: Path
) -> None:
    """schemathesis generates requests from /openapi.json; none may answer 5xx."""
    exe = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert exe, "schemathesis is a dev dependency (pip install -e '.[dev]')"
    token = api.token(role, "m-1" if role == "merchant" else "u-1")
    proc = subprocess.run(
        [
            exe, "run", f"{api.url}/openapi.json",
            "--checks", "not_a_server_error",
            "--phases", "examples,fuzzing",  # coverage trips a hypothesis bug on 3.11
            "--max-examples", "25",
            "--max-time", "30",
            "--workers", "2",
            "-H", f"Authorization: Bearer {token}",
            "--report-dir", str(tmp_path),
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=110,
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    ran = re.search(r"(\d+) generated, (\d+) passed", proc.stdout)
    assert ran, proc.stdout[-3000:]
    assert int(ran.group(1)) == int(ran.group(2)) >= 100
