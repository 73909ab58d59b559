"""The `kubeci` command: serve, run, validate, migrate."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from bot.config import ConfigError, Settings
from bot.logs import setup_logging
from bot.store.db import DB_ERRORS
from bot.store.embedded import EmbeddedPostgresError

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubeci", description="KubeCI: CI/CD for Kubernetes")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run the service: webhooks, workers, outbox sender")
    run = commands.add_parser("run", help="run a pipeline file once and print its progress")
    run.add_argument("file", help="path to a .kubeci.yml file")
    run.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="add or override a run label (repeatable), e.g. --label branch=main",
    )
    run.add_argument("--job", action="append", default=[], help="run only this job (repeatable)")
    run.add_argument(
        "--timeout-s", type=float, default=3600.0, help="give up after this many seconds"
    )
    validate = commands.add_parser("validate", help="check pipeline files; exit 1 on errors")
    validate.add_argument("files", nargs="+")
    validate.add_argument("--format", choices=("text", "json"), default="text")
    commands.add_parser("migrate", help="apply database migrations and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "validate":
        from pipelines_schema.validate import main as validate_main

        return int(validate_main(["--format", args.format, "--", *args.files]))
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"kubeci: {exc}", file=sys.stderr)
        return 2
    level = settings.log_level
    if args.command == "run" and "KUBECI_LOG_LEVEL" not in os.environ:
        level = "WARNING"  # keep the progress lines readable; KUBECI_LOG_LEVEL overrides
    setup_logging(settings.log_format, level)
    try:
        return _run_command(args, settings)
    except ConfigError as exc:
        print(f"kubeci: {exc}", file=sys.stderr)
        return 2
    except EmbeddedPostgresError as exc:
        print(f"kubeci: the embedded database could not start: {exc}", file=sys.stderr)
        return 1
    except DB_ERRORS as exc:
        where = "DATABASE_URL" if settings.database_url else "the embedded database"
        print(f"kubeci: cannot use the database ({exc}); check {where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("kubeci: interrupted", file=sys.stderr)
        return 130


def _run_command(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "run":
        from bot.cli.run import run_command

        return run_command(settings, args.file, args.label, args.job, args.timeout_s)
    if args.command == "serve":
        from bot.cli.serve import serve

        return asyncio.run(serve(settings))
    from bot.cli.serve import migrate_only

    return asyncio.run(migrate_only(settings))
