"""sessionscope.fastapi against real databases, through real ASGI requests (httpx).

Every test runs on SQLite, PostgreSQL and MariaDB (the ``manager`` fixture).
Requests go through ``httpx.ASGITransport``, the whole FastAPI stack included
(dependency resolution, exception handlers, ``ServerErrorMiddleware``).

Path functions and dependencies are defined inside the tests, so this module
keeps its annotations evaluated (no ``from __future__ import annotations``):
FastAPI resolves string annotations in module globals, where locals are absent.
"""

import asyncio
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

import sessionscope
from sessionscope import SessionManager, async_with_session, with_session
from sessionscope.fastapi import (
    SessionDep,
    SyncSessionDep,
    get_db,
    get_sync_db,
    session_dependency,
    sync_session_dependency,
)

from .conftest import StatementLog, require_server
from .models import User, UserProfile


class UserIn(BaseModel):
    name: str


@pytest.fixture
async def web(manager: SessionManager) -> AsyncIterator[SessionManager]:
    """The backend's default manager; its async engine is disposed in this loop."""
    yield manager
    await manager.adispose()


def client(app: Any, *, raise_app_exceptions: bool = True) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


async def count_users(manager: SessionManager, name: str | None = None) -> int:
    """Rows in ss_users, read on a connection of its own (sees committed data only)."""
    stmt = select(func.count()).select_from(User)
    if name is not None:
        stmt = stmt.where(User.name == name)
    async with manager.async_engine.connect() as conn:
        return int(await conn.scalar(stmt) or 0)


def checked_out(manager: SessionManager) -> int:
    return int(sum(side.get("checked_out", 0) for side in manager.pool_status().values()))


