"""Statistics: every figure of get_session_stats(), on SQLite, PostgreSQL and
MariaDB, sync and async; reset; monitoring off; pool status; long-held sessions."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import sqlite3
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, pool, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

import sessionscope
from sessionscope import PoolExhaustedError, SessionConfig, SessionManager, _api

from .conftest import reset_schema
from .models import User

SEED_KEYS = (
    "session_count",
    "active_sessions",
    "total_transactions",
    "failed_transactions",
    "success_rate",
)


class Transient(Exception):
    """Marks an attempt to be retried (through a custom ``retry_predicate``)."""


def _config(**fields: Any) -> SessionConfig:
    base: dict[str, Any] = {"retry_delay": 0.0, "retry_predicate": _is_marked}
    base.update(fields)
    return SessionConfig(**base)


def _is_marked(exc: BaseException) -> bool:
    return isinstance(exc, Transient)


def figures(manager: SessionManager, *keys: str) -> dict[str, Any]:
    stats = manager.get_stats()
    return {k: stats[k] for k in keys}


@pytest.fixture
def mgr(db_url: str) -> Iterator[SessionManager]:
    manager = SessionManager(db_url, config=_config(), name="stats-test")
    reset_schema(manager.engine)
    manager.reset_stats()
    yield manager
    manager.dispose()


@pytest.fixture
async def amgr(db_url: str) -> AsyncIterator[SessionManager]:
    manager = SessionManager(db_url, config=_config(), name="stats-test-async")
    reset_schema(manager.engine)
    manager.dispose()
    manager.reset_stats()
    yield manager
    await manager.adispose()


def test_seed_keys_before_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_api, "_default", None)
    stats = sessionscope.get_session_stats()
    assert {k: stats[k] for k in SEED_KEYS} == {
        "session_count": 0,
        "active_sessions": 0,
        "total_transactions": 0,
        "failed_transactions": 0,
        "success_rate": 100.0,
    }
    assert stats["pool"] == {}
    sessionscope.reset_session_stats()  # harmless before setup


def test_outcomes_sync(mgr: SessionManager) -> None:
    with mgr.session_scope() as s:  # committed
        s.add(User(name="a"))
    with pytest.raises(ValueError), mgr.session_scope() as s:  # failed
        s.add(User(name="b"))
        s.flush()
        raise ValueError("boom")
    with mgr.session_scope(auto_commit=False) as s:  # quietly rolled back
        s.add(User(name="c"))
    with mgr.session_scope() as s:  # set_rollback: quietly rolled back
        s.add(User(name="d"))
        sessionscope.set_rollback()
    with mgr.session_scope():  # empty: nothing to commit, a success
        pass

    stats = mgr.get_stats()
    assert {k: stats[k] for k in SEED_KEYS} == {
        "session_count": 5,
        "active_sessions": 0,
        "total_transactions": 5,
        "failed_transactions": 1,
        "success_rate": 80.0,
    }
    assert stats["committed_transactions"] == 2
    assert stats["rolled_back_transactions"] == 3
    assert stats["slow_transactions"] == 0
    assert 0.0 < stats["avg_duration"] <= stats["max_duration"]
    assert 0.0 < stats["p95_duration"] <= stats["max_duration"]
    json.dumps(stats)  # plain values only
    with mgr.session_scope() as s:
        assert s.scalars(select(User.name)).all() == ["a"]


async def test_outcomes_async(amgr: SessionManager) -> None:
    async with amgr.async_session_scope() as s:
        s.add(User(name="a"))
    with pytest.raises(ValueError):
        async with amgr.async_session_scope() as s:
            s.add(User(name="b"))
            await s.flush()
            raise ValueError("boom")
    async with amgr.async_session_scope(auto_commit=False) as s:
        s.add(User(name="c"))
    assert figures(
        amgr,
        "session_count",
        "total_transactions",
        "committed_transactions",
        "rolled_back_transactions",
        "failed_transactions",
        "active_sessions",
    ) == {
        "session_count": 3,
        "total_transactions": 3,
        "committed_transactions": 1,
        "rolled_back_transactions": 2,
        "failed_transactions": 1,
        "active_sessions": 0,
    }


def test_savepoints_and_per_function_figures(mgr: SessionManager) -> None:
    @mgr.with_session
    def add(session: Session, name: str) -> None:
        session.add(User(name=name))
        session.flush()

    @mgr.with_session(propagation="nested")
    def add_nested(session: Session, name: str, fail: bool = False) -> None:
        session.add(User(name=name))
        session.flush()
        if fail:
            raise ValueError("nested failure")

    add("owned")  # owns its transaction
    with mgr.session_scope() as s:
        add(s, "joined")  # joins the session passed explicitly
        add("joined-implicitly")  # joins the enclosing scope
        add_nested("kept")  # savepoint released
        with pytest.raises(ValueError):
            add_nested("dropped", fail=True)  # savepoint rolled back
        with mgr.session_scope(propagation="nested"):  # an undecorated savepoint
            pass

    stats = mgr.get_stats()
    assert (stats["savepoints"], stats["savepoint_rollbacks"]) == (3, 1)
    assert (stats["total_transactions"], stats["committed_transactions"]) == (2, 2)
    functions = stats["functions"]
    add_name = f"{__name__}.{add.__qualname__}"
    nested_name = f"{__name__}.{add_nested.__qualname__}"
    assert set(functions) == {add_name, nested_name}
    assert (functions[add_name]["calls"], functions[add_name]["failures"]) == (3, 0)
    assert (functions[nested_name]["calls"], functions[nested_name]["failures"]) == (2, 1)
    for entry in functions.values():
        assert 0.0 < entry["avg_duration"] <= entry["max_duration"]
    with mgr.session_scope() as s:
        names = set(s.scalars(select(User.name)))
    assert names == {"owned", "joined", "joined-implicitly", "kept"}


def test_retries_counted_by_error_class(mgr: SessionManager) -> None:
    attempts = []

    @mgr.with_session(retry_attempts=3)
    def flaky(session: Session) -> None:
        attempts.append(1)
        session.add(User(name=f"try{len(attempts)}"))
        session.flush()
        if len(attempts) < 3:
            raise Transient("try again")

    flaky()
    stats = mgr.get_stats()
    assert stats["retries"] == 2
    assert stats["retry_errors"] == {"Transient": 2}
    # Each attempt is its own transaction: two failed, one committed.
    assert (stats["total_transactions"], stats["failed_transactions"]) == (3, 2)
    assert stats["functions"][f"{__name__}.{flaky.__qualname__}"]["calls"] == 3


def test_real_sqlite_lock_is_retried_and_counted(tmp_path: Path) -> None:
    """A real "database is locked": another connection holds the write lock while
    the first attempt tries to write (busy timeout 0), then lets go."""
    path = tmp_path / "locked.db"
    manager = SessionManager(
        f"sqlite:///{path}",
        config=SessionConfig(retry_delay=0.0),
        connect_args={"timeout": 0},
    )
    reset_schema(manager.engine)
    manager.reset_stats()
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    attempts = []

    @manager.with_session
    def write(session: Session) -> None:
        attempts.append(1)
        if len(attempts) == 2:
            blocker.execute("ROLLBACK")
        session.add(User(name="x"))
        session.flush()

    try:
        write()
    finally:
        blocker.close()
        manager.dispose()
    stats = manager.get_stats()
    assert stats["retries"] == 1
    assert stats["retry_errors"] == {"OperationalError": 1}
    assert (stats["committed_transactions"], stats["failed_transactions"]) == (1, 1)


def test_reset_keeps_active_gauge_and_exporter_totals(mgr: SessionManager) -> None:
    with mgr.session_scope() as s:
        s.add(User(name="before"))
    with mgr.session_scope() as s:
        s.execute(select(1))
        mgr.reset_stats()
        stats = mgr.get_stats()
        assert (stats["active_sessions"], stats["session_count"]) == (1, 0)
        assert (stats["total_transactions"], stats["max_duration"]) == (0, 0.0)
    stats = mgr.get_stats()
    # The open session ended after the reset: counted there, and the gauge is back to 0.
    assert (stats["active_sessions"], stats["total_transactions"], stats["session_count"]) == (
        0,
        1,
        0,
    )
    totals = mgr.stats.totals()
    assert (totals["session_count"], totals["total_transactions"]) == (2, 2)
    assert sum(totals["buckets"]) == 2


def test_reset_through_the_module_api(manager: SessionManager) -> None:
    with sessionscope.session_scope() as s:
        s.add(User(name="x"))
    assert sessionscope.get_session_stats()["total_transactions"] == 1
    sessionscope.reset_session_stats()
    stats = sessionscope.get_session_stats()
    assert (stats["total_transactions"], stats["success_rate"], stats["functions"]) == (
        0,
        100.0,
        {},
    )
    assert "sync" in stats["pool"]


def test_monitoring_off_records_nothing(
    mgr: SessionManager, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sessionscope")
    off = mgr.configure(enable_monitoring=False, long_session_warning=0.0, slow_threshold=0.0)
    assert off.enable_monitoring is False

    @mgr.with_session
    def add(session: Session) -> None:
        session.add(User(name="quiet"))

    with mgr.session_scope() as s:
        s.add(User(name="off"))
        add()
    with pytest.raises(ValueError), mgr.session_scope():
        raise ValueError
    stats = mgr.get_stats()
    assert (stats["session_count"], stats["total_transactions"], stats["functions"]) == (0, 0, {})
    assert mgr.stats.totals()["session_count"] == 0
    assert not [r for r in caplog.records if "long-held" in r.message or "slow" in r.message]


def test_per_scope_override_of_monitoring(mgr: SessionManager) -> None:
    with mgr.session_scope(enable_monitoring=False):
        pass
    with mgr.session_scope():
        pass
    assert figures(mgr, "session_count", "total_transactions") == {
        "session_count": 1,
        "total_transactions": 1,
    }


def test_managers_count_separately(tmp_path: Path) -> None:
    one = SessionManager(f"sqlite:///{tmp_path / 'one.db'}")
    two = SessionManager(f"sqlite:///{tmp_path / 'two.db'}")
    with one.session_scope(), two.session_scope():
        pass
    with one.session_scope():
        pass
    assert (one.get_stats()["session_count"], two.get_stats()["session_count"]) == (2, 1)


# -- pool status ------------------------------------------------------------------


def test_pool_status_queue_pool(db_url: str) -> None:
    manager = SessionManager(db_url, pool_size=3, max_overflow=2)
    try:
        assert manager.get_stats()["pool"] == {}  # no engine yet: nothing created for it
        with manager.session_scope() as s:
            s.execute(select(1))
            inside = manager.get_stats()["pool"]["sync"]
        after = manager.get_stats()["pool"]["sync"]
    finally:
        manager.dispose()
    assert inside["pool_class"] == "QueuePool"
    assert (inside["size"], inside["checked_out"], inside["checked_in"]) == (3, 1, 0)
    assert (after["checked_out"], after["checked_in"]) == (0, 1)
    assert inside["overflow"] == -2  # SQLAlchemy's figure: one of three connections made


async def test_pool_status_async_engine(amgr: SessionManager) -> None:
    async with amgr.async_session_scope() as s:
        await s.execute(select(1))
        inside = amgr.get_stats()["pool"]["async"]
    after = amgr.get_stats()["pool"]["async"]
    assert (inside["checked_out"], after["checked_out"]) == (1, 0)


@pytest.mark.parametrize(
    ("url", "poolclass"),
    [
        ("sqlite://", pool.StaticPool),
        ("sqlite://", pool.SingletonThreadPool),
        ("sqlite:///{tmp}/null.db", pool.NullPool),
        ("sqlite:///{tmp}/assert.db", pool.AssertionPool),
    ],
)
def test_pool_status_degrades_for_pools_without_figures(
    url: str, poolclass: type[pool.Pool], tmp_path: Path
) -> None:
    engine = create_engine(url.format(tmp=tmp_path), poolclass=poolclass)
    manager = SessionManager(engine=engine)
    try:
        with manager.session_scope() as s:
            s.execute(text("SELECT 1"))
            status = manager.get_stats()["pool"]
    finally:
        engine.dispose()
    assert status["sync"]["pool_class"] == poolclass.__name__
    assert set(status["sync"]) <= {"pool_class", "size", "checked_in", "checked_out", "overflow"}


def test_pool_timeout_counted_and_holder_named(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The outer scope holds the only connection; a ``requires_new`` scope inside
    it cannot get one. The pool timeout is counted and the long-held warning
    names the ``with`` line that holds the pool."""
    caplog.set_level(logging.WARNING, logger="sessionscope")
    manager = SessionManager(
        db_url,
        config=SessionConfig(long_session_warning=0.05),
        pool_size=1,
        max_overflow=0,
        pool_timeout=0.3,
    )
    try:
        with manager.session_scope() as s:  # the holder
            holder_line = inspect.currentframe().f_lineno - 1  # type: ignore[union-attr]
            s.execute(select(1))
            with pytest.raises(PoolExhaustedError) as info:
                with manager.session_scope(
                    propagation="requires_new", long_session_warning=None
                ) as inner:
                    inner.execute(select(1))
    finally:
        manager.dispose()
    assert "checked_out=1" in str(info.value)
    stats = manager.get_stats()
    assert (stats["pool_timeouts"], stats["long_held_sessions"]) == (1, 1)
    warnings = [r.getMessage() for r in caplog.records if "long-held" in r.getMessage()]
    assert len(warnings) == 1
    assert f'{__file__}", line {holder_line}, in test_pool_timeout_counted' in warnings[0]


