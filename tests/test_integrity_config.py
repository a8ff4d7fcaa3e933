"""Configuration that would silently break the scope contract, and messages that
named the wrong thing (issue 10, items 8 and 10).

- ``isolation_level="AUTOCOMMIT"`` commits each statement as it runs, so a scope
  that fails has nothing to roll back: refused unless the scope is
  ``read_only=True``, where the server is made to refuse writes for the whole
  connection session (a READ ONLY transaction does not exist in autocommit mode).
- ``nan``/``inf`` seconds are refused.
- An async URL given as the sync URL serves the sync side through the package's
  sync driver; a URL without a driver uses the drivers the extras install.
- ``functools.partial`` objects and callable instances can be decorated.
- ``PoolExhaustedError`` names only the pool that ran dry.
"""

from __future__ import annotations

import asyncio
import functools
import math
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

import sessionscope
from sessionscope import (
    PoolExhaustedError,
    ReadOnlyError,
    SessionConfig,
    SessionManager,
    async_session_scope,
    async_with_session,
    configure_session,
    session_scope,
    with_session,
)

from .conftest import backend_url, require_server, reset_schema
from .integrity_state import assert_clean, checked_out, idle_in_transaction, stored_names
from .models import User

SERVERS = ["postgresql", "mariadb"]

# -- AUTOCOMMIT ------------------------------------------------------------------


@pytest.mark.parametrize("level", ["AUTOCOMMIT", "autocommit"])
def test_autocommit_without_read_only_is_refused_everywhere(level: str) -> None:
    sessionscope.setup_database_connection("sqlite://")
    for build in (
        lambda: SessionConfig(isolation_level=level),
        lambda: configure_session(isolation_level=level),
        lambda: session_scope(isolation_level=level),
        lambda: async_session_scope(isolation_level=level),
        lambda: with_session(isolation_level=level)(lambda session: None),
        lambda: SessionManager("sqlite://").session_scope(isolation_level=level),
    ):
        with pytest.raises(ValueError, match="read_only=True"):
            build()

    async def body(session: AsyncSession) -> None:
        pass

    with pytest.raises(ValueError, match="read_only=True"):
        async_with_session(isolation_level=level)(body)
    # Allowed with read_only=True; a later override that drops read_only is not.
    assert SessionConfig(isolation_level=level, read_only=True).read_only
    configure_session(isolation_level=level, read_only=True)
    with pytest.raises(ValueError, match="read_only=True"):
        session_scope(read_only=False)
    assert configure_session().isolation_level == level


