"""The OpenAPI 3 document of the public contract (API.md), served at /openapi.json."""

from __future__ import annotations

from functools import cache
from typing import Any

from api import discovery, me
from api.jsonio import MAX_BODY_BYTES, size_text
from api.validation import ID_MAX_CHARS, ID_PATTERN
from api.vouchers import SYNC_MAX_BODY_BYTES
from engine import deals
from engine.redemptions import MAX_SYNC_ENTRIES, SYNC_CODES
from engine.times import MS_PER_DAY
from engine.vouchers import MAX_TOKEN_CHARS

# Every bound below is the constant its validator uses (tests/api/test_openapi.py checks
# each against the running API).
_ID = {"type": "string", "pattern": ID_PATTERN, "maxLength": ID_MAX_CHARS}
_TIME = {"type": "string", "format": "date-time"}
_LAT = {"type": "number", "minimum": -deals.LAT_MAX, "maximum": deals.LAT_MAX}
_LNG = {"type": "number", "minimum": -deals.LNG_MAX, "maximum": deals.LNG_MAX}
_WINDOW_DAYS = deals.MAX_WINDOW_MS // MS_PER_DAY
_REDEEM_DAYS = deals.MAX_REDEEM_AFTER_END_MS // MS_PER_DAY
_REDEEM_DEFAULT_DAYS = deals.DEFAULT_REDEEM_AFTER_END_MS // MS_PER_DAY
_BEARER: list[dict[str, list[str]]] = [{"bearer": []}]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


_RETRY_AFTER = {
    "Retry-After": {
        "description": "Whole seconds to wait before retrying",
        "required": True,
        "schema": {"type": "integer", "minimum": 1},
    }
}


def _errors(*statuses: int, body_limit: int = MAX_BODY_BYTES) -> dict[str, Any]:
    """The error answers of a route limited per caller or per address (every route but
    /healthz, /readyz and /metrics): 429 always, 408 where a body is read (413)."""
    statuses = (*statuses, *((408,) if 413 in statuses else ()), 429)
    text = {
        400: "The body is not JSON",
        401: "Missing, malformed, expired or badly signed token",
        403: "Wrong role or not the owner",
        404: "Not found",
        408: "The body was not received in full in time (the connection is closed)",
        409: "Refused by the deal's state",
        413: f"Body over {size_text(body_limit)}",
        422: "Invalid request: JSON of the wrong shape, or bad fields (details name each)",
        429: "Over a rate limit; retry after Retry-After seconds (details.retry_after_ms)",
        503: "A dependency is down; retry after Retry-After seconds",
    }
    out = {str(s): {"description": text[s], **_json(_ref("Error"))} for s in statuses}
    for status in ("429", "503"):
        if status in out:
            out[status]["headers"] = _RETRY_AFTER
    return out


def _obj(props: dict[str, Any], required: list[str] | None = None, extra: bool = True) -> dict:
    out: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        out["required"] = required
    if not extra:
        out["additionalProperties"] = False
    return out


