"""The Redis boundary: connection, start-up checks, Lua scripts, auto-pipelining.

Every redis exception is translated here (``StoreUnavailable``) and nowhere else.

Concurrent script calls made in one event-loop turn leave as one pipeline: one awaited
round trip per request is where a Python server's time goes, not in Redis.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

import hiredis
import redis.asyncio as aioredis
import redis.exceptions as rexc
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from engine.errors import StartupError, StoreUnavailable
from engine.keys import KeySpace
from engine.settings import Settings

log = logging.getLogger(__name__)

# Exceptions that mean "Redis cannot serve this now": the caller gets 503, not 500.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    rexc.ConnectionError,
    rexc.TimeoutError,
    rexc.OutOfMemoryError,
    rexc.ReadOnlyError,
    rexc.ClusterError,
    rexc.ClusterDownError,
    rexc.TryAgainError,
    rexc.MasterDownError,
    rexc.SlotNotCoveredError,
    rexc.MaxConnectionsError,
    rexc.RedisClusterException,
    ConnectionError,
    asyncio.TimeoutError,
    OSError,
)

# Script calls sent in one round trip at most (a burst beyond it leaves as several).
MAX_BATCH_CALLS = 1000

SCRIPT_NAMES = (
    "create_deal",
    "claim_voucher",
    "cancel_deal",
    "read_deal",
    "redeem_voucher",
    "read_deals",
    "search_geo",
)


@dataclass(frozen=True, slots=True)
class Script:
    """A Lua script from ``lua/``, called by its SHA1 with an EVAL fallback."""

    name: str
    source: str
    sha: str

    @classmethod
    def load(cls, name: str) -> Script:
        source = resources.files("lua").joinpath(f"{name}.lua").read_text(encoding="utf-8")
        return cls(name, source, hashlib.sha1(source.encode()).hexdigest())


def load_scripts() -> dict[str, Script]:
    """Every script in ``lua/`` that the engine calls, by name."""
    found = {p.name[:-4] for p in resources.files("lua").iterdir() if p.name.endswith(".lua")}
    return {name: Script.load(name) for name in SCRIPT_NAMES if name in found}


# Error replies that mean "not now" rather than "our bug": a failing disk (MISCONF),
# too few replicas for min-replicas-to-write, a busy script, a loading server.
_UNAVAILABLE_REPLIES = ("MISCONF", "NOREPLICAS", "BUSY", "LOADING", "MASTERDOWN", "TRYAGAIN")


def _translate(exc: BaseException) -> BaseException:
    if isinstance(exc, _UNAVAILABLE) or (
        isinstance(exc, rexc.ResponseError) and str(exc).startswith(_UNAVAILABLE_REPLIES)
    ):
        err = StoreUnavailable()
        err.__cause__ = exc
        return err
    return exc


@dataclass(slots=True)
class _Call:
    script: Script
    keys: Sequence[str]
    args: Sequence[Any]
    future: asyncio.Future[Any]


def make_client(settings: Settings, url: str | None = None) -> Any:
    """A redis-py asyncio client (or cluster client) with bounded timeouts."""
    url = url or settings.redis_url
    if not url:
        raise StartupError("no Redis URL: set FLASHSALE_REDIS_URL or use `flashsale up`")
    common: dict[str, Any] = {
        "decode_responses": True,
        "socket_connect_timeout": settings.redis_timeout_s,
        "socket_timeout": settings.redis_timeout_s,
        # One immediate retry heals a connection that went stale across a Redis restart;
        # every script is safe to repeat (claims are idempotent per user).
        "retry": Retry(NoBackoff(), 1),
    }
    if settings.redis_cluster:
        return RedisCluster.from_url(url, **common)
    return aioredis.Redis.from_url(url, max_connections=512, **common)


class Store:
    """The engine's handle on Redis: scripts, auto-pipelining, exception translation."""

    def __init__(self, client: Any, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self.keys = KeySpace(settings.partitions)
        self.scripts = load_scripts()
        self._queue: list[_Call] = []
        self._flush_scheduled = False
        self._inflight: set[asyncio.Task[None]] = set()
        self._durable = settings.durability == "aof"

    @classmethod
    async def connect(cls, settings: Settings, url: str | None = None) -> Store:
        """Connect and refuse, with a clear message, a Redis that would lose our data."""
        store = cls(make_client(settings, url), settings)
        try:
            await store.check()
        except BaseException:
            await store.close()
            raise
        return store

    async def check(self) -> None:
        """Refuse an evicting Redis, and an ``aof`` durability that the server cannot give."""
        try:
            if self.settings.redis_cluster:
                policies = await self.client.config_get(
                    "maxmemory-policy", target_nodes=RedisCluster.PRIMARIES
                )
            else:
                policies = await self.client.config_get("maxmemory-policy")
        except _UNAVAILABLE as exc:
            raise StartupError(f"cannot reach Redis at start-up: {exc}") from exc
        except rexc.ResponseError as exc:
            raise StartupError(
                f"cannot read Redis's maxmemory-policy (CONFIG GET refused: {exc}); "
                "flashsale needs 'noeviction' and must be able to check it"
            ) from exc
        values = _policy_values(policies)
        bad = sorted({v for v in values if v != "noeviction"})
        if bad or not values:
            raise StartupError(
                f"Redis maxmemory-policy is {', '.join(bad) or 'unknown'}: it may evict deals, "
                "stock or unpersisted claims. Set `maxmemory-policy noeviction` and restart."
            )
        if self._durable:
            await self._check_waitaof()

    async def _check_waitaof(self) -> None:
        if self.settings.redis_cluster:
            raise StartupError(
                "FLASHSALE_DURABILITY=aof is not supported on a Redis Cluster yet "
                "(WAITAOF must reach each shard a pipeline touched)"
            )
        try:
            await self.client.execute_command("WAITAOF", 1, 0, self.settings.waitaof_timeout_ms)
        except rexc.ResponseError as exc:
            text = str(exc).lower()
            if "unknown command" in text:
                raise StartupError(
                    "FLASHSALE_DURABILITY=aof needs WAITAOF (Redis >= 7.2 or Valkey), "
                    "which this server does not have"
                ) from exc
            raise StartupError(f"FLASHSALE_DURABILITY=aof: WAITAOF refused: {exc}") from exc
        except _UNAVAILABLE as exc:
            raise StartupError(f"cannot reach Redis at start-up: {exc}") from exc

    async def close(self) -> None:
        """Wait for in-flight pipelines, then close the connections."""
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
        await self.client.aclose()

    async def ping(self) -> bool:
        """Whether Redis answers now (for readiness checks)."""
        try:
            async with asyncio.timeout(self.settings.redis_timeout_s * 2):
                return bool(await self.client.ping())
        except Exception:
            return False

    @asynccontextmanager
    async def guard(self) -> AsyncIterator[None]:
        """Translate redis failures inside the block into ``StoreUnavailable``."""
        try:
            yield
        except _UNAVAILABLE as exc:
            raise StoreUnavailable() from exc
        except rexc.ResponseError as exc:
            raise _translate(exc) from exc

    # -- scripts -------------------------------------------------------------

    def run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> asyncio.Future[Any]:
        """Queue one script call for this loop turn's pipeline; await the result."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append(_Call(self.scripts[name], keys, args, future))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._start_flush)
        return future

    def _start_flush(self) -> None:
        self._flush_scheduled = False
        loop = asyncio.get_running_loop()
        queue, self._queue = self._queue, []
        # A burst larger than one batch leaves as several, on several connections, so
        # that no single round trip grows past the read timeout.
        for start in range(0, len(queue), MAX_BATCH_CALLS):
            task = loop.create_task(self._flush(queue[start : start + MAX_BATCH_CALLS]))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _flush(self, batch: list[_Call]) -> None:
        try:
            pending = await self._send(batch, by_sha=True)
            if pending:
                # The server's script cache was emptied (restart, failover, SCRIPT FLUSH):
                # send the source once; EVAL caches it again for the next EVALSHA.
                pending = await self._send(pending, by_sha=False)
            for call in pending:
                _settle(call, exc=StoreUnavailable("Lua script could not be loaded"))
        except BaseException as exc:
            err = _translate(exc)
            for call in batch:
                _settle(call, exc=err)
            if not isinstance(exc, Exception):
                raise

    async def _send(self, calls: list[_Call], *, by_sha: bool) -> list[_Call]:
        """Send calls as one pipeline; settle them; return those that met NOSCRIPT."""
        raw = not self.settings.redis_cluster
        sent: list[_Call] = []
        commands: list[Any] = []
        for call in calls:
            s = call.script
            head = ("EVALSHA", s.sha) if by_sha else ("EVAL", s.source)
            command: Any = (*head, len(call.keys), *call.keys, *call.args)
            if raw:
                try:
                    command = hiredis.pack_command(command)
                except (TypeError, ValueError) as exc:  # one bad argument fails one call
                    _settle(call, exc=exc)
                    continue
            commands.append(command)
            sent.append(call)
        if not sent:
            return []
        if self._durable:
            wait: Any = ("WAITAOF", 1, 0, self.settings.waitaof_timeout_ms)
            commands.append(hiredis.pack_command(wait) if raw else wait)
        if raw:
            # redis-py's pipeline packs each argument in Python and arms a timeout per
            # reply: on the claim path that was most of the CPU (loadtest/bench_engine.py).
            results = await self._round_trip(commands)
        else:
            pipe = self.client.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            results = await pipe.execute(raise_on_error=False)
        durable_error: BaseException | None = None
        if self._durable:
            ack = results.pop()
            if isinstance(ack, BaseException):
                durable_error = _translate(ack)
            elif not ack or int(ack[0]) < 1:
                durable_error = StoreUnavailable("the claim was not confirmed on disk in time")
        retry: list[_Call] = []
        for call, result in zip(sent, results, strict=True):
            if isinstance(result, rexc.NoScriptError):
                retry.append(call)
            elif isinstance(result, BaseException):
                _settle(call, exc=_translate(result))
            elif durable_error is not None:
                _settle(call, exc=durable_error)
            else:
                _settle(call, result=result)
        return retry

    async def _round_trip(self, packed: list[bytes]) -> list[Any]:
        """Packed commands out on one pooled connection, replies back, one read timeout."""
        pool = self.client.connection_pool
        for attempt in (1, 2):
            conn = await pool.get_connection()
            sent = False
            try:
                async with asyncio.timeout(self.settings.redis_timeout_s):
                    await conn.send_packed_command(packed, check_health=False)
                    sent = True
                    results: list[Any] = []
                    for _ in packed:
                        try:
                            results.append(await conn.read_response(timeout=math.inf))
                        except rexc.ResponseError as exc:  # an error reply; read on
                            results.append(exc)
                return results
            except BaseException as exc:
                await conn.disconnect(nowait=True)
                # A connection gone stale across a Redis restart fails on send: nothing
                # reached Redis, so one more try on a fresh connection is safe.
                if sent or attempt == 2 or not isinstance(exc, _UNAVAILABLE):
                    raise
            finally:
                await pool.release(conn)
        raise AssertionError("unreachable")


def _settle(call: _Call, *, result: Any = None, exc: BaseException | None = None) -> None:
    if call.future.done():  # the caller went away (client disconnected)
        return
    if exc is not None:
        call.future.set_exception(exc)
    else:
        call.future.set_result(result)


def _policy_values(reply: Any) -> list[str]:
    """``CONFIG GET`` answers differ between a node and a cluster; flatten them."""
    if isinstance(reply, dict):
        if "maxmemory-policy" in reply:
            return [str(reply["maxmemory-policy"])]
        out: list[str] = []
        for value in reply.values():
            out.extend(_policy_values(value))
        return out
    return []
