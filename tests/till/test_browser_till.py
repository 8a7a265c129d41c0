"""The till at /verifier/ in Debian's Chromium: offline checks, Sync, two tills, the camera."""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from playwright.sync_api import BrowserContext, Page, Playwright, expect, sync_playwright

from tests.api.conftest import RunningApi
from tests.till.conftest import CHROMIUM, CHROMIUM_ARGS, ApiProcess
from tests.till.y4m import png_to_y4m
from tests.vouchers.forge import b64, forgeries, public_pem, resign, unb64
from tests.vouchers.helpers import auth, claim, create_deal, server_key

# Where a run leaves the phone-sized screenshot (docs/till.png is a copy of one).
SCREENSHOT = Path(__file__).resolve().parents[2] / "build" / "till-phone.png"
PHONE = {"width": 390, "height": 844}


@pytest.fixture
def pw(chromium: Path) -> Iterator[Playwright]:
    expect.set_options(timeout=10_000)
    with sync_playwright() as p:
        yield p


def launch_till(pw: Playwright, profile: Path, **options: Any) -> BrowserContext:
    """A till: Chromium with a profile of its own (kept across a browser restart)."""
    context = pw.chromium.launch_persistent_context(
        profile,
        executable_path=str(CHROMIUM),
        args=CHROMIUM_ARGS,
        headless=True,
        **options,
    )
    context.set_default_timeout(15_000)
    return context


def open_till(context: BrowserContext, url: str) -> Page:
    page = context.pages[0] if context.pages else context.new_page()
    page.goto(f"{url}/verifier/")
    expect(page.locator("body[data-ready]")).to_have_count(1)
    return page


def set_up(page: Page, merchant_token: str, merchant_id: str) -> None:
    """Online, once per till: save the merchant token, refresh keys (through the worker)."""
    expect(page.locator("#network")).to_contain_text("Works offline")
    page.get_by_label("Merchant token").fill(merchant_token)
    page.get_by_role("button", name="Save").click()
    expect(page.locator("#merchant")).to_contain_text(f"Merchant: {merchant_id}")
    page.get_by_role("button", name="Refresh keys").click()
    expect(page.locator("#keys")).to_contain_text(re.compile(r"Keys: \d+, refreshed"))


def check(page: Page, token: str, outcome: str) -> None:
    """Type (or wedge-scan) a token into Voucher, press Enter; the status must match."""
    result = page.locator("#result")
    before = int(result.get_attribute("data-checks") or 0)
    field = page.get_by_label("Voucher", exact=True)
    field.fill(token)
    field.press("Enter")
    expect(result).to_have_attribute("data-checks", str(before + 1))
    expect(field).to_have_value("")
    expect(page.get_by_role("status")).to_have_text(re.compile("^" + re.escape(outcome)))


def der(token: str) -> str:
    """The same signature, DER-encoded (what a careless signer emits): not ES256."""
    h, p, s = token.split(".")
    raw = unb64(s)
    r, ss = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
    return f"{h}.{p}.{b64(encode_dss_signature(r, ss))}"


