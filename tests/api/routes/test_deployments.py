"""Deployments and the OpenAI endpoints' validation, in-process (no inference worker runs here)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.models import Role
from tests.accounts import Member, make_member, make_team


@pytest.fixture(scope="module")
def trainer() -> Member:
    return make_member(make_team(), Role.trainer)


def test_deploy_a_base_model_and_retire_it(anonymous: TestClient, trainer: Member, tiny_model: Path) -> None:
    h = trainer.headers
    r = anonymous.post("/api/deployments/", json={"base_model": str(tiny_model), "name": "base-1"}, headers=h)
    assert r.status_code == 201, r.text
    deployment = r.json()
    assert deployment["model"] == "base-1" and deployment["status"] == "active" and deployment["experiment_id"] is None
    assert (
        anonymous.post(
            "/api/deployments/", json={"base_model": str(tiny_model), "name": "base-1"}, headers=h
        ).status_code
        == 409
    )
    models = anonymous.get("/v1/models", headers=h).json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["base-1"]

    status = anonymous.get(f"/api/deployments/{deployment['id']}/status", headers=h).json()
    assert status["workers_alive"] == 0 and status["loaded_on"] == []

    assert anonymous.delete(f"/api/deployments/{deployment['id']}", headers=h).json()["status"] == "retired"
    assert anonymous.delete(f"/api/deployments/{deployment['id']}", headers=h).status_code == 409
    assert anonymous.get("/v1/models", headers=h).json()["data"] == []
    r = anonymous.post(
        "/v1/chat/completions", json={"model": "base-1", "messages": [{"role": "user", "content": "x"}]}, headers=h
    )
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({}, 422, "experiment_id"),
        ({"base_model": "/nope/model"}, 422, "base_model"),
        ({"experiment_id": "00000000-0000-0000-0000-00000000abcd"}, 404, "experiment_id"),
        ({"base_model": "x", "name": "bad name!"}, 422, "name"),
    ],
)
def test_bad_deployments_name_the_field(
    anonymous: TestClient, trainer: Member, body: dict[str, str], status: int, field: str
) -> None:
    r = anonymous.post("/api/deployments/", json=body, headers=trainer.headers)
    assert r.status_code == status, r.text
    detail = r.json()
    named = detail.get("field") or ".".join(str(p) for p in detail["detail"][0]["loc"][1:])
    assert named == field


def test_viewers_cannot_deploy(anonymous: TestClient, trainer: Member, tiny_model: Path) -> None:
    viewer = make_member(trainer.team_id, Role.viewer)
    r = anonymous.post("/api/deployments/", json={"base_model": str(tiny_model)}, headers=viewer.headers)
    assert r.status_code == 403


def test_openai_errors_have_openai_shape(anonymous: TestClient, trainer: Member, tiny_model: Path) -> None:
    h = trainer.headers
    anonymous.post("/api/deployments/", json={"base_model": str(tiny_model), "name": "base-2"}, headers=h)
    cases = [
        ({"model": "base-2", "messages": []}, 400, "messages"),
        ({"model": "base-2", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "base-2", "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**6}, 400, "max_tokens"),
        ({"model": "base-2", "messages": [{"role": "user", "content": "x"}], "temperature": 5}, 400, "temperature"),
        ({"model": "base-2", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ]
    for body, status, param in cases:
        r = anonymous.post("/v1/chat/completions", json=body, headers=h)
        assert r.status_code == status, (body, r.text)
        error = r.json()["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
    r = anonymous.post(
        "/v1/chat/completions",
        json={"model": "base-2", "messages": [{"role": "user", "content": "x"}]},
        headers={"Authorization": "Bearer fts_wrong"},
    )
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_no_inference_worker_is_503_at_once(anonymous: TestClient, trainer: Member, tiny_model: Path) -> None:
    h = trainer.headers
    anonymous.post("/api/deployments/", json={"base_model": str(tiny_model), "name": "base-3"}, headers=h)
    r = anonymous.post("/v1/completions", json={"model": "base-3", "prompt": "hi"}, headers=h)
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_worker"
