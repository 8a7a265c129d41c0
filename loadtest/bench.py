"""The side-by-side benchmark (``make bench``): flashsale next to what a team would build.

One run, one table, on this machine: the ``/healthz`` ceiling of the HTTP stack, a claim
storm (a hot deal of 2,000 vouchers, 30,000 distinct callers, most answers sold_out), a
claim-success run (every request a new caller), discovery, and the persister's drain.
Each next to the peers of ``loadtest/peers.py`` on the same stack and auth: (a) claims
decided by PostgreSQL alone, (b) the seed's Redis-lock flow. Every server is started
here (embedded Redis and PostgreSQL unless URLs are given; ``flashsale serve`` and the
peers as subprocesses on free ports, with 1 and then 2 workers). The load generator is
wrk (Debian's ``wrk``) with per-request distinct caller tokens; its CPU time is reported.

    .venv/bin/python -m loadtest.bench            # about 4 minutes
    .venv/bin/python -m loadtest.bench --quick    # about 1.5 minutes

Not a test: it prints numbers, it asserts only that the answers were correct.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import orjson
import redis.asyncio as aioredis

from database.pool import Database
from engine.deals import NewDeal, create_deal
from engine.settings import Settings
from engine.store import Store
from engine.streams import stream_lag
from flashsale.embedded import EmbeddedPostgres, EmbeddedRedis, die_with_parent, free_port
from loadtest.peers import PG_SCHEMA, seed_lock_deal
from persister.schema import migrate
from persister.worker import Persister

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SECRET = "bench-secret-" + "b" * 48
CENTER = (12.9716, 77.5946)
STORM_INVENTORY = 2000
STORM_CALLERS = 30_000
SUCCESS_INVENTORY = 1_000_000
DISCOVERY_DEALS = 2000
DISCOVERY_SPREAD_DEG = 0.1
ONE_MILLION_A_MINUTE = 1_000_000 / 60
# Targets: the claim storm's rate against the same server's /healthz.
STORM_OF_HEALTHZ = 0.7
# API processes (1 worker each) behind nginx in the balancer run.
BALANCED_PROCESSES = 3

log = logging.getLogger("loadtest.bench")


# -- tokens ---------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def mint_fast(secret: str, subs: Iterator[str], role: str = "user", ttl_s: int = 3600) -> list[str]:
    """HS256 caller tokens, as ``api.auth.mint`` makes them, without pyjwt's per-call cost."""
    head = _b64(orjson.dumps({"alg": "HS256", "typ": "JWT"}))
    key = secret.encode()
    now = int(time.time())
    out = []
    for sub in subs:
        body = _b64(orjson.dumps({"sub": sub, "role": role, "iat": now, "exp": now + ttl_s}))
        signing = f"{head}.{body}"
        sig = _b64(hmac.new(key, signing.encode(), hashlib.sha256).digest())
        out.append(f"{signing}.{sig}")
    return out


def write_tokens(path: Path, tokens: list[str]) -> Path:
    path.write_text("\n".join(tokens) + "\n")
    return path


# -- wrk ------------------------------------------------------------------------------


@dataclass
class WrkResult:
    """One wrk run: rates, statuses, latency, and the CPU the load generator used."""

    label: str
    requests: int
    seconds: float
    statuses: dict[int, int]
    socket_errors: str
    p50_ms: float
    p99_ms: float
    wrk_cpu_s: float
    # CPU seconds each watched process tree used during the run (``run_wrk``'s ``watch``).
    cpu_s: dict[str, float] = field(default_factory=dict)

    def cpu_us_per_request(self, name: str) -> float:
        """Microseconds of CPU a watched process tree spent per request answered."""
        return 1e6 * self.cpu_s[name] / self.requests if self.requests else 0.0

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def rate_of(self, status: int) -> float:
        return self.statuses.get(status, 0) / self.seconds if self.seconds else 0.0

    @property
    def server_errors(self) -> int:
        return sum(n for s, n in self.statuses.items() if s >= 500)

    @property
    def wrk_cpu_pct(self) -> float:
        return 100 * self.wrk_cpu_s / self.seconds if self.seconds else 0.0


