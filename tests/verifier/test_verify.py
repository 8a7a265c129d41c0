"""The till's check (``verifier.verify``, pyjwt) and the server's (``engine.vouchers``).

Written twice on purpose (the till never imports the server's code), so this holds them
together: every forgery gets the same verdict from both.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import jwt
import orjson
import pytest

from engine.claims import Voucher
from engine.errors import InvalidVoucher
from engine.vouchers import VoucherSigner
from tests.vouchers.forge import es256_raw, forgeries, high_s, parts, public_pem, resign
from tests.vouchers.helpers import server_key
from verifier.verify import Rejected, load_jwks, verify

NOW_S = int(time.time())
MERCHANT = "m-1"


@pytest.fixture
def signer(tmp_path: Path) -> VoucherSigner:
    return VoucherSigner(tmp_path / "keys")


def _table(signer: VoucherSigner) -> tuple[dict[str, Callable[[], str]], set[str]]:
    """Every forgery (and a few good tokens), and the names of those both must accept."""
    good = signer.sign(
        Voucher(
            "v0123456789abcdef.d_1",
            "d_1",
            "u-1",
            MERCHANT,
            1,
            (NOW_S - 60) * 1000,
            (NOW_S + 86_400) * 1000,
        )
    )
    key = server_key(signer.keys_dir)
    caller = jwt.encode({"sub": MERCHANT, "role": "merchant", "exp": 2**31}, "s" * 32, "HS256")
    header, payload, _ = parts(good)
    table = forgeries(good, public_pem(key), key, caller)
    accepted: dict[str, Callable[[], str]] = {
        "good": lambda: good,
        "good, high s": lambda: high_s(good),
        "good, with scanner whitespace": lambda: f"\n {good} \r\n",
        "good, with a claim nobody checks (nbf tomorrow)": lambda: resign(
            good, key, nbf=NOW_S + 86_400
        ),
        "good, aud twice (the last wins in both parsers)": lambda: es256_raw(
            json.dumps(header).encode(),
            json.dumps({**payload, "aud": "m-2"}).encode()[:-1] + b', "aud": "m-1"}',
            key,
        ),
    }
    table.update(accepted)
    table.update(
        {
            "expired": lambda: resign(good, key, exp=NOW_S - 1),
            "expires now": lambda: resign(good, key, exp=NOW_S),
            "another merchant's aud": lambda: resign(good, key, aud="m-2"),
        }
    )
    return table, set(accepted)


def _server(signer: VoucherSigner, token: str) -> str:
    """The server's verdict: its token check, then the redemption's audience check."""
    try:
        verified = signer.verify(token, NOW_S * 1000)
    except InvalidVoucher as exc:
        return f"refused ({exc.details.get('reason')})"
    return "accepted" if verified.merchant_id == MERCHANT else "refused (not your voucher)"


def _till(signer: VoucherSigner, token: str) -> str:
    keys = load_jwks(orjson.loads(signer.ring.jwks_body))
    try:
        verify(token, keys, MERCHANT, NOW_S)
    except Rejected as exc:
        return f"refused ({exc.reason})"
    return "accepted"


def test_the_till_and_the_server_give_the_same_verdict_on_every_forgery(
    signer: VoucherSigner,
) -> None:
    table, accepted = _table(signer)
    verdicts = {
        name: (_server(signer, make()), _till(signer, make())) for name, make in table.items()
    }
    disagree = {n: v for n, v in verdicts.items() if v[0].split()[0] != v[1].split()[0]}
    assert not disagree, json.dumps(disagree, indent=1)
    assert {n for n, (server, _) in verdicts.items() if server == "accepted"} == accepted
