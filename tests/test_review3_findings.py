"""Findings of an adversarial review of the scope entry path restructuring
(``open_frame``, the owning frame in the session's ``__dict__``, the manager's
plain config, the long-held watch keyed by the frame).

Each test fails on the code it was written against and states the rule it
holds the product to (SPEC section 2 "Integrity rules", docs/design.md "Scope
integrity"). Like tests/test_integrity.py, each checks the rows read from
another connection and that nothing is left open.

No ``from __future__ import annotations``: kept like test_integrity.py.
"""

import asyncio
import dataclasses
import gc
import threading
import warnings
import weakref
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session

import sessionscope
from sessionscope import SessionConfig

from .integrity import Env, make_env
from .models import User

# -- a scope whose owner vanished without exiting it -------------------------------------------


def _collect() -> None:
    # The pool's own safety net returns a connection whose session was garbage
    # collected, with a warning saying so: that warning is the expected outcome.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):
            gc.collect()


def _leaked_cleanup(ref: "weakref.ReferenceType[Any]") -> None:
    # Whatever the outcome, leave nothing locked for the next test.
    leaked = ref()
    if leaked is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            leaked.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_session_of_a_thread_that_ended_inside_its_scope_is_not_pinned(env: Env) -> None:
    """Rule: "no connection is ever left checked out or idle in transaction"
    (SPEC, integrity rules). A thread that ends inside a scope it never exits
    (killed worker code, a bare ``__enter__`` with no ``__exit__``) leaves a
    session nobody can reach: garbage collection reclaims it, and SQLAlchemy's
    pool returns (rolling back) its connection, as it did before. Now the
    long-held watch keys its table by the scope's frame object instead of its
    id, so the statistics hold the frame, hence the session and its
    connection, until a long-held check happens to run after
    ``long_session_warning`` (60 s by default) and drops it; with no later
    scope, never. The uncommitted row's connection stays checked out and, on
    PostgreSQL, idle in transaction, holding its locks."""
    manager = env.manager
    refs: list[weakref.ReferenceType[Session]] = []

    def worker() -> None:
        scope = manager.session_scope()
        session = scope.__enter__()
        session.add(User(name="never committed"))
        session.flush()
        refs.append(weakref.ref(session))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    del thread
    try:
        _collect()
        assert refs[0]() is None, "nothing but sessionscope's statistics hold the session"
        assert env.checked_out() == 0
        assert env.idle_in_transaction() == 0
        assert env.rows() == []
    finally:
        _leaked_cleanup(refs[0])


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_session_of_a_task_dropped_inside_its_scope_is_not_pinned(tmp_path: Path) -> None:
    """Async twin: a task dropped while pending inside its scope (a
    fire-and-forget ``ensure_future`` nobody keeps, waiting on an event nobody
    sets) is garbage: Python destroys it ("Task was destroyed but it is
    pending!") and the pool terminates its connection. The frame held by the
    long-held watch keeps the frame's key, the task itself, alive, so neither
    the task nor its connection is ever reclaimed.

    SQLite only: asyncpg and aiomysql keep copies of the task's context (whose
    scope stack holds the frame) for their own callbacks, which pinned the task
    there before this change as well."""
    aenv = make_env("sqlite", tmp_path)
    manager = aenv.manager
    refs: list[weakref.ReferenceType[Any]] = []
    entered = asyncio.Event()

    async def body() -> None:
        async with manager.async_session_scope() as session:
            session.add(User(name="never committed"))
            await session.flush()
            refs.append(weakref.ref(session.sync_session))
            entered.set()
            await asyncio.Event().wait()  # nobody can ever set it

    task: Any = asyncio.ensure_future(body())
    await entered.wait()
    task_ref = weakref.ref(task)
    del task
    try:
        _collect()
        await asyncio.sleep(0.05)  # let the pool's termination of the connection run
        _collect()
        assert task_ref() is None, "nothing but sessionscope's statistics hold the task"
        assert refs[0]() is None
        assert aenv.checked_out() == 0
        assert aenv.idle_in_transaction() == 0
        assert aenv.rows() == []
    finally:
        await aenv.aclose()


# -- SessionConfig: its dataclass fields are its options ------------------------------------------


def test_a_saved_config_restores_through_its_dataclass_fields() -> None:
    """Rule: ``SessionConfig`` is the public dataclass of the options, and the
    scope options are "checked against SessionConfig's fields" (docs/design.md,
    typing): every field is an option, so the usual way of saving and
    restoring configuration (``dataclasses.asdict`` / ``fields``, then
    ``configure_session(**saved)`` or ``SessionConfig(**saved)``) works. The
    derived ``log_levelno`` became a dataclass field (``init=False``): every
    such round trip now raises (the product's own tests had to change their
    restore helper to skip it)."""
    saved = dataclasses.asdict(sessionscope.configure_session(log_level="ERROR"))
    try:
        assert SessionConfig(**saved) == SessionConfig(log_level="ERROR")
        restored = sessionscope.configure_session(**saved)
        assert restored.log_level == "ERROR"
    finally:
        sessionscope.configure_session(log_level="WARNING")
