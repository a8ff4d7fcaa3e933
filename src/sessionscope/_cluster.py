"""Several primaries: which node a new write session goes to, and node health.

A :class:`Cluster` belongs to one :class:`~sessionscope.SessionManager` built
with ``primaries=[...]`` (a MariaDB Galera cluster, whose nodes all accept
writes, or PostgreSQL servers of which one at a time is the primary). It only
picks: the manager asks it for a node's engine when a scope opens a new session,
and binds the session there. The node stays the session's for its whole life.

Rules:

1. Policy ``"failover"`` (the default, one writer at a time, which is what Galera
   operators recommend: no certification conflicts between writers): the first
   node in list order that is not cooling down. Policy ``"round_robin"`` spreads
   new sessions over the healthy nodes (conflicting writes on two nodes then
   fail certification at COMMIT with error 1213, which is retried).
2. Every new connection to a node is checked: on Galera ``wsrep_ready`` must be
   ``ON`` and ``wsrep_local_state`` 4 (Synced); on PostgreSQL
   ``pg_is_in_recovery()`` must be false (a standby refuses writes). A node that
   refuses the connection or fails the check is cooled down for ``cooldown``
   seconds and :class:`NodeUnavailableError` is raised: nothing ran, the error is
   transient, and the retry (a new session) goes to another node.
3. A connection lost in use (or a Galera node answering 1047/1180, out of the
   Primary Component) cools its node down as well. Lost before COMMIT, the unit
   of work is retried on another node; lost during COMMIT, it is
   :class:`CommitOutcomeUnknownError` and never retried (the transaction core
   decides that, see :mod:`sessionscope._retry`).
4. With every node cooling down, the one whose cool-down ends first (the one
   that failed longest ago) is tried: a cluster is never refused without a
   connection attempt.

A node whose cool-down has ended is used again by the next new session (its
connection check tells whether it really is back).
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

from sqlalchemy import event
from sqlalchemy.engine import URL, Engine, create_engine, make_url
from sqlalchemy.engine.interfaces import ExceptionContext
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from . import _backend
from ._errors import NodeUnavailableError
from ._retry import error_code

__all__ = ["POLICIES", "Cluster", "Node", "validate_cluster"]

POLICIES: Final = frozenset({"failover", "round_robin"})

# Galera: the node is out of the Primary Component (1047 not ready, 1180 error
# during COMMIT). Lost connections are the dialects' own is_disconnect.
_GALERA_GONE: Final = frozenset({"1047", "1180"})
_SYNCED: Final = "4"

logger = logging.getLogger("sessionscope")

EngineCreated = Callable[[str, Engine], None]


def validate_cluster(
    primaries: Sequence[str | URL] | None,
    async_primaries: Sequence[str | URL] | None,
    policy: str,
    cooldown: float,
) -> None:
    """Raise ``TypeError`` / ``ValueError`` for invalid ``primaries=`` options."""
    for name, value in (("primaries", primaries), ("async_primaries", async_primaries)):
        if value is None:
            continue
        if isinstance(value, (str, URL)) or not isinstance(value, Sequence):
            raise TypeError(
                f"{name}= takes a list of URLs, got {type(value).__name__}; "
                f"write {name}=[url] for a single (multi-host) URL"
            )
        items: Sequence[object] = value
        for item in items:
            if not isinstance(item, (str, URL)):
                raise TypeError(f"{name}= takes URLs, got {type(item).__name__}")
        if not value:
            raise ValueError(f"{name}= is empty; give at least one URL")
    if primaries is not None and async_primaries is not None:
        if len(primaries) != len(async_primaries):
            raise ValueError(
                f"primaries= has {len(primaries)} entries and async_primaries= "
                f"{len(async_primaries)}; they pair up by position (the same node, sync "
                "and async), so give both the same length, or give one"
            )
    if policy not in POLICIES:
        raise ValueError(
            f"unknown primary_selection {policy!r}; use one of {', '.join(sorted(POLICIES))}"
        )
    if isinstance(cooldown, bool) or not isinstance(cooldown, (int, float)):
        raise TypeError(f"primary_cooldown must be a number of seconds, got {cooldown!r}")
    if cooldown < 0 or math.isnan(cooldown):
        raise ValueError(f"primary_cooldown must be >= 0 seconds, got {cooldown}")


class Node:
    """One node of the cluster: its URLs, engines (created on first use) and health."""

    __slots__ = (
        "async_engine",
        "async_url",
        "down_until",
        "engine",
        "failures",
        "name",
        "sessions",
        "suspect",
        "url",
    )

    def __init__(self, name: str, url: URL, async_url: URL) -> None:
        self.name = name
        self.url = url
        self.async_url = async_url
        self.engine: Engine | None = None
        self.async_engine: AsyncEngine | None = None
        self.down_until = -math.inf
        self.suspect = False  # failed before: log when it serves again
        self.failures = 0
        self.sessions = 0


class Cluster:
    """Picks the node of each new write session; see the module docstring.

    ``first_engine(is_async)`` returns the manager's own engines, which are the
    first node's (so everything that uses ``manager.engine`` keeps working);
    the other nodes' engines are created here with ``engine_options`` and
    announced through ``engine_created(role, engine)`` (roles ``node2``,
    ``node2_async``, ...). Thread- and task-safe.
    """

    def __init__(
        self,
        primaries: Sequence[str | URL] | None,
        async_primaries: Sequence[str | URL] | None,
        *,
        policy: str,
        cooldown: float,
        engine_options: dict[str, Any],
        first_engine: Callable[[bool], Any],
        engine_created: EngineCreated,
        log_enabled: Callable[[], bool],
    ) -> None:
        validate_cluster(primaries, async_primaries, policy, cooldown)
        count = len(primaries if primaries is not None else async_primaries or ())
        if count == 0:
            raise ValueError("primaries= is empty; give at least one URL")
        self.nodes: list[Node] = []
        for i in range(count):
            sync = make_url(primaries[i]) if primaries is not None else None
            async_ = make_url(async_primaries[i]) if async_primaries is not None else None
            if sync is not None:
                url = sync
            else:
                assert async_ is not None
                url = _backend.sync_url_for(async_)
            if async_ is None:
                async_ = _backend.async_url_for(url)
            self.nodes.append(Node(f"node{i + 1}", url, async_))
        backend = self.nodes[0].url.get_backend_name()
        for node in self.nodes:
            if node.url.get_backend_name() != backend:
                raise ValueError(
                    f"{node.name} is a {node.url.get_backend_name()!r} database but node1 is "
                    f"{backend!r}; the primaries must be nodes of one cluster"
                )
        self.policy = policy
        self.cooldown = float(cooldown)
        self._engine_options = engine_options
        self._first_engine = first_engine
        self._engine_created = engine_created
        self._log_enabled = log_enabled
        self._rr = itertools.count()
        self._lock = threading.Lock()

    # -- engines -----------------------------------------------------------------

    def on_engine_created(self, role: str, engine: Engine) -> None:
        """Engine hook of the manager: its own engines are node1's."""
        if role in ("sync", "async"):
            self._watch(self.nodes[0], engine)

    def engine(self, node: Node, is_async: bool) -> Any:
        """``node``'s sync ``Engine`` or ``AsyncEngine``, created on first use."""
        if node is self.nodes[0]:
            return self._first_engine(is_async)
        engine: Engine | AsyncEngine | None = node.async_engine if is_async else node.engine
        if engine is None:
            with self._lock:
                engine = node.async_engine if is_async else node.engine
                if engine is None:
                    if is_async:
                        engine = create_async_engine(node.async_url, **self._engine_options)
                        node.async_engine = engine
                        self._watch(node, engine.sync_engine)
                        self._engine_created(f"{node.name}_async", engine.sync_engine)
                    else:
                        engine = create_engine(node.url, **self._engine_options)
                        node.engine = engine
                        self._watch(node, engine)
                        self._engine_created(node.name, engine)
        return engine

    def _watch(self, node: Node, engine: Engine) -> None:
        def _do_connect(dialect: Any, record: Any, cargs: Any, cparams: Any) -> Any:
            try:
                connection = dialect.connect(*cargs, **cparams)
            except Exception as err:
                self.mark_down(node, type(err).__name__)
                raise NodeUnavailableError(
                    f"{node.name} ({_backend.safe_url(node.url)}) refused the connection "
                    f"({type(err).__name__}); it is cooled down for {self.cooldown:.1f} s and "
                    "a retry goes to another node"
                ) from err
            try:
                problem = _not_ready(dialect.name, connection)
            except Exception as err:
                problem = f"its readiness check failed ({type(err).__name__})"
            if problem is not None:
                try:
                    connection.close()
                finally:
                    self.mark_down(node, problem)
                raise NodeUnavailableError(
                    f"{node.name} ({_backend.safe_url(node.url)}) is not ready for writes: "
                    f"{problem}; it is cooled down for {self.cooldown:.1f} s and a retry "
                    "goes to another node"
                )
            if node.suspect:
                node.suspect = False
                if self._log_enabled():
                    logger.info("%s accepts writes again", node.name)
            return connection

        def _on_error(ctx: ExceptionContext) -> None:
            if ctx.is_pre_ping or ctx.connection is None:
                return  # a failed connect went through _do_connect
            exc = ctx.sqlalchemy_exception
            if exc is not None and error_code(exc) in _GALERA_GONE:
                ctx.is_disconnect = True  # drop this connection: its node left
            if ctx.is_disconnect:
                self.mark_down(node, "connection lost" if exc is None else _describe(exc))

        event.listen(engine, "do_connect", _do_connect)
        event.listen(engine, "handle_error", _on_error)

    # -- choice --------------------------------------------------------------------

    def pick(self, count: bool = True) -> Node:
        """The node for a new session (see the module docstring); ``count`` adds
        it to the node's session figure."""
        nodes = self.nodes
        n = len(nodes)
        start = next(self._rr) % n if self.policy == "round_robin" and n > 1 else 0
        now = time.monotonic()
        chosen: Node | None = None
        for i in range(n):
            node = nodes[(start + i) % n]
            if node.down_until <= now:
                chosen = node
                break
        if chosen is None:
            chosen = min(nodes, key=lambda nd: nd.down_until)
        if count:
            with self._lock:
                chosen.sessions += 1
        return chosen

    def mark_down(self, node: Node, reason: str) -> None:
        """Cool ``node`` down. A failure while it already is restarts the cool-down
        but does not count (or log) again: with every node down, the one that
        failed longest ago is tried next."""
        now = time.monotonic()
        with self._lock:
            if node.down_until > now:
                node.down_until = now + self.cooldown
                return
            node.down_until = now + self.cooldown
            node.failures += 1
            node.suspect = True
        if self._log_enabled():
            logger.warning(
                "%s (%s) is unavailable (%s); new sessions go to the other nodes for %.1f s",
                node.name,
                _backend.safe_url(node.url),
                reason,
                self.cooldown,
            )

    # -- monitoring and lifecycle ------------------------------------------------------

    def engines_by_role(self) -> dict[str, Engine]:
        """Engines of nodes 2.. created so far (node1's are the manager's own)."""
        engines: dict[str, Engine] = {}
        for node in self.nodes[1:]:
            if node.engine is not None:
                engines[node.name] = node.engine
            if node.async_engine is not None:
                engines[f"{node.name}_async"] = node.async_engine.sync_engine
        return engines

    def snapshot(self) -> dict[str, Any]:
        """Policy, cool-down and, per node, sessions opened, health and failures."""
        now = time.monotonic()
        with self._lock:
            return {
                "selection": self.policy,
                "cooldown": self.cooldown,
                "nodes": {
                    node.name: {
                        "url": _backend.safe_url(node.url),
                        "sessions": node.sessions,
                        "healthy": node.down_until <= now,
                        "cooldown_remaining": max(0.0, node.down_until - now),
                        "failures": node.failures,
                    }
                    for node in self.nodes
                },
            }

    def reset(self) -> None:
        """Zero the counters (health is state, not a figure: it is kept)."""
        with self._lock:
            for node in self.nodes:
                node.sessions = 0
                node.failures = 0

    def dispose(self) -> None:
        """Close the pooled connections of the sync engines of nodes 2.."""
        for node in self.nodes[1:]:
            if node.engine is not None:
                node.engine.dispose()

    async def adispose(self) -> None:
        """Close the pooled connections of every engine of nodes 2.."""
        for node in self.nodes[1:]:
            if node.async_engine is not None:
                await node.async_engine.dispose()
        self.dispose()


