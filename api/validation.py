"""Request validation: every bad field named in one 422, nothing trusted unchecked."""

from __future__ import annotations

import math
import re
from typing import Any

from engine.errors import InvalidRequest
from engine.times import parse_rfc3339

# Times we accept leave room for the derived ones (redeem_until = ends_at + 7 days) to
# stay printable as RFC 3339 (years up to 9999).
LAST_MS = 253_399_622_400_000  # 9999-12-01T00:00:00Z
# Identifiers (ids of deals, users, merchants, entries, devices) are URL-safe (API.md).
ID_MAX_CHARS = 64
ID_PATTERN = rf"^[A-Za-z0-9._~-]{{1,{ID_MAX_CHARS}}}$"
ID_RE = re.compile(ID_PATTERN)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # C0 and DEL, but tab and newlines
_QUERY_INT = re.compile(r"[+-]?\d{1,9}")


def valid_id(value: str) -> bool:
    """An identifier: URL-safe, at most 64 characters."""
    return ID_RE.fullmatch(value) is not None


class Fields:
    """Collects per-field problems; ``done()`` raises one 422 naming them all."""

    def __init__(self, body: dict[str, Any], allowed: set[str]) -> None:
        # An optional field sent as null is the same as leaving it out.
        self.body = {k: v for k, v in body.items() if v is not None}
        self.problems: dict[str, str] = {}
        for unknown in sorted(set(body) - allowed):
            self.problems[unknown] = "unknown field"

    def _missing(self, name: str, required: bool) -> bool:
        if name in self.body:
            return False
        if required:
            self.problems[name] = "required"
        return True

    def string(self, name: str, *, required: bool, min_len: int, max_len: int) -> str | None:
        if self._missing(name, required):
            return None
        value = self.body[name]
        if not isinstance(value, str):
            self.problems[name] = "must be a string"
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            self.problems[name] = "must be valid Unicode (no lone surrogates)"
            return None
        if _CONTROL.search(value):
            # PostgreSQL text cannot hold NUL: such a deal would never be persisted.
            self.problems[name] = "must not contain control characters"
            return None
        if not min_len <= len(value) <= max_len:
            self.problems[name] = f"must be {min_len}..{max_len} characters"
            return None
        if min_len > 0 and not value.strip():
            self.problems[name] = "must not be blank"
            return None
        return value

    def number(self, name: str, *, required: bool, low: float, high: float) -> float | None:
        if self._missing(name, required):
            return None
        value = self.body[name]
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.problems[name] = "must be a number"
            return None
        try:
            f = float(value)
        except OverflowError:
            f = math.inf
        if not math.isfinite(f) or not low <= f <= high:
            self.problems[name] = f"must be a number in [{low}, {high}]"
            return None
        return f

    def integer(self, name: str, *, required: bool, low: int, high: int) -> int | None:
        if self._missing(name, required):
            return None
        value = self.body[name]
        if isinstance(value, bool) or not isinstance(value, int):
            self.problems[name] = "must be an integer"
            return None
        if not low <= value <= high:
            self.problems[name] = f"must be an integer in {low}..{high}"
            return None
        return value

    def timestamp(self, name: str, *, required: bool) -> int | None:
        if self._missing(name, required):
            return None
        value = self.body[name]
        if not isinstance(value, str):
            self.problems[name] = "must be an RFC 3339 timestamp string"
            return None
        try:
            ms = parse_rfc3339(value)
        except (ValueError, OverflowError):
            self.problems[name] = (
                "must be an RFC 3339 timestamp with a zone, e.g. 2026-11-24T18:00:00Z "
                "or 2026-11-24T23:30:00+05:30"
            )
            return None
        if ms > LAST_MS:
            self.problems[name] = "must be before 9999-12-01"
            return None
        return ms

    def problem(self, name: str, reason: str) -> None:
        self.problems.setdefault(name, reason)

    def done(self) -> None:
        if self.problems:
            names = ", ".join(sorted(self.problems))
            raise InvalidRequest(f"Invalid fields: {names}.", fields=self.problems)


def query_number(
    params: Any,
    name: str,
    problems: dict[str, str],
    *,
    default: float | None,
    low: float,
    high: float,
    low_open: bool = False,
) -> float | None:
    """A float query parameter within bounds (``low_open``: strictly above ``low``)."""
    raw = params.get(name)
    if raw is None or raw == "":
        if default is None:
            problems[name] = "required"
        return default
    try:
        value = float(raw)
    except ValueError:
        problems[name] = "must be a number"
        return None
    too_low = value <= low if low_open else value < low
    if not math.isfinite(value) or too_low or value > high:
        bracket = "(" if low_open else "["
        problems[name] = f"must be a number in {bracket}{low}, {high}]"
        return None
    return value


def query_int(
    params: Any, name: str, problems: dict[str, str], *, default: int, low: int, high: int
) -> int | None:
    """An integer query parameter within bounds."""
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    if not _QUERY_INT.fullmatch(raw):
        problems[name] = f"must be an integer in {low}..{high}"
        return None
    value = int(raw)
    if not low <= value <= high:
        problems[name] = f"must be an integer in {low}..{high}"
        return None
    return value
