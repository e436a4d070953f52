"""OpenAI's fine-tuning API over our own objects: a file is a dataset, a fine-tuning job is an experiment.

One truth, two shapes: a file uploaded through /v1/files is listed by /api/datasets and the other way
round, and a job is listed by /api/experiments. Ids carry the row's UUID (`file-<hex>`, `ftjob-<hex>`), so
nothing is stored twice. What the OpenAI shape adds is kept on the experiment: the validation dataset,
the caller's `metadata` (as labels) and the `ft:` model name it answers to.

`auto` and `learning_rate_multiplier` are resolved against the recipe named by
``training.fine_tuning_recipe`` (``training.fine_tuning_dpo_recipe`` for method dpo): `auto` keeps the
recipe's value, the multiplier scales the recipe's learning rate, and `n_epochs` replaces the recipe's
length (its max_steps) with that many passes over the training file.
"""

from __future__ import annotations

import csv
import io
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, exists, func, literal
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from app.core.config import Settings
from app.core.event_log import events_after
from app.core.storage import Storage
from app.models import (
    Dataset,
    Deployment,
    DeploymentStatus,
    Experiment,
    ExperimentCreate,
    ExperimentEvent,
    ExperimentStatus,
)
from app.models.fine_tuning import DpoHyperparameters, FineTuningJobCreate
from app.services.crud import get_owned
from app.services.deployments import add_deployment, servable
from app.services.errors import InvalidRequest, NotFound
from app.services.experiments import check_base_model, create_experiment
from app.services.model_names import FT_PREFIX, checkpoint_model_name, split_checkpoint
from app.services.paging import keyset_page
from app.services.principal import Principal
from app.services.recipes import RecipeNotFound, resolve

FILE_PREFIX = "file-"
RESULTS_PREFIX = "file-results-"
JOB_PREFIX = "ftjob-"
EVENT_PREFIX = "ftevent-"
CHECKPOINT_PREFIX = "ftckpt-"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MAX_EVENTS = 100_000  # a run's events of one type read at once (a run logs far fewer)
STATUSES = {  # ours → OpenAI's (OpenAI has no "created": a job there is queued the moment it exists)
    ExperimentStatus.created: "queued",
    ExperimentStatus.queued: "queued",
    ExperimentStatus.running: "running",
    ExperimentStatus.paused: "paused",
    ExperimentStatus.succeeded: "succeeded",
    ExperimentStatus.failed: "failed",
    ExperimentStatus.cancelled: "cancelled",
}


def _ts(moment: datetime | None) -> int | None:
    return int(moment.timestamp()) if moment else None


def parse_id(value: str, prefix: str, param: str) -> uuid.UUID:
    """The row id inside an OpenAI-style id; a malformed one is a 404 like a missing one."""
    try:
        if value.startswith(prefix):
            return uuid.UUID(hex=value.removeprefix(prefix))
    except ValueError:
        pass
    raise NotFound(param, f"no such {param.replace('_', ' ')}: {value!r}")


# ---------------------------------------------------------------- files


def file_id(dataset: Dataset) -> str:
    return f"{FILE_PREFIX}{dataset.id.hex}"


def file_object(dataset: Dataset) -> dict[str, Any]:
    return {
        "id": file_id(dataset),
        "object": "file",
        "bytes": dataset.size_bytes,
        "created_at": _ts(dataset.created_at),
        "filename": dataset.name,
        "purpose": "fine-tune",
        "status": "processed",  # a dataset exists only once every row validated
        "status_details": None,
        "expires_at": None,
    }


def results_file_object(experiment: Experiment) -> dict[str, Any]:
    return {
        "id": f"{RESULTS_PREFIX}{experiment.id.hex}",
        "object": "file",
        "bytes": 0,  # generated when read
        "created_at": _ts(experiment.finished_at or experiment.created_at),
        "filename": "step_metrics.csv",
        "purpose": "fine-tune-results",
        "status": "processed",
        "status_details": None,
        "expires_at": None,
    }


