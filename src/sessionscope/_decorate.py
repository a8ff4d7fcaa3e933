"""What the sync and async decorators share: validation at decoration time,
finding and hiding the ``session`` parameter, and injecting the session."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, TypeVar

from sqlalchemy.exc import StatementError

from ._config import SessionConfig
from ._errors import SessionFactoryNotInitializedError

M = TypeVar("M")

__all__ = [
    "Injection",
    "callable_name",
    "detached_config",
    "options_key",
    "prepare",
    "run_callbacks_sync",
    "scope_manager",
]

logger = logging.getLogger("sessionscope")

_SESSION_PARAM = "session"


class Injection:
    """Where the ``session`` parameter of a decorated function sits, and how to
    tell an explicitly passed session from the caller's other arguments."""

    __slots__ = ("index", "keyword_only", "leading", "session_types")

    def __init__(self, index: int, keyword_only: bool, session_types: tuple[type, ...]) -> None:
        self.index = index
        self.keyword_only = keyword_only
        self.session_types = session_types
        self.leading = index == 0 and not keyword_only
        """The usual shape, ``def f(session, ...)``: a front may handle a call
        of it without keywords itself (the session first, or nothing there)."""

    def explicit(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
        """The session the caller passed (``session=`` or positionally), else None."""
        if _SESSION_PARAM in kwargs:
            given = kwargs[_SESSION_PARAM]
            if given is not None and not isinstance(given, self.session_types):
                raise TypeError(
                    f"session= must be a {' or '.join(t.__name__ for t in self.session_types)}"
                    f" (or None to have one injected), got {type(given).__name__}; a sync "
                    "Session goes to with_session functions, an AsyncSession to "
                    "async_with_session ones"
                )
            return given
        if not self.keyword_only and len(args) > self.index:
            candidate = args[self.index]
            if isinstance(candidate, self.session_types):
                return candidate
        return None

    def call_args(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], session: Any
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Arguments with ``session`` put in place of the hidden parameter."""
        if self.leading and not kwargs:
            # The usual shape, ``def f(session, ...)`` called positionally.
            if args and isinstance(args[0], self.session_types):
                return (session, *args[1:]), kwargs
            return (session, *args), kwargs
        if _SESSION_PARAM in kwargs:
            kwargs = dict(kwargs)
            kwargs[_SESSION_PARAM] = session
            return args, kwargs
        if not self.keyword_only and len(args) > self.index:
            if isinstance(args[self.index], self.session_types):
                return (*args[: self.index], session, *args[self.index + 1 :]), kwargs
            return (*args[: self.index], session, *args[self.index :]), kwargs
        if not self.keyword_only and len(args) == self.index:
            return (*args, session), kwargs
        kwargs = dict(kwargs)
        kwargs[_SESSION_PARAM] = session
        return args, kwargs


def prepare(
    func: Callable[..., Any],
    overrides: Mapping[str, Any],
    *,
    is_async: bool,
    session_types: tuple[type, ...],
) -> tuple[Injection, inspect.Signature, str]:
    """Validate a function and overrides at decoration time.

    Raises ``TypeError`` for a generator or async generator function (the scope
    would close before the caller consumes it), for a sync function given to the
    async decorator or the reverse, and for a function without a ``session``
    parameter; ``ValueError``/``TypeError`` for invalid overrides.
    Besides functions and methods it takes ``functools.partial`` objects and
    callable instances (an ``async def __call__`` makes an instance async).
    Returns the injection plan, the public signature (without ``session``) and
    the name for statistics (see :func:`callable_name`).
    """
    decorator = "async_with_session" if is_async else "with_session"
    if not callable(func):
        raise TypeError(f"{decorator} decorates a function, got {func!r}")
    name = callable_name(func)
    target = _code_of(func)
    if any(inspect.isgeneratorfunction(f) or inspect.isasyncgenfunction(f) for f in (func, target)):
        raise TypeError(
            f"{decorator} cannot decorate the generator function {name}: "
            "its scope would end before the caller iterates it. Collect the results "
            "into a list inside the function, or open a scope inside the generator."
        )
    coroutine = inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(target)
    if is_async and not coroutine:
        raise TypeError(
            f"async_with_session needs an async def function, got {name}; "
            "use with_session for regular functions"
        )
    if not is_async and coroutine:
        raise TypeError(
            f"with_session cannot decorate the coroutine function {name}; "
            "use async_with_session"
        )
    SessionConfig().merged(overrides)  # raises now, not at the first call
    signature = inspect.signature(func)
    params = list(signature.parameters.values())
    found = [(i, p) for i, p in enumerate(params) if p.name == _SESSION_PARAM]
    if not found:
        raise TypeError(
            f"{decorator} injects the session into a parameter named 'session', and "
            f"{name}{signature} has none; add 'session' as a parameter"
        )
    index, param = found[0]
    if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
        raise TypeError(f"the 'session' parameter of {name} cannot be *args/**kwargs")
    keyword_only = param.kind is param.KEYWORD_ONLY
    try:
        # Postponed annotations (strings) evaluated in the function's module: a
        # framework that resolves the public signature's strings in the wrapper's
        # module (FastAPI 0.121 does) then sees real types.
        params = list(inspect.signature(func, eval_str=True).parameters.values())
    except Exception:  # a forward reference not defined yet: keep the strings
        pass
    public = signature.replace(parameters=[p for p in params if p.name != _SESSION_PARAM])
    return Injection(index, keyword_only, session_types), public, name


def _unwrap_partial(func: Any) -> Any:
    while isinstance(func, functools.partial):
        func = func.func
    return func


def _code_of(func: Callable[..., Any]) -> Any:
    """What runs when ``func`` is called: the function behind partials, or the
    ``__call__`` method of a callable instance (the generator and coroutine
    checks look at a function's code)."""
    target = _unwrap_partial(func)
    if inspect.isroutine(target) or inspect.isclass(target):
        return target
    return getattr(type(target), "__call__", target)  # noqa: B004 - the method itself


def callable_name(func: Callable[..., Any]) -> str:
    """``module.qualname`` of a function or method; for a ``functools.partial``
    that of the function it wraps; for a callable instance that of its class."""
    target = _unwrap_partial(func)
    qualname = getattr(target, "__qualname__", None)  # an instance has none
    if isinstance(qualname, str):
        return f"{getattr(target, '__module__', None) or type(target).__module__}.{qualname}"
    cls = type(target)
    return f"{cls.__module__}.{cls.__qualname__}"


def options_key(overrides: Mapping[str, Any]) -> tuple[tuple[str, type, Any], ...] | None:
    """A hashable key for caching a resolved config, or None if a value is unhashable."""
    if not overrides:
        return ()
    # The value's type is part of the key: 1 == True and 0 == False hash alike, and
    # a cached config validated for True must not let 1 through.
    items = tuple((name, type(value), value) for name, value in overrides.items())
    for _, _, value in items:
        if not isinstance(value, Hashable):
            return None
    return items


def log_callback_error(callback: Callable[..., Any], err: BaseException) -> None:
    """Log a failed ``on_commit`` callback: the transaction is already committed,
    so the error must not make the scope look failed, nor vanish."""
    name = getattr(callback, "__qualname__", repr(callback))
    # A StatementError's text carries SQL and bound parameters: class name only.
    logger.error(
        "on_commit callback %s failed after COMMIT: %s",
        name,
        type(err).__name__,
        exc_info=None if _carries_statement(err) else err,
    )


def _carries_statement(err: BaseException | None) -> bool:
    # A traceback prints the whole chain: any StatementError in it would log SQL
    # and bound parameters.
    seen = 0
    while err is not None and seen < 20:
        if isinstance(err, StatementError):
            return True
        err = err.__cause__ or err.__context__
        seen += 1
    return False


def run_callbacks_sync(callbacks: Sequence[Callable[[], Any]]) -> None:
    """Run ``on_commit`` callbacks in registration order; failures are logged."""
    for callback in callbacks:
        try:
            callback()
        except Exception as err:
            log_callback_error(callback, err)


def detached_config(overrides: Mapping[str, Any]) -> SessionConfig:
    """The config of a call given its session explicitly before any manager is
    set up: it joins that session, which sessionscope does not own, so only the
    propagation and rollback options matter and nothing is recorded."""
    return SessionConfig(enable_monitoring=False).merged(overrides)


def scope_manager(get_manager: Callable[[], M], explicit: bool) -> M | None:
    """The manager of a decorated call; None when the caller passed its session
    explicitly and no manager is set up yet (the call only joins that session)."""
    if not explicit:
        return get_manager()
    try:
        return get_manager()
    except SessionFactoryNotInitializedError:
        return None
