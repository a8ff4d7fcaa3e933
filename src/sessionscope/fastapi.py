"""FastAPI integration: one session scope per request, as a dependency.

::

    from sessionscope.fastapi import SessionDep

    @app.post("/users", status_code=201)
    async def create_user(data: UserIn, db: SessionDep) -> UserOut:
        db.add(user := User(name=data.name))
        await db.flush()
        return user                  # COMMIT runs before the response is sent

How a request's scope behaves:

- It is opened when the path function needs it and ends right after the path
  function returns (FastAPI's ``Depends(..., scope="function")``): COMMIT, or
  ROLLBACK if the path function raised (an ``HTTPException`` too), then the
  connection goes back to the pool. The response has been built (serialized
  while the session was still open) but not sent: a failed COMMIT reaches
  FastAPI's error handling and the client gets a 5xx (or what an exception
  handler you registered for the error returns), never a 2xx.
  This holds with plain ``Depends(get_db)`` too: ``get_db`` is a plain coroutine
  whose own dependency carries ``scope="function"``.
- Decorated functions (``@async_with_session``) called during the request join
  its session and transaction, as inside ``async_session_scope()``.
- The sync variant (:data:`SyncSessionDep`, for ``def`` path functions) gives the
  same guarantees; sync decorated functions called from the path function join
  its session although FastAPI runs the dependency and the path function in
  different worker threads.

Each dependency function is one FastAPI dependency: it is resolved once per
request and cached, and ``app.dependency_overrides[get_db] = ...`` replaces it.

The package root never imports this module, so FastAPI stays an optional extra.
"""

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any

try:
    from fastapi import Depends
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "sessionscope.fastapi needs FastAPI: pip install 'sessionscope[fastapi]'"
    ) from err
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from ._manager import SessionManager
from ._request import ThreadedRequestScope, check_options, manager_getter

__all__ = [
    "SessionDep",
    "SyncSessionDep",
    "get_db",
    "get_sync_db",
    "session_dependency",
    "sync_session_dependency",
]


def session_dependency(
    manager: SessionManager | None = None, /, **overrides: Any
) -> Callable[..., Awaitable[AsyncSession]]:
    """Build a FastAPI dependency that yields an ``AsyncSession`` of ``manager``
    (the default manager if None) for the current request.

    ``overrides`` are scope options, such as ``read_only=True`` or
    ``isolation_level="SERIALIZABLE"``; they are validated now (``ValueError`` /
    ``TypeError``), not at the first request. Use one dependency function per
    kind of session: two different ones in one request open two sessions.

    ::

        reports = SessionManager("postgresql://reports@db/reports")
        ReportsDep = Annotated[AsyncSession, Depends(session_dependency(reports))]
    """
    check_options(overrides)
    get_manager = manager_getter(manager)

    async def request_scope() -> AsyncIterator[AsyncSession]:
        async with get_manager().async_session_scope(**overrides) as session:
            yield session

    async def get_db(
        session: Annotated[AsyncSession, Depends(request_scope, scope="function")],
    ) -> AsyncSession:
        return session

    get_db.__doc__ = _GET_DB_DOC
    return get_db


def sync_session_dependency(
    manager: SessionManager | None = None, /, **overrides: Any
) -> Callable[..., Awaitable[Session]]:
    """Build a FastAPI dependency yielding a sync ``Session`` of ``manager`` (the
    default manager if None), for ``def`` path functions; see
    :func:`session_dependency` for ``overrides``.

    FastAPI runs sync code in a thread pool, each step in whatever worker thread
    is free. The request's scope is therefore tied to the request rather than to
    a thread: sync scopes and decorated functions that run for this request, in
    any worker thread, join its session (one at a time, as FastAPI runs them).
    In an ``async def`` path function use :func:`session_dependency` instead:
    blocking calls there would stall the event loop.
    """
    check_options(overrides)
    get_manager = manager_getter(manager)

    async def request_scope() -> AsyncIterator[Session]:
        # Runs in the request's task: the worker threads that FastAPI starts later
        # for this request, including the one running the path function, copy
        # this task's context and so join the request's scope.
        request = ThreadedRequestScope(get_manager(), overrides)
        session = await request.open()
        try:
            yield session
        except BaseException as exc:
            await request.close(exc)
            raise
        await request.close()

    async def get_sync_db(
        session: Annotated[Session, Depends(request_scope, scope="function")],
    ) -> Session:
        return session

    get_sync_db.__doc__ = _GET_SYNC_DB_DOC
    return get_sync_db


_GET_DB_DOC = """FastAPI dependency: the request's ``AsyncSession``.

Committed after the path function returns and before the response is sent;
rolled back if the path function raises. A failed COMMIT becomes a 5xx response.
"""

_GET_SYNC_DB_DOC = """FastAPI dependency: the request's sync ``Session``, for ``def``
path functions. Committed after the path function returns and before the response
is sent; rolled back if it raises. A failed COMMIT becomes a 5xx response.
"""

get_db = session_dependency()
"""The request's ``AsyncSession`` of the default manager: ``Depends(get_db)``."""

get_sync_db = sync_session_dependency()
"""The request's sync ``Session`` of the default manager, for ``def`` path functions."""

SessionDep = Annotated[AsyncSession, Depends(get_db)]
"""``db: SessionDep`` in a path function or dependency: the request's ``AsyncSession``."""

SyncSessionDep = Annotated[Session, Depends(get_sync_db)]
"""``db: SyncSessionDep`` in a ``def`` path function: the request's ``Session``."""
