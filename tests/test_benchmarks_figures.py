"""The benchmark suite's arithmetic on instruction counts and targets.

Pure functions over made-up counts: what a figure means is asserted exactly,
without running a workload (the smoke run proves the workloads run).
"""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks.run import _apply_instructions, evaluate_targets

CONCURRENT = "concurrent_async_postgresql"


def _entry(throughput: bool, *variants: str) -> dict[str, Any]:
    return {"throughput": throughput, "variants": {v: {"ratio": 1.0} for v in variants}}


def test_a_throughput_workload_gets_the_throughput_its_counts_predict() -> None:
    out = {CONCURRENT: _entry(True, "raw", "raw_close", "sessionscope")}
    counts = {
        CONCURRENT: {
            "raw": [1_600_000.0, 1_700_000.0],
            "raw_close": [1_400_000.0, 1_450_000.0],
            "sessionscope": [1_428_000.0, 1_450_000.0],
        }
    }
    _apply_instructions(out, counts)
    scope = out[CONCURRENT]["variants"]["sessionscope"]
    assert scope["instructions_per_tx"] == 1_439_000
    # Cost ratio per layout, then the mean of the inverses: throughput predicted.
    assert scope["instructions_ratio_layouts"] == [0.8925, 0.8529]
    assert scope["instructions_throughput_ratio"] == pytest.approx(
        (1_600_000 / 1_428_000 + 1_700_000 / 1_450_000) / 2, abs=1e-4
    )
    assert scope["instructions_vs_raw_close"] == pytest.approx(
        (1_400_000 / 1_428_000 + 1.0) / 2, abs=1e-4
    )
    assert "instructions_vs_raw_close" not in out[CONCURRENT]["variants"]["raw_close"]


def test_a_cost_workload_gets_no_throughput_figures() -> None:
    out = {"insert_sync_sqlite": _entry(False, "raw", "sessionscope")}
    _apply_instructions(
        out, {"insert_sync_sqlite": {"raw": [100.0], "sessionscope": [103.0]}}
    )
    scope = out["insert_sync_sqlite"]["variants"]["sessionscope"]
    assert scope["instructions_ratio"] == 1.03
    assert "instructions_throughput_ratio" not in scope
    assert "instructions_vs_raw_close" not in scope


@pytest.mark.parametrize(
    ("instructions", "wall", "met"),
    [(0.99, 0.95, True), (0.97, 1.02, False)],
)
def test_the_ceiling_target_is_judged_on_instructions_with_the_wall_shown(
    instructions: float, wall: float, met: bool
) -> None:
    scope = {
        "ratio": 1.1,
        "vs_raw_close": wall,
        "instructions_vs_raw_close": instructions,
        "instructions_throughput_ratio": 1.16,
        "pool_checked_out_after_batches_max": 0,
    }
    out = {CONCURRENT: {"variants": {"sessionscope": scope}, "pool_after": {"checked_out": 0}}}
    rows = {t["name"]: t for t in evaluate_targets(out) if t["workload"] == CONCURRENT}
    ceiling = rows["throughput vs commit() + close() by hand, same rounds"]
    assert (ceiling["wall"], ceiling["instructions"], ceiling["met"]) == (wall, instructions, met)
    # The pool must be back to 0 checked out, whatever the ratios say.
    out[CONCURRENT]["pool_after"]["checked_out"] = 1
    rows = {t["name"]: t for t in evaluate_targets(out) if t["workload"] == CONCURRENT}
    assert rows["throughput vs commit() + close() by hand, same rounds"]["met"] is False
