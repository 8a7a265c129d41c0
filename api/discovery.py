"""Discovery route: ``GET /v1/deals?lat=&lng=&radius_km=&limit=`` (public).

The endpoint is bare ASGI, reached past the router (``api/fastpath.py``): in the
discovery profile, Starlette's router, its ``Request``/``Response`` objects and
``QueryParams`` were a sixth of a request's CPU. It answers exactly as the usual way
would: the same query parsing, the same 422 and 503 bodies (through the app's own
handler), the same headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from api.deals import BareASGI
from api.errors import on_flashsale_error
from api.metrics import DISCOVERY_EXPORT_INTERVAL_S
from api.services import Services, background
from api.validation import query_int, query_number
from engine.deals import LAT_MAX, LNG_MAX
from engine.discovery import Discovery, render
from engine.errors import FlashsaleError, InvalidRequest, StoreUnavailable

log = logging.getLogger(__name__)

RADIUS_DEFAULT_KM = 5.0
RADIUS_MAX_KM = 50.0
LIMIT_DEFAULT = 20
LIMIT_MAX = 100
PATH = "/v1/deals"
# What a Starlette ``Response(body, media_type="application/json")`` sends, in its order.
_CONTENT_TYPE = (b"content-type", b"application/json")


def query_values(raw: bytes) -> dict[str, str]:
    """The parameters of a raw query string, the last value of each name: what Starlette's
    ``QueryParams`` (``parse_qsl`` with blank values kept) answers to ``get``.

    Without ``%`` or ``+`` nothing is decoded, and a split is all ``parse_qsl`` does.
    """
    text = raw.decode("latin-1")
    if "%" in text or "+" in text:
        return dict(parse_qsl(text, keep_blank_values=True))
    values: dict[str, str] = {}
    for field in text.split("&"):
        if field:
            name, _, value = field.partition("=")
            values[name] = value
    return values


def parse_query(raw: bytes) -> tuple[float, float, float, int]:
    """``lat``, ``lng``, ``radius_km`` and ``limit`` of a query string, or one 422 naming
    every bad one (unknown parameters are ignored)."""
    params = query_values(raw)
    problems: dict[str, str] = {}
    lat = query_number(params, "lat", problems, default=None, low=-LAT_MAX, high=LAT_MAX)
    lng = query_number(params, "lng", problems, default=None, low=-LNG_MAX, high=LNG_MAX)
    radius = query_number(
        params,
        "radius_km",
        problems,
        default=RADIUS_DEFAULT_KM,
        low=0.0,
        high=RADIUS_MAX_KM,
        low_open=True,
    )
    limit = query_int(params, "limit", problems, default=LIMIT_DEFAULT, low=1, high=LIMIT_MAX)
    if problems:
        names = ", ".join(sorted(problems))
        raise InvalidRequest(f"Invalid query parameters: {names}.", fields=problems)
    assert lat is not None and lng is not None and radius is not None and limit is not None
    return lat, lng, radius, limit


async def nearby(scope: Scope, receive: Receive, send: Send) -> None:
    """``GET /v1/deals`` as a bare ASGI endpoint."""
    svc: Services = scope["app"].state.services
    try:
        lat, lng, radius, limit = parse_query(scope["query_string"])
        found = await svc.discovery.nearby(lat, lng, radius, limit)
    except FlashsaleError as exc:
        # Rare: the app's own handler answers it, as the exception middleware would.
        response = await on_flashsale_error(Request(scope, receive, send), exc)
        await response(scope, receive, send)
        return
    # The same bytes as json({"deals": [n.to_json() ...], "count": n}), from fragments.
    body = render(found)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-length", b"%d" % len(body)), _CONTENT_TYPE],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _sweep_forever(d: Discovery, interval_s: float, jitter: float) -> None:
    while True:
        await asyncio.sleep(interval_s * (1 + jitter * random.random()))
        try:
            removed = await d.sweep(lease_ms=int(interval_s * 1000))
        except StoreUnavailable:
            log.warning("discovery sweep: Redis unavailable; will retry")
            continue
        if removed:
            log.info("discovery sweep removed %d ended deals from the geo indexes", removed)


async def _advance_forever(d: Discovery, interval_s: float) -> None:
    """Scheduled deals whose start has come enter the geo indexes, ended ones leave, even
    where nobody searches (searches do it too, a chunk at a time)."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await d.advance()
        except StoreUnavailable:
            log.warning("discovery timeline: Redis unavailable; will retry")


async def _export_forever(svc: Services) -> None:
    while True:
        await asyncio.sleep(DISCOVERY_EXPORT_INTERVAL_S)
        svc.metrics.discovery_seen(svc.discovery)


@asynccontextmanager
async def lifespan(svc: Services) -> AsyncIterator[None]:
    """Sweep ended deals out of the geo indexes, move started ones in, and (under several
    workers) export discovery's metrics, in the background."""
    settings = svc.settings
    sweeping = _sweep_forever(
        svc.discovery, settings.discovery_sweep_interval_s, settings.discovery_sweep_jitter
    )
    advancing = _advance_forever(svc.discovery, settings.discovery_advance_interval_s)
    # Alone, a process's scrape brings its own discovery metrics up to date; under several
    # workers the scrape reaches one, so each worker copies its counts on its own.
    exporting = (
        background(_export_forever(svc)) if svc.metrics.multiprocess else contextlib.nullcontext()
    )
    try:
        async with background(sweeping), background(advancing), exporting:
            yield
    finally:
        svc.metrics.discovery_seen(svc.discovery)  # a stopping worker's last counts


# The app dispatches GET requests past the router straight to this route (api/fastpath.py).
route = Route(PATH, BareASGI(nearby), methods=["GET"])
routes = [route]
