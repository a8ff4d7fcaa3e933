"""sessionscope.testing and the hook under it, SessionManager.bound_to().

Two layers, each on SQLite, PostgreSQL and MariaDB:

- ``bound_to`` in this process: scopes commit into savepoints of one outer
  transaction, failures roll back to their savepoint, and nothing is left once
  the outer transaction is rolled back;
- the plugin as a user opts in to it: a separate pytest run whose conftest says
  ``pytest_plugins = ["sessionscope.testing"]``, with sync, async and FastAPI
  tests that commit; afterwards the tables must be exactly as before.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from sessionscope import (
    ReadOnlyError,
    SessionManager,
    async_session_scope,
    async_with_session,
    on_commit,
    session_scope,
    with_session,
)

from .conftest import run_pytest
from .models import User

COUNT = select(func.count()).select_from(User)
ROOT = Path(__file__).resolve().parents[1]


def committed_users(manager: SessionManager) -> int:
    with manager.engine.connect() as conn:
        return int(conn.scalar(COUNT) or 0)


# -- bound_to, sync ------------------------------------------------------------------


def test_bound_scopes_commit_into_the_outer_transaction(manager: SessionManager) -> None:
    @with_session
    def signup(session: Session, name: str) -> None:
        session.add(User(name=name))

    after_commit: list[str] = []
    with manager.engine.connect() as conn:
        outer = conn.begin()
        with manager.bound_to(conn):
            signup("ann")
            with session_scope() as session:
                session.add(User(name="bob"))
                on_commit(lambda: after_commit.append("bob"))
            with pytest.raises(IntegrityError), session_scope() as session:
                session.add(User(name="ann"))  # duplicate: this scope alone rolls back
            with session_scope() as session:
                names = session.scalars(select(User.name).order_by(User.name)).all()
            assert names == ["ann", "bob"]
            assert conn.scalar(COUNT) == 2
        outer.rollback()
    assert after_commit == ["bob"]
    assert committed_users(manager) == 0
    # Unbound again: scopes commit for real.
    signup("cid")
    assert committed_users(manager) == 1


def test_bound_nested_and_requires_new_share_the_connection(manager: SessionManager) -> None:
    with manager.engine.connect() as conn:
        outer = conn.begin()
        with manager.bound_to(conn):
            with session_scope() as session:
                session.add(User(name="outer"))
                session.flush()
                with pytest.raises(RuntimeError), session_scope(propagation="nested") as inner:
                    inner.add(User(name="undone"))
                    inner.flush()
                    raise RuntimeError
                # On a connection of its own this would wait for the outer's row
                # locks (or SQLite's write lock); bound, it runs in a savepoint.
                with session_scope(propagation="requires_new") as other:
                    assert other is not session
                    other.add(User(name="independent"))
            assert sorted(conn.scalars(select(User.name)).all()) == ["independent", "outer"]
        outer.rollback()
    assert committed_users(manager) == 0


def test_bound_per_scope_options(manager: SessionManager) -> None:
    with manager.engine.connect() as conn:
        outer = conn.begin()
        with manager.bound_to(conn):
            with session_scope(isolation_level="SERIALIZABLE") as session:
                session.add(User(name="ann"))  # in the test transaction, not a new one
            with pytest.raises(ReadOnlyError), session_scope(read_only=True) as session:
                assert session.scalar(COUNT) == 1
                session.add(User(name="bob"))
                session.flush()
        outer.rollback()
    assert committed_users(manager) == 0


def test_bound_to_needs_an_open_transaction(manager: SessionManager) -> None:
    with manager.engine.connect() as conn:
        with pytest.raises(ValueError, match="open transaction"), manager.bound_to(conn):
            pass
    with session_scope() as session:  # nothing was left bound
        session.add(User(name="ann"))
    assert committed_users(manager) == 1


# -- bound_to, async -----------------------------------------------------------------


async def test_async_bound_scopes(manager: SessionManager) -> None:
    @async_with_session
    async def signup(session: AsyncSession, name: str) -> None:
        session.add(User(name=name))

    try:
        async with manager.async_engine.connect() as conn:
            outer = await conn.begin()
            with manager.bound_to(conn):
                await signup("ann")
                with pytest.raises(IntegrityError):
                    await signup("ann")
                async with async_session_scope() as session:
                    assert await session.scalar(COUNT) == 1
                    async with async_session_scope(propagation="nested") as inner:
                        inner.add(User(name="bob"))
                assert await conn.scalar(COUNT) == 2
            await outer.rollback()
        assert committed_users(manager) == 0
        await signup("cid")  # unbound: a real commit
        assert committed_users(manager) == 1
        assert manager.get_stats()["active_sessions"] == 0
    finally:
        await manager.adispose()


# -- the plugin, as a user opts in ---------------------------------------------------

CONFTEST = """
import os

