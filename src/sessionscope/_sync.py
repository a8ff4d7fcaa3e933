"""The synchronous front: ``session_scope``, ``with_session`` and ``with_retry``.

A thin layer over :mod:`._core`: it pushes and pops frames and calls the core's
exit logic directly.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from . import _core
from ._decorate import (
    Injection,
    detached_config,
    options_key,
    prepare,
    run_callbacks_sync,
    scope_manager,
)
from ._errors import ActiveScopeError
from ._policy import Action

if TYPE_CHECKING:
    from contextvars import Token

    from ._config import SessionConfig

__all__ = ["SyncScope", "call_with_retry", "decorate_sync"]

T = TypeVar("T")

_SAVEPOINT = Action.SAVEPOINT  # see _core._NEW
_ACTIVE = _core.FrameState.ACTIVE


class SyncScope:
    """Context manager yielding a :class:`~sqlalchemy.orm.Session`.

    Created per use by ``session_scope()``. Entering it again while it is active
    raises :class:`ActiveScopeError`; once exited it may be entered again.
    """

    __slots__ = ("_cfg", "_explicit", "_frame", "_function", "_manager")

    def __init__(
        self,
        manager: _core.ScopeHost | None,
        cfg: SessionConfig,
        explicit: Session | None = None,
        function: str | None = None,
    ) -> None:
        self._manager = manager
        self._cfg = cfg
        self._explicit = explicit
        self._function = function
        self._frame: _core.Frame | None = None

    def __enter__(self) -> Session:
        active = self._frame
        if active is not None and active.state is _ACTIVE:
            raise ActiveScopeError(
                "this session_scope() object is already active; entering it again would "
                "share (and then close) its session. Create one scope object per with "
                "block: with session_scope() as session: ..."
            )
        frame = _core.open_frame(
            self._cfg,
            False,
            self._manager,
            self._function,
            None if self._function is not None else sys._getframe(1),
            self._explicit,
        )
        if frame.action is _SAVEPOINT:
            _core.begin_savepoint(frame.session, frame)
        self._frame = frame
        _core.push(frame)
        return frame.session

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        frame = self._frame
        if frame is None:
            raise RuntimeError("session scope exited without being entered")
        _leave(self._manager, frame, exc)


def _leave(manager: _core.ScopeHost | None, frame: _core.Frame, exc: BaseException | None) -> None:
    """End ``frame`` after its body returned (``exc`` None) or raised ``exc``:
    run the ``on_commit`` callbacks due, then raise the scope's own error, if
    any (the caller re-raises ``exc`` when this returns)."""
    _core.pop(frame)
    callbacks, error = _core.exit_frame(frame.session, frame, exc)
    if callbacks:
        run_callbacks_sync(callbacks)
    error = error or exc
    if error is None:
        return
    if isinstance(error, sa_exc.TimeoutError) and manager is not None:
        raise manager.pool_exhausted(error) from error
    if error is not exc:
        raise error


def _call_in_scope(
    manager: _core.ScopeHost | None,
    cfg: SessionConfig,
    function: str,
    explicit: Session | None,
    injection: Injection,
    func: Callable[..., T],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> T:
    """One call of a decorated function in its own scope: what ``with
    SyncScope(...) as session: return func(...)`` does, without the scope
    object and the ``with`` protocol (this runs for every decorated call)."""
    frame = _core.open_frame(cfg, False, manager, function, None, explicit)
    if frame.action is _SAVEPOINT:
        _core.begin_savepoint(frame.session, frame)
    _core.push(frame)
    try:
        if injection.leading and not kwargs:
            # Injection.call_args's usual case, without its call.
            result = func(frame.session, *(args[1:] if explicit is not None else args))
        else:
            call_args, call_kwargs = injection.call_args(args, kwargs, frame.session)
            result = func(*call_args, **call_kwargs)
    except BaseException as exc:
        _leave(manager, frame, exc)
        raise
    _leave(manager, frame, None)
    return result


def call_with_retry(
    manager: _core.ScopeHost | None,
    cfg: SessionConfig,
    function: str | None,
    token: Token[_core.Boundary | None],
    call: Callable[..., T],
    *args: Any,
) -> T:
    """Run ``call(*args)``; on a transient error, back off and run it again (each attempt
    opens its own session). Whether this call retries at all is the core's
    decision (:func:`._core.enter_retry_boundary`), whose ``token`` this
    resets when done."""
    try:
        attempt = 0
        while True:
            try:
                return call(*args)
            except Exception as exc:
                attempt += 1
                delay = _core.next_retry(manager, cfg, exc, attempt, function)
                if delay is None:
                    raise
                time.sleep(delay)
    finally:
        _core.retry_boundary.reset(token)


def decorate_sync(
    func: Callable[..., T],
    overrides: Mapping[str, Any],
    get_manager: Callable[[], _core.ScopeHost],
) -> Callable[..., T]:
    """Wrap ``func`` so it runs in a session scope with ``session`` injected.

    The config is resolved at call time (so a later ``configure_session`` applies)
    and cached per manager config version. Retries happen only when this call is
    the outermost scope and no session was passed explicitly. A call given its
    session explicitly works before any manager is set up: it only joins it.
    """
    injection, signature, name = prepare(func, overrides, is_async=False, session_types=(Session,))
    detached = detached_config(overrides)
    key = options_key(overrides)

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        if injection.leading and not kwargs:
            # Injection.explicit's usual case, without its call.
            first = args[0] if args else None
            explicit = first if isinstance(first, Session) else None
        else:
            explicit = injection.explicit(args, kwargs)
        manager = get_manager() if explicit is None else scope_manager(get_manager, True)
        if manager is None:
            cfg = detached
        else:
            cfg = manager.resolve(key, overrides) if overrides else manager.config
        token = _core.enter_retry_boundary(cfg, explicit is not None, False, manager)
        if token is None:
            return _call_in_scope(manager, cfg, name, explicit, injection, func, args, kwargs)
        # Each attempt is a call of its own: no closure is made per call.
        result: T = call_with_retry(
            manager, cfg, name, token,
            _call_in_scope, manager, cfg, name, explicit, injection, func, args, kwargs,
        )  # fmt: skip
        return result

    wrapper.__signature__ = signature  # type: ignore[attr-defined]
    return wrapper
