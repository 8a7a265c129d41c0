"""Debian's nginx running the project's deploy/nginx.conf on one machine.

The config is used as it ships, adapted only in ports and addresses (the upstream's
servers, the listening address) and in the paths of its pid and temp files (a directory
of the caller's), so that tests and ``make bench`` put the real load balancer in front of
local `flashsale serve` processes.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from flashsale.embedded import free_port

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "deploy" / "nginx.conf"


def nginx_binary() -> str | None:
    """Debian's nginx (apt-get install nginx-light), or None."""
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/sbin/nginx") if Path(p).exists()), None
    )


def local_config(upstreams: list[int], port: int, workdir: Path) -> str:
    """deploy/nginx.conf proxying to 127.0.0.1:<upstreams>, listening on 127.0.0.1:<port>."""
    conf = CONFIG.read_text()
    line = re.search(r"^( *)server api:8000( .*);\n", conf, re.M)
    if line is None:
        raise ValueError("deploy/nginx.conf has no `server api:8000 ...;` upstream line")
    indent, options = line.group(1), line.group(2)
    servers = "".join(f"{indent}server 127.0.0.1:{p}{options};\n" for p in upstreams)
    conf = conf[: line.start()] + servers + conf[line.end() :]
    conf, n = re.subn(r"listen 80 ", f"listen 127.0.0.1:{port} ", conf)
    if n != 1:
        raise ValueError("deploy/nginx.conf has no `listen 80 ...` line")
    return conf.replace("/tmp/", f"{workdir}/")


@dataclass
class Nginx:
    """nginx in the foreground on a free local port, in front of ``upstreams``."""

    upstreams: list[int]
    workdir: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 20) -> Nginx:
        binary = nginx_binary()
        if binary is None:
            raise RuntimeError("nginx is not installed (Debian: apt-get install nginx-light)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        path = self.workdir / "nginx.conf"
        path.write_text(local_config(self.upstreams, self.port, self.workdir))
        with open(self.workdir / "nginx.log", "ab") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    "-p",
                    str(self.workdir),
                    "-e",
                    "stderr",
                    "-c",
                    str(path),
                    "-g",
                    "daemon off;",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {self.log()}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(self.url + "/nginx-health", timeout=1) as resp,
            ):
                if resp.status == 200:
                    return self
            time.sleep(0.1)
        raise RuntimeError(f"nginx never answered: {self.log()}")

    def log(self) -> str:
        return (self.workdir / "nginx.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGQUIT)  # graceful: workers finish, then exit
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