class ProbeOnResponseStart:
    """ASGI wrapper that runs ``probe`` at the moment the response starts being
    sent, before the client can see anything, and records its result."""

    def __init__(self, app: Any, probe: Callable[[], Awaitable[int]]) -> None:
        self.app = app
        self.probe = probe
        self.seen: list[int] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def send_wrapper(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                self.seen.append(await self.probe())
            await send(message)

        await self.app(scope, receive, send_wrapper)


# -- commit timing ---------------------------------------------------------------


async def test_commit_happens_before_the_response_is_sent(web: SessionManager) -> None:
    app = FastAPI()

    @app.post("/users", status_code=201)
    async def create(data: UserIn, db: SessionDep) -> dict[str, Any]:
        db.add(user := User(name=data.name))
        await db.flush()
        return {"id": user.id}

    probed = ProbeOnResponseStart(app, lambda: count_users(web, "ann"))
    async with client(probed) as c:
        response = await c.post("/users", json={"name": "ann"})
    assert response.status_code == 201
    assert probed.seen == [1]  # committed when the first byte went out
    assert checked_out(web) == 0


async def test_plain_depends_on_get_db_also_commits_first(web: SessionManager) -> None:
    """The seed's spelling, ``db: AsyncSession = Depends(get_db)``."""
    app = FastAPI()

    @app.post("/users", status_code=201)
    async def create(data: UserIn, db: AsyncSession = Depends(get_db)) -> dict[str, Any]:  # noqa: B008
        db.add(User(name=data.name))
        return {}

    probed = ProbeOnResponseStart(app, lambda: count_users(web, "ann"))
    async with client(probed) as c:
        assert (await c.post("/users", json={"name": "ann"})).status_code == 201
    assert probed.seen == [1]


async def test_why_a_plain_yield_dependency_is_not_enough(web: SessionManager) -> None:
    """What this module avoids: a plain ``yield`` dependency (FastAPI's default
    request scope) finishes after the response was sent, so its COMMIT comes too
    late for the status code. Guards the reason for the design, in this FastAPI."""
    app = FastAPI()

    async def naive_get_db() -> AsyncIterator[AsyncSession]:
        async with sessionscope.async_session_scope() as session:
            yield session

    @app.post("/users", status_code=201)
    async def create(
        data: UserIn, db: Annotated[AsyncSession, Depends(naive_get_db)]
    ) -> dict[str, Any]:
        db.add(User(name=data.name))
        return {}

    probed = ProbeOnResponseStart(app, lambda: count_users(web, "ann"))
    async with client(probed) as c:
        assert (await c.post("/users", json={"name": "ann"})).status_code == 201
    assert probed.seen == [0]  # the client had its 201 before the COMMIT
    assert await count_users(web, "ann") == 1


# -- failures --------------------------------------------------------------------


async def test_failed_commit_gives_500_never_2xx(web: SessionManager) -> None:
    """The INSERT reaches the server only at the scope's exit (flush before
    COMMIT), after the path function returned 201: the unique violation there
    must turn the response into a 500."""
    app = FastAPI()

    @app.post("/users", status_code=201)
    async def create(data: UserIn, db: SessionDep) -> dict[str, Any]:
        db.add(User(name=data.name))
        return {"ok": True}

    async with client(app, raise_app_exceptions=False) as c:
        assert (await c.post("/users", json={"name": "ann"})).status_code == 201
        response = await c.post("/users", json={"name": "ann"})
    assert response.status_code == 500
    assert await count_users(web) == 1
    stats = web.get_stats()
    assert stats["failed_transactions"] == 1
    assert stats["active_sessions"] == 0
    assert checked_out(web) == 0


async def test_failed_commit_reaches_the_app_exception_handlers(web: SessionManager) -> None:
    app = FastAPI()

    @app.exception_handler(IntegrityError)
    async def conflict(request: Any, exc: IntegrityError) -> JSONResponse:
        return JSONResponse({"detail": "already exists"}, status_code=409)

    @app.post("/users", status_code=201)
    async def create(data: UserIn, db: SessionDep) -> dict[str, Any]:
        db.add(User(name=data.name))
        return {}

    async with client(app) as c:
        assert (await c.post("/users", json={"name": "ann"})).status_code == 201
        response = await c.post("/users", json={"name": "ann"})
    assert response.status_code == 409
    assert response.json() == {"detail": "already exists"}


async def test_endpoint_errors_roll_back(web: SessionManager) -> None:
    app = FastAPI()

    @app.post("/users/{mode}")
    async def create(mode: str, data: UserIn, db: SessionDep) -> dict[str, Any]:
        db.add(User(name=data.name))
        await db.flush()  # the row reached the server inside the transaction
        if mode == "http":
            raise HTTPException(status_code=422, detail="refused")
        raise RuntimeError("boom")

    async with client(app, raise_app_exceptions=False) as c:
        assert (await c.post("/users/http", json={"name": "a"})).status_code == 422
        assert (await c.post("/users/crash", json={"name": "b"})).status_code == 500
    assert await count_users(web) == 0
    stats = web.get_stats()
    assert stats["rolled_back_transactions"] == 2
    # The 422 is an expected client error: rolled back, not a failure.
    assert stats["failed_transactions"] == 1
    assert checked_out(web) == 0


# -- joining -----------------------------------------------------------------------


async def test_decorated_service_joins_the_request_session(web: SessionManager) -> None:
    log = StatementLog()
    log.attach(web.async_engine.sync_engine)
    app = FastAPI()

    @async_with_session
    async def add_user(session: AsyncSession, name: str) -> User:
        session.add(user := User(name=name))
        await session.flush()
        return user

    @async_with_session
    async def add_profile(session: AsyncSession, user_id: int) -> AsyncSession:
        session.add(UserProfile(user_id=user_id, bio="hi"))
        return session

    @app.post("/users")
    async def create(data: UserIn, db: SessionDep) -> dict[str, Any]:
        user = await add_user(data.name)
        used = await add_profile(user.id)
        return {"same": used is db}

    async with client(app) as c:
        response = await c.post("/users", json={"name": "ann"})
    assert response.json() == {"same": True}
    assert log.statements.count("COMMIT") == 1  # one transaction for the request
    assert web.get_stats()["session_count"] == 1


async def test_swallowed_service_failure_does_not_commit_partial_work(
    web: SessionManager,
) -> None:
    """A joined service that raised marks the request's transaction rollback-only;
    a path function that swallows the error still gets a 500, not a partial commit."""
    app = FastAPI()

    @async_with_session
    async def failing(session: AsyncSession) -> None:
        session.add(User(name="half"))
        await session.flush()
        raise ValueError("half done")

    @app.post("/users")
    async def create(db: SessionDep) -> dict[str, Any]:
        try:
            await failing()
        except ValueError:
            pass
        return {"ok": True}

    async with client(app, raise_app_exceptions=False) as c:
        response = await c.post("/users")
    assert response.status_code == 500
    assert await count_users(web) == 0


async def test_tasks_started_by_a_request_do_not_share_its_session(web: SessionManager) -> None:
    app = FastAPI()

    @async_with_session
    async def which(session: AsyncSession) -> AsyncSession:
        return session

    @app.get("/")
    async def view(db: SessionDep) -> dict[str, Any]:
        here = await which()
        child = await asyncio.create_task(which())
        return {"here": here is db, "child": child is db}

    async with client(app) as c:
        assert (await c.get("/")).json() == {"here": True, "child": False}


# -- sync path functions -----------------------------------------------------------


async def test_sync_path_function_commits_before_the_response(web: SessionManager) -> None:
    app = FastAPI()

    @app.post("/users", status_code=201)
    def create(data: UserIn, db: SyncSessionDep) -> dict[str, Any]:
        db.add(user := User(name=data.name))
        db.flush()
        return {"id": user.id}

    probed = ProbeOnResponseStart(app, lambda: count_users(web, "ann"))
    async with client(probed, raise_app_exceptions=False) as c:
        assert (await c.post("/users", json={"name": "ann"})).status_code == 201
        assert probed.seen == [1]
        response = await c.post("/users", json={"name": "ann"})
    assert response.status_code == 500  # IntegrityError at flush, inside the endpoint
    assert checked_out(web) == 0


async def test_sync_failed_commit_gives_500(web: SessionManager) -> None:
    app = FastAPI()

    @app.post("/users", status_code=201)
    def create(data: UserIn, db: SyncSessionDep) -> dict[str, Any]:
        db.add(User(name=data.name))  # sent only at the scope's exit
        return {}

    async with client(app, raise_app_exceptions=False) as c:
        assert (await c.post("/users", json={"name": "ann"})).status_code == 201
        assert (await c.post("/users", json={"name": "ann"})).status_code == 500
    assert await count_users(web) == 1
    assert web.get_stats()["active_sessions"] == 0
    assert checked_out(web) == 0


async def test_sync_services_join_across_worker_threads(web: SessionManager) -> None:
    """FastAPI runs the dependency, a sync sub-dependency and the path function in
    pool threads, each with its own copy of the request's context; decorated
    functions in all of them join the one request session."""
    app = FastAPI()
    threads: set[int] = set()

    @with_session
    def which(session: Session) -> Session:
        threads.add(threading.get_ident())
        return session

    @with_session
    def add_user(session: Session, name: str) -> None:
        session.add(User(name=name))

    def current_user(db: SyncSessionDep) -> bool:
        return which() is db

    @app.post("/users")
    def create(
        data: UserIn, db: SyncSessionDep, dep_joined: Annotated[bool, Depends(current_user)]
    ) -> dict[str, Any]:
        add_user(data.name)
        return {"endpoint": which() is db, "dependency": dep_joined}

    async with client(app) as c:
        response = await c.post("/users", json={"name": "ann"})
    assert response.json() == {"endpoint": True, "dependency": True}
    assert await count_users(web, "ann") == 1
    assert web.get_stats()["session_count"] == 1
    assert threading.get_ident() not in threads  # the work really ran in pool threads


async def test_sync_scope_state_does_not_leak_into_the_event_loop(web: SessionManager) -> None:
    """After a sync request the task's context holds no sessionscope state:
    the next scope in the same task opens its own session."""
    app = FastAPI()

    @app.get("/")
    def view(db: SyncSessionDep) -> dict[str, Any]:
        return {}

    async with client(app) as c:
        for _ in range(3):
            assert (await c.get("/")).status_code == 200
    async with sessionscope.async_session_scope() as session:
        assert await session.scalar(select(func.count()).select_from(User)) == 0
    assert web.get_stats()["session_count"] == 4
    assert web.get_stats()["active_sessions"] == 0


# -- decorated functions as path operations ----------------------------------------


async def test_decorated_functions_as_path_operations(web: SessionManager) -> None:
    app = FastAPI()

    def tag() -> str:
        return "dep"

    @app.post("/async/{group}", status_code=201)
    @async_with_session
    async def create_async(
        group: str,
        data: UserIn,
        session: AsyncSession,
        suffix: str = "",
        marker: str = Depends(tag),
    ) -> dict[str, Any]:
        session.add(User(name=f"{group}-{data.name}{suffix}"))
        return {"marker": marker}

    @app.post("/sync/{group}", status_code=201)
    @with_session
    def create_sync(session: Session, group: str, data: UserIn) -> dict[str, Any]:
        session.add(User(name=f"{group}-{data.name}"))
        return {}

    schema = app.openapi()
    for path in ("/async/{group}", "/sync/{group}"):
        op = schema["paths"][path]["post"]
        names = {p["name"] for p in op.get("parameters", [])}
        assert "session" not in names
        assert "requestBody" in op
    assert {p["name"] for p in schema["paths"]["/async/{group}"]["post"]["parameters"]} == {
        "group",
        "suffix",
    }

    async with client(app, raise_app_exceptions=False) as c:
        r1 = await c.post("/async/a", params={"suffix": "!"}, json={"name": "ann"})
        r2 = await c.post("/sync/s", json={"name": "bob"})
        assert (r1.status_code, r1.json(), r2.status_code) == (201, {"marker": "dep"}, 201)
        again = await c.post("/async/a", params={"suffix": "!"}, json={"name": "ann"})
        assert again.status_code == 500
        assert (await c.post("/sync/s", json={"name": "bob"})).status_code == 500
    assert await count_users(web, "a-ann!") == 1
    assert await count_users(web, "s-bob") == 1


# -- wiring ----------------------------------------------------------------------------


async def test_dependency_overrides_replace_get_db(web: SessionManager) -> None:
    app = FastAPI()
    used: list[str] = []

    async def fake_db() -> AsyncIterator[AsyncSession]:
        used.append("override")
        async with sessionscope.async_session_scope(auto_commit=False) as session:
            yield session

    @app.post("/users")
    async def create(data: UserIn, db: SessionDep) -> dict[str, Any]:
        db.add(User(name=data.name))
        return {}

    app.dependency_overrides[get_db] = fake_db
    async with client(app) as c:
        assert (await c.post("/users", json={"name": "ann"})).status_code == 200
    assert used == ["override"]
    assert await count_users(web) == 0  # the override never commits


async def test_session_dependency_on_another_manager(web: SessionManager, tmp_path: Any) -> None:
    other = SessionManager(f"sqlite:///{tmp_path / 'other.db'}")
    User.metadata.create_all(other.engine)
    app = FastAPI()
    OtherDep = Annotated[AsyncSession, Depends(session_dependency(other))]
    ReadOnlyDep = Annotated[AsyncSession, Depends(session_dependency(read_only=True))]
    SyncOtherDep = Annotated[Session, Depends(sync_session_dependency(other))]

    @app.post("/other")
    async def create_other(data: UserIn, db: OtherDep) -> dict[str, Any]:
        db.add(User(name=data.name))
        return {}

    @app.post("/sync-other")
    def create_sync_other(data: UserIn, db: SyncOtherDep) -> dict[str, Any]:
        db.add(User(name=data.name))
        return {}

    @app.post("/read-only")
    async def refuse(data: UserIn, db: ReadOnlyDep) -> dict[str, Any]:
        db.add(User(name=data.name))
        return {}

    try:
        async with client(app, raise_app_exceptions=False) as c:
            assert (await c.post("/other", json={"name": "ann"})).status_code == 200
            assert (await c.post("/sync-other", json={"name": "bob"})).status_code == 200
            assert (await c.post("/read-only", json={"name": "cid"})).status_code == 500
        assert await count_users(other) == 2
        assert await count_users(web) == 0
        assert other.get_stats()["committed_transactions"] == 2
    finally:
        await other.adispose()


async def test_yield_dependency_built_on_session_dep(web: SessionManager) -> None:
    """A user's own ``yield`` dependency (request scope) may depend on SessionDep
    (function scope) without FastAPI's scope error, and sees the same session."""
    app = FastAPI()

    class Repo:
        def __init__(self, db: AsyncSession) -> None:
            self.db = db

    async def repo(db: SessionDep) -> AsyncIterator[Repo]:
        yield Repo(db)

    @app.get("/")
    async def view(r: Annotated[Repo, Depends(repo)], db: SessionDep) -> dict[str, Any]:
        return {"same": r.db is db}

    async with client(app) as c:
        assert (await c.get("/")).json() == {"same": True}


def test_dependency_options_are_checked_when_built() -> None:
    with pytest.raises(ValueError, match="propagation"):
        session_dependency(propagation="sometimes")
    with pytest.raises(TypeError, match="unknown session option"):
        sync_session_dependency(autocommit=True)
    with pytest.raises(TypeError, match="SessionManager"):
        session_dependency("sqlite://")  # type: ignore[arg-type]


async def test_before_setup_requests_fail_with_the_setup_hint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sessionscope import _api

    monkeypatch.setattr(_api, "_default", None)
    app = FastAPI()

    @app.get("/")
    async def view(db: SessionDep) -> dict[str, Any]:
        return {}

    async with client(app) as c:
        with pytest.raises(sessionscope.SessionFactoryNotInitializedError):
            await c.get("/")


def test_get_sync_db_is_a_distinct_dependency() -> None:
    assert get_sync_db is not get_db
    assert get_db.__name__ == "get_async_db" and get_sync_db.__name__ == "get_sync_db"


# -- load -----------------------------------------------------------------------------


async def test_200_concurrent_requests(web: SessionManager) -> None:
    """200 requests at once, async and sync path functions mixed, each with a
    decorated service joining the request's session: every one answers 201,
    every row is there, and the pools are back to 0 checked out."""
    app = FastAPI()

    @async_with_session
    async def add_user(session: AsyncSession, name: str) -> None:
        session.add(User(name=name))

    @with_session
    def add_user_sync(session: Session, name: str) -> None:
        session.add(User(name=name))

    @app.post("/async", status_code=201)
    async def create(data: UserIn, db: SessionDep) -> dict[str, Any]:
        await add_user(data.name)
        return {}

    @app.post("/sync", status_code=201)
    def create_sync(data: UserIn, db: SyncSessionDep) -> dict[str, Any]:
        add_user_sync(data.name)
        return {}

    async with client(app) as c:
        responses = await asyncio.gather(
            *(
                c.post("/sync" if i % 4 == 0 else "/async", json={"name": f"u{i}"})
                for i in range(200)
            )
        )
    assert [r.status_code for r in responses] == [201] * 200
    assert await count_users(web) == 200
    stats = web.get_stats()
    assert stats["session_count"] == 200
    assert stats["committed_transactions"] == 200
    assert stats["active_sessions"] == 0
    assert checked_out(web) == 0


# -- COMMIT-time failure (PostgreSQL deferred constraint) ------------------------------


async def test_commit_time_violation_gives_500_on_postgresql() -> None:
    """A DEFERRABLE INITIALLY DEFERRED unique constraint is checked by COMMIT
    itself: the path function's INSERT succeeds, the COMMIT fails, and the
    client must see a 500, for the async and the sync dependency alike."""
    manager = SessionManager(require_server("postgresql"))
    with manager.engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE IF EXISTS ss_web_codes")
        conn.exec_driver_sql(
            "CREATE TABLE ss_web_codes (id serial PRIMARY KEY, code text, "
            "CONSTRAINT ss_web_codes_code UNIQUE (code) DEFERRABLE INITIALLY DEFERRED)"
        )
    log = StatementLog()
    log.attach(manager.async_engine.sync_engine)
    log.attach(manager.engine)
    app = FastAPI()
    insert = text("INSERT INTO ss_web_codes (code) VALUES (:code)")
    AsyncDep = Annotated[AsyncSession, Depends(session_dependency(manager))]
    SyncDep = Annotated[Session, Depends(sync_session_dependency(manager))]

    @app.post("/async/{code}", status_code=201)
    async def create(code: str, db: AsyncDep) -> dict[str, Any]:
        await db.execute(insert, {"code": code})
        return {}

    @app.post("/sync/{code}", status_code=201)
    def create_sync(code: str, db: SyncDep) -> dict[str, Any]:
        db.execute(insert, {"code": code})
        return {}

    try:
        async with client(app, raise_app_exceptions=False) as c:
            assert (await c.post("/async/x")).status_code == 201
            for path in ("/async/x", "/sync/x"):
                log.clear()
                response = await c.post(path)
                assert response.status_code == 500
                # The INSERT went through; COMMIT was the statement that failed.
                assert log.statements[:2] == ["INSERT", "COMMIT"], log.statements
        with manager.engine.connect() as conn:
            assert conn.scalar(text("SELECT count(*) FROM ss_web_codes")) == 1
        stats = manager.get_stats()
        assert stats["committed_transactions"] == 1
        assert stats["failed_transactions"] == 2
        assert checked_out(manager) == 0
    finally:
        with manager.engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE ss_web_codes")
        await manager.adispose()


def test_package_root_does_not_import_fastapi() -> None:
    code = "import sys, sessionscope; print('fastapi' in sys.modules, 'starlette' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


POSTPONED_MODULE = """
from __future__ import annotations

from fastapi import FastAPI
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from sessionscope import async_with_session, with_session
from tests.models import User


class NewUser(BaseModel):
    name: str


app = FastAPI()


@app.post("/async/{prefix}", status_code=201)
@async_with_session
async def create(session: AsyncSession, prefix: str, data: NewUser) -> dict[str, str]:
    session.add(User(name=prefix + data.name))
    return {"name": prefix + data.name}


@app.post("/sync", status_code=201)
@with_session(auto_commit=True)
def create_sync(data: NewUser, session: Session) -> dict[str, str]:
    session.add(User(name=data.name))
    return {"name": data.name}
"""


async def test_decorated_path_operations_with_postponed_annotations(
    web: SessionManager, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a module with ``from __future__ import annotations`` every annotation is
    a string; FastAPI must resolve them in the user's module (through
    ``__wrapped__``), not in sessionscope's."""
    (tmp_path / "postponed_routes.py").write_text(POSTPONED_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    module = importlib.import_module("postponed_routes")
    try:
        async with client(module.app) as c:
            r1 = await c.post("/async/x-", json={"name": "ann"})
            r2 = await c.post("/sync", json={"name": "bob"})
        assert (r1.status_code, r1.json()) == (201, {"name": "x-ann"})
        assert (r2.status_code, r2.json()) == (201, {"name": "bob"})
        assert await count_users(web) == 2
    finally:
        sys.modules.pop("postponed_routes", None)
