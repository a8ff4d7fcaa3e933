"""Propagation decisions (pure): what a scope does given what encloses it."""

from __future__ import annotations

import enum

from ._errors import ActiveScopeError, NoActiveScopeError

__all__ = ["Action", "decide"]


class Action(enum.Enum):
    """What a scope does on entry."""

    NEW = "new"
    """Open a new session; own its transaction (lazy BEGIN, COMMIT/ROLLBACK, close)."""
    JOIN = "join"
    """Use the enclosing session; no BEGIN/COMMIT of its own."""
    SAVEPOINT = "savepoint"
    """Use the enclosing session inside a SAVEPOINT."""


def decide(propagation: str, has_outer: bool, durable: bool) -> Action:
    """Map ``propagation`` and the presence of an enclosing scope to an :class:`Action`.

    ``requires_new`` always opens a new session, on its own connection, even
    inside a scope. ``durable=True`` forbids any enclosing scope, since a durable
    commit must really reach the database when the scope exits.
    """
    if propagation == "requires_new":
        return Action.NEW
    if not has_outer:
        if propagation == "mandatory":
            raise NoActiveScopeError(
                'propagation="mandatory" needs an enclosing session scope, and none is '
                "active in this thread or task. Open one with session_scope() / "
                "async_session_scope(), or pass the session explicitly."
            )
        return Action.NEW
    if durable:
        raise ActiveScopeError(
            "durable=True requires the outermost scope, but this scope is nested inside "
            "another one, whose commit would decide the outcome. Call it outside any "
            "scope, or drop durable=True."
        )
    if propagation == "never":
        raise ActiveScopeError(
            'propagation="never" forbids an enclosing session scope, but one is active '
            "in this thread or task. Call this function outside the scope, or use "
            'propagation="requires_new" for independent work.'
        )
    if propagation == "nested":
        return Action.SAVEPOINT
    return Action.JOIN
