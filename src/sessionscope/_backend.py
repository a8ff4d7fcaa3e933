"""Backend specifics: URLs, the SQLite BEGIN recipe, per-scope transaction settings.

Everything per scope is transaction-local (``SET LOCAL``, ``SET TRANSACTION``) or
an execution option that SQLAlchemy reverts when the connection goes back to the
pool, or is undone by a pool ``reset`` listener, so no setting leaks to the next
user of a pooled connection.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Mapping
from typing import Any, Final, NamedTuple

from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import ORMExecuteState, Session, SessionTransaction

from ._errors import ReadOnlyError

__all__ = [
    "DEFAULT_SQLITE_URL",
    "INTERNAL_ROLLBACK",
    "ROUTED_TO_REPLICA",
    "BeginStatement",
    "apply_sqlite_savepoint_recipe",
    "async_url_for",
    "begin_statements",
    "default_url",
    "driver_error_code",
    "execution_options",
    "guard_read_only",
    "is_async_url",
    "is_autocommit",
    "mysql_errno",
    "pool_ran_dry",
    "pool_status",
    "refuse_autocommit",
    "safe_url",
    "sqlite_result_code",
    "sqlstate",
    "sync_url_for",
]

DEFAULT_SQLITE_URL: Final = "sqlite:///sessionscope.db"

ROUTED_TO_REPLICA: Final = "sessionscope_routed_to_replica"
"""``session.info`` key naming the read replica a session was routed to."""

INTERNAL_ROLLBACK: Final = "sessionscope_internal_rollback"
"""``session.info`` key set while sessionscope itself rolls a session back in the
middle of a scope (a routing fallback before the first statement), so the
transaction core does not take it for the scope body's own rollback."""

_ASYNC_DRIVERS: Final = {
    "sqlite": "aiosqlite",
    "postgresql": "asyncpg",
    "mysql": "aiomysql",
    "mariadb": "aiomysql",
}
_SYNC_DRIVERS: Final = {
    "sqlite": "pysqlite",
    "postgresql": "psycopg",
    "mysql": "pymysql",
    "mariadb": "pymysql",
}
_ASYNC_DRIVER_NAMES: Final = frozenset(
    {"aiosqlite", "asyncpg", "psycopg_async", "aiomysql", "asyncmy"}
)
# A URL without a driver ("postgresql://", "mysql://") gets the driver the
# package's extras install, not SQLAlchemy's default for the backend (psycopg2 on
# SQLAlchemy 2.0, MySQLdb), which they do not. SQLite's default is in Python.
_DRIVERLESS: Final = {"postgresql": "psycopg", "mysql": "pymysql", "mariadb": "pymysql"}


def default_url() -> str:
    """``DATABASE_URL`` from the environment, else the embedded SQLite file."""
    return os.environ.get("DATABASE_URL") or DEFAULT_SQLITE_URL


def async_url_for(url: str | URL) -> URL:
    """Derive the async URL: sqlite -> aiosqlite, postgresql -> asyncpg,
    mysql/mariadb -> aiomysql. An URL that already names an async driver is kept."""
    parsed = make_url(url)
    if parsed.get_driver_name() in _ASYNC_DRIVER_NAMES:
        return parsed
    backend = parsed.get_backend_name()
    driver = _ASYNC_DRIVERS.get(backend)
    if driver is None:
        raise ValueError(
            f"cannot derive an async URL for the {backend!r} backend; pass async_url= "
            "explicitly (supported for derivation: sqlite, postgresql, mysql, mariadb)"
        )
    return parsed.set(drivername=f"{backend}+{driver}")


def is_async_url(url: str | URL) -> bool:
    """Whether ``url`` names an async driver (``postgresql+asyncpg://...``)."""
    parsed = make_url(url)
    return "+" in parsed.drivername and parsed.get_driver_name() in _ASYNC_DRIVER_NAMES


