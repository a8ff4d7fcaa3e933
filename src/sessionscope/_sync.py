"""The synchronous front: ``session_scope``, ``with_session`` and ``with_retry``.

A thin layer over :mod:`._core`: it pushes and pops frames and calls the core's
exit logic directly.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from . import _core
from ._decorate import options_key, prepare, run_callbacks_sync
from ._policy import Action

if TYPE_CHECKING:
    from contextvars import Token

    from ._config import SessionConfig
    from ._manager import SessionManager

__all__ = ["SyncScope", "call_with_retry", "decorate_sync"]

T = TypeVar("T")

_NEW, _SAVEPOINT = Action.NEW, Action.SAVEPOINT  # see _core._NEW


class SyncScope:
    """Context manager yielding a :class:`~sqlalchemy.orm.Session`.

    Created per use by ``session_scope()``; not reusable once exited.
    """

    __slots__ = ("_cfg", "_explicit", "_frame", "_function", "_manager", "_token")

    def __init__(
        self,
        manager: SessionManager,
        cfg: SessionConfig,
        explicit: Session | None = None,
        function: str | None = None,
    ) -> None:
        self._manager = manager
        self._cfg = cfg
        self._explicit = explicit
        self._function = function
        self._frame: _core.Frame | None = None
        self._token: Token[_core.Frame | None] | None = None

    def __enter__(self) -> Session:
        cfg = self._cfg
        manager = self._manager
        key = _core.context_key()
        outer = _core.find_outer(key, False, self._explicit, manager)
        frame = _core.new_frame(
            cfg,
            key,
            outer,
            manager._open_sync,
            manager.stats if cfg.enable_monitoring else None,
            self._function,
            self._explicit,
            manager,
        )
        if frame.action is _SAVEPOINT:
            _core.begin_savepoint(frame.session, frame)
        self._frame = frame
        self._token = _core.stack.set(frame)
        return frame.session

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        frame = self._frame
        if frame is None or self._token is None:
            raise RuntimeError("session scope exited without being entered")
        _core.stack.reset(self._token)
        self._token = None
        try:
            callbacks = _core.exit_frame(frame.session, frame, exc)
        except sa_exc.TimeoutError as err:
            raise self._manager._pool_exhausted(err) from err
        if exc is not None and isinstance(exc, sa_exc.TimeoutError) and frame.action is _NEW:
            raise self._manager._pool_exhausted(exc) from exc
        if callbacks:
            run_callbacks_sync(callbacks)


def call_with_retry(
    manager: SessionManager,
    cfg: SessionConfig,
    function: str | None,
    call: Callable[[], T],
) -> T:
    """Run ``call``; on a transient error, back off and run it again (each attempt
    opens its own session). Only an outermost caller retries: inside a scope or
    another retry boundary of this thread or task, the error propagates to it."""
    token = _core.enter_retry_boundary(cfg)
    if token is None:
        return call()
    stats = manager.stats if cfg.enable_monitoring else None
    try:
        attempt = 0
        while True:
            try:
                return call()
            except Exception as exc:
                attempt += 1
                delay = _core.next_retry(stats, cfg, exc, attempt, function)
                if delay is None:
                    raise
                time.sleep(delay)
    finally:
        _core.retry_boundary.reset(token)


def decorate_sync(
    func: Callable[..., T],
    overrides: Mapping[str, Any],
    get_manager: Callable[[], SessionManager],
) -> Callable[..., T]:
    """Wrap ``func`` so it runs in a session scope with ``session`` injected.

    The config is resolved at call time (so a later ``configure_session`` applies)
    and cached per manager config version. Retries happen only when this call is
    the outermost scope and no session was passed explicitly.
    """
    injection, signature, name = prepare(func, overrides, is_async=False, session_types=(Session,))
    key = options_key(overrides)
    requires_new = overrides.get("propagation") == "requires_new"

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        manager = get_manager()
        cfg = manager._resolve(key, overrides)
        explicit = injection.explicit(args, kwargs)

        def once() -> T:
            with SyncScope(manager, cfg, explicit, name) as session:
                call_args, call_kwargs = injection.call_args(args, kwargs, session)
                return func(*call_args, **call_kwargs)

        if explicit is None and (
            requires_new or _core.current_frame(_core.context_key(), False, manager) is None
        ):
            return call_with_retry(manager, cfg, name, once)
        return once()

    wrapper.__signature__ = signature  # type: ignore[attr-defined]
    return wrapper
