"""Experiment lifecycle on the API side: create (validate + queue), retry, stop, requeue stale runs.

Every state change writes the row, a status event and (when work must run) an outbox message in
one transaction. The Celery message carries only ``experiment_id`` and the attempt to claim.
"""

from __future__ import annotations

import fnmatch
import re
import uuid
from datetime import timedelta
from pathlib import Path

from pydantic import ValidationError
from sqlmodel import Session, col, delete, select

from app.core.config import Settings
from app.core.contracts.training import Hyperparameters, deepspeed_configs
from app.core.db import is_postgres
from app.core.event_log import status_event
from app.core.job_queue import count_loss, end_job, queue_next_attempt, send_attempt_message
from app.core.layout import experiment_prefix, read_dataset_rows
from app.core.storage import Storage
from app.datasets.formats import to_training_record
from app.datasets.templates import SAMPLE_ROWS, find_span_problem
from app.models import (
    Dataset,
    DatasetFormat,
    Deployment,
    DeploymentStatus,
    Experiment,
    ExperimentClone,
    ExperimentCreate,
    ExperimentEvaluation,
    ExperimentEvent,
    ExperimentStatus,
    ReportStatus,
    Team,
    utcnow,
)
from app.services import audit
from app.services.crud import get_owned, paginate
from app.services.dataset_reports import get_report
from app.services.errors import Conflict, InvalidRequest
from app.services.lineage import submit_lineage
from app.services.model_names import fine_tuned_model_name
from app.services.principal import Principal
from app.services.recipes import RecipeNotFound, resolve
from app.services.teams import check_quota

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[\w.-]{1,96})?$")


NOT_AN_ALLOWED_MODEL = (
    "not an allowed model: use a Hub id, a name under the models directory, "
    "or (development) a local model directory outside the studio's data"
)


def check_base_model(name: str, settings: Settings) -> str:
    """The base model to record: a local model directory (resolved) or a Hub id; else InvalidRequest.

    Allowed: a Hub id (one matching ``api.allowed_base_models`` when that is set); a model directory
    under a models directory (``api.models_dir``; in development also ``$STUDIO_DATA_DIR/models``, where
    the README builds the tiny model); and, in development only, a local model directory outside every
    directory the studio writes (other teams' storage, training runs and adapters live there). Every
    refusal is the same message, whether the path does not exist, holds no model or is fenced, so the
    answer never tells whether a path exists on the server."""
    try:
        local = _allowed_local_model(name, settings)
    except (OSError, ValueError, RuntimeError):  # a NUL byte, a symlink loop: no model either way
        raise InvalidRequest("base_model", NOT_AN_ALLOWED_MODEL) from None
    if local is not None:
        return local
    if name.startswith(("/", ".", "~")) or not HUB_ID.match(name) or (Path(name) / "config.json").is_file():
        # The last case: a Hub-id-shaped relative path to a model we did not allow. Loading it by name
        # would find that local directory first, so it is not passed on as a Hub id either.
        raise InvalidRequest("base_model", NOT_AN_ALLOWED_MODEL)
    allowlist = settings.api.allowed_base_models
    if allowlist and not any(fnmatch.fnmatchcase(name, pattern) for pattern in allowlist):
        raise InvalidRequest("base_model", NOT_AN_ALLOWED_MODEL)
    return name  # a Hub id: the worker resolves it (its local cache, or the Hub where reachable)


def _allowed_local_model(name: str, settings: Settings) -> str | None:
    """The allowed model directory ``name`` names, resolved; None when it names none. Symlinks are
    resolved before any check, so a link cannot lead into a fenced directory."""
    production = settings.environment == "production"
    models_dirs = [Path(settings.api.models_dir)] if settings.api.models_dir else []
    if not production:
        models_dirs.append(settings.data_dir / "models")
    models_dirs = [d.expanduser().resolve() for d in models_dirs]
    candidates = [(d / name).resolve() for d in models_dirs]  # a name (or path) under a models directory
    if not production:
        candidates.append(Path(name).expanduser().resolve())  # an explicit local path
    studio = _studio_dirs(settings)
    data_dir = settings.data_dir.expanduser().resolve()
    for path in candidates:
        if not (path / "config.json").is_file() or any(path.is_relative_to(d) for d in studio):
            continue
        if any(path.is_relative_to(d) for d in models_dirs):
            return str(path)
        if not production and not path.is_relative_to(data_dir):
            return str(path)
    return None