def sync_url_for(url: str | URL) -> URL:
    """The URL the sync engine uses: an async driver is replaced by the package's
    sync driver (asyncpg/psycopg_async -> psycopg, aiosqlite -> pysqlite,
    aiomysql/asyncmy -> pymysql); a PostgreSQL/MySQL/MariaDB URL without a driver
    gets psycopg or PyMySQL; any other URL is kept."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if "+" not in parsed.drivername:
        driverless = _DRIVERLESS.get(backend)
        return parsed if driverless is None else parsed.set(drivername=f"{backend}+{driverless}")
    if parsed.get_driver_name() not in _ASYNC_DRIVER_NAMES:
        return parsed
    driver = _SYNC_DRIVERS.get(backend)
    if driver is None:
        raise ValueError(f"cannot derive a sync URL for the {backend!r} backend; pass url=")
    return parsed.set(drivername=f"{backend}+{driver}")


def refuse_autocommit(
    engine: Engine | None, async_engine: AsyncEngine | None, options: Mapping[str, Any]
) -> None:
    """Raise ``ValueError`` when a manager's engine would run every session in
    autocommit mode: the ``isolation_level`` engine option or execution option in
    ``options``, or a given engine built so."""
    levels: list[object] = [
        options.get("isolation_level"),
        (options.get("execution_options") or {}).get("isolation_level"),
    ]
    for given in (engine, async_engine.sync_engine if async_engine is not None else None):
        if given is not None:
            levels.append(given.get_execution_options().get("isolation_level"))
            levels.append(getattr(given.dialect, "_on_connect_isolation_level", None))
    if any(is_autocommit(level) for level in levels):
        raise ValueError(
            "the engine runs every session with isolation_level='AUTOCOMMIT': each "
            "statement would commit as it runs, and a scope that fails could not roll "
            "its writes back. Remove it from the engine; for reads without a "
            "transaction use session_scope(read_only=True, isolation_level='AUTOCOMMIT')."
        )


def safe_url(url: str | URL) -> str:
    """The URL as text with its password masked, for messages and logs."""
    return make_url(url).render_as_string(hide_password=True)


_recipe_applied: weakref.WeakSet[Engine] = weakref.WeakSet()


def apply_sqlite_savepoint_recipe(engine: Engine) -> None:
    """Make SAVEPOINTs really contain writes on pysqlite/aiosqlite.

    The sqlite3 module's legacy transaction handling issues BEGIN on its own and
    not before every statement, so a SAVEPOINT can end up outside any transaction.
    SQLAlchemy documents the fix: switch the driver's own handling off and emit
    BEGIN from the engine's ``begin`` event. Applied once per engine; does nothing
    for other backends.
    """
    if engine.dialect.name != "sqlite" or engine in _recipe_applied:
        return
    _recipe_applied.add(engine)

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN")


_READ_ONLY_OPTION: Final = {
    "postgresql": "postgresql_readonly",
    "cockroachdb": "postgresql_readonly",
}
"""Dialects whose read-only transactions are an execution option (``BEGIN READ
ONLY``); the others use a statement (:func:`begin_statements`) or have none."""


def is_autocommit(isolation_level: object) -> bool:
    """Whether ``isolation_level`` names autocommit mode, spelled as SQLAlchemy
    accepts it (any case)."""
    return (
        isinstance(isolation_level, str)
        and isolation_level.replace("_", " ").upper() == "AUTOCOMMIT"
    )



def execution_options(
    engine: Engine, *, isolation_level: str | None, read_only: bool
) -> dict[str, Any]:
    """Execution options for a scope's transaction settings on ``engine``:
    isolation level (SQLAlchemy reverts it when the connection is returned) and,
    where the dialect has one, the read-only transaction option."""
    options: dict[str, Any] = {}
    if isolation_level is not None:
        options["isolation_level"] = isolation_level
    if read_only:
        option = _READ_ONLY_OPTION.get(engine.dialect.name)
        if option is not None:
            options[option] = True
    return options


class BeginStatement(NamedTuple):
    """A statement run first in a new transaction for a per-scope setting.
    ``restore`` names the ``connection.info`` mark that tells the pool's
    ``checkin`` listener to put a session variable back (None: the setting is
    transaction-local)."""

    sql: str
    restore: str | None = None


_TIMEOUT_MARK: Final = "sessionscope_timeout"
_SYNC_WAIT_MARK: Final = "sessionscope_sync_wait"


def begin_statements(
    engine: Engine, *, timeout: float | None, read_only: bool, causal_reads: bool = False
) -> list[BeginStatement]:
    """Statements to run first in a new transaction for per-scope settings.

    Raises ``ValueError`` for a setting the backend cannot honour, so it is never
    silently ignored. ``causal_reads`` applies to MySQL/MariaDB (Galera's
    ``wsrep_sync_wait``; a server without Galera ignores it) and nowhere else: a
    single server and CockroachDB read their own writes anyway.
    """
    name = engine.dialect.name
    statements: list[BeginStatement] = []
    if timeout is not None:
        ms = max(1, round(timeout * 1000))
        if name in ("postgresql", "cockroachdb"):
            statements.append(BeginStatement(f"SET LOCAL statement_timeout = {ms}"))
        elif name in ("mysql", "mariadb"):
            if getattr(engine.dialect, "is_mariadb", False):
                sql = f"SET @@session.max_statement_time = {ms / 1000:.3f}"
            else:
                sql = f"SET @@session.max_execution_time = {ms}"
            statements.append(BeginStatement(sql, _TIMEOUT_MARK))
            _install_mysql_reset(engine)
        else:
            raise ValueError(
                f"timeout= is not supported on the {name!r} backend (it has no "
                "server-side statement timeout); drop it for this database"
            )
    if read_only and name in ("mysql", "mariadb"):
        # Applies to the next transaction only, which starts with the next statement.
        statements.append(BeginStatement("SET TRANSACTION READ ONLY"))
    if causal_reads and name in ("mysql", "mariadb"):
        # Bit 1: reads (SELECT, SHOW, BEGIN) wait for the cluster's earlier commits.
        # A session variable: the pool's checkin listener puts it back.
        statements.append(BeginStatement("SET @@session.wsrep_sync_wait = 1", _SYNC_WAIT_MARK))
        _install_mysql_reset(engine)
    return statements


_mysql_reset_installed: weakref.WeakSet[Engine] = weakref.WeakSet()


def _install_mysql_reset(engine: Engine) -> None:
    if engine in _mysql_reset_installed:
        return
    _mysql_reset_installed.add(engine)
    variable = (
        "max_statement_time"
        if getattr(engine.dialect, "is_mariadb", False)
        else ("max_execution_time")
    )

    @event.listens_for(engine, "checkin")
    def _checkin(dbapi_connection: Any, record: Any) -> None:
        # The timeout and wsrep_sync_wait are session variables on MySQL/MariaDB;
        # put them back before the connection can serve anyone else.
        if dbapi_connection is None:
            return
        resets = []
        if record.info.pop(_TIMEOUT_MARK, False):
            resets.append(f"@@session.{variable} = DEFAULT")
        if record.info.pop(_SYNC_WAIT_MARK, False):
            resets.append("@@session.wsrep_sync_wait = DEFAULT")
        if resets:
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute("SET " + ", ".join(resets))
            finally:
                cursor.close()


def install_begin_statements(session: Session, statements: list[BeginStatement]) -> None:
    """Run ``statements`` at the start of each transaction of ``session``."""

    def _after_begin(
        sess: Session, transaction: SessionTransaction, connection: Connection
    ) -> None:
        if transaction.nested:
            return
        for statement in statements:
            if statement.restore is not None:
                # Tells the pool's checkin listener to restore the session variable.
                connection.info[statement.restore] = True
            connection.exec_driver_sql(statement.sql)

    event.listen(session, "after_begin", _after_begin)


def guard_read_only(session: Session) -> None:
    """Refuse ORM writes in ``session`` before they reach the server."""

    def _before_flush(sess: Session, flush_context: Any, instances: Any) -> None:
        if sess.new or sess.deleted or sess.dirty:
            raise ReadOnlyError(
                "this scope is read_only=True, but the session has pending changes "
                f"({len(sess.new)} new, {len(sess.dirty)} changed, {len(sess.deleted)} "
                "deleted objects); nothing was sent. Write in a scope without read_only."
            )

    def _do_orm_execute(state: ORMExecuteState) -> None:
        if state.is_insert or state.is_update or state.is_delete:
            raise ReadOnlyError(
                "this scope is read_only=True, but an INSERT/UPDATE/DELETE was executed "
                "in it; nothing was sent. Write in a scope without read_only."
            )

    event.listen(session, "before_flush", _before_flush)
    event.listen(session, "do_orm_execute", _do_orm_execute)
    bind = session.bind
    if isinstance(bind, Engine) and is_autocommit(
        bind.get_execution_options().get("isolation_level")
    ):
        event.listen(session, "after_begin", _read_only_connection)


# (set, reset) making every statement of a connection session read-only, where a
# READ ONLY transaction cannot: in autocommit mode each statement is a transaction
# of its own, which neither the driver's read-only transaction nor SET TRANSACTION
# (it covers the next transaction only) reaches.
_SESSION_READ_ONLY: Final = {
    "postgresql": ("SET default_transaction_read_only = on", "RESET default_transaction_read_only"),
    "mariadb": ("SET @@session.tx_read_only = 1", "SET @@session.tx_read_only = DEFAULT"),
    "mysql": (
        "SET @@session.transaction_read_only = 1",
        "SET @@session.transaction_read_only = DEFAULT",
    ),
}
_RESET_KEY: Final = "sessionscope_reset"


def _read_only_connection(
    session: Session, transaction: SessionTransaction, connection: Connection
) -> None:
    if not is_autocommit(connection.get_execution_options().get("isolation_level")):
        return
    dialect = connection.dialect
    name = "mariadb" if getattr(dialect, "is_mariadb", False) else dialect.name
    pair = _SESSION_READ_ONLY.get(name)
    if pair is None:
        return  # SQLite: the ORM guard is all there is (see docs/design.md)
    _install_reset(connection.engine)
    # Marked first: the pool puts the setting back when the connection returns,
    # whatever happens to the scope from here on.
    connection.info[_RESET_KEY] = pair[1]
    connection.exec_driver_sql(pair[0])


_reset_installed: weakref.WeakSet[Any] = weakref.WeakSet()


def _install_reset(engine: Engine) -> None:
    pool = engine.pool
    if pool in _reset_installed:
        return
    _reset_installed.add(pool)

    @event.listens_for(pool, "checkin")
    def _checkin(dbapi_connection: Any, record: Any) -> None:
        statement = record.info.pop(_RESET_KEY, None)
        if dbapi_connection is None or statement is None:
            return
        try:
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute(statement)
            finally:
                cursor.close()
            # The pool has already switched autocommit off again: without a COMMIT
            # the reset would sit in an open transaction, and a rollback undo it.
            dbapi_connection.commit()
        except Exception as err:
            # A connection that may still refuse writes must not serve anyone.
            record.invalidate(err)


def pool_ran_dry(engine: Engine) -> bool:
    """Whether ``engine``'s pool has no connection to hand out: none idle and
    none left to open (``pool_size + max_overflow`` checked out). A pool without
    these figures counts as dry when it has connections out and none idle."""
    pool: Any = engine.pool
    try:
        idle, out = pool.checkedin(), pool.checkedout()
    except (NotImplementedError, AttributeError, TypeError):
        return False
    if idle > 0 or out == 0:
        return False
    size, overflow = getattr(pool, "_pool", None), getattr(pool, "_max_overflow", None)
    limit = getattr(size, "maxsize", None)
    if isinstance(limit, int) and isinstance(overflow, int) and overflow >= 0:
        return bool(out >= limit + overflow)
    return True


def pool_status(engine: Engine | None) -> dict[str, Any]:
    """Pool figures of ``engine``: size, checked_in, checked_out, overflow,
    max_overflow, timeout and class; pools without a figure report only what
    they have."""
    if engine is None:
        return {}
    pool = engine.pool
    status: dict[str, Any] = {"pool_class": type(pool).__name__}
    for key, method in (
        ("size", "size"),
        ("checked_in", "checkedin"),
        ("checked_out", "checkedout"),
        ("overflow", "overflow"),
    ):
        fn = getattr(pool, method, None)
        if fn is not None:
            try:
                status[key] = fn()
            except (NotImplementedError, AttributeError, TypeError):
                pass
    timeout = getattr(pool, "_timeout", None)
    if isinstance(timeout, (int, float)):
        status["timeout"] = timeout
    # QueuePool's max_overflow (negative: unbounded); with size it gives the
    # pool's capacity, which SQLAlchemy exposes no public accessor for.
    max_overflow = getattr(pool, "_max_overflow", None)
    if isinstance(max_overflow, int) and "size" in status:
        status["max_overflow"] = max_overflow
    return status


# -- error codes: where each driver keeps its own --------------------------------


def sqlstate(orig: BaseException) -> str | None:
    """The SQLSTATE of a PostgreSQL driver error: psycopg's ``.sqlstate``,
    psycopg2's ``.pgcode``, or asyncpg's through SQLAlchemy's adapter (which
    keeps the asyncpg error as ``__cause__``)."""
    for candidate in (orig, orig.__cause__):
        if candidate is None:
            continue
        for attr in ("sqlstate", "pgcode"):
            value = getattr(candidate, attr, None)
            if isinstance(value, str) and len(value) == 5:
                return value
    return None


def mysql_errno(orig: BaseException) -> int | None:
    """The error number of a MySQL/MariaDB driver error. PyMySQL and aiomysql
    carry ``(errno, message)`` in ``args``; other drivers put the message first.
    Read before any SQLSTATE: PyMySQL >= 1.2 also sets ``.sqlstate``, whose MySQL
    values (HY000 for a lock wait timeout) mean nothing to PostgreSQL's table."""
    if orig.args and isinstance(orig.args[0], int) and not isinstance(orig.args[0], bool):
        return orig.args[0]
    return None


def sqlite_result_code(orig: BaseException) -> int | None:
    """The (extended) result code of a sqlite3 error, Python >= 3.11."""
    code = getattr(orig, "sqlite_errorcode", None)
    return code if isinstance(code, int) else None


def driver_error_code(orig: BaseException, *, sqlite_names: bool = True) -> str | None:
    """The code a driver error carries, as text: the error number on
    MySQL/MariaDB, the SQLSTATE on PostgreSQL, on SQLite the result code's name
    (``SQLITE_BUSY``) or, with ``sqlite_names=False``, its number (what the
    OpenTelemetry conventions ask for); None when there is none. Never the
    message, which can hold SQL and bound parameters. The one extractor for
    retry decisions, log lines and exporters."""
    errno = mysql_errno(orig)
    if errno is not None:
        return str(errno)
    state = sqlstate(orig)
    if state is not None:
        return state
    if sqlite_names:
        name = getattr(orig, "sqlite_errorname", None)
        return name if isinstance(name, str) else None
    number = sqlite_result_code(orig)
    return None if number is None else str(number)
