"""Deployments: serve an experiment's adapter (or a base model) under a model name; list; status; retire."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query

from app.api.deps import SessionDep, SettingsDep, StorageDep, Trainer, Viewer
from app.models import Deployment, DeploymentCreate, DeploymentPublic, DeploymentsPublic, DeploymentStatus
from app.models import DeploymentStatusPublic as StatusPublic
from app.services import deployments as service
from app.services.inference import live_workers

router = APIRouter(prefix="/deployments", tags=["deployments"])


@router.post("/", response_model=DeploymentPublic, status_code=201)
def create_deployment(
    session: SessionDep, settings: SettingsDep, storage: StorageDep, principal: Trainer, body: DeploymentCreate
) -> DeploymentPublic:
    """Deploy a succeeded experiment's adapter (`experiment_id`) or a `base_model`. The answer's `model`
    is the name to pass to the OpenAI client; workers load the weights on the first request."""
    return service.public(service.create_deployment(session, settings, storage, principal, body))


@router.get("/", response_model=DeploymentsPublic)
def list_deployments(
    session: SessionDep, principal: Viewer, status: DeploymentStatus | None = None,
    skip: Annotated[int, Query(ge=0)] = 0, limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> DeploymentsPublic:  # fmt: skip
    """The team's deployments, newest first."""
    rows, count = service.list_deployments(session, principal.team_id, status, skip, limit)
    return DeploymentsPublic(data=[service.public(d) for d in rows], count=count)


@router.get("/{deployment_id}", response_model=DeploymentPublic)
def read_deployment(session: SessionDep, principal: Viewer, deployment_id: uuid.UUID) -> DeploymentPublic:
    return service.public(_get(session, principal.team_id, deployment_id))


@router.get("/{deployment_id}/status", response_model=StatusPublic)
def deployment_status(
    session: SessionDep, settings: SettingsDep, principal: Viewer, deployment_id: uuid.UUID
) -> StatusPublic:
    """Whether it is served, and which live inference workers hold its weights now."""
    deployment = _get(session, principal.team_id, deployment_id)
    workers = live_workers(settings.inference.worker_stale_after_s)
    adapter = str(deployment.id) if deployment.adapter_prefix else None
    loaded_on = [
        w.name for w in workers
        if (model := w.stats.get("models", {}).get(deployment.base_model)) is not None
        and (adapter is None or adapter in model.get("loaded_adapters", []))
    ]  # fmt: skip
    return StatusPublic(id=deployment.id, model=deployment.name, status=deployment.status,
                        workers_alive=len(workers), loaded_on=loaded_on)  # fmt: skip


@router.delete("/{deployment_id}", response_model=DeploymentPublic)
def retire_deployment(session: SessionDep, principal: Trainer, deployment_id: uuid.UUID) -> DeploymentPublic:
    """Retire: the model name stops answering and workers unload its weights."""
    return service.public(
        service.retire_deployment(session, principal, _get(session, principal.team_id, deployment_id))
    )


def _get(session: SessionDep, team_id: uuid.UUID, deployment_id: uuid.UUID) -> Deployment:
    deployment = service.get_deployment(session, team_id, deployment_id)
    if deployment is None:
        raise HTTPException(404, f"deployment {deployment_id} not found")
    return deployment
