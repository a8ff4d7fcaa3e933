"""Scope integrity (SPEC section 2, "Integrity rules"): the everyday patterns an
adversarial review broke, each on SQLite, PostgreSQL and MariaDB, sync and
async. Every test checks the committed rows from another connection and that
nothing is left open (``active_sessions``, checked-out connections, PostgreSQL
connections idle in a transaction).

Path functions are defined inside tests, so this module keeps its annotations
evaluated (no ``from __future__ import annotations``): FastAPI resolves them.
"""

import asyncio
import contextlib
import contextvars
import gc
import logging
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import FrameType

import httpx
import pytest
from fastapi import Depends, FastAPI
from sqlalchemy import create_engine, select, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

import sessionscope
from sessionscope import (
    ActiveScopeError,
    ReadOnlyError,
    RollbackOnlyError,
    _api,
)

from .conftest import reset_schema
from .faults import SqliteLock, await_for
from .integrity import Env, make_env
from .models import User

# -- 1. generators ------------------------------------------------------------------


def test_write_between_iterations_of_an_abandoned_generator_commits(env: Env) -> None:
    """A write made while a generator holding a scope is suspended belongs to the
    caller, not to the generator's session: abandoning the generator loses nothing."""
    manager = env.manager

    def reader() -> Iterator[int]:
        with manager.session_scope():
            yield 1
            yield 2

    @manager.with_session
    def write(session: Session, name: str) -> None:
        session.add(User(name=name))

    rows = reader()
    next(rows)
    write("between")
    rows.close()  # abandoned after the first row
    assert env.rows() == ["between"]
    stats = manager.get_stats()
    assert stats["total_transactions"] == 2
    assert stats["failed_transactions"] == 0
    env.assert_clean()


def test_decorated_writer_inside_a_read_only_generator_loop(env: Env) -> None:
    """``for row in reader(): write(row)`` with a read-only scope in the reader:
    each write commits in its own session; the reader never sees a write."""
    manager = env.manager

    def reader() -> Iterator[str]:
        with manager.session_scope(read_only=True) as session:
            session.execute(text("SELECT 1"))
            yield from ("a", "b")

    @manager.with_session
    def write(session: Session, name: str) -> None:
        session.add(User(name=name))

    for name in reader():
        write(name)
    assert env.rows() == ["a", "b"]
    assert manager.get_stats()["committed_transactions"] == 3
    env.assert_clean()


def test_generators_finished_out_of_order_leave_no_closed_scope(env: Env) -> None:
    """Two generators finishing out of order used to leave the context pointing
    at a closed scope, which every later scope joined and never committed."""
    manager = env.manager

    def gen(name: str) -> Iterator[None]:
        with manager.session_scope() as session:
            session.add(User(name=name))
            yield
            yield

    first, second = gen("first"), gen("second")
    next(first)
    next(second)
    for g in (first, second):  # the older one finishes first
        with contextlib.suppress(StopIteration):
            next(g)
            next(g)
    with manager.session_scope() as session:
        session.add(User(name="after"))
    assert env.rows() == ["after", "first", "second"]
    stats = manager.get_stats()
    assert stats["total_transactions"] == 3
    assert stats["committed_transactions"] == 3
    env.assert_clean()


def test_generator_scope_is_seen_inside_the_generator(env: Env) -> None:
    """Code running inside the generator still joins the generator's scope."""
    manager = env.manager

    @manager.with_session
    def write(session: Session, name: str) -> None:
        session.add(User(name=name))

    def gen() -> Iterator[None]:
        with manager.session_scope():
            write("inside")
            yield
            raise RuntimeError("the generator fails after its write")

    g = gen()
    next(g)
    with pytest.raises(RuntimeError):
        next(g)
    assert env.rows() == []  # the joined write was rolled back with its scope
    env.assert_clean()


def test_contextmanager_generator_scope_is_the_with_block(env: Env) -> None:
    """A generator turned into a context manager (``@contextmanager``) hands its
    scope to the ``with`` body, as ``session_scope()`` itself does."""
    manager = env.manager

    @contextlib.contextmanager
    def transaction() -> Iterator[Session]:
        with manager.session_scope() as session:
            yield session

    @manager.with_session
    def write(session: Session, name: str) -> Session:
        session.add(User(name=name))
        return session

    with pytest.raises(RuntimeError), transaction() as outer:
        assert write("joined") is outer
        raise RuntimeError("the block fails")
    assert env.rows() == []
    env.assert_clean()


