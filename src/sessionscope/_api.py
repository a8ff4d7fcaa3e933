"""The module-level API: the seed's functions, acting on a default manager."""

from __future__ import annotations

import logging
import threading
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from typing import Any, Concatenate, ParamSpec, TypeVar, cast, overload

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from typing_extensions import Unpack

from . import _core
from ._async import decorate_async
from ._config import SessionConfig, validate_overrides
from ._errors import SessionFactoryNotInitializedError
from ._lifecycle import dispose_replaced
from ._manager import SessionManager
from ._sync import decorate_sync
from ._types import (
    AS,
    AsyncSessionDecorator,
    S,
    ScopeOptions,
    SessionDecorator,
    SessionFunction,
    SessionMethod,
    SessionStats,
)

__all__ = [
    "async_session_scope",
    "async_with_retry",
    "async_with_session",
    "configure_session",
    "get_default_manager",
    "get_session_stats",
    "on_commit",
    "reset_session_stats",
    "session_scope",
    "set_rollback",
    "setup_database_connection",
    "with_retry",
    "with_session",
]

P = ParamSpec("P")
T = TypeVar("T")
O = TypeVar("O")  # noqa: E741 - the owner (self / cls / first argument) of a method
SessT = TypeVar("SessT", bound=Session)
ASessT = TypeVar("ASessT", bound=AsyncSession)

_logger = logging.getLogger("sessionscope")
# A library adds no output of its own: the application's logging configuration
# decides where records go (without it, Python's last-resort handler would print
# warnings to stderr). The logger's level is left alone unless log_level= is set.
_logger.addHandler(logging.NullHandler())
_lock = threading.Lock()
_default: SessionManager | None = None
_config = SessionConfig()


def setup_database_connection(
    url: str | URL | None = None,
    *,
    async_url: str | URL | None = None,
    session_class: type[S] | None = None,
    async_session_class: type[AS] | None = None,
    **options: Any,
) -> SessionManager[S, AS]:
    """Build the default manager's engines and session factories (lazily).

    ``url`` defaults to ``DATABASE_URL``, else the embedded SQLite file
    ``sessionscope.db``; ``async_url`` is derived from it unless given. ``options``
    are :class:`SessionManager` keyword arguments: ``engine=``/``async_engine=`` to
    reuse existing engines, ``session_class=``, ``session_options=``, and engine
    options such as ``pool_size=``. Nothing connects until the first statement.

    Calling it again replaces the default manager (statistics carry on) and
    disposes the replaced manager's pools: the sync ones at once; the async one
    by a task on the running event loop when called inside one. Called from
    synchronous code after async work, the async pool is left alone: its
    connections belong to the event loop that opened them, which may be closed,
    so ``await get_default_manager().adispose()`` before replacing it. A
    disposed manager still works (it opens new connections).
    """
    global _default
    with _lock:
        manager: SessionManager[S, AS] = SessionManager(
            url,
            async_url=async_url,
            config=_config,
            session_class=session_class,
            async_session_class=async_session_class,
            **options,
        )
        old, _default = _default, manager
        if old is not None:
            manager.stats = old.stats
    if old is not None:
        dispose_replaced(old)
    return manager


def get_default_manager() -> SessionManager:
    """The manager built by :func:`setup_database_connection`.

    Raises :class:`SessionFactoryNotInitializedError` before setup. Typed with
    the base ``Session`` / ``AsyncSession`` classes: with a custom session class,
    keep the manager :func:`setup_database_connection` returned, which carries it.
    """
    manager = _default
    if manager is None:
        raise SessionFactoryNotInitializedError()
    return manager


def default_manager_or_none() -> SessionManager[Any, Any] | None:
    """The default manager if it is set up, else None (exporters that follow
    whatever manager is the default at each collection)."""
    return _default


def _default_host() -> _core.ScopeHost:
    # Looked up at each call: a decorated function may be defined before setup.
    return get_default_manager().scope_host


def configure_session(**fields: Unpack[ScopeOptions]) -> SessionConfig:
    """Set global configuration (see :class:`SessionConfig` for the fields).

    Validates first: an invalid value raises ``ValueError``/``TypeError`` and
    changes nothing. Applies to the default manager now and after a later setup;
    decorated functions pick it up at their next call. The ``sessionscope``
    logger's level is set only when ``log_level`` is passed.
    """
    global _config
    with _lock:
        new = _config.merged(fields)
        _config = new
        if _default is not None:
            _default.configure(**fields)
        if "log_level" in fields:
            _logger.setLevel(new.log_levelno)
    return new


def session_scope(**overrides: Unpack[ScopeOptions]) -> AbstractContextManager[Session, None]:
    """Context manager yielding a ``Session`` of the default manager.

    Outermost: a new session; BEGIN happens at the first statement; COMMIT on
    success (if ``auto_commit``), ROLLBACK on exception, always closed. Nested:
    joins, saves a point, or opens a new session according to ``propagation``.
    """
    return get_default_manager().session_scope(**overrides)


def async_session_scope(
    **overrides: Unpack[ScopeOptions],
) -> AbstractAsyncContextManager[AsyncSession, None]:
    """Async context manager yielding an ``AsyncSession``; see :func:`session_scope`."""
    return get_default_manager().async_session_scope(**overrides)


@overload
def with_session(  # type: ignore[overload-overlap]  # first match wins: session first
    func: Callable[Concatenate[SessT, P], T], /
) -> SessionFunction[SessT, P, T]: ...
@overload
def with_session(
    func: Callable[Concatenate[O, SessT, P], T], /
) -> SessionMethod[O, SessT, P, T]: ...
@overload
def with_session(func: None = None, /, **overrides: Unpack[ScopeOptions]) -> SessionDecorator: ...


