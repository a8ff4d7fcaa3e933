"""The asyncio front: ``async_session_scope``, ``async_with_session`` and
``async_with_retry``.

Exit decisions are the core's, run in one greenlet hop (commit and close
together) by SQLAlchemy's ``greenlet_spawn``, the bridge ``AsyncSession.run_sync``
wraps. The one async-only concern is
cancellation: cleanup after a cancelled body runs in a shielded task, so a
second cancellation cannot leave a connection checked out or idle in a
transaction.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import sys
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.util import greenlet_spawn

from . import _core
from ._decorate import (
    detached_config,
    log_callback_error,
    options_key,
    prepare,
    scope_manager,
)
from ._errors import ActiveScopeError
from ._policy import Action

if TYPE_CHECKING:
    from contextvars import Token

    from ._config import SessionConfig

__all__ = ["AsyncScope", "acall_with_retry", "decorate_async"]

T = TypeVar("T")

_NEW, _JOIN, _SAVEPOINT = Action.NEW, Action.JOIN, Action.SAVEPOINT  # see _core._NEW
_ACTIVE = _core.FrameState.ACTIVE


class AsyncScope:
    """Async context manager yielding an :class:`~sqlalchemy.ext.asyncio.AsyncSession`.

    Created per use by ``async_session_scope()``. Entering it again while it is
    active raises :class:`ActiveScopeError`; once exited it may be entered again.
    """

    __slots__ = ("_cfg", "_explicit", "_frame", "_function", "_manager")

    def __init__(
        self,
        manager: _core.ScopeHost | None,
        cfg: SessionConfig,
        explicit: AsyncSession | None = None,
        function: str | None = None,
    ) -> None:
        self._manager = manager
        self._cfg = cfg
        self._explicit = explicit
        self._function = function
        self._frame: _core.Frame | None = None

    async def __aenter__(self) -> AsyncSession:
        active = self._frame
        if active is not None and active.state is _ACTIVE:
            raise ActiveScopeError(
                "this async_session_scope() object is already active; entering it again "
                "would share (and then close) its session. Create one scope object per "
                "async with block: async with async_session_scope() as session: ..."
            )
        explicit = self._explicit
        frame = _core.open_frame(
            self._cfg,
            True,
            self._manager,
            self._function,
            None if self._function is not None else sys._getframe(1),
            explicit.sync_session if explicit is not None else None,
            explicit,
        )
        if frame.action is _SAVEPOINT:
            await frame.front.run_sync(_core.begin_savepoint, frame)
        self._frame = frame
        _core.push(frame)
        front: AsyncSession = frame.front
        return front

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        frame = self._frame
        if frame is None:
            raise RuntimeError("async session scope exited without being entered")
        _core.pop(frame)
        if frame.action is _JOIN:
            if _core.outlived(frame):  # the owner ended first: a rollback to send
                await greenlet_spawn(_core.exit_frame, frame.session, frame, exc)
            else:
                _core.exit_frame(frame.session, frame, exc)  # no I/O: marks the owner at most
            return
        if isinstance(exc, asyncio.CancelledError):
            await self._cleanup_cancelled(frame, exc)
            return
        try:
            # greenlet_spawn rather than run_sync: one coroutine fewer to resume
            # through at every wait for the server (run_sync only forwards).
            callbacks, error = await greenlet_spawn(_core.exit_frame, frame.session, frame, exc)
        except asyncio.CancelledError:
            # Cancelled during COMMIT/ROLLBACK/close. The core's finally blocks ran
            # in the greenlet; if they were cut short, drop the connection.
            await self._cleanup_cancelled(frame, None)
            raise
        if isinstance(error, asyncio.CancelledError):
            # Cancelled during COMMIT: the core closed the frame; count it.
            await self._cleanup_cancelled(frame, None)
            raise error
        for callback in callbacks:
            try:
                result = callback()
                if inspect.isawaitable(result):
                    await result
            except Exception as err:
                log_callback_error(callback, err)
        error = error or exc
        if error is None:
            return
        if isinstance(error, sa_exc.TimeoutError) and self._manager is not None:
            raise self._manager.pool_exhausted(error) from error
        if error is not exc:
            raise error

    async def _cleanup_cancelled(self, frame: _core.Frame, exc: BaseException | None) -> None:
        if frame.stats is not None and frame.action is Action.NEW:
            frame.stats.cancelled()
        front: AsyncSession = frame.front
        if exc is not None:
            work: Awaitable[Any] = front.run_sync(_core.exit_frame, frame, exc)
        else:
            work = front.run_sync(_core.abort_frame, frame)
        task = asyncio.ensure_future(work)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            # Cancelled again: the shielded task carries on and returns (or
            # invalidates) the connection; the caller re-raises cancellation.
            # The loop holds tasks weakly: keep this one until it is done.
            _orphans.add(task)
            task.add_done_callback(_orphan_done)
            return
        except Exception as err:  # a cleanup error must not replace CancelledError
            _log_cleanup_error(err)


_orphans: set[asyncio.Future[Any]] = set()


def _orphan_done(task: asyncio.Future[Any]) -> None:
    _orphans.discard(task)
    if not task.cancelled() and task.exception() is not None:
        _log_cleanup_error(task.exception())


def _log_cleanup_error(err: BaseException | None) -> None:
    _core.logger.warning("error while cleaning up a cancelled scope: %s", type(err).__name__)


async def acall_with_retry(
    manager: _core.ScopeHost | None,
    cfg: SessionConfig,
    function: str | None,
    token: Token[_core.Boundary | None],
    call: Callable[[], Awaitable[T]],
) -> T:
    """Async twin of :func:`._sync.call_with_retry` (same decisions, asyncio sleep)."""
    try:
        attempt = 0
        while True:
            try:
                return await call()
            except Exception as exc:
                attempt += 1
                delay = _core.next_retry(manager, cfg, exc, attempt, function)
                if delay is None:
                    raise
                await asyncio.sleep(delay)
    finally:
        _core.retry_boundary.reset(token)


def decorate_async(
    func: Callable[..., Awaitable[T]],
    overrides: Mapping[str, Any],
    get_manager: Callable[[], _core.ScopeHost],
) -> Callable[..., Awaitable[T]]:
    """Async twin of :func:`._sync.decorate_sync`."""
    injection, signature, name = prepare(
        func, overrides, is_async=True, session_types=(AsyncSession,)
    )
    detached = detached_config(overrides)
    key = options_key(overrides)

    @functools.wraps(func)
    async def wrapper(*args: Any, **kwargs: Any) -> T:
        explicit = injection.explicit(args, kwargs)
        manager = get_manager() if explicit is None else scope_manager(get_manager, True)
        if manager is None:
            cfg = detached
        else:
            cfg = manager.resolve(key, overrides) if overrides else manager.config

        async def once() -> T:
            async with AsyncScope(manager, cfg, explicit, name) as session:
                call_args, call_kwargs = injection.call_args(args, kwargs, session)
                return await func(*call_args, **call_kwargs)

        token = _core.enter_retry_boundary(cfg, explicit is not None, True, manager)
        if token is None:
            return await once()
        return await acall_with_retry(manager, cfg, name, token, once)

    wrapper.__signature__ = signature  # type: ignore[attr-defined]
    return wrapper
