"""The Prometheus exporter, read back through prometheus_client's own
``CollectorRegistry.get_sample_value`` after real transactions."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import select
from sqlalchemy.orm import Session

import sessionscope
from sessionscope import SessionConfig, SessionManager, _api
from sessionscope.prometheus import register

from .conftest import reset_schema
from .models import User


class Transient(Exception):
    pass


@pytest.fixture
def mgr(db_url: str) -> Iterator[SessionManager]:
    manager = SessionManager(
        db_url,
        name="orders",
        config=SessionConfig(
            retry_delay=0.0, retry_predicate=lambda e: isinstance(e, Transient)
        ),
    )
    reset_schema(manager.engine)
    yield manager
    manager.dispose()


def test_exported_values(mgr: SessionManager) -> None:
    registry = CollectorRegistry()
    register(mgr, registry=registry)

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"manager": "orders", **labels})

    base_sessions = value("sessionscope_sessions_total") or 0.0  # reset_schema opened none
    base_checkouts = value("sessionscope_pool_wait_seconds_count") or 0.0  # reset_schema's
    calls = []

    @mgr.with_session
    def add(session: Session, name: str) -> None:
        calls.append(name)
        session.add(User(name=name))
        session.flush()
        if len(calls) == 1:
            raise Transient

    add("a")  # a failed attempt, a retry, then a commit
    with mgr.session_scope() as s:  # committed, with a released and a rolled back savepoint
        s.add(User(name="b"))
        with mgr.session_scope(propagation="nested"):
            pass
        with pytest.raises(ValueError), mgr.session_scope(propagation="nested"):
            raise ValueError
        assert value("sessionscope_active_sessions") == 1
        s.execute(select(1))
        assert value("sessionscope_pool_checked_out", engine="sync") == 1
    with mgr.session_scope(auto_commit=False):  # rolled back quietly
        pass

    assert value("sessionscope_sessions_total") == base_sessions + 4
    assert value("sessionscope_active_sessions") == 0
    assert value("sessionscope_transactions_total", outcome="committed") == 2
    assert value("sessionscope_transactions_total", outcome="rolled_back") == 1
    assert value("sessionscope_transactions_total", outcome="failed") == 1
    assert value("sessionscope_transaction_duration_seconds_count") == 4
    assert value("sessionscope_transaction_duration_seconds_bucket", le="+Inf") == 4
    buckets = [
        value("sessionscope_transaction_duration_seconds_bucket", le=le)
        for le in ("0.001", "0.005", "0.01", "0.05", "0.1", "0.5", "1.0", "5.0", "10.0", "+Inf")
    ]
    assert buckets == sorted(buckets)  # cumulative
    assert (value("sessionscope_transaction_duration_seconds_sum") or 0.0) > 0.0
    assert value("sessionscope_retries_total", error="Transient") == 1
    assert value("sessionscope_savepoints_total", outcome="released") == 1
    assert value("sessionscope_savepoints_total", outcome="rolled_back") == 1
    assert value("sessionscope_cancellations_total") == 0
    assert value("sessionscope_slow_transactions_total") == 0
    assert value("sessionscope_pool_timeouts_total") == 0
    # Three connections checked out: the failed attempt, its retry, the scope
    # that ran SQL (the two others sent nothing).
    assert value("sessionscope_pool_wait_seconds_count") == base_checkouts + 3
    assert value("sessionscope_pool_wait_seconds_bucket", le="+Inf") == base_checkouts + 3
    assert value("sessionscope_pool_wait_seconds_bucket", le="0.0001") is not None
    function = f"{__name__}.{add.__qualname__}"
    assert value("sessionscope_function_duration_seconds_count", function=function) == 2
    assert value("sessionscope_function_failures_total", function=function) == 1
    assert value("sessionscope_pool_checked_out", engine="sync") == 0
    assert value("sessionscope_pool_size", engine="sync") == 5
    assert value("sessionscope_sessions_created") == mgr.stats.created

    # reset_session_stats() resets the Python view, never the exported counters.
    mgr.reset_stats()
    assert mgr.get_stats()["total_transactions"] == 0
    assert value("sessionscope_transactions_total", outcome="committed") == 2
    assert value("sessionscope_transaction_duration_seconds_count") == 4


def test_text_exposition_names_and_units() -> None:
    manager = SessionManager("postgresql+psycopg://app:Pw-hidden-1@db.invalid/app")
    registry = CollectorRegistry()
    register(manager, registry=registry)
    text = generate_latest(registry).decode()
    assert "Pw-hidden-1" not in text
    assert 'manager="postgresql+psycopg://app:***@db.invalid/app"' in text
    counters = [
        line.split()[2]
        for line in text.splitlines()
        if line.startswith("# TYPE sessionscope_") and line.endswith(" counter")
    ]
    assert len(counters) == 9
    assert all(name.endswith("_total") for name in counters)
    assert "# TYPE sessionscope_transaction_duration_seconds histogram" in text
    assert "# TYPE sessionscope_pool_wait_seconds histogram" in text
    assert "sessionscope_success_rate" not in text  # left to PromQL
    # Routing series only for managers with read replicas (tests/test_replica_*).
    assert "routed_reads" not in text and "replica" not in text


def test_follows_the_default_manager(
    monkeypatch: pytest.MonkeyPatch, manager: SessionManager
) -> None:
    registry = CollectorRegistry()
    register(registry=registry)
    with sessionscope.session_scope():
        pass
    assert registry.get_sample_value(
        "sessionscope_transactions_total", {"manager": manager.name, "outcome": "committed"}
    ) == manager.stats.totals()["committed"]
    monkeypatch.setattr(_api, "_default", None)
    sessions = registry.get_sample_value("sessionscope_sessions_total", {"manager": manager.name})
    assert sessions is None


def test_several_managers_in_one_collector() -> None:
    one = SessionManager("sqlite://", name="one")
    two = SessionManager("sqlite://", name="two")
    registry = CollectorRegistry()
    collector = register(one, registry=registry)
    collector.add(two)
    with one.session_scope(), one.session_scope(propagation="requires_new"):
        pass
    with two.session_scope():
        pass
    sessions = "sessionscope_sessions_total"
    assert registry.get_sample_value(sessions, {"manager": "one"}) == 2
    assert registry.get_sample_value(sessions, {"manager": "two"}) == 1
    registry.unregister(collector)
    assert registry.get_sample_value(sessions, {"manager": "one"}) is None


def test_importing_sessionscope_does_not_import_prometheus_client() -> None:
    code = "import sys, sessionscope; print('prometheus_client' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
