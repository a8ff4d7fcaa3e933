"""Findings of an adversarial review of how a scope ends (issue 13's round).

Each test failed on the code it was written against. Like tests/test_integrity.py,
each checks the rows read from another connection and that nothing is left open
(no session counted active, no connection checked out, none idle in a
transaction).

No ``from __future__ import annotations``: kept like test_integrity.py.
"""

import gc
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text

from sessionscope import RollbackOnlyError, _aborted

from .integrity import Env, make_env
from .models import User

_DUPLICATE = "INSERT INTO ss_users (id, name) VALUES (:id, 'duplicate')"


def _stats(env: Env) -> tuple[int, int]:
    stats = env.manager.get_stats()
    return stats["committed_transactions"], stats["failed_transactions"]


# -- a statement error the body catches ------------------------------------------------


def test_caught_statement_error_on_postgresql_refuses_the_commit(env: Env) -> None:
    """PostgreSQL aborts a transaction at the first failed statement and answers
    its COMMIT with a ROLLBACK, without an error. A body that catches the error
    and goes on would see its scope end normally, counted committed, its
    callbacks run, and nothing in the table. The scope refuses to commit instead;
    MariaDB and SQLite keep the transaction after such an error, so there the
    rest of the work commits."""
    manager = env.manager
    ran: list[str] = []
    before = _stats(env)

    def body() -> None:
        with manager.session_scope() as session:
            user = User(name="before the error")
            session.add(user)
            session.flush()
            with pytest.raises(sa_exc.IntegrityError):
                session.execute(text(_DUPLICATE), {"id": user.id})
            manager.on_commit(lambda: ran.append("callback"))

    if env.backend == "postgresql":
        with pytest.raises(RollbackOnlyError, match="PostgreSQL aborted"):
            body()
        assert env.rows() == [] and ran == []
        assert _stats(env) == (before[0], before[1] + 1)
    else:
        body()
        assert env.rows() == ["before the error"] and ran == ["callback"]
        assert _stats(env) == (before[0] + 1, before[1])
    env.assert_clean()
    gc.collect()
    assert not _aborted.FAILED  # the record goes with its connection: nothing kept


async def test_async_caught_statement_error_on_postgresql_refuses_the_commit(
    aenv: Env,
) -> None:
    manager = aenv.manager
    ran: list[str] = []

    async def body() -> None:
        async with manager.async_session_scope() as session:
            user = User(name="before the error")
            session.add(user)
            await session.flush()
            with pytest.raises(sa_exc.IntegrityError):
                await session.execute(text(_DUPLICATE), {"id": user.id})
            manager.on_commit(lambda: ran.append("callback"))

    if aenv.backend == "postgresql":
        with pytest.raises(RollbackOnlyError, match="PostgreSQL aborted"):
            await body()
        assert aenv.rows() == [] and ran == []
    else:
        await body()
        assert aenv.rows() == ["before the error"] and ran == ["callback"]
    aenv.assert_clean()


def test_the_bodys_own_commit_after_a_caught_error_is_refused(tmp_path: Path) -> None:
    """The body's own ``session.commit()`` would be answered with a ROLLBACK just
    the same: refused, and the scope then rolls back (PostgreSQL only: the others
    keep the transaction after such an error)."""
    env = make_env("postgresql", tmp_path)
    try:
        manager = env.manager
        with pytest.raises(RollbackOnlyError, match="PostgreSQL aborted"):
            with manager.session_scope() as session:
                user = User(name="before the error")
                session.add(user)
                session.flush()
                with pytest.raises(sa_exc.IntegrityError):
                    session.execute(text(_DUPLICATE), {"id": user.id})
                session.commit()
        assert env.rows() == []
        env.assert_clean()
    finally:
        env.close()


def test_an_error_rolled_back_to_its_savepoint_does_not_refuse_the_commit(env: Env) -> None:
    """A failed statement inside a ``nested`` scope that ends with the error rolls
    back to its SAVEPOINT, which restores the transaction: the rest commits."""
    manager = env.manager
    with manager.session_scope() as session:
        user = User(name="outer")
        session.add(user)
        session.flush()
        with pytest.raises(sa_exc.IntegrityError):
            with manager.session_scope(propagation="nested") as inner:
                inner.execute(text(_DUPLICATE), {"id": user.id})
        session.add(User(name="after the savepoint"))
    assert sorted(env.rows()) == ["after the savepoint", "outer"]
    # The next transaction on the same pooled connection is not refused.
    with manager.session_scope() as session:
        session.add(User(name="next transaction"))
    assert len(env.rows()) == 3
    env.assert_clean()


