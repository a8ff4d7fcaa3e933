"""Exact statistics under concurrency: 16 threads and 1000 asyncio tasks, on
SQLite, PostgreSQL and MariaDB, with real inserts, failures, savepoints,
retries and real task cancellation. Every figure is asserted exactly."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from typing import Any

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from sessionscope import SessionConfig, SessionManager

from .conftest import reset_schema
from .models import User

THREADS = 16
ROUNDS = 12
TASKS = 1000


class Transient(Exception):
    pass


def _config() -> SessionConfig:
    return SessionConfig(
        retry_delay=0.0,
        retry_predicate=lambda e: isinstance(e, Transient),
        long_session_warning=600.0,
    )


def _sqlite_wal(manager: SessionManager) -> None:
    # Readers must not block writers for the held-open reads below (rollback
    # journal mode would make COMMIT wait for them).
    if manager.url.get_backend_name() == "sqlite":
        conn = sqlite3.connect(str(manager.url.database))
        try:
            conn.execute("PRAGMA journal_mode=WAL")
        finally:
            conn.close()


def test_exact_counts_under_16_threads(db_url: str) -> None:
    engine_options: dict[str, Any] = {"pool_size": THREADS, "max_overflow": 0}
    if db_url.startswith("sqlite"):
        engine_options["connect_args"] = {"timeout": 60}
    manager = SessionManager(db_url, config=_config(), **engine_options)
    reset_schema(manager.engine)
    _sqlite_wal(manager)
    manager.reset_stats()

    @manager.with_session
    def add(session: Session, name: str) -> None:
        session.add(User(name=name))

    @manager.with_session(propagation="nested")
    def add_nested(session: Session, name: str, fail: bool) -> None:
        session.add(User(name=name))
        session.flush()
        if fail:
            raise ValueError("contained by the savepoint")

    tries: dict[str, int] = {}

    @manager.with_session
    def flaky(session: Session, name: str) -> None:
        tries[name] = tries.get(name, 0) + 1
        session.add(User(name=f"{name}-{tries[name]}"))
        if tries[name] == 1:
            raise Transient

    barrier = threading.Barrier(THREADS)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            barrier.wait()
            for r in range(ROUNDS):
                tag = f"t{t}r{r}"
                add(f"{tag}-plain")  # committed
                try:
                    with manager.session_scope() as s:  # failed
                        s.add(User(name=f"{tag}-lost"))
                        s.flush()
                        raise KeyError(tag)
                except KeyError:
                    pass
                with manager.session_scope() as s:  # committed, 2 savepoints
                    s.add(User(name=f"{tag}-outer"))
                    add_nested(f"{tag}-kept", False)
                    try:
                        add_nested(f"{tag}-dropped", True)
                    except ValueError:
                        pass
                with manager.session_scope(auto_commit=False) as s:  # quiet rollback
                    s.add(User(name=f"{tag}-discarded"))
                flaky(tag)  # one retry: a failed attempt, then a commit
        except BaseException as err:  # reported below with the thread's failure
            errors.append(err)

    workers = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    try:
        assert errors == []
        n = THREADS * ROUNDS
        stats = manager.get_stats()
        buckets = manager.stats.totals()["buckets"]
        with manager.session_scope() as s:
            rows = s.scalar(select(func.count()).select_from(User))
    finally:
        manager.dispose()

    # Per round: plain, lost, outer, discarded, flaky x2 = 6 transactions.
    assert {
        k: stats[k]
        for k in (
            "session_count",
            "active_sessions",
            "total_transactions",
            "committed_transactions",
            "rolled_back_transactions",
            "failed_transactions",
            "retries",
            "savepoints",
            "savepoint_rollbacks",
            "cancellations",
        )
    } == {
        "session_count": 6 * n,
        "active_sessions": 0,
        "total_transactions": 6 * n,
        "committed_transactions": 3 * n,
        "rolled_back_transactions": 3 * n,
        "failed_transactions": 2 * n,
        "retries": n,
        "savepoints": 2 * n,
        "savepoint_rollbacks": n,
        "cancellations": 0,
    }
    assert stats["success_rate"] == pytest.approx(100.0 * 4 / 6)
    assert stats["retry_errors"] == {"Transient": n}
    functions = {name.rsplit(".", 1)[1]: f for name, f in stats["functions"].items()}
    assert {k: (f["calls"], f["failures"]) for k, f in functions.items()} == {
        "add": (n, 0),
        "add_nested": (2 * n, n),
        "flaky": (2 * n, n),
    }
    assert stats["pool"]["sync"]["checked_out"] == 0
    assert sum(buckets) == 6 * n
    # plain + outer + kept + the flaky retry's row, per round
    assert rows == 4 * n


async def test_exact_counts_under_1000_tasks(db_url: str) -> None:
    """1000 concurrent tasks: commits, failures, savepoints, and 100 tasks
    cancelled while inside their scope (10 of them holding a connection)."""
    engine_options: dict[str, Any] = {"pool_size": 20, "max_overflow": 0}
    if db_url.startswith("sqlite"):
        engine_options["connect_args"] = {"timeout": 60}
    manager = SessionManager(db_url, config=_config(), **engine_options)
    reset_schema(manager.engine)
    _sqlite_wal(manager)
    manager.dispose()
    manager.reset_stats()

    @manager.async_with_session
    async def add(session: AsyncSession, name: str) -> None:
        session.add(User(name=name))
        await asyncio.sleep(0)

    waiting = 0
    all_waiting = asyncio.Event()
    cancelled_group = [i for i in range(TASKS) if i % 10 == 3]

    async def work(i: int) -> None:
        nonlocal waiting
        kind = i % 10
        if kind == 3:  # cancelled inside the scope
            async with manager.async_session_scope() as s:
                if i < 100:  # the first ten hold a connection while they wait
                    await s.execute(text("SELECT 1"))
                waiting += 1
                if waiting == len(cancelled_group):
                    all_waiting.set()
                await asyncio.Event().wait()
        elif kind in (0, 5):  # failed
            async with manager.async_session_scope() as s:
                s.add(User(name=f"lost{i}"))
                await s.flush()
                raise KeyError(i)
        elif kind == 1:  # committed with a released and a rolled back savepoint
            async with manager.async_session_scope() as s:
                s.add(User(name=f"outer{i}"))
                async with manager.async_session_scope(propagation="nested") as n:
                    n.add(User(name=f"kept{i}"))
                try:
                    async with manager.async_session_scope(propagation="nested") as n:
                        n.add(User(name=f"dropped{i}"))
                        await n.flush()
                        raise ValueError
                except ValueError:
                    pass
        else:  # committed through a decorated function
            await add(f"plain{i}")

    tasks = [asyncio.ensure_future(work(i)) for i in range(TASKS)]
    others = [t for i, t in enumerate(tasks) if i % 10 != 3]
    results = await asyncio.gather(*others, return_exceptions=True)
    await asyncio.wait_for(all_waiting.wait(), 60)
    for i in cancelled_group:
        tasks[i].cancel()
    cancelled = await asyncio.gather(*(tasks[i] for i in cancelled_group), return_exceptions=True)
    stats = manager.get_stats()
    async with manager.async_session_scope() as s:
        rows = await s.scalar(select(func.count()).select_from(User))
    await manager.adispose()

    assert sum(isinstance(r, KeyError) for r in results) == 200
    assert [r for r in results if r is not None and not isinstance(r, KeyError)] == []
    assert all(isinstance(r, asyncio.CancelledError) for r in cancelled)
    assert {
        k: stats[k]
        for k in (
            "session_count",
            "active_sessions",
            "total_transactions",
            "committed_transactions",
            "rolled_back_transactions",
            "failed_transactions",
            "cancellations",
            "savepoints",
            "savepoint_rollbacks",
            "retries",
        )
    } == {
        "session_count": 1000,
        "active_sessions": 0,
        "total_transactions": 1000,
        "committed_transactions": 700,
        "rolled_back_transactions": 300,
        "failed_transactions": 300,
        "cancellations": 100,
        "savepoints": 200,
        "savepoint_rollbacks": 100,
        "retries": 0,
    }
    assert stats["success_rate"] == pytest.approx(70.0)
    assert [(f["calls"], f["failures"]) for f in stats["functions"].values()] == [(600, 0)]
    assert stats["pool"]["async"]["checked_out"] == 0
    assert rows == 600 + 100 * 2  # plain, outer + kept