_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def tree_cpu_s(root: int) -> float:
    """CPU seconds (user + system) used so far by process ``root`` and its descendants
    (from ``/proc``: an API's workers are its children, granian's its threads)."""
    stats: dict[int, tuple[int, float]] = {}  # pid -> (parent, cpu seconds)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        # After the command: state, ppid, ..., utime and stime are fields 14 and 15.
        stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])))
    tree, total, frontier = {root}, 0.0, [root]
    while frontier:
        parent = frontier.pop()
        frontier += [pid for pid, (ppid, _) in stats.items() if ppid == parent and pid not in tree]
        tree.update(frontier)
    for pid in tree:
        if pid in stats:
            total += stats[pid][1]
    return total / _TICKS_PER_S


def run_wrk(
    label: str,
    url: str,
    script: str,
    env: dict[str, str],
    seconds: float,
    connections: int,
    threads: int = 1,
    watch: dict[str, int] | None = None,
) -> WrkResult:
    """Run wrk, wait for it with ``wait4`` (for its CPU time), parse what it printed.

    ``watch``: process trees (name -> root pid) whose CPU time during the run is kept.
    """
    watch = watch or {}
    cpu_before = {name: tree_cpu_s(pid) for name, pid in watch.items()}
    argv = [
        "wrk",
        "-t",
        str(threads),
        "-c",
        str(connections),
        "-d",
        f"{seconds:g}s",
        "--timeout",
        "5s",
        "-s",
        str(HERE / script),
        url,
    ]
    full_env = {
        **os.environ,
        "BENCH_THREADS": str(threads),
        "BENCH_REPORT": str(HERE / "wrk_report.lua"),
        **env,
    }
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=full_env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read().decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {text}")
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m),", text)
    if not m:
        raise RuntimeError(f"cannot read wrk's output: {text}")
    unit = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[m.group(3)]
    statuses = {int(c): int(n) for c, n in re.findall(r"^status (\d+) (\d+)$", text, re.M)}
    p50 = re.search(r"^latency_p50_us (\d+)$", text, re.M)
    p99 = re.search(r"^latency_p99_us (\d+)$", text, re.M)
    sock = re.search(r"Socket errors: (.*)", text)
    return WrkResult(
        label=label,
        requests=int(m.group(1)),
        seconds=float(m.group(2)) * unit,
        statuses=statuses,
        socket_errors=sock.group(1).strip() if sock else "",
        p50_ms=int(p50.group(1)) / 1000 if p50 else 0.0,
        p99_ms=int(p99.group(1)) / 1000 if p99 else 0.0,
        wrk_cpu_s=usage.ru_utime + usage.ru_stime,
        cpu_s={name: tree_cpu_s(pid) - cpu_before[name] for name, pid in watch.items()},
    )


# -- servers --------------------------------------------------------------------------


@dataclass
class Server:
    """An HTTP server subprocess on a free port (its whole process group is stopped)."""

    name: str
    argv: list[str]
    env: dict[str, str]
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    # ``python -m`` puts the working directory first on the path: the code runs from here.
    cwd: Path = ROOT

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, log_dir: Path) -> Server:
        self.log_path = log_dir / f"{self.name}-{self.port}.log"
        with open(self.log_path, "wb") as logf:
            self.proc = subprocess.Popen(
                [*self.argv, "--port", str(self.port)],
                env=self.env,
                stdout=logf,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                start_new_session=True,
                preexec_fn=lambda: die_with_parent(signal.SIGTERM),
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited; see {self.log_path}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(self.url + "/healthz", timeout=1) as resp,
            ):
                if resp.status == 200:
                    return self
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not answer /healthz; see {self.log_path}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


# -- deals ----------------------------------------------------------------------------


@dataclass
class Backends:
    redis_url: str
    database_url: str
    settings: Settings
    redis_pid: int | None = None  # the embedded Redis's, for its CPU per request


def _window_ms() -> tuple[int, int, int]:
    now = int(time.time() * 1000)
    return now - 60_000, now + 6 * 3_600_000, now + 7 * 86_400_000


