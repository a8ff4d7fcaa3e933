"""sessionscope.litestar: the request contract (tests/web.py) through Litestar's
TestClient and through uvicorn over HTTP, on every backend."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from litestar import Litestar, Request, Response, get, post
from litestar.testing import TestClient
from sqlalchemy.exc import IntegrityError

from sessionscope import SessionManager
from sessionscope.litestar import SessionDep, SessionScopePlugin, SyncSessionDep

from .models import User
from .web import (
    ASGIHarness,
    CommitTimeContract,
    DisconnectContract,
    HttpxClient,
    RequestContract,
    asgi_cancellation_case,
    count_users,
)
from .webapps import litestar_app


class LitestarApp:
    framework = "litestar"

    @pytest.fixture(params=["a", "s"])
    def kind(self, request: pytest.FixtureRequest) -> str:
        return str(request.param)

    @contextmanager
    def open_client(self) -> Iterator[HttpxClient]:
        app: Any = ASGIHarness(litestar_app.create())
        with TestClient(app, raise_server_exceptions=False) as client:
            yield HttpxClient(client)


class TestLitestarRequests(LitestarApp, RequestContract):
    pass


class TestLitestarCommitTime(LitestarApp, CommitTimeContract):
    pass


class TestLitestarDisconnect(LitestarApp, DisconnectContract):
    pass


def test_cancelled_request_rolls_back_and_returns_its_connection(
    manager: SessionManager,
) -> None:
    asgi_cancellation_case(litestar_app.create(), manager)


def test_failed_commit_reaches_the_app_exception_handlers(manager: SessionManager) -> None:
    """The COMMIT error is handled like an error the handler raised: an
    IntegrityError handler answers 409."""

    def conflict(request: Request[Any, Any, Any], exc: IntegrityError) -> Response[Any]:
        return Response({"detail": "already exists"}, status_code=409)

    @post("/", status_code=201)
    async def create(db_session: SessionDep) -> None:
        db_session.add(User(name="ann"))

    app = Litestar(
        [create],
        plugins=[SessionScopePlugin()],
        exception_handlers={IntegrityError: conflict},
        on_shutdown=[litestar_app.dispose],
        logging_config=None,
    )
    with TestClient(app) as client:
        assert client.post("/").status_code == 201
        reply = client.post("/")
    assert (reply.status_code, reply.json()) == (409, {"detail": "already exists"})
    assert count_users(manager) == 1
    stats = manager.get_stats()
    assert (stats["committed_transactions"], stats["failed_transactions"]) == (1, 1)
    assert stats["active_sessions"] == 0


def test_the_wrong_kind_of_session_is_explained(manager: SessionManager) -> None:
    @get("/async-wants-sync")
    async def wrong(db_sync_session: SyncSessionDep) -> None:
        pass

    app = Litestar([wrong], plugins=[SessionScopePlugin()], on_shutdown=[litestar_app.dispose])
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get("/async-wants-sync").status_code == 500
    assert manager.get_stats()["active_sessions"] == 0


def test_options_are_checked_when_built() -> None:
    with pytest.raises(ValueError, match="propagation"):
        SessionScopePlugin(propagation="sometimes")
    with pytest.raises(TypeError, match="SessionManager"):
        SessionScopePlugin("sqlite://")  # type: ignore[arg-type]


def test_package_root_does_not_import_litestar() -> None:
    code = "import sys, sessionscope; print('litestar' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False"]
