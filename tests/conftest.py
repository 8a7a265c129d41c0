"""Real servers for the suite: embedded ones on free ports unless URLs are given.

``FLASHSALE_TEST_REDIS_URL`` / ``FLASHSALE_TEST_DATABASE_URL`` point the suite at running
servers instead (e.g. the machine's Redis 7.0 for a compatibility pass). Tests that stop
or restart a server always start their own. Embedded servers require the password
generated into their data dir; their URLs carry it.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis

from engine.settings import Settings
from engine.store import Store
from flashsale.embedded import EmbeddedPostgres, EmbeddedRedis, EmbeddedRedisCluster


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis-compatible server for the session."""
    url = os.environ.get("FLASHSALE_TEST_REDIS_URL")
    if url:
        yield url
        return
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A local 3-primary Redis Cluster, started from the embedded binary."""
    cluster = EmbeddedRedisCluster(tmp_path_factory.mktemp("cluster")).start()
    try:
        yield cluster.url
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A PostgreSQL server for the session."""
    url = os.environ.get("FLASHSALE_TEST_DATABASE_URL")
    if url:
        yield url
        return
    server = EmbeddedPostgres(tmp_path_factory.mktemp("pg"), fast=True).start()
    try:
        yield server.url
    finally:
        server.remove_data()


@pytest.fixture(scope="session")
def migrated_database_url(database_url: str) -> str:
    """The session's PostgreSQL with the schema migrated (once)."""
    import asyncio

    from persister.schema import migrate

    asyncio.run(migrate(database_url))
    return database_url


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A Redis of this test's own, which the test may stop, kill and restart."""
    server = EmbeddedRedis(tmp_path / "own-redis").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_postgres(tmp_path: Path) -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL of this test's own, which the test may stop and start again."""
    server = EmbeddedPostgres(tmp_path / "own-pg", fast=True).start()
    try:
        yield server
    finally:
        server.remove_data()


def flush(url: str, cluster: bool) -> None:
    """Empty every keyspace (and script cache) a test may see."""
    if cluster:
        c = redis.RedisCluster.from_url(url)
        try:
            c.flushall(target_nodes=redis.RedisCluster.PRIMARIES)
        finally:
            c.close()
    else:
        r = redis.Redis.from_url(url)
        try:
            r.flushall()
        finally:
            r.close()


@pytest.fixture(params=["node", pytest.param("cluster", marks=pytest.mark.cluster)])
def topology(request: pytest.FixtureRequest) -> tuple[str, bool]:
    """Run a test on one Redis node and on the local Redis Cluster."""
    if request.param == "cluster":
        return request.getfixturevalue("cluster_url"), True
    return request.getfixturevalue("redis_url"), False


@pytest.fixture
def settings(topology: tuple[str, bool], tmp_path: Path) -> Settings:
    url, cluster = topology
    flush(url, cluster)
    return Settings(redis_url=url, redis_cluster=cluster, data_dir=tmp_path, partitions=16)


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[Store]:
    s = await Store.connect(settings)
    try:
        yield s
    finally:
        await s.close()
