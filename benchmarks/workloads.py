"""The workloads of SPEC section 5 and, for each, one runner per contender.

A runner does ``n`` units of the workload and nothing else; for every workload
but ``concurrent`` a unit is one transaction. Each contender's code is what a
fluent user of that library writes:

* raw SQLAlchemy: ``with sessionmaker.begin() as s:`` /
  ``async with async_sessionmaker.begin() as s:`` on a plain ``create_engine``
  (the reference, ``raw``) and, on SQLite, on the manager's engine, which has the
  BEGIN recipe (``raw_recipe``);
* sessionscope: ``with manager.session_scope() as s:`` and the decorators;
* advanced-alchemy: ``with config.get_session() as s: ...; s.commit()`` (its
  session context manager closes but does not commit);
* fastapi-async-sqlalchemy: ``async with db(commit_on_exit=True): db.session...``,
  the library's way to get a session outside a request (async only).

Rows carry a tag naming the workload and contender, so the run can check that
each contender really committed what it was asked to (see ``expected_rows``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .env import Env

__all__ = ["LABELS", "PEERS", "WORKLOADS", "Workload", "by_name"]

SyncRunner = Callable[[int], None]
AsyncRunner = Callable[[int], Awaitable[None]]

PEERS = ("fastapi_async_sqlalchemy", "advanced_alchemy")

LABELS = {
    "raw": "raw SQLAlchemy (plain engine)",
    "raw_recipe": "raw SQLAlchemy + SQLite BEGIN recipe",
    "raw_close": "raw, commit() + close() by hand",
    "raw_close_again": "commit() + close(), again",
    "sessionscope": "sessionscope scope",
    "scope": "sessionscope scope",
    "decorator": "sessionscope decorator",
    "readonly_autocommit": "sessionscope read_only, snapshot=False",
    "readonly_snapshot": "sessionscope read_only (one transaction)",
    "monitoring_on": "sessionscope, monitoring on",
    "monitoring_off": "sessionscope, monitoring off",
    "fastapi_async_sqlalchemy": "fastapi-async-sqlalchemy",
    "advanced_alchemy": "advanced-alchemy",
}

TASKS = 200  # concurrent tasks of the "concurrent" workload

_NO_SYNC = "no sync API (async only)"
_NO_DECORATOR = "no transaction decorator"
_NO_PROPAGATION = "no nesting: an inner session context opens a second session, no join/savepoint"
_NO_MONITORING = "no transaction monitoring to switch"
_NO_READONLY = "no read-only mode: it runs the read in a transaction, as raw does"


@dataclass(frozen=True)
class Workload:
    """One benchmark: its identity, how to build its runners and how to check them."""

    name: str
    group: str
    title: str
    mode: str  # "sync" | "async"
    backend: str  # "sqlite" (in memory) | "postgresql"
    build: Callable[[Env, str], dict[str, Any]]
    rows_per_tx: int = 1
    tx_per_unit: int = 1
    throughput: bool = False  # report tx/s and a throughput ratio (higher is better)
    not_applicable: dict[str, str] = field(default_factory=dict)
    latency: float = 0.0  # seconds added to every round trip by a loopback proxy
    # The client process is the bottleneck (its CPU time is nearly all of the wall
    # time), so its instructions per transaction, counted with callgrind against
    # the real server, predict its throughput.
    client_bound: bool = False

    def tag(self, variant: str) -> str:
        return f"{self.name}:{variant}"


def _raws(name: str, raw: Any, raw_recipe: Any, make: Callable[[Any, str], Any]) -> dict[str, Any]:
    """The raw SQLAlchemy runners: ``raw`` on a plain engine (the reference) and,
    on SQLite, ``raw_recipe`` on the manager's engine (with the BEGIN recipe)."""
    runners = {"raw": make(raw, f"{name}:raw")}
    if raw_recipe is not None:
        runners["raw_recipe"] = make(raw_recipe, f"{name}:raw_recipe")
    return runners


