"""Models used by the seed examples.

Ids are generated in Python when the object is built (``default_factory``), so
``user.id`` is usable before the first flush, as the seed's nested-transaction
example (``create_user_profile(session, user.id)``) expects.
"""

from __future__ import annotations

import uuid

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import DeclarativeBase, Mapped, MappedAsDataclass, mapped_column


def _new_id() -> str:
    return uuid.uuid4().hex


class Base(MappedAsDataclass, DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "example_users"

    name: Mapped[str] = mapped_column(String(100))
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default_factory=_new_id)


class UserProfile(Base):
    __tablename__ = "example_profiles"

    user_id: Mapped[str] = mapped_column(ForeignKey("example_users.id"))
    bio: Mapped[str] = mapped_column(String(200))
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default_factory=_new_id)
