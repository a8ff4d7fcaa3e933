"""PostgreSQL faults: SERIALIZABLE conflicts under concurrency, and a connection
lost while COMMIT is in flight (psycopg and asyncpg)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import select, text, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from sessionscope import CommitOutcomeUnknownError, SessionConfig, SessionManager
from sessionscope._retry import is_disconnect

from .conftest import require_server, reset_schema
from .faults import (
    AsyncBarrier,
    Server,
    create_slow_commit_table,
    drop_slow_commit_table,
    in_commit,
    wait_for,
)
from .models import Counter

WORKERS = 8
INCREMENTS = 25


@pytest.fixture
def pg() -> Iterator[tuple[SessionManager, Server]]:
    url = require_server("postgresql")
    manager = SessionManager(
        url,
        # Under 8-way contention only one of the colliding attempts wins each
        # round, so a unit may lose many rounds in a row: allow many retries.
        config=SessionConfig(retry_attempts=200, retry_delay=0.001, retry_max_delay=0.02),
    )
    reset_schema(manager.engine)
    with manager.session_scope() as s:
        s.add(Counter(id=1, value=0))
    manager.reset_stats()
    admin = Server("postgresql", url)
    yield manager, admin
    admin.dispose()
    manager.dispose()


def counter_value(manager: SessionManager) -> int:
    with manager.session_scope() as s:
        return int(s.scalar(select(Counter.value).where(Counter.id == 1)) or 0)


def check_conflict_figures(
    manager: SessionManager, attempts: list[int], report: str
) -> dict[str, Any]:
    """The figures every conflict test asserts: 200 units, each committed once;
    every failed attempt was retried, none gave up; the counter is exactly 200."""
    stats = manager.get_stats()  # before the read below, which is a transaction too
    assert counter_value(manager) == WORKERS * INCREMENTS
    retries = stats["retries"]
    assert len(attempts) == WORKERS * INCREMENTS
    assert sum(attempts) - len(attempts) == retries
    assert stats["committed_transactions"] == WORKERS * INCREMENTS
    assert stats["failed_transactions"] == retries, "each failed attempt was retried"
    assert stats["active_sessions"] == 0
    # The barrier makes the first round collide: at least WORKERS - 1 losers.
    assert retries >= WORKERS - 1
    print(f"\n{report}: {retries} retries for {len(attempts)} increments, "
          f"max {max(attempts)} attempts for one increment, {stats['retry_errors']}")
    return stats


def test_serializable_counter_sync(pg: tuple[SessionManager, Server]) -> None:
    """8 threads x 25 read-then-write increments of one row under SERIALIZABLE:
    exactly 200, every conflict (40001) retried, no unit failed."""
    manager, _ = pg
    barrier = threading.Barrier(WORKERS, timeout=30)
    attempts: list[int] = []

    @manager.with_session(isolation_level="SERIALIZABLE")
    def increment(session: Session, tries: list[int], first: bool) -> None:
        tries[0] += 1
        value = session.scalar(select(Counter.value).where(Counter.id == 1))
        if first and tries[0] == 1:
            barrier.wait()  # all 8 have read the same value: 7 must lose
        session.execute(update(Counter).where(Counter.id == 1).values(value=value + 1))

    def worker() -> None:
        for i in range(INCREMENTS):
            tries = [0]
            increment(tries, i == 0)
            attempts.append(tries[0])

    started = time.perf_counter()
    with ThreadPoolExecutor(WORKERS) as pool:
        for future in [pool.submit(worker) for _ in range(WORKERS)]:
            future.result()
    elapsed = time.perf_counter() - started
    check_conflict_figures(manager, attempts, f"serializable sync ({elapsed:.2f} s)")


async def test_serializable_counter_async(pg: tuple[SessionManager, Server]) -> None:
    manager, _ = pg
    barrier = AsyncBarrier(WORKERS)
    attempts: list[int] = []

    @manager.async_with_session(isolation_level="SERIALIZABLE")
    async def increment(session: AsyncSession, tries: list[int], first: bool) -> None:
        tries[0] += 1
        value = await session.scalar(select(Counter.value).where(Counter.id == 1))
        if first and tries[0] == 1:
            await barrier.wait()
        await session.execute(update(Counter).where(Counter.id == 1).values(value=value + 1))

    async def worker() -> None:
        for i in range(INCREMENTS):
            tries = [0]
            await increment(tries, i == 0)
            attempts.append(tries[0])

    try:
        started = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(WORKERS))), 120)
        elapsed = time.perf_counter() - started
        check_conflict_figures(manager, attempts, f"serializable async ({elapsed:.2f} s)")
        pool = manager.async_engine.sync_engine.pool
        assert pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        await manager.adispose()


# -- a connection lost while COMMIT is in flight ------------------------------------

@pytest.fixture
def slow_commit(pg: tuple[SessionManager, Server]) -> Iterator[tuple[SessionManager, Server]]:
    manager, admin = pg
    create_slow_commit_table(admin)
    yield manager, admin
    drop_slow_commit_table(admin)


def kill_inside_commit(admin: Server, pids: list[int]) -> threading.Thread:
    """Terminate the backend once pg_stat_activity shows it running COMMIT and
    sleeping in the deferred trigger: the connection is lost mid-COMMIT."""

    def run() -> None:
        wait_for(lambda: bool(pids) and in_commit(admin, pids[0]), "the backend inside COMMIT")
        admin.kill(pids[0])

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def slow_rows(admin: Server) -> int:
    with admin.engine.connect() as conn:
        return int(conn.exec_driver_sql("SELECT count(*) FROM ss_slow_commit").scalar_one())


def test_disconnect_during_commit_is_outcome_unknown_sync(
    slow_commit: tuple[SessionManager, Server],
) -> None:
    """How the connection is lost during COMMIT: the inserted row fires a
    deferred constraint trigger that sleeps inside COMMIT; a watcher thread sees
    the backend's query is COMMIT and its wait event PgSleep, and terminates that
    backend (pg_terminate_backend). The client's COMMIT fails with a disconnect."""
    manager, admin = slow_commit
    pids: list[int] = []
    calls: list[int] = []

    @manager.with_session
    def insert(session: Session) -> None:
        calls.append(1)
        pids.append(session.scalar(admin.id_sql))
        session.execute(text("INSERT INTO ss_slow_commit VALUES (1)"))

    killer = kill_inside_commit(admin, pids)
    with pytest.raises(CommitOutcomeUnknownError) as caught:
        insert()
    killer.join()
    assert calls == [1], "never retried"
    cause = caught.value.__cause__
    assert isinstance(cause, sa_exc.DBAPIError) and is_disconnect(cause)
    assert "57P01" in str(caught.value) or "Error" in str(caught.value)
    stats = manager.get_stats()
    assert stats["retries"] == 0
    assert stats["active_sessions"] == 0
    assert manager.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    # Here the server died before writing the commit record, so nothing landed;
    # the client could not know that, hence the error.
    assert slow_rows(admin) == 0


