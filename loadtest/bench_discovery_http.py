"""Discovery over HTTP: this tree next to another commit and the PostgreSQL peer, one run.

The discovery scenario of ``loadtest/bench.py`` (2,000 active deals within ±0.1° of a
point, callers at random points, radius 2 km, limit 20, ``wrk -c256``) against
``flashsale serve`` from this tree, from ``--base`` (a commit, checked out with
``git archive`` into a temporary directory), and the PostgreSQL-only peer
(``loadtest/peers.py``), all on the same embedded Redis and PostgreSQL. Rounds alternate
the servers (and reverse their order every other round), so that the machine's other load
falls on all of them alike. Besides requests per second it reports each server's own CPU
time per request (user + system of its processes, from ``/proc``): what a change to the
request path saves, whatever else the machine is doing. ``--healthz`` adds a ``/healthz``
cell per flashsale server and round: the HTTP stack's own cost.

    .venv/bin/python -m loadtest.bench_discovery_http --base main       # about 2 minutes
    .venv/bin/python -m loadtest.bench_discovery_http --base HEAD~3 --rounds 6 --healthz

Not a test: it prints numbers, it asserts only that every answer was a 200.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from engine.settings import Settings
from flashsale.embedded import EmbeddedPostgres, EmbeddedRedis
from loadtest.bench import (
    CENTER,
    DISCOVERY_DEALS,
    DISCOVERY_SPREAD_DEG,
    ROOT,
    SECRET,
    Backends,
    Server,
    _env,
    prepare_database,
    run_wrk,
    seed_discovery,
)


def tree_server(name: str, argv: list[str], env: dict[str, str], tree: Path) -> Server:
    """A server whose code comes from ``tree`` (run from there, with it on the path)."""
    return Server(name, argv, {**env, "PYTHONPATH": str(tree)}, cwd=tree)


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its children (``/proc``)."""
    kids = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    total = 0.0
    for p in [str(pid), *kids.split()]:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base", help="a commit to run next to this tree (git archive)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=5.0, help="seconds per cell")
    p.add_argument("--connections", type=int, default=256)
    p.add_argument("--server", default="uvicorn", choices=("uvicorn", "granian"))
    p.add_argument("--healthz", action="store_true", help="also /healthz per flashsale server")
    args = p.parse_args(argv)
    if shutil.which("wrk") is None:
        print("this bench needs wrk (Debian: apt-get install wrk)", file=sys.stderr)
        return 2
    cmd = "python -m loadtest.bench_discovery_http " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    discovery = {
        "BENCH_CENTER": f"{CENTER[0]},{CENTER[1]}",
        "BENCH_SPREAD": f"{DISCOVERY_SPREAD_DEG}",
    }
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="flashsale-dh-")))
        trees = {"this tree": ROOT}  # display name: where its code is
        if args.base:
            base = tmp / "base"
            base.mkdir()
            archive = subprocess.run(
                ["git", "-C", str(ROOT), "archive", args.base], capture_output=True, check=True
            ).stdout
            subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
            trees = {f"base {args.base}": base, **trees}
        redis = EmbeddedRedis(tmp / "redis").start()
        stack.callback(redis.stop)
        pg = EmbeddedPostgres(tmp / "pg").start()
        stack.callback(pg.remove_data)
        settings = Settings(
            redis_url=redis.url, database_url=pg.url, auth_secret=SECRET, data_dir=tmp / "data"
        )
        b = Backends(redis.url, pg.url, settings)
        asyncio.run(prepare_database(pg.url))
        asyncio.run(seed_discovery(b, DISCOVERY_DEALS))
        env = _env(b, tmp / "data" / "keys")
        serve = ["-m", "flashsale", "serve", "--server", args.server, "--workers", "1"]
        servers: dict[str, Server] = {}
        for i, (name, tree) in enumerate(trees.items()):
            s = tree_server(f"flashsale-{i}", [sys.executable, *serve], env, tree)
            servers[name] = s.start(tmp)
            stack.callback(servers[name].stop)
        peer = [sys.executable, "-m", "loadtest.peers", "pg", "--workers", "1"]
        servers["PostgreSQL peer"] = tree_server("pg", peer, env, ROOT).start(tmp)
        stack.callback(servers["PostgreSQL peer"].stop)
        for s in servers.values():  # warm-up: caches, connections, scripts
            run_wrk("warm-up", s.url + "/v1/deals", "wrk_get.lua", discovery, 3, args.connections)
        rates: dict[str, list[float]] = {name: [] for name in servers}
        cpu_us: dict[str, list[float]] = {name: [] for name in servers}
        healthz: dict[str, list[float]] = {name: [] for name in trees if args.healthz}
        load_before = os.getloadavg()
        for n in range(args.rounds):
            order = list(servers) if n % 2 == 0 else list(reversed(servers))
            for name in order:
                s = servers[name]
                assert s.proc is not None
                before = cpu_s(s.proc.pid)
                r = run_wrk(
                    name,
                    s.url + "/v1/deals",
                    "wrk_get.lua",
                    discovery,
                    args.seconds,
                    args.connections,
                )
                if set(r.statuses) != {200}:
                    print(f"PROBLEM: {name} answered {r.statuses}", file=sys.stderr)
                    return 1
                cpu_us[name].append((cpu_s(s.proc.pid) - before) / max(r.requests, 1) * 1e6)
                rates[name].append(r.rps)
            for name in healthz:
                url = servers[name].url + "/healthz"
                h = run_wrk(
                    name,
                    url,
                    "wrk_get.lua",
                    {"BENCH_PATH": "/healthz"},
                    args.seconds,
                    args.connections,
                )
                healthz[name].append(h.rps)
            print(f"  round {n + 1}/{args.rounds} done", flush=True)
        load_after = os.getloadavg()
    rate = {name: statistics.median(v) for name, v in rates.items()}
    peer_rate = rate["PostgreSQL peer"]
    print(f"\ndiscovery over HTTP: `{cmd.strip()}`")
    print(
        f"{args.server}, 1 worker each, {args.connections} connections, {args.rounds} rounds of "
        f"{args.seconds:g} s, medians; load average {load_before[0]:.2f} before, "
        f"{load_after[0]:.2f} after (1 min)\n"
    )
    print("| server | req/s | vs peer | server CPU per request | /healthz req/s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in servers:
        hz = f"{statistics.median(healthz[name]):,.0f}" if name in healthz else ""
        print(
            f"| {name} | {rate[name]:,.0f} | {rate[name] / peer_rate:.2f}x | "
            f"{statistics.median(cpu_us[name]):.0f} µs | {hz} |"
        )
    print(
        "\nper round (req/s): "
        + "; ".join(f"{name} " + ", ".join(f"{x:,.0f}" for x in v) for name, v in rates.items())
    )
    if args.base:
        base_name, this = list(trees)
        ratios = [x / y for x, y in zip(rates[this], rates[base_name], strict=True)]
        print(
            f"this tree / base, per round: {', '.join(f'{x:.2f}' for x in ratios)} "
            f"(median {statistics.median(ratios):.2f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
