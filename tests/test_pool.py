"""Pool exhaustion: a checkout timeout surfaces as :class:`PoolExhaustedError`
naming the pool state, is never retried, and the pool recovers once the holders
are done. Real pools (``QueuePool`` / ``AsyncAdaptedQueuePool``) on SQLite,
PostgreSQL and MariaDB: size 2, no overflow, 0.2 s timeout, three concurrent
holders.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from sessionscope import PoolExhaustedError, SessionConfig, SessionManager, is_transient

from .conftest import backend_url, reset_schema
from .faults import await_for, wait_for

POOL = {"pool_size": 2, "max_overflow": 0, "pool_timeout": 0.2}


@pytest.fixture
def manager(db_url: str) -> Iterator[SessionManager]:
    manager = SessionManager(
        db_url,
        # A predicate that calls everything transient: exhaustion is still not retried.
        config=SessionConfig(retry_delay=0.001, retry_predicate=lambda exc: True),
        **POOL,
    )
    reset_schema(manager.engine)
    manager.reset_stats()
    yield manager
    manager.dispose()


def check_message(err: PoolExhaustedError, side: str) -> None:
    message = str(err)
    for part in (
        f"{side}_size=2",
        f"{side}_checked_out=2",
        f"{side}_overflow=0",
        f"{side}_timeout=0.2",
        "pool_size",
        "max_overflow",
    ):
        assert part in message, message
    other = "sync" if side == "async" else "async"
    assert not re.search(rf"\b{other}_size", message), "only the pool that ran dry is named"
    assert isinstance(err.__cause__, sa_exc.TimeoutError)
    assert not is_transient(err)


def test_third_holder_gets_pool_exhausted_sync(manager: SessionManager) -> None:
    release = threading.Event()
    holding = threading.Semaphore(0)
    calls: list[str] = []

    @manager.with_session
    def hold(session: Session, who: str) -> int:
        calls.append(who)
        value = int(session.scalar(select(1)) or 0)  # checks a connection out
        if who != "third":
            holding.release()
            assert release.wait(30)
        return value

    with ThreadPoolExecutor(2) as pool:
        holders = [pool.submit(hold, "first"), pool.submit(hold, "second")]
        for _ in holders:
            assert holding.acquire(timeout=30)
        with pytest.raises(PoolExhaustedError) as caught:
            hold("third")
        released = time.perf_counter()
        release.set()
        assert [h.result() for h in holders] == [1, 1]
    check_message(caught.value, "sync")
    assert calls.count("third") == 1, "never retried"
    assert manager.get_stats()["retries"] == 0
    assert hold("after") == 1  # recovered
    recovered = time.perf_counter() - released
    assert manager.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert manager.get_stats()["active_sessions"] == 0
    print(f"\npool recovered (sync) {recovered * 1000:.1f} ms after the holders were released")


async def test_third_holder_gets_pool_exhausted_async(manager: SessionManager) -> None:
    release = asyncio.Event()
    holding: list[str] = []
    calls: list[str] = []

    @manager.async_with_session
    async def hold(session: AsyncSession, who: str) -> int:
        calls.append(who)
        value = int(await session.scalar(select(1)) or 0)
        if who != "third":
            holding.append(who)
            await release.wait()
        return value

    try:
        holders = [asyncio.create_task(hold("first")), asyncio.create_task(hold("second"))]
        await await_for(lambda: len(holding) == 2, "two holders")
        with pytest.raises(PoolExhaustedError) as caught:
            await hold("third")
        released = time.perf_counter()
        release.set()
        assert await asyncio.gather(*holders) == [1, 1]
        check_message(caught.value, "async")
        assert calls.count("third") == 1, "never retried"
        assert manager.get_stats()["retries"] == 0
        assert await hold("after") == 1
        recovered = time.perf_counter() - released
        pool: Any = manager.async_engine.sync_engine.pool
        assert pool.checkedout() == 0
        assert manager.get_stats()["active_sessions"] == 0
        print(f"\npool recovered (async) {recovered * 1000:.1f} ms after the holders were released")
    finally:
        await manager.adispose()


def test_pool_exhausted_inside_with_retry_is_not_retried(manager: SessionManager) -> None:
    release = threading.Event()
    holding = threading.Semaphore(0)

    def hold() -> None:
        with manager.session_scope() as s:
            s.scalar(select(1))
            holding.release()
            assert release.wait(30)

    calls: list[int] = []

    def job() -> None:
        calls.append(1)
        with manager.session_scope() as s:
            s.scalar(select(1))

    with ThreadPoolExecutor(2) as pool:
        holders = [pool.submit(hold), pool.submit(hold)]
        for _ in holders:
            assert holding.acquire(timeout=30)
        try:
            with pytest.raises(PoolExhaustedError):
                manager.with_retry(job, max_retries=5)
        finally:
            release.set()
    assert calls == [1]
    wait_for(lambda: manager.engine.pool.checkedout() == 0, "the pool to drain")  # type: ignore[attr-defined]


async def test_cancelled_checkout_waiter_leaks_nothing(tmp_path: Path, backend: str) -> None:
    """A task cancelled while it waits for a connection from a full pool."""
    manager = SessionManager(
        backend_url(backend, tmp_path),
        config=SessionConfig(retry_delay=0.001),
        pool_size=1,
        max_overflow=0,
        pool_timeout=30,
    )
    reset_schema(manager.engine)
    release = asyncio.Event()
    holding: list[int] = []
    waiting: list[int] = []

    @manager.async_with_session
    async def hold(session: AsyncSession) -> None:
        await session.scalar(select(1))
        holding.append(1)
        await release.wait()

    @manager.async_with_session
    async def wait_for_connection(session: AsyncSession) -> None:
        waiting.append(1)
        await session.scalar(select(1))

    try:
        holder = asyncio.create_task(hold())
        await await_for(lambda: holding, "the holder")
        waiter = asyncio.create_task(wait_for_connection())
        await await_for(lambda: waiting, "the waiter")
        await asyncio.sleep(0.05)  # let it block inside the pool's checkout
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        release.set()
        await holder
        pool: Any = manager.async_engine.sync_engine.pool
        assert pool.checkedout() == 0
        stats = manager.get_stats()
        assert stats["active_sessions"] == 0 and stats["cancellations"] == 1
        await wait_for_connection()  # the pool still serves
    finally:
        await manager.adispose()
