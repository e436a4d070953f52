"""Evaluation after training, and runs compared side by side.

An evaluation is asked for on an experiment (``request_evaluation``): it waits for the run to succeed
(the worker that finishes the run queues it) or is queued at once when the run already has. The
comparison lines several runs' logged metrics up on the union of their steps, with their final and
evaluation metrics, so one chart can overlay them.
"""

from __future__ import annotations

import uuid

from sqlmodel import Session, col, select

from app.core.evaluation_queue import queue_evaluation
from app.models import (
    ComparedRun,
    Comparison,
    Deployment,
    DeploymentStatus,
    EvalSpec,
    EvaluationStatus,
    Experiment,
    ExperimentEvaluation,
    ExperimentEvent,
    ExperimentStatus,
)
from app.services import audit
from app.services.crud import get_owned
from app.services.errors import InvalidRequest, NotFound
from app.services.principal import Principal

MAX_COMPARED = 10
MAX_POINTS = 5000  # metric events read per run


def request_evaluation(
    *, session: Session, actor: Principal, experiment: Experiment, spec: EvalSpec
) -> ExperimentEvaluation:
    if spec.judge_deployment is not None:
        judge = get_owned(session=session, model=Deployment, team_id=experiment.team_id, id=spec.judge_deployment)
        if judge is None or judge.status is not DeploymentStatus.active:
            raise NotFound("judge_deployment", f"no active deployment {spec.judge_deployment}")
    if experiment.status in (ExperimentStatus.failed, ExperimentStatus.cancelled):
        raise InvalidRequest("experiment_id", f"the run {experiment.status.value}: there is nothing to evaluate")
    evaluation = session.get(ExperimentEvaluation, experiment.id)
    if evaluation is not None and evaluation.status in (EvaluationStatus.queued, EvaluationStatus.running):
        raise InvalidRequest("experiment_id", "an evaluation of this run is already under way")
    evaluation = evaluation or ExperimentEvaluation(experiment_id=experiment.id, team_id=experiment.team_id)
    evaluation.spec = spec.model_dump(mode="json")
    evaluation.status, evaluation.results, evaluation.error = EvaluationStatus.waiting, None, None
    session.add(evaluation)
    session.flush()
    if experiment.status is ExperimentStatus.succeeded:
        queue_evaluation(session, experiment.id)
    audit.record(
        session=session, actor=actor, action="experiment.evaluate", target_type="experiment", target_id=experiment.id
    )
    session.commit()
    session.refresh(evaluation)
    return evaluation


def compare(*, session: Session, team_id: uuid.UUID, ids: list[uuid.UUID]) -> Comparison:
    if not 1 <= len(ids) <= MAX_COMPARED:
        raise InvalidRequest("ids", f"give 1 to {MAX_COMPARED} experiment ids")
    runs: list[ComparedRun] = []
    series: dict[str, dict[str, dict[int, float]]] = {}  # metric -> run -> step -> value
    for experiment_id in dict.fromkeys(ids):
        experiment = get_owned(session=session, model=Experiment, team_id=team_id, id=experiment_id)
        if experiment is None:
            raise NotFound("ids", f"no experiment {experiment_id}")
        evaluation = session.get(ExperimentEvaluation, experiment_id)
        done = evaluation is not None and evaluation.status is EvaluationStatus.succeeded and evaluation.results
        runs.append(
            ComparedRun(
                id=experiment.id,
                name=experiment.name,
                status=experiment.status.value,
                final_metrics=experiment.final_metrics,
                evaluation=evaluation.results if done and evaluation else None,
            )
        )
        events = session.exec(
            select(ExperimentEvent.data)
            .where(ExperimentEvent.experiment_id == experiment_id, ExperimentEvent.type == "metrics")
            .order_by(col(ExperimentEvent.seq))
            .limit(MAX_POINTS)
        ).all()
        for data in events:
            step = data.get("step")
            if not isinstance(step, int):
                continue
            for name, value in data.items():
                if name != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                    series.setdefault(name, {}).setdefault(str(experiment_id), {})[step] = float(value)
    steps = sorted({step for by_run in series.values() for points in by_run.values() for step in points})
    curves: dict[str, dict[str, list[float | None]]] = {
        name: {str(run.id): [by_run.get(str(run.id), {}).get(step) for step in steps] for run in runs}
        for name, by_run in sorted(series.items())
    }
    return Comparison(runs=runs, metrics=sorted(series), steps=steps, curves=curves)


def evaluation_of(session: Session, experiment_id: uuid.UUID) -> ExperimentEvaluation | None:
    return session.get(ExperimentEvaluation, experiment_id)
