"""Several primaries (``primaries=``) on every backend, with real connection faults.

A node here is an URL that cannot connect (a closed loopback port, an SQLite
file in a missing directory) next to the test database: the choice of node, the
cool-down and the retry on another node are the same code as on a real cluster
(tests/clusters builds those: Galera, PostgreSQL failover).
"""

from __future__ import annotations

import contextvars
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from sessionscope import NodeUnavailableError, SessionConfig, SessionManager, _backend

from .conftest import require_server, reset_schema
from .faults import Server
from .models import User
from .test_replica_routing import unreachable

QUICK = SessionConfig(retry_delay=0.001, log_level="ERROR")


def fresh_schema(url: str) -> None:
    engine = create_engine(url)
    try:
        reset_schema(engine)
    finally:
        engine.dispose()


def async_of(url: str) -> str:
    from sessionscope._backend import async_url_for

    return async_url_for(url).render_as_string(hide_password=False)


def test_a_node_that_refuses_connections_is_cooled_down_and_the_unit_moves(db_url: str) -> None:
    fresh_schema(db_url)
    manager = SessionManager(primaries=[unreachable(db_url), db_url], config=QUICK)

    @manager.with_session
    def add(session: Session, name: str) -> None:
        session.add(User(name=name))

    try:
        add("first")  # node1 refuses: cooled down, the retry runs on node2
        add("second")  # straight to node2
        with manager.session_scope() as session:
            assert sorted(session.scalars(select(User.name))) == ["first", "second"]
        stats = manager.get_stats()
    finally:
        manager.dispose()
    nodes = stats["cluster"]["nodes"]
    assert (nodes["node1"]["failures"], nodes["node1"]["healthy"]) == (1, False)
    assert nodes["node1"]["cooldown_remaining"] > 0
    assert (nodes["node1"]["sessions"], nodes["node2"]["sessions"]) == (1, 3)
    assert stats["retries"] == 1 and stats["retry_errors"] == {"NodeUnavailableError": 1}
    assert "node2" in manager.engines_by_role()


async def test_async_sessions_move_to_a_healthy_node(db_url: str) -> None:
    fresh_schema(db_url)
    manager = SessionManager(
        async_primaries=[unreachable(db_url, is_async=True), async_of(db_url)], config=QUICK
    )

    @manager.async_with_session
    async def add(session: AsyncSession, name: str) -> int:
        session.add(User(name=name))
        await session.flush()
        return int(await session.scalar(select(func.count()).select_from(User)) or 0)

    try:
        assert await add("a") == 1
        assert await add("b") == 2
        stats = manager.get_stats()
    finally:
        await manager.adispose()
    assert stats["retry_errors"] == {"NodeUnavailableError": 1}
    assert stats["cluster"]["nodes"]["node1"]["failures"] == 1
    assert "node2_async" in manager.engines_by_role()


def test_every_node_down_raises_after_the_retries(db_url: str) -> None:
    manager = SessionManager(
        primaries=[unreachable(db_url), unreachable(db_url)],
        config=QUICK.merged({"retry_attempts": 3}),
    )

    @manager.with_session
    def read(session: Session) -> Any:
        return session.execute(text("SELECT 1")).scalar_one()

    try:
        with pytest.raises(NodeUnavailableError) as info:
            read()
        stats = manager.get_stats()
    finally:
        manager.dispose()
    # With every node cooling down, the one whose cool-down ends first is tried:
    # four attempts, alternating, each a real connection attempt.
    nodes = stats["cluster"]["nodes"]
    assert (nodes["node1"]["sessions"], nodes["node2"]["sessions"]) == (2, 2)
    assert (nodes["node1"]["failures"], nodes["node2"]["failures"]) == (1, 1)
    assert "cooled down" in str(info.value) and "another node" in str(info.value)


def test_failover_keeps_one_writer_and_round_robin_spreads(tmp_path: Path) -> None:
    urls = [f"sqlite:///{tmp_path / f'n{i}.db'}" for i in range(3)]
    failover = SessionManager(primaries=urls)
    spread = SessionManager(primaries=urls, primary_selection="round_robin")
    try:
        for manager in (failover, spread):
            for _ in range(6):
                with manager.session_scope() as session:
                    session.execute(text("SELECT 1"))
        one = {k: v["sessions"] for k, v in failover.get_stats()["cluster"]["nodes"].items()}
        three = {k: v["sessions"] for k, v in spread.get_stats()["cluster"]["nodes"].items()}
    finally:
        failover.dispose()
        spread.dispose()
    assert one == {"node1": 6, "node2": 0, "node3": 0}
    assert three == {"node1": 2, "node2": 2, "node3": 2}
    assert failover.url.database == str(tmp_path / "n0.db")


