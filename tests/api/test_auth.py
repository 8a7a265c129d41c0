"""Caller tokens: HS256 verified by hand must refuse everything jwt.decode refuses."""

from __future__ import annotations

import base64
import time

import jwt
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from api.auth import Authenticator, mint
from engine.errors import Forbidden, Unauthenticated

SECRET = "s" * 48
NOW = int(time.time())
GOOD = {"sub": "u-1", "role": "user", "exp": NOW + 600}


def b64(data: dict[str, object] | bytes) -> str:
    raw = data if isinstance(data, bytes) else orjson.dumps(data)
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def forge(header: dict[str, object], claims: dict[str, object], key: str = SECRET) -> str:
    import hashlib
    import hmac

    signing = f"{b64(header)}.{b64(claims)}"
    sig = hmac.new(key.encode(), signing.encode(), hashlib.sha256).digest()
    return f"{signing}.{b64(sig)}"


def test_a_minted_token_names_its_caller() -> None:
    caller = Authenticator(SECRET).caller("Bearer " + mint(SECRET, "u-9", "merchant"))
    assert (caller.id, caller.role) == ("u-9", "merchant")


def test_scheme_is_case_insensitive() -> None:
    assert Authenticator(SECRET).caller("bearer " + mint(SECRET, "u-1", "user")).id == "u-1"


@pytest.mark.parametrize(
    "token",
    [
        pytest.param(forge({"alg": "HS256", "crit": ["x"]}, GOOD), id="crit header"),
        pytest.param(forge({"alg": "HS384"}, GOOD), id="another alg"),
        pytest.param(forge({"alg": "none"}, GOOD), id="alg none, signed"),
        pytest.param(f"{b64({'alg': 'none'})}.{b64(GOOD)}.", id="alg none, unsigned"),
        pytest.param(forge({"typ": "JWT"}, GOOD), id="no alg"),
        pytest.param(forge({"alg": "HS256"}, {**GOOD, "exp": True}), id="boolean exp"),
        pytest.param(forge({"alg": "HS256"}, {**GOOD, "exp": "soon"}), id="string exp"),
        pytest.param(forge({"alg": "HS256"}, {"sub": "u", "role": "user"}), id="no exp"),
        pytest.param(forge({"alg": "HS256"}, {**GOOD, "nbf": NOW + 600}), id="not yet valid"),
        pytest.param(forge({"alg": "HS256"}, {**GOOD, "sub": 7}), id="numeric sub"),
        pytest.param(forge({"alg": "HS256"}, {**GOOD, "sub": ""}), id="empty sub"),
        pytest.param(forge({"alg": "HS256"}, {**GOOD, "role": "boss"}), id="unknown role"),
        pytest.param(forge({"alg": "HS256"}, GOOD, key="x" * 48), id="another key"),
        pytest.param(forge({"alg": "HS256"}, GOOD) + "=", id="padding"),
        pytest.param(forge({"alg": "HS256"}, GOOD)[:-2], id="short signature"),
        pytest.param(forge({"alg": "HS256"}, GOOD) + "AA", id="long signature"),
        pytest.param("a.b", id="two segments"),
        pytest.param("a.b.c.d", id="four segments"),
        pytest.param("é.é.é", id="non-ascii"),
        pytest.param(f"{b64(b'[1]')}.{b64(GOOD)}.x", id="header not an object"),
        pytest.param(forge({"alg": "HS256"}, [1, 2]), id="payload not an object"),  # type: ignore[arg-type]
        pytest.param(jwt.encode(GOOD, SECRET * 2, "HS512"), id="HS512 by pyjwt"),
    ],
)
def test_a_malformed_forged_or_expired_caller_token_is_refused(token: str) -> None:
    with pytest.raises(Unauthenticated):
        Authenticator(SECRET).caller("Bearer " + token)


def test_forge_helper_makes_tokens_we_accept() -> None:
    """The forging helper is right: the same claims correctly signed pass."""
    assert Authenticator(SECRET).caller("Bearer " + forge({"alg": "HS256"}, GOOD)).id == "u-1"


def test_a_cached_token_stops_working_when_it_expires() -> None:
    auth = Authenticator(SECRET)
    token = forge({"alg": "HS256"}, {**GOOD, "exp": time.time() + 0.3})
    assert auth.caller("Bearer " + token).id == "u-1"
    time.sleep(0.4)
    with pytest.raises(Unauthenticated, match="expired"):
        auth.caller("Bearer " + token)


def test_wrong_role_is_forbidden_not_unauthenticated() -> None:
    with pytest.raises(Forbidden):
        Authenticator(SECRET).require("Bearer " + mint(SECRET, "u", "user"), "merchant")


@settings(max_examples=300, deadline=None)
@given(position=st.integers(0, 10_000), char=st.sampled_from("AQgw_-x0.="))
def test_any_single_character_change_is_refused(position: int, char: str) -> None:
    token = forge({"alg": "HS256", "typ": "JWT"}, GOOD)
    i = position % len(token)
    mutated = token[:i] + char + token[i + 1 :]
    if mutated == token:
        return
    try:
        caller = Authenticator(SECRET).caller("Bearer " + mutated)
    except Unauthenticated:
        return
    # Base64url's last character may carry unused bits: the same bytes, the same token.
    assert jwt.decode(mutated, SECRET, algorithms=["HS256"])["sub"] == caller.id
    assert mutated.split(".")[:2] == token.split(".")[:2]
