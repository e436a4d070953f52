"""Queue and task names: the only strings the API and the workers must agree on to reach each other.

The API sends tasks by these names (it never imports task code); ``workers/tasks.py`` registers them.
"""

from __future__ import annotations

TRAIN_TASK = "studio.train"
GENERATE_TASK = "studio.generate"
SCORE_TASK = "studio.score"
PING_TASK = "studio.ping"
EVALUATE_TASK = "studio.evaluate"  # on INFERENCE_QUEUE: a succeeded run answers its held-out prompts
DATASET_REPORT_TASK = "studio.dataset_report"  # on DEFAULT_QUEUE: reports too large to compute in a request

INFERENCE_QUEUE = "inference"
DEFAULT_QUEUE = "default"
# Training queues are ``train.<gpu-class>``, one per entry of ``training.queues`` in settings.


def worker_queue(worker: str) -> str:
    """The inference queue only `worker` consumes (Celery's per-worker "direct queue", added at its start):
    requests for the base models placed on it (`app.services.placement`)."""
    return f"{INFERENCE_QUEUE}.w.{worker}"
