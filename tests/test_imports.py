"""The folders import one way (DESIGN.md's table): engine knows nothing of HTTP or
PostgreSQL; api and persister share database/ and never import each other; the verifier
shares nothing with the server. (Only engine/store.py imports redis:
tests/engine/test_store.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
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


# Parsed in a child process: CPython 3.11's ast module can be left with a wrong recursion
# count by an earlier failure in the same process (schemathesis and hypothesis parse deep
# trees), after which every ast.parse raises SystemError.
_LIST_IMPORTS = """
import ast, json, sys
out = {}
for path in sys.argv[1:]:
    found = []
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    out[path] = found
print(json.dumps(out))
"""


def _imports(paths: list[Path]) -> dict[Path, list[tuple[int, str]]]:
    done = subprocess.run(
        [sys.executable, "-c", _LIST_IMPORTS, *map(str, paths)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return {
        Path(p): [(line, name) for line, name in found]
        for p, found in json.loads(done.stdout).items()
    }


@pytest.mark.parametrize("folder", MAY)
def test_a_folder_imports_only_what_the_layout_allows(folder: str) -> None:
    never = (PROJECT - MAY[folder] - {folder}) | NOT_THEIRS[folder]
    imports = _imports(sorted((ROOT / folder).rglob("*.py")))
    offenders = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path, found in imports.items()
        for line, name in found
        if name.split(".")[0] in never
    ]
    assert offenders == []
