"""Statistics: counters, durations, long-held sessions, snapshots (pure, no I/O).

One :class:`Stats` per manager. The events of every transaction (its session's
opening, its end, a pooled connection's checkout) are appended to a journal
without a lock, and added into the figures in batches: by whoever reads them,
and by the event that fills the journal to :data:`JOURNAL_LIMIT`. Every other
event takes the one lock for a few attribute updates. Counts are exact under
threads (a read folds in every event recorded before it), and the
per-transaction cost is one append.

Two views of the same counters:

* :meth:`Stats.snapshot` is what ``get_session_stats()`` shows: figures since
  the last :meth:`Stats.reset` (the live ``active_sessions`` gauge excepted).
* :meth:`Stats.totals` is monotonic since the ``Stats`` was created, whatever
  the resets: exporters (Prometheus, OpenTelemetry) read it, so a
  ``reset_session_stats()`` never makes an exported counter go backwards.

``reset()`` does not zero the counters; it stores them as a baseline that
:meth:`Stats.snapshot` subtracts. Only the figures that cannot be subtracted
(the maxima and the percentile window) are cleared.

The read-routing counters of a manager with replicas live here too, under the
same rules (:meth:`Stats.routing_snapshot` is their view since the reset): the
router only reports events (:meth:`Stats.routed_read`, :meth:`Stats.read_fallback`,
:meth:`Stats.replica_connect_failed`), each counted once where it happens, so
every routing counter only ever increases.
"""

from __future__ import annotations

import logging
import math
import operator
import threading
import time
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Callable, Iterable
from itertools import repeat
from operator import methodcaller
from typing import TYPE_CHECKING, Any, Final, TypedDict, TypeVar

if TYPE_CHECKING:
    from ._types import StatsSnapshot

__all__ = [
    "DURATION_BUCKETS",
    "FUNCTION_LIMIT",
    "JOURNAL_LIMIT",
    "OTHER_FUNCTIONS",
    "POOL_WAIT_BUCKETS",
    "PRIMARY_REASONS",
    "REPLICA_REASONS",
    "SLOW_LOG_INTERVAL",
    "RoutingCounts",
    "Stats",
    "TransactionListener",
    "routing_series",
]

DURATION_BUCKETS: Final = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0)
"""Upper bounds (seconds, inclusive) of the transaction duration histogram: the
boundaries the OpenTelemetry database conventions recommend for
``db.client.operation.duration``, also used for the Prometheus histogram."""

POOL_WAIT_BUCKETS: Final = (
    0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0,
)
"""Upper bounds (seconds, inclusive) of the histogram of the time to acquire a
pooled connection: finer than :data:`DURATION_BUCKETS` at the low end, where an
idle connection is handed over in microseconds, up to the pool's default
30-second timeout."""

SLOW_LOG_INTERVAL: Final = 10.0
"""Seconds between two slow-transaction warnings logged one by one; the slow
transactions in between are reported in one summary line."""

_logger = logging.getLogger("sessionscope")

_K = TypeVar("_K")
_T = TypeVar("_T")
_End = tuple[bool | None, bool, float, bool, str | None]
"""A recorded end: (committed, failed, duration, slow, function); committed is
None for a decorated call that did not own its transaction."""

_WINDOW: Final = 1024  # transactions kept for p95: bounded memory, recent behaviour

JOURNAL_LIMIT: Final = 32
"""Events recorded but not yet added into the figures, at most: the event that
reaches it adds them all (under the lock), which bounds the journal's memory."""

FUNCTION_LIMIT: Final = 1000
"""Decorated functions that get figures of their own; calls of any further
function are added up under :data:`OTHER_FUNCTIONS`, so a program that
decorates functions without end (generated ones, closures made per request)
keeps the statistics, and every exporter's series, bounded."""

OTHER_FUNCTIONS: Final = "<other>"
"""The name the calls of functions past :data:`FUNCTION_LIMIT` are recorded under
(never a ``module.qualname``)."""

