"""``read_only=True, snapshot=False``: one round trip for a one-statement read.

Round trips are counted by a loopback proxy in front of the real server (a
round trip starts each time the client speaks after the server answered), so
the count does not depend on timing or on how TCP splits the bytes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import sessionmaker

from benchmarks.proxy import Proxy
from sessionscope import ReadOnlyError, SessionConfig, SessionManager

from .conftest import require_server, reset_schema
from .models import User

SERVERS = ["postgresql", "mariadb"]
# A primary-key read in raw SQLAlchemy's sessionmaker.begin(): PostgreSQL drivers
# send BEGIN, the SELECT, COMMIT; MariaDB begins implicitly, but the pool's
# rollback-on-return sends a ROLLBACK after the COMMIT: the SELECT, COMMIT, ROLLBACK.
RAW_ROUND_TRIPS = {"postgresql": 3, "mariadb": 3}


@pytest.fixture(params=SERVERS)
def server(request: pytest.FixtureRequest) -> Iterator[tuple[str, Proxy, str]]:
    url = make_url(require_server(request.param))
    with Proxy(url.host or "127.0.0.1", url.port or 0) as proxy:
        proxied = url.set(host="127.0.0.1", port=proxy.port)
        yield request.param, proxy, proxied.render_as_string(hide_password=False)


@pytest.fixture
def seeded(server: tuple[str, Proxy, str]) -> Iterator[tuple[str, Proxy, SessionManager, int]]:
    backend, proxy, url = server
    manager = SessionManager(url)
    reset_schema(manager.engine)
    with manager.session_scope() as s:
        user = User(name="reader")
        s.add(user)
        s.flush()
        user_id = user.id
    yield backend, proxy, manager, user_id
    manager.dispose()


def _count(proxy: Proxy, action: Any) -> int:
    proxy.reset()
    action()
    return proxy.round_trips


def test_primary_key_read_takes_one_round_trip_instead_of_raws(
    seeded: tuple[str, Proxy, SessionManager, int],
) -> None:
    backend, proxy, manager, user_id = seeded
    raw_engine = create_engine(manager.url)
    raw = sessionmaker(raw_engine)

    def raw_read() -> None:
        with raw.begin() as s:
            assert s.get(User, user_id) is not None

    def fast_read() -> None:
        with manager.session_scope(read_only=True, snapshot=False) as s:
            assert s.get(User, user_id) is not None

    try:
        raw_read(), fast_read()  # connect and warm up first: only the reads count
        assert _count(proxy, raw_read) == RAW_ROUND_TRIPS[backend]
        assert _count(proxy, fast_read) == 1
        assert _count(proxy, fast_read) == 1  # and again, on the pooled connection
    finally:
        raw_engine.dispose()
    assert manager.get_stats()["committed_transactions"] >= 3
    assert "reader" in manager.pool_status()


async def test_async_primary_key_read_takes_one_round_trip(
    seeded: tuple[str, Proxy, SessionManager, int],
) -> None:
    backend, proxy, manager, user_id = seeded
    raw_engine = create_async_engine(manager.async_url)
    raw = async_sessionmaker(raw_engine)

    async def raw_read() -> None:
        async with raw.begin() as s:
            assert await s.get(User, user_id) is not None

    async def fast_read() -> None:
        async with manager.async_session_scope(read_only=True, snapshot=False) as s:
            assert await s.get(User, user_id) is not None

    try:
        for _ in range(2):  # asyncpg prepares a statement on its first use
            await raw_read()
            await fast_read()
        proxy.reset()
        await raw_read()
        assert proxy.round_trips == RAW_ROUND_TRIPS[backend]
        proxy.reset()
        await fast_read()
        assert proxy.round_trips == 1
    finally:
        await raw_engine.dispose()
        await manager.adispose()


def test_writes_are_refused_by_the_orm_and_by_the_server(
    seeded: tuple[str, Proxy, SessionManager, int],
) -> None:
    manager = seeded[2]
    with pytest.raises(ReadOnlyError), manager.session_scope(
        read_only=True, snapshot=False
    ) as s:
        s.add(User(name="orm-write"))
    # A statement the ORM cannot see as a write: the server refuses it.
    with pytest.raises(DBAPIError) as caught, manager.session_scope(
        read_only=True, snapshot=False
    ) as s:
        s.execute(text("INSERT INTO ss_users (name) VALUES ('text-write')"))
    code = getattr(caught.value.orig, "sqlstate", None) or caught.value.orig.args[0]
    assert code in ("25006", 1792)  # read_only_sql_transaction / ER_CANT_EXECUTE_IN_READ_ONLY
    with manager.session_scope() as s:
        assert s.scalar(select(func.count()).select_from(User)) == 1
        s.add(User(name="normal-write"))  # the manager's own pool is not read-only
    with manager.session_scope() as s:
        assert s.scalar(select(func.count()).select_from(User)) == 2


def test_statements_do_not_share_a_snapshot(
    seeded: tuple[str, Proxy, SessionManager, int],
) -> None:
    backend, manager = seeded[0], seeded[2]
    count = select(func.count()).select_from(User)
    with manager.session_scope(read_only=True, snapshot=False) as s:
        assert s.scalar(count) == 1
        with manager.session_scope(propagation="requires_new") as writer:
            writer.add(User(name="meanwhile"))
        assert s.scalar(count) == 2  # each statement sees what was committed before it
    if backend == "mariadb":  # REPEATABLE READ by default: one snapshot per transaction
        with manager.session_scope(read_only=True) as s:
            assert s.scalar(count) == 2
            with manager.session_scope(propagation="requires_new") as writer:
                writer.add(User(name="unseen"))
            assert s.scalar(count) == 2


def test_snapshot_false_needs_read_only_and_excludes_transaction_settings() -> None:
    with pytest.raises(ValueError, match="needs read_only=True"):
        SessionConfig(snapshot=False)
    with pytest.raises(ValueError, match="isolation_level= and timeout="):
        SessionConfig(read_only=True, snapshot=False, isolation_level="SERIALIZABLE")
    with pytest.raises(ValueError, match="isolation_level= and timeout="):
        SessionConfig(read_only=True, snapshot=False, timeout=1.0)
    assert SessionConfig(read_only=True, snapshot=False).snapshot is False


def test_sqlite_accepts_snapshot_false_and_keeps_its_transaction(tmp_path: Path) -> None:
    manager = SessionManager(f"sqlite:///{tmp_path / 'ro.db'}")
    try:
        reset_schema(manager.engine)
        with manager.session_scope(read_only=True, snapshot=False) as s:
            assert s.in_transaction() is False
            assert s.scalar(select(func.count()).select_from(User)) == 0
            assert s.connection().in_transaction()  # one transaction, as without it
        with pytest.raises(ReadOnlyError), manager.session_scope(
            read_only=True, snapshot=False
        ) as s:
            s.add(User(name="nope"))
        assert "reader" not in manager.pool_status()
    finally:
        manager.dispose()


def test_unknown_driver_is_refused_with_the_known_ones() -> None:
    from sessionscope._backend import autocommit_reader_options

    with pytest.raises(ValueError, match="not supported with the postgresql\\+pg8000"):
        autocommit_reader_options(make_url("postgresql+pg8000://u@h/d"), {})
    options = autocommit_reader_options(
        make_url("postgresql+psycopg://u@h/d"),
        {"pool_size": 3, "connect_args": {"options": "-c search_path=app"}},
    )
    assert options == {
        "pool_size": 3,
        "isolation_level": "AUTOCOMMIT",
        "connect_args": {"options": "-c search_path=app -c default_transaction_read_only=on"},
    }
