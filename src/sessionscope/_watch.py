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
found by ``sys._getframe`` (walking past this package's own frames, for
framework entry points such as ``get_db``, and ``contextlib``'s, for an
``ExitStack``), done only when the warning is enabled.
"""

from __future__ import annotations

import contextlib
import logging
import os
from types import CodeType, FrameType
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from ._stats import Stats

__all__ = ["OUTSIDE", "describe", "warn_overdue", "where"]

logger = logging.getLogger("sessionscope")

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_CONTEXTLIB = contextlib.__file__


def where(caller: FrameType | None, code: CodeType | None, at: int) -> tuple[object, int]:
    """Where a ``with`` scope's session is being opened, as ``(place, offset)``:
    ``(code, instruction offset)`` of the nearest frame outside this package and
    ``contextlib`` (an ``ExitStack``, a ``@contextmanager`` helper's machinery)
    from ``caller`` (the frame that entered the scope) outwards; ``(None, -1)``
    if there is none. ``code`` and ``at`` are the caller's ``f_code`` and
    ``f_lasti``, which the scope has read already (reading a frame's attributes
    is not cheap). A decorated function's place is its name, ``(name, -1)``,
    which the scope gives without asking."""
    frame = caller
    while frame is not None and code is not None:
        outside = OUTSIDE.get(code.co_filename)
        if outside is None:
            outside = _outside(code.co_filename)
        if outside:
            # The instruction offset, not f_lineno: working out a line number
            # decodes the code's line table, which costs more than the rest of
            # a scope's bookkeeping; describe() does it for the rare session
            # reported.
            return code, at
        frame = frame.f_back
        if frame is not None:
            code, at = frame.f_code, frame.f_lasti
    return None, -1


OUTSIDE: Final[dict[str, bool]] = {}
"""Source files by whether they are outside this package and ``contextlib``
(the files :func:`where` names): a dict lookup instead of two string tests per
scope, which a scope may make itself before calling :func:`where`, for its
usual answer. Bounded: a program has so many source files, and past the limit
the answer is worked out each time."""
_OUTSIDE_LIMIT = 4096


def _outside(filename: str) -> bool:
    # ExitStack.enter_context, @contextmanager: the code that called them
    # is what the warning names.
    outside = not filename.startswith(_PACKAGE_DIR) and filename != _CONTEXTLIB
    if len(OUTSIDE) < _OUTSIDE_LIMIT:
        OUTSIDE[filename] = outside
    return outside


def describe(where: tuple[object, int]) -> str:
    """``(place, offset)`` from :func:`where` as text for a log line."""
    place, offset = where
    if isinstance(place, str):
        return f"decorated function {place}"
    if isinstance(place, CodeType):
        return f'File "{place.co_filename}", line {_line_at(place, offset)}, in {place.co_name}'
    return "an unknown place"


def _line_at(code: CodeType, offset: int) -> int | None:
    """The source line of the instruction at ``offset`` in ``code``."""
    for start, end, line in code.co_lines():
        if start <= offset < end:
            return line
    return None


def warn_overdue(stats: Stats, now: float) -> None:
    """Log, once each, the sessions of ``stats`` open past their threshold."""
    for age, threshold, opened_at in stats.overdue(now):
        logger.warning(
            "long-held session: open for %.1f s (long_session_warning %.1f s), opened at %s; "
            "a session keeps its pooled connection until it closes",
            age,
            threshold,
            describe(opened_at),
        )
