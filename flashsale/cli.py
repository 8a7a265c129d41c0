"""The ``flashsale`` command: one entry point, wiring everything else together."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from engine.errors import StartupError
from engine.settings import SettingsError, parse_duration_s
from flashsale.keys import add_commands as add_keys_commands


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flashsale",
        description="Hyperlocal flash-sale backend. Configuration: FLASHSALE_* variables.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="embedded Redis and PostgreSQL, migrations, API, persister")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--demo", action="store_true", help="add sample deals, print tokens and curl")

    serve = sub.add_parser("serve", help="the HTTP API only (uvicorn or granian, uvloop)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1)
    serve.add_argument("--server", choices=("uvicorn", "granian"),
                       help="HTTP server (default: FLASHSALE_SERVER, else uvicorn)")  # fmt: skip

    sub.add_parser("persist", help="the persister only: drain the streams into PostgreSQL")
    sub.add_parser("migrate", help="apply the database migrations")

    replay = sub.add_parser("replay", help="re-apply stream entries to PostgreSQL (idempotent)")
    replay.add_argument("--from", dest="from_id", default="-", help="first stream id (default: -)")
    replay.add_argument("--to", dest="to_id", default="+", help="last stream id (default: +)")

    rec = sub.add_parser("reconcile", help="compare Redis and PostgreSQL; exit 1 on differences")
    rec.add_argument("--wait", type=float, default=30.0, help="seconds to wait for the persister")

    reb = sub.add_parser("rebuild-redis", help="restore Redis from PostgreSQL after data loss")
    reb.add_argument("--force", action="store_true", help="even if Redis is not empty")

    tok = sub.add_parser("token", help="print a caller token (HS256 JWT)")
    tok.add_argument("--role", required=True, choices=("user", "merchant", "admin"))
    tok.add_argument("--sub", required=True)
    tok.add_argument("--ttl", default="1h", help="lifetime, e.g. 90s, 15m, 1h, 7d")

    keys = sub.add_parser("keys", help="voucher signing keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    add_keys_commands(keys_sub)

    sub.add_parser("verifier", help="the merchant's offline verifier (see: flashsale verifier -h)",
                   add_help=False)  # fmt: skip
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if argv and argv[0] == "verifier":
        # The verifier runs on a merchant's till: it shares nothing with the server.
        from verifier.cli import main as verifier_main

        return verifier_main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except (StartupError, SettingsError, ValueError) as exc:
        print(f"flashsale: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    from flashsale import wiring

    if args.command == "up":
        from flashsale.up import up

        return up(args)
    if args.command == "serve":
        from flashsale.serve import serve

        return serve(wiring.resolve(), args.host, args.port, args.workers, args.server)
    if args.command == "token":
        from api.auth import mint

        settings = wiring.resolve()
        print(mint(settings.auth_secret or "", args.sub, args.role, parse_duration_s(args.ttl)))
        return 0
    if args.command == "keys":
        from flashsale import keys

        return keys.run(wiring.resolve(), args)
    import persister.cli as persister_cli

    handler = {
        "persist": persister_cli.persist,
        "migrate": persister_cli.migrate,
        "replay": persister_cli.replay,
        "reconcile": persister_cli.reconcile,
        "rebuild-redis": persister_cli.rebuild_redis,
    }[args.command]
    return persister_cli.run(args.command, handler(wiring.resolve(), args))


if __name__ == "__main__":
    sys.exit(main())
