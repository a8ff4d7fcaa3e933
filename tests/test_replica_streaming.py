"""Routing on real PostgreSQL streaming replicas.

The module fixture makes two hot standbys of the test server with
``pg_basebackup -R`` (tests/replica), on free loopback ports, and removes them
afterwards. Each server is asked where a routed session runs
(``pg_is_in_recovery()``, ``inet_server_port()``); replica lag is made real with
``pg_wal_replay_pause()``; a replica is crashed with ``pg_ctl stop -m immediate``.

Locally these tests skip when PostgreSQL or its server binaries are missing;
with CI=true they fail instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from sessionscope import ReadOnlyError, SessionConfig, SessionManager

from .conftest import IN_CI, require_server, reset_schema
from .models import User
from .replica import ReplicaSetupError, StreamingReplica, pg_bin, replication_allowed
from .routing_exports import Exported, expected, never_lower


@dataclass
class Cluster:
    primary: str  # sync URL of the test database on the primary
    database: str
    replicas: list[StreamingReplica]

    def replica_url(self, index: int, driver: str = "psycopg") -> str:
        return self.replicas[index].url(self.database, driver)

    def wait_replayed(self) -> None:
        for replica in self.replicas:
            if replica.running:
                replica.wait_replayed()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    primary = require_server("postgresql")
    bindir = pg_bin()
    if bindir is None:
        reason = "PostgreSQL server binaries (pg_basebackup, pg_ctl) not found"
        if IN_CI:
            pytest.fail(f"CI requires streaming replicas: {reason}")
        pytest.skip(reason)
    parsed = make_url(primary)
    host, port = parsed.host or "127.0.0.1", parsed.port or 5432
    assert parsed.database is not None
    replicas: list[StreamingReplica] = []
    hba = contextlib.ExitStack()
    try:
        hba.enter_context(replication_allowed(host, port))
        engine = create_engine(primary)
        try:
            reset_schema(engine)
        finally:
            engine.dispose()
        for name in ("replica1", "replica2"):
            replica = StreamingReplica(name, bindir, host, port)
            replicas.append(replica)
            replica.create()
            replica.start()
        for replica in replicas:
            replica.wait_streaming()
            replica.wait_replayed()
        yield Cluster(primary, parsed.database, replicas)
    except ReplicaSetupError as err:
        pytest.fail(str(err))
    finally:
        for replica in replicas:
            replica.destroy()
        hba.close()  # pg_hba.conf as it was, also after a failure


@pytest.fixture
def fresh_users(cluster: Cluster) -> None:
    engine = create_engine(cluster.primary)
    try:
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM ss_profiles"))
            conn.execute(text("DELETE FROM ss_users"))
    finally:
        engine.dispose()
    cluster.wait_replayed()


def where(session: Any) -> tuple[bool, int]:
    """(in recovery, port) of the server the session runs on."""
    row = session.execute(text("SELECT pg_is_in_recovery(), inet_server_port()")).one()
    return bool(row[0]), int(row[1])


async def awhere(session: AsyncSession) -> tuple[bool, int]:
    row = (await session.execute(text("SELECT pg_is_in_recovery(), inet_server_port()"))).one()
    return bool(row[0]), int(row[1])


def names(session: Any) -> set[str]:
    return set(session.scalars(select(User.name)))


def test_servers_confirm_reads_on_the_standby_and_writes_on_the_primary(
    cluster: Cluster, fresh_users: None
) -> None:
    r1 = cluster.replicas[0]
    manager = SessionManager(cluster.primary, replicas=[cluster.replica_url(0)], read_your_writes=0)
    primary = (False, make_url(cluster.primary).port)
    try:
        with manager.session_scope(read_only=True) as session:
            assert where(session) == (True, r1.port)
        with manager.session_scope() as outer:
            assert where(outer) == primary
            outer.add(User(name="written"))
            with manager.session_scope(read_only=True) as inner:
                assert inner is outer and where(inner) == primary
            with manager.session_scope(read_only=True, propagation="requires_new") as other:
                assert where(other) == (True, r1.port)
        # Writes in a routed read-only scope: the ORM guard refuses them before the
        # server; raw SQL reaches the standby, which refuses it (SQLSTATE 25006).
        with pytest.raises(ReadOnlyError), manager.session_scope(read_only=True) as session:
            session.add(User(name="refused"))
        with pytest.raises(DBAPIError) as info, manager.session_scope(read_only=True) as s:
            s.execute(text("INSERT INTO ss_users (name) VALUES ('raw')"))
        assert getattr(info.value.orig, "sqlstate", None) == "25006"
        cluster.wait_replayed()
        with manager.session_scope(read_only=True) as session:
            assert names(session) == {"written"}
    finally:
        manager.dispose()


async def test_async_sessions_read_on_the_standby(cluster: Cluster, fresh_users: None) -> None:
    r2 = cluster.replicas[1]
    manager = SessionManager(
        cluster.primary,
        async_replicas=[cluster.replica_url(1, "asyncpg")],
        read_your_writes=0,
    )

    @manager.async_with_session(read_only=True)
    async def decorated(session: AsyncSession) -> tuple[bool, int]:
        return await awhere(session)

    try:
        async with manager.async_session_scope(read_only=True) as session:
            assert await awhere(session) == (True, r2.port)
        async with manager.async_session_scope() as session:
            assert await awhere(session) == (False, make_url(cluster.primary).port)
        assert await decorated() == (True, r2.port)
    finally:
        await manager.adispose()


def test_round_robin_over_two_streaming_replicas(cluster: Cluster) -> None:
    ports = [r.port for r in cluster.replicas]
    manager = SessionManager(
        cluster.primary,
        replicas=[cluster.replica_url(0), cluster.replica_url(1)],
        read_your_writes=0,
    )

    def read() -> int:
        with manager.session_scope(read_only=True) as session:
            in_recovery, port = where(session)
            assert in_recovery
            return port

    async def aread() -> int:
        async with manager.async_session_scope(read_only=True) as session:
            in_recovery, port = await awhere(session)
            assert in_recovery
            return port

    async def async_reads() -> list[int]:
        try:
            return [await aread() for _ in range(4)]
        finally:
            await manager.adispose()

    try:
        assert [read() for _ in range(10)] == ports * 5
        # The sequence is the manager's, shared by sync and async scopes.
        assert asyncio.run(async_reads()) == ports * 2
        engines = manager.get_stats()["routing"]["engines"]
        print(
            f"\nround robin, 14 reads: replica1 {engines['replica1']['reads']}, "
            f"replica2 {engines['replica2']['reads']}, primary {engines['primary']['reads']}"
        )
        assert (engines["replica1"]["reads"], engines["replica2"]["reads"]) == (7, 7)
        assert engines["primary"]["reads"] == 0
    finally:
        manager.dispose()


async def test_read_your_writes_under_real_replica_lag(cluster: Cluster, fresh_users: None) -> None:
    r1 = cluster.replicas[0]
    primary_port = make_url(cluster.primary).port
    long = SessionManager(cluster.primary, replicas=[cluster.replica_url(0)], read_your_writes=60)
    short = SessionManager(cluster.primary, replicas=[cluster.replica_url(0)], read_your_writes=0.2)

    def write(manager: SessionManager, name: str) -> None:
        with manager.session_scope() as session:
            session.add(User(name=name))

    def read(manager: SessionManager) -> tuple[tuple[bool, int], set[str]]:
        with manager.session_scope(read_only=True) as session:
            return where(session), names(session)

    r1.query("SELECT pg_wal_replay_pause()")
    try:
        while r1.query("SELECT pg_get_wal_replay_pause_state()") != "paused":
            await asyncio.sleep(0.01)
        outside = contextvars.Context()  # a context that writes nothing

        def writer() -> tuple[tuple[bool, int], set[str]]:
            write(long, "mine")
            return read(long)

        # Inside the window: the writer reads the primary and sees its write.
        assert contextvars.Context().run(writer) == ((False, primary_port), {"mine"})
        # Outside it: the standby, whose replay is paused, has not got the row.
        assert outside.run(read, long) == ((True, r1.port), set())

        def writer_after_window() -> tuple[tuple[bool, int], set[str]]:
            write(short, "later")
            time.sleep(0.3)  # longer than the 0.2 s window
            return read(short)

        assert contextvars.Context().run(writer_after_window) == ((True, r1.port), set())

        # Async: a task reads its own write from the primary; its creator, whose
        # context the task's commit does not reach, reads the lagging standby.
        async def task_writes() -> tuple[tuple[bool, int], set[str]]:
            async with long.async_session_scope() as session:
                session.add(User(name="task"))
            async with long.async_session_scope(read_only=True) as session:
                return await awhere(session), set((await session.scalars(select(User.name))).all())

        async def creator() -> tuple[Any, Any]:
            in_task = await asyncio.create_task(task_writes())
            async with long.async_session_scope(read_only=True) as session:
                count = await session.scalar(select(func.count()).select_from(User))
                return in_task, (await awhere(session), count)

        in_task, in_creator = await asyncio.create_task(creator(), context=contextvars.Context())
        assert in_task == ((False, primary_port), {"mine", "later", "task"})
        assert in_creator == ((True, r1.port), 0)
        assert long.get_stats()["routing"]["primary_because"]["read_your_writes"] == 2
    finally:
        r1.query("SELECT pg_wal_replay_resume()")
        await long.adispose()
        short.dispose()
    r1.wait_replayed()
    check = SessionManager(cluster.primary, replicas=[cluster.replica_url(0)], read_your_writes=0)
    try:
        assert read(check) == ((True, r1.port), {"mine", "later", "task"})  # caught up
    finally:
        check.dispose()


async def test_a_crashed_replica_is_replaced_and_no_write_is_lost(
    cluster: Cluster, fresh_users: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stop replica2 with ``pg_ctl stop -m immediate`` in the middle of a run of
    writes and reads, and watch three managers: two replicas with pre-ping (reads
    move to replica1 inside the scope), replica2 alone without pre-ping (the read
    on the dead pooled connection fails once, the decorator retries, the retry
    falls back to the primary), and replica2 alone, async (asyncpg).

    The routing's clock stands still unless the test moves it: a cool-down ends
    when the test says so, not when the ten reads after the crash happen to take
    longer than the cool-down on a loaded machine (the crashed replica would then
    be tried, and fail, once more)."""
    r1, r2 = cluster.replicas
    primary_port = make_url(cluster.primary).port
    cooldown = 1.0
    clock = [time.monotonic()]
    monkeypatch.setattr(
        "sessionscope._routing.time", types.SimpleNamespace(monotonic=lambda: clock[0])
    )
    config = SessionConfig(retry_delay=0.01)
    both = SessionManager(
        cluster.primary,
        replicas=[cluster.replica_url(0), cluster.replica_url(1)],
        read_your_writes=0,
        replica_cooldown=cooldown,
        pool_pre_ping=True,
    )
    alone = SessionManager(
        cluster.primary,
        replicas=[cluster.replica_url(1)],
        read_your_writes=0,
        replica_cooldown=cooldown,
        config=config,
    )
    async_alone = SessionManager(
        cluster.primary,
        async_replicas=[cluster.replica_url(1, "asyncpg")],
        read_your_writes=0,
        replica_cooldown=cooldown,
        pool_pre_ping=True,
    )

    @alone.with_session(read_only=True)
    def read_alone(session: Any) -> tuple[bool, int]:
        return where(session)

    def read_both() -> tuple[bool, int]:
        with both.session_scope(read_only=True) as session:
            return where(session)

    async def read_async() -> tuple[bool, int]:
        async with async_alone.async_session_scope(read_only=True) as session:
            return await awhere(session)

    writes: list[tuple[bool, int]] = []
    seen: dict[str, list[tuple[bool, int]]] = {"both": [], "alone": [], "async": []}
    took: dict[str, list[float]] = {"both": [], "alone": [], "async": []}
    stop_at = 6
    try:
        for i in range(16):
            with both.session_scope() as session:
                session.add(User(name=f"w{i}"))
                writes.append(where(session))
            if i == stop_at:
                r2.stop("immediate")
            for key, call in (("both", read_both), ("alone", read_alone)):
                started = time.perf_counter()
                seen[key].append(call())
                took[key].append(time.perf_counter() - started)
            started = time.perf_counter()
            seen["async"].append(await read_async())
            took["async"].append(time.perf_counter() - started)

        before, after = slice(0, stop_at), slice(stop_at, None)
        assert writes == [(False, primary_port)] * 16  # every write on the primary
        assert seen["both"][before] == [(True, r1.port), (True, r2.port)] * 3
        assert seen["both"][after] == [(True, r1.port)] * 10  # replica1 takes over
        assert seen["alone"][before] == [(True, r2.port)] * stop_at
        assert seen["alone"][after] == [(False, primary_port)] * 10
        assert seen["async"][before] == [(True, r2.port)] * stop_at
        assert seen["async"][after] == [(False, primary_port)] * 10
        # The one read on alone's dead pooled connection failed and was retried.
        assert alone.get_stats()["retries"] == 1
        routing = {
            "both": both.get_stats()["routing"],
            "alone": alone.get_stats()["routing"],
            "async": async_alone.get_stats()["routing"],
        }
        # replica2 of "both" is the crashed server; it is replica1 of the others.
        crashed = {"both": "replica2", "alone": "replica1", "async": "replica1"}
        for key, figures in routing.items():
            assert figures["fallbacks"] >= 1
            assert figures["engines"][crashed[key]]["connect_failures"] == 1
            assert figures["engines"][crashed[key]]["healthy"] is False

        # The cool-down is over while replica2 is still down: it is tried again,
        # fails again, and reads still go elsewhere.
        clock[0] += cooldown
        failures = routing["both"]["engines"]["replica2"]["connect_failures"]
        assert [read_both() for _ in range(2)] == [(True, r1.port)] * 2
        again = both.get_stats()["routing"]["engines"]["replica2"]["connect_failures"]
        assert again == failures + 1

        # Back up: after replaying what it missed, replica2 has every write, and
        # once the cool-down ends reads return to it.
        r2.start()
        r2.wait_streaming()
        r2.wait_replayed()
        clock[0] += cooldown
        assert read_alone() == (True, r2.port)
        assert sorted({read_both() for _ in range(2)}) == sorted({(True, r1.port), (True, r2.port)})
        check = create_engine(cluster.replica_url(1))
        try:
            with check.connect() as conn:
                stored = set(conn.scalars(text("SELECT name FROM ss_users")))
        finally:
            check.dispose()
        assert stored == {f"w{i}" for i in range(16)}
        print(
            "\nreads per server: "
            + "; ".join(
                f"{key}: "
                + ", ".join(f"{n} {e['reads']}" for n, e in figures["engines"].items())
                + f" (fallbacks {figures['fallbacks']})"
                for key, figures in routing.items()
            )
        )
        for key, durations in took.items():
            normal = sorted(durations[:stop_at])[stop_at // 2]
            print(
                f"{key}: read before the crash {normal * 1000:.1f} ms (median), slowest "
                f"read after it {max(durations[stop_at:]) * 1000:.1f} ms (the fallback), "
                f"next reads {sorted(durations[stop_at + 2 :])[4] * 1000:.1f} ms (median)"
            )
    finally:
        if not r2.running:
            r2.start()
            r2.wait_streaming()
        await async_alone.adispose()
        both.dispose()
        alone.dispose()


async def test_routing_figures_through_a_crashed_standby_are_exact_and_exported(
    cluster: Cluster, fresh_users: None
) -> None:
    """Crash replica2 (``pg_ctl stop -m immediate``) under three managers whose
    pools hold live connections to it, with pre-ping: two replicas sync, the
    same two async (asyncpg), and replica2 alone. Every read's server is checked
    with the server itself, and the routing figures are exact: in
    ``get_stats()`` (zeroed by ``reset_stats()`` before the crash) and in the
    Prometheus and OpenTelemetry exporters (which never go back)."""
    r1, r2 = cluster.replicas
    primary = (False, make_url(cluster.primary).port)
    on_r1, on_r2 = (True, r1.port), (True, r2.port)
    options: dict[str, Any] = {
        "read_your_writes": 0,
        "replica_cooldown": 600,  # replica2 stays out for the whole test
        "pool_pre_ping": True,
    }
    both = SessionManager(
        cluster.primary,
        replicas=[cluster.replica_url(0), cluster.replica_url(1)],
        name="both",
        **options,
    )
    async_both = SessionManager(
        cluster.primary,
        async_replicas=[cluster.replica_url(0, "asyncpg"), cluster.replica_url(1, "asyncpg")],
        name="async_both",
        **options,
    )
    alone = SessionManager(
        cluster.primary, replicas=[cluster.replica_url(1)], name="alone", **options
    )
    exported = {m.name: Exported(m) for m in (both, async_both, alone)}

    def read(manager: SessionManager) -> tuple[bool, int]:
        with manager.session_scope(read_only=True) as session:
            return where(session)

    async def aread() -> tuple[bool, int]:
        async with async_both.async_session_scope(read_only=True) as session:
            return await awhere(session)

    pair = ("replica1", "replica2")
    try:
        assert [read(both) for _ in range(4)] == [on_r1, on_r2] * 2
        assert [await aread() for _ in range(4)] == [on_r1, on_r2] * 2
        assert [read(alone) for _ in range(2)] == [on_r2] * 2
        before = {name: e.both() for name, e in exported.items()}
        two_each = {("replica1", "selected"): 2, ("replica2", "selected"): 2}
        assert before["both"] == before["async_both"] == expected(pair, reads=two_each)
        assert before["alone"] == expected(("replica1",), reads={("replica1", "selected"): 2})
        for manager in (both, async_both, alone):
            manager.reset_stats()
            routing = manager.get_stats()["routing"]
            assert routing["reads"] == 0
            assert {e["reads"] for e in routing["engines"].values()} == {0}
        assert {name: e.both() for name, e in exported.items()} == before

        r2.stop("immediate")
        # Round robin: replica1; replica2, whose pooled connection pre-ping finds
        # dead and whose reconnect is refused, so the read falls back to
        # replica1; replica1; replica2 again, cooling down: replica1 instead.
        assert [read(both) for _ in range(4)] == [on_r1] * 4
        assert [await aread() for _ in range(4)] == [on_r1] * 4
        # Alone: the fallback goes to the primary, then replica2 is skipped.
        assert [read(alone) for _ in range(2)] == [primary] * 2

        for manager in (both, async_both):
            routing = manager.get_stats()["routing"]
            assert (routing["reads"], routing["fallbacks"]) == (4, 1), manager.name
            assert routing["engines"]["replica1"]["reads"] == 4
            assert routing["engines"]["replica2"]["reads"] == 0
            assert routing["engines"]["replica2"]["connect_failures"] == 1
            assert routing["engines"]["replica2"]["healthy"] is False
            after = exported[manager.name].both()
            never_lower(before[manager.name], after)
            assert after == expected(
                pair,
                reads={
                    ("replica1", "selected"): 2 + 3,
                    ("replica1", "fallback"): 1,
                    ("replica2", "selected"): 2,
                },
                fallbacks=1,
                connect_failures={"replica2": 1},
                unhealthy=("replica2",),
            ), manager.name
        routing = alone.get_stats()["routing"]
        assert routing["primary_because"] == {
            "read_your_writes": 0,
            "no_replica_available": 1,
            "fallback": 1,
        }
        assert routing["engines"]["primary"]["reads"] == 2
        assert routing["engines"]["replica1"]["reads"] == 0
        after = exported["alone"].both()
        never_lower(before["alone"], after)
        assert after == expected(
            ("replica1",),
            reads={
                ("replica1", "selected"): 2,
                ("primary", "fallback"): 1,
                ("primary", "no_replica_available"): 1,
            },
            fallbacks=1,
            connect_failures={"replica1": 1},
            unhealthy=("replica1",),
        )
    finally:
        for e in exported.values():
            e.close()
        if not r2.running:
            r2.start()
            r2.wait_streaming()
        await async_both.adispose()
        both.dispose()
        alone.dispose()
