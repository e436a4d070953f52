"""The Celery app: queues, routes and reliability settings. Torch-free, so the API can send by name.

Queues are declared explicitly (``task_create_missing_queues=False`` turns a typo into an error):
one ``train.<gpu-class>`` queue per GPU class from settings, ``inference`` and ``default``.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from app.core.config import Settings, get_settings
from app.core.queues import DEFAULT_QUEUE, INFERENCE_QUEUE, TRAIN_TASK


def make_celery(settings: Settings) -> Celery:
    # include: only worker processes import the task module; senders (the API) go by name.
    app = Celery("studio", broker=settings.broker.url, include=["workers.tasks"])
    train_queues = [Queue(q.name) for q in settings.training.queues]
    app.conf.update(
        task_queues=[*train_queues, Queue(INFERENCE_QUEUE), Queue(DEFAULT_QUEUE)],
        task_default_queue=DEFAULT_QUEUE,
        task_create_missing_queues=False,
        task_routes={TRAIN_TASK: {"queue": settings.training.default_queue}},
        # JSON only: a message that asks for pickle is refused before it is decoded.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,  # state lives in the database, not a result backend
        # Ack after the task returns and requeue if the worker dies mid-task; the claim by
        # attempt number makes the redelivery safe.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # a training worker holds one job, not a backlog
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options=_transport_options(settings),
        worker_hijack_root_logger=False,
    )
    return app


def _transport_options(settings: Settings) -> dict[str, object]:
    if settings.broker.url.startswith(("redis://", "rediss://")):
        return {"visibility_timeout": settings.broker.visibility_timeout_s}
    return {}


celery_app = make_celery(get_settings())
