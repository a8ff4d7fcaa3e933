"""Findings of an adversarial review of the scope-integrity rewrite (issue 10).

Each test fails on the code it was written against and states the documented
rule it holds the product to (SPEC section 2 "Integrity rules", section 3
"Retry", docs/design.md "Scope integrity"). Like tests/test_integrity.py, each
checks the rows read from another connection and that nothing is left open.

No ``from __future__ import annotations``: kept like test_integrity.py.
"""

import asyncio
import concurrent.futures
import contextlib
import contextvars
import gc
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from sessionscope import CommitOutcomeUnknownError

from .conftest import BACKENDS
from .faults import (
    Server,
    SqliteLock,
    create_slow_commit_table,
    drop_slow_commit_table,
    in_commit,
    wait_for,
)
from .integrity import Env, make_env
from .models import User

# -- generators: a scope entered through a helper (ExitStack) -------------------------


def test_exit_stack_scope_in_generator_is_not_seen_between_iterations(env: Env) -> None:
    """Rule: a scope opened inside a generator is seen only by code running inside
    that generator. Entered through ``ExitStack.enter_context`` (a common way to
    hold several resources in a generator), the scope's ``__enter__`` is called
    from ExitStack's frame, not the generator's, so it is taken for an ordinary
    scope: a write the caller makes between iterations joins the generator's
    session and is silently lost when the generator is abandoned."""
    manager = env.manager

    def reader() -> Iterator[int]:
        with contextlib.ExitStack() as stack:
            session = stack.enter_context(manager.session_scope())
            session.execute(text("SELECT 1"))
            yield 1
            yield 2

    rows = reader()
    next(rows)
    with manager.session_scope() as session:
        session.add(User(name="between"))
    rows.close()
    assert env.rows() == ["between"]
    env.assert_clean()


async def test_async_exit_stack_scope_in_async_generator_is_not_seen_between_iterations(
    aenv: Env,
) -> None:
    """Async twin: ``AsyncExitStack.enter_async_context(async_session_scope())``
    inside an async generator; the caller's write between iterations is lost."""
    manager = aenv.manager

    async def reader() -> AsyncIterator[int]:
        async with contextlib.AsyncExitStack() as stack:
            session = await stack.enter_async_context(manager.async_session_scope())
            await session.execute(text("SELECT 1"))
            yield 1
            yield 2

    rows = reader()
    await rows.__anext__()
    async with manager.async_session_scope() as session:
        session.add(User(name="between"))
    await rows.aclose()
    assert aenv.rows() == ["between"]
    aenv.assert_clean()


# -- generators: a joined scope that outlives the scope it joined ---------------------


def test_generator_joined_scope_outliving_its_owner_never_swallows_writes(env: Env) -> None:
    """A generator created inside a scope joins it; the caller's scope ends (and
    commits) while the generator is suspended, then the generator goes on and
    opens a scope to write. Rule: a closed scope is never visible to anyone,
    so that write must get a session of its own and commit (or raise). Today
    the generator's JOIN frame is still active and points at the closed
    session: the write is silently lost, no error, no count."""
    manager = env.manager

    def worker() -> Iterator[int]:
        with manager.session_scope():
            yield 1
            with manager.session_scope() as session:
                session.add(User(name="late"))
            yield 2

    with manager.session_scope() as session:
        session.add(User(name="outer"))
        steps = worker()
        next(steps)
    try:
        try:
            next(steps)
        except Exception:  # an explicit error is acceptable, silence is not
            assert env.rows() == ["outer"]
        else:
            assert env.rows() == ["late", "outer"]
        steps.close()
        env.assert_clean()
    finally:
        session.close()  # today it holds a reopened transaction: free it for later tests


async def test_async_generator_joined_scope_outliving_its_owner_never_swallows_writes(
    aenv: Env,
) -> None:
    """Async twin. Besides losing the write, the reopened transaction stays on a
    connection nobody returns (SQLite: the write lock stays held; PostgreSQL:
    idle in transaction)."""
    manager = aenv.manager

    @manager.async_with_session
    async def write(session: AsyncSession, name: str) -> None:
        session.add(User(name=name))
        await session.flush()

    async def worker() -> AsyncIterator[int]:
        async with manager.async_session_scope():
            yield 1
            await write("late")
            yield 2

    async with manager.async_session_scope() as session:
        session.add(User(name="outer"))
        steps = worker()
        await steps.__anext__()
    try:
        try:
            await steps.__anext__()
        except Exception:  # an explicit error is acceptable, silence is not
            late_expected: list[str] = []
        else:
            late_expected = ["late"]
        await steps.aclose()
        aenv.assert_clean()
        assert aenv.rows() == sorted(["outer", *late_expected])
    finally:
        await session.close()  # today it holds a reopened transaction (locks on MariaDB)


# -- the body's own session.close() / reset() --------------------------------------------


def test_body_close_in_joined_scope_fails_the_owner(env: Env) -> None:
    """Rule: nothing partial ever commits. ``session.close()`` (or ``reset()``)
    called by a joined helper discards the owner's whole transaction exactly
    like ``session.rollback()`` does, but is not followed: the owner commits what
    came after, and the earlier work is silently gone."""
    manager = env.manager

    @manager.with_session
    def helper(session: Session) -> None:
        session.close()  # e.g. "release the connection early" in a helper

    with contextlib.suppress(Exception):
        with manager.session_scope() as session:
            session.add(User(name="before"))
            session.flush()
            helper()
            session.add(User(name="after"))
    assert env.rows() in ([], ["after", "before"])
    env.assert_clean()


def test_body_reset_in_nested_scope_fails_the_owner(env: Env) -> None:
    """``session.reset()`` inside a ``nested`` scope: the owner's earlier work and
    the savepoint are discarded, and the owner then commits the rest."""
    manager = env.manager

    with contextlib.suppress(Exception):
        with manager.session_scope() as session:
            session.add(User(name="before"))
            session.flush()
            with manager.session_scope(propagation="nested") as inner:
                inner.add(User(name="inner"))
                inner.flush()
                inner.reset()
            session.add(User(name="after"))
    assert env.rows() in ([], ["after", "before", "inner"])
    env.assert_clean()


# -- retry after a child task or thread committed ---------------------------------------


def _break_next_write(env: Env, session: Session, lock: SqliteLock | None) -> None:
    """Make the next write of ``session`` fail with a transient error before any
    COMMIT: its connection killed on the servers, the write lock taken on SQLite."""
    if lock is not None:
        lock.hold()
        return
    admin = Server(env.backend, env.url)
    try:
        admin.kill(int(session.scalar(admin.id_sql)))
    finally:
        admin.dispose()


def _transient_env(backend: str, tmp_path: Path) -> tuple[Env, SqliteLock | None]:
    options = {"connect_args": {"timeout": 0}} if backend == "sqlite" else None
    env = make_env(backend, tmp_path, options)
    return env, (SqliteLock(env.url) if backend == "sqlite" else None)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_retry_never_reruns_after_a_child_task_committed(
    backend: str, tmp_path: Path
) -> None:
    """Rule (SPEC 3): retry only work that is fully rolled back, never after
    anything under the boundary committed. A child task (``asyncio.gather``)
    commits independently; a transient error of the parent afterwards re-runs
    the parent, and the child's committed work is applied a second time."""
    env, lock = _transient_env(backend, tmp_path)
    manager = env.manager
    calls: list[int] = []

    @manager.async_with_session
    async def child(session: AsyncSession, name: str) -> None:
        session.add(User(name=name))

    @manager.async_with_session
    async def parent(session: AsyncSession) -> None:
        calls.append(1)
        if lock is not None:
            lock.release()
        await asyncio.gather(child(f"child{len(calls)}"))
        if len(calls) == 1:
            await session.run_sync(lambda s: _break_next_write(env, s, lock))
        session.add(User(name=f"parent{len(calls)}"))
        await session.flush()

    try:
        with contextlib.suppress(Exception):
            await parent()
        if lock is not None:
            lock.release()
        assert calls == [1], "re-run after a child task committed"
        assert env.rows() == ["child1"]
        env.assert_clean()
    finally:
        if lock is not None:
            lock.close()
        await env.aclose()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_retry_never_reruns_after_to_thread_work_committed(
    backend: str, tmp_path: Path
) -> None:
    """Same rule with ``asyncio.to_thread`` (it copies the context, so the
    boundary is visible in the thread): the sync decorated call in the thread
    commits, the parent fails transiently, is re-run, and the thread's work is
    committed twice."""
    env, lock = _transient_env(backend, tmp_path)
    manager = env.manager
    calls: list[int] = []

    @manager.with_session
    def in_thread(session: Session, name: str) -> None:
        session.add(User(name=name))

    @manager.async_with_session
    async def parent(session: AsyncSession) -> None:
        calls.append(1)
        if lock is not None:
            lock.release()
        await asyncio.to_thread(in_thread, f"thread{len(calls)}")
        if len(calls) == 1:
            await session.run_sync(lambda s: _break_next_write(env, s, lock))
        session.add(User(name=f"parent{len(calls)}"))
        await session.flush()

    try:
        with contextlib.suppress(Exception):
            await parent()
        if lock is not None:
            lock.release()
        assert calls == [1], "re-run after work in a thread committed"
        assert env.rows() == ["thread1"]
        env.assert_clean()
    finally:
        if lock is not None:
            lock.close()
        await env.aclose()


@pytest.mark.parametrize("backend", BACKENDS)
def test_retry_never_reruns_after_a_worker_thread_committed(backend: str, tmp_path: Path) -> None:
    """Sync twin with a ``ThreadPoolExecutor`` worker. A pool thread does not
    inherit the caller's context by itself, so the documented way to keep its
    work inside the unit of work is to run it in a copy of the caller's context
    (``contextvars.copy_context().run``), as ``asyncio.to_thread`` does: then
    its COMMIT is seen by the caller's retry boundary."""
    env, lock = _transient_env(backend, tmp_path)
    manager = env.manager
    calls: list[int] = []

    @manager.with_session
    def in_thread(session: Session, name: str) -> None:
        session.add(User(name=name))

    @manager.with_session
    def parent(session: Session) -> None:
        calls.append(1)
        if lock is not None:
            lock.release()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            context = contextvars.copy_context()
            pool.submit(context.run, in_thread, f"thread{len(calls)}").result()
        if len(calls) == 1:
            _break_next_write(env, session, lock)
        session.add(User(name=f"parent{len(calls)}"))
        session.flush()

    try:
        with contextlib.suppress(Exception):
            parent()
        if lock is not None:
            lock.release()
        assert calls == [1], "re-run after work in a worker thread committed"
        assert env.rows() == ["thread1"]
        env.assert_clean()
    finally:
        if lock is not None:
            lock.close()
        env.close()


# -- child tasks: the same code on every Python version ---------------------------------


async def test_nested_wait_for_joins_the_enclosing_scope_on_every_python(aenv: Env) -> None:
    """Rule: behaviour is the same on 3.10 to 3.13, ``wait_for`` included. On
    3.12+ ``wait_for`` runs in the caller's task, so a decorated call inside
    ``wait_for(helper())`` whose helper itself uses ``wait_for`` joins the
    enclosing scope and fails with it. On 3.10/3.11 only the first level of
    ``wait_for`` task is recognised: the inner call commits on its own."""
    manager = aenv.manager

    @manager.async_with_session
    async def add(session: AsyncSession, name: str) -> None:
        session.add(User(name=name))

    async def helper() -> None:
        await asyncio.wait_for(add("inner"), timeout=30)

    with pytest.raises(RuntimeError):
        async with manager.async_session_scope() as outer:
            outer.add(User(name="outer"))
            await asyncio.wait_for(helper(), timeout=30)
            raise RuntimeError("the enclosing scope fails")
    assert aenv.rows() == [], f"Python {sys.version_info[:2]}"
    aenv.assert_clean()


# -- a generator resumed in a fresh context each time (Starlette's sync streaming) ------


@pytest.mark.parametrize("resume", ["copy_context", "threadpool"])
@pytest.mark.parametrize("backend", BACKENDS)
async def test_generator_resumed_in_fresh_contexts_sees_its_own_scope(
    backend: str, resume: str, tmp_path: Path
) -> None:
    """Rule: a scope opened inside a generator is seen by code running inside that
    generator. Starlette's ``StreamingResponse`` over a sync generator resumes it
    with ``iterate_in_threadpool`` (each ``next`` in a worker thread, in a copy
    of the request's context); plain ``contextvars.copy_context().run(next, g)``
    does the same in one thread. From the second resumption on, the generator's
    own scope is invisible inside it: a decorated helper opens a second session
    and commits on its own, so when the generator then fails its scope rolls
    back but the helper's row stays (PostgreSQL, MariaDB: partial commit;
    SQLite: the helper waits on the generator's own write lock)."""
    options = {"connect_args": {"timeout": 0}} if backend == "sqlite" else None
    env = make_env(backend, tmp_path, options)
    manager = env.manager
    joined: list[bool] = []

    @manager.with_session(retry_attempts=0)
    def helper(session: Session, name: str) -> Session:
        session.add(User(name=name))
        session.flush()
        return session

    def export() -> Iterator[int]:
        with manager.session_scope() as session:
            session.add(User(name="first"))
            session.flush()
            yield 1
            joined.append(helper("second") is session)
            yield 2
            raise RuntimeError("the export fails")

    steps = export()

    async def resume_once() -> int | None:
        if resume == "threadpool":
            import anyio.to_thread

            return await anyio.to_thread.run_sync(next, steps, None)
        return contextvars.copy_context().run(next, steps, None)

    try:
        with contextlib.suppress(Exception):
            while await resume_once() is not None:
                pass
        assert joined == [True], "the helper inside the generator joins its scope"
        assert env.rows() == []
        env.assert_clean()
    finally:
        steps.close()
        await env.aclose()


# -- the body's own COMMIT lost, with the classic except/rollback/raise ---------------------


def test_body_commit_lost_then_body_rolls_back_is_outcome_unknown(tmp_path: Path) -> None:
    """Rule (SPEC 3): a connection lost during any COMMIT, the scope's or the
    body's, is ``CommitOutcomeUnknownError``. The everyday legacy body
    ``try: ...; session.commit() except Exception: session.rollback(); raise``
    clears the in-flight mark with its rollback, so the caller gets the raw
    disconnect error, a *transient* error that invites a retry (by a task
    queue, a client, an outer loop) of work that may have committed."""
    env = make_env("postgresql", tmp_path)
    admin = Server("postgresql", env.url)
    create_slow_commit_table(admin)
    pids: list[int] = []
    calls: list[int] = []

    @env.manager.with_session
    def insert(session: Session) -> None:
        calls.append(1)
        pids.append(int(session.scalar(admin.id_sql)))
        try:
            session.execute(text("INSERT INTO ss_slow_commit VALUES (1)"))
            session.commit()
        except Exception:
            session.rollback()
            raise

    def kill_inside_commit() -> None:
        wait_for(lambda: bool(pids) and in_commit(admin, pids[0]), "the body's COMMIT")
        admin.kill(pids[0])

    killer = threading.Thread(target=kill_inside_commit, daemon=True)
    killer.start()
    try:
        with pytest.raises(CommitOutcomeUnknownError):
            insert()
        killer.join()
        assert calls == [1]
        env.assert_clean()
    finally:
        drop_slow_commit_table(admin)
        admin.dispose()
        env.close()


async def test_async_body_commit_lost_then_body_rolls_back_is_outcome_unknown(
    tmp_path: Path,
) -> None:
    """Async twin (asyncpg): the raw ``ConnectionDoesNotExistError`` surfaces."""
    env = make_env("postgresql", tmp_path)
    admin = Server("postgresql", env.url)
    create_slow_commit_table(admin)
    pids: list[int] = []
    calls: list[int] = []

    @env.manager.async_with_session
    async def insert(session: AsyncSession) -> None:
        calls.append(1)
        pids.append(int(await session.scalar(admin.id_sql)))
        try:
            await session.execute(text("INSERT INTO ss_slow_commit VALUES (1)"))
            await session.commit()
        except Exception:
            await session.rollback()
            raise

    def kill_inside_commit() -> None:
        wait_for(lambda: bool(pids) and in_commit(admin, pids[0]), "the body's COMMIT")
        admin.kill(pids[0])

    killer = threading.Thread(target=kill_inside_commit, daemon=True)
    killer.start()
    try:
        with pytest.raises(CommitOutcomeUnknownError):
            await insert()
        await asyncio.to_thread(killer.join)
        assert calls == [1]
        env.assert_clean()
    finally:
        drop_slow_commit_table(admin)
        admin.dispose()
        await env.aclose()


# -- MariaDB: a deadlock inside a nested scope rolls back the whole transaction -----------


class _Deadlocker:
    """Another MariaDB connection that makes the scope's next statement the victim
    of a real deadlock: it writes many rows (so InnoDB picks the lighter scope
    transaction as the victim), locks ``second``, then waits for ``first``,
    which the scope holds."""

    def __init__(self, env: Env, first: int, second: int) -> None:
        self.env = env
        self.first, self.second = first, second
        self.connection_id: list[int] = []
        self.locked = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        table = User.__table__
        with self.env.observer.connect() as conn:
            self.connection_id.append(int(conn.exec_driver_sql("SELECT CONNECTION_ID()").scalar()))
            conn.execute(table.insert(), [{"name": f"heavy{i}"} for i in range(300)])
            conn.execute(table.update().where(table.c.id == self.second).values(name="x"))
            self.locked.set()
            with contextlib.suppress(Exception):
                conn.execute(table.update().where(table.c.id == self.first).values(name="y"))
            conn.rollback()

    def _waiting(self) -> bool:
        with self.env.observer.connect() as conn:
            return bool(
                conn.exec_driver_sql(
                    "SELECT count(*) FROM information_schema.innodb_trx WHERE "
                    f"trx_mysql_thread_id = {self.connection_id[0]} AND trx_state = 'LOCK WAIT'"
                ).scalar()
            )

    def start_and_wait(self) -> None:
        """Start the other transaction; return once it waits for ``first``."""
        self.thread.start()
        self.locked.wait(30)
        wait_for(self._waiting, "the other transaction waiting for the scope's lock")


