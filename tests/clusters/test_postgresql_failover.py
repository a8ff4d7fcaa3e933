"""PostgreSQL primary failover on a real primary + hot standby built by the tests.

The primary is the module's own (``initdb`` on a free loopback port,
tests/clusters/pgcluster.py); the standby follows it by streaming replication
(tests/replica). The failover test stops the primary mid-run (``pg_ctl stop -m
fast``: in-flight sessions are cut off) and promotes the standby
(``pg_ctl promote``), as an operator or a failover manager would.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from sessionscope import SessionConfig, SessionManager

from ..conftest import IN_CI
from ..replica import ReplicaSetupError, StreamingReplica, pg_bin
from .pgcluster import DATABASE, OwnPrimary
from .workload import Outcomes, describe_run, per_worker, recovery_times, summary, unfinished

FAST_RETRY = SessionConfig(
    retry_attempts=40, retry_delay=0.05, retry_max_delay=0.5, log_level="ERROR"
)


@dataclass
class Pair:
    primary: OwnPrimary
    standby: StreamingReplica

    def url(self, port: int, driver: str = "psycopg") -> str:
        return f"postgresql+{driver}://postgres@127.0.0.1:{port}/{DATABASE}"

    def multi_host_url(self, driver: str = "psycopg") -> str:
        hosts = f"host=127.0.0.1:{self.primary.port}&host=127.0.0.1:{self.standby.port}"
        return f"postgresql+{driver}://postgres@/{DATABASE}?{hosts}&target_session_attrs=read-write"


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    bindir = pg_bin()
    if bindir is None or not (bindir / "initdb").is_file():
        reason = "PostgreSQL server binaries (initdb, pg_ctl, pg_basebackup) not found"
        if IN_CI:
            pytest.fail(f"CI requires the failover tests: {reason}")
        pytest.skip(reason)
    primary = OwnPrimary(bindir)
    standby: StreamingReplica | None = None
    try:
        started = time.monotonic()
        primary.create()
        primary.start()
        with psycopg.connect(primary.conninfo(), autocommit=True) as conn:
            conn.execute("CREATE TABLE counter (id INT PRIMARY KEY, n INT NOT NULL)")
            conn.execute("CREATE TABLE effects (k TEXT PRIMARY KEY, port INT NOT NULL)")
            conn.execute("INSERT INTO counter VALUES (1, 0)")
        standby = StreamingReplica("standby", bindir, "127.0.0.1", primary.port)
        standby.create()
        standby.start()
        standby.wait_streaming()
        standby.wait_replayed()
        print(f"\nPostgreSQL primary + standby ready in {time.monotonic() - started:.1f} s")
        yield Pair(primary, standby)
    except ReplicaSetupError as err:
        pytest.fail(str(err))
    finally:
        if standby is not None:
            standby.destroy()
        primary.destroy()


def increment(session: Session, key: str) -> int:
    n = session.execute(text("SELECT n FROM counter WHERE id = 1 FOR UPDATE")).scalar_one()
    session.execute(text("UPDATE counter SET n = :n WHERE id = 1"), {"n": n + 1})
    port = session.execute(
        text("INSERT INTO effects (k, port) VALUES (:k, inet_server_port()) RETURNING port"),
        {"k": key},
    ).scalar_one()
    return int(port)


def state(port: int) -> tuple[int, set[str], dict[int, int]]:
    info = f"host=127.0.0.1 port={port} user=postgres dbname={DATABASE}"
    with psycopg.connect(info, autocommit=True) as conn:
        row = conn.execute("SELECT n FROM counter WHERE id = 1").fetchone()
        rows = conn.execute("SELECT k, port FROM effects").fetchall()
    assert row is not None
    ports: dict[int, int] = {}
    for _, p in rows:
        ports[p] = ports.get(p, 0) + 1
    return int(row[0]), {k for k, _ in rows}, ports


def test_a_standby_listed_first_is_not_written_to(pair: Pair) -> None:
    # Two URLs, the standby first: its connection check (pg_is_in_recovery())
    # cools it down and the unit moves to the primary.
    manager = SessionManager(
        primaries=[pair.url(pair.standby.port), pair.url(pair.primary.port)],
        config=FAST_RETRY,
        primary_cooldown=60,
    )

    @manager.with_session
    def where(session: Session) -> int:
        return int(session.execute(text("SELECT inet_server_port()")).scalar_one())

    try:
        assert where() == pair.primary.port
        assert where() == pair.primary.port
        stats = manager.get_stats()
    finally:
        manager.dispose()
    assert stats["cluster"]["nodes"]["node1"]["failures"] == 1
    assert stats["retries"] == 1 and list(stats["retry_errors"]) == ["NodeUnavailableError"]


def test_primary_stopped_and_standby_promoted_mid_run(pair: Pair) -> None:
    url = pair.multi_host_url()
    manager = SessionManager(
        primaries=[url],
        replicas=[pair.url(pair.standby.port)],
        config=FAST_RETRY,
        read_your_writes=0,
        pool_pre_ping=True,
    )
    outcomes = Outcomes()
    plan: dict[str, list[str]] = {}
    unit = manager.with_session(increment)

    @manager.async_with_session
    async def aunit(session: AsyncSession, key: str) -> int:
        return await session.run_sync(increment, key)

    @manager.with_session(read_only=True)
    def read(session: Session) -> tuple[bool, int]:
        row = session.execute(text("SELECT pg_is_in_recovery(), count(*) FROM effects")).one()
        return bool(row[0]), int(row[1])

    def work(keys: list[str]) -> None:
        for key in keys:
            try:
                port = unit(key)
            except Exception as err:
                outcomes.record(key, err)
            else:
                outcomes.record(key, None, port)
            time.sleep(0.005)

    async def awork(keys: list[str]) -> None:
        for key in keys:
            try:
                port = await aunit(key)
            except Exception as err:
                outcomes.record(key, err)
            else:
                outcomes.record(key, None, port)
            await asyncio.sleep(0.005)

    sync_done = threading.Event()

    async def async_side(groups: list[list[str]]) -> None:
        try:
            await asyncio.gather(*(awork(keys) for keys in groups))
        finally:
            # adispose() disposes the sync engines too: a connection a sync
            # worker still holds would go back to a pool already disposed and
            # stay open until the garbage collector finds it.
            await asyncio.to_thread(sync_done.wait, 300)
            await manager.adispose()

    for w in range(4):
        plan[f"s{w}"] = [f"s{w}-{i}" for i in range(60)]
    for w in range(2):
        plan[f"a{w}"] = [f"a{w}-{i}" for i in range(60)]
    threads = [threading.Thread(target=work, args=(plan[f"s{w}"],)) for w in range(4)]
    threads.append(
        threading.Thread(target=asyncio.run, args=(async_side([plan["a0"], plan["a1"]]),))
    )
    try:
        assert read() == (True, 0)  # reads go to the standby
        for thread in threads:
            thread.start()
        while len(outcomes.done) < 80:
            assert any(t.is_alive() for t in threads)
            time.sleep(0.01)
        fault_at = time.monotonic()
        pair.primary.stop("fast")
        pair.standby.promote()
        promoted_at = time.monotonic()
        for thread in threads[:4]:
            thread.join()
        sync_done.set()
        threads[4].join()
        stats = manager.get_stats()
        in_recovery, count = read()  # read routing still works: the new primary serves
    finally:
        sync_done.set()
        manager.dispose()
    counter, keys, ports = state(pair.standby.port)
    outcomes.check(keys, counter)
    times = recovery_times(outcomes, fault_at, plan, on_port=pair.standby.port)
    print(
        "\n" + describe_run("PostgreSQL failover, 4 threads + 2 tasks x 60", stats, outcomes, keys)
    )
    print(
        f"primary stopped and standby promoted in {promoted_at - fault_at:.2f} s; "
        "time from the stop to each worker's first unit done on the new primary: "
        f"{summary(times)}; effects per port {ports}"
    )
    # Every worker with units left at the stop resumed on the new primary.
    assert len(times) == unfinished(outcomes, fault_at, plan), per_worker(outcomes, fault_at, plan)
    # Units before the fault ran on the old primary, the rest on the new one.
    assert set(ports) == {pair.primary.port, pair.standby.port}
    assert not in_recovery and count == len(keys)
