"""Starlette integration: one session scope per HTTP request, as pure ASGI middleware.

::

    from starlette.middleware import Middleware
    from sessionscope.starlette import SessionScopeMiddleware, get_session

    async def create_user(request):
        db = get_session(request)
        db.add(User(name=(await request.json())["name"]))
        return JSONResponse({}, status_code=201)  # COMMIT runs before it is sent

    app = Starlette(routes=[...], middleware=[Middleware(SessionScopeMiddleware)])

How a request's scope behaves:

- It is opened before the application runs and ended when the application
  starts its response, before ``http.response.start`` is passed on: COMMIT for a
  status below ``rollback_from_status`` (400), ROLLBACK otherwise (an
  ``HTTPException`` has become its response by then: a quiet rollback, counted as
  rolled back, not failed). An exception escaping the application rolls back.
- A failed COMMIT is raised instead of sending the response: Starlette's
  ``ServerErrorMiddleware`` answers 500 (or your handler for ``500`` /
  ``Exception``), never a 2xx.
- Decorated functions called by the endpoint join the request's session. Add this
  middleware last in the list (innermost): a ``BaseHTTPMiddleware`` inside it
  runs the endpoint in another task, where the request's scope is not visible.
- ``sync=True`` gives ``def`` endpoints (run in Starlette's thread pool) a sync
  ``Session`` instead, which sync decorated functions in those threads join.

The package root never imports this module, so Starlette stays an optional extra.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

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
    from starlette.requests import HTTPConnection
except ImportError as err:
    raise missing_extra("sessionscope.starlette", "starlette", err) from err

__all__ = ["SessionScopeMiddleware", "get_session", "get_sync_session"]

_ASYNC_KEY = "sessionscope.session"
_SYNC_KEY = "sessionscope.sync_session"


class SessionScopeMiddleware:
    """ASGI middleware giving each HTTP request a session scope of ``manager`` (the
    default manager, looked up per request, if None).

    ``overrides`` are scope options (``read_only=True``, ``isolation_level=...``),
    validated now. ``sync=True`` opens a sync ``Session`` (read it with
    :func:`get_sync_session`) for ``def`` endpoints; otherwise an ``AsyncSession``
    (:func:`get_session`). Responses with a status of ``rollback_from_status`` or
    more roll back. WebSocket and lifespan traffic passes through untouched.
    """

    def __init__(
        self,
        app: ASGIApp,
        manager: SessionManager | None = None,
        *,
        sync: bool = False,
        rollback_from_status: int = 400,
        **overrides: Any,
    ) -> None:
        check_options(overrides)
        self.app = app
        self._get_manager = manager_getter(manager)
        self._sync = sync
        self._rollback_from_status = rollback_from_status
        self._overrides = overrides

    async def __call__(
        self, scope: MutableMapping[str, Any], receive: Receive, send: Send
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request: AsyncRequestScope | ThreadedRequestScope
        if self._sync:
            request = ThreadedRequestScope(self._get_manager(), self._overrides)
            scope[_SYNC_KEY] = await request.open()
        else:
            request = AsyncRequestScope(self._get_manager(), self._overrides)
            scope[_ASYNC_KEY] = await request.open()
        await serve_asgi(
            self.app,
            scope,
            receive,
            send,
            request,
            rollback_from_status=self._rollback_from_status,
        )


def get_session(connection: HTTPConnection) -> AsyncSession:
    """The request's ``AsyncSession``, opened by :class:`SessionScopeMiddleware`.

    Raises ``RuntimeError`` when the middleware is not installed for this route or
    was installed with ``sync=True``.
    """
    session = connection.scope.get(_ASYNC_KEY)
    if not isinstance(session, AsyncSession):
        raise RuntimeError(
            "no sessionscope request session: add "
            "Middleware(SessionScopeMiddleware) to the application"
            + (" (it was added with sync=True: use get_sync_session)" if _SYNC_KEY in
               connection.scope else "")
        )
    return session


def get_sync_session(connection: HTTPConnection) -> Session:
    """The request's sync ``Session``, opened by ``SessionScopeMiddleware(sync=True)``,
    for ``def`` endpoints. Raises ``RuntimeError`` when there is none."""
    session = connection.scope.get(_SYNC_KEY)
    if not isinstance(session, Session):
        raise RuntimeError(
            "no sessionscope sync request session: add "
            "Middleware(SessionScopeMiddleware, sync=True) to the application"
        )
    return session
