"""Scale-out on one machine: Debian's nginx with deploy/nginx.conf in front of three
`flashsale serve` processes and two persisters over one Redis (and over the local Redis
Cluster); nginx's own answers to malformed and slow clients. The config is the project's
own, adapted only in ports, addresses and the paths of its pid and temp files
(``loadtest/balancer.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import httpx
import orjson
import pytest

from api.auth import mint
from engine.settings import Settings
from flashsale.serve import DEFAULT_SERVER
from loadtest.balancer import Nginx, nginx_binary
from tests.conftest import flush
from tests.persister.conftest import drop_database, fresh_database
from tests.served import ROOT, Served, serve_env

SECRET = "scale-secret-" + "s" * 40
API_PROCESSES = 3
INVENTORY = 600
CALLERS = 2400
CONCURRENCY = 100
KILL_AFTER_ANSWERS = 300
# Every test client is 127.0.0.1: per-address limits (FLASHSALE_RATE_ADDRESS) would throttle
# the whole race as one person, so they stay off here; nginx is the trusted proxy.
API_ENV = {"FLASHSALE_RATE_ADDRESS": "0", "FLASHSALE_TRUSTED_PROXIES": "127.0.0.1"}


@pytest.fixture(autouse=True)
def _nginx_installed() -> None:
    if nginx_binary() is None:
        pytest.skip("nginx is not installed (Debian: apt-get install nginx-light)")


@dataclass
class Stack:
    settings: Settings
    apis: list[Served]
    persisters: list[subprocess.Popen[bytes]]
    nginx: Nginx
    tmp: Path


@pytest.fixture
async def stack_db(database_url: str) -> AsyncIterator[str]:
    """A fresh database: reconcile must see only this test's deals."""
    dsn = await fresh_database(database_url)
    try:
        yield dsn
    finally:
        await drop_database(database_url, dsn)


def start_stack(settings: Settings, server: str, tmp: Path) -> Stack:
    settings = settings.with_(auth_secret=SECRET, data_dir=tmp / "data")
    apis: list[Served] = []
    persisters: list[subprocess.Popen[bytes]] = []
    nginx: Nginx | None = None
    try:
        for i in range(API_PROCESSES):
            served = Served(server, serve_env(settings, **API_ENV), tmp / f"api-{i}.log")
            apis.append(served.start())
        for i in range(2):
            with open(tmp / f"persister-{i}.log", "ab") as log:
                persisters.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "flashsale", "persist"],
                        env=serve_env(settings),
                        cwd=ROOT,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        nginx = Nginx([a.port for a in apis], tmp / "nginx").start()
    except BaseException:
        stop_stack(Stack(settings, apis, persisters, nginx or Nginx([], tmp), tmp))
        raise
    return Stack(settings, apis, persisters, nginx, tmp)


def stop_stack(stack: Stack) -> None:
    stack.nginx.stop()
    for api in stack.apis:
        api.stop()
    for p in stack.persisters:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


@pytest.fixture
def stack_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[Stack] = []

    def start(settings: Settings, server: str) -> Stack:
        stack = start_stack(settings, server, tmp_path)
        started.append(stack)
        return stack

    yield start
    for stack in started:
        stop_stack(stack)


def create_deal(url: str, inventory: int) -> str:
    ends = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    body = {
        "title": "scale-out",
        "lat": 12.97,
        "lng": 77.59,
        "inventory": inventory,
        "ends_at": ends,
    }
    headers = {"Authorization": f"Bearer {mint(SECRET, 'm-1', 'merchant')}"}
    r = httpx.post(f"{url}/v1/deals", json=body, headers=headers, timeout=10)
    assert r.status_code == 201, r.text
    return r.json()["deal"]["id"]  # type: ignore[no-any-return]


Answer = tuple[str, int, Any]  # (user, status, JSON body or the raw text if not JSON)
CUT = 0  # the status of an answer cut short when its API process was killed mid-response


async def claim_all(url: str, deal: str, users: list[str], on_answer: Any = None) -> list[Answer]:
    """Each user claims once, CONCURRENCY at a time, through ``url``."""
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as session:

        async def one(user: str) -> Answer:
            headers = {"Authorization": f"Bearer {mint(SECRET, user, 'user')}"}
            try:
                async with session.post(f"/v1/deals/{deal}/claims", headers=headers) as r:
                    status, text = r.status, await r.read()
            except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError) as exc:
                # The killed process had sent the head of its answer, not the body: nginx
                # can only cut the response short. The claim may have landed; a retry says.
                status, text = CUT, repr(exc).encode()
            try:
                body: Any = orjson.loads(text)
            except orjson.JSONDecodeError:
                body = text.decode(errors="replace")
            if on_answer is not None:
                on_answer()
            return user, status, body

        return await asyncio.gather(*(one(u) for u in users))