def owned_file(session: Session, team_id: uuid.UUID, value: str, param: str = "file_id") -> Dataset:
    dataset = get_owned(session=session, model=Dataset, team_id=team_id, id=parse_id(value, FILE_PREFIX, param))
    if dataset is None:
        raise NotFound(param, f"no such file: {value!r}")
    return dataset


def results_csv(session: Session, experiment: Experiment) -> str:
    """OpenAI's result file: one row per logged step (train loss and token accuracy, and the validation
    ones at the steps that evaluated)."""
    rows: dict[int, dict[str, Any]] = {}
    for event in _of_type(session, experiment.id, "metrics"):
        step = int(event.data.get("step", 0))
        row = rows.setdefault(step, {"step": step})
        data = event.data
        if "loss" in data:
            row["train_loss"], row["train_accuracy"] = data["loss"], data.get("mean_token_accuracy", "")
        if "eval_loss" in data:
            row["valid_loss"] = data["eval_loss"]
            row["valid_mean_token_accuracy"] = data.get("eval_mean_token_accuracy", "")
    out = io.StringIO()
    fields = ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"]
    writer = csv.DictWriter(out, fieldnames=fields, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows[s] for s in sorted(rows))
    return out.getvalue()


# ---------------------------------------------------------------- jobs


def job_id(experiment: Experiment) -> str:
    return f"{JOB_PREFIX}{experiment.id.hex}"


def owned_job(session: Session, team_id: uuid.UUID, value: str) -> Experiment:
    experiment = get_owned(
        session=session, model=Experiment, team_id=team_id, id=parse_id(value, JOB_PREFIX, "fine_tuning_job_id")
    )
    if experiment is None:
        raise NotFound("fine_tuning_job_id", f"no such fine-tuning job: {value!r}")
    return experiment


def create_job(
    *, session: Session, settings: Settings, storage: Storage, actor: Principal, body: FineTuningJobCreate
) -> Experiment:
    training = owned_file(session, actor.team_id, body.training_file, "training_file")
    validation = (
        owned_file(session, actor.team_id, body.validation_file, "validation_file") if body.validation_file else None
    )
    dpo = body.method_type == "dpo"
    recipe = settings.training.fine_tuning_dpo_recipe if dpo else settings.training.fine_tuning_recipe
    try:
        base = resolve(recipe, {"objective": "dpo"} if dpo else {})
    except RecipeNotFound as exc:  # the operator's setting names no recipe
        raise InvalidRequest("method", f"no recipe for this method on this server: {exc}", status_code=400) from None
    chosen = body.chosen_hyperparameters()
    overrides: dict[str, Any] = {"objective": "dpo"} if dpo else {}
    if chosen.n_epochs != "auto":
        overrides.update(epochs=int(chosen.n_epochs), max_steps=-1)
    if chosen.batch_size != "auto":
        overrides["batch_size"] = int(chosen.batch_size)
    if chosen.learning_rate_multiplier != "auto":
        overrides["learning_rate"] = base.learning_rate * float(chosen.learning_rate_multiplier)
    if isinstance(chosen, DpoHyperparameters) and chosen.beta != "auto":
        overrides["dpo_beta"] = float(chosen.beta)
    if body.seed is not None:
        overrides["seed"] = body.seed
    create = ExperimentCreate(
        name=f"{body.suffix or 'fine-tune'} on {training.name}"[:200],
        base_model=body.model,
        dataset_id=training.id,
        recipe=recipe,
        hyperparameters=overrides,
        validation_dataset_id=validation.id if validation else None,
        labels=body.metadata or {},
        queue=None,
        gpus=1,
        start=True,
        eval=None,
    )
    try:
        return create_experiment(
            session=session, settings=settings, storage=storage, actor=actor, body=create, fine_tuned_suffix=body.suffix
        )
    except InvalidRequest as exc:  # our field names → the job's (dataset_id is its training_file, ...)
        raise InvalidRequest(_job_param(exc.field), exc.message, exc.status_code) from None


