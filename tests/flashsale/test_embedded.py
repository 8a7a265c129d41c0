"""The embedded servers are closed to other local users: passwords, private files, no chmod."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from engine.settings import Settings
from flashsale import wiring
from flashsale.embedded import EmbeddedPostgres, EmbeddedRedis


@dataclass
class Servers:
    data_dir: Path
    redis: EmbeddedRedis
    postgres: EmbeddedPostgres
    modes_before: dict[Path, int]


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def _redis(port: int, password: str | None) -> redis.Redis:
    """A plain RESP2 client that gives up at once (AuthenticationError is retryable)."""
    return redis.Redis(port=port, password=password, protocol=2, retry=Retry(NoBackoff(), 0))


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    """Valkey and PostgreSQL started in a data dir whose parent is as closed as /root."""
    parent = tmp_path_factory.mktemp("home")
    parent.chmod(0o700)
    data_dir = parent / "data"
    # Higher up (/tmp/pytest-of-root) is shared with other suites running on the machine.
    modes_before = {p: _mode(p) for p in (parent, parent.parent)}
    redis_server = EmbeddedRedis(data_dir / "redis").start()
    try:
        pg = EmbeddedPostgres(data_dir / "postgres", fast=True).start()
        try:
            settings = Settings(redis_url=redis_server.url, database_url=pg.url, data_dir=data_dir)
            wiring.write_servers(settings)
            yield Servers(data_dir, redis_server, pg, modes_before)
        finally:
            pg.remove_data()
    finally:
        redis_server.stop()


@pytest.fixture
def no_pg_password_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """asyncpg would take a password from PGPASSWORD or ~/.pgpass: none here."""
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "no-pgpass"))


def test_valkey_refuses_a_client_without_the_password_and_serves_one_with_it(
    servers: Servers,
) -> None:
    port = servers.redis.port
    for password in (None, "not-the-password"):
        client = _redis(port, password)
        with pytest.raises(redis.AuthenticationError):
            client.ping()
        client.close()
    client = redis.Redis.from_url(servers.redis.url)
    try:
        assert client.set("k", "v") and client.get("k") == b"v"
    finally:
        client.close()


async def test_postgres_refuses_a_client_without_the_password_and_serves_one_with_it(
    servers: Servers, no_pg_password_from_env: None
) -> None:
    port = servers.postgres.port
    for password in (None, "not-the-password"):
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(
                host="127.0.0.1", port=port, user="postgres", password=password, timeout=10
            )
    conn = await asyncpg.connect(servers.postgres.url, timeout=10)
    try:
        assert await conn.fetchval("SELECT current_user") == "postgres"
    finally:
        await conn.close()


def test_postgres_asks_every_connection_local_or_host_for_a_scram_password(
    servers: Servers,
) -> None:
    hba = (servers.postgres.pgdata / "pg_hba.conf").read_text().splitlines()
    rules = [line.split() for line in hba if line.strip() and not line.lstrip().startswith("#")]
    assert {rule[0] for rule in rules} >= {"local", "host"}
    assert all(rule[-1] == "scram-sha-256" for rule in rules), rules


def test_credentials_and_servers_json_are_0600_in_0700_directories(servers: Servers) -> None:
    data = servers.data_dir
    private = [data / "redis" / "password", data / "redis" / "valkey.conf"]
    private += [data / "postgres" / "password", data / wiring.SERVERS_FILE]
    assert {f.name: _mode(f) for f in private} == {f.name: 0o600 for f in private}
    dirs = [data, data / "redis", data / "postgres"]
    assert {str(d): _mode(d) for d in dirs} == {str(d): 0o700 for d in dirs}
    # The URLs that other commands read from servers.json carry those passwords.
    recorded = wiring.resolve(Settings(data_dir=data))
    assert urlsplit(recorded.redis_url).password == servers.redis.password
    assert urlsplit(recorded.database_url).password == servers.postgres.password


def test_starting_the_servers_leaves_the_directories_above_the_data_dir_as_they_were(
    servers: Servers,
) -> None:
    assert {p: _mode(p) for p in servers.modes_before} == servers.modes_before


def test_no_password_appears_on_a_server_command_line(servers: Servers) -> None:
    for server in (servers.redis, servers.postgres):
        assert server.proc is not None
        cmdline = Path(f"/proc/{server.proc.pid}/cmdline").read_bytes()
        assert server.password.encode() not in cmdline


@pytest.mark.skipif(os.geteuid() != 0, reason="as another user PostgreSQL runs as that user")
def test_as_root_postgres_runs_as_its_own_user_in_a_directory_only_it_enters(
    servers: Servers,
) -> None:
    assert servers.postgres.proc is not None
    status = Path(f"/proc/{servers.postgres.proc.pid}/status").read_text()
    uid = int(next(x for x in status.splitlines() if x.startswith("Uid:")).split()[1])
    assert uid != 0
    cluster = servers.postgres.pgdata.resolve()
    assert not cluster.is_relative_to(servers.data_dir)
    for path in (cluster, *cluster.parents[:2]):  # the cluster, clusters/, /var/lib/flashsale-pg
        assert (path.stat().st_uid, _mode(path)) == (uid, 0o700), path


@pytest.mark.cluster
def test_every_cluster_node_requires_the_password(cluster_url: str) -> None:
    password = urlsplit(cluster_url).password
    assert password
    client = redis.RedisCluster.from_url(cluster_url)
    try:
        # A node may be listed under two names (the URL's and the cluster's): by port.
        ports = sorted({node.port for node in client.get_primaries()})
    finally:
        client.close()
    assert len(ports) == 3, ports
    for port in ports:
        anonymous = _redis(port, None)
        with pytest.raises(redis.AuthenticationError):
            anonymous.ping()
        anonymous.close()
        member = redis.Redis(host="127.0.0.1", port=port, password=password)
        try:
            # masterauth too: a replica added later would authenticate to its primary.
            assert member.config_get("masterauth") == {"masterauth": password}
        finally:
            member.close()


def test_a_postgres_cluster_from_before_passwords_is_refused(tmp_path: Path) -> None:
    """A cluster that trusts connections (an older flashsale's) is refused, not served."""
    pg = EmbeddedPostgres(tmp_path / "postgres", fast=True).start()
    try:
        pg.stop()
        hba = pg.pgdata / "pg_hba.conf"
        hba.write_text("host all all 127.0.0.1/32 trust\n" + hba.read_text())
        with pytest.raises(RuntimeError, match="older flashsale"):
            pg.start()
        assert not pg.running
    finally:
        pg.remove_data()
