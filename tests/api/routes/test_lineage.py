"""What a run records of where it came from, the dataset report's checks at submit, and clones."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

ROWS = [{"prompt": f"question {i} about topic {i}", "completion": f" answer {i} in a few words"} for i in range(12)]


def dataset(client: TestClient, rows: list[dict[str, Any]]) -> dict[str, Any]:
    r = client.post("/api/datasets/", json={"name": "lineage", "rows": rows, "eval_fraction": 0.0})
    assert r.status_code == 201, r.text
    return dict(r.json())


def submit(client: TestClient, dataset_id: str, model: Path, **hyper: Any) -> Any:
    body = {"name": "run", "base_model": str(model), "dataset_id": dataset_id, "start": False, "hyperparameters": hyper}
    return client.post("/api/experiments/", json=body)


def test_submit_keeps_the_reports_warnings_and_refuses_what_it_blocks(client: TestClient, tiny_model: Path) -> None:
    data = dataset(client, [*ROWS, dict(ROWS[0])])
    r = submit(client, data["id"], tiny_model, max_seq_length=512)
    assert r.status_code == 201, r.text
    assert any("1 exact" in w for w in r.json()["warnings"]), r.json()["warnings"]

    long_prompts = dataset(client, [{"prompt": "word " * 100, "completion": " yes"}] * 3)
    r = submit(client, long_prompts["id"], tiny_model, max_seq_length=16)
    assert r.status_code == 422 and r.json()["field"] == "dataset_id"
    assert "teach nothing" in r.json()["detail"]
    # Training on the prompts too, the rows do teach something.
    assert submit(client, long_prompts["id"], tiny_model, max_seq_length=16, train_on_prompt=True).status_code == 201


def test_a_clone_overrides_and_points_back(client: TestClient, tiny_model: Path) -> None:
    parent_data = dataset(client, ROWS)
    curated = client.post(f"/api/datasets/{parent_data['id']}/curate", json={"sample": 10}).json()
    source = submit(client, curated["id"], tiny_model, learning_rate=0.01, max_steps=7).json()
    lineage = source["id"]

    r = client.post(
        f"/api/experiments/{source['id']}/clone", json={"hyperparameters": {"max_steps": 3}, "start": False}
    )
    assert r.status_code == 201, r.text
    clone = r.json()
    assert clone["parent_experiment_id"] == source["id"] and clone["name"] == "run (clone)"
    assert clone["hyperparameters"]["max_steps"] == 3 and clone["hyperparameters"]["learning_rate"] == 0.01
    assert clone["status"] == "created"

    graph = client.get(f"/api/experiments/{clone['id']}/lineage").json()
    kinds = {n["id"]: n["kind"] for n in graph["nodes"]}
    edges = {(e["source"], e["relation"], e["target"]) for e in graph["edges"]}
    me, parent = f"experiment:{clone['id']}", f"experiment:{lineage}"
    assert (me, "cloned_from", parent) in edges
    assert (me, "trained_on", f"dataset:{curated['id']}") in edges
    assert (f"dataset:{curated['id']}", "derived_from", f"dataset:{parent_data['id']}") in edges
    assert (me, "fine_tunes", f"base_model:{tiny_model}") in edges and kinds[parent] == "experiment"
    recorded = next(n for n in graph["nodes"] if n["id"] == me)["data"]["lineage"]
    assert recorded["dataset"]["content_hash"] == curated["content_hash"]
    assert recorded["base_model"]["source"] == "local" and len(recorded["base_model"]["fingerprint"]) == 64
    assert recorded["parent_experiment_id"] == source["id"]


@pytest.mark.parametrize(
    ("body", "field"),
    [({"hyperparameters": {"learning_rate": -1}}, "learning_rate"), ({"queue": "train.nope"}, "queue")],
)
def test_a_bad_override_is_refused_naming_it(
    client: TestClient, tiny_model: Path, body: dict[str, Any], field: str
) -> None:
    source = submit(client, dataset(client, ROWS)["id"], tiny_model).json()
    r = client.post(f"/api/experiments/{source['id']}/clone", json=body)
    assert r.status_code == 422 and field in r.text, r.text