def _job_param(field: str) -> str:
    if field.startswith("hyperparameters."):
        return "hyperparameters"
    return {"dataset_id": "training_file", "validation_dataset_id": "validation_file", "base_model": "model"}.get(
        field, field
    )


def job_object(session: Session, experiment: Experiment) -> dict[str, Any]:
    params = experiment.hyperparameters
    dpo = params.get("objective") == "dpo"
    recipe_rate = _recipe_learning_rate(experiment.recipe)
    multiplier = params["learning_rate"] / recipe_rate if recipe_rate else 1.0
    hyperparameters: dict[str, Any] = {
        "n_epochs": int(params["epochs"]) if params.get("max_steps", -1) == -1 else "auto",
        "batch_size": params["batch_size"],
        "learning_rate_multiplier": round(multiplier, 6),
    }
    method_type = "dpo" if dpo else "supervised"
    method_params = {**hyperparameters, "beta": params.get("dpo_beta")} if dpo else hyperparameters
    succeeded = experiment.status is ExperimentStatus.succeeded
    validation = f"{FILE_PREFIX}{experiment.validation_dataset_id.hex}" if experiment.validation_dataset_id else None
    return {
        "id": job_id(experiment),
        "object": "fine_tuning.job",
        "created_at": _ts(experiment.created_at),
        "finished_at": _ts(experiment.finished_at),
        "model": experiment.base_model,
        "fine_tuned_model": experiment.fine_tuned_model if succeeded else None,
        "organization_id": str(experiment.team_id),
        "status": STATUSES[experiment.status],
        "training_file": f"{FILE_PREFIX}{experiment.dataset_id.hex}",
        "validation_file": validation,
        "hyperparameters": hyperparameters,
        "method": {"type": method_type, method_type: {"hyperparameters": method_params}},
        "result_files": [results_file_object(experiment)["id"]] if experiment.status.terminal else [],
        "trained_tokens": _trained_tokens(session, experiment),
        "error": {"code": "training_failed", "message": experiment.error, "param": None}
        if experiment.status is ExperimentStatus.failed
        else None,
        "seed": params.get("seed"),
        "estimated_finish": _estimated_finish(session, experiment),
        "integrations": [],
        "metadata": experiment.labels or None,
        "user_provided_suffix": None,
    }


def _recipe_learning_rate(recipe: str | None) -> float | None:
    try:
        return resolve(recipe, {}).learning_rate if recipe else None
    except (RecipeNotFound, ValueError):
        return None


def _trained_tokens(session: Session, experiment: Experiment) -> int | None:
    """Tokens the run has trained on so far (every pass counted), from its last training log."""
    if tokens := experiment.final_metrics.get("num_input_tokens_seen"):
        return int(tokens)
    logged = (e.data.get("num_tokens") for e in reversed(_of_type(session, experiment.id, "metrics")))
    return next((int(t) for t in logged if t), None)


def _estimated_finish(session: Session, experiment: Experiment) -> int | None:
    """From the pace since this attempt started: (now - start) / steps done × steps left."""
    if experiment.status is not ExperimentStatus.running:
        return None
    started, last = _last_event(session, experiment.id, "started"), _last_event(session, experiment.id, "metrics")
    if started is None or last is None or last.seq < started.seq:
        return None
    total, first, step = started.data.get("max_steps"), started.data.get("start_step", 0), last.data.get("step")
    if not total or not step or step <= first:
        return None
    pace = (last.created_at - started.created_at) / (step - first)
    return _ts(last.created_at + pace * (total - step))


def list_jobs(
    *, session: Session, team_id: uuid.UUID, after: str | None, limit: int, metadata: dict[str, str]
) -> tuple[list[Experiment], bool]:
    """Newest first; ``after`` is the id of the last job of the previous page; ``metadata`` keeps the jobs
    whose labels hold every pair (compared in SQL, so a page reads only its own rows)."""
    query = select(Experiment).where(Experiment.team_id == team_id)
    dialect = session.get_bind().dialect.name
    for label, value in metadata.items():
        query = query.where(_has_label(dialect, label, value))
    cursor = owned_job(session, team_id, after) if after else None
    return keyset_page(session, query, (col(Experiment.created_at), col(Experiment.id)), cursor, limit)


