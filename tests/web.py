"""The request contract every web adapter must keep, run against each framework.

A framework's test module builds the same small application (see
``tests/webapps``) and subclasses :class:`RequestContract`; every test then runs
through the framework's own test client *and* over real HTTP against a server
process (uvicorn for ASGI, waitress for Flask), on SQLite, PostgreSQL and MariaDB.

The application is wrapped in a harness that answers ``/_stats`` (the server's
own statistics and pool), ``/_reset`` and ``/_release`` without any session, and
that, for a request carrying ``x-probe: NAME``, counts committed users named NAME
on a connection of its own at the moment the response starts (ASGI
``http.response.start``, WSGI ``start_response``) and reports it in the
``x-committed`` header: the proof that COMMIT came before the response.

``python -m tests.webapps.serve FRAMEWORK FD`` serves a framework's application
on the listening socket FD (the database URL in ``SS_WEB_URL``).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest
from sqlalchemy import func, select, text

import sessionscope
from sessionscope import SessionManager

from .conftest import BACKENDS, require_server, reset_schema
from .models import User

ROOT = Path(__file__).resolve().parents[1]
RELEASE = threading.Event()  # lets a held request (POST /a/hold) finish
FLUSHED = threading.Event()  # set by POST /a/hold once its row is flushed
CODES_DDL = (
    "CREATE TABLE ss_web_codes (id serial PRIMARY KEY, code text, "
    "CONSTRAINT ss_web_codes_code UNIQUE (code) DEFERRABLE INITIALLY DEFERRED)"
)


def count_users(manager: SessionManager, name: str | None = None) -> int:
    """Committed rows of ss_users, read on a connection of its own."""
    stmt = select(func.count()).select_from(User)
    if name is not None:
        stmt = stmt.where(User.name == name)
    with manager.engine.connect() as conn:
        return int(conn.scalar(stmt) or 0)


def server_stats(manager: SessionManager) -> dict[str, Any]:
    stats = manager.get_stats()
    pools = manager.pool_status().values()
    return {
        "checked_out": int(sum(side.get("checked_out", 0) for side in pools)),
        **{
            key: stats[key]
            for key in (
                "session_count",
                "active_sessions",
                "committed_transactions",
                "rolled_back_transactions",
                "failed_transactions",
            )
        },
    }


# -- harnesses ---------------------------------------------------------------------


class ASGIHarness:
    """See the module docstring. Serves ``app`` with the default manager."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path in ("/_stats", "/_reset", "/_release"):
            manager = sessionscope.get_default_manager()
            if path == "/_reset":
                manager.reset_stats()
                RELEASE.clear()
            if path == "/_release":
                RELEASE.set()
            body = json.dumps(server_stats(manager)).encode()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": body})
            return
        probe = dict(scope["headers"]).get(b"x-probe")

        async def send_probed(message: MutableMapping[str, Any]) -> None:
            if probe is not None and message["type"] == "http.response.start":
                import anyio.to_thread

                manager = sessionscope.get_default_manager()
                seen = await anyio.to_thread.run_sync(count_users, manager, probe.decode())
                message["headers"] = [*message.get("headers", []), (b"x-committed", b"%d" % seen)]
            await send(message)

        await self.app(scope, receive, send_probed)


