"""The transaction semantics grid (SPEC section 2), written once.

Every scenario runs on SQLite, PostgreSQL and MariaDB, through the sync front
and the async front (see ``grid.py``), and a second time while a scope of a
*different* thread or task is open in the inherited context: that outer scope
must change nothing, because sessions are never shared across threads or tasks.
"""

from __future__ import annotations

import contextvars
import inspect
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import event, func, select, text
from sqlalchemy.exc import IntegrityError, PendingRollbackError
from sqlalchemy.orm.exc import DetachedInstanceError

import sessionscope
from sessionscope import (
    ActiveScopeError,
    NoActiveScopeError,
    ReadOnlyError,
    RollbackOnlyError,
    SessionManager,
)

from .grid import Api, make_api
from .models import User


class Boom(Exception):
    pass


def names(api: Api) -> list[str]:
    """User names committed so far, read in a fresh scope."""
    with api.scope() as s:
        return sorted(api.execute(s, select(User.name)).scalars().all())


def count_checkouts(api: Api) -> list[int]:
    checkouts = [0]

    def _checkout(*args: Any) -> None:
        checkouts[0] += 1

    event.listen(api.engine, "checkout", _checkout)
    return checkouts


# -- scenarios ----------------------------------------------------------------


def commit_on_success(api: Api) -> None:
    api.log.clear()
    with api.scope() as s:
        s.add(User(name="a"))
    assert "COMMIT" in api.log.statements
    assert names(api) == ["a"]


def rollback_on_exception(api: Api) -> None:
    with pytest.raises(Boom), api.scope() as s:
        s.add(User(name="a"))
        api.flush(s)
        api.log.clear()
        raise Boom
    assert api.log.statements[-1] == "ROLLBACK"
    assert "COMMIT" not in api.log.statements
    assert names(api) == []


def user_commit_survives_exception(api: Api) -> None:
    with pytest.raises(Boom), api.scope() as s:
        s.add(User(name="kept"))
        api.commit(s)
        s.add(User(name="lost"))
        api.flush(s)
        raise Boom
    assert names(api) == ["kept"]


def required_join_sends_no_extra_statement(api: Api) -> None:
    api.log.clear()
    with api.scope() as s:
        s.add(User(name="a"))
        api.flush(s)
        s.add(User(name="b"))
    alone = list(api.log.statements)

    api.log.clear()
    with api.scope() as outer:
        outer.add(User(name="c"))
        api.flush(outer)
        with api.scope() as inner:
            assert inner is outer
            inner.add(User(name="d"))
    assert api.log.statements == alone
    assert names(api) == ["a", "b", "c", "d"]


def empty_scope_touches_nothing(api: Api) -> None:
    checkouts = count_checkouts(api)
    api.log.clear()
    with api.scope(), api.scope():
        pass
    with api.scope(auto_commit=False):
        pass
    assert checkouts == [0]
    assert api.log.statements == []


def savepoint_rollback_keeps_outer_work(api: Api) -> None:
    with api.scope() as s:
        s.add(User(name="outer-1"))
        try:
            with api.scope(propagation="nested") as inner:
                assert inner is s
                inner.add(User(name="inner"))
                api.flush(inner)
                raise Boom
        except Boom:
            pass
        s.add(User(name="outer-2"))
    assert "SAVEPOINT" in api.log.statements
    assert names(api) == ["outer-1", "outer-2"]


def savepoint_contains_a_failed_flush(api: Api) -> None:
    with api.scope() as s:
        s.add(User(name="a"))
        api.flush(s)
        with pytest.raises(IntegrityError), api.scope(propagation="nested") as inner:
            inner.add(User(name="a"))  # duplicate: the flush fails inside the savepoint
            api.flush(inner)
        # A failure swallowed inside the savepoint cannot pass for a RELEASE.
        with pytest.raises(PendingRollbackError), api.scope(propagation="nested") as inner:
            inner.add(User(name="a"))
            try:
                api.flush(inner)
            except IntegrityError:
                pass
        s.add(User(name="b"))
    assert names(api) == ["a", "b"]


def savepoint_success_is_released(api: Api) -> None:
    with api.scope() as s:
        s.add(User(name="outer"))
        with api.scope(propagation="nested") as inner:
            inner.add(User(name="inner"))
    assert "RELEASE" in api.log.statements
    assert names(api) == ["inner", "outer"]


def rollback_only_blocks_partial_commit(api: Api) -> None:
    @api.decorate
    def failing_step(session: Any) -> None:
        session.add(User(name="half"))
        raise Boom

    with pytest.raises(RollbackOnlyError) as info, api.scope() as s:
        s.add(User(name="first"))
        try:
            failing_step()
        except Boom:
            pass  # the caller swallows the error: the transaction must not commit
    assert isinstance(info.value.__cause__, Boom)
    assert names(api) == []


