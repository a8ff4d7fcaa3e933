"""Several primaries on a real 3-node MariaDB Galera cluster (tests/clusters/galera.py).

The module builds the cluster once (about 10-35 s) and removes it at the end.
Faults are real: ``kill -9`` of a node, ``wsrep_desync`` (a node that is not
Synced), ``gmcast.isolate`` (a node cut off from the Primary Component while a
COMMIT is pending).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from sessionscope import CommitOutcomeUnknownError, SessionConfig, SessionManager

from ..conftest import IN_CI
from .galera import GaleraCluster, GaleraSetupError, galera_missing
from .workload import (
    Outcomes,
    describe_run,
    per_worker,
    recovery_times,
    summary,
    unfinished,
)

FAST_RETRY = SessionConfig(
    retry_attempts=30, retry_delay=0.02, retry_max_delay=0.3, log_level="ERROR"
)


@pytest.fixture(scope="module")
def galera() -> Iterator[GaleraCluster]:
    missing = galera_missing()
    if missing is not None:
        if IN_CI:
            pytest.fail(f"CI requires the Galera cluster tests: {missing}")
        pytest.skip(missing)
    cluster = GaleraCluster()
    try:
        started = time.monotonic()
        cluster.build()
        print(f"\nGalera: 3 nodes synced in {time.monotonic() - started:.1f} s")
        yield cluster
    except GaleraSetupError as err:
        pytest.fail(str(err))
    finally:
        cluster.destroy()


@pytest.fixture
def fresh(galera: GaleraCluster) -> GaleraCluster:
    for node in galera.nodes:
        if not node.running:
            node.start()
    for node in galera.nodes:
        node.wait_synced(len(galera.nodes))
    galera.execute(
        galera.nodes[0],
        "DROP TABLE IF EXISTS counter, effects",
        "CREATE TABLE counter (id INT PRIMARY KEY, n INT NOT NULL)",
        "CREATE TABLE effects (k VARCHAR(64) PRIMARY KEY, port INT NOT NULL)",
        "INSERT INTO counter VALUES (1, 0)",
    )
    for node in galera.nodes:  # every node has applied the setup (causal read)
        assert galera.execute(node, "SELECT n FROM counter") == [(0,)]
    return galera


def manager_for(galera: GaleraCluster, driver: str = "pymysql", **kw: Any) -> SessionManager:
    urls = [node.url(driver) for node in galera.nodes]
    key = "async_primaries" if driver == "aiomysql" else "primaries"
    options: dict[str, Any] = {"config": FAST_RETRY, "pool_pre_ping": True, key: urls}
    options.update(kw)
    return SessionManager(**options)


def state(galera: GaleraCluster, node: int = 0) -> tuple[int, set[str], dict[int, int]]:
    """(counter, effect keys, effects per port) read on node ``node``."""
    n = galera.nodes[node]
    counter = galera.execute(n, "SELECT n FROM counter WHERE id = 1")[0][0]
    rows = galera.execute(n, "SELECT k, port FROM effects")
    ports: dict[int, int] = {}
    for _, port in rows:
        ports[port] = ports.get(port, 0) + 1
    return int(counter), {k for k, _ in rows}, ports


def increment(session: Session, key: str) -> None:
    n = session.execute(text("SELECT n FROM counter WHERE id = 1 FOR UPDATE")).scalar_one()
    session.execute(text("UPDATE counter SET n = :n WHERE id = 1"), {"n": n + 1})
    session.execute(text("INSERT INTO effects (k, port) VALUES (:k, @@port)"), {"k": key})


def run_threads(
    manager: SessionManager, outcomes: Outcomes, prefix: str, workers: int, per: int
) -> tuple[list[threading.Thread], dict[str, list[str]]]:
    unit = manager.with_session(increment)
    plan = {f"{prefix}{w}": [f"{prefix}{w}-{i}" for i in range(per)] for w in range(workers)}

    def work(keys: list[str]) -> None:
        for key in keys:
            try:
                unit(key)
            except Exception as err:
                outcomes.record(key, err)
            else:
                outcomes.record(key, None)

    threads = [threading.Thread(target=work, args=(keys,)) for keys in plan.values()]
    for thread in threads:
        thread.start()
    return threads, plan


def test_increments_over_three_writers_end_exact_sync(fresh: GaleraCluster) -> None:
    manager = manager_for(fresh, primary_selection="round_robin")
    outcomes = Outcomes()
    try:
        threads, _ = run_threads(manager, outcomes, "s", workers=6, per=30)
        for thread in threads:
            thread.join()
        stats = manager.get_stats()
    finally:
        manager.dispose()
    for i in range(3):
        counter, keys, ports = state(fresh, i)
        outcomes.check(keys, counter)
        assert counter == 180
    sessions = {name: node["sessions"] for name, node in stats["cluster"]["nodes"].items()}
    print("\n" + describe_run("Galera sync, 6 threads x 30", stats, outcomes, keys))
    print(f"sessions per node {sessions}, effects per port {ports}")
    assert len(ports) == 3  # every node wrote
    # Conflicting writers on different nodes: certification failures, retried.
    assert stats["retries"] == sum(stats["retry_errors"].values())


async def test_increments_over_three_writers_end_exact_async(fresh: GaleraCluster) -> None:
    manager = manager_for(fresh, "aiomysql", primary_selection="round_robin")
    outcomes = Outcomes()

    @manager.async_with_session
    async def unit(session: AsyncSession, key: str) -> None:
        await session.run_sync(increment, key)

    async def work(w: int) -> None:
        for i in range(30):
            key = f"a{w}-{i}"
            try:
                await unit(key)
            except Exception as err:
                outcomes.record(key, err)
            else:
                outcomes.record(key, None)

    try:
        await asyncio.gather(*(work(w) for w in range(6)))
        stats = manager.get_stats()
    finally:
        await manager.adispose()
    counter, keys, ports = state(fresh, 2)
    outcomes.check(keys, counter)
    assert counter == 180 and len(ports) == 3
    print("\n" + describe_run("Galera async, 6 tasks x 30", stats, outcomes, keys))


def test_plain_select_read_modify_write_loses_updates_no_retry_can_see(
    fresh: GaleraCluster,
) -> None:
    # The hazard the docs warn about: without FOR UPDATE, two nodes read the same
    # value and both write value + 1; neither transaction conflicts on a row the
    # other wrote first, so both commit and an increment is lost.
    manager = manager_for(fresh, primary_selection="round_robin")

    def unsafe(session: Session, key: str) -> None:
        n = session.execute(text("SELECT n FROM counter WHERE id = 1")).scalar_one()
        session.execute(text("UPDATE counter SET n = :n WHERE id = 1"), {"n": n + 1})
        session.execute(text("INSERT INTO effects (k, port) VALUES (:k, @@port)"), {"k": key})

    unit = manager.with_session(unsafe)

    def work(w: int) -> None:
        for i in range(30):
            unit(f"u{w}-{i}")

    try:
        threads = [threading.Thread(target=work, args=(w,)) for w in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        retries = manager.get_stats()["retries"]
    finally:
        manager.dispose()
    counter, keys, _ = state(fresh, 0)
    print(
        f"\nplain SELECT then UPDATE, 6 threads x 30: counter {counter} of 180, {retries} retries"
    )
    assert len(keys) == 180 and counter <= 180


def test_kill_9_of_a_node_mid_run_loses_and_doubles_nothing(fresh: GaleraCluster) -> None:
    victim = fresh.nodes[2]
    cooldown = 2.0
    manager = manager_for(fresh, primary_selection="round_robin", primary_cooldown=cooldown)
    outcomes = Outcomes()
    try:
        threads, plan = run_threads(manager, outcomes, "k", workers=6, per=40)
        while len(outcomes.done) < 60 and any(t.is_alive() for t in threads):
            time.sleep(0.01)
        fault_at = time.monotonic()
        victim.kill()
        for thread in threads:
            thread.join()
        stats = manager.get_stats()
        counter, keys, _ = state(fresh, 0)
        outcomes.check(keys, counter)
        times = recovery_times(outcomes, fault_at, plan)
        print("\n" + describe_run("Galera kill -9 of node3, 6 threads x 40", stats, outcomes, keys))
        print(f"time to recover per thread after kill -9: {summary(times)}")
        workers = per_worker(outcomes, fault_at, plan)
        print(workers)
        # Every worker with units left at the kill carried on.
        assert len(times) == unfinished(outcomes, fault_at, plan), workers
        assert stats["cluster"]["nodes"]["node3"]["failures"] >= 1
        # The killed node rejoins; after its cool-down new sessions use it again.
        victim.start()
        victim.wait_synced(3)
        time.sleep(cooldown)
        manager.reset_stats()
        threads, _ = run_threads(manager, outcomes, "r", workers=3, per=10)
        for thread in threads:
            thread.join()
        after = manager.get_stats()["cluster"]["nodes"]
    finally:
        manager.dispose()
    counter, keys, _ = state(fresh, 2)
    outcomes.check(keys, counter)
    assert after["node3"]["sessions"] > 0 and after["node3"]["healthy"]
    rejoined = galera_port_effects(fresh, victim.port, "r")
    print(f"after rejoin: sessions per node { ({k: v['sessions'] for k, v in after.items()}) }")
    assert rejoined > 0


async def test_kill_9_of_a_node_mid_run_async(fresh: GaleraCluster) -> None:
    victim = fresh.nodes[1]
    manager = manager_for(fresh, "aiomysql", primary_selection="round_robin")
    outcomes = Outcomes()
    plan = {f"x{w}": [f"x{w}-{i}" for i in range(40)] for w in range(6)}

    @manager.async_with_session
    async def unit(session: AsyncSession, key: str) -> None:
        await session.run_sync(increment, key)

    async def work(keys: list[str]) -> None:
        for key in keys:
            try:
                await unit(key)
            except Exception as err:
                outcomes.record(key, err)
            else:
                outcomes.record(key, None)

    async def killer() -> float:
        deadline = time.monotonic() + 120
        while len(outcomes.done) < 60:
            assert time.monotonic() < deadline, outcomes.failed
            await asyncio.sleep(0.01)
        victim.kill()  # blocks the loop for the kill only: in-flight work is cut off
        return time.monotonic()

    try:
        results = await asyncio.gather(killer(), *(work(keys) for keys in plan.values()))
        fault_at = results[0]
        stats = manager.get_stats()
    finally:
        await manager.adispose()
    counter, keys, _ = state(fresh, 0)
    outcomes.check(keys, counter)
    times = recovery_times(outcomes, fault_at, plan)
    print("\n" + describe_run("Galera async kill -9 of node2, 6 tasks x 40", stats, outcomes, keys))
    print(f"time to recover per task after kill -9: {summary(times)}")
    workers = per_worker(outcomes, fault_at, plan)
    print(workers)
    assert len(times) == unfinished(outcomes, fault_at, plan), workers
    assert stats["cluster"]["nodes"]["node2"]["failures"] >= 1


def galera_port_effects(galera: GaleraCluster, port: int, prefix: str) -> int:
    rows = galera.execute(
        galera.nodes[0], f"SELECT COUNT(*) FROM effects WHERE port = {port} AND k LIKE '{prefix}%'"
    )
    return int(rows[0][0])


def test_a_node_that_is_not_synced_is_cooled_down_and_the_unit_moves(
    fresh: GaleraCluster,
) -> None:
    from sqlalchemy.pool import NullPool

    first, second = fresh.nodes[0], fresh.nodes[1]
    # NullPool: every session connects, so each one runs the readiness check.
    manager = manager_for(fresh, primary_cooldown=60, poolclass=NullPool)
    manager.configure(retry_delay=0.01)

    @manager.with_session
    def port(session: Session) -> int:
        return int(session.execute(text("SELECT @@port")).scalar_one())

    try:
        assert port() == first.port  # failover policy: the first node while healthy
        fresh.execute(first, "SET GLOBAL wsrep_desync = ON")
        try:
            assert first.status("wsrep_local_state")["wsrep_local_state"] == "2"
            assert port() == second.port
            assert port() == second.port  # cooled down: not tried again
        finally:
            fresh.execute(first, "SET GLOBAL wsrep_desync = OFF")
        stats = manager.get_stats()
    finally:
        manager.dispose()
    nodes = stats["cluster"]["nodes"]
    assert nodes["node1"]["failures"] == 1 and not nodes["node1"]["healthy"]
    assert stats["retries"] == 1 and list(stats["retry_errors"]) == ["NodeUnavailableError"]


def test_commit_on_a_node_cut_from_the_cluster_is_outcome_unknown(fresh: GaleraCluster) -> None:
    first, second = fresh.nodes[0], fresh.nodes[1]
    manager = manager_for(fresh, primary_cooldown=60)
    attempts: list[int] = []

    @manager.with_session
    def cut_before_commit(session: Session, key: str) -> None:
        attempts.append(int(session.execute(text("SELECT @@port")).scalar_one()))
        increment(session, key)
        if len(attempts) == 1:
            isolate(fresh, first, True)

    try:
        with pytest.raises(CommitOutcomeUnknownError) as info:
            cut_before_commit("c1")
        assert attempts == [first.port]  # never retried
        cause = info.value.__cause__
        code = getattr(getattr(cause, "orig", None), "args", [None])[0]
        print(f"\nCOMMIT on an isolated node: {type(cause).__name__} {code}")
        assert code in (1180, 1047, 2013)
        # Before COMMIT the same loss is retried, on another node.
        attempts.clear()
        attempts.append(0)  # the next call must not isolate again

        @manager.with_session
        def where(session: Session) -> int:
            return int(session.execute(text("SELECT @@port")).scalar_one())

        assert where() == second.port
        stats = manager.get_stats()
    finally:
        isolate(fresh, first, False)
        manager.dispose()
    assert stats["cluster"]["nodes"]["node1"]["failures"] == 1
    counter, keys, _ = state(fresh, 1)
    assert counter == len(keys) <= 1  # committed whole or not at all


def isolate(galera: GaleraCluster, node: Any, on: bool) -> None:
    galera.execute(node, f"SET GLOBAL wsrep_provider_options = 'gmcast.isolate={int(on)}'")
    if on:
        deadline = time.monotonic() + 30
        while node.status("wsrep_ready")["wsrep_ready"] == "ON":
            assert time.monotonic() < deadline, "the node did not leave the cluster"
            time.sleep(0.05)
    else:
        node.wait_synced(len(galera.nodes))


def test_causal_reads_see_a_write_made_on_another_node(fresh: GaleraCluster) -> None:
    writer = SessionManager(fresh.nodes[0].url(), config=FAST_RETRY)
    reader = SessionManager(fresh.nodes[2].url(), config=FAST_RETRY)
    try:
        with reader.session_scope(causal_reads=True) as session:
            assert session.execute(text("SELECT @@session.wsrep_sync_wait")).scalar_one() == 1
        with reader.session_scope() as session:  # the pool got the variable back
            assert session.execute(text("SELECT @@session.wsrep_sync_wait")).scalar_one() == 0
        seen = 0
        for i in range(50):
            with writer.session_scope() as session:
                session.execute(text("UPDATE counter SET n = :n WHERE id = 1"), {"n": i + 1})
            with reader.session_scope(causal_reads=True) as session:
                seen += session.execute(text("SELECT n FROM counter")).scalar_one() == i + 1
        assert seen == 50
        cost = {}
        for causal in (False, True):
            started = time.perf_counter()
            for _ in range(200):
                with reader.session_scope(causal_reads=causal) as session:
                    session.execute(text("SELECT n FROM counter")).scalar_one()
            cost[causal] = (time.perf_counter() - started) / 200 * 1000
        print(
            f"\nread scope on a Galera node: {cost[False]:.2f} ms plain, "
            f"{cost[True]:.2f} ms with causal_reads=True"
        )
    finally:
        writer.dispose()
        reader.dispose()