async def test_async_write_between_iterations_of_an_abandoned_generator(aenv: Env) -> None:
    manager = aenv.manager

    async def reader() -> AsyncIterator[int]:
        async with manager.async_session_scope(read_only=True):
            yield 1
            yield 2

    @manager.async_with_session
    async def write(session: AsyncSession, name: str) -> None:
        session.add(User(name=name))

    rows = reader()
    await rows.__anext__()
    await write("between")
    await rows.aclose()
    assert aenv.rows() == ["between"]
    assert manager.get_stats()["failed_transactions"] == 0
    aenv.assert_clean()


async def test_async_writer_inside_a_read_only_generator_loop(aenv: Env) -> None:
    manager = aenv.manager

    async def reader() -> AsyncIterator[str]:
        async with manager.async_session_scope(read_only=True) as session:
            await session.execute(text("SELECT 1"))
            for name in ("a", "b"):
                yield name

    @manager.async_with_session
    async def write(session: AsyncSession, name: str) -> None:
        session.add(User(name=name))

    async for name in reader():
        await write(name)
    assert aenv.rows() == ["a", "b"]
    aenv.assert_clean()


async def test_async_generators_finished_out_of_order(aenv: Env) -> None:
    manager = aenv.manager

    async def gen(name: str) -> AsyncIterator[None]:
        async with manager.async_session_scope() as session:
            session.add(User(name=name))
            yield

    first, second = gen("first"), gen("second")
    await first.__anext__()
    await second.__anext__()
    for g in (first, second):
        with contextlib.suppress(StopAsyncIteration):
            await g.__anext__()
    async with manager.async_session_scope() as session:
        session.add(User(name="after"))
    assert aenv.rows() == ["after", "first", "second"]
    assert manager.get_stats()["committed_transactions"] == 3
    aenv.assert_clean()


# -- 2. a scope that exits in another Context or task ---------------------------------


def test_scope_exits_in_another_context(env: Env) -> None:
    """``def get_db(): with session_scope() as s: yield s`` entered in one copied
    context and exited in another, as FastAPI does with sync dependencies."""
    manager = env.manager

    @contextlib.contextmanager
    def get_db() -> Iterator[Session]:
        with manager.session_scope() as session:
            yield session

    dependency = get_db()
    session = contextvars.copy_context().run(dependency.__enter__)
    session.add(User(name="request"))
    contextvars.copy_context().run(dependency.__exit__, None, None, None)
    assert env.rows() == ["request"]
    env.assert_clean()


async def test_hand_written_fastapi_sync_generator_dependency(env: Env) -> None:
    """The hand-written dependency through FastAPI itself: the row is committed,
    and nothing stays checked out or idle in a transaction."""
    manager = env.manager

    def get_db() -> Iterator[Session]:
        with manager.session_scope() as session:
            yield session

    app = FastAPI()

    @app.post("/users/{name}", status_code=201)
    def create(name: str, db: Session = Depends(get_db)) -> dict[str, str]:  # noqa: B008
        db.add(User(name=name))
        return {"name": name}

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        for name in ("ann", "bob"):
            response = await client.post(f"/users/{name}")
            assert response.status_code == 201
    assert env.rows() == ["ann", "bob"]
    env.assert_clean()


async def test_async_generator_left_with_break_is_finalized_cleanly(aenv: Env) -> None:
    """An async generator streaming rows inside ``async_session_scope()``, left
    with ``break``: the event loop finalizes it in another task; the scope still
    rolls back and closes."""
    manager = aenv.manager

    async def stream() -> AsyncIterator[int]:
        async with manager.async_session_scope() as session:
            for i in range(3):
                await session.execute(text("SELECT 1"))
                yield i

    async for _ in stream():
        break
    gc.collect()
    await await_for(
        lambda: manager.get_stats()["active_sessions"] == 0, "the generator's finalization"
    )
    stats = manager.get_stats()
    assert stats["total_transactions"] == 1
    assert stats["failed_transactions"] == 0  # an abandoned generator is no failure
    aenv.assert_clean()
    async with manager.async_session_scope() as session:
        session.add(User(name="after"))
    assert aenv.rows() == ["after"]


