"""/verifier/: the till's static files, served by the API, complete for offline use.

The page itself is exercised in Chromium by tests/till/.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import httpx

from api.till import TILL_DIR

ROOT = Path(__file__).resolve().parents[2]
TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".json": "application/json",
    ".svg": "image/svg+xml",
}


def _precached() -> list[str]:
    """The files the service worker keeps for offline use (its SHELL list)."""
    sw = (TILL_DIR / "sw.js").read_text()
    block = re.search(r"const SHELL = \[(.*?)\];", sw, re.S)
    assert block
    return re.findall(r'"\./([^"]*)"', block.group(1))


def test_the_till_is_public_static_files_at_verifier(client: httpx.Client) -> None:
    r = client.get("/verifier", follow_redirects=False)
    assert r.status_code in (307, 308) and r.headers["location"].endswith("/verifier/")
    page = client.get("/verifier/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for label in ("Merchant token", "Save", "Refresh keys", "Voucher", "Scan", "Sync", "Unsynced"):
        assert f">{label}<" in page.text or f">{label}\n" in page.text, label
    assert 'role="status"' in page.text
    for name in _precached():
        r = client.get(f"/verifier/{name}")
        assert r.status_code == 200, name
        suffix = Path(name or "index.html").suffix
        assert r.headers["content-type"].startswith(TYPES[suffix]), (name, r.headers)
        assert r.headers["cache-control"] == "no-cache"
        assert r.headers["x-content-type-options"] == "nosniff"


def test_a_missing_file_or_a_write_is_a_json_error(client: httpx.Client) -> None:
    r = client.get("/verifier/nope.js")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = client.get("/verifier/..%2Ftill.py")  # nothing outside the till's folder
    assert r.status_code == 404
    r = client.post("/verifier/app.js", content=b"x")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_the_service_worker_keeps_every_file_the_page_loads() -> None:
    """Offline, the page needs its modules, styles, manifest, icon and the QR reader."""
    shell = set(_precached())
    html = (TILL_DIR / "index.html").read_text()
    wanted = set(re.findall(r'(?:src|href)="([^"]+)"', html))
    for module in TILL_DIR.glob("*.js"):
        text = module.read_text()
        wanted |= set(re.findall(r'from "\./([^"]+)"', text))
        wanted |= set(re.findall(r'import\("\./([^"]+)"\)', text))
    wanted.discard("sw.js")  # the worker itself: the browser keeps it
    assert wanted <= shell, wanted - shell
    assert all((TILL_DIR / (name or "index.html")).is_file() for name in shell)
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), "no inline scripts (CSP)"


def test_the_manifest_makes_an_installable_app_for_this_scope() -> None:
    manifest = json.loads((TILL_DIR / "manifest.json").read_text())
    assert manifest["start_url"] == manifest["scope"] == "/verifier/"
    assert manifest["display"] == "standalone" and manifest["name"]
    assert all((TILL_DIR / icon["src"]).is_file() for icon in manifest["icons"])


def test_the_vendored_qr_reader_is_pinned_licensed_and_shipped() -> None:
    lock = json.loads((ROOT / "api/static/vendor-src/package-lock.json").read_text())
    jsqr = lock["packages"]["node_modules/jsqr"]
    assert jsqr["version"] == "1.4.0" and jsqr["integrity"].startswith("sha512-")
    assert "Apache License" in (TILL_DIR / "vendor/jsQR.LICENSE").read_text()
    # Every served file is package data, so an installed flashsale serves the till too.
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for path in TILL_DIR.rglob("*"):
        if path.is_file():
            package = path.parent.relative_to(ROOT).as_posix().replace("/", ".")
            assert package in setuptools["packages"], path
            assert setuptools["package-data"][package] == ["*"], path
