"""A hypothesis state machine: random creates, claims, retries, cancels and clock
movements against real Redis, checked against a plain Python model after every step.

Redis's own clock decides time windows, so deals start and end around the present
(some within a few hundred ms); when a window boundary falls between the Redis times
read just before and just after a call, either side's answer is accepted, and the
model follows the one Redis gave.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, precondition, rule

from engine import claims, redemptions
from engine.claims import Voucher
from engine.deals import Deal, NewDeal, cancel_deal, create_deal, deal_status, get_deal
from engine.errors import AlreadyRedeemed, DealNotFound, FlashsaleError, Forbidden, InvalidVoucher
from engine.settings import Settings
from engine.store import Store
from engine.times import to_rfc3339
from engine.vouchers import VoucherSigner, read_voucher
from tests.conftest import flush

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
    redeem: int = 0  # redeem_until, ms
    vouchers: dict[str, tuple[str, int, int]] = field(default_factory=dict)  # id -> user, seq, at
    firsts: dict[str, tuple[str, str, int]] = field(
        default_factory=dict
    )  # id -> merchant, entry, at
    conflicts: set[tuple[str, str, str]] = field(default_factory=set)  # voucher, merchant, entry
    archived: bool = False

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
    redeem_after_end_ms = 1000

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
        redeem = ends + self.redeem_after_end_ms
        new = NewDeal(merchant, "t", "", 1.0, 2.0, inventory, starts, ends, redeem)
        deal = self.run(create_deal(self.store, new))
        self.model[deal.id] = ModelDeal(merchant, inventory, starts, ends, inventory, redeem=redeem)
        return deal.id

    # Hooks: how a claim, a cancellation and a read reach the deal (the lifecycle machine
    # below sends those of archived deals to PostgreSQL, as the API does).
    def claim_call(self, deal_id: str, user: str) -> claims.ClaimResult:
        return self.run(claims.claim(self.store, deal_id, user))  # type: ignore[no-any-return]

    def cancel_call(self, deal_id: str, merchant: str) -> Deal:
        return self.run(cancel_deal(self.store, deal_id, merchant))  # type: ignore[no-any-return]

    def read_deal(self, deal_id: str) -> Deal:
        return self.run(get_deal(self.store, deal_id))  # type: ignore[no-any-return]

    def read_holders(self, deal_id: str) -> dict[str, str]:
        k = self.store.keys.for_deal(deal_id)
        holders = self.run(self.store.client.hgetall(k.claimers))
        return {u: v.split("|")[0] for u, v in holders.items()}

    @rule(deal_id=deals, user=st.sampled_from(USERS))
    def claim(self, deal_id: str, user: str) -> None:
        m = self.model[deal_id]
        before = m.outcome(user, self.redis_now())
        try:
            got: str = self.claim_call(deal_id, user).outcome
            result = self.claim_call(deal_id, user)  # a retry
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
            v = result.voucher
            m.vouchers[v.voucher_id] = (user, v.seq, v.claimed_at_ms)
        elif got == "already":
            assert result is not None and result.voucher.voucher_id == m.holders[user]

    @rule(deal_id=deals, merchant=st.sampled_from(MERCHANTS))
    def cancel(self, deal_id: str, merchant: str) -> None:
        m = self.model[deal_id]
        if merchant != m.merchant:
            with pytest.raises(Forbidden):
                self.cancel_call(deal_id, merchant)
            return
        deal = self.cancel_call(deal_id, merchant)
        if m.archived:  # an archived deal's record is final: answered, not changed
            assert deal.status == ("cancelled" if m.cancelled else "ended")
            return
        assert deal.status == "cancelled"
        m.cancelled = True

    @rule(ms=st.integers(20, 150))
    def time_passes(self, ms: int) -> None:
        self.run(asyncio.sleep(ms / 1000))

    @invariant()
    def redis_agrees_with_the_model(self) -> None:
        for deal_id, m in self.model.items():
            t0 = self.redis_now()
            deal = self.read_deal(deal_id)
            t1 = self.redis_now()
            assert deal.inventory_left == m.left >= 0
            assert m.total - m.left == len(m.holders) == deal.seq
            expected = {deal_status(t, m.starts, m.ends, m.left, m.cancelled) for t in (t0, t1)}
            assert deal.status in expected
            assert self.read_holders(deal_id) == m.holders


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


# -- the lifecycle: archive runs and time passing ------------------------------------

GRACE_MS = 60_000
TILLS = ["till-1", "till-2"]
ENTRY_IDS = [f"e-{i}" for i in range(6)]


class LifecycleMachine(ClaimMachine):
    """The claim machine with a persister running, online and offline redemptions, and
    archive runs at a chosen "now": Redis's clock plus up to the grace and one second, so
    that deals past their redeem_until become due without the test waiting for the grace,
    and deals that have just ended too (their vouchers not yet expired: PostgreSQL then
    decides redemptions that Redis would have accepted). Claims, cancels, reads and
    redemptions of archived deals go to PostgreSQL, as the API sends them.

    After every step: nothing the persister has not written is removed (an archived deal's
    vouchers, first redemptions and conflicts are all in PostgreSQL, as the model has
    them), every voucher reads back with the same fields, and reconcile finds no difference.
    """

    database_url: str

    def __init__(self) -> None:
        super().__init__()
        self.run(self._start())
        self.kept: dict[tuple[str, str, str], dict[str, Any]] = {}  # merchant, month, entry

    async def _start(self) -> None:
        from api.archive import Archive
        from api.records import Records
        from database.pool import Database
        from persister.worker import Persister

        await self.store.client.flushall()  # each example starts empty, in Redis and below
        self.db = Database(self.database_url)
        await self.db.open()
        async with self.db.connection() as conn:
            await conn.execute(
                "TRUNCATE deals, vouchers, redemptions, redemption_conflicts, dead_letters,"
                " parked_vouchers"
            )
        self.records = Records(self.database_url)
        await self.records.open()
        self.archive = Archive(self.records)
        self.signer = VoucherSigner(self.settings_for_run.signing_keys_dir)
        self.persister = Persister(self.settings_for_run, self.store, self.db, "model-0")
        self.persister_task = asyncio.get_running_loop().create_task(self.persister.run())

    def teardown(self) -> None:
        self.persister.stop()
        self.run(asyncio.wait_for(self.persister_task, 10))
        self.run(self.records.close())
        self.run(self.db.close())
        super().teardown()

    # Hooks: archived deals answer from PostgreSQL.
    def claim_call(self, deal_id: str, user: str) -> claims.ClaimResult:
        try:
            return super().claim_call(deal_id, user)
        except DealNotFound:
            return self.run(self.archive.claim(deal_id, user))  # type: ignore[no-any-return]

    def cancel_call(self, deal_id: str, merchant: str) -> Deal:
        try:
            return super().cancel_call(deal_id, merchant)
        except DealNotFound:
            deal = self.run(self.archive.deal(deal_id))
            assert deal is not None
            if deal.merchant_id != merchant:
                raise Forbidden() from None
            return deal  # type: ignore[no-any-return]

    def read_deal(self, deal_id: str) -> Deal:
        if not self.model[deal_id].archived:
            return super().read_deal(deal_id)
        deal = self.run(self.archive.deal(deal_id))
        assert deal is not None
        return deal  # type: ignore[no-any-return]

    def read_holders(self, deal_id: str) -> dict[str, str]:
        if not self.model[deal_id].archived:
            return super().read_holders(deal_id)
        rows = self.run(self._pg("SELECT user_id, id FROM vouchers WHERE deal_id = $1", deal_id))
        return {r["user_id"]: r["id"] for r in rows}

    async def _pg(self, query: str, *args: Any) -> list[Any]:
        async with self.db.connection() as conn:
            return list(await conn.fetch(query, *args))

    def _voucher(self, deal_id: str, user: str) -> Voucher | None:
        m = self.model[deal_id]
        vid = m.holders.get(user)
        if vid is None:
            return None
        _user, seq, at = m.vouchers[vid]
        return Voucher(vid, deal_id, user, m.merchant, seq, at, m.redeem)

    @staticmethod
    def _exp_ms(m: ModelDeal) -> int:
        return m.redeem // 1000 * 1000  # the token's exp is in whole seconds

    @rule(
        target=ClaimMachine.deals,
        inventory=st.integers(1, 4),
        users=st.lists(st.sampled_from(USERS), min_size=1, max_size=4, unique=True),
        ends_in_ms=st.integers(100, 600),
        merchant=st.sampled_from(MERCHANTS),
    )
    def create_and_claim(
        self, inventory: int, users: list[str], ends_in_ms: int, merchant: str
    ) -> str:
        """A deal about to end, claimed at once: it will have vouchers when it is due."""
        deal_id: str = self.create(inventory, "ending_soon", ends_in_ms, merchant)
        for user in users:
            self.claim(deal_id, user)
        return deal_id

    @rule(
        target=ClaimMachine.deals,
        users=st.lists(st.sampled_from(USERS), min_size=1, max_size=4, unique=True),
        redeemed=st.integers(0, 4),
        merchant=st.sampled_from(MERCHANTS),
    )
    def live_then_archived(self, users: list[str], redeemed: int, merchant: str) -> str:
        """A deal's whole life in one step: claimed, some vouchers redeemed at the till,
        ended, written, archived (so that later steps meet archived deals often)."""
        deal_id = self.create_and_claim(4, users, 150, merchant)
        for pick in range(redeemed):
            self.redeem_online(deal_id, pick)
        self.deals_end()
        self.archive_run(GRACE_MS + 1000, settle=True)
        assert self.model[deal_id].archived
        return deal_id

    @rule()
    def deals_end(self) -> None:
        """Time passes until the deals about to end have ended (at most 700 ms)."""
        now = self.redis_now()
        ending = [m.ends for m in self.model.values() if now < m.ends <= now + 700]
        if ending:
            self.run(asyncio.sleep((max(ending) - now + 5) / 1000))

    def _holder(self, deal_id: str, pick: int) -> Voucher | None:
        holders = sorted(self.model[deal_id].holders)
        return self._voucher(deal_id, holders[pick % len(holders)]) if holders else None

    @rule(deal_id=ClaimMachine.deals, pick=st.integers(0, 5))
    def redeem_online(self, deal_id: str, pick: int) -> None:
        voucher = self._holder(deal_id, pick)
        if voucher is None:
            return
        m = self.model[deal_id]
        t0 = self.redis_now()
        try:
            done = self.run(
                redemptions.redeem(
                    self.store, self.signer, self.signer.sign(voucher), m.merchant, self.archive
                )
            )
            got, at = "accepted", done.redeemed_at_ms
        except AlreadyRedeemed:
            got, at = "already", 0
        except InvalidVoucher as exc:
            got, at = str(exc.details.get("reason")), 0
        t1 = self.redis_now()
        first = m.firsts.get(voucher.voucher_id)
        expected = {
            "expired" if now >= self._exp_ms(m) else ("already" if first else "accepted")
            for now in (t0, t1)
        }
        assert got in expected, (got, expected)
        if got == "accepted":
            m.firsts[voucher.voucher_id] = (m.merchant, "", at)

    @rule(
        deal_id=ClaimMachine.deals,
        pick=st.integers(0, 5),
        till=st.sampled_from(TILLS),
        entry_id=st.sampled_from(ENTRY_IDS),
        before_exp=st.booleans(),
        fraction=st.floats(0.0, 0.99),
    )
    def sync(
        self, deal_id: str, pick: int, till: str, entry_id: str, before_exp: bool, fraction: float
    ) -> None:
        """An offline redemption made between the claim and exp (or after exp), uploaded now."""
        voucher = self._holder(deal_id, pick)
        if voucher is None:
            return
        m = self.model[deal_id]
        claimed, exp = voucher.claimed_at_ms, self._exp_ms(m)
        if before_exp and exp > claimed:
            at = claimed + int((exp - claimed) * fraction)
        else:
            at = max(claimed, exp) + int(1000 * fraction)
        token = self.signer.sign(voucher)
        entry = {"entry_id": entry_id, "token": token, "redeemed_at": to_rfc3339(at)}
        (got,) = self.run(
            redemptions.sync(
                self.store, self.signer, m.merchant, till, [entry], lambda _: True, self.archive
            )
        )
        key = (m.merchant, time.strftime("%Y%m", time.gmtime(m.redeem // 1000)), entry_id)
        if key in self.kept:
            first = self.kept[key]
            assert (got["status"], got["first_redeemed_at"]) == (
                "duplicate",
                first["first_redeemed_at"],
            ), (got, first)
            return
        vid = voucher.voucher_id
        first_redemption = m.firsts.get(vid)
        drift_ms = self.settings_for_run.device_clock_drift_ms
        if first_redemption and first_redemption[:2] == (m.merchant, entry_id):
            expected = ("accepted", None, first_redemption[2])
        elif at > self.redis_now() + drift_ms:  # a deal redeemable for an hour yet
            expected = ("rejected", "implausible_time", None)
        elif at >= self._exp_ms(m):
            expected = ("rejected", "expired", None)
        elif first_redemption:
            expected = ("conflict", None, first_redemption[2])
            m.conflicts.add((vid, m.merchant, entry_id))
        else:
            expected = ("accepted", None, at)
            m.firsts[vid] = (m.merchant, entry_id, at)
        first_at = to_rfc3339(expected[2]) if expected[2] else None
        assert (got["status"], got["code"], got["first_redeemed_at"]) == (
            expected[0],
            expected[1],
            first_at,
        ), (got, expected)
        self.kept[key] = got

    @precondition(lambda self: bool(self.model))
    @rule(
        skew_ms=st.sampled_from([0, GRACE_MS // 2, GRACE_MS, GRACE_MS + 1000]),
        settle=st.booleans(),
    )
    def archive_run(self, skew_ms: int, settle: bool) -> None:
        """An archive pass at Redis's now + ``skew_ms``; with ``settle``, after the
        persister has caught up (then every due deal must go)."""
        from persister.archive import archive_due
        from tests.persister.conftest import wait_caught_up

        if settle:
            self.run(wait_caught_up(self.store))
        now = self.redis_now() + skew_ms
        run = self.run(archive_due(self.store, self.db, now_ms=now))
        due = {d for d, m in self.model.items() if not m.archived and m.redeem + GRACE_MS <= now}
        assert set(run.archived) <= due, (run.archived, due)
        if settle:
            assert set(run.archived) == due, run
        for deal_id in run.archived:
            self.model[deal_id].archived = True

    @invariant()
    def archived_deals_are_whole_in_postgres_and_gone_from_redis(self) -> None:
        for deal_id, m in self.model.items():
            k = self.store.keys.for_deal(deal_id)
            in_redis = self.run(self.store.client.exists(k.deal, k.claimers, k.vouchers))
            if not m.archived:
                assert self.run(self.store.client.exists(k.deal)) == 1
                continue
            assert in_redis == 0
            rows = self.run(
                self._pg(
                    "SELECT voucher_id, merchant_id, entry_id, fs_to_ms(redeemed_at) AS at"
                    " FROM redemptions WHERE deal_id = $1",
                    deal_id,
                )
            )
            assert {r["voucher_id"]: (r["merchant_id"], r["entry_id"], r["at"]) for r in rows} == (
                m.firsts
            )
            rows = self.run(
                self._pg(
                    "SELECT voucher_id, merchant_id, entry_id FROM redemption_conflicts"
                    " WHERE deal_id = $1",
                    deal_id,
                )
            )
            assert {(r["voucher_id"], r["merchant_id"], r["entry_id"]) for r in rows} == (
                m.conflicts
            )

    @invariant()
    def every_voucher_reads_back_the_same(self) -> None:
        for deal_id, m in self.model.items():
            for user in m.holders:
                want = self._voucher(deal_id, user)
                assert want is not None
                held = self.run(read_voucher(self.store, want.voucher_id))
                if m.archived:
                    assert held is None
                    held = self.run(self.archive.voucher(want.voucher_id))
                assert held is not None and held.voucher == want
                assert held.status == ("redeemed" if want.voucher_id in m.firsts else "issued")

    @invariant()
    def reconcile_finds_no_difference(self) -> None:
        from persister.reconcile import reconcile

        report = self.run(reconcile(self.store, self.db, 10.0))
        assert report.lag == 0 and report.differences == [], report


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_lifecycle_matches_the_model(redis_url: str, database_url: str, tmp_path: Path) -> None:
    """Archive runs, time passing, late syncs: nothing unwritten is lost, every voucher
    reads the same, late syncs answer as the model does, reconcile agrees."""
    from tests.persister.conftest import drop_database, fresh_database

    dsn = asyncio.run(fresh_database(database_url))
    try:
        flush(redis_url, False)
        LifecycleMachine.settings_for_run = Settings(
            redis_url=redis_url,
            database_url=dsn,
            data_dir=tmp_path,
            partitions=4,
            archive_grace_s=GRACE_MS / 1000,
            persister_block_ms=20,
        )
        LifecycleMachine.database_url = dsn
        machine = LifecycleMachine.TestCase
        machine.settings = hsettings(
            max_examples=10,
            stateful_step_count=35,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        )
        machine().runTest()
    finally:
        asyncio.run(drop_database(database_url, dsn))
