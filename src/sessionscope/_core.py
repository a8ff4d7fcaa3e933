"""The transaction logic, written once as synchronous code over ``Session``.

The sync front calls these functions directly; the async front runs the ones
that do I/O through ``AsyncSession.run_sync`` (SQLAlchemy's greenlet bridge), so
every enter/exit decision exists in exactly one place.

A scope is represented by a :class:`Frame`. The innermost frame of the current
context lives in the ``stack`` ``ContextVar``; frames are linked through
``below``. Which frames a lookup may see (the rules of docs/design.md,
"Scope integrity"):

* Frames remember the thread or asyncio task that opened them (``key``): a
  child task that inherits the context never joins its parent's session by
  accident (sessions are not safe for concurrent use). The one exception is
  the task ``asyncio.wait_for`` makes on Python < 3.12, which stands for its
  caller as it does on 3.12+, where ``wait_for`` runs in the caller's task.
* A frame opened inside a generator (sync or async) is seen only while that
  generator runs, unless the generator is a context manager
  (``@contextmanager``): then the ``with`` body is its scope.
* A closed frame is never seen, whatever context still points at it: a scope
  can end in another context or task than it began in (a generator finalized
  later, FastAPI's sync generator dependencies), and nothing may join it then.

The body's own ``session.commit()`` / ``session.rollback()`` are followed with
session events (:func:`install_session_events`, once per session class): a
commit marks the retry boundary so the unit is never re-run, a rollback of a
transaction the current scope does not own spoils the owner, and a commit of a
transaction that must not commit is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import dis
import enum
import functools
import inspect
import logging
import sys
import threading
import time
import weakref
from asyncio import current_task, isfuture
from asyncio.events import _get_running_loop
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from threading import get_ident
from types import CodeType, FrameType
from typing import TYPE_CHECKING, Any, Final, Protocol

from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session, SessionTransaction

from . import _watch
from ._aborted import FAILED, aborted
from ._backend import INTERNAL_ROLLBACK, ROUTED_TO_REPLICA
from ._config import LEVELNO
from ._errors import (
    ActiveScopeError,
    CommitOutcomeUnknownError,
    NoActiveScopeError,
    PoolExhaustedError,
    RollbackOnlyError,
    SessionFactoryNotInitializedError,
)
from ._observe import Outcome, TransactionInfo, TransactionObserver
from ._policy import ALONE, JOINING, Action, decide
from ._poolwait import waited
from ._retry import attribute_of, describe, is_disconnect, retry_delay_for

if TYPE_CHECKING:
    from contextvars import Token

    from sqlalchemy.ext.asyncio import AsyncSession

    from ._config import SessionConfig
    from ._stats import Stats

__all__ = [
    "Boundary",
    "Frame",
    "FrameState",
    "ScopeHost",
    "Veto",
    "abort_frame",
    "begin_savepoint",
    "context_key",
    "current_frame",
    "enter_retry_boundary",
    "entered_in_generator",
    "exit_frame",
    "find_outer",
    "install_retry_events",
    "install_session_events",
    "logger",
    "next_retry",
    "on_commit",
    "open_frame",
    "outlived",
    "pool_exhausted",
    "pop",
    "push",
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


class ScopeHost(Protocol):
    """What the scope machinery needs of a manager: where new sessions come
    from, the resolved configuration of a scope's options, its counters, and
    the error for an exhausted pool. Frames of one host relate to each other;
    frames of different hosts (databases) never do."""

    stats: Stats
    name: str
    observers: tuple[TransactionObserver, ...]
    config: SessionConfig
    """The manager's configuration: what a scope without overrides uses."""

    def open_sync(self, cfg: SessionConfig, retrying: bool) -> tuple[Session, Session]:
        """A new ``Session`` for a scope with ``cfg`` (twice: core and front);
        ``retrying``: the scope is under a retry boundary, so its session's
        class has :func:`install_retry_events`' listeners."""
        ...

    def open_async(self, cfg: SessionConfig, retrying: bool) -> tuple[Session, AsyncSession]:
        """A new ``AsyncSession`` for a scope with ``cfg``, and its sync session
        (``retrying`` as for :meth:`open_sync`)."""
        ...

    def resolve(
        self, key: tuple[tuple[str, type, Any], ...] | None, overrides: Mapping[str, Any]
    ) -> SessionConfig:
        """The configuration with ``overrides`` applied (cached by ``key``)."""
        ...

    def pool_exhausted(self, err: sa_exc.TimeoutError) -> PoolExhaustedError:
        """The user-facing error for a pool checkout timeout."""
        ...


class FrameState(enum.Enum):
    """Where a frame is in its life."""

    ACTIVE = "active"
    """Entered; the body runs."""
    ENDING = "ending"
    """sessionscope itself is committing, rolling back or closing it."""
    CLOSED = "closed"
    """Ended: no lookup sees it again."""


class Veto(enum.IntEnum):
    """Why an owning frame must not commit, weakest first."""

    DOOMED = 1
    """``set_rollback(True)``: roll back quietly."""
    ROLLBACK_ONLY = 2
    """An exception escaped a joined inner scope: its work is partial."""
    SPOILED = 3
    """The body rolled back the transaction inside a scope that does not own it."""


_ACTIVE, _ENDING, _CLOSED = FrameState.ACTIVE, FrameState.ENDING, FrameState.CLOSED
_DOOMED, _ROLLBACK_ONLY, _SPOILED = Veto.DOOMED, Veto.ROLLBACK_ONLY, Veto.SPOILED

stack: ContextVar[Frame | None] = ContextVar("sessionscope_frame", default=None)
# Set by a framework adapter (sessionscope.fastapi) while it serves one caller with
# sync code spread over pool threads: that code is identified by the caller, not by
# whichever worker thread runs it, so it joins the caller's sync scope. Only threads
# consult it; asyncio tasks keep their own identity, so child tasks never share.
worker_key: ContextVar[object | None] = ContextVar("sessionscope_worker_key", default=None)
_thread_key = threading.local()


class Boundary:
    """The retry loop of one caller (thread or task). ``committed`` turns True as
    soon as anything under it committed (a scope of its own, ``requires_new``
    work, the body's ``session.commit()``, or work in a child task or a thread
    that inherited the context): from then on the unit of work is no longer
    atomic and is never re-run. ``outer`` is the boundary of the caller that
    was retrying when this one began (a child task's parent): what commits
    under this one commits under it too."""

    __slots__ = ("committed", "key", "open_elsewhere", "outer")

    def __init__(self, key: object, outer: Boundary | None = None) -> None:
        self.key = key
        self.outer = outer
        self.committed = False
        # Scopes under this boundary still open in other tasks or threads (a
        # child task gather left running): they may commit after a failure.
        self.open_elsewhere = 0

    def mark_committed(self) -> None:
        """Something under this boundary (and every enclosing one) committed."""
        boundary: Boundary | None = self
        while boundary is not None and not boundary.committed:
            boundary.committed = True
            boundary = boundary.outer


retry_boundary: ContextVar[Boundary | None] = ContextVar("sessionscope_retrying", default=None)

# The owning NEW frame of a session sessionscope opened, kept in the session's
# own __dict__ rather than in session.info: info is a dict built on first use,
# and the frame lookups of every transaction would pay for building it.
_SESSION_FRAME: Final = "_sessionscope_frame"

# A scope entered in a generator resumed by one of these is the ``with`` block's
# scope (``@contextmanager`` / ``@asynccontextmanager``), not the generator's own.
_GENERATOR_FLAGS: Final = inspect.CO_GENERATOR | inspect.CO_ASYNC_GENERATOR


