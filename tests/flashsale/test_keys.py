"""`flashsale keys rotate|revoke|list` against a running API and offline tills."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from engine.keyring import read_times
from tests.api.conftest import SECRET, RunningApi, api, client, make_api  # noqa: F401
from tests.api.test_vouchers_api import decode_qr
from tests.verifier.helpers import run
from tests.vouchers.helpers import auth, claim, create_deal, verify_with_jwks

PREPUBLISH = "5s"  # long enough to claim a voucher inside it on a busy machine


def keys_cli(api: RunningApi, *argv: str) -> str:  # noqa: F811
    """Run `flashsale keys ARGV...` on the API's data directory; its output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHSALE_")}
    env.update(
        FLASHSALE_DATA_DIR=str(api.settings.data_dir),
        FLASHSALE_AUTH_SECRET=SECRET,
        FLASHSALE_KEY_PREPUBLISH=PREPUBLISH,
    )
    proc = subprocess.run(
        [sys.executable, "-m", "flashsale", "keys", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def kid(token: str) -> str:
    return str(jwt.get_unverified_header(token)["kid"])


def ms(rfc3339: str) -> int:
    return int(datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp() * 1000)


def eventually(what: Callable[[], Any], seconds: float = 15) -> Any:
    """``what()`` once it is truthy (the API re-reads the keys every 2 s: within 10)."""
    deadline = time.monotonic() + seconds
    while not (value := what()):
        assert time.monotonic() < deadline, "not within the time allowed"
        time.sleep(0.25)
    return value


def test_rotation_and_revocation_that_offline_tills_survive(
    api: RunningApi,  # noqa: F811
    client: httpx.Client,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    merchant = api.token("merchant", "m-1")
    deal = create_deal(client, merchant)
    users = iter(range(1000))

    def new_voucher() -> dict[str, Any]:
        return claim(client, deal["id"], api.token("user", f"u-{next(users)}"))

    def jwks() -> set[str]:
        return {k["kid"] for k in client.get("/.well-known/jwks.json").json()["keys"]}

    def served(voucher: dict[str, Any]) -> str:
        r = client.get(f"/v1/vouchers/{voucher['id']}", headers=auth(merchant))
        assert r.status_code == 200, r.text
        return str(r.json()["voucher"]["token"])

    def check(till: Path, token: str) -> tuple[int, str]:
        return run(capsys, "check", token, "--merchant", "m-1", "--state", str(till))

    early, late, fresh = tmp_path / "early", tmp_path / "late", tmp_path / "fresh"
    assert run(capsys, "pull-keys", "--server", api.url, "--state", str(early))[0] == 0
    before, spare = new_voucher(), new_voucher()
    k1 = kid(before["token"])

    out = keys_cli(api, "rotate")
    k2 = out.split()[2].rstrip(":")
    signs_from = read_times(api.settings.signing_keys_dir, k2).signs_from_ms
    after = new_voucher()  # claimed inside the prepublication: the old key signs it
    assert ms(after["claimed_at"]) < signs_from, f"claimed after {PREPUBLISH}: machine too slow"
    assert kid(after["token"]) == k1
    eventually(lambda: k2 in jwks())  # published at once
    assert run(capsys, "pull-keys", "--server", api.url, "--state", str(late))[0] == 0
    for till in (early, late):  # keys pulled before the rotation, and during it
        for v in (before, after):
            code, said = check(till, v["token"])
            assert code == 0, said

    # After the prepublication, new vouchers carry the new key; old ones keep their own.
    def signed_by_k2() -> dict[str, Any] | None:
        v = new_voucher()
        return v if kid(v["token"]) == k2 else None

    newest = eventually(signed_by_k2)
    assert ms(newest["claimed_at"]) >= signs_from - 1000  # (hosts' clocks vs Redis's)
    assert check(late, newest["token"])[0] == 0  # the till that refreshed in time has it
    assert verify_with_jwks(client, newest["token"], "m-1")["jti"] == newest["id"]
    assert kid(served(before)) == kid(served(after)) == k1
    qr = client.get(f"/v1/vouchers/{spare['id']}/qr.png", headers=api.auth("user", "u-1"))
    assert kid(decode_qr(qr.content)) == k1
    states = {line.split()[0]: line.split()[1] for line in keys_cli(api, "list").splitlines()[1:]}
    assert states == {k1: "retired", k2: "current"}

    # Revoke the old key: withdrawn from the JWKS, its vouchers served re-signed.
    assert "revoked" in keys_cli(api, "revoke", k1)
    eventually(lambda: k1 not in jwks())
    resigned = served(spare)
    assert kid(resigned) == k2
    assert verify_with_jwks(client, resigned, "m-1")["jti"] == spare["id"]
    qr = client.get(f"/v1/vouchers/{spare['id']}/qr.png", headers=api.auth("user", "u-1"))
    assert kid(decode_qr(qr.content)) == k2
    assert run(capsys, "pull-keys", "--server", api.url, "--state", str(fresh))[0] == 0
    assert check(fresh, resigned)[0] == 0
    r = client.post("/v1/redemptions", json={"token": served(before)}, headers=auth(merchant))
    assert r.status_code == 200, r.text
    # A token the revoked key signed is refused online, at the till's redemption and sync.
    r = client.post("/v1/redemptions", json={"token": after["token"]}, headers=auth(merchant))
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_voucher", r.text
    entry = {"entry_id": "e-1", "token": after["token"], "redeemed_at": after["claimed_at"]}
    r = client.post(
        "/v1/redemptions/sync", json={"device_id": "t", "entries": [entry]}, headers=auth(merchant)
    )
    assert r.json()["results"][0]["code"] == "invalid_voucher", r.text
    listed = keys_cli(api, "list").splitlines()
    assert {line.split()[0]: line.split()[1] for line in listed[1:]} == {
        k1: "revoked",
        k2: "current",
    }


def test_revoking_the_key_that_signs_now_makes_one_that_signs_at_once(
    api: RunningApi,  # noqa: F811
    client: httpx.Client,  # noqa: F811
) -> None:
    merchant = api.token("merchant", "m-1")
    deal = create_deal(client, merchant)
    voucher = claim(client, deal["id"], api.token("user", "u-1"))
    k1 = kid(voucher["token"])
    out = keys_cli(api, "revoke", k1)
    k2 = out.split("new key ")[1].split()[0]
    assert "signs at once" in out and k2 != k1

    def resigned() -> str | None:
        r = client.get(f"/v1/vouchers/{voucher['id']}", headers=auth(merchant))
        token = str(r.json()["voucher"]["token"])
        return token if kid(token) == k2 else None

    token = eventually(resigned)
    assert verify_with_jwks(client, token, "m-1")["jti"] == voucher["id"]
    assert kid(claim(client, deal["id"], api.token("user", "u-2"))["token"]) == k2
    proc = subprocess.run(
        [sys.executable, "-m", "flashsale", "keys", "revoke", "k-nope"],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            **os.environ,
            "FLASHSALE_DATA_DIR": str(api.settings.data_dir),
            "FLASHSALE_AUTH_SECRET": SECRET,
        },
    )
    assert proc.returncode == 2 and "no key" in proc.stderr
