"""The ``flashsale`` command: one entry point, wiring everything else together.

Each subcommand names its handler in the parser (``set_defaults(handler=...)``); a handler
takes the command's options as keyword arguments and returns its exit code. A command that
cannot go on raises an error that carries its exit code (``exit_code``, an
``engine.errors.ExitCode``), reported here once, in one line:

- bad arguments: argparse's usage message, exit 2;
- bad settings (``SettingsError``) or a refusal to start (``StartupError``): exit 2;
- Redis or PostgreSQL cannot be reached (``Unavailable``): exit 3;
- the command's own findings and failures (reconcile's differences, ``NameLost``): exit 1;
- Ctrl-C: 130.

Anything else is a bug: it keeps its traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from engine.errors import ExitCode, FlashsaleError
from engine.settings import SettingsError, parse_duration_s
from flashsale import wiring
from flashsale.keys import add_commands as add_key_commands
from flashsale.serve import SERVERS

# Options that route the command rather than configure it (not passed to handlers).
_ROUTING = ("command", "action", "handler")


def _duration_s(text: str) -> float:
    try:
        return parse_duration_s(text)
    except SettingsError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# -- handlers: keyword arguments in, exit code out ------------------------------------
# Each imports what it runs, so that `flashsale token` does not load asyncpg or uvicorn.


def _up(*, host: str, port: int, demo: bool, server: str | None) -> int:
    from flashsale.up import up

    return up(host=host, port=port, demo=demo, server=server)


def _serve(*, host: str, port: int, workers: int, server: str | None) -> int:
    from flashsale.serve import serve

    return serve(wiring.resolve(), host, port, workers, server)


def _token(*, role: str, sub: str, ttl_s: float) -> int:
    from api.auth import mint

    print(mint(wiring.resolve().auth_secret or "", sub, role, ttl_s))
    return ExitCode.OK


def _persist() -> int:
    # The long-running persister runs on uvloop (less Python per Redis and PostgreSQL
    # round trip); the short ops commands on the default loop.
    import uvloop

    from persister import cli

    return uvloop.run(cli.persist(wiring.resolve()))


def _migrate() -> int:
    from persister import cli

    return asyncio.run(cli.migrate(wiring.resolve()))


def _replay(*, from_id: str, to_id: str) -> int:
    from persister import cli

    return asyncio.run(cli.replay(wiring.resolve(), from_id=from_id, to_id=to_id))


def _reconcile(*, wait_s: float) -> int:
    from persister import cli

    return asyncio.run(cli.reconcile(wiring.resolve(), wait_s=wait_s))


def _rebuild_redis(*, force: bool) -> int:
    from persister import cli

    return asyncio.run(cli.rebuild_redis(wiring.resolve(), force=force))


def _archive(*, dry_run: bool) -> int:
    from persister import cli

    return asyncio.run(cli.archive(wiring.resolve(), dry_run=dry_run))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flashsale",
        description="Hyperlocal flash-sale backend. Configuration: FLASHSALE_* variables.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    server_help = "HTTP server (default: FLASHSALE_SERVER, else uvicorn)"

    up = sub.add_parser("up", help="embedded Redis and PostgreSQL, migrations, API, persister")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--demo", action="store_true", help="add sample deals, print tokens and curl")
    up.add_argument("--server", choices=SERVERS, help=server_help)
    up.set_defaults(handler=_up)

    serve = sub.add_parser("serve", help="the HTTP API only (uvicorn or granian, uvloop)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1)
    serve.add_argument("--server", choices=SERVERS, help=server_help)
    serve.set_defaults(handler=_serve)

    persist = sub.add_parser(
        "persist", help="the persister only: drain the streams into PostgreSQL"
    )
    persist.set_defaults(handler=_persist)
    migrate = sub.add_parser("migrate", help="apply the database migrations")
    migrate.set_defaults(handler=_migrate)

    replay = sub.add_parser("replay", help="re-apply stream entries to PostgreSQL (idempotent)")
    replay.add_argument("--from", dest="from_id", default="-", help="first stream id (default: -)")
    replay.add_argument("--to", dest="to_id", default="+", help="last stream id (default: +)")
    replay.set_defaults(handler=_replay)

    rec = sub.add_parser("reconcile", help="compare Redis and PostgreSQL; exit 1 on differences")
    rec.add_argument(
        "--wait", dest="wait_s", type=float, default=30.0, help="seconds to wait for the persister"
    )
    rec.set_defaults(handler=_reconcile)

    reb = sub.add_parser("rebuild-redis", help="restore Redis from PostgreSQL after data loss")
    reb.add_argument("--force", action="store_true", help="even if Redis is not empty")
    reb.set_defaults(handler=_rebuild_redis)

    arc = sub.add_parser("archive", help="archive the deals due now (the persister does it too)")
    arc.add_argument("--dry-run", action="store_true", help="only say what would be archived")
    arc.set_defaults(handler=_archive)

    tok = sub.add_parser("token", help="print a caller token (HS256 JWT)")
    tok.add_argument("--role", required=True, choices=("user", "merchant", "admin"))
    tok.add_argument("--sub", required=True)
    tok.add_argument(
        "--ttl", dest="ttl_s", type=_duration_s, default="1h", help="lifetime: 90s, 15m, 1h, 7d"
    )
    tok.set_defaults(handler=_token)

    keys = sub.add_parser("keys", help="voucher signing keys")
    keys_sub = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    add_key_commands(keys_sub)

    # Listed for --help only: main() hands `verifier ...` to verifier/cli.py unparsed.
    sub.add_parser(
        "verifier",
        help="the merchant's offline verifier (see: flashsale verifier -h)",
        add_help=False,
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``flashsale`` command; return its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if argv and argv[0] == "verifier":
        # The verifier runs on a merchant's till: it shares nothing with the server.
        from verifier.cli import main as verifier_main

        return verifier_main(argv[1:])
    options = vars(_parser().parse_args(argv))  # bad arguments: exit 2 (argparse)
    name = " ".join(str(options[k]) for k in ("command", "action") if options.get(k))
    handler = options["handler"]
    kwargs = {k: v for k, v in options.items() if k not in _ROUTING}
    try:
        return int(handler(**kwargs))
    except (FlashsaleError, SettingsError) as exc:
        cause = f" ({exc.__cause__})" if exc.__cause__ else ""
        print(f"flashsale {name}: {exc}{cause}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
