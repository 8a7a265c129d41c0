"""The redemptions feed: a merchant's accepted redemptions, in the order they were accepted.

``GET /v1/redemptions`` lets a till learn what the merchant's other tills redeemed.

Where it lives. ``redeem_voucher.lua`` appends each first accepted redemption to a stream of
the merchant's in the voucher's partition (:func:`engine.keys.merchant_feed_key`), in the
same atomic call that accepts it: one hash slot per script, so it works on a Redis Cluster,
and no accepted redemption can be missing from the feed (nor appear in it unaccepted). A
per-merchant key outside the partition would be in another slot; reading PostgreSQL instead
would lag by the persister, and a sequence committed out of order would make a cursor skip.

Reading. A page merges the merchant's streams of the ``P`` partitions by stream id (one
Redis's clock orders them: the order of acceptance on a node, and as near to it as the
nodes' clocks allow on a cluster). The cursor holds, per partition, the last id delivered;
each stream only ever grows at its end (an id is larger than every id before it), so
reading after that id never skips nor repeats an entry, whatever is accepted meanwhile.

Bound, per page (``L`` = limit, ``P`` = partitions, ``c = ceil(L / P)``): the first round
reads ``c`` entries from each of the ``P`` streams, pipelined in one round trip (the usual
page, a few new redemptions, ends there). A stream the merge runs dry on before the page is
full is read again, with twice its last chunk (capped at what the page still needs): before
its k-th refill a stream has given ``c * (2^k - 1)`` entries to the page, so all refills
together number at most ``P``. Hence at most ``2P`` XRANGE calls in at most ``P + 1`` round
trips, and at most ``3L + P`` entries read for ``L`` returned (what is left unread in a
stream's last chunk is at most what it gave plus ``c``). :class:`FeedPage` counts all three
and the tests hold the code to them.

What it costs to keep. An entry is useful to a till only until its voucher expires, which
is at most :data:`RETENTION_MS` after the redemption was accepted: each append trims
entries older than that (``MINID ~``), and each stream expires when the last voucher it
names does. A merchant's feed therefore holds at most one entry (about 100 bytes) per
redemption of its own vouchers accepted in the last 121 days, and nothing once they have all
expired: nothing a merchant sends can grow it beyond its own vouchers.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

from engine import base64url
from engine.deals import MAX_REDEEM_AFTER_END_MS, MAX_WINDOW_MS
from engine.keys import merchant_feed_key
from engine.store import Store
from engine.times import to_rfc3339

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
# A voucher expires at most 120 days after its claim, and a redemption is accepted at
# most a day of clock drift before it: older entries name only expired vouchers.
RETENTION_MS = MAX_WINDOW_MS + MAX_REDEEM_AFTER_END_MS + 86_400_000
# A stream whose entries all name expired vouchers still lives this long (an entry
# accepted after its voucher expired, from an offline log, must not delete the stream).
MIN_TTL_MS = 60_000
# The longest cursor this server returns (P = 1024 partitions at most): refuse longer ones
# unread.
MAX_CURSOR_CHARS = 4096
_CURSOR_VERSION = 1

StreamId = tuple[int, int]  # (ms, seq)


# -- the stored layout: one stream entry --------------------------------------------


def feed_fields(voucher_id: str, redeemed_at_ms: int, device_id: str) -> dict[str, str]:
    """A feed entry's fields, as ``redeem_voucher.lua`` writes them (device '' online)."""
    return {"voucher": voucher_id, "at": str(redeemed_at_ms), "device": device_id}


@dataclass(frozen=True, slots=True)
class FeedItem:
    """One accepted redemption, as the feed hands it out."""

    voucher_id: str
    redeemed_at_ms: int
    device_id: str | None  # None: redeemed online

    def to_json(self) -> dict[str, Any]:
        return {
            "voucher_id": self.voucher_id,
            "redeemed_at": to_rfc3339(self.redeemed_at_ms),
            "device_id": self.device_id,
        }


def parse_feed_entry(fields: dict[str, str]) -> FeedItem:
    """The :class:`FeedItem` of a feed entry's fields (:func:`feed_fields`'s inverse)."""
    return FeedItem(fields["voucher"], int(fields["at"]), fields["device"] or None)


# -- the cursor ----------------------------------------------------------------------


def _parse_id(entry_id: str) -> StreamId:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq)