def test_read_routing_works_beside_several_primaries(tmp_path: Path) -> None:
    primary, replica = (f"sqlite:///{tmp_path / n}" for n in ("p.db", "r.db"))
    fresh_schema(primary)
    fresh_schema(replica)
    manager = SessionManager(
        primaries=[unreachable(primary), primary], replicas=[replica], config=QUICK
    )

    @manager.with_session
    def add(session: Session) -> None:
        session.add(User(name="written"))

    try:
        add()  # node1 refuses; the retry writes on node2

        def names() -> list[str]:
            with manager.session_scope(read_only=True) as session:
                return list(session.scalars(select(User.name)))

        on_replica = contextvars.Context().run(names)  # a context that wrote nothing
        # Within the read-your-writes window reads go to the node writes use.
        on_primary = names()
        stats = manager.get_stats()
    finally:
        manager.dispose()
    assert on_replica == [] and on_primary == ["written"]
    assert stats["routing"]["primary_because"]["read_your_writes"] == 1


@pytest.mark.parametrize(
    ("options", "error", "text_"),
    [
        ({"primaries": "sqlite://"}, TypeError, "list of URLs"),
        ({"primaries": []}, ValueError, "is empty"),
        ({"primaries": ["sqlite://"], "url": "sqlite://"}, TypeError, "not both"),
        ({"primaries": ["sqlite://"], "primary_selection": "nearest"}, ValueError, "unknown"),
        ({"primaries": ["sqlite://"], "primary_cooldown": -1}, ValueError, ">= 0"),
        ({"primaries": ["sqlite://"], "primary_cooldown": "5"}, TypeError, "seconds"),
        ({"primaries": ["sqlite://", "postgresql://h/db"]}, ValueError, "one cluster"),
        ({"primaries": ["sqlite://"], "async_primaries": []}, ValueError, "is empty"),
        (
            {"primaries": ["sqlite://"], "async_primaries": ["sqlite+aiosqlite://"] * 2},
            ValueError,
            "pair up",
        ),
    ],
)
def test_bad_cluster_options_are_refused(options: dict[str, Any], error: type, text_: str) -> None:
    with pytest.raises(error, match=text_):
        SessionManager(**options)


def test_causal_reads_sets_wsrep_sync_wait_for_the_transaction_only() -> None:
    url = require_server("mariadb")
    manager = SessionManager(url)
    try:
        with manager.session_scope(causal_reads=True) as session:
            inside = session.execute(text("SELECT @@session.wsrep_sync_wait")).scalar_one()
        with manager.session_scope() as session:
            after = session.execute(text("SELECT @@session.wsrep_sync_wait")).scalar_one()
    finally:
        manager.dispose()
    assert (inside, after) == (1, 0)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_causal_reads_is_a_no_op_where_reads_are_causal_anyway(db_url: str) -> None:
    manager = SessionManager(db_url)
    try:
        with manager.session_scope(causal_reads=True) as session:
            assert session.execute(text("SELECT 1")).scalar_one() == 1
    finally:
        manager.dispose()


def test_the_cockroachdb_dialect_gets_the_postgresql_scope_settings() -> None:
    # No CockroachDB server here: the dialect (sqlalchemy-cockroachdb) is loaded
    # and the statements and options a scope would use are read without connecting.
    pytest.importorskip("sqlalchemy_cockroachdb")
    manager = SessionManager("cockroachdb+psycopg://root@127.0.0.1:26257/db")
    try:
        engine = manager.engine
        assert engine.dialect.name == "cockroachdb"
        statements = _backend.begin_statements(
            engine, timeout=1.5, read_only=True, causal_reads=False
        )
        assert [s.sql for s in statements] == ["SET LOCAL statement_timeout = 1500"]
        options = _backend.execution_options(engine, isolation_level=None, read_only=True)
        assert options == {"postgresql_readonly": True}
    finally:
        manager.dispose()


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
def test_a_connection_killed_before_commit_is_retried_on_the_other_node(
    backend: str, db_url: str
) -> None:
    # Two entries for the same server: "nodes" the test can tell apart by the
    # cluster's figures. The first attempt's connection is killed mid-transaction
    # (a real server-side kill): the node is cooled down and the retry, a new
    # session, runs on node2.
    fresh_schema(db_url)
    admin = Server(backend, db_url)
    manager = SessionManager(primaries=[db_url, db_url], config=QUICK)
    attempts: list[int] = []

    @manager.with_session
    def add(session: Session) -> None:
        session.add(User(name="once"))
        session.flush()
        attempts.append(int(session.execute(admin.id_sql).scalar_one()))
        if len(attempts) == 1:
            admin.kill(attempts[0])
        session.execute(select(func.count()).select_from(User))

    try:
        add()
        with manager.session_scope() as session:
            names = list(session.scalars(select(User.name)))
        stats = manager.get_stats()
    finally:
        manager.dispose()
        admin.dispose()
    nodes = stats["cluster"]["nodes"]
    assert len(attempts) == 2 and names == ["once"]
    assert (nodes["node1"]["failures"], nodes["node1"]["healthy"]) == (1, False)
    assert (nodes["node1"]["sessions"], nodes["node2"]["sessions"]) == (1, 2)
    assert stats["retries"] == 1
