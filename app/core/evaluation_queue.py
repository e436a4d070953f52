"""Send an experiment's evaluation to the inference queue once its run has succeeded: from the worker that
finishes the run (in the same transaction as the status), or from the API when an evaluation is asked
for after the fact. A message sent twice is harmless: the task only runs a `queued` evaluation."""

from __future__ import annotations

import uuid

from sqlmodel import Session

from app.core.outbox import enqueue
from app.core.queues import EVALUATE_TASK, INFERENCE_QUEUE
from app.models import EvaluationStatus, ExperimentEvaluation


def queue_evaluation(session: Session, experiment_id: uuid.UUID) -> bool:
    """Queue the experiment's evaluation if it has one (waiting, or done and asked again); in the caller's
    transaction. False when there is none to queue."""
    evaluation = session.get(ExperimentEvaluation, experiment_id)
    if evaluation is None or evaluation.status in (EvaluationStatus.queued, EvaluationStatus.running):
        return False
    evaluation.status, evaluation.results, evaluation.error, evaluation.finished_at = (
        EvaluationStatus.queued,
        None,
        None,
        None,
    )
    session.add(evaluation)
    enqueue(
        session=session, task_name=EVALUATE_TASK, queue=INFERENCE_QUEUE, payload={"experiment_id": str(experiment_id)}
    )
    return True
