"""The workload behind ``sessionscope demo``: a small user/profile service run
through every kind of scope, printing what happens at each step."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from sqlalchemy import ForeignKey, String, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from ._errors import RollbackOnlyError
from ._manager import SessionManager

__all__ = ["run_demo"]


class _Base(DeclarativeBase):
    pass


class DemoUser(_Base):
    __tablename__ = "sessionscope_demo_users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)


class DemoProfile(_Base):
    __tablename__ = "sessionscope_demo_profiles"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("sessionscope_demo_users.id"))
    bio: Mapped[str] = mapped_column(String(200))


def run_demo(manager: SessionManager, say: Callable[[str], None] = print) -> dict[str, int]:
    """Run the demo workload on ``manager``; return the final row counts.

    Drops and recreates only the demo's own two tables.
    """
    _Base.metadata.drop_all(manager.engine)
    _Base.metadata.create_all(manager.engine)

    @manager.with_session
    def create_user(session: Session, name: str) -> DemoUser:
        user = DemoUser(name=name)
        session.add(user)
        session.flush()  # assigns user.id
        return user

    @manager.with_session
    def add_profile(session: Session, user_id: int, bio: str) -> None:
        session.add(DemoProfile(user_id=user_id, bio=bio))

    say("1. sync scope: two users and their profiles in one transaction")
    with manager.session_scope() as session:
        for name in ("alice", "bob"):
            user = create_user(session, name)  # joins the scope: no second session
            add_profile(user.id, f"{name} writes SQL")  # injected: joins too
    say("   committed once on exit")

    say("2. decorator on its own: returned objects stay usable after the scope")
    carol = create_user("carol")
    say(f"   created {carol.name!r} with id {carol.id}")

    say("3. nested savepoint fails, the outer transaction carries on")
    with manager.session_scope() as session:
        create_user(session, "dave")
        try:
            with manager.session_scope(propagation="nested"):
                create_user("alice")  # duplicate name: IntegrityError
        except IntegrityError:
            say("   duplicate 'alice' rolled back to the savepoint")
        create_user(session, "erin")
    say("   dave and erin committed")

    say("4. an error in a joined step dooms the whole transaction")
    try:
        with manager.session_scope():
            create_user("frank")
            try:
                with manager.session_scope():
                    raise ValueError("payment declined")
            except ValueError:
                pass  # swallowed, but the transaction is already spoiled
    except RollbackOnlyError:
        say("   RollbackOnlyError: frank was rolled back, not half-committed")

    say("5. async scope and decorator")

    @manager.async_with_session
    async def count_users(session: AsyncSession) -> int:
        return int(await session.scalar(select(func.count()).select_from(DemoUser)) or 0)

    async def async_part() -> int:
        try:
            async with manager.async_session_scope() as session:
                session.add(DemoUser(name="grace"))
            return await count_users()
        finally:
            await manager.adispose()

    users = asyncio.run(async_part())
    say(f"   {users} users now")

    with manager.session_scope(read_only=True) as session:
        profiles = int(session.scalar(select(func.count()).select_from(DemoProfile)) or 0)
    return {"users": users, "profiles": profiles}