# -- 3. no retry after the body's own COMMIT --------------------------------------------


def _fail_after_commit(env: Env, session: Session) -> None:
    """Make the next write of ``session`` fail with a transient error: the
    connection killed on the servers, the write lock taken on SQLite."""
    if env.backend == "sqlite":
        lock = SqliteLock(env.url)
        lock.hold()
        env.cleanups.append(lock.close)
        return
    from .faults import Server

    admin = Server(env.backend, env.url)
    pid = session.scalar(admin.id_sql)
    admin.kill(int(pid))
    admin.dispose()


def test_body_commit_is_never_retried(tmp_path: Path, backend: str) -> None:
    """A transient error after the body committed part of its work is not
    retried: re-running would apply the committed part twice."""
    # SQLite: wait 0 s for the lock, so the held write lock fails the write at once.
    options = {"connect_args": {"timeout": 0}} if backend == "sqlite" else None
    env = make_env(backend, tmp_path, options)
    manager = env.manager
    calls: list[int] = []

    @manager.with_session
    def work(session: Session) -> None:
        calls.append(1)
        session.add(User(name=f"first{len(calls)}"))
        session.commit()
        _fail_after_commit(env, session)
        session.add(User(name="second"))
        session.flush()

    try:
        with pytest.raises(Exception) as caught:
            work()
        assert sessionscope.is_transient(caught.value), caught.value
        assert calls == [1], "never re-run after the body's COMMIT"
        assert env.rows() == ["first1"]
        assert manager.get_stats()["retries"] == 0
        env.assert_clean()
    finally:
        for cleanup in env.cleanups:
            cleanup()
        env.close()


# -- 4. the body's own ROLLBACK, and COMMIT of a doomed transaction --------------------


def test_rollback_inside_nested_scope_fails_the_owner(env: Env) -> None:
    manager = env.manager
    with pytest.raises(RollbackOnlyError, match=r"session\.rollback\(\)"):
        with manager.session_scope() as outer:
            outer.add(User(name="outer1"))
            outer.flush()
            with manager.session_scope(propagation="nested") as inner:
                inner.add(User(name="inner"))
                inner.flush()
                inner.rollback()  # rolls back the whole transaction, not the savepoint
            outer.add(User(name="outer2"))
    assert env.rows() == []
    stats = manager.get_stats()
    assert stats["failed_transactions"] == 1
    assert stats["committed_transactions"] == 0
    env.assert_clean()


def test_rollback_in_a_joined_helper_fails_the_owner(env: Env) -> None:
    manager = env.manager

    @manager.with_session
    def helper(session: Session) -> None:
        try:
            session.add(User(name="helper"))
            session.flush()
            raise ValueError("the helper gives up")
        except ValueError:
            session.rollback()  # rolls back the caller's transaction too

    with pytest.raises(RollbackOnlyError), manager.session_scope() as outer:
        outer.add(User(name="outer1"))
        outer.flush()
        helper()
        outer.add(User(name="outer2"))
    assert env.rows() == []
    env.assert_clean()


def test_commit_of_a_rollback_only_transaction_is_refused(env: Env) -> None:
    manager = env.manager

    @manager.with_session
    def failing(session: Session) -> None:
        session.add(User(name="step"))
        session.flush()
        raise ValueError("a joined step fails")

    with manager.session_scope() as outer:
        outer.add(User(name="outer"))
        with pytest.raises(ValueError):
            failing()
        with pytest.raises(RollbackOnlyError, match="refused"):
            outer.commit()
        outer.rollback()  # the owner discards the partial work itself
        outer.add(User(name="fresh"))
    assert env.rows() == ["fresh"]
    env.assert_clean()


def test_commit_of_a_doomed_transaction_is_refused(env: Env) -> None:
    manager = env.manager
    with manager.session_scope() as session:
        session.add(User(name="doomed"))
        manager.set_rollback(True)
        with pytest.raises(RollbackOnlyError, match="set_rollback"):
            session.commit()
    assert env.rows() == []
    env.assert_clean()


