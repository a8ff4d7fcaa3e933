"""Request and response bodies."""

from pydantic import BaseModel, ConfigDict, Field


class UserCreate(BaseModel):
    name: str = Field(min_length=1, max_length=50)
    email: str | None = Field(default=None, max_length=120)


class UserOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    email: str | None


class ProfileCreate(BaseModel):
    bio: str = Field(max_length=200)


class ProfileOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    user_id: int
    bio: str


class Registration(BaseModel):
    """A user and their profile, created together or not at all."""

    name: str = Field(min_length=1, max_length=50)
    email: str | None = Field(default=None, max_length=120)
    bio: str = Field(max_length=200)


class RegistrationOut(BaseModel):
    user: UserOut
    profile: ProfileOut
