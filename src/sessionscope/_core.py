"""The transaction logic, written once as synchronous code over ``Session``.

The sync front calls these functions directly; the async front runs the ones
that do I/O through ``AsyncSession.run_sync`` (SQLAlchemy's greenlet bridge), so
every enter/exit decision exists in exactly one place.

A scope is represented by a :class:`Frame`. The innermost frame of the current
thread or asyncio task lives in a ``ContextVar``; frames form a chain through
``parent``. Frames remember the thread or task that opened them (``key``), so a
child task that inherits the context never joins its parent's session by
accident: sessions are not safe for concurrent use.
"""

from __future__ import annotations

import logging
import time
from asyncio import current_task
from asyncio.events import _get_running_loop
from collections.abc import Callable
from contextvars import ContextVar
from threading import get_ident
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session, SessionTransaction

from . import _watch
from ._errors import (
    CommitOutcomeUnknownError,
    NoActiveScopeError,
    PoolExhaustedError,
    RollbackOnlyError,
)
from ._policy import Action, decide
from ._retry import describe, is_disconnect, retry_delay_for

if TYPE_CHECKING:
    from contextvars import Token

    from ._config import SessionConfig
    from ._stats import Stats

__all__ = [
    "Frame",
    "abort_frame",
    "begin_savepoint",
    "context_key",
    "current_frame",
    "enter_retry_boundary",
    "exit_frame",
    "find_outer",
    "new_frame",
    "next_retry",
    "on_commit",
    "pool_exhausted",
    "record_retry",
    "require_owner",
    "retry_boundary",
    "set_rollback",
    "stack",
    "worker_key",
]

logger = logging.getLogger("sessionscope")

Callback = Callable[[], Any]

# Reading an enum member through its class is an attribute lookup on every use;
# the per-scope paths compare against these module constants instead.
_NEW, _JOIN, _SAVEPOINT = Action.NEW, Action.JOIN, Action.SAVEPOINT

stack: ContextVar[Frame | None] = ContextVar("sessionscope_frame", default=None)
# The context key (thread or task) running a retry loop: decorated functions and
# with_retry() calls it runs leave retrying to that outer boundary instead of
# nesting retry loops. Keyed like frames, so a child task (which inherits the
# context) retries its own unit of work instead of having its parent re-run
# siblings that already committed.
retry_boundary: ContextVar[object] = ContextVar("sessionscope_retrying", default=None)
# Set by a framework adapter (sessionscope.fastapi) while it serves one caller with
# sync code spread over pool threads: that code is identified by the caller, not by
# whichever worker thread runs it, so it joins the caller's sync scope. Only threads
# consult it; asyncio tasks keep their own identity, so child tasks never share.
worker_key: ContextVar[object | None] = ContextVar("sessionscope_worker_key", default=None)


class Frame:
    """One active scope.

    ``parent`` is the frame this scope relates to (joins, saves a point in, or
    None for a new session); ``below`` is the frame that was innermost in the
    context when this one was pushed, whatever its thread, task, kind or manager:
    lookups walk ``below``, so a scope of one manager nested in another's still
    finds the outer scope of its own manager. ``owner`` is the innermost frame
    that owns a transaction or savepoint (itself for NEW and SAVEPOINT frames); a
    JOIN frame on a session sessionscope did not open has no owner. ``front`` is
    what the user sees: the ``Session``, or the ``AsyncSession`` whose
    ``sync_session`` is ``session``.
    """

    __slots__ = (
        "action",
        "below",
        "callbacks",
        "cause",
        "cfg",
        "done",
        "doomed",
        "due",
        "front",
        "function",
        "is_async",
        "key",
        "manager",
        "owner",
        "parent",
        "rollback_only",
        "savepoint",
        "session",
        "started",
        "stats",
    )

    def __init__(
        self,
        action: Action,
        session: Session,
        front: Any,
        parent: Frame | None,
        cfg: SessionConfig,
        key: object,
        stats: Stats | None,
        function: str | None,
        manager: object = None,
    ) -> None:
        self.action = action
        self.manager = manager
        self.session = session
        self.front = front
        self.parent = parent
        self.below: Frame | None = None
        self.cfg = cfg
        self.key = key
        self.is_async = front is not session and front is not None
        self.stats = stats
        self.function = function
        self.owner: Frame | None = (
            self if action is not _JOIN else (parent.owner if parent is not None else None)
        )
        self.savepoint: SessionTransaction | None = None
        self.rollback_only = False
        self.doomed = False
        self.done = False
        self.cause: BaseException | None = None
        self.callbacks: list[Callback] | None = None
        self.due: list[Callback] | None = None  # callbacks whose COMMIT already happened
        self.started = 0.0


