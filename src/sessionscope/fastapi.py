"""FastAPI integration: one session scope per request, as a dependency.

::

    from sessionscope.fastapi import AsyncSessionDep

    @app.post("/users", status_code=201)
    async def create_user(data: UserIn, db: AsyncSessionDep) -> UserOut:
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
  This holds with plain ``Depends(get_async_db)`` too: it is a plain coroutine
  whose own dependency carries ``scope="function"``.
- Decorated functions (``@async_with_session``) called during the request join
  its session and transaction, as inside ``async_session_scope()``.
- The sync variant (:data:`SyncSessionDep`, :data:`get_sync_db`, for ``def`` path
  functions) gives the same guarantees; sync decorated functions called from the
  path function join its session although FastAPI runs the dependency and the
  path function in different worker threads.

Names say which kind of session they give: ``get_async_db``, ``AsyncSessionDep``
and ``async_session_dependency`` an ``AsyncSession``; ``get_sync_db``,
``SyncSessionDep`` and ``sync_session_dependency`` a ``Session``. The seed's
``get_db``, ``SessionDep`` and ``session_dependency`` are the same objects as the
async ones. A path function that takes the wrong kind directly (a ``def`` path
function, or a parameter annotated ``Session``, given the async dependency; a
parameter annotated ``AsyncSession`` given the sync one) fails its request with a
``TypeError`` naming the right dependency.

Each dependency function is one FastAPI dependency: it is resolved once per
request and cached, and ``app.dependency_overrides[get_db] = ...`` replaces it.

The package root never imports this module, so FastAPI stays an optional extra.
"""

import inspect
import typing
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, cast

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from typing_extensions import Unpack

from ._api import get_default_manager
from ._config import SessionConfig
from ._extras import missing_extra
from ._manager import SessionManager
from ._request import ThreadedRequestScope
from ._types import AS, S, ScopeOptions

try:
    import fastapi
    from fastapi import Depends, params
    from starlette.requests import HTTPConnection
except ImportError as err:
    raise missing_extra("sessionscope.fastapi", "fastapi", err) from err

if "scope" not in inspect.signature(Depends).parameters:
    # Without it the request's scope would end after the response is sent.
    raise ImportError(
        f"sessionscope.fastapi needs FastAPI >= 0.121 (Depends(scope=...)), found "
        f"{fastapi.__version__}: pip install -U 'sessionscope[fastapi]'"
    )

__all__ = [
    "AsyncSessionDep",
    "SessionDep",
    "SyncSessionDep",
    "async_session_dependency",
    "get_async_db",
    "get_db",
    "get_sync_db",
    "session_dependency",
    "sync_session_dependency",
]

_CHECKED_LIMIT = 4096  # path functions remembered per dependency


def _manager_getter(
    manager: SessionManager[Any, Any] | None,
) -> Callable[[], SessionManager[Any, Any]]:
    if manager is None:
        # Looked up per request: the application may set the database up after
        # importing its routes (for instance in a lifespan handler).
        return get_default_manager
    if not isinstance(manager, SessionManager):
        raise TypeError(f"expected a SessionManager or None, got {manager!r}")
    return lambda: manager


def async_session_dependency(
    manager: SessionManager[Any, AS] | None = None, /, **overrides: Unpack[ScopeOptions]
) -> Callable[..., Awaitable[AS]]:
    """Build a FastAPI dependency that yields an ``AsyncSession`` of ``manager``
    (the default manager if None) for the current request, for ``async def``
    path functions. Typed by the manager: a ``SessionManager[Any, SQLModelAsync]``
    gives a dependency of ``SQLModelAsync`` sessions. ``session_dependency`` is
    the same function.

    ``overrides`` are scope options, such as ``read_only=True`` or
    ``isolation_level="SERIALIZABLE"``; they are validated now (``ValueError`` /
    ``TypeError``), not at the first request. Use one dependency function per
    kind of session: two different ones in one request open two sessions.

    ::

        reports = SessionManager("postgresql://reports@db/reports")
        ReportsDep = Annotated[AsyncSession, Depends(async_session_dependency(reports))]
    """
    SessionConfig().merged(overrides)
    get_manager = _manager_getter(manager)
    check = _KindCheck(is_async=True)

    async def request_scope(connection: HTTPConnection) -> AsyncIterator[AS]:
        check(connection, get_async_db)
        async with get_manager().async_session_scope(**overrides) as session:
            yield session

    async def get_async_db(
        session: Annotated[AS, Depends(request_scope, scope="function")],
    ) -> AS:
        return session

    get_async_db.__doc__ = _GET_DB_DOC
    return get_async_db


session_dependency = async_session_dependency
"""The seed-era name of :func:`async_session_dependency` (the same function)."""