def run_race(stack: Stack, deal: str) -> tuple[list[Answer], Served]:
    """The race through nginx; one API process SIGKILLed once KILL_AFTER_ANSWERS answered."""
    victim = stack.apis[1]
    answered = 0

    def on_answer() -> None:
        nonlocal answered
        answered += 1
        if answered == KILL_AFTER_ANSWERS:
            victim.kill()  # SIGKILL, mid-race: its in-flight requests die with it

    users = [f"u-{i}" for i in range(CALLERS)]
    answers = asyncio.run(claim_all(stack.nginx.url, deal, users, on_answer))
    return answers, victim


async def persisted(dsn: str, deal: str) -> list[tuple[str, str]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT id, user_id FROM vouchers WHERE deal_id = $1", deal)
    finally:
        await conn.close()
    return [(r["id"], r["user_id"]) for r in rows]


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("topology", "server"),
    [
        ("node", "uvicorn"),
        ("node", "granian"),
        pytest.param("cluster", DEFAULT_SERVER, marks=pytest.mark.cluster),
    ],
    indirect=["topology"],
)
def test_race_through_nginx_over_three_api_processes_survives_one_killed(
    stack_factory: Any, topology: tuple[str, bool], stack_db: str, server: str
) -> None:
    """Exactly N vouchers for N people; only the killed process's requests fail, in JSON."""
    url, cluster = topology
    flush(url, cluster)
    stack = stack_factory(
        Settings(redis_url=url, redis_cluster=cluster, database_url=stack_db), server
    )
    deal = create_deal(stack.nginx.url, INVENTORY)
    answers, victim = run_race(stack, deal)
    assert victim.proc is not None and victim.proc.poll() is not None, "the victim still runs"

    failed = [(user, status, body) for user, status, body in answers if status in (CUT, 502)]
    # Only requests in flight on the killed process can fail: at most the client's
    # concurrency, each a 502 from nginx in the API's JSON error shape, or an answer cut
    # short after its head had left the process.
    assert len(failed) <= CONCURRENCY, failed[:5]
    for _, status, body in failed:
        assert status == CUT or body["error"]["code"] == "bad_gateway", body
    others = {status for _, status, _ in answers if status not in (CUT, 502)}
    assert others <= {201, 409}, others
    refused = {body["error"]["code"] for _, status, body in answers if status == 409}
    assert refused <= {"sold_out"}

    # A caller whose claim died with the process retries: the same voucher, or sold out.
    retried = asyncio.run(claim_all(stack.nginx.url, deal, [u for u, _, _ in failed]))
    assert {status for _, status, _ in retried} <= {200, 201, 409}
    won = {
        user: body["voucher"]["id"]
        for user, status, body in answers + retried
        if status in (200, 201)
    }
    assert len(won) == INVENTORY
    assert len(set(won.values())) == INVENTORY

    done = subprocess.run(
        [sys.executable, "-m", "flashsale", "reconcile", "--wait", "60"],
        env=serve_env(stack.settings),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = asyncio.run(persisted(stack_db, deal))
    assert len(rows) == INVENTORY
    assert {user: vid for vid, user in rows} == won
    assert all(p.poll() is None for p in stack.persisters), "a persister died"


MALFORMED = {
    "bad Content-Length": (
        b"POST /v1/deals HTTP/1.1\r\nHost: x\r\nContent-Length: 12abc\r\n\r\n",
        400,
        "bad_request",
    ),
    "16 KiB request line": (
        b"GET /v1/deals/" + b"a" * 16384 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        414,
        "uri_too_long",
    ),
    "64 KiB header": (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 65536 + b"\r\n\r\n",
        431,
        "headers_too_large",
    ),
    "not HTTP": (b"HELLO THERE\r\n\r\n", 400, "bad_request"),
    "body over 2 MiB": (
        b"POST /v1/redemptions/sync HTTP/1.1\r\nHost: x\r\nContent-Length: 3000000\r\n\r\n{",
        413,
        "payload_too_large",
    ),
}


def raw_request(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        with contextlib.suppress(OSError):
            s.sendall(request)
        reply = b""
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := s.recv(65536):
                reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    return int(lines[0].split()[1]), headers, body


@pytest.fixture
def front(tmp_path: Path, redis_url: str) -> Iterator[tuple[Nginx, Served]]:
    """nginx in front of one API process."""
    flush(redis_url, False)
    settings = Settings(redis_url=redis_url, auth_secret=SECRET, data_dir=tmp_path / "data")
    api = Served(DEFAULT_SERVER, serve_env(settings, **API_ENV), tmp_path / "api.log").start()
    nginx = Nginx([api.port], tmp_path / "nginx")
    try:
        yield nginx.start(), api
    finally:
        nginx.stop()
        api.stop()


@pytest.mark.parametrize("case", list(MALFORMED))
def test_nginx_answers_malformed_requests_with_a_json_error(
    front: tuple[Nginx, Served], case: str
) -> None:
    nginx, _ = front
    request, status, code = MALFORMED[case]
    got, headers, body = raw_request(nginx.port, request)
    assert got == status, body
    assert headers["content-type"] == "application/json"
    assert orjson.loads(body)["error"]["code"] == code


def test_nginx_answers_502_in_json_when_no_api_process_is_left(
    front: tuple[Nginx, Served],
) -> None:
    nginx, api = front
    assert httpx.get(nginx.url + "/v1/deals/d_none").json()["error"]["code"] == "deal_not_found"
    api.kill()
    r = httpx.get(nginx.url + "/v1/deals/d_none")
    assert r.status_code == 502 and r.headers["content-type"] == "application/json"
    assert r.json()["error"]["code"] == "bad_gateway" and int(r.headers["Retry-After"]) >= 1


def test_the_api_s_own_errors_pass_through_nginx_untouched(front: tuple[Nginx, Served]) -> None:
    """proxy_intercept_errors stays off: a 404 or 503 of the API keeps its own body."""
    nginx, api = front
    direct = httpx.get(api.url + "/v1/deals/d_none")
    proxied = httpx.get(nginx.url + "/v1/deals/d_none")
    assert proxied.status_code == direct.status_code == 404
    assert proxied.json() == direct.json()


# deploy/nginx.conf's timeouts are the contract's and are not adapted for tests, so each
# slow-client test waits about 10 s. This bound only stops a test that gets nothing.
SLOW_CLIENT_WAIT_S = 30


def slow_client(port: int, head: bytes, piece: bytes) -> bytes:
    """Sends ``head``, then ``piece`` once a second (nothing if it is empty) until answered.

    Returns everything the server sent, once it has closed the connection.
    """
    reply = b""
    deadline = time.monotonic() + SLOW_CLIENT_WAIT_S
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(head)
        s.settimeout(1)
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                if piece and not reply:
                    with contextlib.suppress(OSError):
                        s.sendall(piece)
                continue
            except ConnectionResetError:
                return reply  # our byte after the server's close was answered with a reset
            if not chunk:
                return reply
            reply += chunk
    raise AssertionError(f"the connection was still open after {SLOW_CLIENT_WAIT_S} s: {reply!r}")


@contextlib.contextmanager
def others_served(url: str) -> Iterator[list[int]]:
    """Meanwhile, another client asks GET /healthz through nginx over and over."""
    statuses: list[int] = []
    stop = threading.Event()

    def ask() -> None:
        with httpx.Client(base_url=url, timeout=5) as client:
            while not stop.is_set():
                statuses.append(client.get("/healthz").status_code)
                stop.wait(0.2)

    thread = threading.Thread(target=ask)
    thread.start()
    try:
        yield statuses
    finally:
        stop.set()
        thread.join(10)


@pytest.mark.slow
def test_a_slow_body_through_nginx_gets_the_api_s_json_408_and_the_connection_closes(
    front: tuple[Nginx, Served],
) -> None:
    """A trickled or a stalled body: the API times it (nginx streams it through)."""
    nginx, _ = front
    auth = f"Authorization: Bearer {mint(SECRET, 'm-1', 'merchant')}\r\n"
    post = f"POST /v1/deals HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{auth}"
    trickled = (post + "Content-Length: 100\r\n\r\n").encode()  # then a byte a second
    stalled = (post + "Transfer-Encoding: chunked\r\n\r\n1\r\n{\r\n").encode()  # then nothing
    with others_served(nginx.url) as statuses, ThreadPoolExecutor(2) as pool:
        replies = list(pool.map(slow_client, [nginx.port] * 2, [trickled, stalled], [b" ", b""]))
    for reply in replies:  # slow_client returned: the connection is closed
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 "), reply
        assert b"content-type: application/json" in head.lower()
        error = orjson.loads(body)["error"]
        assert error["code"] == "request_timeout" and error["details"] == {"timeout_s": 10}
    assert statuses and set(statuses) == {200}


@pytest.mark.slow
def test_a_request_head_never_completed_is_closed_by_nginx_without_an_answer(
    front: tuple[Nginx, Served],
) -> None:
    """nginx never answers its own timeouts (no 408 to put an error_page on)."""
    nginx, _ = front
    head = b"POST /v1/deals HTTP/1.1\r\nHost: x\r\nX-Slow: "  # then a byte a second
    with others_served(nginx.url) as statuses:
        assert slow_client(nginx.port, head, b"a") == b""
    assert statuses and set(statuses) == {200}