def _studio_dirs(settings: Settings) -> list[Path]:
    """Directories the studio writes, holding every team's data: never a base model, even by symlink.
    (The data dir as a whole is fenced above, except its models directory.)"""
    dirs = [Path(settings.training.work_dir), Path(settings.inference.cache_dir)]
    if settings.storage.backend == "local":
        dirs.append(Path(settings.storage.root))
    return [d.expanduser().resolve() for d in dirs]


CONVERSATIONAL = (DatasetFormat.messages, DatasetFormat.sharegpt, DatasetFormat.alpaca)


def _check_answers_locatable(storage: Storage, dataset: Dataset, base_model: str) -> None:
    """The loss sees the answers only; a chat template in which they cannot be located is refused here,
    before anything is queued, never trained on whole in silence. (Hub ids are checked by the trainer.)"""
    model_dir = Path(base_model)
    if not model_dir.is_dir():
        return
    rows = read_dataset_rows(storage, dataset.id, limit=SAMPLE_ROWS)
    conversations = [to_training_record(row, dataset.format)["messages"] for row in rows]
    if problem := find_span_problem(model_dir, conversations):
        raise InvalidRequest("base_model", f"its chat template cannot be used for answer-only loss: {problem}")


def resolve_hyperparameters(body: ExperimentCreate, settings: Settings) -> Hyperparameters:
    try:
        params = resolve(body.recipe, body.hyperparameters)
    except RecipeNotFound as exc:
        raise InvalidRequest("recipe", str(exc)) from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "hyperparameters"
        raise InvalidRequest(f"hyperparameters.{where}", first["msg"]) from None
    if params.deepspeed is not None and params.deepspeed not in deepspeed_configs():
        known = deepspeed_configs()
        raise InvalidRequest(
            "hyperparameters.deepspeed", f"unknown DeepSpeed config {params.deepspeed!r}; known: {known}"
        )
    caps = settings.training
    if params.max_steps > caps.max_steps_cap:
        raise InvalidRequest("hyperparameters.max_steps", f"must be <= {caps.max_steps_cap}")
    if params.max_seq_length > caps.max_seq_length_cap:
        raise InvalidRequest("hyperparameters.max_seq_length", f"must be <= {caps.max_seq_length_cap}")
    return params


