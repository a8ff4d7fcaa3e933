"""The SQLite BEGIN recipe: an explicit BEGIN per transaction, sent straight on
the DBAPI connection (sync) or queued on aiosqlite's worker thread (async).

What it must keep: reads inside one transaction see one snapshot, and the
sequence the database itself receives (its trace callback) is BEGIN, the
statements, then COMMIT or ROLLBACK; what it must not do: run BEGIN through the
engine's statement path, or change SQLite engines that are not the manager's.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, event, func, select, text

from sessionscope import SessionManager

from .conftest import reset_schema
from .models import User


def _verb(statement: str) -> str:
    return statement.split()[0].upper()


def _trace(manager: SessionManager, is_async: bool) -> list[str]:
    """Statements as SQLite itself receives them, for new connections of the
    manager's sync or async engine."""
    seen: list[str] = []
    engine = manager.async_engine.sync_engine if is_async else manager.engine

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, record: Any) -> None:
        if is_async:
            # sqlite3 objects belong to aiosqlite's thread: set it there.
            dbapi_connection.run_async(lambda aio: aio.set_trace_callback(seen.append))
        else:
            dbapi_connection.set_trace_callback(seen.append)

    if not is_async:
        engine.dispose()  # the connection reset_schema() pooled is not traced
    return seen


