"""The transaction observer interface: what the core reports about the
transactions it runs, for tracers (``sessionscope.otel.TransactionTracer``).

The core calls an observer at four points, all in the thread or task running
the scope, never for a JOIN frame:

- :meth:`TransactionObserver.begin` when a scope decides to open its own
  transaction (a NEW frame, before its first statement), with what is known
  then; its return value is kept with the frame and handed back below.
- :meth:`TransactionObserver.savepoint` when a SAVEPOINT scope ends, on the
  handle of the outermost transaction that holds it.
- :meth:`TransactionObserver.retry` when a retry driver decided to run a failed
  unit of work again (after the failed attempt's :meth:`~TransactionObserver.end`,
  before the next attempt's :meth:`~TransactionObserver.begin`).
- :meth:`TransactionObserver.end` once per handle, when the transaction is
  over (committed, rolled back or failed) and its session closed.

An observer must not raise and must not do I/O on the scope's connection; the
error objects it receives are for their class and code only (their text can
hold SQL and bound parameters).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

__all__ = ["Outcome", "TransactionInfo", "TransactionObserver"]

Outcome = Literal["committed", "rolled_back", "failed", "commit_outcome_unknown"]
"""How a transaction ended: ``committed``; ``rolled_back`` without a failure
(``auto_commit=False``, ``set_rollback(True)``, a client error); ``failed`` (an
exception escaped, or COMMIT raised); ``commit_outcome_unknown`` (the connection
was lost while COMMIT was in flight)."""


@dataclass(frozen=True, slots=True)
class TransactionInfo:
    """What is known about a transaction when its scope opens it."""

    function: str | None
    """The decorated function's qualified name; None for a ``with`` scope."""
    manager: str
    """The manager's name (``SessionManager.name``)."""
    system: str
    """The database system: ``postgresql``, ``mysql``, ``sqlite``."""
    isolation_level: str | None
    read_only: bool
    replica: bool
    """True when the session was routed to a read replica."""
    is_async: bool


class TransactionObserver(Protocol):
    """Receives the core's transaction events (see the module docstring)."""

    def begin(self, info: TransactionInfo) -> object:
        """A transaction begins; returns the handle passed to the other calls."""

    def savepoint(self, handle: object, *, released: bool, error: BaseException | None) -> None:
        """A savepoint of the transaction ``handle`` ended: released, or rolled
        back (``error`` is what escaped it, if anything)."""

    def retry(self, error: BaseException, attempt: int, delay: float, function: str | None) -> None:
        """Attempt number ``attempt`` failed with the transient ``error``; the
        next one starts after ``delay`` seconds."""

    def end(self, handle: object, outcome: Outcome, error: BaseException | None) -> None:
        """The transaction ``handle`` ended with ``outcome``; ``error`` is the
        exception that made it fail or roll back, if any."""
