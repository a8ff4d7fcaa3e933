"""Service functions: each runs in a session scope, or joins the caller's.

Called from a request that has a session (``db: SessionDep``), they join its
transaction; called on their own (a script, a worker), each opens and commits
its own. Nothing here commits or rolls back by hand.
"""

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from db.session import async_with_session, with_session
from models import User, UserProfile


class NotFoundError(LookupError):
    """The requested row does not exist (the application answers 404)."""


class RejectedError(ValueError):
    """The input is well-formed but refused (the application answers 422)."""


@async_with_session
async def create_user(session: AsyncSession, name: str, email: str | None = None) -> User:
    session.add(user := User(name=name, email=email))
    await session.flush()  # assigns user.id; a duplicate name fails here
    return user


@async_with_session
async def get_user(session: AsyncSession, user_id: int) -> User:
    user = await session.get(User, user_id)
    if user is None:
        raise NotFoundError(f"user {user_id} does not exist")
    return user


@async_with_session
async def list_users(session: AsyncSession, limit: int = 100, offset: int = 0) -> list[User]:
    result = await session.scalars(select(User).order_by(User.id).limit(limit).offset(offset))
    return list(result)


@async_with_session
async def create_user_profile(session: AsyncSession, user_id: int, bio: str) -> UserProfile:
    await get_user(user_id)  # joins this session: 404 before any write
    if "spam" in bio.lower():
        raise RejectedError("the profile text was refused")
    session.add(profile := UserProfile(user_id=user_id, bio=bio))
    await session.flush()
    return profile


@async_with_session
async def get_profile(session: AsyncSession, user_id: int) -> UserProfile:
    profile = await session.scalar(select(UserProfile).where(UserProfile.user_id == user_id))
    if profile is None:
        raise NotFoundError(f"user {user_id} has no profile")
    return profile


@with_session
def count_users(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(User)) or 0
