"""The till in a browser: Debian's Chromium driven by Playwright, an API process to stop.

No browser is ever downloaded: the tests launch ``/usr/bin/chromium`` (``.ci/run`` installs
it) and skip, saying so, where it is missing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from api.auth import mint
from flashsale.embedded import free_port
from tests.api.conftest import SECRET, api, client, make_api  # noqa: F401
from tests.conftest import flush

CHROMIUM = Path("/usr/bin/chromium")
# Quiet, local-only Chromium: no sandbox (root in CI), no GPU, nothing phoning home.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def chromium() -> Path:
    """Debian's Chromium, or a skip that says how to get it."""
    if not CHROMIUM.exists():
        pytest.skip("needs Debian's chromium: apt-get install chromium")
    return CHROMIUM


@dataclass
class ApiProcess:
    """``flashsale serve`` in a child process on a fixed port, to stop and start again."""

    port: int
    data_dir: Path
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = field(default=None)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def keys_dir(self) -> Path:
        return self.data_dir / "keys"

    def token(self, role: str = "user", sub: str = "u-1") -> str:
        return mint(SECRET, sub, role, 3600)

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "flashsale", "serve", "--port", str(self.port)],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        raise AssertionError("the API never became healthy:\n" + self.log.read_text()[-3000:])

    def stop(self) -> None:
        """SIGTERM and wait: afterwards nothing listens on the port."""
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None
        with socket.socket() as s, pytest.raises(ConnectionRefusedError):
            s.connect(("127.0.0.1", self.port))


@pytest.fixture
def api_process(tmp_path: Path, redis_url: str, migrated_database_url: str) -> Iterator[ApiProcess]:
    """The API as a process on the session's Redis (flushed) and PostgreSQL."""
    flush(redis_url, False)
    data_dir = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHSALE_")}
    env.update(
        FLASHSALE_REDIS_URL=redis_url,
        FLASHSALE_DATABASE_URL=migrated_database_url,
        FLASHSALE_AUTH_SECRET=SECRET,
        FLASHSALE_DATA_DIR=str(data_dir),
    )
    server = ApiProcess(free_port(), data_dir, env, tmp_path / "api.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()
