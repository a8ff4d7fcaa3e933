"""Command line: ``sessionscope demo`` and ``sessionscope stats`` (also
``python -m sessionscope ...``). Tables need the ``cli`` extra (rich)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from ._backend import default_url, safe_url
from ._manager import SessionManager

__all__ = ["main"]

_DEFAULT_FILE = "sessionscope.db"


class CommandError(Exception):
    """A failure the command reports in one line (exit status 1)."""


def _print_stats(stats: Mapping[str, Any], title: str) -> None:
    from ._report import console, render_stats

    out = console(highlight=False)
    if not out.is_terminal and "COLUMNS" not in os.environ:
        out.width = 120  # piped or logged: no terminal to fit, keep names whole
    out.print(render_stats(stats, title=title))


def _demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo
    from ._report import console

    console()  # without the cli extra, say so before the demo runs
    manager = SessionManager(args.url)
    print(f"sessionscope demo on {safe_url(manager.url)}\n")
    try:
        counts = run_demo(manager)
        print(f"\nfinal: {counts['users']} users, {counts['profiles']} profiles\n")
        _print_stats(manager.get_stats(), "statistics")
    finally:
        manager.dispose()
    return 0


def _stats(args: argparse.Namespace) -> int:
    if not args.json:
        from ._report import console

        console()  # without the cli extra, say so before fetching or probing
    if args.source is not None:
        snapshot, title = _fetch(args.source), f"sessionscope stats of {args.source}"
    else:
        snapshot, title = _probe(args)
    if args.json:
        print(json.dumps(snapshot, indent=2, sort_keys=True))
    else:
        _print_stats(snapshot, title)
    return 0


def _fetch(source: str) -> dict[str, Any]:
    # A running application's own figures, from the JSON endpoint of
    # sessionscope.stats_endpoint (or any route returning get_session_stats()).
    if not source.startswith(("http://", "https://")):
        raise CommandError(f"--from takes an http:// or https:// URL, got {source!r}")
    request = urllib.request.Request(source, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
    except urllib.error.HTTPError as err:
        raise CommandError(f"cannot read {source}: HTTP {err.code} {err.reason}") from err
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise CommandError(f"cannot read {source}: {reason}") from err
    try:
        snapshot = json.loads(body)
    except ValueError as err:
        raise CommandError(f"{source} did not return JSON statistics") from err
    if not isinstance(snapshot, dict) or "total_transactions" not in snapshot:
        raise CommandError(f"{source} did not return a sessionscope statistics snapshot")
    return snapshot


def _probe(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    url = args.url or os.environ.get("DATABASE_URL")
    if url is None:
        # Probing the embedded default would create the file: only an existing one.
        if not Path(_DEFAULT_FILE).exists():
            raise CommandError(
                "nothing to show: give --from URL (a running application's statistics "
                "endpoint) or --url DATABASE (probe a database), or set DATABASE_URL"
            )
        url = default_url()
    manager = SessionManager(url)
    try:
        for _ in range(args.probes):
            with manager.session_scope(read_only=True) as session:
                session.execute(text("SELECT 1"))
        stats = manager.get_stats()
    finally:
        manager.dispose()
    name = safe_url(manager.url)
    snapshot = {"url": name, **stats}
    return snapshot, f"sessionscope probe of {name} ({args.probes} transactions)"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sessionscope`` command; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="sessionscope", description="Safe SQLAlchemy sessions and transactions."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run a realistic workload and show statistics")
    demo.add_argument(
        "--url", default=None,
        help=f"database URL (default: DATABASE_URL, else the SQLite file {_DEFAULT_FILE})",
    )
    demo.set_defaults(handler=_demo)
    stats = commands.add_parser(
        "stats",
        help="show a running application's statistics, or probe a database",
        description="With --from URL: fetch a running application's statistics from "
        "its JSON endpoint (sessionscope.stats_endpoint.stats_router, or any route "
        "returning get_session_stats()) and show them. With --url (or DATABASE_URL): "
        "run --probes read-only SELECT 1 transactions against that database from this "
        "process and show their figures (durations = the round trip from here) and "
        "this process's pool. Never creates a database file.",
    )
    source = stats.add_mutually_exclusive_group()
    source.add_argument(
        "--from", dest="source", metavar="URL", default=None,
        help="statistics endpoint of a running application, e.g. "
        "http://127.0.0.1:8000/_sessionscope/stats",
    )
    source.add_argument(
        "--url", default=None,
        help="database URL to probe (default: DATABASE_URL, else an existing "
        f"{_DEFAULT_FILE} in this directory)",
    )
    stats.add_argument(
        "--probes", type=int, default=10, help="probe transactions to run (default 10)"
    )
    stats.add_argument("--json", action="store_true", help="print the snapshot as JSON")
    stats.set_defaults(handler=_stats)
    args = parser.parse_args(argv)
    # The command is an application: it shows the library's warnings on stderr,
    # formatted. A probe's failure is reported once, below, not also as a warning.
    logging.basicConfig(level=logging.WARNING, format="   [%(levelname)s %(name)s] %(message)s")
    if args.command == "stats":
        logging.getLogger("sessionscope").setLevel(logging.ERROR)
    try:
        status: int = args.handler(args)
    except CommandError as err:
        print(f"sessionscope {args.command}: {err}", file=sys.stderr)
        return 1
    except Exception as err:
        if isinstance(err, ImportError) and "pip install 'sessionscope[" in str(err):
            print(f"sessionscope {args.command}: {err}", file=sys.stderr)  # an extra
            return 1
        url = getattr(args, "url", None)
        print(
            f"sessionscope {args.command}: cannot use {_target(url)}: {_why(err, url)}",
            file=sys.stderr,
        )
        return 1
    return status


def _target(url: str | None) -> str:
    try:
        return safe_url(url if url is not None else default_url())
    except Exception:  # unparsable: never echo it, it may hold a password
        return "the given --url"


def _why(err: BaseException, url: str | None) -> str:
    """The error's class and the driver's own message, the password hidden."""
    if isinstance(err, ImportError) and err.name:
        return f"driver module {err.name!r} is not installed"
    try:
        make_url(url if url is not None else default_url())
    except Exception:
        # The parser's message quotes the URL, password and all.
        return f"{type(err).__name__}: the URL could not be parsed"
    cause: BaseException = err.orig if isinstance(err, DBAPIError) and err.orig else err
    message = " ".join(str(cause).split())
    if isinstance(err, DBAPIError):
        # SQLAlchemy's text adds the statement and a link; the driver's says why.
        message = message.split("[SQL:")[0].strip()
    return f"{type(cause).__name__}: {_redact(message, url)}" if message else type(cause).__name__


def _redact(message: str, url: str | None) -> str:
    secrets = []
    for candidate in (url, os.environ.get("DATABASE_URL")):
        try:
            password = make_url(candidate).password if candidate else None
        except Exception:
            password = None
        if password:
            secrets.append(str(password))
    for secret in secrets:
        message = message.replace(secret, "***")
    # Whatever else looks like a credential: password=... (conninfo), user:pw@host.
    message = re.sub(r"(?i)(password=)\S+", r"\1***", message)
    return re.sub(r"(://[^:/@\s]+:)[^@\s]+@", r"\1***@", message)


if __name__ == "__main__":
    sys.exit(main())
