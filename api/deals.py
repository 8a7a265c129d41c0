"""Deal routes: create, read, cancel, and the claim race."""

from __future__ import annotations

from collections.abc import Sequence

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from api import fastpath
from api.errors import send_error
from api.jsonio import json, read_json_object
from api.ratelimit import CLAIM_LIMITS, enforce
from api.services import Services, services
from api.validation import Fields, valid_id
from engine import claims
from engine.deals import (
    DEFAULT_REDEEM_AFTER_END_MS,
    DESCRIPTION_MAX_CHARS,
    INVENTORY_MAX,
    LAT_MAX,
    LNG_MAX,
    MAX_REDEEM_AFTER_END_MS,
    MAX_WINDOW_MS,
    TITLE_MAX_CHARS,
    NewDeal,
    cancel_deal,
    create_deal,
    get_deal,
)
from engine.errors import (
    ClientError,
    DealNotFound,
    Forbidden,
    RateLimited,
    Unauthenticated,
    Unavailable,
)
from engine.limits import Charge
from engine.times import MS_PER_DAY, now_ms
from engine.vouchers import voucher_json

DEAL_FIELDS = {
    "title",
    "description",
    "lat",
    "lng",
    "inventory",
    "starts_at",
    "ends_at",
    "redeem_until",
}


def parse_new_deal(body: dict[str, object], merchant_id: str, now: int) -> NewDeal:
    """Validate a create-deal body against API.md's rules; 422 naming every bad field."""
    f = Fields(body, DEAL_FIELDS)
    title = f.string("title", required=True, min_len=1, max_len=TITLE_MAX_CHARS)
    description = f.string("description", required=False, min_len=0, max_len=DESCRIPTION_MAX_CHARS)
    description = description or ""
    lat = f.number("lat", required=True, low=-LAT_MAX, high=LAT_MAX)
    lng = f.number("lng", required=True, low=-LNG_MAX, high=LNG_MAX)
    inventory = f.integer("inventory", required=True, low=1, high=INVENTORY_MAX)
    starts = f.timestamp("starts_at", required=False)
    ends = f.timestamp("ends_at", required=True)
    redeem = f.timestamp("redeem_until", required=False)
    if "starts_at" not in f.problems:
        starts = now if starts is None else starts
    if starts is not None and ends is not None:
        if ends <= starts:
            f.problem("ends_at", "must be after starts_at")
        elif ends <= now:
            f.problem("ends_at", "must be in the future")
        elif ends - starts > MAX_WINDOW_MS:
            days = MAX_WINDOW_MS // MS_PER_DAY
            f.problem("ends_at", f"must be at most {days} days after starts_at")
    if ends is not None and redeem is not None:
        if redeem < ends:
            f.problem("redeem_until", "must not be before ends_at")
        elif redeem - ends > MAX_REDEEM_AFTER_END_MS:
            days = MAX_REDEEM_AFTER_END_MS // MS_PER_DAY
            f.problem("redeem_until", f"must be at most {days} days after ends_at")
    f.done()
    assert title is not None and lat is not None and lng is not None
    assert inventory is not None and starts is not None and ends is not None
    return NewDeal(
        merchant_id=merchant_id,
        title=title,
        description=description,
        lat=lat,
        lng=lng,
        inventory=inventory,
        starts_at_ms=starts,
        ends_at_ms=ends,
        redeem_until_ms=redeem if redeem is not None else ends + DEFAULT_REDEEM_AFTER_END_MS,
    )


def _deal_id(request: Request) -> str:
    deal_id: str = request.path_params["deal_id"]
    if not valid_id(deal_id):
        raise DealNotFound(deal_id=deal_id[:64])
    return deal_id


async def create(request: Request) -> Response:
    svc = services(request)
    caller = svc.auth.require(request.headers.get("authorization"), "merchant")
    body = await read_json_object(request)
    new = parse_new_deal(body, caller.id, now_ms())
    deal = await create_deal(svc.store, new)
    return json({"deal": deal.to_json()}, 201, {"Location": f"/v1/deals/{deal.id}"})


