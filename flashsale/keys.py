"""``flashsale keys rotate|revoke|list``: the voucher signing keys in the keys directory.

Everything happens in the directory (see :mod:`engine.keyring`): API processes sharing it
follow within 10 seconds, without a restart. Exit codes: 0 done; 2 usage (no such key:
``KeyDirError`` carries it).
"""

from __future__ import annotations

import argparse

from engine.errors import ExitCode
from engine.keyring import KeyStatus, list_keys, read_times, revoke_key, rotate_key
from engine.times import to_rfc3339
from flashsale import wiring


def add_commands(keys_sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """The ``keys`` actions, on the ``flashsale keys`` subparser."""
    rotate = keys_sub.add_parser(
        "rotate",
        help="write a new key: published at once, signing after FLASHSALE_KEY_PREPUBLISH",
    )
    rotate.add_argument(
        "--now", action="store_true", help="sign with it at once (an emergency: tills lack it)"
    )
    rotate.set_defaults(handler=rotate_command)
    revoke = keys_sub.add_parser(
        "revoke", help="withdraw a key (compromised): its vouchers get re-signed"
    )
    revoke.add_argument("kid", help="the key id, as `flashsale keys list` shows it")
    revoke.set_defaults(handler=revoke_command)
    keys_sub.add_parser("list", help="each key's kid, state and dates").set_defaults(
        handler=list_command
    )


def rotate_command(*, now: bool) -> int:
    """Write a new key: published at once, signing after the prepublication time."""
    settings = wiring.resolve()
    keys_dir = settings.signing_keys_dir
    kid = rotate_key(keys_dir, 0 if now else int(settings.key_prepublish_s * 1000))
    signs_from = read_times(keys_dir, kid).signs_from_ms
    print(
        f"new key {kid}: published now (API processes within 10 seconds),"
        f" signing from {to_rfc3339(signs_from)}"
    )
    return ExitCode.OK


def revoke_command(*, kid: str) -> int:
    """Withdraw a key; a key that signs now is replaced by one that signs at once."""
    done = revoke_key(wiring.resolve().signing_keys_dir, kid)  # KeyDirError: exit 2
    if done.already:
        print(f"key {done.kid} was already revoked")
        return ExitCode.OK
    if done.replacement:
        print(f"key {done.kid} was signing: new key {done.replacement} signs at once")
    print(
        f"revoked {done.kid}: withdrawn from the JWKS within 10 seconds;"
        " its vouchers are served re-signed by the current key"
    )
    return ExitCode.OK


def list_command() -> int:
    """Each key's kid, state and dates."""
    keys_dir = wiring.resolve().signing_keys_dir
    statuses = list_keys(keys_dir)
    print(table(statuses) if statuses else f"no keys in {keys_dir} yet (the API writes one)")
    return ExitCode.OK


def _when(ms: int | None) -> str:
    return "-" if ms is None else to_rfc3339(ms)


def table(statuses: list[KeyStatus]) -> str:
    """One line per key: kid, state, created, signs from, signed until, published until."""
    rows = [("KID", "STATE", "CREATED", "SIGNS FROM", "SIGNED UNTIL", "PUBLISHED UNTIL", "REVOKED")]
    for s in statuses:
        t = s.times
        if s.state == "revoked":
            published = "withdrawn"
        elif s.published_until_ms is None:
            published = "open"
        else:
            published = _when(s.published_until_ms)
        rows.append(
            (
                t.kid,
                s.state,
                _when(t.created_ms),
                _when(t.signs_from_ms),
                _when(s.signed_until_ms),
                published,
                _when(t.revoked_at_ms),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )
