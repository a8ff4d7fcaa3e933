"""Findings of the second adversarial review of the scope-integrity rewrite (issue 10).

Each test fails on the code it was written against and states the documented
rule it holds the product to (SPEC section 2 "Integrity rules", section 3
"Retry", docs/design.md "Scope integrity"). Like tests/test_integrity.py, each
checks the rows read from another connection and that nothing is left open.

No ``from __future__ import annotations``: kept like test_integrity.py.
"""

import asyncio
import contextlib
import contextvars
import gc
import threading
import weakref
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy import event, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from .integrity import Env, make_env
from .models import User
from .test_review_findings import _break_next_write, _Deadlocker, _two_rows

# -- a generator resumed inside a scope its caller opened later --------------------------


def test_generator_resumed_inside_a_later_scope_sees_its_own_scope(env: Env) -> None:
    """Rule: a scope opened inside a generator is seen by code running inside that
    generator (and only there). A generator whose scope began on its first
    ``next()`` and that is then iterated inside a scope the caller opens
    afterwards (peek first, then ``with session_scope(): for row in rows``)
    finds the *caller's* scope instead of its own: the caller's frame sits
    above the generator's in the context, and lookups take the first visible
    one. A decorated helper in the generator writes into the caller's session;
    the generator then fails and rolls back, the caller catches it and commits
    the helper's row: partial work of the failed generator is durable."""
    manager = env.manager
    joined: list[bool] = []

    @manager.with_session(retry_attempts=0)
    def helper(session: Session, name: str) -> Session:
        session.add(User(name=name))
        session.flush()
        return session

    def export() -> Iterator[int]:
        with manager.session_scope() as session:
            yield 1
            joined.append(helper("generator's") is session)
            yield 2
            raise RuntimeError("the export fails")

    rows = export()
    next(rows)  # peek: the generator's scope begins here
    with manager.session_scope() as outer:
        outer.add(User(name="caller's"))
        with contextlib.suppress(RuntimeError):
            for _ in rows:
                pass
    assert joined == [True], "the helper inside the generator joins the generator's scope"
    assert env.rows() == ["caller's"]
    env.assert_clean()


async def test_async_generator_resumed_inside_a_later_scope_sees_its_own_scope(
    aenv: Env,
) -> None:
    """Async twin: an async generator primed with ``__anext__()`` and then
    consumed inside an ``async_session_scope()`` of the caller."""
    manager = aenv.manager
    joined: list[bool] = []

    @manager.async_with_session(retry_attempts=0)
    async def helper(session: AsyncSession, name: str) -> AsyncSession:
        session.add(User(name=name))
        await session.flush()
        return session

    async def export() -> AsyncIterator[int]:
        async with manager.async_session_scope() as session:
            yield 1
            joined.append(await helper("generator's") is session)
            yield 2
            raise RuntimeError("the export fails")

    rows = export()
    await rows.__anext__()
    async with manager.async_session_scope() as outer:
        outer.add(User(name="caller's"))
        with contextlib.suppress(RuntimeError):
            async for _ in rows:
                pass
    assert joined == [True], "the helper inside the generator joins the generator's scope"
    assert aenv.rows() == ["caller's"]
    aenv.assert_clean()


# -- MariaDB: a deadlock caught inside the nested scope's own body --------------------------