def _two_rows(env: Env) -> tuple[int, int]:
    table = User.__table__
    with env.observer.begin() as conn:
        conn.execute(table.insert(), [{"name": "r1"}, {"name": "r2"}])
        ids = {row[0]: row[1] for row in conn.execute(text("SELECT name, id FROM ss_users"))}
    return int(ids["r1"]), int(ids["r2"])


def test_deadlock_caught_around_a_nested_scope_never_commits_partial_work(
    tmp_path: Path,
) -> None:
    """Rule: ``nested`` = SAVEPOINT, ROLLBACK TO SAVEPOINT on exception, "the outer
    may catch and go on"; and nothing partial ever commits. On MariaDB/MySQL a
    deadlock (1213) rolls back the *whole* transaction, not the savepoint: the
    ROLLBACK TO SAVEPOINT then fails (only a WARNING is logged), the outer body
    catches the deadlock and goes on, and the outer scope commits what follows:
    the outer work done before the nested scope is silently gone."""
    env = make_env("mariadb", tmp_path)
    manager = env.manager
    first, second = _two_rows(env)
    table = User.__table__
    other = _Deadlocker(env, first, second)
    try:
        with contextlib.suppress(Exception):
            with manager.session_scope() as session:
                session.add(User(name="before"))
                session.flush()
                try:
                    with manager.session_scope(propagation="nested") as inner:
                        inner.execute(table.update().where(table.c.id == first).values(name="a"))
                        other.start_and_wait()
                        inner.execute(table.update().where(table.c.id == second).values(name="b"))
                except sa_exc.OperationalError as err:
                    assert "1213" in str(err.orig)  # the deadlock victim, as intended
                other.thread.join()
                session.add(User(name="after"))
        assert env.rows() in (["r1", "r2"], ["after", "before", "r1", "r2"])
        env.assert_clean()
    finally:
        other.thread.join()
        env.close()


async def test_async_deadlock_caught_around_a_nested_scope_never_commits_partial_work(
    tmp_path: Path,
) -> None:
    """Async twin on MariaDB."""
    env = make_env("mariadb", tmp_path)
    manager = env.manager
    first, second = _two_rows(env)
    table = User.__table__
    other = _Deadlocker(env, first, second)
    try:
        with contextlib.suppress(Exception):
            async with manager.async_session_scope() as session:
                session.add(User(name="before"))
                await session.flush()
                try:
                    async with manager.async_session_scope(propagation="nested") as inner:
                        await inner.execute(
                            table.update().where(table.c.id == first).values(name="a")
                        )
                        await asyncio.to_thread(other.start_and_wait)
                        await inner.execute(
                            table.update().where(table.c.id == second).values(name="b")
                        )
                except sa_exc.OperationalError as err:
                    assert "1213" in str(err.orig)
                await asyncio.to_thread(other.thread.join)
                session.add(User(name="after"))
        assert env.rows() in (["r1", "r2"], ["after", "before", "r1", "r2"])
        env.assert_clean()
    finally:
        await asyncio.to_thread(other.thread.join)
        await env.aclose()


# -- on_commit and the body's own close() ---------------------------------------------------


def test_callback_of_work_discarded_by_the_body_close_never_runs(env: Env) -> None:
    """Rule: ``on_commit`` callbacks run after a COMMIT of their work and are
    dropped on rollback; the body's ``session.rollback()`` drops them. The
    body's ``session.close()`` discards the same work (it rolls the transaction
    back) but the callback still runs after the scope commits what came later:
    e.g. a "welcome" mail for a user that was never saved."""
    manager = env.manager
    ran: list[str] = []

    with manager.session_scope() as session:
        session.add(User(name="discarded"))
        session.flush()
        manager.on_commit(lambda: ran.append("discarded"))
        session.close()
        session.add(User(name="kept"))
    assert env.rows() == ["kept"]
    assert ran == []
    env.assert_clean()


