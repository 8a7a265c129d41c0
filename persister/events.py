"""Stream entries -> rows: parse and check every field the Lua scripts write.

Event shapes (all values strings, times in ms since the epoch, Redis's clock):

    deal             deal merchant title desc lat lng total starts ends redeem at
    claim            deal seq voucher user at
    cancel           deal at
    redeem           deal voucher merchant at device entry
    redeem_conflict  deal voucher merchant at device entry first_at

An entry that does not parse is poison: it goes to the dead letters, never into a batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

_INT32_MAX = 2**31 - 1
_INT64_MAX = 2**63 - 1


@dataclass(frozen=True, slots=True)
class Entry:
    """One stream entry as read: its stream, id and fields."""

    stream: str
    id: str
    fields: dict[str, str]


class Malformed(ValueError):
    """An entry whose fields are not what its producer writes."""


def _text(f: dict[str, str], name: str, *, empty_ok: bool = False) -> str:
    value = f.get(name)
    if value is None or (not value and not empty_ok):
        raise Malformed(f"missing field {name!r}")
    return value


def _int(f: dict[str, str], name: str, low: int, high: int) -> int:
    raw = _text(f, name)
    try:
        value = int(raw)
    except ValueError:
        raise Malformed(f"field {name!r} is not an integer: {raw[:40]!r}") from None
    if not low <= value <= high:
        raise Malformed(f"field {name!r} out of range: {value}")
    return value


def _float(f: dict[str, str], name: str, bound: float) -> float:
    raw = _text(f, name)
    try:
        value = float(raw)
    except ValueError:
        raise Malformed(f"field {name!r} is not a number: {raw[:40]!r}") from None
    if not math.isfinite(value) or abs(value) > bound:
        raise Malformed(f"field {name!r} out of range: {value}")
    return value


def _ms(f: dict[str, str], name: str) -> int:
    return _int(f, name, 0, _INT64_MAX // 1000)


@dataclass(slots=True)
class Rows:
    """A batch's rows as column arrays, ready for ``unnest``; plus where each came from."""

    deals: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    cancels: dict[str, int] = field(default_factory=dict)
    # Vouchers issued (``claim`` events): deal, seq, voucher, user, at, stream, entry id
    vouchers: list[tuple[str, int, str, str, int, str, str]] = field(default_factory=list)
    # voucher, deal, merchant, at, device, entry
    redeems: list[tuple[str, str, str, int, str, str]] = field(default_factory=list)
    # voucher, deal, merchant, at, device, entry, first_at
    conflicts: list[tuple[str, str, str, int, str, str, int | None]] = field(default_factory=list)

    def __len__(self) -> int:
        return (
            len(self.deals)
            + len(self.cancels)
            + len(self.vouchers)
            + len(self.redeems)
            + len(self.conflicts)
        )

    def add(self, entry: Entry) -> None:
        """Add one entry's row; ``Malformed`` if it is not a well-formed event."""
        f = entry.fields
        kind = f.get("type")
        if kind == "claim":
            self.vouchers.append(
                (
                    _text(f, "deal"),
                    _int(f, "seq", 1, _INT32_MAX),
                    _text(f, "voucher"),
                    _text(f, "user"),
                    _ms(f, "at"),
                    entry.stream,
                    entry.id,
                )
            )
        elif kind == "deal":
            deal_id = _text(f, "deal")
            row = (
                deal_id,
                _text(f, "merchant"),
                _text(f, "title"),
                _text(f, "desc", empty_ok=True),
                _float(f, "lat", 90.0),
                _float(f, "lng", 180.0),
                _int(f, "total", 0, _INT32_MAX),
                _ms(f, "starts"),
                _ms(f, "ends"),
                _ms(f, "redeem"),
                _ms(f, "at"),
            )
            self.deals.setdefault(deal_id, row)  # a deal is created once: first wins
        elif kind == "cancel":
            deal_id, at = _text(f, "deal"), _ms(f, "at")
            self.cancels[deal_id] = min(at, self.cancels.get(deal_id, at))
        elif kind == "redeem":
            self.redeems.append(
                (
                    _text(f, "voucher"),
                    _text(f, "deal"),
                    _text(f, "merchant"),
                    _ms(f, "at"),
                    _text(f, "device", empty_ok=True),
                    _text(f, "entry", empty_ok=True),
                )
            )
        elif kind == "redeem_conflict":
            self.conflicts.append(
                (
                    _text(f, "voucher"),
                    _text(f, "deal"),
                    _text(f, "merchant"),
                    _ms(f, "at"),
                    _text(f, "device", empty_ok=True),
                    _text(f, "entry", empty_ok=True),
                    _ms(f, "first_at") if f.get("first_at") else None,
                )
            )
        else:
            raise Malformed(f"unknown event type {str(kind)[:40]!r}")


# rows, the entries they came from, the malformed entries with their errors
Parsed = tuple[Rows, list[Entry], list[tuple[Entry, str]]]


def parse(entries: list[Entry]) -> Parsed:
    """Split entries into rows, the entries they came from, and the malformed ones."""
    rows = Rows()
    good: list[Entry] = []
    bad: list[tuple[Entry, str]] = []
    for entry in entries:
        try:
            rows.add(entry)
        except Malformed as exc:
            bad.append((entry, str(exc)))
        else:
            good.append(entry)
    return rows, good, bad
