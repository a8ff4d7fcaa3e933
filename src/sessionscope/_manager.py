"""``SessionManager``: engines, session factories, config and statistics of one
database; the module-level API acts on a default instance."""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, ParamSpec, TypeVar, overload

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Connection, Engine, create_engine, make_url
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session, sessionmaker

from . import _backend, _core, _poolwait, _watch
from ._async import AsyncScope, acall_with_retry, decorate_async
from ._config import SessionConfig, validate_overrides
from ._decorate import options_key
from ._errors import PoolExhaustedError
from ._routing import Router
from ._stats import Stats
from ._sync import SyncScope, call_with_retry, decorate_sync

__all__ = ["SessionManager"]

P = ParamSpec("P")
T = TypeVar("T")

_CACHE_LIMIT = 256

_logger = logging.getLogger("sessionscope")


class SessionManager:
    """Engines, session factories, configuration and statistics of one database.

    ``SessionManager()`` with no URL uses ``DATABASE_URL`` or the embedded SQLite
    file. The async URL is derived from the sync one unless given. An existing
    ``Engine`` / ``AsyncEngine`` can be passed instead of URLs, so an application
    keeps its engine (and its own ``get_db()``) while it migrates. Remaining
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
    """

    def __init__(
        self,
        url: str | URL | None = None,
        *,
        async_url: str | URL | None = None,
        engine: Engine | None = None,
        async_engine: AsyncEngine | None = None,
        config: SessionConfig | None = None,
        session_class: type[Session] | None = None,
        async_session_class: type[AsyncSession] | None = None,
        session_options: Mapping[str, Any] | None = None,
        name: str | None = None,
        replicas: Sequence[str | URL | Engine] | None = None,
        async_replicas: Sequence[str | URL | AsyncEngine] | None = None,
        replica_selection: str = "round_robin",
        read_your_writes: float = 2.0,
        replica_cooldown: float = 30.0,
        **engine_options: Any,
    ) -> None:
        if url is not None and engine is not None:
            raise TypeError("pass either url= or engine=, not both")
        if async_url is not None and async_engine is not None:
            raise TypeError("pass either async_url= or async_engine=, not both")
        if url is None and engine is None:
            if async_engine is not None:
                url = _backend.sync_url_for(async_engine.url)
            elif async_url is not None:
                url = _backend.sync_url_for(async_url)
            else:
                url = _backend.default_url()
        self._url: URL | None = None if engine is not None else make_url(url)  # type: ignore[arg-type]
        self._async_url = async_url
        self._engine = engine
        self._async_engine = async_engine
        self._engine_options = dict(engine_options)
        self._session_options = dict(session_options or {})
        self._session_class = session_class
        self._async_session_class = async_session_class
        self._lock = threading.Lock()
        self._sync_factory: sessionmaker[Session] | None = None
        self._async_factory: async_sessionmaker[AsyncSession] | None = None
        self._bound: dict[bool, Connection | AsyncConnection] = {}  # by is_async
        # Pools of snapshot=False read-only scopes, by is_async (created on first use).
        self._readers: dict[bool, Engine | AsyncEngine] = {}
        self._config = config if config is not None else SessionConfig()
        # expire_on_commit lives in the config (overridable per scope); a value
        # given in session_options is the manager's default for it.
        if "expire_on_commit" in self._session_options:
            self._config = self._config.merged(
                {"expire_on_commit": bool(self._session_options["expire_on_commit"])}
            )
        self._session_options["expire_on_commit"] = self._config.expire_on_commit
        self._resolved: dict[tuple[tuple[str, type, Any], ...], SessionConfig] = {}
        self._session_kw: dict[tuple[Any, ...], dict[str, Any]] = {}
        self.stats = Stats()
        # Called with (role, engine) when an engine is created (exporters attach
        # their engine events here); see engines_by_role() for existing ones.
        self._engine_hooks: list[Callable[[str, Engine], None]] = []
        self.name = name or _backend.safe_url(self.url)
        if engine is not None:
            self._prepare_engine(engine)
        if async_engine is not None:
            self._prepare_engine(async_engine.sync_engine)
        self._router: Router | None = None
        if replicas is not None or async_replicas is not None:
            self._router = Router(
                self,
                replicas,
                async_replicas,
                selection=replica_selection,
                read_your_writes=read_your_writes,
                cooldown=replica_cooldown,
                engine_options=self._engine_options,
            )

    def __repr__(self) -> str:
        return f"SessionManager({self.name!r})"

    # -- engines and factories -------------------------------------------------

    @property
    def url(self) -> URL:
        """The sync database URL (render it with ``hide_password`` when logging)."""
        if self._engine is not None:
            return self._engine.url
        assert self._url is not None
        return self._url

    @property
    def async_url(self) -> URL:
        """The async URL: as given, or derived from :attr:`url`."""
        if self._async_engine is not None:
            return self._async_engine.url
        if self._async_url is not None:
            return make_url(self._async_url)
        return _backend.async_url_for(self.url)

    @property
    def engine(self) -> Engine:
        """The sync engine, created on first use."""
        engine = self._engine
        if engine is None:
            with self._lock:
                engine = self._engine
                if engine is None:
                    engine = create_engine(self.url, **self._engine_options)
                    self._prepare_engine(engine)
                    self._engine_created("sync", engine)
                    self._engine = engine
        return engine

    @property
    def async_engine(self) -> AsyncEngine:
        """The async engine, created on first use."""
        engine = self._async_engine
        if engine is None:
            with self._lock:
                engine = self._async_engine
                if engine is None:
                    engine = create_async_engine(self.async_url, **self._engine_options)
                    self._prepare_engine(engine.sync_engine)
                    self._engine_created("async", engine.sync_engine)
                    self._async_engine = engine
        return engine

    @property
    def session_factory(self) -> sessionmaker[Session]:
        """The ``sessionmaker`` behind sync scopes."""
        factory = self._sync_factory
        if factory is None:
            factory = self._sync_factory = sessionmaker(self.engine, **self._factory_kw(False))
        return factory

    @property
    def async_session_factory(self) -> async_sessionmaker[AsyncSession]:
        """The ``async_sessionmaker`` behind async scopes."""
        factory = self._async_factory
        if factory is None:
            factory = self._async_factory = async_sessionmaker(
                self.async_engine, **self._factory_kw(True)
            )
        return factory

    def _prepare_engine(self, engine: Engine) -> None:
        _backend.apply_sqlite_savepoint_recipe(engine)
        _poolwait.install(engine, self.stats)

    def _factory_kw(self, is_async: bool) -> dict[str, Any]:
        kw = dict(self._session_options)
        if is_async and self._async_session_class is not None:
            kw["class_"] = self._async_session_class
        elif self._session_class is not None:
            kw["sync_session_class" if is_async else "class_"] = self._session_class
        return kw

    def _open_sync(self, cfg: SessionConfig) -> tuple[Session, Session]:
        if (
            cfg.isolation_level is None
            and not cfg.read_only
            and cfg.timeout is None
            and cfg.expire_on_commit is self._session_options["expire_on_commit"]
        ):
            session = self.session_factory()
        elif cfg.read_only and self._router is not None and False not in self._bound:
            session = self._router.open_sync(cfg)
        else:
            session = self._open_with_options(cfg, self.session_factory, self.engine, False)
        return session, session

    def _open_async(self, cfg: SessionConfig) -> tuple[Session, AsyncSession]:
        if (
            cfg.isolation_level is None
            and not cfg.read_only
            and cfg.timeout is None
            and cfg.expire_on_commit is self._session_options["expire_on_commit"]
        ):
            front = self.async_session_factory()
        elif cfg.read_only and self._router is not None and True not in self._bound:
            front = self._router.open_async(cfg)
        else:
            front = self._open_with_options(
                cfg, self.async_session_factory, self.async_engine, True
            )
        return front.sync_session, front

    def _open_with_options(
        self, cfg: SessionConfig, factory: Callable[..., Any], engine: Any, is_async: bool
    ) -> Any:
        if is_async in self._bound:
            # Bound sessions share a transaction that is already open (bound_to()):
            # per-transaction server settings cannot apply; the ORM guard still can.
            if cfg.read_only:
                return _backend.open_read_only(
                    factory, is_async, expire_on_commit=cfg.expire_on_commit
                )
            return factory(expire_on_commit=cfg.expire_on_commit)
        kw = self._options_kw(cfg, engine, is_async)
        statements = kw["_statements"]
        session_kw = {k: v for k, v in kw.items() if k != "_statements"}
        if cfg.read_only:
            session = _backend.open_read_only(factory, is_async, **session_kw)
        else:
            session = factory(**session_kw)
        if statements:
            _backend.install_begin_statements(
                session.sync_session if is_async else session, statements
            )
        return session

    def _options_kw(self, cfg: SessionConfig, engine: Any, is_async: bool) -> dict[str, Any]:
        """Session keywords for a scope's settings on ``engine`` (cached): ``bind``
        (an option engine, when the settings need one) and ``_statements``."""
        sync_engine: Engine = engine.sync_engine if is_async else engine
        cache_key = (
            sync_engine,
            is_async,
            cfg.isolation_level,
            cfg.read_only,
            cfg.snapshot,
            cfg.expire_on_commit,
            cfg.timeout,
        )
        kw = self._session_kw.get(cache_key)
        if kw is None and not cfg.snapshot and sync_engine.dialect.name != "sqlite":
            # Config validation ruled out isolation_level and timeout here.
            kw = {
                "expire_on_commit": cfg.expire_on_commit,
                "bind": self._reader(is_async),
                "_statements": [],
            }
            if len(self._session_kw) < _CACHE_LIMIT:
                self._session_kw[cache_key] = kw
        if kw is None:
            options: dict[str, Any] = {}
            if cfg.isolation_level is not None:
                options["isolation_level"] = cfg.isolation_level
            if cfg.read_only and sync_engine.dialect.name == "postgresql":
                options["postgresql_readonly"] = True
            kw = {"expire_on_commit": cfg.expire_on_commit}
            if options:
                # An option engine shares the pool; SQLAlchemy reverts the isolation
                # level when the connection is returned, so nothing leaks.
                kw["bind"] = engine.execution_options(**options)
            statements = _backend.begin_statements(
                sync_engine, timeout=cfg.timeout, read_only=cfg.read_only
            )
            kw["_statements"] = statements
            if len(self._session_kw) < _CACHE_LIMIT:
                self._session_kw[cache_key] = kw
        return kw

    def _reader(self, is_async: bool) -> Engine | AsyncEngine:
        """The engine of ``snapshot=False`` read-only scopes: a pool of its own
        whose connections are in autocommit and read-only on the server (see
        :func:`_backend.autocommit_reader_options`)."""
        reader = self._readers.get(is_async)
        if reader is None:
            with self._lock:
                reader = self._readers.get(is_async)
                if reader is None:
                    url = self.async_url if is_async else self.url
                    options = _backend.autocommit_reader_options(url, self._engine_options)
                    if is_async:
                        reader = create_async_engine(url, **options)
                        sync_engine = reader.sync_engine
                    else:
                        reader = sync_engine = create_engine(url, **options)
                    _backend.skip_idle_commit(sync_engine)
                    self._prepare_engine(sync_engine)
                    role = "async_reader" if is_async else "reader"
                    self._engine_created(role, sync_engine)
                    self._readers[is_async] = reader
        return reader

    # -- configuration ---------------------------------------------------------

    @property
    def config(self) -> SessionConfig:
        """The current configuration of this manager."""
        return self._config

    def configure(self, **fields: Any) -> SessionConfig:
        """Change this manager's configuration; returns the new config.

        Validates first: on an invalid value nothing changes.
        """
        new = self._config.merged(fields)
        self._config = new
        self._resolved = {}
        return new

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

    def session_scope(self, **overrides: Any) -> SyncScope:
        """A context manager yielding a ``Session`` in a transaction scope."""
        if not overrides:
            return SyncScope(self, self._config)
        return SyncScope(self, self._resolve(options_key(overrides), overrides))

    def async_session_scope(self, **overrides: Any) -> AsyncScope:
        """An async context manager yielding an ``AsyncSession`` in a transaction scope."""
        if not overrides:
            return AsyncScope(self, self._config)
        return AsyncScope(self, self._resolve(options_key(overrides), overrides))

    @overload
    def with_session(self, func: Callable[P, T], /) -> Callable[..., T]: ...
    @overload
    def with_session(
        self, func: None = None, /, **overrides: Any
    ) -> Callable[[Callable[P, T]], Callable[..., T]]: ...

    def with_session(self, func: Callable[P, T] | None = None, /, **overrides: Any) -> Any:
        """Decorator: run the function in a scope of this manager; see
        :func:`sessionscope.with_session`."""
        if func is None:
            validate_overrides(overrides)
            return lambda f: decorate_sync(f, overrides, self._self)
        return decorate_sync(func, {}, self._self)

    @overload
    def async_with_session(
        self, func: Callable[P, Awaitable[T]], /
    ) -> Callable[..., Awaitable[T]]: ...
    @overload
    def async_with_session(
        self, func: None = None, /, **overrides: Any
    ) -> Callable[[Callable[P, Awaitable[T]]], Callable[..., Awaitable[T]]]: ...

    def async_with_session(
        self, func: Callable[P, Awaitable[T]] | None = None, /, **overrides: Any
    ) -> Any:
        """Async decorator: see :func:`sessionscope.async_with_session`."""
        if func is None:
            validate_overrides(overrides)
            return lambda f: decorate_async(f, overrides, self._self)
        return decorate_async(func, {}, self._self)

    def _self(self) -> SessionManager:
        return self

    def with_retry(
        self,
        func: Callable[..., T],
        *args: Any,
        max_retries: int | None = None,
        retry_delay: float | None = None,
        **kwargs: Any,
    ) -> T:
        """Call ``func(*args, **kwargs)``, retrying transient errors (outermost only)."""
        cfg = self._retry_config(max_retries, retry_delay)
        name = getattr(func, "__qualname__", None)
        return call_with_retry(self, cfg, name, lambda: func(*args, **kwargs))

    async def async_with_retry(
        self,
        func: Callable[..., Awaitable[T]],
        *args: Any,
        max_retries: int | None = None,
        retry_delay: float | None = None,
        **kwargs: Any,
    ) -> T:
        """Await ``func(*args, **kwargs)``, retrying transient errors (outermost only)."""
        cfg = self._retry_config(max_retries, retry_delay)
        name = getattr(func, "__qualname__", None)
        return await acall_with_retry(self, cfg, name, lambda: func(*args, **kwargs))

    def _retry_config(self, max_retries: int | None, retry_delay: float | None) -> SessionConfig:
        overrides: dict[str, Any] = {}
        if max_retries is not None:
            overrides["retry_attempts"] = max_retries
        if retry_delay is not None:
            overrides["retry_delay"] = retry_delay
        cfg = self._resolve(options_key(overrides), overrides)
        if _core.current_frame(_core.context_key()) is not None:
            # Inside a scope the work cannot be re-run alone: the enclosing
            # transaction is already spoiled. Let the error reach the outermost
            # retrying boundary.
            return cfg.merged({"retry_attempts": 0})
        return cfg

    @functools.cached_property
    def get_db(self) -> Callable[..., Awaitable[AsyncSession]]:
        """FastAPI dependency of this manager: ``db: AsyncSession = Depends(manager.get_db)``.

        One async scope per request, committed after the path function returns and
        before the response is sent (see :mod:`sessionscope.fastapi`). The same
        callable every time, so FastAPI resolves it once per request. Needs FastAPI.
        """
        from .fastapi import session_dependency

        return session_dependency(self)

    @functools.cached_property
    def get_sync_db(self) -> Callable[..., Awaitable[Session]]:
        """Sync twin of :attr:`get_db`, for ``def`` path functions. Needs FastAPI."""
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
        if not connection.in_transaction():
            raise ValueError(
                "bound_to() needs a connection with an open transaction (call "
                "connection.begin() first); without one, scopes would commit for real"
            )
        is_async = isinstance(connection, AsyncConnection)
        kw = self._factory_kw(is_async)
        kw["join_transaction_mode"] = "create_savepoint"
        with self._lock:
            saved = (self._sync_factory, self._async_factory, self._bound.get(is_async))
            if isinstance(connection, AsyncConnection):
                self._async_factory = async_sessionmaker(connection, **kw)
            else:
                self._sync_factory = sessionmaker(connection, **kw)
            self._bound[is_async] = connection
        try:
            yield
        finally:
            with self._lock:
                if is_async:
                    self._async_factory = saved[1]
                else:
                    self._sync_factory = saved[0]
                if saved[2] is None:
                    del self._bound[is_async]
                else:
                    self._bound[is_async] = saved[2]

    # -- monitoring --------------------------------------------------------------

    def _engine_created(self, role: str, engine: Engine) -> None:
        if _logger.isEnabledFor(logging.DEBUG):
            _logger.debug(
                "%s engine created: %s (%s)",
                role,
                _backend.safe_url(engine.url),
                type(engine.pool).__name__,
            )
        for hook in self._engine_hooks:
            hook(role, engine)

    def engines_by_role(self) -> dict[str, Engine]:
        """The engines created so far, keyed by role (``"sync"``, ``"async"``; the
        async engine as its ``sync_engine``). Pool status and the exporters report
        one entry per role, so a feature adding engines (read replicas) adds its
        roles here and is reported everywhere. Creates nothing."""
        engines: dict[str, Engine] = {}
        if self._engine is not None:
            engines["sync"] = self._engine
        if self._async_engine is not None:
            engines["async"] = self._async_engine.sync_engine
        for is_async, reader in self._readers.items():
            engines["async_reader" if is_async else "reader"] = (
                reader.sync_engine if isinstance(reader, AsyncEngine) else reader
            )
        if self._router is not None:
            engines.update(self._router.engines_by_role())
        return engines

    def pool_status(self) -> dict[str, Any]:
        """Pool figures per engine role (see :meth:`engines_by_role`): ``size``,
        ``checked_in``, ``checked_out``, ``overflow`` (SQLAlchemy's figure: negative
        while the pool has not filled up), ``timeout`` and ``pool_class``; pools
        without a figure (``StaticPool``, ``NullPool``, ...) report what they have."""
        return {
            role: _backend.pool_status(engine) for role, engine in self.engines_by_role().items()
        }

    def get_stats(self) -> dict[str, Any]:
        """Statistics of this manager, with its pool status under ``"pool"``."""
        snapshot = self.stats.snapshot()
        snapshot["pool"] = self.pool_status()
        if self._router is not None:
            snapshot["routing"] = self._router.snapshot(snapshot["pool"])
        return snapshot

    def reset_stats(self) -> None:
        """Zero the counters (the live ``active_sessions`` gauge is kept)."""
        self.stats.reset()
        if self._router is not None:
            self._router.reset()

    def on_commit(self, callback: Callable[[], Any]) -> None:
        """Like :func:`sessionscope.on_commit`, on this manager's innermost scope."""
        _core.on_commit(callback, self)

    def set_rollback(self, rollback: bool = True) -> None:
        """Like :func:`sessionscope.set_rollback`, on this manager's innermost scope:
        with scopes of two databases nested, each can be doomed on its own."""
        _core.set_rollback(rollback, self)

    def mark_written(self) -> None:
        """Treat the current thread or task as having just written: its read-only
        scopes read from the primary for the ``read_your_writes`` window. For writes
        sessionscope cannot see (another service, an earlier request of the same
        user). Does nothing without replicas or with a window of 0."""
        if self._router is not None and self._router.read_your_writes > 0:
            self._router.mark_written()

    def _pool_exhausted(self, err: sa_exc.TimeoutError) -> PoolExhaustedError:
        self.stats.pool_timed_out()
        # The moment the long-held warning is for: name the sessions holding the pool.
        _watch.warn_overdue(self.stats, time.perf_counter())
        status: dict[str, Any] = {}
        pools = self.pool_status()
        # Name the pool(s) that ran dry (no idle connection), not every engine's.
        full = {side: f for side, f in pools.items() if f.get("checked_in", 0) == 0}
        for side, figures in (full or pools).items():
            for key, value in figures.items():
                if key != "pool_class":
                    status[f"{side}_{key}"] = value
        status["active_sessions"] = self.stats.active_sessions
        return _core.pool_exhausted(err, status)

    # -- lifecycle ---------------------------------------------------------------

    def dispose(self) -> None:
        """Close the sync engine's pooled connections (the async engine: use
        :meth:`adispose`)."""
        if self._engine is not None:
            self._engine.dispose()
        reader = self._readers.get(False)
        if isinstance(reader, Engine):
            reader.dispose()
        if self._router is not None:
            self._router.dispose()

    async def adispose(self) -> None:
        """Close the pooled connections of both engines (and of the replicas)."""
        if self._async_engine is not None:
            await self._async_engine.dispose()
        reader = self._readers.get(True)
        if isinstance(reader, AsyncEngine):
            await reader.dispose()
        if self._router is not None:
            await self._router.adispose()
        self.dispose()
