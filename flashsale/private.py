"""Files and directories for their owner alone: secrets, credentials, server data.

A generated secret is written once (mode 0600, in a 0700 directory) and read back on
every later run, so that restarted servers and commands run from another terminal
agree on it. Directories above the one asked for are never touched (only created when
missing, with the usual mode).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from pathlib import Path

# Bytes of randomness in a generated server password (token_urlsafe: ~1.3 characters each).
PASSWORD_BYTES = 32


def private_dir(path: Path) -> Path:
    """``path`` as a directory only its owner can enter (0700), created if missing."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.stat().st_mode & 0o777 != 0o700:
        path.chmod(0o700)
    return path


def _private_temp(directory: Path, data: bytes) -> Path:
    fd, name = tempfile.mkstemp(dir=private_dir(directory), prefix=".tmp-")  # mode 0600
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return Path(name)


def write_private(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically with ``data``, mode 0600 from its creation."""
    tmp = _private_temp(path.parent, data)
    try:
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def secret_file(path: Path, nbytes: int = PASSWORD_BYTES) -> str:
    """The secret kept in ``path``, generated with ``secrets.token_urlsafe`` the first time.

    Two processes generating at once agree: the first file linked into place wins.
    """
    if not path.exists():
        tmp = _private_temp(path.parent, secrets.token_urlsafe(nbytes).encode())
        try:
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            tmp.unlink()
    return path.read_text().strip()
