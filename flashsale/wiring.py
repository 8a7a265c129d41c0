"""Turning the environment into working Settings: secrets, embedded servers, their URLs.

``flashsale up`` writes the URLs of the servers it started into ``DATA_DIR/servers.json``
so that other commands (``reconcile``, ``token``, ``serve``...) run in another terminal
find them without any variable set; the URLs carry the servers' generated passwords.
"""

from __future__ import annotations

import os

import orjson

from engine.settings import Settings
from flashsale.private import secret_file, write_private

SERVERS_FILE = "servers.json"
SECRET_FILE = "auth_secret"


def auth_secret(settings: Settings) -> str:
    """``FLASHSALE_AUTH_SECRET``, or one generated once into the data dir (mode 0600)."""
    if settings.auth_secret:
        return settings.auth_secret
    return secret_file(settings.data_dir / SECRET_FILE, nbytes=48)


def write_servers(settings: Settings) -> None:
    """Record the URLs in use, for commands run from another terminal.

    The URLs carry the embedded servers' passwords: the file is 0600 in a 0700 data dir.
    """
    data = {
        "redis_url": settings.redis_url,
        "database_url": settings.database_url,
        "pid": os.getpid(),
    }
    write_private(settings.data_dir / SERVERS_FILE, orjson.dumps(data))


def clear_servers(settings: Settings) -> None:
    (settings.data_dir / SERVERS_FILE).unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def resolve(settings: Settings | None = None) -> Settings:
    """Settings from the environment, completed by a running ``flashsale up`` if any."""
    settings = settings or Settings.from_env()
    settings = settings.with_(auth_secret=auth_secret(settings))
    path = settings.data_dir / SERVERS_FILE
    if (settings.redis_url and settings.database_url) or not path.exists():
        return settings
    try:
        data = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return settings
    if not _alive(int(data.get("pid", 0))):
        return settings
    return settings.with_(
        redis_url=settings.redis_url or data.get("redis_url"),
        database_url=settings.database_url or data.get("database_url"),
    )