def _describe(exc: BaseException) -> str:
    code = error_code(exc)
    return f"{type(exc).__name__}{' ' + code if code else ''}"


def _not_ready(dialect_name: str, connection: Any) -> str | None:
    """Why a new DBAPI connection's node cannot take writes, or None."""
    if dialect_name in ("mysql", "mariadb"):
        # A server without Galera reports wsrep_ready OFF too: ask wsrep_on first.
        if _rows(connection, "SHOW GLOBAL VARIABLES LIKE 'wsrep_on'").get("wsrep_on") != "ON":
            return None
        status = _rows(
            connection,
            "SHOW GLOBAL STATUS WHERE Variable_name IN ('wsrep_ready', 'wsrep_local_state')",
        )
        ready = status.get("wsrep_ready", "OFF")
        if ready.upper() != "ON":
            return f"wsrep_ready is {ready}"
        state = status.get("wsrep_local_state")
        if state != _SYNCED:
            return f"wsrep_local_state is {state}, not 4 (Synced)"
        return None
    if dialect_name in ("postgresql", "cockroachdb"):
        status = _rows(connection, "SELECT 'in_recovery', pg_is_in_recovery()::text")
        # Leave no transaction open behind the pool's back (psycopg opened one).
        connection.rollback()
        if status.get("in_recovery") == "TRUE":
            return "a standby in recovery (not the primary)"
    return None


def _rows(connection: Any, sql: str) -> dict[str, str]:
    cursor = connection.cursor()
    try:
        cursor.execute(sql)
        return {str(name).lower(): str(value).upper() for name, value in cursor.fetchall()}
    finally:
        cursor.close()
