"""Read routing: read replicas, replica selection and health, read-your-writes.

A :class:`Router` belongs to one :class:`~sessionscope.SessionManager` built with
``replicas=``. The manager asks it for a session only when a scope opens a *new*
session with ``read_only=True``; every other session (writes, and read-only scopes
that join or nest in an enclosing scope) is the manager's own, on the primary.

Rules, in order, for a new read-only session:

1. Read-your-writes: if the current context committed on the primary less than
   ``read_your_writes`` seconds ago, read from the primary. The context is the
   one of :mod:`contextvars`: a thread, or an asyncio task (a task starts with a
   copy of its creator's context, so a commit made inside a task is not seen by
   the code that created it, while a task created after a commit inherits it).
2. Otherwise pick a replica (``"round_robin"`` or ``"random"``) among those not in
   cool-down; with none left, read from the primary.
3. The session connects lazily, at its first statement. If that connection to
   the replica fails, the replica goes into cool-down for ``cooldown`` seconds
   and the same session is re-pointed, before any statement ran, to the next
   healthy replica, then to the primary.

Figures: the router keeps health (state); its counters are the manager's
:class:`~sessionscope._stats.Stats`, to which it reports each event once, where
it happens: a read where the session's first connection lands (after any
fallback), a fallback when a session is re-pointed, a connect failure when a
replica is taken out of rotation. A read-only session that never connects is no
read and is counted nowhere.

A session routed to a replica is a read-only session: the ORM guard refuses
writes before they are sent, and the server (a hot standby, or a
``READ ONLY`` transaction) refuses any raw SQL write. A read-only session on
the primary carries an execution option that keeps its COMMIT from counting as
a write, so reads never extend the read-your-writes window.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Connection, Engine, create_engine, make_url
from sqlalchemy.engine.interfaces import ExceptionContext
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import ORMExecuteState, Session, sessionmaker

from . import _backend
from ._stats import PRIMARY_REASONS, REPLICA_REASONS, Stats

if TYPE_CHECKING:
    from ._config import SessionConfig
    from ._source import SessionSource

__all__ = ["SELECTIONS", "ReadTarget", "Router", "validate_routing"]

SELECTIONS: Final = frozenset({"round_robin", "random"})

# Execution option carried by read-only sessions on the primary: their COMMIT is
# not a write, so it must not start the read-your-writes window (else reads in the
# window would keep extending it, and never go back to the replicas).
READ_MARK: Final = "sessionscope_routed_read"
_ROUTE: Final = "sessionscope_route"
# What a failed connect raises: SQLAlchemy's wrapped driver errors, and what the
# async drivers raise unwrapped (asyncpg: OSError; a connect timeout is
# asyncio.TimeoutError, not an OSError before Python 3.11).
_CONNECT_ERRORS: Final = (sa_exc.DBAPIError, OSError, asyncio.TimeoutError)

logger = logging.getLogger("sessionscope")


def validate_routing(
    replicas: Sequence[str | URL | Engine] | None,
    async_replicas: Sequence[str | URL | AsyncEngine] | None,
    selection: str,
    read_your_writes: float,
    cooldown: float,
) -> None:
    """Raise ``TypeError`` / ``ValueError`` for invalid routing options."""
    for name, value in (("replicas", replicas), ("async_replicas", async_replicas)):
        if value is not None and (isinstance(value, (str, URL)) or not isinstance(value, Sequence)):
            raise TypeError(
                f"{name}= takes a list of URLs or engines, got {type(value).__name__}; "
                f"write {name}=[url] for a single replica"
            )
    # Checked at run time whatever the annotations say: configuration often
    # comes from settings files.
    sync_items: Sequence[object] = replicas or ()
    async_items: Sequence[object] = async_replicas or ()
    for item in sync_items:
        if isinstance(item, AsyncEngine):
            raise TypeError("an AsyncEngine replica belongs in async_replicas=, not replicas=")
        if not isinstance(item, (str, URL, Engine)):
            raise TypeError(f"a replica must be a URL or an Engine, got {type(item).__name__}")
    for item in async_items:
        if isinstance(item, Engine):
            raise TypeError("a sync Engine replica belongs in replicas=, not async_replicas=")
        if not isinstance(item, (str, URL, AsyncEngine)):
            raise TypeError(
                f"an async replica must be a URL or an AsyncEngine, got {type(item).__name__}"
            )
    if replicas is not None and async_replicas is not None and len(replicas) != len(async_replicas):
        raise ValueError(
            f"replicas= has {len(replicas)} entries and async_replicas= {len(async_replicas)}; "
            "they pair up by position (the same server, sync and async), so give both "
            "the same length, or give one and let the other be derived"
        )
    if selection not in SELECTIONS:
        raise ValueError(
            f"unknown replica_selection {selection!r}; use one of {', '.join(sorted(SELECTIONS))}"
        )
    for name, seconds in (("read_your_writes", read_your_writes), ("replica_cooldown", cooldown)):
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
            raise TypeError(f"{name} must be a number of seconds, got {seconds!r}")
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(
                f"{name} must be a finite number of seconds >= 0 (0 disables it), got {seconds}"
            )


class _Replica:
    """One replica server: its engines (created on first use) and health."""

    __slots__ = (
        "async_engine",
        "async_factory",
        "async_url",
        "down_until",
        "engine",
        "factory",
        "name",
        "suspect",
        "url",
    )

    def __init__(
        self,
        name: str,
        sync: str | URL | Engine | None,
        async_: str | URL | AsyncEngine | None,
    ) -> None:
        self.name = name
        self.engine: Engine | None = sync if isinstance(sync, Engine) else None
        self.async_engine: AsyncEngine | None = async_ if isinstance(async_, AsyncEngine) else None
        # The manager's URL rules: an async URL in replicas= serves the async side
        # as given and the sync side through the package's sync driver.
        given = sync.url if isinstance(sync, Engine) else sync
        if given is None:
            assert async_ is not None
            given = async_.url if isinstance(async_, AsyncEngine) else async_
        self.url = sync.url if isinstance(sync, Engine) else _backend.sync_url_for(given)
        if isinstance(async_, AsyncEngine):
            self.async_url = async_.url
        elif async_ is not None:
            self.async_url = make_url(async_)
        else:
            self.async_url = _backend.async_url_for(given)
        self.factory: sessionmaker[Session] | None = None
        self.async_factory: async_sessionmaker[AsyncSession] | None = None
        self.down_until = -math.inf
        self.suspect = False  # failed before: log when it serves again


class _Route:
    """Routing state of one routed session until it has connected: the replica
    it is pointed at (None: the primary) and why it is there (the reason its
    read is counted with, see ``Stats.routed_read``)."""

    __slots__ = ("cfg", "front", "is_async", "reason", "replica", "tried")

    def __init__(
        self, replica: _Replica | None, reason: str, cfg: SessionConfig, is_async: bool
    ) -> None:
        self.replica = replica
        self.reason = reason
        self.cfg = cfg
        self.is_async = is_async
        self.front: AsyncSession | None = None
        self.tried: list[_Replica] = [] if replica is None else [replica]


class ReadTarget:
    """A routing decision: the ``factory`` and ``engine`` to open a read-only
    session with, and the route that follows it until its first connection (None
    for an uncounted read on the primary: nothing to follow)."""

    __slots__ = ("engine", "factory", "route")

    def __init__(self, factory: Any, engine: Any, route: _Route | None) -> None:
        self.factory = factory
        self.engine = engine
        self.route = route

    def attach(self, session: Session | AsyncSession) -> None:
        """Follow ``session`` (opened from :attr:`factory`) to its first
        connection, so a replica that cannot be reached is replaced before any
        statement runs on it, and the read is counted where it lands."""
        route = self.route
        if route is None:
            return
        sync_session = session.sync_session if isinstance(session, AsyncSession) else session
        if isinstance(session, AsyncSession):
            route.front = session
        sync_session.info[_ROUTE] = route
        if route.replica is not None:
            sync_session.info[_backend.ROUTED_TO_REPLICA] = route.replica.name


class Router:
    """Chooses where the read-only sessions of one manager go; see the module
    docstring. It never opens a session itself (see :meth:`target`).

    Thread- and task-safe: health is a timestamp per replica, updated under a
    lock; the counters are the manager's statistics (``stats()``, read at each
    event, so a manager handed another ``Stats`` reports to it).
    """

    def __init__(
        self,
        source: SessionSource,
        replicas: Sequence[str | URL | Engine] | None,
        async_replicas: Sequence[str | URL | AsyncEngine] | None,
        *,
        selection: str,
        read_your_writes: float,
        cooldown: float,
        write_engine: Callable[[bool], Any],
        name: str,
        log_enabled: Callable[[], bool],
        stats: Callable[[], Stats],
    ) -> None:
        validate_routing(replicas, async_replicas, selection, read_your_writes, cooldown)
        count = len(replicas if replicas is not None else async_replicas or ())
        if count == 0:
            raise ValueError(
                "replicas= is empty; give at least one replica URL or engine, or leave "
                "replicas= out to read from the primary"
            )
        backend = source.url.get_backend_name()
        self._source = source
        self._replicas: list[_Replica] = []
        for i in range(count):
            replica = _Replica(
                f"replica{i + 1}",
                replicas[i] if replicas is not None else None,
                async_replicas[i] if async_replicas is not None else None,
            )
            if replica.url.get_backend_name() != backend:
                raise ValueError(
                    f"{replica.name} is a {replica.url.get_backend_name()!r} database but the "
                    f"primary is {backend!r}; replicas must be copies of the primary"
                )
            for engine in (replica.engine, replica.async_engine):
                if engine is not None:
                    self._watch_replica(replica, engine)
            self._replicas.append(replica)
        self._write_engine = write_engine
        self._name = name
        self._stats = stats
        self._log_enabled = log_enabled
        self.selection = selection
        self.read_your_writes = float(read_your_writes)
        self.cooldown = float(cooldown)
        self._engine_options = source.engine_options
        self._rr = itertools.count()
        self._lock = threading.Lock()
        self._last_write: ContextVar[float] = ContextVar(
            f"sessionscope_last_write_{id(self):x}", default=-math.inf
        )
        # (is_async, primary engine) -> (factory, engine with READ_MARK)
        self._primary_read: dict[tuple[bool, Any], tuple[Any, Any]] = {}
        self._routed: dict[type[Session], type[Session]] = {}
        if self.read_your_writes > 0:
            for primary in source.created_engines().values():
                self._watch_primary(primary)
            source.add_engine_hook(self._on_engine_created)

    # -- engines -----------------------------------------------------------------

    def _on_engine_created(self, role: str, engine: Engine) -> None:
        # The manager's own engines, and the other primaries' (primaries=).
        if role in ("sync", "async") or role.startswith("node"):
            self._watch_primary(engine)

    def _watch_primary(self, engine: Engine | AsyncEngine) -> None:
        # Every COMMIT on the primary starts the window, including those of code
        # that uses the engine directly: that code wrote too.
        sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
        event.listen(sync_engine, "commit", self._on_primary_commit)

    def _on_primary_commit(self, conn: Connection) -> None:
        if not conn.get_execution_options().get(READ_MARK):
            self._last_write.set(time.monotonic())

    def mark_written(self) -> None:
        """Start the read-your-writes window now in the current context."""
        self._last_write.set(time.monotonic())

    def _watch_replica(self, replica: _Replica, engine: Engine | AsyncEngine) -> None:
        sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
        self._source.prepare_engine(sync_engine)

        def _on_error(ctx: ExceptionContext) -> None:
            # A failure with no connection is a failed connect (a pre-ping failure
            # is followed by a reconnect, judged on its own).
            if ctx.connection is None and not ctx.is_pre_ping:
                self._mark_down(replica, ctx.original_exception)

        event.listen(sync_engine, "handle_error", _on_error)

    def _engine(self, replica: _Replica, is_async: bool) -> Any:
        engine: Engine | AsyncEngine | None = replica.async_engine if is_async else replica.engine
        if engine is None:
            with self._lock:
                engine = replica.async_engine if is_async else replica.engine
                if engine is None:
                    if is_async:
                        engine = create_async_engine(replica.async_url, **self._engine_options)
                        replica.async_engine = engine
                        self._watch_replica(replica, engine)
                        self._source.engine_created(f"{replica.name}_async", engine.sync_engine)
                    else:
                        engine = create_engine(replica.url, **self._engine_options)
                        replica.engine = engine
                        self._watch_replica(replica, engine)
                        self._source.engine_created(replica.name, engine)
        return engine

    def _factory(self, replica: _Replica, is_async: bool) -> Any:
        factory: Any = replica.async_factory if is_async else replica.factory
        if factory is None:
            factory = self._routed_factory(self._engine(replica, is_async), is_async)
            if is_async:
                replica.async_factory = factory
            else:
                replica.factory = factory
        return factory

    def _routed_factory(self, engine: Any, is_async: bool) -> Any:
        """A session factory of ``engine`` whose sessions (the sync side of an
        async one) are of the routed class: the manager's settings otherwise."""
        kw = self._source.factory_kw(is_async)
        if is_async:
            front_class = kw.get("class_", AsyncSession)
            base = kw.get("sync_session_class", front_class.sync_session_class)
            kw["sync_session_class"] = self._routed_class(base)
            return async_sessionmaker(engine, **kw)
        kw["class_"] = self._routed_class(kw.get("class_", Session))
        return sessionmaker(engine, **kw)

    def _routed_class(self, base: type[Session]) -> type[Session]:
        """A subclass of the session class carrying the first-statement hook: one
        class-level listener costs nothing per session (listening on each new
        session would cost more than the rest of the routing)."""
        routed = self._routed.get(base)
        if routed is None:
            router = self

            def connection(session: Session, *args: Any, **kwargs: Any) -> Connection:
                # Every first connection of a routed session passes here: the ORM's
                # (from _on_execute) and the caller's own session.connection(),
                # which no execution hook sees.
                route: _Route | None = session.info.get(_ROUTE)
                if route is None:
                    return base.connection(session, *args, **kwargs)
                return router._connect(
                    session, route, lambda: base.connection(session, *args, **kwargs)
                )

            routed = type(
                base.__name__,
                (base,),
                {"__module__": base.__module__, "connection": connection},
            )
            event.listen(routed, "do_orm_execute", self._on_execute)
            self._routed[base] = routed
        return routed

    def _primary(self, is_async: bool) -> tuple[Any, Any]:
        """(factory, engine) for reads on the primary: the engine writes use now
        (with ``primaries=``, the node the cluster picks) with :data:`READ_MARK`
        set (it shares that engine's pool). The sessions are of the routed class,
        so a read on the primary is counted at its first connection too."""
        base: Any = self._write_engine(is_async)
        pair = self._primary_read.get((is_async, base))
        if pair is None:
            engine = base.execution_options(**{READ_MARK: True})
            pair = (self._routed_factory(engine, is_async), engine)
            self._primary_read[(is_async, base)] = pair
        return pair

    # -- routing -----------------------------------------------------------------

    def target(self, cfg: SessionConfig, is_async: bool) -> ReadTarget:
        """Where a new read-only session of ``cfg`` goes: the factory and engine
        of the replica (or the primary) chosen, and the route that re-points the
        session if its first connection fails. The caller opens the session
        (with the scope's settings) and hands it to :meth:`ReadTarget.attach`.
        Nothing is counted here: the read is, where it lands (:meth:`_connect`)."""
        replica: _Replica | None = None
        if self.read_your_writes > 0 and (
            time.monotonic() - self._last_write.get() < self.read_your_writes
        ):
            reason = "read_your_writes"
        else:
            replica = self._pick(())
            reason = "no_replica_available"
        if replica is None:
            factory, engine = self._primary(is_async)
            # Without monitoring there is nothing to count, and on the primary
            # nothing to fall back from: no route to follow.
            route = _Route(None, reason, cfg, is_async) if cfg.enable_monitoring else None
            return ReadTarget(factory, engine, route)
        route = _Route(replica, "selected", cfg, is_async)
        return ReadTarget(self._factory(replica, is_async), self._engine(replica, is_async), route)

    def _pick(self, exclude: Sequence[_Replica], after: _Replica | None = None) -> _Replica | None:
        """The next healthy replica not in ``exclude``, or None: by the selection
        rule, or (a fallback) the ones following ``after`` in order, which leaves
        the round-robin sequence of the other reads undisturbed."""
        replicas = self._replicas
        n = len(replicas)
        if after is not None:
            start = replicas.index(after) + 1
        elif self.selection == "round_robin":
            start = next(self._rr)
        else:
            start = random.randrange(n)
        now = time.monotonic()
        for i in range(n):
            replica = replicas[(start + i) % n]
            if replica.down_until <= now and replica not in exclude:
                return replica
        return None

    def _on_execute(self, state: ORMExecuteState) -> None:
        # The session's first statement through the ORM: connect now (through the
        # routed class's connection(), below).
        session = state.session
        if _ROUTE in session.info:
            session.connection()

    def _connect(
        self, session: Session, route: _Route, connect: Callable[[], Connection]
    ) -> Connection:
        """Connect ``session`` for the first time, so that a replica that cannot be
        reached is replaced before anything ran on it: on a failed connect the
        replica cools down and the session is re-pointed to the next healthy
        replica, then to the primary. Returns ``connect()``'s connection, and
        counts the read on the engine it connected to. A connect that fails on
        the primary leaves the route in place: the read is counted if a later
        attempt of the same session connects."""
        while route.replica is not None:
            replica = route.replica
            try:
                connection = connect()
            except _CONNECT_ERRORS as err:
                if not isinstance(err, sa_exc.DBAPIError):
                    # A driver error SQLAlchemy does not wrap (asyncpg raises
                    # OSError) bypasses the engine's handle_error hook.
                    self._mark_down(replica, err)
                # Nothing ran yet; this ends the empty transaction (and drops a
                # connection that failed after it was made) before re-pointing.
                session.info[_backend.INTERNAL_ROLLBACK] = True
                try:
                    session.rollback()
                finally:
                    del session.info[_backend.INTERNAL_ROLLBACK]
                self._reroute(session, route)
                continue
            if replica.suspect:
                replica.suspect = False
                logger.info("%s serves reads again", replica.name)
            self._landed(session, route, replica.name)
            return connection
        connection = connect()
        self._landed(session, route, "primary")
        return connection

    def _landed(self, session: Session, route: _Route, engine: str) -> None:
        """The route's session connected to ``engine``: stop following it, count
        the read (once: only the call that ends the route counts)."""
        if session.info.pop(_ROUTE, None) is route and route.cfg.enable_monitoring:
            self._stats().routed_read(engine, route.reason)

    def _reroute(self, session: Session, route: _Route) -> None:
        old = route.replica
        assert old is not None
        nxt = self._pick(route.tried, after=old)
        is_async = route.is_async
        if nxt is None:
            engine = self._primary(is_async)[1]
            route.replica = None
            session.info.pop(_backend.ROUTED_TO_REPLICA, None)
        else:
            engine = self._engine(nxt, is_async)
            route.tried.append(nxt)
            route.replica = nxt
            session.info[_backend.ROUTED_TO_REPLICA] = nxt.name
        bind = self._source.options_kw(route.cfg, engine, is_async).get("bind", engine)
        if is_async:
            assert route.front is not None
            route.front.bind = bind
            session.bind = bind.sync_engine
        else:
            session.bind = bind
        route.reason = "fallback"
        if route.cfg.enable_monitoring:
            self._stats().read_fallback()

    def _mark_down(self, replica: _Replica, err: BaseException) -> None:
        """Take ``replica`` out of rotation for the cool-down. Failures of reads
        already routed to it while it is out do not count again."""
        now = time.monotonic()
        with self._lock:
            if replica.down_until > now:
                return
            replica.down_until = now + self.cooldown
            replica.suspect = True
        # Health, not a figure of one scope: counted whatever the monitoring setting.
        self._stats().replica_connect_failed(replica.name)
        if self._log_enabled():
            logger.warning(
                "%s (%s) failed to connect (%s); it is out of rotation for %.1f s and "
                "reads go to the other replicas, then the primary",
                replica.name,
                _backend.safe_url(replica.url),
                type(err).__name__,
                self.cooldown,
            )

    # -- monitoring and lifecycle -------------------------------------------------

    def engines_by_role(self) -> dict[str, Engine]:
        """Replica engines created so far: ``replicaN`` (sync) and
        ``replicaN_async`` (its ``sync_engine``)."""
        engines: dict[str, Engine] = {}
        for replica in self._replicas:
            if replica.engine is not None:
                engines[replica.name] = replica.engine
            if replica.async_engine is not None:
                engines[f"{replica.name}_async"] = replica.async_engine.sync_engine
        return engines

    def health(self) -> dict[str, bool]:
        """Each replica's health now, by name: False while it cools down."""
        now = time.monotonic()
        return {replica.name: replica.down_until <= now for replica in self._replicas}

    def snapshot(self, pool: dict[str, Any]) -> dict[str, Any]:
        """Routing figures since the statistics' last reset: reads per engine,
        fallbacks, health (state: a reset keeps it), and each engine's entries
        of ``pool`` (the manager's pool status by role)."""
        counts = self._stats().routing_snapshot()
        reads = counts["reads"]
        failures = counts["connect_failures"]
        primary_because = {reason: reads.get(("primary", reason), 0) for reason in PRIMARY_REASONS}
        engines: dict[str, Any] = {
            "primary": {
                "role": "primary",
                "url": self._name,
                "reads": sum(primary_because.values()),
                "pool": {side: pool[side] for side in ("sync", "async") if side in pool},
            }
        }
        now = time.monotonic()
        for replica in self._replicas:
            roles = {"sync": replica.name, "async": f"{replica.name}_async"}
            down_until = replica.down_until
            engines[replica.name] = {
                "role": "replica",
                "url": _backend.safe_url(replica.url),
                "reads": sum(reads.get((replica.name, r), 0) for r in REPLICA_REASONS),
                "healthy": down_until <= now,
                "cooldown_remaining": max(0.0, down_until - now),
                "connect_failures": failures.get(replica.name, 0),
                "pool": {side: pool[role] for side, role in roles.items() if role in pool},
            }
        return {
            "selection": self.selection,
            "read_your_writes": self.read_your_writes,
            "cooldown": self.cooldown,
            "reads": sum(e["reads"] for e in engines.values()),
            "fallbacks": counts["fallbacks"],
            "primary_because": primary_because,
            "engines": engines,
        }

    def dispose(self) -> None:
        """Close the pooled connections of the sync replica engines."""
        for replica in self._replicas:
            if replica.engine is not None:
                replica.engine.dispose()

    async def adispose(self) -> None:
        """Close the pooled connections of every replica engine."""
        for replica in self._replicas:
            if replica.async_engine is not None:
                await replica.async_engine.dispose()
        self.dispose()
