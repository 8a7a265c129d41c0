"""The `flashsale` command as a user runs it: up, serve, token, help."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import jwt
import pytest

from engine.errors import ExitCode
from flashsale import cli, keys
from flashsale.embedded import EmbeddedPostgres, free_port
from tests.conftest import flush
from tests.persister.conftest import drop_database, fresh_database

FLASHSALE = [sys.executable, "-m", "flashsale"]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHSALE_")}
    env["FLASHSALE_DATA_DIR"] = str(tmp_path / "data")
    env.update(extra)
    return env


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the command exited early"
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("never became healthy")


def _children(pid: int) -> set[int]:
    """Every descendant of ``pid``, from /proc (``ps`` is not on every fresh machine)."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            # After the command's closing parenthesis: state, then the parent's pid.
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            tree.setdefault(parent, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for c in tree.get(todo.pop(), []):
            found.add(c)
            todo.append(c)
    return found


def _persister(pid: int) -> int | None:
    for child in _children(pid):
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            if b"persist" in cmd and _alive(child):
                return child
    return None


def _end(proc: subprocess.Popen[bytes]) -> None:
    """Kill the command if a failed assertion left it running; close its pipe."""
    if proc.poll() is None:
        proc.kill()
    if proc.stdout:
        proc.stdout.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(")")[-1].split()[0] != "Z"


def test_help_lists_every_command() -> None:
    out = subprocess.run([*FLASHSALE, "--help"], capture_output=True, text=True, check=True)
    for command in (
        "up",
        "serve",
        "persist",
        "migrate",
        "replay",
        "reconcile",
        "rebuild-redis",
        "token",
        "keys",
        "verifier",
    ):
        assert command in out.stdout


def test_token_prints_a_caller_token_signed_with_the_secret(tmp_path: Path) -> None:
    secret = "t" * 40
    out = subprocess.run(
        [*FLASHSALE, "token", "--role", "merchant", "--sub", "m-7", "--ttl", "15m"],
        capture_output=True,
        text=True,
        check=True,
        env=_env(tmp_path, FLASHSALE_AUTH_SECRET=secret),
    )
    claims = jwt.decode(out.stdout.strip(), secret, algorithms=["HS256"])
    assert (claims["sub"], claims["role"]) == ("m-7", "merchant")
    assert 850 <= claims["exp"] - time.time() <= 900


def test_token_without_a_secret_uses_one_generated_into_the_data_dir(tmp_path: Path) -> None:
    run = [*FLASHSALE, "token", "--role", "user", "--sub", "u-1"]
    first = subprocess.run(run, capture_output=True, text=True, check=True, env=_env(tmp_path))
    secret_file = tmp_path / "data" / "auth_secret"
    assert oct(secret_file.stat().st_mode & 0o777) == "0o600"
    secret = secret_file.read_text().strip()
    assert len(secret) >= 32
    assert jwt.decode(first.stdout.strip(), secret, algorithms=["HS256"])["sub"] == "u-1"


def test_serve_answers_and_stops_on_sigterm(tmp_path: Path, redis_url: str) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*FLASHSALE, "serve", "--port", str(port)],
            env=_env(tmp_path, FLASHSALE_REDIS_URL=redis_url, FLASHSALE_AUTH_SECRET="s" * 40),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", proc)
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal it caught.
        assert proc.wait(15) in (0, -signal.SIGTERM)
        text = log.read_text()
        assert "Application shutdown complete" in text and "Traceback" not in text
    finally:
        _end(proc)


