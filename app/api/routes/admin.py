"""Platform admin views of the inference fleet: per-worker stats, and unloading a model everywhere."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool

from app.api.deps import SessionDep, SettingsDep, Superuser
from app.api.limits import reject_unstorable_text
from app.api.responses import API_ERRORS
from app.core.queues import INFERENCE_QUEUE
from app.models import Deployment, InferenceCommand
from app.services import fleet
from app.services.deployments import unload_target
from app.services.inference import live_workers

router = APIRouter(
    prefix="/admin", tags=["admin"], responses=API_ERRORS, dependencies=[Depends(reject_unstorable_text)]
)


@router.get("/stats")
async def stats(settings: SettingsDep, _: Superuser) -> dict[str, Any]:
    """Per live inference worker: loaded models and adapters, batch sizes seen, requests in flight,
    tokens/s; and the depth of the inference queue."""
    workers = await run_in_threadpool(live_workers, stale_after_s=settings.inference.worker_stale_after_s)
    return {
        "queue": INFERENCE_QUEUE,
        "queue_depth": await run_in_threadpool(_queue_depth, settings.broker.url),
        "workers": [
            {
                "name": w.name,
                "hostname": w.hostname,
                "pid": w.pid,
                "started_at": w.started_at,
                "heartbeat_at": w.heartbeat_at,
                **w.stats,
            }
            for w in workers
        ],
    }


@router.get("/fleet")
def fleet_view(session: SessionDep, settings: SettingsDep, _: Superuser) -> dict[str, Any]:
    """Every live training and inference worker: name, host, queue or GPU class, GPUs or device, its job or
    its models, adapters and placements, heartbeat age and state."""
    return fleet.fleet_view(session, settings)


@router.post("/unload/{model_id:path}", status_code=202)
def unload(session: SessionDep, _: Superuser, model_id: str) -> dict[str, Any]:
    """Unload a model from every inference worker: a deployment id (its adapter, or its base model),
    or a base model path. Workers apply it on their next heartbeat; the next request loads it again."""
    target = model_id
    try:
        deployment = session.get(Deployment, uuid.UUID(model_id))
    except ValueError:
        deployment = None
    if deployment is not None:
        target = unload_target(deployment)
    command = InferenceCommand(action="unload", target=target)
    session.add(command)
    session.commit()
    return {"command_id": command.id, "target": target}


def _queue_depth(broker_url: str) -> int | None:
    """Messages waiting in the inference queue (Redis brokers; None where the broker cannot say cheaply)."""
    if not broker_url.startswith(("redis://", "rediss://")):
        return None
    import redis

    client = redis.Redis.from_url(broker_url, socket_timeout=2)
    try:
        return int(client.llen(INFERENCE_QUEUE))  # type: ignore[arg-type]
    except redis.RedisError:
        return None
    finally:
        client.close()
