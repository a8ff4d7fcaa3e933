"""The test application on Starlette: async routes under /a, sync under /s, each
mount with its own SessionScopeMiddleware."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route, Router

import sessionscope
from sessionscope.starlette import SessionScopeMiddleware, get_session, get_sync_session

from ..models import User
from ..web import FLUSHED, RELEASE
from . import INSERT_CODE, add_user, add_user_sync, which, which_sync


async def create_user(request: Request) -> JSONResponse:
    get_session(request).add(User(name=request.path_params["name"]))
    return JSONResponse({}, status_code=201)


async def reject(request: Request) -> JSONResponse:
    db = get_session(request)
    db.add(User(name=request.path_params["name"]))
    await db.flush()
    raise HTTPException(409, "refused")


async def crash(request: Request) -> JSONResponse:
    db = get_session(request)
    db.add(User(name=request.path_params["name"]))
    await db.flush()
    raise RuntimeError("boom")


async def join(request: Request) -> JSONResponse:
    await add_user(request.path_params["name"])
    return JSONResponse({"same": await which() is get_session(request)}, status_code=201)


async def code(request: Request) -> JSONResponse:
    await get_session(request).execute(INSERT_CODE, {"code": request.path_params["code"]})
    return JSONResponse({}, status_code=201)


async def hold(request: Request) -> JSONResponse:
    db = get_session(request)
    db.add(User(name=request.path_params["name"]))
    await db.flush()
    FLUSHED.set()
    await anyio.to_thread.run_sync(RELEASE.wait, 60, abandon_on_cancel=True)
    return JSONResponse({}, status_code=201)


def create_user_sync(request: Request) -> JSONResponse:
    get_sync_session(request).add(User(name=request.path_params["name"]))
    return JSONResponse({}, status_code=201)


def reject_sync(request: Request) -> JSONResponse:
    db = get_sync_session(request)
    db.add(User(name=request.path_params["name"]))
    db.flush()
    raise HTTPException(409, "refused")


def crash_sync(request: Request) -> JSONResponse:
    db = get_sync_session(request)
    db.add(User(name=request.path_params["name"]))
    db.flush()
    raise RuntimeError("boom")


def join_sync(request: Request) -> JSONResponse:
    add_user_sync(request.path_params["name"])
    return JSONResponse({"same": which_sync() is get_sync_session(request)}, status_code=201)


def code_sync(request: Request) -> JSONResponse:
    get_sync_session(request).execute(INSERT_CODE, {"code": request.path_params["code"]})
    return JSONResponse({}, status_code=201)


def hold_sync(request: Request) -> JSONResponse:
    db = get_sync_session(request)
    db.add(User(name=request.path_params["name"]))
    db.flush()
    RELEASE.wait(60)
    return JSONResponse({}, status_code=201)


def routes(*handlers: object) -> list[Route]:
    paths = ["/users/{name}", "/reject/{name}", "/crash/{name}", "/join/{name}",
             "/codes/{code}", "/hold/{name}"]
    return [Route(p, h, methods=["POST"]) for p, h in zip(paths, handlers, strict=True)]


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    yield
    await sessionscope.get_default_manager().adispose()


def create() -> Starlette:
    async_app = Router(routes(create_user, reject, crash, join, code, hold))
    sync_app = Router(
        routes(create_user_sync, reject_sync, crash_sync, join_sync, code_sync, hold_sync)
    )
    return Starlette(
        routes=[
            Mount("/a", app=SessionScopeMiddleware(async_app)),
            Mount("/s", app=SessionScopeMiddleware(sync_app, sync=True)),
        ],
        lifespan=lifespan,
    )
