"""Walk the app's route table: a member of team A, holding team B's ids, gets 404 or 403 from every
route, never B's data; and every route but the public ones needs credentials. Routes are read from
the app, so a new route is covered (or this test fails asking how to call it) automatically."""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import pytest
from fastapi.routing import APIRoute, iter_route_contexts
from fastapi.testclient import TestClient

from app.core.config import get_settings
from app.core.db import session_scope
from app.models import InvitationCreate, Role
from app.services import teams as team_service
from app.services.principal import Principal
from tests.accounts import Member, make_member, make_team

PUBLIC = {
    ("GET", "/health"),
    ("GET", "/ready"),
    ("POST", "/api/auth/login"),
    ("POST", "/api/invitations/accept"),
    ("GET", "/"),
}
# Routes without ids in the path that act only on the caller's own account or team (checked below
# to return nothing of team B's).
OWN_SCOPE_WRITES = {
    ("POST", "/api/datasets/"),
    ("POST", "/api/datasets/upload"),
    ("PATCH", "/api/users/me"),
    ("POST", "/api/teams/"),
    ("POST", "/v1/files"),
}


def _routes() -> list[tuple[str, str, APIRoute]]:
    """Every API route with its full path (FastAPI resolves included routers lazily)."""
    from app.main import app

    return [
        (method, rc.path, rc.route)
        for rc in iter_route_contexts(app.routes)
        if isinstance(rc.route, APIRoute)
        for method in sorted((rc.methods or set()) - {"HEAD", "OPTIONS"})
    ]


@pytest.fixture(scope="module")
def world(client: TestClient, tiny_model: Path) -> dict[str, Any]:
    """Team B with one of everything; team A's admin is the caller."""
    b_admin = make_member(make_team(), Role.admin)
    b = TestClient(client.app, headers=b_admin.headers)
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(10)]
    dataset = b.post("/api/datasets/", json={"name": "b-secret-data", "rows": rows}).json()["id"]
    body = {"name": "b-secret-exp", "base_model": str(tiny_model), "dataset_id": dataset, "recipe": "tiny_lora_cpu"}
    experiment = b.post("/api/experiments/", json=body).json()["id"]
    keys = b.get(f"/api/teams/{b_admin.team_id}/api-keys/").json()["data"]
    deployment = b.post("/api/deployments/", json={"base_model": str(tiny_model), "name": "b-secret-model"}).json()
    ab_test = b.post(
        "/api/ab-testing/",
        json={
            "name": "b-secret-ab",
            "deployment_a": deployment["id"],
            "deployment_b": b.post("/api/deployments/", json={"base_model": str(tiny_model)}).json()["id"],
            "prompts": ["hi"],
        },
    ).json()
    with session_scope() as session:
        invitation, _ = team_service.invite(
            session=session,
            settings=get_settings(),
            actor=Principal(b_admin.user_id, b_admin.team_id, Role.admin),
            body=InvitationCreate(email="b-guest@example.com"),
        )
    ids = {
        "team_id": str(b_admin.team_id),
        "dataset_id": dataset,
        "experiment_id": experiment,
        "user_id": str(b_admin.user_id),
        "key_id": keys[0]["id"],
        "invitation_id": str(invitation.id),
        "path": "README.md",
        "deployment_id": deployment["id"],
        "model_id": deployment["id"],
        "test_id": ab_test["id"],
        "file_id": "file-" + uuid.UUID(dataset).hex,  # the OpenAI shapes of the same dataset and experiment
        "job_id": "ftjob-" + uuid.UUID(experiment).hex,
    }
    secrets = ["b-secret-data", "b-secret-exp", "b-secret-model", "b-secret-ab", *ids.values()]
    return {"ids": ids, "secrets": secrets, "b_admin": b_admin}


def _fill(path: str, ids: dict[str, str]) -> str:
    def sub(match: re.Match[str]) -> str:
        name = match.group(1).split(":")[0]
        assert name in ids, f"new path parameter {{{name}}}: add team B's {name} to the `world` fixture"
        return ids[name]

    return re.sub(r"\{([^}]+)\}", sub, path)


