"""What every scope-integrity test checks, against the real databases: the rows
read from another connection, the ``active_sessions`` gauge, the pools'
checked-out counts and, on PostgreSQL, the connections left idle in a transaction."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, select, text
from sqlalchemy.pool import NullPool

from sessionscope import SessionConfig, SessionManager

from .conftest import backend_url, reset_schema
from .models import User


class Env:
    """One backend's manager plus an independent observer connection."""

    def __init__(
        self, backend: str, url: str, engine_options: dict[str, Any] | None = None
    ) -> None:
        self.backend = backend
        self.url = url
        self.manager = SessionManager(
            url, config=SessionConfig(retry_delay=0.001), **(engine_options or {})
        )
        reset_schema(self.manager.engine)
        self.manager.reset_stats()
        self.observer = create_engine(url, poolclass=NullPool)
        self.cleanups: list[Callable[[], object]] = []

    def rows(self) -> list[str]:
        """User names committed, read on a connection of its own."""
        with self.observer.connect() as conn:
            return sorted(conn.scalars(select(User.name)))

    def idle_in_transaction(self) -> int:
        """PostgreSQL connections of this database idle inside a transaction."""
        if self.backend != "postgresql":
            return 0
        with self.observer.connect() as conn:
            return int(
                conn.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = "
                        "current_database() AND state LIKE 'idle in transaction%' "
                        "AND pid <> pg_backend_pid()"
                    )
                ).scalar_one()
            )

    def checked_out(self) -> int:
        total = 0
        for engine in self.manager.engines_by_role().values():
            total += engine.pool.checkedout()  # type: ignore[attr-defined]
        return total

    def assert_clean(self) -> None:
        """Nothing left open: no session, no checked-out connection, no
        connection idle in a transaction."""
        assert self.manager.get_stats()["active_sessions"] == 0
        assert self.checked_out() == 0
        assert self.idle_in_transaction() == 0

    async def aclose(self) -> None:
        # The sync engine too: the schema was made through it, and a pooled
        # SQLite connection left to the garbage collector warns (Python 3.13).
        self.manager.dispose()
        await self.manager.adispose()
        self.observer.dispose()

    def close(self) -> None:
        self.manager.dispose()
        self.observer.dispose()


def make_env(backend: str, tmp_path: Path, engine_options: dict[str, Any] | None = None) -> Env:
    return Env(backend, backend_url(backend, tmp_path), engine_options)
