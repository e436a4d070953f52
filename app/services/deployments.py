"""Deployments: an experiment's adapter (or a base model) made callable by name on the inference queue."""

from __future__ import annotations

import re
import secrets
import uuid
from typing import Any

from sqlmodel import Session, col, delete, func, select

from app.core.config import Settings
from app.core.layout import artifact_prefix, stored_model
from app.core.storage import Storage
from app.models import (
    Deployment,
    DeploymentCreate,
    DeploymentPublic,
    DeploymentStatus,
    Experiment,
    ExperimentStatus,
    InferenceCommand,
    ModelPlacement,
    utcnow,
)
from app.services import audit
from app.services.crud import get_owned, paginate
from app.services.errors import Conflict, InvalidRequest, NotFound
from app.services.experiments import check_base_model
from app.services.principal import Principal

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def public(deployment: Deployment) -> DeploymentPublic:
    return DeploymentPublic(**deployment.model_dump(), model=deployment.name)


def create_deployment(
    *, session: Session, settings: Settings, storage: Storage, actor: Principal, body: DeploymentCreate
) -> Deployment:
    if (body.experiment_id is None) == (body.base_model is None):
        raise InvalidRequest("experiment_id", "give exactly one of experiment_id or base_model")
    adapter_prefix = None
    if body.experiment_id is not None:
        experiment = get_owned(session=session, model=Experiment, team_id=actor.team_id, id=body.experiment_id)
        if experiment is None:
            raise NotFound("experiment_id", f"no experiment {body.experiment_id}")
        if experiment.status is not ExperimentStatus.succeeded:
            raise Conflict(
                f"experiment is {experiment.status.value}; only succeeded runs can be deployed", field="experiment_id"
            )
        base_model, adapter_prefix = servable(settings, storage, experiment, merged=body.merged)
        default_name = experiment.name
    else:
        assert body.base_model is not None
        base_model = check_base_model(body.base_model, settings)
        default_name = base_model.rstrip("/").rsplit("/", 1)[-1]
    name = body.name or f"{_slug(default_name)}-{secrets.token_hex(3)}"
    taken = session.exec(
        select(func.count()).select_from(Deployment).where(Deployment.team_id == actor.team_id, Deployment.name == name)
    ).one()
    if taken:
        raise Conflict(f"the team already has a deployment named {name!r}", field="name")
    deployment = add_deployment(
        session,
        actor,
        name=name,
        experiment_id=body.experiment_id,
        base_model=base_model,
        adapter_prefix=adapter_prefix,
        replicas=body.replicas,
    )
    session.commit()
    session.refresh(deployment)
    return deployment


def add_deployment(
    session: Session,
    actor: Principal,
    *,
    name: str,
    experiment_id: uuid.UUID | None,
    base_model: str,
    adapter_prefix: str | None,
    replicas: int = 1,
    **audit_data: Any,
) -> Deployment:
    """The deployment row and its audit event, in the caller's transaction (the caller commits)."""
    deployment = Deployment(
        team_id=actor.team_id,
        name=name,
        experiment_id=experiment_id,
        base_model=base_model,
        adapter_prefix=adapter_prefix,
        created_by=actor.user_id,
        replicas=replicas,
    )
    session.add(deployment)
    session.flush()
    audit.record(
        session=session,
        actor=actor,
        action="deployment.create",
        target_type="deployment",
        target_id=deployment.id,
        name=name,
        experiment_id=str(experiment_id) if experiment_id else None,
        **audit_data,
    )
    return deployment


def servable(settings: Settings, storage: Storage, experiment: Experiment, *, merged: bool) -> tuple[str, str | None]:
    """(base model, adapter prefix) that serve a succeeded run: its LoRA adapter on its base model (shared
    with every other deployment of that base), or, for a full fine-tune or with ``merged`` a merge_adapter
    run, its own stored weights as a base model of their own."""
    prefix = artifact_prefix(experiment.id)
    if merged:
        if not storage.exists(f"{prefix}/merged/config.json"):
            raise InvalidRequest("merged", "the run stored no merged model: train it with merge_adapter: true")
        return stored_model(f"{prefix}/merged"), None
    if storage.exists(f"{prefix}/{ADAPTER_WEIGHTS}"):
        # Checked again: the run may predate the fence (or a narrower allowlist).
        return check_base_model(experiment.base_model, settings), prefix
    if storage.exists(f"{prefix}/config.json"):  # a full fine-tune: the whole model
        return stored_model(prefix), None
    raise InvalidRequest("experiment_id", "the run stored neither an adapter nor a model")


def retire_deployment(*, session: Session, actor: Principal, deployment: Deployment) -> Deployment:
    """Stop serving it: the name stops resolving at once, and workers unload its weights."""
    if deployment.status is DeploymentStatus.retired:
        raise Conflict("deployment is already retired")
    deployment.status = DeploymentStatus.retired
    deployment.retired_at = utcnow()
    session.add(deployment)
    shared_base = session.exec(
        select(func.count())
        .select_from(Deployment)
        .where(
            Deployment.base_model == deployment.base_model,
            Deployment.status == DeploymentStatus.active,
            Deployment.id != deployment.id,
        )
    ).one()
    if deployment.adapter_prefix or not shared_base:  # a base model others still serve stays loaded
        session.add(InferenceCommand(action="unload", target=unload_target(deployment)))
    if not shared_base:  # its workers may take other models now
        session.exec(delete(ModelPlacement).where(col(ModelPlacement.base_model) == deployment.base_model))  # type: ignore[call-overload]
    audit.record(
        session=session,
        actor=actor,
        action="deployment.retire",
        target_type="deployment",
        target_id=deployment.id,
        name=deployment.name,
    )
    session.commit()
    session.refresh(deployment)
    return deployment


def unload_target(deployment: Deployment) -> str:
    """What workers know the deployment by: its adapter name, or its base model for a plain one."""
    return str(deployment.id) if deployment.adapter_prefix else deployment.base_model


def by_model_name(*, session: Session, team_id: uuid.UUID, name: str) -> Deployment | None:
    active = Deployment.status == DeploymentStatus.active
    return session.exec(
        select(Deployment).where(Deployment.team_id == team_id, Deployment.name == name, active)
    ).first()


def list_deployments(
    *, session: Session, team_id: uuid.UUID, status: DeploymentStatus | None = None, skip: int = 0, limit: int = 500
) -> tuple[list[Deployment], int]:
    query = select(Deployment).where(Deployment.team_id == team_id)
    if status:
        query = query.where(Deployment.status == status)
    return paginate(session=session, query=query.order_by(col(Deployment.created_at).desc()), skip=skip, limit=limit)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._")[:80] or "model"
