"""sessionscope.otel_tracing: transaction spans, driven through the observer
interface (sessionscope._observe) the core calls, with the SDK's in-memory
exporter; statement spans of opentelemetry-instrumentation-sqlalchemy nest
under them, on every backend."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError

from sessionscope import CommitOutcomeUnknownError, SessionManager
from sessionscope._observe import TransactionInfo, TransactionObserver
from sessionscope.otel_tracing import TransactionTracer

from .models import User

SECRET = "s3cret-parameter-value"


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


@pytest.fixture
def tracer(provider: TracerProvider) -> TransactionTracer:
    return TransactionTracer(provider)


def info(**changes: Any) -> TransactionInfo:
    fields: dict[str, Any] = {
        "function": "orders.place",
        "manager": "main",
        "system": "postgresql",
        "isolation_level": None,
        "read_only": False,
        "replica": False,
        "is_async": False,
    }
    fields.update(changes)
    return TransactionInfo(**fields)


def only(exporter: InMemorySpanExporter) -> ReadableSpan:
    (span,) = exporter.get_finished_spans()
    return span


def everything_said(span: ReadableSpan) -> str:
    events = [(e.name, dict(e.attributes or {})) for e in span.events]
    return repr((span.name, dict(span.attributes or {}), events, span.status.description))


def test_the_tracer_is_a_transaction_observer(tracer: TransactionTracer) -> None:
    observer: TransactionObserver = tracer
    assert isinstance(observer.begin(info()), object)


def test_one_span_per_transaction_with_its_settings(
    tracer: TransactionTracer, exporter: InMemorySpanExporter
) -> None:
    handle = tracer.begin(info(isolation_level="SERIALIZABLE", read_only=True, replica=True))
    tracer.end(handle, "committed", None)
    span = only(exporter)
    assert span.name == "transaction orders.place"
    assert span.kind is trace.SpanKind.INTERNAL
    assert dict(span.attributes or {}) == {
        "db.system.name": "postgresql",
        "sessionscope.manager": "main",
        "sessionscope.read_only": True,
        "sessionscope.route": "replica",
        "sessionscope.async": False,
        "code.function.name": "orders.place",
        "sessionscope.isolation_level": "SERIALIZABLE",
        "sessionscope.transaction.outcome": "committed",
    }
    assert span.status.status_code is StatusCode.UNSET


def test_a_with_scope_and_a_quiet_rollback(
    tracer: TransactionTracer, exporter: InMemorySpanExporter
) -> None:
    tracer.end(tracer.begin(info(function=None)), "rolled_back", None)
    span = only(exporter)
    assert span.name == "transaction"
    assert "code.function.name" not in (span.attributes or {})
    assert (span.attributes or {})["sessionscope.route"] == "primary"
    assert (span.attributes or {})["sessionscope.transaction.outcome"] == "rolled_back"
    assert span.status.status_code is StatusCode.UNSET


def test_a_failure_records_class_and_code_never_the_message(
    tracer: TransactionTracer, exporter: InMemorySpanExporter, manager: SessionManager
) -> None:
    """A real IntegrityError, whose message holds the statement and its bound
    parameter: the span carries its class and code only."""
    with manager.session_scope() as session:
        session.add(User(name=SECRET))
    with pytest.raises(IntegrityError) as caught:
        with manager.session_scope() as session:
            session.add(User(name=SECRET))
    assert SECRET in str(caught.value)
    tracer.end(tracer.begin(info()), "failed", caught.value)
    span = only(exporter)
    attributes = dict(span.attributes or {})
    assert attributes["error.type"] == "IntegrityError"
    assert attributes["db.response.status_code"]  # SQLSTATE, errno or SQLite code
    assert attributes["sessionscope.transaction.outcome"] == "failed"
    assert (span.status.status_code, span.status.description) == (
        StatusCode.ERROR,
        "IntegrityError",
    )
    assert SECRET not in everything_said(span)
    assert "INSERT" not in everything_said(span)


def test_commit_outcome_unknown_is_an_error_of_its_own(
    tracer: TransactionTracer, exporter: InMemorySpanExporter
) -> None:
    error = CommitOutcomeUnknownError("the connection was lost while COMMIT was in flight")
    tracer.end(tracer.begin(info()), "commit_outcome_unknown", error)
    span = only(exporter)
    assert (span.attributes or {})["sessionscope.transaction.outcome"] == "commit_outcome_unknown"
    assert (span.attributes or {})["error.type"] == "CommitOutcomeUnknownError"
    assert span.status.status_code is StatusCode.ERROR


def test_savepoints_are_events_of_the_transaction(
    tracer: TransactionTracer, exporter: InMemorySpanExporter
) -> None:
    handle = tracer.begin(info())
    tracer.savepoint(handle, released=True, error=None)
    tracer.savepoint(handle, released=False, error=ValueError(SECRET))
    tracer.end(handle, "committed", None)
    span = only(exporter)
    assert [(e.name, dict(e.attributes or {})) for e in span.events] == [
        ("sessionscope.savepoint", {"sessionscope.savepoint.outcome": "released"}),
        (
            "sessionscope.savepoint",
            {"sessionscope.savepoint.outcome": "rolled_back", "error.type": "ValueError"},
        ),
    ]
    assert SECRET not in everything_said(span)


def test_a_retry_is_an_event_of_the_next_attempt(
    tracer: TransactionTracer, exporter: InMemorySpanExporter, manager: SessionManager
) -> None:
    with manager.session_scope() as session:
        session.add(User(name="ann"))
    with pytest.raises(IntegrityError) as caught:
        with manager.session_scope() as session:
            session.add(User(name="ann"))
    first = tracer.begin(info())
    tracer.end(first, "failed", caught.value)
    tracer.retry(caught.value, 1, 0.1, "orders.place")
    tracer.end(tracer.begin(info()), "committed", None)
    tracer.end(tracer.begin(info()), "committed", None)  # a later unit of work: no event
    failed, retried, later = exporter.get_finished_spans()
    assert failed.events == () or list(failed.events) == []
    (event,) = retried.events
    assert event.name == "sessionscope.retry"
    attributes = dict(event.attributes or {})
    assert attributes["sessionscope.retry.attempt"] == 2
    assert attributes["error.type"] == "IntegrityError"
    assert "db.response.status_code" in attributes
    assert list(later.events) == []


def test_the_span_is_current_only_while_the_transaction_runs(
    tracer: TransactionTracer, exporter: InMemorySpanExporter
) -> None:
    before = trace.get_current_span()
    handle = tracer.begin(info())
    during = trace.get_current_span()
    tracer.end(handle, "committed", None)
    assert trace.get_current_span() is before
    assert during.get_span_context().span_id == only(exporter).context.span_id


@pytest.fixture
def instrumented(manager: SessionManager, provider: TracerProvider) -> Iterator[SessionManager]:
    instrumentor = SQLAlchemyInstrumentor()
    instrumentor.instrument(
        engines=[manager.engine, manager.async_engine.sync_engine],
        tracer_provider=provider,
        # Its declared range stops below SQLAlchemy 2.1, which it instruments well.
        skip_dep_check=True,
    )
    yield manager
    instrumentor.uninstrument()


def test_statement_spans_nest_under_the_transaction(
    tracer: TransactionTracer, exporter: InMemorySpanExporter, instrumented: SessionManager
) -> None:
    """What the core does for a scope (begin, statements, end), with the
    SQLAlchemy instrumentation on the manager's engine."""
    handle = tracer.begin(info(system=instrumented.url.get_backend_name()))
    with instrumented.session_scope() as session:
        session.execute(select(User.id).where(User.name == SECRET))
    tracer.end(handle, "committed", None)
    spans = exporter.get_finished_spans()
    transaction = next(s for s in spans if s.name.startswith("transaction"))
    statements = [s for s in spans if s is not transaction]
    assert statements, [s.name for s in spans]
    assert all(s.parent is not None for s in statements)
    assert {s.parent.span_id for s in statements if s.parent} == {transaction.context.span_id}
    assert SECRET not in everything_said(transaction)


