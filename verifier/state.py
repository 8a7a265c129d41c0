"""The till's state directory: the cached JWKS and the SQLite redemption log."""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import uuid
from pathlib import Path
from typing import Any

JWKS_FILE = "jwks.json"
LOG_FILE = "redemptions.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS redemptions (
    entry_id     TEXT PRIMARY KEY,
    voucher_id   TEXT NOT NULL,
    merchant_id  TEXT NOT NULL,
    token        TEXT NOT NULL,
    redeemed_at  TEXT NOT NULL,
    sync_status  TEXT,
    sync_code    TEXT,
    synced_at    TEXT,
    UNIQUE (merchant_id, voucher_id)
);
"""


def default_dir() -> Path:
    return Path.home() / ".flashsale-verifier"


class State:
    """One till's cached keys and log, in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.db = sqlite3.connect(self.dir / LOG_FILE, timeout=10, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a till may lose power: keep what it saw
        self.db.executescript(_SCHEMA)

    def close(self) -> None:
        self.db.close()

    # -- keys ------------------------------------------------------------------

    def save_jwks(self, document: dict[str, Any]) -> None:
        """Replace the cached JWKS atomically."""
        tmp = self.dir / f".{JWKS_FILE}.{secrets.token_hex(4)}.tmp"
        tmp.write_text(json.dumps(document, sort_keys=True), encoding="utf-8")
        os.replace(tmp, self.dir / JWKS_FILE)

    def load_jwks(self) -> Any | None:
        """The cached JWKS document, or ``None`` if keys were never pulled."""
        path = self.dir / JWKS_FILE
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    # -- the log ---------------------------------------------------------------

    def device_id(self) -> str:
        """This till's id, made up once and kept."""
        row = self.db.execute("SELECT value FROM meta WHERE name = 'device_id'").fetchone()
        if row:
            return str(row[0])
        device = "till-" + secrets.token_hex(6)
        self.db.execute(
            "INSERT OR IGNORE INTO meta (name, value) VALUES ('device_id', ?)", (device,)
        )
        return self.device_id()

    def record(self, voucher_id: str, merchant_id: str, token: str, at: str) -> str | None:
        """Log an accepted redemption; ``None`` if this till already redeemed the voucher.

        Returns the new entry id. The UNIQUE constraint decides, so two scans racing on
        one till still accept once.
        """
        entry_id = str(uuid.uuid4())
        try:
            self.db.execute(
                "INSERT INTO redemptions (entry_id, voucher_id, merchant_id, token, redeemed_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (entry_id, voucher_id, merchant_id, token, at),
            )
        except sqlite3.IntegrityError:
            return None
        return entry_id

    def redeemed_at(self, voucher_id: str, merchant_id: str) -> str | None:
        row = self.db.execute(
            "SELECT redeemed_at FROM redemptions WHERE voucher_id = ? AND merchant_id = ?",
            (voucher_id, merchant_id),
        ).fetchone()
        return str(row[0]) if row else None

    def unsynced(self, merchant_id: str, limit: int) -> list[tuple[str, str, str]]:
        """Up to ``limit`` of the merchant's entries not yet answered by the server, oldest first.

        A state shared by several merchants uploads each one's entries with its own token:
        another merchant's would come back ``not_your_voucher`` and be lost to it.
        """
        rows = self.db.execute(
            "SELECT entry_id, token, redeemed_at FROM redemptions"
            " WHERE merchant_id = ? AND sync_status IS NULL"
            " ORDER BY redeemed_at, entry_id LIMIT ?",
            (merchant_id, limit),
        ).fetchall()
        return [(str(a), str(b), str(c)) for a, b, c in rows]

    def mark_synced(
        self, merchant_id: str, results: list[tuple[str, str, str | None]], at: str
    ) -> None:
        """Store the server's answer to the merchant's upload per entry, in one transaction."""
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany(
                "UPDATE redemptions SET sync_status = ?, sync_code = ?, synced_at = ?"
                " WHERE entry_id = ? AND merchant_id = ? AND sync_status IS NULL",
                [(status, code, at, entry_id, merchant_id) for entry_id, status, code in results],
            )
