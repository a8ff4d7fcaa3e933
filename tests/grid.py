"""One API over the sync and async fronts, so each semantics scenario is written
once and run against both.

A scenario is plain synchronous code taking an ``Api``. For the async front it
runs inside SQLAlchemy's greenlet bridge: every async call (scope entry/exit,
decorated calls, ``execute``) is awaited through ``await_only``, so the scenario
really drives ``async_session_scope`` / ``async_with_session`` on the async
drivers, in one asyncio task.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from types import TracebackType
from typing import Any

from sqlalchemy import Executable
from sqlalchemy.util import await_only, greenlet_spawn

import sessionscope
from sessionscope import SessionManager

from .conftest import StatementLog


class Api:
    """The operations a scenario needs, bound to one front (sync or async)."""

    is_async = False

    def __init__(self, manager: SessionManager) -> None:
        self.manager = manager
        self.log = StatementLog()
        self.log.attach(self.engine)

    @property
    def engine(self) -> Any:
        return self.manager.engine

    def scope(self, **overrides: Any) -> Any:
        return sessionscope.session_scope(**overrides)

    def decorate(self, fn: Callable[..., Any], **overrides: Any) -> Callable[..., Any]:
        if overrides:
            return sessionscope.with_session(**overrides)(fn)
        return sessionscope.with_session(fn)

    def execute(self, session: Any, statement: Executable) -> Any:
        return session.execute(statement)

    def scalar(self, session: Any, statement: Executable) -> Any:
        return session.scalar(statement)

    def flush(self, session: Any) -> None:
        session.flush()

    def commit(self, session: Any) -> None:
        session.commit()

    def rollback(self, session: Any) -> None:
        session.rollback()

    def checked_out(self) -> int:
        # NullPool (aiosqlite's default in early SQLAlchemy 2.0 releases) keeps no
        # connection: one returned to it is closed, none can stay checked out.
        pool = self.engine.pool
        return int(pool.checkedout()) if hasattr(pool, "checkedout") else 0

    def run(self, scenario: Callable[[Api], Any]) -> Any:
        return scenario(self)


class _Bridge:
    """A sync context manager driving an async one through ``await_only``."""

    def __init__(self, acm: Any) -> None:
        self._acm = acm

    def __enter__(self) -> Any:
        return await_only(self._acm.__aenter__())

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        return bool(await_only(self._acm.__aexit__(exc_type, exc, tb)))


class AsyncApi(Api):
    is_async = True

    @property
    def engine(self) -> Any:
        return self.manager.async_engine.sync_engine

    def scope(self, **overrides: Any) -> Any:
        return _Bridge(sessionscope.async_session_scope(**overrides))

    def decorate(self, fn: Callable[..., Any], **overrides: Any) -> Callable[..., Any]:
        @functools.wraps(fn)
        async def afn(*args: Any, **kwargs: Any) -> Any:
            return await greenlet_spawn(fn, *args, **kwargs)

        decorated = (
            sessionscope.async_with_session(**overrides)(afn)
            if overrides
            else sessionscope.async_with_session(afn)
        )

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            return await_only(decorated(*args, **kwargs))

        call.__signature__ = decorated.__signature__  # type: ignore[attr-defined]
        return call

    def execute(self, session: Any, statement: Executable) -> Any:
        return await_only(session.execute(statement))

    def scalar(self, session: Any, statement: Executable) -> Any:
        return await_only(session.scalar(statement))

    def flush(self, session: Any) -> None:
        await_only(session.flush())

    def commit(self, session: Any) -> None:
        await_only(session.commit())

    def rollback(self, session: Any) -> None:
        await_only(session.rollback())

    def run(self, scenario: Callable[[Api], Any]) -> Any:
        async def main() -> Any:
            try:
                return await greenlet_spawn(scenario, self)
            finally:
                await self.manager.adispose()

        return asyncio.run(main())


def make_api(mode: str, manager: SessionManager) -> Api:
    return AsyncApi(manager) if mode == "async" else Api(manager)
