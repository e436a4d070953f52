"""Asking for an evaluation and comparing runs: what is refused, and how curves line up (in-process)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from app.core.db import session_scope
from app.models import ExperimentEvent, Role
from tests.accounts import make_member, make_team


def experiment(client: TestClient, tiny_model: Path, name: str = "e") -> dict[str, Any]:
    rows = [{"prompt": f"q{i}", "completion": f" a{i}"} for i in range(10)]
    dataset = client.post("/api/datasets/", json={"name": "d", "rows": rows}).json()
    body = {"name": name, "base_model": str(tiny_model), "dataset_id": dataset["id"], "start": False}
    r = client.post("/api/experiments/", json=body)
    assert r.status_code == 201, r.text
    return dict(r.json())


def test_an_evaluation_waits_for_the_run_and_is_checked(
    client: TestClient, anonymous: TestClient, tiny_model: Path
) -> None:
    run = experiment(client, tiny_model)
    url = f"/api/experiments/{run['id']}/evaluation"
    assert client.get(url).status_code == 404
    r = client.post(url, json={"metrics": ["rouge_l"], "max_items": 5})
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "waiting" and r.json()["spec"]["metrics"] == ["rouge_l"]
    assert client.get(url).json()["status"] == "waiting"

    assert client.post(url, json={"metrics": ["accuracy"]}).status_code == 422
    assert client.post(url, json={"max_items": 0}).status_code == 422
    foreign = make_member(make_team(), Role.admin)
    judge = TestClient(client.app, headers=foreign.headers).post(
        "/api/deployments/", json={"base_model": str(tiny_model)}
    )
    r = client.post(url, json={"judge_deployment": judge.json()["id"]})
    assert r.status_code == 404 and r.json()["field"] == "judge_deployment"
    assert anonymous.get(url, headers=foreign.headers).status_code == 404
    team = client.get("/api/users/me").json()["teams"][0]["id"]
    viewer = make_member(uuid.UUID(team), Role.viewer).headers
    assert anonymous.post(url, json={}, headers=viewer).status_code == 403
    assert anonymous.get(url, headers=viewer).status_code == 200


def test_compare_aligns_every_metric_on_the_union_of_steps(client: TestClient, tiny_model: Path) -> None:
    a, b = experiment(client, tiny_model, "a"), experiment(client, tiny_model, "b")
    with session_scope() as session:
        for run, points in ((a, [(1, 2.0), (3, 1.0)]), (b, [(2, 1.5), (3, 0.5)])):
            for seq, (step, loss) in enumerate(points, start=100):
                data = {"step": step, "loss": loss, "learning_rate": 0.1}
                session.add(ExperimentEvent(experiment_id=uuid.UUID(run["id"]), seq=seq, type="metrics", data=data))
        session.commit()
    r = client.get("/api/experiments/compare", params={"ids": [a["id"], b["id"]]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["steps"] == [1, 2, 3] and body["metrics"] == ["learning_rate", "loss"]
    assert body["curves"]["loss"] == {a["id"]: [2.0, None, 1.0], b["id"]: [None, 1.5, 0.5]}
    assert [run["name"] for run in body["runs"]] == ["a", "b"]

    assert client.get("/api/experiments/compare", params={"ids": [a["id"], str(uuid.uuid4())]}).status_code == 404
    assert client.get("/api/experiments/compare").status_code == 422
    assert client.get("/api/experiments/compare", params={"ids": [a["id"]] * 11}).status_code == 422


def test_an_evaluation_can_be_asked_for_at_submit(client: TestClient, tiny_model: Path) -> None:
    rows = [{"prompt": f"q{i}", "completion": f" a{i}"} for i in range(10)]
    data = client.post("/api/datasets/", json={"name": "d", "rows": rows}).json()
    body = {"name": "e", "base_model": str(tiny_model), "dataset_id": data["id"], "start": False}
    r = client.post("/api/experiments/", json={**body, "eval": {"metrics": ["exact_match"], "max_items": 3}})
    assert r.status_code == 201, r.text
    evaluation = client.get(f"/api/experiments/{r.json()['id']}/evaluation").json()
    assert evaluation["status"] == "waiting" and evaluation["spec"]["max_items"] == 3
    r = client.post("/api/experiments/", json={**body, "eval": {"judge_deployment": str(uuid.uuid4())}})
    assert r.status_code == 422 and r.json()["field"] == "eval.judge_deployment"
