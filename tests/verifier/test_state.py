"""The verifier's state directory: 0700, and every file in it 0600 from its first byte."""

from __future__ import annotations

import os
import sqlite3
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.conftest import RunningApi
from tests.verifier.helpers import counts, run
from verifier.state import _SCHEMA, JWKS_FILE, LOG_FILE, State


@pytest.fixture(autouse=True)
def usual_umask() -> Iterator[None]:
    """The common umask 022, whatever the runner's: without care, files come out 0644."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def modes(directory: Path) -> dict[str, int]:
    return {p.name: mode(p) for p in sorted(directory.iterdir())}


def test_a_new_state_directory_is_0700_and_its_files_0600_wal_and_shm_included(
    api: RunningApi,
    vouchers: list[dict[str, Any]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    state = tmp_path / "till"
    log = State(state)  # held open, so that its -wal and -shm stay to be looked at
    try:
        assert {LOG_FILE, f"{LOG_FILE}-wal", f"{LOG_FILE}-shm"} == set(modes(state))
        assert set(modes(state).values()) == {0o600} and mode(state) == 0o700
        assert log.notice is None  # nothing to tighten: nothing said
        assert run(capsys, "pull-keys", "--server", api.url, "--state", str(state))[0] == 0
        code, out = run(
            capsys, "check", vouchers[0]["token"], "--merchant", "m-1", "--state", str(state)
        )
        assert code == 0, out
        assert len(log.unsynced("m-1", 10)) == 1
        files = modes(state)
        assert {JWKS_FILE, LOG_FILE, f"{LOG_FILE}-wal", f"{LOG_FILE}-shm"} == set(files)
        assert files == dict.fromkeys(files, 0o600), {k: oct(v) for k, v in files.items()}
        assert mode(state) == 0o700
    finally:
        log.close()


def test_an_existing_0755_directory_is_tightened_to_0700_and_the_user_told(
    api: RunningApi, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "till"
    state.mkdir()
    state.chmod(0o755)
    code, out = run(capsys, "pull-keys", "--server", api.url, "--state", str(state))
    assert code == 0, out
    assert f"made {state} private to its owner (mode 0755 -> 0700)" in out
    assert mode(state) == 0o700
    assert set(modes(state).values()) == {0o600}
    code, out = run(capsys, "pull-keys", "--server", api.url, "--state", str(state))
    assert code == 0 and "private" not in out


def test_a_log_left_readable_with_its_wal_is_made_private_and_keeps_working(
    api: RunningApi,
    client: httpx.Client,
    vouchers: list[dict[str, Any]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A state written 0644 in a 0755 directory (an earlier verifier), its WAL still open."""
    state = tmp_path / "till"
    state.mkdir()
    state.chmod(0o755)
    (state / JWKS_FILE).write_text(client.get("/.well-known/jwks.json").text, encoding="utf-8")
    old = sqlite3.connect(state / LOG_FILE, isolation_level=None)
    try:
        old.execute("PRAGMA journal_mode=WAL")
        old.executescript(_SCHEMA)
        old.execute(
            "INSERT INTO redemptions (entry_id, voucher_id, merchant_id, token, redeemed_at)"
            " VALUES (?, ?, 'm-1', ?, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))",
            (str(uuid.uuid4()), vouchers[0]["id"], vouchers[0]["token"]),
        )
        before = modes(state)
        assert before[f"{LOG_FILE}-wal"] == 0o644 and set(before.values()) == {0o644}
        assert (state / f"{LOG_FILE}-wal").stat().st_size > 0  # the entry is in the WAL

        code, out = run(
            capsys, "check", vouchers[1]["token"], "--merchant", "m-1", "--state", str(state)
        )
        assert code == 0 and "mode 0755 -> 0700" in out, out
        assert mode(state) == 0o700
        after = modes(state)
        assert set(after) == set(before) and set(after.values()) == {0o600}, after
        # The earlier entry and the new one both sync.
        code, out = run(
            capsys,
            "sync",
            "--server",
            api.url,
            "--token",
            api.token("merchant", "m-1"),
            "--state",
            str(state),
        )
        assert code == 0 and counts(out)["accepted"] == 2, out
    finally:
        old.close()


def test_a_directory_open_to_others_that_holds_other_files_is_refused_untouched(
    api: RunningApi, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o775)
    (shared / "notes.txt").write_text("the team's", encoding="utf-8")
    code, out = run(capsys, "pull-keys", "--server", api.url, "--state", str(shared))
    assert code == 2 and "holds other files (notes.txt)" in out, out
    assert mode(shared) == 0o775 and [p.name for p in shared.iterdir()] == ["notes.txt"]
    # Private already: other files do not matter.
    shared.chmod(0o700)
    code, out = run(capsys, "pull-keys", "--server", api.url, "--state", str(shared))
    assert code == 0, out
    assert mode(shared) == 0o700 and mode(shared / JWKS_FILE) == 0o600


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory away needs root")
def test_a_directory_of_another_user_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    code, out = run(capsys, "check", "x.y.z", "--merchant", "m-1", "--state", str(theirs))
    assert code == 2 and "belongs to another user" in out, out
    assert list(theirs.iterdir()) == []
