"""pytest plugin: run a test inside a transaction that is rolled back at its end.

Opt in from the ``conftest.py`` at the root of your tests::

    pytest_plugins = ["sessionscope.testing"]

and request a fixture in the tests that touch the database::

    def test_signup(sessionscope_transaction):
        signup("ann")                    # commits through sessionscope
        assert count_users() == 1        # visible for the rest of the test
    # afterwards the database is exactly as before the test

How it works: the fixture opens one connection, begins a transaction on it, and
binds the manager's sessions to that connection
(:meth:`SessionManager.bound_to`): every scope then runs in a SAVEPOINT, its
COMMIT releases the savepoint and its ROLLBACK rolls back to it, so the code
under test behaves as in production, failures and nested scopes included. At the
end of the test the outer transaction is rolled back.

Fixtures:

- ``sessionscope_manager``: the manager to bind; the default manager (set up by
  ``setup_database_connection()``). Override it in your ``conftest.py`` to use
  another ``SessionManager``.
- ``sessionscope_transaction``: binds the sync side; yields the ``Connection``.
- ``sessionscope_async_transaction``: binds the async side; yields the
  ``AsyncConnection`` (needs pytest-asyncio). At teardown it also disposes the
  async engine's pool, whose connections belong to the test's event loop.
- ``session``: a ``Session`` inside ``sessionscope_transaction``, for arranging
  and checking data in the test itself; ``async_session``: an ``AsyncSession``
  inside ``sessionscope_async_transaction``. Both run in the test's transaction:
  what they ``flush()`` (or ``commit()``, which releases their savepoint) is
  seen by the code under test, and everything is rolled back after the test.

Async fixtures and tests need pytest-asyncio: mark async tests with
``@pytest.mark.asyncio`` or set ``asyncio_mode = "auto"`` in the pytest
configuration (in strict mode, the default, an unmarked async test is skipped
with a warning).

Dispose the manager's pools when the test session ends, in the ``conftest.py``
that set the database up: ``manager.dispose()`` (``await manager.adispose()``
for the async engine inside its event loop).

Limits, all from sharing one connection: run no concurrent scopes in one test
(no ``asyncio.gather`` of database work); ``requires_new`` work is not
independent of the enclosing scope; per-scope ``isolation_level``, ``timeout``
and server-side read-only are not applied (``read_only=True`` still refuses
writes); code that opens its own connections with ``engine.connect()`` is not
covered; DDL on MariaDB/MySQL commits implicitly and ends the test transaction.
Use one of the two transaction fixtures per test: the sync and async sides hold
separate connections, which do not see each other's uncommitted rows.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Session

from ._api import get_default_manager
from ._manager import SessionManager

__all__ = [
    "async_session",
    "session",
    "sessionscope_async_transaction",
    "sessionscope_manager",
    "sessionscope_transaction",
]


@pytest.fixture
def sessionscope_manager() -> SessionManager:
    """The manager whose sessions the transaction fixtures bind: the default one.

    Override this fixture to bind another ``SessionManager``.
    """
    return get_default_manager()


@pytest.fixture
def sessionscope_transaction(sessionscope_manager: SessionManager) -> Iterator[Connection]:
    """Run the test's sync sessions in a transaction rolled back after the test."""
    manager = sessionscope_manager
    with manager.engine.connect() as connection:
        transaction = connection.begin()
        try:
            with manager.bound_to(connection):
                yield connection
        finally:
            if transaction.is_active:
                transaction.rollback()


@pytest.fixture
def session(
    sessionscope_manager: SessionManager, sessionscope_transaction: Connection
) -> Iterator[Session]:
    """A ``Session`` in the test's rolled-back transaction (see the module doc)."""
    with sessionscope_manager.session_factory() as session:
        yield session


try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - the async fixture needs pytest-asyncio
    pass
else:

    @pytest_asyncio.fixture
    async def sessionscope_async_transaction(
        sessionscope_manager: SessionManager,
    ) -> AsyncIterator[AsyncConnection]:
        """Run the test's async sessions in a transaction rolled back after the test."""
        manager = sessionscope_manager
        try:
            async with manager.async_engine.connect() as connection:
                transaction = await connection.begin()
                try:
                    with manager.bound_to(connection):
                        yield connection
                finally:
                    if transaction.is_active:
                        await transaction.rollback()
        finally:
            # Pooled async connections belong to this test's event loop.
            await manager.async_engine.dispose()

    @pytest_asyncio.fixture
    async def async_session(
        sessionscope_manager: SessionManager, sessionscope_async_transaction: AsyncConnection
    ) -> AsyncIterator[AsyncSession]:
        """An ``AsyncSession`` in the test's rolled-back transaction."""
        async with sessionscope_manager.async_session_factory() as session:
            yield session
