"""Rate limits at the door (API.md, "Rate limits"): refused before any other work.

A pure ASGI middleware, outside every route and the claim's fast path: a request over a
limit is answered ``429 rate_limited`` before its body is read, its route found or any
script run. Two limits (``engine/limits.py``), checked in one script call on one node
(one round trip on a cluster):

- per caller, on every authenticated route: the subject is the token's ``sub``. A request
  whose token does not verify is not counted here (its route answers 401 without
  touching Redis); the token check itself is the Authenticator's cached one.
- per client address, on every route but ``/healthz``, ``/readyz`` and ``/metrics``.

A request counts against both limits even when one of them refuses it (they are checked
together, so that the pair costs one round trip). A claim on one node is the exception
that keeps the rule: its limits ride in its own ``claim_voucher`` call (``CLAIM_LIMITS``),
which counts them before it reads anything else, so that the storm's hottest request
costs one script call, not two; a claim refused before its script runs (a merchant's
token, a malformed deal id) is counted by ``api/deals.py`` through ``enforce`` first.

If Redis cannot answer, the limits fail open: the request goes on (a claim then gets its
503 from the claim itself; routes served from PostgreSQL keep working), and
``flashsale_rate_limit_errors_total`` counts it. Limits protect Redis; refusing
everything while Redis is away would protect nothing.

The client address is the socket's peer, or, when the peer is a trusted proxy, the
right-most ``X-Forwarded-For`` entry that is not a trusted proxy. An entry that is not an
IP address stops the walk at the trusted hop that handed it over (the limit then falls
on that proxy's address: a garbled chain cannot mint fresh subjects). An IPv6 client is
limited by its /64, the block one subscriber gets.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Sequence
from functools import lru_cache

from starlette.types import ASGIApp, Receive, Scope, Send

from api.auth import Authenticator
from api.errors import send_error
from api.fastpath import claim_deal_id
from api.metrics import Metrics
from engine import limits
from engine.errors import RateLimited, Unauthenticated, Unavailable
from engine.limits import ADDRESS, CALLER, Charge, RateLimiter
from engine.settings import Settings
from engine.store import Store

log = logging.getLogger(__name__)

# Never limited per address: orchestrators and scrapers poll these.
UNLIMITED_PATHS = frozenset(("/healthz", "/readyz", "/metrics"))
# Routes anyone may call without a token (API.md, "Identity"); every other route is
# authenticated, so a route added later is limited per caller unless listed here.
PUBLIC_PATHS = frozenset(
    ("/v1/deals", "/.well-known/jwks.json", "/healthz", "/readyz", "/metrics", "/openapi.json")
)
_DEAL_PREFIX = "/v1/deals/"
_TILL_PREFIX = "/verifier"
# Where this middleware leaves a claim's limits for the claim's own script call (one node).
CLAIM_LIMITS = "flashsale.claim_limits"
# X-Forwarded-For entries read from the right, at most (a chain of proxies is short).
MAX_FORWARDED_HOPS = 16
IPV6_PREFIX = 64

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def is_public(method: str, path: str) -> bool:
    """Whether a request is to a public route (no per-caller limit)."""
    if method != "GET" and method != "HEAD":
        return False
    if path in PUBLIC_PATHS or path == _TILL_PREFIX or path.startswith(_TILL_PREFIX + "/"):
        return True
    # GET /v1/deals/{id}: one segment after the prefix.
    return path.startswith(_DEAL_PREFIX) and "/" not in path[len(_DEAL_PREFIX) :]


# The longest text an address can be: IPv6 with an embedded IPv4 and a zone id kept short.
MAX_ADDRESS_CHARS = 64


def _ip(text: str) -> Address | None:
    text = text.strip()
    # Longer is not an address; refused before the cache, so that it holds short keys only.
    return _parse_ip(text) if len(text) <= MAX_ADDRESS_CHARS else None


# Parsed addresses and their subjects, kept for the peers and proxies that come back on
# every request: 4,096 entries each, of at most 64 characters, whatever clients send.
@lru_cache(maxsize=4096)
def _parse_ip(text: str) -> Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


@lru_cache(maxsize=4096)
def subject(address: Address) -> str:
    """The limited subject for an address: IPv4 as is, IPv6 by its /64."""
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped
        if mapped is not None:
            return str(mapped)
        return str(ipaddress.IPv6Network((address, IPV6_PREFIX), strict=False))
    return str(address)


class ClientAddress:
    """The client's address for a request, through the trusted proxies only."""

    def __init__(self, trusted: Iterable[str]) -> None:
        self.trusted: tuple[Network, ...] = tuple(
            ipaddress.ip_network(t, strict=False) for t in trusted
        )
        self._is_trusted = lru_cache(maxsize=4096)(self._trusted)

    def _trusted(self, address: Address) -> bool:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.trusted)

    def of(self, peer: str, forwarded_for: list[str]) -> Address | None:
        """The client: ``peer`` (the socket's), or the chain's right-most untrusted hop.

        ``forwarded_for`` holds the ``X-Forwarded-For`` header values in the order
        received. ``None`` if the peer is not an IP address (a Unix socket).
        """
        current = _ip(peer)
        if current is None or not self.trusted or not self._is_trusted(current):
            return current
        hops = ",".join(forwarded_for).rsplit(",", MAX_FORWARDED_HOPS)[-MAX_FORWARDED_HOPS:]
        for entry in reversed(hops):
            if not entry.strip():
                continue  # "a, , b" or an empty header: nothing there
            nearer = _ip(entry)
            if nearer is None:
                # Debug only: whoever sends it must not be able to flood the log.
                log.debug("X-Forwarded-For entry %r is not an address", entry[:64])
                break
            current = nearer
            if not self._is_trusted(current):
                break
        return current


