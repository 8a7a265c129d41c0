"""Persister commands: persist, migrate, replay, reconcile, rebuild-redis, archive.

Each is ``async def f(settings, *, option=...) -> int``, the command's options as keyword
arguments and its exit code as the result; ``flashsale/cli.py`` runs them. A command that
cannot go on raises an error carrying its exit code (``engine.errors.ExitCode``):
``Unavailable`` (3), ``StartupError`` such as an unmigrated schema or ``RedisNotEmpty`` (2),
``NameLost`` (1); ``flashsale`` reports it in one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator

from database.pool import Database
from engine.errors import ExitCode, StartupError
from engine.settings import Settings
from engine.store import Store
from persister.schema import check_schema
from persister.schema import migrate as apply_migrations

log = logging.getLogger(__name__)


def _dsn(settings: Settings) -> str:
    if not settings.database_url:
        raise StartupError("no database URL: set FLASHSALE_DATABASE_URL or use `flashsale up`")
    return settings.database_url


async def persist(settings: Settings) -> int:
    """Run the persister until SIGTERM or Ctrl-C.

    Raises ``NameTaken`` (exit 2) if every consumer name on this host is leased, and
    ``NameLost`` (exit 1) if another process took this one's name while it ran.
    """
    from persister.worker import run_persister

    _dsn(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    task = asyncio.create_task(run_persister(settings, stop))
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if not task.done():
        # Asked to stop: the round in progress gets a few seconds, then it is abandoned
        # (its entries stay pending and come back on the next start).
        grace_s = settings.persister_stop_grace_s
        done, _ = await asyncio.wait({task}, timeout=grace_s)
        if not done:
            log.warning("persister did not stop within %.0fs; abandoning", grace_s)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return ExitCode.OK
    stopper.cancel()
    task.result()
    return ExitCode.OK


async def migrate(settings: Settings) -> int:
    """Apply pending migrations."""
    applied = await apply_migrations(_dsn(settings))
    if applied:
        print(f"applied {len(applied)} migration(s): {', '.join(applied)}")
    else:
        print("database schema is up to date")
    return ExitCode.OK


@contextlib.asynccontextmanager
async def _connected(settings: Settings) -> AsyncIterator[tuple[Store, Database]]:
    """Redis and a PostgreSQL whose schema is up to date, closed at exit."""
    dsn = _dsn(settings)
    async with contextlib.AsyncExitStack() as stack:
        store = await Store.connect(settings)
        stack.push_async_callback(store.close)
        db = Database(dsn)
        await db.open()
        stack.push_async_callback(db.close)
        async with db.connection() as conn:
            await check_schema(conn)
        yield store, db


async def replay(settings: Settings, *, from_id: str = "-", to_id: str = "+") -> int:
    """Re-apply stream entries in [from_id, to_id] to PostgreSQL."""
    from persister.replay import replay as run_replay

    async with _connected(settings) as (store, db):
        out = await run_replay(store, db, from_id, to_id)
    print(
        f"replayed {out.entries} entries: {out.vouchers_new} voucher(s) written again, "
        f"{len(out.dead)} dead letter(s), {len(out.parked)} parked"
    )
    return ExitCode.OK


async def reconcile(settings: Settings, *, wait_s: float = 30.0) -> int:
    """Report every difference between Redis and PostgreSQL; exit 1 if any."""
    from persister.reconcile import reconcile as run_reconcile

    async with _connected(settings) as (store, db):
        report = await run_reconcile(store, db, wait_s)
    for diff in report.differences:
        print(diff)
    lag = f"; {report.lag} entries still in flight (lag, not differences)" if report.lag else ""
    print(
        f"{len(report.differences)} difference(s) over {report.deals} deal(s) and "
        f"{report.vouchers} voucher(s){lag}"
    )
    return ExitCode.FAILED if report.differences else ExitCode.OK


async def rebuild_redis(settings: Settings, *, force: bool = False) -> int:
    """Restore Redis from PostgreSQL; raises ``RedisNotEmpty`` (exit 2) over deals unless
    ``force``."""
    from persister.rebuild import rebuild_redis as run_rebuild

    async with _connected(settings) as (store, db):
        out = await run_rebuild(store, db, force=force)
    skipped = f"; {len(out.skipped)} incomplete deal(s) skipped" if out.skipped else ""
    if out.archived:
        skipped += f"; {out.archived} archived deal(s) left in PostgreSQL"
    print(
        f"restored {out.deals} deal(s), {out.vouchers} voucher(s), {out.redemptions} "
        f"redemption(s); {out.indexed} deal(s) indexed for discovery{skipped}"
    )
    return ExitCode.OK


async def archive(settings: Settings, *, dry_run: bool = False) -> int:
    """Archive the deals due now (``dry_run``: only say which); print what it did."""
    from persister.archive import archive_due

    async with _connected(settings) as (store, db):
        run = await archive_due(
            store,
            db,
            dry_run=dry_run,
            batch=settings.archive_batch,
            work_fraction=settings.archive_work_fraction,
        )
    verb = "would archive" if dry_run else "archived"
    for deal_id in run.archived:
        print(f"{verb} {deal_id}")
    for deal_id in run.expired:
        print(f"{verb} {deal_id} (its Redis keys had reached their deadline)")
    for deal_id, why in sorted(run.waiting.items()):
        print(f"waiting {deal_id}: {why}")
    print(run.summary())
    return ExitCode.OK
