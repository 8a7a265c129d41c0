"""Deal routes: create, read, cancel, and the claim race."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from api.app import services
from api.errors import error_response
from api.jsonio import json, read_json_object
from api.validation import LAT_MAX, Fields, valid_id
from engine import claims
from engine.deals import (
    DEFAULT_REDEEM_AFTER_END_MS,
    MAX_REDEEM_AFTER_END_MS,
    MAX_WINDOW_MS,
    NewDeal,
    cancel_deal,
    create_deal,
    get_deal,
)
from engine.errors import ClientError, DealNotFound, Unavailable
from engine.times import now_ms
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
    title = f.string("title", required=True, min_len=1, max_len=200)
    description = f.string("description", required=False, min_len=0, max_len=2000) or ""
    lat = f.number("lat", required=True, low=-LAT_MAX, high=LAT_MAX)
    lng = f.number("lng", required=True, low=-180.0, high=180.0)
    inventory = f.integer("inventory", required=True, low=1, high=1_000_000)
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
            f.problem("ends_at", "must be at most 30 days after starts_at")
    if ends is not None and redeem is not None:
        if redeem < ends:
            f.problem("redeem_until", "must not be before ends_at")
        elif redeem - ends > MAX_REDEEM_AFTER_END_MS:
            f.problem("redeem_until", "must be at most 90 days after ends_at")
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
    deal = await get_deal(services(request).store, _deal_id(request))
    return json({"deal": deal.to_json()})


async def cancel(request: Request) -> Response:
    svc = services(request)
    caller = svc.auth.require(request.headers.get("authorization"), "merchant")
    deal = await cancel_deal(svc.store, _deal_id(request), caller.id)
    return json({"deal": deal.to_json()})


async def claim(request: Request) -> Response:
    svc = services(request)
    caller = svc.auth.require(request.headers.get("authorization"), "user")
    try:
        result = await claims.claim(svc.store, _deal_id(request), caller.id)
    except (ClientError, Unavailable) as exc:
        svc.metrics.claimed(exc.code)
        # Most answers of a storm are refusals: answer here rather than unwinding
        # through Starlette's exception middleware (a measurable share of a claim).
        return error_response(exc)
    svc.metrics.claimed(result.outcome)
    token = svc.signer.sign(result)
    return json(
        {"voucher": voucher_json(result, token), "inventory_left": result.inventory_left},
        201 if result.is_new else 200,
    )


routes = [
    Route("/v1/deals", create, methods=["POST"]),
    Route("/v1/deals/{deal_id}", read, methods=["GET"]),
    Route("/v1/deals/{deal_id}/cancel", cancel, methods=["POST"]),
    Route("/v1/deals/{deal_id}/claims", claim, methods=["POST"]),
]