@pytest.mark.timeout(180)
def test_up_starts_everything_answers_and_ctrl_c_stops_all(tmp_path: Path) -> None:
    """`flashsale up --demo` with nothing set: embedded servers, API, persister; Ctrl-C.

    Another terminal finds the servers, behind their passwords, through servers.json; the
    output never shows a password; the data dir's parent keeps its mode.
    """
    port = free_port()
    tmp_path.chmod(0o700)  # the data dir's parent, as closed as /root
    proc = subprocess.Popen(
        [*FLASHSALE, "up", "--demo", "--port", str(port)],
        env=_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, proc, 120)
        ready = httpx.get(f"{url}/readyz", timeout=5)
        assert ready.json()["checks"] == {"redis": "ok", "postgres": "ok"}
        assert ready.headers["server"] == "uvicorn"  # FLASHSALE_SERVER unset: the default
        nearby = httpx.get(f"{url}/v1/deals", params={"lat": 12.9716, "lng": 77.5946}).json()
        assert nearby["count"] >= 3
        first = _persister(proc.pid)
        os.kill(first, signal.SIGKILL)  # a persister that dies is started again
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and _persister(proc.pid) in (None, first):
            time.sleep(0.3)
        assert _persister(proc.pid) not in (None, first)
        passwords = _another_terminal_finds_the_servers_with_their_passwords(tmp_path)
        children = _children(proc.pid)
        assert len(children) >= 3  # Valkey, PostgreSQL (and its workers), the persister
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) in (0, 130)  # 130: the shell's code for Ctrl-C
        output = proc.stdout.read().decode() if proc.stdout else ""
        assert "USER_TOKEN" in output and "flashsale up: stopped" in output
        assert not [p for p in passwords if p in output]
        deadline = time.monotonic() + 10
        while any(_alive(c) for c in children) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [c for c in children if _alive(c)], "a child outlived `flashsale up`"
        assert not (tmp_path / "data" / "servers.json").exists()
        assert _mode(tmp_path) == 0o700, "starting the servers changed the parent's mode"
    finally:
        _end(proc)
        EmbeddedPostgres(tmp_path / "data" / "postgres").remove_data()


def test_up_runs_the_api_under_the_server_flashsale_server_names(
    tmp_path: Path, redis_url: str, database_url: str
) -> None:
    """FLASHSALE_SERVER=granian: `flashsale up` (URLs set, so no embedded servers) serves
    the API under granian, and Ctrl-C stops it and the persister."""
    flush(redis_url, False)
    dsn = asyncio.run(fresh_database(database_url))
    port = free_port()
    env = _env(
        tmp_path,
        FLASHSALE_REDIS_URL=redis_url,
        FLASHSALE_DATABASE_URL=dsn,
        FLASHSALE_SERVER="granian",
    )
    up = [*FLASHSALE, "up", "--port", str(port)]
    proc = subprocess.Popen(up, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, proc)
        ready = httpx.get(f"{url}/readyz", timeout=5)
        assert ready.status_code == 200, ready.text
        assert ready.headers["server"] == "granian"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) in (0, 130)
        output = proc.stdout.read().decode() if proc.stdout else ""
        assert "flashsale up: stopped" in output and "Traceback" not in output
    finally:
        _end(proc)
        asyncio.run(drop_database(database_url, dsn))


