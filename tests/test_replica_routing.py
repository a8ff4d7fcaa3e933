"""Read routing on every backend: read-only scopes to replicas, writes to the
primary, read-your-writes, selection, health and fallback, refusals, figures.

The "replicas" here are other databases on the same server (other files on
SQLite), each holding a marker row with its name, so where a session reads from
is observable. Real streaming replication is tested in test_replica_streaming.py.
"""

from __future__ import annotations

import asyncio
import contextvars
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy import create_engine, event, insert, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

import sessionscope
from sessionscope import ReadOnlyError, SessionConfig, SessionManager

from .conftest import backend_url, create_database, reset_schema
from .models import User
from .routing_exports import Exported, expected, never_lower

REPLICA_SUFFIXES = ("r1", "r2")

T = TypeVar("T")


def _prepare(url: str, name: str) -> None:
    """Fresh tables and a marker row naming the server."""
    engine = create_engine(url)
    try:
        reset_schema(engine)
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE IF EXISTS ss_where")
            conn.exec_driver_sql("CREATE TABLE ss_where (name VARCHAR(20))")
            conn.execute(text("INSERT INTO ss_where VALUES (:n)"), {"n": name})
    finally:
        engine.dispose()


@pytest.fixture
def urls(backend: str, tmp_path: Path) -> dict[str, str]:
    """Sync URLs of the primary and two replicas, each prepared and marked."""
    primary = backend_url(backend, tmp_path)
    result = {"primary": primary}
    for suffix in REPLICA_SUFFIXES:
        if backend == "sqlite":
            url = f"sqlite:///{tmp_path / f'{suffix}.db'}"
        else:
            parsed = make_url(primary)
            url = parsed.set(database=f"{parsed.database}_{suffix}").render_as_string(
                hide_password=False
            )
            create_database(url)
        result[f"replica{suffix[1:]}"] = url
    for name, url in result.items():
        _prepare(url, name)
    return result


@pytest.fixture
def make(urls: dict[str, str]) -> Iterator[Callable[..., SessionManager]]:
    """Build managers on the primary with the given replicas (names from
    ``urls``); sync engines are disposed afterwards (async tests dispose theirs)."""
    made: list[SessionManager] = []

    def _make(replicas: tuple[str, ...] = ("replica1",), **kw: Any) -> SessionManager:
        kw.setdefault("config", SessionConfig(retry_delay=0.01))
        manager = SessionManager(urls["primary"], replicas=[urls[r] for r in replicas], **kw)
        made.append(manager)
        return manager

    yield _make
    for manager in made:
        manager.dispose()


def where(session: Any) -> str:
    return str(session.scalar(text("SELECT name FROM ss_where")))


async def awhere(session: AsyncSession) -> str:
    return str((await session.execute(text("SELECT name FROM ss_where"))).scalar())


def read(manager: SessionManager) -> str:
    with manager.session_scope(read_only=True) as session:
        return where(session)


def write(manager: SessionManager) -> str:
    """A write scope that commits; returns where it ran."""
    with manager.session_scope() as session:
        session.execute(text("UPDATE ss_where SET name = name"))
        return where(session)


