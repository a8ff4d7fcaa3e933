"""Time to acquire a pooled connection: its own figures and histogram, kept out of
the slow-transaction threshold, and slow-transaction warnings rate-limited."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select, text

from sessionscope import SessionManager, _poolwait
from sessionscope._stats import POOL_WAIT_BUCKETS, SLOW_LOG_INTERVAL, Stats

from .conftest import reset_schema
from .models import User


@pytest.fixture
def mgr(db_url: str) -> Iterator[SessionManager]:
    manager = SessionManager(db_url, pool_size=1, max_overflow=0, pool_timeout=30)
    reset_schema(manager.engine)
    manager.reset_stats()
    yield manager
    manager.dispose()


def _checkouts(engine: Any) -> list[int]:
    seen: list[int] = []
    event.listen(engine, "checkout", lambda *args: seen.append(1))
    return seen


def test_each_checkout_is_one_acquisition_in_the_histogram(mgr: SessionManager) -> None:
    checkouts = _checkouts(mgr.engine)
    before = sum(mgr.stats.totals()["pool_wait_buckets"])  # reset_schema's checkouts
    for _ in range(3):
        with mgr.session_scope() as s:
            s.execute(select(User))
    with mgr.session_scope():
        pass  # no statement, no connection
    stats = mgr.get_stats()
    assert stats["pool_acquisitions"] == len(checkouts) == 3
    totals = mgr.stats.totals()
    assert sum(totals["pool_wait_buckets"]) - before == 3
    assert len(totals["pool_wait_buckets"]) == len(POOL_WAIT_BUCKETS) + 1
    assert 0.0 < stats["avg_pool_wait"] <= stats["max_pool_wait"]
    assert stats["p95_pool_wait"] <= stats["max_pool_wait"]


def test_queued_checkout_is_measured_under_real_contention(mgr: SessionManager) -> None:
    """Two threads on a pool of one: the second queues until the first is done;
    its checkout is counted once, and it is the one the thread reads back."""
    holding = threading.Event()
    seen_in_scope: list[float] = []
    errors: list[BaseException] = []

    def second() -> None:
        try:
            holding.wait(10)
            before = _poolwait.waited()
            with mgr.session_scope() as s:
                s.execute(select(User))
                seen_in_scope.append(_poolwait.waited() - before)
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    thread = threading.Thread(target=second)
    thread.start()
    with mgr.session_scope() as s:
        s.execute(select(User))
        holding.set()
        time.sleep(0.2)  # let the second thread reach the pool and queue
    thread.join(30)
    assert not errors
    stats = mgr.get_stats()
    assert stats["pool_acquisitions"] == 2
    assert stats["pool"]["sync"]["checked_out"] == 0
    # What the second thread's scope leaves out of its duration is the wait the
    # figures hold (a difference of two readings: equal to rounding).
    assert seen_in_scope[0] == pytest.approx(stats["max_pool_wait"])
    assert stats["max_pool_wait"] > 0.0


async def test_async_checkout_is_seen_by_its_task(db_url: str) -> None:
    manager = SessionManager(db_url, pool_size=1, max_overflow=0)
    try:
        reset_schema(manager.engine)
        manager.reset_stats()
        seen: list[float] = []

        async def one() -> None:
            before = _poolwait.waited()
            async with manager.async_session_scope() as s:
                await s.execute(select(User))
                seen.append(_poolwait.waited() - before)

        await asyncio.gather(one(), one(), one())
        stats = manager.get_stats()
        assert stats["pool_acquisitions"] == len(manager.stats.pool_waits) == 3
        # Each task reads its own checkout (made in SQLAlchemy's greenlet), not
        # another task's.
        assert sorted(seen) == pytest.approx(sorted(manager.stats.pool_waits))
    finally:
        await manager.adispose()


def test_pools_that_never_queue_are_not_measured(tmp_path: Path) -> None:
    manager = SessionManager("sqlite://")  # in memory: SingletonThreadPool
    try:
        with manager.session_scope() as s:
            s.execute(text("SELECT 1"))
        assert manager.get_stats()["pool_acquisitions"] == 0
    finally:
        manager.dispose()


def test_measurement_survives_dispose(mgr: SessionManager) -> None:
    with mgr.session_scope() as s:
        s.execute(select(User))
    mgr.dispose()  # SQLAlchemy recreates the pool from its class
    with mgr.session_scope() as s:
        s.execute(select(User))
    assert mgr.get_stats()["pool_acquisitions"] == 2


def test_two_managers_on_one_engine_both_see_its_pool(mgr: SessionManager) -> None:
    other = SessionManager(engine=mgr.engine)
    with other.session_scope() as s:
        s.execute(select(User))
    assert other.get_stats()["pool_acquisitions"] == 1
    assert mgr.get_stats()["pool_acquisitions"] == 1


def test_reset_zeroes_the_pool_wait_figures_but_not_the_exported_totals(
    mgr: SessionManager,
) -> None:
    before = mgr.stats.totals()["pool_acquisitions"]
    with mgr.session_scope() as s:
        s.execute(select(User))
    mgr.reset_stats()
    stats = mgr.get_stats()
    assert (stats["pool_acquisitions"], stats["max_pool_wait"], stats["p95_pool_wait"]) == (
        0, 0.0, 0.0,
    )
    assert mgr.stats.totals()["pool_acquisitions"] - before == 1


def test_pool_wait_does_not_count_towards_the_slow_threshold() -> None:
    stats = Stats()
    for _ in range(2):
        stats.session_opened()
    assert not stats.transaction_ended(
        committed=True, failed=False, duration=2.0, slow_threshold=1.0, function=None,
        pool_wait=1.5,
    )
    assert stats.transaction_ended(
        committed=True, failed=False, duration=2.0, slow_threshold=1.0, function=None,
        pool_wait=0.5,
    )
    assert stats.snapshot()["slow_transactions"] == 1


def test_slow_warnings_are_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    stats = Stats()
    caplog.set_level(logging.WARNING, logger="sessionscope")
    stats.warn_slow("app.first", 2.0, 0.25, 1.0, now=100.0)
    for i in range(5):
        stats.warn_slow(f"app.quiet{i}", 1.5 + i, 0.0, 1.0, now=101.0 + i)
    assert len(caplog.records) == 1
    first = caplog.records[0].getMessage()
    assert "app.first took 2.000 s, waiting for a pooled connection 0.250 s" in first
    stats.warn_slow("app.next", 3.0, 0.0, 1.0, now=100.0 + SLOW_LOG_INTERVAL)
    messages = [r.getMessage() for r in caplog.records[1:]]
    assert len(messages) == 2
    assert messages[0].startswith("5 more slow transaction(s) not logged one by one")
    assert "slowest: app.quiet4, 5.500 s" in messages[0]
    assert "app.next took 3.000 s" in messages[1]


def _slow_checkouts(monkeypatch: pytest.MonkeyPatch, engine: Any, seconds: float) -> None:
    """Make every checkout of ``engine`` take ``seconds`` on the clock sessionscope
    reads, without sleeping: a checkout listener (inside the timed checkout)
    moves the clock on."""
    offset = [0.0]
    real = time.perf_counter

    def clock() -> float:
        return real() + offset[0]

    def _advance(*args: Any) -> None:
        offset[0] += seconds

    monkeypatch.setattr(time, "perf_counter", clock)
    monkeypatch.setattr(_poolwait, "perf_counter", clock)
    event.listen(engine, "checkout", _advance)


def test_scope_waiting_for_the_pool_is_not_slow(
    mgr: SessionManager, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    mgr.configure(slow_threshold=5.0)
    _slow_checkouts(monkeypatch, mgr.engine, 10.0)
    caplog.set_level(logging.WARNING, logger="sessionscope")
    with mgr.session_scope() as s:
        s.execute(select(User))
    stats = mgr.get_stats()
    assert stats["max_pool_wait"] >= 10.0
    assert stats["max_duration"] >= 10.0  # the scope's whole time is still reported
    assert stats["slow_transactions"] == 0
    assert not [r for r in caplog.records if "slow transaction" in r.getMessage()]


def test_scope_slow_on_its_own_is_still_slow(
    mgr: SessionManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    mgr.configure(slow_threshold=5.0)
    _slow_checkouts(monkeypatch, mgr.engine, 0.0)
    with mgr.session_scope(slow_threshold=0.0) as s:
        s.execute(select(User))
    assert mgr.get_stats()["slow_transactions"] == 1


def test_scope_ending_in_another_thread_is_not_slow_by_a_wait_it_never_had(
    mgr: SessionManager,
) -> None:
    """A generator's scope opened in a thread that had queued for the pool and
    ended in a fresh thread: the two threads' pool-wait totals are not one
    running figure, so their difference is no wait of this scope, and a
    transaction of milliseconds is not counted as slow."""
    holding = threading.Event()

    def hog() -> None:
        with mgr.session_scope() as s:
            s.execute(select(User))
            holding.set()
            time.sleep(0.6)

    def rows() -> Iterator[int]:
        with mgr.session_scope(slow_threshold=0.3) as s:
            s.execute(select(User))
            yield 1
            s.execute(select(User))
            yield 2

    gen = rows()

    def opener() -> None:
        with mgr.session_scope() as s:  # queues about 0.6 s for the pool of one
            s.execute(select(User))
        next(gen)  # the generator's scope opens here

    hogger = threading.Thread(target=hog)
    hogger.start()
    holding.wait(10)
    first = threading.Thread(target=opener)
    first.start()
    first.join(30)
    hogger.join(30)
    assert mgr.get_stats()["max_pool_wait"] > 0.3  # the opener really queued
    before = mgr.get_stats()["slow_transactions"]
    started = time.perf_counter()
    closer = threading.Thread(target=lambda: list(gen))
    closer.start()
    closer.join(30)
    assert time.perf_counter() - started < 0.3  # the scope's own work is quick
    assert mgr.get_stats()["slow_transactions"] == before
    assert mgr.get_stats()["active_sessions"] == 0