async def test_async_callback_of_work_discarded_by_the_body_close_never_runs(
    aenv: Env,
) -> None:
    """Async twin: ``await session.close()`` in the scope body."""
    manager = aenv.manager
    ran: list[str] = []

    async with manager.async_session_scope() as session:
        session.add(User(name="discarded"))
        await session.flush()
        manager.on_commit(lambda: ran.append("discarded"))
        await session.close()
        session.add(User(name="kept"))
    assert aenv.rows() == ["kept"]
    assert ran == []
    aenv.assert_clean()


# -- a nested scope whose SAVEPOINT could not begin stays registered -----------------------


def test_nested_scope_that_failed_to_begin_does_not_spoil_the_owner(env: Env) -> None:
    """A ``nested`` scope whose SAVEPOINT cannot begin (here the session awaits a
    rollback after a failed flush; a cancellation or a lost connection during
    SAVEPOINT does the same) raises at entry, but its frame stays in the
    owner's list of active inner scopes. The owner's own ``session.rollback()``
    afterwards (what SQLAlchemy's error tells the user to do, and by the rules
    the owner's decision) is then taken for a rollback inside that ghost scope:
    the owner raises ``RollbackOnlyError`` naming it and the work done after
    the rollback is lost."""
    manager = env.manager
    with manager.session_scope() as session:
        session.add(User(name="taken"))

    with manager.session_scope() as session:
        session.add(User(name="taken"))
        with pytest.raises(sa_exc.IntegrityError):
            session.flush()
        with pytest.raises(sa_exc.PendingRollbackError):
            with manager.session_scope(propagation="nested"):
                pass
        session.rollback()
        session.add(User(name="after"))
    assert env.rows() == ["after", "taken"]
    env.assert_clean()


async def test_async_nested_scope_that_failed_to_begin_does_not_spoil_the_owner(
    aenv: Env,
) -> None:
    """Async twin."""
    manager = aenv.manager
    async with manager.async_session_scope() as session:
        session.add(User(name="taken"))

    async with manager.async_session_scope() as session:
        session.add(User(name="taken"))
        with pytest.raises(sa_exc.IntegrityError):
            await session.flush()
        with pytest.raises(sa_exc.PendingRollbackError):
            async with manager.async_session_scope(propagation="nested"):
                pass
        await session.rollback()
        session.add(User(name="after"))
    assert aenv.rows() == ["after", "taken"]
    aenv.assert_clean()


def test_contextmanager_helper_used_in_a_generator_is_not_seen_between_iterations(
    env: Env,
) -> None:
    """The same rule with the most common helper: a ``@contextmanager`` unit of
    work wrapping ``session_scope()``, used in a generator. The scope is taken
    for the ``with`` block's (right for a ``with`` in ordinary code), but that
    ``with`` block is inside a generator: the caller's write between
    iterations joins the generator's session and is lost on abandon."""
    manager = env.manager

    @contextlib.contextmanager
    def unit_of_work() -> Iterator[Session]:
        with manager.session_scope() as session:
            yield session

    def reader() -> Iterator[int]:
        with unit_of_work() as session:
            session.execute(text("SELECT 1"))
            yield 1
            yield 2

    rows = reader()
    next(rows)
    with manager.session_scope() as session:
        session.add(User(name="between"))
    rows.close()
    assert env.rows() == ["between"]
    env.assert_clean()


async def test_asynccontextmanager_helper_used_in_an_async_generator(aenv: Env) -> None:
    """Async twin with ``@asynccontextmanager``."""
    manager = aenv.manager

    @contextlib.asynccontextmanager
    async def unit_of_work() -> AsyncIterator[AsyncSession]:
        async with manager.async_session_scope() as session:
            yield session

    async def reader() -> AsyncIterator[int]:
        async with unit_of_work() as session:
            await session.execute(text("SELECT 1"))
            yield 1
            yield 2

    rows = reader()
    await rows.__anext__()
    async with manager.async_session_scope() as session:
        session.add(User(name="between"))
    await rows.aclose()
    assert aenv.rows() == ["between"]
    aenv.assert_clean()