def context_key() -> object:
    """Who is running: the current asyncio task; else the caller bound by
    :data:`worker_key`; else the current thread's id."""
    if _get_running_loop() is not None:
        task = current_task()
        if task is not None:
            return task
    key = worker_key.get()
    return key if key is not None else get_ident()


def current_frame(
    key: object, is_async: bool | None = None, manager: object = None
) -> Frame | None:
    """The innermost frame opened by ``key`` (from :func:`context_key`), of the given
    kind (sync or async; either if None) and manager (any if None). Sync and async
    scopes never join each other: an ``AsyncSession`` cannot serve blocking code,
    nor the reverse; nor do scopes of different managers (databases)."""
    frame = stack.get()
    while frame is not None and (
        frame.key != key
        or (is_async is not None and frame.is_async is not is_async)
        or (manager is not None and frame.manager is not manager)
    ):
        frame = frame.below
    return frame


def find_outer(
    key: object, is_async: bool, explicit: Session | None, manager: object = None
) -> Frame | None:
    """The frame a new scope relates to.

    With an explicit session: the frame that holds it, whoever opened it, or a
    detached JOIN frame standing for a session sessionscope did not open (its
    transaction belongs to the caller; nothing marks it rollback-only).
    """
    if explicit is None:
        return current_frame(key, is_async, manager)
    frame = stack.get()
    while frame is not None:
        if frame.session is explicit:
            return frame
        frame = frame.below
    return Frame(Action.JOIN, explicit, None, None, _DETACHED_CFG, key, None, None)


def new_frame(
    cfg: SessionConfig,
    key: object,
    outer: Frame | None,
    open_session: Callable[[SessionConfig], tuple[Session, Any]],
    stats: Stats | None,
    function: str | None,
    explicit_front: Any = None,
    manager: object = None,
) -> Frame:
    """Decide what a scope does (raising for mandatory/never/durable) and build
    its frame. Opens a ``Session`` object for NEW, which touches no connection.
    The caller pushes the frame and, for SAVEPOINT, calls :func:`begin_savepoint`.
    """
    if outer is None and cfg.propagation != "mandatory":
        action = _NEW  # what decide() answers for every other propagation here
    else:
        action = decide(cfg.propagation, outer is not None, cfg.durable)
    if action is _NEW:
        session, front = open_session(cfg)
        frame = Frame(action, session, front, outer, cfg, key, stats, function, manager)
        frame.below = stack.get()
        frame.started = started = time.perf_counter()
        if stats is not None:
            if cfg.long_session_warning is None:
                stats.session_opened()
            else:
                stats.session_opened_watched(
                    id(frame), started, cfg.long_session_warning, _watch.where(function)
                )
                if started >= stats.next_deadline:
                    _watch.warn_overdue(stats, started)
        if logger.isEnabledFor(logging.DEBUG) and cfg.log_levelno <= logging.DEBUG:
            logger.debug("session opened (%s)", function or "scope")
        return frame
    assert outer is not None  # decide() returns NEW when there is no outer frame
    front = outer.front if outer.front is not None else explicit_front
    frame = Frame(action, outer.session, front, outer, cfg, key, stats, function, manager)
    frame.below = stack.get()
    frame.started = time.perf_counter()
    return frame


