"""Interleaved wall-clock measurement and its statistics.

Every round runs one batch of each contender, one after the other (A B C, then
B C A, ...: the order rotates so no contender always runs first or last), and
each contender's time per transaction is divided by raw SQLAlchemy's time *in
the same round*. The reported ratio is the median of those per-round ratios:
a burst of load from another process spoils a round or two, not the result.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Measurement", "Plan", "measure_async", "measure_sync", "summarize"]

BASELINE = "raw"


@dataclass(frozen=True)
class Plan:
    """How long to measure: ``rounds`` rounds of batches of about
    ``batch_seconds`` each, after ``warmup`` units per contender."""

    rounds: int
    batch_seconds: float
    warmup: int
    max_units: int = 100_000


@dataclass
class Measurement:
    units: int
    rounds: int
    per_tx: dict[str, list[float]]  # seconds per transaction, one value per round
    tx_done: dict[str, int]  # transactions each contender ran, warm-up included
    checked_out_max: dict[str, int] = field(default_factory=dict)
    # Seconds of this process's CPU time and of wall time, summed over each
    # contender's batches: their quotient says whether the process is CPU-bound.
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    wall_seconds: dict[str, float] = field(default_factory=dict)

    def record(
        self,
        name: str,
        elapsed: float,
        tx_per_unit: int,
        probe: Callable[[], int] | None,
        cpu: float = 0.0,
    ) -> None:
        """Book one timed batch of ``name``: its wall time, the process CPU time it
        used, and the pool probe read after it."""
        self.per_tx[name].append(elapsed / (self.units * tx_per_unit))
        self.wall_seconds[name] = self.wall_seconds.get(name, 0.0) + elapsed
        self.cpu_seconds[name] = self.cpu_seconds.get(name, 0.0) + cpu
        self.tx_done[name] += self.units * tx_per_unit
        if probe is not None:
            out = probe()
            self.checked_out_max[name] = max(self.checked_out_max.get(name, 0), out)


def _rotations(names: list[str], rounds: int) -> list[list[str]]:
    return [names[r % len(names) :] + names[: r % len(names)] for r in range(rounds)]


def _units_for(plan: Plan, seconds_per_unit: float) -> int:
    return max(1, min(plan.max_units, round(plan.batch_seconds / max(seconds_per_unit, 1e-9))))


def measure_sync(
    runners: dict[str, Callable[[int], None]],
    plan: Plan,
    tx_per_unit: int = 1,
    probe: Callable[[], int] | None = None,
) -> Measurement:
    """Measure sync ``runners`` interleaved; ``probe`` returns the pool's checked-out
    count, read after every batch."""
    names = list(runners)
    tx_done = dict.fromkeys(names, 0)
    for name in names:  # warm caches (compiled SQL, mapper paths) for everyone
        runners[name](plan.warmup)
        tx_done[name] += plan.warmup * tx_per_unit
    start = time.perf_counter()
    runners[BASELINE](plan.warmup)
    tx_done[BASELINE] += plan.warmup * tx_per_unit
    units = _units_for(plan, (time.perf_counter() - start) / plan.warmup)
    gc.collect()
    gc.freeze()  # setup objects out of the collector's way: less noise per batch
    result = Measurement(units, plan.rounds, {n: [] for n in names}, tx_done)
    for order in _rotations(names, plan.rounds):
        for name in order:
            gc.collect()
            c0 = time.process_time()
            t0 = time.perf_counter()
            runners[name](units)
            elapsed = time.perf_counter() - t0
            result.record(name, elapsed, tx_per_unit, probe, time.process_time() - c0)
    gc.unfreeze()
    return result


async def measure_async(
    runners: dict[str, Callable[[int], Awaitable[None]]],
    plan: Plan,
    tx_per_unit: int = 1,
    probe: Callable[[], int] | None = None,
) -> Measurement:
    """Async twin of :func:`measure_sync` (all contenders in the running loop)."""
    names = list(runners)
    tx_done = dict.fromkeys(names, 0)
    for name in names:
        await runners[name](plan.warmup)
        tx_done[name] += plan.warmup * tx_per_unit
    start = time.perf_counter()
    await runners[BASELINE](plan.warmup)
    tx_done[BASELINE] += plan.warmup * tx_per_unit
    units = _units_for(plan, (time.perf_counter() - start) / plan.warmup)
    gc.collect()
    gc.freeze()
    result = Measurement(units, plan.rounds, {n: [] for n in names}, tx_done)
    for order in _rotations(names, plan.rounds):
        for name in order:
            gc.collect()
            c0 = time.process_time()
            t0 = time.perf_counter()
            await runners[name](units)
            elapsed = time.perf_counter() - t0
            result.record(name, elapsed, tx_per_unit, probe, time.process_time() - c0)
    gc.unfreeze()
    return result


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def summarize(m: Measurement, throughput: bool) -> dict[str, dict[str, Any]]:
    """Per contender: median time per transaction (and tx/s), the median of the
    per-round ratios to raw with its interquartile range, and the share of the
    wall time this process spent on a CPU (near 1: the process is the bottleneck).

    For a throughput workload the ratio is raw time / contender time, i.e. the
    throughput ratio (higher is better); otherwise contender / raw (lower is better).
    """
    base = m.per_tx[BASELINE]
    out: dict[str, dict[str, Any]] = {}
    for name, values in m.per_tx.items():
        ratios = [v / b for v, b in zip(values, base, strict=True)]
        if throughput:
            ratios = [1.0 / r for r in ratios]
        q1, q3 = _quartiles(ratios)
        median_s = statistics.median(values)
        out[name] = {
            "median_us_per_tx": round(median_s * 1e6, 2),
            "tx_per_s": round(1.0 / median_s, 1),
            "ratio": round(statistics.median(ratios), 4),
            "ratio_q1": round(q1, 4),
            "ratio_q3": round(q3, 4),
            "transactions": m.tx_done[name],
            "cpu_share": round(m.cpu_seconds[name] / m.wall_seconds[name], 3),
        }
        if name in m.checked_out_max:
            out[name]["pool_checked_out_after_batches_max"] = m.checked_out_max[name]
    return out
