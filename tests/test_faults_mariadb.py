"""MariaDB faults: deadlocks under concurrency (rows locked in opposite orders),
lock wait timeouts (1205), and a connection lost at COMMIT (PyMySQL and
aiomysql)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import event, select, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from sessionscope import CommitOutcomeUnknownError, SessionConfig, SessionManager
from sessionscope._retry import error_code, is_disconnect

from .conftest import require_server, reset_schema
from .faults import Server, wait_for
from .models import Counter, User

WORKERS = 8
INCREMENTS = 25


@pytest.fixture
def maria() -> Iterator[tuple[SessionManager, Server]]:
    url = require_server("mariadb")
    manager = SessionManager(
        url, config=SessionConfig(retry_attempts=100, retry_delay=0.001, retry_max_delay=0.02)
    )
    reset_schema(manager.engine)
    with manager.session_scope() as s:
        s.add_all([Counter(id=1, value=0), Counter(id=2, value=0)])
    manager.reset_stats()
    admin = Server("mariadb", url)
    yield manager, admin
    admin.dispose()
    manager.dispose()


def values(manager: SessionManager) -> list[int]:
    with manager.session_scope() as s:
        return list(s.scalars(select(Counter.value).order_by(Counter.id)))


def bump(row: int) -> Any:
    return update(Counter).where(Counter.id == row).values(value=Counter.value + 1)


def check_figures(manager: SessionManager, attempts: list[int], report: str) -> None:
    stats = manager.get_stats()  # before the read below, which is a transaction too
    assert values(manager) == [WORKERS * INCREMENTS, WORKERS * INCREMENTS]
    retries = stats["retries"]
    assert len(attempts) == WORKERS * INCREMENTS
    assert sum(attempts) - len(attempts) == retries
    assert stats["committed_transactions"] == WORKERS * INCREMENTS
    assert stats["failed_transactions"] == retries, "each failed attempt was retried"
    assert set(stats["retry_errors"]) <= {"OperationalError"}
    assert stats["active_sessions"] == 0
    print(f"\n{report}: {retries} deadlocks retried for {len(attempts)} transfers, "
          f"max {max(attempts)} attempts for one")


def test_opposite_order_deadlocks_sync(maria: tuple[SessionManager, Server]) -> None:
    """8 threads x 25 transactions, each bumping rows 1 and 2, half of them in
    the opposite order: deadlocks (1213) are retried, both rows end at 200.
    (test_faults.py forces one deadlock deterministically with a barrier.)"""
    manager, _ = maria
    start = threading.Barrier(WORKERS, timeout=30)
    attempts: list[int] = []

    @manager.with_session
    def transfer(session: Session, order: tuple[int, int], tries: list[int]) -> None:
        tries[0] += 1
        session.execute(bump(order[0]))
        session.execute(bump(order[1]))

    def worker(n: int) -> None:
        order = (1, 2) if n % 2 else (2, 1)
        start.wait()
        for _ in range(INCREMENTS):
            tries = [0]
            transfer(order, tries)
            attempts.append(tries[0])

    started = time.perf_counter()
    with ThreadPoolExecutor(WORKERS) as pool:
        for future in [pool.submit(worker, n) for n in range(WORKERS)]:
            future.result()
    check_figures(manager, attempts, f"deadlocks sync ({time.perf_counter() - started:.2f} s)")


async def test_opposite_order_deadlocks_async(maria: tuple[SessionManager, Server]) -> None:
    manager, _ = maria
    attempts: list[int] = []

    @manager.async_with_session
    async def transfer(session: AsyncSession, order: tuple[int, int], tries: list[int]) -> None:
        tries[0] += 1
        await session.execute(bump(order[0]))
        await asyncio.sleep(0)  # let the other tasks take their first row
        await session.execute(bump(order[1]))

    async def worker(n: int) -> None:
        order = (1, 2) if n % 2 else (2, 1)
        for _ in range(INCREMENTS):
            tries = [0]
            await transfer(order, tries)
            attempts.append(tries[0])

    try:
        started = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker(n) for n in range(WORKERS))), 120)
        elapsed = time.perf_counter() - started
        check_figures(manager, attempts, f"deadlocks async ({elapsed:.2f} s)")
    finally:
        await manager.adispose()


# -- lock wait timeout (1205) -----------------------------------------------------------


def test_lock_wait_timeout_is_retried_sync(maria: tuple[SessionManager, Server]) -> None:
    """Another transaction holds row 1; ``FOR UPDATE NOWAIT`` fails at once with
    1205 (MariaDB reports NOWAIT like a lock wait timeout). The retry finds the
    row free."""
    manager, _ = maria
    holder = manager.engine.connect()
    holder.begin()
    holder.execute(select(Counter).where(Counter.id == 1).with_for_update())
    errors: list[BaseException] = []

    @manager.with_session
    def take(session: Session) -> None:
        if errors:
            holder.rollback()
        try:
            session.execute(select(Counter).where(Counter.id == 1).with_for_update(nowait=True))
        except sa_exc.DBAPIError as err:
            errors.append(err)
            raise
        session.execute(bump(1))

    try:
        take()
    finally:
        holder.close()
    assert len(errors) == 1 and error_code(errors[0]) == "1205"
    assert values(manager) == [1, 0]
    assert manager.get_stats()["retries"] == 1


async def test_lock_wait_timeout_is_retried_async(maria: tuple[SessionManager, Server]) -> None:
    manager, _ = maria
    holder = manager.engine.connect()
    holder.begin()
    holder.execute(select(Counter).where(Counter.id == 1).with_for_update())
    errors: list[BaseException] = []

    @manager.async_with_session
    async def take(session: AsyncSession) -> None:
        if errors:
            holder.rollback()
        try:
            await session.execute(
                select(Counter).where(Counter.id == 1).with_for_update(nowait=True)
            )
        except sa_exc.DBAPIError as err:
            errors.append(err)
            raise
        await session.execute(bump(1))

    try:
        await take()
        assert len(errors) == 1 and error_code(errors[0]) == "1205"
        assert values(manager) == [1, 0]
        assert manager.get_stats()["retries"] == 1
    finally:
        holder.close()
        await manager.adispose()


# -- a connection lost at COMMIT -----------------------------------------------------------


def kill_at_commit(engine: Engine, admin: Server, ids: list[int]) -> None:
    """When the engine is about to send COMMIT (its ``commit`` event), kill the
    connection from the admin connection and wait until the server has dropped
    it: the client's COMMIT then meets a lost connection. MariaDB has no
    deferred triggers that could hold a COMMIT open, so this is the real
    disconnect the test can time exactly."""

    def _commit(conn: Any) -> None:
        if ids and len(ids) == 1:
            admin.kill(ids[0])
            wait_for(lambda: not admin.mariadb_threads(ids), "the server to drop the connection")
            ids.append(-1)  # once

    event.listen(engine, "commit", _commit)


def test_disconnect_at_commit_is_outcome_unknown_sync(
    maria: tuple[SessionManager, Server],
) -> None:
    manager, admin = maria
    ids: list[int] = []
    calls: list[int] = []
    kill_at_commit(manager.engine, admin, ids)

    @manager.with_session
    def add(session: Session) -> None:
        calls.append(1)
        ids.append(session.scalar(admin.id_sql))
        session.add(User(name="maybe"))

    with pytest.raises(CommitOutcomeUnknownError) as caught:
        add()
    assert calls == [1], "never retried"
    cause = caught.value.__cause__
    assert isinstance(cause, sa_exc.DBAPIError) and is_disconnect(cause)
    assert error_code(cause) in ("2006", "2013")
    stats = manager.get_stats()
    assert stats["retries"] == 0 and stats["active_sessions"] == 0
    assert manager.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    with manager.session_scope() as s:
        assert list(s.scalars(select(User.name))) == []  # killed before it committed


async def test_disconnect_at_commit_is_outcome_unknown_async(
    maria: tuple[SessionManager, Server],
) -> None:
    manager, admin = maria
    ids: list[int] = []
    calls: list[int] = []
    kill_at_commit(manager.async_engine.sync_engine, admin, ids)

    @manager.async_with_session
    async def add(session: AsyncSession) -> None:
        calls.append(1)
        ids.append(await session.scalar(admin.id_sql))
        session.add(User(name="maybe"))

    try:
        with pytest.raises(CommitOutcomeUnknownError) as caught:
            await add()
        assert calls == [1]
        cause = caught.value.__cause__
        assert isinstance(cause, sa_exc.DBAPIError) and is_disconnect(cause)
        stats = manager.get_stats()
        assert stats["retries"] == 0 and stats["active_sessions"] == 0
        assert manager.async_engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        with manager.session_scope() as s:
            assert list(s.scalars(select(User.name))) == []
    finally:
        await manager.adispose()


def test_deadlock_victim_code(maria: tuple[SessionManager, Server]) -> None:
    """A forced deadlock's victim error carries 1213 (the retry's trigger)."""
    manager, _ = maria
    barrier = threading.Barrier(2, timeout=30)
    codes: list[str | None] = []

    def lock(first: int, second: int) -> None:
        with manager.engine.begin() as conn:
            conn.execute(bump(first))
            barrier.wait()
            try:
                conn.execute(bump(second))
            except sa_exc.DBAPIError as err:
                codes.append(error_code(err))
                raise

    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(lock, 1, 2), pool.submit(lock, 2, 1)]
        failures = [f.exception() for f in futures]
    assert codes == ["1213"]
    assert sum(f is not None for f in failures) == 1