def begin_savepoint(session: Session, frame: Frame) -> None:
    """Emit SAVEPOINT for a SAVEPOINT frame (BEGINs the outer transaction if needed)."""
    frame.savepoint = session.begin_nested()
    if logger.isEnabledFor(logging.DEBUG) and frame.cfg.log_levelno <= logging.DEBUG:
        logger.debug("savepoint begun (%s)", frame.function or "scope")


def exit_frame(session: Session, frame: Frame, exc: BaseException | None) -> list[Callback]:
    """Finish a frame: the whole exit decision table.

    Returns the ``on_commit`` callbacks to run now (after an outermost COMMIT);
    the caller runs them outside any transaction. Raises the COMMIT error,
    :class:`RollbackOnlyError`, or :class:`CommitOutcomeUnknownError` when the
    scope body succeeded; when the body raised, cleanup errors are logged and
    never shadow the body's exception.
    """
    action = frame.action
    if action is _JOIN:
        if exc is not None and frame.cfg.auto_rollback and frame.owner is not None:
            _mark_rollback_only(frame.owner, exc)
        if frame.function is not None and frame.stats is not None:
            _record_call(frame, exc is not None)
        return []
    if action is _SAVEPOINT:
        try:
            _exit_savepoint(frame, exc)
        except BaseException:
            if frame.function is not None and frame.stats is not None:
                _record_call(frame, True)
            raise
        if frame.function is not None and frame.stats is not None:
            _record_call(frame, exc is not None)
        return []
    return _exit_root(session, frame, exc)


def _record_call(frame: Frame, failed: bool) -> None:
    # Per-function figures of a decorated call that did not own the transaction
    # (owning calls are recorded with the transaction in _close).
    assert frame.stats is not None and frame.function is not None
    frame.stats.function_ended(frame.function, time.perf_counter() - frame.started, failed)


def _mark_rollback_only(owner: Frame, exc: BaseException) -> None:
    if not owner.rollback_only:
        owner.rollback_only = True
        owner.cause = exc
        if logger.isEnabledFor(logging.DEBUG) and owner.cfg.log_levelno <= logging.DEBUG:
            logger.debug(
                "transaction marked rollback-only by %s escaping a joined scope",
                type(exc).__name__,
            )


def _promote_callbacks(frame: Frame) -> None:
    if not frame.callbacks:
        return
    target = frame.parent.owner if frame.parent is not None else None
    if target is None:
        logger.warning(
            "dropping %d on_commit callback(s): the savepoint was released into a "
            "session sessionscope does not own, so it cannot see its COMMIT",
            len(frame.callbacks),
        )
        return
    if target.callbacks is None:
        target.callbacks = []
    target.callbacks.extend(frame.callbacks)


