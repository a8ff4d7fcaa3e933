"""Logging through the ``sessionscope`` logger: events at DEBUG, failures at
WARNING/ERROR, log_level honoured, passwords hidden, bound parameters never
logged (checked with real failing statements on every backend)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

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


def test_configure_session_without_log_level_keeps_the_applications_level() -> None:
    logger = logging.getLogger("sessionscope")
    saved = logger.level
    try:
        logger.setLevel(logging.ERROR)  # as an application's logging config would
        sessionscope.configure_session(retry_attempts=2, enable_monitoring=True)
        assert logger.level == logging.ERROR
    finally:
        logger.setLevel(saved)


def _python(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )


def test_import_sets_no_level_and_adds_only_a_null_handler(tmp_path: Path) -> None:
    """A fresh process, as an application starts: importing and setting up the
    library changes nothing in its logging configuration."""
    out = _python(
        "import logging\n"
        "import sessionscope\n"
        "logger = logging.getLogger('sessionscope')\n"
        "sessionscope.setup_database_connection('sqlite://')\n"
        "sessionscope.configure_session(retry_attempts=1)\n"
        "print(logger.level, [type(h).__name__ for h in logger.handlers], logger.propagate)\n",
        tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(logging.NOTSET), "['NullHandler']", "True"]


def test_warnings_do_not_reach_stderr_without_logging_configured(tmp_path: Path) -> None:
    """No handler configured by the application: a rolled-back scope's WARNING goes
    to the NullHandler, not to Python's last-resort handler on stderr; once the
    application configures logging, it is shown there."""
    code = (
        "import logging, sys\n"
        "import sessionscope\n"
        "sessionscope.setup_database_connection('sqlite://')\n"
        "def fail():\n"
        "    try:\n"
        "        with sessionscope.session_scope():\n"
        "            raise KeyError('x')\n"
        "    except KeyError:\n"
        "        pass\n"
        "fail()\n"
        "if sys.argv[1:] == ['configured']:\n"
        "    logging.basicConfig(format='%(levelname)s %(name)s %(message)s')\n"
        "    fail()\n"
    )
    quiet = _python(code, tmp_path)
    assert quiet.returncode == 0 and quiet.stderr == ""
    shown = subprocess.run(
        [sys.executable, "-c", code, "configured"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert shown.returncode == 0
    assert shown.stderr.splitlines() == [
        "WARNING sessionscope transaction of scope rolled back: KeyError escaped the scope"
    ]


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
