"""Teams: invitations, roles, several teams per user, quotas, the audit log."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import func, select

from app.core.db import session_scope
from app.models import OutboxMessage, Role
from tests.accounts import Member, make_member, make_team


@pytest.fixture
def team() -> dict[Role, Member]:
    team_id = make_team()
    return {role: make_member(team_id, role) for role in Role}


def _dataset(client: TestClient, who: Member) -> str:
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(10)]
    r = client.post("/api/datasets/", json={"name": "d", "rows": rows}, headers=who.headers)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def _submit(client: TestClient, who: Member, dataset: str, model: Path) -> Any:
    return client.post(
        "/api/experiments/",
        headers=who.headers,
        json={"name": "e", "base_model": str(model), "dataset_id": dataset, "recipe": "tiny_lora_cpu"},
    )


def test_invitation_creates_an_account_that_can_log_in(anonymous: TestClient, team: dict[Role, Member]) -> None:
    admin = team[Role.admin]
    r = anonymous.post(
        f"/api/teams/{admin.team_id}/invitations",
        json={"email": "New@Example.com", "role": "viewer"},
        headers=admin.login_headers,
    )
    assert r.status_code == 201, r.text
    token = r.json()["token"]
    assert anonymous.post("/api/invitations/accept", json={"token": token}).json()["detail"] == (
        "password: required to create the invited account"
    )
    joined = anonymous.post("/api/invitations/accept", json={"token": token, "password": "a-good-password"})
    assert joined.status_code == 200 and joined.json()["role"] == "viewer"
    assert (
        anonymous.post("/api/invitations/accept", json={"token": token, "password": "a-good-password"}).status_code
        == 400
    )
    login = anonymous.post("/api/auth/login", data={"username": "new@example.com", "password": "a-good-password"})
    headers = {"Authorization": f"Bearer {login.json()['access_token']}"}
    members = anonymous.get(f"/api/teams/{admin.team_id}/members", headers=headers).json()["data"]
    assert "new@example.com" in [m["email"] for m in members]
    invitations = anonymous.get(f"/api/teams/{admin.team_id}/invitations", headers=admin.headers).json()["data"]
    assert invitations[0]["accepted_at"] and "token" not in invitations[0]


def test_a_user_in_two_teams_picks_one_with_x_team_id(anonymous: TestClient, team: dict[Role, Member]) -> None:
    other = make_member(make_team(), Role.admin)
    viewer = team[Role.viewer]
    body = {"email": viewer.email, "role": "trainer"}
    invite = anonymous.post(f"/api/teams/{other.team_id}/invitations", json=body, headers=other.login_headers)
    assert anonymous.post("/api/invitations/accept", json={"token": invite.json()["token"]}).status_code == 200
    login = anonymous.post(
        "/api/auth/login", data={"username": team[Role.viewer].email, "password": "correct horse battery"}
    )
    jwt_headers = {"Authorization": f"Bearer {login.json()['access_token']}"}
    teams = {t["id"]: t["role"] for t in anonymous.get("/api/teams/", headers=jwt_headers).json()["data"]}
    assert teams == {str(team[Role.viewer].team_id): "viewer", str(other.team_id): "trainer"}
    in_other = anonymous.post(
        "/api/datasets/",
        json={"name": "d", "rows": [{"text": "hello"}]},
        headers=jwt_headers | {"X-Team-Id": str(other.team_id)},
    )
    assert in_other.status_code == 201 and in_other.json()["team_id"] == str(other.team_id)
    in_first = anonymous.post(
        "/api/datasets/",
        json={"name": "d", "rows": [{"text": "hello"}]},
        headers=jwt_headers | {"X-Team-Id": str(team[Role.viewer].team_id)},
    )
    assert in_first.status_code == 403  # a viewer there
    stranger = anonymous.get("/api/datasets/", headers=jwt_headers | {"X-Team-Id": str(make_team())})
    assert stranger.status_code == 404


def test_viewer_reads_but_cannot_submit(anonymous: TestClient, team: dict[Role, Member], tiny_model: Path) -> None:
    dataset = _dataset(anonymous, team[Role.trainer])
    viewer = team[Role.viewer]
    assert anonymous.get(f"/api/datasets/{dataset}", headers=viewer.headers).status_code == 200
    r = _submit(anonymous, viewer, dataset, tiny_model)
    assert r.status_code == 403 and "needs the trainer role" in r.json()["detail"]
    assert (
        anonymous.post(
            "/api/datasets/", json={"name": "d", "rows": [{"text": "x"}]}, headers=viewer.headers
        ).status_code
        == 403
    )
    assert _submit(anonymous, team[Role.trainer], dataset, tiny_model).status_code == 201


def test_trainer_cannot_manage_members(anonymous: TestClient, team: dict[Role, Member]) -> None:
    trainer, viewer = team[Role.trainer], team[Role.viewer]
    base = f"/api/teams/{trainer.team_id}"
    assert (
        anonymous.patch(f"{base}/members/{viewer.user_id}", json={"role": "admin"}, headers=trainer.headers).status_code
        == 403
    )
    assert anonymous.delete(f"{base}/members/{viewer.user_id}", headers=trainer.headers).status_code == 403
    assert (
        anonymous.post(f"{base}/invitations", json={"email": "x@example.com"}, headers=trainer.headers).status_code
        == 403
    )
    assert anonymous.put(f"{base}/quota", json={"max_queued_jobs": 1}, headers=trainer.headers).status_code == 403
    assert anonymous.get(f"{base}/audit/", headers=trainer.headers).status_code == 403
    promoted = anonymous.patch(
        f"{base}/members/{viewer.user_id}", json={"role": "trainer"}, headers=team[Role.admin].headers
    )
    assert promoted.status_code == 200 and promoted.json()["role"] == "trainer"


def test_the_last_admin_cannot_leave(anonymous: TestClient, team: dict[Role, Member]) -> None:
    admin = team[Role.admin]
    r = anonymous.patch(
        f"/api/teams/{admin.team_id}/members/{admin.user_id}", json={"role": "viewer"}, headers=admin.headers
    )
    assert r.status_code == 409 and "last admin" in r.json()["detail"]
    assert (
        anonymous.delete(f"/api/teams/{admin.team_id}/members/{admin.user_id}", headers=admin.headers).status_code
        == 409
    )


def test_quota_answers_429_and_queues_nothing(
    anonymous: TestClient, team: dict[Role, Member], tiny_model: Path
) -> None:
    admin, trainer = team[Role.admin], team[Role.trainer]
    r = anonymous.put(f"/api/teams/{admin.team_id}/quota", json={"max_queued_jobs": 1}, headers=admin.headers)
    assert r.status_code == 200 and r.json()["max_queued_jobs"] == 1 and r.json()["max_active_jobs"] == 8
    dataset = _dataset(anonymous, trainer)
    first = _submit(anonymous, trainer, dataset, tiny_model)
    assert first.status_code == 201
    before = _outbox_count()
    second = _submit(anonymous, trainer, dataset, tiny_model)
    assert second.status_code == 429 and second.json()["field"] == "quota"
    assert "1 experiments queued; its quota is 1" in second.json()["detail"]
    assert _outbox_count() == before
    listed = anonymous.get("/api/experiments/", headers=trainer.headers).json()
    assert listed["count"] == 1

    # Stopping frees the slot; starting it again counts against the quota too.
    assert anonymous.post(f"/api/experiments/{first.json()['id']}/stop", headers=trainer.headers).status_code == 200
    third = _submit(anonymous, trainer, dataset, tiny_model)
    assert third.status_code == 201
    again = anonymous.post(f"/api/experiments/{first.json()['id']}/start", headers=trainer.headers)
    assert again.status_code == 429

    r = anonymous.put(f"/api/teams/{admin.team_id}/quota", json={"max_active_jobs": 1000}, headers=admin.headers)
    assert r.status_code == 403 and r.json()["field"] == "max_active_jobs"


def test_audit_log_records_who_did_what(anonymous: TestClient, team: dict[Role, Member], tiny_model: Path) -> None:
    trainer, admin = team[Role.trainer], team[Role.admin]
    dataset = _dataset(anonymous, trainer)
    experiment = _submit(anonymous, trainer, dataset, tiny_model).json()["id"]
    anonymous.post(f"/api/experiments/{experiment}/stop", headers=trainer.headers)
    assert anonymous.delete(f"/api/experiments/{experiment}", headers=trainer.headers).status_code == 204
    assert anonymous.delete(f"/api/datasets/{dataset}", headers=trainer.headers).status_code == 204
    events = anonymous.get(f"/api/teams/{admin.team_id}/audit/", headers=admin.headers).json()["data"]
    mine = [(e["action"], e["target_id"]) for e in reversed(events) if e["actor_user_id"] == str(trainer.user_id)]
    assert mine[-5:] == [
        ("dataset.create", dataset),
        ("experiment.create", experiment),
        ("experiment.stop", experiment),
        ("experiment.delete", experiment),
        ("dataset.delete", dataset),
    ]
    by_key = [e for e in events if e["actor_user_id"] == str(trainer.user_id) and e["action"] != "api_key.create"]
    assert all(e["actor_api_key_id"] for e in by_key)  # done with the trainer's API key, and it says so
    assert anonymous.get(f"/api/experiments/{experiment}", headers=trainer.headers).status_code == 404


def test_dataset_in_use_cannot_be_deleted(anonymous: TestClient, team: dict[Role, Member], tiny_model: Path) -> None:
    trainer = team[Role.trainer]
    dataset = _dataset(anonymous, trainer)
    experiment = _submit(anonymous, trainer, dataset, tiny_model).json()["id"]
    r = anonymous.delete(f"/api/datasets/{dataset}", headers=trainer.headers)
    assert r.status_code == 409 and "used by 1 experiment" in r.json()["detail"]
    assert anonymous.delete(f"/api/experiments/{experiment}", headers=trainer.headers).status_code == 409  # queued


def test_only_platform_admins_create_teams(anonymous: TestClient, team: dict[Role, Member]) -> None:
    r = anonymous.post("/api/teams/", json={"name": "mine"}, headers=team[Role.admin].headers)
    assert r.status_code == 403


def _outbox_count() -> int:
    with session_scope() as session:
        return session.exec(select(func.count()).select_from(OutboxMessage)).one()
