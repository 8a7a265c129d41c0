"""`flashsale serve` behaves the same under uvicorn and granian: real processes, real signals.

Each test here runs once per server (the README lists them); the rest of the API suite runs
in-process by default and against either server with ``FLASHSALE_TEST_SERVER``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import orjson
import pytest

from api.auth import mint
from engine.settings import Settings
from flashsale.embedded import EmbeddedRedis, free_port
from tests.conftest import flush
from tests.served import ROOT, SERVERS, Served, serve_env

SECRET = "serve-secret-" + "s" * 40

StartServe = Callable[..., Served]


def auth(role: str, sub: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint(SECRET, sub, role)}"}


def new_deal(url: str, inventory: int) -> str:
    ends = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    body = {
        "title": "espresso",
        "lat": 12.97,
        "lng": 77.59,
        "inventory": inventory,
        "ends_at": ends,
    }
    r = httpx.post(f"{url}/v1/deals", json=body, headers=auth("merchant", "m-1"), timeout=10)
    assert r.status_code == 201, r.text
    return r.json()["deal"]["id"]  # type: ignore[no-any-return]


@pytest.fixture(params=SERVERS)
def server(request: pytest.FixtureRequest) -> str:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def start_serve(tmp_path: Path, server: str) -> Iterator[StartServe]:
    """Start `flashsale serve --server <server>` processes (stopped at teardown)."""
    started: list[Served] = []

    def start(settings: Settings, workers: int = 1, **env: str) -> Served:
        settings = settings.with_(auth_secret=SECRET, data_dir=tmp_path / "data")
        log = tmp_path / f"serve-{server}-{len(started)}.log"
        served = Served(server, serve_env(settings, **env), log, workers=workers)
        started.append(served)
        return served.start()

    yield start
    for served in started:
        served.stop()


@pytest.fixture
def node(redis_url: str, migrated_database_url: str) -> Settings:
    flush(redis_url, False)
    return Settings(redis_url=redis_url, database_url=migrated_database_url)


def _raw(port: int, request: bytes, read_timeout_s: float = 5) -> bytes:
    """Send bytes, read until the server closes (or answers in full and goes quiet)."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout_s) as s:
        # The server may answer and close before taking it all: read the answer anyway.
        with contextlib.suppress(OSError):
            s.sendall(request)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            out += chunk
    return out


