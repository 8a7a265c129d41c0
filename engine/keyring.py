"""Voucher signing keys and their states: next, current, retired, revoked.

The keys directory (0700) is the whole state, shared by every API process and the
``flashsale keys`` command; nothing about keys lives in Redis or PostgreSQL:

    k20261124T180000.123-1a2b3c.pem    the private key, PKCS#8 PEM (0600)
    k20261124T180000.123-1a2b3c.json   its schedule (0600):
                                       {"signs_from_ms": ..., "revoked_at_ms": ... | null}

A kid names its creation time, so names sort by age. A key's schedule says when it starts
signing (its creation + ``FLASHSALE_KEY_PREPUBLISH``, fixed when it is written, so that
every process agrees whatever its own settings) and when it was revoked. A key written
before schedules existed (a ``.pem`` alone) signed from its creation. Both files are
written whole and renamed into place, the schedule first: a process never sees a key
without its schedule, so it never takes a prepublished key for one that signs now.

From these times alone (:class:`Schedule`) every process derives the same answers:

- who signs at any moment ``t``: the key with the latest ``signs_from`` at or before ``t``
  that was not yet revoked at ``t``. So the key that signed a voucher at its claim is a
  function of the claim time, and every route serves the voucher signed by that key (its
  *own* key) while it is published: no kid needs storing with the voucher, in Redis or
  in PostgreSQL, and vouchers restored from PostgreSQL get the same answer;
- a key's state now: *revoked* if revoked; *next* before its ``signs_from``; *current*
  if it signs now; *retired* otherwise;
- what is published (the JWKS): next and current keys, and a retired key until every
  voucher it may have signed has expired: the end of its last signing interval + the
  longest voucher life (:data:`MAX_VOUCHER_LIFE_MS`) + :data:`RETIRE_SLACK_MS` (processes
  that had not reloaded yet, clock skew between hosts). Revoked keys never are.

Revoking the key that signs now first writes a new key that signs at once, so that no
process ever falls back to an older key in between.
"""

from __future__ import annotations

import bisect
import calendar
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from engine.deals import MAX_REDEEM_AFTER_END_MS, MAX_WINDOW_MS
from engine.errors import ExitCode, FlashsaleError

log = logging.getLogger(__name__)

ALGORITHM = "ES256"
# How often running processes look at the keys directory (a change reaches them within it).
RELOAD_S = 2.0
# The longest a voucher can live after its claim: 30 days of claim window + 90 of redeeming.
MAX_VOUCHER_LIFE_MS = MAX_WINDOW_MS + MAX_REDEEM_AFTER_END_MS
# Slack on a retired key's last signature: processes that have not reloaded yet, and clock
# skew between the host that rotated and the hosts that sign.
RETIRE_SLACK_MS = 3_600_000

KeyState = Literal["next", "current", "retired", "revoked"]
DIR_MODE, FILE_MODE = 0o700, 0o600

