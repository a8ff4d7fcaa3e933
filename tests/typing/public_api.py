"""Static checks of the public API's types, run by ``mypy --strict`` and by
pyright in strict mode (``.ci/jobs/30-typing.sh``), not by pytest.

Every ``assert_type`` must hold under both checkers, and every line marked
``# type: ignore[code]`` must be an error (mypy's ``warn_unused_ignores`` and
pyright's ``reportUnnecessaryTypeIgnoreComment`` fail on a marker that is not
needed). The module imports without side effects (nothing connects): the
runtime test ``tests/test_typing_coverage.py`` imports it, so every decoration
below is valid at run time too, and checks that every public name is used here.
The bodies of the ``check_*`` functions are never run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from typing import Annotated, Any

from fastapi import Depends
from sqlalchemy import String, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlmodel import Field, SQLModel
from sqlmodel import Session as SQLModelSession
from sqlmodel import select as sqlmodel_select
from sqlmodel.ext.asyncio.session import AsyncSession as SQLModelAsyncSession
from typing_extensions import assert_type

import sessionscope
from sessionscope import (
    ActiveScopeError,
    CommitOutcomeUnknownError,
    FunctionStats,
    NoActiveScopeError,
    NodeUnavailableError,
    PoolExhaustedError,
    PoolStats,
    ReadOnlyError,
    RollbackOnlyError,
    RoutingStats,
    SessionConfig,
    SessionFactoryNotInitializedError,
    SessionFunction,
    SessionManager,
    SessionMethod,
    SessionScopeError,
    SessionStats,
    async_session_scope,
    async_with_retry,
    async_with_session,
    configure_session,
    error_code,
    get_default_manager,
    get_session_stats,
    is_transient,
    on_commit,
    reset_session_stats,
    session_scope,
    set_rollback,
    setup_database_connection,
    with_retry,
    with_session,
)
from sessionscope.fastapi import (
    AsyncSessionDep,
    SessionDep,
    SyncSessionDep,
    async_session_dependency,
    get_async_db,
    get_db,
    get_sync_db,
    session_dependency,
    sync_session_dependency,
)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "typing_users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


class Hero(SQLModel, table=True):
    __tablename__ = "typing_heroes"  # pyright: ignore[reportAssignmentType]

    id: int | None = Field(default=None, primary_key=True)
    name: str


# -- 1. decorators: the signature minus the session ----------------------------------


@with_session
def create_user(session: Session, name: str, *, admin: bool = False) -> User:
    user = User(name=name)
    session.add(user)
    return user


@with_session(read_only=True, isolation_level="REPEATABLE READ")
def count_users(session: Session) -> int:
    return len(session.scalars(select(User)).all())


@with_session
def find_user(session: Session, name: str) -> User | None:
    return session.scalars(select(User).where(User.name == name)).first()


@async_with_session
async def acreate_user(session: AsyncSession, name: str) -> User:
    user = User(name=name)
    session.add(user)
    return user


@async_with_session(propagation="requires_new")
async def acount_users(session: AsyncSession, limit: int = 10) -> int:
    return len((await session.scalars(select(User).limit(limit))).all())


class UserRepository:
    """Methods: the session comes right after ``self`` / ``cls``."""

    @with_session
    def add(self, session: Session, name: str) -> User:
        user = User(name=name)
        session.add(user)
        return user

    @async_with_session(auto_commit=False)
    async def aadd(self, session: AsyncSession, name: str) -> User:
        return User(name=name)

    @classmethod
    @with_session
    def count(cls, session: Session, prefix: str) -> int:
        return 0

    @staticmethod
    @with_session
    def static_count(session: Session) -> int:
        return 0


def check_decorated_sync_function(session: Session) -> None:
    # Assignable to (the checkers spell parameter names differently) the protocol.
    as_function: SessionFunction[Session, [str], User | None] = find_user
    assert_type(as_function("ann"), User | None)
    assert_type(find_user(session, "ann"), User | None)
    assert_type(create_user("ann"), User)
    assert_type(create_user("ann", admin=True), User)
    assert_type(create_user(session, "ann"), User)  # an explicit session, positionally
    assert_type(count_users(), int)
    assert_type(count_users(session), int)
    assert_type(create_user.__name__, str)  # what functools.wraps copied
    assert_type(create_user.__wrapped__, Callable[..., Any])
    assert_type(UserRepository.add.__qualname__, str)
    create_user(1, 2, 3, bogus=5)  # type: ignore[call-overload]
    create_user()  # type: ignore[call-overload]
    create_user("ann", admin="yes")  # type: ignore[call-overload]
    # A ParamSpec cannot add the keyword back: session= works at run time only.
    create_user(session=session, name="ann")  # type: ignore[call-overload]


def check_decorated_async_function(session: AsyncSession) -> None:
    _coroutine = assert_type(acreate_user("ann"), Coroutine[Any, Any, User])
    _coroutine = assert_type(acreate_user(session, "ann"), Coroutine[Any, Any, User])
    assert_type(asyncio.run(acreate_user("ann")), User)
    assert_type(asyncio.ensure_future(acount_users(limit=5)), asyncio.Task[int])
    _ = acreate_user(1)  # type: ignore[call-overload]
    _ = acount_users(Session())  # type: ignore[call-overload]


async def check_awaiting(session: AsyncSession) -> None:
    assert_type(await acreate_user("ann"), User)
    assert_type(await acount_users(session, 3), int)
    assert_type(asyncio.create_task(acount_users()), asyncio.Task[int])


def check_methods(repo: UserRepository, session: Session, asession: AsyncSession) -> None:
    unbound: SessionMethod[UserRepository, Session, [str], User] = UserRepository.add
    bound: SessionFunction[Session, [str], User] = repo.add
    assert_type(unbound(repo, "ann"), User)
    assert_type(bound("ann"), User)
    assert_type(repo.add("ann"), User)
    assert_type(repo.add(session, "ann"), User)
    assert_type(UserRepository.add(repo, "ann"), User)
    _coroutine = assert_type(repo.aadd("ann"), Coroutine[Any, Any, User])
    _coroutine = assert_type(repo.aadd(asession, "ann"), Coroutine[Any, Any, User])
    assert_type(UserRepository.count("a"), int)
    assert_type(repo.count("a"), int)
    assert_type(UserRepository.static_count(), int)
    repo.add(1)  # type: ignore[call-overload]
    repo.add(asession, "ann")  # type: ignore[call-overload]


@with_session
def session_second(user_id: int, session: Session) -> str:
    return ""


def check_session_second() -> None:
    # Any function whose session is its second parameter: typed like a method.
    assert_type(session_second(1), str)
    session_second("1")  # type: ignore[call-overload]


def check_decoration_is_checked() -> None:
    # The session parameter must accept what the decorator injects.
    @with_session  # type: ignore[type-var]
    def wants_async(session: AsyncSession) -> None: ...

    @async_with_session  # type: ignore[type-var]
    async def wants_sync(session: Session) -> None: ...

    # The async decorator needs an async def function (the sync one takes any).
    @async_with_session  # type: ignore[arg-type]
    def not_async(session: AsyncSession) -> None: ...

    # Options are checked by name and type.
    with_session(read_onyl=True)  # type: ignore[call-overload]
    with_session(propagation="sometimes")  # type: ignore[call-overload]
    async_with_session(timeout="5s")  # type: ignore[call-overload]


# -- 2. retry ------------------------------------------------------------------------


def transfer(amount: int, note: str = "") -> bool:
    return True


async def atransfer(amount: int) -> bool:
    return True


def check_retry() -> None:
    assert_type(with_retry(transfer, 5), bool)
    assert_type(with_retry(transfer, 5, note="x"), bool)
    assert_type(with_retry(transfer, 5, max_retries=2, retry_delay=0.5), bool)
    # With retry options the arguments are not checked: a closure keeps them checked.
    assert_type(with_retry(lambda: transfer(5, "x"), max_retries=2), bool)
    assert_type(with_retry(create_user, "ann"), User)
    with_retry(transfer, "five")  # type: ignore[call-overload]
    with_retry(transfer, 5, bogus=1)  # type: ignore[call-arg]
    with_retry(transfer, 5, max_retries="2")  # type: ignore[call-arg]


async def check_async_retry() -> None:
    assert_type(await async_with_retry(atransfer, 5), bool)
    assert_type(await async_with_retry(atransfer, 5, max_retries=1), bool)
    assert_type(await async_with_retry(acreate_user, "ann"), User)
    # An async def's call is a coroutine (pyright says CoroutineType, a subclass).
    _retrying: Coroutine[Any, Any, bool] = async_with_retry(atransfer, 5)
    _retrying.close()
    await async_with_retry(atransfer, "five")  # type: ignore[call-overload]
    await async_with_retry(transfer, 5)  # type: ignore[call-overload]


# -- 3. statistics -------------------------------------------------------------------


def check_stats(manager: SessionManager) -> None:
    stats = get_session_stats()
    assert_type(stats, SessionStats)
    assert_type(stats["success_rate"], float)
    assert_type(stats["session_count"], int)
    assert_type(stats["functions"], dict[str, FunctionStats])
    assert_type(stats["functions"]["app.create_user"]["avg_duration"], float)
    assert_type(stats["pool"], dict[str, PoolStats])
    assert_type(stats["pool"]["sync"]["pool_class"], str)
    assert_type(stats["pool"]["sync"].get("checked_out"), int | None)
    assert_type(stats.get("routing"), RoutingStats | None)
    assert_type(manager.get_stats(), SessionStats)
    assert_type(manager.pool_status(), dict[str, PoolStats])
    assert_type(manager.replica_health(), dict[str, bool])
    assert_type(manager.stats.snapshot()["failed_transactions"], int)
    stats["succes_rate"]  # type: ignore[typeddict-item]
    stats["success_rate"] = "high"  # type: ignore[typeddict-item]
    assert_type(reset_session_stats(), None)
    routing = stats.get("routing")
    if routing is not None:
        assert_type(routing["engines"]["primary"]["reads"], int)
        assert_type(routing["fallbacks"], int)


# -- 4. session classes flow into the types ------------------------------------------


sqlmodel_manager = SessionManager(
    "sqlite://", session_class=SQLModelSession, async_session_class=SQLModelAsyncSession
)
plain_manager = SessionManager("sqlite://")


# SQLModel's own exec() overloads resolve to Sequence[Unknown] under pyright (its
# first overload takes any Select): hence the pyright-only markers on those lines.


@sqlmodel_manager.with_session
def hero_names(session: SQLModelSession, prefix: str) -> list[str]:
    heroes: Sequence[Hero] = session.exec(sqlmodel_select(Hero)).all()  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
    return [h.name for h in heroes if h.name.startswith(prefix)]


@sqlmodel_manager.async_with_session(read_only=True)
async def ahero_count(session: SQLModelAsyncSession) -> int:
    heroes: Sequence[Hero] = (await session.exec(sqlmodel_select(Hero))).all()  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
    return len(heroes)


@sqlmodel_manager.with_session  # a function taking any Session fits too
def generic_count(session: Session) -> int:
    return 0


class HeroRepository:
    """A manager's decorators on methods, bare and called."""

    @sqlmodel_manager.with_session(read_only=True)
    def names(self, session: SQLModelSession) -> list[str]:
        return []

    @sqlmodel_manager.async_with_session
    async def acount(self, session: SQLModelAsyncSession, limit: int) -> int:
        return 0