def _context_manager_entries() -> frozenset[object]:
    def gen() -> Iterator[None]:
        yield

    async def agen() -> Any:
        yield

    sync_cm = type(contextlib.contextmanager(gen)())
    async_cm = type(contextlib.asynccontextmanager(agen)())
    return frozenset({sync_cm.__enter__.__code__, async_cm.__aenter__.__code__})


_CM_ENTRIES: Final = _context_manager_entries()
# Scopes entered directly in a generator, by id() of the generator's Python
# frame (weakly: the scope object, held by the suspended generator, keeps its
# frame alive). Consulted only when the context holds no visible frame.
_GENERATOR_SCOPES: dict[int, weakref.ref[Frame]] = {}
_CONTEXTLIB_FILE: Final = contextlib.__file__
# asyncio.wait_for runs its awaitable in a new task before Python 3.12.
_WAIT_FOR_TASK: Final = sys.version_info < (3, 12)
_RELEASE_WAITER: Final = getattr(asyncio.tasks, "_release_waiter", None)
_YIELD_VALUE: Final = dis.opmap["YIELD_VALUE"]
_YIELD_FROM: Final = dis.opmap.get("YIELD_FROM", -1)
_SEND: Final = dis.opmap.get("SEND", -1)
_ASYNC_GEN_WRAP: Final = dis.opmap.get("ASYNC_GEN_WRAP", -1)
# The instruction that calls __enter__ in a with statement, and the one that
# begins an async with statement (then GET_AWAITABLE, LOAD_CONST None, and the
# await of __aenter__()).
_WITH_ENTRY: Final = dis.opmap.get("BEFORE_WITH", dis.opmap.get("SETUP_WITH", -1))
_ASYNC_WITH_ENTRY: Final = dis.opmap["BEFORE_ASYNC_WITH"]


class Frame:
    """One active scope.

    ``parent`` is the frame this scope relates to (joins, saves a point in, or
    None for a new session); ``below`` is the frame that was innermost in the
    context when this one was pushed, whatever its thread, task, kind or manager:
    lookups walk ``below``, so a scope of one manager nested in another's still
    finds the outer scope of its own manager. ``owner`` is the innermost frame
    that owns a transaction or savepoint (itself for NEW and SAVEPOINT frames); a
    JOIN frame on a session sessionscope did not open has no owner. ``root`` is
    the NEW frame that owns the session (None for a session sessionscope did not
    open); it lists the JOIN and SAVEPOINT frames active on its session in
    ``inner``. ``front`` is what the user sees: the ``Session``, or the
    ``AsyncSession`` whose ``sync_session`` is ``session``. ``generator`` is the
    generator frame the scope was entered in, when only that generator may see it.
    """

    __slots__ = (
        "__weakref__",
        "action",
        "below",
        "boundary",
        "callbacks",
        "cause",
        "cfg",
        "commit_failed",
        "commit_in_flight",
        "committed_now",
        "connection_tx",
        "culprit",
        "due",
        "epoch",
        "front",
        "function",
        "generator",
        "inner",
        "key",
        "manager",
        "owner",
        "parent",
        "root",
        "savepoint",
        "session",
        "started",
        "state",
        "stats",
        "trace",
        "veto",
        "waited",
        "within",
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
        manager: ScopeHost | None = None,
    ) -> None:
        self.action = action
        self.manager = manager
        self.session = session
        self.front = front
        self.parent = parent
        self.below: Frame | None = None
        self.cfg = cfg
        self.key = key
        self.stats = stats
        self.function = function
        if action is _NEW:
            self.owner: Frame | None = self
            self.root: Frame | None = self
        elif parent is None:  # a JOIN standing for a session sessionscope did not open
            self.owner = self.root = None
        else:
            self.owner = self if action is _SAVEPOINT else parent.owner
            self.root = parent.root
        self.state = _ACTIVE
        self.veto: Veto | None = None
        self.cause: BaseException | None = None
        self.savepoint: SessionTransaction | None = None
        self.callbacks: list[Callback] | None = None
        self.due: list[Callback] | None = None  # callbacks whose COMMIT already happened
        self.inner: list[Frame] | None = None
        self.generator: FrameType | None = None
        self.boundary: Boundary | None = None
        self.commit_in_flight = False
        self.commit_failed = False  # a COMMIT of the body's failed (the body went on)
        self.committed_now = False  # the transaction that is ending was committed
        # The connection-level transaction the session began on: the body may
        # end it behind the session's back (session.connection().commit()).
        self.connection_tx: Any = None
        self.culprit: str | None = None  # the scope whose body spoiled this one
        # Root: transactions the body ended so far. Savepoint: the root's count
        # when it began, to tell a savepoint the body closed from a lost one.
        self.epoch = 0
        # The scope of the innermost generator running when this one was entered
        # (only looked for while some generator holds a scope).
        self.within: Frame | None = None
        # (observer, handle) of each transaction observer watching this scope.
        self.trace: list[tuple[TransactionObserver, object]] | None = None
        self.started = 0.0
        # Monitored NEW frames: the thread's or task's pool wait when it began.
        self.waited = 0.0

    @property
    def is_async(self) -> bool:
        """Whether the scope is an async one (its ``front`` is an ``AsyncSession``).
        Worked out rather than kept: every slot is memory per scope."""
        front = self.front
        return front is not None and front is not self.session

    def forbid(self, veto: Veto, cause: BaseException | None) -> None:
        """Keep this owning frame from committing; a stronger reason replaces a
        weaker one, never the reverse."""
        if self.veto is None or veto > self.veto:
            self.veto = veto
            self.cause = cause


def context_key() -> object:
    """Who is running: the current asyncio task; else the caller bound by
    :data:`worker_key`; else the current thread's id."""
    if (loop := _get_running_loop()) is not None:
        # Given the loop, current_task() does not look it up again (on 3.11 each
        # lookup is a getpid() system call).
        task = current_task(loop)
        if task is not None:
            return task
    key = worker_key.get()
    if key is not None:
        return key
    # The thread's id, made once per thread: get_ident() builds a new int object
    # on every call, and frames keep their key for as long as they are open.
    try:
        return _thread_key.ident
    except AttributeError:
        ident = _thread_key.ident = get_ident()
        return ident


def _same_caller(frame_key: object, key: object) -> bool:
    if frame_key == key:
        return True
    # Python < 3.12: the task asyncio.wait_for made to run its awaitable acts
    # for the task waiting in wait_for, as the same code does on 3.12+.
    return _WAIT_FOR_TASK and isfuture(key) and isfuture(frame_key) and _waits_for(frame_key, key)


def _waits_for(waiter: object, task: object) -> bool:
    """Python < 3.12: whether ``task`` runs for ``waiter`` through
    ``asyncio.wait_for`` (directly, or through nested ``wait_for`` calls)."""
    for _ in range(16):
        parent = _wait_for_caller(task)
        if parent is None:
            return False
        if parent is waiter:
            return True
        task = parent
    return False


def _wait_for_caller(task: object) -> object:
    # wait_for parks its caller on a future of its own that a done-callback of
    # the task it made releases; that future's own callback wakes the caller.
    for callback in getattr(task, "_callbacks", None) or ():
        function = callback[0] if isinstance(callback, tuple) else callback
        if (
            isinstance(function, functools.partial)
            and function.func is _RELEASE_WAITER
            and function.args
        ):
            for wake in getattr(function.args[0], "_callbacks", None) or ():
                caller = getattr(wake[0] if isinstance(wake, tuple) else wake, "__self__", None)
                if isfuture(caller):
                    return caller
    return None