def test_a_caught_error_refuses_only_its_own_transaction(env: Env) -> None:
    manager = env.manager
    if env.backend == "postgresql":
        with pytest.raises(RollbackOnlyError):
            with manager.session_scope() as session:
                user = User(name="lost")
                session.add(user)
                session.flush()
                with pytest.raises(sa_exc.IntegrityError):
                    session.execute(text(_DUPLICATE), {"id": user.id})
    for name in ("first", "second"):  # the same pooled connection, new transactions
        with manager.session_scope() as session:
            session.add(User(name=name))
    assert sorted(env.rows())[-2:] == ["first", "second"]
    env.assert_clean()


# -- a body exception whose attributes raise ---------------------------------------------


class _OddError(Exception):
    """An exception whose ``status_code`` and ``orig`` raise when read, as a
    property over a missing response does."""

    @property
    def status_code(self) -> int:
        raise TypeError("no response")

    @property
    def orig(self) -> BaseException:
        raise KeyError("no original")


def test_body_exception_whose_attributes_raise_still_ends_the_scope(env: Env) -> None:
    """The scope reads a body exception's ``status_code`` (a web client error
    is an expected outcome) and ``orig`` (the driver's error, for the log). When
    reading them raised, the caller got that error instead of its own and the
    session was never closed: a connection idle in a transaction."""
    manager = env.manager
    with pytest.raises(_OddError):
        with manager.session_scope() as session:
            session.add(User(name="rolled back"))
            session.flush()
            raise _OddError()
    assert env.rows() == []
    env.assert_clean()


async def test_async_body_exception_whose_attributes_raise_still_ends_the_scope(
    aenv: Env,
) -> None:
    manager = aenv.manager
    with pytest.raises(_OddError):
        async with manager.async_session_scope() as session:
            session.add(User(name="rolled back"))
            await session.flush()
            raise _OddError()
    assert aenv.rows() == []
    aenv.assert_clean()


# -- a joined generator that outlives the scope it joined --------------------------------


def _suspended_past_its_owner(env: Env, first: str | None) -> Iterator[None]:
    """A generator whose scope joins its caller's, suspended at its first yield
    (having written ``first``, if given) inside a caller's scope that has since
    ended; resumed, it writes "after the owner ended" and yields again."""
    manager = env.manager

    def writer() -> Iterator[None]:
        with manager.session_scope() as session:
            if first is not None:
                session.add(User(name=first))
            yield
            session.add(User(name="after the owner ended"))
            session.flush()
            yield

    resumed = writer()
    with manager.session_scope():
        next(resumed)
    return resumed


def test_joined_generator_resumed_after_its_owner_ended(env: Env) -> None:
    """A generator's scope joins its caller's; the caller's scope ends (commits
    and closes the session) while the generator is suspended; the generator is
    resumed and writes. SQLAlchemy reopens a closed session on use, so the write
    went to a new transaction that nothing committed or closed: lost without an
    error, with a connection left checked out. The joined scope's end now rolls
    that work back, returns the connection and raises."""
    resumed = _suspended_past_its_owner(env, "inside the owner's transaction")
    with pytest.raises(RollbackOnlyError, match="ended before"):
        next(resumed)  # writes, then reaches the second yield
        next(resumed, None)  # ends the joined scope
    assert env.rows() == ["inside the owner's transaction"]
    env.assert_clean()


def test_abandoned_joined_generator_after_its_owner_ended(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """Abandoned instead of finished: the work after the owner ended is rolled
    back and the connection returned, with a warning rather than an error (its
    consumer chose to stop)."""
    resumed = _suspended_past_its_owner(env, None)
    next(resumed)
    with caplog.at_level(logging.WARNING, logger="sessionscope"):
        resumed.close()
    assert env.rows() == []
    assert any("ended before" in r.getMessage() for r in caplog.records)
    env.assert_clean()


async def test_async_joined_generator_resumed_after_its_owner_ended(aenv: Env) -> None:
    manager = aenv.manager

    async def writer() -> AsyncIterator[None]:
        async with manager.async_session_scope() as session:
            session.add(User(name="inside the owner's transaction"))
            yield
            session.add(User(name="after the owner ended"))
            await session.flush()
            yield

    resumed = writer()
    async with manager.async_session_scope():
        await resumed.__anext__()
    await resumed.__anext__()
    with pytest.raises(RollbackOnlyError, match="ended before"):
        await resumed.__anext__()
    assert aenv.rows() == ["inside the owner's transaction"]
    aenv.assert_clean()


def test_joined_generator_that_only_resumes_after_its_owner_ended(env: Env) -> None:
    """Resumed without touching the session: nothing to roll back, no error."""
    manager = env.manager

    def idle() -> Iterator[None]:
        with manager.session_scope():
            yield

    resumed = idle()
    with manager.session_scope() as session:
        session.add(User(name="owner"))
        next(resumed)
    next(resumed, None)
    assert env.rows() == ["owner"]
    env.assert_clean()
