"""OpenTelemetry metrics, read back through the SDK's own
``InMemoryMetricReader`` after real statements and transactions."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from sessionscope import SessionConfig, SessionManager
from sessionscope._stats import DURATION_BUCKETS
from sessionscope.otel import instrument

from .conftest import reset_schema
from .models import User

SECRET = "s3cret-otel-4b1a"
SYSTEMS = {"sqlite": "sqlite", "postgresql": "postgresql", "mariadb": "mariadb"}


class Transient(Exception):
    pass


class Reader:
    """The SDK pipeline: a MeterProvider with an in-memory reader."""

    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.provider = MeterProvider(metric_readers=[self.reader])

    def points(self, name: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        found: list[Any] = []
        if data is None:
            return found
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        found.extend(metric.data.data_points)
        return found

    def value(self, name: str, **attrs: Any) -> Any:
        matching = [p for p in self.points(name) if _has(p, attrs)]
        assert len(matching) <= 1, matching
        if not matching:
            return None
        point = matching[0]
        return point.count if hasattr(point, "bucket_counts") else point.value


def _has(point: Any, attrs: dict[str, Any]) -> bool:
    return all(point.attributes.get(k.replace("__", ".")) == v for k, v in attrs.items())


@pytest.fixture
def otel() -> Iterator[Reader]:
    reader = Reader()
    yield reader
    reader.provider.shutdown()


@pytest.fixture
def mgr(db_url: str) -> Iterator[SessionManager]:
    manager = SessionManager(
        db_url,
        name="orders",
        config=SessionConfig(retry_delay=0.0, retry_predicate=lambda e: isinstance(e, Transient)),
    )
    reset_schema(manager.engine)
    manager.dispose()
    yield manager
    manager.dispose()


def test_operation_duration_follows_the_semantic_conventions(
    mgr: SessionManager, otel: Reader, backend: str
) -> None:
    instrument(mgr, meter_provider=otel.provider)
    with mgr.session_scope() as s:
        s.execute(select(1))
        s.execute(text("SELECT :v"), {"v": SECRET})
        s.add(User(name=SECRET))
    with pytest.raises(DBAPIError), mgr.session_scope() as s:
        s.execute(text("SELECT * FROM no_such_table WHERE x = :x"), {"x": SECRET})

    points = otel.points("db.client.operation.duration")
    by_operation: dict[str, int] = {}
    for point in points:
        assert point.attributes["db.system.name"] == SYSTEMS[backend]
        assert tuple(point.explicit_bounds) == DURATION_BUCKETS
        assert SECRET not in repr(dict(point.attributes))
        if "error.type" not in point.attributes:
            operation = point.attributes["db.operation.name"]
            by_operation[operation] = by_operation.get(operation, 0) + point.count
    # SQLite's explicit BEGIN goes straight to the driver, not through the
    # engine's statement path, so it is no operation here (as on the servers).
    assert by_operation == {"SELECT": 2, "INSERT": 1}
    failures = [p for p in points if "error.type" in p.attributes]
    assert len(failures) == 1
    assert failures[0].count == 1
    assert failures[0].attributes["db.operation.name"] == "SELECT"
    error_type = failures[0].attributes["error.type"]
    code = failures[0].attributes.get("db.response.status_code")
    if backend == "postgresql":
        assert (error_type, code) == ("psycopg.errors.UndefinedTable", "42P01")
        assert failures[0].attributes["server.address"] == "127.0.0.1"
        assert failures[0].attributes["db.namespace"] == mgr.url.database
    elif backend == "mariadb":
        assert (error_type, code) == ("pymysql.err.ProgrammingError", "1146")
    else:
        assert error_type == "sqlite3.OperationalError"


def test_transactions_counters_and_reset(mgr: SessionManager, otel: Reader) -> None:
    instrument(mgr, meter_provider=otel.provider)
    tries = []

    @mgr.with_session
    def add(session: Session) -> None:
        tries.append(1)
        session.add(User(name=f"u{len(tries)}"))
        if len(tries) == 1:
            raise Transient

    add()
    with mgr.session_scope() as s:
        with mgr.session_scope(propagation="nested"):
            pass
        with pytest.raises(ValueError), mgr.session_scope(propagation="nested"):
            raise ValueError
        s.execute(select(1))
    with mgr.session_scope(auto_commit=False):
        pass
    mgr.reset_stats()  # must not make any exported counter go down

    tx = "sessionscope.transaction.duration"
    function = f"{__name__}.{add.__qualname__}"
    outcome = "sessionscope__transaction__outcome"
    assert otel.value(tx, **{outcome: "committed", "code__function__name": function}) == 1
    assert otel.value(tx, **{outcome: "failed", "code__function__name": function}) == 1
    committed_scopes = [
        p
        for p in otel.points(tx)
        if p.attributes[outcome.replace("__", ".")] == "committed"
        and "code.function.name" not in p.attributes
    ]
    assert [p.count for p in committed_scopes] == [1]
    assert otel.value(tx, **{outcome: "rolled_back"}) == 1
    for point in otel.points(tx):
        assert point.attributes["sessionscope.manager"] == "orders"
        assert tuple(point.explicit_bounds) == DURATION_BUCKETS

    assert otel.value("sessionscope.session.opened") == 4
    assert otel.value("sessionscope.session.active") == 0
    assert otel.value("sessionscope.retries", error__type="Transient") == 1
    sp = "sessionscope__savepoint__outcome"
    assert otel.value("sessionscope.savepoints", **{sp: "released"}) == 1
    assert otel.value("sessionscope.savepoints", **{sp: "rolled_back"}) == 1
    assert otel.value("sessionscope.cancellations") == 0
    assert otel.value("sessionscope.pool.timeouts") == 0
    # Routing instruments only for managers with read replicas (tests/test_replica_*).
    for name in (
        "sessionscope.routing.reads",
        "sessionscope.routing.fallbacks",
        "sessionscope.replica.connect_failures",
        "sessionscope.replica.healthy",
    ):
        assert otel.points(name) == []


def test_connection_pool_metrics(mgr: SessionManager, otel: Reader) -> None:
    instrument(mgr, meter_provider=otel.provider)
    pool = "db__client__connection__pool__name"
    state = "db__client__connection__state"

    def count(which: str) -> Any:
        return otel.value("db.client.connection.count", **{pool: "orders [sync]", state: which})

    with mgr.session_scope() as s:
        s.execute(select(1))
        assert (count("used"), count("idle")) == (1, 0)
    assert (count("used"), count("idle")) == (0, 1)
    assert otel.value("db.client.connection.max", **{pool: "orders [sync]"}) == 15
    assert otel.value("db.client.connection.idle.max", **{pool: "orders [sync]"}) == 5


def test_pool_without_a_size_limit_reports_counts_only(
    otel: Reader, caplog: pytest.LogCaptureFixture
) -> None:
    """In-memory SQLite (a ``SingletonThreadPool``, whose ``size`` is a number,
    not a method) has no connection limit to report: the limit callbacks skip
    it instead of failing (the SDK would log the failure at every collection)."""
    manager = SessionManager("sqlite://", name="memory")
    instrument(manager, meter_provider=otel.provider)
    pool = "db__client__connection__pool__name"
    with manager.session_scope() as s:
        s.execute(select(1))
    assert otel.value("db.client.connection.max", **{pool: "memory [sync]"}) is None
    assert otel.value("db.client.connection.idle.max", **{pool: "memory [sync]"}) is None
    assert not [r for r in caplog.records if "callback" in r.getMessage().lower()]
    manager.dispose()


def test_two_managers_on_one_meter_provider_both_report(
    tmp_path: Path, otel: Reader
) -> None:
    """The SDK keeps the first observable instrument of a name and drops the
    callbacks of later ones: every manager instrumented on one provider must
    still report its own figures, and stop when uninstrumented."""
    first = SessionManager(f"sqlite:///{tmp_path / 'a.db'}", name="first")
    second = SessionManager(f"sqlite:///{tmp_path / 'b.db'}", name="second")
    one = instrument(first, meter_provider=otel.provider)
    instrument(second, meter_provider=otel.provider)
    for manager, n in ((first, 1), (second, 2)):
        for _ in range(n):
            with manager.session_scope() as s:
                s.execute(select(1))
    opened = "sessionscope.session.opened"
    assert otel.value(opened, sessionscope__manager="first") == 1
    assert otel.value(opened, sessionscope__manager="second") == 2
    pool = "db__client__connection__pool__name"
    assert otel.value("db.client.connection.max", **{pool: "second [sync]"}) == 15
    one.uninstrument()
    assert otel.value(opened, sessionscope__manager="first") is None
    assert otel.value(opened, sessionscope__manager="second") == 2
    first.dispose()
    second.dispose()


async def test_async_engine_created_after_instrument(db_url: str, otel: Reader) -> None:
    manager = SessionManager(db_url, name="lazy")
    instrument(manager, meter_provider=otel.provider)  # no engine exists yet
    assert manager.engines_by_role() == {}
    async with manager.async_session_scope() as s:
        await s.execute(select(1))
    await manager.adispose()
    selects = [
        p
        for p in otel.points("db.client.operation.duration")
        if p.attributes.get("db.operation.name") == "SELECT"
    ]
    assert sum(p.count for p in selects) == 1
    assert otel.points("db.client.connection.count")  # the async pool is reported
    assert {p.attributes["db.client.connection.pool.name"] for p in otel.points(
        "db.client.connection.count"
    )} == {"lazy [async]"}


def test_uninstrument_stops_recording(mgr: SessionManager, otel: Reader) -> None:
    instrumentation = instrument(mgr, meter_provider=otel.provider)
    with mgr.session_scope() as s:
        s.execute(select(1))
    instrumentation.uninstrument()
    with mgr.session_scope() as s:
        s.execute(select(1))
    selects = [
        p
        for p in otel.points("db.client.operation.duration")
        if p.attributes.get("db.operation.name") == "SELECT"
    ]
    assert sum(p.count for p in selects) == 1
    assert sum(p.count for p in otel.points("sessionscope.transaction.duration")) == 1
    assert otel.points("sessionscope.session.opened") == []
    assert mgr.stats.listeners == ()


def test_importing_sessionscope_does_not_import_opentelemetry() -> None:
    code = (
        "import sys, sessionscope\n"
        "print(any(m.startswith('opentelemetry') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
