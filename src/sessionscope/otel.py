"""OpenTelemetry metrics (install the ``sessionscope[otel]`` extra).

::

    from sessionscope.otel import instrument

    instrument()                  # the default manager, the global MeterProvider
    instrument(orders, meter_provider=provider)

Database client semantic conventions (names as in semantic conventions 1.44,
where ``db.client.operation.duration`` is stable and the connection metrics are
still in development):

* ``db.client.operation.duration`` (histogram, s, the recommended buckets
  0.001 ... 10): every statement the manager's engines send, timed from the
  cursor's execute to its return, with ``db.system.name``, ``db.namespace``,
  ``db.operation.name`` (the statement's first keyword: ``SELECT``, ``INSERT``,
  ``BEGIN``, ``SAVEPOINT``, ...; never the statement text or its parameters),
  ``server.address`` / ``server.port``, and on failure ``error.type`` (the
  exception class) and ``db.response.status_code`` (SQLSTATE or error number).
  COMMIT and ROLLBACK are not cursor executions; transactions are covered below.
* ``db.client.connection.count`` (``db.client.connection.state`` = ``idle`` /
  ``used``), ``db.client.connection.max`` and ``db.client.connection.idle.max``,
  per pool: ``db.client.connection.pool.name`` is ``"<manager name> [<role>]"``
  (role ``sync``/``async``, see ``SessionManager.engines_by_role``). Pools
  without these figures (``NullPool``, ``StaticPool``) report nothing.

sessionscope's own figures (no convention exists for them), with the attribute
``sessionscope.manager``:

* ``sessionscope.transaction.duration`` (histogram, s, same buckets):
  ``sessionscope.transaction.outcome`` = ``committed`` / ``rolled_back`` /
  ``failed``, ``code.function.name`` for decorated functions. Its count is the
  number of transactions, so success rate = 1 - failed / all.
* counters ``sessionscope.session.opened``, ``sessionscope.retries``
  (``error.type``), ``sessionscope.savepoints`` (``sessionscope.savepoint.outcome``),
  ``sessionscope.cancellations``, ``sessionscope.transaction.slow``,
  ``sessionscope.session.long_held``, ``sessionscope.pool.timeouts``; and the
  up-down counter ``sessionscope.session.active``.
* read routing, for a manager with read replicas only: the counters
  ``sessionscope.routing.reads`` (``sessionscope.routing.engine``: ``primary`` or
  ``replicaN``, the engine the read's first connection landed on;
  ``sessionscope.routing.reason``: ``selected`` or ``fallback`` on a replica,
  ``read_your_writes``, ``no_replica_available`` or ``fallback`` on the primary),
  ``sessionscope.routing.fallbacks``, ``sessionscope.replica.connect_failures``
  (``sessionscope.replica.name``), and the gauge ``sessionscope.replica.healthy``
  (1 in rotation, 0 cooling down; ``sessionscope.replica.name``).

Counters are observed from the manager's monotonic totals, so
``reset_session_stats()`` never makes them go backwards. Transaction figures
need ``enable_monitoring=True`` (the default). Importing this module imports
``opentelemetry``; ``import sessionscope`` never does.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, Final

from sqlalchemy import event
from sqlalchemy.engine import Engine

from ._backend import driver_error_code
from ._extras import missing_extra
from ._manager import SessionManager
from ._version import __version__

try:
    from opentelemetry import metrics
    from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation
except ImportError as err:
    raise missing_extra("sessionscope.otel", "otel", err) from err
from ._stats import DURATION_BUCKETS, routing_series

__all__ = ["Instrumentation", "instrument"]

_SYSTEMS: Final = {"postgresql": "postgresql", "mysql": "mysql", "sqlite": "sqlite"}
_START: Final = "_sessionscope_otel_start"


class Instrumentation:
    """The instruments of one manager; :meth:`uninstrument` stops recording."""

    def __init__(self, manager: SessionManager, meter_provider: MeterProvider | None) -> None:
        self.manager = manager
        self._lock = threading.Lock()
        self._engines: list[tuple[Engine, dict[str, Callable[..., None]]]] = []
        self._active = True
        self._tx_attrs: dict[tuple[str, str | None], dict[str, str]] = {}
        meter = metrics.get_meter("sessionscope", __version__, meter_provider=meter_provider)
        self._operation = meter.create_histogram(
            "db.client.operation.duration",
            unit="s",
            description="Duration of database client operations.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self._transaction = meter.create_histogram(
            "sessionscope.transaction.duration",
            unit="s",
            description="Duration of sessionscope transactions, scope entry to close.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self._base = {"sessionscope.manager": manager.name}
        # Observable instruments are the meter's, shared by every manager
        # instrumented on it (see _Observed).
        self._observed = _Observed.of(meter)
        self._observed.join(self, routing=bool(manager.replica_health()))
        manager.stats.add_listener(self._on_transaction)
        manager.add_engine_hook(self._on_engine)
        for role, engine in manager.engines_by_role().items():
            self._on_engine(role, engine)

    def uninstrument(self) -> None:
        """Stop recording: detach the engine events and the statistics listener;
        the observable instruments report nothing from now on."""
        with self._lock:
            self._active = False
            engines, self._engines = self._engines, []
        self._observed.leave(self)
        self.manager.stats.remove_listener(self._on_transaction)
        self.manager.remove_engine_hook(self._on_engine)
        for engine, listeners in engines:
            for name, fn in listeners.items():
                event.remove(engine, name, fn)

    # -- transactions (statistics listener) ---------------------------------------

    def _on_transaction(
        self, duration: float, committed: bool, failed: bool, function: str | None
    ) -> None:
        outcome = "committed" if committed else "failed" if failed else "rolled_back"
        attrs = self._tx_attrs.get((outcome, function))
        if attrs is None:
            attrs = {**self._base, "sessionscope.transaction.outcome": outcome}
            if function is not None:
                attrs["code.function.name"] = function
            if len(self._tx_attrs) < 1024:
                self._tx_attrs[(outcome, function)] = attrs
        self._transaction.record(duration, attrs)

    # -- statements (engine events) ----------------------------------------------

    def _on_engine(self, role: str, engine: Engine) -> None:
        with self._lock:
            if not self._active or any(e is engine for e, _ in self._engines):
                return
            listeners = _statement_listeners(engine, self._operation.record)
            for name, fn in listeners.items():
                event.listen(engine, name, fn)
            self._engines.append((engine, listeners))

    # -- observable callbacks ----------------------------------------------------

    def _gauge(self, key: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(self.manager.stats.totals()[key], self._base)]

        return observe

    def _retries(self, options: CallbackOptions) -> Iterable[Observation]:
        errors: dict[str, int] = self.manager.stats.totals()["retry_errors"]
        return [Observation(n, {**self._base, "error.type": e}) for e, n in errors.items()]

    def _savepoints(self, options: CallbackOptions) -> Iterable[Observation]:
        t = self.manager.stats.totals()
        key = "sessionscope.savepoint.outcome"
        released = t["savepoints"] - t["savepoint_rollbacks"]
        return [
            Observation(released, {**self._base, key: "released"}),
            Observation(t["savepoint_rollbacks"], {**self._base, key: "rolled_back"}),
        ]

    def _routing(self) -> tuple[list[tuple[str, str, int]], list[tuple[str, int]]]:
        return routing_series(self.manager.stats.totals()["routing"], self.manager.replica_health())

    def _routed_reads(self, options: CallbackOptions) -> Iterable[Observation]:
        engine, reason = "sessionscope.routing.engine", "sessionscope.routing.reason"
        return [
            Observation(n, {**self._base, engine: e, reason: r}) for e, r, n in self._routing()[0]
        ]

    def _read_fallbacks(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(self.manager.stats.totals()["routing"]["fallbacks"], self._base)]

    def _connect_failures(self, options: CallbackOptions) -> Iterable[Observation]:
        key = "sessionscope.replica.name"
        return [Observation(n, {**self._base, key: name}) for name, n in self._routing()[1]]

    def _replica_health(self, options: CallbackOptions) -> Iterable[Observation]:
        key = "sessionscope.replica.name"
        return [
            Observation(1 if healthy else 0, {**self._base, key: name})
            for name, healthy in self.manager.replica_health().items()
        ]

    def _pools(self) -> Iterable[tuple[str, Any]]:
        name = self.manager.name
        return [(f"{name} [{role}]", e.pool) for role, e in self.manager.engines_by_role().items()]

    def _connection_count(self, options: CallbackOptions) -> Iterable[Observation]:
        out = []
        for pool_name, pool in self._pools():
            if hasattr(pool, "checkedout") and hasattr(pool, "checkedin"):
                for state, value in (("used", pool.checkedout()), ("idle", pool.checkedin())):
                    attrs = {
                        "db.client.connection.pool.name": pool_name,
                        "db.client.connection.state": state,
                    }
                    out.append(Observation(value, attrs))
        return out

    def _connection_limit(self, which: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            out = []
            for pool_name, pool in self._pools():
                # A queue pool's size() is its limit; other pools (SQLite's
                # SingletonThreadPool has a plain ``size`` number) have none.
                size_of = getattr(pool, "size", None)
                size = size_of() if callable(size_of) else None
                if not isinstance(size, int):
                    continue
                # QueuePool keeps at most pool_size idle and opens up to
                # max_overflow more (a negative max_overflow means no limit).
                overflow = getattr(pool, "_max_overflow", None)
                if which == "idle_max":
                    value: int | None = size
                elif isinstance(overflow, int) and overflow >= 0:
                    value = size + overflow
                else:
                    value = None
                if value is not None:
                    out.append(Observation(value, {"db.client.connection.pool.name": pool_name}))
            return out

        return observe


Callback = Callable[[CallbackOptions], Iterable[Observation]]


class _Observed:
    """The observable instruments of one meter, shared by every manager
    instrumented on it. The SDK keeps the first instrument of a name and drops
    the callbacks of later ones, so instruments made per manager would report
    the first manager only; these report each member's figures (told apart by
    ``sessionscope.manager``)."""

    _of: ClassVar[weakref.WeakKeyDictionary[Any, _Observed]] = weakref.WeakKeyDictionary()
    _of_lock: ClassVar[threading.Lock] = threading.Lock()

    @classmethod
    def of(cls, meter: Any) -> _Observed:
        with cls._of_lock:
            observed = cls._of.get(meter)
            if observed is None:
                observed = cls._of[meter] = cls(meter)
            return observed

    def __init__(self, meter: Any) -> None:
        # Weakly: the meter (through its instruments' callbacks) holds this
        # object, which must not keep the meter, its key here, alive.
        self._meter = weakref.ref(meter)
        self._members: tuple[Instrumentation, ...] = ()
        self._routing = False
        meter.create_observable_up_down_counter(
            "db.client.connection.count",
            [self._each(lambda m: m._connection_count)],
            unit="{connection}",
            description="Connections currently in the state given by db.client.connection.state.",
        )
        meter.create_observable_up_down_counter(
            "db.client.connection.max",
            [self._each(lambda m: m._connection_limit("max"))],
            unit="{connection}",
            description="The maximum number of open connections allowed.",
        )
        meter.create_observable_up_down_counter(
            "db.client.connection.idle.max",
            [self._each(lambda m: m._connection_limit("idle_max"))],
            unit="{connection}",
            description="The maximum number of idle open connections allowed.",
        )
        meter.create_observable_up_down_counter(
            "sessionscope.session.active",
            [self._each(lambda m: m._gauge("active_sessions"))],
            unit="{session}",
            description="Sessions open right now.",
        )
        for name, key, unit, description in (
            ("sessionscope.session.opened", "session_count", "{session}", "Sessions opened."),
            (
                "sessionscope.cancellations",
                "cancellations",
                "{scope}",
                "Async scopes ended by cancellation.",
            ),
            (
                "sessionscope.transaction.slow",
                "slow",
                "{transaction}",
                "Transactions longer than slow_threshold.",
            ),
            (
                "sessionscope.session.long_held",
                "long_held",
                "{session}",
                "Sessions reported open longer than long_session_warning.",
            ),
            (
                "sessionscope.pool.timeouts",
                "pool_timeouts",
                "{timeout}",
                "Checkouts that gave up waiting for a pooled connection.",
            ),
        ):
            meter.create_observable_counter(
                name, [self._gauge_of(key)], unit=unit, description=description
            )
        meter.create_observable_counter(
            "sessionscope.retries",
            [self._each(lambda m: m._retries)],
            unit="{retry}",
            description="Retries after transient errors, by error class.",
        )
        meter.create_observable_counter(
            "sessionscope.savepoints",
            [self._each(lambda m: m._savepoints)],
            unit="{savepoint}",
            description="Savepoints ended, by outcome.",
        )

    def join(self, member: Instrumentation, *, routing: bool) -> None:
        """Report ``member``'s figures from now on (and the routing figures, the
        first time a member with replicas joins: replicas are fixed when a
        manager is built)."""
        with self._of_lock:
            self._members = (*self._members, member)
            meter = self._meter()
            if routing and not self._routing and meter is not None:
                self._routing = True
                meter.create_observable_counter(
                    "sessionscope.routing.reads",
                    [self._each(lambda m: m._routed_reads)],
                    unit="{read}",
                    description="Read-only sessions routed, by the engine their first "
                    "connection landed on and the reason.",
                )
                meter.create_observable_counter(
                    "sessionscope.routing.fallbacks",
                    [self._each(lambda m: m._read_fallbacks)],
                    unit="{fallback}",
                    description="Routed reads re-pointed after a replica failed to connect.",
                )
                meter.create_observable_counter(
                    "sessionscope.replica.connect_failures",
                    [self._each(lambda m: m._connect_failures)],
                    unit="{failure}",
                    description="Failed connects that took a replica out of rotation.",
                )
                meter.create_observable_gauge(
                    "sessionscope.replica.healthy",
                    [self._each(lambda m: m._replica_health)],
                    unit="1",
                    description="1 while a replica is in rotation, 0 during its cool-down.",
                )

    def leave(self, member: Instrumentation) -> None:
        with self._of_lock:
            self._members = tuple(m for m in self._members if m is not member)

    def _gauge_of(self, key: str) -> Callback:
        return self._each(lambda member: member._gauge(key))

    def _each(self, callback_of: Callable[[Instrumentation], Callback]) -> Callback:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            found: list[Observation] = []
            for member in self._members:
                # A collection in flight may still hold a member that has left.
                if member._active:
                    found.extend(callback_of(member)(options))
            return found

        return observe


def _statement_listeners(
    engine: Engine, record: Callable[[float, dict[str, Any]], None]
) -> dict[str, Callable[..., None]]:
    dialect = engine.dialect
    if getattr(dialect, "is_mariadb", False):
        system = "mariadb"
    else:
        system = _SYSTEMS.get(dialect.name, "other_sql")
    url = engine.url
    base: dict[str, Any] = {"db.system.name": system}
    if url.database:
        base["db.namespace"] = url.database
    if url.host:
        base["server.address"] = url.host
        if url.port:
            base["server.port"] = url.port
    cache: dict[str | None, dict[str, Any]] = {}

    def attrs_for(statement: str) -> dict[str, Any]:
        operation = _operation_name(statement)
        attrs = cache.get(operation)
        if attrs is None:
            attrs = dict(base)
            if operation is not None:
                attrs["db.operation.name"] = operation
            if len(cache) < 256:
                cache[operation] = attrs
        return attrs

    def before(
        conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool
    ) -> None:
        if context is not None:
            setattr(context, _START, time.perf_counter())

    def after(
        conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool
    ) -> None:
        started = getattr(context, _START, None)
        if started is not None:
            record(time.perf_counter() - started, attrs_for(statement))

    def failed(ctx: Any) -> None:
        context = ctx.execution_context
        started = getattr(context, _START, None)
        if started is None:
            return
        error = ctx.original_exception
        attrs = {**attrs_for(ctx.statement or ""), "error.type": _qualname(error)}
        code = driver_error_code(error, sqlite_names=False)
        if code is not None:
            attrs["db.response.status_code"] = code
        record(time.perf_counter() - started, attrs)

    return {
        "before_cursor_execute": before,
        "after_cursor_execute": after,
        "handle_error": failed,
    }


def _operation_name(statement: str) -> str | None:
    # The first keyword only: low cardinality and free of literals and parameters.
    head = statement.lstrip("( \t\r\n")[:24].split(None, 1)
    if not head:
        return None
    word = head[0].upper()
    return word if word.isalpha() else None


def _qualname(error: BaseException) -> str:
    cls = type(error)
    return f"{cls.__module__}.{cls.__qualname__}"


def instrument(
    manager: SessionManager | None = None, *, meter_provider: MeterProvider | None = None
) -> Instrumentation:
    """Record OpenTelemetry metrics for ``manager`` (default: the default manager,
    which must be set up) through ``meter_provider`` (default: the global one).

    Engines created later are instrumented when they are created. Call it once
    per manager; after ``setup_database_connection()`` builds a new default
    manager, uninstrument the old and instrument the new one.
    """
    if manager is None:
        from ._api import get_default_manager

        manager = get_default_manager()
    return Instrumentation(manager, meter_provider)
