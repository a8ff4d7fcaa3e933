"""Findings of an adversarial review of the per-scope memory and instruction
work (one BEGIN cursor per SQLite connection, the thread key cached per
thread, the statistics lock taken without ``with``, savepoint release and
rollback as sessionscope's own operation, the long-held watch's flat entry,
and the OpenTelemetry observable instruments shared per meter without an
``_active`` check in the member callbacks).

Each test states the rule it holds the product to and fails on the code it
was written against.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from sqlalchemy import select
from sqlalchemy.pool import QueuePool

from sessionscope import SessionManager
from sessionscope.otel import instrument

# -- OpenTelemetry: an uninstrumented manager during a collection in flight --------------------


class _GatedPool(QueuePool):
    """A QueuePool whose ``checkedout()`` (read by the connection-count
    callback) can be made to wait: it holds a collection at a known point
    without timing."""

    gate: threading.Event | None = None
    reached: threading.Event | None = None

    def checkedout(self) -> int:
        gate, reached = type(self).gate, type(self).reached
        if gate is not None and reached is not None:
            reached.set()
            gate.wait(30)
        return super().checkedout()


@pytest.fixture
def provider() -> Iterator[tuple[MeterProvider, InMemoryMetricReader]]:
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    yield meter_provider, reader
    meter_provider.shutdown()


_RECORDED = frozenset({"db.client.operation.duration", "sessionscope.transaction.duration"})


def _managers_in(data: Any) -> set[str]:
    """Managers with a series in the observable instruments of ``data``."""
    found: set[str] = set()
    if data is None:
        return found
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name in _RECORDED:
                    continue  # recorded before uninstrument(): kept by the SDK
                for point in metric.data.data_points:
                    manager = point.attributes.get("sessionscope.manager")
                    if manager is not None:
                        found.add(str(manager))
                    pool = point.attributes.get("db.client.connection.pool.name")
                    if pool is not None:
                        found.add(str(pool).split(" [", 1)[0])
    return found


def test_uninstrumented_manager_is_not_reported_by_a_collection_in_flight(
    db_url: str, provider: tuple[MeterProvider, InMemoryMetricReader]
) -> None:
    """Rule (``Instrumentation.uninstrument``): "the observable instruments
    report nothing from now on". The member callbacks no longer check whether
    their instrumentation is active, on the ground that ``uninstrument()``
    leaves the meter's members first. But a collection already running (the
    SDK's periodic reader runs on its own thread) iterates the members it read
    when each instrument's callback began: once ``uninstrument()`` has
    returned, that collection still calls the departed manager's callbacks and
    exports its pool and session figures (its engines may already be
    disposed). Before, those callbacks returned nothing once inactive."""
    meter_provider, reader = provider
    first = SessionManager(db_url, name="first", poolclass=_GatedPool)
    second = SessionManager(db_url, name="second")
    try:
        instrument(first, meter_provider=meter_provider)
        leaving = instrument(second, meter_provider=meter_provider)
        for manager in (first, second):
            with manager.session_scope() as s:
                s.execute(select(1))
        assert _managers_in(reader.get_metrics_data()) == {"first", "second"}

        _GatedPool.gate, _GatedPool.reached = threading.Event(), threading.Event()
        collected: list[Any] = []
        collector = threading.Thread(target=lambda: collected.append(reader.get_metrics_data()))
        collector.start()
        try:
            assert _GatedPool.reached.wait(30)  # the collection is inside "first"'s callback
            leaving.uninstrument()  # returns: "second" must report nothing from now on
        finally:
            _GatedPool.gate.set()
            collector.join(30)
            _GatedPool.gate = _GatedPool.reached = None
        assert collected
        assert _managers_in(collected[0]) == {"first"}
    finally:
        first.dispose()
        second.dispose()


# -- the long-held warning names the place that opened the session -----------------------------


def _long_held(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.getMessage().startswith("long-held session")
    ]


def test_long_held_warning_through_exit_stack_points_at_the_caller(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Rule (docs: the long-held warning says where the session was opened: the
    ``with`` line, or the decorated function). A scope entered through
    ``contextlib.ExitStack.enter_context`` is reported as opened in
    contextlib.py (``enter_context``), a line of the standard library that
    says nothing about which code holds the connection: the walk out of the
    entering frame skips sessionscope's frames only. (Not introduced by the
    flat-entry change, which kept the walk; found while checking it.)"""
    caplog.set_level(logging.WARNING, logger="sessionscope")
    manager = SessionManager(f"sqlite:///{tmp_path / 'held.db'}")
    try:
        with contextlib.ExitStack() as stack:
            s = stack.enter_context(manager.session_scope(long_session_warning=0.0))
            line = inspect.currentframe().f_lineno - 1  # type: ignore[union-attr]
            s.execute(select(1))
        with manager.session_scope(long_session_warning=None):
            pass
        records = _long_held(caplog)
        assert len(records) == 1
        assert f'File "{__file__}", line {line}, in test_long_held_warning_through' in records[0]
    finally:
        manager.dispose()
