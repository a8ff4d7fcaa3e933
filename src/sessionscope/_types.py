"""Static types of the public API: statistics as ``TypedDict``s, scope options,
and the callable types the decorators return (pure, no I/O, no behaviour).

The decorator types are ``Protocol``s: what a decorator returns at run time is
a plain function, which has every member declared here. They exist so that a
type checker sees a decorated function's real parameters, minus the injected
session, and still accepts a session passed explicitly in its place.
"""

# No "from __future__ import annotations": TypedDict reads NotRequired/Required
# from evaluated annotations (on Python 3.10 too).
from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, Literal, ParamSpec, Protocol, overload

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

# typing_extensions (a dependency of SQLAlchemy itself): TypeVar defaults (PEP 696)
# and a TypedDict that knows NotRequired/Required on every supported Python version.
from typing_extensions import NotRequired, Required, TypedDict, TypeVar

__all__ = [
    "AS",
    "AS_co",
    "AsyncSessionDecorator",
    "EngineRoutingStats",
    "FunctionStats",
    "ManagerAsyncSessionDecorator",
    "ManagerSessionDecorator",
    "PoolStats",
    "RoutingStats",
    "S",
    "S_co",
    "ScopeOptions",
    "SessionDecorator",
    "SessionFunction",
    "SessionMethod",
    "SessionStats",
    "StatsSnapshot",
]

S_co = TypeVar("S_co", bound=Session, default=Session, covariant=True)
"""The sync session class of a :class:`SessionManager` (``Session`` unless given).
Covariant: a ``SessionManager[SQLModelSession]`` is a ``SessionManager`` (every
session it gives is a ``Session``, every function it decorates takes one)."""
AS_co = TypeVar("AS_co", bound=AsyncSession, default=AsyncSession, covariant=True)
"""The async session class of a :class:`SessionManager` (``AsyncSession`` unless given)."""
S = TypeVar("S", bound=Session, default=Session)
"""A sync session class as a function infers it (``setup_database_connection``)."""
AS = TypeVar("AS", bound=AsyncSession, default=AsyncSession)
"""An async session class as a function infers it."""

P = ParamSpec("P")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)
O = TypeVar("O")  # noqa: E741 - the owner (self / cls / first argument) of a method
SessT = TypeVar("SessT", bound=Session)
ASessT = TypeVar("ASessT", bound=AsyncSession)
SessT_contra = TypeVar("SessT_contra", contravariant=True)
SessT_inv = TypeVar("SessT_inv")


# -- statistics ----------------------------------------------------------------------


class FunctionStats(TypedDict):
    """Figures of one decorated function since the last reset (durations in seconds)."""

    calls: int
    failures: int
    avg_duration: float
    max_duration: float


class PoolStats(TypedDict, total=False):
    """Pool figures of one engine; pools without a figure (``StaticPool``,
    ``NullPool``, ...) leave it out. ``overflow`` is negative while the pool has
    not filled up (SQLAlchemy's figure)."""

    pool_class: Required[str]
    size: int
    checked_in: int
    checked_out: int
    overflow: int
    max_overflow: int
    timeout: float


class EngineRoutingStats(TypedDict):
    """Routing figures of one engine: the primary, or a replica (which adds
    ``healthy``, ``cooldown_remaining`` and ``connect_failures``)."""

    role: Literal["primary", "replica"]
    url: str
    reads: int
    pool: dict[str, PoolStats]
    healthy: NotRequired[bool]
    cooldown_remaining: NotRequired[float]
    connect_failures: NotRequired[int]


class RoutingStats(TypedDict):
    """Read-replica routing figures (present only on a manager with replicas).

    The counts run since the last reset, like every counter: ``reads`` counts
    routed read-only sessions that connected, each on the engine its first
    connection landed on (a scope that never connects is no read);
    ``fallbacks`` counts each move off a replica that failed to connect.
    """

    selection: str
    read_your_writes: float
    cooldown: float
    reads: int
    fallbacks: int
    primary_because: dict[str, int]
    engines: dict[str, EngineRoutingStats]


class NodeStats(TypedDict):
    """One primary of a cluster manager (``primaries=``)."""

    url: str
    sessions: int
    healthy: bool
    cooldown_remaining: float
    failures: int


class ClusterStats(TypedDict):
    """Write-routing figures of a manager with several primaries."""

    selection: str
    cooldown: float
    nodes: dict[str, NodeStats]


class StatsSnapshot(TypedDict):
    """The counters of a manager since the last reset (``Stats.snapshot()``).

    ``success_rate`` is in percent (100.0 when nothing ran); durations are in
    seconds; ``retry_errors`` counts retries by error class name; ``functions``
    has one entry per decorated function, by qualified name.
    """

    session_count: int
    active_sessions: int
    total_transactions: int
    failed_transactions: int
    success_rate: float
    committed_transactions: int
    rolled_back_transactions: int
    retries: int
    retry_errors: dict[str, int]
    savepoints: int
    savepoint_rollbacks: int
    cancellations: int
    slow_transactions: int
    long_held_sessions: int
    pool_timeouts: int
    avg_duration: float
    p95_duration: float
    max_duration: float
    pool_acquisitions: int
    avg_pool_wait: float
    p95_pool_wait: float
    max_pool_wait: float
    functions: dict[str, FunctionStats]


class SessionStats(StatsSnapshot):
    """What ``get_session_stats()`` and ``SessionManager.get_stats()`` return: the
    counters, the pool figures by engine role (``"sync"``, ``"async"``, one per
    replica), ``routing`` on a manager with read replicas and ``cluster`` on one
    with several primaries."""

    pool: dict[str, PoolStats]
    routing: NotRequired[RoutingStats]
    cluster: NotRequired[ClusterStats]


