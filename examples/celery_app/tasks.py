"""The klime Celery example: tasks that track events, run by a prefork worker.

    celery -A tasks worker --loglevel=INFO          # the worker
    python enqueue.py --count 10                    # queue some tasks

The broker is kombu's filesystem transport (a directory, ``CELERY_BROKER_DIR``, default
``./broker``), so the example needs no server; use your usual broker URL instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from celery import Celery
from celery.signals import worker_process_shutdown

import klime

BROKER_DIR = Path(os.environ.get("CELERY_BROKER_DIR", Path(__file__).resolve().parent / "broker"))
BROKER_DIR.mkdir(parents=True, exist_ok=True)

app = Celery("tasks", broker="filesystem://")
app.conf.update(
    broker_transport_options={
        "data_folder_in": str(BROKER_DIR),
        "data_folder_out": str(BROKER_DIR),
        "control_folder": str(BROKER_DIR / "control"),
        "processed_folder": str(BROKER_DIR / "processed"),
        "polling_interval": 0.1,
    },
    task_ignore_result=True,
    worker_hijack_root_logger=False,
)


# A prefork worker's pool processes leave through os._exit(): no atexit hook runs there, so
# events still queued in a pool process would be lost when it exits (at warm shutdown, or
# when --max-tasks-per-child recycles it). Celery announces that exit in the process itself:
# flush there. (Not needed with --pool=solo/threads: the exit hook runs in the main process.)
@worker_process_shutdown.connect
def flush_klime(**_: Any) -> None:
    klime.flush(timeout=5)


@app.task
def signup(user_id: str, plan: str) -> None:
    # track() queues the event and returns at once; each pool process sends its own events
    # from its own background thread (created after the fork, on the first event).
    klime.identify(user_id, {"plan": plan})
    klime.track("Signup", {"plan": plan}, user_id=user_id)


@app.task
def invoice_paid(user_id: str, amount: int) -> None:
    # An event that must not wait: send it before the task ends, and let Celery retry the
    # task if Klime could not be reached (track_sync raises klime.SendError).
    klime.track_sync("Invoice Paid", {"amount": amount}, user_id=user_id, timeout=10)
