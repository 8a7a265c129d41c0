"""One place that turns every failure into the API's JSON error body.

The caller's mistakes (``ClientError``) and dependencies being down (``Unavailable``)
carry their own status and code; anything else is our bug: 500, with a request id that
is also in the log, and never a stack trace on the wire.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Send

from api.jsonio import json
from engine.errors import FlashsaleError, RateLimited, RequestTimeout, Unavailable

log = logging.getLogger("flashsale.api")

_HTTP_CODES = {
    400: ("bad_request", "The request is malformed."),
    404: ("not_found", "There is nothing at this path."),
    405: ("method_not_allowed", "This method is not allowed on this path."),
    413: ("payload_too_large", "The request body is over 64 KiB."),
}


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details or {}}}


def _headers(exc: FlashsaleError) -> dict[str, str]:
    if isinstance(exc, Unavailable | RateLimited):
        return {"Retry-After": str(exc.retry_after_s)}
    if isinstance(exc, RequestTimeout):
        # The rest of the body may still be on its way: this connection cannot be reused.
        return {"Connection": "close"}
    return {}


def error_response(exc: FlashsaleError) -> Response:
    """The JSON error answer of a deliberate error (a client's mistake or a 503)."""
    return json(error_body(exc.code, exc.message, exc.details), exc.status, _headers(exc))


async def send_error(send: Send, exc: FlashsaleError) -> None:
    """``error_response``'s bytes as two ASGI messages, without a Response object: for the
    hot answers (a claim's refusals, the rate limiter's 429) sent outside the router."""
    body = orjson.dumps(error_body(exc.code, exc.message, exc.details))
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    headers += [(k.lower().encode(), v.encode()) for k, v in _headers(exc).items()]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def on_flashsale_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, FlashsaleError)
    if exc.status >= 500 and not isinstance(exc, Unavailable):
        return await on_bug(request, exc)
    return error_response(exc)


async def on_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code, message = _HTTP_CODES.get(exc.status_code, ("error", str(exc.detail)))
    details: dict[str, Any] = {}
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        # Starlette names only the first matching route's methods; one path may be
        # served by several routes (GET and POST /v1/deals live in different areas).
        headers["Allow"] = details["allow"] = _allowed(request) or headers.get("Allow", "")
    return json(error_body(code, message, details), exc.status_code, headers)


def _allowed(request: Request) -> str:
    methods: set[str] = set()
    for route in getattr(request.app, "routes", ()):
        if isinstance(route, Route) and route.path_regex.match(request.url.path):
            methods |= set(route.methods or ())
    return ", ".join(sorted(methods))


async def on_bug(request: Request, exc: Exception) -> Response:
    request_id = uuid.uuid4().hex
    log.error(
        "unhandled error request_id=%s %s %s",
        request_id,
        request.method,
        request.url.path,
        exc_info=exc,
    )
    body = error_body("internal", "Something went wrong on our side.", {"request_id": request_id})
    return json(body, 500, {"X-Request-Id": request_id})


def handlers() -> dict[Any, Any]:
    return {
        FlashsaleError: on_flashsale_error,
        HTTPException: on_http_exception,
        Exception: on_bug,
    }
