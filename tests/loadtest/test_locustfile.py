"""The locust scenarios run headless against a real API and pass their race check."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.settings import Settings
from loadtest.race import RaceCounts, race_verdict
from tests.api.conftest import SECRET, serve_in_thread, stop_thread
from tests.conftest import flush

ROOT = Path(__file__).resolve().parents[2]
LOCUST = Path(sys.executable).with_name("locust")
RACE_INVENTORY = 40


@pytest.fixture
def api_url(redis_url: str, tmp_path: Path) -> Iterator[str]:
    """The API on the session's Redis (no PostgreSQL: the scenarios never read it)."""
    flush(redis_url, False)
    settings = Settings(redis_url=redis_url, auth_secret=SECRET, data_dir=tmp_path)
    server, thread, url = serve_in_thread(settings)
    try:
        yield url
    finally:
        stop_thread(server, thread)


def _locust(url: str, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FLASHSALE_AUTH_SECRET": SECRET, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [
            str(LOCUST),
            "-f",
            str(ROOT / "loadtest" / "locustfile.py"),
            "--headless",
            "--host",
            url,
            "--only-summary",
            "--loglevel",
            "INFO",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=env,
        cwd=ROOT,
    )


def test_headless_run_of_every_scenario_exits_0_with_the_race_checked(api_url: str) -> None:
    """Racers, shoppers and merchants for a few seconds: the hot deal sells out exactly."""
    done = _locust(
        api_url,
        "-u",
        "150",
        "-r",
        "150",
        "-t",
        "6s",
        "--race-inventory",
        str(RACE_INVENTORY),
        "--tokens",
        "300",
        "RaceUser",
        "ShopperUser",
        "MerchantUser",
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[:3000] + out[-1500:]
    assert "flashsale race check ok" in out, out[:3000] + out[-1500:]
    assert f"{RACE_INVENTORY} vouchers issued, 0 left" in out, out[:3000] + out[-1500:]
    assert "shop: discover" in out and "merchant: create deal" in out


def test_headless_run_exits_1_when_the_race_check_fails(api_url: str) -> None:
    """Racing for a deal that does not exist fails the check, and so the exit code."""
    done = _locust(
        api_url,
        "-u",
        "5",
        "-r",
        "5",
        "-t",
        "2s",
        "--race-deal",
        "d_nosuchdeal",
        "--tokens",
        "5",
        "RaceUser",
    )
    out = done.stdout + done.stderr
    assert done.returncode == 1, out[:3000] + out[-1500:]
    assert "flashsale race check FAILED" in out, out[:3000] + out[-1500:]


def test_race_verdict_names_oversell_duplicates_and_5xx() -> None:
    deal = {"inventory_total": 2, "inventory_left": 0}
    ok = RaceCounts(statuses={"201": 2, "409": 5}, new_vouchers={"v1", "v2"})
    assert race_verdict(ok, deal) == []
    oversold = RaceCounts(statuses={"201": 3}, new_vouchers={"v1", "v2", "v3"}, server_errors=1)
    problems = race_verdict(oversold, deal)
    assert any("oversold" in p for p in problems)
    assert any("5xx" in p for p in problems)
    duplicated = RaceCounts(statuses={"201": 3, "409": 1}, new_vouchers={"v1", "v2"})
    assert any("distinct" in p for p in race_verdict(duplicated, deal))
    refused = RaceCounts(statuses={"404": 3})
    assert any("404" in p for p in race_verdict(refused, deal | {"inventory_left": 2}))
    unsold = RaceCounts(statuses={"201": 1, "409": 4}, new_vouchers={"v1"})
    assert any("did not sell out" in p for p in race_verdict(unsold, deal | {"inventory_left": 1}))
