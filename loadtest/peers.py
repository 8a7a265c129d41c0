"""The claim services a team would build instead, for ``loadtest.bench`` to race against.

Both are small Starlette apps on the same stack as flashsale's API (uvicorn, uvloop,
httptools, orjson), with the same caller tokens (``api.auth.Authenticator``, cached) and
the same ES256 voucher signing on success, so that only the way a claim is decided
differs:

- ``pg``: PostgreSQL alone. One round trip per claim to a PL/pgSQL function that, in one
  transaction, looks for the caller's voucher, then runs the conditional
  ``UPDATE ... SET left = left - 1 WHERE left > 0`` on the deal's row and the unique
  insert of the claim; the pool's sessions commit asynchronously
  (``synchronous_commit = off``). Discovery: a bounding-box query on a (lat, lng)
  index, refined by the Haversine distance in SQL.
- ``lock``: the seed's flow on Redis. ``SET deal:{id}:lock NX PX``, retried until held,
  then existence and window, stock, and duplicate checks, the decrement and the record
  of the claim, each a separate awaited call, then the unlock. Discovery as the seed
  does it: all active deals cached in Redis for 30 s, filtered by Haversine in Python.

    python -m loadtest.peers pg|lock --port 8101 --workers 1

Configuration from the environment: ``BENCH_DATABASE_URL``, ``BENCH_REDIS_URL``,
``FLASHSALE_AUTH_SECRET``, ``FLASHSALE_KEYS_DIR``.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import redis.asyncio as aioredis
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from api.auth import Authenticator
from engine.claims import ClaimResult, Voucher
from engine.errors import FlashsaleError
from engine.vouchers import VoucherSigner, voucher_json

EARTH_RADIUS_KM = 6371.0088
LOCK_TTL_MS = 2000
LOCK_WAIT_S = 2.0
LOCK_RETRY_S = 0.002
DISCOVERY_CACHE_S = 30

PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS peer_deals (
    id text PRIMARY KEY, merchant_id text NOT NULL, title text NOT NULL,
    lat double precision NOT NULL, lng double precision NOT NULL,
    inventory_total integer NOT NULL, inventory_left integer NOT NULL,
    starts_at timestamptz NOT NULL, ends_at timestamptz NOT NULL,
    redeem_until timestamptz NOT NULL, cancelled boolean NOT NULL DEFAULT false);
CREATE INDEX IF NOT EXISTS peer_deals_geo ON peer_deals (lat, lng);
CREATE TABLE IF NOT EXISTS peer_claims (
    voucher_id text PRIMARY KEY, deal_id text NOT NULL, user_id text NOT NULL,
    claimed_at timestamptz NOT NULL DEFAULT now(), UNIQUE (deal_id, user_id));
CREATE OR REPLACE FUNCTION peer_claim(p_deal text, p_user text, p_voucher text,
    OUT outcome text, OUT voucher_id text, OUT left_after integer, OUT merchant_id text,
    OUT claimed_ms bigint, OUT redeem_ms bigint)
LANGUAGE plpgsql AS $$
DECLARE d peer_deals%ROWTYPE;
BEGIN
    SELECT c.voucher_id, (extract(epoch FROM c.claimed_at) * 1000)::bigint
      INTO voucher_id, claimed_ms FROM peer_claims c
     WHERE c.deal_id = p_deal AND c.user_id = p_user;
    IF FOUND THEN
        SELECT * INTO d FROM peer_deals WHERE id = p_deal;
        outcome := 'already'; left_after := d.inventory_left; merchant_id := d.merchant_id;
        redeem_ms := (extract(epoch FROM d.redeem_until) * 1000)::bigint;
        RETURN;
    END IF;
    UPDATE peer_deals SET inventory_left = inventory_left - 1
     WHERE id = p_deal AND inventory_left > 0 AND NOT cancelled
       AND now() >= starts_at AND now() < ends_at
    RETURNING * INTO d;
    IF NOT FOUND THEN
        SELECT * INTO d FROM peer_deals WHERE id = p_deal;
        outcome := CASE WHEN NOT FOUND THEN 'not_found' WHEN d.cancelled THEN 'cancelled'
                        WHEN now() < d.starts_at THEN 'not_started'
                        WHEN now() >= d.ends_at THEN 'ended' ELSE 'sold_out' END;
        RETURN;
    END IF;
    INSERT INTO peer_claims (voucher_id, deal_id, user_id) VALUES (p_voucher, p_deal, p_user)
    ON CONFLICT (deal_id, user_id) DO NOTHING;
    IF NOT FOUND THEN  -- the same user's concurrent claim won: give the stock back
        RAISE EXCEPTION USING ERRCODE = 'unique_violation';
    END IF;
    outcome := 'claimed'; voucher_id := p_voucher; left_after := d.inventory_left;
    merchant_id := d.merchant_id; claimed_ms := (extract(epoch FROM now()) * 1000)::bigint;
    redeem_ms := (extract(epoch FROM d.redeem_until) * 1000)::bigint;
END $$;
"""

