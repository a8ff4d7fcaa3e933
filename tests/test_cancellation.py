"""Task cancellation (SPEC section 3): a cancelled async scope rolls back in a
shielded cleanup, returns or invalidates its connection, decrements
``active_sessions`` and re-raises ``CancelledError``; no connection is left
"idle in transaction".

Real cancellations on real drivers: mid-query (PostgreSQL ``pg_sleep`` through
asyncpg, MariaDB ``SLEEP`` through aiomysql), mid-COMMIT, while the body awaits
something else with a transaction open, a second cancellation during the
cleanup itself, ``asyncio.wait_for`` timeouts, and the retry backoff.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from sessionscope import SessionConfig, SessionManager, _async

from .conftest import backend_url, require_server, reset_schema
from .faults import (
    Server,
    await_for,
    create_slow_commit_table,
    drop_slow_commit_table,
    in_commit,
)
from .models import User

ASYNC_BACKENDS = ["sqlite", "postgresql", "mariadb"]


class Env:
    def __init__(self, backend: str, manager: SessionManager, admin: Server | None) -> None:
        self.backend = backend
        self.manager = manager
        self.admin = admin

    @property
    def pool(self) -> Any:
        return self.manager.async_engine.sync_engine.pool

    async def connection_id(self, session: AsyncSession) -> int | None:
        if self.admin is None:
            return None
        return int(await session.scalar(self.admin.id_sql))

    def users(self) -> list[str]:
        with self.manager.session_scope() as s:
            return sorted(s.scalars(select(User.name)))

    def assert_released(self) -> None:
        assert self.pool.checkedout() == 0
        assert self.manager.get_stats()["active_sessions"] == 0

    def idle_in_transaction(self, ids: list[int]) -> list[Any]:
        """The test's server connections still inside a transaction (PostgreSQL:
        state "idle in transaction..."; MariaDB: an open InnoDB transaction)."""
        if self.admin is None or not ids:
            return []
        if self.backend == "postgresql":
            return [r for r in self.admin.pg_activity(ids) if (r[1] or "").startswith("idle in")]
        return [r for r in self.admin.mariadb_threads(ids) if r[3] is not None]


async def make_env(backend: str, tmp_path: Path) -> Env:
    url = backend_url(backend, tmp_path)
    manager = SessionManager(url, config=SessionConfig(retry_delay=0.001))
    reset_schema(manager.engine)
    admin = Server(backend, url) if backend != "sqlite" else None
    return Env(backend, manager, admin)


async def close_env(env: Env) -> None:
    await env.manager.adispose()
    if env.admin is not None:
        env.admin.dispose()


@pytest.fixture(params=ASYNC_BACKENDS)
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Env]:
    environment = await make_env(str(request.param), tmp_path)
    yield environment
    await close_env(environment)


async def cancel_when(task: asyncio.Task[Any], ready: asyncio.Event) -> None:
    await asyncio.wait_for(ready.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# -- mid-query ------------------------------------------------------------------------


async def test_cancel_during_pg_sleep_leaves_nothing_behind(tmp_path: Path) -> None:
    require_server("postgresql")
    env = await make_env("postgresql", tmp_path)
    pids: list[int] = []
    try:

        @env.manager.async_with_session
        async def slow(session: AsyncSession) -> None:
            pid = await env.connection_id(session)
            assert pid is not None
            pids.append(pid)
            session.add(User(name="uncommitted"))
            await session.flush()
            await session.execute(text("SELECT pg_sleep(60)"))

        assert env.admin is not None
        admin = env.admin
        task = asyncio.create_task(slow())
        await await_for(
            lambda: bool(pids) and any(r[2] == "PgSleep" for r in admin.pg_activity(pids)),
            "the backend to sleep",
        )
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        env.assert_released()  # at once: the cleanup ran before CancelledError surfaced
        stats = env.manager.get_stats()
        assert stats["cancellations"] == 1 and stats["retries"] == 0
        assert env.idle_in_transaction(pids) == []
        # asyncpg asked the server to cancel the statement: the backend is not
        # left sleeping either.
        await await_for(
            lambda: all(r[1] != "active" for r in admin.pg_activity(pids)), "pg_sleep to stop"
        )
        assert env.users() == []
        async with env.manager.async_session_scope() as s:  # the pool still serves
            assert await s.scalar(select(func.count()).select_from(User)) == 0
    finally:
        await close_env(env)


async def test_cancel_during_mariadb_sleep(tmp_path: Path) -> None:
    """aiomysql cannot cancel a running statement: SQLAlchemy drops (invalidates)
    the connection, so the client side is clean at once; the server notices the
    closed connection when the statement ends and rolls the transaction back."""
    require_server("mariadb")
    env = await make_env("mariadb", tmp_path)
    ids: list[int] = []
    try:

        @env.manager.async_with_session
        async def slow(session: AsyncSession) -> None:
            connection_id = await env.connection_id(session)
            assert connection_id is not None
            ids.append(connection_id)
            session.add(User(name="uncommitted"))
            await session.flush()
            await session.execute(text("SELECT SLEEP(3)"))

        assert env.admin is not None
        admin = env.admin
        task = asyncio.create_task(slow())
        await await_for(
            lambda: bool(ids)
            and any(r[2] == "SELECT SLEEP(3)" for r in admin.mariadb_threads(ids)),
            "the server to sleep",
        )
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        env.assert_released()
        assert env.manager.get_stats()["cancellations"] == 1
        # The orphaned statement ends, the server drops the connection and
        # rolls its transaction back; nothing stays open.
        await await_for(lambda: not admin.mariadb_threads(ids), "the server to drop it")
        assert env.users() == []
    finally:
        await close_env(env)


# -- mid-COMMIT --------------------------------------------------------------------------


async def test_cancel_during_commit(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """COMMIT is held open by a deferred trigger sleeping at COMMIT time; the task
    is cancelled while the backend is inside COMMIT. CancelledError surfaces
    (it must), the outcome is unknown to the client and logged as such."""
    require_server("postgresql")
    env = await make_env("postgresql", tmp_path)
    assert env.admin is not None
    admin = env.admin
    create_slow_commit_table(admin)
    pids: list[int] = []
    calls: list[int] = []
    try:

        @env.manager.async_with_session
        async def insert(session: AsyncSession) -> None:
            calls.append(1)
            pid = await env.connection_id(session)
            assert pid is not None
            pids.append(pid)
            await session.execute(text("INSERT INTO ss_slow_commit VALUES (1)"))

        with caplog.at_level(logging.WARNING, logger="sessionscope"):
            task = asyncio.create_task(insert())
            await await_for(lambda: bool(pids) and in_commit(admin, pids[0]), "COMMIT")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert calls == [1], "a cancellation is never retried"
        env.assert_released()
        assert env.manager.get_stats()["cancellations"] == 1
        assert any("COMMIT interrupted by CancelledError" in r.getMessage() for r in caplog.records)
        await await_for(
            lambda: all(r[1] != "active" for r in admin.pg_activity(pids)), "COMMIT to stop"
        )
        assert env.idle_in_transaction(pids) == []
        with admin.engine.connect() as conn:
            # asyncpg cancelled the statement on the server: COMMIT failed.
            assert conn.exec_driver_sql("SELECT count(*) FROM ss_slow_commit").scalar() == 0
    finally:
        drop_slow_commit_table(admin)
        await close_env(env)


# -- while the body awaits something else -----------------------------------------------


async def test_cancel_while_transaction_open_rolls_back_and_returns_connection(
    env: Env,
) -> None:
    ids: list[int | None] = []
    started = asyncio.Event()

    @env.manager.async_with_session
    async def wait_forever(session: AsyncSession) -> None:
        ids.append(await env.connection_id(session))
        session.add(User(name="uncommitted"))
        await session.flush()
        started.set()
        await asyncio.Event().wait()

    await cancel_when(asyncio.create_task(wait_forever()), started)
    env.assert_released()
    assert env.manager.get_stats()["cancellations"] == 1
    # Rolled back and returned, not thrown away: the connection is back in the pool.
    assert env.pool.checkedin() == 1
    if env.admin is not None:
        server_ids = [i for i in ids if i is not None]
        assert env.idle_in_transaction(server_ids) == []
        async with env.manager.async_session_scope() as s:
            assert await env.connection_id(s) == server_ids[0], "the same connection, reused"
    assert env.users() == []


async def test_second_cancellation_during_cleanup(env: Env) -> None:
    """The task is cancelled again while its shielded cleanup is sending ROLLBACK
    (from the engine's ``rollback`` event). CancelledError surfaces at once; the
    shielded cleanup carries on and still returns the connection."""
    started = asyncio.Event()
    ids: list[int | None] = []
    rollbacks: list[int] = []

    @env.manager.async_with_session
    async def wait_forever(session: AsyncSession) -> None:
        ids.append(await env.connection_id(session))
        session.add(User(name="uncommitted"))
        await session.flush()
        started.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(wait_forever())

    def cancel_again(conn: Any) -> None:
        rollbacks.append(1)
        task.cancel()

    engine = env.manager.async_engine.sync_engine
    event.listen(engine, "rollback", cancel_again)
    try:
        await cancel_when(task, started)
    finally:
        event.remove(engine, "rollback", cancel_again)
    assert rollbacks, "the second cancellation hit the cleanup's ROLLBACK"
    await await_for(lambda: env.pool.checkedout() == 0, "the shielded cleanup to finish")
    await await_for(lambda: not _async._orphans, "the orphaned cleanup task to be released")
    env.assert_released()
    if env.admin is not None:
        assert env.idle_in_transaction([i for i in ids if i is not None]) == []
    assert env.users() == []


async def test_wait_for_timeout_surfaces_as_timeout(env: Env) -> None:
    @env.manager.async_with_session
    async def wait_forever(session: AsyncSession) -> None:
        session.add(User(name="uncommitted"))
        await session.flush()
        await asyncio.Event().wait()

    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(wait_forever(), 0.2)
    env.assert_released()
    assert env.users() == []


async def test_cancel_during_retry_backoff(env: Env) -> None:
    class Flaky(Exception):
        pass

    calls: list[int] = []

    @env.manager.async_with_session(
        retry_delay=60.0, retry_max_delay=60.0, retry_predicate=lambda e: isinstance(e, Flaky)
    )
    async def flaky(session: AsyncSession) -> None:
        calls.append(1)
        await session.execute(select(1))
        raise Flaky

    task = asyncio.create_task(flaky())
    await await_for(lambda: env.manager.get_stats()["retries"] == 1, "the first retry decision")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls == [1]
    env.assert_released()
