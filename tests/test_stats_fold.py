"""The statistics' batched fold gives exactly the figures of adding every event
one by one, whatever the mix and order of events and reads."""

from __future__ import annotations

import math
from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from sessionscope._stats import DURATION_BUCKETS, JOURNAL_LIMIT, POOL_WAIT_BUCKETS, Stats

# Durations and waits include every bucket bound itself (bounds are inclusive).
_SECONDS = st.one_of(
    st.sampled_from(DURATION_BUCKETS + POOL_WAIT_BUCKETS),
    st.floats(min_value=0.0, max_value=40.0, allow_nan=False),
)
_FUNCTIONS = st.one_of(st.none(), st.sampled_from(["app.a", "app.b", "app.c"]))

_EVENT = st.one_of(
    st.tuples(st.just("opened")),
    st.tuples(st.just("ended"), st.booleans(), st.booleans(), _SECONDS, _FUNCTIONS),
    st.tuples(st.just("joined"), st.sampled_from(["app.a", "app.d"]), _SECONDS, st.booleans()),
    st.tuples(st.just("waited"), _SECONDS),
    st.tuples(st.just("read")),
)


@dataclass
class _Reference:
    """The figures, event by event."""

    opened: int = 0
    ended: int = 0
    committed: int = 0
    failed: int = 0
    slow: int = 0
    durations: list[float] = field(default_factory=list)
    buckets: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BUCKETS) + 1))
    waits: list[float] = field(default_factory=list)
    wait_buckets: list[int] = field(default_factory=lambda: [0] * (len(POOL_WAIT_BUCKETS) + 1))
    functions: dict[str, list[Any]] = field(default_factory=dict)

    def call(self, function: str, duration: float, failed: bool) -> None:
        row = self.functions.setdefault(function, [0, 0, 0.0, 0.0])
        row[0] += 1
        row[1] += failed
        row[2] += duration
        row[3] = max(row[3], duration)


def _check(stats: Stats, ref: _Reference) -> None:
    snapshot = stats.snapshot()
    totals = stats.totals()
    assert snapshot["session_count"] == ref.opened
    assert snapshot["active_sessions"] == ref.opened - ref.ended
    assert snapshot["total_transactions"] == ref.ended
    assert snapshot["committed_transactions"] == ref.committed
    assert snapshot["rolled_back_transactions"] == ref.ended - ref.committed
    assert snapshot["failed_transactions"] == ref.failed
    assert snapshot["slow_transactions"] == ref.slow
    assert snapshot["max_duration"] == max(ref.durations, default=0.0)
    assert math.isclose(totals["dur_sum"], math.fsum(ref.durations), abs_tol=1e-9)
    window = sorted(ref.durations[-1024:])
    expected_p95 = window[max(1, math.ceil(0.95 * len(window))) - 1] if window else 0.0
    assert snapshot["p95_duration"] == expected_p95
    assert totals["buckets"] == ref.buckets
    assert snapshot["pool_acquisitions"] == len(ref.waits)
    assert snapshot["max_pool_wait"] == max(ref.waits, default=0.0)
    assert math.isclose(totals["pool_wait_sum"], math.fsum(ref.waits), abs_tol=1e-9)
    assert totals["pool_wait_buckets"] == ref.wait_buckets
    assert set(snapshot["functions"]) == set(ref.functions)
    for name, (calls, failures, total, longest) in ref.functions.items():
        row = snapshot["functions"][name]
        assert (row["calls"], row["failures"], row["max_duration"]) == (calls, failures, longest)
        assert math.isclose(totals["functions"][name][2], total, abs_tol=1e-9)


@settings(max_examples=300, deadline=None)
@given(st.lists(_EVENT, max_size=5 * JOURNAL_LIMIT))
def test_batched_figures_equal_event_by_event_figures(events: list[tuple[Any, ...]]) -> None:
    stats = Stats()
    ref = _Reference()
    threshold = 1.0
    for event in events:
        kind = event[0]
        if kind == "opened":
            stats.session_opened()
            ref.opened += 1
        elif kind == "ended":
            _, committed, failed, duration, function = event
            slow = stats.transaction_ended(committed, failed, duration, threshold, function)
            assert slow is (duration > threshold)
            ref.ended += 1
            ref.committed += committed
            ref.failed += failed
            ref.slow += slow
            ref.durations.append(duration)
            ref.buckets[bisect_left(DURATION_BUCKETS, duration)] += 1
            if function is not None:
                ref.call(function, duration, failed)
        elif kind == "joined":
            _, function, duration, failed = event
            stats.function_ended(function, duration, failed)
            ref.call(function, duration, failed)
        elif kind == "waited":
            stats.pool_waited(event[1])
            ref.waits.append(event[1])
            ref.wait_buckets[bisect_left(POOL_WAIT_BUCKETS, event[1])] += 1
        else:
            _check(stats, ref)
    _check(stats, ref)


def test_a_fold_never_counts_an_end_without_its_opening(monkeypatch: Any) -> None:
    """Other threads record while a fold takes the journals off one by one: a
    session opened and ended in between must not be counted as ended but not
    opened (``active_sessions`` below zero)."""
    import sessionscope._stats as stats_module

    stats = Stats()
    real_take = stats_module._take
    injected = [False]

    def take_while_another_thread_records(journal: Any) -> Any:
        taken = real_take(journal)
        if not injected[0]:
            # Between two journals, a session opens and commits elsewhere.
            injected[0] = True
            stats._opened.append(None)
            stats._committed.append(0.001)
        return taken

    monkeypatch.setattr(stats_module, "_take", take_while_another_thread_records)
    stats.session_opened()
    stats.transaction_ended(True, False, 0.001, 1.0, None)
    snapshot = stats.snapshot()
    assert snapshot["active_sessions"] >= 0
    assert snapshot["session_count"] >= snapshot["total_transactions"]
    monkeypatch.undo()
    final = stats.snapshot()
    assert (final["session_count"], final["total_transactions"], final["active_sessions"]) == (
        2,
        2,
        0,
    )