# -- 1. one trivial ORM insert per transaction -------------------------------------


def _insert_sync(env: Env, name: str) -> dict[str, SyncRunner]:
    Row, manager, aa = env.Row, env.manager, env.aa_sync

    def raw_for(raw: Any, tag: str) -> SyncRunner:
        def raw_run(n: int) -> None:
            for _ in range(n):
                with raw.begin() as s:
                    s.add(Row(name=tag))

        return raw_run

    def scope_run(n: int, tag: str = f"{name}:sessionscope") -> None:
        scope = manager.session_scope
        for _ in range(n):
            with scope() as s:
                s.add(Row(name=tag))

    def aa_run(n: int, tag: str = f"{name}:advanced_alchemy") -> None:
        get_session = aa.get_session
        for _ in range(n):
            with get_session() as s:
                s.add(Row(name=tag))
                s.commit()

    return {
        **_raws(name, env.raw, env.raw_recipe, raw_for),
        "sessionscope": scope_run,
        "advanced_alchemy": aa_run,
    }


def _insert_async(env: Env, name: str) -> dict[str, AsyncRunner]:
    Row, manager, aa, db = env.Row, env.manager, env.aa_async, env.fas_db

    def raw_for(raw: Any, tag: str) -> AsyncRunner:
        async def raw_run(n: int) -> None:
            for _ in range(n):
                async with raw.begin() as s:
                    s.add(Row(name=tag))

        return raw_run

    async def scope_run(n: int, tag: str = f"{name}:sessionscope") -> None:
        scope = manager.async_session_scope
        for _ in range(n):
            async with scope() as s:
                s.add(Row(name=tag))

    async def fas_run(n: int, tag: str = f"{name}:fastapi_async_sqlalchemy") -> None:
        for _ in range(n):
            async with db(commit_on_exit=True):
                db.session.add(Row(name=tag))

    async def aa_run(n: int, tag: str = f"{name}:advanced_alchemy") -> None:
        get_session = aa.get_session
        for _ in range(n):
            async with get_session() as s:
                s.add(Row(name=tag))
                await s.commit()

    return {
        **_raws(name, env.araw, env.araw_recipe, raw_for),
        "sessionscope": scope_run,
        "fastapi_async_sqlalchemy": fas_run,
        "advanced_alchemy": aa_run,
    }


# -- 2. an empty scope -------------------------------------------------------------


def _empty_sync(env: Env, name: str) -> dict[str, SyncRunner]:
    manager, aa = env.manager, env.aa_sync

    def raw_for(raw: Any, tag: str) -> SyncRunner:
        def raw_run(n: int) -> None:
            for _ in range(n):
                with raw.begin():
                    pass

        return raw_run

    def scope_run(n: int) -> None:
        scope = manager.session_scope
        for _ in range(n):
            with scope():
                pass

    def aa_run(n: int) -> None:
        get_session = aa.get_session
        for _ in range(n):
            with get_session() as s:
                s.commit()

    return {
        **_raws(name, env.raw, env.raw_recipe, raw_for),
        "sessionscope": scope_run,
        "advanced_alchemy": aa_run,
    }


def _empty_async(env: Env, name: str) -> dict[str, AsyncRunner]:
    manager, aa, db = env.manager, env.aa_async, env.fas_db

    def raw_for(raw: Any, tag: str) -> AsyncRunner:
        async def raw_run(n: int) -> None:
            for _ in range(n):
                async with raw.begin():
                    pass

        return raw_run

    async def scope_run(n: int) -> None:
        scope = manager.async_session_scope
        for _ in range(n):
            async with scope():
                pass

    async def fas_run(n: int) -> None:
        for _ in range(n):
            async with db(commit_on_exit=True):
                pass

    async def aa_run(n: int) -> None:
        get_session = aa.get_session
        for _ in range(n):
            async with get_session() as s:
                await s.commit()

    return {
        **_raws(name, env.araw, env.araw_recipe, raw_for),
        "sessionscope": scope_run,
        "fastapi_async_sqlalchemy": fas_run,
        "advanced_alchemy": aa_run,
    }