def test_offline_till_checks_survives_reload_and_restart_then_syncs(
    pw: Playwright, api_process: ApiProcess, tmp_path: Path
) -> None:
    """Set up online; API stopped: reload, restart, every check; API back: Sync, conflict."""
    api = api_process
    merchant = api.token("merchant", "m-1")
    with httpx.Client(base_url=api.url, timeout=10) as client:
        deal = create_deal(client, merchant)
        good, second, later = (
            claim(client, deal["id"], api.token("user", f"u-{i}")) for i in range(3)
        )
        other_deal = create_deal(client, api.token("merchant", "m-2"))
        others = claim(client, other_deal["id"], api.token("user", "u-9"))
    key = server_key(api.keys_dir)
    table = forgeries(good["token"], public_pem(key), key, merchant)

    till_a = launch_till(pw, tmp_path / "till-a")
    page = open_till(till_a, api.url)
    set_up(page, merchant, "m-1")
    till_b = launch_till(pw, tmp_path / "till-b")
    page_b = open_till(till_b, api.url)
    set_up(page_b, merchant, "m-1")

    api.stop()  # offline from here: nothing listens on the page's origin
    page.reload()
    expect(page.locator("#merchant")).to_contain_text("Merchant: m-1")
    till_a.close()  # and a browser restart
    till_a = launch_till(pw, tmp_path / "till-a")
    page = open_till(till_a, api.url)
    # Its start-up refresh found no server: it says so and keeps the keys it has; the
    # service worker kept the last JWKS too.
    expect(page.locator("#keys")).to_contain_text(re.compile(r"Keys: \d+, refreshed .*Offline"))
    kept = "caches.open('till-keys-v1').then(c => c.match('/.well-known/jwks.json'))"
    assert page.evaluate(f"{kept}.then(r => r.json()).then(d => d.keys.length)") >= 1
    expect(page.get_by_label("Unsynced")).to_have_value("0")

    check(page, good["token"], "Accepted")
    check(page, good["token"], "Already redeemed")
    check(page, f"  {second['token']}\n", "Accepted")
    check(page, table["tampered payload"](), "Refused: bad signature")
    check(page, der(good["token"]), "Refused: bad signature")
    check(page, others["token"], "Refused: another merchant's")
    check(page, resign(later["token"], key, exp=int(time.time()) - 5), "Refused: expired")
    check(page, table["unknown kid"](), "Refused: unknown key")
    check(page, "not-a-voucher", "Refused: malformed")
    expect(page.get_by_label("Unsynced")).to_have_value("2")
    # The other till has not heard of it: it accepts the same voucher offline.
    check(page_b, good["token"], "Accepted")

    api.start()
    uploads: list[str] = []
    page.on("request", lambda r: uploads.append(r.url) if "/sync" in r.url else None)
    page.get_by_role("button", name="Sync").click()
    expect(page.locator("#sync-result")).to_have_text(
        "Synced: 2 accepted, 0 duplicate, 0 conflict, 0 rejected"
    )
    expect(page.get_by_label("Unsynced")).to_have_value("0")
    assert len(uploads) == 1
    with httpx.Client(base_url=api.url, timeout=10) as client:
        r = client.post("/v1/redemptions", json={"token": good["token"]}, headers=auth(merchant))
        assert r.status_code == 409 and r.json()["error"]["code"] == "already_redeemed", r.text
        r = client.get(f"/v1/vouchers/{second['id']}", headers=auth(merchant))
        assert r.json()["status"] == "redeemed"
    page.get_by_role("button", name="Sync").click()
    expect(page.locator("#sync-result")).to_have_text(
        "Synced: 0 accepted, 0 duplicate, 0 conflict, 0 rejected (nothing to upload)"
    )
    assert len(uploads) == 1  # the second Sync sent nothing

    page_b.get_by_role("button", name="Sync").click()
    expect(page_b.locator("#sync-result")).to_have_text(
        "Synced: 0 accepted, 0 duplicate, 1 conflict, 0 rejected"
    )
    expect(page_b.locator("#sync-details")).to_contain_text(f"conflict: voucher {good['id']}")
    till_a.close()
    till_b.close()


