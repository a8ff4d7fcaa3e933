"""The test application on Litestar: async handlers under /a, sync handlers
(``sync_to_thread=True``) under /s."""

from __future__ import annotations

import anyio.to_thread
from litestar import Litestar, post
from litestar.exceptions import HTTPException
from litestar.params import FromPath

import sessionscope
from sessionscope.litestar import SessionDep, SessionScopePlugin, SyncSessionDep

from ..models import User
from ..web import FLUSHED, RELEASE
from . import INSERT_CODE, add_user, add_user_sync, which, which_sync


@post("/a/users/{name:str}", status_code=201)
async def create_user(name: FromPath[str], db_session: SessionDep) -> dict[str, bool]:
    db_session.add(User(name=name))
    return {}


@post("/a/reject/{name:str}")
async def reject(name: FromPath[str], db_session: SessionDep) -> None:
    db_session.add(User(name=name))
    await db_session.flush()
    raise HTTPException(status_code=409, detail="refused")


@post("/a/crash/{name:str}")
async def crash(name: FromPath[str], db_session: SessionDep) -> None:
    db_session.add(User(name=name))
    await db_session.flush()
    raise RuntimeError("boom")


@post("/a/join/{name:str}", status_code=201)
async def join(name: FromPath[str], db_session: SessionDep) -> dict[str, bool]:
    await add_user(name)
    return {"same": await which() is db_session}


@post("/a/codes/{code:str}", status_code=201)
async def code(code: FromPath[str], db_session: SessionDep) -> None:
    await db_session.execute(INSERT_CODE, {"code": code})


@post("/a/hold/{name:str}", status_code=201)
async def hold(name: FromPath[str], db_session: SessionDep) -> None:
    db_session.add(User(name=name))
    await db_session.flush()
    FLUSHED.set()
    await anyio.to_thread.run_sync(RELEASE.wait, 60, abandon_on_cancel=True)


@post("/s/users/{name:str}", status_code=201, sync_to_thread=True)
def create_user_sync(name: FromPath[str], db_sync_session: SyncSessionDep) -> None:
    db_sync_session.add(User(name=name))


@post("/s/reject/{name:str}", sync_to_thread=True)
def reject_sync(name: FromPath[str], db_sync_session: SyncSessionDep) -> None:
    db_sync_session.add(User(name=name))
    db_sync_session.flush()
    raise HTTPException(status_code=409, detail="refused")


@post("/s/crash/{name:str}", sync_to_thread=True)
def crash_sync(name: FromPath[str], db_sync_session: SyncSessionDep) -> None:
    db_sync_session.add(User(name=name))
    db_sync_session.flush()
    raise RuntimeError("boom")


@post("/s/join/{name:str}", status_code=201, sync_to_thread=True)
def join_sync(name: FromPath[str], db_sync_session: SyncSessionDep) -> dict[str, bool]:
    add_user_sync(name)
    return {"same": which_sync() is db_sync_session}


@post("/s/codes/{code:str}", status_code=201, sync_to_thread=True)
def code_sync(code: FromPath[str], db_sync_session: SyncSessionDep) -> None:
    db_sync_session.execute(INSERT_CODE, {"code": code})


@post("/s/hold/{name:str}", status_code=201, sync_to_thread=True)
def hold_sync(name: FromPath[str], db_sync_session: SyncSessionDep) -> None:
    db_sync_session.add(User(name=name))
    db_sync_session.flush()
    RELEASE.wait(60)


async def dispose() -> None:
    await sessionscope.get_default_manager().adispose()


def create() -> Litestar:
    handlers = [create_user, reject, crash, join, code, hold]
    handlers += [create_user_sync, reject_sync, crash_sync, join_sync, code_sync, hold_sync]
    return Litestar(
        handlers, plugins=[SessionScopePlugin()], on_shutdown=[dispose], logging_config=None
    )
