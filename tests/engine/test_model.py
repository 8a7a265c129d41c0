"""A hypothesis state machine: random creates, claims, retries, cancels and clock
movements against real Redis, checked against a plain Python model after every step.

Redis's own clock decides time windows, so deals start and end around the present
(some within a few hundred ms); when a window boundary falls between the Redis times
read just before and just after a call, either side's answer is accepted, and the
model follows the one Redis gave.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

from engine import claims
from engine.deals import NewDeal, cancel_deal, create_deal, deal_status, get_deal
from engine.errors import FlashsaleError, Forbidden
from engine.settings import Settings
from engine.store import Store

USERS = [f"u-{i}" for i in range(6)]
MERCHANTS = ["m-1", "m-2"]
WINDOWS = ["active", "scheduled", "ended", "ending_soon", "starting_soon"]


@dataclass
class ModelDeal:
    merchant: str
    total: int
    starts: int
    ends: int
    left: int
    cancelled: bool = False
    holders: dict[str, str] = field(default_factory=dict)  # user -> voucher id

    def outcome(self, user: str, now: int) -> str:
        if user in self.holders:
            return "already"
        if self.cancelled:
            return "cancelled"
        if now < self.starts:
            return "not_started"
        if now >= self.ends:
            return "ended"
        if self.left <= 0:
            return "sold_out"
        return "claimed"


class ClaimMachine(RuleBasedStateMachine):
    settings_for_run: Settings

    deals = Bundle("deals")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.store: Store = self.run(Store.connect(self.settings_for_run))
        self.model: dict[str, ModelDeal] = {}

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def redis_now(self) -> int:
        sec, usec = self.run(self.store.client.time())
        return int(sec) * 1000 + int(usec) // 1000

    def teardown(self) -> None:
        self.run(self.store.close())
        self.loop.close()

    @rule(
        target=deals,
        inventory=st.integers(1, 4),
        window=st.sampled_from(WINDOWS),
        soon_ms=st.integers(50, 400),
        merchant=st.sampled_from(MERCHANTS),
    )
    def create(self, inventory: int, window: str, soon_ms: int, merchant: str) -> str:
        now = self.redis_now()
        starts, ends = {
            "active": (now - 60_000, now + 3_600_000),
            "scheduled": (now + 3_600_000, now + 7_200_000),
            "ended": (now - 7_200_000, now - 3_600_000),
            "ending_soon": (now - 60_000, now + soon_ms),
            "starting_soon": (now + soon_ms, now + 3_600_000),
        }[window]
        new = NewDeal(merchant, "t", "", 1.0, 2.0, inventory, starts, ends, ends + 1000)
        deal = self.run(create_deal(self.store, new))
        self.model[deal.id] = ModelDeal(merchant, inventory, starts, ends, inventory)
        return deal.id

    @rule(deal_id=deals, user=st.sampled_from(USERS))
    def claim(self, deal_id: str, user: str) -> None:
        m = self.model[deal_id]
        before = m.outcome(user, self.redis_now())
        try:
            got: str = self.run(claims.claim(self.store, deal_id, user)).outcome
            result = self.run(claims.claim(self.store, deal_id, user))  # a retry
            assert result.outcome == "already"
        except FlashsaleError as exc:
            got, result = exc.code, None
        after = m.outcome(user, self.redis_now())
        assert got in {before, after}, (got, before, after)
        if got == "claimed":
            assert result is not None
            assert result.inventory_left == m.left - 1
            m.left -= 1
            m.holders[user] = result.voucher.voucher_id
        elif got == "already":
            assert result is not None and result.voucher.voucher_id == m.holders[user]

    @rule(deal_id=deals, merchant=st.sampled_from(MERCHANTS))
    def cancel(self, deal_id: str, merchant: str) -> None:
        m = self.model[deal_id]
        if merchant != m.merchant:
            with pytest.raises(Forbidden):
                self.run(cancel_deal(self.store, deal_id, merchant))
            return
        deal = self.run(cancel_deal(self.store, deal_id, merchant))
        assert deal.status == "cancelled"
        m.cancelled = True

    @rule(ms=st.integers(20, 150))
    def time_passes(self, ms: int) -> None:
        self.run(asyncio.sleep(ms / 1000))

    @invariant()
    def redis_agrees_with_the_model(self) -> None:
        for deal_id, m in self.model.items():
            t0 = self.redis_now()
            deal = self.run(get_deal(self.store, deal_id))
            t1 = self.redis_now()
            assert deal.inventory_left == m.left >= 0
            assert m.total - m.left == len(m.holders) == deal.seq
            expected = {deal_status(t, m.starts, m.ends, m.left, m.cancelled) for t in (t0, t1)}
            assert deal.status in expected
            k = self.store.keys.for_deal(deal_id)
            holders = self.run(self.store.client.hgetall(k.claimers))
            assert {u: v.split("|")[0] for u, v in holders.items()} == m.holders


def test_random_interleavings_never_oversell_and_answer_as_the_model(settings: Settings) -> None:
    """Random interleavings never oversell, never double-issue, and always answer as the model."""
    ClaimMachine.settings_for_run = settings
    machine = ClaimMachine.TestCase
    machine.settings = settings_profile()
    machine().runTest()


def settings_profile() -> Any:
    return hsettings(
        max_examples=12,
        stateful_step_count=25,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
