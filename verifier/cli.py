"""``flashsale verifier``: the merchant's till, online now and then, offline in between.

Exit codes:
  pull-keys  0 keys cached; 1 the server answered with something unusable; 3 unreachable
  check      0 accepted; 1 rejected (the reason is printed); 2 usage error or no cached keys
  sync       0 the server answered the upload, the keys and the feed; 1 it refused one
             of them (e.g. the token); 2 the token names no merchant (no readable ``sub``);
             3 unreachable

``sync`` uploads the log, refreshes the cached keys, then reads the merchant's redemptions
feed (``GET /v1/redemptions``) from the cursor kept in the state, so that ``check`` refuses
offline what the merchant's other tills (or the online API) redeemed. Even with nothing to
upload it refreshes the keys and reads the feed (so a refused token fails it).
  any        2 the state directory cannot be made private to its owner (see state.py)
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt

from verifier.state import State, UnsafeStateDir, default_dir
from verifier.verify import Rejected, load_jwks, verify

EXIT_OK, EXIT_REJECTED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
SYNC_BATCH = 1000  # the server takes at most 1000 entries per upload
HTTP_TIMEOUT_S = 30.0
STATUSES = ("accepted", "duplicate", "conflict", "rejected")
FEED_PAGE = 1000  # the most the server gives per page
# A till catching up reads at most this many pages per sync; the rest comes next time.
FEED_MAX_PAGES = 100


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="flashsale verifier",
        description="Verify vouchers offline with cached keys; sync the log when online.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    state_help = f"state directory (default {default_dir()})"

    pull = sub.add_parser("pull-keys", help="download and cache the server's JWKS")
    pull.add_argument("--server", required=True, help="e.g. https://api.example.com")
    pull.add_argument("--state", type=Path, default=None, help=state_help)
    pull.set_defaults(handler=pull_keys)

    checking = sub.add_parser("check", help="verify a scanned token offline and log it")
    checking.add_argument("token")
    checking.add_argument(
        "--merchant", dest="merchant_id", required=True, help="this till's merchant id"
    )
    checking.add_argument("--state", type=Path, default=None, help=state_help)
    checking.set_defaults(handler=check)

    syncing = sub.add_parser("sync", help="upload the redemptions not yet synced")
    syncing.add_argument("--server", required=True)
    syncing.add_argument(
        "--token", required=True, help="the merchant's API token (uploads its entries only)"
    )
    syncing.add_argument("--state", type=Path, default=None, help=state_help)
    syncing.set_defaults(handler=sync)
    return p


def main(argv: list[str]) -> int:
    """Run one verifier command (the handler its parser names, given the state and the
    command's options as keyword arguments); returns the exit code."""
    parser = _parser()
    try:
        options = vars(parser.parse_args(argv))
    except SystemExit as exc:  # -h, or a usage error
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    handler = options.pop("handler")
    state_dir = options.pop("state")
    del options["command"]
    try:
        state = State(state_dir or default_dir())
    except (UnsafeStateDir, OSError, sqlite3.Error) as exc:
        print(f"cannot use the state directory: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if state.notice:
        print(state.notice, file=sys.stderr)
    try:
        return int(handler(state, **options))
    finally:
        state.close()


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _url(server: str, path: str) -> str:
    return server.rstrip("/") + path


def _request(req: urllib.request.Request) -> tuple[int, bytes]:
    """Send; return (status, body) for any HTTP answer. ``OSError`` if unreachable."""
    try:
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def _refresh_keys(state: State, server: str) -> tuple[int, int]:
    """Download and cache the JWKS: (exit code, keys cached); prints why on failure."""
    req = urllib.request.Request(
        _url(server, "/.well-known/jwks.json"), headers={"Accept": "application/json"}
    )
    try:
        status, body = _request(req)
    except (OSError, ValueError) as exc:
        print(f"cannot reach {server}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE, 0
    if status != 200:
        print(f"the server answered {status}; keys not updated", file=sys.stderr)
        return EXIT_REJECTED, 0
    try:
        document = json.loads(body)
        keys = load_jwks(document)
    except ValueError as exc:
        print(f"the server's JWKS is unusable ({exc}); keys not updated", file=sys.stderr)
        return EXIT_REJECTED, 0
    state.save_jwks(document)
    return EXIT_OK, len(keys)


def pull_keys(state: State, server: str) -> int:
    code, _n = _refresh_keys(state, server)
    if code == EXIT_OK:
        keys = load_jwks(state.load_jwks())
        print(f"cached {len(keys)} key(s): {', '.join(sorted(keys))}")
    return code


def check(state: State, token: str, merchant_id: str) -> int:
    document = state.load_jwks()
    if document is None:
        print("no cached keys: run `flashsale verifier pull-keys --server URL` first")
        return EXIT_USAGE
    try:
        keys = load_jwks(document)
    except ValueError:
        print("the cached keys are unusable: run pull-keys again")
        return EXIT_USAGE
    try:
        voucher = verify(token, keys, merchant_id)
    except Rejected as exc:
        print(f"rejected: {exc.reason}")
        return EXIT_REJECTED
    here = state.redeemed_at(voucher.voucher_id, merchant_id)
    if here is None:
        elsewhere = state.redeemed_elsewhere(voucher.voucher_id, merchant_id)
        if elsewhere is not None:
            at, device = elsewhere
            print(f"rejected: already redeemed on another till ({device or 'online'}) at {at}")
            return EXIT_REJECTED
        entry_id = state.record(voucher.voucher_id, merchant_id, token.strip(), _now())
        if entry_id is not None:
            print(f"accepted {voucher.voucher_id}")
            return EXIT_OK
        here = state.redeemed_at(voucher.voucher_id, merchant_id)  # a racing scan won
    print(f"rejected: already redeemed here at {here}")
    return EXIT_REJECTED


def _upload(server: str, token: str, body: dict[str, Any]) -> tuple[int, bytes]:
    req = urllib.request.Request(
        _url(server, "/v1/redemptions/sync"),
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
    )
    return _request(req)


def merchant_of(token: str) -> str | None:
    """The merchant id a caller token names (its ``sub``), or ``None`` if it names none.

    Read without checking the signature: the till does not hold the HS256 secret, and
    the server checks the token on upload. The id only selects which entries to send.
    """
    try:
        claims = jwt.decode(token.strip(), options={"verify_signature": False})
    except jwt.InvalidTokenError:
        return None
    sub = claims.get("sub")
    return sub if isinstance(sub, str) and sub else None


def sync(state: State, server: str, token: str) -> int:
    merchant_id = merchant_of(token)
    if merchant_id is None:
        print("the token names no merchant (a JWT with a `sub`); nothing uploaded", file=sys.stderr)
        return EXIT_USAGE
    device = state.device_id()
    counts: Counter[str] = Counter()
    while True:
        batch = state.unsynced(merchant_id, SYNC_BATCH)
        if not batch:
            break
        body = {
            "device_id": device,
            "entries": [{"entry_id": e, "token": t, "redeemed_at": at} for e, t, at in batch],
        }
        try:
            status, raw = _upload(server, token, body)
        except (OSError, ValueError) as exc:
            print(f"cannot reach {server}: {exc}", file=sys.stderr)
            return EXIT_UNREACHABLE
        if status != 200:
            print(f"the server refused the upload ({status}): {_message(raw)}", file=sys.stderr)
            return EXIT_REJECTED
        try:
            results = json.loads(raw)["results"]
            answered = [
                (str(r["entry_id"]), str(r["status"]), r.get("code") or r.get("first_status"))
                for r in results
            ]
        except (ValueError, KeyError, TypeError):
            print("the server's answer is not understood; nothing marked", file=sys.stderr)
            return EXIT_REJECTED
        sent = {e for e, _t, _a in batch}
        answered = [a for a in answered if a[0] in sent]
        state.mark_synced(merchant_id, answered, _now())
        counts.update(status for _e, status, _c in answered)
        if len(answered) < len(batch):
            print("the server did not answer every entry; run sync again", file=sys.stderr)
            break
    for name in STATUSES:
        print(f"{name}: {counts.get(name, 0)}")
    code, n_keys = _refresh_keys(state, server)
    if code != EXIT_OK:
        return code
    print(f"keys: {n_keys} cached")
    code, learned = _read_feed(state, server, token, merchant_id, device)
    if code != EXIT_OK:
        return code
    print(f"learned: {learned} redeemed on other tills")
    return EXIT_OK


def _read_feed(
    state: State, server: str, token: str, merchant_id: str, device: str
) -> tuple[int, int]:
    """Read the merchant's feed from the kept cursor: (exit code, redemptions learned)."""
    cursor = state.feed_cursor(merchant_id)
    learned = 0
    restarted = False
    for _ in range(FEED_MAX_PAGES):
        query = {"limit": str(FEED_PAGE), **({"after": cursor} if cursor else {})}
        req = urllib.request.Request(
            _url(server, "/v1/redemptions?" + urllib.parse.urlencode(query)),
            headers={"Accept": "application/json", "Authorization": f"Bearer {token}"},
        )
        try:
            status, raw = _request(req)
        except (OSError, ValueError) as exc:
            print(f"cannot reach {server}: {exc}", file=sys.stderr)
            return EXIT_UNREACHABLE, learned
        if status == 422 and cursor and not restarted and _names_field(raw, "after"):
            # A cursor this server no longer knows (its partitions changed): read it all
            # again; what was learned before stays learned.
            cursor, restarted = None, True
            continue
        if status != 200:
            print(f"the server refused the feed ({status}): {_message(raw)}", file=sys.stderr)
            return EXIT_REJECTED, learned
        try:
            body = json.loads(raw)
            items = [
                (str(r["voucher_id"]), str(r["redeemed_at"]), r.get("device_id"))
                for r in body["redemptions"]
            ]
            cursor = str(body["next"])
        except (ValueError, KeyError, TypeError):
            print("the server's feed is not understood; nothing learned", file=sys.stderr)
            return EXIT_REJECTED, learned
        # This till's own redemptions come back too: they are in its log already.
        others = [(v, at, d if isinstance(d, str) else None) for v, at, d in items if d != device]
        state.learn(merchant_id, others, cursor)
        learned += len(others)
        if len(items) < FEED_PAGE:
            break
    return EXIT_OK, learned


def _names_field(raw: bytes, field: str) -> bool:
    try:
        return field in json.loads(raw)["error"]["details"]["fields"]
    except (ValueError, KeyError, TypeError):
        return False


def _message(raw: bytes) -> str:
    try:
        return str(json.loads(raw)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return raw[:200].decode("utf-8", "replace")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
