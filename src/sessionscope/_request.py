"""The request-scope contract shared by every web framework adapter.

One request, one scope: it is opened before the handler runs, and ended (COMMIT
or ROLLBACK, then close) *before* the response is sent, so a failed COMMIT can
still become a 5xx. Decorated functions called during the request join its
session, and sync code that a framework runs in worker threads joins it too:
the request binds :data:`_core.worker_key`, so every thread running for it is
identified by the request rather than by the thread.

Three drivers of such a scope, by where the framework runs the request:

- :class:`AsyncRequestScope`: an ``AsyncSession``, opened and ended in the
  request's task.
- :class:`ThreadedRequestScope`: a sync ``Session`` for an asyncio server that
  runs sync handlers in worker threads. Entered and exited in a worker thread,
  in one context of its own; bound to the request for every thread.
- :class:`SyncRequestScope`: a sync ``Session`` for a WSGI request, opened and
  ended in the request's thread.

:func:`serve_asgi` runs an ASGI application around one of the async drivers and
ends the scope when the application sends ``http.response.start``, before that
message goes out. Every driver ends at most once; ``close`` after the first is a
no-op, so a framework's safety-net hook can always call it.
"""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

from . import _core
from ._api import get_default_manager
from ._config import SessionConfig
from ._manager import SessionManager

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager, AbstractContextManager
    from contextvars import Token

    from sqlalchemy.ext.asyncio import AsyncSession
    from sqlalchemy.orm import Session


__all__ = [
    "ASGIApp",
    "AsyncRequestScope",
    "SyncRequestScope",
    "ThreadedRequestScope",
    "check_options",
    "manager_getter",
    "serve_asgi",
]

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]


def manager_getter(manager: SessionManager | None) -> Callable[[], SessionManager]:
    """A function returning ``manager``, or the default manager looked up per
    request when None: an application may set the database up after building
    its routes (in a lifespan handler, an app factory)."""
    if manager is None:
        return get_default_manager
    if not isinstance(manager, SessionManager):
        raise TypeError(f"expected a SessionManager or None, got {manager!r}")
    return lambda: manager


def check_options(overrides: Mapping[str, Any]) -> None:
    """Validate scope options now (``ValueError`` / ``TypeError``), not at the
    first request."""
    SessionConfig().merged(overrides)


class AsyncRequestScope:
    """A request's ``AsyncSession`` scope; :meth:`open` and :meth:`close` run in
    the request's task."""

    __slots__ = ("_manager", "_overrides", "_scope", "closed")

    def __init__(self, manager: SessionManager, overrides: Mapping[str, Any]) -> None:
        self._manager = manager
        self._overrides = overrides
        self._scope: AbstractAsyncContextManager[AsyncSession, None] | None = None
        self.closed = False

    async def open(self) -> AsyncSession:
        """Enter the scope (no connection is taken before the first statement)."""
        self._scope = self._manager.async_session_scope(**self._overrides)
        return await self._scope.__aenter__()

    async def close(self, exc: BaseException | None = None, *, rollback: bool = False) -> None:
        """End the scope: ROLLBACK if ``exc`` is given (its cleanup errors are
        logged, never raised over it) or ``rollback`` is true (a quiet rollback,
        counted as rolled back, not failed); otherwise COMMIT, whose failure is
        raised. No-op once closed or if never opened."""
        scope = self._scope
        if self.closed or scope is None:
            return
        self.closed = True
        if exc is None:
            if rollback:
                self._manager.set_rollback(True)
            await scope.__aexit__(None, None, None)
        else:
            await scope.__aexit__(type(exc), exc, exc.__traceback__)


class ThreadedRequestScope:
    """A request's sync ``Session`` scope for an asyncio server that runs sync
    code in worker threads (FastAPI ``def`` path functions, Starlette and
    Litestar sync handlers).

    :meth:`open` and :meth:`close` are awaited in the request's task, in the same
    context (a framework's dependency generator or middleware guarantees it).
    :meth:`open` binds the request (``worker_key``) and makes the scope the
    innermost one of the task's context, so the worker threads started later for
    this request (they copy that context) join it, one at a time.
    """

    __slots__ = (
        "_context",
        "_key_token",
        "_manager",
        "_overrides",
        "_scope",
        "_stack_token",
        "closed",
    )

    def __init__(self, manager: SessionManager, overrides: Mapping[str, Any]) -> None:
        self._manager = manager
        self._overrides = overrides
        self._scope: AbstractContextManager[Session, None] | None = None
        self._context: contextvars.Context | None = None
        self._key_token: Token[object | None] | None = None
        self._stack_token: Token[_core.Frame | None] | None = None
        self.closed = False

    async def open(self) -> Session:
        """Enter the scope in a worker thread and bind the request to it."""
        import anyio.to_thread

        scope = self._manager.session_scope(**self._overrides)
        self._key_token = _core.worker_key.set(object())
        try:
            # The scope's own context bookkeeping must begin and end in one
            # context; worker threads each get a fresh copy, so keep one.
            context = contextvars.copy_context()
            session: Session = await anyio.to_thread.run_sync(context.run, scope.__enter__)
        except BaseException:
            _core.worker_key.reset(self._key_token)
            self._key_token = None
            raise
        self._scope = scope
        self._context = context
        self._stack_token = _core.stack.set(context.run(_core.stack.get))
        return session

    async def close(self, exc: BaseException | None = None, *, rollback: bool = False) -> None:
        """End the scope in a worker thread (see :meth:`AsyncRequestScope.close`)
        and unbind the request. No-op once closed or if never opened."""
        import anyio
        import anyio.to_thread

        scope, context = self._scope, self._context
        if self.closed or scope is None or context is None:
            return
        self.closed = True
        assert self._stack_token is not None and self._key_token is not None
        _core.stack.reset(self._stack_token)
        try:
            # A limiter of its own, as FastAPI does for sync generator dependencies:
            # the exit returns a pooled connection, so it must not queue behind
            # requests that hold worker threads while they wait for a connection.
            limiter = anyio.CapacityLimiter(1)
            exit_ = _exit_sync(self._manager, scope, exc, rollback)
            await anyio.to_thread.run_sync(context.run, exit_, limiter=limiter)
        finally:
            _core.worker_key.reset(self._key_token)