import pytest

import sessionscope

pytest_plugins = ["sessionscope.testing"]

manager = sessionscope.setup_database_connection(os.environ["SESSIONSCOPE_INNER_URL"])


@pytest.fixture(scope="session", autouse=True)
def _dispose_at_the_end():
    yield
    manager.dispose()  # the async pool is disposed after each async test
"""

INNER_TESTS = """
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import BaseModel
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from sessionscope import async_session_scope, async_with_session, session_scope, with_session
from sessionscope.fastapi import SessionDep, SyncSessionDep
from tests.models import User

# The table holds one row from before the run ("existing"); count the others.
COUNT = select(func.count()).select_from(User).where(User.name != "existing")


@with_session
def signup(session: Session, name: str) -> None:
    session.add(User(name=name))


@async_with_session
async def asignup(session: AsyncSession, name: str) -> None:
    session.add(User(name=name))


def count() -> int:
    with session_scope() as session:
        return session.scalar(COUNT)


async def acount() -> int:
    async with async_session_scope() as session:
        return await session.scalar(COUNT)


def test_sync_commits_are_seen_in_the_test(sessionscope_transaction):
    signup("ann")
    signup("bob")
    assert count() == 2
    assert sessionscope_transaction.scalar(COUNT) == 2


def test_sync_next_test_starts_clean(sessionscope_transaction):
    assert count() == 0
    signup("ann")  # the same name again: fails if the last test's row survived
    with pytest.raises(IntegrityError):
        signup("ann")
    assert count() == 1


async def test_async_commits_are_seen_in_the_test(sessionscope_async_transaction):
    await asignup("ann")
    assert await acount() == 1


async def test_async_next_test_starts_clean(sessionscope_async_transaction):
    assert await acount() == 0
    await asignup("ann")


def test_session_fixture_arranges_data_for_the_code_under_test(session):
    session.add(User(name="arranged"))
    session.flush()  # on the test's connection: the code under test sees it
    assert count() == 1
    signup("bob")
    assert session.scalar(COUNT) == 2


def test_session_fixture_next_test_starts_clean(session):
    assert session.scalar(COUNT) == 0


async def test_async_session_fixture(async_session):
    async_session.add(User(name="arranged"))
    await async_session.commit()  # releases its savepoint only
    await asignup("bob")
    assert await async_session.scalar(COUNT) == 2


async def test_async_session_fixture_next_test_starts_clean(async_session):
    assert await async_session.scalar(COUNT) == 0


class UserIn(BaseModel):
    name: str


app = FastAPI()


@app.post("/async", status_code=201)
async def create(data: UserIn, db: SessionDep) -> dict[str, Any]:
    db.add(User(name=data.name))
    return {}


@app.post("/sync", status_code=201)
def create_sync(data: UserIn, db: SyncSessionDep) -> dict[str, Any]:
    db.add(User(name=data.name))
    return {}


@app.get("/count")
async def read_count(db: SessionDep) -> int:
    return await db.scalar(COUNT)


def client() -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


async def test_fastapi_async_requests(sessionscope_async_transaction):
    async with client() as c:
        assert (await c.post("/async", json={"name": "ann"})).status_code == 201
        assert (await c.post("/async", json={"name": "ann"})).status_code == 500
        assert (await c.get("/count")).json() == 1


async def test_fastapi_sync_requests(sessionscope_transaction):
    async with client() as c:
        assert (await c.post("/sync", json={"name": "ann"})).status_code == 201
        assert (await c.post("/sync", json={"name": "ann"})).status_code == 500
        assert (await c.post("/sync", json={"name": "bob"})).status_code == 201
    assert count() == 2
"""


def test_plugin_leaves_the_database_unchanged(manager: SessionManager, tmp_path: Path) -> None:
    with session_scope() as session:
        session.add(User(name="existing"))
    url = manager.url.render_as_string(hide_password=False)
    manager.dispose()  # no pooled connection of ours holds a lock meanwhile
    (tmp_path / "conftest.py").write_text(textwrap.dedent(CONFTEST))
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(INNER_TESTS))
    env = dict(os.environ)
    env["SESSIONSCOPE_INNER_URL"] = url
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    result = run_pytest(tmp_path, env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "10 passed" in result.stdout, result.stdout
    # Everything the inner tests committed is gone; what was there before stays.
    with session_scope() as session:
        assert session.scalars(select(User.name)).all() == ["existing"]


def test_plugin_is_opt_in() -> None:
    """Installing sessionscope registers no pytest11 entry point: the fixtures
    (and their bindings) exist only where a conftest asks for them."""
    from importlib.metadata import entry_points

    assert [
        ep for ep in entry_points(group="pytest11") if ep.value.startswith("sessionscope")
    ] == []
