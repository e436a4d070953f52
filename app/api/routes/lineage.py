"""Where a run came from (lineage graph), and new runs from an old one (clone)."""

from __future__ import annotations

import uuid

from fastapi import APIRouter

from app.api.deps import SessionDep, SettingsDep, StorageDep, Trainer, Viewer, get_owned_or_404
from app.api.idempotency import idempotent
from app.api.routes.experiments import _after_commit as after_commit
from app.models import Experiment, ExperimentClone, ExperimentPublic, Lineage
from app.services import experiments as experiments_service
from app.services import lineage as service

router = APIRouter(prefix="/experiments", tags=["experiments"])


@router.get("/{experiment_id}/lineage", response_model=Lineage)
def read_lineage(session: SessionDep, principal: Viewer, experiment_id: uuid.UUID) -> Lineage:
    """The graph around a run: its dataset and the versions and A/B votes it came from, its base model,
    the run it was cloned from, and its deployments (nodes and typed edges)."""
    return service.lineage_graph(session, _get(session, principal.team_id, experiment_id))


@router.post("/{experiment_id}/clone", response_model=ExperimentPublic, status_code=201)
@idempotent
def clone_experiment(
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    principal: Trainer,
    experiment_id: uuid.UUID,
    body: ExperimentClone,
) -> ExperimentPublic:
    """A new experiment with this one's resolved settings, some overridden; its lineage points back here."""
    source = _get(session, principal.team_id, experiment_id)
    experiment = experiments_service.clone_experiment(
        session=session, settings=settings, storage=storage, actor=principal, source=source, body=body
    )
    after_commit(experiment)
    return ExperimentPublic.model_validate(experiment)


def _get(session: SessionDep, team_id: uuid.UUID, experiment_id: uuid.UUID) -> Experiment:
    return get_owned_or_404(session=session, model=Experiment, team_id=team_id, id=experiment_id, what="experiment")
