"""Running the verifier's commands in the test process, and reading what they print."""

from __future__ import annotations

import pytest

from verifier.cli import STATUSES, main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """Run `flashsale verifier ARGV...`; return its exit code and everything it printed."""
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


def counts(out: str) -> dict[str, int]:
    """The per-status counts a sync prints (`accepted: 2` ...)."""
    lines = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    return {name: int(lines[name]) for name in STATUSES}