def test_autocommit_engine_is_refused_at_manager_construction(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    for kwargs in (
        {"isolation_level": "AUTOCOMMIT"},
        {"execution_options": {"isolation_level": "autocommit"}},
    ):
        with pytest.raises(ValueError, match="AUTOCOMMIT"):
            SessionManager(url, **kwargs)
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    option_engine = create_engine(url).execution_options(isolation_level="AUTOCOMMIT")
    try:
        for given in (engine, option_engine):
            with pytest.raises(ValueError, match="AUTOCOMMIT"):
                SessionManager(engine=given)
    finally:
        engine.dispose()
        option_engine.dispose()


@pytest.fixture
def server_manager(backend: str, tmp_path: Path) -> Iterator[SessionManager]:
    """The default manager on ``backend`` with ONE pooled connection, so the scope
    after a read-only AUTOCOMMIT one reuses its very connection."""
    configure_session(retry_attempts=0)
    manager = sessionscope.setup_database_connection(
        backend_url(backend, tmp_path), pool_size=1, max_overflow=0
    )
    reset_schema(manager.engine)
    manager.reset_stats()
    yield manager
    manager.dispose()


def test_a_failing_autocommit_scope_cannot_keep_its_write(server_manager: SessionManager) -> None:
    """The reported loss: on PostgreSQL/MariaDB the INSERT of a failed AUTOCOMMIT
    scope stayed. Now the scope is refused before it connects."""
    url = server_manager.url.render_as_string(hide_password=False)
    with pytest.raises(ValueError, match="read_only=True"):
        with session_scope(isolation_level="AUTOCOMMIT") as session:
            session.add(User(name="kept"))
            session.flush()
            raise RuntimeError("the scope fails")
    assert_clean(server_manager, url, set())


def _refused_by_server(err: DBAPIError, backend: str) -> bool:
    orig: Any = err.orig
    if backend == "postgresql":
        return getattr(orig, "sqlstate", None) == "25006"  # read_only_sql_transaction
    # ER_CANT_EXECUTE_IN_READ_ONLY_TRANSACTION
    return bool(orig.args) and orig.args[0] == 1792


@pytest.mark.parametrize("backend", SERVERS)
def test_read_only_autocommit_scope_refuses_writes_on_the_server_sync(
    server_manager: SessionManager, backend: str
) -> None:
    url = server_manager.url.render_as_string(hide_password=False)
    with session_scope() as session:
        session.add(User(name="before"))
    for first in ("SELECT 1", None):
        # A statement before the write uses up a "next transaction" setting: the
        # write must be refused either way.
        with pytest.raises(DBAPIError) as info:
            with session_scope(read_only=True, isolation_level="AUTOCOMMIT") as session:
                if first:
                    session.execute(text(first))
                session.execute(text("INSERT INTO ss_users (name) VALUES ('raw')"))
        assert _refused_by_server(info.value, backend), info.value
    with pytest.raises(DBAPIError) as info:
        with session_scope(read_only=True, isolation_level="AUTOCOMMIT") as session:
            session.connection().exec_driver_sql(
                "UPDATE ss_users SET name = 'changed' WHERE name = 'before'"
            )
    assert _refused_by_server(info.value, backend), info.value
    with pytest.raises(ReadOnlyError):
        with session_scope(read_only=True, isolation_level="AUTOCOMMIT") as session:
            session.add(User(name="orm"))
    with session_scope(read_only=True, isolation_level="AUTOCOMMIT") as session:
        assert set(session.scalars(select(User.name))) == {"before"}
    # The same pooled connection (pool_size=1) writes again for the next scope.
    with session_scope() as session:
        session.add(User(name="after"))
    assert_clean(server_manager, url, {"before", "after"})


@pytest.mark.parametrize("backend", SERVERS)
async def test_read_only_autocommit_scope_refuses_writes_on_the_server_async(
    server_manager: SessionManager, backend: str
) -> None:
    url = server_manager.url.render_as_string(hide_password=False)
    try:
        async with async_session_scope() as session:
            session.add(User(name="before"))
        for first in ("SELECT 1", None):
            with pytest.raises(DBAPIError) as info:
                async with async_session_scope(
                    read_only=True, isolation_level="AUTOCOMMIT"
                ) as session:
                    if first:
                        await session.execute(text(first))
                    await session.execute(text("INSERT INTO ss_users (name) VALUES ('raw')"))
            assert _refused_by_server(info.value, backend), info.value
        with pytest.raises(ReadOnlyError):
            async with async_session_scope(read_only=True, isolation_level="AUTOCOMMIT") as s:
                s.add(User(name="orm"))

        @async_with_session(read_only=True, isolation_level="AUTOCOMMIT")
        async def read(session: AsyncSession) -> set[str]:
            return set((await session.scalars(select(User.name))).all())

        assert await read() == {"before"}
        async with async_session_scope() as session:
            session.add(User(name="after"))
        assert_clean(server_manager, url, {"before", "after"})
    finally:
        await server_manager.adispose()


# -- seconds ---------------------------------------------------------------------

SECONDS = ["retry_delay", "retry_max_delay", "slow_threshold", "timeout", "long_session_warning"]


@pytest.mark.parametrize("field", SECONDS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nan_and_infinite_seconds_are_refused(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        SessionConfig(**{field: value})
    with pytest.raises(ValueError, match=field):
        configure_session(**{field: value})
    with pytest.raises(ValueError, match=field):
        session_scope(**{field: value})
    with pytest.raises(ValueError, match=field):
        with_session(**{field: value})(lambda session: None)
    assert getattr(configure_session(), field) == getattr(SessionConfig(), field)


@pytest.mark.parametrize("option", ["read_your_writes", "replica_cooldown"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nan_and_infinite_routing_seconds_are_refused(option: str, value: float) -> None:
    with pytest.raises(ValueError, match=option):
        SessionManager("sqlite://", replicas=["sqlite://"], **{option: value})


# -- URLs ------------------------------------------------------------------------

ASYNC_DRIVER = {"sqlite": "aiosqlite", "postgresql": "asyncpg", "mariadb": "aiomysql"}
SYNC_DRIVER = {"sqlite": "pysqlite", "postgresql": "psycopg", "mariadb": "pymysql"}


def test_async_and_driverless_urls_map_to_the_package_drivers() -> None:
    cases = {
        # given -> (sync URL, async URL)
        "postgresql+asyncpg://u@h/db": ("postgresql+psycopg", "postgresql+asyncpg"),
        "postgresql+psycopg_async://u@h/db": ("postgresql+psycopg", "postgresql+psycopg_async"),
        "sqlite+aiosqlite:///x.db": ("sqlite+pysqlite", "sqlite+aiosqlite"),
        "mysql+aiomysql://u@h/db": ("mysql+pymysql", "mysql+aiomysql"),
        "mariadb+asyncmy://u@h/db": ("mariadb+pymysql", "mariadb+asyncmy"),
        "postgresql://u@h/db": ("postgresql+psycopg", "postgresql+asyncpg"),
        "mysql://u@h/db": ("mysql+pymysql", "mysql+aiomysql"),
        "mariadb://u@h/db": ("mariadb+pymysql", "mariadb+aiomysql"),
        "sqlite:///x.db": ("sqlite", "sqlite+aiosqlite"),
        "postgresql+psycopg2://u@h/db": ("postgresql+psycopg2", "postgresql+asyncpg"),
        "mysql+mysqldb://u@h/db": ("mysql+mysqldb", "mysql+aiomysql"),
    }
    for given, (sync, async_) in cases.items():
        manager = SessionManager(given)
        assert (manager.url.drivername, manager.async_url.drivername) == (sync, async_), given
    explicit = SessionManager("postgresql+asyncpg://u@h/db", async_url="postgresql+asyncpg://u@h/x")
    assert explicit.async_url.database == "x" and explicit.url.drivername == "postgresql+psycopg"
    # Replicas follow the same rule.
    routed = SessionManager("postgresql://u@h/db", replicas=["postgresql+asyncpg://u@r/db"])
    engines = routed.get_stats()["routing"]["engines"]
    assert engines["replica1"]["url"] == "postgresql+psycopg://u@r/db"


@pytest.fixture
def plain_url(backend: str, tmp_path: Path) -> str:
    return backend_url(backend, tmp_path)


def _as(url: str, drivername: str) -> str:
    return make_url(url).set(drivername=drivername).render_as_string(hide_password=False)


async def test_async_url_as_database_url_serves_sync_and_async(
    plain_url: str, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``DATABASE_URL=postgresql+asyncpg://...`` (and the SQLite/MariaDB twins):
    sync scopes used the async driver and failed with MissingGreenlet."""
    given = _as(plain_url, f"{make_url(plain_url).get_backend_name()}+{ASYNC_DRIVER[backend]}")
    monkeypatch.setenv("DATABASE_URL", given)
    manager = sessionscope.setup_database_connection(pool_size=2)
    reset_schema(manager.engine)
    manager.reset_stats()
    try:
        assert manager.engine.dialect.driver == SYNC_DRIVER[backend]
        assert manager.async_engine.dialect.driver == ASYNC_DRIVER[backend]
        with session_scope() as session:
            session.add(User(name="sync"))
        async with async_session_scope() as asession:
            asession.add(User(name="async"))
        with session_scope(read_only=True) as session:
            assert set(session.scalars(select(User.name))) == {"sync", "async"}
        assert_clean(manager, plain_url, {"sync", "async"})
    finally:
        await manager.adispose()


@pytest.mark.parametrize("backend", SERVERS)
async def test_driverless_server_url_uses_the_extras_drivers(backend: str) -> None:
    """``postgresql://`` / ``mysql://`` / ``mariadb://`` used psycopg2 / MySQLdb,
    which the ``[postgresql]`` / ``[mysql]`` extras do not install."""
    url = require_server(backend)
    schemes = ["postgresql"] if backend == "postgresql" else ["mysql", "mariadb"]
    for scheme in schemes:
        manager = SessionManager(_as(url, scheme))
        reset_schema(manager.engine)
        try:
            with manager.session_scope() as session:
                session.add(User(name=f"{scheme}-sync"))
            async with manager.async_session_scope() as asession:
                asession.add(User(name=f"{scheme}-async"))
            assert_clean(manager, url, {f"{scheme}-sync", f"{scheme}-async"})
        finally:
            await manager.adispose()


# -- partials and callable instances -----------------------------------------------


def _insert(session: Session, name: str, suffix: str = "") -> str:
    session.add(User(name=name + suffix))
    session.flush()
    return name + suffix


async def _ainsert(session: AsyncSession, name: str, suffix: str = "") -> str:
    session.add(User(name=name + suffix))
    await session.flush()
    return name + suffix


class Writer:
    def __init__(self, suffix: str) -> None:
        self.suffix = suffix

    def __call__(self, name: str, session: Session) -> str:
        return _insert(session, name, self.suffix)


class AsyncWriter:
    def __init__(self, suffix: str) -> None:
        self.suffix = suffix

    async def __call__(self, name: str, session: AsyncSession) -> str:
        return await _ainsert(session, name, self.suffix)


class Rows:
    def __call__(self, session: Session) -> Iterator[str]:
        yield from session.scalars(select(User.name))


def test_partials_and_callable_instances_are_decorated_sync(manager: SessionManager) -> None:
    url = manager.url.render_as_string(hide_password=False)
    by_partial = with_session(functools.partial(_insert, suffix="-p"))
    by_instance = with_session(Writer("-i"))
    by_partial_of_instance = with_session(retry_attempts=0)(functools.partial(Writer("-pi")))
    assert by_partial("a") == "a-p"
    assert by_instance("b") == "b-i"
    assert by_partial_of_instance(name="c") == "c-pi"
    with pytest.raises(RuntimeError):
        with session_scope():
            by_instance("rolled-back")  # joins, and the enclosing scope fails
            raise RuntimeError
    functions = sessionscope.get_session_stats()["functions"]
    assert set(functions) == {f"{__name__}._insert", f"{__name__}.Writer"}
    assert functions[f"{__name__}.Writer"]["calls"] == 3
    # A coroutine behind a partial or an instance is refused by the sync decorator.
    with pytest.raises(TypeError, match="async_with_session"):
        with_session(functools.partial(_ainsert, suffix="x"))
    with pytest.raises(TypeError, match="async_with_session"):
        with_session(AsyncWriter("x"))
    # So is a generator behind an instance: its scope would end before iteration.
    with pytest.raises(TypeError, match=r"generator function .*\.Rows"):
        with_session(Rows())
    assert_clean(manager, url, {"a-p", "b-i", "c-pi"})


async def test_partials_and_callable_instances_are_decorated_async(
    manager: SessionManager,
) -> None:
    url = manager.url.render_as_string(hide_password=False)
    try:
        by_partial = async_with_session(functools.partial(_ainsert, suffix="-p"))
        by_instance = async_with_session(AsyncWriter("-i"))
        by_partial_of_instance = async_with_session(functools.partial(AsyncWriter("-pi")))
        assert await by_partial("a") == "a-p"
        assert await by_instance("b") == "b-i"
        assert await by_partial_of_instance(name="c") == "c-pi"
        functions = sessionscope.get_session_stats()["functions"]
        assert set(functions) == {f"{__name__}._ainsert", f"{__name__}.AsyncWriter"}
        with pytest.raises(TypeError, match="with_session"):
            async_with_session(functools.partial(_insert, suffix="x"))
        with pytest.raises(TypeError, match="with_session"):
            async_with_session(Writer("x"))
        assert_clean(manager, url, {"a-p", "b-i", "c-pi"})
    finally:
        await manager.adispose()


# -- PoolExhaustedError names the pool that ran dry --------------------------------


def _pool_figures(message: str) -> set[str]:
    return set(re.findall(r"\b(sync|async)_size=", message))


def test_pool_exhausted_names_only_the_sync_pool_that_ran_dry(plain_url: str) -> None:
    manager = SessionManager(plain_url, pool_size=1, max_overflow=0, pool_timeout=0.05)
    reset_schema(manager.engine)
    manager.engine.dispose()  # the sync pool starts empty, like the idle async one
    assert manager.async_engine is not None  # created, never connected: idle
    holding, release = threading.Event(), threading.Event()

    @manager.with_session(retry_attempts=0)
    def hold(session: Session) -> None:
        session.execute(select(1))
        holding.set()
        assert release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert holding.wait(30)
        with pytest.raises(PoolExhaustedError) as info:
            with manager.session_scope() as session:
                session.execute(select(1))
    finally:
        release.set()
        holder.join()
    assert _pool_figures(str(info.value)) == {"sync"}, str(info.value)
    assert "sync_checked_out=1" in str(info.value)
    assert_clean(manager, plain_url, set())
    asyncio.run(manager.adispose())


async def test_pool_exhausted_names_only_the_async_pool_that_ran_dry(plain_url: str) -> None:
    manager = SessionManager(plain_url, pool_size=1, max_overflow=0, pool_timeout=0.05)
    reset_schema(manager.engine)
    manager.engine.dispose()  # created, no connection in it: idle
    holding, release = asyncio.Event(), asyncio.Event()

    @manager.async_with_session(retry_attempts=0)
    async def hold(session: AsyncSession) -> None:
        await session.execute(select(1))
        holding.set()
        await release.wait()

    try:
        holder = asyncio.create_task(hold())
        await holding.wait()
        with pytest.raises(PoolExhaustedError) as info:
            async with manager.async_session_scope() as session:
                await session.execute(select(1))
        release.set()
        await holder
        assert _pool_figures(str(info.value)) == {"async"}, str(info.value)
        assert "async_checked_out=1" in str(info.value)
        assert checked_out(manager) == 0 and idle_in_transaction(plain_url) == 0
        assert stored_names(plain_url) == set()
        assert manager.get_stats()["active_sessions"] == 0
    finally:
        await manager.adispose()
