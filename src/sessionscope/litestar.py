"""Litestar integration: one session scope per request, as a plugin.

::

    from litestar import Litestar, post
    from sessionscope.litestar import SessionDep, SessionScopePlugin, SyncSessionDep

    @post("/users/{name:str}")
    async def create_user(name: str, db_session: SessionDep) -> dict[str, int]:
        db_session.add(user := User(name=name))
        await db_session.flush()
        return {"id": user.id}          # COMMIT runs before the response is sent

    @post("/sync/users/{name:str}", sync_to_thread=True)
    def create_user_sync(name: str, db_sync_session: SyncSessionDep) -> None:
        db_sync_session.add(User(name=name))

    app = Litestar([create_user, create_user_sync], plugins=[SessionScopePlugin()])

How a request's scope behaves:

- The plugin's middleware opens it before the handler runs, in the request's
  task: an ``AsyncSession`` for an ``async def`` handler (dependency
  ``db_session``, typed :data:`SessionDep`), a sync ``Session`` for a ``def``
  handler (``db_sync_session``, typed :data:`SyncSessionDep`).
  Decorated functions the handler calls join it; in a sync handler run with
  ``sync_to_thread=True`` too, although it runs in a worker thread.
- It ends when the response starts, before ``http.response.start`` is sent.
  When the handler raised (Litestar's ``after_exception`` hook reports it), it
  rolls back: quietly if Litestar answers below 500 (an ``HTTPException(404)``:
  counted as rolled back, not failed), as a failure otherwise. A returned
  response rolls back quietly from ``rollback_from_status`` (400) on, and
  commits below it.
- A failed COMMIT goes to Litestar's exception handling as if the handler had
  raised it: a 500, or what your exception handler for it returns (an
  ``IntegrityError`` handler answering 409, say), never a 2xx.

The package root never imports this module, so Litestar stays an optional extra.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any, TypeAlias

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from ._extras import missing_extra
from ._manager import SessionManager
from ._request import (
    ASGIApp,
    AsyncRequestScope,
    Receive,
    Send,
    ThreadedRequestScope,
    check_options,
    manager_getter,
    serve_asgi,
)

try:
    from litestar.config.app import AppConfig
    from litestar.di import NamedDependency, Provide
    from litestar.plugins import InitPluginProtocol
    from litestar.types import Scope
    from litestar.utils.scope.state import ScopeState
except ImportError as err:
    raise missing_extra("sessionscope.litestar", "litestar", err) from err

__all__ = ["SessionDep", "SessionScopePlugin", "SyncSessionDep"]

SessionDep: TypeAlias = NamedDependency[AsyncSession]
"""``db_session: SessionDep`` in an ``async def`` handler: the request's ``AsyncSession``
(the parameter's name is the dependency's: ``db_session`` by default)."""

SyncSessionDep: TypeAlias = NamedDependency[Session]
"""``db_sync_session: SyncSessionDep`` in a sync handler: the request's ``Session``."""

_SESSION = "sessionscope.session"
_ERROR = "sessionscope.error"


class SessionScopePlugin(InitPluginProtocol):
    """Give each HTTP request of a Litestar application a session scope of
    ``manager`` (the default manager, looked up per request, if None).

    ``overrides`` are scope options (``read_only=True``, ...), validated now.
    Handlers receive the session through the dependencies named
    ``session_key`` (``AsyncSession``, async handlers) and ``sync_session_key``
    (``Session``, sync handlers). Responses with a status of
    ``rollback_from_status`` or more roll back.
    """

    def __init__(
        self,
        manager: SessionManager | None = None,
        *,
        session_key: str = "db_session",
        sync_session_key: str = "db_sync_session",
        rollback_from_status: int = 400,
        **overrides: Any,
    ) -> None:
        check_options(overrides)
        self._get_manager = manager_getter(manager)
        self._session_key = session_key
        self._sync_session_key = sync_session_key
        self._rollback_from_status = rollback_from_status
        self._overrides = overrides

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        """Register the middleware, the two dependencies and the exception hook."""
        app_config.middleware.append(self._middleware)  # type: ignore[arg-type]
        app_config.dependencies[self._session_key] = Provide(
            _provide_session, sync_to_thread=False
        )
        app_config.dependencies[self._sync_session_key] = Provide(
            _provide_sync_session, sync_to_thread=False
        )
        app_config.after_exception.append(_record_error)
        app_config.signature_namespace.update({"AsyncSession": AsyncSession, "Session": Session})
        return app_config

    def _middleware(self, app: ASGIApp) -> ASGIApp:
        async def request_scope(
            scope: MutableMapping[str, Any], receive: Receive, send: Send
        ) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            handler = scope.get("route_handler")
            request: AsyncRequestScope | ThreadedRequestScope
            if handler is not None and (handler.has_sync_callable or handler.sync_to_thread):
                request = ThreadedRequestScope(self._get_manager(), self._overrides)
            else:
                request = AsyncRequestScope(self._get_manager(), self._overrides)
            scope[_SESSION] = await request.open()
            await serve_asgi(
                app,
                scope,
                receive,
                send,
                request,
                rollback_from_status=self._rollback_from_status,
                error_of=lambda: scope.get(_ERROR),
                before_raising=lambda err: _response_not_started(scope),
            )

        return request_scope


def _response_not_started(scope: MutableMapping[str, Any]) -> None:
    # Litestar's route-level exception middleware marked the response started
    # when the handler's response was passed to send(); nothing was sent (the
    # COMMIT failed first), so the app-level handler may still answer.
    ScopeState.from_scope(scope).response_started = False  # type: ignore[arg-type]


async def _record_error(exc: Exception, scope: Any) -> None:
    scope.setdefault(_ERROR, exc)


def _provide_session(scope: Scope) -> AsyncSession:
    session = scope.get(_SESSION)
    if not isinstance(session, AsyncSession):
        raise RuntimeError(
            "no sessionscope AsyncSession for this request: a sync handler gets a "
            "sync Session (db_sync_session), or SessionScopePlugin is not installed"
        )
    return session


def _provide_sync_session(scope: Scope) -> Session:
    session = scope.get(_SESSION)
    if not isinstance(session, Session):
        raise RuntimeError(
            "no sessionscope Session for this request: an async handler gets an "
            "AsyncSession (db_session), or SessionScopePlugin is not installed"
        )
    return session