class RateLimit:
    """Pure ASGI middleware: 429 for requests over their caller's or address's limit."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.caller = (
            RateLimiter.per_second(CALLER, settings.rate_caller_per_s)
            if settings.rate_caller_per_s > 0
            else None
        )
        self.address = (
            RateLimiter.per_second(ADDRESS, settings.rate_address_per_s)
            if settings.rate_address_per_s > 0
            else None
        )
        self.clients = ClientAddress(settings.trusted_proxies)
        # On one node a claim counts its limits in its own script call (CLAIM_LIMITS).
        self.in_claims = not settings.redis_cluster

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (self.caller is None and self.address is None):
            await self.app(scope, receive, send)
            return
        svc = scope["app"].state.services
        charges = self.charges(svc.auth, scope)
        if charges and self.in_claims and claim_deal_id(scope) is not None:
            scope[CLAIM_LIMITS] = charges
            await self.app(scope, receive, send)
            return
        refused = await enforce(svc.store, svc.metrics, charges)
        if refused is None:
            await self.app(scope, receive, send)
        else:
            await send_error(send, refused)

    def charges(self, auth: Authenticator, scope: Scope) -> list[Charge]:
        """The limits this request counts against: its address's, its caller's."""
        charges: list[Charge] = []
        path: str = scope["path"]
        if self.address is not None and path not in UNLIMITED_PATHS:
            client = scope.get("client")
            address = self.clients.of(client[0], _forwarded_for(scope)) if client else None
            if address is not None:
                charges.append(Charge(self.address, subject(address)))
        if self.caller is not None and not is_public(scope["method"], path):
            caller_id = _caller_id(auth, scope)
            if caller_id is not None:
                charges.append(Charge(self.caller, caller_id))
        return charges


async def enforce(store: Store, metrics: Metrics, charges: Sequence[Charge]) -> RateLimited | None:
    """Count a request against ``charges``: its 429 if a limit refuses it (counted in
    ``/metrics``), else ``None``, also when Redis cannot answer (fail open, counted)."""
    try:
        refused = await limits.charge(store, charges)
    except Unavailable:
        metrics.rate_limit_errors.inc()
        return None
    if refused is not None:
        metrics.limited(refused)
    return refused


def _caller_id(auth: Authenticator, scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            try:
                return auth.caller(value.decode("latin-1")).id
            except Unauthenticated:
                return None
    return None


def _forwarded_for(scope: Scope) -> list[str]:
    return [v.decode("latin-1") for n, v in scope["headers"] if n == b"x-forwarded-for"]
