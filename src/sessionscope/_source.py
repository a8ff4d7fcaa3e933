"""Where one manager's sessions come from: URLs, engines created on first use,
session factories, per-scope session options, ``bound_to`` and engine hooks.

The bottom layer of a manager: it knows nothing of scopes, frames or retries.
The manager, the read-replica router and the cluster use it through its public
methods; engines it creates are announced to the hooks registered with
:meth:`SessionSource.add_engine_hook` (exporters attach their events there).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Final, TypeVar

from sqlalchemy.engine import URL, Connection, Engine, create_engine, make_url
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session, sessionmaker

from . import _backend
from ._config import SessionConfig

__all__ = ["EngineHook", "SessionSource"]

EngineHook = Callable[[str, Engine], None]
"""Called with ``(role, engine)`` when an engine is created; an async engine is
passed as its ``sync_engine``."""

_CACHE_LIMIT = 256

_Factory = TypeVar("_Factory", sessionmaker[Any], async_sessionmaker[Any])
_RETRYING: Final = "_sessionscope_retrying"  # a factory's retrying twin, kept on it

_logger = logging.getLogger("sessionscope")


class _AsyncTwin(async_sessionmaker[Any]):
    """An ``async_sessionmaker``'s retrying twin: the original's settings, read
    at every call (so ``configure()`` on the original applies), with another
    sync session class."""

    def __init__(self, original: async_sessionmaker[Any], sync_session_class: type[Session]):
        # Not the base initializer: every setting is the original's.
        self.class_ = original.class_
        self._original = original
        self._sync_session_class = sync_session_class

    @property
    def kw(self) -> dict[str, Any]:
        return {**self._original.kw, "sync_session_class": self._sync_session_class}

    @kw.setter
    def kw(self, value: dict[str, Any]) -> None:
        raise AttributeError("configure the original factory; its twin follows it")


class SessionSource:
    """Engines, factories and session options of one database.

    ``url`` is the sync URL (None with ``engine``); ``async_url`` the async one
    (None: derived from ``url``). ``prepare_class`` is called once for each
    session class the source opens sessions of (a subclass of the user's class,
    of this source's own), so class-level events cost nothing per session and
    leave other sessions of the user's class alone; ``prepare_retry_class``
    for the subclass of each factory's class that :meth:`retrying` opens.
    """

    def __init__(
        self,
        url: URL | None,
        async_url: str | URL | None,
        engine: Engine | None,
        async_engine: AsyncEngine | None,
        engine_options: Mapping[str, Any],
        session_options: Mapping[str, Any],
        session_class: type[Session] | None,
        async_session_class: type[AsyncSession] | None,
        prepare_class: Callable[[type[Session]], None],
        prepare_retry_class: Callable[[type[Session]], None],
        prepare_engine: Callable[[Engine], None],
    ) -> None:
        self._url = url
        self._async_url = async_url
        self._engine = engine
        self._async_engine = async_engine
        self.engine_options = dict(engine_options)
        self.session_options = dict(session_options)
        self._session_class = session_class
        self._async_session_class = async_session_class
        self._prepare_class = prepare_class
        self._prepare_retry_class = prepare_retry_class
        self.prepare_engine = prepare_engine
        """Called once for each engine of this source, given or created (the
        SQLite BEGIN recipe, the pool-wait measurement); the router and the
        cluster call it for theirs too."""
        self.lock = threading.Lock()
        self._classes: dict[type[Session], type[Session]] = {}
        self.sync_factory: sessionmaker[Session] | None = None
        """:attr:`session_factory` once made, else None: what a scope reads
        first, since the property's call costs more than the rest of the
        lookup."""
        self.async_factory: async_sessionmaker[AsyncSession] | None = None
        """:attr:`async_session_factory` once made, else None."""
        self._bound: dict[bool, Connection | AsyncConnection] = {}  # by is_async
        self._session_kw: dict[tuple[Any, ...], dict[str, Any]] = {}
        self._hooks: list[EngineHook] = []
        # Pools of snapshot=False read-only scopes, by is_async (created on first use).
        self._readers: dict[bool, Engine | AsyncEngine] = {}
        for given in (engine, async_engine.sync_engine if async_engine is not None else None):
            if given is not None:
                prepare_engine(given)

    # -- URLs and engines ----------------------------------------------------------

    @property
    def url(self) -> URL:
        """The sync database URL."""
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
            with self.lock:
                engine = self._engine
                if engine is None:
                    engine = create_engine(self.url, **self.engine_options)
                    self.prepare_engine(engine)
                    self.engine_created("sync", engine)
                    self._engine = engine
        return engine

    @property
    def async_engine(self) -> AsyncEngine:
        """The async engine, created on first use."""
        engine = self._async_engine
        if engine is None:
            with self.lock:
                engine = self._async_engine
                if engine is None:
                    engine = create_async_engine(self.async_url, **self.engine_options)
                    self.prepare_engine(engine.sync_engine)
                    self.engine_created("async", engine.sync_engine)
                    self._async_engine = engine
        return engine

    def created_engines(self) -> dict[str, Engine]:
        """The engines created so far: ``"sync"``, ``"async"`` (as its
        ``sync_engine``). Creates nothing."""
        engines: dict[str, Engine] = {}
        if self._engine is not None:
            engines["sync"] = self._engine
        if self._async_engine is not None:
            engines["async"] = self._async_engine.sync_engine
        for is_async, reader in self._readers.items():
            engines["async_reader" if is_async else "reader"] = (
                reader.sync_engine if isinstance(reader, AsyncEngine) else reader
            )
        return engines

    def add_engine_hook(self, hook: EngineHook) -> None:
        """Call ``hook`` for every engine created from now on."""
        self._hooks.append(hook)

    def remove_engine_hook(self, hook: EngineHook) -> None:
        """Stop calling ``hook`` (no error if it is not registered)."""
        if hook in self._hooks:
            self._hooks.remove(hook)

    def engine_created(self, role: str, engine: Engine) -> None:
        """Announce a new engine of ``role`` to the hooks (also for engines the
        router or the cluster create)."""
        if _logger.isEnabledFor(logging.DEBUG):
            _logger.debug(
                "%s engine created: %s (%s)",
                role,
                _backend.safe_url(engine.url),
                type(engine.pool).__name__,
            )
        for hook in self._hooks:
            hook(role, engine)

    # -- factories -----------------------------------------------------------------

    @property
    def session_factory(self) -> sessionmaker[Session]:
        """The ``sessionmaker`` behind sync scopes."""
        factory = self.sync_factory
        if factory is None:
            factory = self.sync_factory = sessionmaker(self.engine, **self.factory_kw(False))
        return factory

    @property
    def async_session_factory(self) -> async_sessionmaker[AsyncSession]:
        """The ``async_sessionmaker`` behind async scopes."""
        factory = self.async_factory
        if factory is None:
            factory = self.async_factory = async_sessionmaker(
                self.async_engine, **self.factory_kw(True)
            )
        return factory

    def factory_kw(self, is_async: bool) -> dict[str, Any]:
        """Keywords for a ``sessionmaker`` / ``async_sessionmaker`` of this source
        on any engine (replicas and cluster nodes use it too)."""
        kw = dict(self.session_options)
        if is_async:
            front = self._async_session_class or AsyncSession
            kw["class_"] = front
            kw["sync_session_class"] = self._session_class_of(
                self._session_class or front.sync_session_class
            )
        else:
            kw["class_"] = self._session_class_of(self._session_class or Session)
        return kw

    def _session_class_of(self, base: type[Session]) -> type[Session]:
        cls = self._classes.get(base)
        if cls is None:
            with self.lock:
                cls = self._classes.get(base)
                if cls is None:
                    cls = type(base.__name__, (base,), {"__module__": base.__module__})
                    self._prepare_class(cls)
                    self._classes[base] = cls
        return cls

    def retrying(self, factory: _Factory) -> _Factory:
        """``factory``'s twin for scopes under a retry boundary: the same
        settings and listeners, for a subclass of its session class prepared
        with ``prepare_retry_class``. Made once per factory and kept on it."""
        twin: _Factory | None = factory.__dict__.get(_RETRYING)
        if twin is None:
            with self.lock:
                twin = factory.__dict__.get(_RETRYING)
                if twin is None:
                    twin = self._retrying_twin(factory)
                    setattr(factory, _RETRYING, twin)
        return twin

    def _retrying_twin(self, factory: _Factory) -> _Factory:
        if isinstance(factory, async_sessionmaker):
            base = factory.kw.get("sync_session_class") or factory.class_.sync_session_class
            return _AsyncTwin(factory, self._retry_class(base))
        # A subclass of the factory's own class: listeners a user put on the
        # factory (event.listen(manager.session_factory, ...)) apply to it too.
        twin = sessionmaker(class_=self._retry_class(factory.class_), **factory.kw)
        # The same settings object: configure() on the factory applies to both.
        twin.kw = factory.kw
        return twin

    def _retry_class(self, base: type[Session]) -> type[Session]:
        cls = type(base.__name__, (base,), {"__module__": base.__module__})
        cls.__qualname__ = base.__qualname__
        self._prepare_retry_class(cls)
        return cls

    # -- sessions with per-scope settings --------------------------------------------

    def is_bound(self, is_async: bool) -> bool:
        """True while :meth:`bound_to` binds this side's sessions to a connection."""
        return is_async in self._bound

    def open_with_options(
        self,
        cfg: SessionConfig,
        factory: Any,
        engine: Any,
        is_async: bool,
        retrying: bool,
    ) -> Any:
        """A new session (or ``AsyncSession``) from ``factory`` (its
        :meth:`retrying` twin if ``retrying``) carrying the scope's settings
        (isolation, read-only, timeout, causal reads) for ``engine``."""
        if retrying:
            factory = self.retrying(factory)
        if is_async in self._bound:
            # Bound sessions share a transaction that is already open (bound_to()):
            # per-transaction server settings cannot apply; the ORM guard still can.
            if cfg.read_only:
                return _backend.open_read_only(
                    factory, is_async, expire_on_commit=cfg.expire_on_commit
                )
            return factory(expire_on_commit=cfg.expire_on_commit)
        kw = self.options_kw(cfg, engine, is_async)
        statements = kw["_statements"]
        session_kw = {k: v for k, v in kw.items() if k != "_statements"}
        if cfg.read_only:
            session = _backend.open_read_only(factory, is_async, **session_kw)
        else:
            session = factory(**session_kw)
        sync_session = session.sync_session if is_async else session
        if statements:
            _backend.install_begin_statements(sync_session, statements)
        if cfg.read_only:
            _backend.guard_autocommit_read_only(sync_session)
        return session

    def options_kw(self, cfg: SessionConfig, engine: Any, is_async: bool) -> dict[str, Any]:
        """Session keywords for a scope's settings on ``engine`` (cached): ``bind``
        (an option engine, when the settings need one) and ``_statements``."""
        sync_engine: Engine = engine.sync_engine if is_async else engine
        cache_key = (
            sync_engine,
            is_async,
            cfg.isolation_level,
            cfg.read_only,
            cfg.expire_on_commit,
            cfg.timeout,
            cfg.causal_reads,
            cfg.snapshot,
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
            options = _backend.execution_options(
                sync_engine, isolation_level=cfg.isolation_level, read_only=cfg.read_only
            )
            kw = {"expire_on_commit": cfg.expire_on_commit}
            if options:
                # An option engine shares the pool; SQLAlchemy reverts the isolation
                # level when the connection is returned, so nothing leaks.
                kw["bind"] = engine.execution_options(**options)
            kw["_statements"] = _backend.begin_statements(
                sync_engine,
                timeout=cfg.timeout,
                read_only=cfg.read_only,
                causal_reads=cfg.causal_reads,
            )
            if len(self._session_kw) < _CACHE_LIMIT:
                self._session_kw[cache_key] = kw
        return kw

    def _reader(self, is_async: bool) -> Engine | AsyncEngine:
        """The engine of ``snapshot=False`` read-only scopes: a pool of its own
        whose connections are in autocommit and read-only on the server (see
        :func:`._backend.autocommit_reader_options`)."""
        reader = self._readers.get(is_async)
        if reader is None:
            with self.lock:
                reader = self._readers.get(is_async)
                if reader is None:
                    url = self.async_url if is_async else self.url
                    options = _backend.autocommit_reader_options(url, self.engine_options)
                    sync_engine: Engine
                    if is_async:
                        reader = create_async_engine(url, **options)
                        sync_engine = reader.sync_engine
                    else:
                        reader = sync_engine = create_engine(url, **options)
                    _backend.skip_idle_commit(sync_engine)
                    self.prepare_engine(sync_engine)
                    self.engine_created("async_reader" if is_async else "reader", sync_engine)
                    self._readers[is_async] = reader
        return reader

    @contextmanager
    def bound_to(self, connection: Connection | AsyncConnection) -> Iterator[None]:
        """See :meth:`sessionscope.SessionManager.bound_to`."""
        if not connection.in_transaction():
            raise ValueError(
                "bound_to() needs a connection with an open transaction (call "
                "connection.begin() first); without one, scopes would commit for real"
            )
        is_async = isinstance(connection, AsyncConnection)
        kw = self.factory_kw(is_async)
        kw["join_transaction_mode"] = "create_savepoint"
        with self.lock:
            saved = (self.sync_factory, self.async_factory, self._bound.get(is_async))
            if isinstance(connection, AsyncConnection):
                self.async_factory = async_sessionmaker(connection, **kw)
            else:
                self.sync_factory = sessionmaker(connection, **kw)
            self._bound[is_async] = connection
        try:
            yield
        finally:
            with self.lock:
                if is_async:
                    self.async_factory = saved[1]
                else:
                    self.sync_factory = saved[0]
                if saved[2] is None:
                    del self._bound[is_async]
                else:
                    self._bound[is_async] = saved[2]

    # -- lifecycle -------------------------------------------------------------------

    def dispose(self) -> None:
        """Close the sync engines' pooled connections."""
        if self._engine is not None:
            self._engine.dispose()
        reader = self._readers.get(False)
        if isinstance(reader, Engine):
            reader.dispose()

    async def adispose(self) -> None:
        """Close the async engines' pooled connections."""
        if self._async_engine is not None:
            await self._async_engine.dispose()
        reader = self._readers.get(True)
        if isinstance(reader, AsyncEngine):
            await reader.dispose()
