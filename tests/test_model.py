"""Model-based test of the scope rules (SPEC section 6): random programs of
nested scopes, decorated calls, every propagation, caught and uncaught
exceptions, ``set_rollback``, the body's own ``commit()``/``rollback()``,
``on_commit``, generators and (async) child tasks and ``asyncio.wait_for``,
run with sessionscope against SQLite and PostgreSQL and compared with the
reference model in tests/scope_model.py: the committed rows, the callbacks run
and how each top-level operation ended must be the same, and nothing may be
left open.

CI runs a fixed number of programs with a fixed seed (the ``ci`` Hypothesis
profile); reproduce a failure locally with ``pytest tests/test_model.py
--hypothesis-seed=N``, or from the printed ``@reproduce_failure`` blob.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from sqlalchemy import delete
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from sessionscope import (
    ActiveScopeError,
    NoActiveScopeError,
    RollbackOnlyError,
    SessionManager,
)

from .integrity import Env, make_env
from .models import User
from .scope_model import (
    Child,
    Commit,
    Gen,
    Model,
    OnCommit,
    Op,
    Program,
    Rollback,
    Scope,
    SetRollback,
    Write,
    programs,
)

# Programs per CI run: 2,000 on SQLite and 300 on PostgreSQL, half sync, half async.
EXAMPLES = {"sqlite": 1000, "postgresql": 150}
if os.environ.get("SESSIONSCOPE_MODEL_EXAMPLES"):
    EXAMPLES = dict.fromkeys(EXAMPLES, int(os.environ["SESSIONSCOPE_MODEL_EXAMPLES"]))

KINDS = {
    RollbackOnlyError: "RollbackOnlyError",
    NoActiveScopeError: "NoActiveScopeError",
    ActiveScopeError: "ActiveScopeError",
}


class Boom(Exception):
    """The failure a program raises on purpose."""


def kind_of(err: BaseException) -> str:
    if isinstance(err, Boom):
        return "Boom"
    for cls, name in KINDS.items():
        if isinstance(err, cls):
            return name
    raise err  # anything else is a defect: let the test fail with it


class SyncRun:
    """Interprets a program with the sync API."""

    def __init__(self, manager: SessionManager) -> None:
        self.manager = manager
        self.ran: list[str] = []

    def run(self, program: Program) -> list[str | None]:
        outcomes: list[str | None] = []
        for op in program.ops:
            try:
                self.op(op, None)
                outcomes.append(None)
            except Exception as err:
                outcomes.append(kind_of(err))
        return outcomes

    def body(self, ops: list[Op], session: Session | None) -> None:
        for op in ops:
            self.op(op, session)

    def op(self, op: Op, session: Session | None) -> None:
        manager = self.manager
        if isinstance(op, Scope):
            try:
                self.scope(op)
            except Exception as err:
                kind_of(err)
                if not op.caught:
                    raise
        elif isinstance(op, Gen):
            try:
                self.gen(op, session)
            except Exception as err:
                kind_of(err)
                if not op.caught:
                    raise
        elif isinstance(op, Child):
            raise AssertionError("child tasks are generated for async programs only")
        else:
            assert session is not None
            if isinstance(op, Write):
                session.add(User(name=op.name))
                session.flush()
            elif isinstance(op, SetRollback):
                manager.set_rollback(True)
            elif isinstance(op, OnCommit):
                tag = op.tag
                manager.on_commit(lambda: self.ran.append(tag))
            elif isinstance(op, Commit):
                session.commit()
            elif isinstance(op, Rollback):
                session.rollback()

    def scope(self, op: Scope) -> None:
        if op.decorated:

            @self.manager.with_session(propagation=op.propagation)
            def decorated(session: Session) -> None:
                self.body(op.body, session)
                if op.fail:
                    raise Boom()

            decorated()
            return
        with self.manager.session_scope(propagation=op.propagation) as session:
            self.body(op.body, session)
            if op.fail:
                raise Boom()

    def gen(self, op: Gen, caller: Session | None) -> None:
        def generator() -> Iterator[None]:
            with self.manager.session_scope(propagation=op.propagation) as session:
                self.body(op.body, session)
                yield

        g = generator()
        next(g)
        try:
            self.body(op.between, caller)
        except BaseException:
            g.close()
            raise
        if op.finish:
            with contextlib.suppress(StopIteration):
                next(g)
        else:
            g.close()


class AsyncRun:
    """Interprets a program with the async API."""

    def __init__(self, manager: SessionManager) -> None:
        self.manager = manager
        self.ran: list[str] = []

    async def run(self, program: Program) -> list[str | None]:
        outcomes: list[str | None] = []
        for op in program.ops:
            try:
                await self.op(op, None)
                outcomes.append(None)
            except Exception as err:
                outcomes.append(kind_of(err))
        return outcomes

    async def body(self, ops: list[Op], session: AsyncSession | None) -> None:
        for op in ops:
            await self.op(op, session)

    async def op(self, op: Op, session: AsyncSession | None) -> None:
        manager = self.manager
        if isinstance(op, (Scope, Gen, Child)):
            try:
                if isinstance(op, Scope):
                    await self.scope(op)
                elif isinstance(op, Gen):
                    await self.gen(op, session)
                else:
                    await self.child(op)
            except Exception as err:
                kind_of(err)
                if not op.caught:
                    raise
            return
        assert session is not None
        if isinstance(op, Write):
            session.add(User(name=op.name))
            await session.flush()
        elif isinstance(op, SetRollback):
            manager.set_rollback(True)
        elif isinstance(op, OnCommit):
            tag = op.tag
            manager.on_commit(lambda: self.ran.append(tag))
        elif isinstance(op, Commit):
            await session.commit()
        elif isinstance(op, Rollback):
            await session.rollback()

    async def scope(self, op: Scope) -> None:
        if op.decorated:

            @self.manager.async_with_session(propagation=op.propagation)
            async def decorated(session: AsyncSession) -> None:
                await self.body(op.body, session)
                if op.fail:
                    raise Boom()

            if op.wait_for:
                await asyncio.wait_for(decorated(), timeout=60)
            else:
                await decorated()
            return
        async with self.manager.async_session_scope(propagation=op.propagation) as session:
            await self.body(op.body, session)
            if op.fail:
                raise Boom()

    async def child(self, op: Child) -> None:
        @self.manager.async_with_session
        async def in_child_task(session: AsyncSession) -> None:
            await self.body(op.body, session)
            if op.fail:
                raise Boom()

        await asyncio.gather(in_child_task())

    async def gen(self, op: Gen, caller: AsyncSession | None) -> None:
        async def generator() -> AsyncIterator[None]:
            async with self.manager.async_session_scope(propagation=op.propagation) as session:
                await self.body(op.body, session)
                yield

        g = generator()
        await g.__anext__()
        try:
            await self.body(op.between, caller)
        except BaseException:
            await g.aclose()
            raise
        if op.finish:
            with contextlib.suppress(StopAsyncIteration):
                await g.__anext__()
        else:
            await g.aclose()


def _reset(env: Env) -> None:
    with env.manager.engine.begin() as conn:
        conn.execute(delete(User))


def _check(env: Env, program: Program, outcomes: list[str | None], ran: list[str]) -> None:
    model = Model()
    expected = model.run(program)
    assert outcomes == expected, f"outcomes differ for {program.ops!r}"
    assert sorted(env.rows()) == sorted(model.committed), f"rows differ for {program.ops!r}"
    assert ran == model.ran, f"callbacks differ for {program.ops!r}"
    assert env.manager.get_stats()["active_sessions"] == 0
    assert env.checked_out() == 0


def model_settings(backend: str) -> settings:
    return settings(
        max_examples=EXAMPLES[backend],
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def model_env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Env]:
    env = make_env(request.param, tmp_path)
    env.manager.configure(retry_attempts=0, long_session_warning=None, log_level="CRITICAL")
    yield env
    env.close()


def test_sync_programs_follow_the_model(model_env: Env) -> None:
    env = model_env

    @model_settings(env.backend)
    @given(program=programs(is_async=False, concurrent=env.backend != "sqlite"))
    def check(program: Program) -> None:
        _reset(env)
        run = SyncRun(env.manager)
        outcomes = run.run(program)
        _check(env, program, outcomes, run.ran)

    check()


def test_async_programs_follow_the_model(model_env: Env) -> None:
    env = model_env

    @model_settings(env.backend)
    @given(program=programs(is_async=True, concurrent=env.backend != "sqlite"))
    def check(program: Program) -> None:
        _reset(env)

        async def main() -> tuple[list[str | None], list[str]]:
            run = AsyncRun(env.manager)
            try:
                return await run.run(program), run.ran
            finally:
                await env.manager.async_engine.dispose()

        outcomes, ran = asyncio.run(main())
        _check(env, program, outcomes, ran)

    check()
