"""sessionscope: safe, effortless SQLAlchemy sessions and transactions, sync and async.

Quick start::

    from sessionscope import setup_database_connection, session_scope, with_session

    setup_database_connection("postgresql://app@localhost/app")

    with session_scope() as session:
        session.add(User(name="Ann"))        # committed on exit

    @with_session
    def create_user(session, name):
        session.add(user := User(name=name))
        return user
"""

from typing import TYPE_CHECKING, Any

from ._api import (
    async_session_scope,
    async_with_retry,
    async_with_session,
    configure_session,
    get_default_manager,
    get_session_stats,
    on_commit,
    reset_session_stats,
    session_scope,
    set_rollback,
    setup_database_connection,
    with_retry,
    with_session,
)
from ._config import SessionConfig
from ._errors import (
    ActiveScopeError,
    CommitOutcomeUnknownError,
    NoActiveScopeError,
    NodeUnavailableError,
    PoolExhaustedError,
    ReadOnlyError,
    RollbackOnlyError,
    SessionFactoryNotInitializedError,
    SessionScopeError,
)
from ._manager import SessionManager
from ._retry import error_code, is_transient
from ._types import (
    FunctionStats,
    PoolStats,
    RoutingStats,
    SessionFunction,
    SessionMethod,
    SessionStats,
)
from ._version import __version__ as __version__

if TYPE_CHECKING:
    from .fastapi import get_db


def __getattr__(name: str) -> Any:
    # ``get_db`` is the FastAPI dependency of sessionscope.fastapi, imported on
    # first use so that ``import sessionscope`` never imports FastAPI.
    if name == "get_db":
        from .fastapi import get_db

        globals()["get_db"] = get_db
        return get_db
    raise AttributeError(f"module 'sessionscope' has no attribute {name!r}")


__all__ = [
    "ActiveScopeError",
    "CommitOutcomeUnknownError",
    "FunctionStats",
    "NoActiveScopeError",
    "NodeUnavailableError",
    "PoolExhaustedError",
    "PoolStats",
    "ReadOnlyError",
    "RollbackOnlyError",
    "RoutingStats",
    "SessionConfig",
    "SessionFactoryNotInitializedError",
    "SessionFunction",
    "SessionManager",
    "SessionMethod",
    "SessionScopeError",
    "SessionStats",
    "async_session_scope",
    "async_with_retry",
    "async_with_session",
    "configure_session",
    "error_code",
    "get_db",
    "get_default_manager",
    "get_session_stats",
    "is_transient",
    "on_commit",
    "reset_session_stats",
    "session_scope",
    "set_rollback",
    "setup_database_connection",
    "with_retry",
    "with_session",
]
