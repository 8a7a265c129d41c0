"""The rate limiter (``lua/limit_rate.lua``): GCRA in Redis against a plain Python model.

The script judges time by Redis's own clock (``TIME``) and returns the time it used. The
model is fed that same time, so every verdict and every retry delay must match it
exactly; the test controls what happens between calls (which subject, how long to wait),
and needs no clock of its own in the script. Runs on one node and on the cluster.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from engine import claims
from engine.deals import create_deal, get_deal
from engine.errors import RateLimited
from engine.keys import rate_key
from engine.limits import ADDRESS, CALLER, Charge, RateLimiter, Verdict, charge
from engine.settings import Settings
from engine.store import Script, Store
from tests.helpers import new_deal

SUBJECTS = ("u-1", "u-2", "10.0.0.1")


@dataclass
class Model:
    """GCRA as a textbook states it: one theoretical arrival time per subject."""

    interval_us: int
    window_us: int
    tat: dict[str, int] = field(default_factory=dict)

    def decide(self, subject: str, now_us: int) -> tuple[bool, int]:
        tat = max(self.tat.get(subject, 0), now_us)
        ahead = tat + self.interval_us - now_us
        if ahead > self.window_us:
            return False, ahead - self.window_us
        self.tat[subject] = tat + self.interval_us
        return True, 0


steps = st.lists(
    st.tuples(st.sampled_from(SUBJECTS), st.integers(0, 12)),  # (subject, ms to wait first)
    min_size=1,
    max_size=40,
)


def test_limiter_matches_the_gcra_model(settings: Settings) -> None:
    """Any sequence of requests and pauses, from several subjects: the same verdicts and
    retry delays as the model, and a key never outlives the subject's burst window."""
    loop = asyncio.new_event_loop()
    store: Store = loop.run_until_complete(Store.connect(settings))

    @hsettings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        interval_us=st.sampled_from([1_000, 2_500, 4_000]),
        burst=st.integers(1, 5),
        plan=steps,
    )
    def run(interval_us: int, burst: int, plan: list[tuple[str, int]]) -> None:
        limiter = RateLimiter(CALLER, interval_us, interval_us * burst)
        model = Model(interval_us, interval_us * burst)
        keys = [limiter.key(s) for s in SUBJECTS]
        loop.run_until_complete(_delete_each(store, keys))
        for subject, wait_ms in plan:
            if wait_ms:
                loop.run_until_complete(asyncio.sleep(wait_ms / 1000))
            verdict = Verdict.of(loop.run_until_complete(_check(limiter, store, subject)))
            allowed, retry_us = model.decide(subject, verdict.now_us)
            assert (verdict.allowed, verdict.retry_after_us) == (allowed, retry_us), (
                subject,
                verdict,
                model,
            )
            # The key lives while the subject is ahead of schedule, at most its window
            # (it may have expired since: -2).
            ttl_ms = loop.run_until_complete(store.client.pttl(limiter.key(subject)))
            assert ttl_ms == -2 or 0 <= ttl_ms <= model.window_us // 1000 + 2

    try:
        run()
    finally:
        loop.run_until_complete(store.close())
        loop.close()


async def _check(limiter: RateLimiter, store: Store, subject: str) -> Any:
    return await limiter.check(store, subject)


async def _delete_each(store: Store, keys: list[str]) -> None:
    for key in keys:  # one slot each
        await store.client.delete(key)


async def test_a_concurrent_burst_gets_exactly_its_allowance(store: Store) -> None:
    """500 checks sent at once for one fresh subject: exactly the burst is allowed."""
    limiter = RateLimiter.per_second(CALLER, 10)  # bursts of 20
    replies = await asyncio.gather(*(limiter.check(store, "u-burst") for _ in range(500)))
    verdicts = [Verdict.of(r) for r in replies]
    assert sum(v.allowed for v in verdicts) == 20
    refused = [v for v in verdicts if not v.allowed]
    assert all(0 < v.retry_after_us <= 100_000 for v in refused)
    # As a 429 says it: Retry-After in whole seconds (at least 1), and ms rounded up.
    for v in refused:
        answer = RateLimited.by(CALLER, v.retry_after_us)
        assert answer.retry_after_s == 1 and 1 <= answer.details["retry_after_ms"] <= 100
    assert RateLimited.by(ADDRESS, 1_000_001).retry_after_s == 2
    assert RateLimited.by(ADDRESS, 1_001).details["retry_after_ms"] == 2


