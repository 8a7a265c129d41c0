"""The Starlette application: services in the lifespan, routes from each area module.

Each area (deals, discovery, vouchers, me, ops, till) is a module exposing ``routes`` and,
if it needs set-up, ``lifespan(services)`` (an async context manager); the app only
assembles them, so a new area plugs in without reshaping anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
from collections.abc import AsyncIterator, Coroutine
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request

from api import errors
from api.auth import Authenticator
from api.fastpath import ClaimFastPath, claim_route
from api.jsonio import BodyDeadline
from api.metrics import Metrics, MetricsMiddleware
from api.ratelimit import RateLimit
from api.records import Records
from engine.errors import StartupError
from engine.settings import Settings
from engine.store import Store
from engine.vouchers import VoucherSigner

log = logging.getLogger(__name__)


@dataclass
class Services:
    """What handlers need, built once in the lifespan and reached via ``services(request)``."""

    settings: Settings
    store: Store
    auth: Authenticator
    metrics: Metrics
    signer: VoucherSigner
    records: Records | None = None
    # Areas that need more keep it here (set by their ``lifespan`` hooks).
    extras: dict[str, Any] = field(default_factory=dict)


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


def services(request: Request) -> Services:
    """The app's services, from inside a handler."""
    return request.app.state.services  # type: ignore[no-any-return]


_AREAS = ("ops", "deals", "discovery", "vouchers", "me", "till")


def _area_modules() -> list[Any]:
    """The area modules present (each exposes ``routes``, optionally ``lifespan``)."""
    modules = []
    for name in _AREAS:
        try:
            modules.append(importlib.import_module(f"api.{name}"))
        except ModuleNotFoundError as exc:
            if exc.name != f"api.{name}":
                raise
    return modules


def create_app(settings: Settings) -> Starlette:
    """Build the API for ``settings`` (connections are opened in the lifespan)."""
    if not settings.auth_secret or len(settings.auth_secret.encode()) < 32:
        # HS256 with a short secret can be brute-forced offline from any token.
        raise StartupError("FLASHSALE_AUTH_SECRET must be at least 32 bytes")
    metrics = Metrics(multiprocess=settings.metrics_multiproc_dir is not None)
    modules = _area_modules()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            store = await Store.connect(settings)
            stack.push_async_callback(store.close)
            records = None
            if settings.database_url:
                records = Records(settings.database_url)
                await records.open()
                stack.push_async_callback(records.close)
            svc = Services(
                settings=settings,
                store=store,
                auth=Authenticator(settings.auth_secret or "", settings.token_cache_size),
                metrics=metrics,
                signer=VoucherSigner(settings.signing_keys_dir),
                records=records,
            )
            app.state.services = svc
            for module in modules:
                hook = getattr(module, "lifespan", None)
                if hook is not None:
                    await stack.enter_async_context(hook(svc))
            yield

    app = Starlette(
        routes=[route for module in modules for route in module.routes],
        lifespan=lifespan,
        exception_handlers=errors.handlers(),
    )
    route = claim_route(app.routes)
    if route is not None:  # inside the metrics middleware: added before it
        app.add_middleware(ClaimFastPath, route=route)
    app.add_middleware(BodyDeadline, timeout_s=settings.body_timeout_s)
    # Outside everything but the metrics: a request over its limit does no other work.
    app.add_middleware(RateLimit, settings=settings, metrics=metrics)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