_SCHEMAS: dict[str, Any] = {
    "Error": _obj(
        {
            "error": _obj(
                {
                    "code": {"type": "string"},
                    "message": {"type": "string"},
                    "details": {"type": "object"},
                },
                ["code", "message", "details"],
            )
        },
        ["error"],
    ),
    "NewDeal": _obj(
        {
            "title": {
                "type": "string",
                "minLength": 1,
                "maxLength": deals.TITLE_MAX_CHARS,
                "description": "Not blank; no control characters but tab and newlines",
            },
            "description": {
                "type": "string",
                "maxLength": deals.DESCRIPTION_MAX_CHARS,
                "nullable": True,
                "description": "No control characters but tab and newlines",
            },
            "lat": _LAT,
            "lng": _LNG,
            "inventory": {"type": "integer", "minimum": 1, "maximum": deals.INVENTORY_MAX},
            "starts_at": {**_TIME, "nullable": True, "description": "Default: now"},
            "ends_at": {
                **_TIME,
                "description": f"In the future; at most {_WINDOW_DAYS} days after starts_at",
            },
            "redeem_until": {
                **_TIME,
                "nullable": True,
                "description": f"Not before ends_at; at most {_REDEEM_DAYS} days after it. "
                f"Default: ends_at + {_REDEEM_DEFAULT_DAYS} days",
            },
        },
        ["title", "lat", "lng", "inventory", "ends_at"],
        extra=False,
    ),
    "Deal": _obj(
        {
            "id": _ID,
            "merchant_id": _ID,
            "title": {"type": "string"},
            "description": {"type": "string"},
            "lat": {"type": "number"},
            "lng": {"type": "number"},
            "inventory_total": {"type": "integer"},
            "inventory_left": {"type": "integer", "minimum": 0},
            "starts_at": _TIME,
            "ends_at": _TIME,
            "redeem_until": _TIME,
            "status": {
                "type": "string",
                "enum": ["scheduled", "active", "sold_out", "ended", "cancelled"],
            },
        },
        [
            "id",
            "merchant_id",
            "title",
            "lat",
            "lng",
            "inventory_total",
            "inventory_left",
            "starts_at",
            "ends_at",
            "redeem_until",
            "status",
        ],
    ),
    "NearbyDeal": {
        "allOf": [
            _ref("Deal"),
            _obj({"distance_km": {"type": "number", "minimum": 0}}, ["distance_km"]),
        ]
    },
    "Voucher": _obj(
        {
            "id": _ID,
            "deal_id": _ID,
            "user_id": _ID,
            "merchant_id": _ID,
            "claimed_at": _TIME,
            "expires_at": _TIME,
            "token": {"type": "string", "description": "compact JWS, ES256, typ vch+jwt"},
            "qr_url": {"type": "string"},
        },
        ["id", "deal_id", "user_id", "merchant_id", "claimed_at", "expires_at", "token", "qr_url"],
    ),
    "VoucherWithStatus": {
        "allOf": [
            _ref("Voucher"),
            _obj({"status": {"type": "string", "enum": ["issued", "redeemed"]}}, ["status"]),
        ]
    },
    "ClaimResult": _obj(
        {"voucher": _ref("Voucher"), "inventory_left": {"type": "integer", "minimum": 0}},
        ["voucher", "inventory_left"],
    ),
    "Redemption": _obj(
        {
            "redemption": _obj(
                {
                    "voucher_id": _ID,
                    "redeemed_at": _TIME,
                    "status": {"type": "string", "enum": ["redeemed"]},
                },
                ["voucher_id", "redeemed_at", "status"],
            )
        },
        ["redemption"],
    ),
    "FeedPage": _obj(
        {
            "redemptions": {
                "type": "array",
                "items": _obj(
                    {
                        "voucher_id": _ID,
                        "redeemed_at": _TIME,
                        "device_id": {**_ID, "nullable": True},
                    },
                    ["voucher_id", "redeemed_at", "device_id"],
                ),
            },
            "next": {"type": "string"},
        },
        ["redemptions", "next"],
    ),
    "SyncRequest": _obj(
        {
            "device_id": _ID,
            "entries": {
                "type": "array",
                "maxItems": MAX_SYNC_ENTRIES,
                "items": _obj(
                    {
                        "entry_id": {
                            **_ID,
                            "description": "Unique per merchant; without one the entry is "
                            "rejected (missing_entry_id)",
                        },
                        "token": {"type": "string"},
                        "redeemed_at": {
                            **_TIME,
                            "description": "The device's time; one that is not RFC 3339 is "
                            "rejected (implausible_time)",
                        },
                    },
                    ["entry_id", "token", "redeemed_at"],
                ),
            },
        },
        ["device_id", "entries"],
    ),
    "SyncResult": _obj(
        {
            "results": {
                "type": "array",
                "items": _obj(
                    {
                        "entry_id": {"type": "string", "nullable": True},
                        "status": {
                            "type": "string",
                            "enum": ["accepted", "duplicate", "conflict", "rejected"],
                        },
                        "code": {
                            "type": "string",
                            "nullable": True,
                            "enum": [*SYNC_CODES, None],
                            "description": "Why an entry was rejected (null otherwise)",
                        },
                        "first_redeemed_at": {**_TIME, "nullable": True},
                        "message": {
                            "type": "string",
                            "description": "A human sentence, on rejected entries",
                        },
                        "first_status": {
                            "type": "string",
                            "enum": ["accepted", "conflict", "rejected"],
                            "description": "On a duplicate: the status of the first upload",
                        },
                        "first_code": {
                            "type": "string",
                            "nullable": True,
                            "enum": [*SYNC_CODES, None],
                            "description": "On a duplicate: the code of the first upload",
                        },
                    },
                    ["entry_id", "status", "code", "first_redeemed_at"],
                ),
            }
        },
        ["results"],
    ),
    "Ready": _obj(
        {
            "status": {"type": "string", "enum": ["ok", "unavailable"]},
            "checks": _obj(
                {
                    "redis": {"type": "string", "enum": ["ok", "down"]},
                    "postgres": {"type": "string", "enum": ["ok", "down"]},
                },
                ["redis", "postgres"],
            ),
            "stream_lag": {"type": "integer", "nullable": True},
        },
        ["status", "checks", "stream_lag"],
    ),
}