def entered_in_generator(caller: FrameType, code: CodeType, at: int) -> FrameType | None:
    """The generator frame a ``with`` scope is being entered in, when the scope
    must be seen only inside that generator: the innermost generator on the
    stack that is iterated (not one that ``contextlib`` drives as a context
    manager, whose scope belongs to the code around its ``with`` block). None
    when no iterated generator runs here. ``caller`` is the frame that called
    ``__enter__``; helpers in between (``ExitStack``, ``@contextmanager``
    functions, wrapper classes) hold the scope for the code that called them.
    Marking a scope that ends before its generator next yields is harmless.

    A caller that is no generator and enters the scope with a ``with`` or
    ``async with`` statement of its own ends it before it returns, so no
    generator above it can yield while the scope is open: None, without a
    walk (the usual case, and the walk's cost grows with the stack's depth).
    ``code`` and ``at`` are the caller's ``f_code`` and ``f_lasti``, read once by
    the caller of this (a frame's attributes are not cheap to read)."""
    if not code.co_flags & _GENERATOR_FLAGS and _with_statement(code, at):
        return None
    frame: FrameType | None = caller
    while frame is not None:
        if frame.f_code.co_flags & _GENERATOR_FLAGS:
            # A generator delegated to with ``yield from`` is resumed by its
            # delegator: whoever resumes the outermost one decides.
            outermost = frame
            while outermost.f_back is not None and (
                outermost.f_back.f_code.co_flags & _GENERATOR_FLAGS
                and outermost.f_back.f_code not in _CM_ENTRIES
                and _delegates(outermost.f_back)
            ):
                outermost = outermost.f_back
            resumer = outermost.f_back
            if resumer is None or resumer.f_code not in _CM_ENTRIES:
                return frame
            frame = resumer
        frame = frame.f_back
    return None


def _with_statement(code: CodeType, at: int) -> bool:
    """Whether the caller of a scope's ``__enter__`` or ``__aenter__``, running
    ``code`` at instruction offset ``at``, is executing a ``with`` / ``async
    with`` statement rather than calling the method itself (``ExitStack``, a
    wrapper's ``__enter__``)."""
    ops = code.co_code
    if ops[at] == _WITH_ENTRY:
        return True
    # Awaiting __aenter__(): at SEND (YIELD_FROM before 3.11), or at SEND's
    # inline cache entry (3.12); the statement began three instructions before.
    if at >= 2 and ops[at - 2] == _SEND:
        at -= 2
    return at >= 6 and ops[at - 6] == _ASYNC_WITH_ENTRY


def _delegates(generator: FrameType) -> bool:
    # Paused in ``yield from``: the instruction it stopped at sends to another.
    code = generator.f_code.co_code
    at = generator.f_lasti
    if sys.version_info < (3, 11):
        return code[at] == _YIELD_FROM
    # At SEND itself (3.11, 3.13) or at its inline cache entry (3.12).
    return code[at] == _SEND or (at >= 2 and code[at - 2] == _SEND)


def _running(generator: FrameType) -> bool:
    frame: FrameType | None = sys._getframe(2)
    while frame is not None:
        if frame is generator:
            return True
        frame = frame.f_back
    return False


def _awaiting(generator: FrameType) -> bool:
    """Python < 3.12: an async generator frame of the task waiting in
    ``wait_for`` is inside the await that waits (its body is running, as on
    3.12+) rather than suspended at a ``yield``."""
    code = generator.f_code
    if not code.co_flags & inspect.CO_ASYNC_GENERATOR:
        return False
    at, ops = generator.f_lasti, code.co_code
    if sys.version_info < (3, 11):
        return ops[at] != _YIELD_VALUE
    return at >= 2 and ops[at - 2] != _ASYNC_GEN_WRAP


def _visible(frame: Frame, key: object) -> bool:
    generator = frame.generator
    if frame.key == key:
        return generator is None or _running(generator)
    if not _same_caller(frame.key, key):
        return False
    return generator is None or _awaiting(generator)


def _live(frame: Frame | None) -> Frame | None:
    while frame is not None and frame.state is _CLOSED:
        frame = frame.below
    return frame


def current_frame(
    key: object, is_async: bool | None = None, manager: ScopeHost | None = None
) -> Frame | None:
    """The innermost frame opened by ``key`` (from :func:`context_key`) that is
    visible here, of the given kind (sync or async; either if None) and manager
    (any if None). Sync and async scopes never join each other: an
    ``AsyncSession`` cannot serve blocking code, nor the reverse; nor do scopes
    of different managers (databases)."""
    frame = stack.get()
    above: Frame | None = None
    # Inside a running generator that holds a scope, frames entered outside it
    # (a scope its caller opened after the generator began) are not its own.
    inner = _running_generator_scope(None, None) if _GENERATOR_SCOPES else None
    while frame is not None:
        if frame.state is _CLOSED and above is not None:
            # Splice out a frame that ended below a live one (generators finished
            # out of order): contexts sharing this chain skip it anyway.
            above.below = frame = _live(frame)
            continue
        if (
            frame.state is _ACTIVE
            and (is_async is None or frame.is_async is is_async)
            and (manager is None or frame.manager is manager)
            and (frame.root is None or frame.root.state is not _CLOSED)
            and _visible(frame, key)
            and (
                inner is None
                or frame is inner
                or frame.within is inner
                or frame.generator is not None
            )
        ):
            return frame
        above = frame
        frame = frame.below
    if _GENERATOR_SCOPES:
        return _running_generator_scope(is_async, manager)
    return None


def _running_generator_scope(is_async: bool | None, manager: ScopeHost | None) -> Frame | None:
    """The scope of a generator running here that the current context does not
    hold: a generator resumed each time in a fresh copy of its caller's context
    (Starlette runs sync streaming generators so, in pool threads)."""
    python_frame: FrameType | None = sys._getframe(2)
    while python_frame is not None:
        ref = _GENERATOR_SCOPES.get(id(python_frame))
        found = ref() if ref is not None else None
        if (
            found is not None
            and found.generator is python_frame
            and found.state is _ACTIVE
            and (is_async is None or found.is_async is is_async)
            and (manager is None or found.manager is manager)
            and (found.root is None or found.root.state is not _CLOSED)
        ):
            return found
        python_frame = python_frame.f_back
    return None


def _foreign_task_frame(key: object) -> Frame | None:
    """An active frame of another asyncio task in this context: the parent's
    scope, seen by a child task that inherited the context."""
    if not isfuture(key):
        return None
    frame = stack.get()
    while frame is not None:
        if frame.state is not _CLOSED and isfuture(frame.key) and frame.key is not key:
            return frame
        frame = frame.below
    return None


def find_outer(
    key: object, is_async: bool, explicit: Session | None, manager: ScopeHost | None = None
) -> Frame | None:
    """The frame a new scope relates to.

    With an explicit session: the active frame that holds it, whoever opened it,
    or a detached JOIN frame standing for a session sessionscope did not open
    (its transaction belongs to the caller; nothing marks it rollback-only).
    """
    if explicit is None:
        return current_frame(key, is_async, manager)
    frame = stack.get()
    while frame is not None:
        if frame.session is explicit and frame.state is _ACTIVE:
            return frame
        frame = frame.below
    root: Frame | None = explicit.__dict__.get(_SESSION_FRAME)
    if root is not None and root.state is _ACTIVE:
        return root  # a scope of another context (a worker thread's request scope)
    return Frame(Action.JOIN, explicit, None, None, _DETACHED_CFG, key, None, None)


