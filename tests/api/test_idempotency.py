"""Idempotency-Key on every creating POST (app/api/idempotency.py), against the real Postgres.

For each creating route: the same key twice makes one resource and replays the first body byte for byte
(with Idempotent-Replayed: true); the same key with another body is a 422 naming the header; no header
makes two; an expired key makes a new one. Counts come from the list endpoints (or the database for
teams). Twenty concurrent identical POSTs through a real uvicorn make one experiment.
"""

from __future__ import annotations

import json
import secrets
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from sqlmodel import col, func, select

from app.core.config import get_settings
from app.core.db import session_scope
from app.core.security import create_access_token
from app.models import IdempotencyKey, Role, Team, utcnow
from app.services import accounts
from app.services import experiments as experiment_service
from tests.accounts import PASSWORD, Member, make_member, make_team

KEY = "Idempotency-Key"
REPLAYED = "Idempotent-Replayed"
ROUTES = ["experiment", "dataset", "upload", "deployment", "api_key", "ab_test", "team", "invitation"]


@pytest.fixture(scope="module")
def admin() -> Member:
    """A team of this module's own, so counts and quotas are not shared with other modules."""
    return make_member(make_team(), Role.admin)


@pytest.fixture(scope="module")
def api(admin: Member) -> Iterator[TestClient]:
    from app.main import app

    with TestClient(app, headers=admin.headers) as c:
        yield c


@pytest.fixture(scope="module")
def dataset_id(api: TestClient) -> str:
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(10)]
    r = api.post("/api/datasets/", json={"name": "idem-data", "rows": rows})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


@pytest.fixture(scope="module")
def deployments(api: TestClient, tiny_model: Path) -> tuple[str, str]:
    ids = [api.post("/api/deployments/", json={"base_model": str(tiny_model)}).json()["id"] for _ in range(2)]
    return ids[0], ids[1]


@pytest.fixture(scope="module")
def superuser_headers() -> dict[str, str]:
    with session_scope() as session:
        email = f"root-{secrets.token_hex(4)}@example.com"
        user = accounts.create_user(session=session, email=email, password=PASSWORD, is_superuser=True)
        session.commit()
        user_id = user.id
    token, _ = create_access_token(get_settings(), user_id)
    return {"Authorization": f"Bearer {token}"}


def experiment_body(dataset_id: str, model: Path, name: str) -> dict[str, Any]:
    return {"name": name, "base_model": str(model), "dataset_id": dataset_id, "recipe": "tiny_lora_cpu", "start": False}