async def test_async_statement_spans_nest_under_the_transaction(
    tracer: TransactionTracer, exporter: InMemorySpanExporter, instrumented: SessionManager
) -> None:
    """The async session runs statements through SQLAlchemy's greenlet bridge,
    in the caller's context: the transaction span is their parent too."""
    handle = tracer.begin(info(is_async=True))
    async with instrumented.async_session_scope() as session:
        await session.execute(text("SELECT 1"))
    tracer.end(handle, "committed", None)
    await instrumented.adispose()
    spans = exporter.get_finished_spans()
    transaction = next(s for s in spans if s.name.startswith("transaction"))
    statements = [s for s in spans if s is not transaction]
    assert statements
    assert {s.parent.span_id for s in statements if s.parent} == {transaction.context.span_id}


# -- wired to a manager: the core reports its real transactions ----------------------


@pytest.fixture
def traced(
    db_url: str, provider: TracerProvider
) -> Iterator[tuple[SessionManager, TransactionTracer]]:
    from sessionscope.otel_tracing import trace_transactions

    from .conftest import reset_schema

    manager = SessionManager(db_url)
    reset_schema(manager.engine)
    tracer = trace_transactions(manager, tracer_provider=provider)
    yield manager, tracer
    manager.remove_observer(tracer)
    manager.dispose()


