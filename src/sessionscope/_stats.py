"""Statistics counters, durations and snapshots (pure, thread- and task-safe)."""

from __future__ import annotations

import math
import threading
from collections import deque
from typing import Any

__all__ = ["Stats"]

_WINDOW = 1024  # transactions kept for percentiles: bounded memory, recent behaviour


class _FuncStats:
    __slots__ = ("calls", "failures", "max", "total")

    def __init__(self) -> None:
        self.calls = 0
        self.failures = 0
        self.total = 0.0
        self.max = 0.0


class Stats:
    """Counters of one manager.

    All updates take one lock, held for a few attribute updates only: exact under
    threads, and cheap in asyncio where there is no contention. ``reset()`` zeroes
    the counters but keeps the live ``active_sessions`` gauge, which describes
    sessions that are still open.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.active_sessions = 0
        self._zero()

    def _zero(self) -> None:
        self.session_count = 0
        self.total_transactions = 0
        self.committed = 0
        self.rolled_back = 0
        self.failed = 0
        self.retries = 0
        self.savepoints = 0
        self.savepoint_rollbacks = 0
        self.cancellations = 0
        self.slow = 0
        self.dur_sum = 0.0
        self.dur_max = 0.0
        self.durations: deque[float] = deque(maxlen=_WINDOW)
        self.functions: dict[str, _FuncStats] = {}
        self.retry_errors: dict[str, int] = {}

    def reset(self) -> None:
        """Zero every counter except the ``active_sessions`` gauge."""
        with self._lock:
            self._zero()

    def session_opened(self) -> None:
        with self._lock:
            self.session_count += 1
            self.active_sessions += 1

    def transaction_ended(
        self,
        *,
        committed: bool,
        failed: bool,
        duration: float,
        slow_threshold: float,
        function: str | None,
    ) -> bool:
        """Record the end of a scope that owned its session; return True if slow.

        ``failed`` means an error ended it (including a failed COMMIT); a quiet
        rollback (``auto_commit=False``, ``set_rollback``) is not a failure.
        """
        slow = duration > slow_threshold
        with self._lock:
            self.active_sessions -= 1
            self.total_transactions += 1
            if committed:
                self.committed += 1
            else:
                self.rolled_back += 1
            if failed:
                self.failed += 1
            self.dur_sum += duration
            if duration > self.dur_max:
                self.dur_max = duration
            self.durations.append(duration)
            if slow:
                self.slow += 1
            if function is not None:
                fs = self.functions.get(function)
                if fs is None:
                    fs = self.functions[function] = _FuncStats()
                fs.calls += 1
                fs.total += duration
                if duration > fs.max:
                    fs.max = duration
                if failed:
                    fs.failures += 1
        return slow

    def savepoint_ended(self, *, rolled_back: bool) -> None:
        with self._lock:
            self.savepoints += 1
            if rolled_back:
                self.savepoint_rollbacks += 1

    def retried(self, error: BaseException) -> None:
        name = type(error).__name__
        with self._lock:
            self.retries += 1
            self.retry_errors[name] = self.retry_errors.get(name, 0) + 1

    def cancelled(self) -> None:
        with self._lock:
            self.cancellations += 1

    def snapshot(self) -> dict[str, Any]:
        """A consistent copy of every figure, as plain JSON-friendly values."""
        with self._lock:
            total = self.total_transactions
            durations = sorted(self.durations)
            functions = {
                name: {
                    "calls": fs.calls,
                    "failures": fs.failures,
                    "avg_duration": fs.total / fs.calls if fs.calls else 0.0,
                    "max_duration": fs.max,
                }
                for name, fs in self.functions.items()
            }
            return {
                "session_count": self.session_count,
                "active_sessions": self.active_sessions,
                "total_transactions": total,
                "failed_transactions": self.failed,
                "success_rate": 100.0 if total == 0 else (total - self.failed) * 100.0 / total,
                "committed_transactions": self.committed,
                "rolled_back_transactions": self.rolled_back,
                "retries": self.retries,
                "retry_errors": dict(self.retry_errors),
                "savepoints": self.savepoints,
                "savepoint_rollbacks": self.savepoint_rollbacks,
                "cancellations": self.cancellations,
                "slow_transactions": self.slow,
                "avg_duration": self.dur_sum / total if total else 0.0,
                "p95_duration": _percentile(durations, 0.95),
                "max_duration": self.dur_max,
                "functions": functions,
            }


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    # Nearest-rank: an actual observed duration, never an interpolated one.
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]
