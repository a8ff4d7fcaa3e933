"""Every Python example in the user documentation runs, on SQLite.

A document's ```` ```python ```` blocks run in order in one namespace, like a
reader typing them into one session: top-level ``await`` is allowed (one event
loop per document). Each document starts in an empty directory, with no
``DATABASE_URL`` and no default manager, so ``setup_database_connection()``
there uses the embedded SQLite default as it would for a reader.

Blocks fenced as ```` ```python file=NAME ```` are files (a ``conftest.py``, a
test module): they are written to that directory, and if there are test
modules, pytest runs them there and every test must pass.
"""

from __future__ import annotations

import ast
import asyncio
import os
import re
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sessionscope import _api

from .conftest import run_pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [
    ROOT / "README.md",
    ROOT / "README.zh-CN.md",
    ROOT / "docs" / "guide.md",
    ROOT / "docs" / "migration.md",
]

_FENCE = re.compile(r"^```(\S*)[ \t]*(.*?)\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


@dataclass
class Block:
    language: str
    info: str
    code: str
    line: int

    @property
    def file(self) -> str | None:
        match = re.search(r"\bfile=(\S+)", self.info)
        return match.group(1) if match else None


def blocks(path: Path) -> list[Block]:
    text = path.read_text(encoding="utf-8")
    found = []
    for match in _FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        found.append(Block(match.group(1), match.group(2), match.group(3), line))
    return found


@pytest.fixture
def reader_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty working directory and no database set up, as for a new reader."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setattr(_api, "_default", None)
    yield tmp_path


def run_python_blocks(path: Path, python: list[Block]) -> None:
    # A real module, as a reader's script would be: SQLAlchemy and pydantic look
    # classes' modules up in sys.modules to resolve annotations.
    module = types.ModuleType(f"docs_{path.stem.replace('.', '_').replace('-', '_')}")
    sys.modules[module.__name__] = module
    namespace: dict[str, Any] = module.__dict__
    loop = asyncio.new_event_loop()
    try:
        for block in python:
            where = f"{path.name}:{block.line}"
            code = compile(
                block.code,
                where,
                "exec",
                flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT,
                dont_inherit=True,  # not this file's ``from __future__`` imports
            )
            try:
                result = eval(code, namespace)
                if asyncio.iscoroutine(result):
                    loop.run_until_complete(result)
            except Exception as err:
                raise AssertionError(f"the example at {where} failed: {err!r}") from err
        app = namespace.get("app")
        if app is not None and hasattr(app, "openapi"):
            # FastAPI examples: every path operation's signature must be one
            # FastAPI understands (decorated functions hide ``session``).
            for operation in app.openapi()["paths"].values():
                for details in operation.values():
                    names = {p["name"] for p in details.get("parameters", [])}
                    assert "session" not in names and "db" not in names, names
    finally:
        manager = _api._default
        if manager is not None:
            loop.run_until_complete(manager.adispose())
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
        del sys.modules[module.__name__]


def run_file_blocks(path: Path, files: list[Block], workdir: Path) -> None:
    for block in files:
        name = block.file
        assert name is not None
        (workdir / name).write_text(block.code, encoding="utf-8")
    if not any(b.file and b.file.startswith("test_") for b in files):
        return
    env = dict(os.environ)
    env.pop("DATABASE_URL", None)
    # pytest-asyncio's default strict mode, as a reader's project has it.
    result = run_pytest(workdir, env, asyncio_mode="strict")
    assert result.returncode == 0, f"{path.name} test files:\n{result.stdout}{result.stderr}"
    assert re.search(r"\d+ passed", result.stdout) and "skipped" not in result.stdout


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_examples_run(path: Path, reader_env: Path) -> None:
    found = blocks(path)
    python = [b for b in found if b.language == "python" and b.file is None]
    files = [b for b in found if b.language == "python" and b.file is not None]
    assert python, f"{path.name} has no Python example"
    run_python_blocks(path, python)
    run_file_blocks(path, files, reader_env)


def test_fences_are_closed_and_tagged() -> None:
    """Every fence opens with a language, so no example is silently skipped."""
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        fences = re.findall(r"^```(.*)$", text, re.MULTILINE)
        assert len(fences) % 2 == 0, f"{path.name}: unbalanced code fences"
        openers = fences[0::2]
        assert all(o.split()[0] in {"python", "bash", "text"} for o in openers if o), openers
        assert all(openers), f"{path.name}: a code fence without a language"