# -- 3. decorated function vs scope vs raw -----------------------------------------
# All three are a plain function call doing one insert, so the only difference
# is how the transaction is run.


def _decorator_sync(env: Env, name: str) -> dict[str, SyncRunner]:
    Row, manager = env.Row, env.manager

    def raw_fn_for(raw: Any) -> Callable[[str], None]:
        def raw_fn(tag: str) -> None:
            with raw.begin() as s:
                s.add(Row(name=tag))

        return raw_fn

    def scope_fn(tag: str) -> None:
        with manager.session_scope() as s:
            s.add(Row(name=tag))

    @manager.with_session
    def decorated_fn(session: Any, tag: str) -> None:
        session.add(Row(name=tag))

    def loop(fn: Callable[[str], None], tag: str) -> SyncRunner:
        def run(n: int) -> None:
            for _ in range(n):
                fn(tag)

        return run

    return {
        **_raws(name, env.raw, env.raw_recipe, lambda raw, tag: loop(raw_fn_for(raw), tag)),
        "scope": loop(scope_fn, f"{name}:scope"),
        "decorator": loop(decorated_fn, f"{name}:decorator"),
    }


def _decorator_async(env: Env, name: str) -> dict[str, AsyncRunner]:
    Row, manager = env.Row, env.manager

    def raw_fn_for(raw: Any) -> Callable[[str], Awaitable[None]]:
        async def raw_fn(tag: str) -> None:
            async with raw.begin() as s:
                s.add(Row(name=tag))

        return raw_fn

    async def scope_fn(tag: str) -> None:
        async with manager.async_session_scope() as s:
            s.add(Row(name=tag))

    @manager.async_with_session
    async def decorated_fn(session: Any, tag: str) -> None:
        session.add(Row(name=tag))

    def loop(fn: Callable[[str], Awaitable[None]], tag: str) -> AsyncRunner:
        async def run(n: int) -> None:
            for _ in range(n):
                await fn(tag)

        return run

    return {
        **_raws(name, env.araw, env.araw_recipe, lambda raw, tag: loop(raw_fn_for(raw), tag)),
        "scope": loop(scope_fn, f"{name}:scope"),
        "decorator": loop(decorated_fn, f"{name}:decorator"),
    }


# -- 4. a nested `required` join and a `nested` savepoint ---------------------------
# Two inserts per transaction: one in the outer scope, one in the inner. Raw
# SQLAlchemy joins by passing the session along (no code at all) and saves a
# point with begin_nested().


def _join_sync(env: Env, name: str) -> dict[str, SyncRunner]:
    Row, manager = env.Row, env.manager

    def raw_for(raw: Any, tag: str) -> SyncRunner:
        def raw_run(n: int) -> None:
            for _ in range(n):
                with raw.begin() as s:
                    s.add(Row(name=tag))
                    s.add(Row(name=tag))

        return raw_run

    def scope_run(n: int, tag: str = f"{name}:sessionscope") -> None:
        scope = manager.session_scope
        for _ in range(n):
            with scope() as s:
                s.add(Row(name=tag))
                with scope() as inner:
                    inner.add(Row(name=tag))

    return {**_raws(name, env.raw, env.raw_recipe, raw_for), "sessionscope": scope_run}