def fresh(fn: Callable[[], T]) -> T:
    """Run ``fn`` in an empty context: a context that has written nothing."""
    return contextvars.Context().run(fn)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def unreachable(url: str, *, is_async: bool = False) -> str:
    """An URL of the same backend that cannot connect."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        bad = parsed.set(database="/nonexistent-dir/replica.db")
        if is_async:
            bad = bad.set(drivername="sqlite+aiosqlite")
        return bad.render_as_string(hide_password=False)
    bad = parsed.set(port=closed_port())
    if is_async:
        bad = bad.set(drivername=str(sessionscope._backend.async_url_for(bad).drivername))
    return bad.render_as_string(hide_password=False)


def count_connects(engine: Engine) -> list[int]:
    """Connection attempts made by ``engine`` (successful or not)."""
    attempts = [0]

    @event.listens_for(engine, "do_connect")
    def _connect(*args: Any) -> None:
        attempts[0] += 1

    return attempts


# -- routing -------------------------------------------------------------------


def test_read_only_scopes_read_from_a_replica_and_writes_from_the_primary(
    make: Callable[..., SessionManager],
) -> None:
    manager = make(read_your_writes=0)
    assert read(manager) == "replica1"
    assert write(manager) == "primary"
    with manager.session_scope() as outer:
        # A read-only scope that joins or nests stays on the write scope's session.
        with manager.session_scope(read_only=True) as inner:
            assert inner is outer
            assert where(inner) == "primary"
        with manager.session_scope(read_only=True, propagation="nested") as inner:
            assert inner is outer
        # requires_new opens a session of its own: a read, so a replica.
        with manager.session_scope(read_only=True, propagation="requires_new") as other:
            assert other is not outer
            assert where(other) == "replica1"
    stats = manager.get_stats()["routing"]
    assert stats["engines"]["replica1"]["reads"] == 2
    assert stats["engines"]["primary"]["reads"] == 0


async def test_async_read_only_scopes_read_from_a_replica(
    make: Callable[..., SessionManager],
) -> None:
    manager = make(read_your_writes=0)
    try:
        async with manager.async_session_scope(read_only=True) as session:
            assert await awhere(session) == "replica1"
        async with manager.async_session_scope() as outer:
            assert await awhere(outer) == "primary"
            async with manager.async_session_scope(read_only=True) as inner:
                assert inner is outer
            async with manager.async_session_scope(
                read_only=True, propagation="requires_new"
            ) as other:
                assert await awhere(other) == "replica1"
        assert manager.get_stats()["routing"]["engines"]["replica1"]["reads"] == 2
        assert "replica1_async" in manager.engines_by_role()
    finally:
        await manager.adispose()


async def test_decorators_route_by_read_only(make: Callable[..., SessionManager]) -> None:
    manager = make(read_your_writes=0)

    @manager.with_session(read_only=True)
    def sync_read(session: Any) -> str:
        return where(session)

    @manager.with_session
    def sync_write(session: Any) -> str:
        return where(session)

    @manager.async_with_session(read_only=True)
    async def async_read(session: AsyncSession) -> str:
        return await awhere(session)

    try:
        assert sync_read() == "replica1"
        assert sync_write() == "primary"
        assert await async_read() == "replica1"
    finally:
        await manager.adispose()


def test_module_api_routes_through_the_default_manager(urls: dict[str, str]) -> None:
    manager = sessionscope.setup_database_connection(
        urls["primary"], replicas=[urls["replica2"]], read_your_writes=0
    )
    try:
        with sessionscope.session_scope(read_only=True) as session:
            assert where(session) == "replica2"
        with sessionscope.session_scope() as session:
            assert where(session) == "primary"
    finally:
        manager.dispose()


# -- selection -------------------------------------------------------------------


def test_round_robin_alternates_between_replicas(make: Callable[..., SessionManager]) -> None:
    manager = make(("replica1", "replica2"), read_your_writes=0)
    assert [read(manager) for _ in range(6)] == ["replica1", "replica2"] * 3
    engines = manager.get_stats()["routing"]["engines"]
    assert (engines["replica1"]["reads"], engines["replica2"]["reads"]) == (3, 3)
    assert manager.get_stats()["routing"]["reads"] == 6


def test_random_selection_uses_every_replica(make: Callable[..., SessionManager]) -> None:
    manager = make(("replica1", "replica2"), read_your_writes=0, replica_selection="random")
    seen = [read(manager) for _ in range(40)]
    # 40 fair draws all landing on one replica has probability 2**-39.
    assert set(seen) == {"replica1", "replica2"}
    engines = manager.get_stats()["routing"]["engines"]
    assert engines["replica1"]["reads"] == seen.count("replica1")
    assert engines["replica2"]["reads"] == seen.count("replica2")


# -- read-your-writes ------------------------------------------------------------


def test_read_your_writes_sends_the_writing_context_to_the_primary(
    make: Callable[..., SessionManager],
) -> None:
    manager = make(read_your_writes=60)
    before_write = contextvars.copy_context()

    def write_then_read() -> tuple[str, str]:
        assert read(manager) == "replica1"  # nothing written yet in this context
        write(manager)
        return read(manager), read(manager)

    assert fresh(write_then_read) == ("primary", "primary")

    # Contexts that did not write read from the replica: another thread, and a
    # context taken before the write.
    result: list[str] = []
    thread = threading.Thread(target=lambda: result.append(read(manager)))
    thread.start()
    thread.join()
    assert result == ["replica1"]
    assert before_write.run(read, manager) == "replica1"

    routing = manager.get_stats()["routing"]
    assert routing["primary_because"]["read_your_writes"] == 2
    assert routing["engines"]["primary"]["reads"] == 2


def test_reads_on_the_primary_do_not_extend_the_window(
    make: Callable[..., SessionManager],
) -> None:
    manager = make(read_your_writes=60)
    router = manager._router
    assert router is not None

    def run() -> None:
        write(manager)
        started = router._last_write.get()
        assert read(manager) == "primary"  # its read-only COMMIT is not a write
        assert router._last_write.get() == started

    fresh(run)


def test_read_your_writes_window_ends(make: Callable[..., SessionManager]) -> None:
    manager = make(read_your_writes=0.2)

    def run() -> str:
        write(manager)
        time.sleep(0.3)  # longer than the window: the direction cannot flake
        return read(manager)

    assert fresh(run) == "replica1"


def test_window_zero_and_mark_written(make: Callable[..., SessionManager]) -> None:
    off = make(read_your_writes=0)
    on = make(read_your_writes=60)

    def run() -> tuple[str, str, str]:
        write(off)
        after_write = read(off)
        before_mark = read(on)
        on.mark_written()  # e.g. the user's previous request wrote
        return after_write, before_mark, read(on)

    assert fresh(run) == ("replica1", "replica1", "primary")
    off.mark_written()  # no window: nothing to do, nothing raised


async def test_a_task_sees_its_own_writes_its_creator_does_not(
    make: Callable[..., SessionManager],
) -> None:
    """Contexts are asyncio's: a task works on a copy of its creator's context."""
    manager = make(read_your_writes=60)

    async def aread() -> str:
        async with manager.async_session_scope(read_only=True) as session:
            return await awhere(session)

    async def write_then_read() -> str:
        async with manager.async_session_scope() as session:
            await session.execute(text("UPDATE ss_where SET name = name"))
        return await aread()

    async def main() -> tuple[str, str, str]:
        in_task = await asyncio.create_task(write_then_read())
        in_creator = await aread()  # the task's write did not flow back
        async with manager.async_session_scope() as session:
            await session.execute(text("UPDATE ss_where SET name = name"))
        in_child = await asyncio.create_task(aread())  # created after: inherits it
        return in_task, in_creator, in_child

    try:
        assert await asyncio.create_task(main(), context=contextvars.Context()) == (
            "primary",
            "replica1",
            "primary",
        )
    finally:
        await manager.adispose()


# -- health and fallback -----------------------------------------------------------


def test_a_replica_that_cannot_connect_is_skipped_for_the_cooldown(
    urls: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    bad = create_engine(unreachable(urls["replica1"]))
    attempts = count_connects(bad)
    manager = SessionManager(
        urls["primary"],
        replicas=[bad, urls["replica2"]],
        read_your_writes=0,
        replica_cooldown=60,
    )
    try:
        with caplog.at_level("WARNING", logger="sessionscope"):
            read(manager)
        assert "replica1" in caplog.text and "failed to connect" in caplog.text
        assert caplog.text.count("failed to connect") == 1
        # The first read picks the bad replica, fails to connect, and moves on to
        # replica2 within the same scope: the caller sees no error.
        assert [read(manager) for _ in range(5)] == ["replica2"] * 5
        assert attempts[0] == 1  # out of rotation for the cool-down: tried once
        routing = manager.get_stats()["routing"]
        assert routing["fallbacks"] == 1
        assert routing["engines"]["replica1"]["healthy"] is False
        assert routing["engines"]["replica1"]["connect_failures"] == 1
        assert routing["engines"]["replica1"]["reads"] == 0
        assert routing["engines"]["replica2"]["reads"] == 6
    finally:
        manager.dispose()
        bad.dispose()


def test_a_fallback_after_a_stats_reset_keeps_the_counts_consistent(
    urls: dict[str, str],
) -> None:
    """A read routed before ``reset_stats()`` that connects (and falls back)
    afterwards is counted once, after the reset, on the engine that served it:
    reads are counted where they land, so no figure ever has to move."""
    bad = create_engine(unreachable(urls["replica1"]))
    manager = SessionManager(
        urls["primary"], replicas=[bad, urls["replica2"]], read_your_writes=0
    )
    try:
        with manager.session_scope(read_only=True) as session:
            manager.reset_stats()  # e.g. a metrics endpoint, between open and connect
            assert session.scalar(text("SELECT name FROM ss_where")) == "replica2"
        routing = manager.get_stats()["routing"]
        engines = routing["engines"]
        assert routing["reads"] == 1 and routing["fallbacks"] == 1
        assert engines["replica1"]["reads"] == 0 and engines["replica2"]["reads"] == 1
        assert sum(e["reads"] for e in engines.values()) == routing["reads"]
    finally:
        manager.dispose()
        bad.dispose()


def test_with_no_cooldown_a_failed_replica_is_tried_again(urls: dict[str, str]) -> None:
    bad = create_engine(unreachable(urls["replica1"]))
    attempts = count_connects(bad)
    manager = SessionManager(
        urls["primary"],
        replicas=[bad, urls["replica2"]],
        read_your_writes=0,
        replica_cooldown=0,
    )
    try:
        assert [read(manager) for _ in range(4)] == ["replica2"] * 4
        # Round robin picks the bad replica first on reads 1 and 3.
        assert attempts[0] == 2
        assert manager.get_stats()["routing"]["engines"]["replica1"]["connect_failures"] == 2
    finally:
        manager.dispose()
        bad.dispose()


def test_with_every_replica_down_reads_go_to_the_primary(urls: dict[str, str]) -> None:
    manager = SessionManager(
        urls["primary"],
        replicas=[unreachable(urls["replica1"]), unreachable(urls["replica2"])],
        read_your_writes=0,
        replica_cooldown=60,
    )
    try:
        assert [read(manager) for _ in range(3)] == ["primary"] * 3
        routing = manager.get_stats()["routing"]
        # Read 1 tried both replicas, then the primary; reads 2-3 skip them.
        assert routing["fallbacks"] == 2
        assert routing["primary_because"] == {
            "read_your_writes": 0,
            "no_replica_available": 2,
            "fallback": 1,
        }
        assert routing["engines"]["primary"]["reads"] == 3
        assert write(manager) == "primary"
    finally:
        manager.dispose()


async def test_async_fallback_from_an_unreachable_replica(urls: dict[str, str]) -> None:
    manager = SessionManager(
        urls["primary"],
        async_replicas=[
            unreachable(urls["replica1"], is_async=True),
            sessionscope._backend.async_url_for(urls["replica2"]),
        ],
        read_your_writes=0,
        replica_cooldown=60,
    )
    try:
        for _ in range(3):
            async with manager.async_session_scope(read_only=True) as session:
                assert await awhere(session) == "replica2"
        routing = manager.get_stats()["routing"]
        assert routing["fallbacks"] == 1
        assert routing["engines"]["replica1"]["connect_failures"] == 1
    finally:
        await manager.adispose()


# -- refusals and connections ------------------------------------------------------------


def test_writes_in_a_routed_read_only_scope_are_refused_before_the_server(
    make: Callable[..., SessionManager], urls: dict[str, str]
) -> None:
    manager = make(read_your_writes=0)
    with manager.session_scope(read_only=True) as session:
        assert where(session) == "replica1"
        replica_engine = session.get_bind()
    statements: list[str] = []
    event.listen(
        replica_engine, "before_cursor_execute", lambda c, cur, stmt, *a: statements.append(stmt)
    )
    with pytest.raises(ReadOnlyError), manager.session_scope(read_only=True) as session:
        session.add(User(name="nobody"))
        session.flush()
    with pytest.raises(ReadOnlyError), manager.session_scope(read_only=True) as session:
        session.execute(insert(User).values(name="nobody"))
    assert not any("INSERT" in s.upper() for s in statements)
    for name in ("primary", "replica1"):
        engine = create_engine(urls[name])
        try:
            with engine.connect() as conn:
                assert conn.scalar(text("SELECT count(*) FROM ss_users")) == 0
        finally:
            engine.dispose()


def test_an_empty_read_only_scope_connects_nowhere(
    make: Callable[..., SessionManager],
) -> None:
    manager = make(("replica1", "replica2"), read_your_writes=0)
    read(manager)
    read(manager)  # both replica engines now exist
    router = manager._router
    assert router is not None
    checkouts = [0]
    for engine in router.engines_by_role().values():
        event.listen(engine, "checkout", lambda *a: checkouts.__setitem__(0, checkouts[0] + 1))
    event.listen(manager.engine, "checkout", lambda *a: checkouts.__setitem__(0, checkouts[0] + 1))
    for _ in range(4):
        with manager.session_scope(read_only=True):
            pass
    assert checkouts[0] == 0


# -- routing figures: counted where the read lands, exported ----------------------------


def test_reads_are_counted_on_the_engine_they_land_on_with_the_reason(
    urls: dict[str, str],
) -> None:
    """Exact counts through fallbacks, in ``get_stats()`` and in both exporters:
    a read is counted once, where its first connection landed, and a fallback
    never moves a count (every counter only increases)."""
    manager = SessionManager(
        urls["primary"],
        replicas=[unreachable(urls["replica1"]), urls["replica2"]],
        read_your_writes=60,
        replica_cooldown=60,
        name="shop",
    )
    exported = Exported(manager)
    replicas = ("replica1", "replica2")
    try:
        assert exported.both() == expected(replicas)
        # Round robin picks replica1 first: its connect fails, the read lands on
        # replica2 as a fallback; replica1 cools down, so the next two are
        # replica2's own.
        assert fresh(lambda: [read(manager) for _ in range(3)]) == ["replica2"] * 3
        # A context that wrote reads from the primary.
        assert fresh(lambda: (write(manager), read(manager))[1]) == "primary"
        assert exported.both() == expected(
            replicas,
            reads={
                ("replica2", "fallback"): 1,
                ("replica2", "selected"): 2,
                ("primary", "read_your_writes"): 1,
            },
            fallbacks=1,
            connect_failures={"replica1": 1},
            unhealthy=("replica1",),
        )
        routing = manager.get_stats()["routing"]
        engines = routing["engines"]
        assert routing["reads"] == 4 and routing["fallbacks"] == 1
        assert routing["primary_because"] == {
            "read_your_writes": 1,
            "no_replica_available": 0,
            "fallback": 0,
        }
        assert [engines[e]["reads"] for e in ("primary", "replica1", "replica2")] == [1, 0, 3]
        assert engines["replica1"]["connect_failures"] == 1
        assert engines["replica1"]["healthy"] is False
    finally:
        exported.close()
        manager.dispose()


def test_exported_routing_counters_never_go_down_while_reset_stats_zeroes_them(
    urls: dict[str, str],
) -> None:
    """``reset_stats()`` zeroes the routing figures of ``get_stats()`` (health
    is state and stays); the Prometheus and OpenTelemetry counters carry on."""
    manager = SessionManager(
        urls["primary"],
        replicas=[unreachable(urls["replica1"]), urls["replica2"]],
        read_your_writes=0,
        replica_cooldown=0,  # the bad replica is tried again at each of its turns
        name="shop",
    )
    exported = Exported(manager)
    replicas = ("replica1", "replica2")
    try:
        # Reads 1 and 3 pick replica1 and fall back to replica2.
        assert [read(manager) for _ in range(4)] == ["replica2"] * 4
        before = exported.both()
        assert before == expected(
            replicas,
            reads={("replica2", "fallback"): 2, ("replica2", "selected"): 2},
            fallbacks=2,
            connect_failures={"replica1": 2},
        )

        manager.reset_stats()
        routing = manager.get_stats()["routing"]
        assert (routing["reads"], routing["fallbacks"]) == (0, 0)
        assert set(routing["primary_because"].values()) == {0}
        for name, engine in routing["engines"].items():
            assert engine["reads"] == 0, name
            assert engine.get("connect_failures", 0) == 0, name
        assert exported.both() == before

        assert [read(manager) for _ in range(2)] == ["replica2"] * 2
        after = exported.both()
        never_lower(before, after)
        assert after == expected(
            replicas,
            reads={("replica2", "fallback"): 3, ("replica2", "selected"): 3},
            fallbacks=3,
            connect_failures={"replica1": 3},
        )
        routing = manager.get_stats()["routing"]
        assert (routing["reads"], routing["fallbacks"]) == (2, 1)
        assert routing["engines"]["replica2"]["reads"] == 2
        assert routing["engines"]["replica1"]["connect_failures"] == 1
    finally:
        exported.close()
        manager.dispose()


async def test_a_read_only_scope_that_never_connects_is_no_read(
    make: Callable[..., SessionManager],
) -> None:
    """Reads count sessions that read: an empty scope, on a replica or on the
    primary (in the read-your-writes window), counts nothing anywhere."""
    manager = make(("replica1", "replica2"), read_your_writes=60)

    def scopes() -> None:
        for _ in range(3):
            with manager.session_scope(read_only=True):
                pass
        write(manager)
        with manager.session_scope(read_only=True):
            pass  # on the primary, by read-your-writes
        assert read(manager) == "primary"

    async def async_scopes() -> None:
        for _ in range(2):
            async with manager.async_session_scope(read_only=True):
                pass
        async with manager.async_session_scope(read_only=True) as session:
            assert await awhere(session) == "replica2"  # the 6th pick of round robin

    try:
        fresh(scopes)
        await asyncio.create_task(async_scopes(), context=contextvars.Context())
        routing = manager.get_stats()["routing"]
        assert routing["reads"] == 2
        assert routing["primary_because"]["read_your_writes"] == 1
        assert [routing["engines"][e]["reads"] for e in ("primary", "replica1", "replica2")] == [
            1,
            0,
            1,
        ]
    finally:
        await manager.adispose()


def test_without_monitoring_reads_are_not_counted_but_replica_health_is(
    urls: dict[str, str],
) -> None:
    manager = SessionManager(
        urls["primary"],
        replicas=[unreachable(urls["replica1"]), urls["replica2"]],
        read_your_writes=0,
        config=SessionConfig(enable_monitoring=False),
    )
    try:
        assert [read(manager) for _ in range(2)] == ["replica2"] * 2
        routing = manager.get_stats()["routing"]
        assert (routing["reads"], routing["fallbacks"]) == (0, 0)
        # A failed connect is the replica's health, not a figure of the scope.
        assert routing["engines"]["replica1"]["connect_failures"] == 1
        assert manager.replica_health() == {"replica1": False, "replica2": True}
    finally:
        manager.dispose()


def test_routing_counts_carry_on_to_a_new_default_manager(urls: dict[str, str]) -> None:
    """setup_database_connection() hands the statistics on: the new manager's
    router counts into them."""
    first = sessionscope.setup_database_connection(
        urls["primary"], replicas=[urls["replica1"]], read_your_writes=0
    )
    first.reset_stats()  # statistics handed on from earlier default managers
    assert read(first) == "replica1"
    second = sessionscope.setup_database_connection(
        urls["primary"], replicas=[urls["replica1"]], read_your_writes=0
    )
    try:
        assert read(second) == "replica1"
        assert second.stats is first.stats
        assert second.get_stats()["routing"]["engines"]["replica1"]["reads"] == 2
    finally:
        first.dispose()
        second.dispose()


# -- figures and configuration -----------------------------------------------------------


def test_stats_name_every_engine_and_never_a_password() -> None:
    # Nothing connects: an empty scope opens no connection.
    manager = SessionManager(
        "postgresql+psycopg://app:s3cret-pw@db1/app",
        replicas=[
            "postgresql+psycopg://app:s3cret-pw@db2/app",
            "postgresql+psycopg://app:s3cret-pw@db3/app",
        ],
    )
    with manager.session_scope(read_only=True):
        pass
    stats = manager.get_stats()
    routing = stats["routing"]
    assert set(routing["engines"]) == {"primary", "replica1", "replica2"}
    assert routing["engines"]["replica1"]["url"] == "postgresql+psycopg://app:***@db2/app"
    assert routing["engines"]["primary"]["url"] == "postgresql+psycopg://app:***@db1/app"
    # The scope read nothing: no read is counted (see the empty scope test).
    assert routing["engines"]["replica1"]["reads"] == 0
    assert routing["selection"] == "round_robin"
    assert routing["read_your_writes"] == 2.0 and routing["cooldown"] == 30.0
    assert "s3cret-pw" not in repr(stats) + repr(manager)
    manager.dispose()


def test_pool_status_is_reported_per_engine_role(make: Callable[..., SessionManager]) -> None:
    manager = make(("replica1", "replica2"), read_your_writes=0)
    with manager.session_scope(read_only=True) as session:
        where(session)
        status = manager.get_stats()
        assert status["pool"]["replica1"]["checked_out"] == 1
        assert status["routing"]["engines"]["replica1"]["pool"]["sync"]["checked_out"] == 1
    assert set(manager.pool_status()) == {"replica1"}  # no primary engine made yet
    write(manager)
    assert set(manager.pool_status()) == {"sync", "replica1"}
    assert manager.pool_status()["replica1"]["checked_out"] == 0


def test_a_manager_without_replicas_is_unchanged(tmp_path: Path) -> None:
    manager = SessionManager(f"sqlite:///{tmp_path / 'p.db'}")
    with manager.session_scope(read_only=True) as session:
        session.execute(text("SELECT 1"))
    assert "routing" not in manager.get_stats()
    assert manager._router is None
    manager.mark_written()
    manager.dispose()


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"replicas": "sqlite:///r.db"}, TypeError, "replicas=[url]"),
        ({"replicas": []}, ValueError, "empty"),
        ({"replicas": [42]}, TypeError, "URL or an Engine"),
        ({"replicas": ["postgresql://h/db"]}, ValueError, "copies of the primary"),
        ({"replicas": ["sqlite:///r.db"], "replica_selection": "fastest"}, ValueError, "random"),
        ({"replicas": ["sqlite:///r.db"], "read_your_writes": -1}, ValueError, ">= 0"),
        ({"replicas": ["sqlite:///r.db"], "replica_cooldown": "30"}, TypeError, "seconds"),
        (
            {"replicas": ["sqlite:///a.db"], "async_replicas": ["sqlite+aiosqlite:///a.db"] * 2},
            ValueError,
            "same length",
        ),
        ({"async_replicas": [create_engine("sqlite://")]}, TypeError, "replicas="),
    ],
)
def test_invalid_routing_options_fail_at_construction(
    kwargs: dict[str, Any], error: type[Exception], words: str
) -> None:
    with pytest.raises(error, match=words.replace("[", r"\[").replace("]", r"\]")):
        SessionManager("sqlite:///p.db", **kwargs)


def test_an_async_engine_replica_in_replicas_is_refused() -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine("sqlite+aiosqlite://")
    with pytest.raises(TypeError, match="async_replicas="):
        SessionManager("sqlite:///p.db", replicas=[engine])  # type: ignore[list-item]


class AppSession(Session):
    """A user's own session class (as SQLModel's is)."""


async def test_replica_sessions_keep_the_users_session_class(urls: dict[str, str]) -> None:
    manager = SessionManager(
        urls["primary"],
        replicas=[urls["replica1"]],
        session_class=AppSession,
        read_your_writes=0,
    )
    try:
        with manager.session_scope(read_only=True) as session:
            assert isinstance(session, AppSession) and where(session) == "replica1"
        async with manager.async_session_scope(read_only=True) as asession:
            assert isinstance(asession.sync_session, AppSession)
            assert await awhere(asession) == "replica1"
        with manager.session_scope() as session:
            assert isinstance(session, AppSession) and where(session) == "primary"
    finally:
        await manager.adispose()


def test_a_bound_manager_reads_on_its_connection(make: Callable[..., SessionManager]) -> None:
    """bound_to() (the testing plugin) puts every session on one connection and
    its transaction: routed reads would miss the test's uncommitted data."""
    manager = make(read_your_writes=0)
    with manager.engine.connect() as conn:
        conn.begin()
        conn.execute(text("UPDATE ss_where SET name = 'uncommitted'"))
        with manager.bound_to(conn):
            assert read(manager) == "uncommitted"
        conn.rollback()
    assert read(manager) == "replica1"


