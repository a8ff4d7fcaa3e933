"""A scope's session and bookkeeping are freed when the scope ends, by reference
counting alone, as raw SQLAlchemy's are.

A reference cycle among them (a scope that refers to itself as the owner of its
transaction) keeps the session, its identity map and the scope's objects alive
until the cyclic garbage collector runs: memory held for nothing under load, and
the collector's time spent on every transaction's objects. Each test turns the
collector off and checks, through a weak reference, that the session is gone as
soon as the last name for it is.
"""

import contextlib
import gc
import weakref
from collections.abc import Iterator
from typing import Literal

import pytest
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from .integrity import Env
from .models import User


@contextlib.contextmanager
def _collector_off() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def test_scope_session_is_freed_when_the_scope_ends(env: Env) -> None:
    with _collector_off():
        with env.manager.session_scope() as session:
            session.add(User(name="scope"))
            ref = weakref.ref(session)
        del session
        assert ref() is None
    assert env.rows() == ["scope"]
    env.assert_clean()


def test_decorated_call_session_is_freed_when_the_call_returns(env: Env) -> None:
    refs: list[weakref.ref[Session]] = []

    @env.manager.with_session
    def work(session: Session) -> None:
        refs.append(weakref.ref(session))
        session.add(User(name="decorated"))

    with _collector_off():
        work()
        assert refs[0]() is None
    assert env.rows() == ["decorated"]
    env.assert_clean()


@pytest.mark.parametrize("propagation", ["required", "nested", "requires_new"])
def test_inner_scopes_leave_nothing_to_the_collector(
    env: Env, propagation: Literal["required", "nested", "requires_new"]
) -> None:
    manager = env.manager
    refs: list[weakref.ref[Session]] = []
    with _collector_off():
        with manager.session_scope() as session:
            session.add(User(name="outer"))
            refs.append(weakref.ref(session))
            with manager.session_scope(propagation=propagation) as inner:
                inner.add(User(name="inner"))
                refs.append(weakref.ref(inner))
            del inner
        del session
        assert [ref() for ref in refs] == [None, None]
    assert env.rows() == ["inner", "outer"]
    env.assert_clean()


def test_failed_scope_session_is_freed_when_the_error_is_handled(env: Env) -> None:
    refs: list[weakref.ref[Session]] = []

    def fail() -> None:
        with env.manager.session_scope() as session:
            session.add(User(name="failed"))
            refs.append(weakref.ref(session))
            raise LookupError("the body fails")

    with _collector_off():
        with contextlib.suppress(LookupError):
            fail()
        assert refs[0]() is None
    assert env.rows() == []
    env.assert_clean()


async def test_async_scope_session_is_freed_when_the_scope_ends(aenv: Env) -> None:
    """The pooled connection is made first, outside any scope: asyncio keeps the
    context current when a connection's socket is first watched for as long as
    the connection lives, and a scope open then is in that context."""
    refs: list[weakref.ref[AsyncSession]] = []
    async with aenv.manager.async_engine.connect():
        pass
    with _collector_off():
        async with aenv.manager.async_session_scope() as session:
            session.add(User(name="async"))
            refs.append(weakref.ref(session))
            async with aenv.manager.async_session_scope(propagation="nested") as inner:
                inner.add(User(name="async inner"))
            del inner
        del session
        assert refs[0]() is None
    assert aenv.rows() == ["async", "async inner"]
    aenv.assert_clean()