def check_manager_methods(
    repo: HeroRepository, session: SQLModelSession, asession: SQLModelAsyncSession
) -> None:
    assert_type(repo.names(), list[str])
    assert_type(repo.names(session), list[str])
    assert_type(HeroRepository.names(repo), list[str])
    _coroutine = assert_type(repo.acount(5), Coroutine[Any, Any, int])
    _coroutine = assert_type(repo.acount(asession, 5), Coroutine[Any, Any, int])
    repo.names(Session())  # type: ignore[call-overload]
    _ = repo.acount("5")  # type: ignore[call-overload]


def check_session_classes() -> None:
    assert_type(sqlmodel_manager, SessionManager[SQLModelSession, SQLModelAsyncSession])
    assert_type(plain_manager, SessionManager[Session, AsyncSession])
    assert_type(SessionManager(session_class=SQLModelSession), SessionManager[SQLModelSession])
    with sqlmodel_manager.session_scope() as session:
        assert_type(session, SQLModelSession)
        heroes: Sequence[Hero] = session.exec(sqlmodel_select(Hero)).all()  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
        assert_type(heroes, Sequence[Hero])
    with plain_manager.session_scope(read_only=True) as plain:
        assert_type(plain, Session)
        plain.exec(sqlmodel_select(Hero))  # type: ignore[attr-defined]
    assert_type(hero_names("a"), list[str])
    _coroutine = assert_type(ahero_count(), Coroutine[Any, Any, int])
    assert_type(generic_count(), int)

    # A base-class manager's sessions are not SQLModel sessions.
    @plain_manager.with_session  # type: ignore[arg-type]
    def wants_sqlmodel(session: SQLModelSession) -> None: ...

    # A SessionManager[SQLModelSession] is a SessionManager.
    check_stats(sqlmodel_manager)