_KID_RE = re.compile(r"^k(\d{8}T\d{6})(?:\.(\d{3}))?-[0-9a-f]{6,32}$")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def new_kid(after_ms: int = 0) -> str:
    """A key id naming its creation time (ms), later than ``after_ms``; sorts by age."""
    ms = max(now_ms(), after_ms + 1)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(ms // 1000))
    return f"k{stamp}.{ms % 1000:03d}-{os.urandom(3).hex()}"


def kid_created_ms(kid: str) -> int | None:
    """The creation time a kid names, or ``None`` if it does not follow the pattern."""
    match = _KID_RE.match(kid)
    if not match:
        return None
    seconds = calendar.timegm(time.strptime(match.group(1), "%Y%m%dT%H%M%S"))
    return seconds * 1000 + int(match.group(2) or 0)


# -- the schedule: pure functions of the keys' times ---------------------------------


@dataclass(frozen=True, slots=True)
class KeyTimes:
    """One key's times: all the schedule needs to know about it."""

    kid: str
    created_ms: int
    signs_from_ms: int
    revoked_at_ms: int | None = None

    def revoked_by(self, t_ms: int) -> bool:
        return self.revoked_at_ms is not None and self.revoked_at_ms <= t_ms


@dataclass(frozen=True, slots=True)
class KeyStatus:
    """A key's state at one moment, with the dates ``flashsale keys list`` shows."""

    times: KeyTimes
    state: KeyState
    # When it last stopped signing (None: it signs now, or never signed).
    signed_until_ms: int | None
    # Published in the JWKS until then (None: open-ended, as next and current keys are;
    # revoked keys are never published and have None too).
    published_until_ms: int | None
    published: bool


class Schedule:
    """Who signs at each moment, derived from the keys' times alone.

    A step function over time: it changes only where a key starts signing or is revoked,
    so it is a short list of ``(start, kid)`` segments, looked up by bisection. Keys are
    few (one per rotation), so building it is cheap.
    """

    def __init__(self, keys: Sequence[KeyTimes]) -> None:
        self.keys = {k.kid: k for k in keys}
        points = sorted(
            {k.signs_from_ms for k in keys}
            | {k.revoked_at_ms for k in keys if k.revoked_at_ms is not None}
        )
        starts: list[int] = []
        kids: list[str | None] = []
        for p in points:
            signing = [k for k in keys if k.signs_from_ms <= p and not k.revoked_by(p)]
            kid = max(signing, key=lambda k: (k.signs_from_ms, k.kid)).kid if signing else None
            if kids and kids[-1] == kid:
                continue
            starts.append(p)
            kids.append(kid)
        self._starts = starts
        self._kids = kids

    def signer_at(self, t_ms: int) -> str | None:
        """The kid that signed (or signs) at ``t_ms``; ``None`` before any key or if every
        key was revoked by then."""
        i = bisect.bisect_right(self._starts, t_ms) - 1
        return self._kids[i] if i >= 0 else None

    def signed_until_ms(self, kid: str) -> int | None:
        """When ``kid`` last stopped signing; ``None`` if it signs on (or never signed)."""
        end: int | None = None
        for i, k in enumerate(self._kids):
            if k != kid:
                continue
            if i + 1 == len(self._kids):
                return None  # the last segment: open-ended
            end = self._starts[i + 1]
        return end

    def status(self, kid: str, at_ms: int) -> KeyStatus:
        """``kid``'s state at ``at_ms`` and whether it is published then."""
        k = self.keys[kid]
        if k.revoked_by(at_ms):
            return KeyStatus(k, "revoked", self.signed_until_ms(kid), None, False)
        if k.signs_from_ms > at_ms:
            return KeyStatus(k, "next", None, None, True)
        if self.signer_at(at_ms) == kid:
            return KeyStatus(k, "current", None, None, True)
        # Retired (or superseded before it ever signed: then it may have signed nothing,
        # but a process that had not reloaded may have signed with it from signs_from).
        last = self.signed_until_ms(kid)
        if last is None:
            last = k.signs_from_ms
        until = last + RETIRE_SLACK_MS + MAX_VOUCHER_LIFE_MS
        return KeyStatus(k, "retired", last, until, at_ms <= until)

    def changes_after(self, at_ms: int) -> int | None:
        """The first moment after ``at_ms`` when a key's state or publication changes."""
        moments = []
        for kid, k in self.keys.items():
            s = self.status(kid, at_ms)
            if s.state == "next":
                moments.append(k.signs_from_ms)
            elif s.state == "retired" and s.published and s.published_until_ms is not None:
                moments.append(s.published_until_ms + 1)
        moments += [p for p in self._starts if p > at_ms]
        return min(moments, default=None)


# -- the keys directory ----------------------------------------------------------------


class KeyDirError(FlashsaleError):
    """The keys directory cannot do what was asked; the message says why."""

    exit_code = ExitCode.USAGE


def _schedule_path(keys_dir: Path, kid: str) -> Path:
    return keys_dir / f"{kid}.json"


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole, 0600, replacing it atomically; fsync both."""
    tmp = path.with_name(f".{path.name}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # a reader sees the old file or the new one, never half
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _schedule_bytes(signs_from_ms: int, revoked_at_ms: int | None) -> bytes:
    return orjson.dumps({"signs_from_ms": signs_from_ms, "revoked_at_ms": revoked_at_ms})


def parse_schedule(raw: bytes) -> tuple[int, int | None]:
    """``(signs_from_ms, revoked_at_ms)`` from a schedule file; ``ValueError`` if malformed."""
    doc = json.loads(raw)
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    signs_from, revoked = doc.get("signs_from_ms"), doc.get("revoked_at_ms")
    if not isinstance(signs_from, int) or isinstance(signs_from, bool):
        raise ValueError("signs_from_ms must be an integer")
    if revoked is not None and (not isinstance(revoked, int) or isinstance(revoked, bool)):
        raise ValueError("revoked_at_ms must be an integer or null")
    return signs_from, revoked


def key_names(keys_dir: Path) -> list[str]:
    """The kids of the private keys in ``keys_dir``, oldest first."""
    if not keys_dir.exists():
        return []
    return sorted(p.stem for p in keys_dir.glob("k*.pem"))


def read_times(keys_dir: Path, kid: str) -> KeyTimes:
    """A key's times from its name and schedule file (``ValueError`` if unreadable)."""
    pem = keys_dir / f"{kid}.pem"
    created = kid_created_ms(kid)
    if created is None:
        created = int(pem.stat().st_mtime * 1000)
    try:
        raw = _schedule_path(keys_dir, kid).read_bytes()
    except FileNotFoundError:
        return KeyTimes(kid, created, created)  # written before schedules: signed at once
    signs_from, revoked = parse_schedule(raw)
    return KeyTimes(kid, created, signs_from, revoked)


def read_schedule(keys_dir: Path) -> Schedule:
    """Every readable key's times (an unreadable schedule is skipped and logged)."""
    times = []
    for kid in key_names(keys_dir):
        try:
            times.append(read_times(keys_dir, kid))
        except (OSError, ValueError) as exc:
            log.error("cannot read the schedule of key %s: %s", kid, exc)
    return Schedule(times)


def rotate_key(keys_dir: Path, prepublish_ms: int = 0, *, at_ms: int | None = None) -> str:
    """Write a new P-256 key that signs ``prepublish_ms`` after its creation; its kid.

    Published at once (as *next* until it signs). Into a directory where no key signs now,
    it signs at once whatever ``prepublish_ms``: there is nothing to sign with meanwhile.
    """
    keys_dir.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    schedule = read_schedule(keys_dir)
    # The new key must be the newest even if the clock is behind the last rotation's host.
    newest = max((k.created_ms for k in schedule.keys.values()), default=0)
    kid = new_kid(newest)
    created = kid_created_ms(kid)
    assert created is not None
    current = schedule.signer_at(now_ms() if at_ms is None else at_ms)
    signs_from = created + prepublish_ms if current is not None else created
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # The schedule first: a loader that finds the key finds its schedule too.
    _write_private(_schedule_path(keys_dir, kid), _schedule_bytes(signs_from, None))
    _write_private(keys_dir / f"{kid}.pem", pem)
    return kid


@dataclass(frozen=True, slots=True)
class Revoked:
    """What ``revoke_key`` did: the kid, and the key it wrote to sign instead (if any)."""

    kid: str
    already: bool
    replacement: str | None


def revoke_key(keys_dir: Path, kid: str) -> Revoked:
    """Withdraw ``kid``: never published or accepted again; its vouchers get re-signed.

    If it signs now, a new key that signs at once is written first. ``KeyDirError`` if
    there is no such key.
    """
    if kid not in key_names(keys_dir):  # also refuses names with a path in them
        raise KeyDirError(f"no key {kid!r} in {keys_dir}")
    times = read_times(keys_dir, kid)
    if times.revoked_at_ms is not None:
        return Revoked(kid, True, None)
    replacement = None
    at = now_ms()
    if read_schedule(keys_dir).signer_at(at) == kid:
        replacement = rotate_key(keys_dir, 0)
    _write_private(_schedule_path(keys_dir, kid), _schedule_bytes(times.signs_from_ms, now_ms()))
    return Revoked(kid, False, replacement)


def list_keys(keys_dir: Path, at_ms: int | None = None) -> list[KeyStatus]:
    """Every key's state and dates, oldest first."""
    schedule = read_schedule(keys_dir)
    at = now_ms() if at_ms is None else at_ms
    return [schedule.status(kid, at) for kid in sorted(schedule.keys)]


# -- the ring: loaded keys, one consistent view ---------------------------------------


@dataclass(frozen=True, slots=True)
class Key:
    """A loaded key: its times, the key pair, and its public JWK."""

    times: KeyTimes
    private: ec.EllipticCurvePrivateKey
    public: ec.EllipticCurvePublicKey
    jwk: dict[str, Any]

    @property
    def kid(self) -> str:
        return self.times.kid


def load_key(keys_dir: Path, kid: str) -> Key:
    """Load one key and its schedule (``OSError``/``ValueError``/``TypeError`` if unusable)."""
    path = keys_dir / f"{kid}.pem"
    if path.stat().st_mode & 0o077:
        log.warning("signing key %s is readable by group or others; chmod 600 it", path.name)
    private = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(private, ec.EllipticCurvePrivateKey) or private.curve.name != "secp256r1":
        raise ValueError(f"{path.name} is not a P-256 private key")
    public = private.public_key()
    jwk = ECAlgorithm.to_jwk(public, as_dict=True)
    jwk.update({"kid": kid, "use": "sig", "alg": ALGORITHM})
    return Key(read_times(keys_dir, kid), private, public, jwk)


@dataclass(frozen=True, slots=True)
class KeyRing:
    """One consistent view of the keys directory at ``built_ms``: the schedule, the keys
    that may verify (``published``), and the JWKS document.

    Immutable, so a reload swaps it in one assignment and a request never sees half of it.
    """

    schedule: Schedule
    keys: dict[str, Key]
    published: dict[str, Key]
    signing: Key  # the key that signed at built_ms
    jwks_body: bytes
    etag: str
    built_ms: int
    # The ring must be rebuilt by then (a key starts signing or leaves the JWKS).
    valid_until_ms: int | None

    def current(self, at_ms: int) -> Key:
        """The key that signs at ``at_ms`` (the build's signer if none is known then)."""
        kid = self.schedule.signer_at(at_ms)
        key = self.published.get(kid) if kid is not None else None
        return key if key is not None else self.signing

    def key_for(self, claimed_at_ms: int, at_ms: int) -> Key:
        """The key to sign a voucher claimed at ``claimed_at_ms`` with, at ``at_ms``.

        Its own key (the one that signed at its claim) while that is published; else (the
        key was revoked, or the claim predates every key here) the key that signs now.
        """
        kid = self.schedule.signer_at(claimed_at_ms)
        own = self.published.get(kid) if kid is not None else None
        return own if own is not None else self.current(at_ms)


def build_ring(keys: Sequence[Key], at_ms: int) -> KeyRing | None:
    """The ring of ``keys`` at ``at_ms``; ``None`` if no key signs then."""
    by_kid = {k.kid: k for k in keys}
    schedule = Schedule([k.times for k in keys])
    signer = schedule.signer_at(at_ms)
    if signer is None:
        return None
    statuses = {kid: schedule.status(kid, at_ms) for kid in by_kid}
    published = {
        kid: by_kid[kid]
        for kid in sorted(by_kid, key=lambda kid: (by_kid[kid].times.signs_from_ms, kid))
        if statuses[kid].published
    }
    # The same bytes (and ETag) in every process that sees the same keys.
    body = orjson.dumps({"keys": [k.jwk for k in published.values()]})
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    return KeyRing(
        schedule=schedule,
        keys=by_kid,
        published=published,
        signing=by_kid[signer],
        jwks_body=body,
        etag=etag,
        built_ms=at_ms,
        valid_until_ms=schedule.changes_after(at_ms),
    )