TransactionListener = Callable[[float, bool, bool, str | None], None]
"""Called after each transaction with ``(duration, committed, failed, function)``."""

REPLICA_REASONS: Final = ("selected", "fallback")
"""Why a routed read landed on a replica: the selection rule picked it, or it
was reached after the connect to the replica picked first failed."""

PRIMARY_REASONS: Final = ("read_your_writes", "no_replica_available", "fallback")
"""Why a routed read landed on the primary: the context wrote within the
read-your-writes window, every replica was cooling down, or every replica the
read tried failed to connect."""


class RoutingCounts(TypedDict):
    """The routing counters of :meth:`Stats.routing_snapshot` and
    :meth:`Stats.totals` (``"routing"``)."""

    reads: dict[tuple[str, str], int]
    """Reads by ``(engine, reason)``: engine ``"primary"`` or a replica name, a
    reason of :data:`PRIMARY_REASONS` or :data:`REPLICA_REASONS`."""
    fallbacks: int
    """Reads re-pointed after a failed connect (one per failed replica tried)."""
    connect_failures: dict[str, int]
    """Times each replica (by name) was taken out of rotation."""


class _Func:
    __slots__ = ("calls", "failures", "max", "total")

    def __init__(self) -> None:
        self.calls = 0
        self.failures = 0
        self.total = 0.0
        self.max = 0.0  # since the last reset


_COUNTERS: Final = (
    "session_count",
    "total_transactions",
    "committed",
    "rolled_back",
    "failed",
    "retries",
    "savepoints",
    "savepoint_rollbacks",
    "cancellations",
    "slow",
    "long_held",
    "pool_timeouts",
    "dur_sum",
    "pool_acquisitions",
    "pool_wait_sum",
)


