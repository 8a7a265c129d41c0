"""The till's state directory: the cached JWKS and the SQLite redemption log.

Everything in it is readable by its owner only: the directory is 0700 and every file
0600 from the moment it exists (a voucher token in the log is as good as the voucher).
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import stat
import uuid
from pathlib import Path
from typing import Any

JWKS_FILE = "jwks.json"
LOG_FILE = "redemptions.sqlite"
# The files SQLite keeps next to the log while it is open (or after a crash).
LOG_COMPANIONS = ("-wal", "-shm", "-journal")
DIR_MODE, FILE_MODE = 0o700, 0o600

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
-- Redemptions the server accepted from elsewhere (the merchant's other tills, or online),
-- learned from its feed (GET /v1/redemptions) on sync: check refuses them offline.
CREATE TABLE IF NOT EXISTS elsewhere (
    merchant_id  TEXT NOT NULL,
    voucher_id   TEXT NOT NULL,
    redeemed_at  TEXT NOT NULL,
    device_id    TEXT,
    PRIMARY KEY (merchant_id, voucher_id)
);
"""


def default_dir() -> Path:
    return Path.home() / ".flashsale-verifier"


class UnsafeStateDir(Exception):
    """The state directory cannot be made private to its owner; the message says why."""


def _is_state_file(name: str) -> bool:
    return (
        name == JWKS_FILE
        or (name.startswith(f".{JWKS_FILE}.") and name.endswith(".tmp"))
        or name in {LOG_FILE, *(LOG_FILE + suffix for suffix in LOG_COMPANIONS)}
    )


def _private_dir(directory: Path) -> str | None:
    """Create ``directory`` 0700, or tighten an existing one of ours that holds only state.

    Returns a notice for the user when it changed an existing directory's mode. Refuses
    (``UnsafeStateDir``) a directory of another user, or one open to others that holds
    other files: it is shared, and locking others out of it is not the verifier's call.
    """
    directory.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)  # the umask can only narrow
    st = directory.stat()
    if st.st_uid != os.geteuid():
        raise UnsafeStateDir(f"{directory} belongs to another user; use a directory of your own")
    mode = stat.S_IMODE(st.st_mode)
    if not mode & 0o077:
        return None
    others = sorted(name for name in os.listdir(directory) if not _is_state_file(name))
    if others:
        raise UnsafeStateDir(
            f"{directory} is open to others (mode {mode:04o}) and holds other files"
            f" ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}):"
            " use a directory of its own for the verifier's state"
        )
    try:
        directory.chmod(DIR_MODE)
    except OSError as exc:
        raise UnsafeStateDir(f"cannot make {directory} private: {exc}") from exc
    return f"made {directory} private to its owner (mode {mode:04o} -> {DIR_MODE:04o})"


def _tighten(path: Path) -> None:
    """Make an existing state file 0600 (one left by an earlier version, say)."""
    try:
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            path.chmod(FILE_MODE)
    except FileNotFoundError:
        pass  # SQLite removed its -wal or -shm meanwhile
    except OSError as exc:
        raise UnsafeStateDir(f"cannot make {path} private: {exc}") from exc


def _create_private(path: Path) -> None:
    """Create ``path`` empty and 0600 unless it exists: never readable by others."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE))


class State:
    """One till's cached keys and log, in ``directory``; ``notice`` is for the user."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.notice = _private_dir(directory)
        for name in os.listdir(directory):
            if _is_state_file(name):
                _tighten(directory / name)
        # SQLite creates a new log 0644 (less the umask) but its -wal, -shm and -journal
        # with the log's own mode: a log created 0600 here keeps all of them private.
        _create_private(directory / LOG_FILE)
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
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(document, sort_keys=True))
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

    def redeemed_elsewhere(
        self, voucher_id: str, merchant_id: str
    ) -> tuple[str, str | None] | None:
        """``(redeemed_at, device_id)`` if the feed said the voucher was redeemed elsewhere
        (``device_id`` None: online)."""
        row = self.db.execute(
            "SELECT redeemed_at, device_id FROM elsewhere WHERE voucher_id = ? AND merchant_id = ?",
            (voucher_id, merchant_id),
        ).fetchone()
        return (str(row[0]), None if row[1] is None else str(row[1])) if row else None

    # -- the feed -----------------------------------------------------------------

    def feed_cursor(self, merchant_id: str) -> str | None:
        """Where the merchant's feed was read up to (``None``: from the start)."""
        row = self.db.execute(
            "SELECT value FROM meta WHERE name = ?", (f"feed_cursor:{merchant_id}",)
        ).fetchone()
        return str(row[0]) if row else None

    def learn(
        self, merchant_id: str, redemptions: list[tuple[str, str, str | None]], cursor: str | None
    ) -> None:
        """Remember ``(voucher_id, redeemed_at, device_id)`` redemptions and the cursor after
        them, in one transaction: a crash never moves the cursor past what was not kept."""
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany(
                "INSERT OR IGNORE INTO elsewhere (merchant_id, voucher_id, redeemed_at, device_id)"
                " VALUES (?, ?, ?, ?)",
                [(merchant_id, v, at, device) for v, at, device in redemptions],
            )
            name = f"feed_cursor:{merchant_id}"
            if cursor is None:
                self.db.execute("DELETE FROM meta WHERE name = ?", (name,))
            else:
                self.db.execute(
                    "INSERT INTO meta (name, value) VALUES (?, ?)"
                    " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                    (name, cursor),
                )

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