def create_experiment(
    *,
    session: Session,
    settings: Settings,
    storage: Storage,
    actor: Principal,
    body: ExperimentCreate,
    parent: Experiment | None = None,
    fine_tuned_suffix: str | None = None,
) -> Experiment:
    """Validate and record a run (queued unless ``start`` is false). ``parent`` is the run it was cloned from;
    ``fine_tuned_suffix`` goes into the OpenAI model name it will answer to, in place of the team's name."""
    dataset = get_owned(session=session, model=Dataset, team_id=actor.team_id, id=body.dataset_id)
    if dataset is None:
        raise InvalidRequest("dataset_id", f"no dataset {body.dataset_id}", status_code=404)
    params = resolve_hyperparameters(body, settings)
    if dataset.format is DatasetFormat.preference and params.objective != "dpo":
        raise InvalidRequest("dataset_id", "a preference dataset trains with objective dpo (hyperparameters.objective)")
    if params.objective == "dpo" and dataset.format is not DatasetFormat.preference:
        raise InvalidRequest(
            "hyperparameters.objective", "dpo trains on a preference dataset (prompt, chosen, rejected)"
        )
    validation = _validation_dataset(session, actor, body.validation_dataset_id, dataset)
    _check_labels(body.labels)
    queue_name = body.queue or settings.training.default_queue
    queue = settings.train_queue(queue_name)
    if queue is None:
        names = [q.name for q in settings.training.queues]
        raise InvalidRequest("queue", f"unknown training queue {queue_name!r}; known: {names}")
    if params.method == "qlora" and not queue.cuda:
        raise InvalidRequest("hyperparameters.method", f"qlora needs a CUDA GPU, and queue {queue.name!r} has none")
    if params.deepspeed and not queue.cuda:
        raise InvalidRequest(
            "hyperparameters.deepspeed", f"DeepSpeed needs CUDA GPUs, and queue {queue.name!r} has none"
        )
    base_model = check_base_model(body.base_model, settings)
    if dataset.format in CONVERSATIONAL and not params.train_on_prompt:
        _check_answers_locatable(storage, dataset, base_model)
    if body.eval is not None and body.eval.judge_deployment is not None:
        judge = get_owned(session=session, model=Deployment, team_id=actor.team_id, id=body.eval.judge_deployment)
        if judge is None or judge.status is not DeploymentStatus.active:
            raise InvalidRequest("eval.judge_deployment", f"no active deployment {body.eval.judge_deployment}")
    warnings = _report_findings(session, storage, settings, dataset, base_model, params, queue.name)
    if body.start:
        check_quota(session=session, settings=settings, team_id=actor.team_id)
    experiment = Experiment(
        team_id=actor.team_id,
        name=body.name,
        base_model=base_model,
        dataset_id=dataset.id,
        recipe=body.recipe,
        hyperparameters=params.model_dump(),
        queue=queue.name,
        gpus=body.gpus,
        parent_experiment_id=parent.id if parent else None,
        lineage=submit_lineage(dataset, recipe=body.recipe, base_model=base_model, parent=parent),
        warnings=warnings,
        validation_dataset_id=validation.id if validation else None,
        labels=body.labels,
    )
    team = session.get(Team, actor.team_id)
    owner = team.name if team else "team"
    experiment.fine_tuned_model = fine_tuned_model_name(base_model, fine_tuned_suffix or owner, experiment.id)
    session.add(experiment)
    session.flush()
    if body.eval is not None:
        spec = body.eval.model_dump(mode="json")
        session.add(ExperimentEvaluation(experiment_id=experiment.id, team_id=actor.team_id, spec=spec))
    if body.start:
        queue_next_attempt(session, experiment)
    else:
        experiment.status = ExperimentStatus.created
        session.add(experiment)
        session.flush()
        status_event(session, experiment, reason="created without starting")
    audit.record(
        session=session,
        actor=actor,
        action="experiment.create",
        target_type="experiment",
        target_id=experiment.id,
        name=body.name,
        started=body.start,
    )
    session.commit()
    session.refresh(experiment)
    return experiment


MAX_LABEL_CHARS = 512


def _validation_dataset(
    session: Session, actor: Principal, dataset_id: uuid.UUID | None, training: Dataset
) -> Dataset | None:
    if dataset_id is None:
        return None
    validation = get_owned(session=session, model=Dataset, team_id=actor.team_id, id=dataset_id)
    if validation is None:
        raise InvalidRequest("validation_dataset_id", f"no dataset {dataset_id}", status_code=404)
    conversational = training.format in CONVERSATIONAL and validation.format in CONVERSATIONAL
    if validation.format is not training.format and not conversational:
        raise InvalidRequest(
            "validation_dataset_id",
            f"is {validation.format.value} rows, the training dataset {training.format.value} rows",
        )
    return validation


def _check_labels(labels: dict[str, str]) -> None:
    for key, value in labels.items():
        if not key or len(key) > 64:
            raise InvalidRequest("labels", "keys are 1 to 64 characters")
        if len(value) > MAX_LABEL_CHARS:
            raise InvalidRequest(f"labels.{key}", f"must be at most {MAX_LABEL_CHARS} characters")


def _report_findings(
    session: Session,
    storage: Storage,
    settings: Settings,
    dataset: Dataset,
    base_model: str,
    params: Hyperparameters,
    queue: str,
) -> list[str]:
    """The dataset report's checks for this run: its blocking problems refuse it (422 naming them), its
    warnings are returned to keep on the experiment. Only a local model can be read here; for a Hub id,
    or a large dataset whose report a worker is still computing, the run goes ahead with a warning."""
    model_dir = Path(base_model)
    if not (model_dir / "config.json").is_file():
        return []
    report = get_report(
        session=session,
        storage=storage,
        settings=settings,
        dataset=dataset,
        model_dir=model_dir,
        base_model=base_model,
        max_seq_length=params.max_seq_length,
        train_on_prompt=params.train_on_prompt,
        sample_rows=1,
        method=params.method,
        batch_size=params.batch_size,
        lora_r=params.lora_r,
        gradient_checkpointing=params.gradient_checkpointing,
        queue=queue,
    )
    if report.status is ReportStatus.pending:
        return ["the dataset report is still being computed; its checks were not applied to this run"]
    if report.status is ReportStatus.failed:
        return [f"the dataset report could not be computed ({report.error}); its checks were not applied"]
    if report.blocking:
        raise InvalidRequest("dataset_id", "the dataset report blocks this run: " + "; ".join(report.blocking))
    return report.warnings


