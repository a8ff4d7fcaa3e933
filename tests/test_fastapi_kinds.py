"""The FastAPI dependencies say which kind of session they give, and a path
function that takes the wrong kind fails its request with a message naming the
right dependency, before any session is opened.

No ``from __future__ import annotations``: FastAPI resolves the annotations of
the path functions defined inside the tests.
"""

from collections.abc import AsyncIterator
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from sessionscope import SessionManager
from sessionscope.fastapi import (
    AsyncSessionDep,
    SessionDep,
    async_session_dependency,
    get_async_db,
    get_db,
    get_sync_db,
    session_dependency,
    sync_session_dependency,
)


@pytest.fixture
async def web(manager: SessionManager) -> AsyncIterator[SessionManager]:
    yield manager
    await manager.adispose()


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def test_old_names_are_the_same_objects_as_the_new_ones(manager: SessionManager) -> None:
    assert get_db is get_async_db
    assert SessionDep is AsyncSessionDep
    assert session_dependency is async_session_dependency
    assert manager.get_db is manager.get_async_db
    assert manager.get_sync_db is not manager.get_async_db
    assert get_sync_db is not get_async_db


async def test_def_path_function_given_the_async_dependency_fails_clearly(
    web: SessionManager,
) -> None:
    app = FastAPI()

    @app.get("/")
    def view(db: Session = Depends(web.get_db)) -> int:  # noqa: B008 - the seed's spelling
        return int(db.scalar(select(1)) or 0)

    async with client(app) as c:
        with pytest.raises(TypeError) as caught:
            await c.get("/")
    message = str(caught.value)
    assert "parameter 'db' of the path function" in message and "view" in message
    assert "annotated Session" in message and "get_sync_db" in message
    assert web.get_stats()["session_count"] == 0  # refused before opening anything


async def test_def_path_function_with_async_annotation_fails_clearly(web: SessionManager) -> None:
    app = FastAPI()
    dependency = async_session_dependency(web)

    @app.get("/")
    def view(db: Annotated[AsyncSession, Depends(dependency)]) -> None:
        return None

    async with client(app) as c:
        with pytest.raises(TypeError, match=r"def \(sync\) path function.*get_sync_db"):
            await c.get("/")
    assert web.get_stats()["session_count"] == 0


async def test_async_path_function_annotated_session_on_async_dependency_fails(
    web: SessionManager,
) -> None:
    app = FastAPI()

    @app.get("/")
    async def view(db: Annotated[Session, Depends(web.get_async_db)]) -> None:
        return None

    async with client(app) as c:
        with pytest.raises(TypeError, match="annotated Session, a sync session"):
            await c.get("/")


async def test_sync_dependency_given_to_an_async_session_parameter_fails(
    web: SessionManager,
) -> None:
    app = FastAPI()

    @app.get("/")
    async def view(db: Annotated[AsyncSession, Depends(web.get_sync_db)]) -> None:
        return None

    async with client(app) as c:
        with pytest.raises(TypeError, match=r"annotated AsyncSession.*get_async_db"):
            await c.get("/")
    assert web.get_stats()["session_count"] == 0


async def test_right_kinds_and_sub_dependencies_are_not_refused(web: SessionManager) -> None:
    """Only a path function's own parameters are judged: an async sub-dependency
    may take the async session even when the path function is a ``def``."""
    app = FastAPI()
    async_dep = async_session_dependency(web)
    sync_dep = sync_session_dependency(web)

    async def token(db: Annotated[AsyncSession, Depends(async_dep)]) -> int:
        return int(await db.scalar(select(1)) or 0)

    @app.get("/def")
    def sync_view(
        db: Annotated[Session, Depends(sync_dep)], t: Annotated[int, Depends(token)]
    ) -> int:
        return int(db.scalar(select(2)) or 0) + t

    @app.get("/async")
    async def async_view(db: Annotated[AsyncSession, Depends(async_dep)]) -> int:
        return int(await db.scalar(select(3)) or 0)

    @app.get("/unannotated")
    async def unannotated(db=Depends(async_dep)) -> int:  # type: ignore[no-untyped-def]  # noqa: B008
        return int(await db.scalar(select(4)) or 0)

    async with client(app) as c:
        assert (await c.get("/def")).json() == 3
        assert (await c.get("/async")).json() == 3
        assert (await c.get("/unannotated")).json() == 4
        assert (await c.get("/def")).json() == 3  # the verdict is cached per path function

