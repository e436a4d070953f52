from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlmodel import func, select

from app.core.db import session_scope
from app.models import Experiment, ExperimentEvent, OutboxMessage
from tests.conftest import IN_PROCESS_REDIS


@pytest.fixture(scope="module")
def dataset_id(client: TestClient) -> str:
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(10)]
    r = client.post("/api/datasets/", json={"name": "pc", "rows": rows})
    return str(r.json()["id"])


def body(dataset: str, model: Path, **overrides: Any) -> dict[str, Any]:
    return {
        "name": "exp",
        "base_model": str(model),
        "dataset_id": dataset,
        "recipe": "tiny_lora_cpu",
        "hyperparameters": {},
        **overrides,
    }


def _counts() -> tuple[int, int, int]:
    with session_scope() as s:
        return tuple(
            s.exec(select(func.count()).select_from(t)).one()  # type: ignore[return-value]
            for t in (Experiment, ExperimentEvent, OutboxMessage)
        )


def test_create_queues_and_resolves_recipe(client: TestClient, dataset_id: str, tiny_model: Path) -> None:
    r = client.post("/api/experiments/", json=body(dataset_id, tiny_model, hyperparameters={"lora_r": 4}))
    assert r.status_code == 201, r.text
    exp = r.json()
    assert exp["status"] == "queued" and exp["queue"] == "train.cpu" and exp["attempt"] == 0
    assert exp["hyperparameters"]["lora_r"] == 4  # the override
    assert exp["hyperparameters"]["max_steps"] == 30  # from the recipe
    assert exp["base_model"] == str(tiny_model.resolve())
    with session_scope() as s:
        messages = s.exec(select(OutboxMessage)).all()
    payloads = [m.payload for m in messages]
    assert {"experiment_id": exp["id"], "attempt": 1} in payloads

    listed = client.get("/api/experiments/", params={"status": "queued"}).json()
    assert exp["id"] in [e["id"] for e in listed["data"]]
    assert client.get("/api/experiments/", params={"status": "succeeded"}).json()["count"] == 0
    assert client.get("/api/experiments/", params={"limit": 1}).json()["data"].__len__() == 1


@pytest.mark.parametrize(
    ("overrides", "status", "field"),
    [
        ({"hyperparameters": {"learning_rate": -1}}, 422, "hyperparameters.learning_rate"),
        ({"hyperparameters": {"lora_rank": 8}}, 422, "hyperparameters.lora_rank"),
        ({"hyperparameters": {"method": "qlora"}}, 422, "hyperparameters.method"),
        ({"hyperparameters": {"max_steps": 10**9}}, 422, "hyperparameters.max_steps"),
        ({"base_model": "/nonexistent/model"}, 422, "base_model"),
        ({"base_model": "./not/here"}, 422, "base_model"),
        ({"dataset_id": "00000000-0000-0000-0000-00000000abcd"}, 404, "dataset_id"),
        ({"recipe": "../../etc/passwd"}, 422, "recipe"),
        ({"queue": "train.tpu"}, 422, "queue"),
        ({"hyperparameters": {"deepspeed": "zero9"}}, 422, "hyperparameters.deepspeed"),  # no such config
        ({"hyperparameters": {"deepspeed": "../zero3"}}, 422, "hyperparameters.deepspeed"),
        ({"hyperparameters": {"deepspeed": "zero3"}}, 422, "hyperparameters.deepspeed"),  # train.cpu has no CUDA
        ({"validation_dataset_id": "00000000-0000-0000-0000-00000000abcd"}, 404, "validation_dataset_id"),
    ],
)
def test_bad_requests_name_the_field_and_write_nothing(
    client: TestClient, dataset_id: str, tiny_model: Path, overrides: dict[str, Any], status: int, field: str
) -> None:
    before = _counts()
    r = client.post("/api/experiments/", json=body(dataset_id, tiny_model, **overrides))
    assert r.status_code == status, r.text
    assert r.json()["field"] == field and field in r.json()["detail"]
    assert _counts() == before


def test_missing_fields_are_422(client: TestClient) -> None:
    r = client.post("/api/experiments/", json={"name": "x"})
    assert r.status_code == 422
    assert {e["loc"][-1] for e in r.json()["detail"]} == {"base_model", "dataset_id"}


def test_stop_queued_then_start_again(client: TestClient, dataset_id: str, tiny_model: Path) -> None:
    exp = client.post("/api/experiments/", json=body(dataset_id, tiny_model)).json()
    stopped = client.post(f"/api/experiments/{exp['id']}/stop").json()
    assert stopped["status"] == "cancelled" and stopped["finished_at"]
    assert client.post(f"/api/experiments/{exp['id']}/stop").status_code == 409
    restarted = client.post(f"/api/experiments/{exp['id']}/start")
    assert restarted.status_code == 200 and restarted.json()["status"] == "queued"
    assert client.post(f"/api/experiments/{exp['id']}/start").status_code == 409
    statuses = [e["data"]["status"] for e in _events(exp["id"]) if e["type"] == "status"]
    assert statuses == ["queued", "cancelled", "queued"]


