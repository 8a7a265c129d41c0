"""The API on a real socket against real servers.

By default uvicorn serves it in a thread of the test process. With
``FLASHSALE_TEST_SERVER=uvicorn`` or ``=granian`` every API test runs against a
`flashsale serve --server ...` subprocess instead (the README says when CI does that).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from api.app import create_app
from api.auth import mint
from engine.settings import Settings
from flashsale.embedded import free_port
from tests.conftest import flush
from tests.served import SERVERS, Served, serve_env

SECRET = "test-secret-" + "x" * 64
# "thread" (default), or a server name: every API test then runs against `flashsale serve`.
TEST_SERVER = os.environ.get("FLASHSALE_TEST_SERVER", "thread")


@dataclass
class RunningApi:
    """A served app: its base URL, its settings, and a way to mint caller tokens."""

    url: str
    settings: Settings
    server: Any  # uvicorn.Server in a thread, or Served

    def token(self, role: str = "user", sub: str = "u-1", ttl_s: float = 3600) -> str:
        return mint(SECRET, sub, role, ttl_s)

    def auth(self, role: str = "user", sub: str = "u-1") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(role, sub)}"}


def serve_in_thread(settings: Settings) -> tuple[uvicorn.Server, threading.Thread, str]:
    """Start uvicorn on a free port in a thread; return once it accepts connections."""
    port = free_port()
    config = uvicorn.Config(
        create_app(settings),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="on",
        loop="asyncio",
        http="h11",
        proxy_headers=False,  # as `flashsale serve`: the app reads X-Forwarded-For itself
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the API did not start")
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{port}"


def stop_thread(server: uvicorn.Server, thread: threading.Thread) -> None:
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def make_api(tmp_path: Path) -> Iterator[Callable[..., RunningApi]]:
    """Start APIs with given settings (stopped at teardown)."""
    running: list[tuple[uvicorn.Server, threading.Thread]] = []
    served: list[Served] = []

    def start(settings: Settings, *, limits: bool = False) -> RunningApi:
        """Serve ``settings``; rate limits are off unless ``limits`` (the tests of other
        behaviour send bursts from one caller)."""
        settings = settings.with_(auth_secret=SECRET, data_dir=tmp_path)
        if not limits:
            settings = settings.with_(rate_caller_per_s=0, rate_address_per_s=0)
        if TEST_SERVER in SERVERS:
            log = tmp_path / f"serve-{len(served)}.log"
            proc = Served(TEST_SERVER, serve_env(settings), log).start()
            served.append(proc)
            return RunningApi(proc.url, settings, proc)
        server, thread, url = serve_in_thread(settings)
        running.append((server, thread))
        return RunningApi(url, settings, server)

    yield start
    for server, thread in running:
        stop_thread(server, thread)
    for proc in served:
        proc.stop()


@pytest.fixture
def api(
    make_api: Callable[..., RunningApi], redis_url: str, migrated_database_url: str
) -> RunningApi:
    """The API on the session's Redis (flushed) and migrated PostgreSQL."""
    flush(redis_url, False)
    return make_api(Settings(redis_url=redis_url, database_url=migrated_database_url))


@pytest.fixture
def client(api: RunningApi) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api.url, timeout=10) as c:
        yield c
