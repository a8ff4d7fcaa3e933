"""The Alembic recipe of docs/alembic.md, run for real: ``alembic upgrade head``
and ``downgrade`` (subprocesses, as a user runs them) with the documented
``env.py`` on the manager's engine, a schema revision, and the documented data
migration running a decorated service bound to Alembic's connection."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text

ROOT = Path(__file__).resolve().parents[1]

MODELS = """
from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "alembic_users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    display_name: Mapped[str | None] = mapped_column(String(50))
"""

REV1 = """
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "alembic_users",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(50), nullable=False),
        sa.Column("display_name", sa.String(50)),
    )
    op.execute("INSERT INTO alembic_users (name) VALUES ('ann lee'), ('bo')")


def downgrade() -> None:
    op.drop_table("alembic_users")
"""


def _doc_block(name: str) -> str:
    text_ = (ROOT / "docs" / "alembic.md").read_text(encoding="utf-8")
    for block in re.findall(r"^```python\n(.*?)^```", text_, re.MULTILINE | re.DOTALL):
        if block.startswith(f"# {name}"):
            return str(block)
    raise AssertionError(f"docs/alembic.md has no block for {name}")


@pytest.mark.parametrize("backend", ["sqlite", "postgresql", "mariadb"])
def test_alembic_upgrade_with_the_documented_env(backend: str, tmp_path: Path) -> None:
    from .conftest import backend_url

    url = backend_url(backend, tmp_path)
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE IF EXISTS alembic_users"))
            conn.execute(text("DROP TABLE IF EXISTS alembic_version"))
    finally:
        engine.dispose()
    (tmp_path / "myapp").mkdir()
    (tmp_path / "myapp" / "__init__.py").write_text("")
    (tmp_path / "myapp" / "models.py").write_text(MODELS)
    versions = tmp_path / "migrations" / "versions"
    versions.mkdir(parents=True)
    (tmp_path / "migrations" / "env.py").write_text(_doc_block("migrations/env.py"))
    (versions / "0001_users.py").write_text(REV1)
    (versions / "0002_backfill_display_names.py").write_text(
        _doc_block("migrations/versions/0002_backfill_display_names.py")
    )
    (tmp_path / "alembic.ini").write_text(
        textwrap.dedent(
            """
            [alembic]
            script_location = migrations
            sqlalchemy.url =
            """
        )
    )
    env = {k: v for k, v in os.environ.items()}
    env["DATABASE_URL"] = url
    env["PYTHONPATH"] = str(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    engine = create_engine(url)
    select_rows = text("SELECT name, display_name FROM alembic_users ORDER BY name")
    try:
        assert "alembic_users" in inspect(engine).get_table_names()
        with engine.connect() as conn:
            rows = conn.execute(select_rows).all()
            version = conn.scalar(text("SELECT version_num FROM alembic_version"))
        down = subprocess.run(
            [sys.executable, "-m", "alembic", "downgrade", "0001"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
        )
        assert down.returncode == 0, down.stdout + down.stderr
        with engine.connect() as conn:
            downgraded = conn.execute(select_rows).all()
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE alembic_users"))
            conn.execute(text("DROP TABLE alembic_version"))
    finally:
        engine.dispose()
    assert [tuple(r) for r in rows] == [("ann lee", "Ann Lee"), ("bo", "Bo")]
    assert version == "0002"
    assert [tuple(r) for r in downgraded] == [("ann lee", None), ("bo", None)]
