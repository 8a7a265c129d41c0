"""The ASGI entry point for uvicorn workers: ``api.asgi:app_from_env`` (a factory)."""

from __future__ import annotations

from starlette.applications import Starlette

from api.app import create_app
from engine.settings import Settings


def app_from_env() -> Starlette:
    """An app built from the ``FLASHSALE_*`` environment (``flashsale serve`` fills it in)."""
    return create_app(Settings.from_env())
