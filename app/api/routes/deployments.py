"""Deployments: serve an experiment's adapter (or a base model) under a model name; list; status; retire."""

from __future__ import annotations

import uuid

from fastapi import APIRouter

from app.api.deps import Page, SessionDep, SettingsDep, StorageDep, Trainer, Viewer, get_owned_or_404
from app.api.idempotency import idempotent
from app.models import (
    Deployment,
    DeploymentCreate,
    DeploymentPublic,
    DeploymentsPublic,
    DeploymentStatus,
    PlacementPublic,
)
from app.models import DeploymentStatusPublic as StatusPublic
from app.services import deployments as service
from app.services import placement, usage
from app.services.inference import live_workers

router = APIRouter(prefix="/deployments", tags=["deployments"])


@router.post("/", response_model=DeploymentPublic, status_code=201)
@idempotent
def create_deployment(
    session: SessionDep, settings: SettingsDep, storage: StorageDep, principal: Trainer, body: DeploymentCreate
) -> DeploymentPublic:
    """Deploy a succeeded experiment's adapter (`experiment_id`) or a `base_model`. The answer's `model`
    is the name to pass to the OpenAI client; workers load the weights on the first request."""
    return service.public(
        service.create_deployment(session=session, settings=settings, storage=storage, actor=principal, body=body)
    )


@router.get("/", response_model=DeploymentsPublic)
def list_deployments(
    session: SessionDep,
    principal: Viewer,
    page: Page,
    status: DeploymentStatus | None = None,
) -> DeploymentsPublic:
    """The team's deployments, newest first."""
    rows, count = service.list_deployments(
        session=session, team_id=principal.team_id, status=status, skip=page.skip, limit=page.limit
    )
    return DeploymentsPublic(data=[service.public(d) for d in rows], count=count)


@router.get("/{deployment_id}", response_model=DeploymentPublic)
def read_deployment(session: SessionDep, principal: Viewer, deployment_id: uuid.UUID) -> DeploymentPublic:
    return service.public(_get(session, principal.team_id, deployment_id))


@router.get("/{deployment_id}/status", response_model=StatusPublic)
def deployment_status(
    session: SessionDep, settings: SettingsDep, principal: Viewer, deployment_id: uuid.UUID
) -> StatusPublic:
    """Whether it is served, which live inference workers hold its weights now, and its request and token
    rates over the last five minutes."""
    deployment = _get(session, principal.team_id, deployment_id)
    workers = live_workers(stale_after_s=settings.inference.worker_stale_after_s)
    adapter = str(deployment.id) if deployment.adapter_prefix else None
    loaded_on = [
        w.name
        for w in workers
        if (model := w.stats.get("models", {}).get(deployment.base_model)) is not None
        and (adapter is None or adapter in model.get("loaded_adapters", []))
    ]
    placed = placement.placements(session, deployment.base_model, settings.inference.worker_stale_after_s)
    return StatusPublic(
        id=deployment.id,
        model=deployment.name,
        status=deployment.status,
        replicas=deployment.replicas,
        workers_alive=len(workers),
        loaded_on=loaded_on,
        placement=[PlacementPublic.model_validate(p, from_attributes=True) for p in placed],
        usage=usage.rates(session, deployment.id),
    )


@router.delete("/{deployment_id}", response_model=DeploymentPublic)
def retire_deployment(session: SessionDep, principal: Trainer, deployment_id: uuid.UUID) -> DeploymentPublic:
    """Retire: the model name stops answering and workers unload its weights."""
    deployment = _get(session, principal.team_id, deployment_id)
    return service.public(service.retire_deployment(session=session, actor=principal, deployment=deployment))


def _get(session: SessionDep, team_id: uuid.UUID, deployment_id: uuid.UUID) -> Deployment:
    return get_owned_or_404(session=session, model=Deployment, team_id=team_id, id=deployment_id, what="deployment")
