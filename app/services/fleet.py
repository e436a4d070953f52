"""The fleet as the API sees it: live training and inference workers, why a queued job waits, and what the
`/admin/fleet` view and the `/metrics` scrape read."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlmodel import Session, col, func, select

from app.core.config import Settings
from app.core.queues import DEFAULT_QUEUE, INFERENCE_QUEUE, worker_queue
from app.models import (
    Experiment,
    ExperimentPublic,
    ExperimentStatus,
    InferenceWorker,
    ModelPlacement,
    TrainingWorker,
    utcnow,
)


def live_training_workers(session: Session, stale_after_s: float) -> list[TrainingWorker]:
    fresh = col(TrainingWorker.heartbeat_at) > utcnow() - timedelta(seconds=stale_after_s)
    return list(session.exec(select(TrainingWorker).where(fresh).order_by(col(TrainingWorker.name))).all())


def live_inference_workers(session: Session, stale_after_s: float) -> list[InferenceWorker]:
    fresh = col(InferenceWorker.heartbeat_at) > utcnow() - timedelta(seconds=stale_after_s)
    return list(session.exec(select(InferenceWorker).where(fresh).order_by(col(InferenceWorker.name))).all())


def waiting_reason(experiment: Experiment, workers: list[TrainingWorker]) -> str | None:
    """Why a queued run cannot start now, when no live worker could take it; None while it only waits its turn."""
    if experiment.status is not ExperimentStatus.queued:
        return None
    on_queue = [w for w in workers if experiment.queue in (w.queues or [])]
    if not on_queue:
        return (
            f"no live worker consumes {experiment.queue}; start one with "
            f"`studio worker --queue {experiment.queue} --gpus <ids>`"
        )
    largest = max(w.slots for w in on_queue)
    if experiment.gpus > largest:
        return f"asks for {experiment.gpus} GPUs; the largest live worker on {experiment.queue} has {largest}"
    return None


def public(session: Session, settings: Settings, experiments: list[Experiment]) -> list[ExperimentPublic]:
    """Experiments as the API shows them, each queued one with its waiting reason."""
    queued = any(e.status is ExperimentStatus.queued for e in experiments)
    workers = live_training_workers(session, settings.training.stale_after_s) if queued else []
    return [
        ExperimentPublic.model_validate(e, update={"waiting_reason": waiting_reason(e, workers)}) for e in experiments
    ]


def fleet_view(session: Session, settings: Settings) -> dict[str, Any]:
    """Every live worker: name, host, queue or class, GPUs, its job or its models, heartbeat age, state."""
    now = utcnow()
    running = {
        e.worker: e
        for e in session.exec(select(Experiment).where(Experiment.status == ExperimentStatus.running)).all()
        if e.worker
    }
    training = []
    for t in live_training_workers(session, settings.training.stale_after_s):
        job = running.get(t.name)
        training.append(
            {
                "name": t.name,
                "hostname": t.hostname,
                "queues": t.queues,
                "gpu_ids": t.gpu_ids,
                "slots": t.slots,
                "job": {"experiment_id": str(job.id), "gpus": job.gpus, "started_at": job.started_at} if job else None,
                "heartbeat_age_s": round((now - t.heartbeat_at).total_seconds(), 1),
                "state": "busy" if job else "idle",
            }
        )
    placements: dict[str, list[dict[str, Any]]] = {}
    for p in session.exec(select(ModelPlacement)).all():
        placements.setdefault(p.worker, []).append({"base_model": p.base_model, "state": p.state})
    inference = []
    for w in live_inference_workers(session, settings.inference.worker_stale_after_s):
        stats = w.stats or {}
        models = stats.get("models", {})
        inference.append(
            {
                "name": w.name,
                "hostname": w.hostname,
                "queue": worker_queue(w.name),
                "device": stats.get("device"),
                "max_base_models": stats.get("max_base_models"),
                "models": sorted(models),
                "adapters": sorted({a for m in models.values() for a in m.get("loaded_adapters", [])}),
                "placed": placements.get(w.name, []),
                "requests_in_flight": stats.get("requests_in_flight", 0),
                "heartbeat_age_s": round((now - w.heartbeat_at).total_seconds(), 1),
                "state": _inference_state(stats),
            }
        )
    return {"training": training, "inference": inference}


def _inference_state(stats: dict[str, Any]) -> str:
    if stats.get("requests_in_flight"):
        return "serving"
    return "loading" if stats.get("loading") else "idle"


def fleet_gauges(session: Session, settings: Settings) -> dict[str, list[tuple[dict[str, str], float]]]:
    """The scrape-time values of `app.core.metrics.FLEET_GAUGES`: counts only, no team's names."""
    by_status = dict(session.exec(select(Experiment.status, func.count()).group_by(Experiment.status)).all())
    running = dict(
        session.exec(
            select(Experiment.queue, func.count())
            .where(Experiment.status == ExperimentStatus.running)
            .group_by(Experiment.queue)
        ).all()
    )
    training = live_training_workers(session, settings.training.stale_after_s)
    inference = live_inference_workers(session, settings.inference.worker_stale_after_s)
    states = dict(session.exec(select(ModelPlacement.state, func.count()).group_by(ModelPlacement.state)).all())
    queues = [q.name for q in settings.training.queues] + [INFERENCE_QUEUE, DEFAULT_QUEUE]
    queues += [worker_queue(w.name) for w in inference]
    depths = queue_depths(settings.broker.url, queues)
    return {
        "studio_experiments": [({"status": s.value}, float(by_status.get(s, 0))) for s in ExperimentStatus],
        "studio_running_jobs": [({"queue": q.name}, float(running.get(q.name, 0))) for q in settings.training.queues],
        "studio_live_workers": [
            ({"kind": "training"}, float(len(training))),
            ({"kind": "inference"}, float(len(inference))),
        ],
        "studio_queue_depth": [({"queue": q}, float(d)) for q, d in depths.items()],
        "studio_model_placements": [({"state": s}, float(n)) for s, n in states.items()],
    }


def queue_depths(broker_url: str, queues: list[str]) -> dict[str, int]:
    """Messages waiting per queue (Redis brokers keep a queue as a list; other brokers report nothing)."""
    if not broker_url.startswith(("redis://", "rediss://")):
        return {}
    import redis

    client = redis.Redis.from_url(broker_url, socket_timeout=2)
    try:
        with client.pipeline() as pipe:
            for queue in queues:
                pipe.llen(queue)
            return {q: int(n) for q, n in zip(queues, pipe.execute(), strict=True)}
    finally:
        client.close()
