"""Transient-error classification and backoff (pure: decides, never sleeps).

What counts as transient, per backend (the drivers differ only in where they
keep the code, which :func:`error_code` hides):

* PostgreSQL (psycopg, asyncpg): SQLSTATE 40001 serialization failure and 40P01
  deadlock; and lost connections: class 08, 57P01/57P02/57P03 (admin shutdown,
  crash shutdown, cannot connect now), or anything SQLAlchemy flagged
  ``connection_invalidated``. 08007 (transaction resolution unknown) is the
  server saying it does not know whether a COMMIT happened: never retried.
  CockroachDB's 40003 ("result is ambiguous") says the same and is treated the
  same: a COMMIT that gets it raises :class:`CommitOutcomeUnknownError`.
* MySQL / MariaDB (PyMySQL, aiomysql): error 1213 deadlock (on Galera also a
  certification failure: another node committed a conflicting write first, and
  this transaction was rolled back), 1205 lock wait timeout; lost connections
  2006, 2013, 2055, 1927, 4031. On Galera, a node that left the Primary
  Component answers 1047 ("WSREP has not yet prepared node for application
  use") and a COMMIT caught in the change answers 1180 ("Got error ... during
  COMMIT", which the cluster may nevertheless have committed): both mean the
  node is lost to the cluster, as a dropped connection is, so they classify as
  one: retried before COMMIT (the cluster selector moves the next attempt to
  another node), an unknown outcome during it.
* SQLite (sqlite3, aiosqlite): SQLITE_BUSY / SQLITE_LOCKED ("database is
  locked"): the other writer finishes and the retry goes through.

A lost connection is transient only because the transaction core turns a loss
*during COMMIT* into :class:`CommitOutcomeUnknownError` first, which is never
retried; every other loss happened before COMMIT was sent, so nothing was
committed and the whole unit of work can run again on a new connection.

A server that cannot be reached at all (connection refused) is not transient:
the drivers report it too differently (MySQL 2003, a code-less psycopg error,
asyncpg's bare ``OSError``) to tell a restart from a wrong address, and the
same answer on every backend beats a guess on some.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Final

from sqlalchemy import exc as sa_exc

from ._backend import driver_error_code, mysql_errno, sqlite_result_code, sqlstate
from ._errors import CommitOutcomeUnknownError, PoolExhaustedError, RollbackOnlyError

if TYPE_CHECKING:
    from ._config import SessionConfig

__all__ = [
    "attribute_of",
    "backoff_delay",
    "describe",
    "error_code",
    "is_disconnect",
    "is_transient",
    "retry_delay_for",
]

# PostgreSQL SQLSTATEs. Class 08 (connection exception) is matched by prefix.
_PG_CONFLICT: Final = frozenset({"40001", "40P01"})
_PG_GONE: Final = frozenset({"57P01", "57P02", "57P03"})
# 08007 transaction resolution unknown; 40003 CockroachDB "result is ambiguous".
_PG_OUTCOME_UNKNOWN: Final = frozenset({"08007", "40003"})
# MySQL/MariaDB error numbers: deadlock, lock wait timeout; then lost
# connections (server gone away, lost during query, lost at a system call,
# MariaDB "connection was killed", MySQL 8 "disconnected by the server"), and
# the Galera node that is out of the cluster (1047 not ready, 1180 error during
# COMMIT).
_MYSQL_CONFLICT: Final = frozenset({1213, 1205})
_MYSQL_GONE: Final = frozenset({2006, 2013, 2055, 1927, 4031, 1047, 1180})
# SQLite primary result codes: SQLITE_BUSY, SQLITE_LOCKED (extended codes such
# as SQLITE_BUSY_SNAPSHOT keep the primary code in their low byte).
_SQLITE_BUSY: Final = frozenset({5, 6})
_SQLITE_BUSY_TEXT: Final = ("database is locked", "database table is locked")
# More retries would only add load: no retry predicate is consulted for these.
_NEVER_RETRIED: Final = (CommitOutcomeUnknownError, PoolExhaustedError, sa_exc.TimeoutError)

_MAX_DOUBLINGS: Final = 62  # 2**62 * any positive delay is past any cap; no overflow


def is_transient(exc: BaseException) -> bool:
    """Return True if re-running the whole unit of work may succeed.

    True for serialization failures and deadlocks, lock wait timeouts, lost
    connections (before COMMIT: see the module docstring) and SQLite's "database
    is locked". False for everything else, including
    :class:`CommitOutcomeUnknownError` (the commit may have happened),
    :class:`PoolExhaustedError` (more load would not help), integrity errors,
    statement timeouts and errors raised by user code.

    This is the default ``retry_predicate``; extend it with
    ``lambda e: is_transient(e) or mine(e)``.
    """
    if isinstance(exc, _NEVER_RETRIED):
        return False
    if isinstance(exc, sa_exc.DisconnectionError):
        return True
    if not isinstance(exc, sa_exc.DBAPIError):
        return False
    orig = exc.orig
    if isinstance(orig, BaseException):
        errno = mysql_errno(orig)
        if errno is not None:
            if errno in _MYSQL_CONFLICT:
                return True
        else:
            state = sqlstate(orig)
            if state in _PG_OUTCOME_UNKNOWN:
                return False
            if state in _PG_CONFLICT:
                return True
        if _sqlite_busy(exc, orig):
            return True
    return is_disconnect(exc)


def is_disconnect(exc: BaseException) -> bool:
    """Return True if ``exc`` means an established connection was lost, or the
    server cannot say whether the transaction committed (SQLSTATE 08007, 40003;
    a Galera node out of the cluster, 1047/1180).

    Used on COMMIT errors to tell an unknown outcome from a known failure.
    """
    if isinstance(exc, sa_exc.DisconnectionError):
        return True
    if not isinstance(exc, sa_exc.DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    orig = exc.orig
    if not isinstance(orig, BaseException):
        return False
    errno = mysql_errno(orig)
    if errno is not None:
        return errno in _MYSQL_GONE
    state = sqlstate(orig)
    return state is not None and (
        state.startswith("08") or state in _PG_GONE or state in _PG_OUTCOME_UNKNOWN
    )


def attribute_of(exc: BaseException, name: str) -> object:
    """``exc.name``, or None when it has none or reading it raises: the
    exception is the application's, and its properties may fail (one over a
    missing response), which must not replace it or stop a scope's cleanup."""
    try:
        return getattr(exc, name, None)
    except Exception:
        return None


