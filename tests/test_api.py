"""Public API surface: setup, configuration errors, URLs, decorator forms,
reentrancy across threads and tasks, per-scope timeouts."""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import sessionscope
from sessionscope import (
    SessionConfig,
    SessionFactoryNotInitializedError,
    SessionManager,
    _api,
    _lifecycle,
)

from .conftest import reset_schema
from .models import User


def test_all_is_sorted_and_complete() -> None:
    assert sessionscope.__all__ == sorted(sessionscope.__all__)
    for name in sessionscope.__all__:
        assert hasattr(sessionscope, name), name


def test_import_pulls_no_optional_dependency() -> None:
    code = (
        "import sys, sessionscope\n"
        "bad = [m for m in ('fastapi', 'prometheus_client', 'opentelemetry', 'asyncpg',"
        " 'psycopg', 'pymysql', 'aiomysql') if m in sys.modules]\n"
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_use_before_setup_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_api, "_default", None)
    for call in (
        lambda: sessionscope.session_scope(),
        lambda: sessionscope.async_session_scope(),
        lambda: sessionscope.with_retry(lambda: None),
    ):
        with pytest.raises(SessionFactoryNotInitializedError) as info:
            call()
        assert "setup_database_connection()" in str(info.value)

    @sessionscope.with_session
    def decorated_before_setup(session: Session) -> None:
        pass

    with pytest.raises(SessionFactoryNotInitializedError):
        decorated_before_setup()
    assert sessionscope.get_session_stats()["success_rate"] == 100.0


def test_seed_config_defaults() -> None:
    cfg = SessionConfig()
    assert (cfg.auto_commit, cfg.auto_rollback, cfg.enable_monitoring) == (True, True, True)
    assert (cfg.log_level, cfg.retry_attempts, cfg.retry_delay) == ("INFO", 3, 1.0)
    assert cfg.propagation == "required" and cfg.expire_on_commit is False


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"retry_attempts": -1}, ValueError),
        ({"retry_attempts": 1.5}, TypeError),
        ({"retry_delay": -0.1}, ValueError),
        ({"log_level": "LOUD"}, ValueError),
        ({"auto_commit": "yes"}, TypeError),
        ({"propagation": "sideways"}, ValueError),
        ({"timeout": 0}, ValueError),
        ({"no_such_option": 1}, TypeError),
        ({"retry_predicate": 3}, TypeError),
    ],
)
def test_bad_configuration_fails_at_configuration_time(
    fields: dict[str, Any], error: type[Exception], manager: SessionManager
) -> None:
    before = sessionscope.get_default_manager().config
    with pytest.raises(error):
        sessionscope.configure_session(**fields)
    assert sessionscope.get_default_manager().config == before  # nothing half-applied
    with pytest.raises(error):
        sessionscope.session_scope(**fields)
    with pytest.raises(error):
        sessionscope.with_session(**fields)(lambda session: None)


def test_decoration_time_errors() -> None:
    def gen(session: Session) -> Any:
        yield 1

    async def agen(session: AsyncSession) -> Any:
        yield 1

    async def coro(session: AsyncSession) -> None:
        pass

    def plain(session: Session) -> None:
        pass

    def no_session(name: str) -> None:
        pass

    with pytest.raises(TypeError, match="generator"):
        sessionscope.with_session(gen)
    with pytest.raises(TypeError, match="generator"):
        sessionscope.async_with_session(agen)
    with pytest.raises(TypeError, match="async_with_session"):
        sessionscope.with_session(coro)
    with pytest.raises(TypeError, match="async def"):
        sessionscope.async_with_session(plain)
    with pytest.raises(TypeError, match="'session'"):
        sessionscope.with_session(no_session)
    with pytest.raises(ValueError, match="propagation"):
        sessionscope.async_with_session(propagation="nope")(coro)


def test_bare_and_called_decorator_forms(manager: SessionManager) -> None:
    @sessionscope.with_session
    def bare(session: Session, name: str) -> int:
        session.add(user := User(name=name))
        session.flush()
        return user.id

    @sessionscope.with_session()
    def called(session: Session, name: str) -> int:
        return bare(session, name)

    @sessionscope.with_session(auto_commit=False)
    def not_committed(session: Session, name: str) -> None:
        session.add(User(name=name))

    assert bare("a") > 0
    assert called("b") > 0
    not_committed("c")
    with sessionscope.session_scope() as s:
        assert sorted(s.scalars(select(User.name))) == ["a", "b"]
    assert list(inspect.signature(bare).parameters) == ["name"]
    assert bare.__name__ == "bare"


def test_signature_hides_session_for_methods_and_keyword_only() -> None:
    class Service:
        @sessionscope.with_session
        def create(self, session: Session, name: str) -> None: ...

    @sessionscope.async_with_session
    async def kw_only(name: str, *, session: AsyncSession) -> None: ...

    assert list(inspect.signature(Service.create).parameters) == ["self", "name"]
    assert list(inspect.signature(kw_only).parameters) == ["name"]


