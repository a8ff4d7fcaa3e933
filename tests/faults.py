"""Real faults for the retry, cancellation and pool tests.

Everything here acts on the real servers: it finds the server-side id of a
session's own connection and kills exactly that connection
(``pg_terminate_backend`` / ``KILL CONNECTION``), never connections chosen by a
broad filter, since other test runs share the servers. On SQLite the transient
fault is a real "database is locked": another connection holds the write lock
and the test engine waits 0 s for it.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import bindparam, create_engine, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.pool import NullPool

T = TypeVar("T")

CONNECTION_ID_SQL = {
    "postgresql": "SELECT pg_backend_pid()",
    "mariadb": "SELECT CONNECTION_ID()",
}


class Server:
    """Administration of one server backend through its own AUTOCOMMIT engine
    (``NullPool``: it leaves no connection behind)."""

    def __init__(self, backend: str, url: str) -> None:
        self.backend = backend
        self.engine: Engine = create_engine(url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
        self.id_sql = text(CONNECTION_ID_SQL[backend])

    def kill(self, connection_id: int) -> None:
        """Kill one server connection by its id, as an operator or a failover would."""
        with self.engine.connect() as conn:
            if self.backend == "postgresql":
                killed = conn.scalar(
                    text("SELECT pg_terminate_backend(:pid)"), {"pid": connection_id}
                )
                assert killed, f"backend {connection_id} was not terminated"
            else:
                conn.exec_driver_sql(f"KILL CONNECTION {int(connection_id)}")

    def pg_activity(self, pids: list[int]) -> list[tuple[int, str | None, str | None, str]]:
        """``(pid, state, wait_event, query)`` of the given PostgreSQL backends that
        still exist."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT pid, state, wait_event, query FROM pg_stat_activity "
                    "WHERE pid = ANY(:pids)"
                ),
                {"pids": list(pids)},
            ).all()
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    def mariadb_threads(self, ids: list[int]) -> list[tuple[int, str, str | None, str | None]]:
        """``(id, command, info, trx_state)`` of the given MariaDB connections that
        still exist (``trx_state`` None: no open InnoDB transaction)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT p.id, p.command, p.info, t.trx_state "
                    "FROM information_schema.processlist p "
                    "LEFT JOIN information_schema.innodb_trx t ON t.trx_mysql_thread_id = p.id "
                    "WHERE p.id IN :ids"
                ).bindparams(bindparam("ids", expanding=True)),
                {"ids": list(ids)},
            ).all()
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    def dispose(self) -> None:
        self.engine.dispose()


SLOW_COMMIT_DDL = [
    "DROP TABLE IF EXISTS ss_slow_commit",
    "CREATE TABLE ss_slow_commit (id integer PRIMARY KEY)",
    "CREATE OR REPLACE FUNCTION ss_slow_commit_fn() RETURNS trigger LANGUAGE plpgsql AS "
    "$$ BEGIN PERFORM pg_sleep(60); RETURN NULL; END $$",
    "CREATE CONSTRAINT TRIGGER ss_slow_commit_trg AFTER INSERT ON ss_slow_commit "
    "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION ss_slow_commit_fn()",
]


def create_slow_commit_table(admin: Server) -> None:
    """PostgreSQL table ``ss_slow_commit`` whose inserted rows make COMMIT slow: a
    deferred constraint trigger runs at COMMIT time and sleeps (60 s), so a test
    can see the backend inside COMMIT (query ``COMMIT``, wait event ``PgSleep``)
    and act while the COMMIT is in flight."""
    with admin.engine.connect() as conn:
        for statement in SLOW_COMMIT_DDL:
            conn.exec_driver_sql(statement)


def drop_slow_commit_table(admin: Server) -> None:
    with admin.engine.connect() as conn:
        conn.exec_driver_sql("DROP TABLE IF EXISTS ss_slow_commit")
        conn.exec_driver_sql("DROP FUNCTION IF EXISTS ss_slow_commit_fn()")


def in_commit(admin: Server, pid: int) -> bool:
    """True while PostgreSQL backend ``pid`` runs COMMIT and sleeps in the trigger."""
    return any(
        row[3].upper().startswith("COMMIT") and row[2] == "PgSleep"
        for row in admin.pg_activity([pid])
    )


class SqliteLock:
    """Holds SQLite's write lock from a separate connection, so a write of any
    other connection fails at once with "database is locked" (when that engine
    waits 0 s: ``connect_args={"timeout": 0}``)."""

    def __init__(self, url: str) -> None:
        database = make_url(url).database
        assert database, "SqliteLock needs a file database"
        self._conn = sqlite3.connect(
            database, timeout=0, isolation_level=None, check_same_thread=False
        )

    def hold(self) -> None:
        if not self._conn.in_transaction:
            self._conn.execute("BEGIN IMMEDIATE")

    def share(self) -> None:
        """Hold a read (SHARED) lock instead: others can still write, but no
        COMMIT of theirs can finish ("database is locked" at COMMIT)."""
        if not self._conn.in_transaction:
            self._conn.execute("BEGIN")
            self._conn.execute("SELECT count(*) FROM sqlite_master").fetchall()

    def release(self) -> None:
        if self._conn.in_transaction:
            self._conn.execute("ROLLBACK")

    def close(self) -> None:
        self.release()
        self._conn.close()


def wait_for(condition: Callable[[], T], what: str, timeout: float = 30.0) -> T:
    """Poll ``condition`` until it returns a truthy value; fail after ``timeout``
    seconds. A guard against hanging, not a timing assertion."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


async def await_for(condition: Callable[[], T], what: str, timeout: float = 30.0) -> T:
    """Async :func:`wait_for`: polls without blocking the event loop."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


class AsyncBarrier:
    """``asyncio.Barrier`` for Python 3.10 (it arrived in 3.11): one use only."""

    def __init__(self, parties: int) -> None:
        self._parties = parties
        self._arrived = 0
        self._event = asyncio.Event()

    async def wait(self) -> None:
        self._arrived += 1
        if self._arrived >= self._parties:
            self._event.set()
        await self._event.wait()
