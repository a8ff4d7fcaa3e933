"""Run-time side of the typed API: the typing file covers every public name and
imports cleanly, the typed forms (methods, classmethods, the session second)
behave as their types say, and the TypedDicts and ``ScopeOptions`` match what
the code really returns and accepts."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from sqlmodel import Session as SQLModelSession

import sessionscope
import sessionscope.fastapi
from sessionscope import (
    FunctionStats,
    PoolStats,
    RoutingStats,
    SessionConfig,
    SessionManager,
    SessionStats,
)
from sessionscope._types import EngineRoutingStats, ScopeOptions
from tests.models import Base, User

TYPING_FILE = Path(__file__).parent / "typing" / "public_api.py"


def _names_used(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
    return names


def test_typing_file_covers_every_public_name() -> None:
    used = _names_used(TYPING_FILE)
    public = set(sessionscope.__all__) | set(sessionscope.fastapi.__all__)
    assert sorted(public - used) == []


def test_typing_file_imports_and_its_decorations_are_valid_at_run_time() -> None:
    spec = importlib.util.spec_from_file_location("typing_public_api", TYPING_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered while it runs: SQLAlchemy resolves the models' annotations there.
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    assert module.sqlmodel_manager.session_scope  # built, never connected
    assert str(typing.get_type_hints(module.create_user)["return"].__name__) == "User"


def test_session_manager_is_subscriptable_with_defaults() -> None:
    # PEP 696 defaults at run time (typing_extensions): one class or both.
    assert SessionManager[SQLModelSession] == SessionManager[SQLModelSession, AsyncSession]
    assert SessionManager[Session, AsyncSession] is not None


def test_scope_options_are_the_config_fields() -> None:
    fields = {f.name: f.type for f in dataclasses.fields(SessionConfig)}
    assert set(ScopeOptions.__annotations__) == set(fields)
    assert ScopeOptions.__total__ is False


@pytest.fixture
def sqlite_manager(tmp_path: Path) -> typing.Iterator[SessionManager]:
    manager = SessionManager(f"sqlite:///{tmp_path / 'typed.db'}")
    Base.metadata.create_all(manager.engine)
    yield manager
    manager.dispose()


def test_stats_typeddicts_match_what_get_stats_returns(sqlite_manager: SessionManager) -> None:
    @sqlite_manager.with_session
    def add(session: Session, name: str) -> None:
        session.add(User(name=name))

    add("ann")
    stats: dict[str, Any] = dict(sqlite_manager.get_stats())
    required = SessionStats.__required_keys__
    assert set(stats) == required  # no replicas, no cluster: neither key
    assert SessionStats.__optional_keys__ == {"routing", "cluster"}
    entry = next(iter(stats["functions"].values()))
    assert set(entry) == set(FunctionStats.__annotations__)
    assert set(stats["pool"]) == {"sync"}
    pool = stats["pool"]["sync"]
    assert PoolStats.__required_keys__ <= set(pool) <= set(PoolStats.__annotations__)
    assert isinstance(stats["success_rate"], float) and stats["success_rate"] == 100.0
    before_setup = dict(sessionscope.get_session_stats())
    assert set(before_setup) >= required


def test_routing_typeddict_matches_a_manager_with_replicas(tmp_path: Path) -> None:
    manager: SessionManager = SessionManager(
        f"sqlite:///{tmp_path / 'p.db'}", replicas=[f"sqlite:///{tmp_path / 'r.db'}"]
    )
    try:
        with manager.session_scope(read_only=True) as session:
            assert session.scalar(select(1)) == 1
        stats: dict[str, Any] = dict(manager.get_stats())
        routing = stats["routing"]
        assert set(routing) == set(RoutingStats.__annotations__)
        for engine in routing["engines"].values():
            keys = set(engine)
            assert EngineRoutingStats.__required_keys__ <= keys
            assert keys <= set(EngineRoutingStats.__annotations__)
        assert {e["role"] for e in routing["engines"].values()} == {"primary", "replica"}
    finally:
        manager.dispose()


def test_typed_forms_inject_and_join_at_run_time(sqlite_manager: SessionManager) -> None:
    """The forms the types describe: session first, second (after self, cls or
    any first argument), and an explicit session passed positionally."""
    seen: list[Session] = []

    class Repository:
        @sqlite_manager.with_session
        def add(self, session: Session, name: str) -> int:
            seen.append(session)
            user = User(name=name)
            session.add(user)
            session.flush()
            return user.id

        @classmethod
        @sqlite_manager.with_session
        def count(cls, session: Session, prefix: str) -> int:
            seen.append(session)
            query = select(func.count()).select_from(User).where(User.name.like(f"{prefix}%"))
            return int(session.scalar(query) or 0)

    @sqlite_manager.with_session
    def rename(user_id: int, session: Session, name: str) -> None:
        seen.append(session)
        user = session.get(User, user_id)
        assert user is not None
        user.name = name

    # The attributes the protocol types declare (functools.wraps sets them).
    assert rename.__name__ == "rename" and rename.__wrapped__.__name__ == "rename"
    assert Repository.add.__qualname__.endswith("Repository.add")
    repo = Repository()
    first = repo.add("ann")
    assert Repository.count("an") == 1 and repo.count("an") == 1
    rename(first, "anne")
    with sqlite_manager.session_scope() as outer:
        second = repo.add(outer, "bob")  # explicit session, positionally: joins it
        Repository.add(repo, outer, "cid")  # through the class, instance first
        rename(second, outer, "bobby")
        assert seen[-3:] == [outer, outer, outer]
    assert Repository.count("bobby") == 1
    assert all(isinstance(s, Session) for s in seen)
    assert len({id(s) for s in seen[:4]}) == 4  # each outermost call its own session
