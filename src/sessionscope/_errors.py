"""Exceptions raised by sessionscope.

Every exception derives from :class:`SessionScopeError`, so callers can catch the
library's own failures in one place. Messages state what happened, the relevant
state, and what to do; they never contain a password or a bound parameter.
"""

from __future__ import annotations

from sqlalchemy import exc as sa_exc

__all__ = [
    "ActiveScopeError",
    "CommitOutcomeUnknownError",
    "NoActiveScopeError",
    "NodeUnavailableError",
    "PoolExhaustedError",
    "ReadOnlyError",
    "RollbackOnlyError",
    "SessionFactoryNotInitializedError",
    "SessionScopeError",
]


class SessionScopeError(Exception):
    """Base class of every error raised by sessionscope itself."""


class SessionFactoryNotInitializedError(SessionScopeError, RuntimeError):
    """The default manager was used before ``setup_database_connection()`` ran."""

    def __init__(self, what: str = "the default session manager") -> None:
        super().__init__(
            f"Database session factory is not initialized: {what} was used before "
            "setup. Call sessionscope.setup_database_connection() (or "
            "setup_database_connection(url)) once at start-up, before the first scope."
        )


class NoActiveScopeError(SessionScopeError, RuntimeError):
    """``propagation="mandatory"`` was requested but no outer scope is active."""


class ActiveScopeError(SessionScopeError, RuntimeError):
    """A scope that must be outermost (``propagation="never"``, ``durable=True``)
    was opened inside another scope."""


class RollbackOnlyError(SessionScopeError):
    """The scope would have committed, but was marked rollback-only.

    An exception escaped a joined inner scope (``propagation="required"``), so the
    transaction holds partial work. The scope rolled back instead of committing.
    The original exception is attached as ``__cause__`` when known.
    """


class CommitOutcomeUnknownError(SessionScopeError):
    """The connection was lost while COMMIT was in flight.

    The server may or may not have committed. sessionscope never retries this
    case: re-running the work could apply it twice. Check the data (or use an
    idempotency key) before trying again. The driver error is ``__cause__``.
    """


class PoolExhaustedError(SessionScopeError):
    """No connection could be checked out of the pool before the timeout.

    The message names the pool state (size, checked out, overflow, timeout).
    Usual causes: sessions held open too long, or more concurrent work than
    ``pool_size + max_overflow``. This error is never retried.
    """


class ReadOnlyError(SessionScopeError):
    """A write was attempted in a ``read_only=True`` scope.

    It is refused before anything is sent to the server.
    """


class NodeUnavailableError(SessionScopeError, sa_exc.DisconnectionError):
    """A node of ``primaries=`` refused a new connection or is not ready for
    writes (a Galera node not synced with the cluster, a PostgreSQL standby).

    Nothing ran on it. The node is cooled down, and the error is transient (a
    ``DisconnectionError``), so a retrying boundary runs the unit of work again
    on another node.
    """
