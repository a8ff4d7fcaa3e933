"""Configuration: :class:`SessionConfig` and its validation (pure, no I/O)."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any, Final, Literal

from ._backend import is_autocommit
from ._policy import PROPAGATIONS, Propagation

__all__ = [
    "LEVELNO",
    "PROPAGATIONS",
    "ChildTasks",
    "Propagation",
    "SessionConfig",
    "validate_overrides",
]

ChildTasks = Literal["independent", "forbid"]
_LOG_LEVELS: Final = {
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARNING": logging.WARNING,
    "ERROR": logging.ERROR,
    "CRITICAL": logging.CRITICAL,
}
LEVELNO: Final[dict[str, int]] = {}
"""Each ``log_level`` as given (any spelling a config was built with) -> its
number. Every config's level is in it once the config exists: the scope reads
``LEVELNO[cfg.log_level]`` on every transaction, where the call of the
:attr:`SessionConfig.log_levelno` property costs several times a lookup."""


def _default_retry_predicate(exc: BaseException) -> bool:
    # Imported lazily: _retry imports SQLAlchemy's exception module, and keeping the
    # config module free of it keeps validation cheap and importable on its own.
    from ._retry import is_transient

    return is_transient(exc)


@dataclasses.dataclass(frozen=True, slots=True)
class SessionConfig:
    """Settings of a manager, or of one scope after its overrides were applied.

    The first six fields and their defaults are the seed's. Every field can be set
    globally with :func:`configure_session` and overridden for one scope or one
    decorated function (``session_scope(auto_commit=False)``).

    Invalid values raise ``ValueError`` / ``TypeError`` when the config is built,
    that is at ``configure_session()``, scope entry or decoration time.
    """

    auto_commit: bool = True
    """Commit on successful exit of a scope that owns its transaction."""
    auto_rollback: bool = True
    """On an exception, roll back; a joined scope marks its owner rollback-only."""
    enable_monitoring: bool = True
    """Record statistics (see :func:`get_session_stats`)."""
    log_level: str = "INFO"
    """Level of the ``sessionscope`` logger; per scope it only raises the threshold."""
    retry_attempts: int = 3
    """Retries (not counting the first attempt) of transient errors; 0 disables."""
    retry_delay: float = 1.0
    """First backoff delay in seconds; it doubles per attempt, with jitter."""

    retry_max_delay: float = 30.0
    """Cap of one backoff delay, seconds."""
    retry_predicate: Callable[[BaseException], bool] = _default_retry_predicate
    """Decides whether an error is transient. Replace it, or extend it with
    ``lambda e: sessionscope.is_transient(e) or mine(e)``."""
    propagation: Propagation = "required"
    """How a scope relates to an enclosing one; see the README's table."""
    read_only: bool = False
    """Refuse writes (before they reach the server) and, where the backend can,
    open a read-only transaction."""
    snapshot: bool = True
    """With ``read_only=True``: ``False`` runs each statement on its own, in
    autocommit, on a connection the server keeps read-only (PostgreSQL,
    MariaDB/MySQL): no BEGIN and COMMIT round trips, but the statements of the
    scope do not share one snapshot. No effect on SQLite. See the guide."""
    isolation_level: str | None = None
    """Transaction isolation for a scope that opens its own session.
    ``"AUTOCOMMIT"`` only together with ``read_only=True``: each statement would
    commit as it runs, and a scope that fails could not roll its writes back."""
    timeout: float | None = None
    """Statement timeout in seconds for a scope that opens its own session
    (PostgreSQL ``SET LOCAL statement_timeout``; MariaDB ``max_statement_time``)."""
    durable: bool = False
    """The scope must be outermost; raises :class:`ActiveScopeError` otherwise."""
    expire_on_commit: bool = False
    """Expire ORM objects on commit. Off, so returned objects stay usable."""
    slow_threshold: float = 1.0
    """A transaction longer than this many seconds counts as slow and is logged."""
    long_session_warning: float | None = 60.0
    """Warn once (with where it was opened) about a session held longer than this."""
    expected_errors: tuple[type[BaseException], ...] = ()
    """Exception classes that end a scope as an expected outcome, not a failure:
    the scope rolls back, logs at DEBUG and counts as rolled back, not failed."""
    expected_status_below: int = 500
    """An exception with an int HTTP status below this (``status_code`` of
    FastAPI/Starlette/Litestar ``HTTPException``, werkzeug's ``code``) is an
    expected client error, treated like ``expected_errors``; 0 turns it off."""
    child_tasks: ChildTasks = "independent"
    """What a scope opened in a child asyncio task does while its parent task's
    scope is active: ``"independent"`` opens its own session, committed on its
    own (noted at DEBUG); ``"forbid"`` raises :class:`ActiveScopeError`."""
    causal_reads: bool = False
    """Galera: the transaction's reads wait until this node has applied every
    write the cluster committed before they started (``wsrep_sync_wait = 1``), so
    they see writes made through other nodes. Costs a cluster round trip per
    read statement; see ``docs/clusters.md``. Ignored on other servers."""

    def __post_init__(self) -> None:
        for name in (
            "auto_commit",
            "auto_rollback",
            "enable_monitoring",
            "read_only",
            "snapshot",
            "durable",
            "expire_on_commit",
            "causal_reads",
        ):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if not isinstance(self.log_level, str) or self.log_level.upper() not in _LOG_LEVELS:
            raise ValueError(
                f"log_level must be one of {', '.join(_LOG_LEVELS)}, got {self.log_level!r}"
            )
        # Read on every scope: the level of each spelling is worked out once.
        LEVELNO.setdefault(self.log_level, _LOG_LEVELS[self.log_level.upper()])
        if isinstance(self.retry_attempts, bool) or not isinstance(self.retry_attempts, int):
            raise TypeError(f"retry_attempts must be an int, got {self.retry_attempts!r}")
        if self.retry_attempts < 0:
            raise ValueError(
                f"retry_attempts must be >= 0 (0 disables retry), got {self.retry_attempts}"
            )
        for name in ("retry_delay", "retry_max_delay", "slow_threshold"):
            _check_seconds(name, getattr(self, name), optional=False)
        for name in ("timeout", "long_session_warning"):
            _check_seconds(name, getattr(self, name), optional=True)
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds or None, got {self.timeout}")
        if not callable(self.retry_predicate):
            raise TypeError("retry_predicate must be a callable taking the exception")
        if self.propagation not in PROPAGATIONS:
            raise ValueError(
                f"unknown propagation {self.propagation!r}; use one of "
                f"{', '.join(sorted(PROPAGATIONS))}"
            )
        if not isinstance(self.expected_errors, tuple) or not all(
            isinstance(c, type) and issubclass(c, BaseException) for c in self.expected_errors
        ):
            raise TypeError(
                "expected_errors must be a tuple of exception classes, got "
                f"{self.expected_errors!r}"
            )
        if isinstance(self.expected_status_below, bool) or not isinstance(
            self.expected_status_below, int
        ):
            raise TypeError(
                f"expected_status_below must be an int, got {self.expected_status_below!r}"
            )
        if not 0 <= self.expected_status_below <= 600:
            raise ValueError(
                "expected_status_below must be an HTTP status from 0 (off) to 600, got "
                f"{self.expected_status_below}"
            )
        if self.child_tasks not in ("independent", "forbid"):
            raise ValueError(
                f'child_tasks must be "independent" or "forbid", got {self.child_tasks!r}'
            )
        if self.isolation_level is not None and not isinstance(self.isolation_level, str):
            raise TypeError(f"isolation_level must be a str or None, got {self.isolation_level!r}")
        if is_autocommit(self.isolation_level) and not self.read_only:
            raise ValueError(
                f"isolation_level={self.isolation_level!r} needs read_only=True: in "
                "autocommit mode every statement commits as it runs, so a scope that "
                "fails could not roll its writes back. Use it for read-only scopes "
                "(read_only=True, isolation_level='AUTOCOMMIT'), or drop it to write."
            )
        if not self.snapshot:
            if not self.read_only:
                raise ValueError(
                    "snapshot=False needs read_only=True: statements that each commit on "
                    "their own cannot make a write atomic; add read_only=True or drop "
                    "snapshot=False"
                )
            if self.isolation_level is not None or self.timeout is not None:
                raise ValueError(
                    "snapshot=False runs each statement in autocommit, outside any "
                    "transaction, so isolation_level= and timeout= cannot apply; drop "
                    "them or drop snapshot=False"
                )

    @property
    def log_levelno(self) -> int:
        """The numeric logging level of :attr:`log_level`."""
        return LEVELNO[self.log_level]

    def merged(self, overrides: Mapping[str, Any]) -> SessionConfig:
        """Return a copy with ``overrides`` applied (validated)."""
        if not overrides:
            return self
        validate_overrides(overrides)
        return dataclasses.replace(self, **overrides)


_FIELDS: Final = frozenset(f.name for f in dataclasses.fields(SessionConfig))


def validate_overrides(overrides: Mapping[str, Any]) -> None:
    """Raise ``TypeError`` for names that are not :class:`SessionConfig` fields."""
    unknown = set(overrides) - _FIELDS
    if unknown:
        raise TypeError(
            f"unknown session option(s): {', '.join(sorted(unknown))}; "
            f"valid options are {', '.join(sorted(_FIELDS))}"
        )


def _check_seconds(name: str, value: object, *, optional: bool) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, got {value!r}")
    if not math.isfinite(value):
        # nan compares false with everything: it would pass every check below
        # and then never (or always) fire; inf would mean "never".
        hint = " or None to disable it" if optional else ""
        raise ValueError(f"{name} must be a finite number of seconds{hint}, got {value}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0 seconds, got {value}")