def test_events_stream_replays_from_last_event_id(client: TestClient, dataset_id: str, tiny_model: Path) -> None:
    exp = client.post("/api/experiments/", json=body(dataset_id, tiny_model)).json()
    client.post(f"/api/experiments/{exp['id']}/stop")  # terminal, so the stream ends
    with client.stream("GET", f"/api/experiments/{exp['id']}/events") as r:
        text = "".join(r.iter_text())
    assert "id: 1" in text and "id: 2" in text and '"status": "cancelled"' in text
    with client.stream("GET", f"/api/experiments/{exp['id']}/events", headers={"Last-Event-ID": "1"}) as r:
        text = "".join(r.iter_text())
    assert "id: 1\n" not in text and "id: 2" in text


def test_unknown_experiment_is_404(client: TestClient) -> None:
    missing = uuid.uuid4()
    for method, path in [
        ("GET", ""),
        ("POST", "/stop"),
        ("POST", "/start"),
        ("GET", "/metrics"),
        ("GET", "/events"),
        ("GET", "/artifacts"),
        ("GET", "/artifacts/README.md"),
    ]:
        assert client.request(method, f"/api/experiments/{missing}{path}").status_code == 404


def test_relay_delivers_to_the_broker(client: TestClient, dataset_id: str, tiny_model: Path) -> None:
    """The API's relay thread sends committed outbox rows to the queue in Redis."""
    import time

    r = redis.Redis.from_url(IN_PROCESS_REDIS)
    r.delete("train.cpu")
    exp = client.post("/api/experiments/", json=body(dataset_id, tiny_model)).json()
    deadline = time.monotonic() + 60  # a wait, not a timing: the relay polls every api.relay_interval_s
    while time.monotonic() < deadline and not any(exp["id"] in m.decode() for m in r.lrange("train.cpu", 0, -1)):
        time.sleep(0.1)
    messages = [m.decode() for m in r.lrange("train.cpu", 0, -1)]
    assert any(exp["id"] in m for m in messages)


def _events(experiment_id: str) -> list[dict[str, Any]]:
    with session_scope() as s:
        rows = s.exec(
            select(ExperimentEvent)
            .where(ExperimentEvent.experiment_id == uuid.UUID(experiment_id))
            .order_by(ExperimentEvent.seq)
        ).all()  # type: ignore[arg-type]
        return [{"type": e.type, "data": e.data, "seq": e.seq} for e in rows]


NOT_ALLOWED = (
    "base_model: not an allowed model: use a Hub id, a name under the models directory, "
    "or (development) a local model directory outside the studio's data"
)


def _fake_model(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text("{}")
    return directory


def _fenced_paths(tmp_path: Path) -> dict[str, Path]:
    """Model directories (or look-alikes) in every place the studio writes, and paths that are no model."""
    from app.core.config import get_settings

    settings = get_settings()
    storage = _fake_model(Path(settings.storage.root) / "experiments" / "someone-elses" / "artifacts")
    link = tmp_path / "innocent-looking"
    link.symlink_to(storage, target_is_directory=True)
    (tmp_path / "not-a-model").mkdir()
    return {
        "storage": storage,
        "work_dir": _fake_model(Path(settings.training.work_dir) / "other-teams-run" / "output"),
        "cache_dir": _fake_model(Path(settings.inference.cache_dir) / "other-teams-adapter"),
        "data_dir": _fake_model(settings.data_dir / "secrets-next-door"),
        "symlink_into_storage": link,
        "missing": tmp_path / "no" / "such" / "model",
        "not_a_model": tmp_path / "not-a-model",
        "system_dir": Path("/etc"),
    }


FENCED = [
    "storage",
    "work_dir",
    "cache_dir",
    "data_dir",
    "symlink_into_storage",
    "missing",
    "not_a_model",
    "system_dir",
]


@pytest.mark.parametrize("where", FENCED)
def test_base_model_fence_answers_one_message_wherever_the_path_points(
    client: TestClient, dataset_id: str, tmp_path: Path, where: str
) -> None:
    """Into the studio's own directories (other teams' runs, adapters, storage), through a symlink, or a path
    that does not exist or holds no model: the same 422, so the answer reveals nothing about the server's files."""
    before = _counts()
    r = client.post("/api/experiments/", json=body(dataset_id, _fenced_paths(tmp_path)[where]))
    assert r.status_code == 422, r.text
    assert r.json() == {"detail": NOT_ALLOWED, "field": "base_model"}
    assert _counts() == before


def test_base_model_outside_the_studio_or_a_hub_id_is_accepted(
    client: TestClient, dataset_id: str, tiny_model: Path, tmp_path: Path
) -> None:
    import shutil

    outside = shutil.copytree(tiny_model, tmp_path / "my-model")
    r = client.post("/api/experiments/", json=body(dataset_id, outside, start=False))
    assert r.status_code == 201 and r.json()["base_model"] == str(outside.resolve())
    r = client.post("/api/experiments/", json=body(dataset_id, Path("x"), base_model="org/some-model", start=False))
    assert r.status_code == 201 and r.json()["base_model"] == "org/some-model"
