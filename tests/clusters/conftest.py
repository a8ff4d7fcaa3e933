"""Cluster suites: real Galera and PostgreSQL failover clusters built by the tests.

They start servers of their own (about a minute of a 2-core machine), so the
default test run leaves them out; ``SESSIONSCOPE_CLUSTERS=1`` selects them, as
the CI job ``.ci/jobs/50-clusters.sh`` does. Selected, a missing binary skips
them locally with the reason, and fails them in CI.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ENABLED = os.environ.get("SESSIONSCOPE_CLUSTERS", "").lower() in ("1", "true", "yes")
_HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if ENABLED:
        return
    # This hook sees every test of the run: leave out only this directory's.
    mine = [item for item in items if _HERE in Path(str(item.path)).parents]
    if mine:
        config.hook.pytest_deselected(items=mine)
        items[:] = [item for item in items if item not in mine]
