"""Transactions the server ended at a failed statement, while the application
went on.

PostgreSQL aborts a transaction at its first failed statement: every later
statement fails, and COMMIT is answered with ROLLBACK, not with an error. A
MariaDB/MySQL deadlock rolls back the whole transaction, and the next statement
quietly begins a new one. Either way, a body that catches the error and goes on
would have its scope "commit" nothing, or only what followed the error, counted
as a success. SQLAlchemy does not notice: its transaction stays open.

A ``handle_error`` listener (it runs only when a statement fails; having one
makes SQLAlchemy test the dialect's statement hooks at each statement, an
attribute test and an empty loop) records the transaction of such a failure; the commit of
that transaction is refused (:func:`aborted`). On PostgreSQL a failure inside a
SAVEPOINT is not recorded: rolling back to the savepoint, which is what a
``nested`` scope does when its body fails, restores the transaction. A
deadlock rolls back the savepoints with the transaction, so it is always
recorded. Disconnects are left to the commit itself, which fails. Only the
session's default bind is checked.
"""

from __future__ import annotations

import weakref
from typing import Any, Final

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, RootTransaction
from sqlalchemy.orm import Session

from ._backend import mysql_errno

__all__ = ["FAILED", "aborted", "track"]

_MYSQL_DEADLOCK: Final = 1213

FAILED: Final[dict[int, tuple[weakref.ref[Connection], weakref.ref[RootTransaction]]]] = {}
"""By ``id()`` of a connection whose current transaction the server ended at a
failed statement: weak references to the connection and to that transaction (a
later one on the same connection is not affected). An entry goes with its
connection. A plain dict, empty unless such a failure happened: the scope tests
it on every COMMIT, and a dict's truth is cheaper than a weak dictionary's."""

_tracked: weakref.WeakSet[Engine] = weakref.WeakSet()


def track(engine: Engine) -> None:
    """Record, on a PostgreSQL or MariaDB/MySQL ``engine``, the transactions a
    failed statement ended on the server (once per engine)."""
    name = engine.dialect.name
    if name not in ("postgresql", "mysql", "mariadb") or engine in _tracked:
        return
    _tracked.add(engine)
    postgresql = name == "postgresql"

    def _record(context: Any) -> None:
        connection: Connection | None = context.connection
        if connection is None or context.is_disconnect or not connection.in_transaction():
            return
        if postgresql:
            if connection.in_nested_transaction():
                return  # a ROLLBACK TO SAVEPOINT restores the transaction
            # An autocommit connection (snapshot=False) has no transaction to lose.
            if getattr(connection.connection.dbapi_connection, "autocommit", False) is True:
                return
        elif mysql_errno(context.original_exception) != _MYSQL_DEADLOCK:
            return
        transaction = connection.get_transaction()
        if transaction is not None:
            key = id(connection)
            FAILED[key] = (
                weakref.ref(connection, lambda _gone: FAILED.pop(key, None)),
                weakref.ref(transaction),
            )

    event.listen(engine, "handle_error", _record)


def aborted(session: Session) -> str | None:
    """The name of the database (``postgresql``, ``mariadb``) whose server ended
    the transaction ``session`` is in at a failed statement; None when it did
    not (see the module's text)."""
    connection = session.connection()
    failed = FAILED.get(id(connection))
    if failed is None or failed[0]() is not connection:
        return None
    transaction = connection.get_transaction()
    if transaction is None or failed[1]() is not transaction:
        return None
    return connection.dialect.name
