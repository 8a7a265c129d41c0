"""Persister fixtures: a fresh, migrated database per test, persister subprocesses, own servers."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from database.pool import Database
from engine.settings import Settings
from engine.store import Store
from engine.streams import stream_lag
from persister.schema import migrate
from persister.worker import Persister
from tests.conftest import flush

ROOT = Path(__file__).resolve().parents[2]
SECRET = "test-secret-" + "x" * 32


def _with_db(url: str, name: str) -> str:
    return url.rsplit("/", 1)[0] + "/" + name


async def fresh_database(server_url: str) -> str:
    """CREATE DATABASE t_<random> on the server, migrated; return its DSN."""
    name = "t_" + secrets.token_hex(6)
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    dsn = _with_db(server_url, name)
    await migrate(dsn)
    return dsn


async def drop_database(server_url: str, dsn: str) -> None:
    name = dsn.rsplit("/", 1)[1]
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture
async def db_url(database_url: str) -> AsyncIterator[str]:
    """A fresh, migrated database on the session's PostgreSQL."""
    dsn = await fresh_database(database_url)
    try:
        yield dsn
    finally:
        await drop_database(database_url, dsn)


@pytest.fixture
def psettings(redis_url: str, db_url: str, tmp_path: Path) -> Settings:
    """Settings on the session's Redis (flushed) and this test's database; 4 partitions."""
    flush(redis_url, False)
    return Settings(
        redis_url=redis_url,
        database_url=db_url,
        data_dir=tmp_path,
        partitions=4,
        auth_secret=SECRET,
        persister_block_ms=50,
        persister_trim_interval_s=0.2,
    )


@pytest.fixture
async def pstore(psettings: Settings) -> AsyncIterator[Store]:
    s = await Store.connect(psettings)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def pg(db_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection to this test's database, for assertions."""
    conn = await asyncpg.connect(db_url)
    try:
        yield conn
    finally:
        await conn.close()


class HeldLock:
    """A lock the test holds on a table in an open transaction of its own."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def release(self) -> None:
        """End the transaction (and so the lock)."""
        if not self.conn.is_closed():
            await self.conn.close()


@pytest.fixture
async def vouchers_locked(db_url: str) -> AsyncIterator[HeldLock]:
    """``LOCK TABLE vouchers IN SHARE MODE`` held by the test: reads go on, a persister's
    INSERT of a batch waits for it (after the read, before the commit) until released."""
    conn = await asyncpg.connect(db_url)
    lock = HeldLock(conn)
    try:
        await conn.execute("BEGIN; LOCK TABLE vouchers IN SHARE MODE")
        yield lock
    finally:
        await lock.release()


async def wait_insert_blocked(pg: asyncpg.Connection, table: str, timeout_s: float = 20.0) -> None:
    """Until some session's INSERT into ``table`` waits for a lock (seen by PostgreSQL)."""
    deadline = time.monotonic() + timeout_s
    while not await pg.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND wait_event_type = 'Lock' AND query ILIKE $1",
        f"%INSERT INTO {table} %",
    ):
        assert time.monotonic() < deadline, f"no INSERT into {table} waiting for its lock"
        await asyncio.sleep(0.05)


def sigstop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a process (SIGSTOP) and return once the kernel says it is stopped."""
    proc.send_signal(signal.SIGSTOP)
    stat = Path(f"/proc/{proc.pid}/stat")
    deadline = time.monotonic() + 5
    # The state follows the command name, which is in parentheses.
    while stat.read_text().rsplit(")", 1)[1].split()[0] != "T":
        assert time.monotonic() < deadline, f"process {proc.pid} did not stop"
        time.sleep(0.01)


@asynccontextmanager
async def running_persister(settings: Settings, name: str = "inproc-0") -> AsyncIterator[Persister]:
    """A persister in this event loop (stopped at exit)."""
    store = await Store.connect(settings)
    db = Database(settings.database_url or "")
    await db.open()
    p = Persister(settings, store, db, name)
    task = asyncio.create_task(p.run())
    try:
        yield p
    finally:
        p.stop()
        await asyncio.wait_for(task, 10)
        await db.close()
        await store.close()


async def wait_caught_up(store: Store, timeout_s: float = 20.0) -> None:
    """Until the group has acknowledged everything."""
    deadline = time.monotonic() + timeout_s
    while (lag := await stream_lag(store)) != 0:
        assert time.monotonic() < deadline, f"persister still {lag} entries behind"
        await asyncio.sleep(0.05)


def env_for(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHSALE_")}
    env.update(
        FLASHSALE_REDIS_URL=settings.redis_url or "",
        FLASHSALE_DATABASE_URL=settings.database_url or "",
        FLASHSALE_PARTITIONS=str(settings.partitions),
        FLASHSALE_AUTH_SECRET=SECRET,
        FLASHSALE_DATA_DIR=str(settings.data_dir),
        FLASHSALE_STREAM_CAP=str(settings.stream_cap),
        PYTHONPATH=str(ROOT),
    )
    env.update(extra)
    return env


class PersisterProcess:
    """``flashsale persist`` as a real child process."""

    def __init__(self, settings: Settings, log_path: Path, **env: str) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - the child writes to it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flashsale", "persist"],
            env=env_for(settings, **env),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_for_output(self, text: str, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while text not in self.output():
            assert self.proc.poll() is None, f"persister exited:\n{self.output()}"
            assert time.monotonic() < deadline, f"no {text!r} in:\n{self.output()}"
            await asyncio.sleep(0.05)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout_s: float = 10.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


@pytest.fixture
def spawn_persister(tmp_path: Path) -> Iterator[Callable[..., PersisterProcess]]:
    """Start ``flashsale persist`` children (killed at teardown)."""
    started: list[PersisterProcess] = []

    def spawn(settings: Settings, **env: Any) -> PersisterProcess:
        p = PersisterProcess(settings, tmp_path / f"persister-{len(started)}.log", **env)
        started.append(p)
        return p

    yield spawn
    for p in started:
        p.close()