def _body(method: str, path: str, ids: dict[str, str], model: Path) -> dict[str, Any] | None:
    """A valid body, so a 404/403 cannot hide behind a 422; ids in bodies are team B's."""
    bodies: dict[str, dict[str, Any]] = {
        "/api/deployments/": {"experiment_id": ids["experiment_id"]},
        "/api/ab-testing/": {
            "name": "x",
            "deployment_a": ids["deployment_id"],
            "deployment_b": ids["deployment_id"],
            "prompts": ["hi"],
        },
        "/v1/chat/completions": {"model": "b-secret-model", "messages": [{"role": "user", "content": "hi"}]},
        "/v1/completions": {"model": "b-secret-model", "prompt": "hi"},
        "/v1/fine_tuning/jobs": {"model": str(model), "training_file": ids["file_id"]},
        "/api/experiments/": {"name": "x", "base_model": str(model), "dataset_id": ids["dataset_id"]},
        "/api/teams/{team_id}/quota": {"max_queued_jobs": 1000},
        "/api/teams/{team_id}/members/{user_id}": {"role": "viewer"},
        "/api/teams/{team_id}/invitations": {"email": "a-spy@example.com", "role": "admin"},
        "/api/teams/{team_id}/api-keys/": {"name": "spy", "role": "viewer"},
        "/api/datasets/{dataset_id}/curate": {},
        "/api/experiments/{experiment_id}/clone": {},
        "/api/experiments/{experiment_id}/evaluation": {},
        "/api/ab-testing/{test_id}/votes": {
            "prompt": "p",
            "answer_a": "a",
            "answer_b": "b",
            "shown_first": "a",
            "choice": "a",
        },
    }
    return bodies.get(path) if method in ("POST", "PUT", "PATCH") else None


def _query(path: str, ids: dict[str, str]) -> dict[str, str]:
    """Ids a route takes in its query (team B's)."""
    return {"ids": ids["experiment_id"]} if path == "/api/experiments/compare" else {}


def test_every_route_refuses_team_b_ids(client: TestClient, world: dict[str, Any], tiny_model: Path) -> None:
    checked = 0
    for method, path, _ in _routes():
        if (method, path) in PUBLIC or (method, path) in OWN_SCOPE_WRITES:
            continue
        query = _query(path, world["ids"])
        has_ids = "{" in path or bool(query)
        url = _fill(path, world["ids"])
        r = client.request(method, url, params=query, json=_body(method, path, world["ids"], tiny_model))
        if has_ids or method != "GET":
            assert r.status_code in (403, 404), f"{method} {path} with team B's ids answered {r.status_code}: {r.text}"
        else:
            assert r.status_code in (200, 403), f"{method} {path}: {r.status_code} {r.text}"
            leaked = [s for s in world["secrets"] if s in r.text]
            assert not leaked, f"{method} {path} shows team B's {leaked}"
        checked += 1
    assert checked >= 25


def test_own_scope_writes_land_in_the_callers_team(
    client: TestClient, team_admin: Member, world: dict[str, Any]
) -> None:
    r = client.post(
        "/api/datasets/",
        json={"name": "mine", "rows": [{"text": "hi"}]},
        headers={"X-Team-Id": world["ids"]["team_id"]},
    )
    assert r.status_code == 404  # naming team B in the header is refused, not honoured
    r = client.post("/api/datasets/", json={"name": "mine", "rows": [{"text": "hi"}]})
    assert r.status_code == 201 and r.json()["team_id"] == str(team_admin.team_id)


def test_every_non_public_route_needs_credentials(anonymous: TestClient) -> None:
    names = (
        "team_id",
        "dataset_id",
        "experiment_id",
        "user_id",
        "key_id",
        "invitation_id",
        "deployment_id",
        "model_id",
        "test_id",
        "file_id",
        "job_id",
    )
    ids = {name: str(uuid.uuid4()) for name in names} | {"path": "x"}
    for method, path, _ in _routes():
        if (method, path) in PUBLIC:
            continue
        r = anonymous.request(method, _fill(path, ids))
        assert r.status_code == 401, f"{method} {path} answered {r.status_code} without credentials"


def test_public_routes_are_only_these(anonymous: TestClient) -> None:
    assert anonymous.get("/health").status_code == 200
    assert anonymous.get("/ready").status_code == 200
    assert {(m, p) for m, p, _ in _routes()} >= PUBLIC
