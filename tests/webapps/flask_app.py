"""The test application on Flask: sync views under /s."""

from __future__ import annotations

from typing import Any

from flask import Flask, abort

from sessionscope.flask import SessionScope

from ..models import User
from ..web import RELEASE
from . import INSERT_CODE, add_user_sync, which_sync

db = SessionScope()


def create() -> Flask:
    app = Flask(__name__)
    db.init_app(app)

    @app.post("/s/users/<name>")
    def create_user(name: str) -> Any:
        db.session.add(User(name=name))
        return {}, 201

    @app.post("/s/reject/<name>")
    def reject(name: str) -> Any:
        db.session.add(User(name=name))
        db.session.flush()
        abort(409)

    @app.post("/s/crash/<name>")
    def crash(name: str) -> Any:
        db.session.add(User(name=name))
        db.session.flush()
        raise RuntimeError("boom")

    @app.post("/s/join/<name>")
    def join(name: str) -> Any:
        add_user_sync(name)
        return {"same": which_sync() is db.session}, 201

    @app.post("/s/codes/<code>")
    def code(code: str) -> Any:
        db.session.execute(INSERT_CODE, {"code": code})
        return {}, 201

    @app.post("/s/hold/<name>")
    def hold(name: str) -> Any:
        db.session.add(User(name=name))
        db.session.flush()
        RELEASE.wait(60)
        return {}, 201

    return app
