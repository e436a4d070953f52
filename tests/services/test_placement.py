"""Placement of base models on inference workers (app/services/placement.py), against the database: a
model goes to a worker with room, stays where it is placed, is re-placed when its worker dies, respects
`max_base_models` and `replicas`, and evicts only a model no deployment uses."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlmodel import delete, select

from app.core.db import session_scope
from app.core.queues import worker_queue
from app.models import Deployment, DeploymentStatus, InferenceWorker, ModelPlacement, utcnow
from app.services import placement
from app.services.placement import NoCapacity
from tests.accounts import make_team

pytestmark = pytest.mark.usefixtures("db")
STALE_S = 10.0


@pytest.fixture
def fleet() -> Iterator[str]:
    """A clean worker registry (names unique to the test), torn down after."""
    tag = uuid.uuid4().hex[:6]
    yield tag
    with session_scope() as session:
        session.exec(delete(ModelPlacement))  # type: ignore[call-overload]
        session.exec(delete(InferenceWorker))  # type: ignore[call-overload]
        session.commit()


def worker(name: str, *, max_base_models: int = 1, in_flight: int = 0, age_s: float = 0.0) -> None:
    with session_scope() as session:
        row = session.get(InferenceWorker, name) or InferenceWorker(name=name, hostname="h", pid=1)
        row.heartbeat_at = utcnow() - timedelta(seconds=age_s)
        row.stats = {"max_base_models": max_base_models, "requests_in_flight": in_flight}
        session.add(row)
        session.commit()


def deploy(base_model: str, replicas: int = 1) -> uuid.UUID:
    team = make_team()
    with session_scope() as session:
        row = Deployment(team_id=team, name=f"d-{uuid.uuid4().hex[:8]}", base_model=base_model, replicas=replicas)
        session.add(row)
        session.commit()
        return row.id


def retire(deployment_id: uuid.UUID) -> None:
    with session_scope() as session:
        row = session.get(Deployment, deployment_id)
        assert row is not None
        row.status = DeploymentStatus.retired
        session.add(row)
        session.commit()


def route(model: str) -> str:
    with session_scope() as session:
        found = placement.route(session, model, STALE_S)
    assert found.queue == worker_queue(found.worker)
    return found.worker


def placed(model: str) -> list[str]:
    with session_scope() as session:
        return sorted(p.worker for p in session.exec(select(ModelPlacement).where(ModelPlacement.base_model == model)))


def test_two_models_go_to_two_workers_and_stay(fleet: str) -> None:
    a, b = f"m-a-{fleet}", f"m-b-{fleet}"
    worker(f"w1-{fleet}"), worker(f"w2-{fleet}")
    deploy(a), deploy(b)
    first = route(a)
    second = route(b)
    assert first != second  # each worker holds one model: no thrashing
    assert {route(a) for _ in range(10)} == {first} and {route(b) for _ in range(10)} == {second}
    assert placed(a) == [first] and placed(b) == [second]


def test_a_full_fleet_shares_the_least_loaded_worker_and_a_dead_worker_is_replaced(fleet: str) -> None:
    a, b, c = (f"m-{x}-{fleet}" for x in "abc")
    worker(f"w1-{fleet}"), worker(f"w2-{fleet}", in_flight=3)
    for model in (a, b, c):
        deploy(model)
    holder_a, holder_b = route(a), route(b)
    assert route(c) == f"w1-{fleet}"  # both full of deployed models: over capacity, on the less busy one
    worker(holder_a, age_s=STALE_S + 1)  # it stops heartbeating
    with session_scope() as session:
        assert placement.replace_lost(session, STALE_S) >= 2  # a and c (and other tests' models), unasked
    assert placed(a) == [holder_b] and placed(c) == [holder_b]  # the survivor serves them all
    worker(f"w3-{fleet}")
    assert route(b) == holder_b


def test_a_model_nobody_deploys_gives_its_place_up(fleet: str) -> None:
    a, b = f"m-a-{fleet}", f"m-b-{fleet}"
    worker(f"w1-{fleet}")
    old = deploy(a)
    deploy(b)
    assert route(a) == f"w1-{fleet}"
    retire(old)
    assert route(b) == f"w1-{fleet}"  # a had no deployment left: evicted
    assert placed(a) == [] and placed(b) == [f"w1-{fleet}"]


def test_replicas_and_room_for_several_models(fleet: str) -> None:
    a, b = f"m-a-{fleet}", f"m-b-{fleet}"
    worker(f"w1-{fleet}", max_base_models=2), worker(f"w2-{fleet}", max_base_models=2, in_flight=5)
    deploy(a, replicas=2)
    deploy(b)
    route(a)
    route(a)
    assert placed(a) == [f"w1-{fleet}", f"w2-{fleet}"]  # two replicas
    assert route(b) == f"w1-{fleet}"  # the emptier worker first
    assert route(a) == f"w1-{fleet}"  # of a's replicas, the one with fewer requests in flight


def test_no_worker_at_all(fleet: str) -> None:
    deploy(f"m-{fleet}")
    with pytest.raises(NoCapacity, match="no inference worker is running"):
        route(f"m-{fleet}")


def test_a_new_deployment_is_placed_before_its_first_request(fleet: str) -> None:
    worker(f"w1-{fleet}"), worker(f"w2-{fleet}")
    deploy(f"m-a-{fleet}")
    with session_scope() as session:
        placement.replace_lost(session, STALE_S)
    assert len(placed(f"m-a-{fleet}")) == 1  # placed before any request asked for it
    with session_scope() as session:
        placement.replace_lost(session, STALE_S)
    assert len(placed(f"m-a-{fleet}")) == 1  # once
