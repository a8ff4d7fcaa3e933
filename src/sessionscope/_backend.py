"""Backend specifics: URLs, the SQLite BEGIN recipe, per-scope transaction settings.

Everything per scope is transaction-local (``SET LOCAL``, ``SET TRANSACTION``) or
an execution option that SQLAlchemy reverts when the connection goes back to the
pool, or is undone by a pool ``reset`` listener, so no setting leaks to the next
user of a pooled connection.
"""

from __future__ import annotations

import functools
import os
import weakref
from collections.abc import Callable
from typing import Any, Final

from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.orm import ORMExecuteState, Session, SessionTransaction
from sqlalchemy.util import await_only as await_

from ._errors import ReadOnlyError

__all__ = [
    "DEFAULT_SQLITE_URL",
    "apply_sqlite_savepoint_recipe",
    "async_url_for",
    "autocommit_reader_options",
    "begin_statements",
    "default_url",
    "open_read_only",
    "pool_status",
    "read_only_class",
    "safe_url",
    "sync_url_for",
]

DEFAULT_SQLITE_URL: Final = "sqlite:///sessionscope.db"

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


def sync_url_for(url: str | URL) -> URL:
    """Derive a sync URL from an async one (the reverse of :func:`async_url_for`)."""
    parsed = make_url(url)
    if parsed.get_driver_name() not in _ASYNC_DRIVER_NAMES:
        return parsed
    backend = parsed.get_backend_name()
    driver = _SYNC_DRIVERS.get(backend)
    if driver is None:
        raise ValueError(f"cannot derive a sync URL for the {backend!r} backend; pass url=")
    return parsed.set(drivername=f"{backend}+{driver}")


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


def _pysqlite_begin(connection: Any) -> None:
    # ``connection`` is the pool's proxy of the sqlite3 connection.
    connection.dbapi_connection.execute("BEGIN")


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
    if queue is None or raw is None:
        await_(aio.execute("BEGIN"))
        return
    queue.put_nowait((None, functools.partial(raw.execute, "BEGIN")))


_DIRECT_BEGIN: Final[dict[str, Callable[[Any], None]]] = {
    "pysqlite": _pysqlite_begin,
    "aiosqlite": _aiosqlite_begin,
}


def begin_statements(engine: Engine, *, timeout: float | None, read_only: bool) -> list[str]:
    """Statements to run first in a new transaction for per-scope settings.

    Raises ``ValueError`` for a setting the backend cannot honour, so it is never
    silently ignored.
    """
    name = engine.dialect.name
    statements: list[str] = []
    if timeout is not None:
        ms = max(1, round(timeout * 1000))
        if name == "postgresql":
            statements.append(f"SET LOCAL statement_timeout = {ms}")
        elif name in ("mysql", "mariadb"):
            if getattr(engine.dialect, "is_mariadb", False):
                statements.append(f"SET @@session.max_statement_time = {ms / 1000:.3f}")
            else:
                statements.append(f"SET @@session.max_execution_time = {ms}")
            _install_mysql_reset(engine)
        else:
            raise ValueError(
                f"timeout= is not supported on the {name!r} backend (it has no "
                "server-side statement timeout); drop it for this database"
            )
    if read_only and name in ("mysql", "mariadb"):
        # Applies to the next transaction only, which starts with the next statement.
        statements.append("SET TRANSACTION READ ONLY")
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
    variable = (
        "max_statement_time"
        if getattr(engine.dialect, "is_mariadb", False)
        else ("max_execution_time")
    )

    @event.listens_for(engine, "checkin")
    def _checkin(dbapi_connection: Any, record: Any) -> None:
        # The timeout is a session variable on MySQL/MariaDB; put it back before
        # the connection can serve anyone else.
        if dbapi_connection is not None and record.info.pop("sessionscope_timeout", False):
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute(f"SET @@session.{variable} = DEFAULT")
            finally:
                cursor.close()


def install_begin_statements(session: Session, statements: list[str]) -> None:
    """Run ``statements`` at the start of each transaction of ``session``."""

    mark_timeout = any("max_statement_time" in s or "max_execution_time" in s for s in statements)

    def _after_begin(
        sess: Session, transaction: SessionTransaction, connection: Connection
    ) -> None:
        if transaction.nested:
            return
        if mark_timeout:
            # Tells the pool's checkin listener to restore the session variable.
            connection.info["sessionscope_timeout"] = True
        for statement in statements:
            connection.exec_driver_sql(statement)

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


def pool_status(engine: Engine | None) -> dict[str, Any]:
    """Pool figures of ``engine``: size, checked_in, checked_out, overflow,
    timeout and class; pools without a figure report only what they have."""
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
    return status
