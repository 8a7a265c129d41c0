"""What the API's handlers use: one typed ``Services``, built in the app's lifespan.

Area modules reach it with ``services(request)``; ``api/app.py`` builds it. Living apart
from the app lets the app import its area modules by name while they import this.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from api.archive import Archive
from api.auth import Authenticator
from api.metrics import Metrics
from api.records import Records
from engine.discovery import Discovery
from engine.settings import Settings
from engine.store import Store
from engine.vouchers import VoucherSigner


@dataclass
class Services:
    """What handlers need, built once in the lifespan and reached via ``services(request)``."""

    settings: Settings
    store: Store
    auth: Authenticator
    metrics: Metrics
    signer: VoucherSigner
    discovery: Discovery
    records: Records | None = None  # None without FLASHSALE_DATABASE_URL
    archive: Archive | None = None  # archived deals, from PostgreSQL (with ``records``)


def services(request: Request) -> Services:
    """The app's services, from inside a handler."""
    return request.app.state.services  # type: ignore[no-any-return]


@asynccontextmanager
async def background(coro: Coroutine[Any, Any, None]) -> AsyncIterator[None]:
    """Run ``coro`` as a task while the block runs; cancel it and wait for it after."""
    task = asyncio.get_running_loop().create_task(coro)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