def auto_rollback_false_does_not_doom_outer(api: Api) -> None:
    with api.scope() as s:
        s.add(User(name="first"))
        try:
            with api.scope(auto_rollback=False):
                raise Boom
        except Boom:
            pass
    assert names(api) == ["first"]


def savepoint_inside_doomed_join(api: Api) -> None:
    """A joined failure inside a savepoint dooms the savepoint, not the outer."""
    with api.scope() as s:
        s.add(User(name="kept"))
        with pytest.raises(RollbackOnlyError), api.scope(propagation="nested"):
            try:
                with api.scope() as inner:
                    inner.add(User(name="partial"))
                    api.flush(inner)
                    raise Boom
            except Boom:
                pass
    assert names(api) == ["kept"]


def requires_new_commits_independently(api: Api) -> None:
    with pytest.raises(Boom), api.scope() as outer:
        with api.scope(propagation="requires_new") as inner:
            assert inner is not outer
            inner.add(User(name="independent"))
        outer.add(User(name="doomed"))
        api.flush(outer)
        raise Boom
    assert names(api) == ["independent"]


def returned_objects_stay_usable(api: Api) -> None:
    @api.decorate
    def create(session: Any, name: str) -> User:
        user = User(name=name)
        session.add(user)
        return user

    user = create("李四")
    assert isinstance(user.id, int)
    assert user.name == "李四"

    with api.scope(expire_on_commit=True) as s:
        expiring = User(name="expiring")
        s.add(expiring)
    with pytest.raises(DetachedInstanceError):
        _ = expiring.name


def mandatory_and_never(api: Api) -> None:
    with pytest.raises(NoActiveScopeError), api.scope(propagation="mandatory"):
        pass
    with api.scope() as outer:
        with api.scope(propagation="mandatory") as inner:
            assert inner is outer
        with pytest.raises(ActiveScopeError), api.scope(propagation="never"):
            pass
        with pytest.raises(ActiveScopeError), api.scope(durable=True):
            pass
    with api.scope(propagation="never") as s:
        s.add(User(name="never-alone"))
    with api.scope(propagation="nested") as s:  # no outer: acts as required
        s.add(User(name="nested-alone"))
    with api.scope(durable=True) as s:
        s.add(User(name="durable"))
    assert names(api) == ["durable", "nested-alone", "never-alone"]


def on_commit_hooks(api: Api) -> None:
    ran: list[str] = []
    with api.scope() as s:
        sessionscope.on_commit(lambda: ran.append("outer"))
        s.add(User(name="a"))
        with api.scope():
            sessionscope.on_commit(lambda: ran.append("joined"))
        with api.scope(propagation="nested"):
            sessionscope.on_commit(lambda: ran.append("released"))
        try:
            with api.scope(propagation="nested"):
                sessionscope.on_commit(lambda: ran.append("rolled-back-savepoint"))
                raise Boom
        except Boom:
            pass
        assert ran == []  # nothing before the outermost COMMIT
    assert ran == ["outer", "joined", "released"]

    ran.clear()
    with pytest.raises(Boom), api.scope():
        sessionscope.on_commit(lambda: ran.append("never"))
        raise Boom
    assert ran == []
    with pytest.raises(NoActiveScopeError):
        sessionscope.on_commit(lambda: None)


def on_commit_follows_the_bodys_own_commit(api: Api) -> None:
    ran: list[str] = []
    with api.scope() as s:
        s.add(User(name="a"))
        sessionscope.on_commit(lambda: ran.append("committed-by-body"))
        api.commit(s)
        s.add(User(name="b"))
        api.flush(s)
        sessionscope.on_commit(lambda: ran.append("rolled-back-by-body"))
        api.rollback(s)
        assert ran == []  # callbacks run when the scope exits
    assert ran == ["committed-by-body"]
    assert names(api) == ["a"]


def savepoint_kept_on_error_does_not_mask_it(api: Api) -> None:
    """auto_rollback=False keeps a savepoint's work on error, but a failed flush
    left nothing to keep: the caller still sees the flush's error."""
    with api.scope() as s:
        s.add(User(name="a"))
        api.flush(s)
        with pytest.raises(IntegrityError), api.scope(
            propagation="nested", auto_rollback=False
        ) as inner:
            inner.add(User(name="a"))
            api.flush(inner)
        s.add(User(name="b"))
    assert names(api) == ["a", "b"]


def set_rollback_dooms_quietly(api: Api) -> None:
    with api.scope() as s:
        s.add(User(name="doomed"))
        sessionscope.set_rollback(True)
    with api.scope() as s:
        s.add(User(name="kept"))
        with api.scope(propagation="nested") as inner:
            inner.add(User(name="savepoint-doomed"))
            sessionscope.set_rollback()
    with api.scope() as s:
        s.add(User(name="undoomed"))
        sessionscope.set_rollback(True)
        sessionscope.set_rollback(False)
    assert names(api) == ["kept", "undoomed"]