# -- long-held sessions -------------------------------------------------------------


def _long_held(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith("long-held session")]


def test_long_held_warning_once_with_the_with_line(
    mgr: SessionManager, caplog: pytest.LogCaptureFixture
) -> None:
    """A threshold of 0 makes every watched session overdue at once, so no test
    waits on a clock: the warning comes at the next scope activity."""
    caplog.set_level(logging.WARNING, logger="sessionscope")
    with mgr.session_scope(long_session_warning=0.0) as s:
        line = inspect.currentframe().f_lineno - 1  # type: ignore[union-attr]
        s.execute(select(1))
        for _ in range(3):  # later activity must not repeat the warning
            with mgr.session_scope(propagation="requires_new", long_session_warning=None):
                pass
    with mgr.session_scope(long_session_warning=3600.0):  # not overdue: never reported
        pass
    records = _long_held(caplog)
    assert len(records) == 1
    assert records[0].levelno == logging.WARNING
    assert f'File "{__file__}", line {line}, in test_long_held_warning_once' in (
        records[0].getMessage()
    )
    assert mgr.get_stats()["long_held_sessions"] == 1


def test_long_held_warning_names_the_decorated_function(
    mgr: SessionManager, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sessionscope")

    @mgr.with_session(long_session_warning=0.0)
    def holder(session: Session) -> None:
        session.execute(select(1))

    holder()
    records = _long_held(caplog)
    assert len(records) == 1
    assert f"decorated function {__name__}.{holder.__qualname__}" in records[0].getMessage()


async def test_long_held_warning_async_points_at_async_with(
    amgr: SessionManager, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sessionscope")
    async with amgr.async_session_scope(long_session_warning=0.0) as s:
        line = inspect.currentframe().f_lineno - 1  # type: ignore[union-attr]
        await s.execute(select(1))
    records = _long_held(caplog)
    assert len(records) == 1
    assert f'line {line}, in test_long_held_warning_async' in records[0].getMessage()


def test_long_held_watch_survives_reset_and_closed_sessions_leave_it(
    mgr: SessionManager, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sessionscope")
    for _ in range(5):
        with mgr.session_scope(long_session_warning=3600.0):
            pass
    assert mgr.stats._held == {}  # closed sessions are no longer watched
    with mgr.session_scope(long_session_warning=3600.0):
        mgr.reset_stats()
        assert len(mgr.stats._held) == 1
    assert mgr.stats._held == {}
    assert _long_held(caplog) == []


def test_long_held_check_costs_nothing_until_a_deadline(mgr: SessionManager) -> None:
    with mgr.session_scope(long_session_warning=3600.0):
        deadline = mgr.stats.next_deadline
    assert deadline != float("inf")
    assert mgr.stats.next_deadline == deadline  # stale is fine: rechecked once due
    assert mgr.stats.overdue(deadline + 1.0) == []
    # Nothing is watched now; a session opened from now on is due a threshold
    # later at the earliest.
    assert mgr.stats.next_deadline == deadline + 1.0 + 3600.0


def test_long_held_reported_by_activity_in_another_thread(
    mgr: SessionManager, caplog: pytest.LogCaptureFixture
) -> None:
    """Another thread's scope activity reports a session held in this one."""
    caplog.set_level(logging.WARNING, logger="sessionscope")
    opened = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with mgr.session_scope(long_session_warning=0.0) as s:
            s.execute(select(1))
            opened.set()
            release.wait(30)

    worker = threading.Thread(target=hold)
    worker.start()
    try:
        assert opened.wait(30)
        with mgr.session_scope(long_session_warning=None):
            pass
    finally:
        release.set()
        worker.join()
    records = _long_held(caplog)
    assert len(records) == 1
    assert "in hold" in records[0].getMessage()


def test_snapshot_of_an_idle_stats_object() -> None:
    stats = sessionscope.SessionManager("sqlite://").get_stats()
    assert stats["success_rate"] == 100.0
    assert (stats["avg_duration"], stats["p95_duration"], stats["max_duration"]) == (0.0,) * 3


def test_failed_statement_counts_and_session_is_closed(mgr: SessionManager) -> None:
    with pytest.raises(DBAPIError), mgr.session_scope() as s:
        s.execute(text("SELECT * FROM no_such_table"))
    stats = mgr.get_stats()
    assert (stats["failed_transactions"], stats["active_sessions"]) == (1, 0)
    assert stats["pool"]["sync"]["checked_out"] == 0


async def test_async_cancellation_counted(amgr: SessionManager) -> None:
    started = asyncio.Event()

    async def hold() -> None:
        session: AsyncSession
        async with amgr.async_session_scope() as session:
            await session.execute(select(1))
            started.set()
            await asyncio.Event().wait()

    task = asyncio.ensure_future(hold())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    stats = amgr.get_stats()
    assert (stats["cancellations"], stats["failed_transactions"], stats["active_sessions"]) == (
        1,
        1,
        0,
    )
    assert stats["pool"]["async"]["checked_out"] == 0
