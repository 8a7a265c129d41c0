"""``GET /v1/me/vouchers``: the caller's vouchers from PostgreSQL, newest first.

A voucher just claimed appears once the persister has written it (its lag). The cursor
is opaque to clients: base64url of ``<claimed_at_ms>:<voucher id>`` of the last item.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from api.jsonio import json
from api.services import services
from api.validation import query_int, valid_id
from engine import base64url
from engine.claims import Voucher
from engine.errors import DatabaseUnavailable, InvalidRequest
from engine.vouchers import voucher_json

DEFAULT_LIMIT = 20
MAX_LIMIT = 100
CURSOR_MAX_CHARS = 200  # ours are under 120 (a 15-digit time and a 64-character id)


def encode_cursor(claimed_ms: int, voucher_id: str) -> str:
    return base64url.encode(f"{claimed_ms}:{voucher_id}".encode())


def decode_cursor(cursor: str) -> tuple[int, str]:
    """``(claimed_at_ms, voucher_id)``; ``ValueError`` if it is not one of ours."""
    if len(cursor) > CURSOR_MAX_CHARS:
        raise ValueError("too long")
    raw = base64url.decode(cursor).decode()  # a UnicodeDecodeError is a ValueError
    ms, sep, voucher_id = raw.partition(":")
    if not sep or not ms.isdigit() or len(ms) > 15 or not valid_id(voucher_id):
        raise ValueError("not a cursor")
    return int(ms), voucher_id


def _item(row: Any, token_for: Any) -> dict[str, Any]:
    voucher = Voucher(
        voucher_id=row["id"],
        deal_id=row["deal_id"],
        user_id=row["user_id"],
        merchant_id=row["merchant_id"],
        seq=int(row["seq"]),
        claimed_at_ms=int(row["claimed_ms"]),
        redeem_until_ms=int(row["redeem_until_ms"]),
    )
    item = voucher_json(voucher, token_for(voucher))
    item["status"] = "redeemed" if row["redeemed"] else "issued"
    return item


async def my_vouchers(request: Request) -> Response:
    svc = services(request)
    caller = svc.auth.require(request.headers.get("authorization"), "user")
    params = request.query_params
    problems: dict[str, str] = {}
    # Unknown parameters are ignored, as on every GET (cache-busters are common).
    limit = query_int(params, "limit", problems, default=DEFAULT_LIMIT, low=1, high=MAX_LIMIT)
    before = None
    cursor = params.get("cursor")
    if cursor:
        try:
            before = decode_cursor(cursor)
        except ValueError:
            problems["cursor"] = "not a cursor this server returned"
    if problems:
        raise InvalidRequest(f"Invalid fields: {', '.join(sorted(problems))}.", fields=problems)
    assert limit is not None
    if svc.records is None:
        raise DatabaseUnavailable()
    rows = await svc.records.user_vouchers(caller.id, limit + 1, before)
    page = rows[:limit]
    items = [_item(r, svc.signer.sign) for r in page]
    next_cursor = None
    if len(rows) > limit:
        last = page[-1]
        next_cursor = encode_cursor(int(last["claimed_ms"]), last["id"])
    return json({"vouchers": items, "next_cursor": next_cursor})


routes = [Route("/v1/me/vouchers", my_vouchers, methods=["GET"])]