def test_refused_commit_inside_a_doomed_savepoint_leaves_the_savepoint_to_roll_back(
    env: Env,
) -> None:
    """``session.commit()`` commits the whole transaction through every open
    savepoint. Refused because a nested scope is doomed, it must be refused
    before SQLAlchemy releases that scope's SAVEPOINT: the nested scope then
    rolls its own work back, and the enclosing scope, which nothing failed,
    commits what it did. (Refused only after the RELEASE, the nested work
    could no longer be undone and the enclosing scope had to fail too.)"""
    manager = env.manager
    ran: list[str] = []
    with manager.session_scope() as outer:
        with pytest.raises(RollbackOnlyError, match="refused"):
            with manager.session_scope(propagation="nested"):
                manager.set_rollback(True)
                with manager.session_scope() as joined:
                    joined.add(User(name="in the doomed savepoint"))
                    joined.flush()
                    joined.commit()
        outer.add(User(name="after"))
        manager.on_commit(lambda: ran.append("after"))
    assert env.rows() == ["after"]
    assert ran == ["after"]
    env.assert_clean()


async def test_async_refused_commit_inside_a_doomed_savepoint_leaves_it_to_roll_back(
    aenv: Env,
) -> None:
    manager = aenv.manager
    async with manager.async_session_scope() as outer:
        with pytest.raises(RollbackOnlyError, match="refused"):
            async with manager.async_session_scope(propagation="nested"):
                manager.set_rollback(True)
                async with manager.async_session_scope() as joined:
                    joined.add(User(name="in the doomed savepoint"))
                    await joined.flush()
                    await joined.commit()
        outer.add(User(name="after"))
    assert aenv.rows() == ["after"]
    aenv.assert_clean()


def test_owner_commit_and_rollback_keep_raw_semantics(env: Env) -> None:
    """The owner's own COMMIT commits (the seed's example), its own ROLLBACK
    undoes what came before and the scope goes on with a new transaction."""
    manager = env.manager
    with manager.session_scope() as session:
        session.add(User(name="committed"))
        session.commit()
        session.add(User(name="undone"))
        session.flush()
        session.rollback()
        session.add(User(name="last"))
    assert env.rows() == ["committed", "last"]
    env.assert_clean()


async def test_async_rollback_in_a_joined_helper_fails_the_owner(aenv: Env) -> None:
    manager = aenv.manager

    @manager.async_with_session
    async def helper(session: AsyncSession) -> None:
        session.add(User(name="helper"))
        await session.flush()
        await session.rollback()

    with pytest.raises(RollbackOnlyError):
        async with manager.async_session_scope() as outer:
            outer.add(User(name="outer1"))
            await outer.flush()
            await helper()
            outer.add(User(name="outer2"))
    assert aenv.rows() == []
    aenv.assert_clean()


async def test_async_commit_of_a_rollback_only_transaction_is_refused(aenv: Env) -> None:
    manager = aenv.manager

    @manager.async_with_session
    async def failing(session: AsyncSession) -> None:
        session.add(User(name="step"))
        await session.flush()
        raise ValueError("a joined step fails")

    with pytest.raises(RollbackOnlyError):
        async with manager.async_session_scope() as outer:
            outer.add(User(name="outer"))
            with pytest.raises(ValueError):
                await failing()
            with pytest.raises(RollbackOnlyError, match="refused"):
                await outer.commit()
    assert aenv.rows() == []
    aenv.assert_clean()


# -- 5. on_commit callbacks -------------------------------------------------------------


def test_promoted_callback_is_dropped_by_the_body_rollback(env: Env) -> None:
    manager = env.manager
    ran: list[str] = []
    with manager.session_scope() as outer:
        with manager.session_scope(propagation="nested") as inner:
            inner.add(User(name="inner"))
            manager.on_commit(lambda: ran.append("inner"))
        outer.rollback()  # the owner undoes everything, the savepoint's work too
        outer.add(User(name="after"))
    assert ran == []
    assert env.rows() == ["after"]
    env.assert_clean()


def test_callbacks_of_a_body_commit_run_even_if_the_scope_then_fails(env: Env) -> None:
    manager = env.manager
    ran: list[str] = []
    with pytest.raises(RuntimeError), manager.session_scope() as session:
        session.add(User(name="durable"))
        manager.on_commit(lambda: ran.append("durable"))
        session.commit()
        session.add(User(name="lost"))
        raise RuntimeError("after the body's commit")
    assert ran == ["durable"]
    assert env.rows() == ["durable"]
    env.assert_clean()


