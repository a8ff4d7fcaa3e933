"""``SessionManager``: engines, session factories, config and statistics of one
database; the module-level API acts on a default instance."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager, contextmanager
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar, cast, overload

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
)
from sqlalchemy.orm import Session, sessionmaker
from typing_extensions import Unpack

from . import _aborted, _backend, _core, _poolwait, _watch
from ._async import AsyncScope, acall_with_retry, decorate_async
from ._cluster import Cluster
from ._config import SessionConfig, validate_overrides
from ._decorate import options_key
from ._errors import PoolExhaustedError
from ._observe import TransactionObserver
from ._routing import Router
from ._source import SessionSource
from ._stats import Stats
from ._sync import SyncScope, call_with_retry, decorate_sync
from ._types import (
    AS_co,
    ClusterStats,
    ManagerAsyncSessionDecorator,
    ManagerSessionDecorator,
    PoolStats,
    RoutingStats,
    S_co,
    ScopeOptions,
    SessionFunction,
    SessionMethod,
    SessionStats,
)

__all__ = ["SessionManager"]

P = ParamSpec("P")
T = TypeVar("T")
O = TypeVar("O")  # noqa: E741 - the owner (self / cls / first argument) of a method

_CACHE_LIMIT = 256

_logger = logging.getLogger("sessionscope")


class _Host:
    """What the scope machinery needs of a manager (``_core.ScopeHost``): its
    bound methods, so that a scope pays no extra call for the indirection."""

    __slots__ = (
        "config",
        "name",
        "observers",
        "open_async",
        "open_sync",
        "pool_exhausted",
        "resolve",
        "stats",
    )

    def __init__(self, manager: SessionManager[Any, Any]) -> None:
        self.name = manager.name
        self.config = manager.config
        self.observers: tuple[TransactionObserver, ...] = ()
        self.open_sync = manager._open_sync
        self.open_async = manager._open_async
        self.resolve = manager._resolve
        self.pool_exhausted = manager._pool_exhausted
        self.stats = manager.stats


class SessionManager(Generic[S_co, AS_co]):
    """Engines, session factories, configuration and statistics of one database.

    Generic in its session classes: ``SessionManager(url, session_class=SQLModelSession)``
    is a ``SessionManager[SQLModelSession]``, whose scopes yield that class to a
    type checker; without a class it is ``SessionManager[Session, AsyncSession]``.

    ``SessionManager()`` with no URL uses ``DATABASE_URL`` or the embedded SQLite
    file. The async URL is derived from the sync one unless given; an async URL
    given as ``url`` (``postgresql+asyncpg://...``) is the async URL, and the sync
    engine uses the matching sync driver. A URL without a driver
    (``postgresql://``, ``mysql://``) uses psycopg / PyMySQL (asyncpg / aiomysql
    async), the drivers of the package's extras. An engine option or a given
    engine that runs every session in autocommit raises ``ValueError`` (a failed
    scope could not roll back). An existing ``Engine`` / ``AsyncEngine`` can be
    passed instead of URLs, so an application keeps its engine (and its own
    ``get_db()``) while it migrates. Remaining
    keyword arguments are engine options (``pool_size=...``, ``echo=...``).

    Engines are created on first use, so constructing a manager never connects
    and never imports a driver that is not used.

    Read replicas: ``replicas=[url_or_engine, ...]`` (and ``async_replicas=``,
    paired by position, derived from ``replicas`` when left out) send scopes that
    open a new session with ``read_only=True`` to a replica, picked by
    ``replica_selection`` (``"round_robin"`` or ``"random"``); everything else stays
    on the primary. For ``read_your_writes`` seconds after the current thread or
    task committed on the primary, its reads go to the primary too (0 disables
    it). A replica that fails to connect is left out for ``replica_cooldown``
    seconds and the read moves to the next replica, then to the primary. See
    ``docs/replicas.md``.

    Several primaries (a Galera cluster, PostgreSQL servers with failover):
    ``primaries=[url, ...]`` instead of ``url=`` (and ``async_primaries=``,
    paired by position, derived when left out). Each new write session goes to
    the node that ``primary_selection`` picks (``"failover"``: the first healthy
    one in order; ``"round_robin"``: spread); a node that refuses a connection,
    is not ready (Galera not synced, PostgreSQL in recovery) or loses one is left
    out for ``primary_cooldown`` seconds, and the retry of the unit of work goes
    to another node. The first node is :attr:`url`. See ``docs/clusters.md``.
    """

    def __init__(
        self,
        url: str | URL | None = None,
        *,
        async_url: str | URL | None = None,
        engine: Engine | None = None,
        async_engine: AsyncEngine | None = None,
        config: SessionConfig | None = None,
        session_class: type[S_co] | None = None,
        async_session_class: type[AS_co] | None = None,
        session_options: Mapping[str, Any] | None = None,
        name: str | None = None,
        replicas: Sequence[str | URL | Engine] | None = None,
        async_replicas: Sequence[str | URL | AsyncEngine] | None = None,
        replica_selection: str = "round_robin",
        read_your_writes: float = 2.0,
        replica_cooldown: float = 30.0,
        primaries: Sequence[str | URL] | None = None,
        async_primaries: Sequence[str | URL] | None = None,
        primary_selection: str = "failover",
        primary_cooldown: float = 10.0,
        **engine_options: Any,
    ) -> None:
        if primaries is not None or async_primaries is not None:
            if url is not None or engine is not None or async_url is not None:
                raise TypeError("pass either primaries= or url=/engine=/async_url=, not both")
            if isinstance(primaries, Sequence) and not isinstance(primaries, str) and primaries:
                url = primaries[0]
            if isinstance(async_primaries, Sequence) and not isinstance(async_primaries, str):
                async_url = async_primaries[0] if async_primaries else None
        if url is not None and engine is not None:
            raise TypeError("pass either url= or engine=, not both")
        if async_url is not None and async_engine is not None:
            raise TypeError("pass either async_url= or async_engine=, not both")
        if url is None and engine is None:
            if async_engine is not None:
                url = async_engine.url
            elif async_url is not None:
                url = async_url
            else:
                url = _backend.default_url()
        self._url: URL | None = None
        if engine is None:
            assert url is not None
            given = make_url(url)
            if async_url is None and async_engine is None and _backend.is_async_url(given):
                # An async URL given as the URL (often DATABASE_URL): the async side
                # uses it as given, the sync side the matching sync driver.
                async_url = given
            self._url = _backend.sync_url_for(given)
        _backend.refuse_autocommit(engine, async_engine, engine_options)
        self._config = config if config is not None else SessionConfig()
        options = dict(session_options or {})
        # expire_on_commit lives in the config (overridable per scope); a value
        # given in session_options is the manager's default for it.
        if "expire_on_commit" in options:
            self._config = self._config.merged(
                {"expire_on_commit": bool(options["expire_on_commit"])}
            )
        options["expire_on_commit"] = self._config.expire_on_commit
        self._stats = Stats()
        self._source = source = SessionSource(
            self._url,
            async_url,
            engine,
            async_engine,
            engine_options,
            options,
            session_class,
            async_session_class,
            _core.install_session_events,
            _core.install_retry_events,
            self._prepare_engine,
        )
        self._expire_default = self._config.expire_on_commit
        self._resolved: dict[tuple[tuple[str, type, Any], ...], SessionConfig] = {}
        self.name = name or _backend.safe_url(self.url)
        self._cluster: Cluster | None = None
        self._node_factories: dict[tuple[Any, bool], Any] = {}
        if primaries is not None or async_primaries is not None:
            self._cluster = Cluster(
                primaries,
                async_primaries,
                policy=primary_selection,
                cooldown=primary_cooldown,
                engine_options=source.engine_options,
                first_engine=lambda is_async: self.async_engine if is_async else self.engine,
                engine_created=source.engine_created,
                log_enabled=lambda: self._config.log_levelno <= logging.WARNING,
            )
            source.add_engine_hook(self._cluster.on_engine_created)
        self._router: Router | None = None
        if replicas is not None or async_replicas is not None:
            self._router = Router(
                source,
                replicas,
                async_replicas,
                selection=replica_selection,
                read_your_writes=read_your_writes,
                cooldown=replica_cooldown,
                write_engine=self._write_engine,
                name=self.name,
                log_enabled=lambda: self._config.log_levelno <= logging.WARNING,
                stats=lambda: self._stats,
            )
        self._host = _Host(self)
        self._plain: SessionConfig | None = None
        self._note_config()

    def __repr__(self) -> str:
        return f"SessionManager({self.name!r})"

    # -- engines and factories -------------------------------------------------

    @property
    def url(self) -> URL:
        """The sync database URL (render it with ``hide_password`` when logging)."""
        return self._source.url

    @property
    def async_url(self) -> URL:
        """The async URL: as given, or derived from :attr:`url`."""
        return self._source.async_url

    @property
    def engine(self) -> Engine:
        """The sync engine, created on first use."""
        return self._source.engine

    @property
    def async_engine(self) -> AsyncEngine:
        """The async engine, created on first use."""
        return self._source.async_engine

    @property
    def session_factory(self) -> sessionmaker[Session]:
        """The ``sessionmaker`` behind sync scopes."""
        return self._source.session_factory

    @property
    def async_session_factory(self) -> async_sessionmaker[AsyncSession]:
        """The ``async_sessionmaker`` behind async scopes."""
        return self._source.async_session_factory

    @property
    def stats(self) -> Stats:
        """The counters of this manager (read them with :meth:`get_stats`)."""
        return self._stats

    @stats.setter
    def stats(self, stats: Stats) -> None:
        # setup_database_connection() hands the counters on to a new default manager.
        self._stats = stats
        self._host.stats = stats
        for engine in self.engines_by_role().values():
            _poolwait.install(engine, stats)

    def _prepare_engine(self, engine: Engine) -> None:
        _backend.apply_sqlite_savepoint_recipe(engine)
        _backend.release_failed_aiosqlite_cursors(engine)
        _aborted.track(engine)
        _poolwait.install(engine, self._stats)

    def add_observer(self, observer: TransactionObserver) -> None:
        """Report this manager's transactions to ``observer`` (see
        :mod:`sessionscope.otel_tracing`): when each outermost transaction begins
        and ends, its savepoints and its retries."""
        self._host.observers = (*self._host.observers, observer)

    def remove_observer(self, observer: TransactionObserver) -> None:
        """Stop reporting to ``observer``."""
        self._host.observers = tuple(o for o in self._host.observers if o is not observer)

    def add_engine_hook(self, hook: Callable[[str, Engine], None]) -> None:
        """Call ``hook(role, engine)`` for every engine this manager creates from
        now on (roles as in :meth:`engines_by_role`; an async engine is passed as
        its ``sync_engine``): where exporters attach their engine events."""
        self._source.add_engine_hook(hook)

    def remove_engine_hook(self, hook: Callable[[str, Engine], None]) -> None:
        """Stop calling ``hook`` (see :meth:`add_engine_hook`)."""
        self._source.remove_engine_hook(hook)

    def _open_sync(self, cfg: SessionConfig, retrying: bool) -> tuple[Session, Session]:
        source = self._source
        if cfg is self._plain:
            factory = source.sync_factory or source.session_factory
            session = (source.retrying(factory) if retrying else factory)()
        elif self._cluster is not None and self._on_cluster(cfg, False):
            session = self._open_on_node(cfg, False, retrying)
        elif self._no_options(cfg):
            factory = source.session_factory
            session = (source.retrying(factory) if retrying else factory)()
        elif cfg.read_only and self._router is not None and not source.is_bound(False):
            target = self._router.target(cfg, False)
            session = source.open_with_options(
                cfg, target.factory, target.engine, False, retrying
            )
            target.attach(session)
        else:
            session = source.open_with_options(
                cfg, source.session_factory, source.engine, False, retrying
            )
        return session, session

    def _open_async(self, cfg: SessionConfig, retrying: bool) -> tuple[Session, AsyncSession]:
        source = self._source
        if cfg is self._plain:
            factory = source.async_factory or source.async_session_factory
            front = (source.retrying(factory) if retrying else factory)()
        elif self._cluster is not None and self._on_cluster(cfg, True):
            front = self._open_on_node(cfg, True, retrying)
        elif self._no_options(cfg):
            factory = source.async_session_factory
            front = (source.retrying(factory) if retrying else factory)()
        elif cfg.read_only and self._router is not None and not source.is_bound(True):
            target = self._router.target(cfg, True)
            front = source.open_with_options(cfg, target.factory, target.engine, True, retrying)
            target.attach(front)
        else:
            front = source.open_with_options(
                cfg, source.async_session_factory, source.async_engine, True, retrying
            )
        return front.sync_session, front

    def _on_cluster(self, cfg: SessionConfig, is_async: bool) -> bool:
        # Bound sessions use the bound connection; routed reads the router.
        return not self._source.is_bound(is_async) and not (
            cfg.read_only and self._router is not None
        )

    def _open_on_node(self, cfg: SessionConfig, is_async: bool, retrying: bool) -> Any:
        """A new session on the node the cluster picks (``primaries=``)."""
        assert self._cluster is not None
        engine = self._cluster.engine(self._cluster.pick(cfg.enable_monitoring), is_async)
        factory = self._node_factories.get((engine, is_async))
        if factory is None:
            kw = self._source.factory_kw(is_async)
            maker: Any = async_sessionmaker if is_async else sessionmaker
            factory = self._node_factories[(engine, is_async)] = maker(engine, **kw)
        return self._source.open_with_options(cfg, factory, engine, is_async, retrying)

    def _write_engine(self, is_async: bool) -> Any:
        """The engine new write sessions use now: the cluster's pick, or the
        manager's own engine."""
        if self._cluster is None:
            return self.async_engine if is_async else self.engine
        return self._cluster.engine(self._cluster.pick(False), is_async)

    # -- configuration ---------------------------------------------------------

    @property
    def config(self) -> SessionConfig:
        """The current configuration of this manager."""
        return self._config

    def configure(self, **fields: Unpack[ScopeOptions]) -> SessionConfig:
        """Change this manager's configuration; returns the new config.

        Validates first: on an invalid value nothing changes.
        """
        new = self._config.merged(fields)
        self._config = new
        self._resolved = {}
        self._note_config()
        return new

    def _note_config(self) -> None:
        # What scopes read of the current config without a call: the config
        # itself (for scopes and decorated calls without overrides), and the
        # config again when a scope with it opens a plain session from the
        # default factory (no per-scope option, no cluster), so that those skip
        # the checks of _open_sync / _open_async.
        cfg = self._host.config = self._config
        self._plain = cfg if self._cluster is None and self._no_options(cfg) else None

    def _no_options(self, cfg: SessionConfig) -> bool:
        # Whether a session for ``cfg`` is the default factory's, as it comes.
        return (
            cfg.isolation_level is None
            and not cfg.read_only
            and cfg.timeout is None
            and not cfg.causal_reads
            and cfg.expire_on_commit is self._expire_default
        )

    def _resolve(
        self, key: tuple[tuple[str, type, Any], ...] | None, overrides: Mapping[str, Any]
    ) -> SessionConfig:
        if not overrides:
            return self._config
        if key is None:
            return self._config.merged(overrides)
        cfg = self._resolved.get(key)
        if cfg is None:
            cfg = self._config.merged(overrides)
            if len(self._resolved) < _CACHE_LIMIT:
                self._resolved[key] = cfg
        return cfg

    # -- scopes ----------------------------------------------------------------

    def session_scope(
        self, **overrides: Unpack[ScopeOptions]
    ) -> AbstractContextManager[S_co, None]:
        """A context manager yielding a ``Session`` (of this manager's session
        class) in a transaction scope."""
        # The scope opens sessions of this manager's class: its static type says so
        # (an ignore rather than cast(), which is a call on every scope).
        return SyncScope(  # type: ignore[return-value]
            self._host,
            self._config if not overrides else self._resolve(options_key(overrides), overrides),
        )

    def async_session_scope(
        self, **overrides: Unpack[ScopeOptions]
    ) -> AbstractAsyncContextManager[AS_co, None]:
        """An async context manager yielding an ``AsyncSession`` (of this manager's
        async session class) in a transaction scope."""
        return AsyncScope(  # type: ignore[return-value]
            self._host,
            self._config if not overrides else self._resolve(options_key(overrides), overrides),
        )

    @overload
    def with_session(  # type: ignore[overload-overlap]  # first match wins: session first
        self, func: Callable[Concatenate[S_co, P], T], /
    ) -> SessionFunction[S_co, P, T]: ...
    @overload
    def with_session(
        self, func: Callable[Concatenate[O, S_co, P], T], /
    ) -> SessionMethod[O, S_co, P, T]: ...
    @overload
    def with_session(
        self, func: None = None, /, **overrides: Unpack[ScopeOptions]
    ) -> ManagerSessionDecorator[S_co]: ...

    def with_session(
        self, func: Callable[..., Any] | None = None, /, **overrides: Unpack[ScopeOptions]
    ) -> Any:
        """Decorator: run the function in a scope of this manager; see
        :func:`sessionscope.with_session`."""
        if func is None:
            validate_overrides(overrides)
            return lambda f: decorate_sync(f, overrides, self._get_host)
        return decorate_sync(func, {}, self._get_host)

    @overload
    def async_with_session(  # type: ignore[overload-overlap]  # first match wins: session first
        self, func: Callable[Concatenate[AS_co, P], Coroutine[Any, Any, T]], /
    ) -> SessionFunction[AS_co, P, Coroutine[Any, Any, T]]: ...
    @overload
    def async_with_session(
        self, func: Callable[Concatenate[O, AS_co, P], Coroutine[Any, Any, T]], /
    ) -> SessionMethod[O, AS_co, P, Coroutine[Any, Any, T]]: ...
    @overload
    def async_with_session(
        self, func: None = None, /, **overrides: Unpack[ScopeOptions]
    ) -> ManagerAsyncSessionDecorator[AS_co]: ...

    def async_with_session(
        self, func: Callable[..., Any] | None = None, /, **overrides: Unpack[ScopeOptions]
    ) -> Any:
        """Async decorator: see :func:`sessionscope.async_with_session`."""
        if func is None:
            validate_overrides(overrides)
            return lambda f: decorate_async(f, overrides, self._get_host)
        return decorate_async(func, {}, self._get_host)

    @property
    def scope_host(self) -> _core.ScopeHost:
        """What sessionscope's scope machinery uses of this manager (where its
        sessions come from, its configuration and counters); for the package's
        own decorators and adapters, not for application code."""
        return self._host

    def _get_host(self) -> _core.ScopeHost:
        return self._host

    @overload
    def with_retry(
        self,
        func: Callable[..., T],
        /,
        *args: Any,
        max_retries: int | None,
        retry_delay: float | None = None,
        **kwargs: Any,
    ) -> T: ...
    @overload
    def with_retry(
        self,
        func: Callable[..., T],
        /,
        *args: Any,
        max_retries: int | None = None,
        retry_delay: float | None,
        **kwargs: Any,
    ) -> T: ...
    @overload
    def with_retry(self, func: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T: ...

    # See sessionscope.with_retry on max_retries / retry_delay.
    def with_retry(  # type: ignore[misc]
        self,
        func: Callable[..., T],
        /,
        *args: Any,
        max_retries: int | None = None,
        retry_delay: float | None = None,
        **kwargs: Any,
    ) -> T:
        """Call ``func(*args, **kwargs)``, retrying transient errors (outermost
        only); see :func:`sessionscope.with_retry`, types included."""
        cfg = self._retry_config(max_retries, retry_delay)
        name = getattr(func, "__qualname__", None)
        token = _core.enter_retry_boundary(cfg, explicit=False, is_async=None, manager=None)
        if token is None:
            return func(*args, **kwargs)
        return call_with_retry(self._host, cfg, name, token, lambda: func(*args, **kwargs))

    @overload
    async def async_with_retry(
        self,
        func: Callable[..., Awaitable[T]],
        /,
        *args: Any,
        max_retries: int | None,
        retry_delay: float | None = None,
        **kwargs: Any,
    ) -> T: ...
    @overload
    async def async_with_retry(
        self,
        func: Callable[..., Awaitable[T]],
        /,
        *args: Any,
        max_retries: int | None = None,
        retry_delay: float | None,
        **kwargs: Any,
    ) -> T: ...
    @overload
    async def async_with_retry(
        self, func: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> T: ...

    async def async_with_retry(  # type: ignore[misc]
        self,
        func: Callable[..., Awaitable[T]],
        /,
        *args: Any,
        max_retries: int | None = None,
        retry_delay: float | None = None,
        **kwargs: Any,
    ) -> T:
        """Await ``func(*args, **kwargs)``, retrying transient errors (outermost only)."""
        cfg = self._retry_config(max_retries, retry_delay)
        name = getattr(func, "__qualname__", None)
        token = _core.enter_retry_boundary(cfg, explicit=False, is_async=None, manager=None)
        if token is None:
            return await func(*args, **kwargs)
        return await acall_with_retry(self._host, cfg, name, token, lambda: func(*args, **kwargs))

    def _retry_config(self, max_retries: int | None, retry_delay: float | None) -> SessionConfig:
        overrides: dict[str, Any] = {}
        if max_retries is not None:
            overrides["retry_attempts"] = max_retries
        if retry_delay is not None:
            overrides["retry_delay"] = retry_delay
        return self._resolve(options_key(overrides), overrides)

    @functools.cached_property
    def get_async_db(self) -> Callable[..., Awaitable[AS_co]]:
        """FastAPI dependency of this manager for ``async def`` path functions:
        ``db: AsyncSession = Depends(manager.get_async_db)``.

        One async scope per request, committed after the path function returns and
        before the response is sent (see :mod:`sessionscope.fastapi`). The same
        callable every time, so FastAPI resolves it once per request. A ``def``
        path function, or a parameter annotated with a sync ``Session``, given it
        fails the request with a ``TypeError`` naming :attr:`get_sync_db`. Needs
        FastAPI.
        """
        from .fastapi import async_session_dependency

        return async_session_dependency(self)

    @property
    def get_db(self) -> Callable[..., Awaitable[AS_co]]:
        """The same dependency as :attr:`get_async_db` (its former name, kept:
        ``Depends(manager.get_db)`` and ``Depends(manager.get_async_db)`` are one
        dependency)."""
        return self.get_async_db

    @functools.cached_property
    def get_sync_db(self) -> Callable[..., Awaitable[S_co]]:
        """FastAPI dependency of this manager for ``def`` path functions:
        ``db: Session = Depends(manager.get_sync_db)``; sync twin of
        :attr:`get_async_db`. Needs FastAPI."""
        from .fastapi import sync_session_dependency

        return sync_session_dependency(self)

    @contextmanager
    def bound_to(self, connection: Connection | AsyncConnection) -> Iterator[None]:
        """Until exit, open this manager's sessions on ``connection`` (its sync
        sessions for a ``Connection``, its async ones for an ``AsyncConnection``),
        each joining the transaction open on it through a SAVEPOINT
        (``join_transaction_mode="create_savepoint"``).

        A scope's COMMIT then releases its savepoint and its ROLLBACK rolls back to
        it, so the owner of the connection's transaction decides what is kept: the
        basis of :mod:`sessionscope.testing`, which rolls it back after each test.
        While bound, ``requires_new`` scopes use the connection too (their work is
        no longer independent of the enclosing scope), and per-scope isolation
        level, timeout and server-side read-only are not applied (the transaction
        is already open); the ORM-level ``read_only`` guard is. A connection serves
        one thread or task at a time: run no concurrent scopes while bound.

        Raises ``ValueError`` when no transaction is open on ``connection``: the
        sessions would then commit for real.
        """
        with self._source.bound_to(connection):
            yield

    # -- monitoring --------------------------------------------------------------

    def engines_by_role(self) -> dict[str, Engine]:
        """The engines created so far, keyed by role (``"sync"``, ``"async"``; the
        async engine as its ``sync_engine``). Pool status and the exporters report
        one entry per role, so a feature adding engines (read replicas) adds its
        roles here and is reported everywhere. Creates nothing."""
        engines = self._source.created_engines()
        if self._router is not None:
            engines.update(self._router.engines_by_role())
        if self._cluster is not None:
            engines.update(self._cluster.engines_by_role())
        return engines

    def replica_health(self) -> dict[str, bool]:
        """Each read replica's health now, by name (``replica1``, ...): False
        while it cools down after a failed connect. Empty without replicas (the
        exporters report routing figures only for managers with replicas)."""
        return {} if self._router is None else self._router.health()

    def pool_status(self) -> dict[str, PoolStats]:
        """Pool figures per engine role (see :meth:`engines_by_role`): ``size``,
        ``checked_in``, ``checked_out``, ``overflow`` (SQLAlchemy's figure: negative
        while the pool has not filled up), ``timeout`` and ``pool_class``; pools
        without a figure (``StaticPool``, ``NullPool``, ...) report what they have."""
        return {
            role: cast(PoolStats, _backend.pool_status(engine))
            for role, engine in self.engines_by_role().items()
        }

    def get_stats(self) -> SessionStats:
        """Statistics of this manager (see :class:`SessionStats`), with its pool
        status under ``"pool"`` and, with read replicas, ``"routing"``."""
        # The snapshot is a new dict: it becomes the full statistics in place.
        snapshot = cast(SessionStats, self.stats.snapshot())
        snapshot["pool"] = self.pool_status()
        if self._router is not None:
            snapshot["routing"] = cast(RoutingStats, self._router.snapshot(dict(snapshot["pool"])))
        if self._cluster is not None:
            snapshot["cluster"] = cast(ClusterStats, self._cluster.snapshot())
        return snapshot

    def reset_stats(self) -> None:
        """Zero the counters (the live ``active_sessions`` gauge is kept), the
        routing ones included; replica health is state and is kept."""
        self.stats.reset()
        if self._cluster is not None:
            self._cluster.reset()

    def on_commit(self, callback: Callable[[], Any]) -> None:
        """Like :func:`sessionscope.on_commit`, on this manager's innermost scope."""
        _core.on_commit(callback, self._host)

    def set_rollback(self, rollback: bool = True) -> None:
        """Like :func:`sessionscope.set_rollback`, on this manager's innermost scope:
        with scopes of two databases nested, each can be doomed on its own."""
        _core.set_rollback(rollback, self._host)

    def mark_written(self) -> None:
        """Treat the current thread or task as having just written: its read-only
        scopes read from the primary for the ``read_your_writes`` window. For writes
        sessionscope cannot see (another service, an earlier request of the same
        user). Does nothing without replicas or with a window of 0."""
        if self._router is not None and self._router.read_your_writes > 0:
            self._router.mark_written()

    def _pool_exhausted(self, err: sa_exc.TimeoutError) -> PoolExhaustedError:
        """The error for a pool checkout timeout, naming the pool(s) that ran dry."""
        self._stats.pool_timed_out()
        # The moment the long-held warning is for: name the sessions holding the pool.
        _watch.warn_overdue(self._stats, time.perf_counter())
        status: dict[str, Any] = {}
        engines = self.engines_by_role()
        pools = {role: _backend.pool_status(engine) for role, engine in engines.items()}
        # Name the pool(s) that ran dry, not an idle one that has no connection yet.
        full = {role: pools[role] for role, e in engines.items() if _backend.pool_ran_dry(e)}
        for side, figures in (full or pools).items():
            for key, value in figures.items():
                if key != "pool_class":
                    status[f"{side}_{key}"] = value
        status["active_sessions"] = self._stats.active_sessions
        return _core.pool_exhausted(err, status)

    # -- lifecycle ---------------------------------------------------------------

    def dispose(self) -> None:
        """Close the sync engine's pooled connections (the async engine: use
        :meth:`adispose`).

        Call it once the work has stopped: a connection checked out at that
        moment goes back to the disposed pool, which SQLAlchemy does not close;
        it stays open until the garbage collector collects that pool."""
        self._source.dispose()
        if self._router is not None:
            self._router.dispose()
        if self._cluster is not None:
            self._cluster.dispose()

    async def adispose(self) -> None:
        """Close the pooled connections of both engines (and of the replicas).

        The sync engines are disposed too, so call it once sync work in other
        threads has stopped as well (see :meth:`dispose`)."""
        await self._source.adispose()
        if self._router is not None:
            await self._router.adispose()
        if self._cluster is not None:
            await self._cluster.adispose()
        self.dispose()