async def read(request: Request) -> Response:
    svc = services(request)
    deal_id = _deal_id(request)
    try:
        deal = await get_deal(svc.store, deal_id)
    except DealNotFound:
        # Not in Redis: archived (docs/lifecycle.md), or no such deal.
        archived = await svc.archive.deal(deal_id) if svc.archive is not None else None
        if archived is None:
            raise
        deal = archived
    return json({"deal": deal.to_json()})


async def _claim(
    svc: Services, deal_id: str, user_id: str, limits: Sequence[Charge]
) -> claims.ClaimResult:
    """The race in Redis; a deal Redis does not have may be archived: PostgreSQL answers."""
    try:
        return await claims.claim(svc.store, deal_id, user_id, limits)
    except DealNotFound:
        if svc.archive is None:
            raise
        return await svc.archive.claim(deal_id, user_id)


async def cancel(request: Request) -> Response:
    svc = services(request)
    caller = svc.auth.require(request.headers.get("authorization"), "merchant")
    deal_id = _deal_id(request)
    try:
        deal = await cancel_deal(svc.store, deal_id, caller.id)
    except DealNotFound:
        # An archived deal's record is final (it ended long ago): answered, not changed.
        archived = await svc.archive.deal(deal_id) if svc.archive is not None else None
        if archived is None:
            raise
        if archived.merchant_id != caller.id:
            raise Forbidden("Only the merchant who owns this deal may cancel it.") from None
        deal = archived
    return json({"deal": deal.to_json()})


async def claim(scope: Scope, receive: Receive, send: Send) -> None:
    """``POST /v1/deals/{deal_id}/claims`` as a bare ASGI endpoint.

    The hottest route by far: it skips Starlette's Request and Response objects (a
    sixth of a claim's CPU in the profile) and answers every refusal itself instead of
    unwinding through the exception middleware. Errors it does not expect still
    propagate to the app's handlers (a 500 with a request id). On one node the rate
    limiter leaves the claim's limits in the scope, and the claim's script counts them.
    """
    svc: Services = scope["app"].state.services
    limits: list[Charge] = scope.get(CLAIM_LIMITS, [])
    authorization = None
    for name, value in scope["headers"]:
        if name == b"authorization":
            authorization = value.decode("latin-1")
            break
    try:
        try:
            caller = svc.auth.require(authorization, "user")
            deal_id = scope["path_params"]["deal_id"]
            if not valid_id(deal_id):
                raise DealNotFound(deal_id=deal_id[:64])
        except ClientError:
            # Refused before the script that would have counted the limits: count them
            # now, and a limit's refusal comes first, as for any other route.
            refused = await enforce(svc.store, svc.metrics, limits) if limits else None
            if refused is not None:
                raise refused from None
            raise
        try:
            result = await _claim(svc, deal_id, caller.id, limits)
        except RateLimited as exc:
            svc.metrics.limited(exc)
            raise
        except Unavailable:
            if limits:  # the limits could not be counted either (fail open, counted)
                svc.metrics.rate_limit_errors.inc()
            raise
    except (ClientError, Unavailable) as exc:
        if not isinstance(exc, Unauthenticated | Forbidden | RateLimited):
            svc.metrics.claimed(exc.code)
        # The storm's usual answer (409 sold_out), without building a Response object.
        await send_error(send, exc)
        return
    svc.metrics.claimed(result.outcome)
    body = orjson.dumps(
        {
            "voucher": voucher_json(result.voucher, svc.signer.sign(result.voucher)),
            "inventory_left": result.inventory_left,
        }
    )
    await send(
        {
            "type": "http.response.start",
            "status": 201 if result.is_new else 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BareASGI:
    """Starlette wraps plain functions as request/response handlers; this one is ASGI."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


# The app routes claims past the router straight to this route (api/fastpath.py).
claim_route = Route(fastpath.PATH, BareASGI(claim), methods=["POST"])
routes = [
    Route("/v1/deals", create, methods=["POST"]),
    Route("/v1/deals/{deal_id}", read, methods=["GET"]),
    Route("/v1/deals/{deal_id}/cancel", cancel, methods=["POST"]),
    claim_route,
]