class SyncRequestScope:
    """A request's sync ``Session`` scope for a WSGI server: opened and closed in
    the request's thread and context, bound to the request (``worker_key``) for
    threads the handler starts with a copy of its context."""

    __slots__ = ("_key_token", "_manager", "_overrides", "_scope", "closed")

    def __init__(self, manager: SessionManager, overrides: Mapping[str, Any]) -> None:
        self._manager = manager
        self._overrides = overrides
        self._scope: AbstractContextManager[Session, None] | None = None
        self._key_token: Token[object | None] | None = None
        self.closed = False

    def open(self) -> Session:
        """Bind the request and enter the scope."""
        scope = self._manager.session_scope(**self._overrides)
        self._key_token = _core.worker_key.set(object())
        try:
            session = scope.__enter__()
        except BaseException:
            _core.worker_key.reset(self._key_token)
            raise
        self._scope = scope
        return session

    def close(self, exc: BaseException | None = None, *, rollback: bool = False) -> None:
        """End the scope (see :meth:`AsyncRequestScope.close`) and unbind the
        request. No-op once closed or if never opened."""
        scope = self._scope
        if self.closed or scope is None:
            return
        self.closed = True
        assert self._key_token is not None
        try:
            _exit_sync(self._manager, scope, exc, rollback)()
        finally:
            _core.worker_key.reset(self._key_token)


def _exit_sync(
    manager: SessionManager,
    scope: AbstractContextManager[Session, None],
    exc: BaseException | None,
    rollback: bool,
) -> Callable[[], None]:
    def exit_() -> None:
        if exc is not None:
            scope.__exit__(type(exc), exc, exc.__traceback__)
            return
        if rollback:
            manager.set_rollback(True)
        scope.__exit__(None, None, None)

    return exit_


async def serve_asgi(
    app: ASGIApp,
    scope: MutableMapping[str, Any],
    receive: Receive,
    send: Send,
    request: AsyncRequestScope | ThreadedRequestScope,
    *,
    rollback_from_status: int,
    error_of: Callable[[], BaseException | None] = lambda: None,
    before_raising: Callable[[BaseException], None] | None = None,
) -> None:
    """Run ``app`` for one HTTP request whose scope ``request`` is already open,
    and end that scope when the application starts its response, before the
    ``http.response.start`` message is passed on.

    How it ends, by the response's status and the exception ``error_of()``
    names (one the framework turned into this response, if it reports them):
    a 5xx made from an exception rolls back and counts as failed; any other
    response made from an exception, or with a status of ``rollback_from_status``
    or more, rolls back quietly (counted as rolled back, not failed); the rest
    COMMIT. A
    failed COMMIT is raised out of ``send`` (which stops the application) and then
    out of this function, in place of whatever the application made of it, with
    nothing sent: the server or an outer error handler answers 5xx
    (``before_raising`` lets an adapter prepare that handler). An exception
    escaping the application before its response started rolls back; so does an
    application that returns without starting a response.
    """
    failure: BaseException | None = None

    async def send_after_commit(message: Message) -> None:
        nonlocal failure
        if message["type"] == "http.response.start" and not request.closed:
            error, status = error_of(), int(message["status"])
            try:
                if error is not None and status >= 500:
                    await request.close(error)
                else:
                    # An exception answered below 500 is a client error: the
                    # framework classified it, and it rolls back quietly.
                    await request.close(
                        rollback=error is not None or status >= rollback_from_status
                    )
            except Exception as err:
                failure = err
                raise
        await send(message)

    try:
        await app(scope, receive, send_after_commit)
    except BaseException as exc:
        if failure is not None:
            if before_raising is not None:
                before_raising(failure)
            # The application saw the COMMIT error come out of send(), perhaps
            # wrapped; the server must see the error itself.
            raise failure  # noqa: B904 - its own cause (the driver error) is kept
        await request.close(exc)
        raise
    # Returned without starting a response (the server answers 500 for it):
    # nothing the request did is committed.
    await request.close(rollback=True)
