"""The folders import one way (DESIGN.md's table): engine knows nothing of HTTP or
PostgreSQL; api and persister share database/ and never import each other; the verifier
shares nothing with the server. (Only engine/store.py imports redis:
tests/engine/test_store.py.)"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROJECT = {"engine", "database", "api", "persister", "verifier", "flashsale", "loadtest"}
# folder: the project folders it may import (flashsale, loadtest and tests: any)
MAY: dict[str, set[str]] = {
    "engine": set(),
    "database": {"engine"},
    "api": {"engine", "database"},
    "persister": {"engine", "database"},
    "verifier": set(),
}
# folder: third-party packages that belong to another folder's job
NOT_THEIRS: dict[str, set[str]] = {
    "engine": {"asyncpg", "starlette", "uvicorn", "granian"},  # no PostgreSQL, no HTTP
    "database": {"starlette"},
    "api": {"asyncpg"},  # PostgreSQL through database/ only
    "persister": {"starlette"},
    "verifier": {"asyncpg", "redis", "starlette"},  # a till holds none of the server
}


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


@pytest.mark.parametrize("folder", MAY)
def test_a_folder_imports_only_what_the_layout_allows(folder: str) -> None:
    never = (PROJECT - MAY[folder] - {folder}) | NOT_THEIRS[folder]
    offenders = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in sorted((ROOT / folder).rglob("*.py"))
        for line, name in _imports(path)
        if name.split(".")[0] in never
    ]
    assert offenders == []
