"""Sample deals and ready-to-paste commands for ``flashsale up --demo``."""

from __future__ import annotations

from api.auth import mint
from engine.deals import NewDeal, create_deal
from engine.settings import Settings
from engine.store import Store
from engine.times import MS_PER_DAY, now_ms

_CENTER = (12.9716, 77.5946)  # Bengaluru, MG Road
_DEALS = [
    ("2-for-1 espresso", 0.002, 0.001, 50),
    ("Half-price dosa breakfast", -0.004, 0.003, 20),
    ("Free dessert with any thali", 0.010, -0.006, 5),
    ("Bookstore: 30% off paperbacks", -0.015, -0.011, 100),
]


async def seed(settings: Settings, base_url: str) -> None:
    """Create the sample deals and print tokens and curl lines for them."""
    store = await Store.connect(settings)
    try:
        now = now_ms()
        ids = []
        for title, dlat, dlng, stock in _DEALS:
            deal = await create_deal(
                store,
                NewDeal(
                    merchant_id="m-demo",
                    title=title,
                    description="A demo deal from `flashsale up --demo`.",
                    lat=round(_CENTER[0] + dlat, 6),
                    lng=round(_CENTER[1] + dlng, 6),
                    inventory=stock,
                    starts_at_ms=now - 60_000,
                    ends_at_ms=now + 2 * 3_600_000,
                    redeem_until_ms=now + 7 * MS_PER_DAY,
                ),
            )
            ids.append(deal.id)
    finally:
        await store.close()
    secret = settings.auth_secret or ""
    user = mint(secret, "u-demo", "user", 24 * 3600)
    merchant = mint(secret, "m-demo", "merchant", 24 * 3600)
    lat, lng = _CENTER
    print(
        f"""
--- demo -----------------------------------------------------------------
{len(ids)} deals near {lat},{lng} (merchant m-demo). Tokens are valid for 24 h.

export USER_TOKEN={user}
export MERCHANT_TOKEN={merchant}

# what is on within 2 km
curl -s '{base_url}/v1/deals?lat={lat}&lng={lng}&radius_km=2'
# claim a voucher (again: the same voucher, 200)
curl -s -X POST -H "Authorization: Bearer $USER_TOKEN" {base_url}/v1/deals/{ids[0]}/claims
# my vouchers
curl -s -H "Authorization: Bearer $USER_TOKEN" {base_url}/v1/me/vouchers
# publish a deal
curl -s -X POST -H "Authorization: Bearer $MERCHANT_TOKEN" -H 'Content-Type: application/json' \\
  -d '{{"title": "Flash: free chai", "lat": {lat}, "lng": {lng}, "inventory": 10,
       "ends_at": "2099-01-01T00:00:00Z", "starts_at": "2098-12-31T00:00:00Z"}}' \\
  {base_url}/v1/deals
# readiness, metrics, the API document
curl -s {base_url}/readyz ; curl -s {base_url}/openapi.json | head -c 300
--------------------------------------------------------------------------
""",
        flush=True,
    )
