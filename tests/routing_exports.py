"""The read-routing figures one manager's exporters report, read back through
each exporter's own client: ``prometheus_client``'s ``CollectorRegistry`` and
the OpenTelemetry SDK's ``InMemoryMetricReader``.

Both are normalised to one form, so a test compares them with each other, with
the expected counts, and with what they said before a ``reset_stats()``:

* ``("reads", engine, reason)``: routed reads (a counter);
* ``("fallbacks",)``: reads re-pointed after a failed connect (a counter);
* ``("connect_failures", replica)``: a counter;
* ``("healthy", replica)``: 1 or 0 (a gauge).
"""

from __future__ import annotations

from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import CollectorRegistry

from sessionscope import SessionManager
from sessionscope.otel import instrument
from sessionscope.prometheus import register

Figures = dict[tuple[str, ...], float]

# Prometheus sample name -> (figure, the labels naming it after "manager").
_PROMETHEUS = {
    "sessionscope_routed_reads_total": ("reads", ("engine", "reason")),
    "sessionscope_read_fallbacks_total": ("fallbacks", ()),
    "sessionscope_replica_connect_failures_total": ("connect_failures", ("replica",)),
    "sessionscope_replica_healthy": ("healthy", ("replica",)),
}
_OTEL = {
    "sessionscope.routing.reads": (
        "reads",
        ("sessionscope.routing.engine", "sessionscope.routing.reason"),
    ),
    "sessionscope.routing.fallbacks": ("fallbacks", ()),
    "sessionscope.replica.connect_failures": ("connect_failures", ("sessionscope.replica.name",)),
    "sessionscope.replica.healthy": ("healthy", ("sessionscope.replica.name",)),
}


class Exported:
    """A Prometheus collector and an OpenTelemetry instrumentation of ``manager``
    (its own ``MeterProvider``); :meth:`close` detaches both."""

    def __init__(self, manager: SessionManager) -> None:
        self.manager = manager
        self.registry = CollectorRegistry()
        self.collector = register(manager, registry=self.registry)
        self.reader = InMemoryMetricReader()
        self.provider = MeterProvider(metric_readers=[self.reader])
        self.instrumentation = instrument(manager, meter_provider=self.provider)

    def prometheus(self) -> Figures:
        figures: Figures = {}
        for metric in self.registry.collect():
            for sample in metric.samples:
                known = _PROMETHEUS.get(sample.name)
                if known is None:
                    continue
                assert sample.labels["manager"] == self.manager.name
                figure, labels = known
                figures[(figure, *(sample.labels[label] for label in labels))] = sample.value
        return figures

    def otel(self) -> Figures:
        figures: Figures = {}
        data = self.reader.get_metrics_data()
        if data is None:
            return figures
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    known = _OTEL.get(metric.name)
                    if known is None:
                        continue
                    figure, attributes = known
                    for point in metric.data.data_points:
                        attrs: Any = point.attributes
                        assert attrs["sessionscope.manager"] == self.manager.name
                        key = (figure, *(str(attrs[a]) for a in attributes))
                        figures[key] = point.value
        return figures

    def both(self) -> Figures:
        """The figures, after checking that both exporters report the same."""
        prometheus = self.prometheus()
        assert prometheus == self.otel()
        return prometheus

    def close(self) -> None:
        self.instrumentation.uninstrument()
        self.provider.shutdown()
        self.registry.unregister(self.collector)


def expected(
    replicas: tuple[str, ...],
    reads: dict[tuple[str, str], int] | None = None,
    fallbacks: int = 0,
    connect_failures: dict[str, int] | None = None,
    unhealthy: tuple[str, ...] = (),
) -> Figures:
    """The full set of figures of a manager with ``replicas`` (names), every
    series at 0 unless given."""
    figures: Figures = {}
    for reason in ("read_your_writes", "no_replica_available", "fallback"):
        figures[("reads", "primary", reason)] = 0
    for replica in replicas:
        for reason in ("selected", "fallback"):
            figures[("reads", replica, reason)] = 0
        figures[("connect_failures", replica)] = 0
        figures[("healthy", replica)] = 0 if replica in unhealthy else 1
    for (engine, reason), n in (reads or {}).items():
        figures[("reads", engine, reason)] = n
    figures[("fallbacks",)] = fallbacks
    for replica, n in (connect_failures or {}).items():
        figures[("connect_failures", replica)] = n
    return figures


def never_lower(before: Figures, after: Figures) -> None:
    """Every exported counter in ``after`` is at least what it was ``before``."""
    for key, value in before.items():
        if key[0] != "healthy":
            assert after[key] >= value, (key, value, after[key])
