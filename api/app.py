"""The Starlette application: services in the lifespan, routes from each area module.

Each area (ops, deals, discovery, vouchers, me, till) is a module exposing ``routes`` and,
if it runs something in the background, ``lifespan(services)`` (an async context
manager). The app imports them by name and lists them in ``AREAS``: adding an area is
one import and one entry here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from starlette.applications import Starlette

from api import deals, discovery, errors, me, ops, till, vouchers
from api.archive import Archive
from api.auth import Authenticator
from api.fastpath import ClaimFastPath, ExactPath
from api.jsonio import BodyDeadline
from api.metrics import Metrics, MetricsMiddleware
from api.ratelimit import RateLimit
from api.records import Records
from api.services import Services
from engine.discovery import Discovery
from engine.errors import StartupError
from engine.settings import Settings
from engine.store import Store
from engine.vouchers import VoucherSigner

# The areas, in routing order; those with a ``lifespan`` enter it in this order.
AREAS = (ops, deals, discovery, vouchers, me, till)
_LIFESPANS = (discovery.lifespan, vouchers.lifespan)


def create_app(settings: Settings) -> Starlette:
    """Build the API for ``settings`` (connections are opened in the lifespan)."""
    if not settings.auth_secret or len(settings.auth_secret.encode()) < 32:
        # HS256 with a short secret can be brute-forced offline from any token.
        raise StartupError("FLASHSALE_AUTH_SECRET must be at least 32 bytes")
    metrics = Metrics(multiprocess=settings.metrics_multiproc_dir is not None)

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
            finder = Discovery(store)
            stack.push_async_callback(finder.close)
            svc = Services(
                settings=settings,
                store=store,
                auth=Authenticator(settings.auth_secret or "", settings.token_cache_size),
                metrics=metrics,
                signer=VoucherSigner(settings.signing_keys_dir),
                discovery=finder,
                records=records,
                archive=Archive(records) if records is not None else None,
            )
            app.state.services = svc
            for area_lifespan in _LIFESPANS:
                await stack.enter_async_context(area_lifespan(svc))
            yield

    app = Starlette(
        routes=[route for area in AREAS for route in area.routes],
        lifespan=lifespan,
        exception_handlers=errors.handlers(),
    )
    # Inside the metrics middleware: added before it. Discovery's inside the claim's.
    app.add_middleware(ExactPath, route=discovery.route, method="GET", endpoint=discovery.nearby)
    app.add_middleware(ClaimFastPath, route=deals.claim_route)
    app.add_middleware(BodyDeadline, timeout_s=settings.body_timeout_s)
    # Outside everything but the metrics: a request over its limit does no other work.
    app.add_middleware(RateLimit, settings=settings)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
