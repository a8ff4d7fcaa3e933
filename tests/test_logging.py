"""Logging through the ``sessionscope`` logger: events at DEBUG, failures at
WARNING/ERROR, log_level honoured, passwords hidden, bound parameters never
logged (checked with real failing statements on every backend)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator

import pytest
from sqlalchemy import select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session

import sessionscope
from sessionscope import SessionConfig, SessionManager

from .conftest import require_server, reset_schema
from .models import User

SECRET_PARAM = "s3cret-param-7f1d"
PASSWORD = "Pw-9c2e-hidden"


class Transient(Exception):
    pass


@pytest.fixture
def debug_mgr(db_url: str, caplog: pytest.LogCaptureFixture) -> Iterator[SessionManager]:
    caplog.set_level(logging.DEBUG, logger="sessionscope")
    manager = SessionManager(
        db_url,
        config=SessionConfig(
            log_level="DEBUG",
            retry_delay=0.0,
            retry_predicate=lambda e: isinstance(e, Transient),
        ),
    )
    reset_schema(manager.engine)
    caplog.clear()
    yield manager
    manager.dispose()


def _messages(caplog: pytest.LogCaptureFixture, level: int | None = None) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "sessionscope" and (level is None or r.levelno == level)
    ]


def _all_text(caplog: pytest.LogCaptureFixture) -> str:
    """Every sessionscope log line as it would be written, tracebacks included."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    return "\n".join(handler.format(r) for r in caplog.records if r.name == "sessionscope")


def test_events_at_debug(debug_mgr: SessionManager, caplog: pytest.LogCaptureFixture) -> None:
    with debug_mgr.session_scope() as s:
        s.add(User(name="a"))
        with debug_mgr.session_scope(propagation="nested") as n:
            n.add(User(name="b"))
        with pytest.raises(ValueError), debug_mgr.session_scope(propagation="nested"):
            raise ValueError
    with debug_mgr.session_scope(auto_commit=False):
        pass
    debug = _messages(caplog, logging.DEBUG)
    assert debug == [
        "session opened (scope)",
        "savepoint begun (scope)",
        "savepoint released (scope)",
        "savepoint begun (scope)",
        "rolled back to savepoint (scope) after ValueError",
        debug[5],
        "session opened (scope)",
        debug[7],
    ]
    assert debug[5].startswith("session closed (scope): committed in ")
    assert debug[7].startswith("session closed (scope): rolled back in ")


