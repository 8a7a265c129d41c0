"""The Redis boundary: connection, start-up checks, Lua scripts, auto-pipelining, and
the few plain commands (hashes, scans, streams, pipelines) the rest of the code needs.

Every redis exception is translated here and nowhere else: "cannot serve this now"
becomes ``StoreUnavailable``, a missing consumer group ``StreamGroupMissing``. Other
modules call the methods below, never the raw client.

Concurrent script calls made in one event-loop turn leave as one pipeline: one awaited
round trip per request is where a Python server's time goes, not in Redis.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

import hiredis
import redis.asyncio as aioredis
import redis.exceptions as rexc
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from engine.errors import StartupError, StoreUnavailable, StreamGroupMissing
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

# Everything the boundary translates (the rest, our bugs, pass through as they are).
_TRANSLATED: tuple[type[BaseException], ...] = (*_UNAVAILABLE, rexc.RedisError)

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
    "sweep_geo",
    "renew_lease",
    "release_lease",
    "limit_rate",
    "record_sync",
    "archive_deal",
)

# A line naming a Lua library of lua/lib/ to paste in its place (Script.load).
_INCLUDE = re.compile(r"^-- #include (\w+)$", re.M)

# (stream, entry id, fields); fields is None for an entry deleted while pending.
RawEntry = tuple[str, str, dict[str, str] | None]


@dataclass(frozen=True, slots=True)
class Script:
    """A Lua script from ``lua/``, called by its SHA1 with an EVAL fallback."""

    name: str
    source: str
    sha: str

    @classmethod
    def load(cls, name: str) -> Script:
        """``lua/<name>.lua``, with each ``-- #include <lib>`` line replaced by
        ``lua/lib/<lib>.lua`` (Redis runs one self-contained source per script)."""
        scripts = resources.files("lua")
        source = _INCLUDE.sub(
            lambda m: scripts.joinpath("lib", f"{m[1]}.lua").read_text(encoding="utf-8"),
            scripts.joinpath(f"{name}.lua").read_text(encoding="utf-8"),
        )
        return cls(name, source, hashlib.sha1(source.encode()).hexdigest())


def load_scripts(names: Sequence[str] = SCRIPT_NAMES) -> dict[str, Script]:
    """The named scripts from ``lua/``; a missing file is a packaging bug: raise."""
    found = {p.name[:-4] for p in resources.files("lua").iterdir() if p.name.endswith(".lua")}
    missing = [name for name in names if name not in found]
    if missing:
        raise FileNotFoundError(f"Lua scripts missing from lua/: {', '.join(missing)}")
    return {name: Script.load(name) for name in names}


# Error replies that mean "not now" rather than "our bug": a failing disk (MISCONF),
# too few replicas for min-replicas-to-write, a busy script, a loading server.
_UNAVAILABLE_REPLIES = ("MISCONF", "NOREPLICAS", "BUSY", "LOADING", "MASTERDOWN", "TRYAGAIN")


def _translate(exc: BaseException) -> BaseException:
    """The domain error for a redis failure; anything else (our bug) unchanged."""
    err: BaseException
    # An error reply starts with its code: BUSY is unavailable, BUSYGROUP is not.
    code = str(exc).split(" ", 1)[0] if isinstance(exc, rexc.ResponseError) else ""
    if isinstance(exc, _UNAVAILABLE) or code in _UNAVAILABLE_REPLIES:
        err = StoreUnavailable()
    elif code == "NOGROUP":
        err = StreamGroupMissing(str(exc))
    else:
        return exc
    err.__cause__ = exc
    return err


@contextmanager
def _translated() -> Iterator[None]:
    """Raise redis failures inside the block as the domain errors of ``_translate``."""
    try:
        yield
    except _TRANSLATED as exc:
        err = _translate(exc)
        if err is exc:
            raise
        raise err from exc


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
    return aioredis.Redis.from_url(url, max_connections=settings.redis_max_connections, **common)


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

    # -- plain commands ---------------------------------------------------------

    async def server_time_ms(self) -> int:
        """Redis's clock (``TIME``) in ms: the clock the scripts judge time windows by."""
        with _translated():
            sec, usec = await self.client.time()
        return int(sec) * 1000 + int(usec) // 1000

    async def hget(self, key: str, field: str) -> str | None:
        with _translated():
            value: str | None = await self.client.hget(key, field)
        return value

    async def hmget(self, key: str, *fields: str) -> list[str | None]:
        with _translated():
            return list(await self.client.hmget(key, fields))

    async def set_if_absent(self, key: str, value: str, *, ttl_ms: int) -> bool:
        """``SET NX PX``: take a lease; False if someone holds it."""
        with _translated():
            return bool(await self.client.set(key, value, nx=True, px=ttl_ms))

    async def zrem(self, key: str, *members: str) -> int:
        with _translated():
            return int(await self.client.zrem(key, *members))

    async def zscan(self, key: str, cursor: int, *, count: int) -> tuple[int, list[str]]:
        """One ``ZSCAN`` step: (next cursor, 0 at the end; members, without scores)."""
        with _translated():
            cursor, items = await self.client.zscan(key, cursor, count=count)
        return int(cursor), [member for member, _score in items]

    async def zrange_by_score(
        self, key: str, max_score: int, *, offset: int = 0, count: int
    ) -> list[str]:
        """Members scored at most ``max_score``, lowest first: ``count`` from ``offset``."""
        with _translated():
            members = await self.client.zrangebyscore(
                key, "-inf", max_score, start=offset, num=count
            )
        return [str(m) for m in members]

    async def hscan(self, key: str, cursor: int, *, count: int) -> tuple[int, dict[str, str]]:
        """One ``HSCAN`` step: (next cursor, 0 at the end; fields and values)."""
        with _translated():
            cursor, items = await self.client.hscan(key, cursor, count=count)
        return int(cursor), dict(items)

    async def scan_keys(self, pattern: str, *, limit: int | None = None) -> list[str]:
        """Keys matching ``pattern`` (``SCAN``; on a cluster, every primary), unordered."""
        keys: list[str] = []
        with _translated():
            async for key in self.client.scan_iter(match=pattern, count=1000):
                keys.append(str(key))
                if limit is not None and len(keys) >= limit:
                    break
        return keys

    def pipeline(self) -> Pipeline:
        """Commands sent in one round trip (not a transaction), replies in order."""
        return Pipeline(self.client.pipeline(transaction=False))

    # -- streams and consumer groups ----------------------------------------------

    async def stream_length(self, key: str) -> int:
        with _translated():
            return int(await self.client.xlen(key))

    async def stream_range(
        self, key: str, start: str, end: str = "+", *, count: int
    ) -> list[tuple[str, dict[str, str]]]:
        """Entries with ``start <= id <= end`` (``(id`` excludes it), oldest first."""
        with _translated():
            chunk = await self.client.xrange(key, min=start, max=end, count=count)
        return [(str(entry_id), fields) for entry_id, fields in chunk]

    async def trim_stream(self, key: str, min_id: str) -> int:
        """Remove every entry below ``min_id`` (exactly); how many went."""
        with _translated():
            return int(await self.client.xtrim(key, minid=min_id, approximate=False))

    async def stream_groups(self, key: str) -> list[dict[str, Any]]:
        """``XINFO GROUPS``: each group's name, pending, last-delivered-id, lag; [] if
        there is no such stream."""
        try:
            with _translated():
                groups: list[dict[str, Any]] = await self.client.xinfo_groups(key)
        except rexc.ResponseError as exc:
            if "no such key" not in str(exc).lower():
                raise
            return []
        return groups

    async def create_group(self, key: str, group: str) -> bool:
        """Create ``group`` on ``key`` from its first entry (and the stream if need be);
        False if the group exists already."""
        try:
            with _translated():
                await self.client.xgroup_create(key, group, id="0", mkstream=True)
        except rexc.ResponseError as exc:
            if not str(exc).startswith("BUSYGROUP"):
                raise
            return False
        return True

    async def read_group(
        self,
        group: str,
        consumer: str,
        start_by_stream: Mapping[str, str],
        *,
        count: int,
        block_ms: int | None = None,
    ) -> list[RawEntry]:
        """``XREADGROUP``: ``>`` for new entries, an id for ``consumer``'s own pending ones.

        On a cluster every stream must share a slot (one stream per call).
        """
        with _translated():
            reply = await self.client.xreadgroup(
                group, consumer, dict(start_by_stream), count=count, block=block_ms
            )
        return _entries(reply)

    async def pending_summary(self, key: str, group: str) -> dict[str, Any]:
        """``XPENDING`` summary: pending count, min and max ids, count per consumer."""
        with _translated():
            summary: dict[str, Any] = await self.client.xpending(key, group)
        return summary

    async def pending_entries(
        self,
        key: str,
        group: str,
        start: str,
        end: str,
        count: int,
        *,
        consumer: str | None = None,
        min_idle_ms: int | None = None,
    ) -> list[dict[str, Any]]:
        """``XPENDING`` detail rows: message_id, consumer, time_since_delivered,
        times_delivered."""
        with _translated():
            rows: list[dict[str, Any]] = await self.client.xpending_range(
                key, group, start, end, count, consumer, idle=min_idle_ms
            )
        return rows

    async def claim_entries(
        self, key: str, group: str, consumer: str, min_idle_ms: int, ids: Sequence[str]
    ) -> list[RawEntry]:
        """``XCLAIM``: take over entries idle at least ``min_idle_ms`` (re-checked)."""
        with _translated():
            claimed = await self.client.xclaim(key, group, consumer, min_idle_ms, list(ids))
        return [(key, str(entry_id), fields or None) for entry_id, fields in claimed or []]

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


