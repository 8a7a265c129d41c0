"""`flashsale serve` as a subprocess on a free port: started, waited for, stopped or killed."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from engine.settings import Settings
from flashsale.embedded import free_port

ROOT = Path(__file__).resolve().parents[1]
SERVERS = ("uvicorn", "granian")


def serve_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment `flashsale serve` reads, for ``settings`` (nothing else FLASHSALE_*)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLASHSALE_", "PROMETHEUS_"))}
    pairs = {
        "FLASHSALE_REDIS_URL": settings.redis_url,
        "FLASHSALE_REDIS_CLUSTER": "1" if settings.redis_cluster else None,
        "FLASHSALE_DATABASE_URL": settings.database_url,
        "FLASHSALE_AUTH_SECRET": settings.auth_secret,
        "FLASHSALE_DATA_DIR": str(settings.data_dir),
        "FLASHSALE_PARTITIONS": str(settings.partitions),
        "FLASHSALE_STREAM_CAP": str(settings.stream_cap),
        "FLASHSALE_DURABILITY": settings.durability,
        "FLASHSALE_KEYS_DIR": str(settings.keys_dir) if settings.keys_dir else None,
        "FLASHSALE_RATE_CALLER": str(settings.rate_caller_per_s),
        "FLASHSALE_RATE_ADDRESS": str(settings.rate_address_per_s),
        "FLASHSALE_TRUSTED_PROXIES": ",".join(settings.trusted_proxies),
        "FLASHSALE_BODY_TIMEOUT": f"{settings.body_timeout_s}s",
        "FLASHSALE_ARCHIVE_GRACE": f"{settings.archive_grace_s}s",
        "FLASHSALE_ARCHIVE_INTERVAL": f"{settings.archive_interval_s}s",
        "FLASHSALE_KEY_PREPUBLISH": f"{settings.key_prepublish_s}s",
    }
    env.update({k: v for k, v in pairs.items() if v})
    env.update(extra)
    return env


@dataclass
class Served:
    """One `flashsale serve` process (its own session: stopping it stops its workers)."""

    server: str
    env: dict[str, str]
    log_path: Path
    workers: int = 1
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60) -> Served:
        argv = [
            sys.executable,
            "-m",
            "flashsale",
            "serve",
            "--server",
            self.server,
            "--port",
            str(self.port),
            "--workers",
            str(self.workers),
        ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv,
                env=self.env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"flashsale serve exited: {self.log()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            time.sleep(0.1)
        raise RuntimeError(f"flashsale serve never answered: {self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self) -> None:
        """SIGTERM to the server's main process, as a supervisor stops it."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL to every process of this server (main process and workers)."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int | None:
        """SIGTERM, wait; SIGKILL whatever is left. Returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(20)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # orphaned workers, if any
        if self.proc.poll() is None:
            self.proc.wait(5)
        return self.proc.returncode
