"""The persister's schema: the numbered migrations, applying them, and checking them.

The tables are the persister's (it writes them; the API only reads). ``flashsale migrate``
applies what is missing, each migration in its own transaction, under an advisory lock so
that concurrent runs (two `flashsale up`, a deploy and a persister) take turns.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

import asyncpg

from database.errors import translated
from engine.errors import StartupError

log = logging.getLogger(__name__)

# Serialises concurrent `migrate` runs (two `flashsale up`, a deploy and a persister).
_MIGRATION_LOCK = 0x666C_6173_6873_616C  # "flashsal"
_MIGRATION_FILE = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """The numbered ``persister/migrations/NNNN_name.sql`` files, in order."""
    found = []
    for entry in resources.files("persister.migrations").iterdir():
        match = _MIGRATION_FILE.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), entry.name, entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise StartupError(f"two migrations share a number: {[m.name for m in found]}")
    return found


async def migrate(dsn: str) -> list[str]:
    """Apply the migrations not yet applied, each in its own transaction; return their names."""
    applied: list[str] = []
    async with translated():
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
            await conn.execute(
                """CREATE TABLE IF NOT EXISTS schema_migrations (
                       version    integer PRIMARY KEY,
                       name       text NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            for m in migrations():
                if m.version in done:
                    continue
                async with conn.transaction():
                    await conn.execute(m.sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                        m.version,
                        m.name,
                    )
                log.info("applied migration %s", m.name)
                applied.append(m.name)
        finally:
            await conn.close()
    return applied


async def check_schema(conn: Any) -> None:
    """Refuse to run against a database that ``migrate`` has not brought up to date."""
    latest = migrations()[-1].version
    have = None
    if await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL"):
        have = await conn.fetchval("SELECT max(version) FROM schema_migrations")
    if have is None or have < latest:
        raise StartupError(
            f"the database schema is at version {have or 0}, this code needs {latest}: "
            "run `flashsale migrate` first"
        )