def _exit_savepoint(frame: Frame, exc: BaseException | None) -> None:
    savepoint = frame.savepoint
    keep = (exc is None and not frame.rollback_only and not frame.doomed) or (
        exc is not None and not frame.cfg.auto_rollback
    )
    stats = frame.stats
    if keep:
        if savepoint is not None and _is_open(frame.session, savepoint):
            try:
                # A savepoint deactivated by a failed flush raises here instead of
                # looking released: its work is gone and the caller must know.
                savepoint.commit()
            except BaseException as err:
                _quietly(savepoint.rollback, "rolling back a savepoint whose RELEASE failed")
                if stats is not None:
                    stats.savepoint_ended(rolled_back=True)
                if exc is None:
                    raise
                # auto_rollback=False with the body already failing: its exception
                # is the one the caller must see, not the RELEASE's consequence.
                logger.warning(
                    "savepoint of %s could not be kept (%s) and was rolled back",
                    frame.function or "scope",
                    type(err).__name__,
                )
                return
        _promote_callbacks(frame)
        if stats is not None:
            stats.savepoint_ended(rolled_back=False)
        if logger.isEnabledFor(logging.DEBUG) and frame.cfg.log_levelno <= logging.DEBUG:
            logger.debug("savepoint released (%s)", frame.function or "scope")
        return
    # Roll back even a savepoint a failed flush deactivated: only that closes it
    # and hands the session back to the enclosing transaction.
    if savepoint is not None and _is_open(frame.session, savepoint):
        if exc is None:
            savepoint.rollback()
        else:
            _quietly(savepoint.rollback, "rolling back to a savepoint")
    if stats is not None:
        stats.savepoint_ended(rolled_back=True)
    if logger.isEnabledFor(logging.DEBUG) and frame.cfg.log_levelno <= logging.DEBUG:
        logger.debug(
            "rolled back to savepoint (%s)%s",
            frame.function or "scope",
            f" after {type(exc).__name__}" if exc is not None else "",
        )
    if exc is None and frame.rollback_only:
        raise RollbackOnlyError(
            "the savepoint scope was rolled back instead of released: an exception "
            f"({type(frame.cause).__name__}) escaped a joined inner scope, so its work "
            "was partial. Catch the error inside the inner scope, or give the inner "
            'scope propagation="nested" so its failure is contained.'
        ) from frame.cause


def _is_open(session: Session, savepoint: SessionTransaction) -> bool:
    """True while ``savepoint`` is still part of the session's transaction chain
    (active, or deactivated by a failed flush and awaiting its rollback); False
    once closed, e.g. after the user rolled back the whole session."""
    transaction = session.get_nested_transaction()
    while transaction is not None:
        if transaction is savepoint:
            return True
        transaction = transaction.parent
    return False


def _exit_root(session: Session, frame: Frame, exc: BaseException | None) -> list[Callback]:
    cfg = frame.cfg
    committed = False
    failed = exc is not None
    callbacks: list[Callback] = []
    if exc is not None and cfg.log_levelno <= logging.WARNING:
        _log_failure(frame, exc, at_exit=False)
    try:
        if exc is None:
            if frame.rollback_only:
                failed = True
                if session.in_transaction():
                    session.rollback()
                if cfg.auto_commit:
                    raise RollbackOnlyError(
                        "the transaction was rolled back instead of committed: an "
                        f"exception ({type(frame.cause).__name__}) escaped a joined inner "
                        "scope, so its work was partial. Catch the error inside the "
                        "inner scope, or give the inner scope "
                        'propagation="nested" so its failure is contained.'
                    ) from frame.cause
            elif cfg.auto_commit and not frame.doomed:
                if session.in_transaction():
                    _commit(session)
                # else nothing is pending (the body committed itself, or sent
                # nothing): it counts as a successful commit all the same.
                committed = True
                callbacks = (frame.due or []) + (frame.callbacks or [])
            elif frame.due:
                callbacks = frame.due  # committed by the body before the rollback
            # Otherwise (auto_commit=False, set_rollback(True)): close() below
            # returns the connection, whose reset rolls the work back.
        elif cfg.auto_rollback and session.in_transaction():
            _quietly(session.rollback, "rolling back after an exception")
    except BaseException as err:
        failed = True
        if cfg.log_levelno <= logging.WARNING:
            _log_failure(frame, err, at_exit=True)
        raise
    finally:
        _close(session, frame, committed=committed, failed=failed)
    return callbacks


def _log_failure(frame: Frame, err: BaseException, *, at_exit: bool) -> None:
    """Log why a transaction did not commit: the error class and code only, since
    an error's text can hold SQL and bound parameters."""
    name = frame.function or "scope"
    if isinstance(err, RollbackOnlyError):
        logger.warning(
            "transaction of %s rolled back: an exception (%s) escaped a joined inner scope",
            name,
            type(err.__cause__).__name__,
        )
    elif isinstance(err, CommitOutcomeUnknownError):
        cause = err.__cause__
        logger.error(
            "COMMIT of %s lost its connection (%s): the outcome is unknown",
            name,
            describe(cause) if cause is not None else type(err).__name__,
        )
    elif at_exit:
        logger.error("ending the transaction of %s failed: %s", name, describe(err))
    elif isinstance(err, Exception):
        logger.warning("transaction of %s rolled back: %s escaped the scope", name, describe(err))
    else:  # cancellation, KeyboardInterrupt: not a database failure
        logger.info("transaction of %s rolled back: %s", name, type(err).__name__)