def _has_label(dialect: str, key: str, value: str) -> ColumnElement[bool]:
    """An experiment's labels hold `key` = `value`. The pairs are enumerated rather than looked up by a JSON
    path: SQLite's paths cannot quote a key that holds a double quote, and label keys are the user's own."""
    each = func.json_each_text if dialect == "postgresql" else func.json_each  # text values, both
    pairs = each(col(Experiment.labels)).table_valued("key", "value").alias("label")
    return exists(select(literal(1)).select_from(pairs).where(pairs.c.key == key, pairs.c.value == value))


# ---------------------------------------------------------------- events and checkpoints


def _of_type(session: Session, experiment_id: uuid.UUID, type_: str) -> list[ExperimentEvent]:
    """Every event of one type of a run, in order (the event log's own reader, bounded)."""
    return events_after(session, experiment_id, 0, type_=type_, limit=MAX_EVENTS)


def _last_event(session: Session, experiment_id: uuid.UUID, type_: str) -> ExperimentEvent | None:
    query = select(ExperimentEvent).where(ExperimentEvent.experiment_id == experiment_id, ExperimentEvent.type == type_)
    return session.exec(query.order_by(col(ExperimentEvent.seq).desc()).limit(1)).first()


def events_page(
    session: Session, experiment: Experiment, after: str | None, limit: int
) -> tuple[list[dict[str, Any]], bool]:
    """The run's events as OpenAI's, newest first; ``after`` is the id of the last event of the previous page."""
    query = select(ExperimentEvent).where(ExperimentEvent.experiment_id == experiment.id)
    if after:
        prefix = f"{EVENT_PREFIX}{experiment.id.hex[:12]}-"
        seq = after.removeprefix(prefix)
        if not after.startswith(prefix) or not seq.isdigit():
            raise InvalidRequest("after", f"not an event of this job: {after!r}", status_code=400)
        query = query.where(col(ExperimentEvent.seq) < int(seq))
    rows = list(session.exec(query.order_by(col(ExperimentEvent.seq).desc()).limit(limit + 1)).all())
    return [_event_object(experiment, e) for e in rows[:limit]], len(rows) > limit


def _event_object(experiment: Experiment, event: ExperimentEvent) -> dict[str, Any]:
    data, kind, level = dict(event.data), "message", "info"
    if event.type == "status":
        status = STATUSES.get(ExperimentStatus(data["status"]), data["status"])
        message = f"Job {status}" + (f": {data['reason']}" if data.get("reason") else "")
        if data.get("error"):
            message, level = f"Job failed: {data['error']}", "error"
    elif event.type == "metrics":
        kind = "metrics"
        parts = [
            f"{k}={data[k]:.4g}" for k in ("loss", "eval_loss", "rewards/margins") if isinstance(data.get(k), float)
        ]
        message = f"Step {data.get('step')}: " + (", ".join(parts) or "metrics")
        data = {**data, "train_loss": data.get("loss"), "valid_loss": data.get("eval_loss")}
    elif event.type == "checkpoint":
        message = f"Checkpoint created at step {data.get('step')}"
    elif event.type == "started":
        message = f"Training started at step {data.get('start_step', 0)} of {data.get('max_steps')}"
    elif event.type == "stopped":
        message, level = f"Training stopped at step {data.get('step')} ({data.get('reason')})", "warn"
    else:
        message = event.type
    return {
        "object": "fine_tuning.job.event",
        "id": f"{EVENT_PREFIX}{experiment.id.hex[:12]}-{event.seq}",
        "created_at": _ts(event.created_at),
        "level": level,
        "message": message,
        "type": kind,
        "data": data,
    }