def test_exporters_report_every_replica_pool(make: Callable[..., SessionManager]) -> None:
    """Replica engines are engine roles: the Prometheus and OpenTelemetry
    exporters report their pools without knowing about routing."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from prometheus_client import CollectorRegistry

    from sessionscope import otel, prometheus

    manager = make(("replica1", "replica2"), read_your_writes=0, name="shop")
    registry = CollectorRegistry()
    prometheus.register(manager, registry=registry)
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    instrumentation = otel.instrument(manager, meter_provider=provider)
    try:
        write(manager)
        with manager.session_scope(read_only=True) as session:
            where(session)  # replica1, created after instrumentation
            roles = {
                sample.labels["engine"]: sample.value
                for metric in registry.collect()
                if metric.name == "sessionscope_pool_checked_out"
                for sample in metric.samples
            }
        assert roles == {"sync": 0, "replica1": 1}
        read(manager)  # replica2
        data = reader.get_metrics_data()
        assert data is not None
        pools = {
            point.attributes["db.client.connection.pool.name"]
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
            if metric.name == "db.client.connection.count"
            for point in metric.data.data_points
        }
        assert pools == {"shop [sync]", "shop [replica1]", "shop [replica2]"}
    finally:
        instrumentation.uninstrument()
        provider.shutdown()
