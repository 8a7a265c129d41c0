"""``flashsale serve``: the API under uvicorn or granian, N worker processes.

Both servers get the same behaviour: the app built by ``api.asgi:app_from_env`` in each
worker with its lifespan, uvloop, HTTP/1.1, a 4096-connection backlog, metrics summed
over workers (``PROMETHEUS_MULTIPROC_DIR``), and on SIGTERM or SIGINT a graceful stop:
no new connections, in-flight requests finished (for up to ``GRACEFUL_S``), then the
lifespan's shutdown. Which one runs: ``--server``, else ``FLASHSALE_SERVER``, else
``DEFAULT_SERVER`` (the README says why). ``flashsale up`` serves through here too, with
one worker.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping

from engine.settings import Settings, SettingsError

SERVERS = ("uvicorn", "granian")
# The faster on `make bench`'s claim storm that also answers malformed HTTP in JSON
# (README, "Choosing the HTTP server").
DEFAULT_SERVER = "uvicorn"
# How long in-flight requests may run on after SIGTERM before the worker is stopped.
GRACEFUL_S = 10
BACKLOG = 4096
APP_FACTORY = "api.asgi:app_from_env"


def export_env(settings: Settings) -> dict[str, str]:
    """The resolved settings as ``FLASHSALE_*`` variables, for worker and child processes."""
    env = dict(os.environ)
    pairs = {
        "FLASHSALE_REDIS_URL": settings.redis_url,
        "FLASHSALE_DATABASE_URL": settings.database_url,
        "FLASHSALE_AUTH_SECRET": settings.auth_secret,
        "FLASHSALE_DATA_DIR": str(settings.data_dir.absolute()),
    }
    env.update({k: v for k, v in pairs.items() if v})
    return env


def choose_server(requested: str | None, env: Mapping[str, str] | None = None) -> str:
    """``--server``, else ``FLASHSALE_SERVER``, else the default; refuse anything else."""
    env = os.environ if env is None else env
    name = (requested or env.get("FLASHSALE_SERVER") or DEFAULT_SERVER).strip().lower()
    if name not in SERVERS:
        raise SettingsError(f"FLASHSALE_SERVER must be one of {', '.join(SERVERS)}, got {name!r}")
    return name


def serve(settings: Settings, host: str, port: int, workers: int, server: str | None = None) -> int:
    """Run the API until SIGINT/SIGTERM; in-flight requests get ``GRACEFUL_S`` to finish."""
    name = choose_server(server)
    os.environ.update(export_env(settings))
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Each worker writes its metrics here; /metrics sums them.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="flashsale-metrics-")
    if name == "granian":
        return _granian(host, port, workers)
    return _uvicorn(host, port, workers)


def _uvicorn(host: str, port: int, workers: int) -> int:
    import uvicorn

    from flashsale.protocol import JsonErrorsProtocol

    uvicorn.run(
        APP_FACTORY,
        factory=True,
        host=host,
        port=port,
        workers=workers,
        loop="uvloop",
        # httptools underneath, with malformed requests answered in JSON.
        http=JsonErrorsProtocol,
        ws="none",
        # The client's address is the app's business (FLASHSALE_TRUSTED_PROXIES, read by
        # api/ratelimit.py): uvicorn must not rewrite it from X-Forwarded-For on its own
        # (it would, by default, for any request from 127.0.0.1).
        proxy_headers=False,
        access_log=False,
        log_level="info",
        timeout_graceful_shutdown=GRACEFUL_S,
        backlog=BACKLOG,
    )
    return 0


def _granian(host: str, port: int, workers: int) -> int:
    from granian.constants import HTTPModes, Interfaces, Loops
    from granian.http import HTTP1Settings
    from granian.server import Server

    from flashsale.protocol import MAX_HEAD_BYTES

    Server(
        APP_FACTORY,
        factory=True,
        address=host,
        port=port,
        interface=Interfaces.ASGI,  # with the lifespan
        workers=workers,
        loop=Loops.uvloop,
        http=HTTPModes.http1,
        websockets=False,
        backlog=BACKLOG,
        # hyper answers a head over its buffer with 431 (empty body: see the README).
        http1_settings=HTTP1Settings(max_buffer_size=MAX_HEAD_BYTES),
        log_access=False,
        # Granian finishes in-flight requests on SIGTERM; a worker still busy after
        # this long is killed, as uvicorn cancels its tasks.
        workers_kill_timeout=GRACEFUL_S,
    ).serve()
    return 0
