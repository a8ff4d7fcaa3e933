"""The session API that application code imports: ``from db.session import ...``.

Kept as in the seed's layout, so services written against ``db.session`` need
no change; everything comes from sessionscope.
"""

from sessionscope import (
    async_session_scope,
    async_with_retry,
    async_with_session,
    configure_session,
    get_session_stats,
    on_commit,
    reset_session_stats,
    session_scope,
    set_rollback,
    with_retry,
    with_session,
)

__all__ = [
    "async_session_scope",
    "async_with_retry",
    "async_with_session",
    "configure_session",
    "get_session_stats",
    "on_commit",
    "reset_session_stats",
    "session_scope",
    "set_rollback",
    "with_retry",
    "with_session",
]