def clone_experiment(
    *,
    session: Session,
    settings: Settings,
    storage: Storage,
    actor: Principal,
    source: Experiment,
    body: ExperimentClone,
) -> Experiment:
    """A new run with the source's resolved hyperparameters, dataset, base model and queue, each
    overridable; it records the source as its parent."""
    hyperparameters = {**source.hyperparameters, **body.hyperparameters}
    create = ExperimentCreate(
        name=body.name or f"{source.name} (clone)"[:200],
        base_model=body.base_model or source.base_model,
        dataset_id=body.dataset_id or source.dataset_id,
        recipe=source.recipe,
        hyperparameters=hyperparameters,
        queue=body.queue or source.queue,
        gpus=source.gpus,
        start=body.start,
        eval=None,
        validation_dataset_id=source.validation_dataset_id,
        labels=source.labels,
    )
    return create_experiment(
        session=session, settings=settings, storage=storage, actor=actor, body=create, parent=source
    )


STARTABLE = (ExperimentStatus.created, ExperimentStatus.paused, ExperimentStatus.failed, ExperimentStatus.cancelled)


def start_experiment(*, session: Session, settings: Settings, actor: Principal, experiment: Experiment) -> Experiment:
    """Run again after a pause, failure or cancel; resumes from the last stored checkpoint."""
    if experiment.status not in STARTABLE:
        raise Conflict(
            f"experiment is {experiment.status.value}; only created, paused, failed or cancelled experiments "
            "can be started"
        )
    check_quota(session=session, settings=settings, team_id=actor.team_id)
    experiment.error = None
    experiment.finished_at = None
    experiment.worker_losses = 0  # a fresh budget: the user decided to try again
    queue_next_attempt(session, experiment, reason="started again")
    audit.record(
        session=session,
        actor=actor,
        action="experiment.start",
        target_type="experiment",
        target_id=experiment.id,
        attempt=experiment.attempt + 1,
    )
    session.commit()
    session.refresh(experiment)
    return experiment


def stop_experiment(*, session: Session, actor: Principal, experiment: Experiment) -> Experiment:
    """A queued job is cancelled at once; a running one is flagged and its worker kills it."""
    # Lock and re-read first, so a worker finishing the job concurrently cannot be overwritten.
    session.refresh(experiment, with_for_update=is_postgres(session))
    if experiment.status.terminal:
        raise Conflict(f"experiment is already {experiment.status.value}")
    if experiment.status in (ExperimentStatus.created, ExperimentStatus.queued, ExperimentStatus.paused):
        end_job(session, experiment, ExperimentStatus.cancelled, reason="stopped while not running")
    elif not experiment.stop_requested:
        experiment.stop_requested = True
        session.add(experiment)
    audit.record(
        session=session, actor=actor, action="experiment.stop", target_type="experiment", target_id=experiment.id
    )
    session.commit()
    session.refresh(experiment)
    return experiment


def pause_experiment(*, session: Session, actor: Principal, experiment: Experiment) -> Experiment:
    """A queued job waits as paused at once; a running one checkpoints at the end of its step, frees its
    worker and waits as paused. /start resumes it from that checkpoint."""
    session.refresh(experiment, with_for_update=is_postgres(session))
    if experiment.status is ExperimentStatus.queued:
        experiment.status = ExperimentStatus.paused  # its queued message finds nothing to claim
        session.add(experiment)
        session.flush()
        status_event(session, experiment, reason="paused before it started")
    elif experiment.status is ExperimentStatus.running:
        if experiment.stop_requested:
            raise Conflict("experiment is stopping")
        experiment.pause_requested = True
        session.add(experiment)
    elif experiment.status is not ExperimentStatus.paused:
        raise Conflict(f"experiment is {experiment.status.value}; only queued or running experiments can be paused")
    audit.record(
        session=session, actor=actor, action="experiment.pause", target_type="experiment", target_id=experiment.id
    )
    session.commit()
    session.refresh(experiment)
    return experiment


