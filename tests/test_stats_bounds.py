"""Statistics stay bounded: per-function figures keep at most FUNCTION_LIMIT
names and add up every further function under OTHER_FUNCTIONS."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sessionscope import SessionManager
from sessionscope._stats import FUNCTION_LIMIT, JOURNAL_LIMIT, OTHER_FUNCTIONS, Stats


def _end(stats: Stats, function: str, *, failed: bool = False) -> None:
    stats.session_opened()
    stats.transaction_ended(
        committed=not failed, failed=failed, duration=0.002, slow_threshold=1.0, function=function
    )


def test_function_table_keeps_at_most_the_limit_plus_other() -> None:
    stats = Stats()
    heard: list[str | None] = []
    stats.add_listener(lambda duration, committed, failed, function: heard.append(function))
    total = 100_000
    for i in range(total):
        _end(stats, f"app.generated_{i}", failed=i % 10 == 0)
    functions = stats.snapshot()["functions"]
    assert len(functions) == FUNCTION_LIMIT + 1
    other = functions[OTHER_FUNCTIONS]
    assert other["calls"] == total - FUNCTION_LIMIT
    assert sum(f["calls"] for f in functions.values()) == total
    assert sum(f["failures"] for f in functions.values()) == total // 10
    # Exporters hear the name the call was recorded under, so their series are
    # bounded too.
    assert set(heard[FUNCTION_LIMIT:]) == {OTHER_FUNCTIONS}
    assert heard[:3] == ["app.generated_0", "app.generated_1", "app.generated_2"]
    assert len(stats.totals()["functions"]) == FUNCTION_LIMIT + 1


def test_known_functions_keep_their_own_figures_once_the_table_is_full() -> None:
    stats = Stats()
    for i in range(FUNCTION_LIMIT + 5):
        _end(stats, f"app.f{i}")
    _end(stats, "app.f0")
    stats.function_ended("app.f1", 0.001, failed=True)  # a joined call
    stats.function_ended("app.late", 0.001, failed=False)
    functions = stats.snapshot()["functions"]
    assert functions["app.f0"]["calls"] == 2
    assert (functions["app.f1"]["calls"], functions["app.f1"]["failures"]) == (2, 1)
    assert "app.late" not in functions
    assert functions[OTHER_FUNCTIONS]["calls"] == 6


def test_decorated_functions_past_the_limit_land_in_other(tmp_path: Path) -> None:
    manager = SessionManager(f"sqlite:///{tmp_path / 'bound.db'}")
    try:
        made: list[Any] = []
        for i in range(FUNCTION_LIMIT + 20):
            # Distinct qualified names, as generated functions would have.
            def body(session: Any) -> int:
                return 1

            body.__qualname__ = f"generated_{i}"
            made.append(manager.with_session(body))
        assert sum(fn() for fn in made) == FUNCTION_LIMIT + 20
        stats = manager.get_stats()
        assert stats["total_transactions"] == FUNCTION_LIMIT + 20
        assert len(stats["functions"]) == FUNCTION_LIMIT + 1
        assert stats["functions"][OTHER_FUNCTIONS]["calls"] == 20
    finally:
        manager.dispose()


def _journals(stats: Stats) -> list[int]:
    """How many events wait in each of the statistics' journals."""
    return [
        len(stats._opened),
        len(stats._committed),
        len(stats._committed_in),
        len(stats._journal),
        len(stats._waits),
    ]


def test_the_journal_never_holds_more_than_its_limit() -> None:
    """Events wait in the journals until a read or the event that fills one:
    the figures are exact at every read, and the journals' memory is bounded."""
    stats = Stats()
    for _ in range(10 * JOURNAL_LIMIT + 3):
        stats.session_opened()
        assert stats.active_sessions == 1  # a read folds what is pending
        stats.transaction_ended(
            committed=True, failed=False, duration=0.001, slow_threshold=1.0, function=None
        )
        stats.pool_waited(0.0001)
        assert max(_journals(stats)) < JOURNAL_LIMIT
    for i in range(5 * JOURNAL_LIMIT):
        stats.session_opened()
        stats.pool_waited(0.0001)
        stats.transaction_ended(
            committed=False, failed=True, duration=0.002, slow_threshold=1.0, function="m.f"
        )
        stats.function_ended("m.g", 0.001, failed=False)
        stats.session_opened()
        stats.transaction_ended(
            committed=True, failed=False, duration=0.001, slow_threshold=1.0, function=f"m.h{i % 3}"
        )
        # Every journal is folded whenever one fills: none outgrows the limit.
        assert max(_journals(stats)) <= JOURNAL_LIMIT
    snapshot = stats.snapshot()
    assert _journals(stats) == [0, 0, 0, 0, 0]
    total = 20 * JOURNAL_LIMIT + 3
    assert (snapshot["session_count"], snapshot["total_transactions"]) == (total, total)
    assert snapshot["active_sessions"] == 0
    failed = 5 * JOURNAL_LIMIT
    assert snapshot["failed_transactions"] == snapshot["rolled_back_transactions"] == failed
    assert snapshot["committed_transactions"] == total - failed
    assert snapshot["pool_acquisitions"] == 15 * JOURNAL_LIMIT + 3
    assert snapshot["functions"]["m.f"]["calls"] == snapshot["functions"]["m.g"]["calls"]
    assert sum(snapshot["functions"][f"m.h{i}"]["calls"] for i in range(3)) == failed
    assert snapshot["max_duration"] == 0.002