def _engine_statements(manager: SessionManager, is_async: bool) -> list[str]:
    seen: list[str] = []
    engine = manager.async_engine.sync_engine if is_async else manager.engine

    @event.listens_for(engine, "before_cursor_execute")
    def _sql(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(_verb(statement))

    return seen


@pytest.fixture
def mgr(tmp_path: Path) -> Any:
    manager = SessionManager(f"sqlite:///{tmp_path / 'begin.db'}")
    reset_schema(manager.engine)
    yield manager
    manager.dispose()


def test_sync_begin_reaches_sqlite_first_and_skips_the_statement_path(
    mgr: SessionManager,
) -> None:
    trace = _trace(mgr, is_async=False)
    engine_seen = _engine_statements(mgr, is_async=False)
    with mgr.session_scope() as s:
        s.execute(select(func.count()).select_from(User))
        with mgr.session_scope(propagation="nested") as inner:
            inner.add(User(name="kept"))
    verbs = [_verb(x) for x in trace if not x.upper().startswith("PRAGMA")]
    assert verbs == ["BEGIN", "SELECT", "SAVEPOINT", "INSERT", "RELEASE", "COMMIT"]
    assert "BEGIN" not in engine_seen
    assert engine_seen == ["SELECT", "SAVEPOINT", "INSERT", "RELEASE"]


async def test_async_begin_reaches_sqlite_first_and_skips_the_statement_path(
    mgr: SessionManager,
) -> None:
    trace = _trace(mgr, is_async=True)
    engine_seen = _engine_statements(mgr, is_async=True)
    async with mgr.async_session_scope() as s:
        await s.execute(select(func.count()).select_from(User))
        async with mgr.async_session_scope(propagation="nested") as inner:
            inner.add(User(name="kept"))
    with pytest.raises(RuntimeError), mgr.session_scope():
        raise RuntimeError("nothing sent: the sync engine is not traced")
    verbs = [_verb(x) for x in trace if not x.upper().startswith("PRAGMA")]
    assert verbs == ["BEGIN", "SELECT", "SAVEPOINT", "INSERT", "RELEASE", "COMMIT"]
    assert "BEGIN" not in engine_seen
    await mgr.adispose()


async def test_async_rolled_back_scope_sends_begin_then_rollback(mgr: SessionManager) -> None:
    trace = _trace(mgr, is_async=True)
    with pytest.raises(ValueError):
        async with mgr.async_session_scope() as s:
            s.add(User(name="gone"))
            await s.flush()
            raise ValueError("roll it back")
    async with mgr.async_session_scope() as s:
        assert await s.scalar(select(func.count()).select_from(User)) == 0
    verbs = [_verb(x) for x in trace if not x.upper().startswith("PRAGMA")]
    assert verbs == ["BEGIN", "INSERT", "ROLLBACK", "BEGIN", "SELECT", "COMMIT"]
    await mgr.adispose()


def _commit_a_row_elsewhere(path: str, name: str) -> None:
    other = sqlite3.connect(path)
    try:
        other.execute("INSERT INTO ss_users (name) VALUES (?)", (name,))
        other.commit()
    finally:
        other.close()


def _wal(manager: SessionManager) -> str:
    # WAL lets another connection commit while a reader holds its snapshot; it
    # is a property of the file, so set once from outside any transaction.
    database = manager.url.database
    assert database is not None
    direct = sqlite3.connect(database)
    try:
        assert direct.execute("PRAGMA journal_mode=WAL").fetchone() == ("wal",)
    finally:
        direct.close()
    return database


def test_sync_reads_in_one_scope_see_one_snapshot(mgr: SessionManager) -> None:
    path = _wal(mgr)
    count = select(func.count()).select_from(User)
    with mgr.session_scope() as s:
        assert s.scalar(count) == 0
        _commit_a_row_elsewhere(path, "meanwhile")
        assert s.scalar(count) == 0  # the transaction's snapshot, not the new row
    with mgr.session_scope() as s:
        assert s.scalar(count) == 1


async def test_async_reads_in_one_scope_see_one_snapshot(mgr: SessionManager) -> None:
    path = _wal(mgr)
    count = select(func.count()).select_from(User)
    async with mgr.async_session_scope() as s:
        assert await s.scalar(count) == 0
        _commit_a_row_elsewhere(path, "meanwhile")
        assert await s.scalar(count) == 0
    async with mgr.async_session_scope() as s:
        assert await s.scalar(count) == 1
    await mgr.adispose()


def test_other_sqlite_engines_are_left_alone(mgr: SessionManager, tmp_path: Path) -> None:
    assert mgr.engine.dialect.name == "sqlite"  # the manager's engine exists, with its recipe
    plain = create_engine(f"sqlite:///{tmp_path / 'plain.db'}")
    seen: list[str] = []
    event.listen(plain, "connect", lambda c, r: c.set_trace_callback(seen.append))
    try:
        with plain.begin() as conn:
            conn.execute(text("SELECT 1"))
    finally:
        plain.dispose()
    # pysqlite's own legacy handling: no BEGIN before a SELECT.
    assert [_verb(x) for x in seen] == ["SELECT"]


async def test_a_failed_async_statement_leaves_no_cursor_to_the_garbage_collector(
    mgr: SessionManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLAlchemy's aiosqlite adapter leaves the cursor of a failed statement
    open in its traceback frames, and the traceback sits in a reference cycle:
    the garbage collector would finalize the sqlite3 cursor later, on whichever
    thread it happens to run. Finalizing it takes its connection's mutex, which
    that connection's worker thread holds for as long as it waits in SQLite's
    busy handler once the connection serves another request; an event loop
    collecting garbage then stops until the busy timeout, and the transaction
    holding the lock the worker waits for cannot commit meanwhile (a server
    answering 500 to the requests that waited). The cursor is released when the
    statement fails, on the transaction's own connection."""
    import gc
    import weakref

    import aiosqlite
    from sqlalchemy.exc import IntegrityError

    async with mgr.async_session_scope() as s:
        s.add(User(name="ann"))
    cursors: weakref.WeakSet[aiosqlite.Cursor] = weakref.WeakSet()
    real_init = aiosqlite.Cursor.__init__

    def tracked_init(self: aiosqlite.Cursor, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        cursors.add(self)

    monkeypatch.setattr(aiosqlite.Cursor, "__init__", tracked_init)
    gc.collect()
    gc.disable()
    try:
        try:
            async with mgr.async_session_scope() as s:
                s.add(User(name="ann"))  # the INSERT at COMMIT fails: UNIQUE
        except IntegrityError:
            pass
        assert len(cursors) == 0, "the failed statement's cursor is garbage in a cycle"
    finally:
        gc.enable()
    await mgr.adispose()