def _status_and_body(reply: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def test_the_server_is_the_one_asked_for_by_option_or_environment(
    start_serve: StartServe, node: Settings, server: str
) -> None:
    """`--server` is passed by the fixture; the answer's Server header names who served it."""
    served = start_serve(node)
    assert httpx.get(served.url + "/healthz").headers["server"] == server


def test_an_unknown_server_name_is_refused_with_a_message(tmp_path: Path) -> None:
    settings = Settings(redis_url="redis://127.0.0.1:1", auth_secret=SECRET, data_dir=tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "flashsale", "serve", "--port", str(free_port())],
        env=serve_env(settings, FLASHSALE_SERVER="gunicorn"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "FLASHSALE_SERVER must be one of uvicorn, granian" in done.stderr


def test_the_lifespan_opens_redis_and_postgres_before_the_first_request(
    start_serve: StartServe, node: Settings
) -> None:
    served = start_serve(node)
    r = httpx.get(served.url + "/readyz")
    assert r.status_code == 200, r.text
    assert r.json()["checks"] == {"redis": "ok", "postgres": "ok"}


def test_sigterm_finishes_the_request_in_flight_then_exits_cleanly(
    start_serve: StartServe, node: Settings
) -> None:
    """A create-deal request half sent when SIGTERM arrives is still answered 201."""
    served = start_serve(node)
    ends = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    body = orjson.dumps(
        {"title": "in flight", "lat": 1.0, "lng": 2.0, "inventory": 3, "ends_at": ends}
    )
    token = mint(SECRET, "m-1", "merchant")
    head = (
        f"POST /v1/deals HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", served.port), timeout=15) as s:
        s.sendall(head.encode() + body[:10])
        time.sleep(0.5)  # the request is in the server's hands, its body incomplete
        served.terminate()
        time.sleep(1.0)  # the server is shutting down while the request is in flight
        s.sendall(body[10:])
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
    status, _, answer = _status_and_body(reply)
    assert status == 201, reply
    assert orjson.loads(answer)["deal"]["title"] == "in flight"
    assert served.proc is not None
    code = served.proc.wait(20)
    assert code in (0, -15), served.log()  # uvicorn re-raises the SIGTERM it handled
    assert "Traceback" not in served.log()


def test_two_workers_sum_their_metrics(start_serve: StartServe, node: Settings) -> None:
    served = start_serve(node, workers=2)
    for _ in range(60):  # a new connection each: the kernel spreads them over workers
        assert httpx.get(f"{served.url}/v1/deals/d_nothing").status_code == 404
    text = httpx.get(f"{served.url}/metrics").text
    line = next(
        x
        for x in text.splitlines()
        if x.startswith("flashsale_http_requests_total{") and 'route="/v1/deals/{deal_id}"' in x
    )
    assert float(line.rsplit(" ", 1)[1]) == 60.0


def _discovery_deals_read(client: httpx.Client) -> float:
    line = next(
        x
        for x in client.get("/metrics").text.splitlines()
        if x.startswith('flashsale_discovery_work_total{kind="deals_read"}')
    )
    return float(line.rsplit(" ", 1)[1])


def test_two_workers_export_their_discovery_work_without_being_scraped(
    start_serve: StartServe, node: Settings
) -> None:
    """Each worker copies its Discovery.work into the shared metrics on its own, so a
    scrape that always reaches the same worker counts the other's discovery work too."""
    served = start_serve(node, workers=2)
    deals = {new_deal(served.url, 1) for _ in range(3)}  # at one spot
    asked = 40
    for _ in range(asked):  # a new connection each: the kernel spreads them over workers
        r = httpx.get(f"{served.url}/v1/deals?lat=12.97&lng=77.59")
        assert {d["id"] for d in r.json()["deals"]} == deals  # each answer reads all 3
    with httpx.Client(base_url=served.url, timeout=10) as one_worker:  # one connection
        deadline = time.monotonic() + 15
        while (read := _discovery_deals_read(one_worker)) < 3 * asked:
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        cache = [
            x
            for x in one_worker.get("/metrics").text.splitlines()
            if x.startswith("flashsale_discovery_cache_bytes")
        ]
    assert read == 3 * asked
    # One sample, the largest worker's (not one per process), within a worker's bound.
    assert len(cache) == 1 and 0 < float(cache[0].split()[1]) <= node.discovery_cache_bytes


def test_claims_get_503_while_redis_is_down_and_work_again_after(
    start_serve: StartServe, own_redis: EmbeddedRedis, database_url: str
) -> None:
    served = start_serve(Settings(redis_url=own_redis.url, database_url=database_url))
    deal = new_deal(served.url, 5)
    with httpx.Client(base_url=served.url, timeout=10) as client:
        assert (
            client.post(f"/v1/deals/{deal}/claims", headers=auth("user", "u-1")).status_code == 201
        )
        own_redis.stop()
        r = client.post(f"/v1/deals/{deal}/claims", headers=auth("user", "u-2"))
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "unavailable" and int(r.headers["Retry-After"]) >= 1
        own_redis.start()
        r = client.post(f"/v1/deals/{deal}/claims", headers=auth("user", "u-2"))
        assert r.status_code == 201, r.text


def test_a_race_of_2000_callers_gets_exactly_the_inventory(
    start_serve: StartServe, node: Settings
) -> None:
    served = start_serve(node, workers=2)
    deal = new_deal(served.url, 100)
    tokens = [mint(SECRET, f"u-{i}", "user") for i in range(2000)]

    async def race() -> list[tuple[int, Any]]:
        connector = aiohttp.TCPConnector(limit=200)
        async with aiohttp.ClientSession(served.url, connector=connector) as session:

            async def one(token: str) -> tuple[int, Any]:
                headers = {"Authorization": f"Bearer {token}"}
                async with session.post(f"/v1/deals/{deal}/claims", headers=headers) as r:
                    return r.status, await r.json()

            return await asyncio.gather(*(one(t) for t in tokens))

    answers = asyncio.run(race())
    won = [body["voucher"] for status, body in answers if status == 201]
    assert len(won) == 100
    assert len({v["user_id"] for v in won}) == len({v["id"] for v in won}) == 100
    refused = [body["error"]["code"] for status, body in answers if status != 201]
    assert set(refused) == {"sold_out"} and len(refused) == 1900


MALFORMED = {
    "bad Content-Length": (
        b"POST /v1/deals HTTP/1.1\r\nHost: x\r\nContent-Length: 12abc\r\n\r\n{}",
        400,
    ),
    "16 KiB request line": (
        b"GET /v1/deals/" + b"a" * 16384 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        414,
    ),
    "1 MiB header": (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n",
        431,
    ),
    "not HTTP": (b"HELLO THERE\r\n\r\n", 400),
}
JSON_CODES = {400: "bad_request", 414: "uri_too_long", 431: "headers_too_large"}


@pytest.mark.parametrize("case", list(MALFORMED))
@pytest.mark.parametrize("server", ["uvicorn"])
def test_uvicorn_answers_malformed_http_with_a_json_error(
    start_serve: StartServe, node: Settings, case: str
) -> None:
    served = start_serve(node)
    request, status = MALFORMED[case]
    got, headers, body = _status_and_body(_raw(served.port, request))
    assert got == status
    assert headers["content-type"] == "application/json"
    assert orjson.loads(body)["error"]["code"] == JSON_CODES[status]
    assert httpx.get(served.url + "/healthz").status_code == 200  # and it serves on


@pytest.mark.parametrize("case", ["bad Content-Length", "1 MiB header", "not HTTP"])
@pytest.mark.parametrize("server", ["granian"])
def test_granian_answers_malformed_http_with_an_empty_body(
    start_serve: StartServe, node: Settings, case: str
) -> None:
    """The limitation the README documents: hyper writes these answers, without a body.

    (A 16 KiB request line is within granian's buffer: the app answers it, in JSON.)
    """
    served = start_serve(node)
    request, status = MALFORMED[case]
    got, headers, body = _status_and_body(_raw(served.port, request))
    assert got == status
    assert body == b"" and headers["content-length"] == "0"


def test_the_request_head_limits_are_the_same_as_nginx_defaults() -> None:
    """deploy/nginx.conf states the limits flashsale.protocol enforces."""
    from flashsale.protocol import MAX_HEAD_BYTES, MAX_TARGET_BYTES

    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    count, size = re.search(r"large_client_header_buffers (\d+) (\d+)k;", conf).groups()  # type: ignore[union-attr]
    assert int(size) * 1024 == MAX_TARGET_BYTES
    assert int(count) * int(size) * 1024 == MAX_HEAD_BYTES