def sync_session_dependency(
    manager: SessionManager[S, Any] | None = None, /, **overrides: Unpack[ScopeOptions]
) -> Callable[..., Awaitable[S]]:
    """Build a FastAPI dependency yielding a sync ``Session`` of ``manager`` (the
    default manager if None), for ``def`` path functions; see
    :func:`session_dependency` for ``overrides``.

    FastAPI runs sync code in a thread pool, each step in whatever worker thread
    is free. The request's scope is therefore tied to the request rather than to
    a thread: sync scopes and decorated functions that run for this request, in
    any worker thread, join its session (one at a time, as FastAPI runs them).
    In an ``async def`` path function use :func:`async_session_dependency`
    instead: blocking calls there would stall the event loop.
    """
    SessionConfig().merged(overrides)
    get_manager = _manager_getter(manager)
    check = _KindCheck(is_async=False)

    async def request_scope(connection: HTTPConnection) -> AsyncIterator[S]:
        check(connection, get_sync_db)
        # Runs in the request's task: the worker threads that FastAPI starts later
        # for this request, including the one running the path function, copy
        # this task's context and so join the request's scope.
        request = ThreadedRequestScope(get_manager(), overrides)
        session = await request.open()
        try:
            yield cast(S, session)
        except BaseException as exc:
            await request.close(exc)
            raise
        await request.close()

    async def get_sync_db(
        session: Annotated[S, Depends(request_scope, scope="function")],
    ) -> S:
        return session

    get_sync_db.__doc__ = _GET_SYNC_DB_DOC
    return get_sync_db


class _KindCheck:
    """Refuses, with a clear message, a path function that takes the wrong kind
    of session directly from a dependency: an ``AsyncSession`` in a ``def`` path
    function (it cannot await) or where the parameter says ``Session``, a
    ``Session`` where the parameter says ``AsyncSession``. Each path function is
    inspected once; parameters without such an annotation and sub-dependencies
    are not judged (their code may be right)."""

    __slots__ = ("is_async", "verdicts")

    def __init__(self, *, is_async: bool) -> None:
        self.is_async = is_async
        self.verdicts: dict[Any, str | None] = {}

    def __call__(self, connection: HTTPConnection, dependency: Callable[..., Any]) -> None:
        endpoint = connection.scope.get("endpoint")
        if endpoint is None:
            return
        try:
            verdict = self.verdicts[endpoint]
        except KeyError:
            verdict = self._judge(endpoint, dependency)
            if len(self.verdicts) < _CHECKED_LIMIT:
                self.verdicts[endpoint] = verdict
        except TypeError:  # an unhashable callable object: judge it every time
            verdict = self._judge(endpoint, dependency)
        if verdict is not None:
            raise TypeError(verdict)

    def _judge(self, endpoint: Callable[..., Any], dependency: Callable[..., Any]) -> str | None:
        try:
            signature = inspect.signature(endpoint)
            hints = typing.get_type_hints(endpoint, include_extras=True)
        except Exception:  # annotations FastAPI resolved its own way: nothing to say
            return None
        name = getattr(endpoint, "__qualname__", repr(endpoint))
        for param in signature.parameters.values():
            annotation = hints.get(param.name, param.annotation)
            metadata = getattr(annotation, "__metadata__", ())
            markers = (param.default, *metadata)
            if not any(
                isinstance(m, params.Depends) and m.dependency is dependency for m in markers
            ):
                continue
            declared = annotation.__origin__ if metadata else annotation
            where = f"parameter {param.name!r} of the path function {name}"
            if self.is_async:
                if isinstance(declared, type) and issubclass(declared, Session):
                    return (
                        f"{where} is annotated {declared.__name__}, a sync session, but "
                        "depends on the async session dependency (get_async_db / get_db / "
                        "SessionDep), which gives an AsyncSession: use get_sync_db "
                        "(SyncSessionDep, manager.get_sync_db) for a sync Session"
                    )
                if inspect.isfunction(endpoint) and not inspect.iscoroutinefunction(endpoint):
                    return (
                        f"{where} is a def (sync) path function given an AsyncSession by "
                        "the async session dependency (get_async_db / get_db / SessionDep), "
                        "which it cannot await: use get_sync_db (SyncSessionDep, "
                        "manager.get_sync_db), or make the path function async def"
                    )
            elif isinstance(declared, type) and issubclass(declared, AsyncSession):
                return (
                    f"{where} is annotated {declared.__name__} but depends on the sync "
                    "session dependency (get_sync_db / SyncSessionDep), which gives a "
                    "Session: use get_async_db (AsyncSessionDep, manager.get_async_db)"
                )
        return None


_GET_DB_DOC = """FastAPI dependency: the request's ``AsyncSession``.

Committed after the path function returns and before the response is sent;
rolled back if the path function raises. A failed COMMIT becomes a 5xx response.
"""

_GET_SYNC_DB_DOC = """FastAPI dependency: the request's sync ``Session``, for ``def``
path functions. Committed after the path function returns and before the response
is sent; rolled back if it raises. A failed COMMIT becomes a 5xx response.
"""

get_async_db: Callable[..., Awaitable[AsyncSession]] = async_session_dependency()
"""The request's ``AsyncSession`` of the default manager, for ``async def`` path
functions: ``Depends(get_async_db)``."""

get_db = get_async_db
"""The seed's name of :data:`get_async_db` (the same dependency): ``Depends(get_db)``."""

get_sync_db: Callable[..., Awaitable[Session]] = sync_session_dependency()
"""The request's sync ``Session`` of the default manager, for ``def`` path functions."""

AsyncSessionDep = Annotated[AsyncSession, Depends(get_async_db)]
"""``db: AsyncSessionDep`` in an ``async def`` path function or dependency: the
request's ``AsyncSession``."""

SessionDep = AsyncSessionDep
"""The seed-era name of :data:`AsyncSessionDep` (the same annotation)."""

SyncSessionDep = Annotated[Session, Depends(get_sync_db)]
"""``db: SyncSessionDep`` in a ``def`` path function: the request's ``Session``."""