@pytest.mark.parametrize("ending", ["normally", "set_rollback"])
def test_deadlock_caught_inside_a_nested_scope_never_commits_partial_work(
    ending: str, tmp_path: Path
) -> None:
    """Rule: nothing partial ever commits; a savepoint that cannot be rolled back
    (or released) because the whole transaction is gone marks the owner
    rollback-only. The first review fixed this for an exception escaping the
    nested scope. Here the nested body itself catches the deadlock (1213: MariaDB
    rolled back the *whole* transaction) and ends normally; the exit's RELEASE
    fails (1305, the savepoint no longer exists), its rollback fails too, and
    the RELEASE error is raised without marking the owner. The outer body
    catches it and goes on ("the outer may catch and go on"), and the owner
    commits what follows: the outer work done before the nested scope is
    silently gone. Ending the nested scope with ``set_rollback(True)`` instead
    takes the other branch (ROLLBACK TO SAVEPOINT with no exception), which
    fails and raises the same way without marking the owner."""
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
                        try:
                            inner.execute(
                                table.update().where(table.c.id == second).values(name="b")
                            )
                        except sa_exc.OperationalError as err:
                            assert "1213" in str(err.orig)  # the deadlock victim
                            if ending == "set_rollback":
                                manager.set_rollback(True)
                except sa_exc.DBAPIError:
                    pass  # the nested step is optional: go on without it
                other.thread.join()
                session.add(User(name="after"))
        assert env.rows() in (["r1", "r2"], ["after", "before", "r1", "r2"])
        env.assert_clean()
    finally:
        other.thread.join()
        env.close()


# -- the body's COMMIT through the session's connection of a rollback-only transaction -----


@pytest.mark.filterwarnings("ignore::sqlalchemy.exc.SAWarning")  # a warning, as in production
# -- retry while work started under the boundary is still running -----------------------------


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
async def test_retry_never_reruns_while_a_child_task_of_the_attempt_still_runs(
    backend: str, tmp_path: Path
) -> None:
    """Rule (SPEC 3): retry only work that is fully rolled back. ``gather`` raises
    the first error at once and leaves the other children running; a child task
    of the failed attempt that is still in its scope (its work neither committed
    nor rolled back) then commits after the retry decision, and the re-run
    attempt does the same work again: two ``child`` rows for one call."""
    env = make_env(backend, tmp_path)
    manager = env.manager
    calls: list[int] = []
    started: list[asyncio.Future[None]] = []
    gate = asyncio.Event()

    @manager.async_with_session(retry_attempts=0)
    async def child(session: AsyncSession, name: str) -> None:
        session.add(User(name=name))
        await session.flush()
        if name == "child1":
            await gate.wait()  # still working when the parent's attempt fails

    @manager.async_with_session
    async def parent(session: AsyncSession) -> None:
        calls.append(1)
        attempt = len(calls)
        if attempt == 2:
            gate.set()

        async def own_write() -> None:
            if attempt == 1:
                await session.run_sync(lambda s: _break_next_write(env, s, None))
            session.add(User(name=f"parent{attempt}"))
            await session.flush()

        task = asyncio.ensure_future(child(f"child{attempt}"))
        started.append(task)
        await asyncio.gather(task, own_write())

    try:
        with contextlib.suppress(Exception):
            await parent()
        gate.set()
        await asyncio.gather(*started, return_exceptions=True)
        rows = env.rows()
        assert not {"child1", "child2"} <= set(rows), f"the child's work ran twice: {rows}"
        env.assert_clean()
    finally:
        await env.aclose()


# -- memory held after scopes end -------------------------------------------------------------


def test_generators_finished_out_of_order_do_not_accumulate_in_the_context(env: Env) -> None:
    """Rule: finishing generators in any order never leaves a closed scope visible
    to anyone; a closed scope must not be *kept* either. A reader that primes the
    next generator before finishing the previous one (prefetch, ``pairwise``)
    pushes each new generator's frame on top of the previous one, which then
    ends below the top: it is closed but never unlinked. The context's chain of
    frames grows by one closed frame (with its ``Session``) per generator, for
    as long as the consumer keeps a newer one open on top (a long-running
    worker): about 2 KB per generator (20,000 generators:
    38 MB), and every scope lookup walks the whole chain, so each later scope
    entry gets slower (O(n), quadratic overall)."""
    manager = env.manager
    sessions: list[weakref.ref[Session]] = []

    def reader(name: str) -> Iterator[int]:
        with manager.session_scope() as session:
            sessions.append(weakref.ref(session))
            yield 1
            session.add(User(name=name))

    previous = reader("r0")
    next(previous)
    for i in range(1, 50):
        current = reader(f"r{i}")
        next(current)  # primed before the previous one is finished
        for _ in previous:
            pass
        previous = current
    # A long-running consumer: the newest reader is still open (primed).
    gc.collect()
    alive = sum(ref() is not None for ref in sessions)
    for _ in previous:
        pass
    assert alive <= 2, f"{alive} sessions of 49 finished scopes are still held"
    assert len(env.rows()) == 50
    env.assert_clean()