_JWKS_HEADERS = {
    "ETag": {"required": True, "schema": {"type": "string"}},
    "Cache-Control": {"required": True, "schema": {"type": "string", "pattern": "max-age="}},
}


def _deal_param() -> dict[str, Any]:
    return {"name": "deal_id", "in": "path", "required": True, "schema": _ID}


def _voucher_param() -> dict[str, Any]:
    return {"name": "voucher_id", "in": "path", "required": True, "schema": _ID}


def _query(name: str, schema: dict[str, Any], required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "schema": schema}


def _paths() -> dict[str, Any]:
    deal_ok = {"description": "The deal", **_json(_obj({"deal": _ref("Deal")}, ["deal"]))}
    return {
        "/v1/deals": {
            "post": {
                "summary": "Create a deal (merchant)",
                "security": _BEARER,
                "requestBody": {"required": True, **_json(_ref("NewDeal"))},
                "responses": {
                    "201": {
                        **deal_ok,
                        "description": "The new deal",
                        "headers": {
                            "Location": {
                                "description": "/v1/deals/{id} of the new deal",
                                "required": True,
                                "schema": {"type": "string", "pattern": "^/v1/deals/"},
                            }
                        },
                    },
                    **_errors(400, 401, 403, 413, 422, 503),
                },
            },
            "get": {
                "summary": "Active deals near a point, nearest first (public)",
                "parameters": [
                    _query("lat", _LAT, True),
                    _query("lng", _LNG, True),
                    _query(
                        "radius_km",
                        {
                            "type": "number",
                            "exclusiveMinimum": True,
                            "minimum": 0,
                            "maximum": discovery.RADIUS_MAX_KM,
                            "default": discovery.RADIUS_DEFAULT_KM,
                        },
                    ),
                    _query(
                        "limit",
                        {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": discovery.LIMIT_MAX,
                            "default": discovery.LIMIT_DEFAULT,
                        },
                    ),
                ],
                "responses": {
                    "200": {
                        "description": "Nearby active deals",
                        **_json(
                            _obj(
                                {
                                    "deals": {"type": "array", "items": _ref("NearbyDeal")},
                                    "count": {"type": "integer"},
                                },
                                ["deals", "count"],
                            )
                        ),
                    },
                    **_errors(422, 503),
                },
            },
        },
        "/v1/deals/{deal_id}": {
            "get": {
                "summary": "A deal with live status (public)",
                "parameters": [_deal_param()],
                "responses": {"200": deal_ok, **_errors(404, 503)},
            }
        },
        "/v1/deals/{deal_id}/cancel": {
            "post": {
                "summary": "Cancel a deal (its merchant): stops new claims at once",
                "security": _BEARER,
                "parameters": [_deal_param()],
                "responses": {"200": deal_ok, **_errors(401, 403, 404, 503)},
            }
        },
        "/v1/deals/{deal_id}/claims": {
            "post": {
                "summary": "Claim a voucher (user); a retry returns the same voucher",
                "security": _BEARER,
                "parameters": [_deal_param()],
                "responses": {
                    "201": {"description": "A new voucher", **_json(_ref("ClaimResult"))},
                    "200": {
                        "description": "The voucher already held",
                        **_json(_ref("ClaimResult")),
                    },
                    **_errors(401, 403, 404, 409, 503),
                },
            }
        },
        "/v1/vouchers/{voucher_id}": {
            "get": {
                "summary": "A voucher and its status (the holder or the deal's merchant)",
                "security": _BEARER,
                "parameters": [_voucher_param()],
                "responses": {
                    "200": {
                        "description": "The voucher",
                        **_json(
                            _obj(
                                {
                                    "voucher": _ref("Voucher"),
                                    "status": {"type": "string", "enum": ["issued", "redeemed"]},
                                },
                                ["voucher", "status"],
                            )
                        ),
                    },
                    **_errors(401, 404, 503),
                },
            }
        },
        "/v1/vouchers/{voucher_id}/qr.svg": {
            "get": {
                "summary": "The voucher token as an SVG QR code (the holder)",
                "security": _BEARER,
                "parameters": [_voucher_param()],
                "responses": {
                    "200": {"description": "SVG", "content": {"image/svg+xml": {}}},
                    **_errors(401, 404, 503),
                },
            }
        },
        "/v1/vouchers/{voucher_id}/qr.png": {
            "get": {
                "summary": "The voucher token as a PNG QR code (the holder)",
                "security": _BEARER,
                "parameters": [_voucher_param()],
                "responses": {
                    "200": {"description": "PNG", "content": {"image/png": {}}},
                    **_errors(401, 404, 503),
                },
            }
        },
        "/v1/me/vouchers": {
            "get": {
                "summary": "The caller's vouchers, newest first (user)",
                "security": _BEARER,
                "parameters": [
                    _query(
                        "limit",
                        {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": me.MAX_LIMIT,
                            "default": me.DEFAULT_LIMIT,
                        },
                    ),
                    _query("cursor", {"type": "string", "maxLength": me.CURSOR_MAX_CHARS}),
                ],
                "responses": {
                    "200": {
                        "description": "A page of vouchers",
                        **_json(
                            _obj(
                                {
                                    "vouchers": {
                                        "type": "array",
                                        "items": _ref("VoucherWithStatus"),
                                    },
                                    "next_cursor": {"type": "string", "nullable": True},
                                },
                                ["vouchers", "next_cursor"],
                            )
                        ),
                    },
                    **_errors(401, 403, 422, 503),
                },
            }
        },
        "/v1/redemptions": {
            "post": {
                "summary": "Redeem a voucher online (merchant)",
                "security": _BEARER,
                "requestBody": {
                    "required": True,
                    **_json(
                        _obj(
                            {
                                "token": {
                                    "type": "string",
                                    "minLength": 1,
                                    "maxLength": MAX_TOKEN_CHARS,
                                }
                            },
                            ["token"],
                            extra=False,
                        )
                    ),
                },
                "responses": {
                    "200": {"description": "Redeemed", **_json(_ref("Redemption"))},
                    **_errors(400, 401, 403, 409, 413, 422, 503),
                },
            },
            "get": {
                "summary": "The caller's accepted redemptions, in the order accepted (merchant)",
                "description": "Pass `next` back as `after`: it is returned even when the"
                " page is empty, and a later call with it returns only what came after.",
                "security": _BEARER,
                "parameters": [
                    _query(
                        "limit",
                        {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                    ),
                    _query("after", {"type": "string"}),
                ],
                "responses": {
                    "200": {"description": "A page of the feed", **_json(_ref("FeedPage"))},
                    **_errors(401, 403, 422, 503),
                },
            },
        },
        "/v1/redemptions/sync": {
            "post": {
                "summary": "Upload an offline redemption log (merchant), at most "
                f"{MAX_SYNC_ENTRIES} entries",
                "security": _BEARER,
                "requestBody": {"required": True, **_json(_ref("SyncRequest"))},
                "responses": {
                    "200": {
                        "description": "One result per entry, in order",
                        **_json(_ref("SyncResult")),
                    },
                    **_errors(400, 401, 403, 413, 422, 503, body_limit=SYNC_MAX_BODY_BYTES),
                },
            }
        },
        "/.well-known/jwks.json": {
            "get": {
                "summary": "Public keys that may verify a live voucher (public)",
                "responses": {
                    "200": {
                        "description": "JWKS",
                        "headers": _JWKS_HEADERS,
                        **_json(
                            _obj({"keys": {"type": "array", "items": {"type": "object"}}}, ["keys"])
                        ),
                    },
                    "304": {
                        "description": "Not modified: If-None-Match named the current ETag",
                        "headers": _JWKS_HEADERS,
                    },
                    **_errors(),
                },
            }
        },
        "/healthz": {
            "get": {
                "summary": "The process is up",
                "responses": {"200": {"description": "Up", **_json({"type": "object"})}},
            }
        },
        "/readyz": {
            "get": {
                "summary": "Redis and PostgreSQL answer",
                "responses": {
                    "200": {"description": "Ready", **_json(_ref("Ready"))},
                    "503": {
                        "description": "Not ready",
                        "headers": _RETRY_AFTER,
                        **_json(_ref("Ready")),
                    },
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {
                    "200": {"description": "Prometheus text", "content": {"text/plain": {}}}
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "responses": {
                    "200": {"description": "OpenAPI 3", **_json({"type": "object"})},
                    **_errors(),
                },
            }
        },
    }


@cache
def document() -> dict[str, Any]:
    """The whole document (built once)."""
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "flashsale",
            "version": "1.0.0",
            "description": "Hyperlocal flash sales: deals, claims, vouchers, redemptions.",
        },
        "paths": _paths(),
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
        },
    }
