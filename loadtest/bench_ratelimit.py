"""What rate limiting costs the claim storm: the same storm with limits off and on, one run.

The claim storm of ``loadtest/bench.py`` (a hot deal of 2,000 vouchers, 30,000 distinct
callers, most answers 409 sold_out) against three `flashsale serve` processes on one
embedded Redis, differing only in their limits:

- ``off``: ``FLASHSALE_RATE_CALLER=0`` (no limiter call);
- ``caller``: API.md's default, 10 a second per caller (each caller sends well under it,
  so nothing is refused: the cost is the check, one more script call per claim);
- ``caller+address``: both limits, the address one (wrk is one address) at 1,000,000 a
  second so that it refuses nothing either: two checks per claim, in one round trip.

Rounds alternate the systems (off, caller, caller+address, off, ...), each cell on a
fresh deal, and the table shows each system's median rate and p99 over the rounds, so
that the machine's other load falls on all of them alike.

    .venv/bin/python -m loadtest.bench_ratelimit                  # about 2 minutes
    .venv/bin/python -m loadtest.bench_ratelimit --rounds 3 --seconds 5

Not a test: it prints numbers, it asserts only that the answers were correct.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from engine.deals import NewDeal, create_deal
from engine.settings import Settings
from engine.store import Store
from flashsale.embedded import EmbeddedRedis
from loadtest.bench import (
    CENTER,
    SECRET,
    STORM_CALLERS,
    STORM_INVENTORY,
    Server,
    WrkResult,
    mint_fast,
    run_wrk,
    write_tokens,
)

SYSTEMS = {
    "off": {"FLASHSALE_RATE_CALLER": "0", "FLASHSALE_RATE_ADDRESS": "0"},
    "caller": {"FLASHSALE_RATE_CALLER": "10", "FLASHSALE_RATE_ADDRESS": "0"},
    "caller+address": {"FLASHSALE_RATE_CALLER": "10", "FLASHSALE_RATE_ADDRESS": "1000000"},
}
# The target (issue 12): limits cost the storm at most this fraction of its rate.
MAX_COST = 0.10


async def _new_deals(settings: Settings, names: list[str]) -> dict[str, str]:
    now = int(time.time() * 1000)
    store = await Store.connect(settings)
    try:
        new = NewDeal(
            "m-bench",
            "storm",
            "",
            CENTER[0] + 1,
            CENTER[1] + 1,
            STORM_INVENTORY,
            now - 60_000,
            now + 3_600_000,
            now + 86_400_000,
        )
        return {name: (await create_deal(store, new)).id for name in names}
    finally:
        await store.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=6.0, help="seconds per cell")
    p.add_argument("--connections", type=int, default=256)
    p.add_argument("--workers", type=int, default=2, help="worker processes per server")
    p.add_argument("--server", default="uvicorn", choices=("uvicorn", "granian"))
    args = p.parse_args(argv)
    if shutil.which("wrk") is None:
        print("loadtest.bench_ratelimit needs wrk (Debian: apt-get install wrk)", file=sys.stderr)
        return 2
    cmd = "python -m loadtest.bench_ratelimit " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    problems: list[str] = []
    results: dict[str, list[WrkResult]] = {name: [] for name in SYSTEMS}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="flashsale-rl-")))
        redis = EmbeddedRedis(tmp / "redis").start()
        stack.callback(redis.stop)
        settings = Settings(redis_url=redis.url, auth_secret=SECRET, data_dir=tmp / "data")
        tokens = write_tokens(
            tmp / "storm.tokens",
            mint_fast(SECRET, (f"s{random.getrandbits(32):x}-{i}" for i in range(STORM_CALLERS))),
        )
        base = {k: v for k, v in os.environ.items() if not k.startswith("FLASHSALE_")}
        base.pop("PROMETHEUS_MULTIPROC_DIR", None)
        base.update(
            {
                "FLASHSALE_REDIS_URL": redis.url,
                "FLASHSALE_AUTH_SECRET": SECRET,
                "FLASHSALE_DATA_DIR": str(tmp / "data"),
            }
        )
        servers = {}
        for name, limits in SYSTEMS.items():
            argv_ = [
                sys.executable,
                "-m",
                "flashsale",
                "serve",
                "--server",
                args.server,
                "--workers",
                str(args.workers),
            ]
            servers[name] = Server(name, argv_, {**base, **limits}).start(tmp)
            stack.callback(servers[name].stop)
        for name, s in servers.items():  # warm-up: connections, script cache, token cache
            deal = asyncio.run(_new_deals(settings, [name]))[name]
            path = f"/v1/deals/{deal}/claims"
            run_wrk(
                "warm-up",
                s.url + path,
                "wrk_claim.lua",
                {"BENCH_PATH": path, "BENCH_TOKENS": str(tokens)},
                2,
                args.connections,
            )
        # The server's process tree and the one Redis (the cells run one at a time).
        assert redis.proc is not None
        watch = {
            name: {"api": s.proc.pid, "redis": redis.proc.pid}
            for name, s in servers.items()
            if s.proc is not None
        }
        load_before = os.getloadavg()
        for n in range(args.rounds):
            order = list(SYSTEMS) if n % 2 == 0 else list(reversed(SYSTEMS))
            deals = asyncio.run(_new_deals(settings, order))
            for name in order:
                path = f"/v1/deals/{deals[name]}/claims"
                r = run_wrk(
                    name,
                    servers[name].url + path,
                    "wrk_claim.lua",
                    {"BENCH_PATH": path, "BENCH_TOKENS": str(tokens)},
                    args.seconds,
                    args.connections,
                    watch=watch[name],
                )
                results[name].append(r)
                if r.statuses.get(201, 0) > STORM_INVENTORY:
                    problems.append(f"{name}: oversold ({r.statuses.get(201)} vouchers)")
                if r.statuses.get(429, 0) or r.server_errors:
                    problems.append(f"{name}: unexpected answers {r.statuses}")
            print(f"  round {n + 1}/{args.rounds} done", flush=True)
        load_after = os.getloadavg()
    rate = {name: statistics.median(r.rps for r in rs) for name, rs in results.items()}
    p99 = {name: statistics.median(r.p99_ms for r in rs) for name, rs in results.items()}
    print(f"\nclaim storm, rate limits off vs on: `{cmd.strip()}`")
    print(
        f"{args.server}, {args.workers} worker(s) each, {args.connections} connections, "
        f"{args.rounds} rounds of {args.seconds:g} s, medians; load average "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after (1 min)\n"
    )
    # CPU per claim (API and Redis, from /proc): far less noisy than the rate.
    api = {
        n: statistics.median(r.cpu_us_per_request("api") for r in rs) for n, rs in results.items()
    }
    red = {
        n: statistics.median(r.cpu_us_per_request("redis") for r in rs) for n, rs in results.items()
    }
    print(
        "| limits | claims/s | p50 ms | p99 ms | cost vs off (rate) | API us/claim "
        "| Redis us/claim | cost vs off (CPU) | wrk CPU |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, rs in results.items():
        p50 = statistics.median(r.p50_ms for r in rs)
        cpu = statistics.median(r.wrk_cpu_pct for r in rs)
        cost = 1 - rate[name] / rate["off"] if rate["off"] else 0.0
        cpu_cost = (api[name] + red[name]) / (api["off"] + red["off"]) - 1
        print(
            f"| {name} | {rate[name]:,.0f} | {p50:.1f} | {p99[name]:.1f} | "
            f"{100 * cost:+.1f}% | {api[name]:.0f} | {red[name]:.1f} | {100 * cpu_cost:+.1f}% "
            f"| {cpu:.0f}% |"
        )
    print(
        "\nper round (claims/s): "
        + "; ".join(
            f"{name} " + ", ".join(f"{r.rps:,.0f}" for r in rs) for name, rs in results.items()
        )
    )
    cost = 1 - rate["caller"] / rate["off"] if rate["off"] else 0.0
    verdict = "met" if cost <= MAX_COST else "NOT met"
    print(
        f"\ntarget: the default limits cost at most {100 * MAX_COST:.0f}% of the storm's rate: "
        f"{100 * cost:.1f}%, {verdict}"
    )
    cpu_cost = (api["caller"] + red["caller"]) / (api["off"] + red["off"]) - 1
    verdict = "met" if cpu_cost <= MAX_COST else "NOT met"
    print(f"the same by CPU per claim (API + Redis): {100 * cpu_cost:+.1f}%, {verdict}")
    for problem in problems:
        print("PROBLEM:", problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
