"""Time to acquire a pooled connection: measured at each checkout, kept per
thread or task, so a transaction's duration can be told apart from the time it
queued for a connection.

Only pools that can make a checkout wait are measured: SQLAlchemy's
``QueuePool`` and ``AsyncAdaptedQueuePool`` (the defaults for server databases
and SQLite files). The pool's class is swapped for a subclass whose
``connect()`` times the checkout; SQLAlchemy's ``Pool.recreate()`` (what
``engine.dispose()`` does) builds the new pool from the same class, so the
measurement survives a dispose. Other pools (``StaticPool``,
``SingletonThreadPool``, ``NullPool``) never queue and are left alone.

Each checkout is kept in a context variable as ``(started, waited)``, the last
:data:`KEEP` of them: a scope ending reads the waits that started after it did
with :func:`waited_since`. A transaction that checks out more connections than
that (many binds, a deep chain of ``requires_new`` scopes) has its earliest
waits left in its duration.
"""

from __future__ import annotations

from contextvars import ContextVar
from time import perf_counter
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy.engine import Engine
from sqlalchemy.pool import QueuePool

if TYPE_CHECKING:
    from ._stats import Stats

__all__ = ["KEEP", "install", "waited_since"]

KEEP: Final = 4
"""Checkouts remembered per thread or task."""

_recent: ContextVar[tuple[tuple[float, float], ...]] = ContextVar(
    "sessionscope_pool_waits", default=()
)


def waited_since(started: float) -> float:
    """Seconds the current thread or task spent acquiring pooled connections in
    checkouts that began at or after ``started`` (a ``time.perf_counter()``)."""
    total = 0.0
    for began, waited in _recent.get():
        if began < started:
            break  # newest first: the rest are older
        total += waited
    return total


def install(engine: Engine, stats: Stats) -> None:
    """Measure checkouts of ``engine``'s pool into ``stats`` (once per pair;
    several managers on one engine each get the figures of the whole pool)."""
    pool = engine.pool
    cls: Any = type(pool)
    if getattr(cls, "_sessionscope_timed", False):
        if stats not in cls._sessionscope_stats:
            cls._sessionscope_stats = (*cls._sessionscope_stats, stats)
        return
    if not isinstance(pool, QueuePool):
        return
    base_connect = cls.connect

    def connect(self: Any) -> Any:
        began = perf_counter()
        connection = base_connect(self)
        waited = perf_counter() - began
        _recent.set(((began, waited), *_recent.get()[: KEEP - 1]))
        for each in type(self)._sessionscope_stats:
            each.pool_waited(waited)
        return connection

    # A class per engine: the stats it reports to travel with the class, so the
    # pool recreate() builds reports to them too. Same name as the original, which
    # is what pool_status() and SQLAlchemy's logging show.
    timed = type(
        cls.__name__,
        (cls,),
        {
            "connect": connect,
            "_sessionscope_timed": True,
            "_sessionscope_stats": (stats,),
            "__qualname__": cls.__qualname__,
            "__module__": cls.__module__,
        },
    )
    pool.__class__ = timed