DISCOVER_SQL = """
SELECT id, merchant_id, title, lat, lng, inventory_total, inventory_left, dist FROM (
  SELECT *, 2 * $5::float8 * asin(sqrt(
      sin(radians(lat - $1) / 2) ^ 2
      + cos(radians($1)) * cos(radians(lat)) * sin(radians(lng - $2) / 2) ^ 2)) AS dist
    FROM peer_deals
   WHERE lat BETWEEN $1 - $3 / 111.0 AND $1 + $3 / 111.0
     AND lng BETWEEN $2 - $3 / (111.0 * cos(radians($1))) AND $2 + $3 / (111.0 * cos(radians($1)))
     AND inventory_left > 0 AND NOT cancelled AND now() >= starts_at AND now() < ends_at
) near WHERE dist <= $3 ORDER BY dist LIMIT $4
"""

_REFUSAL = {
    "not_found": (404, "deal_not_found"),
    "cancelled": (409, "cancelled"),
    "not_started": (409, "not_started"),
    "ended": (409, "ended"),
    "sold_out": (409, "sold_out"),
}


def haversine_km(lat1: float, lng1: float, lat2: float, lng2: float) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    a = (
        math.sin((p2 - p1) / 2) ** 2
        + math.cos(p1) * math.cos(p2) * math.sin(math.radians(lng2 - lng1) / 2) ** 2
    )
    return 2 * EARTH_RADIUS_KM * math.asin(math.sqrt(a))


def _json(content: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(content), status, media_type="application/json")


def _refuse(outcome: str) -> Response:
    status, code = _REFUSAL[outcome]
    return _json({"error": {"code": code, "message": outcome, "details": {}}}, status)


def _unavailable() -> Response:
    body = {"error": {"code": "unavailable", "message": "busy", "details": {}}}
    return Response(orjson.dumps(body), 503, {"Retry-After": "1"}, "application/json")


class _Peer:
    """What both peers share: auth, signing, the JSON of a claimed voucher."""

    def __init__(self) -> None:
        self.auth = Authenticator(os.environ["FLASHSALE_AUTH_SECRET"])
        self.signer = VoucherSigner(Path(os.environ["FLASHSALE_KEYS_DIR"]))

    def caller_id(self, request: Request) -> str:
        return self.auth.require(request.headers.get("authorization"), "user").id

    def voucher(self, result: ClaimResult) -> Response:
        token = self.signer.sign(result.voucher)
        body = {
            "voucher": voucher_json(result.voucher, token),
            "inventory_left": result.inventory_left,
        }
        return _json(body, 201 if result.is_new else 200)

    async def healthz(self, request: Request) -> Response:
        return _json({"status": "ok"})

    def app(self, routes: list[Route], lifespan: Any) -> Starlette:
        async def on_error(request: Request, exc: Exception) -> Response:
            assert isinstance(exc, FlashsaleError)
            body = {"error": {"code": exc.code, "message": exc.message, "details": {}}}
            return _json(body, exc.status)

        routes = [Route("/healthz", self.healthz), *routes]
        return Starlette(
            routes=routes, lifespan=lifespan, exception_handlers={FlashsaleError: on_error}
        )


class PostgresPeer(_Peer):
    """Claims decided by PostgreSQL alone, one function call (one round trip) each."""

    def __init__(self) -> None:
        super().__init__()
        self.pool: asyncpg.Pool | None = None

    async def claim(self, request: Request) -> Response:
        user = self.caller_id(request)
        deal_id = request.path_params["deal_id"]
        voucher_id = f"v{secrets.token_hex(8)}.{deal_id}"
        assert self.pool is not None
        try:
            row = await self.pool.fetchrow(
                "SELECT * FROM peer_claim($1, $2, $3)", deal_id, user, voucher_id
            )
        except asyncpg.UniqueViolationError:
            row = await self.pool.fetchrow(
                "SELECT * FROM peer_claim($1, $2, $3)", deal_id, user, voucher_id
            )
        assert row is not None
        if row["outcome"] not in ("claimed", "already"):
            return _refuse(row["outcome"])
        voucher = Voucher(
            row["voucher_id"],
            deal_id,
            user,
            row["merchant_id"],
            0,
            row["claimed_ms"],
            row["redeem_ms"],
        )
        return self.voucher(ClaimResult(voucher, row["outcome"] == "claimed", row["left_after"]))

    async def discover(self, request: Request) -> Response:
        q = request.query_params
        lat, lng = float(q["lat"]), float(q["lng"])
        radius, limit = float(q.get("radius_km", 5)), int(q.get("limit", 20))
        assert self.pool is not None
        rows = await self.pool.fetch(DISCOVER_SQL, lat, lng, radius, limit, EARTH_RADIUS_KM)
        deals = [{**dict(r), "distance_km": r["dist"]} for r in rows]
        for d in deals:
            del d["dist"]
        return _json({"deals": deals, "count": len(deals)})

    def build(self) -> Starlette:
        @asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            self.pool = await asyncpg.create_pool(
                os.environ["BENCH_DATABASE_URL"],
                min_size=20,
                max_size=20,
                server_settings={"synchronous_commit": "off"},
            )
            try:
                yield
            finally:
                await self.pool.close()

        return self.app(
            [
                Route("/v1/deals/{deal_id}/claims", self.claim, methods=["POST"]),
                Route("/v1/deals", self.discover),
            ],
            lifespan,
        )