class Stats:
    """Counters of one manager; see the module docstring for the two views.

    Event methods are called by the transaction core only when monitoring is
    enabled for the scope; with ``enable_monitoring=False`` nothing here runs,
    except :meth:`pool_waited`: the pool calls it at every checkout, for every
    manager on the engine, since a scope may turn monitoring on for itself.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.created = time.time()
        """Wall-clock time the monotonic totals started from."""
        self.reset_at = self.created
        """Wall-clock time of the last reset (the start of :meth:`snapshot`)."""
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
        self.long_held = 0
        self.pool_timeouts = 0
        self.dur_sum = 0.0
        self.dur_max = 0.0
        self.durations: deque[float] = deque(maxlen=_WINDOW)
        self.buckets = [0] * (len(DURATION_BUCKETS) + 1)
        self.pool_acquisitions = 0
        self.pool_wait_sum = 0.0
        self.pool_wait_max = 0.0
        self.pool_waits: deque[float] = deque(maxlen=_WINDOW)
        self.pool_wait_buckets = [0] * (len(POOL_WAIT_BUCKETS) + 1)
        self._slow_window_end = -math.inf
        self._slow_quiet = 0  # slow transactions not logged one by one yet
        self._slow_worst: tuple[float, str] = (0.0, "")
        self.functions: dict[str, _Func] = {}
        self.retry_errors: dict[str, int] = {}
        # Read routing (managers with replicas): see RoutingCounts.
        self.routed_reads: dict[tuple[str, str], int] = {}
        self.read_fallbacks = 0
        self.connect_failures: dict[str, int] = {}
        self._base: dict[str, Any] | None = None
        self._held: dict[int, tuple[float, float, object, int]] = {}
        self.next_deadline = math.inf
        """When the next long-held check is due: the earliest deadline of the
        sessions watched at the last check, or a shortest threshold after it,
        whichever comes first (a session opened since then is due no earlier).
        Read without the lock as a cheap "is a check due?" test."""
        self._min_threshold = math.inf  # the shortest threshold watched so far
        self.listeners: tuple[TransactionListener, ...] = ()
        # Events not yet added into the figures, one journal per kind so that
        # the usual ones cost a float append to record and a few C-level calls
        # per batch to fold: a session opened (None); a transaction committed
        # without a function name, failure or slowness (its duration); the same
        # with a function name ((duration, function)); any other end, or a call
        # that did not own its transaction (committed None), as (committed,
        # failed, duration, slow, function); a checkout's wait. Appended without
        # the lock (deque.append is atomic), taken off only under it.
        self._opened: deque[None] = deque()
        self._committed: deque[float] = deque()
        self._committed_in: deque[tuple[float, str]] = deque()
        self._journal: deque[_End] = deque()
        self._waits: deque[float] = deque()

    # -- events ------------------------------------------------------------------

    @property
    def active_sessions(self) -> int:
        """Sessions open right now (opened and not yet ended)."""
        with self._lock:
            self._fold_locked()
            return self.session_count - self.total_transactions

    def session_opened(self) -> None:
        self._opened.append(None)

    def session_opened_watched(
        self, key: int, started: float, threshold: float, where: object, offset: int = -1
    ) -> None:
        """:meth:`session_opened` for a session watched for the long-held
        warning: ``key`` identifies it until :meth:`transaction_ended` (an id,
        not the scope itself: the statistics must never keep a session that its
        owner dropped alive); ``(where, offset)`` is returned by :meth:`overdue`
        (opaque here)."""
        # A tuple of what was given, not an object: this runs for every session
        # by default, and each extra object is memory per session.
        self._held[key] = (started, threshold, where, offset)
        self._opened.append(None)
        if threshold < self._min_threshold:
            self._lower_threshold(started + threshold, threshold)

    def _lower_threshold(self, deadline: float, threshold: float) -> None:
        # The first session watched with a threshold this short. Any other
        # session's deadline is at least a known threshold after the last
        # check (see overdue()), so only this case moves next_deadline here.
        with self._lock:
            if threshold < self._min_threshold:
                self._min_threshold = threshold
            if deadline < self.next_deadline:
                self.next_deadline = deadline

    def transaction_ended(
        self,
        committed: bool,
        failed: bool,
        duration: float,
        slow_threshold: float,
        function: str | None,
        key: int = 0,
        pool_wait: float = 0.0,
    ) -> bool:
        """Record the end of a scope that owned its session; return True if slow.

        ``failed`` means an error ended it (including a failed COMMIT); a quiet
        rollback (``auto_commit=False``, ``set_rollback``) is not a failure.
        ``duration`` is the whole scope; ``pool_wait``, the part of it spent
        acquiring pooled connections, does not count towards ``slow_threshold``:
        under overload every transaction queues for the pool, and only the pool
        figures should say so.
        """
        slow = duration - pool_wait > slow_threshold
        if self._held:
            self._held.pop(key, None)  # atomic: overdue() takes entries the same way
        journal: deque[Any]
        if not committed or failed or slow:
            journal = self._journal
            journal.append((committed, failed, duration, slow, function))
        elif function is None:
            journal = self._committed
            journal.append(duration)
        else:
            journal = self._committed_in
            journal.append((duration, function))
        if self.listeners:
            self._notify(duration, committed, failed, self._recorded_as(function))
        elif len(journal) >= JOURNAL_LIMIT:
            self._fold()
        return slow

    def function_ended(self, function: str, duration: float, failed: bool) -> None:
        """Record a decorated call that joined an enclosing transaction or made a
        savepoint (calls owning their transaction go through
        :meth:`transaction_ended`)."""
        journal = self._journal
        journal.append((None, failed, duration, False, function))
        if len(journal) >= JOURNAL_LIMIT:
            self._fold()

    def pool_waited(self, seconds: float) -> None:
        """Record one checkout of a pooled connection that took ``seconds``."""
        waits = self._waits
        waits.append(seconds)
        if len(waits) >= JOURNAL_LIMIT:
            self._fold()

    def _recorded_as(self, function: str | None) -> str | None:
        """The name ``function``'s latest call is recorded under (see
        :meth:`_function_locked`): folds the journal first, so the answer is
        the table's, for exporters that keep a series per name."""
        self._fold()
        if function is None or function in self.functions:
            return function
        return OTHER_FUNCTIONS

    def _fold(self) -> None:
        # acquire()/release() rather than a with statement, here and in the
        # other frequent events: in CPython the with statement costs about
        # twice as much.
        lock = self._lock
        lock.acquire()
        try:
            self._fold_locked()
        finally:
            lock.release()

    def _fold_locked(self) -> None:
        """Add the journals' events into the figures.

        The usual events are counted a batch at a time with C-level calls
        (``len``, ``sum``, ``max``, a sort for the histogram), not one by one.
        Function names are added in the order they were recorded within each
        journal; which names get a row of their own once the table is full
        (:data:`FUNCTION_LIMIT`) can depend on it, and an exporter told the
        name (a listener) folds at every event, so it hears the table's."""
        if self._waits:
            waits = _take(self._waits)
            self.pool_acquisitions += len(waits)
            self.pool_wait_sum += sum(waits)
            self.pool_wait_max = max(self.pool_wait_max, *waits)
            self.pool_waits.extend(waits)
            _histogram(self.pool_wait_buckets, POOL_WAIT_BUCKETS, waits)
        durations: list[float] = _take(self._committed) if self._committed else []
        if self._committed_in:
            table = self.functions
            keep = durations.append
            for duration, function in _take(self._committed_in):
                keep(duration)
                row = table.get(function)
                if row is None:
                    self._function_locked(function, duration, False)
                    continue
                row.calls += 1
                row.total += duration
                if duration > row.max:
                    row.max = duration
        if durations:
            ended = len(durations)
            self.total_transactions += ended
            self.committed += ended
            self.dur_sum += sum(durations)
            self.dur_max = max(self.dur_max, *durations)
            self.durations.extend(durations)
            _histogram(self.buckets, DURATION_BUCKETS, durations)
        if self._journal:
            for event in _take(self._journal):
                self._fold_event(*event)
        # Openings last: a session opened and ended while the other journals
        # were taken off is then counted opened, if not yet ended, and never
        # ended without its opening (active_sessions below zero).
        if self._opened:
            self.session_count += len(_take(self._opened))

    def _fold_event(
        self, done: bool | None, failed: bool, duration: float, slow: bool, function: str | None
    ) -> None:
        """One event of the general journal (a rollback, a failure, a slow
        transaction, a call that joined one)."""
        if done is not None:
            self.total_transactions += 1
            if done:
                self.committed += 1
            else:
                self.rolled_back += 1
            if failed:
                self.failed += 1
            if slow:
                self.slow += 1
            self.dur_sum += duration
            if duration > self.dur_max:
                self.dur_max = duration
            self.durations.append(duration)
            self.buckets[bisect_left(DURATION_BUCKETS, duration)] += 1
        if function is not None:
            self._function_locked(function, duration, failed)

    def _function_locked(self, function: str, duration: float, failed: bool) -> None:
        """Add one call to ``function``'s figures, under its own name or, once
        the table holds :data:`FUNCTION_LIMIT` other names, under
        :data:`OTHER_FUNCTIONS`."""
        fs = self.functions.get(function)
        if fs is None:
            if len(self.functions) - (OTHER_FUNCTIONS in self.functions) >= FUNCTION_LIMIT:
                function = OTHER_FUNCTIONS
                fs = self.functions.get(function)
            if fs is None:
                fs = self.functions[function] = _Func()
        fs.calls += 1
        fs.total += duration
        if duration > fs.max:
            fs.max = duration
        if failed:
            fs.failures += 1

    def warn_slow(
        self,
        function: str,
        duration: float,
        pool_wait: float,
        slow_threshold: float,
        now: float | None = None,
    ) -> None:
        """Log a slow transaction at WARNING, at most once per
        :data:`SLOW_LOG_INTERVAL`: the slow transactions of the rest of the
        interval are counted and reported in one summary line (with the slowest
        of them) before the next one logged in full. Logging never adds to an
        overload; ``slow_transactions`` keeps the exact count."""
        if now is None:
            now = time.perf_counter()
        with self._lock:
            if now < self._slow_window_end:
                self._slow_quiet += 1
                if duration > self._slow_worst[0]:
                    self._slow_worst = (duration, function)
                return
            quiet, worst = self._slow_quiet, self._slow_worst
            self._slow_quiet, self._slow_worst = 0, (0.0, "")
            self._slow_window_end = now + SLOW_LOG_INTERVAL
        if quiet:
            _logger.warning(
                "%d more slow transaction(s) not logged one by one in the last %.0f s "
                "(slowest: %s, %.3f s)",
                quiet,
                SLOW_LOG_INTERVAL,
                worst[1],
                worst[0],
            )
        _logger.warning(
            "slow transaction: %s took %.3f s, waiting for a pooled connection %.3f s "
            "(slow_threshold %.3f s)",
            function,
            duration,
            pool_wait,
            slow_threshold,
        )

    def savepoint_ended(self, *, rolled_back: bool) -> None:
        lock = self._lock
        lock.acquire()
        try:
            self.savepoints += 1
            if rolled_back:
                self.savepoint_rollbacks += 1
        finally:
            lock.release()

    def retried(self, error: BaseException) -> None:
        name = type(error).__name__
        with self._lock:
            self.retries += 1
            self.retry_errors[name] = self.retry_errors.get(name, 0) + 1

    def cancelled(self) -> None:
        with self._lock:
            self.cancellations += 1

    def pool_timed_out(self) -> None:
        with self._lock:
            self.pool_timeouts += 1

    # -- read routing (reported by the router of a manager with replicas) --------

    def routed_read(self, engine: str, reason: str) -> None:
        """Count one routed read-only session on ``engine`` (``"primary"`` or a
        replica name), the server its first connection landed on, and why it
        landed there (:data:`PRIMARY_REASONS`, :data:`REPLICA_REASONS`). A
        session that never connects is no read and is never reported."""
        key = (engine, reason)
        with self._lock:
            self.routed_reads[key] = self.routed_reads.get(key, 0) + 1

    def read_fallback(self) -> None:
        """Count one routed read moved off a replica whose connect failed."""
        with self._lock:
            self.read_fallbacks += 1

    def replica_connect_failed(self, replica: str) -> None:
        """Count one failed connect that took ``replica`` out of rotation."""
        with self._lock:
            self.connect_failures[replica] = self.connect_failures.get(replica, 0) + 1

    def overdue(self, now: float) -> list[tuple[float, float, tuple[object, int]]]:
        """Watched sessions open past their threshold at ``now``, as
        ``(age, threshold, (where, offset))``; each is returned once, then no
        longer watched."""
        with self._lock:
            found: list[tuple[float, float, tuple[object, int]]] = []
            earliest = math.inf
            for key, (started, threshold, where, offset) in self._held.copy().items():
                deadline = started + threshold
                if deadline <= now:
                    # pop, not del: the session may have ended since the copy
                    # (transaction_ended() takes its entry without the lock).
                    if self._held.pop(key, None) is not None:
                        found.append((now - started, threshold, (where, offset)))
                elif deadline < earliest:
                    earliest = deadline
            self.next_deadline = min(earliest, now + self._min_threshold)
            self.long_held += len(found)
            return found

    def _notify(self, duration: float, committed: bool, failed: bool, function: str | None) -> None:
        for listener in self.listeners:
            # An exporter's failure must not break (or replace the error of) the
            # transaction that is being recorded.
            try:
                listener(duration, committed, failed, function)
            except Exception as err:
                _logger.warning(
                    "statistics listener %r failed: %s", listener, type(err).__name__
                )

    def add_listener(self, listener: TransactionListener) -> None:
        """Call ``listener`` after every recorded transaction (outside the lock)."""
        with self._lock:
            self.listeners = (*self.listeners, listener)

    def remove_listener(self, listener: TransactionListener) -> None:
        with self._lock:
            # == rather than "is": a bound method is a new object at each access.
            self.listeners = tuple(x for x in self.listeners if x != listener)

    # -- views -------------------------------------------------------------------

    def reset(self) -> None:
        """Start :meth:`snapshot` from zero again; keeps the live
        ``active_sessions`` gauge, the long-held watch and :meth:`totals`."""
        with self._lock:
            self._fold_locked()
            self._base = self._totals_locked()
            self.reset_at = time.time()
            self.dur_max = 0.0
            self.durations.clear()
            self.pool_wait_max = 0.0
            self.pool_waits.clear()
            for fs in self.functions.values():
                fs.max = 0.0

    def totals(self) -> dict[str, Any]:
        """Monotonic figures since this object was created (for exporters):
        the counters, ``retry_errors``, ``buckets`` (per :data:`DURATION_BUCKETS`
        bound, then the overflow, not cumulative), ``pool_wait_buckets`` (the
        same per :data:`POOL_WAIT_BUCKETS` bound), ``functions`` (name ->
        ``(calls, failures, duration_sum)``), ``routing`` (a
        :class:`RoutingCounts`), plus ``active_sessions``."""
        with self._lock:
            self._fold_locked()
            totals = self._totals_locked()
            totals["active_sessions"] = self.session_count - self.total_transactions
            return totals

    def _totals_locked(self) -> dict[str, Any]:
        totals: dict[str, Any] = {name: getattr(self, name) for name in _COUNTERS}
        totals["retry_errors"] = dict(self.retry_errors)
        totals["buckets"] = list(self.buckets)
        totals["pool_wait_buckets"] = list(self.pool_wait_buckets)
        totals["functions"] = {
            name: (fs.calls, fs.failures, fs.total) for name, fs in self.functions.items()
        }
        totals["routing"] = self._routing_locked()
        return totals

    def _routing_locked(self) -> RoutingCounts:
        return RoutingCounts(
            reads=dict(self.routed_reads),
            fallbacks=self.read_fallbacks,
            connect_failures=dict(self.connect_failures),
        )

    def routing_snapshot(self) -> RoutingCounts:
        """The routing counters since the last reset (``get_stats()["routing"]``
        is built from it); entries that are zero since the reset are left out."""
        with self._lock:
            now = self._routing_locked()
            base = self._base
        if base is not None:
            then: RoutingCounts = base["routing"]
            now = RoutingCounts(
                reads=_minus(now["reads"], then["reads"]),
                fallbacks=now["fallbacks"] - then["fallbacks"],
                connect_failures=_minus(now["connect_failures"], then["connect_failures"]),
            )
        return now

    def snapshot(self) -> StatsSnapshot:
        """Every figure since the last reset, as plain JSON-friendly values.

        ``success_rate`` is in percent (100.0 when nothing ran); durations are
        seconds: ``avg_duration`` over all transactions since the reset,
        ``p95_duration`` (nearest rank) over the last 1024, ``max_duration``
        since the reset.
        """
        with self._lock:
            self._fold_locked()
            now = self._totals_locked()
            durations = sorted(self.durations)
            waits = sorted(self.pool_waits)
            wait_max = self.pool_wait_max
            maxima = {name: fs.max for name, fs in self.functions.items()}
            active = self.session_count - self.total_transactions
            dur_max = self.dur_max
            base = self._base
        if base is not None:
            for name in _COUNTERS:
                now[name] -= base[name]
            now["retry_errors"] = _minus(now["retry_errors"], base["retry_errors"])
            base_funcs = base["functions"]
            funcs = {}
            for name, (calls, failures, total) in now["functions"].items():
                b = base_funcs.get(name, (0, 0, 0.0))
                if calls - b[0]:
                    funcs[name] = (calls - b[0], failures - b[1], total - b[2])
            now["functions"] = funcs
        total = now["total_transactions"]
        failed = now["failed"]
        acquisitions = now["pool_acquisitions"]
        return {
            "session_count": now["session_count"],
            "active_sessions": active,
            "total_transactions": total,
            "failed_transactions": failed,
            "success_rate": 100.0 if total == 0 else (total - failed) * 100.0 / total,
            "committed_transactions": now["committed"],
            "rolled_back_transactions": now["rolled_back"],
            "retries": now["retries"],
            "retry_errors": now["retry_errors"],
            "savepoints": now["savepoints"],
            "savepoint_rollbacks": now["savepoint_rollbacks"],
            "cancellations": now["cancellations"],
            "slow_transactions": now["slow"],
            "long_held_sessions": now["long_held"],
            "pool_timeouts": now["pool_timeouts"],
            "pool_acquisitions": acquisitions,
            "avg_pool_wait": now["pool_wait_sum"] / acquisitions if acquisitions else 0.0,
            "p95_pool_wait": _percentile(waits, 0.95),
            "max_pool_wait": wait_max,
            "avg_duration": now["dur_sum"] / total if total else 0.0,
            "p95_duration": _percentile(durations, 0.95),
            "max_duration": dur_max,
            "functions": {
                name: {
                    "calls": calls,
                    "failures": failures,
                    "avg_duration": dsum / calls,
                    "max_duration": maxima.get(name, 0.0),
                }
                for name, (calls, failures, dsum) in sorted(now["functions"].items())
            },
        }


