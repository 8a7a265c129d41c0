"""``flashsale up``: everything on one machine, stopped together by Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import subprocess
import sys
from typing import Any

import uvicorn

from engine.settings import Settings
from flashsale import wiring
from flashsale.embedded import EmbeddedPostgres, EmbeddedRedis, die_with_parent
from flashsale.serve import export_env


def _start_servers(settings: Settings, started: list[Any]) -> Settings:
    if not settings.redis_url:
        redis = EmbeddedRedis(settings.data_dir / "redis").start()
        started.append(redis)
        print(f"embedded Redis (valkey) on {redis.url}, data in {redis.data_dir}")
        settings = settings.with_(redis_url=redis.url)
    if not settings.database_url:
        pg = EmbeddedPostgres(settings.data_dir / "postgres").start()
        started.append(pg)
        print(f"embedded PostgreSQL on {pg.url}, data in {pg.data_dir}")
        settings = settings.with_(database_url=pg.url)
    return settings


def _start_persister(settings: Settings) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "flashsale", "persist"],
        env=export_env(settings),
        preexec_fn=lambda: die_with_parent(signal.SIGTERM),
    )


def up(args: argparse.Namespace) -> int:
    """Start embedded servers (unless URLs are set), migrate, run persister and API."""
    settings = Settings.from_env()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    started: list[Any] = []
    persister: subprocess.Popen[bytes] | None = None
    try:
        settings = wiring.resolve(_start_servers(settings, started))
        wiring.write_servers(settings)
        import persister.cli as persister_cli

        code = asyncio.run(persister_cli.migrate(settings, argparse.Namespace(command="migrate")))
        if code != 0:
            print("flashsale up: migrations failed", file=sys.stderr)
        persister = _start_persister(settings)
        if args.demo:
            from flashsale.demo import seed

            asyncio.run(seed(settings, f"http://{args.host}:{args.port}"))
        from api.app import create_app

        uvicorn.run(
            create_app(settings),
            host=args.host,
            port=args.port,
            loop="uvloop",
            http="httptools",
            access_log=False,
            timeout_graceful_shutdown=5,
        )
        return 0
    finally:
        if persister is not None and persister.poll() is None:
            persister.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                persister.wait(10)
            if persister.poll() is None:
                persister.kill()
        for server in reversed(started):
            server.stop()
        wiring.clear_servers(settings)
        print("flashsale up: stopped")