class Pipeline:
    """Commands queued here leave in one round trip on ``execute``, which translates
    redis failures like every store method. Only the commands the code needs."""

    __slots__ = ("_pipe",)

    def __init__(self, pipe: Any) -> None:
        self._pipe = pipe

    def hget(self, key: str, field: str) -> None:
        self._pipe.hget(key, field)

    def hmget(self, key: str, *fields: str) -> None:
        self._pipe.hmget(key, fields)

    def hgetall(self, key: str) -> None:
        self._pipe.hgetall(key)

    def hset(self, key: str, mapping: Mapping[str, Any]) -> None:
        self._pipe.hset(key, mapping=mapping)

    def hsetnx(self, key: str, field: str, value: str | bytes) -> None:
        self._pipe.hsetnx(key, field, value)

    def hlen(self, key: str) -> None:
        self._pipe.hlen(key)

    def hkeys(self, key: str) -> None:
        self._pipe.hkeys(key)

    def expire(self, key: str, seconds: int) -> None:
        self._pipe.expire(key, seconds)

    def expire_at_ms(self, key: str, at_ms: int) -> None:
        """``PEXPIREAT``."""
        self._pipe.pexpireat(key, at_ms)

    def zadd(self, key: str, member: str, score: int) -> None:
        self._pipe.zadd(key, {member: score})

    def zcount(self, key: str, max_score: int) -> None:
        """Members scored at most ``max_score``."""
        self._pipe.zcount(key, "-inf", max_score)

    def geoadd(self, key: str, lng: float, lat: float, member: str) -> None:
        self._pipe.geoadd(key, (lng, lat, member))

    def zrem(self, key: str, *members: str) -> None:
        self._pipe.zrem(key, *members)

    def xrange(self, key: str, start: str, end: str, *, count: int) -> None:
        """``XRANGE key start end COUNT count``: ``[(id, fields)]``, oldest first."""
        self._pipe.xrange(key, min=start, max=end, count=count)

    def ack(self, key: str, group: str, ids: Sequence[str]) -> None:
        """``XACK``."""
        self._pipe.xack(key, group, *ids)

    def touch(self, key: str, group: str, consumer: str, ids: Sequence[str]) -> None:
        """``XCLAIM <consumer> 0 ... JUSTID`` to the holder itself: reset the entries'
        idle time without counting a delivery."""
        self._pipe.xclaim(key, group, consumer, 0, list(ids), justid=True)

    def pending_summary(self, key: str, group: str) -> None:
        self._pipe.xpending(key, group)

    async def execute(self, *, raise_on_error: bool = True) -> list[Any]:
        """The replies, in order; with ``raise_on_error=False`` a failed command's reply
        is its (translated) exception and the others stand."""
        with _translated():
            # Error replies come back as values: raised, redis-py rewords them.
            replies: list[Any] = await self._pipe.execute(raise_on_error=False)
        replies = [_translate(r) if isinstance(r, BaseException) else r for r in replies]
        if raise_on_error:
            for reply in replies:
                if isinstance(reply, BaseException):
                    raise reply
        return replies


def _entries(reply: Any) -> list[RawEntry]:
    """``XREADGROUP``'s reply (RESP2 list or RESP3 dict, per stream) as flat entries."""
    out: list[RawEntry] = []
    if not reply:
        return out
    items = reply.items() if isinstance(reply, dict) else reply
    for stream, entries in items:
        if isinstance(entries, list) and len(entries) == 1 and isinstance(entries[0], list):
            entries = entries[0]  # RESP3 shape
        for entry_id, fields in entries:
            out.append((str(stream), str(entry_id), fields or None))
    return out


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