# -- a generator resumed in fresh contexts after an inner with-scope ended inside it ----------


def test_generator_in_fresh_contexts_keeps_its_scope_after_an_inner_with_scope(
    backend: str, tmp_path: Path
) -> None:
    """Rule: a scope opened inside a generator is seen by code running inside that
    generator, also when it is resumed in a fresh copy of its caller's context
    each time (Starlette's sync streaming; ``copy_context().run(next, g)``),
    which the first review fixed with a registry of generator scopes by the
    generator's frame. That registry holds one scope per generator frame: a
    helper that uses ``with session_scope()`` inside the generator (joining
    its scope) replaces the generator's entry and deletes it on exit. From the
    next resumption on, the generator's own scope is invisible inside it: a
    decorated helper opens a second session and commits on its own, so when
    the generator then fails, the helper's row stays (SQLite: the helper waits
    on the generator's write lock instead)."""
    options = {"connect_args": {"timeout": 0}} if backend == "sqlite" else None
    env = make_env(backend, tmp_path, options)
    manager = env.manager
    joined: list[bool] = []

    def log_progress(step: str) -> None:
        with manager.session_scope() as session:  # joins the generator's scope
            session.execute(text("SELECT 1"))

    @manager.with_session(retry_attempts=0)
    def helper(session: Session, name: str) -> Session:
        session.add(User(name=name))
        session.flush()
        return session

    def export() -> Iterator[int]:
        with manager.session_scope() as session:
            session.add(User(name="first"))
            session.flush()
            log_progress("first")
            yield 1
            joined.append(helper("second") is session)
            yield 2
            raise RuntimeError("the export fails")

    steps = export()
    try:
        with contextlib.suppress(Exception):
            while contextvars.copy_context().run(next, steps, None) is not None:
                pass
        assert joined == [True], "the helper inside the generator joins its scope"
        assert env.rows() == []
        env.assert_clean()
    finally:
        steps.close()
        env.close()


# -- a @contextmanager that delegates with yield from ------------------------------------------


def test_contextmanager_delegating_with_yield_from_is_the_with_block_scope(
    backend: str, tmp_path: Path
) -> None:
    """Rule (docs/design.md): a generator that ``contextlib.contextmanager`` drives
    is a context manager, its scope is the ``with`` block's. A unit-of-work
    helper composed by delegation, ``@contextmanager def uow(): yield from
    _scoped()``, enters the scope in the delegate generator, whose resumer is
    the ``uow`` generator rather than contextlib's ``__enter__``: the scope is
    taken as private to ``_scoped`` and is invisible in the ``with`` body. A
    decorated helper there opens its own session and commits on its own; the
    body then fails, its scope rolls back, and the helper's row stays
    (SQLite: the helper waits on the body's write lock and fails instead)."""
    options = {"connect_args": {"timeout": 0}} if backend == "sqlite" else None
    env = make_env(backend, tmp_path, options)
    manager = env.manager
    seen: list[Session] = []

    def _scoped() -> Iterator[Session]:
        with manager.session_scope() as session:
            yield session

    @contextlib.contextmanager
    def unit_of_work() -> Iterator[Session]:
        yield from _scoped()

    @manager.with_session(retry_attempts=0)
    def helper(session: Session, name: str) -> None:
        seen.append(session)
        session.add(User(name=name))
        session.flush()

    try:
        with contextlib.suppress(Exception):
            with unit_of_work() as session:
                session.add(User(name="body"))
                session.flush()
                helper("helper")
                raise RuntimeError("the unit of work fails")
        assert seen == [session], "the helper joins the with block's scope"
        assert env.rows() == []
        env.assert_clean()
    finally:
        env.close()


