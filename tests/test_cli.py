"""The ``sessionscope`` command line, run as a user runs it (a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import backend_url


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    merged = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    merged.update(env or {})
    out = subprocess.run(
        [sys.executable, "-m", "sessionscope", *args],
        cwd=cwd, env=merged, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_demo_on_embedded_sqlite_default(tmp_path: Path) -> None:
    out = _run(["demo"], tmp_path)
    assert (tmp_path / "sessionscope.db").exists()
    assert "duplicate 'alice' rolled back to the savepoint" in out
    assert "RollbackOnlyError: frank was rolled back" in out
    assert "final: 6 users, 2 profiles" in out
    assert "success rate" in out
    # Running it twice starts from a clean slate.
    assert "final: 6 users, 2 profiles" in _run(["demo"], tmp_path)


@pytest.mark.parametrize("server", ["postgresql", "mariadb"])
def test_demo_on_a_server(server: str, tmp_path: Path) -> None:
    url = backend_url(server, tmp_path)
    out = _run(["demo", "--url", url], tmp_path)
    assert "final: 6 users, 2 profiles" in out
    assert out.splitlines()[0] == f"sessionscope demo on {url}"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u:s3cret@127.0.0.1:abc/db", "ValueError: the URL could not be parsed"),
        ("not a url s3cret", "ArgumentError: the URL could not be parsed"),
        ("mysql+mysqldb://u:s3cret@127.0.0.1/db", "driver module 'MySQLdb' is not installed"),
    ],
)
@pytest.mark.parametrize("command", ["demo", "stats"])
def test_bad_url_is_a_one_line_error_without_the_password(
    command: str, url: str, expected: str, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    out = subprocess.run(
        [sys.executable, "-m", "sessionscope", command, "--url", url],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 1
    assert "Traceback" not in out.stderr and "s3cret" not in out.stderr + out.stdout
    assert expected in out.stderr
