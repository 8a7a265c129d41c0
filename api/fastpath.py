"""Short ways in: the claim (``POST /v1/deals/{id}/claims``) and discovery
(``GET /v1/deals``) dispatched without the router.

In the claim storm's profile, Starlette's router (a regex match per route until the claim
route, the eighth) and its exception middleware were a tenth of a claim's CPU. This
middleware sits inside the metrics middleware and outside those two: it recognises the
claim path by string operations and calls the claim endpoint itself, with the scope the
router would have built (``route``, ``path_params``, ``endpoint``), so that metrics label
it the same. Everything else, and anything the claim endpoint does not answer itself
(an unexpected error), goes the usual way: the app's outermost error handler still turns
a bug into the JSON 500.

Discovery's way in (``ExactPath``) is the same for one method on one exact path; it sits
inside the claim's, so that claims pass no extra check.
"""

from __future__ import annotations

from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

PREFIX = "/v1/deals/"
SUFFIX = "/claims"
PATH = PREFIX + "{deal_id}" + SUFFIX


def claim_deal_id(scope: Scope) -> str | None:
    """The deal id of a request this middleware sends straight to the claim endpoint."""
    if scope["method"] != "POST" or scope.get("root_path"):
        return None
    path: str = scope["path"]
    if not (path.startswith(PREFIX) and path.endswith(SUFFIX)):
        return None
    deal_id = path[len(PREFIX) : -len(SUFFIX)]
    # The route's own pattern is [^/]+: one non-empty segment.
    return deal_id if deal_id and "/" not in deal_id else None


class ClaimFastPath:
    """Pure ASGI middleware: claims straight to their endpoint, the rest to ``app``."""

    def __init__(self, app: ASGIApp, route: Route) -> None:
        self.app = app
        self.route = route
        self.handler = route.app  # the endpoint as ASGI (the claim endpoint is bare ASGI)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        deal_id = claim_deal_id(scope) if scope["type"] == "http" else None
        if deal_id is None:
            await self.app(scope, receive, send)
            return
        scope["route"] = self.route
        scope["endpoint"] = self.route.endpoint
        scope["path_params"] = {"deal_id": deal_id}
        await self.handler(scope, receive, send)


class ExactPath:
    """Pure ASGI middleware: ``method`` on the route's exact path straight to its endpoint,
    the rest to ``app``."""

    def __init__(self, app: ASGIApp, route: Route, method: str, endpoint: ASGIApp) -> None:
        self.app = app
        self.route = route
        self.path = route.path
        self.method = method
        self.handler = endpoint  # the bare ASGI function the route wraps (one call less)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["path"] == self.path
            and scope["method"] == self.method
            and not scope.get("root_path")
        ):
            scope["route"] = self.route
            scope["endpoint"] = self.route.endpoint
            scope["path_params"] = {}
            await self.handler(scope, receive, send)
            return
        await self.app(scope, receive, send)
