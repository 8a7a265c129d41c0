"""The verifier runs against a real API served on a socket (the API tests' fixtures)."""

from tests.api.conftest import api, client, make_api  # noqa: F401
