"""Settings: one frozen object built once from the ``FLASHSALE_*`` environment."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from engine.errors import ExitCode

Durability = Literal["redis", "aof"]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class SettingsError(ValueError):
    """A ``FLASHSALE_*`` variable holds a value that cannot be used."""

    exit_code = ExitCode.USAGE


def parse_duration_s(text: str) -> float:
    """Parse ``90``, ``90s``, ``15m``, ``1h`` or ``7d`` into seconds."""
    match = _DURATION.match(text)
    if not match:
        raise SettingsError(f"not a duration: {text!r} (use e.g. 90s, 15m, 1h)")
    return float(match.group(1)) * _UNIT_S[match.group(2) or "s"]


def _flag(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def _int(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise SettingsError(f"{name} must be in {low}..{high}, got {value}")
    return value


def parse_networks(text: str) -> tuple[str, ...]:
    """Comma-separated addresses or CIDRs (``10.0.0.1, 10.1.0.0/16, fd00::/8``), canonical."""
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            out.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise SettingsError(
                f"FLASHSALE_TRUSTED_PROXIES: {item!r} is not an IP address or CIDR"
            ) from None
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything tunable, with its unit in its name. Build with :meth:`from_env`."""

    redis_url: str | None = None
    redis_cluster: bool = False
    database_url: str | None = None
    auth_secret: str | None = None
    data_dir: Path = field(default_factory=lambda: Path(".flashsale"))
    keys_dir: Path | None = None
    # How long `flashsale keys rotate` publishes a new voucher key before it signs, so
    # that every till that refreshes its keys within this time holds it (API.md).
    key_prepublish_s: float = 86_400.0
    # Partitions own one hash tag each; a deal lives in the partition its id hashes to.
    # Changing this on a live dataset moves deals to other keys: pick it once.
    partitions: int = 16
    # Entries a partition stream may hold before claims are refused (503) rather than
    # memory exhausted while PostgreSQL is away.
    stream_cap: int = 1_000_000
    stream_retention_s: float = 3600.0
    durability: Durability = "redis"
    waitaof_timeout_ms: int = 500
    redis_timeout_s: float = 1.0
    redis_max_connections: int = 512  # per process (a node; a cluster pools per node)
    discovery_cache_s: float = 30.0
    discovery_cell_deg: float = 0.01
    # Ended deals nobody looked at are swept from the geo indexes this often (one process
    # per partition per interval, by lease), each process's wait stretched by up to this
    # fraction so that processes spread apart.
    discovery_sweep_interval_s: float = 60.0
    discovery_sweep_jitter: float = 0.2
    # Discovery's bounds per request (engine/discovery.py adds them up). A search of one
    # partition's geo index returns at most this many members (the nearest) the first
    # time, and this many when a crowded cell is searched again or from the caller:
    discovery_first_count_members: int = 64
    discovery_wide_count_members: int = 256
    # ...and runs only at a radius whose geohash boxes hold at most this many members
    # (GEOSEARCH reads every member of its boxes, whatever COUNT says; ~0.26 us each).
    discovery_scan_budget_members: int = 1024
    # Deal hashes one request reads for live state, at most.
    discovery_read_budget_deals: int = 512
    # Memory of each API process's discovery caches (candidate lists; deals' fixed fields).
    discovery_cache_bytes: int = 32 * 1024 * 1024
    discovery_fixed_bytes: int = 32 * 1024 * 1024
    # Scheduled deals whose start has come enter the geo indexes (and ended ones leave)
    # at every search, and at least this often in each API process.
    discovery_advance_interval_s: float = 1.0
    token_cache_size: int = 100_000
    # How far a till's clock may drift, either way, before a synced redemption time is
    # implausible: later than Redis's now + this, or earlier than the claim - this.
    # API.md fixes it at 5 minutes.
    device_clock_drift_ms: int = 5 * 60_000
    # prometheus-client's own variable: where each worker process writes its metrics.
    metrics_multiproc_dir: str | None = None
    # The persister (persister/worker.py). A consumer name must be unique and stable
    # across restarts (e.g. the pod name); unset, a free slot ``<host>-<n>`` is leased.
    persister_name: str | None = None
    persister_batch: int = 2000  # entries read per stream per round
    persister_block_ms: int = 200  # XREADGROUP BLOCK; below redis_timeout_s
    persister_claim_idle_s: float = 30.0  # reclaim others' entries idle this long
    persister_max_attempts: int = 3  # a failing entry is dead-lettered after these
    persister_max_deliveries: int = 10  # ...or after being delivered this often (crash loops)
    persister_backoff_base_s: float = 0.05  # first retry while PostgreSQL or Redis is away
    persister_backoff_max_s: float = 5.0  # retry ceiling while PostgreSQL is away
    persister_trim_interval_s: float = 1.0
    persister_reclaim_interval_s: float = 5.0  # how often others' idle entries are sought
    # A leased consumer name (persister_name unset) lapses this long after its holder
    # stops renewing it; it is renewed every persister_lease_renew_s.
    persister_lease_ttl_ms: int = 15_000
    persister_lease_renew_s: float = 5.0
    # SIGTERM: the round in progress gets this long to finish, then it is abandoned (its
    # entries stay pending for the next start).
    persister_stop_grace_s: float = 8.0
    # Near the cap, acknowledged entries are trimmed even inside the retention, so that
    # claims are not refused just to keep replay history.
    stream_trim_fraction: float = 0.5
    # Rate limits (API.md, "Rate limits"): requests a second, bursts of twice that; 0 is
    # off. Per caller (the token's sub) on authenticated routes; per client address on
    # every route but health and metrics, the address read through these proxies'
    # X-Forwarded-For (addresses or CIDRs, canonical text).
    rate_caller_per_s: int = 10
    rate_address_per_s: int = 0
    trusted_proxies: tuple[str, ...] = ()
    # A request body not received in full this long after the request's head is 408
    # (API.md says 10 seconds; FLASHSALE_BODY_TIMEOUT, for a deployment that must differ).
    body_timeout_s: float = 10.0
    # Lifecycle (docs/lifecycle.md): a deal leaves Redis once redeem_until + this has passed
    # and PostgreSQL holds all of it. Stamped on each deal when it is created (its archive
    # time and its keys' deadline), so a change applies to deals created afterwards.
    archive_grace_s: float = 14 * 86_400.0
    archive_interval_s: float = 60.0  # how often a persister looks for due deals
    archive_batch: int = 500  # due deals checked per partition and step
    # The share of wall time an archive pass may work: after each chunk it rests for the
    # rest, so that it runs beside the claim race without taking its CPU (docs/lifecycle.md).
    archive_work_fraction: float = 0.2

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read the ``FLASHSALE_*`` variables (``os.environ`` by default)."""
        env = os.environ if env is None else env
        durability = (env.get("FLASHSALE_DURABILITY") or "redis").strip().lower()
        if durability not in ("redis", "aof"):
            raise SettingsError(
                f"FLASHSALE_DURABILITY must be 'redis' or 'aof', got {durability!r}"
            )
        retention = env.get("FLASHSALE_STREAM_RETENTION")
        body_timeout = env.get("FLASHSALE_BODY_TIMEOUT")
        grace = env.get("FLASHSALE_ARCHIVE_GRACE")
        archive_every = env.get("FLASHSALE_ARCHIVE_INTERVAL")
        keys_dir = env.get("FLASHSALE_KEYS_DIR")
        prepublish = env.get("FLASHSALE_KEY_PREPUBLISH")
        return cls(
            metrics_multiproc_dir=env.get("PROMETHEUS_MULTIPROC_DIR") or None,
            redis_url=env.get("FLASHSALE_REDIS_URL") or None,
            redis_cluster=_flag(env.get("FLASHSALE_REDIS_CLUSTER")),
            database_url=env.get("FLASHSALE_DATABASE_URL") or None,
            auth_secret=env.get("FLASHSALE_AUTH_SECRET") or None,
            data_dir=Path(env.get("FLASHSALE_DATA_DIR") or ".flashsale"),
            keys_dir=Path(keys_dir) if keys_dir else None,
            key_prepublish_s=parse_duration_s(prepublish) if prepublish else 86_400.0,
            partitions=_int(env, "FLASHSALE_PARTITIONS", 16, 1, 1024),
            stream_cap=_int(env, "FLASHSALE_STREAM_CAP", 1_000_000, 1, 1_000_000_000),
            stream_retention_s=parse_duration_s(retention) if retention else 3600.0,
            durability=durability,  # type: ignore[arg-type]
            waitaof_timeout_ms=_int(env, "FLASHSALE_WAITAOF_TIMEOUT_MS", 500, 1, 60_000),
            persister_name=env.get("FLASHSALE_PERSISTER_NAME") or None,
            persister_batch=_int(env, "FLASHSALE_PERSISTER_BATCH", 2000, 1, 100_000),
            persister_claim_idle_s=float(
                _int(env, "FLASHSALE_PERSISTER_CLAIM_IDLE_S", 30, 1, 86_400)
            ),
            rate_caller_per_s=_int(env, "FLASHSALE_RATE_CALLER", 10, 0, 1_000_000),
            rate_address_per_s=_int(env, "FLASHSALE_RATE_ADDRESS", 0, 0, 1_000_000),
            trusted_proxies=parse_networks(env.get("FLASHSALE_TRUSTED_PROXIES") or ""),
            body_timeout_s=parse_duration_s(body_timeout) if body_timeout else 10.0,
            archive_grace_s=parse_duration_s(grace) if grace else 14 * 86_400.0,
            archive_interval_s=parse_duration_s(archive_every) if archive_every else 60.0,
        )

    @property
    def signing_keys_dir(self) -> Path:
        """Where voucher signing keys live (``FLASHSALE_KEYS_DIR`` or ``DATA_DIR/keys``)."""
        return self.keys_dir if self.keys_dir is not None else self.data_dir / "keys"

    def with_(self, **changes: object) -> Settings:
        """A copy with some fields changed (used when wiring embedded servers)."""
        return replace(self, **changes)  # type: ignore[arg-type]
