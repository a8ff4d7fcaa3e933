"""Render a statistics snapshot as terminal tables for people (the CLI only).

Uses ``rich`` (the ``cli`` extra), imported when a report is rendered, so that
``import sessionscope`` never imports it.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ._extras import missing_extra

if TYPE_CHECKING:
    from rich.console import Console, Group

__all__ = ["console", "format_stats", "pool_rows", "render_stats"]


def console(**options: Any) -> Console:
    """A ``rich`` console (``options`` as for ``rich.console.Console``); raises an
    ``ImportError`` naming the ``cli`` extra when rich is not installed."""
    try:
        from rich.console import Console
    except ImportError as err:
        raise missing_extra("the sessionscope command", "cli", err) from err
    return Console(**options)


def pool_rows(pool: Mapping[str, Any]) -> list[tuple[str, str, str, str, str, str]]:
    """Per engine role: pool class, connections in use, idle, capacity and the
    checkout timeout, as an operator reads them. Capacity is ``size +
    max_overflow`` ("unbounded" for a negative max_overflow); SQLAlchemy's own
    ``overflow`` figure (negative until the pool fills) is not shown."""
    rows = []
    for role, figures in pool.items():
        size, extra = figures.get("size"), figures.get("max_overflow")
        if isinstance(size, int) and isinstance(extra, int):
            capacity = "unbounded" if extra < 0 else str(size + extra)
        else:
            capacity = "-"
        rows.append(
            (
                str(role),
                _cell(figures.get("pool_class")),
                _cell(figures.get("checked_out")),
                _cell(figures.get("checked_in")),
                capacity,
                _cell(figures.get("timeout")),
            )
        )
    return rows


def render_stats(stats: Mapping[str, Any], *, title: str = "sessionscope statistics") -> Group:
    """The snapshot of ``get_session_stats()`` / ``SessionManager.get_stats()`` as
    ``rich`` tables: counters, durations (milliseconds), per-function figures, read
    routing per engine (when the manager has replicas) and pools per engine role.
    Missing keys show as ``-``, so a snapshot from another version still renders."""
    try:
        from rich import box
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text
    except ImportError as err:
        raise missing_extra("the sessionscope command", "cli", err) from err

    def table(title: str, *columns: str) -> Table:
        t = Table(
            title=title,
            title_justify="left",
            title_style="bold",
            box=box.SIMPLE_HEAD,
            min_width=len(title) + 2,
        )
        for i, column in enumerate(columns):
            # Names (first column) wrap in a narrow terminal instead of being cut.
            t.add_column(column, justify="left" if i == 0 else "right", overflow="fold")
        return t

    counters = table("Transactions", "figure", "value")
    for label, value in (
        ("sessions opened", stats.get("session_count")),
        ("active sessions", stats.get("active_sessions")),
        ("transactions", stats.get("total_transactions")),
        ("  committed", stats.get("committed_transactions")),
        ("  rolled back", stats.get("rolled_back_transactions")),
        ("  failed", stats.get("failed_transactions")),
        ("success rate", _percent(stats.get("success_rate"))),
        ("retries", stats.get("retries")),
        ("savepoints", stats.get("savepoints")),
        ("  rolled back", stats.get("savepoint_rollbacks")),
        ("cancellations", stats.get("cancellations")),
        ("slow transactions", stats.get("slow_transactions")),
        ("long-held sessions", stats.get("long_held_sessions")),
        ("pool timeouts", stats.get("pool_timeouts")),
    ):
        counters.add_row(label, _cell(value))
    parts: list[Any] = [Text(title, style="bold underline"), counters]
    retry_errors = stats.get("retry_errors") or {}
    if retry_errors:
        retried = table("Retried errors", "error", "retries")
        for error, count in retry_errors.items():
            retried.add_row(str(error), _cell(count))
        parts.append(retried)
    durations = table("Transaction durations (ms)", "avg", "p95", "max")
    durations.columns[0].justify = "right"
    keys = ("avg_duration", "p95_duration", "max_duration")
    durations.add_row(*(_ms(stats.get(k)) for k in keys))
    parts.append(durations)
    functions = stats.get("functions") or {}
    if functions:
        funcs = table("Decorated functions", "function", "calls", "failures", "avg ms", "max ms")
        for name, f in functions.items():
            funcs.add_row(
                str(name),
                _cell(f.get("calls")),
                _cell(f.get("failures")),
                _ms(f.get("avg_duration")),
                _ms(f.get("max_duration")),
            )
        parts.append(funcs)
    routing = stats.get("routing")
    if isinstance(routing, Mapping) and routing.get("engines"):
        routes = table("Read routing", "engine", "role", "reads", "healthy", "connect failures")
        for name, e in routing["engines"].items():
            routes.add_row(
                str(name),
                _cell(e.get("role")),
                _cell(e.get("reads")),
                _cell(e.get("healthy")),
                _cell(e.get("connect_failures")),
            )
        parts.append(routes)
    pool = stats.get("pool") or {}
    if pool:
        pools = table(
            "Connection pools", "engine", "pool", "in use", "idle", "capacity", "timeout s"
        )
        for row in pool_rows(pool):
            pools.add_row(*row)
        parts.append(pools)
    else:
        parts.append(Text("Connection pools: no engine created yet"))
    return Group(*parts)


def format_stats(
    stats: Mapping[str, Any], *, title: str = "sessionscope statistics", width: int = 100
) -> str:
    """:func:`render_stats` as plain text (no colour), ``width`` columns wide."""
    buffer = io.StringIO()
    out = console(file=buffer, width=width, color_system=None, highlight=False)
    out.print(render_stats(stats, title=title))
    return buffer.getvalue()


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _percent(value: Any) -> str | None:
    return None if value is None else f"{value:.2f} %"


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value * 1000:.3f}"
