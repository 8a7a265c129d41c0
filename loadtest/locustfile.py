"""Locust scenarios for any flashsale deployment: shoppers, merchants, a flash-sale race.

    locust -f loadtest/locustfile.py --headless --host http://127.0.0.1:8000 \\
        -u 3000 -r 500 -t 60s RaceUser
    locust -f loadtest/locustfile.py --headless --host http://127.0.0.1:8000 \\
        -u 500 -r 100 -t 120s ShopperUser MerchantUser

``FLASHSALE_AUTH_SECRET`` (or ``--auth-secret``) must be the API's HS256 secret: caller
tokens are minted up front, one distinct user per simulated shopper or racer.

Before the users start, the run creates its own deals through the API: a hot deal of
``--race-inventory`` vouchers that every ``RaceUser`` claims at once, and a handful of
deals around ``--center`` for the shoppers to discover (``--race-deal ID`` uses an existing
hot deal instead). When the run stops, the race is checked: no 5xx anywhere, every
voucher the racers were given is distinct and no more than the deal's inventory, the
deal's own count agrees, and the deal sold out if there were enough racers. A failed
check makes a headless run exit 1. Distributed runs (``--master``/``--worker``) work:
the master creates the deals and tells the workers, the workers report their counts.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from locust import FastHttpUser, between, events, task
from locust.env import Environment
from locust.runners import MasterRunner, WorkerRunner

from api.auth import mint
from loadtest.race import RaceCounts, race_verdict

log = logging.getLogger("flashsale.locust")

SHOPPER_DEALS = 20
SHOPPER_DEAL_INVENTORY = 100_000
SPREAD_DEG = 0.02  # deals and shoppers within about 2 km of the centre
TOKEN_TTL_S = 6 * 3600
# Distinct merchants the MerchantUsers take turns being (each is its own rate-limited caller).
MERCHANTS = 1000
MSG_DEALS = "flashsale_deals"


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    group = parser.add_argument_group("flashsale")
    group.add_argument(
        "--auth-secret",
        env_var="FLASHSALE_AUTH_SECRET",
        default="",
        help="the API's HS256 secret (FLASHSALE_AUTH_SECRET)",
    )
    group.add_argument(
        "--race-inventory",
        type=int,
        default=2000,
        env_var="LOCUST_RACE_INVENTORY",
        help="vouchers in the hot deal the racers fight over",
    )
    group.add_argument(
        "--race-deal",
        default="",
        env_var="LOCUST_RACE_DEAL",
        help="race on this existing deal instead of creating one",
    )
    group.add_argument(
        "--tokens",
        type=int,
        default=10_000,
        env_var="LOCUST_TOKENS",
        help="distinct users to mint tokens for (per process)",
    )
    group.add_argument(
        "--center",
        default="12.9716,77.5946",
        env_var="LOCUST_CENTER",
        help="lat,lng the shoppers stand around",
    )


@dataclass
class Plan:
    """The run's shared state: tokens, the deals, the race's counts."""

    race_deal: str = ""
    shopper_deals: list[str] = field(default_factory=list)
    center: tuple[float, float] = (12.9716, 77.5946)
    user_tokens: list[str] = field(default_factory=list)
    merchant_token: str = ""
    # One merchant per simulated merchant: each is its own caller for the rate limits.
    merchant_tokens: list[str] = field(default_factory=list)
    next_user: Any = field(default_factory=itertools.count)
    next_merchant: Any = field(default_factory=itertools.count)
    counts: RaceCounts = field(default_factory=RaceCounts)

    def user_token(self) -> str:
        return self.user_tokens[next(self.next_user) % len(self.user_tokens)]


PLAN = Plan()


def _iso(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def deal_body(title: str, lat: float, lng: float, inventory: int) -> dict[str, Any]:
    """A create-deal body for a deal active now, for the next six hours."""
    now = datetime.now(UTC)
    return {
        "title": title,
        "lat": lat,
        "lng": lng,
        "inventory": inventory,
        "starts_at": _iso(now - timedelta(minutes=1)),
        "ends_at": _iso(now + timedelta(hours=6)),
    }


def _call(host: str, method: str, path: str, token: str = "", body: Any = None) -> Any:
    """One set-up or check request (outside locust's statistics)."""
    req = urllib.request.Request(
        host.rstrip("/") + path, method=method, data=None if body is None else orjson.dumps(body)
    )
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return orjson.loads(resp.read())


def _mint_tokens(opts: Any) -> None:
    if not opts.auth_secret:
        raise SystemExit("flashsale locustfile: set FLASHSALE_AUTH_SECRET (or --auth-secret)")
    # Distinct across processes of a distributed run, and across runs on one deployment.
    prefix = f"lt-{os.getpid():x}{int(time.time()) % 100_000:x}"
    PLAN.user_tokens = [
        mint(opts.auth_secret, f"{prefix}-{i}", "user", TOKEN_TTL_S)
        for i in range(max(1, opts.tokens))
    ]
    PLAN.merchant_token = mint(opts.auth_secret, f"{prefix}-m", "merchant", TOKEN_TTL_S)
    PLAN.merchant_tokens = [
        mint(opts.auth_secret, f"{prefix}-m{i}", "merchant", TOKEN_TTL_S) for i in range(MERCHANTS)
    ]


def _create_deals(host: str, opts: Any) -> None:
    lat, lng = (float(x) for x in opts.center.split(","))
    PLAN.center = (lat, lng)
    if opts.race_deal:
        PLAN.race_deal = opts.race_deal
    else:
        body = deal_body("locust race", lat, lng, opts.race_inventory)
        PLAN.race_deal = _call(host, "POST", "/v1/deals", PLAN.merchant_token, body)["deal"]["id"]
    rng = random.Random(7)
    # Each shop its own merchant: one merchant creating them all would meet its rate limit.
    shops = PLAN.merchant_tokens or [PLAN.merchant_token]
    PLAN.shopper_deals = [
        _call(
            host,
            "POST",
            "/v1/deals",
            shops[i % len(shops)],
            deal_body(
                f"locust shop {i}",
                lat + rng.uniform(-SPREAD_DEG, SPREAD_DEG),
                lng + rng.uniform(-SPREAD_DEG, SPREAD_DEG),
                SHOPPER_DEAL_INVENTORY,
            ),
        )["deal"]["id"]
        for i in range(SHOPPER_DEALS)
    ]
    log.info("race deal %s, %d shopper deals", PLAN.race_deal, len(PLAN.shopper_deals))


@events.init.add_listener
def _on_init(environment: Environment, **_kw: Any) -> None:
    runner = environment.runner
    if isinstance(runner, WorkerRunner):

        def receive_deals(msg: Any, **_kw: Any) -> None:
            PLAN.race_deal = msg.data["race_deal"]
            PLAN.shopper_deals = msg.data["shopper_deals"]
            PLAN.center = tuple(msg.data["center"])

        runner.register_message(MSG_DEALS, receive_deals)
    if not isinstance(runner, MasterRunner) and environment.parsed_options is not None:
        _mint_tokens(environment.parsed_options)
    elif environment.parsed_options is not None:
        opts = environment.parsed_options
        PLAN.merchant_token = mint(opts.auth_secret, "lt-master", "merchant", TOKEN_TTL_S)


@events.test_start.add_listener
def _on_test_start(environment: Environment, **_kw: Any) -> None:
    runner = environment.runner
    if isinstance(runner, WorkerRunner) or PLAN.race_deal:
        return
    opts = environment.parsed_options
    _create_deals(environment.host or "", opts)
    if isinstance(runner, MasterRunner):
        runner.send_message(
            MSG_DEALS,
            {
                "race_deal": PLAN.race_deal,
                "shopper_deals": PLAN.shopper_deals,
                "center": list(PLAN.center),
            },
        )


@events.report_to_master.add_listener
def _report(client_id: str, data: dict[str, Any]) -> None:
    data["flashsale_race"] = PLAN.counts.as_message()
    PLAN.counts = RaceCounts()


@events.worker_report.add_listener
def _collect(client_id: str, data: dict[str, Any]) -> None:
    PLAN.counts.merge(data.get("flashsale_race", {}))


@events.quitting.add_listener
def _check_race(environment: Environment, **_kw: Any) -> None:
    if isinstance(environment.runner, WorkerRunner):
        return
    counts = PLAN.counts
    racers = counts.statuses
    if not PLAN.race_deal or not racers:
        if counts.server_errors:
            log.error("flashsale check FAILED: %d responses were 5xx", counts.server_errors)
            environment.process_exit_code = 1
        return
    try:
        deal = _call(environment.host or "", "GET", f"/v1/deals/{PLAN.race_deal}")["deal"]
    except (OSError, ValueError, KeyError) as exc:  # HTTPError (404...) is an OSError
        log.error("flashsale race check FAILED: cannot read deal %s: %s", PLAN.race_deal, exc)
        environment.process_exit_code = 1
        return
    problems = race_verdict(counts, deal, fresh=not environment.parsed_options.race_deal)
    summary = (
        f"race on {PLAN.race_deal}: inventory {deal['inventory_total']}, "
        f"{len(PLAN.counts.new_vouchers)} vouchers issued, {deal['inventory_left']} left, "
        f"answers by status {dict(sorted(racers.items()))}"
    )
    if problems:
        log.error("flashsale race check FAILED: %s; %s", summary, "; ".join(problems))
        environment.process_exit_code = 1
    else:
        log.info("flashsale race check ok: %s", summary)


class _Caller(FastHttpUser):
    abstract = True
    network_timeout = 30.0
    connection_timeout = 10.0

    def on_start(self) -> None:
        self.token = PLAN.user_token()
        self.headers = {"Authorization": f"Bearer {self.token}"}


class RaceUser(_Caller):
    """Thousands of these hit one hot deal at once; each is a distinct user."""

    def on_start(self) -> None:
        super().on_start()
        self.voucher: str | None = None
        self.decided = False

    def wait_time(self) -> float:
        # Decided (a voucher or sold out): this racer is done, as a real shopper would be.
        return 3600.0 if self.decided else 0.5

    @task
    def claim(self) -> None:
        if not PLAN.race_deal:
            return
        with self.client.post(
            f"/v1/deals/{PLAN.race_deal}/claims",
            headers=self.headers,
            name="race: claim",
            catch_response=True,
        ) as resp:
            status = resp.status_code
            counts = PLAN.counts
            counts.statuses[str(status)] = counts.statuses.get(str(status), 0) + 1
            if status in (200, 201):
                voucher = resp.json()["voucher"]["id"]
                if status == 201:
                    counts.new_vouchers.add(voucher)
                elif self.voucher is not None and voucher != self.voucher:
                    counts.mismatched_retries += 1
                self.voucher = voucher
                resp.success()
            elif status == 409:
                resp.success()  # sold out: the expected answer for most racers
            else:
                resp.failure(f"{status}")
        if self.voucher is not None:
            self.client.get(
                f"/v1/vouchers/{self.voucher}", headers=self.headers, name="race: my voucher"
            )
        self.decided = status in (200, 201, 409)


class ShopperUser(_Caller):
    """Finds deals nearby, claims one, looks at the voucher and its QR code."""

    wait_time = between(0.5, 2.0)

    def _point(self) -> tuple[float, float]:
        lat, lng = PLAN.center
        return lat + random.uniform(-SPREAD_DEG, SPREAD_DEG), lng + random.uniform(
            -SPREAD_DEG, SPREAD_DEG
        )

    @task(5)
    def discover(self) -> None:
        lat, lng = self._point()
        self.client.get(
            f"/v1/deals?lat={lat:.5f}&lng={lng:.5f}&radius_km=5&limit=20", name="shop: discover"
        )

    @task(2)
    def discover_and_claim(self) -> None:
        lat, lng = self._point()
        resp = self.client.get(
            f"/v1/deals?lat={lat:.5f}&lng={lng:.5f}&radius_km=5", name="shop: discover"
        )
        deals = resp.json().get("deals", []) if resp.status_code == 200 else []
        # The race's deal is the racers' alone: its check counts every voucher it issued.
        deals = [d for d in deals if d["id"] != PLAN.race_deal]
        deal_id = random.choice(deals)["id"] if deals else None
        if deal_id is None and PLAN.shopper_deals:
            deal_id = random.choice(PLAN.shopper_deals)
        if deal_id is None:
            return
        with self.client.post(
            f"/v1/deals/{deal_id}/claims",
            headers=self.headers,
            name="shop: claim",
            catch_response=True,
        ) as claim:
            if claim.status_code in (200, 201):
                voucher = claim.json()["voucher"]
                claim.success()
            elif claim.status_code == 409:
                claim.success()  # sold out or ended meanwhile: a normal answer
                return
            else:
                claim.failure(f"{claim.status_code}")
                return
        self.client.get(f"/v1/vouchers/{voucher['id']}", headers=self.headers, name="shop: voucher")
        self.client.get(voucher["qr_url"], headers=self.headers, name="shop: voucher qr")

    @task(1)
    def read_deal(self) -> None:
        if PLAN.shopper_deals:
            self.client.get(
                f"/v1/deals/{random.choice(PLAN.shopper_deals)}", name="shop: read deal"
            )


class MerchantUser(_Caller):
    """Publishes small deals near the shoppers and reads them back."""

    wait_time = between(2.0, 5.0)
    weight = 1

    def on_start(self) -> None:
        tokens = PLAN.merchant_tokens or [PLAN.merchant_token]
        token = tokens[next(PLAN.next_merchant) % len(tokens)]
        self.headers = {"Authorization": f"Bearer {token}"}

    @task
    def create_deal(self) -> None:
        lat, lng = PLAN.center
        body = deal_body(
            "locust merchant deal",
            lat + random.uniform(-SPREAD_DEG, SPREAD_DEG),
            lng + random.uniform(-SPREAD_DEG, SPREAD_DEG),
            50,
        )
        resp = self.client.post(
            "/v1/deals",
            data=orjson.dumps(body),
            headers={**self.headers, "Content-Type": "application/json"},
            name="merchant: create deal",
        )
        if resp.status_code == 201:
            deal_id = resp.json()["deal"]["id"]
            self.client.get(f"/v1/deals/{deal_id}", name="merchant: read deal")


@events.request.add_listener
def _on_request(response: Any = None, **_kw: Any) -> None:
    if response is not None and int(getattr(response, "status_code", 0) or 0) >= 500:
        PLAN.counts.server_errors += 1
