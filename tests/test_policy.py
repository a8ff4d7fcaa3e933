"""The propagation table as a pure function (no database)."""

from __future__ import annotations

import pytest

from sessionscope import ActiveScopeError, NoActiveScopeError
from sessionscope._policy import Action, decide


@pytest.mark.parametrize(
    ("propagation", "has_outer", "expected"),
    [
        ("required", False, Action.NEW),
        ("required", True, Action.JOIN),
        ("nested", False, Action.NEW),
        ("nested", True, Action.SAVEPOINT),
        ("requires_new", False, Action.NEW),
        ("requires_new", True, Action.NEW),
        ("mandatory", True, Action.JOIN),
        ("never", False, Action.NEW),
    ],
)
def test_table(propagation: str, has_outer: bool, expected: Action) -> None:
    assert decide(propagation, has_outer, durable=False) is expected


def test_refusals_say_what_to_do() -> None:
    with pytest.raises(NoActiveScopeError, match="session_scope"):
        decide("mandatory", False, durable=False)
    with pytest.raises(ActiveScopeError, match="requires_new"):
        decide("never", True, durable=False)
    with pytest.raises(ActiveScopeError, match="durable"):
        decide("required", True, durable=True)
    assert decide("required", False, durable=True) is Action.NEW
    assert decide("requires_new", True, durable=True) is Action.NEW
