"""Optional integrations: ``import sessionscope`` imports none of them, and each
one used without its extra raises an ``ImportError`` naming the extra to
install. The dependency is made missing in a fresh interpreter (``sys.modules``
entry set to None, which makes Python's import fail as for an absent package)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def _python(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )


def test_import_sessionscope_imports_no_optional_dependency(tmp_path: Path) -> None:
    out = _python(
        "import sys, sessionscope\n"
        "optional = ('fastapi', 'starlette', 'anyio', 'prometheus_client', 'opentelemetry',"
        " 'rich', 'pytest', 'psycopg', 'asyncpg', 'pymysql', 'aiomysql')\n"
        "print(sorted(m for m in optional if m in sys.modules))\n",
        tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("hidden", "statement", "message"),
    [
        (
            ["anyio"],
            "import sessionscope; sessionscope.get_db",
            "sessionscope.fastapi needs 'anyio', which is not installed: "
            "pip install 'sessionscope[fastapi]'",
        ),
        (
            ["fastapi"],
            "from sessionscope.fastapi import SessionDep",
            "sessionscope.fastapi needs 'fastapi', which is not installed: "
            "pip install 'sessionscope[fastapi]'",
        ),
        (
            ["prometheus_client"],
            "import sessionscope.prometheus",
            "sessionscope.prometheus needs 'prometheus_client', which is not installed: "
            "pip install 'sessionscope[prometheus]'",
        ),
        (
            ["opentelemetry"],
            "from sessionscope.otel import instrument",
            "sessionscope.otel needs 'opentelemetry', which is not installed: "
            "pip install 'sessionscope[otel]'",
        ),
        (
            ["fastapi"],
            "import sessionscope.stats_endpoint",
            "sessionscope.stats_endpoint needs 'fastapi', which is not installed: "
            "pip install 'sessionscope[fastapi]'",
        ),
        (
            ["starlette"],
            "import sessionscope.starlette",
            "sessionscope.starlette needs 'starlette', which is not installed: "
            "pip install 'sessionscope[starlette]'",
        ),
        (
            ["flask"],
            "import sessionscope.flask",
            "sessionscope.flask needs 'flask', which is not installed: "
            "pip install 'sessionscope[flask]'",
        ),
        (
            ["litestar"],
            "import sessionscope.litestar",
            "sessionscope.litestar needs 'litestar', which is not installed: "
            "pip install 'sessionscope[litestar]'",
        ),
        (
            ["opentelemetry"],
            "import sessionscope.otel_tracing",
            "sessionscope.otel_tracing needs 'opentelemetry', which is not installed: "
            "pip install 'sessionscope[otel]'",
        ),
    ],
    ids=[
        "get_db-anyio",
        "fastapi",
        "prometheus",
        "otel",
        "stats_endpoint",
        "starlette",
        "flask",
        "litestar",
        "otel_tracing",
    ],
)
def test_missing_extra_names_the_extra(
    hidden: list[str], statement: str, message: str, tmp_path: Path
) -> None:
    block = "".join(f"sys.modules[{name!r}] = None\n" for name in hidden)
    out = _python(
        f"import sys\n{block}"
        f"try:\n    {statement}\n"
        "except ImportError as err:\n    print(err)\n",
        tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == message


@pytest.mark.parametrize("command", [["demo"], ["stats", "--url", "sqlite://"]])
def test_cli_without_rich_names_the_cli_extra(command: list[str], tmp_path: Path) -> None:
    out = _python(
        "import sys\n"
        "sys.modules['rich'] = None\n"
        "from sessionscope.cli import main\n"
        f"sys.exit(main({command!r}))\n",
        tmp_path,
    )
    assert out.returncode == 1
    assert out.stderr == (
        f"sessionscope {command[0]}: the sessionscope command needs 'rich', which is not "
        "installed: pip install 'sessionscope[cli]'\n"
    )
    assert list(tmp_path.iterdir()) == []  # the demo did not start
