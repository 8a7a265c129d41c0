"""The persister: drains the partition streams into PostgreSQL, at least once, idempotently.

One round: read a batch (this consumer's own pending entries first, then entries idle
too long elsewhere, then new ones), write it in one transaction, XACK after the commit.
While PostgreSQL is away the same batch is retried with jittered backoff and nothing
new is read, so the stream (capped) holds the backlog. Entries PostgreSQL keeps refusing,
or that were delivered too often, go to ``dead_letters`` and are acknowledged.

Stopping (SIGTERM, Ctrl-C): the round in progress finishes or is abandoned (its entries
stay pending and come back to this name on the next start); never more than a few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass

from database.errors import Transient
from database.pool import Database
from engine.errors import DatabaseUnavailable, FlashsaleError, StoreUnavailable
from engine.settings import Settings
from engine.store import RawEntry, Store
from persister.archive import archive_forever
from persister.consumer import Consumer, ensure_groups
from persister.events import Entry, Parsed, parse
from persister.leases import lease_consumer_name, release_lease, renew_lease
from persister.retention import trim_acked
from persister.schema import check_schema
from persister.writer import Written, write_dead_letters, write_parsed

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Stats:
    """Counters since start (logged, and read by tests and the benchmark)."""

    rounds: int = 0
    entries: int = 0
    vouchers_new: int = 0
    dead: int = 0
    parked: int = 0
    acked: int = 0
    trimmed: int = 0
    db_down_s: float = 0.0


class NameLost(FlashsaleError):
    """Another process holds this persister's consumer name now (our lease lapsed): stop,
    exit 1 (``flashsale up`` starts a persister again)."""


class Backoff:
    """Exponential backoff with full jitter, reset after a success."""

    def __init__(self, base_s: float, cap_s: float) -> None:
        self.base_s = base_s
        self.cap_s = cap_s
        self.failures = 0

    def next_s(self) -> float:
        self.failures += 1
        return random.uniform(0, min(self.cap_s, self.base_s * 2**self.failures))

    def reset(self) -> None:
        self.failures = 0


class Persister:
    """One consumer of the persister group; ``run()`` until ``stop()``."""

    def __init__(
        self, settings: Settings, store: Store, db: Database, name: str, *, pipeline: bool = True
    ) -> None:
        self.settings = settings
        self.pipeline = pipeline  # read the next batch while committing this one
        self.store = store
        self.db = db
        self.name = name
        self.consumer = Consumer(store, name, settings.persister_batch, settings.persister_block_ms)
        self.stats = Stats()
        self._stop = asyncio.Event()
        self._backoff = Backoff(settings.persister_backoff_base_s, settings.persister_backoff_max_s)
        self._next_reclaim = 0.0
        self._next_trim = 0.0
        self._reread_own = False  # a read failed: take back what it may have delivered
        self._ahead: asyncio.Task[list[RawEntry]] | None = None  # the next batch, being read

    def stop(self) -> None:
        """Ask the loop to stop after the round in progress."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake at once when asked to stop."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stop.wait()

    async def run(self) -> Stats:
        """Drain own pending entries, then loop: reclaim, trim, read, write, ack."""
        log.info("persister %s starting", self.name)
        await self._until_ok(ensure_groups, self.store)
        while not self.stopping:
            pending = await self._until_ok(self.consumer.read_own_pending)
            if not pending:
                break
            await self._round(pending, check_deliveries=True)
        # Pipelined: while one batch is being committed, the next one is already being
        # read (at most one batch ahead). Only committed entries are ever acknowledged;
        # entries read ahead are pending under this name, like any delivered entry.
        try:
            while not self.stopping:
                now = time.monotonic()
                if now >= self._next_reclaim:
                    self._next_reclaim = now + self.settings.persister_reclaim_interval_s
                    idle_ms = int(self.settings.persister_claim_idle_s * 1000)
                    reclaimed = await self._until_ok(self.consumer.reclaim, idle_ms)
                    if reclaimed:
                        log.info("reclaimed %d idle entries", len(reclaimed))
                        await self._round(reclaimed, check_deliveries=True)
                        continue
                if now >= self._next_trim:
                    self._next_trim = now + self.settings.persister_trim_interval_s
                    await self._trim()
                if self._ahead is not None:
                    entries, self._ahead = await self._ahead, None
                else:
                    entries = await self._until_ok(self._read_next)
                if entries:
                    # Nothing else is in flight here: this name's pending entries must be
                    # exactly these. More means a read whose reply we never saw (a timeout
                    # that redis-py retried silently) delivered entries to us: no read-ahead
                    # this round, and take them back right after it.
                    lost = await self.consumer.pending_count() != len(entries)
                    self._reread_own = self._reread_own or lost
                    await self._round(
                        entries, check_deliveries=False, read_ahead=self.pipeline and not lost
                    )
            if self._ahead is not None:
                # Stopping with a batch read ahead: write it too (or, PostgreSQL away, leave
                # it pending for this name's next start), rather than leave it to a reclaim.
                entries, self._ahead = await self._ahead, None
                if entries:
                    await self._round(entries, check_deliveries=False)
        finally:
            if self._ahead is not None:  # cancelled or failed: its entries stay pending
                self._ahead.cancel()
                with contextlib.suppress(BaseException):
                    await self._ahead
                self._ahead = None
        log.info(
            "persister %s stopped: %d entries, %d new vouchers, %d dead letters, %d parked",
            self.name,
            self.stats.entries,
            self.stats.vouchers_new,
            self.stats.dead,
            self.stats.parked,
        )
        return self.stats

    async def _read_next(self) -> list[RawEntry]:
        """New entries; after a failed read, this consumer's own pending entries first.

        A read that failed on our side (a timeout, a dropped connection) may still have
        delivered entries to this name: they are taken back here at once, rather than
        left idle until a reclaim. Called only when nothing is in flight, so every
        pending entry of this name is one nobody is writing.
        """
        if self._reread_own:
            own = await self.consumer.read_own_pending()
            if own:
                log.info("took back %d entries a failed read had delivered", len(own))
                return own
            self._reread_own = False
        try:
            return await self.consumer.read_new()
        except StoreUnavailable:
            self._reread_own = True
            raise

    async def _read_ahead(self) -> list[RawEntry]:
        """The next batch, read while the current one is written; [] if Redis failed
        (the main loop then takes back whatever that read delivered, and retries)."""
        try:
            return await self.consumer.read_new()
        except StoreUnavailable:
            log.warning("Redis unavailable while reading ahead; taking back its entries")
            self._reread_own = True
            return []

    async def _until_ok(self, fn, *args):  # type: ignore[no-untyped-def]
        """Call ``fn`` until Redis answers (backing off), or return None when stopping."""
        while True:
            try:
                result = await fn(*args)
                self._backoff.reset()
                return result
            except StoreUnavailable:
                if self.stopping:
                    return None
                delay = self._backoff.next_s()
                log.warning("Redis unavailable; retrying in %.2fs", delay)
                await self._sleep(delay)

    async def _round(
        self, raw: list[RawEntry], *, check_deliveries: bool, read_ahead: bool = False
    ) -> None:
        """Write one batch (retrying while PostgreSQL is away), then acknowledge it.

        With ``read_ahead``, the next batch is read while this one is being written: the
        read starts after the parsing, so that no Redis reply waits on a busy event loop.
        """
        deleted = [r for r in raw if r[2] is None]
        entries = [Entry(s, i, f) for s, i, f in raw if f is not None]
        too_often: list[tuple[Entry, str]] = []
        if check_deliveries and entries:
            counts = await self._until_ok(self.consumer.delivery_counts, raw) or {}
            limit = self.settings.persister_max_deliveries
            keep = []
            for e in entries:
                n = counts.get((e.stream, e.id), 0)
                if n > limit:
                    too_often.append((e, f"delivered {n} times without being written"))
                else:
                    keep.append(e)
            entries = keep
        parsed = parse(entries)
        if read_ahead and not self.stopping:
            self._ahead = asyncio.create_task(self._read_ahead())
        written = await self._write(parsed, too_often, raw)
        if written is None:
            return  # stopping while PostgreSQL is away: the entries stay pending
        await self._until_ok(self.consumer.ack, raw)
        self.stats.rounds += 1
        self.stats.entries += written.entries
        self.stats.vouchers_new += written.vouchers_new
        self.stats.dead += len(written.dead)
        self.stats.parked += len(written.parked)
        self.stats.acked += len(raw)
        if deleted:
            log.warning("acknowledged %d entries deleted while pending", len(deleted))

    async def _write(
        self, parsed: Parsed, too_often: list[tuple[Entry, str]], held: list[RawEntry]
    ) -> Written | None:
        down_since: float | None = None
        touched_at = time.monotonic()
        while True:
            try:
                written = await write_parsed(self.db, parsed, self.settings.persister_max_attempts)
                if too_often:
                    async with self.db.transaction() as conn:
                        await write_dead_letters(
                            conn, too_often, self.settings.persister_max_deliveries
                        )
                    written.dead.extend(too_often)
                if down_since is not None:
                    gap = time.monotonic() - down_since
                    self.stats.db_down_s += gap
                    log.info("PostgreSQL is back after %.1fs", gap)
                self._backoff.reset()
                return written
            except Transient as exc:
                log.info("transaction clash (%s); retrying", exc)
                await self._sleep(random.uniform(0, 0.05))
            except DatabaseUnavailable:
                if down_since is None:
                    down_since = time.monotonic()
                if self.stopping:
                    return None
                delay = self._backoff.next_s()
                log.warning("PostgreSQL unavailable; retrying the batch in %.2fs", delay)
                if time.monotonic() - touched_at > self.settings.persister_claim_idle_s / 3:
                    # Keep other persisters off the batch in hand for as long as it waits.
                    with contextlib.suppress(StoreUnavailable):
                        await self.consumer.touch(held + self._read_ahead_entries())
                        touched_at = time.monotonic()
                await self._sleep(delay)

    def _read_ahead_entries(self) -> list[RawEntry]:
        """The next batch, if it has been read already (it is pending to us as well)."""
        ahead = self._ahead
        if ahead is None or not ahead.done() or ahead.cancelled() or ahead.exception():
            return []
        return ahead.result()

    async def _trim(self) -> None:
        try:
            trimmed = await trim_acked(
                self.store,
                int(self.settings.stream_retention_s * 1000),
                self.settings.stream_trim_fraction,
            )
        except StoreUnavailable:
            return
        for t in trimmed:
            self.stats.trimmed += t.removed
            log.debug("trimmed %d from %s (%d left)", t.removed, t.stream, t.length)