def open_frame(
    cfg: SessionConfig,
    is_async: bool,
    host: ScopeHost | None,
    function: str | None,
    caller: FrameType | None,
    explicit: Session | None = None,
    explicit_front: Any = None,
) -> Frame:
    """Everything a front does on entry before any I/O: find the frame the new
    scope relates to (:func:`find_outer`), decide what the scope does (raising
    for mandatory/never/durable and, with ``child_tasks="forbid"``, for a child
    task's scope), and build its frame; for NEW, open a ``Session`` object, which
    touches no connection. The front then, for SAVEPOINT, calls
    :func:`begin_savepoint`, and pushes the frame.

    ``caller`` is the Python frame that entered a ``with`` scope, None for a
    decorated call (whose scope ends before it returns, so no generator holds
    it): it decides whether a generator holds the scope
    (:func:`entered_in_generator`) and where the long-held warning says the
    session was opened.
    """
    key = context_key()
    top = stack.get()
    if explicit is not None:
        outer = find_outer(key, is_async, explicit, host)
    elif top is None and not _GENERATOR_SCOPES:
        outer = None  # nothing is open in this context: the common case, no lookup
    else:
        outer = current_frame(key, is_async, host)
    if caller is not None:
        code, at = caller.f_code, caller.f_lasti
        # entered_in_generator()'s first test, written out: a plain function's
        # own with statement is nearly every scope, and two calls cost more.
        generator = (
            None
            if not code.co_flags & _GENERATOR_FLAGS and code.co_code[at] == _WITH_ENTRY
            else entered_in_generator(caller, code, at)
        )
    else:
        code, at, generator = None, -1, None
    action = (
        decide(cfg.propagation, True, cfg.durable)
        if outer is not None
        else ALONE.get(cfg.propagation) or decide(cfg.propagation, False, cfg.durable)
    )
    if action is _NEW:
        if outer is None and top is not None:
            _check_child_task(cfg, key, function)
        if host is None:
            raise SessionFactoryNotInitializedError("a scope that opens its own session")
        # Whoever retries around this scope, in this task or (for child tasks and
        # threads that inherited the context) in the one that started it.
        boundary = retry_boundary.get()
        retrying = boundary is not None
        session, front = (
            host.open_async(cfg, retrying) if is_async else host.open_sync(cfg, retrying)
        )
        stats = host.stats if cfg.enable_monitoring else None
        frame = Frame(action, session, front, outer, cfg, key, stats, function, host)
        if _GENERATOR_SCOPES:
            frame.within = _running_generator_scope(None, None)
        if generator is not None:
            _private_to(frame, generator)
        session.__dict__[_SESSION_FRAME] = frame
        frame.boundary = boundary
        if boundary is not None and boundary.key != key:
            boundary.open_elsewhere += 1
        frame.started = started = time.perf_counter()
        if stats is not None:
            frame.waited = waited()
            if cfg.long_session_warning is None:
                stats.session_opened()
            else:
                # where()'s usual answer without its call: a decorated
                # function's name, or the with statement of code outside the
                # package.
                place: object
                if function is not None:
                    place, offset = function, -1
                elif code is not None and _watch.OUTSIDE.get(code.co_filename):
                    place, offset = code, at
                else:
                    place, offset = _watch.where(caller, code, at)
                stats.session_opened_watched(
                    id(frame), started, cfg.long_session_warning, place, offset
                )
                if started >= stats.next_deadline:
                    _watch.warn_overdue(stats, started)
        if host.observers:
            _begin_trace(frame, host)
        if LEVELNO[cfg.log_level] <= logging.DEBUG and logger.isEnabledFor(logging.DEBUG):
            logger.debug("session opened (%s)", function or "scope")
        return frame
    assert outer is not None  # decide() returns NEW when there is no outer frame
    if action is _SAVEPOINT and generator is not None and (
        outer.root is None or outer.root.generator is not generator
    ):
        raise ActiveScopeError(
            'propagation="nested" inside a generator is refused here: the SAVEPOINT '
            "would belong to a session its caller keeps using between iterations, so "
            "the caller's own writes would be rolled back with it. Open the nested "
            'scope outside the generator, or use propagation="requires_new" for a '
            "session of the generator's own."
        )
    front = outer.front if outer.front is not None else explicit_front
    stats = host.stats if host is not None and cfg.enable_monitoring else None
    frame = Frame(action, outer.session, front, outer, cfg, key, stats, function, host)
    if _GENERATOR_SCOPES:
        frame.within = _running_generator_scope(None, None)
    if generator is not None:
        _private_to(frame, generator)
    root = frame.root
    if root is not None:
        if root.inner is None:
            root.inner = []
        root.inner.append(frame)
    frame.started = time.perf_counter()
    return frame


def _begin_trace(frame: Frame, host: ScopeHost) -> None:
    session = frame.session
    cfg = frame.cfg
    info = TransactionInfo(
        function=frame.function,
        manager=host.name,
        system=session.get_bind().dialect.name,
        isolation_level=cfg.isolation_level,
        read_only=cfg.read_only,
        replica=session.info.get(ROUTED_TO_REPLICA) is not None,
        is_async=frame.is_async,
    )
    trace: list[tuple[TransactionObserver, object]] = []
    for observer in host.observers:
        try:
            trace.append((observer, observer.begin(info)))
        except Exception as err:
            logger.warning("transaction observer %r failed: %s", observer, type(err).__name__)
    frame.trace = trace


def _private_to(frame: Frame, generator: FrameType) -> None:
    frame.generator = generator
    # The generator's outermost scope: inner ones are reached through it.
    ref = _GENERATOR_SCOPES.get(id(generator))
    if ref is None or ref() is None:
        _GENERATOR_SCOPES[id(generator)] = weakref.ref(frame)


def _release_generator(frame: Frame) -> None:
    generator = frame.generator
    if generator is not None:
        frame.generator = None
        ref = _GENERATOR_SCOPES.get(id(generator))
        if ref is not None and ref() is frame:
            del _GENERATOR_SCOPES[id(generator)]


def _check_child_task(cfg: SessionConfig, key: object, function: str | None) -> None:
    if cfg.child_tasks == "independent" and not (
        cfg.log_levelno <= logging.DEBUG and logger.isEnabledFor(logging.DEBUG)
    ):
        return
    parent = _foreign_task_frame(key)
    if parent is None:
        return
    if cfg.child_tasks == "forbid":
        raise ActiveScopeError(
            f"{function or 'a scope'} opens its own session in a child task while "
            f"the scope of its parent task ({parent.function or 'scope'}) is active; "
            "the child's work would commit on its own even if the parent then fails "
            '(child_tasks="forbid"). Await the work in the parent task, pass the '
            "parent's session explicitly and run one statement at a time, or set "
            'child_tasks="independent" for this scope if independent commits are intended.'
        )
    logger.debug(
        "%s runs in a child task: it opens its own session and commits independently "
        "of the parent task's active scope (%s)",
        function or "scope",
        parent.function or "scope",
    )


def push(frame: Frame) -> None:
    """Make ``frame`` the innermost frame of the current context."""
    below = stack.get()
    if below is not None and below.state is _CLOSED:
        below = _live(below)
    frame.below = below
    stack.set(frame)


def pop(frame: Frame) -> None:
    """Take ``frame`` off the current context if it is the innermost frame there.

    A frame ending in another context (a generator finalized elsewhere, a
    dependency exited in another worker thread) leaves that context alone: the
    frame is closed by its exit, and lookups skip closed frames.
    """
    if stack.get() is frame:
        below = frame.below
        stack.set(below if below is None or below.state is not _CLOSED else _live(below))