async def check_async_session_classes() -> None:
    async with sqlmodel_manager.async_session_scope() as session:
        assert_type(session, SQLModelAsyncSession)
        heroes: Sequence[Hero] = (await session.exec(sqlmodel_select(Hero))).all()  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
        assert_type(heroes, Sequence[Hero])
    async with plain_manager.async_session_scope(timeout=5) as plain:
        assert_type(plain, AsyncSession)


def check_manager_api(manager: SessionManager[SQLModelSession, SQLModelAsyncSession]) -> None:
    assert_type(manager.session_scope(), AbstractContextManager[SQLModelSession, None])
    assert_type(
        manager.async_session_scope(), AbstractAsyncContextManager[SQLModelAsyncSession, None]
    )
    assert_type(manager.with_retry(transfer, 1), bool)
    _retrying: Coroutine[Any, Any, bool] = manager.async_with_retry(atransfer, 1)
    _retrying.close()
    assert_type(manager.get_async_db, Callable[..., Awaitable[SQLModelAsyncSession]])
    assert_type(manager.get_db, Callable[..., Awaitable[SQLModelAsyncSession]])
    assert_type(manager.get_sync_db, Callable[..., Awaitable[SQLModelSession]])
    assert_type(manager.config, SessionConfig)
    assert_type(manager.configure(retry_attempts=2), SessionConfig)
    manager.configure(retry_attempts="2")  # type: ignore[arg-type]
    manager.session_scope(auto_comit=False)  # type: ignore[call-arg]
    manager.with_retry(transfer, "x")  # type: ignore[call-overload]