def _join_async(env: Env, name: str) -> dict[str, AsyncRunner]:
    Row, manager = env.Row, env.manager

    def raw_for(raw: Any, tag: str) -> AsyncRunner:
        async def raw_run(n: int) -> None:
            for _ in range(n):
                async with raw.begin() as s:
                    s.add(Row(name=tag))
                    s.add(Row(name=tag))

        return raw_run

    async def scope_run(n: int, tag: str = f"{name}:sessionscope") -> None:
        scope = manager.async_session_scope
        for _ in range(n):
            async with scope() as s:
                s.add(Row(name=tag))
                async with scope() as inner:
                    inner.add(Row(name=tag))

    return {**_raws(name, env.araw, env.araw_recipe, raw_for), "sessionscope": scope_run}


def _savepoint_sync(env: Env, name: str) -> dict[str, SyncRunner]:
    Row, manager = env.Row, env.manager

    def raw_for(raw: Any, tag: str) -> SyncRunner:
        def raw_run(n: int) -> None:
            for _ in range(n):
                with raw.begin() as s:
                    s.add(Row(name=tag))
                    with s.begin_nested():
                        s.add(Row(name=tag))

        return raw_run

    def scope_run(n: int, tag: str = f"{name}:sessionscope") -> None:
        scope = manager.session_scope
        for _ in range(n):
            with scope() as s:
                s.add(Row(name=tag))
                with scope(propagation="nested") as inner:
                    inner.add(Row(name=tag))

    return {**_raws(name, env.raw, env.raw_recipe, raw_for), "sessionscope": scope_run}


def _savepoint_async(env: Env, name: str) -> dict[str, AsyncRunner]:
    Row, manager = env.Row, env.manager

    def raw_for(raw: Any, tag: str) -> AsyncRunner:
        async def raw_run(n: int) -> None:
            for _ in range(n):
                async with raw.begin() as s:
                    s.add(Row(name=tag))
                    async with s.begin_nested():
                        s.add(Row(name=tag))

        return raw_run

    async def scope_run(n: int, tag: str = f"{name}:sessionscope") -> None:
        scope = manager.async_session_scope
        for _ in range(n):
            async with scope() as s:
                s.add(Row(name=tag))
                async with scope(propagation="nested") as inner:
                    inner.add(Row(name=tag))

    return {**_raws(name, env.araw, env.araw_recipe, raw_for), "sessionscope": scope_run}


# -- 5. 200 concurrent async tasks on PostgreSQL ------------------------------------
# A unit is one transaction in each of the 200 tasks; they share a pool of 10.


def _concurrent(env: Env, name: str) -> dict[str, AsyncRunner]:
    Row, raw, manager, aa, db = env.Row, env.araw, env.manager, env.aa_async, env.fas_db

    def fan_out(one: Callable[[str], Awaitable[None]], tag: str) -> AsyncRunner:
        async def worker(n: int) -> None:
            for _ in range(n):
                await one(tag)

        async def run(n: int) -> None:
            await asyncio.gather(*(worker(n) for _ in range(TASKS)))

        return run

    async def raw_one(tag: str) -> None:
        async with raw.begin() as s:
            s.add(Row(name=tag))

    async def raw_close_one(tag: str) -> None:
        s = raw()
        try:
            s.add(Row(name=tag))
            await s.commit()
        finally:
            await s.close()

    async def scope_one(tag: str) -> None:
        async with manager.async_session_scope() as s:
            s.add(Row(name=tag))

    async def fas_one(tag: str) -> None:
        async with db(commit_on_exit=True):
            db.session.add(Row(name=tag))

    async def aa_one(tag: str) -> None:
        async with aa.get_session() as s:
            s.add(Row(name=tag))
            await s.commit()

    return {
        "raw": fan_out(raw_one, f"{name}:raw"),
        "sessionscope": fan_out(scope_one, f"{name}:sessionscope"),
        "raw_close": fan_out(raw_close_one, f"{name}:raw_close"),
        # The ceiling against itself: how far two measurements of the same code
        # fall apart in this run's rounds.
        "raw_close_again": fan_out(raw_close_one, f"{name}:raw_close_again"),
        "fastapi_async_sqlalchemy": fan_out(fas_one, f"{name}:fastapi_async_sqlalchemy"),
        "advanced_alchemy": fan_out(aa_one, f"{name}:advanced_alchemy"),
    }