async def new_deals(b: Backends, inventory: int, tag: str, fs_names: list[str]) -> dict[str, str]:
    """One fresh deal per system, each with ``inventory`` vouchers: {system: deal id}."""
    starts, ends, redeem = _window_ms()
    store = await Store.connect(b.settings)
    try:
        new = NewDeal(
            "m-bench",
            f"bench {tag}",
            "",
            CENTER[0] + 1,
            CENTER[1] + 1,
            inventory,
            starts,
            ends,
            redeem,
        )
        fs_deals = {name: (await create_deal(store, new)).id for name in fs_names}
    finally:
        await store.close()
    peer_id = f"d_peer_{tag}_{random.getrandbits(40):x}"
    conn = await asyncpg.connect(b.database_url)
    try:
        await conn.execute(
            "INSERT INTO peer_deals (id, merchant_id, title, lat, lng, inventory_total,"
            " inventory_left, starts_at, ends_at, redeem_until) VALUES ($1, 'm-bench', $2,"
            " $3, $4, $5, $5, fs_ms($6), fs_ms($7), fs_ms($8))",
            peer_id,
            f"bench {tag}",
            CENTER[0] + 1,
            CENTER[1] + 1,
            inventory,
            starts,
            ends,
            redeem,
        )
    finally:
        await conn.close()
    r = aioredis.Redis.from_url(b.redis_url, decode_responses=True)
    try:
        await seed_lock_deal(r, peer_id, "m-bench", inventory, starts, ends, redeem)
    finally:
        await r.aclose()
    return {**fs_deals, "pg": peer_id, "lock": peer_id}


async def seed_discovery(b: Backends, count: int) -> None:
    """The same ``count`` active deals around the centre, in flashsale and in the peers."""
    starts, ends, redeem = _window_ms()
    rng = random.Random(42)
    points = [
        (
            CENTER[0] + rng.uniform(-DISCOVERY_SPREAD_DEG, DISCOVERY_SPREAD_DEG),
            CENTER[1] + rng.uniform(-DISCOVERY_SPREAD_DEG, DISCOVERY_SPREAD_DEG),
        )
        for _ in range(count)
    ]
    store = await Store.connect(b.settings)
    try:
        await asyncio.gather(
            *(
                create_deal(
                    store, NewDeal("m-bench", f"shop {i}", "", lat, lng, 1000, starts, ends, redeem)
                )
                for i, (lat, lng) in enumerate(points)
            )
        )
    finally:
        await store.close()
    conn = await asyncpg.connect(b.database_url)
    try:
        await conn.executemany(
            "INSERT INTO peer_deals (id, merchant_id, title, lat, lng, inventory_total,"
            " inventory_left, starts_at, ends_at, redeem_until) VALUES ($1, 'm-bench', $2,"
            " $3, $4, 1000, 1000, fs_ms($5), fs_ms($6), fs_ms($7))",
            [
                (f"d_shop{i}", f"shop {i}", lat, lng, starts, ends, redeem)
                for i, (lat, lng) in enumerate(points)
            ],
        )
        await conn.execute("ANALYZE peer_deals")
    finally:
        await conn.close()


async def prepare_database(url: str) -> None:
    await migrate(url)
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(PG_SCHEMA)
    finally:
        await conn.close()


async def drain(b: Backends) -> tuple[int, float]:
    """Run one persister over every claim the run left in the streams: (rows, rows/s)."""
    store = await Store.connect(b.settings)
    db = Database(b.database_url)
    await db.open()
    try:
        rows = await stream_lag(store)
        p = Persister(b.settings, store, db, "bench-drain")
        started = time.perf_counter()
        task = asyncio.create_task(p.run())
        while await stream_lag(store):  # noqa: ASYNC110 - polling Redis, not an event
            await asyncio.sleep(0.02)
        elapsed = time.perf_counter() - started
        p.stop()
        await task
    finally:
        await db.close()
        await store.close()
    return rows, rows / elapsed if elapsed else 0.0


# -- the run --------------------------------------------------------------------------


@dataclass
class Plan:
    seconds: float
    connections: int
    workers: list[int]
    success_tokens: int
    servers: list[str]
    balancer: bool

    @property
    def fs_names(self) -> list[str]:
        return [f"flashsale-{s}" for s in self.servers]


@dataclass
class Row:
    scenario: str
    workers: int
    results: dict[str, WrkResult]


