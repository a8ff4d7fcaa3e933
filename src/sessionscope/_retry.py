"""Transient-error classification and backoff (pure: decides, never sleeps)."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Final

from sqlalchemy import exc as sa_exc

from ._errors import CommitOutcomeUnknownError, PoolExhaustedError

if TYPE_CHECKING:
    from ._config import SessionConfig

__all__ = ["backoff_delay", "is_transient", "retry_delay_for"]

# PostgreSQL SQLSTATEs: serialization failure, deadlock, and the server-side
# "this connection is going away" family (admin shutdown, crash shutdown,
# cannot connect now). Class 08 (connection exception) is matched by prefix.
_PG_TRANSIENT: Final = frozenset({"40001", "40P01", "57P01", "57P02", "57P03"})
# MySQL/MariaDB error numbers: deadlock, lock wait timeout, and lost connections
# (server gone away, lost during query, can't connect, lost at handshake, MariaDB
# connection killed, MySQL 8 client-disconnected-by-server).
_MYSQL_TRANSIENT: Final = frozenset({1213, 1205, 2006, 2013, 2003, 2055, 1927, 4031})
# SQLite's busy/locked conditions clear once the other writer finishes.
_SQLITE_TRANSIENT: Final = ("database is locked", "database table is locked")


def is_transient(exc: BaseException) -> bool:
    """Return True if re-running the whole unit of work may succeed.

    True for serialization failures and deadlocks (PostgreSQL 40001/40P01,
    MySQL/MariaDB 1213/1205), for lost connections before COMMIT was sent
    (``connection_invalidated``, 57P01, class 08, MySQL 2006/2013, ...), and for
    SQLite's "database is locked". False for everything else, including
    :class:`CommitOutcomeUnknownError` (the commit may have happened), pool
    exhaustion (more load would not help) and integrity errors.
    """
    if isinstance(exc, (CommitOutcomeUnknownError, PoolExhaustedError, sa_exc.TimeoutError)):
        return False
    if isinstance(exc, sa_exc.DisconnectionError):
        return True
    if not isinstance(exc, sa_exc.DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    orig = exc.orig
    if orig is None:
        return False
    code = _sqlstate(orig)
    if code is not None:
        return code in _PG_TRANSIENT or code.startswith("08")
    number = _mysql_errno(orig)
    if number is not None:
        return number in _MYSQL_TRANSIENT
    message = str(orig).lower()
    return isinstance(exc, sa_exc.OperationalError) and any(m in message for m in _SQLITE_TRANSIENT)


def is_disconnect(exc: BaseException) -> bool:
    """Return True if ``exc`` means the connection was lost."""
    if isinstance(exc, sa_exc.DisconnectionError):
        return True
    if not isinstance(exc, sa_exc.DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    orig = exc.orig
    if orig is None:
        return False
    code = _sqlstate(orig)
    if code is not None:
        return code.startswith("08") or code in {"57P01", "57P02", "57P03"}
    number = _mysql_errno(orig)
    return number is not None and number in {2006, 2013, 2055, 1927, 4031}


def _sqlstate(orig: BaseException) -> str | None:
    # psycopg exposes .sqlstate, psycopg2 .pgcode; SQLAlchemy's asyncpg adapter
    # keeps the asyncpg error as __cause__, which carries .sqlstate.
    for candidate in (orig, orig.__cause__):
        if candidate is None:
            continue
        for attr in ("sqlstate", "pgcode"):
            value = getattr(candidate, attr, None)
            if isinstance(value, str) and len(value) == 5:
                return value
    return None


def _mysql_errno(orig: BaseException) -> int | None:
    # PyMySQL / aiomysql errors carry (errno, message) in args.
    if orig.args and isinstance(orig.args[0], int) and not isinstance(orig.args[0], bool):
        return orig.args[0]
    return None


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Delay before retry number ``attempt`` (1-based): ``base * 2**(attempt-1)``
    capped at ``cap``, with "equal jitter" (a uniform draw in its upper half), so
    colliding workers spread out yet never retry immediately."""
    ceiling = min(cap, base * 2.0 ** (attempt - 1))
    draw: float = (rng or random).random()
    return ceiling / 2 + draw * ceiling / 2


def retry_delay_for(cfg: SessionConfig, attempt: int, exc: BaseException) -> float | None:
    """Decide the retry after failed attempt number ``attempt`` (1-based).

    Return the delay to sleep before the next attempt, or None to give up and
    re-raise: the retries are used up, or ``cfg.retry_predicate`` says the error
    is not transient.
    """
    if attempt > cfg.retry_attempts:
        return None
    if not isinstance(exc, Exception) or not cfg.retry_predicate(exc):
        return None
    return backoff_delay(attempt, cfg.retry_delay, cfg.retry_max_delay)
