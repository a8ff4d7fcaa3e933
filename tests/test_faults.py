"""Real faults on both servers (PostgreSQL and MariaDB), sync and async drivers:
a connection killed between two statements of a transaction, and a real
deadlock. Each is retried at the outermost decorated function, on a new
connection, and its effect lands exactly once.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from sessionscope import RollbackOnlyError, SessionConfig, SessionManager
from sessionscope._retry import error_code, is_transient

from .conftest import require_server, reset_schema
from .faults import AsyncBarrier, Server
from .models import Counter, User

SERVERS = ["postgresql", "mariadb"]


@pytest.fixture(params=SERVERS)
def server(request: pytest.FixtureRequest) -> Iterator[tuple[SessionManager, Server]]:
    url = require_server(str(request.param))
    manager = SessionManager(
        url, config=SessionConfig(retry_delay=0.001, retry_max_delay=0.005, retry_attempts=3)
    )
    reset_schema(manager.engine)
    admin = Server(str(request.param), url)
    yield manager, admin
    admin.dispose()
    manager.dispose()


def user_names(manager: SessionManager) -> list[str]:
    with manager.session_scope() as s:
        return sorted(s.scalars(select(User.name)))


# -- a connection killed between two statements -----------------------------------


def test_killed_between_two_statements_sync(server: tuple[SessionManager, Server]) -> None:
    manager, admin = server
    connection_ids: list[int] = []

    @manager.with_session
    def register(session: Session, first: str, second: str) -> None:
        session.add(User(name=first))
        session.flush()  # statement 1 of the transaction
        connection_ids.append(session.scalar(admin.id_sql))
        if len(connection_ids) == 1:
            admin.kill(connection_ids[0])
        session.add(User(name=second))
        session.flush()  # statement 2: the connection is gone

    register("first", "second")
    assert len(connection_ids) == 2
    assert connection_ids[0] != connection_ids[1], "retried on a new connection"
    assert user_names(manager) == ["first", "second"]  # exactly once each
    stats = manager.get_stats()
    assert stats["retries"] == 1
    assert stats["active_sessions"] == 0
    assert manager.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_killed_between_two_statements_async(
    server: tuple[SessionManager, Server],
) -> None:
    manager, admin = server
    connection_ids: list[int] = []

    @manager.async_with_session
    async def register(session: AsyncSession, first: str, second: str) -> None:
        session.add(User(name=first))
        await session.flush()
        connection_ids.append(await session.scalar(admin.id_sql))
        if len(connection_ids) == 1:
            admin.kill(connection_ids[0])
        session.add(User(name=second))
        await session.flush()

    try:
        await register("first", "second")
        assert len(connection_ids) == 2
        assert connection_ids[0] != connection_ids[1], "retried on a new connection"
        assert user_names(manager) == ["first", "second"]
        stats = manager.get_stats()
        assert stats["retries"] == 1
        assert stats["active_sessions"] == 0
        assert manager.async_engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        await manager.adispose()


# -- a real deadlock ----------------------------------------------------------------


def _seed_counters(manager: SessionManager) -> None:
    with manager.session_scope() as s:
        s.add_all([Counter(id=1, value=0), Counter(id=2, value=0)])


def _counter_values(manager: SessionManager) -> list[int]:
    with manager.session_scope() as s:
        return list(s.scalars(select(Counter.value).order_by(Counter.id)))


def test_deadlock_is_retried_sync(server: tuple[SessionManager, Server]) -> None:
    """Two workers lock rows 1 and 2 in opposite orders. A barrier makes both
    hold their first row before either asks for its second, so the deadlock
    really happens; the server picks one victim, which is retried and then
    goes through once the winner has committed."""
    manager, _ = server
    _seed_counters(manager)
    barrier = threading.Barrier(2, timeout=30)
    attempts: dict[int, int] = {1: 0, 2: 0}
    committed = {1: threading.Event(), 2: threading.Event()}

    @manager.with_session
    def move(session: Session, first: int, second: int) -> None:
        attempts[first] += 1
        if attempts[first] > 1:
            # The victim's retry waits for the winner's commit (the winner's
            # first row is the victim's second). Otherwise a retry scheduled
            # before the winner wakes from its lock wait takes its first row
            # again and deadlocks with the winner a second time.
            assert committed[second].wait(30), "the winner never committed"
        session.execute(update(Counter).where(Counter.id == first).values(value=Counter.value + 1))
        if attempts[first] == 1:
            barrier.wait()
        session.execute(update(Counter).where(Counter.id == second).values(value=Counter.value + 1))

    def run(first: int, second: int) -> None:
        move(first, second)
        committed[first].set()

    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(run, 1, 2), pool.submit(run, 2, 1)]
        for future in futures:
            future.result()
    assert _counter_values(manager) == [2, 2]
    assert sorted(attempts.values()) == [1, 2], "exactly one deadlock victim, retried once"
    stats = manager.get_stats()
    assert stats["retries"] == 1
    assert stats["active_sessions"] == 0


async def test_deadlock_is_retried_async(server: tuple[SessionManager, Server]) -> None:
    manager, _ = server
    _seed_counters(manager)
    barrier = AsyncBarrier(2)
    attempts: dict[int, int] = {1: 0, 2: 0}
    committed = {1: asyncio.Event(), 2: asyncio.Event()}

    @manager.async_with_session
    async def move(session: AsyncSession, first: int, second: int) -> None:
        attempts[first] += 1
        if attempts[first] > 1:
            # As in the sync test: the retry starts after the winner's commit.
            await committed[second].wait()
        await session.execute(
            update(Counter).where(Counter.id == first).values(value=Counter.value + 1)
        )
        if attempts[first] == 1:
            await barrier.wait()
        await session.execute(
            update(Counter).where(Counter.id == second).values(value=Counter.value + 1)
        )

    async def run(first: int, second: int) -> None:
        await move(first, second)
        committed[first].set()

    try:
        await asyncio.wait_for(asyncio.gather(run(1, 2), run(2, 1)), timeout=60)
        assert _counter_values(manager) == [2, 2]
        assert sorted(attempts.values()) == [1, 2]
        stats = manager.get_stats()
        assert stats["retries"] == 1
        assert stats["active_sessions"] == 0
    finally:
        await manager.adispose()


def test_deadlock_error_code_is_the_servers(server: tuple[SessionManager, Server]) -> None:
    """The retry above saw the server's own deadlock code (40P01 / 1213)."""
    manager, admin = server
    _seed_counters(manager)
    barrier = threading.Barrier(2, timeout=30)
    errors: list[BaseException] = []

    def move(first: int, second: int) -> None:
        with manager.session_scope(retry_attempts=0) as s:
            s.execute(update(Counter).where(Counter.id == first).values(value=Counter.value + 1))
            barrier.wait()
            try:
                s.execute(
                    update(Counter).where(Counter.id == second).values(value=Counter.value + 1)
                )
            except Exception as err:
                errors.append(err)
                raise

    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(move, 1, 2), pool.submit(move, 2, 1)]
        outcomes = [f.exception() for f in futures]
    assert sum(o is not None for o in outcomes) == 1
    assert len(errors) == 1 and is_transient(errors[0])
    assert error_code(errors[0]) == ("40P01" if admin.backend == "postgresql" else "1213")
    with manager.session_scope() as s:
        assert s.scalar(select(func.sum(Counter.value))) == 2


