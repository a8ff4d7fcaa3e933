"""A dead replica never fails a read (issue 10, item 9).

A read-only scope whose first action is ``session.connection()`` (raw SQL on the
connection, ``pandas.read_sql(..., session.connection())``) got no fallback: only
ORM execution was hooked. On the async side asyncpg's ``OSError`` never reaches
the engine's ``handle_error`` hook, so the replica was never cooled down and every
such read failed.

Two ways to make the replica dead, which take the same code path (the driver's
connect is refused: psycopg ``OperationalError``, asyncpg ``ConnectionRefusedError``,
PyMySQL/aiomysql ``OperationalError`` 2003):

- a loopback port where nothing listens (SQLite: a file in a missing directory),
  on every backend;
- a real PostgreSQL hot standby stopped with ``pg_ctl stop -m immediate`` after it
  served reads, with ``pool_pre_ping`` (its pooled connection is found dead, and
  the reconnect is refused).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from sessionscope import SessionManager

from .conftest import IN_CI, backend_url, require_server, reset_schema
from .integrity_state import assert_clean
from .models import User
from .replica import ReplicaSetupError, StreamingReplica, pg_bin, replication_allowed

NAMES = "SELECT name FROM ss_users"


def _nothing_listens() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dead_replica(url: str, tmp_path: Path) -> str:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return f"sqlite:///{tmp_path / 'missing' / 'replica.db'}"
    return parsed.set(port=_nothing_listens()).render_as_string(hide_password=False)


@pytest.fixture
def routed(backend: str, tmp_path: Path) -> Iterator[tuple[SessionManager, str]]:
    primary = backend_url(backend, tmp_path)
    manager = SessionManager(
        primary, replicas=[dead_replica(primary, tmp_path)], read_your_writes=0
    )
    reset_schema(manager.engine)
    with manager.session_scope() as session:
        session.add(User(name="written"))
    manager.reset_stats()
    yield manager, primary
    manager.dispose()


def check_routing(manager: SessionManager, replica: str = "replica1") -> None:
    """The first read found the replica dead and fell back to the primary; the
    second did not try it again (it is cooling down)."""
    routing = manager.get_stats()["routing"]
    assert routing["engines"][replica]["connect_failures"] == 1
    assert routing["engines"][replica]["healthy"] is False
    assert routing["fallbacks"] == 1
    assert routing["primary_because"] == {
        "read_your_writes": 0,
        "no_replica_available": 1,
        "fallback": 1,
    }
    assert routing["engines"]["primary"]["reads"] == 2


def test_dead_replica_falls_back_when_the_first_action_is_connection_sync(
    routed: tuple[SessionManager, str],
) -> None:
    manager, primary = routed
    for _ in range(2):
        with manager.session_scope(read_only=True) as session:
            assert set(session.connection().execute(text(NAMES)).scalars()) == {"written"}
    check_routing(manager)
    assert_clean(manager, primary, {"written"})


async def test_dead_replica_falls_back_when_the_first_action_is_connection_async(
    routed: tuple[SessionManager, str],
) -> None:
    manager, primary = routed
    try:
        for _ in range(2):
            async with manager.async_session_scope(read_only=True) as session:
                conn = await session.connection()
                assert set((await conn.execute(text(NAMES))).scalars()) == {"written"}
        check_routing(manager)

        @manager.async_with_session(read_only=True)
        async def through_orm(session: AsyncSession) -> set[str]:
            return set((await session.scalars(text(NAMES))).all())

        assert await through_orm() == {"written"}  # still cooling down: the primary
        routing = manager.get_stats()["routing"]
        assert routing["engines"]["replica1"]["connect_failures"] == 1
        assert routing["primary_because"]["no_replica_available"] == 2
        assert_clean(manager, primary, {"written"})
    finally:
        await manager.adispose()


async def test_dead_async_replica_is_cooled_down_after_an_orm_read(
    routed: tuple[SessionManager, str],
) -> None:
    """The ORM path already fell back; it must also take the replica out of
    rotation, so the next read does not pay for a refused connect again."""
    manager, primary = routed
    try:
        for _ in range(2):
            async with manager.async_session_scope(read_only=True) as session:
                assert set((await session.scalars(text(NAMES))).all()) == {"written"}
        check_routing(manager)
        assert_clean(manager, primary, {"written"})
    finally:
        await manager.adispose()


# -- a real standby, stopped -----------------------------------------------------


@pytest.fixture(scope="module")
def standby() -> Iterator[tuple[str, StreamingReplica]]:
    primary = require_server("postgresql")
    bindir = pg_bin()
    if bindir is None:
        reason = "PostgreSQL server binaries (pg_basebackup, pg_ctl) not found"
        if IN_CI:
            pytest.fail(f"CI requires a streaming replica: {reason}")
        pytest.skip(reason)
    parsed = make_url(primary)
    engine = create_engine(primary)
    try:
        reset_schema(engine)
    finally:
        engine.dispose()
    host, port = parsed.host or "127.0.0.1", parsed.port or 5432
    replica = StreamingReplica("standby", bindir, host, port)
    hba = contextlib.ExitStack()
    try:
        hba.enter_context(replication_allowed(host, port))
        replica.create()
        replica.start()
        replica.wait_streaming()
        yield primary, replica
    except ReplicaSetupError as err:
        pytest.fail(str(err))
    finally:
        replica.destroy()
        hba.close()  # pg_hba.conf as it was, also after a failure


def _where(conn: Any) -> tuple[bool, set[str]]:
    in_recovery = bool(conn.execute(text("SELECT pg_is_in_recovery()")).scalar())
    return in_recovery, set(conn.execute(text(NAMES)).scalars())


async def test_stopped_standby_falls_back_on_connection_sync_and_async(
    standby: tuple[str, StreamingReplica],
) -> None:
    """Each manager's pool holds a live connection to the standby when it crashes;
    with pre-ping the dead connection is found, and the reconnect is refused."""
    primary, replica = standby
    database = make_url(primary).database
    assert database is not None
    sync_side = SessionManager(
        primary, replicas=[replica.url(database)], read_your_writes=0, pool_pre_ping=True
    )
    async_side = SessionManager(
        primary,
        async_replicas=[replica.url(database, "asyncpg")],
        read_your_writes=0,
        pool_pre_ping=True,
    )
    try:
        with sync_side.session_scope() as session:
            session.execute(text("DELETE FROM ss_users"))
            session.add(User(name="before"))
        replica.wait_replayed()
        with sync_side.session_scope(read_only=True) as session:
            assert _where(session.connection()) == (True, {"before"})
        async with async_side.async_session_scope(read_only=True) as asession:
            conn = await asession.connection()
            assert await conn.run_sync(_where) == (True, {"before"})
        sync_side.reset_stats()
        async_side.reset_stats()
        replica.stop("immediate")

        for _ in range(2):
            with sync_side.session_scope(read_only=True) as session:
                assert _where(session.connection()) == (False, {"before"})
        check_routing(sync_side)
        assert_clean(sync_side, primary, {"before"})
        for _ in range(2):
            async with async_side.async_session_scope(read_only=True) as asession:
                conn = await asession.connection()
                assert await conn.run_sync(_where) == (False, {"before"})
        check_routing(async_side)
        assert_clean(async_side, primary, {"before"})
    finally:
        sync_side.dispose()
        await async_side.adispose()
        if not replica.running:
            replica.start()
            replica.wait_streaming()


async def test_stopped_standby_cools_down_the_async_replica(
    standby: tuple[str, StreamingReplica],
) -> None:
    """asyncpg alone, the standby stopped before the async engine ever connected:
    the refused connect (``OSError``) cools the replica down."""
    primary, replica = standby
    database = make_url(primary).database
    assert database is not None
    manager = SessionManager(
        primary, async_replicas=[replica.url(database, "asyncpg")], read_your_writes=0
    )
    try:
        async with manager.async_session_scope() as asession:
            await asession.execute(text("DELETE FROM ss_users"))
            asession.add(User(name="async"))
        manager.reset_stats()
        replica.stop("immediate")
        for _ in range(2):
            async with manager.async_session_scope(read_only=True) as asession:
                conn = await asession.connection()
                assert await conn.run_sync(_where) == (False, {"async"})
        check_routing(manager)
        assert_clean(manager, primary, {"async"})
    finally:
        await manager.adispose()
        if not replica.running:
            replica.start()


def test_fallback_inside_a_joined_scope_is_not_the_body_rollback(
    routed: tuple[SessionManager, str],
) -> None:
    """The routing fallback rolls back the empty transaction before re-pointing
    the session; when the first statement runs in a joined inner scope, that
    rollback is sessionscope's own, not the body's, and spoils nothing."""
    manager, primary = routed

    @manager.with_session
    def names(session: Session) -> set[str]:
        return set(session.execute(text(NAMES)).scalars())

    with manager.session_scope(read_only=True):
        assert names() == {"written"}
    assert manager.get_stats()["failed_transactions"] == 0
    assert_clean(manager, primary, {"written"})
