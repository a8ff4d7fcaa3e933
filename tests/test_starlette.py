"""sessionscope.starlette: the request contract (tests/web.py) through Starlette's
TestClient and through uvicorn over HTTP, on every backend."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from sessionscope import SessionManager
from sessionscope.starlette import SessionScopeMiddleware, get_session, get_sync_session

from .web import (
    ASGIHarness,
    CommitTimeContract,
    DisconnectContract,
    HttpxClient,
    RequestContract,
    asgi_cancellation_case,
)
from .webapps import starlette_app


class StarletteApp:
    framework = "starlette"

    @pytest.fixture(params=["a", "s"])
    def kind(self, request: pytest.FixtureRequest) -> str:
        return str(request.param)

    @contextmanager
    def open_client(self) -> Iterator[HttpxClient]:
        app = ASGIHarness(starlette_app.create())
        with TestClient(app, raise_server_exceptions=False) as client:
            yield HttpxClient(client)


class TestStarletteRequests(StarletteApp, RequestContract):
    pass


class TestStarletteCommitTime(StarletteApp, CommitTimeContract):
    pass


class TestStarletteDisconnect(StarletteApp, DisconnectContract):
    pass


def test_cancelled_request_rolls_back_and_returns_its_connection(
    manager: SessionManager,
) -> None:
    asgi_cancellation_case(starlette_app.create(), manager)


def test_app_level_middleware_and_error_handlers(manager: SessionManager) -> None:
    """Added the usual way (app-level ``middleware=``), the failed COMMIT reaches
    the application's 500 handler."""

    async def create(request: Request) -> JSONResponse:
        get_session(request).add(starlette_app.User(name="ann"))
        return JSONResponse({}, status_code=201)

    async def on_500(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": type(exc).__name__}, status_code=503)

    app = Starlette(
        routes=[Route("/", create, methods=["POST"])],
        middleware=[Middleware(SessionScopeMiddleware)],
        exception_handlers={500: on_500},
        lifespan=starlette_app.lifespan,
    )
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.post("/").status_code == 201
        reply = client.post("/")
    assert (reply.status_code, reply.json()) == (503, {"error": "IntegrityError"})
    assert manager.get_stats()["failed_transactions"] == 1


def test_accessors_explain_a_missing_middleware() -> None:
    async def view(request: Request) -> JSONResponse:
        get_session(request)
        return JSONResponse({})

    def sync_view(request: Request) -> JSONResponse:
        get_sync_session(request)
        return JSONResponse({})

    app = Starlette(routes=[Route("/", view), Route("/sync", sync_view)])
    with TestClient(app) as client:
        with pytest.raises(RuntimeError, match="SessionScopeMiddleware"):
            client.get("/")
        with pytest.raises(RuntimeError, match="sync=True"):
            client.get("/sync")


def test_options_are_checked_when_built() -> None:
    app: Any = None
    with pytest.raises(ValueError, match="propagation"):
        SessionScopeMiddleware(app, propagation="sometimes")
    with pytest.raises(TypeError, match="SessionManager"):
        SessionScopeMiddleware(app, "sqlite://")  # type: ignore[arg-type]


def test_package_root_does_not_import_starlette() -> None:
    code = "import sys, sessionscope; print('starlette' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False"]


@pytest.mark.parametrize(
    ("module", "framework"),
    [("fastapi", "fastapi"), ("starlette", "starlette"), ("flask", "flask"),
     ("litestar", "litestar")],
)
def test_a_missing_framework_names_the_extra(module: str, framework: str) -> None:
    code = (
        f"import sys; sys.modules[{framework!r}] = None\n"
        f"try:\n    import sessionscope.{module}\n"
        "except ImportError as err:\n    print(err)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert f"pip install 'sessionscope[{framework}]'" in out.stdout