def begin_savepoint(session: Session, frame: Frame) -> None:
    """Emit SAVEPOINT for a SAVEPOINT frame (BEGINs the outer transaction if needed).

    If that fails, the scope never began: its frame is closed and forgotten, so
    nothing the owner does afterwards is taken for this scope's doing.
    """
    if frame.root is not None:
        frame.epoch = frame.root.epoch
    try:
        frame.savepoint = session.begin_nested()
    except BaseException:
        frame.state = _CLOSED
        _release_generator(frame)
        root = frame.root
        if root is not None and root.inner:
            with contextlib.suppress(ValueError):
                root.inner.remove(frame)
        raise
    if frame.cfg.log_levelno <= logging.DEBUG and logger.isEnabledFor(logging.DEBUG):
        logger.debug("savepoint begun (%s)", frame.function or "scope")


Exit = tuple[Sequence[Callback], BaseException | None]
"""What :func:`exit_frame` leaves to the front: the ``on_commit`` callbacks to run
now, then the error to raise (None: let the body's exception, if any, go on)."""

_NOTHING: Final[Exit] = ((), None)


def exit_frame(session: Session, frame: Frame, exc: BaseException | None) -> Exit:
    """Finish a frame: the whole exit decision table.

    Returns the ``on_commit`` callbacks to run now (after an outermost COMMIT,
    or whose COMMIT the body made itself: those run even when the scope then
    fails) and the error the scope must raise after them: the COMMIT error,
    :class:`RollbackOnlyError`, or :class:`CommitOutcomeUnknownError`. When the
    body raised, cleanup errors are logged and never shadow the body's
    exception. A savepoint scope's errors are raised here directly.
    """
    if frame.state is not _ACTIVE:
        return _NOTHING
    if frame.action is not _NEW:
        return _exit_inner(frame, exc)
    # The frame owns its session: written out here, since this runs for every
    # transaction and a call more costs more than the test.
    cfg = frame.cfg
    boundary = frame.boundary
    if boundary is not None and _committed_behind_the_session(frame):
        boundary.mark_committed()
    frame.state = _ENDING
    committed = False
    failed = exc is not None and not _is_expected(cfg, exc)
    callbacks: Sequence[Callback] = ()
    error: BaseException | None = None
    if exc is not None and cfg.log_levelno <= logging.WARNING:
        _log_failure(frame, exc, at_exit=False, expected=not failed)
    try:
        veto = frame.veto
        if exc is None:
            if veto is _ROLLBACK_ONLY or veto is _SPOILED:
                failed = True
                if session.in_transaction():
                    session.rollback()
                callbacks = frame.due or ()
                if cfg.auto_commit:
                    raise _rollback_only_error(frame)
            elif frame.commit_in_flight:
                # The body's own COMMIT was cut off, and the body went on: the
                # server may or may not have committed, whatever follows.
                failed = True
                if session.in_transaction():
                    _quietly(session.rollback, "rolling back after a lost COMMIT")
                raise CommitOutcomeUnknownError(
                    "session.commit() called in the scope body failed and the body went "
                    "on without rolling back; if the connection was lost, the server may "
                    "or may not have committed. The rest of the scope was rolled back. "
                    "This is never retried: check the data (or use an idempotency key) "
                    "before running the work again."
                )
            elif cfg.auto_commit and veto is None:
                if session.in_transaction():
                    # Flush first: a failure there happened before COMMIT was sent,
                    # so its outcome is known (nothing committed) and a transient
                    # one may be retried.
                    if FAILED:  # before the flush, which would fail or start anew
                        _refuse_if_aborted(session)
                    session.flush()
                    try:
                        session.commit()
                    except BaseException as err:
                        unknown = _commit_failed(session, frame, err)
                        if unknown is not None:
                            raise unknown from err
                        raise
                # else nothing is pending (the body committed itself, or sent
                # nothing): it counts as a successful commit all the same.
                committed = True
                if boundary is not None and not boundary.committed and not cfg.read_only:
                    boundary.mark_committed()
                due, own = frame.due, frame.callbacks
                callbacks = (due + own if own else due) if due else (own or ())
            else:
                # auto_commit=False or set_rollback(True): close() below returns
                # the connection, whose reset rolls the work back. Callbacks
                # whose COMMIT the body made itself still run.
                callbacks = frame.due or ()
        else:
            callbacks = frame.due or ()
            if cfg.auto_rollback and session.in_transaction():
                _quietly(session.rollback, "rolling back after an exception")
            if (frame.commit_in_flight or frame.commit_failed) and is_disconnect(exc):
                raise CommitOutcomeUnknownError(
                    "the connection was lost while session.commit() called in the scope "
                    "body was in flight; the server may or may not have committed. This "
                    "is never retried: check the data (or use an idempotency key) before "
                    "running the work again."
                ) from exc
    except BaseException as err:
        failed = True
        if cfg.log_levelno <= logging.WARNING:
            _log_failure(frame, err, at_exit=True, expected=False)
        error = err
    finally:
        _close(session, frame, committed, failed, error or exc)
    return callbacks, error


def _exit_inner(frame: Frame, exc: BaseException | None) -> Exit:
    """:func:`exit_frame` of a frame that joined or saved a point."""
    action = frame.action
    frame.state = _CLOSED
    if frame.generator is not None:
        _release_generator(frame)
    root = frame.root
    inner = root.inner if root is not None else None
    if inner:
        if inner[-1] is frame:
            inner.pop()
        else:
            # Not always the last one: generators can end in any order.
            with contextlib.suppress(ValueError):
                inner.remove(frame)
    if action is _JOIN:
        if outlived(frame):
            _end_outlived(frame, exc)
        if (
            exc is not None
            and frame.cfg.auto_rollback
            and frame.owner is not None
            # An abandoned generator: its consumer chose to stop, nothing failed.
            and not isinstance(exc, GeneratorExit)
        ):
            _mark_rollback_only(frame.owner, exc)
        if frame.function is not None and frame.stats is not None:
            _record_call(frame, exc is not None and not _is_expected(frame.cfg, exc))
        return _NOTHING
    try:
        _exit_savepoint(frame, exc)
    except BaseException:
        if frame.function is not None and frame.stats is not None:
            _record_call(frame, True)
        raise
    finally:
        frame.owner = None  # it owned itself: see _close
    if frame.function is not None and frame.stats is not None:
        _record_call(frame, exc is not None and not _is_expected(frame.cfg, exc))
    return _NOTHING


_OUTLIVED: Final = (
    "the scope this one joined ended before it (a generator resumed after its "
    "caller's scope ended?): SQLAlchemy reopened the closed session on use, so the "
    "work done since then ran in a transaction of its own, which was rolled back. "
    'Give the generator a session of its own (propagation="requires_new"), or '
    "finish it inside the caller's scope."
)


def outlived(frame: Frame) -> bool:
    """Whether ``frame`` joined a scope that has ended, and its session has been
    used since (so ending ``frame`` must roll back and return a connection)."""
    root = frame.root
    return root is not None and root.state is _CLOSED and frame.session.in_transaction()


def _end_outlived(frame: Frame, exc: BaseException | None) -> None:
    """End the transaction a joined frame's session began after its owner
    closed it: nothing would commit or close it. Raises
    :class:`RollbackOnlyError` when the body did not raise; an abandoned
    generator (``GeneratorExit``) only logs it."""
    session = frame.session
    try:
        session.close()
    except BaseException:
        _quietly(session.invalidate, "invalidating a connection whose close failed")
        raise
    if exc is None:
        raise RollbackOnlyError(_OUTLIVED)
    logger.warning("%s", _OUTLIVED)


def _record_call(frame: Frame, failed: bool) -> None:
    # Per-function figures of a decorated call that did not own the transaction
    # (owning calls are recorded with the transaction in _close).
    assert frame.stats is not None and frame.function is not None
    frame.stats.function_ended(frame.function, time.perf_counter() - frame.started, failed)