def error_code(exc: BaseException) -> str | None:
    """The driver's error code of a database error, as text: the SQLSTATE on
    PostgreSQL, the error number on MySQL/MariaDB, the result code name
    (``SQLITE_BUSY``) on SQLite; None when there is none. Never the message,
    which can hold SQL and bound parameters."""
    orig = attribute_of(exc, "orig")
    if not isinstance(orig, BaseException):
        return None
    return driver_error_code(orig)


def describe(exc: BaseException) -> str:
    """``OperationalError [SerializationFailure 40001]``: the error class, the
    driver's error class and its code, safe for logs and messages."""
    orig = attribute_of(exc, "orig")
    if not isinstance(orig, BaseException):
        return type(exc).__name__
    # Async drivers reach SQLAlchemy wrapped in its adapter classes; the driver's
    # own, specific class (asyncpg's SerializationError, ...) is the cause.
    driver = orig
    if type(orig).__module__.startswith("sqlalchemy") and orig.__cause__ is not None:
        driver = orig.__cause__
    driver_name = type(driver).__name__
    code = error_code(exc)
    return f"{type(exc).__name__} [{driver_name}{' ' + code if code else ''}]"


def _sqlite_busy(exc: sa_exc.DBAPIError, orig: BaseException) -> bool:
    if not isinstance(exc, sa_exc.OperationalError):
        return False
    code = sqlite_result_code(orig)
    if code is not None:
        return code & 0xFF in _SQLITE_BUSY
    if type(orig).__module__.startswith("sqlite3"):
        message = str(orig).lower()
        return any(text in message for text in _SQLITE_BUSY_TEXT)
    return False


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Delay before retry number ``attempt`` (1-based): ``base * 2**(attempt-1)``
    capped at ``cap``, with "equal jitter" (a uniform draw in its upper half), so
    colliding workers spread out yet never retry immediately."""
    ceiling = min(cap, base * 2.0 ** min(attempt - 1, _MAX_DOUBLINGS))
    draw: float = (rng or random).random()
    return ceiling / 2 + draw * ceiling / 2


def retry_delay_for(cfg: SessionConfig, attempt: int, exc: BaseException) -> float | None:
    """Decide the retry after failed attempt number ``attempt`` (1-based).

    Return the delay to sleep before the next attempt, or None to give up and
    re-raise: the retries are used up, ``cfg.retry_predicate`` says the error is
    not transient, or the error is a :class:`CommitOutcomeUnknownError` or a
    pool exhaustion, which no predicate can make retryable (re-running could
    apply a commit twice, or only add load to a saturated pool).
    """
    if isinstance(exc, RollbackOnlyError) and isinstance(exc.__cause__, Exception):
        # A joined step failed and the caller caught it; the transaction rolled
        # back instead of committing. Whether re-running the whole unit can help
        # is the question for the step's error, e.g. a deadlock.
        exc = exc.__cause__
    if attempt > cfg.retry_attempts or isinstance(exc, _NEVER_RETRIED):
        return None
    if not cfg.retry_predicate(exc):
        return None
    return backoff_delay(attempt, cfg.retry_delay, cfg.retry_max_delay)
