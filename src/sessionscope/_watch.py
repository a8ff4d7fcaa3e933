"""The long-held session warning: where a session was opened, and the check.

A session open longer than ``long_session_warning`` seconds is logged once at
WARNING with the place that opened it, so pool exhaustion can be traced to the
code holding the connections.

There is no background thread. The check runs on scope activity of the same
manager (a session opening or closing) and when its pool times out, and costs
one float comparison until a deadline has passed. Why: a thread would have to
live in every process (and survive forks) to watch something that matters only
when the application is busy, and a busy application opens scopes all the
time; when the pool runs dry the next scope that opens, or the pool timeout
itself, triggers the warning. A session leaked in a process that then goes
completely idle is reported at the next activity.

Where: for a decorated function its qualified name (free, known at decoration
time); for a ``with`` block the file, line and function of the statement,
found by walking ``sys._getframe`` past this package's own frames (two or three
steps, done only when the warning is enabled).
"""

from __future__ import annotations

import logging
import os
import sys
from types import CodeType, FrameType
from typing import TYPE_CHECKING

from ._stats import Held

if TYPE_CHECKING:
    from ._stats import Stats

__all__ = ["describe", "held", "warn_overdue"]

logger = logging.getLogger("sessionscope")

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def held(started: float, threshold: float, function: str | None) -> Held:
    """A watch record for a session opened now by ``function`` (or by the
    nearest caller outside this package when ``function`` is None)."""
    if function is not None:
        return Held(started, threshold, function)
    frame: FrameType | None
    try:
        frame = sys._getframe(2)
    except ValueError:  # pragma: no cover - called from a very shallow stack
        return Held(started, threshold, None)
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back
    where = (frame.f_code, frame.f_lineno) if frame is not None else None
    return Held(started, threshold, where)


def describe(where: object) -> str:
    """``where`` from :func:`held` as text for a log line."""
    if isinstance(where, str):
        return f"decorated function {where}"
    if isinstance(where, tuple) and len(where) == 2 and isinstance(where[0], CodeType):
        code, line = where
        return f'File "{code.co_filename}", line {line}, in {code.co_name}'
    return "an unknown place"


def warn_overdue(stats: Stats, now: float) -> None:
    """Log, once each, the sessions of ``stats`` open past their threshold."""
    for age, record in stats.overdue(now):
        logger.warning(
            "long-held session: open for %.1f s (long_session_warning %.1f s), opened at %s; "
            "a session keeps its pooled connection until it closes",
            age,
            record.threshold,
            describe(record.where),
        )