def _mark_rollback_only(owner: Frame, exc: BaseException) -> None:
    if owner.veto is None or owner.veto < _ROLLBACK_ONLY:
        owner.forbid(_ROLLBACK_ONLY, exc)
        if owner.cfg.log_levelno <= logging.DEBUG and logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "transaction marked rollback-only by %s escaping a joined scope",
                type(exc).__name__,
            )


def _is_expected(cfg: SessionConfig, exc: BaseException) -> bool:
    """An exception that ends a scope as an expected outcome, not a failure: a
    client error of a web framework (an int ``status_code``, or werkzeug's
    ``code``, below ``expected_status_below``), a class of ``expected_errors``,
    or an abandoned generator (``GeneratorExit``)."""
    if isinstance(exc, GeneratorExit):
        return True
    if cfg.expected_errors and isinstance(exc, cfg.expected_errors):
        return True
    limit = cfg.expected_status_below
    if not limit:
        return False
    status = attribute_of(exc, "status_code")
    if status is None and type(exc).__module__.startswith("werkzeug"):
        status = attribute_of(exc, "code")
    return isinstance(status, int) and not isinstance(status, bool) and 0 < status < limit


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
    frame.callbacks = None


def _exit_savepoint(frame: Frame, exc: BaseException | None) -> None:
    savepoint = frame.savepoint
    frame.savepoint = None
    keep = (exc is None and frame.veto is None) or (exc is not None and not frame.cfg.auto_rollback)
    if savepoint is not None and not _is_open(frame.session, savepoint):
        # The body committed or rolled back the whole transaction meanwhile: the
        # savepoint is gone, and what the scope did since runs in the enclosing
        # transaction. Kept, its callbacks go to the owner; otherwise that work
        # cannot be undone here, so the enclosing owner must not commit it.
        root = frame.root
        if root is not None and root.epoch == frame.epoch:
            # Not the body's doing: the server dropped the savepoint with the
            # whole transaction (a MySQL/MariaDB deadlock the body caught).
            keep = False
        _savepoint_ended(frame, rolled_back=not keep, error=exc)
        if keep:
            _promote_callbacks(frame)
            return
        frame.callbacks = None
        _fail_enclosing(frame, exc or frame.cause or RollbackOnlyError("savepoint lost"))
        if exc is None and frame.veto is _ROLLBACK_ONLY:
            raise _rollback_only_error(frame)
        return
    if keep:
        if savepoint is not None:
            try:
                # A savepoint deactivated by a failed flush raises here instead of
                # looking released: its work is gone and the caller must know.
                _own_operation(frame, savepoint.commit)
            except BaseException as err:
                _rollback_savepoint(frame, savepoint, err)
                if isinstance(err, sa_exc.DBAPIError):
                    # The server refused the RELEASE (MySQL/MariaDB: the savepoint
                    # went with the whole transaction when a deadlock the body
                    # caught rolled it back): the enclosing work is gone too.
                    _fail_enclosing(frame, err)
                frame.callbacks = None
                _savepoint_ended(frame, rolled_back=True, error=err)
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
        _savepoint_ended(frame, rolled_back=False, error=None)
        if frame.cfg.log_levelno <= logging.DEBUG and logger.isEnabledFor(logging.DEBUG):
            logger.debug("savepoint released (%s)", frame.function or "scope")
        return
    frame.callbacks = None
    # Roll back even a savepoint a failed flush deactivated: only that closes it
    # and hands the session back to the enclosing transaction.
    if savepoint is not None:
        failure = _rollback_savepoint(frame, savepoint, exc)
        if failure is not None and exc is None:
            _savepoint_ended(frame, rolled_back=True, error=failure)
            raise failure
    _savepoint_ended(frame, rolled_back=True, error=exc)
    if frame.cfg.log_levelno <= logging.DEBUG and logger.isEnabledFor(logging.DEBUG):
        logger.debug(
            "rolled back to savepoint (%s)%s",
            frame.function or "scope",
            f" after {type(exc).__name__}" if exc is not None else "",
        )
    if exc is None and frame.veto is _ROLLBACK_ONLY:
        raise _rollback_only_error(frame)


def _own_operation(frame: Frame, operation: Callable[[], object]) -> None:
    """Run ``operation``, sessionscope's own release or rollback of a savepoint:
    whatever it does to the whole transaction (SQLAlchemy may roll it back when
    the server lost it) is not the body's doing. (A function rather than a
    context manager: it runs for every savepoint, where a generator-based
    context manager costs more than the rest of the bookkeeping.)"""
    root = frame.root
    if root is None or root.state is not _ACTIVE:
        operation()
        return
    root.state = _ENDING
    try:
        operation()
    finally:
        root.state = _ACTIVE


def _rollback_savepoint(
    frame: Frame, savepoint: SessionTransaction, cause: BaseException | None
) -> Exception | None:
    """ROLLBACK TO the scope's savepoint; return the error if that failed.

    A failure means the savepoint is gone with the whole transaction (MySQL and
    MariaDB roll a deadlock victim's transaction back entirely): the enclosing
    scope's earlier work is lost, so its owner is marked rollback-only and can
    never commit what follows."""
    try:
        _own_operation(frame, savepoint.rollback)
    except Exception as err:
        logger.warning(
            "rolling back to the savepoint of %s failed (%s): the enclosing "
            "transaction is marked rollback-only",
            frame.function or "scope",
            type(err).__name__,
        )
        _fail_enclosing(frame, cause or err)
        return err
    return None


def _fail_enclosing(frame: Frame, cause: BaseException) -> None:
    # A savepoint scope whose work cannot be undone: the scope enclosing it must
    # not commit it (marked rollback-only, like a failed joined step).
    owner = frame.parent.owner if frame.parent is not None else None
    if owner is not None:
        _mark_rollback_only(owner, cause)


def _savepoint_ended(frame: Frame, *, rolled_back: bool, error: BaseException | None) -> None:
    if frame.stats is not None:
        frame.stats.savepoint_ended(rolled_back=rolled_back)
    root = frame.root
    if root is not None and root.trace:
        for observer, handle in root.trace:
            _tell(observer.savepoint, handle, released=not rolled_back, error=error)


def _tell(call: Callable[..., object], *args: object, **kwargs: object) -> None:
    # An observer (a tracer) must never break the transaction it watches.
    try:
        call(*args, **kwargs)
    except Exception as err:
        logger.warning("transaction observer %r failed: %s", call, type(err).__name__)


def _is_open(session: Session, savepoint: SessionTransaction) -> bool:
    """True while ``savepoint`` is still part of the session's transaction chain
    (active, or deactivated by a failed flush and awaiting its rollback); False
    once closed, e.g. after the body committed or rolled back the whole session."""
    transaction = session.get_nested_transaction()
    while transaction is not None:
        if transaction is savepoint:
            return True
        transaction = transaction.parent
    return False


def _rollback_only_error(frame: Frame) -> RollbackOnlyError:
    if frame.veto is _SPOILED:
        return RollbackOnlyError(
            "the transaction was rolled back instead of committed: session.rollback() (or "
            f"close() / reset()) was called inside a joined or nested scope ({frame.culprit}), "
            "which "
            "rolled back this scope's whole transaction; committing what came after it "
            "would commit partial work. Let the error propagate instead of rolling back "
            'there, or give that scope propagation="nested" and let the exception '
            "escape it to undo just its own work."
        )
    ended = (
        "savepoint scope was rolled back instead of released"
        if frame.action is _SAVEPOINT
        else "transaction was rolled back instead of committed"
    )
    err = RollbackOnlyError(
        f"the {ended}: an exception "
        f"({type(frame.cause).__name__}) escaped a joined inner scope, so its work "
        "was partial. Catch the error inside the inner scope, or give the inner "
        'scope propagation="nested" so its failure is contained.'
    )
    err.__cause__ = frame.cause
    return err


