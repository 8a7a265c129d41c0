"""JSON in and out: orjson responses, bounded body reading, strict parsing.

Bodies are bounded in size (``read_body``) and in time (``BodyDeadline``): a body not
received in full within ``Settings.body_timeout_s`` of the request's head is 408
``request_timeout``, and the connection is closed, so that a client trickling bytes holds
a connection and a handler for that long at most.
"""

from __future__ import annotations

import asyncio
import json as stdjson
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.errors import InvalidJson, InvalidRequest, PayloadTooLarge, RequestTimeout

MAX_BODY_BYTES = 64 * 1024
MAX_DEPTH = 32


class JSONResponse(Response):
    """A JSON response rendered by orjson."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def json(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(content, status_code=status, headers=headers)


def size_text(limit_bytes: int) -> str:
    """A body limit as people read it: ``64 KiB``, ``1 MiB``."""
    mib, rest = divmod(limit_bytes, 1024 * 1024)
    return f"{mib} MiB" if rest == 0 else f"{limit_bytes // 1024} KiB"


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"The request body is over {size_text(limit)}.", limit_bytes=limit)


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed ``limit``.

    A ``Content-Length`` over the limit is refused before anything is read; a chunked
    body is read only up to the limit.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InvalidRequest("Content-Length is not a number.")
        if int(declared) > limit:
            raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _lenient_loads(body: bytes, first_error: Exception) -> Any:
    """Tell valid JSON that orjson cannot hold (integers past 64 bits) from invalid JSON.

    Valid JSON must reach the validators and earn a 422 naming the field, not a 400.
    """
    try:
        return stdjson.loads(body, parse_constant=_no_constants)
    except (ValueError, RecursionError):
        # Invalid UTF-8, NaN/Infinity, garbage, or nesting deeper than the parser goes.
        raise InvalidJson(f"The request body is not valid JSON: {first_error}.") from None


def _depth(value: Any, limit: int) -> int:
    stack = [(value, 1)]
    deepest = 0
    while stack:
        v, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > limit:
            return deepest
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
    return deepest


# What a client sent instead of an object, in JSON's words (bool is not a number here).
_JSON_KINDS = {
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}


async def read_json_object(request: Request, limit: int = MAX_BODY_BYTES) -> dict[str, Any]:
    """Parse the body as one JSON object.

    A body that is not JSON is 400 ``invalid_json``; JSON of another shape (an array, a
    string, a number, null) is 422 ``invalid_request``, naming the body as the bad field.
    """
    body = await read_body(request, limit)
    if not body.strip():
        raise InvalidJson("The request body is empty; a JSON object is expected.")
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        value = _lenient_loads(body, exc)
    if _depth(value, MAX_DEPTH) > MAX_DEPTH:
        raise InvalidJson(f"The request body is nested deeper than {MAX_DEPTH} levels.")
    if not isinstance(value, dict):
        got = _JSON_KINDS.get(type(value), "something else")
        raise InvalidRequest(
            f"The request body must be a JSON object, not {got}.",
            fields={"body": f"must be a JSON object, not {got}"},
        )
    return value


class BodyDeadline:
    """Pure ASGI middleware: the request body must arrive within ``timeout_s`` of the head.

    Reading past the deadline raises ``RequestTimeout`` inside the handler that reads it
    (the app's handlers answer it in JSON, with ``Connection: close``). Only the body's
    messages are timed; once it is complete, ``receive`` is the server's own again (a
    streaming response waits on it for the client's disconnect).
    """

    def __init__(self, app: ASGIApp, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        complete = False

        async def receive_by_deadline() -> Message:
            nonlocal complete
            if complete:
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise RequestTimeout(
                    f"The request body was not received within {self.timeout_s:g} s.",
                    timeout_s=self.timeout_s,
                ) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                complete = True
            return message

        await self.app(scope, receive_by_deadline, send)
