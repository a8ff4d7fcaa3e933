"""Smoke run of the benchmark suite (``python -m benchmarks --smoke``).

It proves the suite still runs end to end and checks the shape of what it
writes: every workload, a ratio or a stated reason for every peer library, the
rows each contender committed, the pool state after the concurrent workload,
instruction counts, the chart. It asserts no speed at all: timings on a shared
machine are noise at this size; the real figures come from a full run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import require_server

ROOT = Path(__file__).resolve().parent.parent

WORKLOADS = {
    "insert_sync_sqlite",
    "insert_async_sqlite",
    "insert_sync_postgresql",
    "insert_async_postgresql",
    "empty_sync_sqlite",
    "empty_async_sqlite",
    "decorator_sync_sqlite",
    "decorator_async_sqlite",
    "join_sync_sqlite",
    "join_async_sqlite",
    "savepoint_sync_sqlite",
    "savepoint_async_sqlite",
    "concurrent_async_postgresql",
    "monitoring_sync_sqlite",
    "monitoring_async_sqlite",
    "readonly_sync_postgresql",
    "readonly_async_postgresql",
    "readonly_sync_postgresql_1ms",
    "readonly_async_postgresql_1ms",
}
PEERS = ("fastapi_async_sqlalchemy", "advanced_alchemy")
CALLGRIND_COUNTED = {"decorator_sync_sqlite", "decorator_async_sqlite"}  # the smoke selection


def _postgresql_url() -> str | None:
    try:
        return require_server("postgresql")
    except pytest.skip.Exception:  # absent locally: run the SQLite part only
        return None


def test_smoke_run_writes_every_workload_and_peer(tmp_path: Path) -> None:
    pg_url = _postgresql_url()
    command = [sys.executable, "-m", "benchmarks", "--smoke", "--out", str(tmp_path)]
    command += ["--pg-url", pg_url] if pg_url else ["--no-postgresql"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    # The timeout only guards against a hang. The run does a fixed amount of work
    # whose wall time grows with the machine's load: most of it is valgrind
    # (callgrind) start-up and counting, which took over 150 s of a 206 s run at a
    # load average of 20 on 2 cores.
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Targets (SPEC section 5)" in done.stdout

    doc = json.loads((tmp_path / "latest.json").read_text())
    assert set(doc["workloads"]) == WORKLOADS
    assert set(doc["peers"]) == set(PEERS)
    for name, entry in doc["workloads"].items():
        if "skipped" in entry:
            assert pg_url is None and "postgresql" in name, (name, entry["skipped"])
            continue
        variants = entry["variants"]
        assert variants["raw"]["ratio"] == 1.0, name
        # The BEGIN recipe is priced on SQLite, beside the plain-engine reference.
        assert ("raw_recipe" in variants) == name.endswith("sqlite"), name
        assert len(variants) >= 2, name
        for peer in PEERS:
            # Each peer is measured or has a stated reason why it has no equivalent.
            measured = peer in variants
            assert measured != (peer in entry["not_applicable"]), (name, peer)
            if measured:
                assert variants[peer]["ratio"] > 0, (name, peer)
            else:
                assert entry["not_applicable"][peer].strip(), (name, peer)
        for variant, figures in variants.items():
            assert figures["ratio"] > 0 and figures["median_us_per_tx"] > 0, (name, variant)
            assert figures["transactions"] > 0, (name, variant)
        # Every contender committed exactly the rows it was asked to.
        assert entry["rows_verified"] is True, entry.get("row_problems")

    if pg_url is not None:
        concurrent = doc["workloads"]["concurrent_async_postgresql"]
        assert concurrent["tx_per_unit"] == 200 and concurrent["throughput"] is True
        assert concurrent["pool_after"]["checked_out"] == 0
        assert concurrent["pool_after"]["size"] == 10
        assert concurrent["sessionscope_active_sessions_after"] == 0
        for figures in concurrent["variants"].values():
            assert figures["pool_checked_out_after_batches_max"] == 0
        # Every contender's share of the hand-written ceiling, and the ceiling
        # against itself: the noise floor of the same rounds.
        assert "raw_close_again" in concurrent["variants"]
        for variant, figures in concurrent["variants"].items():
            assert (variant == "raw_close") != (figures.get("vs_raw_close", 0) > 0), variant
            assert 0 < figures["cpu_share"] < 2, variant
        # The delaying proxy really sat between the client and the server.
        assert doc["meta"]["latency_proxy"]["0.001"]["added_us"] > 0

    if shutil.which("valgrind") is not None:
        assert doc["meta"]["callgrind"]["n"] == 2
        for name in CALLGRIND_COUNTED:
            for variant, figures in doc["workloads"][name]["variants"].items():
                assert figures["instructions_per_tx"] > 0, (name, variant)
                assert figures["instructions_ratio"] > 0, (name, variant)
    else:
        assert "not installed" in doc["meta"]["callgrind"]

    targets = {t["workload"]: t for t in doc["targets"]}
    assert len(doc["targets"]) == 10
    for target in doc["targets"]:
        if "postgresql" in target["workload"] and pg_url is None:
            continue
        assert target["wall"] > 0 and target["met"] in (True, False), target
    assert "pool_checked_out_after" in targets["concurrent_async_postgresql"] or pg_url is None

    png = (tmp_path / "latest.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_opcode_profile_names_where_the_scope_spends() -> None:
    # Bytecode counts are exact, so the profile's split is asserted, not a speed:
    # the scope's own entry and exit are found, and the recipe's BEGIN is the only
    # sessionscope function raw + recipe runs.
    command = [sys.executable, "-m", "benchmarks.opcodes", "--n", "5", "--top", "200"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    sections = done.stdout.split("\n\n")
    recipe = next(s for s in sections if s.startswith("raw_recipe minus raw"))
    scope = next(s for s in sections if s.startswith("sessionscope minus raw"))
    own = [line for line in recipe.splitlines() if "src/sessionscope/" in line]
    assert len(own) == 1 and "_backend.py:_pysqlite_begin" in own[0], recipe
    rows = {
        key: float(count)
        for count, key in (line.split(maxsplit=1) for line in scope.splitlines()[1:])
    }
    assert rows["src/sessionscope/_core.py:open_frame"] > 0
    assert any(k.endswith("transaction_ended") and v > 0 for k, v in rows.items())