# -- 6. monitoring on vs off ---------------------------------------------------------


def _monitoring_sync(env: Env, name: str) -> dict[str, SyncRunner]:
    Row = env.Row

    def raw_for(raw: Any, tag: str) -> SyncRunner:
        def raw_run(n: int) -> None:
            for _ in range(n):
                with raw.begin() as s:
                    s.add(Row(name=tag))

        return raw_run

    def scoped(manager: Any, tag: str) -> SyncRunner:
        def run(n: int) -> None:
            scope = manager.session_scope
            for _ in range(n):
                with scope() as s:
                    s.add(Row(name=tag))

        return run

    return {
        **_raws(name, env.raw, env.raw_recipe, raw_for),
        "monitoring_on": scoped(env.manager, f"{name}:monitoring_on"),
        "monitoring_off": scoped(env.quiet, f"{name}:monitoring_off"),
    }


def _monitoring_async(env: Env, name: str) -> dict[str, AsyncRunner]:
    Row = env.Row

    def raw_for(raw: Any, tag: str) -> AsyncRunner:
        async def raw_run(n: int) -> None:
            for _ in range(n):
                async with raw.begin() as s:
                    s.add(Row(name=tag))

        return raw_run

    def scoped(manager: Any, tag: str) -> AsyncRunner:
        async def run(n: int) -> None:
            scope = manager.async_session_scope
            for _ in range(n):
                async with scope() as s:
                    s.add(Row(name=tag))

        return run

    return {
        **_raws(name, env.araw, env.araw_recipe, raw_for),
        "monitoring_on": scoped(env.manager, f"{name}:monitoring_on"),
        "monitoring_off": scoped(env.quiet_async, f"{name}:monitoring_off"),
    }


# -- 7. a one-statement read: session.get() by primary key ------------------------------
# Raw SQLAlchemy reads in a transaction (BEGIN, SELECT, COMMIT: three round trips
# on PostgreSQL); a snapshot=False scope sends the SELECT alone.


def _seed_id(env: Env) -> int:
    from sqlalchemy import select

    with env.manager.engine.begin() as conn:
        found = conn.scalar(select(env.Row.id).where(env.Row.name == "readonly-seed"))
        if found is None:
            found = conn.scalar(
                env.Row.__table__.insert().values(name="readonly-seed").returning(env.Row.id)
            )
    return int(found)


def _readonly_sync(env: Env, name: str) -> dict[str, SyncRunner]:
    Row, manager, raw = env.Row, env.manager, env.raw
    row_id = _seed_id(env)

    def raw_run(n: int) -> None:
        for _ in range(n):
            with raw.begin() as s:
                s.get(Row, row_id)

    def scoped(**options: Any) -> SyncRunner:
        def run(n: int) -> None:
            scope = manager.session_scope
            for _ in range(n):
                with scope(**options) as s:
                    s.get(Row, row_id)

        return run

    return {
        "raw": raw_run,
        "readonly_autocommit": scoped(read_only=True, snapshot=False),
        "readonly_snapshot": scoped(read_only=True),
    }


def _readonly_async(env: Env, name: str) -> dict[str, AsyncRunner]:
    Row, manager, raw = env.Row, env.manager, env.araw
    row_id = _seed_id(env)

    async def raw_run(n: int) -> None:
        for _ in range(n):
            async with raw.begin() as s:
                await s.get(Row, row_id)

    def scoped(**options: Any) -> AsyncRunner:
        async def run(n: int) -> None:
            scope = manager.async_session_scope
            for _ in range(n):
                async with scope(**options) as s:
                    await s.get(Row, row_id)

        return run

    return {
        "raw": raw_run,
        "readonly_autocommit": scoped(read_only=True, snapshot=False),
        "readonly_snapshot": scoped(read_only=True),
    }


