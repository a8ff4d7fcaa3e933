"""Disposing a manager that was replaced as the default one."""

from __future__ import annotations

import asyncio
import logging

from ._manager import SessionManager

__all__ = ["dispose_replaced", "pending"]

_logger = logging.getLogger("sessionscope")

pending: set[asyncio.Task[None]] = set()
"""Disposal tasks not finished yet (a strong reference keeps each alive)."""


def dispose_replaced(manager: SessionManager) -> None:
    """Close ``manager``'s pools as far as can be done from here: the sync ones at
    once; the async one by a task on the running event loop when called inside
    one. Outside a running loop the async pool is left alone: its connections
    belong to the loop that opened them, which may be closed by now."""
    manager.dispose()
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    task = loop.create_task(_adispose_quietly(manager))
    pending.add(task)
    task.add_done_callback(pending.discard)


async def _adispose_quietly(manager: SessionManager) -> None:
    try:
        await manager.adispose()
    except Exception as err:  # connections of another, closed event loop
        _logger.debug("disposing the replaced default manager failed: %r", err)