def listed(api: TestClient, path: str, headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    r = api.get(path, params={"limit": 500}, headers=headers)  # routes without paging ignore the limit
    assert r.status_code == 200, r.text
    return list(r.json()["data"])


@dataclass(frozen=True)
class Case:
    """One creating route: ``send(key, variant)`` posts body ``variant`` ("a" or "b", which differ);
    ``count()`` is how many of this test's resources exist."""

    path: str
    send: Callable[[str | None, str], httpx.Response]
    count: Callable[[], int]
    unique: bool = False  # identical bodies conflict (team names): a second plain POST is a 409


@pytest.fixture(params=ROUTES)
def case(
    request: pytest.FixtureRequest,
    api: TestClient,
    admin: Member,
    tiny_model: Path,
    dataset_id: str,
    deployments: tuple[str, str],
    superuser_headers: dict[str, str],
) -> Case:
    tag = secrets.token_hex(4)  # names this test's resources, so counts see only them

    def headers(key: str | None, base: dict[str, str] | None = None) -> dict[str, str]:
        return {**(base or {}), **({KEY: key} if key is not None else {})}

    def named(path: str, field: str = "name", hdrs: dict[str, str] | None = None) -> Callable[[], int]:
        return lambda: sum(1 for row in listed(api, path, hdrs) if str(row[field]).startswith(tag))

    team_path = f"/api/teams/{admin.team_id}"
    match request.param:
        case "experiment":
            return Case(
                "/api/experiments/",
                lambda k, v: api.post(
                    "/api/experiments/", json=experiment_body(dataset_id, tiny_model, tag + v), headers=headers(k)
                ),
                named("/api/experiments/"),
            )
        case "dataset":
            return Case(
                "/api/datasets/",
                lambda k, v: api.post(
                    "/api/datasets/", json={"name": tag, "rows": [{"text": f"row {v}"}]}, headers=headers(k)
                ),
                named("/api/datasets/"),
            )
        case "upload":
            return Case(
                "/api/datasets/upload",
                lambda k, v: api.post(
                    "/api/datasets/upload",
                    files={"file": ("rows.jsonl", f'{{"text": "uploaded {v}"}}\n'.encode())},
                    data={"name": tag},
                    headers=headers(k),
                ),
                named("/api/datasets/"),
            )
        case "deployment":
            # No name: the service picks a fresh one, so two plain POSTs make two deployments.
            return Case(
                "/api/deployments/",
                lambda k, v: api.post(
                    "/api/deployments/",
                    json={"base_model": str(tiny_model), **({"name": f"{tag}-b"} if v == "b" else {})},
                    headers=headers(k),
                ),
                lambda: len(listed(api, "/api/deployments/")),
            )
        case "api_key":
            return Case(
                f"{team_path}/api-keys/",
                lambda k, v: api.post(
                    f"{team_path}/api-keys/",
                    json={"name": tag + v, "role": "viewer"},
                    headers=headers(k, admin.login_headers),
                ),
                named(f"{team_path}/api-keys/"),
            )
        case "ab_test":
            a, b = deployments
            return Case(
                "/api/ab-testing/",
                lambda k, v: api.post(
                    "/api/ab-testing/",
                    json={"name": tag + v, "deployment_a": a, "deployment_b": b, "prompts": ["hi"]},
                    headers=headers(k),
                ),
                named("/api/ab-testing/"),
            )
        case "team":
            return Case(
                "/api/teams/",
                lambda k, v: api.post("/api/teams/", json={"name": tag + v}, headers=headers(k, superuser_headers)),
                lambda: _teams_named(tag),
                unique=True,
            )
        case "invitation":
            return Case(
                f"{team_path}/invitations",
                lambda k, v: api.post(
                    f"{team_path}/invitations",
                    json={"email": f"{tag}{v}@example.com", "role": "viewer"},
                    headers=headers(k, admin.login_headers),
                ),
                named(f"{team_path}/invitations", "email", admin.login_headers),
            )
    raise AssertionError(request.param)


def _teams_named(prefix: str) -> int:
    with session_scope() as session:
        return session.exec(select(func.count()).select_from(Team).where(col(Team.name).startswith(prefix))).one()


def new_key() -> str:
    return str(uuid.uuid4())


def test_same_key_twice_makes_one_and_replays_the_first_answer(case: Case) -> None:
    before, key = case.count(), new_key()
    first = case.send(key, "a")
    assert first.status_code == 201, first.text
    assert REPLAYED not in first.headers
    again = case.send(key, "a")
    assert again.status_code == 201, again.text
    assert again.headers[REPLAYED] == "true"
    assert again.content == first.content  # the same id, the same once-shown secret for keys and invitations
    assert case.count() == before + 1


def test_same_key_with_another_body_is_a_422_naming_the_header(case: Case) -> None:
    before, key = case.count(), new_key()
    assert case.send(key, "a").status_code == 201
    other = case.send(key, "b")
    assert other.status_code == 422, other.text
    assert KEY in other.text
    assert case.count() == before + 1


def test_without_the_header_each_post_creates(case: Case) -> None:
    before = case.count()
    first, second = case.send(None, "a"), case.send(None, "a")
    assert first.status_code == 201, first.text
    assert REPLAYED not in second.headers
    if case.unique:  # the route ran again and refused the duplicate name, as it does without the feature
        assert second.status_code == 409, second.text
        assert case.count() == before + 1
    else:
        assert second.status_code == 201, second.text
        assert second.json()["id"] != first.json()["id"]
        assert case.count() == before + 2


def test_an_expired_key_creates_anew(case: Case, admin: Member) -> None:
    before, key = case.count(), new_key()
    first = case.send(key, "a")
    assert first.status_code == 201, first.text
    ttl = get_settings().api.idempotency_ttl_s
    with session_scope() as session:  # age this test's row past the TTL
        row = session.exec(
            select(IdempotencyKey).where(IdempotencyKey.path == case.path).order_by(col(IdempotencyKey.id).desc())
        ).first()
        assert row is not None and row.status_code == 201
        row.created_at = utcnow() - timedelta(seconds=ttl + 1)
        session.add(row)
        session.commit()
    again = case.send(key, "a")
    assert REPLAYED not in again.headers
    if case.unique:
        assert again.status_code == 409, again.text  # the route ran again (the name is taken now)
        assert case.count() == before + 1
    else:
        assert again.status_code == 201, again.text
        assert again.json()["id"] != first.json()["id"]
        assert case.count() == before + 2


# ---------------------------------------------------------------- details, on experiments


def _experiments_named(api: TestClient, name: str) -> int:
    return sum(1 for e in listed(api, "/api/experiments/") if e["name"] == name)


def test_the_body_is_compared_canonically(api: TestClient, dataset_id: str, tiny_model: Path) -> None:
    name, key = f"canon-{secrets.token_hex(3)}", new_key()
    body = experiment_body(dataset_id, tiny_model, name)
    first = api.post("/api/experiments/", json=body, headers={KEY: key})
    reordered = json.dumps(dict(reversed(list(body.items()))), indent=2)  # other key order, other whitespace
    again = api.post("/api/experiments/", content=reordered, headers={KEY: key, "Content-Type": "application/json"})
    assert first.status_code == 201 and again.status_code == 201, again.text
    assert again.headers[REPLAYED] == "true" and again.json() == first.json()
    assert _experiments_named(api, name) == 1


def test_a_4xx_is_stored_and_replayed(api: TestClient, tiny_model: Path) -> None:
    key, body = new_key(), experiment_body(str(uuid.uuid4()), tiny_model, "missing-dataset")
    first = api.post("/api/experiments/", json=body, headers={KEY: key})
    assert first.status_code == 404, first.text
    again = api.post("/api/experiments/", json=body, headers={KEY: key})
    assert again.status_code == 404 and again.headers[REPLAYED] == "true" and again.content == first.content


def test_a_5xx_releases_the_key_so_a_retry_runs(
    api: TestClient, admin: Member, dataset_id: str, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name, key = f"retry-{secrets.token_hex(3)}", new_key()
    body = experiment_body(dataset_id, tiny_model, name)

    def broken(**_: Any) -> None:
        raise RuntimeError("database went away")

    with monkeypatch.context() as patch:
        patch.setattr(experiment_service, "create_experiment", broken)
        failing = TestClient(api.app, headers=admin.headers, raise_server_exceptions=False)
        assert failing.post("/api/experiments/", json=body, headers={KEY: key}).status_code == 500
    retry = api.post("/api/experiments/", json=body, headers={KEY: key})
    assert retry.status_code == 201, retry.text
    assert REPLAYED not in retry.headers
    assert _experiments_named(api, name) == 1


def test_a_malformed_key_is_a_422_naming_the_header(api: TestClient, dataset_id: str, tiny_model: Path) -> None:
    name = f"badkey-{secrets.token_hex(3)}"
    for bad in ("x" * 256, ""):
        r = api.post("/api/experiments/", json=experiment_body(dataset_id, tiny_model, name), headers={KEY: bad})
        assert r.status_code == 422 and KEY in r.text, r.text
    assert _experiments_named(api, name) == 0


def test_keys_are_scoped_to_user_and_team(api: TestClient, admin: Member, dataset_id: str, tiny_model: Path) -> None:
    """The same user through a login token shares its API key's scope; another member does not."""
    name, key = f"scope-{secrets.token_hex(3)}", new_key()
    body = experiment_body(dataset_id, tiny_model, name)
    first = api.post("/api/experiments/", json=body, headers={KEY: key})
    assert first.status_code == 201, first.text
    same_user = api.post("/api/experiments/", json=body, headers={**admin.login_headers, KEY: key})
    assert same_user.headers.get(REPLAYED) == "true" and same_user.content == first.content
    colleague = make_member(admin.team_id, Role.trainer)
    other = api.post("/api/experiments/", json=body, headers={**colleague.headers, KEY: key})
    assert other.status_code == 201 and REPLAYED not in other.headers
    assert other.json()["id"] != first.json()["id"]
    assert _experiments_named(api, name) == 2


@pytest.mark.faults
def test_twenty_concurrent_duplicates_make_one_experiment(
    api: TestClient, admin: Member, dataset_id: str, tiny_model: Path
) -> None:
    name, key = f"burst-{secrets.token_hex(3)}", new_key()
    body = experiment_body(dataset_id, tiny_model, name)
    server = uvicorn.Server(uvicorn.Config(api.app, host="127.0.0.1", port=0, lifespan="off", log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(500):
            if server.started:
                break
            threading.Event().wait(0.01)
        assert server.started
        port = server.servers[0].sockets[0].getsockname()[1]
        barrier = threading.Barrier(20)
        answers: list[httpx.Response] = []

        def post() -> None:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=admin.headers, timeout=60) as c:
                barrier.wait()
                answers.append(c.post("/api/experiments/", json=body, headers={KEY: key}))

        threads = [threading.Thread(target=post) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
    finally:
        server.should_exit = True
        thread.join(10)
    assert len(answers) == 20
    assert [a.status_code for a in answers] == [201] * 20, [a.text for a in answers if a.status_code != 201]
    assert len({a.content for a in answers}) == 1
    assert sum(1 for a in answers if a.headers.get(REPLAYED) == "true") == 19
    assert _experiments_named(api, name) == 1


def test_a_duplicate_that_outwaits_the_first_is_a_409(
    api: TestClient,
    admin: Member,
    dataset_id: str,
    tiny_model: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from app.api import idempotency

    name, key = f"slow-{secrets.token_hex(3)}", new_key()
    body = experiment_body(dataset_id, tiny_model, name)
    create, running = experiment_service.create_experiment, threading.Event()

    def slow(**kwargs: Any) -> Any:
        running.set()
        threading.Event().wait(1.5)
        return create(**kwargs)

    monkeypatch.setattr(idempotency, "WAIT_S", 0.3)
    monkeypatch.setattr(experiment_service, "create_experiment", slow)
    answers: list[httpx.Response] = []
    first = threading.Thread(
        target=lambda: answers.append(api.post("/api/experiments/", json=body, headers={KEY: key}))
    )
    first.start()
    assert running.wait(10)
    duplicate = api.post("/api/experiments/", json=body, headers={KEY: key})
    first.join(30)
    assert duplicate.status_code == 409 and KEY in duplicate.text, duplicate.text
    assert answers[0].status_code == 201, answers[0].text
    again = api.post("/api/experiments/", json=body, headers={KEY: key})
    assert again.headers[REPLAYED] == "true" and again.content == answers[0].content
    assert _experiments_named(api, name) == 1
