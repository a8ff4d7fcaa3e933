"""The increment workload run against the clusters, and the checks of its effects.

Each unit of work reads the counter ``FOR UPDATE``, writes it back plus one and
inserts its own unique key into ``effects`` with the port of the server it ran
on. So after a run: every unit reported done has its key (none lost), a key
appears at most once (none doubled: the primary key would refuse a second
insert), the counter equals the number of keys (each effect applied whole), and
only units reported as commit-outcome-unknown may be missing or present.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from sessionscope import CommitOutcomeUnknownError


@dataclass
class Outcomes:
    """What each unit of work reported, collected from many threads or tasks."""

    done: set[str] = field(default_factory=set)
    unknown: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)
    finished_at: dict[str, float] = field(default_factory=dict)
    port: dict[str, int] = field(default_factory=dict)  # where a done unit ran, if known
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, key: str, err: BaseException | None, port: int | None = None) -> None:
        with self.lock:
            if err is None:
                self.done.add(key)
                self.finished_at[key] = time.monotonic()
                if port is not None:
                    self.port[key] = port
            elif isinstance(err, CommitOutcomeUnknownError):
                self.unknown.add(key)
            else:
                self.failed[key] = f"{type(err).__name__}: {err}"[:300]

    def done_by(self, key: str, moment: float) -> bool:
        """Whether ``key`` was reported done at or before ``moment``."""
        return 0 < self.finished_at.get(key, 0) <= moment

    def check(self, keys: set[str], counter: int) -> None:
        """Assert no unit was lost or doubled and every effect applied whole."""
        assert not self.failed, self.failed
        assert self.done <= keys, f"lost: {sorted(self.done - keys)}"
        assert keys <= self.done | self.unknown, f"unexpected: {sorted(keys - self.done)}"
        assert counter == len(keys), (counter, len(keys))


def recovery_times(
    outcomes: Outcomes,
    fault_at: float,
    workers: dict[str, list[str]],
    on_port: int | None = None,
) -> list[float]:
    """Per worker: seconds from the fault to its first unit done after it (on
    the server at ``on_port``, when given)."""
    times = []
    for keys in workers.values():
        after = [
            outcomes.finished_at[k]
            for k in keys
            if outcomes.finished_at.get(k, 0) > fault_at
            and (on_port is None or outcomes.port.get(k) == on_port)
        ]
        if after:
            times.append(min(after) - fault_at)
    return times


def unfinished(outcomes: Outcomes, fault_at: float, workers: dict[str, list[str]]) -> int:
    """How many workers had units left at the fault whose outcome is known: under
    contention a worker can win every conflict and finish all its units before
    the others start, and it has nothing to carry on with afterwards."""
    return sum(
        1
        for keys in workers.values()
        if any(not outcomes.done_by(k, fault_at) and k not in outcomes.unknown for k in keys)
    )


def per_worker(outcomes: Outcomes, fault_at: float, workers: dict[str, list[str]]) -> str:
    """Per worker: units done before and after the fault, unknown and failed."""
    parts = []
    for name, keys in workers.items():
        before = sum(1 for k in keys if outcomes.done_by(k, fault_at))
        after = sum(1 for k in keys if outcomes.finished_at.get(k, 0) > fault_at)
        unknown = sum(1 for k in keys if k in outcomes.unknown)
        failed = sum(1 for k in keys if k in outcomes.failed)
        parts.append(f"{name}: {before} before, {after} after, {unknown} unknown, {failed} failed")
    return "; ".join(parts)


def summary(times: list[float]) -> str:
    if not times:
        return "n/a"
    return f"median {statistics.median(times):.2f} s, max {max(times):.2f} s"


def describe_run(name: str, stats: dict[str, Any], outcomes: Outcomes, keys: set[str]) -> str:
    return (
        f"{name}: {len(outcomes.done)} done, {len(outcomes.unknown)} outcome-unknown "
        f"({len(outcomes.unknown & keys)} of them committed), {len(keys)} effects counted, "
        f"{stats['retries']} retries {dict(stats['retry_errors'])}"
    )