async def test_each_subject_is_one_key_in_its_own_slot_and_leaves_nothing(
    store: Store,
) -> None:
    """One key per subject (its own hash tag), one slot; gone once the subject is back on
    schedule (one request ahead: one interval)."""
    limiter = RateLimiter(ADDRESS, 300_000, 600_000)  # one request: 300 ms ahead
    for subject in ("192.0.2.1", "2001:db8::/64"):
        assert Verdict.of(await limiter.check(store, subject)).allowed
    keys = [rate_key(ADDRESS, s) for s in ("192.0.2.1", "2001:db8::/64")]
    for key in keys:
        assert key.startswith("fs:{rl:address:") and key.endswith("}")
        assert await store.client.exists(key) == 1
    assert rate_key(CALLER, "192.0.2.1") != keys[0]
    await asyncio.sleep(0.35)
    for key in keys:
        assert await store.client.exists(key) == 0


def test_per_second_is_api_mds_rate_with_bursts_of_twice_it() -> None:
    limiter = RateLimiter.per_second(CALLER, 10)
    assert (limiter.interval_us, limiter.window_us) == (100_000, 2_000_000)
    with pytest.raises(ValueError):
        RateLimiter("nobody", 1, 1)


async def test_a_refusal_by_one_limit_still_counts_the_others(store: Store) -> None:
    """A caller's and an address's limit checked together (one call on one node, one per
    key on a cluster): the address refuses, the caller's limit counts the request anyway,
    and the refusal names the limit that gave the longest wait."""
    caller = RateLimiter(CALLER, 100_000, 1_000_000)  # bursts of 10
    address = RateLimiter(ADDRESS, 500_000, 500_000)  # bursts of 1
    both = [Charge(address, "192.0.2.7"), Charge(caller, "u-1")]
    assert await charge(store, both) is None
    refused = await charge(store, both)
    assert isinstance(refused, RateLimited)
    assert refused.details["limit"] == ADDRESS and refused.retry_after_s == 1
    assert 0 < refused.details["retry_after_ms"] <= 500
    # The caller's key was moved on by both requests: 2 intervals ahead of now.
    tat_us = int(await store.client.get(caller.key("u-1")))
    now_s, now_us = await store.client.time()
    ahead_us = tat_us - (now_s * 1_000_000 + now_us)
    assert 100_000 < ahead_us <= 200_000


async def test_a_claim_counts_its_limits_in_its_own_call_against_the_same_keys(
    store: Store,
) -> None:
    """On one node a claim passes its limits to its script: 300 requests of one caller at
    once, half claims and half other limited requests, share one burst exactly; claims
    over the limit take nothing (the caller's one voucher, and no more)."""
    if store.settings.redis_cluster:
        assert not claims.limiting_in_claims(store)
        with pytest.raises(ValueError):
            await claims.claim(store, "d", "u", [Charge(RateLimiter(CALLER, 1, 1), "u")])
        return
    deal = await create_deal(store, new_deal(50))
    # Bursts of 20, then one every 10 s: no refill while the 300 requests run.
    limiter = RateLimiter(CALLER, 10_000_000, 200_000_000)
    limits = [Charge(limiter, "u-claims")]

    # The claim's script cached (the first call of a script may wait a round trip more).
    await claims.claim(store, deal.id, "u-warm")

    async def by_claim() -> bool:
        try:
            await claims.claim(store, deal.id, "u-claims", limits)
        except RateLimited as exc:
            assert exc.details == {"limit": CALLER, "retry_after_ms": exc.details["retry_after_ms"]}
            return False
        return True

    async def elsewhere() -> bool:
        return await charge(store, limits) is None

    allowed = await asyncio.gather(*(f() for _ in range(150) for f in (by_claim, elsewhere)))
    assert sum(allowed) == 20
    claimed = sum(allowed[::2])
    assert claimed >= 1  # the first request of all is a claim (on a warm script cache)
    # The warm-up's voucher and the caller's one (its other allowed claims got it again).
    assert (await get_deal(store, deal.id)).inventory_left == 48


def test_scripts_paste_their_libraries_in() -> None:
    """``-- #include`` lines are replaced by lua/lib/ sources: what Redis runs is whole."""
    for name in ("limit_rate", "claim_voucher"):
        source = Script.load(name).source
        assert "#include" not in source and "local function charge(" in source
