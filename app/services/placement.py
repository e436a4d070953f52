"""Where a base model is served: placement on inference workers, decided here (the API side), in one place.

Every inference worker consumes its own queue (`worker_queue(name)`, added when it starts) besides the
shared `inference` queue, and reports at each heartbeat how many base models it may hold
(`inference.max_base_models`), what it holds and its device. A request for base model M goes to the queue
of a live worker M is placed on, never to whichever worker is free: so a worker loads M at most once per
placement, and a second model never thrashes a worker that holds the first.

Placing M (the first request for it, or one that finds fewer live placements than the highest `replicas`
of M's active deployments): the live worker not holding M with the most free room (its placed models
below its `max_base_models`; fewest requests in flight first); when none has room, a worker whose placed
model has no active deployment left gives that model up. When no worker can take M, it keeps serving
where it is placed, and a model placed nowhere shares the least loaded worker over its capacity (it swaps
engines when idle: the one case that reloads, logged, and visible in /admin/fleet). Only with no live
worker at all is a request a 503. Placements on a
worker that stopped heartbeating are dropped at the next request, so its models are re-placed on the
others within the worker stale window (and the relay loop does the same every few seconds).

Placement changes are serialised by a lock (a Postgres advisory lock; a process lock on SQLite, where one
API process runs): two requests for an unplaced model place it once.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import threading
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import text
from sqlmodel import Session, col, delete, func, select

from app.core.db import is_postgres
from app.core.queues import worker_queue
from app.models import Deployment, DeploymentStatus, InferenceWorker, ModelPlacement, utcnow
from app.services.fleet import live_inference_workers

PLACEMENT_LOCK_ID = 0x5_7D10_9A  # pg_advisory_xact_lock key of placement changes
_sqlite_lock = threading.Lock()
_turn = itertools.count()  # spreads requests over a model's replicas
log = logging.getLogger(__name__)


class NoCapacity(Exception):
    """No live inference worker at all (with one, a model always gets a place: over capacity if need be)."""


@dataclass(frozen=True)
class Route:
    worker: str
    queue: str


def route(session: Session, base_model: str, stale_after_s: float) -> Route:
    """The worker (and its queue) that serves the next request for `base_model`, placing it if needed."""
    live = _live_workers(session, stale_after_s)
    placed = _placed_on(session, base_model, live)
    if not placed or len(placed) < _wanted_replicas(session, base_model):
        placed = _place(session, base_model, stale_after_s) or placed
    if not placed:
        raise NoCapacity("no inference worker is running; start one with `studio worker --queue inference`")
    # Least loaded first (requests in flight at the last heartbeat), turns breaking ties.
    ranked = sorted(placed, key=lambda w: (_in_flight(live[w]), (hash(w) + next(_turn)) % len(placed)))
    return Route(ranked[0], worker_queue(ranked[0]))


def _place(session: Session, base_model: str, stale_after_s: float) -> list[str]:
    """Under the placement lock: drop placements on dead workers, add one for `base_model` if it has fewer
    live placements than wanted and a worker can take it; returns its live placements."""
    with _placement_lock(session):
        live = _live_workers(session, stale_after_s)
        session.exec(delete(ModelPlacement).where(col(ModelPlacement.worker).not_in(list(live))))  # type: ignore[call-overload]
        placed = _placed_on(session, base_model, live)
        if len(placed) < max(1, _wanted_replicas(session, base_model)):
            worker = _choose_worker(session, base_model, live, exclude=set(placed))
            if worker is not None:
                session.add(ModelPlacement(base_model=base_model, worker=worker))
                placed.append(worker)
        session.commit()
    return placed


def _choose_worker(
    session: Session, base_model: str, live: dict[str, InferenceWorker], exclude: set[str]
) -> str | None:
    """A worker for one more placement of `base_model`: one with room, else one that evicts a model nobody
    deploys; a model placed nowhere yet goes over capacity on the least loaded worker rather than nowhere."""
    placed_nowhere = not exclude
    rows = session.exec(select(ModelPlacement).where(col(ModelPlacement.worker).in_(list(live)))).all()
    held: dict[str, list[str]] = {w: [] for w in live}
    for row in rows:
        held[row.worker].append(row.base_model)
    candidates = [w for w in live if w not in exclude]
    with_room = [w for w in candidates if len(held[w]) < _capacity(live[w])]
    if with_room:
        return min(with_room, key=lambda w: (len(held[w]) / _capacity(live[w]), _in_flight(live[w]), w))
    in_use = _models_in_use(session)
    by_load = sorted(candidates, key=lambda w: (_in_flight(live[w]), len(held[w]), w))
    for worker in by_load:
        idle = [m for m in held[worker] if m not in in_use and m != base_model]
        if idle:  # a model nobody deploys any more gives its place up
            session.exec(  # type: ignore[call-overload]
                delete(ModelPlacement).where(
                    col(ModelPlacement.worker) == worker, col(ModelPlacement.base_model) == idle[0]
                )
            )
            return worker
    if placed_nowhere and by_load:
        # Every worker is full of models in use: share the least loaded one rather than refuse. It swaps
        # engines when idle (a load per swap); the operator sees it in /admin/fleet and adds a worker.
        log.warning("no inference worker has room for %s: placing it over capacity on %s", base_model, by_load[0])
        return by_load[0]
    return None


def replace_lost(session: Session, stale_after_s: float) -> int:
    """Place, ahead of their next request, the models of workers that stopped heartbeating and the deployed
    models placed nowhere yet (a new deployment: its weights load before its first request). The API's
    relay loop calls this every few seconds. Returns how many placements were added."""
    live = _live_workers(session, stale_after_s)
    if not live:
        return 0
    stale = (
        select(ModelPlacement.base_model)
        .join(InferenceWorker, col(InferenceWorker.name) == col(ModelPlacement.worker), isouter=True)
        .where(
            (col(InferenceWorker.heartbeat_at).is_(None))
            | (col(InferenceWorker.heartbeat_at) <= utcnow() - timedelta(seconds=stale_after_s))
        )
    )
    on_live = select(ModelPlacement.base_model).where(col(ModelPlacement.worker).in_(list(live)))
    wanted = set(session.exec(stale).all()) | (_models_in_use(session) - set(session.exec(on_live).all()))
    added = 0
    for base_model in sorted(wanted):
        before = len(_placed_on(session, base_model, live))
        added += len(_place(session, base_model, stale_after_s)) > before
    return added


def placements(session: Session, base_model: str, stale_after_s: float) -> list[ModelPlacement]:
    live = _live_workers(session, stale_after_s)
    rows = session.exec(
        select(ModelPlacement)
        .where(ModelPlacement.base_model == base_model, col(ModelPlacement.worker).in_(list(live)))
        .order_by(col(ModelPlacement.worker))
    ).all()
    return list(rows)


def model_key(base_model: str) -> str:
    """A short, stable name of a base model for metrics labels and logs."""
    tail = base_model.rstrip("/").rsplit("/", 1)[-1][:40]
    return f"{tail}-{hashlib.sha256(base_model.encode()).hexdigest()[:8]}"


# ---------------------------------------------------------------- helpers


def _live_workers(session: Session, stale_after_s: float) -> dict[str, InferenceWorker]:
    return {w.name: w for w in live_inference_workers(session, stale_after_s)}


def _placed_on(session: Session, base_model: str, live: dict[str, InferenceWorker]) -> list[str]:
    rows = session.exec(select(ModelPlacement.worker).where(ModelPlacement.base_model == base_model)).all()
    return [w for w in rows if w in live]


def _wanted_replicas(session: Session, base_model: str) -> int:
    wanted = session.exec(
        select(func.max(Deployment.replicas)).where(
            Deployment.base_model == base_model, Deployment.status == DeploymentStatus.active
        )
    ).one()
    return int(wanted or 1)


def _models_in_use(session: Session) -> set[str]:
    active = select(Deployment.base_model).where(Deployment.status == DeploymentStatus.active).distinct()
    return set(session.exec(active).all())


def _capacity(worker: InferenceWorker) -> int:
    return max(1, int((worker.stats or {}).get("max_base_models", 1)))


def _in_flight(worker: InferenceWorker) -> int:
    return int((worker.stats or {}).get("requests_in_flight", 0))


class _placement_lock:  # noqa: N801 - used as a context manager, reads as a verb phrase
    def __init__(self, session: Session) -> None:
        self.session = session

    def __enter__(self) -> None:
        if is_postgres(self.session):
            self.session.exec(text("SELECT pg_advisory_xact_lock(:key)").bindparams(key=PLACEMENT_LOCK_ID))  # type: ignore[call-overload]
        else:
            _sqlite_lock.acquire()

    def __exit__(self, *exc: object) -> None:
        if not is_postgres(self.session):
            _sqlite_lock.release()
        if exc[0] is not None:
            self.session.rollback()
