"""Unpadded base64url (RFC 4648 §5), as JWS segments and the API's cursors use it."""

from __future__ import annotations

import base64
import re

_ALPHABET = re.compile(r"[A-Za-z0-9_-]*")


def encode(data: bytes) -> str:
    """``data`` as unpadded base64url."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def decode(text: str) -> bytes:
    """Strict unpadded base64url, or a ``ValueError``.

    Refuses padding, any character outside the alphabet, and a last character with its
    unused bits set: each byte string has one encoding, as pyjwt (the till's) requires.
    """
    if not _ALPHABET.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("not base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if encode(data) != text:
        raise ValueError("not the canonical base64url of its bytes")
    return data
