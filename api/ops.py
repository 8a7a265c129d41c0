"""Operations routes: liveness, readiness, metrics, the OpenAPI document."""

from __future__ import annotations

import asyncio
import contextlib

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from api.jsonio import json
from api.openapi import document
from api.services import services
from engine.archive import count_due
from engine.errors import Unavailable
from engine.streams import stream_lag


async def healthz(request: Request) -> Response:
    return json({"status": "ok"})


async def _lag_or_none(request: Request) -> int | None:
    try:
        return await stream_lag(services(request).store)
    except Unavailable:
        return None


async def readyz(request: Request) -> Response:
    svc = services(request)
    records = svc.records
    redis_ok, pg_ok, lag = await asyncio.gather(
        svc.store.ping(),
        records.ping() if records is not None else _false(),
        _lag_or_none(request),
    )
    ok = redis_ok and pg_ok
    body = {
        "status": "ok" if ok else "unavailable",
        "checks": {"redis": "ok" if redis_ok else "down", "postgres": "ok" if pg_ok else "down"},
        "stream_lag": lag,
    }
    return json(body, 200 if ok else 503, None if ok else {"Retry-After": "2"})


async def _false() -> bool:
    return False


async def metrics(request: Request) -> Response:
    svc = services(request)
    lag = await _lag_or_none(request)
    if lag is not None:
        svc.metrics.stream_lag.set(lag)
    with contextlib.suppress(Unavailable):  # Redis away: keep the last value
        # One ZCOUNT per partition, in one round trip.
        svc.metrics.deals_due.set(await count_due(svc.store, await svc.store.server_time_ms()))
    if svc.records is not None:
        with contextlib.suppress(Unavailable):  # PostgreSQL away: keep the last value
            dead = await svc.records.dead_letter_count()
            if dead is not None:
                svc.metrics.dead_letters.set(dead)
    if svc.archive is not None:
        with contextlib.suppress(Unavailable):
            svc.metrics.deals_archived.set(await svc.archive.archived_count())
    svc.metrics.discovery_seen(svc.discovery)
    return Response(svc.metrics.render(), media_type=svc.metrics.content_type)


async def openapi(request: Request) -> Response:
    return json(document())


routes = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"]),
]
