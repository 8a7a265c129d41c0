"""Engine claims per second from one Python process, next to the raw ceiling.

    python -m loadtest.bench_engine [--claims 100000] [--concurrency 256]

Rows, all measured in the same run against the same Redis:

- ceiling: the same ``claim_voucher`` Lua call, pre-packed and pipelined over one
  socket, replies parsed by hiredis: no Python logic around it (what Redis can do for
  one client process);
- engine: ``engine.claims.claim`` from N concurrent tasks (auto-pipelined);
- naive: the same calls, one awaited EVALSHA per claim (no auto-pipelining);
- storm: ``engine.claims.claim`` on a sold-out deal (the refusal path).

Starts an embedded Redis unless ``FLASHSALE_REDIS_URL`` is set.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import tempfile
import time
from pathlib import Path

import hiredis

from engine import claims
from engine.deals import NewDeal, create_deal
from engine.errors import SoldOut
from engine.settings import Settings
from engine.store import Store
from engine.times import MS_PER_DAY, now_ms
from flashsale.embedded import EmbeddedRedis


def _deal(inventory: int) -> NewDeal:
    now = now_ms()
    return NewDeal(
        "m-bench",
        "bench",
        "",
        1.0,
        1.0,
        inventory,
        now - 1000,
        now + 3_600_000,
        now + 2 * MS_PER_DAY,
    )


def _pack(*args: object) -> bytes:
    out = [f"*{len(args)}\r\n".encode()]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


async def ceiling(store: Store, host: str, port: int, n: int, batch: int = 1000) -> float:
    """The claim script, pre-packed and pipelined over one raw socket."""
    deal = await create_deal(store, _deal(n))
    k = store.keys.for_deal(deal.id)
    sha = store.scripts["claim_voucher"].sha
    await store.client.script_load(store.scripts["claim_voucher"].source)
    cap = store.settings.stream_cap
    payloads = [
        b"".join(
            _pack(
                "EVALSHA",
                sha,
                5,
                k.deal,
                k.claimers,
                k.events,
                k.geo,
                k.vouchers,
                f"c-{i}",
                f"v{i:016x}.{deal.id}",
                cap,
                deal.id,
            )
            for i in range(start, min(start + batch, n))
        )
        for start in range(0, n, batch)
    ]
    sock = socket.create_connection((host, port))
    reader = hiredis.Reader()
    started = time.perf_counter()
    got = 0
    for payload in payloads:
        sock.sendall(payload)
        expected = got + payload.count(b"EVALSHA")
        while got < expected:
            reader.feed(sock.recv(1 << 20))
            while reader.gets() is not False:
                got += 1
    elapsed = time.perf_counter() - started
    sock.close()
    assert got == n
    return n / elapsed


async def engine_rate(store: Store, n: int, concurrency: int, *, naive: bool = False) -> float:
    deal = await create_deal(store, _deal(n))
    k = store.keys.for_deal(deal.id)
    sha = store.scripts["claim_voucher"].sha
    cap = store.settings.stream_cap
    per_task = n // concurrency

    async def worker(w: int) -> None:
        for i in range(per_task):
            user = f"u-{w}-{i}"
            if naive:
                await store.client.evalsha(
                    sha,
                    5,
                    k.deal,
                    k.claimers,
                    k.events,
                    k.geo,
                    k.vouchers,
                    user,
                    claims.new_voucher_id(deal.id),
                    cap,
                    deal.id,
                )
            else:
                await claims.claim(store, deal.id, user)

    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return per_task * concurrency / (time.perf_counter() - started)


async def storm_rate(store: Store, n: int, concurrency: int) -> float:
    deal = await create_deal(store, _deal(1))
    await claims.claim(store, deal.id, "first")
    per_task = n // concurrency

    async def worker(w: int) -> None:
        for i in range(per_task):
            with contextlib.suppress(SoldOut):
                await claims.claim(store, deal.id, f"s-{w}-{i}")

    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return per_task * concurrency / (time.perf_counter() - started)


async def run(url: str, n: int, concurrency: int) -> list[tuple[str, float]]:
    store = await Store.connect(Settings(redis_url=url, stream_cap=100_000_000))
    try:
        await store.client.flushall()
        host, port = url.split("//")[1].split("/")[0].split(":")
        rows = [
            (
                "ceiling: raw pipelined Lua, no Python logic",
                await ceiling(store, host, int(port), n),
            )
        ]
        rows.append(
            (
                f"engine.claim, {concurrency} concurrent (auto-pipelined)",
                await engine_rate(store, n, concurrency),
            )
        )
        rows.append(
            (
                f"one awaited EVALSHA per claim, {concurrency} concurrent",
                await engine_rate(store, n, concurrency, naive=True),
            )
        )
        rows.append(
            (
                f"engine.claim on a sold-out deal, {concurrency} concurrent",
                await storm_rate(store, n, concurrency),
            )
        )
        await store.client.flushall()
        return rows
    finally:
        await store.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--claims", type=int, default=100_000)
    p.add_argument("--concurrency", type=int, default=256)
    args = p.parse_args()
    server = None
    url = os.environ.get("FLASHSALE_REDIS_URL")
    if not url:
        server = EmbeddedRedis(Path(tempfile.mkdtemp(prefix="bench-engine-"))).start()
        url = server.url
    try:
        rows = asyncio.run(run(url, args.claims, args.concurrency))
    finally:
        if server is not None:
            server.stop()
    top = rows[0][1]
    print(f"\n{args.claims:,} claims per row, one Python process, Redis at {url}\n")
    print("| path | claims/s | vs ceiling |")
    print("| --- | ---: | ---: |")
    for name, rate in rows:
        print(f"| {name} | {rate:,.0f} | {rate / top:.2f} |")


if __name__ == "__main__":
    main()
