"""Rate limits over HTTP (api/ratelimit.py): per caller, per address, through proxies,
shared by processes, refused before any other work, failing open without Redis."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from starlette.routing import Mount, Route

from api import ratelimit
from api.app import create_app
from api.auth import mint
from api.ratelimit import ClientAddress, is_public, subject
from engine.keys import KeySpace
from engine.settings import Settings, SettingsError
from flashsale.embedded import EmbeddedRedis
from tests.api.conftest import SECRET, RunningApi
from tests.conftest import flush
from tests.served import Served, serve_env
from tests.vouchers.helpers import auth, create_deal

LimitedApi = Callable[..., RunningApi]


@pytest.fixture
def limited(
    make_api: Callable[..., RunningApi], redis_url: str, migrated_database_url: str
) -> LimitedApi:
    """An API with the given limits, on the session's Redis (flushed)."""

    def start(**limits: Any) -> RunningApi:
        flush(redis_url, False)
        settings = Settings(redis_url=redis_url, database_url=migrated_database_url)
        return make_api(settings.with_(**limits), limits=True)

    return start


def _evalsha_calls(r: redis.Redis) -> int:
    stats: dict[str, Any] = r.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("evalsha", "eval"))


def _counted(client: httpx.Client, kind: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f'flashsale_rate_limited_total{{kind="{kind}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_a_caller_over_its_limit_gets_429_while_another_caller_is_served(
    limited: LimitedApi,
) -> None:
    """Bursts of twice the rate, then 429 with Retry-After and retry_after_ms; the caller
    next door (same address) is served; /metrics counts the refusals by kind."""
    api = limited(rate_caller_per_s=2)  # bursts of 4
    with httpx.Client(base_url=api.url, timeout=10) as client:
        user = api.auth("user", "u-1")
        answers = [client.get("/v1/vouchers/v0.none", headers=user) for _ in range(6)]
        codes = [a.status_code for a in answers]
        assert codes[:4] == [404] * 4 and 429 in codes[4:]
        refused = next(a for a in answers if a.status_code == 429)
        error = refused.json()["error"]
        assert error["code"] == "rate_limited" and error["details"]["limit"] == "caller"
        assert 1 <= error["details"]["retry_after_ms"] <= 500
        assert refused.headers["retry-after"] == "1"
        assert refused.headers["content-type"] == "application/json"
        other = client.get("/v1/vouchers/v0.none", headers=api.auth("user", "u-2"))
        assert other.status_code == 404
        # Public routes have no caller limit, token or not.
        assert client.get("/v1/deals/nope", headers=api.auth("user", "u-1")).status_code == 404
        assert _counted(client, "caller") >= 1 and _counted(client, "address") == 0


# Every command a claim's script may run but the limiter's (TIME, GET, SET).
_CLAIM_COMMANDS = ("hget", "hmget", "xlen", "hincrby", "hset", "pexpiretime", "xadd", "zrem")


def _command_calls(r: redis.Redis, names: tuple[str, ...]) -> dict[str, int]:
    stats: dict[str, Any] = r.info("commandstats")
    return {c: int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in names}


