"""``flashsale serve``: the API under uvicorn (uvloop, httptools), N worker processes."""

from __future__ import annotations

import os
import tempfile

import uvicorn

from engine.settings import Settings


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


def serve(settings: Settings, host: str, port: int, workers: int) -> int:
    """Run the API until SIGINT/SIGTERM; in-flight requests get 10 s to finish."""
    os.environ.update(export_env(settings))
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Each worker writes its metrics here; /metrics sums them.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="flashsale-metrics-")
    uvicorn.run(
        "api.asgi:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="info",
        timeout_graceful_shutdown=10,
        backlog=4096,
    )
    return 0