def _log_failure(frame: Frame, err: BaseException, *, at_exit: bool, expected: bool) -> None:
    """Log why a transaction did not commit: the error class and code only, since
    an error's text can hold SQL and bound parameters."""
    name = frame.function or "scope"
    if expected:
        if frame.cfg.log_levelno <= logging.DEBUG and logger.isEnabledFor(logging.DEBUG):
            logger.debug("transaction of %s rolled back: %s", name, type(err).__name__)
    elif isinstance(err, RollbackOnlyError):
        logger.warning(
            "transaction of %s rolled back: %s",
            name,
            "the body rolled back a transaction its scope does not own"
            if frame.veto is _SPOILED
            else f"an exception ({type(err.__cause__).__name__}) escaped a joined inner scope",
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


def _commit_failed(
    session: Session, frame: Frame, err: BaseException
) -> CommitOutcomeUnknownError | None:
    """After ``session.commit()`` raised ``err`` (the flush before it went
    through): the error to raise instead, when the COMMIT's outcome is unknown
    (the connection was lost with it in flight); None to raise ``err`` itself."""
    if isinstance(err, sa_exc.DBAPIError):
        if is_disconnect(err):
            if frame.boundary is not None:
                frame.boundary.mark_committed()
            return CommitOutcomeUnknownError(
                f"the connection was lost while COMMIT was in flight ({describe(err)}); "
                "the server may or may not have committed. This is never retried: "
                "check the data (or use an idempotency key) before running the work again."
            )
        # The server answered: nothing was committed. SQLite keeps its transaction
        # open after a busy COMMIT, and the pool does not roll back a connection
        # whose COMMIT was attempted: roll back here, or the connection goes back
        # to the pool inside a transaction.
        _quietly(session.rollback, "rolling back after a failed COMMIT")
    elif not isinstance(err, Exception):
        # A task cancelled mid-COMMIT must re-raise CancelledError, so the
        # unknown outcome can only be told here.
        logger.warning(
            "COMMIT interrupted by %s: the server may or may not have committed",
            type(err).__name__,
        )
    return None


def _close(
    session: Session,
    frame: Frame,
    committed: bool,
    failed: bool,
    error: BaseException | None = None,
) -> None:
    """Close the session and record the outcome; invalidate the connection if the
    close itself fails, so no connection stays checked out or idle in transaction."""
    if frame.state is _CLOSED:
        return
    frame.state = _CLOSED
    if frame.generator is not None:
        _release_generator(frame)
    boundary = frame.boundary
    if boundary is not None and boundary.key != frame.key:
        boundary.open_elsewhere -= 1
    try:
        session.close()
    except BaseException:
        _quietly(session.invalidate, "invalidating a connection whose close failed")
        raise
    finally:
        session.__dict__.pop(_SESSION_FRAME, None)
        # A NEW frame owns itself: without this, the frame, its session and all
        # it holds would wait for the cyclic garbage collector.
        frame.inner = frame.owner = frame.root = None
        if frame.trace:
            _end_trace(frame, committed=committed, failed=failed, error=error)
        now = time.perf_counter()
        duration = now - frame.started
        stats = frame.stats
        cfg = frame.cfg
        if stats is not None:
            # The wait for a pooled connection is the pool's story, not the
            # transaction's: it is left out of the slow threshold. A scope that
            # ends in another thread or task than it began in (a generator's)
            # reads two different totals: a difference no wait of this scope
            # can be (below zero, above its duration) counts as none.
            wait = waited() - frame.waited
            if not 0.0 <= wait <= duration:
                wait = 0.0
            slow = stats.transaction_ended(
                committed, failed, duration, cfg.slow_threshold, frame.function, id(frame), wait
            )
            if now >= stats.next_deadline:
                _watch.warn_overdue(stats, now)
            if slow and cfg.log_levelno <= logging.WARNING:
                stats.warn_slow(frame.function or "scope", duration, wait, cfg.slow_threshold, now)
        if LEVELNO[cfg.log_level] <= logging.DEBUG and logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "session closed (%s): %s in %.6f s",
                frame.function or "scope",
                "committed" if committed else "rolled back",
                duration,
            )


def _end_trace(
    frame: Frame, *, committed: bool, failed: bool, error: BaseException | None
) -> None:
    outcome: Outcome
    if committed:
        outcome = "committed"
    elif isinstance(error, CommitOutcomeUnknownError):
        outcome = "commit_outcome_unknown"
    elif failed:
        outcome = "failed"
    else:
        outcome = "rolled_back"
    trace, frame.trace = frame.trace or [], None
    for observer, handle in trace:
        _tell(observer.end, handle, outcome, error)


def abort_frame(session: Session, frame: Frame) -> None:
    """Last-resort cleanup after the normal exit was itself interrupted (a second
    cancellation): drop the connection without any I/O and record the end."""
    if frame.action is not Action.NEW or frame.state is _CLOSED:
        return
    _quietly(session.invalidate, "invalidating the connection of an interrupted scope")
    _close(session, frame, False, True)


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


def require_owner(what: str, manager: ScopeHost | None = None) -> Frame:
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


def on_commit(callback: Callback, manager: ScopeHost | None = None) -> None:
    """Queue ``callback`` on the innermost owning scope (see ``sessionscope.on_commit``).

    Raises ``TypeError`` for a coroutine function in a sync scope: nothing
    there could await it.
    """
    if not callable(callback):
        raise TypeError(f"on_commit() takes a callable, got {type(callback).__name__}")
    owner = require_owner("on_commit()", manager)
    if not owner.is_async and inspect.iscoroutinefunction(callback):
        raise TypeError(
            f"on_commit() got the coroutine function {_callable_name(callback)} in a sync "
            "scope, where nothing can await it; pass a regular function, or register it "
            "in an async scope"
        )
    if owner.callbacks is None:
        owner.callbacks = []
    owner.callbacks.append(callback)


def _callable_name(callback: Callback) -> str:
    return str(getattr(callback, "__qualname__", type(callback).__qualname__))


def set_rollback(rollback: bool, manager: ScopeHost | None = None) -> None:
    """Doom or un-doom the innermost owning scope (see ``sessionscope.set_rollback``).

    Un-dooming never lifts a stronger reason not to commit (rollback-only).
    """
    owner = require_owner("set_rollback()", manager)
    if rollback:
        owner.forbid(_DOOMED, None)
    elif owner.veto is _DOOMED:
        owner.veto = None


# -- the body's own COMMIT and ROLLBACK ------------------------------------------


def install_session_events(session_class: type[Session]) -> None:
    """Follow COMMITs and ROLLBACKs issued by scope bodies on sessions of
    ``session_class`` (a class of the manager's own, so no other session pays
    for it). Sessions sessionscope did not open are left alone."""
    event.listen(session_class, "before_commit", _before_commit)
    event.listen(session_class, "after_commit", _after_commit)
    event.listen(session_class, "after_transaction_end", _after_transaction_end)


def install_retry_events(session_class: type[Session]) -> None:
    """Also follow COMMITs the body sends through ``session.connection()``, which
    the session does not see, on sessions of ``session_class``: the subclass
    that scopes opened under a retry boundary use (:meth:`ScopeHost.open_sync`),
    where such a COMMIT must keep the unit from being re-run. Other sessions
    never pay for these two events (each costs about 0.5% of a transaction)."""
    event.listen(session_class, "after_begin", _after_begin)
    event.listen(session_class, "before_flush", _before_flush)


