"""Propagation decisions (pure): what a scope does given what encloses it.

Every propagation mode is one row of :data:`RULES`: what the scope does with
no enclosing scope and inside one. Adding a mode means adding its name to
:data:`Propagation` and a row here (plus an exit rule in ``_core`` only if it
needs a new :class:`Action`), and documenting it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final, Literal, get_args

from ._errors import ActiveScopeError, NoActiveScopeError

__all__ = ["ALONE", "JOINING", "PROPAGATIONS", "RULES", "Action", "Propagation", "Rule", "decide"]

Propagation = Literal["required", "nested", "requires_new", "mandatory", "never"]


class Action(enum.Enum):
    """What a scope does on entry."""

    NEW = "new"
    """Open a new session; own its transaction (lazy BEGIN, COMMIT/ROLLBACK, close)."""
    JOIN = "join"
    """Use the enclosing session; no BEGIN/COMMIT of its own."""
    SAVEPOINT = "savepoint"
    """Use the enclosing session inside a SAVEPOINT."""


@dataclass(frozen=True, slots=True)
class Rule:
    """One propagation mode: the action with no enclosing scope (``outside``) and
    inside one (``inside``); None means the situation is refused with ``error``."""

    outside: Action | None
    inside: Action | None
    error: str = ""


RULES: Final[dict[str, Rule]] = {
    "required": Rule(Action.NEW, Action.JOIN),
    "nested": Rule(Action.NEW, Action.SAVEPOINT),
    # A new session on its own connection, even inside a scope.
    "requires_new": Rule(Action.NEW, Action.NEW),
    "mandatory": Rule(
        None,
        Action.JOIN,
        'propagation="mandatory" needs an enclosing session scope, and none is active '
        "in this thread or task. Open one with session_scope() / async_session_scope(), "
        "or pass the session explicitly.",
    ),
    "never": Rule(
        Action.NEW,
        None,
        'propagation="never" forbids an enclosing session scope, but one is active in '
        "this thread or task. Call this function outside the scope, or use "
        'propagation="requires_new" for independent work.',
    ),
}

PROPAGATIONS: Final = frozenset(get_args(Propagation))
if PROPAGATIONS != RULES.keys():  # pragma: no cover - a mode added in one place only
    raise RuntimeError("every propagation mode needs exactly one row in RULES")


ALONE: Final[dict[str, Action]] = {
    mode: rule.outside for mode, rule in RULES.items() if rule.outside is not None
}
"""What a scope of each mode does with no enclosing scope, for the modes that
allow that (:func:`decide` raises for the others): a lookup instead of a call
on every outermost scope."""


def decide(propagation: str, has_outer: bool, durable: bool) -> Action:
    """Map ``propagation`` and the presence of an enclosing scope to an :class:`Action`.

    Raises :class:`NoActiveScopeError` / :class:`ActiveScopeError` for a refused
    situation. ``durable=True`` forbids any enclosing scope that would decide the
    outcome (so it is allowed with ``requires_new``), since a durable commit must
    really reach the database when the scope exits.
    """
    rule = RULES[propagation]
    if not has_outer:
        if rule.outside is None:
            raise NoActiveScopeError(rule.error)
        return rule.outside
    action = rule.inside
    if action is None:
        raise ActiveScopeError(rule.error)
    if durable and action is not Action.NEW:
        raise ActiveScopeError(
            "durable=True requires the outermost scope, but this scope is nested inside "
            "another one, whose commit would decide the outcome. Call it outside any "
            'scope, use propagation="requires_new", or drop durable=True.'
        )
    return action


JOINING: Final = frozenset(mode for mode, rule in RULES.items() if rule.inside is not Action.NEW)
"""The modes whose scope inside another shares its session (joins it or saves
a point in it): such a call is part of the enclosing unit of work."""