def test_a_limited_claim_takes_no_stock_and_writes_nothing(
    limited: LimitedApi, redis_url: str
) -> None:
    """Refused before anything else: stock, claimers and stream as they were, and Redis
    ran nothing for the refused claim but the limiter's read (on one node, inside the
    claim's own script call: one script call for the claim, its limit included)."""
    api = limited(rate_caller_per_s=1)  # bursts of 2
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    with httpx.Client(base_url=api.url, timeout=10) as client:
        deal = create_deal(client, api.token("merchant", "m-1"), inventory=5)
        k = KeySpace(api.settings.partitions).for_deal(deal["id"])
        user = api.auth("user", "u-9")
        assert client.post(f"/v1/deals/{deal['id']}/claims", headers=user).status_code == 201
        # The rest of the caller's burst, spent on another route.
        assert client.get("/v1/vouchers/v0.none", headers=user).status_code == 404
        before = (r.hget(k.deal, "left"), r.hlen(k.claimers), r.xlen(k.events))
        assert before == ("4", 1, 2)  # the deal's creation and the first claim
        commands = _command_calls(r, (*_CLAIM_COMMANDS, "time", "get", "set"))
        scripts = _evalsha_calls(r)
        answer = client.post(f"/v1/deals/{deal['id']}/claims", headers=user)
        assert answer.status_code == 429, answer.text
        assert answer.json()["error"]["details"]["limit"] == "caller"
        assert answer.headers["retry-after"] == "1"
        after = _command_calls(r, (*_CLAIM_COMMANDS, "time", "get", "set"))
        assert {c: after[c] - commands[c] for c in after} == {
            **dict.fromkeys(_CLAIM_COMMANDS, 0),
            "time": 1,  # the limiter's clock
            "get": 1,  # the caller's limiter key
            "set": 0,  # a refusal changes nothing
        }
        assert _evalsha_calls(r) - scripts == 1
        assert (r.hget(k.deal, "left"), r.hlen(k.claimers), r.xlen(k.events)) == before
        assert _counted(client, "caller") == 1
    r.close()


def test_a_limited_request_is_refused_before_its_body_is_read(limited: LimitedApi) -> None:
    """A caller over its limit announcing a body it never sends gets its 429 at once."""
    api = limited(rate_caller_per_s=1)
    with httpx.Client(base_url=api.url, timeout=10) as client:
        for _ in range(2):
            client.get("/v1/vouchers/v0.none", headers=api.auth("merchant", "m-1"))
    host, port = api.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(
            b"POST /v1/deals HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\nAuthorization: Bearer "
            + api.token("merchant", "m-1").encode()
            + b"\r\n\r\n"
        )
        answer = _one_response(sock)  # within the socket's 5 s, with no body sent
    assert answer.startswith("HTTP/1.1 429"), answer
    assert '"code":"rate_limited"' in answer


