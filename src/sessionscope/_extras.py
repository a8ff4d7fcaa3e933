"""Import errors that say which extra to install."""

from __future__ import annotations

__all__ = ["missing_extra"]


def missing_extra(feature: str, extra: str, err: ImportError) -> ImportError:
    """An ``ImportError`` for ``feature`` naming the missing module and the
    ``sessionscope[extra]`` that installs it; raise it ``from err``."""
    # The top-level package is what a user installs (prometheus_client, not
    # prometheus_client.core).
    package = err.name.partition(".")[0] if err.name else "an optional dependency"
    return ImportError(
        f"{feature} needs {package!r}, which is not installed: "
        f"pip install 'sessionscope[{extra}]'",
        name=package,
    )
