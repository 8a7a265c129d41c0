"""Consumer-name leases (persister/leases.py): one live process per name."""

from __future__ import annotations

import asyncio

import pytest

from engine.keys import consumer_lease_key
from engine.store import Store
from persister.leases import NameTaken, lease_consumer_name, release_lease, renew_lease


async def test_leased_names_are_the_lowest_free_slots_until_none_is_left(pstore: Store) -> None:
    """Each lease takes the lowest free ``<host>-<n>``; with every slot held, NameTaken."""
    first, _ = await lease_consumer_name(pstore, 60_000, slots=3)
    second, token = await lease_consumer_name(pstore, 60_000, slots=3)
    host = first.rsplit("-", 1)[0]
    assert (first, second) == (f"{host}-0", f"{host}-1")
    await lease_consumer_name(pstore, 60_000, slots=3)
    with pytest.raises(NameTaken, match="all 3 persister names"):
        await lease_consumer_name(pstore, 60_000, slots=3)
    await release_lease(pstore, second, token)
    assert (await lease_consumer_name(pstore, 60_000, slots=3))[0] == second


async def test_renewing_a_lease_never_overwrites_one_another_process_took(pstore: Store) -> None:
    """Our lease lapsed and another process takes the name while we renew: the renewal
    must fail and leave the other's lease alone (a GET then SET would overwrite it)."""
    name, token = await lease_consumer_name(pstore, 60_000)
    key = consumer_lease_key(name)
    for i in range(100):
        await pstore.client.delete(key)  # our lease expired
        other = f"other-{i}"
        renewed, taken = await asyncio.gather(
            renew_lease(pstore, name, token, 60_000),
            pstore.client.set(key, other, nx=True, px=60_000),
        )
        held = await pstore.client.get(key)
        assert bool(renewed) != bool(taken), (i, renewed, taken)
        assert held == (token if renewed else other), (i, held)
    await pstore.client.set(key, "other")
    await release_lease(pstore, name, token)  # not ours: left alone
    assert await pstore.client.get(key) == "other"
    await pstore.client.set(key, token)
    assert await renew_lease(pstore, name, token, 60_000)
    await release_lease(pstore, name, token)
    assert await pstore.client.get(key) is None
