"""End-state checks shared by the integrity tests: what another connection sees in
the database, the statistics gauge, the pool and PostgreSQL's view of the
connections."""

from __future__ import annotations

from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from sessionscope import SessionManager


def stored_names(url: str) -> set[str]:
    """``ss_users.name`` as a new connection of its own reads it (committed rows only)."""
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return set(conn.scalars(text("SELECT name FROM ss_users")))
    finally:
        engine.dispose()


def idle_in_transaction(url: str) -> int:
    """PostgreSQL: connections to this URL's database idle inside a transaction
    (0 on other backends, which have no such view)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        return 0
    engine = create_engine(parsed, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return int(
                conn.scalar(
                    text(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = :db "
                        "AND state LIKE 'idle in transaction%'"
                    ),
                    {"db": parsed.database},
                )
                or 0
            )
    finally:
        engine.dispose()


def checked_out(manager: SessionManager) -> int:
    """Connections checked out of every pool of ``manager`` (replicas included)."""
    status: dict[str, Any] = manager.pool_status()
    return sum(int(side.get("checked_out", 0)) for side in status.values())


def assert_clean(manager: SessionManager, url: str, expected: set[str]) -> None:
    """The database holds exactly ``expected`` and nothing is left open."""
    assert stored_names(url) == expected
    assert manager.get_stats()["active_sessions"] == 0
    assert checked_out(manager) == 0
    assert idle_in_transaction(url) == 0