def test_generators_with_a_contextmanager_helper_finished_out_of_order(env: Env) -> None:
    """Issue 10's out-of-order case, through a ``@contextmanager`` helper: the
    second generator's scope joins the first one's session (it is visible to
    everyone); the first finishes and commits; the second generator's later
    write goes to the closed session and is silently lost."""
    manager = env.manager

    @contextlib.contextmanager
    def unit_of_work() -> Iterator[Session]:
        with manager.session_scope() as session:
            yield session

    # SQLite allows one writer: each generator's session then flushes only at its
    # COMMIT, so the two never hold the write lock at once.
    flush = env.backend != "sqlite"

    def gen(name: str) -> Iterator[None]:
        with unit_of_work() as session:
            session.add(User(name=f"{name}1"))
            if flush:
                session.flush()
            yield
            session.add(User(name=f"{name}2"))
            if flush:
                session.flush()
            yield

    first, second = gen("a"), gen("b")
    try:
        next(first)
        next(second)
        for g in (first, second):  # the older one finishes first
            with contextlib.suppress(StopIteration):
                next(g)
                next(g)
        with manager.session_scope() as session:
            session.add(User(name="after"))
        assert env.rows() == ["a1", "a2", "after", "b1", "b2"]
        env.assert_clean()
    finally:
        del first, second
        gc.collect()  # today a reopened transaction is left behind (MariaDB: row locks)


async def test_async_generator_read_with_wait_for_sees_its_own_scope_on_every_python(
    aenv: Env,
) -> None:
    """Rule: same behaviour on 3.10 to 3.13, and a generator's scope is seen by
    code inside that generator. Reading a stream with a timeout,
    ``await asyncio.wait_for(stream.__anext__(), timeout)``, resumes the async
    generator in a new task per item on 3.10/3.11 (in the caller's task on
    3.12+). From the second item on, the generator's own scope is invisible
    inside it on 3.10/3.11: a decorated helper commits on its own, and when the
    generator then fails its row stays (on 3.12+ it joins and rolls back)."""
    manager = aenv.manager
    joined: list[bool] = []

    @manager.async_with_session(retry_attempts=0)
    async def helper(session: AsyncSession, name: str) -> AsyncSession:
        session.add(User(name=name))
        await session.flush()
        return session

    async def stream() -> AsyncIterator[int]:
        async with manager.async_session_scope() as session:
            session.add(User(name="first"))
            await session.flush()
            yield 1
            joined.append(await helper("second") is session)
            yield 2
            raise RuntimeError("the stream fails")

    rows = stream()
    with contextlib.suppress(RuntimeError):
        while True:
            await asyncio.wait_for(rows.__anext__(), timeout=30)
    assert joined == [True], f"Python {sys.version_info[:2]}"
    assert aenv.rows() == []
    aenv.assert_clean()


# -- the body's COMMIT through the session's Connection -------------------------------------


# A per-scope ``timeout=`` runs a statement at the start of each transaction
# from a listener on the session itself, so the session carries listeners of
# its own: the rule must hold for it too. (SQLite has no server-side statement
# timeout, so no per-scope setting of this kind.)
_COMMIT_THROUGH_CONNECTION_CASES = [(backend, {}) for backend in BACKENDS] + [
    (backend, {"timeout": 30}) for backend in ("postgresql", "mariadb")
]


def _commit_through_the_connection(
    env: Env, session: Session, lock: SqliteLock | None, calls: list[int]
) -> None:
    """One attempt of a unit that commits its first row through the session's
    connection, then (first attempt only) meets a transient error on its next write."""
    calls.append(1)
    if lock is not None:
        lock.release()
    session.add(User(name=f"paid{len(calls)}"))
    session.flush()
    session.connection().commit()
    if len(calls) == 1:
        _break_next_write(env, session, lock)
    session.add(User(name=f"receipt{len(calls)}"))
    session.flush()


def _assert_ran_once(env: Env, lock: SqliteLock | None, calls: list[int]) -> None:
    if lock is not None:
        lock.release()
    assert calls == [1], "re-run after the body's COMMIT through the connection"
    assert env.rows() == ["paid1"]
    env.assert_clean()


@pytest.mark.filterwarnings("ignore::sqlalchemy.exc.SAWarning")  # a warning, as in production
@pytest.mark.parametrize(("backend", "options"), _COMMIT_THROUGH_CONNECTION_CASES)
def test_body_commit_through_the_connection_is_never_retried(
    backend: str, options: dict[str, Any], tmp_path: Path
) -> None:
    """Rule (SPEC 3): never re-run after the body committed anything itself.
    ``session.connection().commit()`` commits the transaction as surely as
    ``session.commit()``, but only the Session's events are followed: a
    transient error afterwards re-runs the unit and the committed part is
    applied twice."""
    env, lock = _transient_env(backend, tmp_path)
    calls: list[int] = []

    @env.manager.with_session(**options)
    def work(session: Session) -> None:
        _commit_through_the_connection(env, session, lock, calls)

    try:
        with contextlib.suppress(Exception):
            work()
        _assert_ran_once(env, lock, calls)
    finally:
        if lock is not None:
            lock.close()
        env.close()


