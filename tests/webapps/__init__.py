"""One small application per framework, with the same routes, for tests/web.py.

Routes, under ``/a`` (async handlers) and ``/s`` (sync handlers):

- ``POST /users/{name}``: adds a user without flushing (the INSERT is sent at the
  scope's end, so a duplicate fails there, after the handler returned 201);
- ``POST /reject/{name}``: adds and flushes a user, then raises the framework's
  HTTP exception with status 409;
- ``POST /crash/{name}``: adds and flushes a user, then raises RuntimeError;
- ``POST /join/{name}``: decorated services add the user and report whether
  they saw the request's session: ``{"same": true}``, 201;
- ``POST /codes/{code}``: inserts into the PostgreSQL table with a deferred
  unique constraint (checked by COMMIT);
- ``POST /hold/{name}``: adds and flushes a user, then waits for ``/_release``.
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from sessionscope import async_with_session, with_session

from ..models import User

INSERT_CODE = text("INSERT INTO ss_web_codes (code) VALUES (:code)")


@async_with_session
async def add_user(session: AsyncSession, name: str) -> User:
    session.add(user := User(name=name))
    await session.flush()
    return user


@async_with_session
async def which(session: AsyncSession) -> AsyncSession:
    return session


@with_session
def add_user_sync(session: Session, name: str) -> User:
    session.add(user := User(name=name))
    session.flush()
    return user


@with_session
def which_sync(session: Session) -> Session:
    return session