def _commit(session: Session) -> None:
    # Flush first: a failure there happened before COMMIT was sent, so its
    # outcome is known (nothing committed) and a transient one may be retried.
    session.flush()
    try:
        session.commit()
    except sa_exc.DBAPIError as err:
        if is_disconnect(err):
            raise CommitOutcomeUnknownError(
                f"the connection was lost while COMMIT was in flight ({describe(err)}); "
                "the server may or may not have committed. This is never retried: "
                "check the data (or use an idempotency key) before running the work again."
            ) from err
        # The server answered: nothing was committed. SQLite keeps its transaction
        # open after a busy COMMIT, and the pool does not roll back a connection
        # whose COMMIT was attempted: roll back here, or the connection goes back
        # to the pool inside a transaction.
        _quietly(session.rollback, "rolling back after a failed COMMIT")
        raise
    except BaseException as err:
        if not isinstance(err, Exception):
            # A task cancelled mid-COMMIT must re-raise CancelledError, so the
            # unknown outcome can only be told here.
            logger.warning(
                "COMMIT interrupted by %s: the server may or may not have committed",
                type(err).__name__,
            )
        raise


def _close(session: Session, frame: Frame, *, committed: bool, failed: bool) -> None:
    """Close the session and record the outcome; invalidate the connection if the
    close itself fails, so no connection stays checked out or idle in transaction."""
    if frame.done:
        return
    frame.done = True
    try:
        session.close()
    except BaseException:
        _quietly(session.invalidate, "invalidating a connection whose close failed")
        raise
    finally:
        now = time.perf_counter()
        duration = now - frame.started
        stats = frame.stats
        cfg = frame.cfg
        if stats is not None:
            slow = stats.transaction_ended(
                committed=committed,
                failed=failed,
                duration=duration,
                slow_threshold=cfg.slow_threshold,
                function=frame.function,
                key=id(frame),
            )
            if now >= stats.next_deadline:
                _watch.warn_overdue(stats, now)
            if slow and cfg.log_levelno <= logging.WARNING:
                logger.warning(
                    "slow transaction: %s took %.3f s (slow_threshold %.3f s)",
                    frame.function or "scope",
                    duration,
                    cfg.slow_threshold,
                )
        if logger.isEnabledFor(logging.DEBUG) and cfg.log_levelno <= logging.DEBUG:
            logger.debug(
                "session closed (%s): %s in %.6f s",
                frame.function or "scope",
                "committed" if committed else "rolled back",
                duration,
            )


def abort_frame(session: Session, frame: Frame) -> None:
    """Last-resort cleanup after the normal exit was itself interrupted (a second
    cancellation): drop the connection without any I/O and record the end."""
    if frame.action is not Action.NEW or frame.done:
        return
    _quietly(session.invalidate, "invalidating the connection of an interrupted scope")
    _close(session, frame, committed=False, failed=True)


def _quietly(action: Callable[[], object], what: str) -> None:
    # Used only where another exception is already on its way out: a cleanup
    # error must not shadow it, but must not vanish either.
    try:
        action()
    except Exception as err:
        logger.warning("error while %s: %s", what, type(err).__name__)


def pool_exhausted(err: sa_exc.TimeoutError, status: dict[str, Any]) -> PoolExhaustedError:
    """Build the user-facing error for a pool checkout timeout."""
    state = ", ".join(f"{k}={v}" for k, v in status.items())
    return PoolExhaustedError(
        f"no database connection available: the pool is exhausted ({state}). "
        "Sessions are being held too long or there is more concurrent work than "
        "pool_size + max_overflow; look at get_session_stats()['active_sessions'] "
        "and the long-held session warnings, or raise pool_size/max_overflow."
    )


