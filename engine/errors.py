"""One tree of errors. Each carries its API ``code`` and HTTP ``status``, and the
``exit_code`` a ``flashsale`` command ends with when it stops on it (``ExitCode``).

    FlashsaleError
    ├── ClientError                      the caller's mistake (4xx)
    │   ├── InvalidJson                  400 invalid_json
    │   ├── Unauthenticated              401 unauthenticated
    │   ├── Forbidden                    403 forbidden
    │   │   └── NotYourVoucher           403 not_your_voucher
    │   ├── NotFound                     404 not_found
    │   │   ├── DealNotFound             404 deal_not_found
    │   │   └── VoucherNotFound          404 voucher_not_found
    │   ├── Conflict                     409 conflict
    │   │   ├── DealCancelled            409 cancelled
    │   │   ├── DealNotStarted           409 not_started
    │   │   ├── DealEnded                409 ended
    │   │   ├── SoldOut                  409 sold_out
    │   │   └── AlreadyRedeemed          409 already_redeemed
    │   ├── RequestTimeout               408 request_timeout
    │   ├── PayloadTooLarge              413 payload_too_large
    │   ├── InvalidRequest               422 invalid_request
    │   │   └── InvalidVoucher           422 invalid_voucher
    │   └── RateLimited                  429 rate_limited
    ├── Unavailable                      a dependency is down (503, retryable; exit 3)
    │   ├── StoreUnavailable             Redis / Valkey cannot be reached
    │   ├── DatabaseUnavailable          PostgreSQL cannot serve now (database/errors.py)
    │   └── BacklogFull                  the stream is at its cap (PostgreSQL away too long)
    ├── StartupError                     refuse to start: a dependency is unsafe to use
    │                                    (exit 2, as a usage error)
    └── StreamGroupMissing               internal: the persister's consumer group is gone
                                         (Redis flushed or restored); it recreates it

405 comes from the router (``api/errors.py``). Our own bugs are not in this tree:
they surface as 500 with a request id.
The persister's commands add three: ``NameTaken`` (every consumer name leased) and
``RedisNotEmpty`` (rebuild without --force) are StartupErrors; ``NameLost`` (another process
took this one's name) is a FlashsaleError, exit 1.
Redis exceptions are translated in ``engine/store.py`` and asyncpg ones in
``database/errors.py``; no other module catches them.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any


class ExitCode(IntEnum):
    """How a ``flashsale`` command ends (API.md); ``flashsale/cli.py`` maps errors to these."""

    OK = 0
    FAILED = 1  # it ran and found a problem (reconcile's differences, a lost consumer name)
    USAGE = 2  # bad arguments or settings, or it refused to start (e.g. needs --force)
    UNAVAILABLE = 3  # a dependency (Redis, PostgreSQL) could not be reached
    INTERRUPTED = 130  # Ctrl-C: 128 + SIGINT, as shells report it


class FlashsaleError(Exception):
    """Base of every error this project raises on purpose."""

    code = "error"
    status = 500
    message = "Something went wrong."
    exit_code = ExitCode.FAILED

    def __init__(self, message: str | None = None, **details: Any) -> None:
        super().__init__(message or self.message)
        self.message = message or self.message
        self.details: dict[str, Any] = details


class ClientError(FlashsaleError):
    status = 400
    code = "bad_request"


class InvalidJson(ClientError):
    status, code, message = 400, "invalid_json", "The request body is not valid JSON."


class Unauthenticated(ClientError):
    status, code, message = 401, "unauthenticated", "A valid bearer token is required."


class Forbidden(ClientError):
    status, code, message = 403, "forbidden", "You may not do this."


class NotYourVoucher(Forbidden):
    code, message = "not_your_voucher", "This voucher belongs to another merchant."


class NotFound(ClientError):
    status, code, message = 404, "not_found", "No such resource."


class DealNotFound(NotFound):
    code, message = "deal_not_found", "No such deal."


class VoucherNotFound(NotFound):
    code, message = "voucher_not_found", "No such voucher."


class Conflict(ClientError):
    status, code = 409, "conflict"


class DealCancelled(Conflict):
    code, message = "cancelled", "This deal was cancelled."


class DealNotStarted(Conflict):
    code, message = "not_started", "This deal has not started yet."


class DealEnded(Conflict):
    code, message = "ended", "This deal has ended."


class SoldOut(Conflict):
    code, message = "sold_out", "This deal is sold out."


class AlreadyRedeemed(Conflict):
    code, message = "already_redeemed", "This voucher was already redeemed."


class RequestTimeout(ClientError):
    status, code = 408, "request_timeout"
    message = "The request body was not received in time."


class PayloadTooLarge(ClientError):
    status, code, message = 413, "payload_too_large", "The request body is over 64 KiB."


class InvalidRequest(ClientError):
    status, code, message = 422, "invalid_request", "The request is not valid."


class InvalidVoucher(InvalidRequest):
    code, message = "invalid_voucher", "This is not a valid voucher."


class RateLimited(ClientError):
    status, code, message = 429, "rate_limited", "Too many requests; retry later."
    retry_after_s = 1  # Retry-After: whole seconds, at least 1 (API.md)

    @classmethod
    def by(cls, kind: str, retry_after_us: int) -> RateLimited:
        """Refused by the ``kind`` limit (``caller``, ``address``) for ``retry_after_us``."""
        retry_s = max(1, -(-retry_after_us // 1_000_000))  # whole seconds, rounded up
        err = cls(
            f"Too many requests from this {kind}; retry in {retry_s} s.",
            retry_after_ms=-(-retry_after_us // 1000),
            limit=kind,
        )
        err.retry_after_s = retry_s
        return err


class Unavailable(FlashsaleError):
    status, code, message = 503, "unavailable", "The service is temporarily unavailable."
    retry_after_s = 1
    exit_code = ExitCode.UNAVAILABLE


class StoreUnavailable(Unavailable):
    # After a timeout the script may have run; it is atomic, so it ran whole or not at all,
    # and a retried claim answers the same voucher.
    message = "The inventory store cannot be reached; retrying is safe."


class DatabaseUnavailable(Unavailable):
    message = "The database cannot be reached."
    retry_after_s = 2


class BacklogFull(Unavailable):
    message = "Too many events are waiting to be persisted; nothing was changed."
    retry_after_s = 5


class StartupError(FlashsaleError):
    """A dependency is unsafe to use (e.g. an evicting Redis): refuse to start."""

    exit_code = ExitCode.USAGE


class StreamGroupMissing(FlashsaleError):
    """A stream has no consumer group of that name (Redis's NOGROUP): Redis lost its data.

    Never answered to a client; the persister recreates the group and reads on.
    """