@pytest.mark.filterwarnings("ignore::sqlalchemy.exc.SAWarning")
@pytest.mark.parametrize("backend", BACKENDS)
def test_commit_through_the_connection_under_with_retry_is_never_retried(
    backend: str, tmp_path: Path
) -> None:
    """The same rule for a plain ``session_scope()`` that ``with_retry`` re-runs:
    the scope is opened under a retry boundary, so its session must follow a
    COMMIT sent through its connection as a decorated call's does."""
    env, lock = _transient_env(backend, tmp_path)
    calls: list[int] = []

    def work() -> None:
        with env.manager.session_scope() as session:
            _commit_through_the_connection(env, session, lock, calls)

    try:
        with contextlib.suppress(Exception):
            env.manager.with_retry(work, retry_delay=0.01)
        _assert_ran_once(env, lock, calls)
    finally:
        if lock is not None:
            lock.close()
        env.close()


@pytest.mark.filterwarnings("ignore::sqlalchemy.exc.SAWarning")
@pytest.mark.parametrize("backend", BACKENDS)
async def test_async_commit_through_the_connection_is_never_retried(
    backend: str, tmp_path: Path
) -> None:
    """The rule for an async decorated call: ``(await session.connection()).commit()``."""
    env, lock = _transient_env(backend, tmp_path)
    calls: list[int] = []

    @env.manager.async_with_session(retry_delay=0.01)
    async def work(session: AsyncSession) -> None:
        calls.append(1)
        if lock is not None:
            lock.release()
        session.add(User(name=f"paid{len(calls)}"))
        await session.flush()
        await (await session.connection()).commit()
        if len(calls) == 1:
            await session.run_sync(lambda s: _break_next_write(env, s, lock))
        session.add(User(name=f"receipt{len(calls)}"))
        await session.flush()

    try:
        with contextlib.suppress(Exception):
            await work()
        _assert_ran_once(env, lock, calls)
    finally:
        if lock is not None:
            lock.close()
        await env.aclose()


# -- review of the retrying twin (a decorated call's session factory) -------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_factory_configure_applies_to_decorated_calls(backend: str, tmp_path: Path) -> None:
    """``manager.session_factory.configure(...)`` changes every session the
    manager opens from then on, also those of decorated calls (opened from the
    factory's retrying twin), even after the twin was first used."""
    env = make_env(backend, tmp_path)
    manager = env.manager
    seen: list[Any] = []

    @manager.with_session
    def tenant(session: Session) -> None:
        seen.append(session.info.get("tenant"))

    try:
        tenant()
        manager.session_factory.configure(info={"tenant": "b"})
        tenant()
        with manager.session_scope() as session:
            seen.append(session.info.get("tenant"))
        assert seen == [None, "b", "b"]
    finally:
        env.close()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_async_factory_configure_applies_to_decorated_calls(
    backend: str, tmp_path: Path
) -> None:
    env = make_env(backend, tmp_path)
    manager = env.manager
    seen: list[Any] = []

    @manager.async_with_session
    async def tenant(session: AsyncSession) -> None:
        seen.append(session.info.get("tenant"))

    try:
        await tenant()
        manager.async_session_factory.configure(info={"tenant": "b"})
        await tenant()
        async with manager.async_session_scope() as session:
            seen.append(session.info.get("tenant"))
        assert seen == [None, "b", "b"]
    finally:
        await env.aclose()


def test_mariadb_timeout_on_a_mysql_url_before_the_first_connection() -> None:
    """A MariaDB server reached through a ``mysql+pymysql://`` URL: SQLAlchemy
    knows it is MariaDB only once connected, and the first scope's statement
    timeout must use MariaDB's variable, not MySQL's."""
    from sessionscope import SessionManager

    from .conftest import backend_url

    url = backend_url("mariadb", Path("/nonexistent")).replace("mariadb+pymysql", "mysql+pymysql")
    manager = SessionManager(url)
    try:
        with manager.session_scope(timeout=30) as session:
            limit = session.execute(text("SELECT @@session.max_statement_time")).scalar_one()
            assert float(limit) == 30.0
        with manager.engine.connect() as conn:  # put back when the connection returned
            limit = conn.execute(text("SELECT @@session.max_statement_time")).scalar_one()
            assert float(limit) == 0.0
    finally:
        manager.dispose()
