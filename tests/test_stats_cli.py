"""``sessionscope stats`` and the statistics tables of ``sessionscope demo``, run
as a user runs them (a subprocess), plus the table renderer."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.engine import make_url

from sessionscope import SessionManager
from sessionscope._report import format_stats, pool_rows
from sessionscope._stats import Stats
from sessionscope.stats_endpoint import DEFAULT_PATH, stats_router

from .conftest import require_server

PASSWORD = "Pw-cli-5e0b"


def _run(
    args: list[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    merged = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    merged.update(env or {})
    merged["COLUMNS"] = "120"
    return subprocess.run(
        [sys.executable, "-m", "sessionscope", *args],
        cwd=cwd, env=merged, capture_output=True, text=True, timeout=120,
    )


def test_probe_table(db_url: str, tmp_path: Path) -> None:
    out = _run(["stats", "--url", db_url, "--probes", "4"], tmp_path)
    assert out.returncode == 0, out.stderr
    shown = make_url(db_url).render_as_string(hide_password=True)
    assert out.stdout.splitlines()[0] == f"sessionscope probe of {shown} (4 transactions)"
    rows = {line.strip().rsplit(None, 1)[0].strip(): line.split()[-1]
            for line in out.stdout.splitlines()[3:20] if line.strip()}
    assert rows["sessions opened"] == "4"
    assert rows["committed"] == "4"
    assert rows["active sessions"] == "0"
    pool_line = next(line for line in out.stdout.splitlines() if line.strip().startswith("sync "))
    # engine, pool, in use, idle, capacity (5 + max_overflow 10), timeout
    assert pool_line.split() == ["sync", "QueuePool", "0", "1", "15", "30"]


def test_probe_json_uses_database_url_and_hides_the_password(tmp_path: Path) -> None:
    url = make_url(require_server("postgresql")).set(password=PASSWORD)
    out = _run(
        ["stats", "--json", "--probes", "3"],
        tmp_path,
        {"DATABASE_URL": url.render_as_string(hide_password=False)},
    )
    assert out.returncode == 0, out.stderr
    assert PASSWORD not in out.stdout + out.stderr
    snapshot = json.loads(out.stdout)
    assert snapshot["url"] == url.render_as_string(hide_password=True)
    assert (snapshot["session_count"], snapshot["committed_transactions"]) == (3, 3)
    assert snapshot["pool"]["sync"]["checked_out"] == 0
    assert snapshot["pool"]["sync"]["checked_in"] == 1


def test_stats_without_a_target_creates_no_database_file(tmp_path: Path) -> None:
    out = _run(["stats"], tmp_path)
    assert out.returncode == 1
    assert "nothing to show: give --from URL" in out.stderr
    assert list(tmp_path.iterdir()) == []


def test_stats_probes_an_existing_embedded_default(tmp_path: Path) -> None:
    assert _run(["demo"], tmp_path).returncode == 0  # creates sessionscope.db
    out = _run(["stats", "--json", "--probes", "1"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["url"] == "sqlite:///sessionscope.db"


def test_unreachable_database_shows_the_drivers_reason(tmp_path: Path) -> None:
    url = f"postgresql+psycopg://app:{PASSWORD}@127.0.0.1:1/app"
    out = _run(["stats", "--url", url], tmp_path)
    assert out.returncode == 1
    assert out.stderr.startswith(
        "sessionscope stats: cannot use postgresql+psycopg://app:***@127.0.0.1:1/app: "
        "OperationalError: connection failed: "
    )
    assert "Connection refused" in out.stderr
    assert PASSWORD not in out.stdout + out.stderr
    assert "Traceback" not in out.stderr


def test_bad_password_shows_the_drivers_reason_without_it(tmp_path: Path) -> None:
    url = make_url(require_server("mariadb")).set(password=PASSWORD)
    out = _run(["stats", "--url", url.render_as_string(hide_password=False)], tmp_path)
    assert out.returncode == 1
    assert PASSWORD not in out.stdout + out.stderr
    assert "OperationalError: (1045, \"Access denied for user 'root'@" in out.stderr
    assert "(using password: YES)" in out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr


def test_unknown_charset_is_a_one_line_error(tmp_path: Path) -> None:
    url = make_url(require_server("mariadb")).set(
        drivername="mysql+pymysql", password=PASSWORD, query={"charset": "nonexist"}
    )
    out = _run(["stats", "--url", url.render_as_string(hide_password=False)], tmp_path)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1
    assert PASSWORD not in out.stderr
    assert out.stderr.startswith("sessionscope stats: cannot use mysql+pymysql://root:***@")


@pytest.fixture
def app_server(tmp_path: Path) -> Iterator[tuple[str, SessionManager]]:
    """A FastAPI application serving its statistics on loopback (real HTTP)."""
    manager = SessionManager(f"sqlite:///{tmp_path / 'app.db'}", name="app")
    app = FastAPI()
    app.include_router(stats_router(manager))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", manager
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        manager.dispose()


def test_stats_from_a_running_applications_endpoint(
    app_server: tuple[str, SessionManager], tmp_path: Path
) -> None:
    base, manager = app_server
    for fail in (False, False, True):
        try:
            with manager.session_scope() as session:
                session.execute(text("SELECT 1"))
                if fail:
                    raise KeyError("x")
        except KeyError:
            pass
    cwd = tmp_path / "cli"
    cwd.mkdir()
    out = _run(["stats", "--from", base + DEFAULT_PATH, "--json"], cwd)
    assert out.returncode == 0, out.stderr
    snapshot = json.loads(out.stdout)
    assert snapshot["manager"] == "app"
    assert (snapshot["committed_transactions"], snapshot["failed_transactions"]) == (2, 1)
    table = _run(["stats", "--from", base + DEFAULT_PATH], cwd)
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0] == f"sessionscope stats of {base}{DEFAULT_PATH}"
    assert "66.67 %" in table.stdout
    assert list(cwd.iterdir()) == []
    missing = _run(["stats", "--from", base + "/nope"], cwd)
    assert missing.returncode == 1
    assert missing.stderr == f"sessionscope stats: cannot read {base}/nope: HTTP 404 Not Found\n"


def test_demo_ends_with_the_statistics_tables(tmp_path: Path) -> None:
    out = _run(["demo"], tmp_path)
    assert out.returncode == 0, out.stderr
    tail = out.stdout[out.stdout.index("\nstatistics\n") :]
    for section in ("success rate", "Decorated functions", "Connection pools", "capacity"):
        assert section in tail
    assert "sessionscope._demo.run_demo.<locals>.create_user" in tail
    assert "overflow" not in tail


def test_pool_rows_show_in_use_idle_and_capacity() -> None:
    pool = {
        "sync": {"pool_class": "QueuePool", "size": 5, "max_overflow": 10, "overflow": -4,
                 "checked_out": 1, "checked_in": 0, "timeout": 30.0},
        "async": {"pool_class": "QueuePool", "size": 2, "max_overflow": -1, "overflow": -2,
                  "checked_out": 0, "checked_in": 0},
        "other": {"pool_class": "NullPool"},
    }
    assert pool_rows(pool) == [
        ("sync", "QueuePool", "1", "0", "15", "30"),
        ("async", "QueuePool", "0", "0", "unbounded", "-"),
        ("other", "NullPool", "-", "-", "-", "-"),
    ]


def test_format_stats_renders_any_snapshot() -> None:
    stats = Stats()
    stats.session_opened()
    stats.transaction_ended(
        committed=True, failed=False, duration=0.0025, slow_threshold=1.0, function="m.f"
    )
    stats.retried(KeyError())
    snapshot = stats.snapshot()
    snapshot["pool"] = {"sync": {"pool_class": "NullPool"}}
    text_ = format_stats(snapshot, title="t")
    lines = [line.split() for line in text_.splitlines()]
    assert text_.splitlines()[0] == "t"
    assert ["m.f", "1", "0", "2.500", "2.500"] in lines
    assert ["KeyError", "1"] in lines
    assert ["sync", "NullPool", "-", "-", "-", "-"] in lines
    snapshot["routing"] = {
        "engines": {
            "primary": {"role": "primary", "reads": 3},
            "replica1": {"role": "replica", "reads": 7, "healthy": True, "connect_failures": 0},
        }
    }
    routed = [line.split() for line in format_stats(snapshot).splitlines()]
    assert ["primary", "primary", "3", "-", "-"] in routed
    assert ["replica1", "replica", "7", "True", "0"] in routed
    # A partial or foreign snapshot still renders, with "-" for what is missing.
    assert "sessions opened" in format_stats({})
    assert "Connection pools: no engine created yet" in format_stats({})
