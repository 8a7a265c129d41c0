"""Rate limits: GCRA kept in Redis, one Lua call (``limit_rate``) per request and subject.

A subject (a caller id, a client address) has one key holding its theoretical arrival
time; every API process shares it, and the script decides atomically by Redis's clock,
so a limit is exact under any concurrency and across processes. A rate of ``r`` requests
a second with bursts of ``b`` is an interval of ``1/r`` seconds and a window of ``b/r``:
what a subject may be ahead of schedule. The key expires when the subject is back on
schedule, so Redis holds one key per subject active in the last window (2 seconds with
API.md's bursts of twice the rate), whatever the subjects send.

Cost per request: its limits (a :class:`Charge` each) are counted in one script call on
one node (``GET`` + ``SET PX`` per key), queued in the store's per-loop-turn pipeline with
every other script call; on a cluster one call per key (each key is its own slot), in
the same round trip. A claim on one node pays no call of its own for its limits: they
are passed to ``claim_voucher`` (:func:`limit_args`), which counts them first.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from engine.errors import RateLimited
from engine.keys import rate_key
from engine.store import Store

CALLER = "caller"
ADDRESS = "address"
KINDS = (CALLER, ADDRESS)
# API.md: bursts of twice the rate.
BURST_FACTOR = 2
US_PER_S = 1_000_000


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the limiter decided for one request: allowed, or when to come back."""

    allowed: bool
    retry_after_us: int
    now_us: int  # Redis's clock when it decided

    @classmethod
    def of(cls, reply: Any) -> Verdict:
        """The verdict in ``limit_rate``'s reply ``{allowed, retry_after_us, now_us}``."""
        return cls(bool(int(reply[0])), int(reply[1]), int(reply[2]))


class RateLimiter:
    """One kind of limit (per caller, per address): an interval and a burst window."""

    def __init__(self, kind: str, interval_us: int, window_us: int) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}")
        if interval_us < 1 or window_us < interval_us:
            raise ValueError("need 1 <= interval_us <= window_us")
        self.kind = kind
        self.interval_us = interval_us
        self.window_us = window_us
        # Hot subjects come back many times a second: keep their key names.
        self.key = lru_cache(maxsize=65_536)(self._key)

    @classmethod
    def per_second(cls, kind: str, rate: int, burst_factor: int = BURST_FACTOR) -> RateLimiter:
        """``rate`` requests a second with bursts of ``burst_factor * rate``."""
        interval_us = max(1, round(US_PER_S / rate))
        return cls(kind, interval_us, interval_us * max(1, burst_factor * rate))

    def _key(self, subject: str) -> str:
        return rate_key(self.kind, subject)

    def check(self, store: Store, subject: str) -> asyncio.Future[Any]:
        """Queue this request's check (it leaves with this loop turn's pipeline).

        Await the result and read it with :meth:`Verdict.of`; several checks started in
        one turn share one round trip. Raises ``StoreUnavailable`` when awaited if Redis
        cannot answer.
        """
        return store.run("limit_rate", (self.key(subject),), (self.interval_us, self.window_us))


@dataclass(frozen=True, slots=True)
class Charge:
    """One request, to be counted against one subject's limit."""

    limiter: RateLimiter
    subject: str


def limit_args(charges: Sequence[Charge]) -> tuple[list[str], list[int]]:
    """The limiter keys and their (interval, window) pairs, as ``lib/gcra.lua`` takes them."""
    keys: list[str] = []
    args: list[int] = []
    for c in charges:
        keys.append(c.limiter.key(c.subject))
        args += (c.limiter.interval_us, c.limiter.window_us)
    return keys, args


def refusal(charges: Sequence[Charge], refused_by: int, retry_after_us: int) -> RateLimited:
    """The 429 for a script's refusal by the ``refused_by``-th (1-based) of ``charges``."""
    return RateLimited.by(charges[refused_by - 1].limiter.kind, retry_after_us)


async def charge(store: Store, charges: Sequence[Charge]) -> RateLimited | None:
    """Count one request against each of ``charges``; the refusal with the longest wait,
    if any limit refuses it (the limits that allow it count it all the same).

    One ``limit_rate`` call on one node; on a cluster one per key, in one round trip.
    Raises ``StoreUnavailable`` if Redis cannot answer.
    """
    if not charges:
        return None
    if not store.settings.redis_cluster:
        keys, args = limit_args(charges)
        reply = await store.run("limit_rate", keys, args)
        return None if int(reply[0]) else refusal(charges, int(reply[3]), int(reply[1]))
    calls = [c.limiter.check(store, c.subject) for c in charges]
    verdicts = [Verdict.of(reply) for reply in await asyncio.gather(*calls)]
    worst: tuple[int, Verdict] | None = None
    for n, v in enumerate(verdicts, 1):
        if not v.allowed and (worst is None or v.retry_after_us > worst[1].retry_after_us):
            worst = (n, v)
    return None if worst is None else refusal(charges, worst[0], worst[1].retry_after_us)