def requeue_stale(
    *, session: Session, stale_after_s: float, max_attempts: int = 3, backoff_s: float = 10.0
) -> list[tuple[uuid.UUID, uuid.UUID]]:
    """Running jobs whose worker stopped heartbeating go back to the queue (resume from checkpoint),
    after a backoff that doubles per loss; after ``max_attempts`` losses the job fails instead, so a
    job that takes its worker down does not loop."""
    cutoff = utcnow() - timedelta(seconds=stale_after_s)
    query = select(Experiment).where(
        Experiment.status == ExperimentStatus.running, col(Experiment.heartbeat_at) < cutoff
    )
    if is_postgres(session):
        query = query.with_for_update(skip_locked=True)
    requeued = []
    for experiment in session.exec(query).all():
        if experiment.stop_requested:
            end_job(session, experiment, ExperimentStatus.cancelled, reason="worker lost while stopping")
        elif experiment.pause_requested:
            experiment.status = ExperimentStatus.paused
            experiment.worker = None
            session.add(experiment)
            session.flush()
            status_event(session, experiment, reason="worker lost while pausing; resumes from its last checkpoint")
        else:
            what = f"worker {experiment.worker or '?'} stopped heartbeating"
            count_loss(session, experiment, what=what, max_attempts=max_attempts, backoff_s=backoff_s)
        requeued.append((experiment.id, experiment.team_id))
    session.commit()
    return requeued


def resend_unclaimed(*, session: Session, resend_after_s: float) -> list[uuid.UUID]:
    """Send the wake-up again for jobs queued longer than ``resend_after_s`` (doubling per resend)
    without being claimed: a message lost by the broker recovers by itself; a duplicate of one that
    was not lost is harmless (the claim by attempt number ignores it)."""
    now = utcnow()
    query = select(Experiment).where(
        Experiment.status == ExperimentStatus.queued,
        col(Experiment.queued_at) < now - timedelta(seconds=resend_after_s),
    )
    if is_postgres(session):
        query = query.with_for_update(skip_locked=True)
    resent = []
    for experiment in session.exec(query).all():
        assert experiment.queued_at is not None
        waited = (now - experiment.queued_at).total_seconds()
        if waited < resend_after_s * 2**experiment.queue_resends:
            continue
        experiment.queue_resends += 1
        session.add(experiment)
        send_attempt_message(session, experiment)
        resent.append(experiment.id)
    session.commit()
    return resent


def delete_experiment(*, session: Session, storage: Storage, actor: Principal, experiment: Experiment) -> None:
    """Delete a finished experiment with its events, checkpoints and artifacts."""
    if experiment.status in (ExperimentStatus.queued, ExperimentStatus.running):
        raise Conflict(f"experiment is {experiment.status.value}; stop it before deleting")
    deployments = session.exec(select(Deployment).where(Deployment.experiment_id == experiment.id)).all()
    if any(d.status is DeploymentStatus.active for d in deployments):
        raise Conflict("the experiment is deployed; retire its deployments before deleting it")
    for deployment in deployments:  # retired ones keep their history, without the deleted run
        deployment.experiment_id = None
        session.add(deployment)
    session.exec(delete(ExperimentEvent).where(col(ExperimentEvent.experiment_id) == experiment.id))  # type: ignore[call-overload]
    session.exec(delete(ExperimentEvaluation).where(col(ExperimentEvaluation.experiment_id) == experiment.id))  # type: ignore[call-overload]
    session.delete(experiment)
    audit.record(
        session=session,
        actor=actor,
        action="experiment.delete",
        target_type="experiment",
        target_id=experiment.id,
        name=experiment.name,
    )
    session.commit()
    storage.delete_prefix(experiment_prefix(experiment.id))


def list_experiments(
    *, session: Session, team_id: uuid.UUID, status: ExperimentStatus | None, skip: int, limit: int
) -> tuple[list[Experiment], int]:
    query = select(Experiment).where(col(Experiment.team_id) == team_id)
    if status:
        query = query.where(col(Experiment.status) == status)
    return paginate(session=session, query=query.order_by(col(Experiment.created_at).desc()), skip=skip, limit=limit)