def test_up_refuses_an_unknown_server_before_starting_anything(tmp_path: Path) -> None:
    env = _env(tmp_path, FLASHSALE_SERVER="gunicorn")
    up = [*FLASHSALE, "up", "--port", str(free_port())]
    done = subprocess.run(up, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "flashsale up: FLASHSALE_SERVER must be one of uvicorn, granian" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "data" / "redis").exists()


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def _another_terminal_finds_the_servers_with_their_passwords(tmp_path: Path) -> list[str]:
    """servers.json (0600, in a 0700 dir) holds URLs with the generated passwords."""
    data = tmp_path / "data"
    passwords = []
    servers = json.loads((data / "servers.json").read_text())
    assert _mode(data) == 0o700 and _mode(data / "servers.json") == 0o600
    for name, key in (("redis", "redis_url"), ("postgres", "database_url")):
        assert _mode(data / name) == 0o700 and _mode(data / name / "password") == 0o600
        password = (data / name / "password").read_text().strip()
        assert len(password) >= 32 and urlsplit(servers[key]).password == password
        passwords.append(password)
    # No URL in the environment: `reconcile` connects to both through servers.json.
    done = subprocess.run(
        [*FLASHSALE, "reconcile"], capture_output=True, text=True, env=_env(tmp_path), timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 difference(s)" in done.stdout
    return passwords


def test_serve_with_two_workers_sums_their_metrics(tmp_path: Path, redis_url: str) -> None:
    """Under several workers /metrics counts every worker's requests (multiprocess mode)."""
    port = free_port()
    proc = subprocess.Popen(
        [*FLASHSALE, "serve", "--port", str(port), "--workers", "2"],
        env=_env(tmp_path, FLASHSALE_REDIS_URL=redis_url, FLASHSALE_AUTH_SECRET="s" * 40),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, proc)
        for _ in range(60):  # a new connection each: the kernel spreads them over workers
            assert httpx.get(f"{url}/v1/deals/d_nothing").status_code == 404
        text = httpx.get(f"{url}/metrics").text
        line = next(
            x
            for x in text.splitlines()
            if x.startswith("flashsale_http_requests_total{") and 'route="/v1/deals/{deal_id}"' in x
        )
        assert float(line.rsplit(" ", 1)[1]) == 60.0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


# -- one error model: errors carry their exit code, reported once in one line ---------


def _main_in(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, argv: list[str], **env: str) -> int:
    """``flashsale ARGV`` in this process, with only the given FLASHSALE_* variables."""
    for name in [k for k in os.environ if k.startswith("FLASHSALE_")]:
        monkeypatch.delenv(name)
    for name, value in _env(tmp_path, **env).items():
        if name.startswith("FLASHSALE_"):
            monkeypatch.setenv(name, value)
    return cli.main(argv)


def test_an_unreachable_database_is_exit_3_in_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    down = "postgresql://postgres@127.0.0.1:1/none"
    code = _main_in(monkeypatch, tmp_path, ["migrate"], FLASHSALE_DATABASE_URL=down)
    assert code == ExitCode.UNAVAILABLE == 3
    err = capsys.readouterr().err
    assert err.startswith("flashsale migrate: The database cannot be reached. (")
    assert len(err.splitlines()) == 1


def test_a_bad_setting_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["token", "--role", "user", "--sub", "u-1"]
    code = _main_in(monkeypatch, tmp_path, argv, FLASHSALE_PARTITIONS="many")
    assert code == ExitCode.USAGE == 2
    assert capsys.readouterr().err.startswith("flashsale token: FLASHSALE_PARTITIONS must be")


def test_a_bad_argument_is_argparses_usage_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["token", "--role", "user", "--sub", "u-1", "--ttl", "soon"]
    with pytest.raises(SystemExit) as exited:
        _main_in(monkeypatch, tmp_path, argv)
    assert exited.value.code == 2
    assert "argument --ttl: not a duration: 'soon'" in capsys.readouterr().err


def test_a_value_error_from_a_bug_is_not_turned_into_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Only settings and arguments are usage errors: a bug keeps its traceback."""

    def buggy(**options: object) -> int:
        raise ValueError("a bug")

    monkeypatch.setattr(keys, "rotate_command", buggy)
    with pytest.raises(ValueError, match="a bug"):
        _main_in(monkeypatch, tmp_path, ["keys", "rotate"])


def test_every_command_is_dispatched_by_its_parser_with_keyword_options() -> None:
    """Each subcommand names its handler; the handler takes exactly the command's options."""
    parser = cli._parser()
    commands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for name, sub in commands.items():
        if name == "verifier":  # handed to verifier/cli.py unparsed
            continue
        nested = [a for a in sub._actions if isinstance(a, argparse._SubParsersAction)]
        for parsed in [p for a in nested for p in a.choices.values()] or [sub]:
            handler = parsed.get_default("handler")
            assert callable(handler), name
            options = {a.dest for a in parsed._actions if a.dest not in ("help", "handler")}
            params = inspect.signature(handler).parameters
            assert set(params) == options, name
            assert all(p.kind is p.KEYWORD_ONLY for p in params.values()), name