async def run_persister(settings: Settings, stop: asyncio.Event | None = None) -> Stats:
    """Connect, check the schema, lease a name and run until ``stop`` is set."""
    if not settings.database_url:
        raise DatabaseUnavailable("no database URL: set FLASHSALE_DATABASE_URL")
    store = await Store.connect(settings)
    db = Database(settings.database_url)
    await db.open()
    lease: tuple[str, str] | None = None
    renewer: asyncio.Task[None] | None = None
    try:
        if not await _check_schema(db, stop or asyncio.Event(), settings):
            return Stats()  # asked to stop before PostgreSQL answered
        if settings.persister_name:
            name = settings.persister_name
        else:
            lease = await lease_consumer_name(store, settings.persister_lease_ttl_ms)
            name = lease[0]
        persister = Persister(settings, store, db, name)
        if lease is not None:
            renewer = asyncio.create_task(_renew(store, settings, *lease, persister))
        watcher = asyncio.create_task(_stop_when(stop, persister)) if stop else None
        # The archiver works beside the drain loop (docs/lifecycle.md); stopped with it.
        archiver_stop = asyncio.Event()
        archiver = asyncio.create_task(archive_forever(settings, store, db, archiver_stop))
        try:
            stats = await persister.run()
        finally:
            if watcher is not None:
                watcher.cancel()
            archiver_stop.set()
            archiver.cancel()  # a pass cut anywhere is safe: marked first, removed after
            with contextlib.suppress(BaseException):
                await archiver
        if renewer is not None and renewer.done() and not renewer.cancelled():
            renewer.result()  # raises NameLost: the name was lost, we stopped consuming
        return stats
    finally:
        if renewer is not None:
            renewer.cancel()
            with contextlib.suppress(BaseException):
                await renewer
        if lease is not None:
            with contextlib.suppress(StoreUnavailable):
                await release_lease(store, *lease)
        await db.close()
        await store.close()