def test_coroutine_callback_in_a_sync_scope_is_refused() -> None:
    manager = sessionscope.SessionManager("sqlite://")

    async def notify() -> None:
        pass

    with manager.session_scope():
        with pytest.raises(TypeError, match="coroutine function"):
            manager.on_commit(notify)
        with pytest.raises(TypeError, match="callable"):
            manager.on_commit("not callable")  # type: ignore[arg-type]
    assert manager.get_stats()["committed_transactions"] == 1
    manager.dispose()


async def test_async_promoted_callback_is_dropped_by_the_body_rollback(aenv: Env) -> None:
    manager = aenv.manager
    ran: list[str] = []
    async with manager.async_session_scope() as outer:
        async with manager.async_session_scope(propagation="nested") as inner:
            inner.add(User(name="inner"))
            manager.on_commit(lambda: ran.append("inner"))
        await outer.rollback()
    assert ran == []
    assert aenv.rows() == []
    aenv.assert_clean()


# -- 6. re-entering an active scope object ------------------------------------------------


def test_reentering_an_active_scope_is_refused(env: Env) -> None:
    manager = env.manager
    scope = manager.session_scope()
    with scope as session:
        session.add(User(name="first"))
        with pytest.raises(ActiveScopeError, match="already active"), scope:
            pass
    assert env.rows() == ["first"]
    with scope as session:  # once exited, it may be used again
        session.add(User(name="second"))
    assert env.rows() == ["first", "second"]
    env.assert_clean()


async def test_async_reentering_an_active_scope_is_refused(aenv: Env) -> None:
    manager = aenv.manager
    scope = manager.async_session_scope()
    async with scope as session:
        session.add(User(name="first"))
        with pytest.raises(ActiveScopeError, match="already active"):
            async with scope:
                pass
    assert aenv.rows() == ["first"]
    assert manager.get_stats()["session_count"] == 1
    aenv.assert_clean()


# -- 7. child tasks --------------------------------------------------------------------------


async def test_wait_for_joins_the_enclosing_scope_on_every_python(aenv: Env) -> None:
    """``asyncio.wait_for`` makes a task on Python < 3.12 only; the call inside
    joins the enclosing scope on every version, so it fails with it."""
    manager = aenv.manager

    @manager.async_with_session
    async def add(session: AsyncSession, name: str) -> AsyncSession:
        session.add(User(name=name))
        return session

    with pytest.raises(RuntimeError):
        async with manager.async_session_scope() as outer:
            outer.add(User(name="outer"))
            assert await asyncio.wait_for(add("child"), timeout=30) is outer
            raise RuntimeError("the enclosing scope fails")
    assert aenv.rows() == []
    aenv.assert_clean()


async def test_child_tasks_commit_independently_and_say_so(
    aenv: Env, caplog: pytest.LogCaptureFixture
) -> None:
    manager = aenv.manager
    manager.configure(log_level="DEBUG")

    @manager.async_with_session
    async def add(session: AsyncSession, name: str) -> None:
        session.add(User(name=name))

    with caplog.at_level(logging.DEBUG, "sessionscope"), pytest.raises(RuntimeError):
        async with manager.async_session_scope() as outer:
            outer.add(User(name="outer"))
            await asyncio.gather(add("child1"), add("child2"))
            raise RuntimeError("the enclosing scope fails")
    assert aenv.rows() == ["child1", "child2"]
    assert sum("child task" in r.getMessage() for r in caplog.records) == 2
    aenv.assert_clean()


async def test_child_tasks_forbid(aenv: Env) -> None:
    manager = aenv.manager

    @manager.async_with_session(child_tasks="forbid")
    async def add(session: AsyncSession, name: str) -> None:
        session.add(User(name=name))

    with pytest.raises(ActiveScopeError, match="child task"):
        async with manager.async_session_scope() as outer:
            outer.add(User(name="outer"))
            await asyncio.gather(add("child"))
    assert aenv.rows() == []
    await add("alone")  # outside any scope a task is no child of a scope
    assert aenv.rows() == ["alone"]
    aenv.assert_clean()


