"""A JSON statistics endpoint for FastAPI applications (the ``fastapi`` extra).

::

    from sessionscope.stats_endpoint import stats_router

    app.include_router(stats_router(), dependencies=[Depends(require_admin)])

``GET /_sessionscope/stats`` then returns the default manager's
``get_stats()`` snapshot (or that of the manager given), which
``sessionscope stats --from http://host:port/_sessionscope/stats`` shows as
tables. The snapshot holds figures and names only: function names, engine roles,
the URL with its password hidden; never SQL or parameters. It still tells how
the application works: protect it like any operations endpoint (the
``dependencies`` of ``include_router``), or do not mount it publicly.
"""

from __future__ import annotations

from typing import Any

from ._api import get_default_manager
from ._extras import missing_extra
from ._manager import SessionManager

try:
    from fastapi import APIRouter
except ImportError as err:
    raise missing_extra("sessionscope.stats_endpoint", "fastapi", err) from err

__all__ = ["DEFAULT_PATH", "stats_router"]

DEFAULT_PATH = "/_sessionscope/stats"


def stats_router(
    manager: SessionManager | None = None,
    *,
    path: str = DEFAULT_PATH,
    include_in_schema: bool = False,
) -> APIRouter:
    """An ``APIRouter`` with one ``GET path`` route returning ``manager``'s
    statistics snapshot as JSON (the default manager, looked up per request,
    when ``manager`` is None). Left out of the OpenAPI schema unless
    ``include_in_schema=True``."""
    if manager is not None and not isinstance(manager, SessionManager):
        raise TypeError(f"expected a SessionManager or None, got {manager!r}")
    router = APIRouter()

    # A plain def: FastAPI runs it in a worker thread, and reading the figures
    # takes locks that must not stall the event loop.
    @router.get(path, include_in_schema=include_in_schema, name="sessionscope_stats")
    def sessionscope_stats() -> dict[str, Any]:
        target = manager if manager is not None else get_default_manager()
        return {"manager": target.name, **target.get_stats()}

    return router
