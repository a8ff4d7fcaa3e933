"""examples/worker: a real Celery worker process (prefork pool, Redis broker)
running sessionscope-decorated jobs, on every backend.

The broker is the local Redis server, database 13, on a queue named for this
run, so runs on one machine never take each other's jobs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, select, text

from .conftest import IN_CI, backend_url
from .web import wait_for

ROOT = Path(__file__).resolve().parents[1]
WORKER_DIR = ROOT / "examples" / "worker"
BROKER = os.environ.get("SESSIONSCOPE_TEST_REDIS", "redis://127.0.0.1:6379/13")

sys.path.insert(0, str(WORKER_DIR))
from models import Base, Order  # noqa: E402

sys.path.remove(str(WORKER_DIR))


@dataclass
class Worker:
    url: str
    queue: str
    outbox: Path
    process: subprocess.Popen[str]
    log: Path
    celery: Any
    sent: list[str] = field(default_factory=list)

    def run(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.send(name, *args, **kwargs).get(timeout=60)

    def send(self, name: str, *args: Any, **kwargs: Any) -> Any:
        result = self.celery.send_task(name, args=args, kwargs=kwargs, queue=self.queue)
        self.sent.append(result.id)
        return result

    def forget(self) -> None:
        """Remove what this run left in Redis: its queue and the jobs' results."""
        import redis

        client = redis.Redis.from_url(BROKER)
        try:
            keys = [f"celery-task-meta-{task_id}" for task_id in self.sent]
            keys += [self.queue, f"_kombu.binding.{self.queue}"]
            keys += [f"_kombu.binding_permanent.{self.queue}"]
            client.delete(*keys)
        finally:
            client.close()

    def emails(self) -> list[dict[str, str]]:
        if not self.outbox.exists():
            return []
        return [json.loads(line) for line in self.outbox.read_text().splitlines()]


def _require_redis() -> None:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=2):
            return
    except OSError as err:
        if IN_CI:
            pytest.fail(f"CI requires Redis on 127.0.0.1:6379: {err}")
        pytest.skip(f"Redis not reachable: {err}")


@pytest.fixture(scope="module", params=["sqlite", "postgresql", "mariadb"])
def worker(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Worker]:
    from celery import Celery

    _require_redis()
    workdir = tmp_path_factory.mktemp("worker")
    url = backend_url(str(request.param), workdir)
    engine = create_engine(url)
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    engine.dispose()
    queue = f"sessionscope-test-{uuid.uuid4().hex}"
    env = dict(
        os.environ,
        DATABASE_URL=url,
        CELERY_BROKER_URL=BROKER,
        WORKER_QUEUE=queue,
        EMAIL_OUTBOX=str(workdir / "outbox.jsonl"),
    )
    log = workdir / "worker.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tasks", "worker", "--pool=prefork",
             "--concurrency=2", "--loglevel=warning", "--without-mingle", "--without-gossip",
             "--without-heartbeat"],
            cwd=WORKER_DIR,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    celery = Celery("test-client", broker=BROKER, backend=BROKER)
    worker = Worker(url, queue, workdir / "outbox.jsonl", process, log, celery)
    try:
        yield worker
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        worker.forget()
        celery.close()
        engine = create_engine(url)
        Base.metadata.drop_all(engine)
        engine.dispose()
    assert "Traceback" not in log.read_text() or "IntegrityError" in log.read_text()


def orders(worker: Worker) -> list[tuple[int, str, bool]]:
    engine = create_engine(worker.url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(Order.id, Order.item, Order.confirmed).order_by(Order.id))
            return [tuple(row) for row in rows]  # type: ignore[misc]
    finally:
        engine.dispose()


def test_a_job_commits_and_its_email_goes_out_once(worker: Worker) -> None:
    assert worker.run("orders.place", 1, "book") == 1  # one attempt
    assert worker.run("orders.confirm", 1) is True
    assert worker.run("orders.confirm", 1) is False  # a redelivery: idempotent
    assert orders(worker) == [(1, "book", True)]
    assert worker.emails() == [{"to": "customer@example.com", "subject": "order 1 confirmed"}]


def test_a_failed_job_commits_nothing_and_sends_nothing(worker: Worker) -> None:
    before = len(worker.emails())
    with pytest.raises(Exception, match="no order 99"):
        worker.run("orders.confirm", 99)
    worker.run("orders.place", 2, "pen")
    with pytest.raises(Exception) as failed:
        worker.run("orders.place", 2, "pen")  # a duplicate: not transient, not retried
    assert "IntegrityError" in type(failed.value).__name__ + repr(failed.value)
    assert [o[:2] for o in orders(worker) if o[0] == 2] == [(2, "pen")]
    assert len(worker.emails()) == before


@pytest.mark.parametrize("worker", ["postgresql", "mariadb"], indirect=True)
def test_a_transient_error_is_retried_inside_the_job(worker: Worker) -> None:
    """The server terminates the job's connection while the job waits on a lock
    (before COMMIT): sessionscope runs the function again in a new session,
    within the same job, and the order is stored once."""
    postgresql = worker.url.startswith("postgresql")
    admin = create_engine(worker.url)
    try:
        with admin.connect() as holder:
            if postgresql:
                holder.execute(text("SELECT pg_advisory_xact_lock(4242)"))
            else:
                holder.execute(text("SELECT GET_LOCK('sessionscope_worker', 60)"))
            result = worker.send("orders.place", 3, "lamp", wait_for_lock=True)
            waiter = wait_for(lambda: _lock_waiter(admin, postgresql), "the job on the lock")
            with admin.connect() as conn:
                if postgresql:
                    conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": waiter})
                else:
                    conn.exec_driver_sql(f"KILL CONNECTION {int(waiter)}")
            if postgresql:
                holder.rollback()  # releases the lock for the next attempt
            else:
                holder.execute(text("SELECT RELEASE_LOCK('sessionscope_worker')"))
        assert result.get(timeout=60) == 2  # the second attempt committed
    finally:
        admin.dispose()
    assert [o[:2] for o in orders(worker) if o[0] == 3] == [(3, "lamp")]
    assert "retrying tasks.place_order after transient" in worker.log.read_text()


def _lock_waiter(admin: Any, postgresql: bool) -> int | None:
    with admin.connect() as conn:
        if postgresql:
            found = conn.scalar(
                text(
                    "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND query LIKE '%pg_advisory_xact_lock(4242)%' "
                    "AND pid <> pg_backend_pid()"
                )
            )
        else:
            found = conn.scalar(
                text(
                    "SELECT ID FROM information_schema.PROCESSLIST "
                    "WHERE INFO LIKE 'SELECT GET_LOCK(%' AND ID <> CONNECTION_ID()"
                )
            )
    return int(found) if found is not None else None