async def _check_schema(db: Database, stop: asyncio.Event, settings: Settings) -> bool:
    """Wait for PostgreSQL if it is down at start (False if stopped meanwhile);
    refuse an unmigrated schema."""
    backoff = Backoff(settings.persister_backoff_base_s, settings.persister_backoff_max_s)
    while not stop.is_set():
        try:
            async with db.connection() as conn:
                await check_schema(conn)
            return True
        except DatabaseUnavailable:
            delay = backoff.next_s()
            log.warning("PostgreSQL unavailable at start; retrying in %.2fs", delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
    return False


async def _stop_when(stop: asyncio.Event, persister: Persister) -> None:
    await stop.wait()
    persister.stop()


async def _renew(
    store: Store, settings: Settings, name: str, token: str, persister: Persister
) -> None:
    """Keep our lease on the name; if another process holds it now, stop consuming under
    it (the round in progress finishes) and raise ``NameLost`` (the process exits non-zero
    and ``flashsale up`` starts a fresh persister, which leases a free name)."""
    while True:
        await asyncio.sleep(settings.persister_lease_renew_s)
        try:
            if await renew_lease(store, name, token, settings.persister_lease_ttl_ms):
                continue
        except StoreUnavailable:
            continue
        log.error("another process took the consumer name %s: stopping this persister", name)
        persister.stop()
        raise NameLost(f"another process took the consumer name {name}; stopped")
