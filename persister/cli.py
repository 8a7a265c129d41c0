"""Persister commands: persist, migrate, replay, reconcile, rebuild-redis.

Each is ``async def f(settings, args) -> int`` (the exit code), called by ``flashsale``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Coroutine
from typing import Any

from database.pool import Database
from engine.errors import StartupError, Unavailable
from engine.settings import Settings
from engine.store import Store
from persister.schema import check_schema
from persister.schema import migrate as apply_migrations

log = logging.getLogger(__name__)


def run(command: str, coro: Coroutine[Any, Any, int]) -> int:
    """Run one persister command: the long-running ``persist`` on uvloop (less Python
    per Redis and PostgreSQL round trip), the short ops commands on the default loop."""
    if command == "persist":
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


def _dsn(settings: Settings) -> str:
    if not settings.database_url:
        raise StartupError("no database URL: set FLASHSALE_DATABASE_URL or use `flashsale up`")
    return settings.database_url


def _fail(command: str, exc: BaseException) -> int:
    cause = f" ({exc.__cause__})" if exc.__cause__ else ""
    print(f"flashsale {command}: {exc}{cause}", file=sys.stderr)
    return 3


async def persist(settings: Settings, args: argparse.Namespace) -> int:
    """Run the persister until SIGTERM or Ctrl-C.

    Exit 2 if every consumer name on this host is leased (``NameTaken``), 1 if another
    process took this one's name while it ran (``NameLost``; ``flashsale up`` restarts it).
    """
    from persister.leases import NameTaken
    from persister.worker import NameLost, run_persister

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
            return 0
    stopper.cancel()
    try:
        task.result()
    except NameTaken as exc:
        print(f"flashsale persist: {exc}", file=sys.stderr)
        return 2
    except NameLost as exc:
        print(f"flashsale persist: {exc}; stopped", file=sys.stderr)
        return 1
    return 0


async def migrate(settings: Settings, args: argparse.Namespace) -> int:
    """Apply pending migrations."""
    try:
        applied = await apply_migrations(_dsn(settings))
    except Unavailable as exc:
        return _fail("migrate", exc)
    print(f"applied {len(applied)} migration(s): {', '.join(applied)}" if applied
          else "database schema is up to date")  # fmt: skip
    return 0


async def _open(settings: Settings) -> tuple[Store, Database]:
    store = await Store.connect(settings)
    db = Database(_dsn(settings))
    await db.open()
    try:
        async with db.connection() as conn:
            await check_schema(conn)
    except BaseException:
        await db.close()
        await store.close()
        raise
    return store, db


async def replay(settings: Settings, args: argparse.Namespace) -> int:
    """Re-apply stream entries in [--from, --to] to PostgreSQL."""
    from persister.replay import replay as run_replay

    try:
        store, db = await _open(settings)
    except Unavailable as exc:
        return _fail("replay", exc)
    try:
        out = await run_replay(store, db, args.from_id, args.to_id)
    except Unavailable as exc:
        return _fail("replay", exc)
    finally:
        await db.close()
        await store.close()
    print(
        f"replayed {out.entries} entries: {out.vouchers_new} voucher(s) written again, "
        f"{len(out.dead)} dead letter(s), {len(out.parked)} parked"
    )
    return 0


async def reconcile(settings: Settings, args: argparse.Namespace) -> int:
    """Report every difference between Redis and PostgreSQL; exit 1 if any."""
    from persister.reconcile import reconcile as run_reconcile

    try:
        store, db = await _open(settings)
    except Unavailable as exc:
        return _fail("reconcile", exc)
    try:
        report = await run_reconcile(store, db, float(getattr(args, "wait", 30.0)))
    except Unavailable as exc:
        return _fail("reconcile", exc)
    finally:
        await db.close()
        await store.close()
    for diff in report.differences:
        print(diff)
    lag = f"; {report.lag} entries still in flight (lag, not differences)" if report.lag else ""
    print(
        f"{len(report.differences)} difference(s) over {report.deals} deal(s) and "
        f"{report.vouchers} voucher(s){lag}"
    )
    return 1 if report.differences else 0


async def rebuild_redis(settings: Settings, args: argparse.Namespace) -> int:
    """Restore Redis from PostgreSQL; refuses a Redis holding deals unless --force."""
    from persister.rebuild import RedisNotEmpty
    from persister.rebuild import rebuild_redis as run_rebuild

    try:
        store, db = await _open(settings)
    except Unavailable as exc:
        return _fail("rebuild-redis", exc)
    try:
        out = await run_rebuild(store, db, force=bool(getattr(args, "force", False)))
    except RedisNotEmpty as exc:
        print(f"flashsale rebuild-redis: {exc}", file=sys.stderr)
        return 2
    except Unavailable as exc:
        return _fail("rebuild-redis", exc)
    finally:
        await db.close()
        await store.close()
    skipped = f"; {len(out.skipped)} incomplete deal(s) skipped" if out.skipped else ""
    print(
        f"restored {out.deals} deal(s), {out.vouchers} voucher(s), {out.redemptions} "
        f"redemption(s); {out.indexed} deal(s) indexed for discovery{skipped}"
    )
    return 0