# Each listener below first finds the owning frame of the session while its
# body (not sessionscope) runs: the session's frame, if still ACTIVE (during
# sessionscope's own COMMIT, ROLLBACK and close it is ENDING, and the
# listeners return at once). The lookup is written out in each: these run for
# every transaction, where a shared helper's call costs more than the rest.


def _before_commit(session: Session) -> None:
    root: Frame | None = session.__dict__.get(_SESSION_FRAME)
    if root is None or root.state is not _ACTIVE:
        return
    if session.in_nested_transaction():
        # A savepoint is being released. When it is a scope's own, the body is
        # committing the whole transaction through it (session.commit()):
        # refuse now, before SQLAlchemy releases it, so that the scope can
        # still roll its own work back.
        nested = session.get_nested_transaction()
        if root.inner and any(frame.savepoint is nested for frame in root.inner):
            _refuse_if_vetoed(root)
        return
    _refuse_if_vetoed(root)
    if FAILED:
        _refuse_if_aborted(session)
    root.commit_in_flight = True
    root.connection_tx = None  # this COMMIT ends it: not behind the session's back
    if root.boundary is not None:
        # From here on the unit is no longer atomic: never re-run it.
        root.boundary.mark_committed()


def _refuse_if_aborted(session: Session) -> None:
    """Raise :class:`RollbackOnlyError` for the COMMIT of a transaction the
    server already ended at a failed statement the body caught."""
    backend = aborted(session)
    if backend is None:
        return
    if backend == "postgresql":
        what = (
            "PostgreSQL aborted it at that failure and would answer COMMIT with a "
            "ROLLBACK of all of it"
        )
    else:
        what = (
            "the server rolled it back at that deadlock, so COMMIT would commit only "
            "what followed"
        )
    raise RollbackOnlyError(
        "this transaction cannot commit: a statement failed in it and the body went "
        f"on; {what}. Nothing was committed. Run a statement that may fail in a "
        'nested scope (propagation="nested"), whose failure rolls back to its '
        "SAVEPOINT only, or let the error end the scope (a deadlock is retried)."
    )


def _refuse_if_vetoed(root: Frame) -> None:
    """Raise :class:`RollbackOnlyError` for the body's COMMIT of a transaction
    that a scope of it (the owner, or a savepoint scope) must not commit."""
    for frame in (root, *(root.inner or ())):
        if frame.veto is not None and frame.owner is frame:
            raise RollbackOnlyError(
                "session.commit() was refused: this transaction "
                + (
                    "was marked to roll back with set_rollback(True)"
                    if frame.veto is _DOOMED
                    else "must roll back (a joined step failed, or the body rolled it back "
                    "inside a scope that does not own it)"
                )
                + ", so committing would make partial work durable. Nothing was "
                "committed; let the error propagate, or roll back instead."
            ) from frame.cause


def _after_commit(session: Session) -> None:
    root: Frame | None = session.__dict__.get(_SESSION_FRAME)
    if root is None or root.state is not _ACTIVE or session.in_nested_transaction():
        return
    root.commit_in_flight = False
    root.committed_now = True
    due: list[Callback] | None = root.due
    for frame in (root, *(root.inner or ())):
        if frame.callbacks:
            if due is None:
                due = root.due = []
            due.extend(frame.callbacks)
            frame.callbacks = None


def _after_begin(session: Session, transaction: SessionTransaction, connection: Any) -> None:
    root: Frame | None = session.__dict__.get(_SESSION_FRAME)
    # The state first: during sessionscope's own COMMIT (the usual case of a
    # first flush) that is all this costs; transaction.parent is a property.
    if root is not None and root.state is _ACTIVE and transaction.parent is None:
        root.connection_tx = connection.get_transaction()


def _committed_behind_the_session(root: Frame) -> bool:
    """Whether the body ended the connection's transaction itself (through
    ``session.connection()``) while the session's stays active, which the
    session's events do not see: what it did may be committed, so the unit must
    never be re-run. (A failed flush ends both: that is no COMMIT.)"""
    transaction = root.connection_tx
    if transaction is None or transaction.is_active:
        return False
    current = root.session.get_transaction()
    return current is not None and current.is_active


def _before_flush(session: Session, flush_context: Any, instances: Any) -> None:
    root: Frame | None = session.__dict__.get(_SESSION_FRAME)
    if (
        root is not None
        and root.boundary is not None
        and root.state is _ACTIVE
        and _committed_behind_the_session(root)
    ):
        root.boundary.mark_committed()


def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    # The end of the whole transaction, however the body ended it: COMMIT
    # (after_commit ran first), or ROLLBACK, close() or reset(), which all
    # discard it.
    root: Frame | None = session.__dict__.get(_SESSION_FRAME)
    if root is None or root.state is not _ACTIVE:
        return  # not a body's doing
    if transaction.parent is not None or session.info.get(INTERNAL_ROLLBACK):
        return  # a savepoint, or a routing fallback's rollback
    root.epoch += 1
    root.connection_tx = None
    if root.committed_now:
        root.committed_now = False
        return
    if root.commit_in_flight:
        # A COMMIT of the body's failed and the body rolled back: if the
        # connection was lost, the outcome stays unknown (see exit_frame).
        root.commit_in_flight = False
        root.commit_failed = True
    active = root.inner
    for frame in (root, *(active or ())):
        frame.callbacks = None
    if active:
        root.forbid(_SPOILED, None)
        root.culprit = active[-1].function or "a scope"
    elif root.veto is _ROLLBACK_ONLY:
        # The owner's body rolled back the partial work itself: what follows
        # is a new transaction of its own.
        root.veto = None
        root.cause = None


# -- retry -----------------------------------------------------------------------


def enter_retry_boundary(
    cfg: SessionConfig, explicit: bool, is_async: bool | None, manager: ScopeHost | None
) -> Token[Boundary | None] | None:
    """The one decision of whether a call retries: make the caller the retrying
    boundary of its thread or task and return the token to reset, or None to
    call once. Calls once when retry is disabled; when the call is part of an
    enclosing unit of work (given its session explicitly, or of a propagation
    that joins and a scope of this kind and manager, any if None, is active),
    since a part of a unit is never re-run alone; and when an outer boundary of
    this caller already retries."""
    if cfg.retry_attempts == 0:
        return None
    key = context_key()
    if explicit or (
        cfg.propagation in JOINING
        and (stack.get() is not None or _GENERATOR_SCOPES)
        and current_frame(key, is_async, manager) is not None
    ):
        return None
    outer = retry_boundary.get()
    if outer is not None and _same_caller(outer.key, key):
        return None
    return retry_boundary.set(Boundary(key, outer))


def next_retry(
    host: ScopeHost | None,
    cfg: SessionConfig,
    exc: Exception,
    attempt: int,
    function: str | None,
) -> float | None:
    """After failed attempt number ``attempt``: the delay before the next attempt,
    counted and logged, or None to re-raise. The one decision both retry drivers
    (blocking sleep, asyncio sleep) share. Never retries once anything under the
    boundary committed."""
    boundary = retry_boundary.get()
    delay = retry_delay_for(cfg, attempt, exc)
    if delay is None:
        return None
    if boundary is not None and (boundary.committed or boundary.open_elsewhere):
        if cfg.log_levelno <= logging.WARNING:
            logger.warning(
                "not retrying %s after transient %s: %s, so running it again could "
                "apply work twice",
                function or "callable",
                describe(exc),
                "part of its work was already committed"
                if boundary.committed
                else "a child task or thread of it still has a scope open",
            )
        return None
    record_retry(host.stats if host is not None and cfg.enable_monitoring else None,
                 cfg, exc, attempt, delay, function)
    if host is not None:
        for observer in host.observers:
            _tell(observer.retry, exc, attempt, delay, function)
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
