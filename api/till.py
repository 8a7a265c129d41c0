"""The till in a browser: ``/verifier/`` serves the static web app in ``api/static/verifier/``.

Plain files (ES modules, a service worker, a manifest, the vendored QR reader): nothing is
built or rendered here. ``Cache-Control: no-cache`` makes browsers revalidate each file
(its ETag) rather than guess a freshness from its age, so the service worker's background
refresh brings a new release to tills on their next load.
"""

from __future__ import annotations

from pathlib import Path

from starlette.responses import Response
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

TILL_DIR = Path(__file__).parent / "static" / "verifier"


class TillFiles(StaticFiles):
    """Static files that browsers revalidate and never sniff."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response


routes = [Mount("/verifier", app=TillFiles(directory=TILL_DIR, html=True), name="till")]