def test_deadlock_caught_by_the_body_is_never_committed(
    server: tuple[SessionManager, Server],
) -> None:
    """The victim's body catches the deadlock error and goes on writing. The
    server has already rolled the victim's transaction back (PostgreSQL aborts
    it; MariaDB ends it, and the next statement quietly begins a new one), so a
    COMMIT would commit nothing, or only what followed the deadlock. The scope
    refuses it: the victim raises RollbackOnlyError and none of its writes,
    before or after the deadlock, is committed."""
    manager, _ = server
    _seed_counters(manager)
    barrier = threading.Barrier(2, timeout=30)
    outcome: dict[int, str] = {}

    def move(first: int, second: int) -> None:
        try:
            with manager.session_scope() as session:
                session.execute(
                    update(Counter).where(Counter.id == first).values(value=Counter.value + 1)
                )
                barrier.wait()
                try:
                    session.execute(
                        update(Counter).where(Counter.id == second).values(value=Counter.value + 1)
                    )
                except sa_exc.DBAPIError:
                    session.add(User(name=f"written after the deadlock by {first}"))
                    outcome[first] = "caught"
            outcome.setdefault(first, "committed")
        except RollbackOnlyError:
            outcome[first] += ", refused"

    with ThreadPoolExecutor(2) as pool:
        for future in [pool.submit(move, 1, 2), pool.submit(move, 2, 1)]:
            future.result()
    assert sorted(outcome.values()) == ["caught, refused", "committed"], outcome
    assert _counter_values(manager) == [1, 1]  # the winner's two updates only
    assert user_names(manager) == []
    assert manager.get_stats()["active_sessions"] == 0
