"""sessionscope.flask: the request contract (tests/web.py) through Flask's test
client and through waitress over HTTP, on every backend."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from flask import Flask
from sqlalchemy.exc import IntegrityError
from werkzeug.exceptions import InternalServerError

from sessionscope import SessionManager, with_session
from sessionscope.flask import SessionScope

from .models import User
from .web import (
    CommitTimeContract,
    DisconnectContract,
    Reply,
    RequestContract,
    WSGIHarness,
    count_users,
)
from .webapps import flask_app


class FlaskClient:
    """Flask's test client, a new one per call (the 200-thread test shares this)."""

    def __init__(self, app: Flask) -> None:
        self.app = app

    def post(self, path: str, json: Any = None, headers: dict[str, str] | None = None) -> Reply:
        return self._reply(self.app.test_client().post(path, json=json, headers=headers or {}))

    def get(self, path: str) -> Reply:
        return self._reply(self.app.test_client().get(path))

    @staticmethod
    def _reply(response: Any) -> Reply:
        body = response.get_json(silent=True)
        return Reply(response.status_code, dict(response.headers), body)


class FlaskApp:
    framework = "flask"

    @pytest.fixture
    def kind(self) -> str:
        return "s"

    @contextmanager
    def open_client(self) -> Iterator[FlaskClient]:
        app = flask_app.create()
        app.wsgi_app = WSGIHarness(app.wsgi_app)  # type: ignore[method-assign]
        yield FlaskClient(app)


class TestFlaskRequests(FlaskApp, RequestContract):
    pass


class TestFlaskCommitTime(FlaskApp, CommitTimeContract):
    pass


class TestFlaskDisconnect(FlaskApp, DisconnectContract):
    pass


def test_failed_commit_reaches_the_500_handler(manager: SessionManager) -> None:
    """Flask hands an error raised after the view (here by COMMIT, in
    after_request) to the 500 handler, with the error as ``original_exception``."""
    app = Flask(__name__)
    db = SessionScope(app)

    @app.errorhandler(500)
    def conflict(exc: InternalServerError) -> Any:
        if isinstance(exc.original_exception, IntegrityError):
            return {"detail": "already exists"}, 409
        return {}, 500

    @app.post("/")
    def create() -> Any:
        db.session.add(User(name="ann"))
        return {}, 201

    client = app.test_client()
    assert client.post("/").status_code == 201
    reply = client.post("/")
    assert (reply.status_code, reply.get_json()) == (409, {"detail": "already exists"})
    assert count_users(manager) == 1
    stats = manager.get_stats()
    assert (stats["committed_transactions"], stats["failed_transactions"]) == (1, 1)
    assert stats["active_sessions"] == 0


def test_propagated_exceptions_still_end_the_scope(manager: SessionManager) -> None:
    """In testing mode Flask re-raises instead of answering 500, and skips
    after_request: teardown_request ends the scope with a ROLLBACK."""
    app = Flask(__name__)
    app.testing = True
    db = SessionScope(app)

    @app.post("/")
    def crash() -> Any:
        db.session.add(User(name="ann"))
        db.session.flush()
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        app.test_client().post("/")
    assert count_users(manager) == 0
    stats = manager.get_stats()
    assert (stats["failed_transactions"], stats["active_sessions"]) == (1, 0)


def test_app_context_session_commits_when_the_context_ends(manager: SessionManager) -> None:
    """A CLI command or a shell: no request, an application context."""
    app = Flask(__name__)
    db = SessionScope(app)

    @with_session
    def add(session: Any, name: str) -> None:
        session.add(User(name=name))

    with app.app_context():
        db.session.add(User(name="ann"))
        add("bob")  # joins the context's session
        assert count_users(manager) == 0
    assert count_users(manager) == 2
    with pytest.raises(ValueError), app.app_context():
        db.session.add(User(name="cid"))
        raise ValueError("abandon")
    assert count_users(manager) == 2
    with pytest.raises(RuntimeError, match="application context"):
        _ = db.session


def test_one_extension_two_apps_two_managers(manager: SessionManager, tmp_path: Any) -> None:
    other = SessionManager(f"sqlite:///{tmp_path / 'other.db'}")
    User.metadata.create_all(other.engine)
    db = SessionScope()
    first, second = Flask("first"), Flask("second")
    db.init_app(first)
    db.init_app(second, other)
    for app in (first, second):

        @app.post("/<name>")
        def create(name: str) -> Any:
            db.session.add(User(name=name))
            return {}, 201

    try:
        assert first.test_client().post("/ann").status_code == 201
        assert second.test_client().post("/bob").status_code == 201
        assert (count_users(manager, "ann"), count_users(other, "bob")) == (1, 1)
        assert count_users(manager) == count_users(other) == 1
    finally:
        other.dispose()


def test_options_are_checked_when_built() -> None:
    with pytest.raises(ValueError, match="propagation"):
        SessionScope(propagation="sometimes")
    with pytest.raises(TypeError, match="SessionManager"):
        SessionScope(manager="sqlite://")  # type: ignore[arg-type]


def test_package_root_does_not_import_flask() -> None:
    code = "import sys, sessionscope; print('flask' in sys.modules, 'werkzeug' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_threads_started_with_the_view_context_join_the_request(
    manager: SessionManager,
) -> None:
    """A view hands work to a thread with a copy of its context: that code is
    identified by the request, not by the thread, and joins its session."""
    import contextvars
    import threading
    from concurrent.futures import ThreadPoolExecutor

    app = Flask(__name__)
    db = SessionScope(app)
    threads: set[int] = set()

    @with_session
    def add(session: Any, name: str) -> Any:
        threads.add(threading.get_ident())
        session.add(User(name=name))
        return session

    @app.post("/<name>")
    def create(name: str) -> Any:
        with ThreadPoolExecutor(1) as pool:
            used = pool.submit(contextvars.copy_context().run, add, name).result()
        return {"same": used is db.session}, 201

    reply = app.test_client().post("/ann")
    assert (reply.status_code, reply.get_json()) == (201, {"same": True})
    assert threading.get_ident() not in threads
    assert count_users(manager, "ann") == 1
    assert manager.get_stats()["session_count"] == 1