# -- expected errors --------------------------------------------------------------------------


class NotFound(Exception):
    status_code = 404


class ServerSide(Exception):
    status_code = 503


class Expected(Exception):
    pass


def test_expected_errors_roll_back_quietly(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    manager = env.manager
    manager.configure(expected_errors=(Expected,))
    with caplog.at_level(logging.DEBUG, "sessionscope"):
        for error in (NotFound, Expected):
            with pytest.raises(error), manager.session_scope() as session:
                session.add(User(name="x"))
                raise error()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    stats = manager.get_stats()
    assert stats["failed_transactions"] == 0
    assert stats["rolled_back_transactions"] == 2
    assert stats["success_rate"] == 100.0
    with caplog.at_level(logging.WARNING, "sessionscope"):
        with pytest.raises(ServerSide), manager.session_scope() as session:
            raise ServerSide()
    assert manager.get_stats()["failed_transactions"] == 1
    assert any("ServerSide" in r.getMessage() for r in caplog.records)
    assert env.rows() == []
    env.assert_clean()


# -- explicit session before setup --------------------------------------------------------------


def test_explicit_session_works_before_setup(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(_api, "_default", None)

    @sessionscope.with_session
    def add(session: Session, name: str) -> None:
        session.add(User(name=name))

    engine = create_engine(f"sqlite:///{tmp_path / 'own.db'}")
    reset_schema(engine)
    with Session(engine) as session, session.begin():
        add(session, "positional")
        add(name="keyword", session=session)
    with pytest.raises(sessionscope.SessionFactoryNotInitializedError):
        add("injected")
    with Session(engine) as session:
        assert sorted(session.scalars(select(User.name))) == ["keyword", "positional"]
    engine.dispose()


def test_read_only_generator_never_raises_for_the_caller_writes(env: Env) -> None:
    """The reader's exit does not find the caller's writes in its session."""
    manager = env.manager

    def reader() -> Iterator[int]:
        with manager.session_scope(read_only=True):
            yield 1

    with manager.session_scope() as session:
        for _ in reader():
            session.add(User(name="caller"))
    assert env.rows() == ["caller"]
    with pytest.raises(ReadOnlyError), manager.session_scope(read_only=True) as session:
        session.add(User(name="refused"))
        session.flush()
    env.assert_clean()


# -- found by the model-based test (tests/test_model.py) ---------------------------------


async def test_wait_for_inside_an_async_generator_joins_its_scope(aenv: Env) -> None:
    """Counterexample of the model test on Python 3.11: a decorated call under
    ``asyncio.wait_for`` inside an async generator holding a scope committed on
    its own (wait_for's task did not stand for the generator's caller), and
    survived the generator's abandonment."""
    manager = aenv.manager

    @manager.async_with_session
    async def add(session: AsyncSession, name: str) -> None:
        session.add(User(name=name))

    async def gen() -> AsyncIterator[None]:
        async with manager.async_session_scope():
            await asyncio.wait_for(add("inside"), timeout=30)
            yield

    g = gen()
    await g.__anext__()
    await g.aclose()  # abandoned: its scope, and the joined write, roll back
    assert aenv.rows() == []
    aenv.assert_clean()


def test_abandoned_generator_joined_to_the_caller_does_not_fail_it(env: Env) -> None:
    """A generator whose scope joined the caller's, left with ``break``: its
    consumer chose to stop, so the caller's scope still commits."""
    manager = env.manager

    def rows_of(session_names: list[str]) -> Iterator[str]:
        with manager.session_scope() as session:
            session.add(User(name="from the generator"))
            yield from session_names

    with manager.session_scope() as session:
        session.add(User(name="caller"))
        for _ in rows_of(["a", "b"]):
            break
    assert env.rows() == ["caller", "from the generator"]
    env.assert_clean()


def test_nested_scope_in_a_generator_on_the_callers_session_is_refused(env: Env) -> None:
    """A SAVEPOINT held by a generator would roll back the caller's own writes
    made between iterations: refused at entry."""
    manager = env.manager

    def gen() -> Iterator[None]:
        with manager.session_scope(propagation="nested"):
            yield

    with manager.session_scope() as session:
        session.add(User(name="caller"))
        with pytest.raises(ActiveScopeError, match="generator"):
            next(gen())
    assert env.rows() == ["caller"]
    env.assert_clean()


def test_nested_scope_in_a_helper_a_generator_calls_is_allowed(env: Env) -> None:
    """A function that is no generator and opens its scope with a ``with``
    statement closes it before it returns, so the generator calling it cannot
    yield while the SAVEPOINT is open: nothing to refuse, and the savepoint
    rolls back only its own work."""
    manager = env.manager

    def helper(fail: bool) -> None:
        with manager.session_scope(propagation="nested") as session:
            session.add(User(name="helper, failed" if fail else "helper"))
            if fail:
                raise ValueError("only the savepoint rolls back")

    def gen() -> Iterator[int]:
        for fail in (False, True):
            with contextlib.suppress(ValueError):
                helper(fail)
            yield 1

    with manager.session_scope() as session:
        session.add(User(name="caller"))
        assert sum(gen()) == 2
    assert env.rows() == ["caller", "helper"]
    env.assert_clean()


async def test_async_nested_scope_in_a_coroutine_an_abandoned_generator_awaits(
    aenv: Env,
) -> None:
    """The state model's counterexample: an async generator joined to its
    caller's transaction awaits a coroutine that opens a ``nested`` scope, and is
    then closed before it finishes. The coroutine ends its savepoint before the
    generator can yield, so nothing is refused, the abandoned generator fails
    nothing, and the caller's writes commit with the savepoint's."""
    manager = aenv.manager

    async def helper() -> None:
        async with manager.async_session_scope(propagation="nested") as session:
            session.add(User(name="helper"))

    async def gen() -> AsyncIterator[None]:
        async with manager.async_session_scope():
            await helper()
            yield

    async with manager.async_session_scope() as session:
        session.add(User(name="caller"))
        await session.flush()
        abandoned = gen()
        await abandoned.__anext__()
        await abandoned.aclose()
    assert sorted(aenv.rows()) == ["caller", "helper"]
    aenv.assert_clean()


def test_with_statement_entry_is_told_from_a_call() -> None:
    """How a caller entered a scope decides whether the generator walk can be
    skipped: only its own ``with`` / ``async with`` statement ends the scope
    before the caller returns; ``__enter__`` called by ``ExitStack`` or by hand
    may leave it open (checked on every Python version CI runs)."""
    from sessionscope._core import _with_statement

    seen: list[bool] = []

    def entered_by_statement(caller: FrameType) -> bool:
        return _with_statement(caller.f_code, caller.f_lasti)

    class Probe:
        def __enter__(self) -> None:
            seen.append(entered_by_statement(sys._getframe(1)))

        def __exit__(self, *exc: object) -> None:
            pass

        async def __aenter__(self) -> None:
            seen.append(entered_by_statement(sys._getframe(1)))

        async def __aexit__(self, *exc: object) -> None:
            pass

    def statement() -> None:
        with Probe():
            pass

    def by_hand() -> None:
        Probe().__enter__()

    def exit_stack() -> None:
        with contextlib.ExitStack() as stack:
            stack.enter_context(Probe())

    async def async_statement() -> None:
        async with Probe():
            pass

    async def async_by_hand() -> None:
        await Probe().__aenter__()

    async def async_exit_stack() -> None:
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(Probe())

    statement()
    by_hand()
    exit_stack()
    asyncio.run(async_statement())
    asyncio.run(async_by_hand())
    asyncio.run(async_exit_stack())
    assert seen == [True, False, False, True, False, False]


def test_savepoint_closed_by_the_body_commit_fails_the_owner_if_its_scope_fails(env: Env) -> None:
    """After ``session.commit()`` inside a nested scope its SAVEPOINT is gone, so
    its later work cannot be undone when it fails: the owner must not commit it."""
    manager = env.manager
    with pytest.raises(RollbackOnlyError), manager.session_scope() as outer:
        with pytest.raises(ValueError), manager.session_scope(propagation="nested") as inner:
            inner.add(User(name="committed"))
            inner.commit()
            inner.add(User(name="not undone by the savepoint"))
            inner.flush()
            raise ValueError("the nested scope fails")
        outer.add(User(name="after"))
    assert env.rows() == ["committed"]
    env.assert_clean()
