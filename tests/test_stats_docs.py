"""Every Python example of docs/monitoring.md runs, on SQLite, as a reader would
run it (an empty directory, no DATABASE_URL, no default manager)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from sessionscope import SessionManager, _api

from .test_docs import blocks, run_python_blocks

PAGE = Path(__file__).resolve().parents[1] / "docs" / "monitoring.md"


@pytest.fixture
def reader_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setattr(_api, "_default", None)
    yield tmp_path


def test_monitoring_page_examples_run(reader_dir: Path) -> None:
    python = [b for b in blocks(PAGE) if b.language == "python"]
    assert len(python) == 7
    run_python_blocks(PAGE, python)


def test_monitoring_page_fences_are_tagged() -> None:
    openers = re.findall(r"^```(.*)$", PAGE.read_text(encoding="utf-8"), re.MULTILINE)[0::2]
    assert openers and all(o in {"python", "text", "bash"} for o in openers), openers


def test_monitoring_page_lists_every_figure() -> None:
    """The table of figures names every key of a snapshot."""
    page = PAGE.read_text(encoding="utf-8")
    snapshot = SessionManager("sqlite://").get_stats()
    for key in snapshot:
        assert f"`{key}`" in page, key
