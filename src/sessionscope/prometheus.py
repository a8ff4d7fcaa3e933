"""Prometheus exporter (install the ``sessionscope[prometheus]`` extra).

::

    from sessionscope.prometheus import register

    register()                      # the default manager, on prometheus_client's REGISTRY
    register(orders, billing)       # several SessionManager instances, one collector

The collector reads the managers' statistics when Prometheus scrapes, so it adds
no work to transactions. It reads the monotonic totals, not the
``get_session_stats()`` view: ``reset_session_stats()`` never makes an exported
counter go down.

Every series has a ``manager`` label (``SessionManager.name``: the URL with its
password hidden, unless named). Counters end in ``_total``, durations are
seconds. The read-routing series (``sessionscope_routed_reads_total``,
``sessionscope_read_fallbacks_total``, ``sessionscope_replica_connect_failures_total``,
``sessionscope_replica_healthy``) are exported for managers with read replicas
only. Success rate is left to PromQL, for example::

    1 - sum(rate(sessionscope_transactions_total{outcome="failed"}[5m]))
      / sum(rate(sessionscope_transactions_total[5m]))

Importing this module imports ``prometheus_client``; ``import sessionscope``
never does.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from ._extras import missing_extra
from ._manager import SessionManager

try:
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
        SummaryMetricFamily,
    )
    from prometheus_client.registry import REGISTRY, CollectorRegistry
except ImportError as err:
    raise missing_extra("sessionscope.prometheus", "prometheus", err) from err
from ._stats import DURATION_BUCKETS, POOL_WAIT_BUCKETS, RoutingCounts, routing_series

__all__ = ["SessionScopeCollector", "register"]

_POOL_GAUGES = (
    ("size", "sessionscope_pool_size", "Connections the pool keeps (pool_size)."),
    ("checked_out", "sessionscope_pool_checked_out", "Connections in use."),
    ("checked_in", "sessionscope_pool_checked_in", "Idle connections in the pool."),
    (
        "overflow",
        "sessionscope_pool_overflow",
        "Connections beyond pool_size (SQLAlchemy's figure: negative until the pool fills).",
    ),
)

# Families a manager without read replicas has no series in.
_ROUTING_FAMILIES = ("routed_reads", "read_fallbacks", "connect_failures", "replica_healthy")


class SessionScopeCollector:
    """A ``prometheus_client`` collector for one or more managers.

    With no manager given it follows the default manager at each scrape (so a
    later or repeated ``setup_database_connection()`` is picked up; before setup
    it exports nothing). Give managers distinct ``name=`` values when several
    point at the same URL, or their series collide.
    """

    def __init__(self, *managers: SessionManager) -> None:
        self._managers = list(managers)

    def add(self, manager: SessionManager) -> None:
        """Export ``manager`` too."""
        self._managers.append(manager)

    def _targets(self) -> list[SessionManager]:
        if self._managers:
            return list(self._managers)
        from ._api import default_manager_or_none

        default = default_manager_or_none()
        return [] if default is None else [default]

    def describe(self) -> Iterable[Metric]:
        """The metric families, without samples (lets a registry check names
        without reading any statistics)."""
        return self._families().values()

    def collect(self) -> Iterable[Metric]:
        families = self._families()
        for manager in self._targets():
            _fill(families, manager)
        for key in _ROUTING_FAMILIES:
            # Without replicas the routing families stay out of the exposition
            # (an empty family would still print its HELP and TYPE lines).
            if not families[key].samples:
                del families[key]
        return families.values()

    @staticmethod
    def _families() -> dict[str, Any]:
        m = ["manager"]
        families: dict[str, Any] = {
            "sessions": CounterMetricFamily(
                "sessionscope_sessions", "Sessions opened by sessionscope scopes.", labels=m
            ),
            "active": GaugeMetricFamily(
                "sessionscope_active_sessions", "Sessions open right now.", labels=m
            ),
            "transactions": CounterMetricFamily(
                "sessionscope_transactions",
                "Transactions ended, by outcome: committed, rolled_back (quietly: "
                "auto_commit=False or set_rollback) or failed (an error ended it).",
                labels=[*m, "outcome"],
            ),
            "duration": HistogramMetricFamily(
                "sessionscope_transaction_duration_seconds",
                "Time from scope entry to the session's close.",
                labels=m,
                unit="seconds",
            ),
            "slow": CounterMetricFamily(
                "sessionscope_slow_transactions",
                "Transactions longer than slow_threshold.",
                labels=m,
            ),
            "retries": CounterMetricFamily(
                "sessionscope_retries",
                "Retries after transient errors, by error class.",
                labels=[*m, "error"],
            ),
            "savepoints": CounterMetricFamily(
                "sessionscope_savepoints",
                "Savepoints ended, by outcome: released or rolled_back.",
                labels=[*m, "outcome"],
            ),
            "cancellations": CounterMetricFamily(
                "sessionscope_cancellations", "Async scopes ended by cancellation.", labels=m
            ),
            "long_held": CounterMetricFamily(
                "sessionscope_long_held_sessions",
                "Sessions reported open longer than long_session_warning.",
                labels=m,
            ),
            "pool_timeouts": CounterMetricFamily(
                "sessionscope_pool_timeouts",
                "Checkouts that gave up waiting for a pooled connection.",
                labels=m,
            ),
            "pool_wait": HistogramMetricFamily(
                "sessionscope_pool_wait_seconds",
                "Time to acquire a pooled connection (queue wait, connect or pre-ping).",
                labels=m,
                unit="seconds",
            ),
            "function_duration": SummaryMetricFamily(
                "sessionscope_function_duration_seconds",
                "Calls of decorated functions and their time.",
                labels=[*m, "function"],
                unit="seconds",
            ),
            "function_failures": CounterMetricFamily(
                "sessionscope_function_failures",
                "Calls of decorated functions that raised.",
                labels=[*m, "function"],
            ),
            "routed_reads": CounterMetricFamily(
                "sessionscope_routed_reads",
                "Read-only sessions routed (managers with replicas), counted on the "
                "engine their first connection landed on (primary or replicaN), by "
                "reason: selected or fallback (a replica), read_your_writes, "
                "no_replica_available or fallback (the primary).",
                labels=[*m, "engine", "reason"],
            ),
            "read_fallbacks": CounterMetricFamily(
                "sessionscope_read_fallbacks",
                "Routed reads re-pointed after a replica failed to connect.",
                labels=m,
            ),
            "connect_failures": CounterMetricFamily(
                "sessionscope_replica_connect_failures",
                "Failed connects that took a replica out of rotation.",
                labels=[*m, "replica"],
            ),
            "replica_healthy": GaugeMetricFamily(
                "sessionscope_replica_healthy",
                "1 while a replica is in rotation, 0 during its cool-down.",
                labels=[*m, "replica"],
            ),
        }
        for key, name, doc in _POOL_GAUGES:
            families[f"pool_{key}"] = GaugeMetricFamily(name, doc, labels=[*m, "engine"])
        return families


def _fill(families: dict[str, Any], manager: SessionManager) -> None:
    t = manager.stats.totals()
    created = manager.stats.created
    name = manager.name
    families["sessions"].add_metric([name], t["session_count"], created)
    families["active"].add_metric([name], t["active_sessions"])
    failed = t["failed"]
    for outcome, value in (
        ("committed", t["committed"]),
        ("rolled_back", t["rolled_back"] - failed),
        ("failed", failed),
    ):
        families["transactions"].add_metric([name, outcome], value, created)
    families["duration"].add_metric(
        [name], list(_cumulative(t["buckets"], DURATION_BUCKETS)), t["dur_sum"]
    )
    families["slow"].add_metric([name], t["slow"], created)
    for error, value in sorted(t["retry_errors"].items()):
        families["retries"].add_metric([name, error], value, created)
    savepoint_rollbacks = t["savepoint_rollbacks"]
    families["savepoints"].add_metric(
        [name, "released"], t["savepoints"] - savepoint_rollbacks, created
    )
    families["savepoints"].add_metric([name, "rolled_back"], savepoint_rollbacks, created)
    families["cancellations"].add_metric([name], t["cancellations"], created)
    families["long_held"].add_metric([name], t["long_held"], created)
    families["pool_timeouts"].add_metric([name], t["pool_timeouts"], created)
    families["pool_wait"].add_metric(
        [name],
        list(_cumulative(t["pool_wait_buckets"], POOL_WAIT_BUCKETS)),
        t["pool_wait_sum"],
    )
    for function, (calls, failures, total) in sorted(t["functions"].items()):
        families["function_duration"].add_metric([name, function], calls, total)
        families["function_failures"].add_metric([name, function], failures, created)
    for role, figures in manager.pool_status().items():
        for key, _, _ in _POOL_GAUGES:
            value = figures.get(key)
            if isinstance(value, (int, float)):
                families[f"pool_{key}"].add_metric([name, role], value)
    health = manager.replica_health()
    if health:
        _fill_routing(families, name, t["routing"], health, created)


def _fill_routing(
    families: dict[str, Any],
    name: str,
    counts: RoutingCounts,
    health: dict[str, bool],
    created: float,
) -> None:
    reads, failures = routing_series(counts, health)
    for engine, reason, value in reads:
        families["routed_reads"].add_metric([name, engine, reason], value, created)
    families["read_fallbacks"].add_metric([name], counts["fallbacks"], created)
    for replica, value in failures:
        families["connect_failures"].add_metric([name, replica], value, created)
    for replica, healthy in health.items():
        families["replica_healthy"].add_metric([name, replica], 1 if healthy else 0)


def _cumulative(buckets: list[int], bounds: tuple[float, ...]) -> Iterator[tuple[str, float]]:
    running = 0
    for bound, count in zip((*bounds, None), buckets, strict=True):
        running += count
        yield ("+Inf" if bound is None else repr(bound)), running


def register(
    *managers: SessionManager, registry: CollectorRegistry = REGISTRY
) -> SessionScopeCollector:
    """Register a :class:`SessionScopeCollector` for ``managers`` (none: the default
    manager) on ``registry`` and return it (``registry.unregister(collector)``
    removes it). One collector per registry: to export another manager later,
    call ``collector.add(manager)``."""
    collector = SessionScopeCollector(*managers)
    registry.register(collector)
    return collector
