"""A Celery app for the process-model tests, on a filesystem broker (no server needed).

Environment: ``KLIME_TEST_LEDGER`` and klime's variables (see ``mp_jobs``),
``KLIME_TEST_BROKER_DIR`` (required), ``KLIME_TEST_CELERY_HOOK`` = ``none`` | ``shutdown``
(default) | ``task`` (also flush after each task).
"""

from __future__ import annotations

import os

from celery import Celery

from apps.process import mp_jobs

BROKER_DIR = os.environ["KLIME_TEST_BROKER_DIR"]


def make_app() -> Celery:
    queue = os.path.join(BROKER_DIR, "queue")
    processed = os.path.join(BROKER_DIR, "processed")
    os.makedirs(queue, exist_ok=True)
    os.makedirs(processed, exist_ok=True)
    app = Celery("klime_test", broker="filesystem://")
    app.conf.broker_transport_options = {
        "data_folder_in": queue,
        "data_folder_out": queue,
        "processed_folder": processed,
        "control_folder": os.path.join(BROKER_DIR, "control"),
        "store_processed": False,
        "polling_interval": 0.05,
    }
    app.conf.task_ignore_result = True
    app.conf.broker_connection_retry_on_startup = True
    app.conf.worker_hijack_root_logger = False
    return app


app = make_app()

_hook = os.environ.get("KLIME_TEST_CELERY_HOOK", "shutdown")
if _hook != "none":
    from klime.integrations.celery import connect

    connect(flush_after_task=_hook == "task")


@app.task(name="klime_test.track")
def track(n: int) -> None:
    mp_jobs.produce("task", n)