def test_scan_reads_the_vouchers_qr_code_from_the_camera(
    pw: Playwright, api: RunningApi, client: httpx.Client, tmp_path: Path
) -> None:
    """The QR PNG as a fake camera; Scan reads it and checks it. Leaves a phone screenshot."""
    merchant = api.token("merchant", "m-1")
    deal = create_deal(client, merchant)
    voucher = claim(client, deal["id"], api.token("user", "u-1"))
    png = client.get(f"/v1/vouchers/{voucher['id']}/qr.png", headers=api.auth("user", "u-1"))
    assert png.status_code == 200
    video = tmp_path / "qr.y4m"
    png_to_y4m(png.content, video)

    browser = pw.chromium.launch(
        executable_path=str(CHROMIUM),
        headless=True,
        args=[
            *CHROMIUM_ARGS,
            "--use-fake-device-for-media-stream",
            "--use-fake-ui-for-media-stream",
            f"--use-file-for-fake-video-capture={video}",
        ],
    )
    try:
        context = browser.new_context(
            viewport=PHONE,
            device_scale_factor=2,
            is_mobile=True,
            has_touch=True,
            permissions=["camera"],
        )
        context.set_default_timeout(15_000)
        page = open_till(context, api.url)
        set_up(page, merchant, "m-1")
        page.get_by_role("button", name="Scan").click()
        expect(page.get_by_role("status")).to_have_text(
            re.compile(f"^Accepted: voucher {re.escape(voucher['id'])}"), timeout=20_000
        )
        expect(page.locator("#camera")).to_be_hidden()
        decoder = page.locator("#camera").get_attribute("data-decoder")
        assert decoder in ("jsQR", "BarcodeDetector")

        key = server_key(api.settings.signing_keys_dir)
        check(page, resign(voucher["token"], key, aud="m-2"), "Refused: another merchant's")
        page.evaluate("window.scrollTo(0, 0)")
        shot = tmp_path / "till-phone.png"
        page.screenshot(path=str(shot))
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)
        context.close()
    finally:
        browser.close()


def test_the_feed_teaches_the_till_what_other_tills_redeemed(
    pw: Playwright, api: RunningApi, client: httpx.Client, tmp_path: Path
) -> None:
    """Till A redeems (synced offline, then online); the browser till, reading GET
    /v1/redemptions when it saves its token and on every Sync, refuses those vouchers."""
    merchant = api.token("merchant", "m-1")
    deal = create_deal(client, merchant)
    first, second = (claim(client, deal["id"], api.token("user", f"u-{i}")) for i in (1, 2))
    entry = {"entry_id": "a-1", "token": first["token"], "redeemed_at": first["claimed_at"]}
    body = {"device_id": "till-other", "entries": [entry]}
    r = client.post("/v1/redemptions/sync", json=body, headers=auth(merchant))
    assert r.json()["results"][0]["status"] == "accepted", r.text
    reads: list[str] = []

    till = launch_till(pw, tmp_path / "till")
    try:
        page = open_till(till, api.url)

        def feed_read(request: Any) -> None:
            if "/v1/redemptions?" in request.url:
                reads.append(request.url)

        page.on("request", feed_read)
        page.get_by_label("Merchant token").fill(api.token("user", "u-1"))
        page.get_by_role("button", name="Save").click()
        expect(page.locator("#merchant")).to_contain_text("Not saved: this is a user's token")
        set_up(page, merchant, "m-1")  # saving the token reads the feed
        expect(page.locator("#feed")).to_contain_text("up to date")
        check(page, first["token"], "Already redeemed on another till (till-other)")
        expect(page.get_by_label("Unsynced")).to_have_value("0")
        # Till A redeems the second voucher online; this till learns it on its next Sync.
        r = client.post("/v1/redemptions", json={"token": second["token"]}, headers=auth(merchant))
        assert r.status_code == 200, r.text
        # The read on Save also said "(1 new)": clear it, so that the text below can only
        # come from the read this Sync makes, once what it learned is stored.
        page.locator("#feed").evaluate("el => { el.textContent = ''; }")
        page.get_by_role("button", name="Sync").click()
        expect(page.locator("#sync-result")).to_contain_text("nothing to upload")
        expect(page.locator("#feed")).to_contain_text("(1 new)")
        check(page, second["token"], "Already redeemed on another till at")
        page.get_by_role("button", name="Sync").click()
        expect(page.locator("#feed")).to_contain_text("(0 new)")
        assert all("limit=1000" in url for url in reads) and len(reads) >= 3
        assert "after=" not in reads[0] and all("after=" in url for url in reads[1:])
    finally:
        till.close()