# operator.call (Python 3.11+) or, before it, its equivalent.
_call: Final[Callable[[Callable[[], Any]], Any]] = getattr(
    operator, "call", methodcaller("__call__")
)


def _take(journal: deque[_T]) -> list[_T]:
    """The events of ``journal`` now, taken off it: popleft() once per event
    seen, as events may be appended meanwhile, driven from C (map)."""
    return list(map(_call, repeat(journal.popleft, len(journal))))


def _histogram(buckets: list[int], bounds: tuple[float, ...], values: list[float]) -> None:
    """Add each of ``values`` to the bucket of the first of ``bounds`` it does not
    exceed (the last bucket: past every bound). Sorted once, then cut at the
    bounds up to the largest value: a batch's values mostly share a bucket."""
    values.sort()
    size = len(values)
    below = 0
    for i, bound in enumerate(bounds):
        upto = bisect_right(values, bound, below)
        buckets[i] += upto - below
        below = upto
        if below == size:
            return
    buckets[-1] += size - below


def routing_series(
    counts: RoutingCounts, replicas: Iterable[str]
) -> tuple[list[tuple[str, str, int]], list[tuple[str, int]]]:
    """What the exporters report of ``counts`` for a manager with ``replicas``
    (names): reads as ``(engine, reason, count)`` and connect failures as
    ``(replica, count)``. Every engine and reason is there from the start, at 0
    (a rate needs the series before its first increment); counts under other
    names (statistics handed on from a replaced default manager) follow."""
    names = list(replicas)
    reads = counts["reads"]
    keys = [("primary", reason) for reason in PRIMARY_REASONS]
    keys += [(name, reason) for name in names for reason in REPLICA_REASONS]
    keys += sorted(set(reads) - set(keys))
    failures = counts["connect_failures"]
    names += sorted(set(failures) - set(names))
    return (
        [(engine, reason, reads.get((engine, reason), 0)) for engine, reason in keys],
        [(name, failures.get(name, 0)) for name in names],
    )


def _minus(now: dict[_K, int], base: dict[_K, int]) -> dict[_K, int]:
    return {k: v - base.get(k, 0) for k, v in now.items() if v - base.get(k, 0)}


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    # Nearest-rank: an actual observed duration, never an interpolated one.
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]