def require_owner(what: str, manager: object = None) -> Frame:
    """The innermost frame (of ``manager``, or of any manager if None) owning a
    transaction or savepoint; raises :class:`NoActiveScopeError` outside any scope."""
    frame = current_frame(context_key(), None, manager)
    owner = frame.owner if frame is not None else None
    if owner is None:
        raise NoActiveScopeError(
            f"{what} needs an active session scope that owns its transaction, and none "
            "is active in this thread or task. Call it inside session_scope(), "
            "async_session_scope() or a decorated function."
        )
    return owner


def on_commit(callback: Callback, manager: object = None) -> None:
    """Queue ``callback`` on the innermost owning scope (see ``sessionscope.on_commit``)."""
    owner = require_owner("on_commit()", manager)
    if owner.callbacks is None:
        owner.callbacks = []
        if owner.action is _NEW and owner.due is None:
            _track_commits(owner)
    owner.callbacks.append(callback)


def _track_commits(frame: Frame) -> None:
    """Follow COMMITs and ROLLBACKs the body issues itself on the scope's session,
    so callbacks run after the COMMIT that made their work durable and are dropped
    by a rollback. Installed only once a scope registers a callback."""
    frame.due = []

    def _after_commit(session: Session) -> None:
        if frame.callbacks:
            assert frame.due is not None
            frame.due.extend(frame.callbacks)
            frame.callbacks = None

    def _after_soft_rollback(session: Session, previous: SessionTransaction) -> None:
        if previous.parent is None:  # the whole transaction, not a savepoint
            frame.callbacks = None

    event.listen(frame.session, "after_commit", _after_commit)
    event.listen(frame.session, "after_soft_rollback", _after_soft_rollback)


def set_rollback(rollback: bool, manager: object = None) -> None:
    """Doom or un-doom the innermost owning scope (see ``sessionscope.set_rollback``)."""
    require_owner("set_rollback()", manager).doomed = rollback


def enter_retry_boundary(cfg: SessionConfig) -> Token[object] | None:
    """Make the caller the retrying boundary of this thread or task; None if it
    must call once instead (retry disabled, or an outer boundary already retries:
    a part of a unit of work is never re-run alone). Reset the returned token."""
    if cfg.retry_attempts == 0:
        return None
    key = context_key()
    if retry_boundary.get() == key:
        return None
    return retry_boundary.set(key)


def next_retry(
    stats: Stats | None,
    cfg: SessionConfig,
    exc: Exception,
    attempt: int,
    function: str | None,
) -> float | None:
    """After failed attempt number ``attempt``: the delay before the next attempt,
    counted and logged, or None to re-raise. The one decision both retry drivers
    (blocking sleep, asyncio sleep) share."""
    delay = retry_delay_for(cfg, attempt, exc)
    if delay is not None:
        record_retry(stats, cfg, exc, attempt, delay, function)
    return delay


def record_retry(
    stats: Stats | None,
    cfg: SessionConfig,
    exc: BaseException,
    attempt: int,
    delay: float,
    function: str | None,
) -> None:
    """Count a retry and log it at WARNING with the error class and code only
    (never the message: it can hold SQL and bound parameters)."""
    if stats is not None:
        stats.retried(exc)
    if cfg.log_levelno <= logging.WARNING:
        logger.warning(
            "retrying %s after transient %s (retry %d of %d, next attempt in %.2f s)",
            function or "callable",
            describe(exc),
            attempt,
            cfg.retry_attempts,
            delay,
        )


def _detached_config() -> SessionConfig:
    from ._config import SessionConfig

    return SessionConfig(enable_monitoring=False)


_DETACHED_CFG = _detached_config()
