"""Command line: ``sessionscope demo`` and ``sessionscope stats`` (also
``python -m sessionscope ...``)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from ._backend import default_url, safe_url
from ._manager import SessionManager
from ._report import format_stats
from ._retry import describe

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    manager = SessionManager(args.url)
    print(f"sessionscope demo on {safe_url(manager.url)}\n")
    counts = run_demo(manager)
    print(f"\nfinal: {counts['users']} users, {counts['profiles']} profiles\n")
    print(format_stats(manager.get_stats(), title="statistics"))
    manager.dispose()
    return 0


def _stats(args: argparse.Namespace) -> int:
    # Statistics live in the process that runs the scopes: this one runs probe
    # transactions, so the figures show the database's latency and pool as this
    # machine sees them. A running application exports its own (prometheus, otel).
    manager = SessionManager(args.url)
    try:
        for _ in range(args.probes):
            with manager.session_scope(read_only=True) as session:
                session.execute(text("SELECT 1"))
        stats = manager.get_stats()
    finally:
        manager.dispose()
    if args.json:
        print(json.dumps({"url": safe_url(manager.url), **stats}, indent=2, sort_keys=True))
    else:
        print(
            format_stats(
                stats,
                title=f"sessionscope stats on {safe_url(manager.url)} ({args.probes} probes)",
            )
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sessionscope`` command; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="sessionscope", description="Safe SQLAlchemy sessions and transactions."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run a realistic workload and show statistics")
    demo.add_argument(
        "--url", default=None,
        help="database URL (default: DATABASE_URL, else the SQLite file sessionscope.db)",
    )
    demo.set_defaults(handler=_demo)
    stats = commands.add_parser(
        "stats",
        help="run probe transactions and show statistics and pool status",
        description="Open --probes read-only scopes running SELECT 1 and show the "
        "statistics of this process (durations = the database's round trip) and the "
        "pool status. A running application's own figures: get_session_stats(), or "
        "the Prometheus / OpenTelemetry exporters.",
    )
    stats.add_argument(
        "--url", default=None,
        help="database URL (default: DATABASE_URL, else the SQLite file sessionscope.db)",
    )
    stats.add_argument(
        "--probes", type=int, default=10, help="probe transactions to run (default 10)"
    )
    stats.add_argument("--json", action="store_true", help="print the snapshot as JSON")
    stats.set_defaults(handler=_stats)
    args = parser.parse_args(argv)
    # The library logs warnings (rollbacks, retries) through "sessionscope";
    # show them on stderr, formatted, instead of Python's bare last-resort output.
    logging.basicConfig(level=logging.WARNING, format="   [%(levelname)s %(name)s] %(message)s")
    try:
        status: int = args.handler(args)
    except (SQLAlchemyError, ImportError, ValueError) as err:
        print(f"sessionscope {args.command}: cannot use {_target(args.url)}: {_why(err)}",
              file=sys.stderr)
        return 1
    return status


def _target(url: str | None) -> str:
    try:
        return safe_url(url if url is not None else default_url())
    except Exception:  # unparsable: never echo it, it may hold a password
        return "the given --url"


def _why(err: BaseException) -> str:
    # Class and code only: an error's text can carry the URL (with its password),
    # SQL or bound parameters. A missing driver is named, so it can be installed.
    if isinstance(err, ImportError) and err.name:
        return f"driver module {err.name!r} is not installed"
    return describe(err)


if __name__ == "__main__":
    sys.exit(main())