def _outcomes(exporter: InMemorySpanExporter) -> list[tuple[str, Any]]:
    return [
        (s.name, (s.attributes or {}).get("sessionscope.transaction.outcome"))
        for s in exporter.get_finished_spans()
    ]


def test_scopes_of_a_traced_manager_make_spans(
    traced: tuple[SessionManager, TransactionTracer],
    exporter: InMemorySpanExporter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    manager, _ = traced

    @manager.with_session
    def add(session: Any, name: str) -> None:
        session.add(User(name=name))

    add("ann")
    with pytest.raises(IntegrityError):
        add("ann")
    with manager.session_scope() as session:
        with pytest.raises(ValueError), manager.session_scope(propagation="nested"):
            session.add(User(name="inner"))
            raise ValueError("undone")
        manager.set_rollback(True)
    assert _outcomes(exporter) == [
        (f"transaction {add.__module__}.{add.__qualname__}", "committed"),
        (f"transaction {add.__module__}.{add.__qualname__}", "failed"),
        ("transaction", "rolled_back"),
    ]
    last = exporter.get_finished_spans()[-1]
    assert [e.name for e in last.events] == ["sessionscope.savepoint"]
    assert (last.events[0].attributes or {})["sessionscope.savepoint.outcome"] == "rolled_back"
    assert "ann" not in repr([everything_said(s) for s in exporter.get_finished_spans()])
    assert not [r for r in caplog.records if r.levelname == "ERROR" and "detach" in r.getMessage()]


async def test_async_scopes_of_a_traced_manager_make_spans(
    traced: tuple[SessionManager, TransactionTracer],
    exporter: InMemorySpanExporter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    manager, _ = traced
    try:
        async with manager.async_session_scope() as session:
            session.add(User(name="bob"))
        with pytest.raises(RuntimeError):
            async with manager.async_session_scope():
                raise RuntimeError("fails")
    finally:
        await manager.adispose()
    assert _outcomes(exporter) == [("transaction", "committed"), ("transaction", "failed")]
    assert all((s.attributes or {})["sessionscope.async"] for s in exporter.get_finished_spans())
    assert not [r for r in caplog.records if r.levelname == "ERROR" and "detach" in r.getMessage()]
