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

Each checkout adds its wait to a running total kept in a context variable
(:func:`waited`): a scope reads it when it begins and when it ends, and the
difference is the time it queued for connections, however many it checked out.
Like any context variable, the total is per thread and per asyncio task (a task
starts from a copy of its creator's total, so its own checkouts are not its
creator's). A scope that ends in another thread or task than it began in (a
generator resumed elsewhere) reads two different totals; a difference that
cannot be its wait (below zero, or longer than the scope) is taken as none.
"""

from __future__ import annotations

from contextvars import ContextVar
from time import perf_counter
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy.engine import Engine
from sqlalchemy.pool import QueuePool

if TYPE_CHECKING:
    from ._stats import Stats

__all__ = ["install", "waited"]

_waited: ContextVar[float] = ContextVar("sessionscope_pool_wait", default=0.0)

waited: Final = _waited.get
"""Seconds the current thread or task has spent acquiring connections from
measured pools so far: a scope's share is the difference between two readings."""


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
        took = perf_counter() - began
        _waited.set(_waited.get() + took)
        for each in type(self)._sessionscope_stats:
            each.pool_waited(took)
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