def _one_response(sock: socket.socket) -> str:
    """Read one response with a Content-Length (the head and body may come apart)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    length = next(int(line.split(b":")[1]) for line in lines if line.startswith(b"content-length:"))
    while len(body) < length:
        body += sock.recv(65536)
    return (head + b"\r\n\r\n" + body).decode()


def test_addresses_come_from_x_forwarded_for_through_a_trusted_proxy(
    limited: LimitedApi,
) -> None:
    """The test client is the proxy (127.0.0.1, trusted): each forwarded client has its
    own limit, on public routes too, but not on health and metrics."""
    api = limited(rate_address_per_s=1, rate_caller_per_s=0, trusted_proxies=("127.0.0.1",))
    with httpx.Client(base_url=api.url, timeout=10) as client:

        def get(path: str, xff: str) -> int:
            return client.get(path, headers={"X-Forwarded-For": xff}).status_code

        # A forged entry on the left is not what the proxy saw: the right-most counts.
        codes = [get("/v1/deals/nope", "192.0.2.99, 192.0.2.10") for _ in range(4)]
        assert codes[:2] == [404, 404] and codes[-1] == 429
        assert get("/v1/deals/nope", "192.0.2.11") == 404  # another client
        assert get("/v1/deals/nope", "192.0.2.10, 127.0.0.1") == 429  # proxies are skipped
        assert all(get("/healthz", "192.0.2.10") == 200 for _ in range(5))
        assert _counted(client, "address") >= 2


def test_a_forged_x_forwarded_for_from_an_untrusted_peer_is_ignored(
    limited: LimitedApi,
) -> None:
    """The peer (127.0.0.1) is not a trusted proxy: every request is its own, whatever
    X-Forwarded-For says."""
    api = limited(rate_address_per_s=1, rate_caller_per_s=0, trusted_proxies=("192.0.2.254",))
    with httpx.Client(base_url=api.url, timeout=10) as client:
        codes = [
            client.get("/v1/deals/nope", headers={"X-Forwarded-For": f"192.0.2.{i}"}).status_code
            for i in range(4)
        ]
    assert codes[:2] == [404, 404] and codes[-1] == 429


def test_client_address_walks_the_chain_from_the_right() -> None:
    """The right-most untrusted hop; a malformed entry stops at the proxy that passed it;
    IPv6 by /64; an untrusted peer's header is never read. (Addresses from 192.0.2.0/24
    and 2001:db8::/32, the documentation ranges.)"""
    clients = ClientAddress(["192.0.2.254", "192.0.2.240/29"])

    def of(peer: str, *xff: str) -> str | None:
        found = clients.of(peer, list(xff))
        return None if found is None else subject(found)

    assert of("192.0.2.254", "192.0.2.7") == "192.0.2.7"
    assert of("192.0.2.254", "192.0.2.6, 192.0.2.7, 192.0.2.241") == "192.0.2.7"
    assert of("192.0.2.254", "192.0.2.6", "192.0.2.7") == "192.0.2.7"  # two headers
    assert of("192.0.2.254", "garbage, 192.0.2.241") == "192.0.2.241"
    assert of("192.0.2.254", "192.0.2.7, not-an-ip") == "192.0.2.254"
    assert of("192.0.2.254", "192.0.2.7:8080") == "192.0.2.254"  # ports are not addresses
    assert of("192.0.2.254") == "192.0.2.254"  # the proxy's own request
    assert of("192.0.2.254", " , ") == "192.0.2.254"
    assert of("192.0.2.9", "192.0.2.7") == "192.0.2.9"  # untrusted peer: header ignored
    assert of("::ffff:192.0.2.254", "192.0.2.7") == "192.0.2.7"
    assert of("192.0.2.254", "2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert of("unix:/tmp/s") is None
    long_chain = ", ".join(["192.0.2.242"] * 1000)
    assert of("192.0.2.254", "192.0.2.7, " + long_chain) == "192.0.2.242"  # hops are bounded


def test_trusted_proxies_are_parsed_and_checked_at_start() -> None:
    env = {"FLASHSALE_TRUSTED_PROXIES": " 172.28.0.10, 10.0.0.0/8 ,fd00::/8,"}
    assert Settings.from_env(env).trusted_proxies == ("172.28.0.10/32", "10.0.0.0/8", "fd00::/8")
    with pytest.raises(SettingsError, match="not an IP address"):
        Settings.from_env({"FLASHSALE_TRUSTED_PROXIES": "nginx"})
    defaults = Settings.from_env({})
    assert (defaults.rate_caller_per_s, defaults.rate_address_per_s) == (10, 0)
    assert Settings.from_env({"FLASHSALE_RATE_CALLER": "0"}).rate_caller_per_s == 0


def _sample(path: str) -> str:
    return path.replace("{deal_id}", "d-1").replace("{voucher_id}", "v0.d-1")


def test_every_route_without_a_token_is_401_unless_it_is_public(limited: LimitedApi) -> None:
    """The limiter's list of public routes is the app's: a route that answers without a
    token has no caller limit, and every other route demands one."""
    api = limited(rate_caller_per_s=1000)
    app = create_app(api.settings)
    with httpx.Client(base_url=api.url, timeout=10) as client:
        for route in app.routes:
            if isinstance(route, Mount):
                assert is_public("GET", route.path + "/")
                continue
            assert isinstance(route, Route)
            for method in sorted(route.methods or ()):
                if method == "HEAD":
                    continue
                path = _sample(route.path)
                status = client.request(method, path).status_code
                assert (status != 401) == is_public(method, path), (method, path, status)


def test_limits_fail_open_without_redis(
    make_api: Callable[..., RunningApi], tmp_path: Path, migrated_database_url: str
) -> None:
    """Redis away: the limit cannot be read, so the request goes on (a PostgreSQL route
    answers; a claim answers 503 itself) and the failure is counted."""
    own = EmbeddedRedis(tmp_path / "redis").start()
    try:
        api = make_api(
            Settings(redis_url=own.url, database_url=migrated_database_url, rate_address_per_s=5),
            limits=True,
        )
        with httpx.Client(base_url=api.url, timeout=10) as client:
            assert client.get("/v1/me/vouchers", headers=api.auth()).status_code == 200
            own.stop()
            assert client.get("/v1/me/vouchers", headers=api.auth()).status_code == 200
            claim = client.post("/v1/deals/d-1/claims", headers=api.auth())
            assert claim.status_code == 503
            assert claim.json()["error"]["code"] == "unavailable"
            text = client.get("/metrics").text
        errors = [ln for ln in text.splitlines() if ln.startswith("flashsale_rate_limit_errors")]
        # One per request: both its limits are one check (on one node one script call).
        assert errors and float(errors[0].split()[-1]) == 2
    finally:
        own.stop()


@pytest.mark.slow
def test_two_api_processes_share_the_limits(
    tmp_path: Path, redis_url: str, migrated_database_url: str
) -> None:
    """Two `flashsale serve` processes, one caller alternating between them: one limit."""
    flush(redis_url, False)
    settings = Settings(
        redis_url=redis_url,
        database_url=migrated_database_url,
        auth_secret=SECRET,
        data_dir=tmp_path,
        rate_caller_per_s=1,  # bursts of 2; alone, each process would allow 2
    )
    procs = [Served("uvicorn", serve_env(settings), tmp_path / f"api-{i}.log") for i in range(2)]
    try:
        for proc in procs:
            proc.start()
        headers = auth(mint(SECRET, "u-shared", "user"))
        clients = [httpx.Client(base_url=p.url, timeout=10) for p in procs]
        started = time.monotonic()
        codes: list[list[int]] = [[], []]
        for i in range(8):
            codes[i % 2].append(
                clients[i % 2].get("/v1/vouchers/v0.none", headers=headers).status_code
            )
        elapsed = time.monotonic() - started
        allowed = sum(c == 404 for side in codes for c in side)
        # 2 at once, then 1 a second: whatever process answers.
        assert allowed <= 2 + int(elapsed), (codes, elapsed)
        assert all(429 in side for side in codes)
        for c in clients:
            c.close()
    finally:
        for proc in procs:
            proc.stop()


@pytest.mark.cluster
def test_the_limits_work_on_the_cluster(
    make_api: Callable[..., RunningApi], cluster_url: str
) -> None:
    flush(cluster_url, True)
    api = make_api(
        Settings(redis_url=cluster_url, redis_cluster=True, rate_caller_per_s=1), limits=True
    )
    with httpx.Client(base_url=api.url, timeout=10) as client:
        callers = [api.auth("merchant", f"m-{i}") for i in range(3)]
        codes = [
            client.get("/v1/vouchers/v0.none", headers=callers[i % 3]).status_code
            for i in range(12)
        ]
    # Three callers, each with a burst of 2: each gets exactly 2 before its first 429.
    assert codes[:6] == [404] * 6 and set(codes[6:]) <= {404, 429} and 429 in codes[6:]


def test_the_address_caches_hold_short_keys_only_whatever_is_forwarded() -> None:
    """Through a trusted proxy, 10,000 distinct X-Forwarded-For entries of 8 KiB of junk:
    none is cached (longer than any address), and the caches stay at 4,096 entries of at
    most 64 characters, however many distinct addresses come."""
    clients = ClientAddress(["127.0.0.1/32"])
    ratelimit._parse_ip.cache_clear()
    for n in range(10_000):
        junk = f"{n}-" + "x" * 8192
        assert clients.of("127.0.0.1", [junk]) == clients.of("127.0.0.1", [])  # the proxy
    assert ratelimit._parse_ip.cache_info().currsize <= 1
    for n in range(5_000):  # distinct real addresses: the cache is an LRU of 4,096
        clients.of("127.0.0.1", [f"198.51.100.{n % 256}, 192.0.2.{n % 250}"])
        clients.of("127.0.0.1", [f"2001:db8::{n:x}"])
    info = ratelimit._parse_ip.cache_info()
    assert info.currsize <= 4096 and info.maxsize == 4096
