"""``flashsale up``: everything on one machine, stopped together by Ctrl-C or SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import threading
from typing import Any

from engine.settings import Settings
from flashsale import wiring
from flashsale.embedded import EmbeddedPostgres, EmbeddedRedis, die_with_parent
from flashsale.private import private_dir
from flashsale.serve import choose_server, export_env, serve


def _start_servers(settings: Settings, started: list[Any]) -> Settings:
    if not settings.redis_url:
        redis = EmbeddedRedis(settings.data_dir / "redis").start()
        started.append(redis)
        print(f"embedded Redis (valkey) on 127.0.0.1:{redis.port}, data in {redis.data_dir}")
        settings = settings.with_(redis_url=redis.url)
    if not settings.database_url:
        pg = EmbeddedPostgres(settings.data_dir / "postgres").start()
        started.append(pg)
        print(f"embedded PostgreSQL on 127.0.0.1:{pg.port}, data in {pg.data_dir}")
        settings = settings.with_(database_url=pg.url)
    return settings


def _start_persister(settings: Settings) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "flashsale", "persist"],
        env=export_env(settings),
        preexec_fn=lambda: die_with_parent(signal.SIGTERM),
    )


class PersisterSupervisor:
    """Keeps one persister running: a persister that dies is started again, with backoff.

    A persister exits on errors it must not guess about (an unmigrated schema, a bug);
    while it is down the streams hold the backlog, and claims are refused only at the
    stream cap, so restarting it is what keeps `flashsale up` honest.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.proc = _start_persister(settings)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="persister", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        backoff_s = 1.0
        while not self._stop.wait(0.5):
            code = self.proc.poll()
            if code is None:
                continue
            print(
                f"flashsale up: the persister exited ({code}); restarting in {backoff_s:.0f} s",
                file=sys.stderr,
            )
            if self._stop.wait(backoff_s):
                return
            backoff_s = min(backoff_s * 2, 30.0)
            self.proc = _start_persister(self.settings)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        proc = self.proc
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            if proc.poll() is None:
                proc.kill()


def up(*, host: str, port: int, demo: bool = False, server: str | None = None) -> int:
    """Start embedded servers (unless URLs are set), migrate, run persister and API.

    The API runs under the server ``flashsale serve`` would choose (``server``, else
    ``FLASHSALE_SERVER``, else the default), in one worker.
    """
    server_name = choose_server(server)  # a wrong name is refused before anything starts
    settings = Settings.from_env()
    # Passwords, keys and server data live here: for our user alone.
    private_dir(settings.data_dir)
    started: list[Any] = []
    persister: PersisterSupervisor | None = None
    try:
        settings = wiring.resolve(_start_servers(settings, started))
        wiring.write_servers(settings)
        from persister import cli as persister_cli

        asyncio.run(persister_cli.migrate(settings))
        persister = PersisterSupervisor(settings)
        if demo:
            from flashsale.demo import seed

            asyncio.run(seed(settings, f"http://{host}:{port}"))
        return serve(settings, host, port, workers=1, server=server_name)
    finally:
        if persister is not None:
            persister.stop()
        for embedded in reversed(started):
            embedded.stop()
        wiring.clear_servers(settings)
        print("flashsale up: stopped")