# -- scope options -------------------------------------------------------------------


class ScopeOptions(TypedDict, total=False):
    """Keyword options of a scope, a decorator or a FastAPI dependency: the
    fields of :class:`SessionConfig` (validated at run time as well)."""

    auto_commit: bool
    auto_rollback: bool
    enable_monitoring: bool
    log_level: str
    retry_attempts: int
    retry_delay: float
    retry_max_delay: float
    retry_predicate: Callable[[BaseException], bool]
    propagation: Literal["required", "nested", "requires_new", "mandatory", "never"]
    read_only: bool
    isolation_level: str | None
    timeout: float | None
    durable: bool
    expire_on_commit: bool
    slow_threshold: float
    long_session_warning: float | None
    expected_errors: tuple[type[BaseException], ...]
    expected_status_below: int
    child_tasks: Literal["independent", "forbid"]
    causal_reads: bool
    snapshot: bool


# -- decorated functions -------------------------------------------------------------


# S is contravariant (the session is an argument). Pyright infers "covariant"
# because the first overload, which does not mention it, accepts any session.
class SessionFunction(Protocol[SessT_contra, P, R_co]):  # pyright: ignore[reportInvalidTypeVarUse]
    """A decorated function whose session comes first: called without it (one
    is injected), or with a session of its own passed positionally first.

    ``SessionFunction[Session, (name: str), User]`` is what
    ``@with_session def f(session: Session, name: str) -> User`` becomes; async
    decorators give ``SessionFunction[AsyncSession, (...), Coroutine[Any, Any, T]]``.
    Passing the session as ``session=`` works at run time, but a ``ParamSpec``
    cannot add that keyword back, so type checkers only accept it positionally.
    """

    # What functools.wraps gives the wrapper: the wrapped function's names, and
    # the wrapped function itself.
    __name__: str
    __qualname__: str
    __wrapped__: Callable[..., Any]

    @overload
    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R_co: ...
    @overload
    def __call__(self, session: SessT_contra, /, *args: P.args, **kwargs: P.kwargs) -> R_co: ...


class SessionMethod(Protocol[O, SessT_inv, P, R]):
    """A decorated function whose session comes second: a method
    (``def m(self, session, ...)``, or ``cls`` under ``@classmethod``), or any
    function whose first parameter is not the session.

    Read through an instance (or, for a classmethod, the class) it is a
    :class:`SessionFunction` without ``self``; read through the class it takes
    the instance first, as a plain method does.
    """

    __name__: str
    __qualname__: str
    __wrapped__: Callable[..., Any]

    @overload
    def __get__(self, obj: O, owner: Any, /) -> SessionFunction[SessT_inv, P, R]: ...
    @overload
    def __get__(self, obj: Any, owner: O, /) -> SessionFunction[SessT_inv, P, R]: ...
    @overload
    def __get__(self, obj: None, owner: Any, /) -> "SessionMethod[O, SessT_inv, P, R]": ...
    @overload
    def __call__(self, owner: O, /, *args: P.args, **kwargs: P.kwargs) -> R: ...
    @overload
    def __call__(
        self, owner: O, session: SessT_inv, /, *args: P.args, **kwargs: P.kwargs
    ) -> R: ...


# Decorators returned by the called forms (``@with_session(read_only=True)``): the
# same two shapes as the bare forms. The module-level ones accept any session class
# (the default manager's class is not known statically); a manager's ones accept
# functions whose session parameter takes the manager's class.


class SessionDecorator(Protocol):
    """``with_session(**options)``."""

    @overload
    def __call__(  # type: ignore[overload-overlap]  # first match wins: session first
        self, func: Callable[Concatenate[SessT, P], R], /
    ) -> SessionFunction[SessT, P, R]: ...
    @overload
    def __call__(
        self, func: Callable[Concatenate[O, SessT, P], R], /
    ) -> SessionMethod[O, SessT, P, R]: ...


class AsyncSessionDecorator(Protocol):
    """``async_with_session(**options)``."""

    @overload
    def __call__(  # type: ignore[overload-overlap]  # first match wins: session first
        self, func: Callable[Concatenate[ASessT, P], Coroutine[Any, Any, R]], /
    ) -> SessionFunction[ASessT, P, Coroutine[Any, Any, R]]: ...
    @overload
    def __call__(
        self, func: Callable[Concatenate[O, ASessT, P], Coroutine[Any, Any, R]], /
    ) -> SessionMethod[O, ASessT, P, Coroutine[Any, Any, R]]: ...


class ManagerSessionDecorator(Protocol[SessT_inv]):
    """``manager.with_session(**options)``."""

    @overload
    def __call__(  # type: ignore[overload-overlap]  # first match wins: session first
        self, func: Callable[Concatenate[SessT_inv, P], R], /
    ) -> SessionFunction[SessT_inv, P, R]: ...
    @overload
    def __call__(
        self, func: Callable[Concatenate[O, SessT_inv, P], R], /
    ) -> SessionMethod[O, SessT_inv, P, R]: ...


class ManagerAsyncSessionDecorator(Protocol[SessT_inv]):
    """``manager.async_with_session(**options)``."""

    @overload
    def __call__(  # type: ignore[overload-overlap]  # first match wins: session first
        self, func: Callable[Concatenate[SessT_inv, P], Coroutine[Any, Any, R]], /
    ) -> SessionFunction[SessT_inv, P, Coroutine[Any, Any, R]]: ...
    @overload
    def __call__(
        self, func: Callable[Concatenate[O, SessT_inv, P], Coroutine[Any, Any, R]], /
    ) -> SessionMethod[O, SessT_inv, P, Coroutine[Any, Any, R]]: ...
