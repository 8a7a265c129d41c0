"""The verifier runs against a real API served on a socket (the API tests' fixtures)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.api.conftest import RunningApi, api, client, make_api  # noqa: F401
from tests.vouchers.helpers import claim, create_deal


@pytest.fixture
def vouchers(api: RunningApi, client: httpx.Client) -> list[dict[str, Any]]:  # noqa: F811
    """Three vouchers of one deal of merchant `m-1`, held by three users."""
    deal = create_deal(client, api.token("merchant", "m-1"))
    return [claim(client, deal["id"], api.token("user", f"u-{i}")) for i in range(3)]
