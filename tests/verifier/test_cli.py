"""`flashsale verifier`: offline checks with cached keys, a SQLite log, and sync."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.auth import mint
from engine.vouchers import rotate_key
from flashsale.embedded import free_port
from tests.api.conftest import RunningApi
from tests.verifier.helpers import counts, run
from tests.vouchers.forge import forgeries, high_s, public_pem, resign
from tests.vouchers.helpers import auth, claim, create_deal, server_key
from verifier.cli import STATUSES
from verifier.state import State


def test_check_accepts_once_and_refuses_every_forgery_offline(
    api: RunningApi,
    vouchers: list[dict[str, Any]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    state = str(tmp_path / "till")
    token = vouchers[0]["token"]
    code, out = run(capsys, "check", token, "--merchant", "m-1", "--state", state)
    assert code == 2 and "pull-keys" in out  # no cached keys yet
    code, out = run(capsys, "pull-keys", "--server", api.url, "--state", state)
    assert code == 0 and "cached 1 key" in out
    api.server.should_exit = True  # offline from here on
    time.sleep(0.3)

    key = server_key(api.settings.signing_keys_dir)
    table = forgeries(token, public_pem(key), key, api.token("merchant", "m-1"))
    for name, forge in table.items():
        code, out = run(capsys, "check", forge(), "--merchant", "m-1", "--state", state)
        assert code == 1 and out.startswith("rejected:"), (name, out)
    reasons = {
        "another merchant's": (token, "m-2"),
        "expired": (resign(token, key, exp=int(time.time()) - 5), "m-1"),
        "bad signature": (table["tampered payload"](), "m-1"),
        "unknown key": (table["unknown kid"](), "m-1"),
    }
    for reason, (forged, merchant) in reasons.items():
        code, out = run(capsys, "check", forged, "--merchant", merchant, "--state", state)
        assert code == 1 and reason in out, (reason, out)

    code, out = run(capsys, "check", f" {token}\n", "--merchant", "m-1", "--state", state)
    assert code == 0 and out.startswith("accepted"), out
    # The same voucher again, even re-encoded: already redeemed here.
    for again in (token, high_s(token)):
        code, out = run(capsys, "check", again, "--merchant", "m-1", "--state", state)
        assert code == 1 and "already redeemed here" in out
    code, out = run(capsys, "check", "--state", state)
    assert code == 2


def test_sync_uploads_once_and_two_tills_give_one_conflict(
    api: RunningApi,
    client: httpx.Client,
    vouchers: list[dict[str, Any]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    till_a, till_b = str(tmp_path / "a"), str(tmp_path / "b")
    merchant = api.token("merchant", "m-1")
    for till in (till_a, till_b):
        assert run(capsys, "pull-keys", "--server", api.url, "--state", till)[0] == 0
    for v in vouchers[:2]:
        assert run(capsys, "check", v["token"], "--merchant", "m-1", "--state", till_a)[0] == 0
    assert (
        run(capsys, "check", vouchers[0]["token"], "--merchant", "m-1", "--state", till_b)[0] == 0
    )

    code, out = run(capsys, "sync", "--server", api.url, "--token", merchant, "--state", till_a)
    assert code == 0 and "accepted: 2" in out and "conflict: 0" in out, out
    code, out = run(capsys, "sync", "--server", api.url, "--token", merchant, "--state", till_b)
    assert code == 0 and "conflict: 1" in out and "accepted: 0" in out, out
    # Safely re-runnable: nothing left to upload.
    code, out = run(capsys, "sync", "--server", api.url, "--token", merchant, "--state", till_a)
    assert code == 0 and "accepted: 0" in out
    r = client.get(f"/v1/vouchers/{vouchers[0]['id']}", headers=api.auth("merchant", "m-1"))
    assert r.json()["status"] == "redeemed"

    assert (
        run(capsys, "check", vouchers[2]["token"], "--merchant", "m-1", "--state", till_b)[0] == 0
    )
    # A token whose merchant the till can read but the server refuses: 401, nothing marked.
    forged = mint("not-the-server-secret-" + "y" * 32, "m-1", "merchant")
    code, out = run(capsys, "sync", "--server", api.url, "--token", forged, "--state", till_b)
    assert code == 1 and "401" in out
    # One that names no merchant at all is not sent anywhere.
    code, out = run(capsys, "sync", "--server", api.url, "--token", "nope", "--state", till_b)
    assert code == 2 and "names no merchant" in out
    dead = f"http://127.0.0.1:{free_port()}"
    code, _ = run(capsys, "sync", "--server", dead, "--token", merchant, "--state", till_b)
    assert code == 3
    assert run(capsys, "pull-keys", "--server", dead, "--state", till_b)[0] == 3
    # What failed to upload is still there for the next sync.
    code, out = run(capsys, "sync", "--server", api.url, "--token", merchant, "--state", till_b)
    assert code == 0 and "accepted: 1" in out


def test_a_state_shared_by_two_merchants_syncs_each_only_its_own_entries(
    api: RunningApi,
    client: httpx.Client,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Each sync uploads the entries of its token's merchant; the other's wait for theirs."""
    state = str(tmp_path / "till")
    merchants = ("m-a", "m-b")
    tokens = {m: api.token("merchant", m) for m in merchants}
    vouchers: dict[str, list[dict[str, Any]]] = {}
    for m in merchants:
        deal = create_deal(client, tokens[m])
        vouchers[m] = [claim(client, deal["id"], api.token("user", f"u-{m}-{i}")) for i in range(2)]
    assert run(capsys, "pull-keys", "--server", api.url, "--state", state)[0] == 0
    for i in range(2):  # interleaved, as two merchants sharing a counter would scan
        for m in merchants:
            code, out = run(
                capsys, "check", vouchers[m][i]["token"], "--merchant", m, "--state", state
            )
            assert code == 0, out

    def sync(m: str) -> dict[str, int]:
        code, out = run(capsys, "sync", "--server", api.url, "--token", tokens[m], "--state", state)
        assert code == 0, out
        return counts(out)

    def status_on_server(m: str, voucher: dict[str, Any]) -> str:
        r = client.get(f"/v1/vouchers/{voucher['id']}", headers=auth(tokens[m]))
        assert r.status_code == 200, r.text
        return str(r.json()["status"])

    assert sync("m-a") == {"accepted": 2, "duplicate": 0, "conflict": 0, "rejected": 0}
    log = State(Path(state))
    try:
        assert log.unsynced("m-a", 10) == []
        left = {token for _entry, token, _at in log.unsynced("m-b", 10)}
        assert left == {v["token"] for v in vouchers["m-b"]}
    finally:
        log.close()
    assert [status_on_server("m-b", v) for v in vouchers["m-b"]] == ["issued", "issued"]

    assert sync("m-b") == {"accepted": 2, "duplicate": 0, "conflict": 0, "rejected": 0}
    assert sync("m-a") == dict.fromkeys(STATUSES, 0)  # nothing left for either
    assert sync("m-b") == dict.fromkeys(STATUSES, 0)
    for m in merchants:
        for v in vouchers[m]:
            assert status_on_server(m, v) == "redeemed"
            r = client.post("/v1/redemptions", json={"token": v["token"]}, headers=auth(tokens[m]))
            assert r.status_code == 409 and r.json()["error"]["code"] == "already_redeemed"