class WSGIHarness:
    """The WSGI twin of :class:`ASGIHarness`."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        path = environ["PATH_INFO"]
        if path in ("/_stats", "/_reset", "/_release"):
            manager = sessionscope.get_default_manager()
            if path == "/_reset":
                manager.reset_stats()
                RELEASE.clear()
            if path == "/_release":
                RELEASE.set()
            start_response("200 OK", [("content-type", "application/json")])
            return [json.dumps(server_stats(manager)).encode()]
        probe = environ.get("HTTP_X_PROBE")

        def start_probed(status: str, headers: list[tuple[str, str]], *exc: Any) -> Any:
            if probe is not None:
                seen = count_users(sessionscope.get_default_manager(), probe)
                headers = [*headers, ("x-committed", str(seen))]
            return start_response(status, headers, *exc)

        return self.app(environ, start_probed)


# -- clients -----------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: Mapping[str, str]
    body: Any


class WebClient(Protocol):
    def post(self, path: str, json: Any = None, headers: dict[str, str] | None = None) -> Reply: ...

    def get(self, path: str) -> Reply: ...


class HttpxClient:
    """Wraps an httpx-style client (httpx.Client, Starlette's or Litestar's TestClient)."""

    def __init__(self, client: Any, server: Server | None = None) -> None:
        self.client = client
        self.server = server

    def post(self, path: str, json: Any = None, headers: dict[str, str] | None = None) -> Reply:
        return self._reply(self.client.post(path, json=json, headers=headers or {}))

    def get(self, path: str) -> Reply:
        return self._reply(self.client.get(path))

    @staticmethod
    def _reply(response: Any) -> Reply:
        try:
            body = response.json()
        except ValueError:
            body = response.text
        return Reply(response.status_code, dict(response.headers), body)


class ServerConnections:
    """httpx calls on a server, each on a connection of its own: one
    ``httpx.Client`` shared by 200 threads can lose sockets under load."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url

    def post(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.post(self.base_url + path, timeout=300, **kw)

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.base_url + path, timeout=300)


@dataclass
class Server:
    base_url: str
    process: subprocess.Popen[str]
    log: Path


def start_server(framework: str, url: str, workdir: Path) -> Server:
    """Serve ``framework``'s test application in a child process, on a socket
    bound here and handed over (no other process can take the port)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(512)
    port = sock.getsockname()[1]
    env = dict(os.environ, SS_WEB_URL=url)
    log = workdir / f"{framework}.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.webapps.serve", framework, str(sock.fileno())],
            pass_fds=[sock.fileno()],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    sock.close()
    server = Server(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            pytest.fail(f"{framework} server exited:\n{log.read_text()}")
        try:
            if httpx.get(server.base_url + "/_stats", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{framework} server did not answer within 60 s")
        time.sleep(0.1)


def stop_server(server: Server) -> str:
    server.process.terminate()
    try:
        server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
    return server.log.read_text()


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    """Poll until truthy; a guard against hanging, not a timing assertion."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)
    return value


# -- the contract ------------------------------------------------------------------


