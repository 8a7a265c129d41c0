"""Persister commands (placeholders until the persister lands; see issue 5)."""

from __future__ import annotations

import argparse

from engine.settings import Settings


async def _not_yet(settings: Settings, args: argparse.Namespace) -> int:
    print(f"flashsale {args.command}: not available yet")
    return 2


persist = migrate = replay = reconcile = rebuild_redis = _not_yet