def _env(b: Backends, keys_dir: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "FLASHSALE_REDIS_URL": b.redis_url,
        "FLASHSALE_DATABASE_URL": b.database_url,
        "FLASHSALE_AUTH_SECRET": SECRET,
        "FLASHSALE_KEYS_DIR": str(keys_dir),
        "FLASHSALE_DATA_DIR": str(keys_dir.parent),
        "BENCH_REDIS_URL": b.redis_url,
        "BENCH_DATABASE_URL": b.database_url,
        "PYTHONPATH": str(ROOT),
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # `flashsale serve` sets it for 2+ workers
    env.pop("FLASHSALE_SERVER", None)  # each system names its server
    return env


def _flashsale(env: dict[str, str], server: str, workers: int, name: str) -> Server:
    argv = [
        sys.executable,
        "-m",
        "flashsale",
        "serve",
        "--server",
        server,
        "--workers",
        str(workers),
    ]
    return Server(name, argv, env)


def _systems(b: Backends, keys_dir: Path, workers: int, servers: list[str]) -> dict[str, Server]:
    env = _env(b, keys_dir)
    peer = [sys.executable, "-m", "loadtest.peers"]
    return {
        **{f"flashsale-{s}": _flashsale(env, s, workers, f"flashsale-{s}") for s in servers},
        "pg": Server("pg", [*peer, "pg", "--workers", str(workers)], env),
        "lock": Server("lock", [*peer, "lock", "--workers", str(workers)], env),
    }


def run_workers(
    b: Backends, plan: Plan, workers: int, tmp: Path, storm_file: Path, success_file: Path
) -> list[Row]:
    keys_dir = tmp / "data" / "keys"
    systems = _systems(b, keys_dir, workers, plan.servers)
    rows: list[Row] = []
    secs, conns = plan.seconds, plan.connections
    try:
        for s in systems.values():
            s.start(tmp)
        print(f"  {workers} worker(s): /healthz", flush=True)
        for name in plan.fs_names:
            run_wrk(
                "warm-up",
                systems[name].url + "/healthz",
                "wrk_get.lua",
                {"BENCH_PATH": "/healthz"},
                1,
                conns,
            )

        def watch(s: Server) -> dict[str, int]:
            """flashsale's process tree and the (embedded) Redis, for CPU per request."""
            if s.proc is None or not s.name.startswith("flashsale-"):
                return {}
            return {"api": s.proc.pid, **({"redis": b.redis_pid} if b.redis_pid else {})}

        health = {
            name: run_wrk(
                "healthz",
                s.url + "/healthz",
                "wrk_get.lua",
                {"BENCH_PATH": "/healthz"},
                secs,
                conns,
                watch=watch(s),
            )
            for name, s in systems.items()
        }
        rows.append(Row("/healthz", workers, health))
        for scenario, inventory, tokens in (
            ("claim storm", STORM_INVENTORY, storm_file),
            ("claim success", SUCCESS_INVENTORY, success_file),
        ):
            print(f"  {workers} worker(s): {scenario}", flush=True)
            deals = asyncio.run(new_deals(b, inventory, f"{scenario[6:]}{workers}", plan.fs_names))
            results = {}
            for name, s in systems.items():
                path = f"/v1/deals/{deals[name]}/claims"
                results[name] = run_wrk(
                    scenario,
                    s.url + path,
                    "wrk_claim.lua",
                    {"BENCH_PATH": path, "BENCH_TOKENS": str(tokens)},
                    secs,
                    conns,
                    watch=watch(s),
                )
            rows.append(Row(scenario, workers, results))
        print(f"  {workers} worker(s): discovery", flush=True)
        env = {
            "BENCH_CENTER": f"{CENTER[0]},{CENTER[1]}",
            "BENCH_SPREAD": str(DISCOVERY_SPREAD_DEG),
        }
        rows.append(
            Row(
                "discovery",
                workers,
                {
                    name: run_wrk(
                        "discovery",
                        s.url + "/v1/deals",
                        "wrk_get.lua",
                        env,
                        secs,
                        conns,
                        watch=watch(s),
                    )
                    for name, s in systems.items()
                },
            )
        )
    finally:
        for s in systems.values():
            s.stop()
    return rows


def _fmt(x: float) -> str:
    return f"{x:,.0f}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.1f}x" if b else "-"


def _rate(row: Row, name: str) -> float:
    r = row.results[name]
    return r.rate_of(201) if row.scenario == "claim success" else r.rps


def _answers(r: WrkResult) -> str:
    parts = [f"{n:,}x{s}" for s, n in sorted(r.statuses.items())]
    if r.socket_errors:
        parts.append(f"socket errors: {r.socket_errors}")
    return ", ".join(parts)


@dataclass
class BalancerRun:
    """The storm through nginx over several API processes, next to one server direct."""

    server: str
    processes: int
    health: WrkResult
    storm: WrkResult


def run_balancer(b: Backends, plan: Plan, tmp: Path, storm_file: Path) -> list[BalancerRun]:
    """nginx (deploy/nginx.conf) in front of ``BALANCED_PROCESSES`` APIs of 1 worker."""
    from loadtest.balancer import Nginx

    runs: list[BalancerRun] = []
    env = _env(b, tmp / "data" / "keys")
    for server in plan.servers:
        apis = [_flashsale(env, server, 1, f"lb-{server}-{i}") for i in range(BALANCED_PROCESSES)]
        nginx = Nginx([a.port for a in apis], tmp / f"nginx-{server}")
        try:
            for api in apis:
                api.start(tmp)
            nginx.start()
            print(f"  nginx over {len(apis)} x {server}: /healthz, claim storm", flush=True)
            conns = plan.connections
            run_wrk(
                "warm-up",
                nginx.url + "/healthz",
                "wrk_get.lua",
                {"BENCH_PATH": "/healthz"},
                1,
                conns,
            )
            health = run_wrk(
                "healthz",
                nginx.url + "/healthz",
                "wrk_get.lua",
                {"BENCH_PATH": "/healthz"},
                plan.seconds,
                conns,
            )
            deal = asyncio.run(new_deals(b, STORM_INVENTORY, f"lb-{server}", ["lb"]))["lb"]
            path = f"/v1/deals/{deal}/claims"
            storm = run_wrk(
                "claim storm",
                nginx.url + path,
                "wrk_claim.lua",
                {"BENCH_PATH": path, "BENCH_TOKENS": str(storm_file)},
                plan.seconds,
                conns,
            )
            runs.append(BalancerRun(server, len(apis), health, storm))
        finally:
            nginx.stop()
            for api in apis:
                api.stop()
    return runs


def _cpu_table(rows: list[Row], plan: Plan) -> None:
    """Where each of flashsale's requests' CPU went (``/proc``), by process: less noisy than
    req/s on a shared machine, and it says what the cores could give at that cost."""
    cores = os.cpu_count() or 1
    print(
        "\nCPU per request, in microseconds (user + system, from /proc), by process; "
        f"'ceiling' is what {cores} cores could answer at that cost with nothing else "
        "running:\n"
    )
    print(
        "| scenario | workers | system | API | Redis | wrk | all three | ceiling req/s "
        "| API, of /healthz's |"
    )
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    health = {
        (r.workers, name): res.cpu_us_per_request("api")
        for r in rows
        if r.scenario == "/healthz"
        for name, res in r.results.items()
        if "api" in res.cpu_s
    }
    for row in rows:
        for name, res in row.results.items():
            if "api" not in res.cpu_s or not res.requests:
                continue
            api = res.cpu_us_per_request("api")
            redis = res.cpu_us_per_request("redis") if "redis" in res.cpu_s else 0.0
            wrk = 1e6 * res.wrk_cpu_s / res.requests
            total = api + redis + wrk
            base = health.get((row.workers, name))
            print(
                f"| {row.scenario} | {row.workers} | {name} | {api:.0f} "
                f"| {redis:.0f} | {wrk:.0f} | {total:.0f} | {_fmt(cores * 1e6 / total)} "
                f"| {api / base if base else 0:.1f}x |"
            )


def report(
    rows: list[Row], drained: tuple[int, float], plan: Plan, cmd: str, balanced: list[BalancerRun]
) -> list[str]:
    """The markdown tables and the verdicts; also returns the problems found."""
    problems: list[str] = []
    print(
        f"\n`{cmd}` on {os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
        f"{plan.seconds:g} s per cell, wrk -t1 -c{plan.connections}, "
        f"{time.strftime('%Y-%m-%d')}\n"
    )
    print(
        "| scenario | workers | server | flashsale req/s | (a) PostgreSQL req/s "
        "| (b) Redis lock req/s | flashsale / (a) | flashsale / (b) | flashsale p99 ms "
        "| wrk CPU (of one core) |"
    )
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        a, b = _rate(row, "pg"), _rate(row, "lock")
        name = row.scenario + (" (new vouchers/s)" if row.scenario == "claim success" else "")
        for server, fs_name in zip(plan.servers, plan.fs_names, strict=True):
            fs = _rate(row, fs_name)
            r = row.results[fs_name]
            if row.scenario == "/healthz":
                a_txt, b_txt = "(uvicorn)", "(uvicorn)"
            else:
                a_txt, b_txt = _fmt(a), _fmt(b)
            print(
                f"| {name} | {row.workers} | {server} | {_fmt(fs)} | {a_txt} | {b_txt} "
                f"| {_ratio(fs, a)} | {_ratio(fs, b)} | {r.p99_ms:.1f} "
                f"| {r.wrk_cpu_pct:.0f}% |"
            )
        for sysname, res in row.results.items():
            # The lock peer's 503s are its lock-wait timeouts: the seed flow's own answer.
            if res.server_errors and sysname != "lock":
                problems.append(f"{row.scenario} {row.workers}w {sysname}: {res.server_errors} 5xx")
            issued = res.statuses.get(201, 0)
            if row.scenario == "claim storm" and issued > STORM_INVENTORY:
                problems.append(
                    f"claim storm {row.workers}w {sysname}: oversold, "
                    f"{issued} vouchers for {STORM_INVENTORY}"
                )
    rows_n, rate = drained
    print(
        f"| persister drain (rows/s into PostgreSQL, fsync on) | 1 process | - | {_fmt(rate)} "
        f"| (claims are written synchronously) | - | - | - | - | - |"
    )
    print("\nAnswers by status (" + " | ".join([*plan.fs_names, "(a)", "(b)"]) + "):\n")
    for row in rows:
        if row.scenario.startswith("claim"):
            names = [*plan.fs_names, "pg", "lock"]
            answers = " | ".join(_answers(row.results[n]) for n in names)
            print(f"- {row.scenario}, {row.workers} worker(s): {answers}")
    print(f"- persister drain: {rows_n:,} stream entries (every deal and voucher of the run)")
    _cpu_table(rows, plan)
    if balanced:
        direct = {
            (r.scenario, n): _rate(r, n)
            for r in rows
            if r.workers == max(plan.workers)
            for n in plan.fs_names
        }
        print(
            f"\nThrough nginx (deploy/nginx.conf) over {balanced[0].processes} API processes "
            f"of 1 worker, next to one process of {max(plan.workers)} workers direct:\n"
        )
        print(
            "| server | scenario | through nginx req/s | direct req/s | nginx / direct "
            "| nginx p99 ms | answers through nginx |"
        )
        print("| --- | --- | ---: | ---: | ---: | ---: | --- |")
        for run in balanced:
            for scenario, res in (("/healthz", run.health), ("claim storm", run.storm)):
                d = direct.get((scenario, f"flashsale-{run.server}"), 0.0)
                print(
                    f"| {run.server} | {scenario} | {_fmt(res.rps)} | {_fmt(d)} "
                    f"| {res.rps / d if d else 0:.2f} | {res.p99_ms:.1f} "
                    f"| {_answers(res)} |"
                )
                if res.server_errors:
                    problems.append(f"nginx {run.server} {scenario}: {res.server_errors} 5xx")
                if scenario == "claim storm" and res.statuses.get(201, 0) > STORM_INVENTORY:
                    problems.append(f"nginx {run.server}: oversold")
    print("\nTargets:\n")
    for w in sorted({r.workers for r in rows}):
        by = {r.scenario: r for r in rows if r.workers == w}
        if not {"/healthz", "claim storm", "claim success"} <= by.keys():
            continue
        for server, fs_name in zip(plan.servers, plan.fs_names, strict=True):
            tag = f"{w} worker(s), {server}"
            health = _rate(by["/healthz"], fs_name)
            storm = _rate(by["claim storm"], fs_name)
            success = _rate(by["claim success"], fs_name)
            success_a = _rate(by["claim success"], "pg")
            verdict = "met" if storm >= STORM_OF_HEALTHZ * health else "NOT met"
            print(
                f"- {tag}: claim storm {_fmt(storm)}/s = {storm / health:.2f} of /healthz "
                f"({_fmt(health)}/s); target {STORM_OF_HEALTHZ}: {verdict}"
            )
            verdict = "met" if success >= 3 * success_a else "NOT met"
            print(
                f"- {tag}: claim success {_fmt(success)}/s = {_ratio(success, success_a)} "
                f"peer (a) ({_fmt(success_a)}/s); target 3x: {verdict}"
            )
            verdict = "met" if storm >= ONE_MILLION_A_MINUTE else "NOT met"
            print(
                f"- {tag}: claim storm {_fmt(storm)}/s against 16.7k/s (1 million a minute): "
                f"{100 * storm / ONE_MILLION_A_MINUTE:.0f}%, {verdict} (wrk on the same "
                f"{os.cpu_count()} cores)"
            )
    for p in problems:
        print(f"- PROBLEM: {p}")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 s cells (about 1.5 minutes)")
    p.add_argument("--seconds", type=float, help="seconds per cell (default 8, quick 3)")
    p.add_argument("--connections", type=int, default=256)
    p.add_argument("--workers", default="1,2", help="worker counts to compare, e.g. 1,2")
    p.add_argument(
        "--servers",
        default="uvicorn,granian",
        help="HTTP servers under flashsale serve, side by side",
    )
    p.add_argument(
        "--no-balancer", action="store_true", help="skip the run through nginx (deploy/nginx.conf)"
    )
    p.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL"))
    p.add_argument("--database-url", default=os.environ.get("BENCH_DATABASE_URL"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if shutil.which("wrk") is None:
        print("loadtest.bench needs wrk (Debian: apt-get install wrk)", file=sys.stderr)
        return 2
    seconds = args.seconds or (3.0 if args.quick else 8.0)
    from loadtest.balancer import nginx_binary

    balancer = not args.no_balancer
    if balancer and nginx_binary() is None:
        print(
            "no nginx (Debian: apt-get install nginx-light): skipping the balancer run",
            file=sys.stderr,
        )
        balancer = False
    plan = Plan(
        seconds,
        args.connections,
        [int(w) for w in args.workers.split(",")],
        success_tokens=int(max(seconds, 3) * 25_000),
        servers=args.servers.split(","),
        balancer=balancer,
    )
    cmd = "python -m loadtest.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="flashsale-bench-")))
        redis_url, database_url = args.redis_url, args.database_url
        redis_pid = None
        if not redis_url:
            redis = EmbeddedRedis(tmp / "redis").start()
            stack.callback(redis.stop)
            redis_url = redis.url
            redis_pid = redis.proc.pid if redis.proc is not None else None
        if not database_url:
            pg = EmbeddedPostgres(tmp / "pg").start()  # durable: fsync on
            stack.callback(pg.remove_data)
            database_url = pg.url
        settings = Settings(
            redis_url=redis_url,
            database_url=database_url,
            auth_secret=SECRET,
            data_dir=tmp / "data",
        )
        b = Backends(redis_url, database_url, settings, redis_pid)
        print("preparing: migrations, peer schema, discovery deals, tokens", flush=True)
        asyncio.run(prepare_database(database_url))
        asyncio.run(seed_discovery(b, DISCOVERY_DEALS))
        run_id = f"{random.getrandbits(32):x}"
        storm_file = write_tokens(
            tmp / "storm.tokens",
            mint_fast(SECRET, (f"s{run_id}-{i}" for i in range(STORM_CALLERS))),
        )
        success_file = write_tokens(
            tmp / "success.tokens",
            mint_fast(SECRET, (f"n{run_id}-{i}" for i in range(plan.success_tokens))),
        )
        rows: list[Row] = []
        for w in plan.workers:
            rows += run_workers(b, plan, w, tmp, storm_file, success_file)
        balanced = run_balancer(b, plan, tmp, storm_file) if plan.balancer else []
        print("  persister drain", flush=True)
        drained = asyncio.run(drain(b))
        problems = report(rows, drained, plan, cmd.strip(), balanced)
    print(f"\n(whole run: {time.monotonic() - started:.0f} s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
