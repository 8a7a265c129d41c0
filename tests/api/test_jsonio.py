"""Bodies in time (api/jsonio.py ``BodyDeadline``): a body trickled past the deadline is
408 JSON and the connection is closed, while the API goes on serving everyone else."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable

import httpx
import pytest

from engine.settings import Settings
from tests.api.conftest import RunningApi
from tests.conftest import flush

# Between two of the client's one-a-second bytes, so that the answer and a byte do not
# cross on the wire.
DEADLINE_S = 2.5


@pytest.fixture
def slow_api(
    make_api: Callable[..., RunningApi], redis_url: str, migrated_database_url: str
) -> RunningApi:
    flush(redis_url, False)
    settings = Settings(
        redis_url=redis_url, database_url=migrated_database_url, body_timeout_s=DEADLINE_S
    )
    return make_api(settings)


def _read_all(sock: socket.socket, answered: threading.Event) -> bytes:
    """Everything the server sends until it closes the connection.

    A byte the client sends after the server closed is answered with a reset, which may
    overtake the end of the stream: after an answer, a reset is the end too.
    """
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            if not data:
                raise
            return data
        if not chunk:
            return data
        data += chunk
        answered.set()


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_body_trickled_one_byte_a_second_is_408_json_and_the_connection_closes(
    slow_api: RunningApi, framing: str
) -> None:
    host, port = slow_api.url.removeprefix("http://").split(":")
    token = slow_api.token("merchant", "m-1")
    length = "Content-Length: 200" if framing == "content-length" else "Transfer-Encoding: chunked"
    head = (
        f"POST /v1/deals HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"{length}\r\nAuthorization: Bearer {token}\r\n\r\n"
    ).encode()
    served: list[int] = []
    stop, answered = threading.Event(), threading.Event()

    def others() -> None:  # meanwhile, another client is served as usual
        with httpx.Client(base_url=slow_api.url, timeout=5) as client:
            while not stop.is_set():
                served.append(client.get("/healthz").status_code)
                time.sleep(0.1)

    with socket.create_connection((host, int(port)), timeout=4 * DEADLINE_S) as sock:
        started = time.monotonic()  # before the head: the server's clock starts after it
        sock.sendall(head)

        def trickle() -> None:
            pieces = [b"1\r\n{\r\n", b"1\r\n \r\n"] if framing == "chunked" else [b"{", b" "]
            for i in range(int(3 * DEADLINE_S)):
                if answered.is_set():
                    return  # the server has answered: the client stops
                try:
                    sock.sendall(pieces[min(i, 1)])
                except OSError:
                    return  # the server closed the connection
                time.sleep(1)

        helpers = [threading.Thread(target=trickle), threading.Thread(target=others)]
        for t in helpers:
            t.start()
        try:
            answer = _read_all(sock, answered)  # returns once the server has closed the connection
            waited = time.monotonic() - started
        finally:
            stop.set()
            for t in helpers:
                t.join(10)
    head_text, _, body = answer.partition(b"\r\n\r\n")
    assert head_text.startswith(b"HTTP/1.1 408"), answer
    assert b"connection: close" in head_text.lower()
    error = json.loads(body)["error"]
    assert error["code"] == "request_timeout" and error["details"]["timeout_s"] == DEADLINE_S
    assert waited >= DEADLINE_S
    assert served and set(served) == {200}


def test_a_body_sent_in_time_is_read_as_usual(slow_api: RunningApi) -> None:
    """The deadline times the body only: a quick POST, then GETs on the same connection."""
    with httpx.Client(base_url=slow_api.url, timeout=10) as client:
        r = client.post("/v1/deals", content=b"[]", headers=slow_api.auth("merchant", "m-1"))
        assert r.status_code == 422
        assert client.get("/healthz").status_code == 200
