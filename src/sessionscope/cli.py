"""Command line: ``sessionscope demo`` (also ``python -m sessionscope demo``)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from ._backend import safe_url
from ._manager import SessionManager

__all__ = ["main"]


def _format_stats(stats: dict[str, Any]) -> str:
    rows = [
        ("sessions opened", f"{stats['session_count']}"),
        ("active sessions", f"{stats['active_sessions']}"),
        ("transactions", f"{stats['total_transactions']}"),
        ("  committed", f"{stats['committed_transactions']}"),
        ("  rolled back", f"{stats['rolled_back_transactions']}"),
        ("  failed", f"{stats['failed_transactions']}"),
        ("success rate", f"{stats['success_rate']:.1f} %"),
        ("savepoints (rolled back)", f"{stats['savepoints']} ({stats['savepoint_rollbacks']})"),
        ("retries", f"{stats['retries']}"),
        ("duration avg / p95 / max", "{:.2f} / {:.2f} / {:.2f} ms".format(
            stats["avg_duration"] * 1000, stats["p95_duration"] * 1000,
            stats["max_duration"] * 1000)),
    ]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"  {label:<{width}}  {value}" for label, value in rows)


def _demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    manager = SessionManager(args.url)
    print(f"sessionscope demo on {safe_url(manager.url)}\n")
    counts = run_demo(manager)
    print(f"\nfinal: {counts['users']} users, {counts['profiles']} profiles\n")
    print("statistics")
    print(_format_stats(manager.get_stats()))
    manager.dispose()
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
    args = parser.parse_args(argv)
    # The library logs warnings (rollbacks, retries) through "sessionscope";
    # show them on stderr, formatted, instead of Python's bare last-resort output.
    logging.basicConfig(level=logging.WARNING, format="   [%(levelname)s %(name)s] %(message)s")
    status: int = args.handler(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
