"""The flash-sale race's correctness check, kept apart from locust (which monkey-patches
the standard library on import) so that tests and other tools can use it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RaceCounts:
    """What the racers saw: by status, and the voucher ids handed out as new (201)."""

    statuses: dict[str, int] = field(default_factory=dict)
    new_vouchers: set[str] = field(default_factory=set)
    mismatched_retries: int = 0  # a 200 whose voucher differs from the 201 that user got
    server_errors: int = 0  # 5xx answers on any route, by any user class

    def merge(self, data: dict[str, Any]) -> None:
        for status, n in data.get("statuses", {}).items():
            self.statuses[status] = self.statuses.get(status, 0) + n
        self.new_vouchers.update(data.get("new_vouchers", ()))
        self.mismatched_retries += data.get("mismatched_retries", 0)
        self.server_errors += data.get("server_errors", 0)

    def as_message(self) -> dict[str, Any]:
        return {
            "statuses": dict(self.statuses),
            "new_vouchers": sorted(self.new_vouchers),
            "mismatched_retries": self.mismatched_retries,
            "server_errors": self.server_errors,
        }


def race_verdict(counts: RaceCounts, deal: dict[str, Any], fresh: bool = True) -> list[str]:
    """The race's correctness problems (empty when it passed).

    ``fresh``: this run created the deal, so every voucher it issued was seen here.
    """
    problems = []
    # Racers whose claim was decided: a new voucher, or a refusal (sold out).
    racers = len(counts.new_vouchers) + counts.statuses.get("409", 0)
    total, left = int(deal["inventory_total"]), int(deal["inventory_left"])
    issued = len(counts.new_vouchers)
    new_answers = counts.statuses.get("201", 0)
    if counts.server_errors:
        problems.append(f"{counts.server_errors} responses were 5xx")
    if new_answers != issued:
        problems.append(f"{new_answers} answers were 201 but only {issued} distinct vouchers")
    if issued > total:
        problems.append(f"oversold: {issued} vouchers issued for an inventory of {total}")
    if fresh and issued != total - left:
        problems.append(
            f"racers got {issued} new vouchers but the deal counts {total - left} taken"
        )
    if fresh and racers >= total and left != 0:
        problems.append(f"{racers} racers but {left} vouchers left: the deal did not sell out")
    unexpected = {s: n for s, n in counts.statuses.items() if s not in ("200", "201", "409")}
    if unexpected:
        problems.append(f"claims answered other than 200/201/409: {unexpected}")
    if counts.mismatched_retries:
        problems.append(f"{counts.mismatched_retries} retries returned a different voucher")
    return problems