# -- the module-level API ------------------------------------------------------------


def check_module_api(exc: Exception) -> None:
    manager = setup_database_connection("sqlite://", session_class=SQLModelSession)
    assert_type(manager, SessionManager[SQLModelSession, AsyncSession])
    assert_type(setup_database_connection(), SessionManager[Session, AsyncSession])
    assert_type(get_default_manager(), SessionManager[Session, AsyncSession])
    assert_type(configure_session(retry_attempts=5, log_level="DEBUG"), SessionConfig)
    configure_session(retry_attempts=None)  # type: ignore[arg-type]
    configure_session(unknown=1)  # type: ignore[call-arg]
    with session_scope(propagation="nested") as session:
        assert_type(session, Session)
        assert_type(on_commit(lambda: None), None)
        assert_type(set_rollback(), None)
        assert_type(set_rollback(False), None)
    session_scope(propagation="sometimes")  # type: ignore[arg-type]
    assert_type(async_session_scope(), AbstractAsyncContextManager[AsyncSession, None])
    assert_type(is_transient(exc), bool)
    assert_type(error_code(exc), str | None)
    assert_type(sessionscope.get_db, Callable[..., Awaitable[AsyncSession]])


def check_errors() -> tuple[type[SessionScopeError], ...]:
    # The declared type is the check: every one is a SessionScopeError.
    errors: tuple[type[SessionScopeError], ...] = (
        ActiveScopeError,
        CommitOutcomeUnknownError,
        NoActiveScopeError,
        NodeUnavailableError,
        PoolExhaustedError,
        ReadOnlyError,
        RollbackOnlyError,
        SessionFactoryNotInitializedError,
    )
    return errors


# -- FastAPI -------------------------------------------------------------------------


def check_fastapi() -> None:
    assert_type(get_async_db, Callable[..., Awaitable[AsyncSession]])
    assert_type(get_db, Callable[..., Awaitable[AsyncSession]])
    assert_type(get_sync_db, Callable[..., Awaitable[Session]])
    assert_type(async_session_dependency(), Callable[..., Awaitable[AsyncSession]])
    assert_type(session_dependency(read_only=True), Callable[..., Awaitable[AsyncSession]])
    assert_type(sync_session_dependency(), Callable[..., Awaitable[Session]])
    # Typed by the manager.
    assert_type(
        async_session_dependency(sqlmodel_manager),
        Callable[..., Awaitable[SQLModelAsyncSession]],
    )
    assert_type(
        sync_session_dependency(sqlmodel_manager), Callable[..., Awaitable[SQLModelSession]]
    )
    sync_session_dependency(sqlmodel_manager, propagation="maybe")  # type: ignore[arg-type]
    session_dependency("sqlite://")  # type: ignore[arg-type]


HeroSessionDep = Annotated[SQLModelSession, Depends(sqlmodel_manager.get_sync_db)]


async def read_users(db: AsyncSessionDep, legacy: SessionDep) -> None:
    assert_type(db, AsyncSession)
    assert_type(legacy, AsyncSession)


def read_heroes(db: SyncSessionDep, heroes: HeroSessionDep) -> None:
    assert_type(db, Session)
    found: Sequence[Hero] = heroes.exec(sqlmodel_select(Hero)).all()  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
    assert_type(found, Sequence[Hero])
