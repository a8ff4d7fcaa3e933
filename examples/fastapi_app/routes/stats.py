"""Monitoring route: sessionscope's statistics, pool figures included."""

from typing import Any

from fastapi import APIRouter

from db.session import get_session_stats

router = APIRouter(tags=["monitoring"])


@router.get("/stats")
def stats() -> dict[str, Any]:
    return get_session_stats()
