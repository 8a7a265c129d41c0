"""Prometheus metrics: requests by route and status, latencies, claim outcomes, lag,
discovery's work and cache bytes.

Under several uvicorn workers set ``PROMETHEUS_MULTIPROC_DIR`` (``flashsale serve`` does)
and every worker's numbers are summed on scrape.
"""

from __future__ import annotations

import time
from dataclasses import fields
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as prom_multiprocess

from engine.discovery import Discovery, Work
from engine.errors import RateLimited

_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# The kinds of flashsale_discovery_work_total: every counter of engine.discovery.Work.
DISCOVERY_WORK_KINDS = tuple(f.name for f in fields(Work))
# Under several workers a scrape reaches one of them: each worker copies discovery's
# counts into the shared metric files this often (api/discovery.py), and when it stops.
DISCOVERY_EXPORT_INTERVAL_S = 1.0


class Metrics:
    """The API's metric families, registered once per process."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, multiprocess: bool = False) -> None:
        self.multiprocess = multiprocess
        # Our own registry: several apps in one process (tests) must not collide.
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "flashsale_http_requests_total",
            "HTTP requests by route template, method and status.",
            ("route", "method", "status"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "flashsale_http_request_duration_seconds",
            "HTTP request latency by route template.",
            ("route",),
            buckets=_LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.claims = Counter(
            "flashsale_claims_total",
            "Claim outcomes (claimed, already, sold_out, ended, ...).",
            ("outcome",),
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "flashsale_rate_limited_total",
            "Requests refused with 429 by a rate limit, by kind (caller, address).",
            ("kind",),
            registry=self.registry,
        )
        self.rate_limit_errors = Counter(
            "flashsale_rate_limit_errors_total",
            "Requests whose rate limits Redis could not check (they went on: fail open).",
            registry=self.registry,
        )
        self.stream_lag = Gauge(
            "flashsale_stream_lag",
            "Stream entries not yet persisted, summed over partitions (read at scrape).",
            registry=self.registry,
            multiprocess_mode="max",
        )
        self.dead_letters = Gauge(
            "flashsale_dead_letters",
            "Entries in the persister's dead-letter table (read at scrape).",
            registry=self.registry,
            multiprocess_mode="max",
        )
        self.deals_archived = Gauge(
            "flashsale_deals_archived",
            "Deals archived: left Redis, kept in PostgreSQL (read at scrape).",
            registry=self.registry,
            multiprocess_mode="max",
        )
        self.deals_due = Gauge(
            "flashsale_deals_due",
            "Deals past their archive time still in Redis (read at scrape): a number that "
            "keeps growing means no archiver runs, or deals wait for the persister.",
            registry=self.registry,
            multiprocess_mode="max",
        )
        # Discovery counts its work in plain integers (engine/ knows nothing of Prometheus);
        # discovery_seen() adds what they gained since it last looked.
        self.discovery_work = Counter(
            "flashsale_discovery_work_total",
            "What discovery asked of Redis, by kind (the fields of engine.discovery.Work).",
            ("kind",),
            registry=self.registry,
        )
        # Each process has its own caches, each bounded by its setting: the largest
        # process's says whether a bound is reached (a sum has no bound to hold it against).
        self.discovery_cache_bytes = Gauge(
            "flashsale_discovery_cache_bytes",
            "Bytes held by discovery's cache of candidates (bound: discovery_cache_bytes), "
            "in the API process that holds most.",
            registry=self.registry,
            multiprocess_mode="max",
        )
        self.discovery_fixed_bytes = Gauge(
            "flashsale_discovery_fixed_bytes",
            "Bytes held by discovery's deals' fixed fields (bound: discovery_fixed_bytes), "
            "in the API process that holds most.",
            registry=self.registry,
            multiprocess_mode="max",
        )

        self._claim_children: dict[str, Any] = {}
        self._work_children = {k: self.discovery_work.labels(k) for k in DISCOVERY_WORK_KINDS}
        self._work_of: Discovery | None = None
        self._work_seen = dict.fromkeys(DISCOVERY_WORK_KINDS, 0)

    def claimed(self, outcome: str) -> None:
        """Count one claim outcome (children cached: this is on the claim path)."""
        child = self._claim_children.get(outcome)
        if child is None:
            child = self._claim_children[outcome] = self.claims.labels(outcome)
        child.inc()

    def limited(self, refused: RateLimited) -> None:
        """Count one request refused by a rate limit, by the limit's kind."""
        self.rate_limited.labels(refused.details["limit"]).inc()

    def discovery_seen(self, discovery: Discovery) -> None:
        """Bring the discovery metrics up to ``discovery``'s own counts and cache sizes."""
        if discovery is not self._work_of:  # a new Discovery counts from 0
            self._work_of = discovery
            self._work_seen = dict.fromkeys(DISCOVERY_WORK_KINDS, 0)
        work, seen = discovery.work, self._work_seen
        for kind, child in self._work_children.items():
            now = getattr(work, kind)
            if now != seen[kind]:
                child.inc(now - seen[kind])
                seen[kind] = now
        self.discovery_cache_bytes.set(discovery.cache_used_bytes)
        self.discovery_fixed_bytes.set(discovery.fixed_used_bytes)

    def render(self) -> bytes:
        if self.multiprocess:
            registry = CollectorRegistry()
            prom_multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI middleware: counts every HTTP request by its route template."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        # labels() takes a lock and builds a key on every call: keep the children.
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def _child(self, template: str, method: str, status: int) -> tuple[Any, Any]:
        key = (template, method, status)
        child = self._children.get(key)
        if child is None:
            m = self.metrics
            child = (m.requests.labels(template, method, str(status)), m.latency.labels(template))
            self._children[key] = child
        return child

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            requests, latency = self._child(template, scope["method"], status)
            requests.inc()
            latency.observe(time.perf_counter() - started)
