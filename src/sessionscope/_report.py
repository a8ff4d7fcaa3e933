"""Render a statistics snapshot as a plain-text table for people (the CLI)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["format_stats"]

_POOL_COLUMNS = (
    ("pool_class", "pool"),
    ("size", "size"),
    ("checked_in", "checked in"),
    ("checked_out", "checked out"),
    ("overflow", "overflow"),
    ("timeout", "timeout s"),
)


def format_stats(stats: Mapping[str, Any], *, title: str = "sessionscope statistics") -> str:
    """The snapshot of ``get_session_stats()`` / ``SessionManager.get_stats()`` as
    aligned text: counters, durations (milliseconds), per-function figures, read
    routing per engine (when the manager has replicas) and pool status per engine
    role. Missing keys show as ``-``, so a snapshot from an older or newer version
    still renders."""
    lines = [title, "=" * len(title), ""]
    counters = [
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
    ]
    lines += _table(("figure", "value"), [(k, _cell(v)) for k, v in counters])
    retry_errors = stats.get("retry_errors") or {}
    if retry_errors:
        lines += ["", "Retried errors"]
        lines += _table(("error", "retries"), [(k, str(v)) for k, v in retry_errors.items()])
    lines += ["", "Transaction durations (ms)"]
    lines += _table(
        ("avg", "p95", "max"),
        [tuple(_ms(stats.get(k)) for k in ("avg_duration", "p95_duration", "max_duration"))],
    )
    functions = stats.get("functions") or {}
    if functions:
        lines += ["", "Decorated functions"]
        lines += _table(
            ("function", "calls", "failures", "avg ms", "max ms"),
            [
                (
                    name,
                    _cell(f.get("calls")),
                    _cell(f.get("failures")),
                    _ms(f.get("avg_duration")),
                    _ms(f.get("max_duration")),
                )
                for name, f in functions.items()
            ],
        )
    routing = stats.get("routing")
    if isinstance(routing, Mapping) and routing.get("engines"):
        lines += ["", "Read routing"]
        lines += _table(
            ("engine", "role", "reads", "healthy", "connect failures"),
            [
                (
                    name,
                    _cell(e.get("role")),
                    _cell(e.get("reads")),
                    _cell(e.get("healthy")),
                    _cell(e.get("connect_failures")),
                )
                for name, e in routing["engines"].items()
            ],
        )
    pool = stats.get("pool") or {}
    lines += ["", "Connection pools"]
    if pool:
        lines += _table(
            ("engine", *(label for _, label in _POOL_COLUMNS)),
            [
                (role, *(_cell(figures.get(key)) for key, _ in _POOL_COLUMNS))
                for role, figures in pool.items()
            ],
        )
    else:
        lines.append("  (no engine created yet)")
    return "\n".join(lines) + "\n"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=False)]

    def line(cells: Sequence[str]) -> str:
        # First column left-aligned (names), the others right-aligned (numbers).
        parts = [cells[0].ljust(widths[0])]
        parts += [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=False)]
        return "  " + "  ".join(parts).rstrip()

    return [line(headers), "  " + "  ".join("-" * w for w in widths), *map(line, rows)]


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