# -- a generator finished in another thread: its scope while it commits ---------------------


def test_scope_of_a_generator_committing_in_another_thread_is_never_joined(env: Env) -> None:
    """Rule: a scope opened inside a generator is seen only by code running inside
    that generator, and sessions are never used by two threads at once. A
    generator primed in one thread and finished in another (a producer/consumer
    queue) ends its scope there. The exit drops the frame's generator mark
    *before* committing, while the frame still sits in the producer thread's
    context: during that COMMIT the frame looks like an ordinary scope of the
    producer thread, and the producer's next ``session_scope()`` joins the
    session that the consumer is committing. Its write is added after the
    flush, the consumer then closes the session: the producer's row is
    silently lost (no error, counted as a success). With more threads the same
    race shows as "This session is in 'prepared' state" errors."""
    manager = env.manager
    committing = threading.Event()
    producer_done = threading.Event()

    def pause_commit(connection: object) -> None:
        if threading.current_thread() is not main:
            committing.set()
            producer_done.wait(10)

    main = threading.current_thread()
    event.listen(manager.engine, "commit", pause_commit)

    def reader() -> Iterator[int]:
        with manager.session_scope() as session:
            session.add(User(name="generator"))
            yield 1

    rows = reader()
    next(rows)  # primed here, finished by the consumer thread

    def consume() -> None:
        for _ in rows:
            pass

    consumer = threading.Thread(target=consume)
    consumer.start()
    try:
        assert committing.wait(10)
        if env.backend == "sqlite":
            # One writer at a time: the producer's own session waits for the
            # consumer's COMMIT, which waits here; an explicit error, not a join.
            with pytest.raises(sa_exc.OperationalError, match="locked"):
                with manager.session_scope() as session:
                    session.add(User(name="producer"))
                    session.flush()
        else:
            with manager.session_scope() as session:  # the producer's own next unit
                session.add(User(name="producer"))
    finally:
        producer_done.set()
        consumer.join()
        event.remove(manager.engine, "commit", pause_commit)
    expected = ["generator"] if env.backend == "sqlite" else ["generator", "producer"]
    assert env.rows() == expected
    env.assert_clean()


# -- an async generator finalized in another task: its scope while it ends ----------------


async def test_scope_of_an_async_generator_ending_in_another_task_is_never_joined(
    aenv: Env,
) -> None:
    """Rule: a scope opened inside a generator is seen only by code running inside
    it; a scope always ends, in whatever task it exits. An async generator
    left with ``break`` is closed in another task (the loop's finalizer hook,
    or ``create_task(rows.aclose())``). Its exit drops the frame's generator
    mark before the ROLLBACK, and the ROLLBACK awaits I/O: meanwhile the
    consuming task's next ``async_session_scope()`` finds that frame (still on
    top of its context, now looking like an ordinary scope of this task) and
    joins the session being rolled back and closed. Its write is silently lost,
    and the scope reports success."""
    manager = aenv.manager
    seen: list[AsyncSession] = []

    async def stream() -> AsyncIterator[int]:
        async with manager.async_session_scope() as session:
            seen.append(session)
            await session.execute(text("SELECT 1"))
            yield 1
            yield 2

    rows = stream()
    await rows.__anext__()
    closing = asyncio.create_task(rows.aclose())  # as the loop's finalizer does
    await asyncio.sleep(0)  # the close begins; its ROLLBACK is on the wire
    async with manager.async_session_scope() as session:
        joined = session is seen[0]
        session.add(User(name="after"))
    await closing
    assert not joined, "the consumer joined the generator's ending session"
    assert aenv.rows() == ["after"]
    aenv.assert_clean()