def _varint(n: int, out: bytearray) -> None:
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if i >= len(data) or shift > 63:
            raise ValueError("truncated")
        byte = data[i]
        i += 1
        n |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            if byte == 0 and shift > 7:
                raise ValueError("not canonical")  # one encoding per cursor
            return n, i


@dataclass(frozen=True, slots=True)
class Cursor:
    """Per partition, the id of the last entry delivered (``None``: nothing yet)."""

    positions: tuple[StreamId | None, ...]

    @classmethod
    def start(cls, partitions: int) -> Cursor:
        return cls((None,) * partitions)

    def encode(self) -> str:
        """Compact: version, count, a base time, then per partition its offset and seq."""
        base = max((p[0] for p in self.positions if p is not None), default=0)
        out = bytearray([_CURSOR_VERSION])
        _varint(len(self.positions), out)
        _varint(base, out)
        for p in self.positions:
            if p is None:
                _varint(0, out)
            else:
                _varint(base - p[0] + 1, out)
                _varint(p[1], out)
        return base64url.encode(bytes(out))

    @classmethod
    def decode(cls, text: str, partitions: int) -> Cursor:
        """A cursor this server returned; ``ValueError`` for anything else."""
        if len(text) > MAX_CURSOR_CHARS:
            raise ValueError("too long")
        data = base64url.decode(text)
        if not data or data[0] != _CURSOR_VERSION:
            raise ValueError("unknown version")
        count, i = _read_varint(data, 1)
        if count != partitions:
            raise ValueError("made for another partition count")
        base, i = _read_varint(data, i)
        positions: list[StreamId | None] = []
        for _ in range(count):
            offset, i = _read_varint(data, i)
            if offset == 0:
                positions.append(None)
                continue
            seq, i = _read_varint(data, i)
            if offset > base + 1 or seq >= 2**64:
                raise ValueError("out of range")
            positions.append((base - offset + 1, seq))
        if i != len(data):
            raise ValueError("trailing bytes")
        return cls(tuple(positions))


# -- reading a page ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FeedPage:
    """A page of the feed, the cursor after it, and what reading it cost."""

    items: list[FeedItem]
    next: Cursor
    xrange_calls: int
    round_trips: int
    entries_read: int


async def read_page(store: Store, merchant_id: str, after: Cursor, limit: int) -> FeedPage:
    """Up to ``limit`` of ``merchant_id``'s accepted redemptions after ``after``, in order.

    See the module's docstring for the order, the cursor and the bound on the work.
    """
    partitions = store.keys.partitions
    if len(after.positions) != partitions or not 1 <= limit <= MAX_LIMIT:
        raise ValueError("cursor or limit out of range")
    keys = [merchant_feed_key(p, merchant_id) for p in range(partitions)]
    delivered = list(after.positions)
    read_to = list(after.positions)
    buffers: list[deque[tuple[StreamId, dict[str, str]]]] = [deque() for _ in keys]
    exhausted = [False] * partitions
    chunk = [math.ceil(limit / partitions)] * partitions
    to_read = list(range(partitions))
    items: list[FeedItem] = []
    calls = round_trips = entries_read = 0
    while True:
        pipe = store.pipeline()
        for p in to_read:
            pos = read_to[p]
            start = "-" if pos is None else f"({pos[0]}-{pos[1]}"
            pipe.xrange(keys[p], start, "+", count=chunk[p])
        replies = await pipe.execute()
        calls += len(to_read)
        round_trips += 1
        for p, entries in zip(to_read, replies, strict=True):
            entries_read += len(entries)
            exhausted[p] = len(entries) < chunk[p]
            for entry_id, fields in entries:
                sid = _parse_id(str(entry_id))
                buffers[p].append((sid, fields))
                read_to[p] = sid
        starved: list[int] = []
        while len(items) < limit:
            starved = [p for p in range(partitions) if not buffers[p] and not exhausted[p]]
            if starved:
                break  # its next entry may come before every other head: read it first
            heads = [p for p in range(partitions) if buffers[p]]
            if not heads:
                break  # caught up
            p = min(heads, key=lambda q: (buffers[q][0][0], q))
            sid, fields = buffers[p].popleft()
            items.append(parse_feed_entry(fields))
            delivered[p] = sid
        if len(items) >= limit or not starved:
            return FeedPage(items, Cursor(tuple(delivered)), calls, round_trips, entries_read)
        need = limit - len(items)
        for p in starved:
            chunk[p] = min(2 * chunk[p], need)
        to_read = starved
