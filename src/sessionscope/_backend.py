"""Backend specifics: URLs, the SQLite BEGIN recipe, per-scope transaction settings.

Everything per scope is transaction-local (``SET LOCAL``, ``SET TRANSACTION``) or
an execution option that SQLAlchemy reverts when the connection goes back to the
pool, or is undone by a pool ``reset`` listener, so no setting leaks to the next
user of a pooled connection.
"""

from __future__ import annotations

import functools
import os
import sys
import weakref
from collections.abc import Callable, Mapping
from typing import Any, Final, NamedTuple

from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import ORMExecuteState, Session, SessionTransaction
from sqlalchemy.util import await_only as await_

from ._errors import ReadOnlyError

__all__ = [
    "DEFAULT_SQLITE_URL",
    "INTERNAL_ROLLBACK",
    "ROUTED_TO_REPLICA",
    "BeginStatement",
    "apply_sqlite_savepoint_recipe",
    "async_url_for",
    "autocommit_reader_options",
    "begin_statements",
    "default_url",
    "driver_error_code",
    "execution_options",
    "guard_autocommit_read_only",
    "install_begin_statements",
    "is_async_url",
    "is_autocommit",
    "mysql_errno",
    "open_read_only",
    "pool_ran_dry",
    "pool_status",
    "read_only_class",
    "refuse_autocommit",
    "release_failed_aiosqlite_cursors",
    "safe_url",
    "skip_idle_commit",
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
    only before INSERT/UPDATE/DELETE, so reads run outside any transaction and a
    SAVEPOINT can open (and its RELEASE commit) a transaction of its own. The fix
    SQLAlchemy documents: switch the driver's handling off when a connection is
    made, and emit BEGIN whenever SQLAlchemy begins a transaction.

    BEGIN is emitted by the dialect's ``do_begin``, straight on the DBAPI
    connection: SQLAlchemy calls it at the same point as its ``begin`` event, and
    wraps its errors the same way, without running a statement through the
    engine's execution path (which costs about a fifth of a one-row insert) and
    without an engine event (which would make every statement consult the event
    dispatch). On aiosqlite, BEGIN is queued on the connection's worker thread
    without waiting for it (see :func:`_aiosqlite_begin`). Other SQLite drivers
    get the ``begin`` event. Applied once per engine; does nothing for other
    backends.
    """
    if engine.dialect.name != "sqlite" or engine in _recipe_applied:
        return
    _recipe_applied.add(engine)

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None

    begin = _DIRECT_BEGIN.get(engine.dialect.driver)
    if begin is not None:
        # An instance attribute: only this engine's dialect (shared by its
        # execution_options() copies) changes, never the dialect class.
        setattr(engine.dialect, "do_begin", begin)  # noqa: B010
    else:

        @event.listens_for(engine, "begin")
        def _begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN")


_CURSOR_FRAME_MODULES: Final = ("aiosqlite", "sqlalchemy.dialects.sqlite.aiosqlite")
"""Modules whose frames hold the cursor of a failed aiosqlite statement."""


def release_failed_aiosqlite_cursors(engine: Engine) -> None:
    """Release the cursor of a failed aiosqlite statement when it fails.

    SQLAlchemy's aiosqlite adapter does not close the cursor of a statement that
    raised: it stays referenced by the frames of the error's traceback, which
    SQLAlchemy's error handling puts in a reference cycle. The garbage collector
    then finalizes the sqlite3 cursor later, on whichever thread it runs, and
    finalizing it takes its connection's mutex. By then the connection may be
    serving another transaction whose worker thread holds that mutex while it
    waits in SQLite's busy handler for a lock: an event loop collecting garbage
    stops until the busy timeout, and the transaction holding the lock, which
    needs that event loop to commit, waits with it.

    A ``handle_error`` listener clears the locals of the adapter's and
    aiosqlite's finished frames in the traceback (their line numbers stay), so
    the cursor is freed at once, while the failed transaction still has the
    connection and its worker thread is idle. Does nothing for other drivers;
    costs nothing on statements that succeed.
    """
    if engine.dialect.name != "sqlite" or engine.dialect.driver != "aiosqlite":
        return
    if engine in _cursors_released:
        return
    _cursors_released.add(engine)

    @event.listens_for(engine, "handle_error")
    def _release(context: Any) -> None:
        tb = context.original_exception.__traceback__
        while tb is not None:
            frame = tb.tb_frame
            if str(frame.f_globals.get("__name__", "")).startswith(_CURSOR_FRAME_MODULES):
                try:
                    frame.clear()
                except RuntimeError:  # still executing (another thread's worker loop)
                    pass
            tb = tb.tb_next


_cursors_released: weakref.WeakSet[Engine] = weakref.WeakSet()


_BEGIN_CURSOR: Final = "sessionscope_begin_cursor"


def _pysqlite_begin(connection: Any) -> None:
    # ``connection`` is the pool's proxy of the sqlite3 connection. Its info
    # lives as long as the DBAPI connection, so it keeps one cursor for BEGIN:
    # sqlite3's execute() would make a new cursor every time, and the
    # connection keeps a weak reference to each cursor it made until it next
    # cleans them up (memory per transaction, for nothing).
    info = connection.info
    cursor = info.get(_BEGIN_CURSOR)
    if cursor is None:
        cursor = info[_BEGIN_CURSOR] = connection.dbapi_connection.cursor()
    cursor.execute("BEGIN")


def _aiosqlite_begin(connection: Any) -> None:
    """BEGIN on an aiosqlite connection, without a round trip to its thread.

    aiosqlite runs every call of a connection, in order, on one worker thread fed
    by a queue. BEGIN is put on that queue without a future, so the next
    statement of the transaction, queued behind it, runs after it, and the event
    loop is not woken up once more per transaction. A deferred BEGIN takes no lock
    and reads nothing, so it can fail only when a transaction is already open
    (the work is then inside a transaction all the same) or when the connection
    is unusable (then the statement queued behind it fails and reports it).
    Falls back to an awaited BEGIN if aiosqlite's queue is not where it was.
    """
    aio = connection.dbapi_connection._connection
    queue = getattr(aio, "_tx", None)
    raw = getattr(aio, "_connection", None)
    if queue is None or raw is None or not _aiosqlite_takes_calls_without_futures():
        await_(aio.execute("BEGIN"))
        return
    queue.put_nowait((None, functools.partial(raw.execute, "BEGIN")))


@functools.cache
def _aiosqlite_takes_calls_without_futures() -> bool:
    # Older aiosqlite workers (0.19) resolve every call's future unconditionally:
    # a call queued without one would kill the worker thread.
    import inspect

    core = sys.modules.get("aiosqlite.core")
    worker = getattr(core, "_connection_worker_thread", None)
    if worker is None:
        return False
    try:
        return "if future" in inspect.getsource(worker)
    except (OSError, TypeError):
        return False


_DIRECT_BEGIN: Final[dict[str, Callable[[Any], None]]] = {
    "pysqlite": _pysqlite_begin,
    "aiosqlite": _aiosqlite_begin,
}


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
    mariadb_sql: str | None = None
    """What to run instead on MariaDB, when it differs. Chosen per connection:
    SQLAlchemy knows a ``mysql://`` URL's server is MariaDB only once connected."""


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
            statements.append(
                BeginStatement(
                    f"SET @@session.max_execution_time = {ms}",
                    _TIMEOUT_MARK,
                    f"SET @@session.max_statement_time = {ms / 1000:.3f}",
                )
            )
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


_READ_ONLY_INIT: Final = "SET SESSION TRANSACTION READ ONLY"


def autocommit_reader_options(url: URL, engine_options: dict[str, Any]) -> dict[str, Any]:
    """Engine options for the pool of ``snapshot=False`` read-only scopes: the
    manager's own options, every connection in autocommit, and the server told
    once per connection, when it is made, to refuse writes
    (``default_transaction_read_only`` on PostgreSQL, ``SET SESSION TRANSACTION
    READ ONLY`` on MariaDB/MySQL). Nothing is sent per scope.

    Raises ``ValueError`` for a driver whose connection settings are unknown
    here, and when the connection arguments already set what is needed.
    """
    options = dict(engine_options)
    connect_args = dict(options.get("connect_args") or {})
    backend, driver = url.get_backend_name(), url.get_driver_name()
    if backend == "postgresql" and driver == "asyncpg":
        settings = dict(connect_args.get("server_settings") or {})
        settings["default_transaction_read_only"] = "on"
        connect_args["server_settings"] = settings
    elif backend == "postgresql" and driver in ("psycopg", "psycopg_async", "psycopg2"):
        extra = "-c default_transaction_read_only=on"
        current = connect_args.get("options")
        connect_args["options"] = f"{current} {extra}" if current else extra
    elif backend in ("mysql", "mariadb") and driver in ("pymysql", "aiomysql", "mysqldb"):
        if connect_args.get("init_command"):
            raise ValueError(
                "snapshot=False needs the connection's init_command for SET SESSION "
                "TRANSACTION READ ONLY, and connect_args already sets one; drop "
                "snapshot=False or the init_command"
            )
        connect_args["init_command"] = _READ_ONLY_INIT
    else:
        raise ValueError(
            f"snapshot=False is not supported with the {backend}+{driver} driver (known: "
            "psycopg, psycopg2, asyncpg, pymysql, aiomysql, mysqldb); drop snapshot=False"
        )
    options["connect_args"] = connect_args
    options["isolation_level"] = "AUTOCOMMIT"
    return options


def skip_idle_commit(engine: Engine) -> None:
    """On a MariaDB/MySQL engine whose connections are all in autocommit, send
    neither COMMIT nor the pool's ROLLBACK when the server says no transaction is
    open (the driver would send them anyway: two round trips for nothing).
    PostgreSQL drivers skip them on their own."""
    if engine.dialect.name not in ("mysql", "mariadb"):
        return
    for name in ("do_commit", "do_rollback"):
        setattr(engine.dialect, name, _unless_idle(getattr(engine.dialect, name)))


def _unless_idle(base: Callable[[Any], None]) -> Callable[[Any], None]:
    def call(connection: Any) -> None:
        raw = getattr(connection, "dbapi_connection", connection)
        status = getattr(raw, "server_status", None)
        if status is None:  # SQLAlchemy's adapter of an asyncio driver
            status = getattr(getattr(raw, "_connection", None), "server_status", None)
        # SERVER_STATUS_IN_TRANS, as the server reported it with its last reply.
        if isinstance(status, int) and not status & 1:
            return
        base(connection)

    return call


_mysql_reset_installed: weakref.WeakSet[Engine] = weakref.WeakSet()


def _install_mysql_reset(engine: Engine) -> None:
    if engine in _mysql_reset_installed:
        return
    _mysql_reset_installed.add(engine)

    @event.listens_for(engine, "checkin")
    def _checkin(dbapi_connection: Any, record: Any) -> None:
        # The timeout and wsrep_sync_wait are session variables on MySQL/MariaDB;
        # put them back before the connection can serve anyone else.
        if dbapi_connection is None:
            return
        resets = []
        if record.info.pop(_TIMEOUT_MARK, False):
            # Asked here, not when installed: a mysql:// URL's server is known
            # to be MariaDB only once connected.
            mariadb = getattr(engine.dialect, "is_mariadb", False)
            variable = "max_statement_time" if mariadb else "max_execution_time"
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
            sql = statement.sql
            if statement.mariadb_sql is not None and getattr(
                connection.dialect, "is_mariadb", False
            ):
                sql = statement.mariadb_sql
            connection.exec_driver_sql(sql)

    event.listen(session, "after_begin", _after_begin)


def _refuse_flush(sess: Session, flush_context: Any, instances: Any) -> None:
    if sess.new or sess.deleted or sess.dirty:
        raise ReadOnlyError(
            "this scope is read_only=True, but the session has pending changes "
            f"({len(sess.new)} new, {len(sess.dirty)} changed, {len(sess.deleted)} "
            "deleted objects); nothing was sent. Write in a scope without read_only."
        )


def _refuse_dml(state: ORMExecuteState) -> None:
    if state.is_insert or state.is_update or state.is_delete:
        raise ReadOnlyError(
            "this scope is read_only=True, but an INSERT/UPDATE/DELETE was executed "
            "in it; nothing was sent. Write in a scope without read_only."
        )


_GUARDED: Final = "_sessionscope_read_only"


def read_only_class(base: type[Session]) -> type[Session]:
    """A subclass of ``base`` whose sessions refuse ORM writes before they reach
    the server (pending objects at flush, ORM INSERT/UPDATE/DELETE statements).

    The listeners are on the class, registered once: listening on each session
    instead costs more than the rest of an empty scope. Made once per ``base``
    and kept on it (a sessionmaker's own generated class, or the session class
    given to the manager), so it lives as long as ``base`` does.
    """
    cls = _READ_ONLY_SESSION if base is Session else base.__dict__.get(_GUARDED)
    if cls is None:
        cls = _guarded_subclass(base)
        setattr(base, _GUARDED, cls)
    return cls


def _guarded_subclass(base: type[Session]) -> type[Session]:
    cls = type(base.__name__, (base,), {"__module__": base.__module__})
    cls.__qualname__ = base.__qualname__
    event.listen(cls, "before_flush", _refuse_flush)
    event.listen(cls, "do_orm_execute", _refuse_dml)
    return cls


_READ_ONLY_SESSION: Final = _guarded_subclass(Session)


def open_read_only(factory: Any, is_async: bool, **kw: Any) -> Any:
    """A session from ``factory`` (a ``sessionmaker`` or ``async_sessionmaker``)
    with ``kw``, of the factory's class made read-only by :func:`read_only_class`."""
    if is_async:
        base = factory.kw.get("sync_session_class") or factory.class_.sync_session_class
        return factory(**kw, sync_session_class=read_only_class(base))
    return read_only_class(factory.class_)(**{**factory.kw, **kw})


def guard_autocommit_read_only(session: Session) -> None:
    """A read-only session bound in autocommit mode (``isolation_level=
    "AUTOCOMMIT"``): each statement is its own transaction, so make the
    connection's session read-only on the server for the scope instead."""
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