def test_rotation_old_and_new_vouchers_verify_offline(
    api: RunningApi,
    client: httpx.Client,
    vouchers: list[dict[str, Any]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    state = str(tmp_path / "till")
    new_kid = rotate_key(api.settings.signing_keys_dir)
    deadline = time.monotonic() + 10
    while True:
        after = claim(client, vouchers[0]["deal_id"], api.token("user", f"r-{time.monotonic()}"))
        if new_kid in after["token"].split(".")[0] or _kid(after["token"]) == new_kid:
            break
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert run(capsys, "pull-keys", "--server", api.url, "--state", state)[0] == 0
    for v in (vouchers[0], after):
        code, out = run(capsys, "check", v["token"], "--merchant", "m-1", "--state", state)
        assert code == 0, out


def _kid(token: str) -> str:
    import jwt

    return str(jwt.get_unverified_header(token)["kid"])


def test_the_flashsale_command_runs_the_verifier(
    api: RunningApi, vouchers: list[dict[str, Any]], tmp_path: Path
) -> None:
    """End to end through `python -m flashsale verifier ...` in a child process."""
    state = str(tmp_path / "till")
    env = {**os.environ, "HOME": str(tmp_path)}

    def cli(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "flashsale", "verifier", *argv],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )

    assert cli("pull-keys", "--server", api.url, "--state", state).returncode == 0
    ok = cli("check", vouchers[1]["token"], "--merchant", "m-1", "--state", state)
    assert ok.returncode == 0 and "accepted" in ok.stdout
    again = cli("check", vouchers[1]["token"], "--merchant", "m-1", "--state", state)
    assert again.returncode == 1 and "already redeemed here" in again.stdout
    assert cli("check").returncode == 2
    synced = cli(
        "sync", "--server", api.url, "--token", api.token("merchant", "m-1"), "--state", state
    )
    assert synced.returncode == 0 and "accepted: 1" in synced.stdout


def test_after_a_sync_a_till_refuses_offline_what_other_tills_redeemed(
    api: RunningApi,
    client: httpx.Client,
    vouchers: list[dict[str, Any]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Till A redeems online, till C offline then syncs; till B learns both on its sync."""
    till_b, till_c = str(tmp_path / "b"), str(tmp_path / "c")
    merchant = api.token("merchant", "m-1")
    for till in (till_b, till_c):
        assert run(capsys, "pull-keys", "--server", api.url, "--state", till)[0] == 0
    r = client.post("/v1/redemptions", json={"token": vouchers[0]["token"]}, headers=auth(merchant))
    assert r.status_code == 200  # till A, online
    assert (
        run(capsys, "check", vouchers[1]["token"], "--merchant", "m-1", "--state", till_c)[0] == 0
    )
    code, out = run(capsys, "sync", "--server", api.url, "--token", merchant, "--state", till_c)
    assert code == 0 and "accepted: 1" in out, out

    # Nothing to upload: the sync still refreshes keys and reads the feed.
    code, out = run(capsys, "sync", "--server", api.url, "--token", merchant, "--state", till_b)
    assert code == 0 and "accepted: 0" in out and "learned: 2" in out, out
    code, out = run(capsys, "sync", "--server", api.url, "--token", merchant, "--state", till_b)
    assert code == 0 and "learned: 0" in out, out  # the cursor was kept
    api.server.should_exit = True  # offline from here on
    time.sleep(0.3)
    code, out = run(capsys, "check", vouchers[0]["token"], "--merchant", "m-1", "--state", till_b)
    assert code == 1 and "already redeemed on another till (online)" in out, out
    code, out = run(capsys, "check", vouchers[1]["token"], "--merchant", "m-1", "--state", till_b)
    assert code == 1 and "already redeemed on another till (till-" in out, out
    code, out = run(capsys, "check", vouchers[2]["token"], "--merchant", "m-1", "--state", till_b)
    assert code == 0 and out.startswith("accepted"), out
    # Till C's own redemption is "here" for it, not another till's.
    code, out = run(capsys, "check", vouchers[1]["token"], "--merchant", "m-1", "--state", till_c)
    assert code == 1 and "already redeemed here" in out, out


def test_a_sync_with_nothing_to_upload_still_fails_on_a_refused_token_or_no_server(
    api: RunningApi, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    till = str(tmp_path / "till")
    forged = mint("not-the-server-secret-" + "y" * 32, "m-1", "merchant")
    code, out = run(capsys, "sync", "--server", api.url, "--token", forged, "--state", till)
    assert code == 1 and "401" in out, out
    user = api.token("user", "m-1")
    code, out = run(capsys, "sync", "--server", api.url, "--token", user, "--state", till)
    assert code == 1 and "403" in out, out
    dead = f"http://127.0.0.1:{free_port()}"
    merchant = api.token("merchant", "m-1")
    code, _ = run(capsys, "sync", "--server", dead, "--token", merchant, "--state", till)
    assert code == 3
    code, out = run(capsys, "sync", "--server", api.url, "--token", merchant, "--state", till)
    assert code == 0 and "keys: 1 cached" in out and "learned: 0" in out, out
    # A cursor the server no longer knows (its partition count changed): read from the start.
    log = State(Path(till))
    try:
        log.learn("m-1", [], "not-a-cursor")
    finally:
        log.close()
    code, out = run(capsys, "sync", "--server", api.url, "--token", merchant, "--state", till)
    assert code == 0 and "learned: 0" in out, out
