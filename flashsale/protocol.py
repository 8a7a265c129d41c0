"""uvicorn's httptools protocol, answering malformed HTTP with the API's JSON error body.

uvicorn answers a request it cannot parse (a bad ``Content-Length``, garbage instead of a
request line) itself, in plain text, before the app sees anything; and httptools puts no
bound on a request line or a header block. API.md wants every error JSON, including the
HTTP server's own, so this protocol keeps uvicorn's parsing and connection handling and
changes only those answers, and bounds the request head as nginx does by default:

- a request line's target over ``MAX_TARGET_BYTES``: ``414 uri_too_long``;
- a request head (line and headers) over ``MAX_HEAD_BYTES``: ``431 headers_too_large``;
- anything httptools refuses: ``400 bad_request``.

Each ends the connection (the stream cannot be trusted after a parse error) with a
lingering close, as nginx does: our side is shut for writing, whatever the client still
sends is read and dropped for up to ``LINGER_S``, so that closing with unread data does not
reset the connection before the client has read the answer.
"""

from __future__ import annotations

import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

# nginx's defaults (large_client_header_buffers 4 8k): an 8 KiB request line, 32 KiB of head.
MAX_TARGET_BYTES = 8 * 1024
MAX_HEAD_BYTES = 32 * 1024
LINGER_S = 2.0

REFUSALS: dict[int, tuple[str, str]] = {
    400: ("bad_request", "The request is not valid HTTP/1.1."),
    414: ("uri_too_long", f"The request target is over {MAX_TARGET_BYTES} bytes."),
    431: ("headers_too_large", f"The request line and headers are over {MAX_HEAD_BYTES} bytes."),
}


def refusal_bytes(status: int, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    """A whole HTTP/1.1 response carrying the API's JSON error body; the connection closes."""
    code, message = REFUSALS[status]
    body = orjson.dumps({"error": {"code": code, "message": message, "details": {}}})
    head = [STATUS_LINE[status]]
    for name, value in default_headers:
        head += [name, b": ", value, b"\r\n"]
    head += [
        b"content-type: application/json\r\ncontent-length: ",
        str(len(body)).encode(),
        b"\r\nconnection: close\r\n\r\n",
    ]
    return b"".join(head) + body


class _TargetTooLong(Exception):
    """Raised inside the parser's callback; httptools re-raises it as a parser error."""


class JsonErrorsProtocol(HttpToolsProtocol):
    """``uvicorn --http flashsale.protocol:JsonErrorsProtocol``: JSON refusals, bounded heads."""

    _in_head = True
    _head_bytes = 0
    _refusal = 400
    _refused = False

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # lingering: dropped
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        # Headers still incomplete after this much: refuse before buffering any more.
        over = self._in_head and self._head_bytes > MAX_HEAD_BYTES
        if over and self.parser is not None and not self.transport.is_closing():
            self._refuse(431)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = 0

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > MAX_TARGET_BYTES:
            self._refusal = 414
            raise _TargetTooLong

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        # uvicorn calls this for every parser error; ours carry their own status.
        self._refuse(self._refusal)

    def _refuse(self, status: int) -> None:
        self._refused = True
        self.transport.write(refusal_bytes(status, self.server_state.default_headers))
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.loop.call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()

    def eof_received(self) -> None:
        if self._refused:
            self.transport.close()  # the client is done too: no need to linger
