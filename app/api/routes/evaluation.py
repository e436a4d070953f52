"""Evaluation after training, and runs compared side by side (registered before /experiments/{id})."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query

from app.api.deps import SessionDep, Trainer, Viewer, get_owned_or_404
from app.api.idempotency import idempotent
from app.models import Comparison, EvalSpec, EvaluationPublic, Experiment
from app.services import evaluation as service
from app.services.errors import NotFound

router = APIRouter(prefix="/experiments", tags=["experiments"])


@router.get("/compare", response_model=Comparison)
def compare(
    session: SessionDep,
    principal: Viewer,
    ids: Annotated[list[uuid.UUID], Query(min_length=1, max_length=service.MAX_COMPARED, description="Experiment ids")],
) -> Comparison:
    """Several runs side by side: final and evaluation metrics, and every logged metric aligned on steps."""
    return service.compare(session=session, team_id=principal.team_id, ids=ids)


@router.post("/{experiment_id}/evaluation", response_model=EvaluationPublic, status_code=201)
@idempotent
def request_evaluation(
    session: SessionDep, principal: Trainer, experiment_id: uuid.UUID, body: EvalSpec
) -> EvaluationPublic:
    """Evaluate the run on its held-out rows once it has succeeded (at once if it has): exact match,
    ROUGE-L, BLEU against the references, and a judge deployment's grades when one is named. Asking
    again replaces the previous results."""
    experiment = _get(session, principal.team_id, experiment_id)
    evaluation = service.request_evaluation(session=session, actor=principal, experiment=experiment, spec=body)
    return EvaluationPublic.model_validate(evaluation)


@router.get("/{experiment_id}/evaluation", response_model=EvaluationPublic)
def read_evaluation(session: SessionDep, principal: Viewer, experiment_id: uuid.UUID) -> EvaluationPublic:
    _get(session, principal.team_id, experiment_id)
    evaluation = service.evaluation_of(session, experiment_id)
    if evaluation is None:
        raise NotFound("experiment_id", "this experiment has no evaluation; POST one")
    return EvaluationPublic.model_validate(evaluation)


def _get(session: SessionDep, team_id: uuid.UUID, experiment_id: uuid.UUID) -> Experiment:
    return get_owned_or_404(session=session, model=Experiment, team_id=team_id, id=experiment_id, what="experiment")
