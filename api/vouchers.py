"""Voucher routes: JWKS, a voucher and its QR code, online redemption, offline sync, and
the redemptions feed."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import segno
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from api.jsonio import json, read_json_object
from api.services import Services, background, services
from api.validation import ID_MAX_CHARS, Fields, query_int, valid_id
from engine import feed, redemptions
from engine.errors import InvalidRequest, VoucherNotFound
from engine.vouchers import MAX_TOKEN_CHARS, RELOAD_S, HeldVoucher, read_voucher, voucher_json

log = logging.getLogger(__name__)

# Short enough that a verifier pulling keys soon after a rotation gets the new key.
JWKS_MAX_AGE_S = 60
# A sync upload of 1000 entries (tokens are ~350 bytes) is bigger than the generic 64 KiB.
SYNC_MAX_BODY_BYTES = 1024 * 1024
QR_HEADERS = {"Cache-Control": "private, no-store"}


@asynccontextmanager
async def lifespan(svc: Services) -> AsyncIterator[None]:
    """Re-read the keys directory every ``RELOAD_S``: a rotation signs within 10 seconds."""

    async def reload_forever() -> None:
        while True:
            await asyncio.sleep(RELOAD_S)
            try:
                await asyncio.to_thread(svc.signer.reload)
            except Exception:  # a half-copied or unreadable key must not stop signing
                log.exception("reloading voucher signing keys failed; keeping the current ones")

    async with background(reload_forever()):
        yield


async def jwks(request: Request) -> Response:
    ring = services(request).signer.ring
    headers = {
        "Cache-Control": f"public, max-age={JWKS_MAX_AGE_S}",
        "ETag": ring.etag,
    }
    if _matches(request.headers.get("if-none-match"), ring.etag):
        return Response(status_code=304, headers=headers)
    return Response(ring.jwks_body, media_type="application/json", headers=headers)


def _matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110's weak comparison: ``*``, or any listed tag (``W/`` or not) equal to ours."""
    if not if_none_match:
        return False
    tags = [t.strip() for t in if_none_match.split(",")]
    return "*" in tags or any(t.removeprefix("W/") == etag for t in tags)


async def _visible(request: Request, *, holder_only: bool) -> HeldVoucher:
    """The voucher in the path, if the caller may see it; 404 for anyone else."""
    svc = services(request)
    caller = svc.auth.caller(request.headers.get("authorization"))
    voucher_id: str = request.path_params["voucher_id"]
    held = await read_voucher(svc.store, voucher_id) if valid_id(voucher_id) else None
    if held is None and svc.archive is not None and valid_id(voucher_id):
        held = await svc.archive.voucher(voucher_id)  # its deal may be archived
    if held is not None:
        v = held.voucher
        if caller.role == "user" and caller.id == v.user_id:
            return held
        if not holder_only and caller.role == "merchant" and caller.id == v.merchant_id:
            return held
    # Nobody learns whose vouchers exist: not found, not forbidden.
    raise VoucherNotFound(voucher_id=voucher_id[:64])


async def read(request: Request) -> Response:
    held = await _visible(request, holder_only=False)
    token = services(request).signer.sign(held.voucher)
    return json({"voucher": voucher_json(held.voucher, token), "status": held.status})


def _qr(request: Request, held: HeldVoucher) -> segno.QRCode:
    return segno.make_qr(services(request).signer.sign(held.voucher), error="m")


async def qr_svg(request: Request) -> Response:
    held = await _visible(request, holder_only=True)
    buf = io.BytesIO()
    _qr(request, held).save(buf, kind="svg", scale=4, border=4, xmldecl=False)
    return Response(buf.getvalue(), media_type="image/svg+xml", headers=QR_HEADERS)


async def qr_png(request: Request) -> Response:
    held = await _visible(request, holder_only=True)
    buf = io.BytesIO()
    _qr(request, held).save(buf, kind="png", scale=6, border=4)
    return Response(buf.getvalue(), media_type="image/png", headers=QR_HEADERS)


async def redeem(request: Request) -> Response:
    svc = services(request)
    caller = svc.auth.require(request.headers.get("authorization"), "merchant")
    f = Fields(await read_json_object(request), {"token"})
    token = f.string("token", required=True, min_len=1, max_len=MAX_TOKEN_CHARS)
    f.done()
    result = await redemptions.redeem(svc.store, svc.signer, token, caller.id, svc.archive)
    return json({"redemption": result.to_json()})


async def sync(request: Request) -> Response:
    svc = services(request)
    caller = svc.auth.require(request.headers.get("authorization"), "merchant")
    body = await read_json_object(request, SYNC_MAX_BODY_BYTES)
    f = Fields(body, {"device_id", "entries"})
    device_id = f.string("device_id", required=True, min_len=1, max_len=ID_MAX_CHARS)
    if device_id is not None and not valid_id(device_id):
        f.problem("device_id", f"must be 1..{ID_MAX_CHARS} URL-safe characters")
    entries = f.body.get("entries")
    if entries is None:
        f.problem("entries", "required")
    elif not isinstance(entries, list):
        f.problem("entries", "must be an array")
    elif len(entries) > redemptions.MAX_SYNC_ENTRIES:
        f.problem("entries", f"must hold at most {redemptions.MAX_SYNC_ENTRIES} entries")
    f.done()
    assert device_id is not None and isinstance(entries, list)
    try:
        results = await redemptions.sync(
            svc.store, svc.signer, caller.id, device_id, entries, valid_id, svc.archive
        )
    except ValueError as exc:  # pragma: no cover - the size is checked above
        raise InvalidRequest(str(exc)) from None
    return json({"results": results})


async def redemptions_feed(request: Request) -> Response:
    """The caller's accepted redemptions after ``after``, in order (engine/feed.py)."""
    svc = services(request)
    caller = svc.auth.require(request.headers.get("authorization"), "merchant")
    params = request.query_params
    problems: dict[str, str] = {}
    limit = query_int(
        params, "limit", problems, default=feed.DEFAULT_LIMIT, low=1, high=feed.MAX_LIMIT
    )
    partitions = svc.store.keys.partitions
    after = feed.Cursor.start(partitions)
    raw = params.get("after")
    if raw:
        try:
            after = feed.Cursor.decode(raw, partitions)
        except ValueError:
            problems["after"] = "not a cursor this server returned"
    if problems:
        raise InvalidRequest(f"Invalid fields: {', '.join(sorted(problems))}.", fields=problems)
    assert limit is not None
    page = await feed.read_page(svc.store, caller.id, after, limit)
    return json(
        {"redemptions": [item.to_json() for item in page.items], "next": page.next.encode()}
    )


routes = [
    Route("/.well-known/jwks.json", jwks, methods=["GET"]),
    Route("/v1/vouchers/{voucher_id}", read, methods=["GET"]),
    Route("/v1/vouchers/{voucher_id}/qr.svg", qr_svg, methods=["GET"]),
    Route("/v1/vouchers/{voucher_id}/qr.png", qr_png, methods=["GET"]),
    Route("/v1/redemptions", redeem, methods=["POST"]),
    Route("/v1/redemptions", redemptions_feed, methods=["GET"]),
    Route("/v1/redemptions/sync", sync, methods=["POST"]),
]
