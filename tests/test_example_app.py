"""examples/fastapi_app end to end: uvicorn on a loopback socket, real HTTP.

The server is started the way a user runs it (``uvicorn main:app``), with no
``DATABASE_URL`` for SQLite (so the embedded default file is used, created in
the server's working directory), and with one for PostgreSQL and MariaDB. It is
stopped with SIGTERM and must shut down cleanly (lifespan disposes the engines).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine

from .conftest import require_server

APP_DIR = Path(__file__).resolve().parents[1] / "examples" / "fastapi_app"
STARTUP_DEADLINE = 60.0


@dataclass
class Server:
    base_url: str
    backend: str
    workdir: Path
    process: subprocess.Popen[str]


def _drop_example_tables(url: str) -> None:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE IF EXISTS user_profiles")
            conn.exec_driver_sql("DROP TABLE IF EXISTS users")
    finally:
        engine.dispose()


@pytest.fixture(scope="module", params=["sqlite", "postgresql", "mariadb"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    backend = str(request.param)
    workdir = tmp_path_factory.mktemp(f"example-{backend}")
    env = dict(os.environ)
    env.pop("DATABASE_URL", None)
    url = None
    if backend != "sqlite":
        url = require_server(backend)
        _drop_example_tables(url)
        env["DATABASE_URL"] = url
    # The listening socket is made here and handed over, so no other process can
    # take the port between choosing it and uvicorn binding it.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(256)
    port = sock.getsockname()[1]
    log = (workdir / "uvicorn.log").open("w")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--app-dir",
            str(APP_DIR),
            "--fd",
            str(sock.fileno()),
            "--log-level",
            "warning",
            "main:app",
        ],
        pass_fds=[sock.fileno()],
        cwd=workdir,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    sock.close()
    srv = Server(f"http://127.0.0.1:{port}", backend, workdir, process)
    try:
        _wait_until_up(srv)
        yield srv
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        if url is not None:
            _drop_example_tables(url)
    output = (workdir / "uvicorn.log").read_text()
    assert "Traceback" not in output, output


def _wait_until_up(srv: Server) -> None:
    deadline = time.monotonic() + STARTUP_DEADLINE
    while True:
        if srv.process.poll() is not None:
            pytest.fail("uvicorn exited:\n" + (srv.workdir / "uvicorn.log").read_text())
        try:
            if httpx.get(srv.base_url + "/stats", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            pytest.fail("uvicorn did not answer within the startup deadline")
        time.sleep(0.1)


def stats(c: httpx.Client) -> dict[str, Any]:
    body: dict[str, Any] = c.get("/stats").json()
    return body


def checked_out(body: dict[str, Any]) -> int:
    return int(sum(side.get("checked_out", 0) for side in body["pool"].values()))


def test_users_and_profiles(server: Server) -> None:
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        before = stats(c)

        created = c.post("/users", json={"name": "ann", "email": "ann@example.org"})
        assert created.status_code == 201
        ann = created.json()
        assert ann["name"] == "ann" and isinstance(ann["id"], int)
        assert c.get(f"/users/{ann['id']}").json() == ann

        # Duplicate name: IntegrityError at flush -> rolled back -> 409.
        assert c.post("/users", json={"name": "ann"}).status_code == 409

        # The seed's pre-sessionscope style with an explicit commit.
        legacy = c.post("/users/legacy", json={"name": "leo"})
        assert legacy.status_code == 201

        # Two services joining the request's transaction.
        reg = c.post("/users/register", json={"name": "bob", "bio": "hello"})
        assert reg.status_code == 201
        bob = reg.json()
        assert bob["profile"]["user_id"] == bob["user"]["id"]
        assert c.get(f"/users/{bob['user']['id']}/profile").json()["bio"] == "hello"

        # The profile is refused after the user row was written: nothing is kept.
        refused = c.post("/users/register", json={"name": "cid", "bio": "buy spam"})
        assert refused.status_code == 422
        names = [u["name"] for u in c.get("/users").json()]
        assert "cid" not in names
        assert {"ann", "leo", "bob"} <= set(names)

        # Profiles: 404 for a missing user, 409 for a second profile.
        assert c.post("/users/999999/profile", json={"bio": "x"}).status_code == 404
        assert c.post(f"/users/{ann['id']}/profile", json={"bio": "first"}).status_code == 201
        assert c.post(f"/users/{ann['id']}/profile", json={"bio": "again"}).status_code == 409
        assert c.get(f"/users/{bob['user']['id'] + 1000}/profile").status_code == 404

        # The sync path function and its joined sync service.
        assert c.get("/users/count").json() == {"count": len(names)}

        after = stats(c)
        if server.backend == "sqlite":  # the embedded default, in the working directory
            assert (server.workdir / "sessionscope.db").is_file()
        assert after["active_sessions"] == 0
        assert checked_out(after) == 0
        # Failing requests above: duplicate user, refused registration, missing
        # user (profile), second profile, missing profile.
        assert after["failed_transactions"] - before["failed_transactions"] == 5


def test_200_concurrent_registrations(server: Server) -> None:
    async def run() -> list[int]:
        # No keep-alive: each request on a connection of its own. A reused
        # connection that sat idle past uvicorn's keep-alive timeout (5 s; the
        # client's event loop is slow to send its next request on a loaded
        # machine) is closed by the server as the request goes out: httpx.ReadError
        # for a request the server never saw.
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60, limits=limits) as c:
            responses = await asyncio.gather(
                *(
                    c.post("/users/register", json={"name": f"load{i}", "bio": f"user {i}"})
                    for i in range(200)
                )
            )
        return [r.status_code for r in responses]

    assert asyncio.run(run()) == [201] * 200
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        names = {u["name"] for u in c.get("/users", params={"limit": 500}).json()}
        assert {f"load{i}" for i in range(200)} <= names
        body = stats(c)
    assert body["active_sessions"] == 0
    assert checked_out(body) == 0