def lock_deal_key(deal_id: str) -> str:
    return f"peer:deal:{deal_id}"


class LockPeer(_Peer):
    """The seed's claim flow: a Redis lock per deal around separate checks and writes."""

    def __init__(self) -> None:
        super().__init__()
        self.redis: Any = None
        self.pool: asyncpg.Pool | None = None

    async def claim(self, request: Request) -> Response:
        user = self.caller_id(request)
        deal_id = request.path_params["deal_id"]
        r = self.redis
        lock, me = f"deal:{deal_id}:lock", secrets.token_hex(8)
        deadline = time.monotonic() + LOCK_WAIT_S
        while not await r.set(lock, me, nx=True, px=LOCK_TTL_MS):
            if time.monotonic() > deadline:
                return _unavailable()
            # Back off a little, with jitter (a tight spin floods Redis with SET NX).
            await asyncio.sleep(LOCK_RETRY_S * (0.5 + random.random()))
        try:
            key = lock_deal_key(deal_id)
            deal = await r.hgetall(key)  # 1. the deal exists and is valid now
            if not deal:
                return _refuse("not_found")
            now = int(time.time() * 1000)
            if deal.get("cancelled") == "1":
                return _refuse("cancelled")
            if now < int(deal["starts"]):
                return _refuse("not_started")
            if now >= int(deal["ends"]):
                return _refuse("ended")
            if int(await r.hget(key, "left")) <= 0:  # 2. stock
                return _refuse("sold_out")
            held = await r.hget(f"{key}:claimers", user)  # 3. no duplicate
            if held is not None:
                vid, at = held.split("|")
                old = Voucher(vid, deal_id, user, deal["merchant"], 0, int(at), int(deal["redeem"]))
                return self.voucher(ClaimResult(old, False, int(deal["left"])))
            left = await r.hincrby(key, "left", -1)  # 4. decrement
            vid = f"v{secrets.token_hex(8)}.{deal_id}"
            await r.hset(f"{key}:claimers", user, f"{vid}|{now}")  # 5. record the claim
        finally:
            await r.eval(_UNLOCK, 1, lock, me)  # 6. unlock (only our own lock)
        new = Voucher(vid, deal_id, user, deal["merchant"], 0, now, int(deal["redeem"]))
        return self.voucher(ClaimResult(new, True, int(left)))

    async def discover(self, request: Request) -> Response:
        q = request.query_params
        lat, lng = float(q["lat"]), float(q["lng"])
        radius, limit = float(q.get("radius_km", 5)), int(q.get("limit", 20))
        cached = await self.redis.get("peer:active_deals")
        if cached is None:
            assert self.pool is not None
            rows = await self.pool.fetch(
                "SELECT id, merchant_id, title, lat, lng, inventory_total, inventory_left "
                "FROM peer_deals WHERE inventory_left > 0 AND NOT cancelled "
                "AND now() >= starts_at AND now() < ends_at"
            )
            cached = orjson.dumps([dict(r) for r in rows])
            await self.redis.set("peer:active_deals", cached, ex=DISCOVERY_CACHE_S)
        found = []
        for d in orjson.loads(cached):
            dist = haversine_km(lat, lng, d["lat"], d["lng"])
            if dist <= radius:
                found.append({**d, "distance_km": dist})
        found.sort(key=lambda d: d["distance_km"])
        return _json({"deals": found[:limit], "count": min(limit, len(found))})

    def build(self) -> Starlette:
        @asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            url = os.environ["BENCH_REDIS_URL"]
            self.redis = aioredis.Redis.from_url(url, decode_responses=True, max_connections=512)
            self.pool = await asyncpg.create_pool(
                os.environ["BENCH_DATABASE_URL"], min_size=2, max_size=4
            )
            try:
                yield
            finally:
                await self.redis.aclose()
                await self.pool.close()

        return self.app(
            [
                Route("/v1/deals/{deal_id}/claims", self.claim, methods=["POST"]),
                Route("/v1/deals", self.discover),
            ],
            lifespan,
        )


_UNLOCK = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end"


async def seed_lock_deal(
    redis: Any,
    deal_id: str,
    merchant: str,
    inventory: int,
    starts_ms: int,
    ends_ms: int,
    redeem_ms: int,
) -> None:
    """Create a deal as the ``lock`` peer keeps it."""
    await redis.hset(
        lock_deal_key(deal_id),
        mapping={
            "merchant": merchant,
            "left": inventory,
            "starts": starts_ms,
            "ends": ends_ms,
            "redeem": redeem_ms,
        },
    )


def pg_app() -> Starlette:
    return PostgresPeer().build()


def lock_app() -> Starlette:
    return LockPeer().build()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("peer", choices=("pg", "lock"))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8101)
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args()
    uvicorn.run(
        f"loadtest.peers:{args.peer}_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
        backlog=4096,
    )


if __name__ == "__main__":
    main()
