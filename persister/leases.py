"""Consumer-name leases: each persister process consumes under a name no live process
shares, stable across restarts (``<host>-<n>``, the lowest free n)."""

from __future__ import annotations

import os
import socket

from engine.errors import StartupError
from engine.keys import consumer_lease_key
from engine.store import Store


class NameTaken(StartupError):
    """Every consumer slot on this host is leased by a live process: refuse to start."""


async def lease_consumer_name(store: Store, ttl_ms: int, slots: int = 64) -> tuple[str, str]:
    """Lease a free, stable name ``<host>-<n>`` (lowest free n); return (name, token)."""
    host = socket.gethostname().split(".")[0] or "persister"
    token = f"{os.getpid()}-{os.urandom(4).hex()}"
    for n in range(slots):
        name = f"{host}-{n}"
        if await store.set_if_absent(consumer_lease_key(name), token, ttl_ms=ttl_ms):
            return name, token
    raise NameTaken(f"all {slots} persister names on {host} are in use")


async def renew_lease(store: Store, name: str, token: str, ttl_ms: int) -> bool:
    """Extend our lease (or take it back if it lapsed and nobody took it); False if
    another process holds the name now. Atomic (``lua/renew_lease.lua``)."""
    held = await store.run("renew_lease", (consumer_lease_key(name),), (token, ttl_ms))
    return bool(int(held))


async def release_lease(store: Store, name: str, token: str) -> None:
    """Drop our lease, only if it is still ours (atomic, ``lua/release_lease.lua``)."""
    await store.run("release_lease", (consumer_lease_key(name),), (token,))
