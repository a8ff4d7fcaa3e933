"""Retry (SPEC section 3): what is retried, how often, where, and what never is.

The behaviour tests run on SQLite, PostgreSQL and MariaDB, through the sync and
the async front (``grid.Api``), against a real transient fault: on the servers
the session's own connection is killed (``pg_terminate_backend`` /
``KILL CONNECTION``) between two statements; on SQLite another connection holds
the write lock, so the next write fails with a real "database is locked".

The classification tests make each server raise the error itself (PostgreSQL
``RAISE ... USING ERRCODE``, MariaDB ``SIGNAL ... MYSQL_ERRNO``), so the codes
reach :func:`is_transient` through the real drivers, sync and async; that is how
codes no test could provoke on demand (08007, 57P03) are covered.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, func, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import Session
from sqlalchemy.util import await_only, greenlet_spawn

import sessionscope
from sessionscope import (
    CommitOutcomeUnknownError,
    PoolExhaustedError,
    SessionConfig,
    SessionManager,
    is_transient,
)
from sessionscope._retry import (
    backoff_delay,
    describe,
    error_code,
    is_disconnect,
    retry_delay_for,
)

from .conftest import backend_url, require_server, reset_schema
from .faults import Server, SqliteLock
from .grid import Api, make_api
from .models import User


class Flaky(Exception):
    """An application error that a user predicate declares transient."""


class Fault:
    """A real transient fault on demand: :meth:`strike` makes the session's next
    write fail; :meth:`heal` lets the next attempt through."""

    def __init__(self, backend: str, url: str) -> None:
        self.backend = backend
        self.server = Server(backend, url) if backend != "sqlite" else None
        self.lock = SqliteLock(url) if backend == "sqlite" else None

    def connection_id(self, api: Api, session: Any) -> int | None:
        """The server-side id of the session's connection (None on SQLite)."""
        if self.server is None:
            return None
        return int(api.scalar(session, self.server.id_sql))

    def strike(self, api: Api, session: Any) -> None:
        if self.lock is not None:
            self.lock.hold()
            return
        assert self.server is not None
        connection_id = self.connection_id(api, session)
        assert connection_id is not None
        self.server.kill(connection_id)

    def heal(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def close(self) -> None:
        if self.lock is not None:
            self.lock.close()
        if self.server is not None:
            self.server.dispose()


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def fault_env(backend: str, tmp_path: Path) -> Iterator[tuple[SessionManager, Fault]]:
    url = backend_url(backend, tmp_path)
    # SQLite must not wait for the lock holder: the fault is the "locked" error.
    options: dict[str, Any] = {"connect_args": {"timeout": 0}} if backend == "sqlite" else {}
    sessionscope.configure_session(retry_delay=0.001, retry_max_delay=0.005)
    manager = sessionscope.setup_database_connection(url, **options)
    reset_schema(manager.engine)
    manager.reset_stats()
    fault = Fault(backend, url)
    yield manager, fault
    fault.close()
    manager.dispose()


@pytest.fixture
def api(mode: str, fault_env: tuple[SessionManager, Fault]) -> Api:
    return make_api(mode, fault_env[0])


@pytest.fixture
def fault(fault_env: tuple[SessionManager, Fault]) -> Fault:
    return fault_env[1]


def user_names(api: Api) -> list[str]:
    with api.scope() as s:
        return sorted(api.execute(s, select(User.name)).scalars().all())


def stats() -> dict[str, Any]:
    return sessionscope.get_session_stats()


def unit_of_work(
    api: Api,
    fault: Fault,
    attempts: list[int | None],
    strike: Callable[[int], bool] = lambda n: n == 1,
) -> Callable[..., Any]:
    """A function that reads, then (on a striking attempt) meets the fault, then
    writes: the write fails on striking attempts, succeeds otherwise. Records
    the server connection id of each attempt."""

    def unit(session: Any, name: str = "once") -> int:
        attempts.append(fault.connection_id(api, session))
        n = len(attempts)
        api.scalar(session, select(func.count()).select_from(User))
        if strike(n):
            fault.strike(api, session)
        else:
            fault.heal()
        session.add(User(name=name))
        api.flush(session)
        return n

    return unit


def with_retry(api: Api, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``with_retry`` / ``async_with_retry`` of the default manager, for ``api``'s front."""
    if not api.is_async:
        return sessionscope.with_retry(fn, *args, **kwargs)

    async def afn(*a: Any, **kw: Any) -> Any:
        return await greenlet_spawn(fn, *a, **kw)

    afn.__qualname__ = fn.__qualname__
    return await_only(sessionscope.async_with_retry(afn, *args, **kwargs))


# -- the happy retry path --------------------------------------------------------


def test_transient_fault_is_retried_on_a_new_connection_and_lands_once(
    api: Api, fault: Fault
) -> None:
    def scenario(api: Api) -> None:
        attempts: list[int | None] = []
        unit = api.decorate(unit_of_work(api, fault, attempts))
        assert unit() == 2
        assert user_names(api) == ["once"]
        if fault.server is not None:
            assert attempts[0] != attempts[1], "the retry must run on a new connection"
        assert api.checked_out() == 0

    api.run(scenario)
    figures = stats()
    assert figures["retries"] == 1
    assert sum(figures["retry_errors"].values()) == 1
    assert figures["active_sessions"] == 0


@pytest.mark.parametrize("backend", ["sqlite"])
def test_sqlite_busy_commit_is_retried_and_leaves_no_open_transaction(
    api: Api, fault: Fault
) -> None:
    """A reader holds SQLite's SHARED lock: the INSERT goes through but COMMIT
    fails with "database is locked". SQLite keeps that transaction open; the
    scope rolls it back, so the pooled connection is clean for the retry and
    for the next user."""
    lock = fault.lock
    assert lock is not None

    def scenario(api: Api) -> None:
        attempts: list[int] = []

        def write(session: Any) -> None:
            attempts.append(1)
            if len(attempts) == 1:
                lock.share()
            else:
                lock.release()
            session.add(User(name="committed"))

        api.decorate(write)()
        assert len(attempts) == 2
        for name in ("next", "user"):
            with api.scope() as s:
                s.add(User(name=name))
        assert user_names(api) == ["committed", "next", "user"]

    api.run(scenario)
    assert stats()["retries"] == 1


def test_retries_stop_after_retry_attempts(api: Api, fault: Fault) -> None:
    def scenario(api: Api) -> None:
        attempts: list[int | None] = []
        unit = api.decorate(unit_of_work(api, fault, attempts, lambda n: True), retry_attempts=2)
        with pytest.raises(sa_exc.DBAPIError) as caught:
            unit()
        assert is_transient(caught.value)
        assert len(attempts) == 3
        fault.heal()
        assert user_names(api) == []

    api.run(scenario)
    assert stats()["retries"] == 2


def test_retry_attempts_zero_disables_retry(api: Api, fault: Fault) -> None:
    def scenario(api: Api) -> None:
        attempts: list[int | None] = []
        unit = api.decorate(unit_of_work(api, fault, attempts), retry_attempts=0)
        with pytest.raises(sa_exc.DBAPIError) as caught:
            unit()
        assert is_transient(caught.value)
        assert len(attempts) == 1
        fault.heal()
        assert user_names(api) == []

    api.run(scenario)
    assert stats()["retries"] == 0


def test_configured_retry_attempts_zero_disables_retry(api: Api, fault: Fault) -> None:
    sessionscope.configure_session(retry_attempts=0)

    def scenario(api: Api) -> None:
        attempts: list[int | None] = []
        with pytest.raises(sa_exc.DBAPIError):
            api.decorate(unit_of_work(api, fault, attempts))()
        assert len(attempts) == 1

    api.run(scenario)
    assert stats()["retries"] == 0


# -- never retried -----------------------------------------------------------------


def test_integrity_error_is_never_retried(api: Api) -> None:
    def scenario(api: Api) -> None:
        with api.scope() as s:
            s.add(User(name="taken"))
        calls: list[int] = []

        def add(session: Any) -> None:
            calls.append(1)
            session.add(User(name="taken"))
            api.flush(session)

        with pytest.raises(sa_exc.IntegrityError):
            api.decorate(add)()
        assert calls == [1]

    api.run(scenario)
    assert stats()["retries"] == 0


def test_user_error_is_never_retried(api: Api) -> None:
    def scenario(api: Api) -> None:
        calls: list[int] = []

        def fail(session: Any) -> None:
            calls.append(1)
            session.add(User(name="partial"))
            api.flush(session)
            raise ValueError("bad input")

        with pytest.raises(ValueError, match="bad input"):
            api.decorate(fail)()
        assert calls == [1]
        assert user_names(api) == []

    api.run(scenario)
    assert stats()["retries"] == 0


# -- the predicate -------------------------------------------------------------------


def test_predicate_can_extend_the_default(api: Api, fault: Fault) -> None:
    def extended(exc: BaseException) -> bool:
        return is_transient(exc) or isinstance(exc, Flaky)

    def scenario(api: Api) -> None:
        attempts: list[int | None] = []
        inner = unit_of_work(api, fault, attempts, lambda n: n == 2)

        def unit(session: Any) -> int:
            if not attempts:
                attempts.append(None)
                raise Flaky
            return inner(session)

        # attempt 1: Flaky (the user's kind); attempt 2: the database fault
        # (the default's kind); attempt 3 succeeds.
        assert api.decorate(unit, retry_predicate=extended)() == 3
        assert user_names(api) == ["once"]

    api.run(scenario)
    assert stats()["retries"] == 2


def test_predicate_can_replace_the_default(api: Api, fault: Fault) -> None:
    def only_flaky(exc: BaseException) -> bool:
        return isinstance(exc, Flaky)

    def scenario(api: Api) -> None:
        calls: list[int] = []

        def flaky_once(session: Any) -> str:
            calls.append(1)
            if len(calls) == 1:
                raise Flaky
            return "ok"

        assert api.decorate(flaky_once, retry_predicate=only_flaky)() == "ok"
        assert len(calls) == 2

        attempts: list[int | None] = []
        unit = api.decorate(unit_of_work(api, fault, attempts), retry_predicate=only_flaky)
        with pytest.raises(sa_exc.DBAPIError):
            unit()
        assert len(attempts) == 1, "the replaced predicate no longer retries database faults"

    api.run(scenario)
    assert stats()["retries"] == 1


def test_no_predicate_can_retry_an_unknown_commit_outcome_or_pool_exhaustion() -> None:
    cfg = SessionConfig(retry_attempts=5, retry_predicate=lambda exc: True)
    assert retry_delay_for(cfg, 1, Flaky()) is not None
    assert retry_delay_for(cfg, 1, CommitOutcomeUnknownError("lost during COMMIT")) is None
    assert retry_delay_for(cfg, 1, PoolExhaustedError("no connection")) is None
    assert retry_delay_for(cfg, 1, sa_exc.TimeoutError("QueuePool limit")) is None
    assert not is_transient(CommitOutcomeUnknownError("lost during COMMIT"))


# -- where retry happens: the outermost boundary only --------------------------------


def test_nested_decorated_function_leaves_the_retry_to_the_outermost(
    api: Api, fault: Fault
) -> None:
    def scenario(api: Api) -> None:
        inner_attempts: list[int | None] = []
        outer_calls: list[int] = []
        inner = api.decorate(unit_of_work(api, fault, inner_attempts))

        def outer(session: Any) -> None:
            outer_calls.append(1)
            inner()  # joins; its fault spoils the whole transaction
            session.add(User(name="outer"))

        api.decorate(outer)()
        assert len(inner_attempts) == 2
        assert len(outer_calls) == 2, "the whole outer function is re-run"
        assert user_names(api) == ["once", "outer"]

    api.run(scenario)
    assert stats()["retries"] == 1


def test_with_retry_inside_a_scope_does_not_retry_a_part(api: Api, fault: Fault) -> None:
    def scenario(api: Api) -> None:
        attempts: list[int | None] = []
        part = api.decorate(unit_of_work(api, fault, attempts))
        with pytest.raises(sa_exc.DBAPIError), api.scope() as s:
            api.scalar(s, select(func.count()).select_from(User))
            with_retry(api, part, max_retries=5)
            s.add(User(name="outer"))
        assert len(attempts) == 1
        fault.heal()
        assert user_names(api) == []

    api.run(scenario)
    assert stats()["retries"] == 0


def test_with_retry_reruns_the_whole_callable_with_its_arguments(
    api: Api, fault: Fault
) -> None:
    def scenario(api: Api) -> None:
        attempts: list[int | None] = []
        step = api.decorate(unit_of_work(api, fault, attempts))
        runs: list[tuple[str, str]] = []

        def job(first: str, *, second: str) -> str:
            runs.append((first, second))
            step(name=first)  # a decorated call inside: it leaves retrying to job
            with api.scope() as s:
                s.add(User(name=second))
            return "done"

        assert with_retry(api, job, "a", second="b", max_retries=2, retry_delay=0.001) == "done"
        assert runs == [("a", "b"), ("a", "b")]
        assert len(attempts) == 2
        assert user_names(api) == ["a", "b"]

    api.run(scenario)
    assert stats()["retries"] == 1


def test_with_retry_max_retries_zero_calls_once(api: Api, fault: Fault) -> None:
    def scenario(api: Api) -> None:
        attempts: list[int | None] = []

        def job() -> None:
            with api.scope() as s:
                unit_of_work(api, fault, attempts)(s)

        with pytest.raises(sa_exc.DBAPIError):
            with_retry(api, job, max_retries=0)
        assert len(attempts) == 1

    api.run(scenario)
    assert stats()["retries"] == 0


def test_explicit_session_joins_and_never_retries(api: Api, fault: Fault) -> None:
    def scenario(api: Api) -> None:
        attempts: list[int | None] = []
        unit = api.decorate(unit_of_work(api, fault, attempts))
        with pytest.raises(sa_exc.DBAPIError), api.scope() as s:
            unit(s)  # the caller's session: the caller's transaction decides
        assert len(attempts) == 1

    api.run(scenario)
    assert stats()["retries"] == 0


def test_requires_new_outside_a_retry_boundary_retries_alone(api: Api, fault: Fault) -> None:
    def scenario(api: Api) -> None:
        attempts: list[int | None] = []
        independent = api.decorate(
            unit_of_work(api, fault, attempts), propagation="requires_new"
        )
        with api.scope():  # a with block: no retry boundary
            assert independent(name="audit") == 2
        assert len(attempts) == 2
        assert user_names(api) == ["audit"]

    api.run(scenario)
    assert stats()["retries"] == 1


@pytest.mark.parametrize("server", ["postgresql", "mariadb"])
async def test_child_task_retries_its_own_unit(server: str) -> None:
    """A child task inherits the context of a retrying parent, but its scope is
    its own transaction: it retries alone, and the parent does not re-run the
    sibling that already committed."""
    url = require_server(server)
    manager = SessionManager(url, config=SessionConfig(retry_delay=0.001, retry_max_delay=0.005))
    reset_schema(manager.engine)
    admin = Server(server, url)
    flaky_calls: list[int] = []
    steady_calls: list[int] = []
    parent_calls: list[int] = []
    try:

        @manager.async_with_session
        async def steady(session: Any) -> None:
            steady_calls.append(1)
            session.add(User(name="steady"))

        @manager.async_with_session
        async def flaky(session: Any) -> None:
            flaky_calls.append(1)
            connection_id = await session.scalar(admin.id_sql)
            if len(flaky_calls) == 1:
                admin.kill(connection_id)
            session.add(User(name="flaky"))
            await session.flush()

        @manager.async_with_session
        async def parent(session: Any) -> None:
            parent_calls.append(1)
            await asyncio.gather(steady(), flaky())

        await parent()
        assert (len(parent_calls), len(steady_calls), len(flaky_calls)) == (1, 1, 2)
        async with manager.async_session_scope() as s:
            assert sorted((await s.execute(select(User.name))).scalars()) == ["flaky", "steady"]
        assert manager.get_stats()["retries"] == 1
    finally:
        admin.dispose()
        await manager.adispose()


# -- logging ------------------------------------------------------------------------------


def test_retry_is_logged_with_class_and_code_never_parameters(
    api: Api, fault: Fault, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "bound-parameter-s3cret"
    seen: list[BaseException] = []

    def scenario(api: Api) -> None:
        def unit(session: Any) -> None:
            api.scalar(session, select(func.count()).select_from(User))
            if not seen:
                fault.strike(api, session)
            else:
                fault.heal()
            session.add(User(name=secret))
            try:
                api.flush(session)
            except sa_exc.DBAPIError as err:
                seen.append(err)
                raise

        api.decorate(unit)()

    with caplog.at_level(logging.WARNING, logger="sessionscope"):
        api.run(scenario)
    assert len(seen) == 1
    assert secret in str(seen[0]), "the driver error does carry the parameter"
    lines = [r.getMessage() for r in caplog.records if r.name == "sessionscope"]
    retry_lines = [line for line in lines if line.startswith("retrying")]
    assert len(retry_lines) == 1, lines
    line = retry_lines[0]
    assert ".unit after transient " in line and "retry 1 of 3" in line
    assert describe(seen[0]) in line  # the class, the driver's class, the code
    code = error_code(seen[0])
    if fault.backend == "mariadb" or (fault.backend == "sqlite" and sys.version_info >= (3, 11)):
        assert code is not None
    if code is not None:
        assert code in line
    for text_ in lines:
        assert secret not in text_
        assert "INSERT" not in text_


def test_retry_log_and_errors_never_show_the_password(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """PostgreSQL on loopback trusts the login, so a password in the URL is
    accepted and ignored: enough to check it never leaks."""
    url = require_server("postgresql")
    password = "pw-N0t-For-Logs"
    secret_url = url.replace("postgres@", f"postgres:{password}@")
    assert password in secret_url
    manager = SessionManager(
        secret_url, config=SessionConfig(retry_delay=0.001, retry_attempts=1)
    )
    reset_schema(manager.engine)
    admin = Server("postgresql", url)
    try:

        @manager.with_session
        def always_killed(session: Any) -> None:
            admin.kill(session.scalar(admin.id_sql))
            session.execute(select(func.count()).select_from(User))

        with caplog.at_level(logging.DEBUG, logger="sessionscope"):
            with pytest.raises(sa_exc.DBAPIError) as caught:
                always_killed()
        texts = [r.getMessage() for r in caplog.records]
        texts += [str(caught.value), repr(caught.value), repr(manager), str(manager.get_stats())]
        assert any(t.startswith("retrying") for t in texts)
        for t in texts:
            assert password not in t, t
    finally:
        admin.dispose()
        manager.dispose()


# -- classification through the real drivers -------------------------------------------

PG_CODES = [
    ("40001", True),  # serialization_failure
    ("40P01", True),  # deadlock_detected
    ("57P01", True),  # admin_shutdown
    ("57P03", True),  # cannot_connect_now
    ("08006", True),  # connection_failure
    ("08007", False),  # transaction_resolution_unknown: the COMMIT may have happened
    ("40003", False),  # CockroachDB "result is ambiguous": the same
    ("23505", False),  # unique_violation
    ("57014", False),  # query_canceled (statement timeout)
    ("55P03", False),  # lock_not_available (lock_timeout, NOWAIT)
    ("53300", False),  # too_many_connections
]
MARIADB_CODES = [
    ("40001", 1213, True),  # deadlock
    ("HY000", 1205, True),  # lock wait timeout
    ("HY000", 1927, True),  # connection was killed
    ("08S01", 1047, True),  # Galera: WSREP has not yet prepared node for application use
    ("HY000", 1180, True),  # Galera: error during COMMIT (node left the Primary Component)
    ("23000", 1062, False),  # duplicate key
    ("40001", 1062, False),  # the error number decides, not the SQLSTATE
    ("70100", 1969, False),  # max_statement_time exceeded
]


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
def test_postgresql_codes_through_the_driver(driver: str) -> None:
    url = require_server("postgresql").replace("+psycopg", f"+{driver}")

    def raise_sql(code: str) -> str:
        return f"DO $$ BEGIN RAISE EXCEPTION 'boom' USING ERRCODE = '{code}'; END $$"

    results = _raise_each(url, driver == "asyncpg", [raise_sql(c) for c, _ in PG_CODES])
    for (code, transient), exc in zip(PG_CODES, results, strict=True):
        assert error_code(exc) == code
        assert is_transient(exc) is transient, (code, describe(exc))
        # Raised by COMMIT, these become CommitOutcomeUnknownError.
        assert is_disconnect(exc) is (code[:2] == "08" or code in ("57P01", "57P03", "40003"))


@pytest.mark.parametrize("driver", ["pymysql", "aiomysql"])
def test_mariadb_codes_through_the_driver(driver: str) -> None:
    url = require_server("mariadb").replace("+pymysql", f"+{driver}")
    statements = [
        f"SIGNAL SQLSTATE '{state}' SET MYSQL_ERRNO = {errno}, MESSAGE_TEXT = 'boom'"
        for state, errno, _ in MARIADB_CODES
    ]
    results = _raise_each(url, driver == "aiomysql", statements)
    for (_, errno, transient), exc in zip(MARIADB_CODES, results, strict=True):
        assert error_code(exc) == str(errno)
        assert is_transient(exc) is transient, (errno, describe(exc))
        assert is_disconnect(exc) is (errno in (1927, 1047, 1180))


def test_sqlite_errors_through_the_driver(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'codes.db'}"
    engine = create_engine(url, connect_args={"timeout": 0})
    lock = SqliteLock(url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE t (id INTEGER PRIMARY KEY)")
            conn.exec_driver_sql("INSERT INTO t VALUES (1)")
        with pytest.raises(sa_exc.IntegrityError) as integrity, engine.begin() as conn:
            conn.exec_driver_sql("INSERT INTO t VALUES (1)")
        assert not is_transient(integrity.value)
        lock.hold()
        with pytest.raises(sa_exc.OperationalError) as locked, engine.begin() as conn:
            conn.exec_driver_sql("INSERT INTO t VALUES (2)")
        assert is_transient(locked.value)
        assert "database is locked" in str(locked.value)
    finally:
        lock.close()
        engine.dispose()


def _raise_each(url: str, is_async: bool, statements: list[str]) -> list[sa_exc.DBAPIError]:
    results: list[sa_exc.DBAPIError] = []
    if not is_async:
        engine = create_engine(url)
        try:
            for statement in statements:
                with pytest.raises(sa_exc.DBAPIError) as caught, engine.connect() as conn:
                    conn.exec_driver_sql(statement)
                results.append(caught.value)
        finally:
            engine.dispose()
        return results

    async def run() -> None:
        engine = create_async_engine(url)
        try:
            for statement in statements:
                with pytest.raises(sa_exc.DBAPIError) as caught:
                    async with engine.connect() as conn:
                        await conn.exec_driver_sql(statement)
                results.append(caught.value)
        finally:
            await engine.dispose()

    asyncio.run(run())
    return results


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg://postgres@127.0.0.1:1/x",
        "postgresql+asyncpg://postgres@127.0.0.1:1/x",
        "mariadb+pymysql://root@127.0.0.1:1/x",
        "mariadb+aiomysql://root@127.0.0.1:1/x",
    ],
)
def test_unreachable_server_is_not_transient_on_any_driver(url: str) -> None:
    """Nothing listens on port 1: every driver's "connection refused" gets the
    same answer (not retried), whatever shape the driver gives it."""
    errors: list[BaseException] = []
    if "+asyncpg" in url or "+aiomysql" in url:

        async def connect() -> None:
            engine = create_async_engine(url)
            try:
                async with engine.connect():
                    pass
            except Exception as err:
                errors.append(err)
            finally:
                await engine.dispose()

        asyncio.run(connect())
    else:
        engine = create_engine(url)
        try:
            with engine.connect():
                pass
        except Exception as err:
            errors.append(err)
        finally:
            engine.dispose()
    assert len(errors) == 1
    assert not is_transient(errors[0])


def test_errors_that_are_not_database_errors_are_not_transient() -> None:
    assert not is_transient(ValueError("x"))
    assert not is_transient(sa_exc.InvalidRequestError("x"))
    assert is_transient(sa_exc.DisconnectionError("pre-ping found the connection dead"))


# -- backoff ---------------------------------------------------------------------------------


def test_backoff_doubles_from_retry_delay_with_jitter_and_a_cap() -> None:
    rng = random.Random(7)
    for attempt in range(1, 12):
        ceiling = min(2.0, 0.1 * 2 ** (attempt - 1))
        for _ in range(50):
            delay = backoff_delay(attempt, 0.1, 2.0, rng)
            assert ceiling / 2 <= delay <= ceiling
    draws = {backoff_delay(3, 0.1, 2.0, rng) for _ in range(20)}
    assert len(draws) > 1, "jitter spreads colliding workers"
    assert backoff_delay(1, 0.0, 30.0) == 0.0
    assert backoff_delay(10_000, 1.0, 30.0) <= 30.0  # no overflow for huge attempt numbers


def test_retry_delay_for_counts_attempts() -> None:
    cfg = SessionConfig(retry_attempts=2, retry_delay=0.5, retry_max_delay=10.0)
    transient = sa_exc.DisconnectionError("gone")
    first = retry_delay_for(cfg, 1, transient)
    second = retry_delay_for(cfg, 2, transient)
    assert first is not None and 0.25 <= first <= 0.5
    assert second is not None and 0.5 <= second <= 1.0
    assert retry_delay_for(cfg, 3, transient) is None
    assert retry_delay_for(cfg, 1, ValueError("not transient")) is None


def test_rollback_only_from_a_caught_transient_step_retries_the_whole_unit(
    tmp_path: Path,
) -> None:
    """A joined step fails with a transient error and its caller catches it: the
    transaction can only roll back (RollbackOnlyError), and re-running the whole
    unit is what helps, so the decision looks at the step's error. The transient
    error here is the user's own, declared through ``retry_predicate`` (a real
    server conflict inside a caught step is covered by the same code path)."""

    class Conflict(Exception):
        pass

    manager = SessionManager(f"sqlite:///{tmp_path / 'r.db'}")
    reset_schema(manager.engine)
    manager.configure(retry_delay=0.001, retry_predicate=lambda e: isinstance(e, Conflict))
    attempts: list[int] = []

    @manager.with_session
    def step(session: Session) -> None:
        if len(attempts) == 1:
            raise Conflict

    @manager.with_session
    def unit(session: Session) -> None:
        attempts.append(1)
        session.add(User(name=f"try-{len(attempts)}"))
        try:
            step()
        except Conflict:
            pass  # swallowed: the transaction is spoiled all the same

    unit()
    assert len(attempts) == 2
    with manager.session_scope() as s:
        assert s.scalars(select(User.name)).all() == ["try-2"]
    assert manager.get_stats()["retries"] == 1

    manager.configure(retry_predicate=lambda e: False)
    attempts.clear()
    with pytest.raises(sessionscope.RollbackOnlyError):
        unit()
    assert len(attempts) == 1
    manager.dispose()
