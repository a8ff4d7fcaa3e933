"""User routes: the three ways to get a session in a path function."""

from typing import Annotated

from fastapi import APIRouter, Depends, Query
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

import services
from db.base import SessionDep, SyncSessionDep, get_db
from models import User
from schemas import Registration, RegistrationOut, UserCreate, UserOut

router = APIRouter(prefix="/users", tags=["users"])


@router.post("", status_code=201, response_model=UserOut)
async def create_user(data: UserCreate) -> User:
    """Decorator style: the service opens its own scope and commits before returning."""
    return await services.create_user(data.name, data.email)


@router.post("/legacy", status_code=201, response_model=UserOut)
async def create_user_legacy(
    data: UserCreate,
    db: AsyncSession = Depends(get_db),  # noqa: B008 - the seed's spelling, kept on purpose
) -> User:
    """The pre-sessionscope style still works: an explicit commit inside the request scope."""
    user = User(**data.model_dump())
    db.add(user)
    await db.commit()
    return user


@router.post("/register", status_code=201, response_model=RegistrationOut)
async def register(data: Registration, db: SessionDep) -> RegistrationOut:
    """Dependency style: both services join the request's transaction, so the
    user is kept only if the profile is accepted too."""
    user = await services.create_user(data.name, data.email)
    profile = await services.create_user_profile(user.id, data.bio)
    return RegistrationOut.model_validate({"user": user, "profile": profile}, from_attributes=True)


@router.get("", response_model=list[UserOut])
async def list_users(
    db: SessionDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> list[User]:
    """Query the request's session directly."""
    result = await db.scalars(select(User).order_by(User.id).limit(limit).offset(offset))
    return list(result)


@router.get("/count")
def count_users(db: SyncSessionDep) -> dict[str, int]:
    """A sync path function (run in a worker thread): the sync service joins the
    request's sync session."""
    return {"count": services.count_users()}


@router.get("/{user_id}", response_model=UserOut)
async def get_user(user_id: int) -> User:
    return await services.get_user(user_id)