async def test_disconnect_during_commit_is_outcome_unknown_async(
    slow_commit: tuple[SessionManager, Server],
) -> None:
    """The same as the sync test (deferred trigger sleeping inside COMMIT, backend
    terminated from a watcher thread), through asyncpg."""
    manager, admin = slow_commit
    pids: list[int] = []
    calls: list[int] = []

    @manager.async_with_session
    async def insert(session: AsyncSession) -> None:
        calls.append(1)
        pids.append(await session.scalar(admin.id_sql))
        await session.execute(text("INSERT INTO ss_slow_commit VALUES (1)"))

    try:
        killer = kill_inside_commit(admin, pids)
        with pytest.raises(CommitOutcomeUnknownError) as caught:
            await insert()
        await asyncio.to_thread(killer.join)
        assert calls == [1], "never retried"
        cause = caught.value.__cause__
        assert isinstance(cause, sa_exc.DBAPIError) and is_disconnect(cause)
        stats = manager.get_stats()
        assert stats["retries"] == 0
        assert stats["active_sessions"] == 0
        assert manager.async_engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        assert slow_rows(admin) == 0
    finally:
        await manager.adispose()


def test_body_commit_lost_in_flight_is_outcome_unknown_sync(
    slow_commit: tuple[SessionManager, Server],
) -> None:
    """The body calls ``session.commit()`` itself and its connection is lost
    during that COMMIT: the unit is never re-run (it would insert twice), and
    the error says the outcome is unknown."""
    manager, admin = slow_commit
    pids: list[int] = []
    calls: list[int] = []

    @manager.with_session
    def insert(session: Session) -> None:
        calls.append(1)
        pids.append(session.scalar(admin.id_sql))
        session.execute(text("INSERT INTO ss_slow_commit VALUES (1)"))
        session.commit()  # the body's own COMMIT, cut off by the watcher

    killer = kill_inside_commit(admin, pids)
    with pytest.raises(CommitOutcomeUnknownError) as caught:
        insert()
    killer.join()
    assert calls == [1], "never retried"
    assert isinstance(caught.value.__cause__, sa_exc.DBAPIError)
    stats = manager.get_stats()
    assert stats["retries"] == 0
    assert stats["active_sessions"] == 0
    assert manager.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert slow_rows(admin) <= 1


async def test_body_commit_lost_in_flight_is_outcome_unknown_async(
    slow_commit: tuple[SessionManager, Server],
) -> None:
    """The same through asyncpg: ``await session.commit()`` in the body."""
    manager, admin = slow_commit
    pids: list[int] = []
    calls: list[int] = []

    @manager.async_with_session
    async def insert(session: AsyncSession) -> None:
        calls.append(1)
        pids.append(await session.scalar(admin.id_sql))
        await session.execute(text("INSERT INTO ss_slow_commit VALUES (1)"))
        await session.commit()

    try:
        killer = kill_inside_commit(admin, pids)
        with pytest.raises(CommitOutcomeUnknownError):
            await insert()
        await asyncio.to_thread(killer.join)
        assert calls == [1], "never retried"
        stats = manager.get_stats()
        assert stats["retries"] == 0
        assert stats["active_sessions"] == 0
        assert manager.async_engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        assert slow_rows(admin) <= 1
    finally:
        await manager.adispose()
