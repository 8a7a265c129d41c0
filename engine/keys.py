"""Every Redis key, stream and group name in one place.

A fixed number of partitions each own one hash tag (``{p07}``); a deal lives in the
partition its id hashes to, and the partition's stream and geo index share the tag, so
each Lua script touches one hash slot and runs unchanged on a Redis Cluster.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass
from functools import lru_cache

PREFIX = "fs"
STREAM_GROUP = "persister"


@dataclass(frozen=True, slots=True)
class DealKeys:
    """The keys one deal's scripts touch, all in the deal's partition."""

    partition: int
    deal: str
    claimers: str
    vouchers: str
    redemptions: str
    events: str
    geo: str
    geo_starts: str
    geo_ends: str
    archive: str


def tag(partition: int) -> str:
    """The hash tag of a partition, e.g. ``{p07}``."""
    return f"{{p{partition:02d}}}"


def events_key(partition: int) -> str:
    """The partition stream the persister drains."""
    return f"{PREFIX}:{tag(partition)}:events"


def consumer_lease_key(name: str) -> str:
    """A persister's lease on its consumer name (so two processes never share one)."""
    return f"{PREFIX}:persister:lease:{name}"


def geo_key(partition: int) -> str:
    """The partition's geo index of deals that may still be claimable."""
    return f"{PREFIX}:{tag(partition)}:geo"


def geo_starts_key(partition: int) -> str:
    """The partition's scheduled deals (member: deal id, score: starts ms), kept out of
    the geo index until they start."""
    return f"{PREFIX}:{tag(partition)}:geo:starts"


def geo_ends_key(partition: int) -> str:
    """The partition's indexed deals by end (member: deal id, score: ends ms), so that
    each leaves the geo index when it ends."""
    return f"{PREFIX}:{tag(partition)}:geo:ends"


def deal_key_prefix(partition: int) -> str:
    """What a deal hash's name starts with (the deal id follows): scripts that meet
    deal ids in an index build the hash's name from it."""
    return f"{PREFIX}:{tag(partition)}:deal:"


def archive_key(partition: int) -> str:
    """The partition's deals by archive time (a ZSET: deal id -> redeem_until + grace, ms)."""
    return f"{PREFIX}:{tag(partition)}:archive"


def archiver_lease_key() -> str:
    """Taken by the persister that starts an archive pass; lapses after the archive interval
    (one pass per interval over all persisters; not a safety, two at once are safe)."""
    return f"{PREFIX}:archiver:lease"


def geo_sweep_key(partition: int) -> str:
    """The lease that lets one API process at a time sweep a partition's geo index."""
    return f"{PREFIX}:{tag(partition)}:geo:sweep"


class KeySpace:
    """Key names for one partition count."""

    def __init__(self, partitions: int) -> None:
        self.partitions = partitions
        # Hot deals are looked up on every claim: remember their key sets.
        self.for_deal = lru_cache(maxsize=65_536)(self._for_deal)

    def partition_of(self, deal_id: str) -> int:
        """The partition a deal id lives in (stable across processes and restarts)."""
        return zlib.crc32(deal_id.encode()) % self.partitions

    def _for_deal(self, deal_id: str) -> DealKeys:
        p = self.partition_of(deal_id)
        base = f"{PREFIX}:{tag(p)}"
        return DealKeys(
            partition=p,
            deal=f"{deal_key_prefix(p)}{deal_id}",
            claimers=f"{base}:claimers:{deal_id}",
            vouchers=f"{base}:vouchers:{deal_id}",
            redemptions=f"{base}:redeemed:{deal_id}",
            events=f"{base}:events",
            geo=geo_key(p),
            geo_starts=geo_starts_key(p),
            geo_ends=geo_ends_key(p),
            archive=archive_key(p),
        )

    def all_events(self) -> list[str]:
        """Every partition stream."""
        return [events_key(p) for p in range(self.partitions)]

    def all_geo(self) -> list[str]:
        """Every partition geo index."""
        return [geo_key(p) for p in range(self.partitions)]

    def all_archive(self) -> list[str]:
        """Every partition's archive index."""
        return [archive_key(p) for p in range(self.partitions)]

    def deal_pattern(self) -> str:
        """A SCAN pattern matching every deal hash."""
        return f"{PREFIX}:*:deal:*"


def sync_entries_key(merchant_id: str, month: str) -> str:
    """A merchant's offline-sync entries about vouchers expiring in ``month`` (``YYYYMM``):
    entry id -> the first result (a hash, one slot; it expires with its month, see
    ``engine/redemptions.py``).

    The id is hex-encoded: a caller id may hold any character, and must never make this
    name match another pattern (``deal_pattern``) or pick a hash tag.
    """
    return f"{PREFIX}:sync:{merchant_id.encode().hex()}:{month}"


def merchant_feed_key(partition: int, merchant_id: str) -> str:
    """A merchant's accepted redemptions of vouchers in one partition (a stream).

    In the partition's slot, so that ``redeem_voucher.lua`` appends to it in the same call
    that accepts the redemption; ``engine/feed.py`` merges a merchant's ``P`` streams. The
    id is hex-encoded, as in :func:`sync_entries_key`.
    """
    return f"{PREFIX}:{tag(partition)}:merchant-redemptions:{merchant_id.encode().hex()}"


def rate_key(kind: str, subject: str) -> str:
    """A rate limiter's key: one subject (a caller id, a client address) of one ``kind``.

    The key is its own hash tag, so limiters spread over every slot of a cluster instead
    of crowding the partitions' nodes, and the limiter's script touches one slot. The
    subject is hashed: an address is personal data, and no caller id can make this name
    match another pattern or pick another tag.
    """
    digest = hashlib.blake2b(subject.encode(), digest_size=10, person=kind.encode()).hexdigest()
    return f"{PREFIX}:{{rl:{kind}:{digest}}}"
