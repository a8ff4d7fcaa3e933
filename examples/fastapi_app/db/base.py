"""Database setup of the example: ``setup_database_connection()`` and ``get_db``.

``DATABASE_URL`` picks the database (``postgresql://...``, ``mysql://...``);
without it the application uses the SQLite file ``sessionscope.db`` in the
working directory. The async URL is derived from the sync one.
"""

from sessionscope import SessionManager, configure_session
from sessionscope import setup_database_connection as _setup
from sessionscope.fastapi import SessionDep, SyncSessionDep, get_db, get_sync_db

from models import Base

__all__ = [
    "SessionDep",
    "SyncSessionDep",
    "create_tables",
    "get_db",
    "get_sync_db",
    "setup_database_connection",
]


def setup_database_connection() -> SessionManager:
    """Configure sessionscope and build the engines; nothing connects yet."""
    configure_session(log_level="WARNING", retry_attempts=3, retry_delay=0.2)
    return _setup(pool_pre_ping=True)


async def create_tables(manager: SessionManager) -> None:
    """Create the tables that do not exist yet (an application would use migrations)."""
    async with manager.async_engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