def with_session(
    func: Callable[..., Any] | None = None, /, **overrides: Unpack[ScopeOptions]
) -> Any:
    """Decorator running a function in a session scope, the session injected into
    its ``session`` parameter (hidden from the wrapper's signature).

    Usable bare (``@with_session``) or called (``@with_session(auto_commit=False)``).
    A session passed explicitly (positionally or ``session=``) is used and its
    transaction joined. Transient errors are retried when the call is outermost.

    Types: the decorated function keeps its parameters minus ``session`` when
    ``session`` is its first parameter (:class:`SessionFunction`) or its second,
    after ``self``/``cls`` (:class:`SessionMethod`); see the guide's typing section.
    """
    if func is None:
        validate_overrides(overrides)
        return lambda f: decorate_sync(f, overrides, _default_host)
    return decorate_sync(func, {}, _default_host)


@overload
def async_with_session(  # type: ignore[overload-overlap]  # first match wins: session first
    func: Callable[Concatenate[ASessT, P], Coroutine[Any, Any, T]], /
) -> SessionFunction[ASessT, P, Coroutine[Any, Any, T]]: ...
@overload
def async_with_session(
    func: Callable[Concatenate[O, ASessT, P], Coroutine[Any, Any, T]], /
) -> SessionMethod[O, ASessT, P, Coroutine[Any, Any, T]]: ...
@overload
def async_with_session(
    func: None = None, /, **overrides: Unpack[ScopeOptions]
) -> AsyncSessionDecorator: ...


def async_with_session(
    func: Callable[..., Any] | None = None, /, **overrides: Unpack[ScopeOptions]
) -> Any:
    """Async twin of :func:`with_session` for ``async def`` functions; the
    decorated function returns a coroutine (``Coroutine[Any, Any, T]``)."""
    if func is None:
        validate_overrides(overrides)
        return lambda f: decorate_async(f, overrides, _default_host)
    return decorate_async(func, {}, _default_host)


@overload
def with_retry(
    func: Callable[..., T],
    /,
    *args: Any,
    max_retries: int | None,
    retry_delay: float | None = None,
    **kwargs: Any,
) -> T: ...
@overload
def with_retry(
    func: Callable[..., T],
    /,
    *args: Any,
    max_retries: int | None = None,
    retry_delay: float | None,
    **kwargs: Any,
) -> T: ...
@overload
def with_retry(func: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T: ...


# The implementation keeps max_retries / retry_delay for itself: a function with
# keywords of those names cannot receive them through with_retry.
def with_retry(  # type: ignore[misc]
    func: Callable[..., T],
    /,
    *args: Any,
    max_retries: int | None = None,
    retry_delay: float | None = None,
    **kwargs: Any,
) -> T:
    """Call ``func(*args, **kwargs)``; on a transient database error, back off
    exponentially (with jitter) and call it again, up to ``max_retries`` times
    (default: ``retry_attempts``). Inside a scope it calls once: the error goes
    to the outermost retrying boundary.

    Types: without ``max_retries``/``retry_delay`` the arguments are checked
    against ``func``'s parameters. With them, only the result type is (a
    ``ParamSpec`` cannot carry extra keywords); to keep the check, pass a
    closure: ``with_retry(lambda: func(a, b), max_retries=5)``.
    """
    return get_default_manager().with_retry(
        func, *args, max_retries=max_retries, retry_delay=retry_delay, **kwargs
    )


@overload
async def async_with_retry(
    func: Callable[..., Awaitable[T]],
    /,
    *args: Any,
    max_retries: int | None,
    retry_delay: float | None = None,
    **kwargs: Any,
) -> T: ...
@overload
async def async_with_retry(
    func: Callable[..., Awaitable[T]],
    /,
    *args: Any,
    max_retries: int | None = None,
    retry_delay: float | None,
    **kwargs: Any,
) -> T: ...
@overload
async def async_with_retry(
    func: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs
) -> T: ...


async def async_with_retry(  # type: ignore[misc]  # see with_retry
    func: Callable[..., Awaitable[T]],
    /,
    *args: Any,
    max_retries: int | None = None,
    retry_delay: float | None = None,
    **kwargs: Any,
) -> T:
    """Async twin of :func:`with_retry` (types likewise)."""
    return await get_default_manager().async_with_retry(
        func, *args, max_retries=max_retries, retry_delay=retry_delay, **kwargs
    )


def get_session_stats() -> SessionStats:
    """Statistics of the default manager: the seed keys (``session_count``,
    ``active_sessions``, ``total_transactions``, ``failed_transactions``,
    ``success_rate`` in percent) and more (see :class:`SessionStats`); zeros
    before setup."""
    manager = _default
    if manager is None:
        from ._stats import Stats

        snapshot = cast(SessionStats, Stats().snapshot())
        snapshot["pool"] = {}
        return snapshot
    return manager.get_stats()


def reset_session_stats() -> None:
    """Zero the default manager's counters (the ``active_sessions`` gauge is kept)."""
    if _default is not None:
        _default.reset_stats()


def on_commit(callback: Callable[[], Any]) -> None:
    """Run ``callback`` after the outermost COMMIT of the current transaction.

    Dropped if the transaction (or the savepoint it was registered in) rolls
    back. In async scopes the callback may return an awaitable. Errors it raises
    are logged, not raised: the data is already committed. Outside a scope raises
    :class:`NoActiveScopeError`.
    """
    _core.on_commit(callback)


def set_rollback(rollback: bool = True) -> None:
    """Doom (or with False, un-doom) the innermost transaction or savepoint scope:
    on exit it rolls back quietly, without raising. Outside a scope raises
    :class:`NoActiveScopeError`."""
    _core.set_rollback(rollback)