_PEERS_NO_DECORATOR = {p: _NO_DECORATOR for p in PEERS}
_PEERS_NO_PROPAGATION = {p: _NO_PROPAGATION for p in PEERS}
_PEERS_NO_MONITORING = {p: _NO_MONITORING for p in PEERS}
_FAS_NO_SYNC = {"fastapi_async_sqlalchemy": _NO_SYNC}


def _pair(
    stem: str, group: str, title: str, sync: Any, async_: Any, **kw: Any
) -> tuple[Workload, Workload]:
    """The sync and async SQLite (in memory) twins of one workload."""
    sync_na = {**kw.pop("not_applicable", {}), **kw.pop("sync_not_applicable", {})}
    async_na = {k: v for k, v in sync_na.items() if v != _NO_SYNC}
    return (
        Workload(f"{stem}_sync_sqlite", group, f"{title}, sync", "sync", "sqlite", sync,
                 not_applicable=sync_na, **kw),
        Workload(f"{stem}_async_sqlite", group, f"{title}, async", "async", "sqlite", async_,
                 not_applicable=async_na, **kw),
    )


WORKLOADS: tuple[Workload, ...] = (
    *_pair(
        "insert", "1 insert", "one ORM insert per transaction, SQLite memory",
        _insert_sync, _insert_async, sync_not_applicable=_FAS_NO_SYNC,
    ),
    Workload(
        "insert_sync_postgresql", "1 insert", "one ORM insert per transaction, sync, PostgreSQL",
        "sync", "postgresql", _insert_sync, not_applicable=_FAS_NO_SYNC,
    ),
    Workload(
        "insert_async_postgresql", "1 insert", "one ORM insert per transaction, async, PostgreSQL",
        "async", "postgresql", _insert_async,
    ),
    *_pair(
        "empty", "2 empty", "empty scope (no connection, no statement)",
        _empty_sync, _empty_async, rows_per_tx=0, sync_not_applicable=_FAS_NO_SYNC,
    ),
    *_pair(
        "decorator", "3 decorator", "decorated function vs scope vs raw",
        _decorator_sync, _decorator_async, not_applicable=_PEERS_NO_DECORATOR,
    ),
    *_pair(
        "join", "4 nested", "outer scope + nested `required` join",
        _join_sync, _join_async, rows_per_tx=2, not_applicable=_PEERS_NO_PROPAGATION,
    ),
    *_pair(
        "savepoint", "4 nested", "outer scope + `nested` savepoint",
        _savepoint_sync, _savepoint_async, rows_per_tx=2, not_applicable=_PEERS_NO_PROPAGATION,
    ),
    Workload(
        "concurrent_async_postgresql", "5 concurrent",
        f"{TASKS} concurrent tasks, asyncpg pool 10 / overflow 0, one insert per transaction",
        "async", "postgresql", _concurrent, tx_per_unit=TASKS, throughput=True,
        client_bound=True,
    ),
    *_pair(
        "monitoring", "6 monitoring", "scope with monitoring on vs off",
        _monitoring_sync, _monitoring_async, not_applicable=_PEERS_NO_MONITORING,
    ),
    *(
        Workload(
            f"readonly_{mode}_postgresql{suffix}", "7 read-only",
            f"session.get() by primary key, {mode}, PostgreSQL{title}",
            mode, "postgresql", build, rows_per_tx=0, latency=latency,
            not_applicable={p: _NO_READONLY for p in PEERS},
        )
        for latency, suffix, title in (
            (0.0, "", " on loopback"),
            (0.001, "_1ms", ", 1 ms added to each round trip"),
        )
        for mode, build in (("sync", _readonly_sync), ("async", _readonly_async))
    ),
)


def by_name(name: str) -> Workload:
    for workload in WORKLOADS:
        if workload.name == name:
            return workload
    raise KeyError(name)
