"""A Celery worker running sessionscope-decorated functions.

Run it (Redis as the broker, the database from DATABASE_URL)::

    celery -A tasks worker --loglevel=info

The jobs are thin: each task calls one decorated function, which owns the
transaction, retries transient database errors by itself (a new session per
attempt), and queues side effects with ``on_commit`` so they happen once, after
COMMIT, and never for work that was rolled back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import sessionscope
from celery import Celery
from celery.signals import worker_process_init
from sessionscope import configure_session, on_commit, with_session
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from models import Order

BROKER = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")
QUEUE = os.environ.get("WORKER_QUEUE", "orders")
OUTBOX = Path(os.environ.get("EMAIL_OUTBOX", "outbox.jsonl"))

app = Celery("worker", broker=BROKER, backend=os.environ.get("CELERY_RESULT_BACKEND", BROKER))
app.conf.update(
    task_default_queue=QUEUE,
    # Acknowledge a job after it ran, so a worker killed mid-job hands it to
    # another one. The job may then run twice: make it idempotent (below).
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
)

# Transient database errors (deadlocks, serialization failures, a connection
# lost before COMMIT) are retried inside the job by the decorated functions.
configure_session(retry_attempts=3, retry_delay=0.2)
# Engines are created lazily: nothing connects before the first job, so the
# prefork pool's children never share a parent's connection.
sessionscope.setup_database_connection()


@worker_process_init.connect
def _fresh_pools(**_: object) -> None:
    # A forked child must not reuse connections of its parent (there are none
    # unless the parent ran a query at import; this keeps it that way).
    sessionscope.get_default_manager().engine.dispose(close=False)


def send_email(to: str, subject: str) -> None:
    """Stands for an SMTP call: it cannot be undone, so it must run at most once
    per order and only for committed work."""
    with OUTBOX.open("a", encoding="utf-8") as out:
        out.write(json.dumps({"to": to, "subject": subject}) + "\n")


# -- the units of work ----------------------------------------------------------------

attempts: list[int] = []  # per worker process: how often place_order started


@with_session
def place_order(session: Session, order_id: int, item: str, wait_for_lock: bool) -> int:
    """Insert an order. Retried by sessionscope on a transient error: the whole
    function runs again in a new session, so it must not do anything it cannot
    take back before it returns (see confirm_order)."""
    attempts.append(order_id)
    if wait_for_lock:
        # Lets the test hold the job at a known point and kill its connection.
        if session.get_bind().dialect.name == "postgresql":
            session.execute(text("SELECT pg_advisory_xact_lock(4242)"))
        else:
            session.execute(text("SELECT GET_LOCK('sessionscope_worker', 60)"))
    session.add(Order(id=order_id, item=item))
    return attempts.count(order_id)


@with_session
def confirm_order(session: Session, order_id: int) -> bool:
    """Mark an order confirmed and e-mail the customer, once.

    Idempotent: a confirmed order is left alone, so running the job again (a
    redelivery after a crash, a retry) sends no second e-mail. The e-mail goes
    out in ``on_commit``: after COMMIT succeeded, never for a rolled-back
    confirmation, and never again when sessionscope retries the function.
    """
    order = session.scalar(select(Order).where(Order.id == order_id).with_for_update())
    if order is None:
        raise LookupError(f"no order {order_id}")
    if order.confirmed:
        return False
    order.confirmed = True
    on_commit(lambda: send_email("customer@example.com", f"order {order_id} confirmed"))
    return True


# -- the tasks ------------------------------------------------------------------------


@app.task(name="orders.place")
def place_order_task(order_id: int, item: str, wait_for_lock: bool = False) -> int:
    return place_order(order_id, item, wait_for_lock)


# No Celery autoretry here: sessionscope already retried what is transient, and
# re-running a job whose outcome is unknown (CommitOutcomeUnknownError) could
# confirm twice if the job were not idempotent.
@app.task(name="orders.confirm")
def confirm_order_task(order_id: int) -> bool:
    return confirm_order(order_id)
