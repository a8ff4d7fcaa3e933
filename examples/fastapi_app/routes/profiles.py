"""Profile routes."""

from fastapi import APIRouter

import services
from models import UserProfile
from schemas import ProfileCreate, ProfileOut

router = APIRouter(prefix="/users/{user_id}/profile", tags=["profiles"])


@router.post("", status_code=201, response_model=ProfileOut)
async def create_profile(user_id: int, data: ProfileCreate) -> UserProfile:
    return await services.create_user_profile(user_id, data.bio)


@router.get("", response_model=ProfileOut)
async def get_profile(user_id: int) -> UserProfile:
    return await services.get_profile(user_id)