def test_failure_at_warning_and_commit_failure_at_error(
    debug_mgr: SessionManager, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(KeyError), debug_mgr.session_scope():
        raise KeyError("boom")
    # The COMMIT (its flush) fails on a unique name whose value is the secret.
    with pytest.raises(IntegrityError) as info, debug_mgr.session_scope() as s:
        s.add(User(name=SECRET_PARAM))
        s.add(User(name=SECRET_PARAM))
    assert SECRET_PARAM in str(info.value)  # SQLAlchemy's own text has it; ours must not
    warnings = _messages(caplog, logging.WARNING)
    errors = _messages(caplog, logging.ERROR)
    assert warnings == ["transaction of scope rolled back: KeyError escaped the scope"]
    assert len(errors) == 1
    assert errors[0].startswith("ending the transaction of scope failed: IntegrityError [")
    assert SECRET_PARAM not in _all_text(caplog)


def test_failing_statement_with_secret_parameter_is_not_logged(
    debug_mgr: SessionManager, caplog: pytest.LogCaptureFixture
) -> None:
    @debug_mgr.with_session
    def lookup(session: Session, token: str) -> None:
        session.execute(text("SELECT * FROM no_such_table WHERE token = :t"), {"t": token})

    with pytest.raises(DBAPIError):
        lookup(SECRET_PARAM)
    text_logged = _all_text(caplog)
    assert "transaction of tests.test_logging." in text_logged
    assert SECRET_PARAM not in text_logged
    assert SECRET_PARAM not in json.dumps(debug_mgr.get_stats())


def test_retry_logged_with_class_not_message(
    debug_mgr: SessionManager, caplog: pytest.LogCaptureFixture
) -> None:
    calls = []

    @debug_mgr.with_session
    def flaky(session: Session) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise Transient(f"message with {SECRET_PARAM}")

    flaky()
    retries = [m for m in _messages(caplog, logging.WARNING) if m.startswith("retrying")]
    assert len(retries) == 1
    assert "Transient" in retries[0] and "retry 1 of 3" in retries[0]
    assert SECRET_PARAM not in _all_text(caplog)


def test_slow_transaction_logged_with_function_and_duration(
    debug_mgr: SessionManager, caplog: pytest.LogCaptureFixture
) -> None:
    @debug_mgr.with_session(slow_threshold=0.0)  # every transaction is over 0 s
    def report(session: Session) -> None:
        session.execute(select(1))

    report()
    with debug_mgr.session_scope():  # the default 1 s threshold: not slow here
        pass
    slow = [m for m in _messages(caplog, logging.WARNING) if m.startswith("slow transaction")]
    assert len(slow) == 1
    assert slow[0].startswith(f"slow transaction: {__name__}.{report.__qualname__} took ")
    assert slow[0].endswith(" s (slow_threshold 0.000 s)")
    assert debug_mgr.get_stats()["slow_transactions"] == 1


def test_log_level_of_a_scope_only_raises_the_threshold(
    debug_mgr: SessionManager, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(KeyError), debug_mgr.session_scope(log_level="ERROR"):
        raise KeyError
    with debug_mgr.session_scope(log_level="WARNING"):
        pass
    assert _messages(caplog) == []


def test_configure_session_sets_the_logger_level() -> None:
    logger = logging.getLogger("sessionscope")
    sessionscope.configure_session(log_level="DEBUG")
    assert logger.level == logging.DEBUG
    sessionscope.configure_session(log_level="warning")
    assert logger.level == logging.WARNING


async def test_cancellation_is_not_logged_as_a_failure(
    debug_mgr: SessionManager, caplog: pytest.LogCaptureFixture
) -> None:
    entered = asyncio.Event()

    async def hold() -> None:
        async with debug_mgr.async_session_scope() as s:
            await s.execute(select(1))
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.ensure_future(hold())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await debug_mgr.adispose()
    assert "transaction of scope rolled back: CancelledError" in _messages(caplog, logging.INFO)
    assert _messages(caplog, logging.WARNING) == []


def test_password_hidden_everywhere_postgresql(caplog: pytest.LogCaptureFixture) -> None:
    """PostgreSQL on loopback trusts the login, so the password is accepted and
    the whole path (engine creation, statements, a failure) runs with it."""
    url = make_url(require_server("postgresql")).set(password=PASSWORD)
    caplog.set_level(logging.DEBUG, logger="sessionscope")
    manager = SessionManager(url, config=SessionConfig(log_level="DEBUG", slow_threshold=0.0))
    try:
        with manager.session_scope() as s:
            s.execute(select(1))
        with pytest.raises(DBAPIError), manager.session_scope() as s:
            s.execute(text("SELECT * FROM no_such_table WHERE x = :x"), {"x": SECRET_PARAM})
        outputs = [
            _all_text(caplog),
            repr(manager),
            manager.name,
            json.dumps(manager.get_stats()),
        ]
    finally:
        manager.dispose()
    assert "engine created: postgresql+psycopg://postgres:***@127.0.0.1" in outputs[0]
    for output in outputs:
        assert PASSWORD not in output
        assert SECRET_PARAM not in output


def test_password_hidden_when_the_login_fails_mariadb(caplog: pytest.LogCaptureFixture) -> None:
    url = make_url(require_server("mariadb")).set(password=PASSWORD)
    caplog.set_level(logging.DEBUG, logger="sessionscope")
    manager = SessionManager(url, config=SessionConfig(log_level="DEBUG", retry_delay=0.0))

    @manager.with_session
    def read(session: Session) -> None:
        session.execute(select(1))

    try:
        with pytest.raises(DBAPIError) as info:
            read()
    finally:
        manager.dispose()
    stats = json.dumps(manager.get_stats())
    for output in (_all_text(caplog), str(info.value), repr(manager), stats):
        assert PASSWORD not in output
    assert "mariadb+pymysql://root:***@127.0.0.1" in _all_text(caplog)
