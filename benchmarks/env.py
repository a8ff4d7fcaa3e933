"""One database as every contender sees it: the sessionscope managers, the raw
SQLAlchemy factories and the peers' objects.

The reference, ``raw``, is what a user writes without sessionscope: a
``sessionmaker`` on a plain ``create_engine`` of the same URL and pool options.
On SQLite the manager installs the BEGIN recipe on its engines (an explicit
``BEGIN`` per transaction, needed for real savepoints and transactional reads),
so ``raw_recipe``, raw SQLAlchemy on the manager's engine, is measured beside it:
the difference between the two is the price of the recipe, the difference
between ``raw_recipe`` and the scope the price of session handling. The peers
run on the manager's engines.

Every contender uses ``expire_on_commit=False`` (sessionscope's default), so
they do the same work after COMMIT.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from sqlalchemy import String, create_engine, delete, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sessionscope import SessionConfig, SessionManager

__all__ = ["Env", "make_model"]


def make_model(table: str) -> tuple[type[DeclarativeBase], type[Any]]:
    """A declarative base and a trivial ``Row`` model on ``table``.

    Built per run so concurrent runs against one PostgreSQL database use
    different tables and never see each other's rows.
    """

    class Base(DeclarativeBase):
        pass

    class Row(Base):
        __tablename__ = table

        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(String(80))

    return Base, Row


class Env:
    """Everything the workloads need on one database (``sqlite://`` in memory or a
    PostgreSQL URL). Async objects are created in :meth:`setup_async`, inside the
    event loop that will use them."""

    def __init__(
        self,
        backend: str,
        url: str,
        *,
        pool_size: int = 10,
        tag: str = "",
        pool_timeout: float | None = None,
    ) -> None:
        self.backend = backend
        self.url = url
        table = (
            f"ss_bench_rows_{os.getpid()}{tag}" if backend == "postgresql" else "ss_bench_rows"
        )
        self.Base, self.Row = make_model(table)
        options: dict[str, Any] = {}
        if backend == "postgresql":
            # SPEC section 5: pool of 10 and no overflow, so 200 tasks queue for it.
            options = {"pool_size": pool_size, "max_overflow": 0}
            if pool_timeout is not None:
                options["pool_timeout"] = pool_timeout
        self.manager = SessionManager(url, **options)
        self._options = options
        self.plain_engine: Engine | None = None
        self.plain_async_engine: AsyncEngine | None = None
        self._sync_ready = False
        self._async_ready = False
        self._server_table = False

    # -- sync ------------------------------------------------------------------

    def setup_sync(self) -> None:
        if self._sync_ready:
            return
        engine = self.manager.engine
        self.plain_engine = plain = create_engine(self.url, **self._options)
        if self.backend == "sqlite" or not self._server_table:
            self.Base.metadata.drop_all(engine)
            self.Base.metadata.create_all(engine)
            self._server_table = self.backend != "sqlite"
        if self.backend == "sqlite":  # a database of its own (in memory)
            self.Base.metadata.create_all(plain)
        self.quiet = SessionManager(
            engine=engine, config=SessionConfig(enable_monitoring=False)
        )
        self.raw: sessionmaker[Session] = sessionmaker(plain, expire_on_commit=False)
        self.raw_recipe: sessionmaker[Session] | None = (
            sessionmaker(engine, expire_on_commit=False) if self.backend == "sqlite" else None
        )
        self._sync_ready = True

    def _sync_engines(self) -> list[Engine]:
        """Engines holding rows: the manager's and, on SQLite, the plain one."""
        engines = [self.manager.engine]
        if self.backend == "sqlite" and self.plain_engine is not None:
            engines.append(self.plain_engine)
        return engines

    @functools.cached_property
    def aa_sync(self) -> Any:
        """advanced-alchemy's sync config on the manager's engine (imported on first
        use, so runs without this peer do not pay for importing it)."""
        from advanced_alchemy.config import SQLAlchemySyncConfig, SyncSessionConfig

        return SQLAlchemySyncConfig(
            engine_instance=self.manager.engine,
            session_config=SyncSessionConfig(expire_on_commit=False),
        )

    def clear_sync(self) -> None:
        """Empty the table (SQLite truncates), so a measurement starts from the same
        table as the one before it: a growing B-tree makes later inserts dearer."""
        for engine in self._sync_engines():
            with engine.begin() as conn:
                conn.execute(delete(self.Row))

    def count_sync(self, tag: str) -> int:
        total = 0
        for engine in self._sync_engines():
            with engine.connect() as conn:
                total += int(
                    conn.scalar(select(func.count()).where(self.Row.name == tag)) or 0
                )
        return total

    # -- async -----------------------------------------------------------------

    async def setup_async(self) -> None:
        if self._async_ready:
            return
        engine: AsyncEngine = self.manager.async_engine
        self.plain_async_engine = plain = create_async_engine(
            self.manager.async_url, **self._options
        )
        if self.backend == "sqlite" or not self._server_table:
            # On SQLite the async engine has its own in-memory database.
            async with engine.begin() as conn:
                await conn.run_sync(self.Base.metadata.drop_all)
                await conn.run_sync(self.Base.metadata.create_all)
            self._server_table = self.backend != "sqlite"
        if self.backend == "sqlite":
            async with plain.begin() as conn:
                await conn.run_sync(self.Base.metadata.create_all)
        self.quiet_async = SessionManager(
            async_engine=engine, config=SessionConfig(enable_monitoring=False)
        )
        self.araw = async_sessionmaker(plain, expire_on_commit=False)
        self.araw_recipe = (
            async_sessionmaker(engine, expire_on_commit=False)
            if self.backend == "sqlite"
            else None
        )
        self._async_ready = True

    def _async_engines(self) -> list[AsyncEngine]:
        engines = [self.manager.async_engine]
        if self.backend == "sqlite" and self.plain_async_engine is not None:
            engines.append(self.plain_async_engine)
        return engines

    @functools.cached_property
    def aa_async(self) -> Any:
        """advanced-alchemy's async config on the manager's async engine."""
        from advanced_alchemy.config import AsyncSessionConfig, SQLAlchemyAsyncConfig

        return SQLAlchemyAsyncConfig(
            engine_instance=self.manager.async_engine,
            session_config=AsyncSessionConfig(expire_on_commit=False),
        )

    @functools.cached_property
    def fas_db(self) -> Any:
        """fastapi-async-sqlalchemy's ``db`` proxy on the manager's async engine."""
        return _fastapi_async_sqlalchemy_db(self.manager.async_engine)

    async def clear_async(self) -> None:
        """Async twin of :meth:`clear_sync`."""
        for engine in self._async_engines():
            async with engine.begin() as conn:
                await conn.execute(delete(self.Row))

    async def count_async(self, tag: str) -> int:
        total = 0
        for engine in self._async_engines():
            async with engine.connect() as conn:
                total += int(
                    await conn.scalar(select(func.count()).where(self.Row.name == tag)) or 0
                )
        return total

    # -- teardown ----------------------------------------------------------------

    async def aclose(self) -> None:
        """Drop the server table (if any) and dispose of every engine."""
        if self._server_table:
            async with self.manager.async_engine.begin() as conn:
                await conn.run_sync(self.Base.metadata.drop_all)
            self._server_table = False
        if self.plain_async_engine is not None:
            await self.plain_async_engine.dispose()
        await self.manager.adispose()
        self.dispose_plain()

    def close(self) -> None:
        """Sync twin of :meth:`aclose` for runs that never used the async engine."""
        if self._server_table:
            self.Base.metadata.drop_all(self.manager.engine)
            self._server_table = False
        self.manager.dispose()
        self.dispose_plain()

    def dispose_plain(self) -> None:
        if self.plain_engine is not None:
            self.plain_engine.dispose()


def _fastapi_async_sqlalchemy_db(engine: AsyncEngine) -> Any:
    """fastapi-async-sqlalchemy's ``db`` proxy bound to ``engine``.

    The library binds its session factory when its middleware is constructed;
    outside a request, ``async with db(): ...`` is its documented way to get a
    session. A private middleware/proxy pair per engine keeps the contenders'
    engines apart (the module-level ``db`` is a process-wide singleton).
    """
    from fastapi_async_sqlalchemy.middleware import create_middleware_and_session_proxy

    middleware_cls, db = create_middleware_and_session_proxy()

    async def _no_app(scope: Any, receive: Any, send: Any) -> None:  # never called
        return None

    middleware_cls(_no_app, custom_engine=engine, commit_on_exit=True)
    return db