class WebFixtures:
    """Fixtures of the contract classes. A framework's subclass provides
    ``framework`` (the module name in tests/webapps), the fixture ``kind`` (``a``
    for async handlers, ``s`` for sync ones: the path prefix of the test
    application) and :meth:`open_client`."""

    framework: str

    @pytest.fixture(scope="class", params=BACKENDS)
    @classmethod
    def web_url(
        cls, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
    ) -> Iterator[str]:
        yield from cls.database(str(request.param), tmp_path_factory)

    @staticmethod
    def database(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
        if backend == "sqlite":
            # 200 concurrent writers queue for SQLite's one write lock: wait for
            # it longer than the default 5 s on a loaded machine.
            yield f"sqlite:///{tmp_path_factory.mktemp('web') / 'web.db'}?timeout=120"
            return
        url = require_server(backend)
        if backend == "postgresql":
            manager = SessionManager(url)
            with manager.engine.begin() as conn:
                conn.exec_driver_sql("DROP TABLE IF EXISTS ss_web_codes")
                conn.exec_driver_sql(CODES_DDL)
            try:
                yield url
            finally:
                with manager.engine.begin() as conn:
                    conn.exec_driver_sql("DROP TABLE ss_web_codes")
                manager.dispose()
            return
        yield url

    @pytest.fixture(scope="class")
    @classmethod
    def server(
        cls, web_url: str, tmp_path_factory: pytest.TempPathFactory
    ) -> Iterator[Server]:
        # Tables exist before the server's first request.
        setup = SessionManager(web_url)
        reset_schema(setup.engine)
        setup.dispose()
        server = start_server(cls.framework, web_url, tmp_path_factory.mktemp("srv"))
        yield server
        stop_server(server)

    @pytest.fixture
    def web_manager(self, web_url: str) -> Iterator[SessionManager]:
        sessionscope.configure_session(retry_delay=0.01)
        manager = sessionscope.setup_database_connection(web_url)
        reset_schema(manager.engine)
        if manager.url.get_backend_name() == "postgresql":
            with manager.engine.begin() as conn:
                conn.exec_driver_sql("DELETE FROM ss_web_codes")
        manager.reset_stats()
        RELEASE.clear()
        yield manager
        manager.dispose()

    @pytest.fixture(params=["testclient", "server"])
    def client(
        self, request: pytest.FixtureRequest, web_manager: SessionManager
    ) -> Iterator[WebClient]:
        yield from self.clients(request)

    def clients(self, request: pytest.FixtureRequest) -> Iterator[WebClient]:
        if request.param == "server":
            server: Server = request.getfixturevalue("server")
            client = HttpxClient(ServerConnections(server.base_url), server)
            client.post("/_reset")
            yield client
            return
        with self.open_client() as client:
            yield client

    def open_client(self) -> Any:
        """A context manager yielding a :class:`WebClient` on the framework's own
        test client, serving the application in this process."""
        raise NotImplementedError

    @staticmethod
    def stats(client: WebClient) -> dict[str, Any]:
        body: dict[str, Any] = client.get("/_stats").body
        return body


class RequestContract(WebFixtures):
    """The cases of tests/test_fastapi.py, for one framework, through its test
    client and a server process, on every backend."""

    # -- commit timing -------------------------------------------------------------

    def test_commit_happens_before_the_response_starts(
        self, client: WebClient, kind: str, web_manager: SessionManager
    ) -> None:
        reply = client.post(f"/{kind}/users/ann", headers={"x-probe": "ann"})
        assert reply.status == 201
        assert reply.headers["x-committed"] == "1"  # committed when the status went out
        assert count_users(web_manager, "ann") == 1
        stats = self.stats(client)
        assert (stats["committed_transactions"], stats["checked_out"]) == (1, 0)

    # -- failures ------------------------------------------------------------------

    def test_failed_commit_gives_500_never_2xx(
        self, client: WebClient, kind: str, web_manager: SessionManager
    ) -> None:
        """The INSERT reaches the server only at the scope's end (flush before
        COMMIT), after the handler returned 201: the unique violation there must
        turn the response into a 500."""
        assert client.post(f"/{kind}/users/ann").status == 201
        reply = client.post(f"/{kind}/users/ann", headers={"x-probe": "ann"})
        assert reply.status == 500
        assert reply.headers["x-committed"] == "1"  # the first one only, as the 500 went out
        assert count_users(web_manager) == 1
        stats = self.stats(client)
        assert stats["failed_transactions"] == 1
        assert (stats["active_sessions"], stats["checked_out"]) == (0, 0)

    def test_client_error_rolls_back(
        self, client: WebClient, kind: str, web_manager: SessionManager
    ) -> None:
        """The handler flushed a row, then raised the framework's HTTP exception."""
        reply = client.post(f"/{kind}/reject/ann")
        assert reply.status == 409
        assert count_users(web_manager) == 0
        assert self.stats(client)["checked_out"] == 0

    def test_client_error_counts_as_rolled_back_not_failed(
        self, client: WebClient, kind: str, web_manager: SessionManager
    ) -> None:
        assert client.post(f"/{kind}/reject/ann").status == 409
        stats = self.stats(client)
        assert (stats["rolled_back_transactions"], stats["failed_transactions"]) == (1, 0)

    def test_handler_crash_rolls_back_and_counts_as_failed(
        self, client: WebClient, kind: str, web_manager: SessionManager
    ) -> None:
        assert client.post(f"/{kind}/crash/ann").status == 500
        assert count_users(web_manager) == 0
        stats = self.stats(client)
        assert (stats["failed_transactions"], stats["checked_out"]) == (1, 0)

    # -- joining -------------------------------------------------------------------

    def test_decorated_services_join_the_request_session(
        self, client: WebClient, kind: str, web_manager: SessionManager
    ) -> None:
        reply = client.post(f"/{kind}/join/ann")
        assert (reply.status, reply.body) == (201, {"same": True})
        assert count_users(web_manager, "ann") == 1
        stats = self.stats(client)
        assert (stats["session_count"], stats["committed_transactions"]) == (1, 1)

    # -- load and disconnects ------------------------------------------------------

    def test_200_concurrent_requests(
        self, client: WebClient, kind: str, web_manager: SessionManager
    ) -> None:
        # Names never used before: InnoDB checks a new key against delete-marked
        # rows of earlier tests with next-key locks, and concurrent inserts of
        # such keys deadlock (a real 1213, which a request cannot retry).
        prefix = uuid.uuid4().hex[:8]
        with ThreadPoolExecutor(max_workers=200) as pool:
            replies = list(
                pool.map(lambda i: client.post(f"/{kind}/join/{prefix}-{i}"), range(200))
            )
        assert [r.status for r in replies] == [201] * 200
        assert count_users(web_manager) == 200
        stats = self.stats(client)
        assert stats["committed_transactions"] == 200
        assert (stats["active_sessions"], stats["checked_out"]) == (0, 0)

class CommitTimeContract(WebFixtures):
    """COMMIT itself failing: PostgreSQL only (deferred constraints)."""

    @pytest.fixture(scope="class", params=["postgresql"])
    @classmethod
    def web_url(
        cls, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
    ) -> Iterator[str]:
        yield from cls.database(str(request.param), tmp_path_factory)

    def test_commit_time_violation_gives_500_on_postgresql(
        self, client: WebClient, kind: str, web_manager: SessionManager
    ) -> None:
        """A DEFERRABLE INITIALLY DEFERRED unique constraint is checked by COMMIT
        itself: the handler's INSERT succeeds, COMMIT fails, the client sees 500."""
        assert client.post(f"/{kind}/codes/x").status == 201
        assert client.post(f"/{kind}/codes/x").status == 500
        with web_manager.engine.connect() as conn:
            assert conn.scalar(text("SELECT count(*) FROM ss_web_codes")) == 1
        stats = self.stats(client)
        assert (stats["committed_transactions"], stats["failed_transactions"]) == (1, 1)
        assert stats["checked_out"] == 0


class DisconnectContract(WebFixtures):
    """A client hanging up: over real HTTP only."""

    @pytest.fixture(params=["server"])
    def client(
        self, request: pytest.FixtureRequest, web_manager: SessionManager
    ) -> Iterator[WebClient]:
        yield from self.clients(request)

    def test_client_disconnect_leaves_nothing_checked_out(
        self, client: WebClient, kind: str, web_manager: SessionManager
    ) -> None:
        """Over real HTTP: the client sends a request and hangs up while the handler
        holds a connection (it flushed a row); the request ends on the server and
        its connection goes back to the pool."""
        server = getattr(client, "server", None)
        assert isinstance(server, Server)
        host, port = server.base_url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(
                f"POST /{kind}/hold/gone HTTP/1.1\r\nhost: {host}\r\n"
                "content-length: 0\r\n\r\n".encode()
            )
            wait_for(lambda: self.stats(client)["checked_out"] == 1, "the handler's flush")
        client.post("/_release")
        stats = wait_for(
            lambda: (s := self.stats(client))["active_sessions"] == 0 and s, "the request's end"
        )
        assert stats["checked_out"] == 0
        assert stats["session_count"] == 1
        # The handler itself completed: disconnects do not cancel handlers on
        # this server, so its work was committed like any other.
        assert count_users(web_manager, "gone") == stats["committed_transactions"]


def asgi_cancellation_case(app: Any, manager: SessionManager) -> None:
    """In-process: the task serving a request is cancelled while its handler holds a
    connection; the scope rolls back and nothing stays checked out."""
    RELEASE.clear()
    FLUSHED.clear()

    async def run() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            task = asyncio.create_task(c.post("/a/hold/cut"))
            deadline = time.monotonic() + 30
            # Wait for the flush itself, not for the checkout: a checkout counts
            # before the driver has connected, and a task cancelled mid-connect
            # tests the driver's connect, not the scope.
            while not FLUSHED.is_set():
                assert time.monotonic() < deadline and not task.done()
                await asyncio.sleep(0.01)
            assert server_stats(manager)["checked_out"] == 1
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        RELEASE.set()
        await manager.adispose()

    asyncio.run(run())
    stats = manager.get_stats()
    assert stats["active_sessions"] == 0
    assert stats["committed_transactions"] == 0
    assert count_users(manager, "cut") == 0