def checkpoints_page(
    session: Session, storage: Storage, experiment: Experiment, after: str | None, limit: int
) -> tuple[list[dict[str, Any]], bool]:
    """The run's stored checkpoints, newest first, each servable by its `fine_tuned_model_checkpoint` name."""
    metrics = _of_type(session, experiment.id, "metrics")
    found = []
    for event in reversed(_of_type(session, experiment.id, "checkpoint")):
        step, key = int(event.data.get("step", 0)), event.data.get("key")
        if not key or not storage.exists(f"{key}/{ADAPTER_WEIGHTS}"):
            continue  # pruned (only the last few are kept) or not an adapter (full fine-tunes)
        if after and step >= _checkpoint_step(after, experiment):
            continue
        train = next((m.data for m in reversed(metrics) if "loss" in m.data and m.data.get("step", 0) <= step), {})
        valid = next((m.data for m in reversed(metrics) if "eval_loss" in m.data and m.data.get("step", 0) <= step), {})
        found.append(
            {
                "object": "fine_tuning.job.checkpoint",
                "id": f"{CHECKPOINT_PREFIX}{experiment.id.hex[:12]}-{step}",
                "created_at": _ts(event.created_at),
                "fine_tuned_model_checkpoint": checkpoint_model_name(experiment.fine_tuned_model or "", step),
                "fine_tuning_job_id": job_id(experiment),
                "step_number": step,
                "metrics": {
                    "step": step,
                    "train_loss": train.get("loss"),
                    "train_mean_token_accuracy": train.get("mean_token_accuracy"),
                    "valid_loss": valid.get("eval_loss"),
                    "valid_mean_token_accuracy": valid.get("eval_mean_token_accuracy"),
                },
            }
        )
        if len(found) > limit:
            break
    return found[:limit], len(found) > limit


def _checkpoint_step(value: str, experiment: Experiment) -> int:
    prefix = f"{CHECKPOINT_PREFIX}{experiment.id.hex[:12]}-"
    step = value.removeprefix(prefix)
    if not value.startswith(prefix) or not step.isdigit():
        raise InvalidRequest("after", f"not a checkpoint of this job: {value!r}", status_code=400)
    return int(step)


# ---------------------------------------------------------------- serving on first use


def deploy_on_first_use(
    *, session: Session, settings: Settings, storage: Storage, actor: Principal, name: str
) -> Deployment | None:
    """The deployment behind an `ft:` model name, made now if the run (or its checkpoint) has none yet:
    a succeeded run's adapter, or a stored checkpoint's. None when the name names nothing servable."""
    if not name.startswith(FT_PREFIX):
        return None
    run_name, step = split_checkpoint(name)
    experiment = session.exec(
        select(Experiment).where(Experiment.team_id == actor.team_id, Experiment.fine_tuned_model == run_name)
    ).first()
    if experiment is None:
        return None
    if step is None:
        if experiment.status is not ExperimentStatus.succeeded:
            return None
        try:
            base_model, adapter_prefix = servable(settings, storage, experiment, merged=False)
        except InvalidRequest:
            return None
    else:
        event = next(
            (e for e in _of_type(session, experiment.id, "checkpoint") if e.data.get("step") == step),
            None,
        )
        if event is None or not event.data.get("key"):
            return None
        adapter_prefix = event.data["key"]
        if not storage.exists(f"{adapter_prefix}/{ADAPTER_WEIGHTS}"):
            return None  # a full fine-tune's checkpoint: serve the finished run instead
        base_model = check_base_model(experiment.base_model, settings)
    try:
        deployment = add_deployment(
            session,
            actor,
            name=name,
            experiment_id=experiment.id,
            base_model=base_model,
            adapter_prefix=adapter_prefix,
            on_first_use=True,
        )
        session.commit()
    except IntegrityError:  # another request deployed it (or a retired deployment holds the name) meanwhile
        session.rollback()
        return session.exec(
            select(Deployment).where(
                Deployment.team_id == actor.team_id,
                Deployment.name == name,
                Deployment.status == DeploymentStatus.active,
            )
        ).first()
    session.refresh(deployment)
    return deployment
