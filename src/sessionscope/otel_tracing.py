"""OpenTelemetry traces of transactions (install the ``sessionscope[otel]`` extra).

:class:`TransactionTracer` is a transaction observer (``sessionscope._observe``):
one span per outermost transaction, current while the transaction runs, so the
statement spans of ``opentelemetry-instrumentation-sqlalchemy`` (when it is
installed and instruments the engines) nest under it. Nothing here rewrites
what that package does: it traces statements, this traces transactions.

A span:

* name ``transaction <function>`` (``transaction`` for a ``with`` scope), kind
  ``INTERNAL``;
* attributes ``db.system.name``, ``code.function.name`` (decorated functions),
  ``sessionscope.manager``, ``sessionscope.transaction.outcome`` (``committed``,
  ``rolled_back``, ``failed``, ``commit_outcome_unknown``),
  ``sessionscope.isolation_level`` (when set), ``sessionscope.read_only``,
  ``sessionscope.route`` (``primary`` / ``replica``), ``sessionscope.async``;
  ``error.type`` and ``db.response.status_code`` when it failed, with status
  ``ERROR`` (its description is the error class, never the message);
* events ``sessionscope.savepoint`` (``sessionscope.savepoint.outcome``
  ``released`` / ``rolled_back``, and the error's class and code when one
  escaped it) and ``sessionscope.retry`` on the attempt that follows a transient
  failure (``sessionscope.retry.attempt``, ``error.type``,
  ``db.response.status_code``).

Never SQL text, never bound parameters, never an error's message: those can hold
personal data and secrets.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

from ._extras import missing_extra

try:
    from opentelemetry import context, trace
    from opentelemetry.trace import SpanKind, Status, StatusCode, TracerProvider
except ImportError as err:
    raise missing_extra("sessionscope.otel_tracing", "otel", err) from err

from ._manager import SessionManager
from ._observe import Outcome, TransactionInfo
from ._retry import error_code
from ._version import __version__

__all__ = ["TransactionTracer", "trace_transactions"]

# The retry decided in this thread or task, reported on the next attempt's span.
_pending_retry: ContextVar[dict[str, Any] | None] = ContextVar(
    "sessionscope_pending_retry", default=None
)


class _Handle:
    __slots__ = ("span", "token")

    def __init__(self, span: trace.Span, token: object) -> None:
        self.span = span
        self.token = token


class TransactionTracer:
    """Turns transaction events into spans of ``tracer_provider`` (the global
    one if None). Implements ``sessionscope._observe.TransactionObserver``."""

    def __init__(self, tracer_provider: TracerProvider | None = None) -> None:
        self._tracer = trace.get_tracer(
            "sessionscope", __version__, tracer_provider=tracer_provider
        )

    def begin(self, info: TransactionInfo) -> object:
        attributes: dict[str, Any] = {
            "db.system.name": info.system,
            "sessionscope.manager": info.manager,
            "sessionscope.read_only": info.read_only,
            "sessionscope.route": "replica" if info.replica else "primary",
            "sessionscope.async": info.is_async,
        }
        if info.function is not None:
            attributes["code.function.name"] = info.function
        if info.isolation_level is not None:
            attributes["sessionscope.isolation_level"] = info.isolation_level
        name = f"transaction {info.function}" if info.function else "transaction"
        span = self._tracer.start_span(name, kind=SpanKind.INTERNAL, attributes=attributes)
        retry = _pending_retry.get()
        if retry is not None:
            _pending_retry.set(None)
            span.add_event("sessionscope.retry", retry)
        # Current while the transaction runs: statement spans nest under it.
        token = context.attach(trace.set_span_in_context(span))
        return _Handle(span, token)

    def savepoint(self, handle: object, *, released: bool, error: BaseException | None) -> None:
        if not isinstance(handle, _Handle):
            return
        attributes: dict[str, Any] = {
            "sessionscope.savepoint.outcome": "released" if released else "rolled_back"
        }
        if error is not None:
            attributes.update(_error_attributes(error))
        handle.span.add_event("sessionscope.savepoint", attributes)

    def retry(self, error: BaseException, attempt: int, delay: float, function: str | None) -> None:
        _pending_retry.set(
            {"sessionscope.retry.attempt": attempt + 1, **_error_attributes(error)}
        )

    def end(self, handle: object, outcome: Outcome, error: BaseException | None) -> None:
        if not isinstance(handle, _Handle):
            return
        span = handle.span
        span.set_attribute("sessionscope.transaction.outcome", outcome)
        if outcome in ("failed", "commit_outcome_unknown") and error is not None:
            span.set_attributes(_error_attributes(error))
            span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        elif outcome in ("failed", "commit_outcome_unknown"):
            span.set_status(Status(StatusCode.ERROR, outcome))
        try:
            context.detach(handle.token)  # type: ignore[arg-type]
        finally:
            span.end()


def _error_attributes(error: BaseException) -> dict[str, Any]:
    attributes: dict[str, Any] = {"error.type": type(error).__name__}
    code = error_code(error)
    if code is not None:
        attributes["db.response.status_code"] = code
    return attributes


def trace_transactions(
    manager: SessionManager[Any, Any] | None = None,
    *,
    tracer_provider: TracerProvider | None = None,
) -> TransactionTracer:
    """Trace the transactions of ``manager`` (default: the default manager,
    which must be set up) with spans of ``tracer_provider`` (default: the
    global one). Returns the tracer; ``manager.remove_observer(tracer)`` stops."""
    if manager is None:
        from ._api import get_default_manager

        manager = get_default_manager()
    tracer = TransactionTracer(tracer_provider)
    manager.add_observer(tracer)
    return tracer