def auto_commit_false_discards(api: Api) -> None:
    api.log.clear()
    with api.scope(auto_commit=False) as s:
        s.add(User(name="discarded"))
        api.flush(s)
    assert "COMMIT" not in api.log.statements
    assert names(api) == []


def explicit_session_is_joined(api: Api) -> None:
    seen: list[Any] = []

    @api.decorate
    def create_user_profile(session: Any, name: str) -> None:
        seen.append(session)
        session.add(User(name=name))

    with api.scope() as s:
        create_user_profile(s, "positional")
        create_user_profile("injected")  # no session passed: joins the scope
        create_user_profile(session=s, name="keyword")
    assert seen[0] is s and seen[1] is s and seen[2] is s
    assert names(api) == ["injected", "keyword", "positional"]
    assert "session" not in inspect.signature(create_user_profile).parameters


def read_only_refuses_writes(api: Api) -> None:
    with api.scope() as s:
        s.add(User(name="existing"))
    api.log.clear()
    with pytest.raises(ReadOnlyError), api.scope(read_only=True) as s:
        assert api.scalar(s, select(func.count()).select_from(User)) == 1
        s.add(User(name="refused"))
        api.flush(s)
    assert "INSERT" not in api.log.statements
    dialect = api.engine.dialect.name
    if dialect != "sqlite":  # SQLite has no read-only transactions to ask for
        with pytest.raises(Exception) as info, api.scope(read_only=True) as s:
            api.execute(s, text("INSERT INTO ss_users (name) VALUES ('raw')"))
        assert "read" in str(info.value).lower()
    assert names(api) == ["existing"]


def isolation_level_is_scoped(api: Api) -> None:
    dialect = api.engine.dialect.name
    if dialect == "postgresql":
        probe, expected, default = "SHOW transaction_isolation", "serializable", "read committed"
        level = "SERIALIZABLE"
    elif dialect == "sqlite":
        probe, expected, default = "PRAGMA read_uncommitted", 1, 0
        level = "READ UNCOMMITTED"
    else:
        probe, expected, default = "SELECT @@session.tx_isolation", "SERIALIZABLE", (
            "REPEATABLE-READ"
        )
        level = "SERIALIZABLE"
    with api.scope(isolation_level=level) as s:
        assert api.scalar(s, text(probe)) == expected
    for _ in range(3):  # whichever pooled connection comes back: nothing leaked
        with api.scope() as s:
            assert api.scalar(s, text(probe)) == default


SCENARIOS: list[Callable[[Api], None]] = [
    commit_on_success,
    rollback_on_exception,
    user_commit_survives_exception,
    required_join_sends_no_extra_statement,
    empty_scope_touches_nothing,
    savepoint_rollback_keeps_outer_work,
    savepoint_contains_a_failed_flush,
    savepoint_success_is_released,
    rollback_only_blocks_partial_commit,
    auto_rollback_false_does_not_doom_outer,
    savepoint_inside_doomed_join,
    requires_new_commits_independently,
    returned_objects_stay_usable,
    mandatory_and_never,
    on_commit_hooks,
    on_commit_follows_the_bodys_own_commit,
    savepoint_kept_on_error_does_not_mask_it,
    set_rollback_dooms_quietly,
    auto_commit_false_discards,
    explicit_session_is_joined,
    read_only_refuses_writes,
    isolation_level_is_scoped,
]


def _run_under_foreign_outer(api: Api, scenario: Callable[[Api], None]) -> None:
    """Run ``scenario`` while an outer scope of another thread/task is visible in
    the inherited context; it must be ignored, and must itself stay untouched."""
    if api.is_async:
        import asyncio

        from sqlalchemy.util import greenlet_spawn

        async def main() -> None:
            try:
                async with sessionscope.async_session_scope() as outer:
                    await asyncio.create_task(greenlet_spawn(scenario, api))
                    assert not outer.in_transaction()
            finally:
                await api.manager.adispose()

        asyncio.run(main())
        return
    with sessionscope.session_scope() as outer:
        context = contextvars.copy_context()
        with ThreadPoolExecutor(1) as pool:
            pool.submit(context.run, scenario, api).result()
        assert not outer.in_transaction()


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def api(mode: str, manager: SessionManager) -> Iterator[Api]:
    yield make_api(mode, manager)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda f: f.__name__)
def test_grid(api: Api, scenario: Callable[[Api], None]) -> None:
    api.run(scenario)
    stats = sessionscope.get_session_stats()
    assert stats["active_sessions"] == 0
    assert api.checked_out() == 0


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda f: f.__name__)
def test_grid_under_foreign_outer_scope(api: Api, scenario: Callable[[Api], None]) -> None:
    _run_under_foreign_outer(api, scenario)
    assert sessionscope.get_session_stats()["active_sessions"] == 0
    assert api.checked_out() == 0