def test_method_injection(manager: SessionManager) -> None:
    class Service:
        @sessionscope.with_session
        def create(self, session: Session, name: str) -> str:
            session.add(User(name=name))
            return name

    assert Service().create("via-method") == "via-method"
    with sessionscope.session_scope() as s:
        assert s.scalar(select(User.name)) == "via-method"


def test_same_decorator_object_across_threads(manager: SessionManager) -> None:
    sessions: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    @sessionscope.with_session
    def create(session: Session, name: str) -> None:
        barrier.wait(timeout=10)  # all eight inside the decorator at once
        with lock:
            sessions.append(id(session))
        session.add(User(name=name))

    threads = [threading.Thread(target=create, args=(f"t{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(sessions)) == 8
    with sessionscope.session_scope() as s:
        assert len(s.scalars(select(User)).all()) == 8
    stats = sessionscope.get_session_stats()
    assert stats["session_count"] == 9 and stats["active_sessions"] == 0


async def test_same_decorator_object_across_tasks(manager: SessionManager) -> None:
    sessions: set[int] = set()
    started = asyncio.Event()
    inside = 0

    @sessionscope.async_with_session
    async def create(session: AsyncSession, name: str) -> None:
        nonlocal inside
        inside += 1
        if inside == 20:
            started.set()
        await started.wait()  # all twenty tasks inside the decorator at once
        sessions.add(id(session))
        session.add(User(name=name))

    try:
        await asyncio.wait_for(asyncio.gather(*(create(f"t{i}") for i in range(20))), 60)
        assert len(sessions) == 20
        async with sessionscope.async_session_scope() as s:
            assert len((await s.scalars(select(User))).all()) == 20
        assert sessionscope.get_session_stats()["active_sessions"] == 0
    finally:
        await manager.adispose()


async def test_child_tasks_do_not_share_the_parent_session(manager: SessionManager) -> None:
    try:
        async with sessionscope.async_session_scope() as parent:
            async def child() -> AsyncSession:
                async with sessionscope.async_session_scope() as s:
                    return s

            children = await asyncio.gather(child(), child())
            assert parent not in children and children[0] is not children[1]
    finally:
        await manager.adispose()


def test_url_derivation() -> None:
    cases = {
        "sqlite:///x.db": "sqlite+aiosqlite:///x.db",
        "postgresql://u:pw@h/db": "postgresql+asyncpg://u:***@h/db",
        "postgresql+psycopg://u@h/db": "postgresql+asyncpg://u@h/db",
        "mysql+pymysql://u@h/db": "mysql+aiomysql://u@h/db",
        "mariadb+pymysql://u@h/db": "mariadb+aiomysql://u@h/db",
        "postgresql+asyncpg://u@h/db": "postgresql+asyncpg://u@h/db",
    }
    for sync_url, expected in cases.items():
        assert SessionManager(sync_url).async_url.render_as_string() == expected
    assert SessionManager(async_url="postgresql+asyncpg://u@h/db").url.drivername == (
        "postgresql+psycopg"
    )


def test_embedded_default_and_database_url(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    default = SessionManager()
    assert default.url.drivername == "sqlite" and default.url.database == "sessionscope.db"
    assert default.async_url.drivername == "sqlite+aiosqlite"
    assert not (tmp_path / "sessionscope.db").exists()  # no hidden connection
    with default.session_scope() as s:
        assert s.scalar(text("SELECT 1")) == 1
    assert (tmp_path / "sessionscope.db").exists()
    default.dispose()

    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'env.db'}")
    assert SessionManager().url.database == str(tmp_path / "env.db")


def test_password_never_in_repr_or_errors() -> None:
    manager = SessionManager("postgresql+psycopg://user:s3cret@127.0.0.1:1/db")
    assert "s3cret" not in repr(manager)
    assert "s3cret" not in manager.name


async def test_existing_engines_and_custom_session_class(tmp_path: Path) -> None:
    class AppSession(Session):
        pass

    engine = create_engine(f"sqlite:///{tmp_path / 'own.db'}")
    async_engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'own.db'}")
    manager = SessionManager(engine=engine, async_engine=async_engine, session_class=AppSession)
    reset_schema(engine)
    try:
        with manager.session_scope() as s:
            assert isinstance(s, AppSession)
            s.add(User(name="own"))
        async with manager.async_session_scope() as a:
            assert isinstance(a.sync_session, AppSession)
            assert (await a.scalar(select(User.name))) == "own"
        assert manager.engine is engine and manager.async_engine is async_engine
    finally:
        await manager.adispose()


def test_timeout_is_transaction_local(backend: str, manager: SessionManager) -> None:
    if backend == "sqlite":
        with pytest.raises(ValueError, match="timeout"), sessionscope.session_scope(timeout=1):
            pass
        return
    manager2 = SessionManager(manager.url, pool_size=1, max_overflow=0)
    try:
        sleep = "SELECT pg_sleep(3)" if backend == "postgresql" else "SELECT SLEEP(3)"
        with pytest.raises(DBAPIError) as info, manager2.session_scope(timeout=0.2) as s:
            s.execute(text(sleep))
        if backend == "postgresql":
            assert info.value.orig is not None and "statement timeout" in str(info.value.orig)
        # Same single pooled connection: the setting did not outlive the scope.
        probe = "SHOW statement_timeout" if backend == "postgresql" else (
            "SELECT @@session.max_statement_time"
        )
        with manager2.session_scope() as s:
            assert float(str(s.scalar(text(probe))).rstrip("ms") or 0) == 0
    finally:
        manager2.dispose()


def test_manager_instances_are_independent(tmp_path: Path) -> None:
    a = SessionManager(f"sqlite:///{tmp_path / 'a.db'}")
    b = SessionManager(f"sqlite:///{tmp_path / 'b.db'}")
    reset_schema(a.engine)
    reset_schema(b.engine)

    @b.with_session
    def write_b(session: Session) -> None:
        session.add(User(name="in-b"))

    @a.with_session
    def session_of_a(session: Session) -> Session:
        return session

    with a.session_scope() as sa_:
        sa_.add(User(name="in-a"))
        write_b()  # another manager's scope never joins this one
        with b.session_scope():
            # ...and a scope of b in between does not hide a's scope from a.
            assert session_of_a() is sa_
    with a.session_scope() as s:
        assert s.scalars(select(User.name)).all() == ["in-a"]
    with b.session_scope() as s:
        assert s.scalars(select(User.name)).all() == ["in-b"]
    assert a.get_stats()["session_count"] == 2 and b.get_stats()["session_count"] == 3
    a.dispose()
    b.dispose()


def test_root_get_db_is_the_fastapi_dependency() -> None:
    """``from sessionscope import get_db`` is the dependency that commits before the
    response is sent (tested in test_fastapi.py), imported only when asked for."""
    import sessionscope.fastapi

    assert sessionscope.get_db is sessionscope.fastapi.get_db


def test_manager_level_set_rollback_and_on_commit(tmp_path: Path) -> None:
    a = SessionManager(f"sqlite:///{tmp_path / 'a.db'}")
    b = SessionManager(f"sqlite:///{tmp_path / 'b.db'}")
    reset_schema(a.engine)
    reset_schema(b.engine)
    ran: list[str] = []
    with a.session_scope() as sa_, b.session_scope() as sb:
        sa_.add(User(name="a-kept"))
        sb.add(User(name="b-doomed"))
        a.on_commit(lambda: ran.append("a"))
        b.set_rollback()  # dooms b's scope only, although a's is the same thread's too
    with a.session_scope() as s:
        assert s.scalars(select(User.name)).all() == ["a-kept"]
    with b.session_scope() as s:
        assert s.scalars(select(User.name)).all() == []
    assert ran == ["a"]
    with pytest.raises(sessionscope.NoActiveScopeError):
        a.set_rollback()
    a.dispose()
    b.dispose()


def test_session_options_expire_on_commit_is_honoured(tmp_path: Path) -> None:
    manager = SessionManager(
        f"sqlite:///{tmp_path / 'e.db'}", session_options={"expire_on_commit": True}
    )
    with manager.session_scope() as s:
        assert s.expire_on_commit is True
    with manager.session_scope(expire_on_commit=False) as s:
        assert s.expire_on_commit is False
    manager.dispose()


def test_cached_overrides_still_validate_types(manager: SessionManager) -> None:
    with sessionscope.session_scope(read_only=True):
        pass
    with pytest.raises(TypeError, match="read_only"):
        sessionscope.session_scope(read_only=1)  # 1 == True, but not a bool


async def test_a_session_of_the_wrong_kind_is_a_clear_type_error(
    manager: SessionManager,
) -> None:
    @sessionscope.async_with_session
    async def needs_async(session: AsyncSession) -> None: ...

    try:
        with sessionscope.session_scope() as sync_session:
            with pytest.raises(TypeError, match="AsyncSession"):
                await needs_async(session=sync_session)
        await needs_async(session=None)  # None: one is injected
    finally:
        await manager.adispose()


def test_setup_again_disposes_the_replaced_managers_sync_pool(db_url: str) -> None:
    old = sessionscope.setup_database_connection(db_url)
    with old.session_scope() as session:
        session.execute(text("SELECT 1"))
    assert old.pool_status()["sync"]["checked_in"] == 1
    new = sessionscope.setup_database_connection(db_url)
    try:
        assert old.pool_status()["sync"]["checked_in"] == 0
        assert new.stats is old.stats  # statistics carry on
    finally:
        new.dispose()


async def test_setup_again_inside_the_loop_disposes_the_async_pool(db_url: str) -> None:
    old = sessionscope.setup_database_connection(db_url)
    async with old.async_session_scope() as session:
        await session.execute(text("SELECT 1"))
    assert old.pool_status()["async"]["checked_in"] == 1
    new = sessionscope.setup_database_connection(db_url)
    assert old.pool_status()["async"]["checked_in"] == 1  # a task on this loop does it
    await asyncio.gather(*_lifecycle.pending)
    assert old.pool_status()["async"]["checked_in"] == 0
    await new.adispose()
