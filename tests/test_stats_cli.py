"""``sessionscope stats`` and the statistics table at the end of ``sessionscope
demo``, run as a user runs them (a subprocess), plus the table renderer."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from sqlalchemy.engine import make_url

from sessionscope._report import format_stats
from sessionscope._stats import Stats

from .conftest import require_server

PASSWORD = "Pw-cli-5e0b"


def _run(
    args: list[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    merged = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    merged.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "sessionscope", *args],
        cwd=cwd, env=merged, capture_output=True, text=True, timeout=120,
    )


def test_stats_table(db_url: str, tmp_path: Path) -> None:
    out = _run(["stats", "--url", db_url, "--probes", "4"], tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    shown = make_url(db_url).render_as_string(hide_password=True)
    assert lines[0] == f"sessionscope stats on {shown} (4 probes)"
    rows = dict(
        re.split(r"\s{2,}", line.strip(), maxsplit=1)
        for line in lines[3:19]
        if line.startswith("  ") and not line.strip().startswith("-")
    )
    assert rows["sessions opened"] == "4"
    assert rows["committed"] == "4"
    assert rows["success rate"] == "100.00 %"
    assert rows["active sessions"] == "0"
    pools = lines[lines.index("Connection pools") :]
    assert pools[3].split()[:3] == ["sync", "QueuePool", "5"]


def test_stats_json_uses_database_url_and_hides_the_password(tmp_path: Path) -> None:
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


def test_stats_on_the_embedded_default(tmp_path: Path) -> None:
    out = _run(["stats", "--json", "--probes", "1"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["url"] == "sqlite:///sessionscope.db"
    assert (tmp_path / "sessionscope.db").exists()


def test_stats_unreachable_database_fails_clearly(tmp_path: Path) -> None:
    url = f"postgresql+psycopg://app:{PASSWORD}@127.0.0.1:1/app"
    out = _run(["stats", "--url", url], tmp_path)
    assert out.returncode == 1
    assert "stats: cannot use postgresql+psycopg://app:***@127.0.0.1:1/app" in out.stderr
    assert PASSWORD not in out.stdout + out.stderr


def test_demo_ends_with_the_statistics_table(tmp_path: Path) -> None:
    out = _run(["demo"], tmp_path)
    assert out.returncode == 0, out.stderr
    tail = out.stdout[out.stdout.index("\nstatistics\n") :]
    for section in ("success rate", "Decorated functions", "Connection pools"):
        assert section in tail
    assert "sessionscope._demo.run_demo.<locals>.create_user" in tail


def test_format_stats_renders_any_snapshot() -> None:
    stats = Stats()
    stats.session_opened()
    stats.transaction_ended(
        committed=True, failed=False, duration=0.0025, slow_threshold=1.0, function="m.f"
    )
    stats.retried(KeyError())
    snapshot = stats.snapshot()
    snapshot["pool"] = {"sync": {"pool_class": "NullPool"}}
    text = format_stats(snapshot, title="t")
    assert text.startswith("t\n=\n")
    assert "  m.f           1         0   2.500   2.500" in text
    assert "  KeyError        1" in text
    assert "  sync    NullPool     -           -            -         -          -" in text
    snapshot["routing"] = {
        "engines": {
            "primary": {"role": "primary", "reads": 3},
            "replica1": {"role": "replica", "reads": 7, "healthy": True, "connect_failures": 0},
        }
    }
    routed = format_stats(snapshot)
    assert "  primary   primary      3        -                 -" in routed
    assert "  replica1  replica      7     True                 0" in routed
    # A partial or foreign snapshot still renders, with "-" for what is missing.
    assert "sessions opened" in format_stats({})
    assert "(no engine created yet)" in format_stats({})
