"""Test backends: SQLite always; PostgreSQL and MariaDB on loopback.

Locally an unreachable server skips its tests with the reason; with CI=true it
fails them, so CI can never pass without the real servers.

Each test run uses the database named by SESSIONSCOPE_TEST_DB (default ``test``),
created if missing, so parallel runs on one machine do not step on each other.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine, make_url

import sessionscope
from sessionscope import _api

from .models import Base

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# Model-based tests (tests/test_model.py): CI draws the same programs every run
# (a seed derived from each test); locally they vary, and a failure prints the
# seed to pass back with --hypothesis-seed=N.
try:
    from hypothesis import settings
except ImportError:  # a minimal run (the dependency floors job) has no model tests
    pass
else:
    settings.register_profile("ci", derandomize=True, print_blob=True)
    if IN_CI:
        settings.load_profile("ci")
TEST_DB = os.environ.get("SESSIONSCOPE_TEST_DB", "test")

SERVER_URLS = {
    "postgresql": os.environ.get(
        "SESSIONSCOPE_PG_URL", f"postgresql+psycopg://postgres@127.0.0.1:5432/{TEST_DB}"
    ),
    "mariadb": os.environ.get(
        "SESSIONSCOPE_MARIADB_URL", f"mariadb+pymysql://root@127.0.0.1:3306/{TEST_DB}"
    ),
}
BACKENDS = ["sqlite", "postgresql", "mariadb"]

_reachable: dict[str, str | None] = {}


def create_database(url: str) -> None:
    """Create the database named by ``url`` on its server if it does not exist."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    admin = parsed.set(database="postgres" if backend == "postgresql" else "")
    engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            if backend == "postgresql":
                exists = conn.scalar(
                    text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": parsed.database}
                )
                if not exists:
                    conn.exec_driver_sql(f'CREATE DATABASE "{parsed.database}"')
            else:
                conn.exec_driver_sql(f"CREATE DATABASE IF NOT EXISTS `{parsed.database}`")
    finally:
        engine.dispose()


def _ensure_database(backend: str) -> str | None:
    """Create the test database if needed; return None if OK, else the reason."""
    url = make_url(SERVER_URLS[backend])
    try:
        with socket.create_connection((url.host or "127.0.0.1", url.port or 0), timeout=2):
            pass
    except OSError as err:
        return f"{backend} server not reachable at {url.host}:{url.port} ({err})"
    try:
        create_database(SERVER_URLS[backend])
    except Exception as err:  # a server that refuses us is as good as absent
        return f"{backend} server refused the test login: {type(err).__name__}: {err}"
    return None


def run_pytest(
    directory: Path, env: dict[str, str], *, asyncio_mode: str = "auto"
) -> subprocess.CompletedProcess[str]:
    """Run pytest on ``directory`` in a child process, with this project's pytest
    settings (warnings as errors, asyncio auto mode unless ``asyncio_mode`` says
    otherwise: ``"strict"`` is pytest-asyncio's default, as a reader has it)."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-W",
            "error",
            "-o",
            f"asyncio_mode={asyncio_mode}",
            "-o",
            "asyncio_default_fixture_loop_scope=function",
            str(directory),
        ],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def require_server(backend: str) -> str:
    """The sync URL of a server backend, or skip (locally) / fail (CI)."""
    if backend not in _reachable:
        _reachable[backend] = _ensure_database(backend)
    reason = _reachable[backend]
    if reason is not None:
        if IN_CI:
            pytest.fail(f"CI requires {backend}: {reason}")
        pytest.skip(reason)
    return SERVER_URLS[backend]


def backend_url(backend: str, tmp_path: Path) -> str:
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'test.db'}"
    return require_server(backend)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def db_url(backend: str, tmp_path: Path) -> str:
    return backend_url(backend, tmp_path)


_schema_ready: set[str] = set()


def reset_schema(engine: Engine) -> None:
    """Create the test tables once per database, then empty them for each test."""
    url = engine.url.render_as_string(hide_password=False)
    if url not in _schema_ready:
        Base.metadata.drop_all(engine)
        Base.metadata.create_all(engine)
        _schema_ready.add(url)
    with engine.begin() as conn:
        for table in reversed(Base.metadata.sorted_tables):
            conn.execute(table.delete())


@dataclass
class StatementLog:
    """Every statement an engine sends, including BEGIN/COMMIT/ROLLBACK and
    savepoint verbs, recorded through engine events."""

    statements: list[str] = field(default_factory=list)

    def attach(self, engine: Engine) -> None:
        def _sql(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            self.statements.append(statement.split()[0].upper() if statement else statement)

        event.listen(engine, "before_cursor_execute", _sql)
        event.listen(engine, "commit", lambda conn: self.statements.append("COMMIT"))
        event.listen(engine, "rollback", lambda conn: self.statements.append("ROLLBACK"))

    def clear(self) -> None:
        self.statements.clear()


@pytest.fixture
def manager(db_url: str) -> Iterator[sessionscope.SessionManager]:
    """A default manager on the backend, with fresh tables and zeroed stats."""
    sessionscope.configure_session(retry_delay=0.01)
    manager = sessionscope.setup_database_connection(db_url)
    reset_schema(manager.engine)
    manager.reset_stats()
    yield manager
    manager.dispose()


@pytest.fixture(autouse=True)
def _restore_default_config() -> Iterator[None]:
    saved = _api._config
    yield
    sessionscope.configure_session(**{
        f.name: getattr(saved, f.name) for f in dataclasses.fields(saved)
    })


@pytest.fixture(params=BACKENDS)
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """A manager of its own on each backend, plus an observer connection (the
    scope-integrity tests: tests/integrity.py)."""
    from .integrity import make_env

    environment = make_env(request.param, tmp_path)
    yield environment
    environment.close()


@pytest.fixture(params=BACKENDS)
async def aenv(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    """:func:`env` for async tests: the async engine is disposed in the test's loop."""
    from .integrity import make_env

    environment = make_env(request.param, tmp_path)
    yield environment
    await environment.aclose()
