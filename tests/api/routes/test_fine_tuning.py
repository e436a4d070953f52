"""/v1/files and /v1/fine_tuning/jobs in-process (no worker runs here): shapes, validation in OpenAI's
error shape naming the parameter, team scoping, and pause/resume/cancel of a job that has not started."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.models import Role
from tests.accounts import Member, make_member, make_team

CHAT = [
    {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}", "weight": 1}]}
    for i in range(6)
]
PREFS = [
    {
        "input": {"messages": [{"role": "user", "content": f"q{i}"}]},
        "preferred_output": [{"role": "assistant", "content": "good"}],
        "non_preferred_output": [{"role": "assistant", "content": "bad"}],
    }
    for i in range(4)
]


@pytest.fixture(scope="module")
def trainer() -> Member:
    return make_member(make_team(), Role.trainer)


def upload(client: TestClient, headers: dict[str, str], rows: list[Any], purpose: str = "fine-tune") -> Any:
    body = "".join(json.dumps(r) + "\n" for r in rows).encode()
    return client.post(
        "/v1/files", files={"file": ("data.jsonl", io.BytesIO(body))}, data={"purpose": purpose}, headers=headers
    )


def error(r: Any) -> dict[str, Any]:
    return dict(r.json()["error"])


def test_a_file_is_a_dataset(anonymous: TestClient, trainer: Member) -> None:
    r = upload(anonymous, trainer.headers, CHAT)
    assert r.status_code == 200, r.text
    file = r.json()
    assert file["object"] == "file" and file["purpose"] == "fine-tune" and file["filename"] == "data.jsonl"
    datasets = anonymous.get("/api/datasets/", headers=trainer.headers).json()["data"]
    dataset = next(d for d in datasets if d["id"].replace("-", "") == file["id"].removeprefix("file-"))
    assert dataset["format"] == "messages" and dataset["row_count"] == 6
    assert file["id"] in {f["id"] for f in anonymous.get("/v1/files", headers=trainer.headers).json()["data"]}
    content = anonymous.get(f"/v1/files/{file['id']}/content", headers=trainer.headers).text
    assert [json.loads(line) for line in content.splitlines()] == CHAT

    prefs = upload(anonymous, trainer.headers, PREFS).json()
    assert (
        anonymous.get(f"/api/datasets/{_uuid(prefs['id'])}", headers=trainer.headers).json()["format"] == "preference"
    )

    other = make_member(make_team(), Role.admin).headers
    assert anonymous.get(f"/v1/files/{file['id']}", headers=other).status_code == 404
    assert anonymous.delete(f"/v1/files/{file['id']}", headers=other).status_code == 404
    assert anonymous.delete(f"/v1/files/{prefs['id']}", headers=trainer.headers).json()["deleted"] is True
    assert anonymous.get(f"/v1/files/{prefs['id']}", headers=trainer.headers).status_code == 404


@pytest.mark.parametrize(
    ("rows", "purpose", "param", "needle"),
    [
        ([*CHAT[:2], {"messages": [{"role": "user", "content": "x"}]}], "fine-tune", "file", "line 3"),
        ([{"prompt": "a"}], "fine-tune", "file", "line 1"),
        ([{**PREFS[0], "preferred_output": "good"}], "fine-tune", "file", "preferred_output"),
        ([{**PREFS[0], "input": {"messages": []}}], "fine-tune", "file", "input.messages"),
        (CHAT, "batch", "purpose", "fine-tune"),
    ],
)
def test_bad_files_are_refused_naming_the_line(
    anonymous: TestClient, trainer: Member, rows: list[Any], purpose: str, param: str, needle: str
) -> None:
    before = anonymous.get("/api/datasets/", headers=trainer.headers).json()["count"]
    r = upload(anonymous, trainer.headers, rows, purpose)
    assert r.status_code == 400 and error(r)["param"] == param and needle in error(r)["message"], r.text
    assert anonymous.get("/api/datasets/", headers=trainer.headers).json()["count"] == before  # nothing stored


@pytest.fixture(scope="module")
def training_file(anonymous: TestClient, trainer: Member) -> str:
    return str(upload(anonymous, trainer.headers, CHAT).json()["id"])


@pytest.mark.parametrize(
    ("change", "param", "code"),
    [
        ({"learning_rate": 1}, "learning_rate", "unknown_parameter"),
        ({"integrations": [{"type": "wandb", "wandb": {"project": "x"}}]}, "integrations", "unsupported_parameter"),
        ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs", "invalid_value"),
        ({"hyperparameters": {"learning_rate_multiplier": -1}}, "hyperparameters.learning_rate_multiplier", None),
        ({"method": {"type": "reinforcement"}}, "method.type", None),
        ({"suffix": "has space"}, "suffix", None),
        ({"training_file": "file-nope"}, "training_file", None),
        ({"validation_file": "file-" + "0" * 32}, "validation_file", None),
        ({"model": "/etc"}, "model", None),
    ],
)
def test_bad_jobs_are_refused_naming_the_parameter(
    anonymous: TestClient,
    trainer: Member,
    tiny_model: Path,
    training_file: str,
    change: dict[str, Any],
    param: str,
    code: str | None,
) -> None:
    body = {"model": str(tiny_model), "training_file": training_file, **change}
    r = anonymous.post("/v1/fine_tuning/jobs", json=body, headers=trainer.headers)
    assert r.status_code in (400, 404) and error(r)["param"] == param, r.text
    if code:
        assert error(r)["code"] == code


def test_a_job_is_an_experiment_and_pauses_resumes_and_cancels(
    anonymous: TestClient, trainer: Member, tiny_model: Path, training_file: str
) -> None:
    h = trainer.headers
    body = {
        "model": str(tiny_model),
        "training_file": training_file,
        "suffix": "mine",
        "seed": 3,
        "hyperparameters": {"n_epochs": 2, "batch_size": 2, "learning_rate_multiplier": 0.5},
        "metadata": {"team": "blue"},
    }
    r = anonymous.post("/v1/fine_tuning/jobs", json=body, headers=h)
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["object"] == "fine_tuning.job" and job["status"] == "queued" and job["seed"] == 3
    assert job["hyperparameters"] == {"n_epochs": 2, "batch_size": 2, "learning_rate_multiplier": 0.5}
    assert job["method"]["type"] == "supervised" and job["metadata"] == {"team": "blue"}
    experiment = anonymous.get(f"/api/experiments/{_uuid(job['id'])}", headers=h).json()
    params = experiment["hyperparameters"]
    assert params["epochs"] == 2 and params["max_steps"] == -1 and params["learning_rate"] == pytest.approx(2.5e-3)
    assert experiment["fine_tuned_model"].startswith("ft:") and ":mine:" in experiment["fine_tuned_model"]
    assert experiment["labels"] == {"team": "blue"}

    jobs = anonymous.get("/v1/fine_tuning/jobs", params={"metadata[team]": "blue"}, headers=h).json()
    assert [j["id"] for j in jobs["data"]] == [job["id"]]
    other = make_member(make_team(), Role.admin).headers
    assert anonymous.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=other).status_code == 404
    assert anonymous.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=other).status_code == 404

    paused = anonymous.post(f"/v1/fine_tuning/jobs/{job['id']}/pause", headers=h).json()
    assert paused["status"] == "paused"
    resumed = anonymous.post(f"/v1/fine_tuning/jobs/{job['id']}/resume", headers=h).json()
    assert resumed["status"] == "queued"
    r = anonymous.post(f"/v1/fine_tuning/jobs/{job['id']}/resume", headers=h)
    assert r.status_code == 409 and error(r)["param"] == "fine_tuning_job_id"
    assert anonymous.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=h).json()["status"] == "cancelled"
    assert anonymous.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=h).status_code == 409

    events = anonymous.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 2}, headers=h).json()
    assert events["has_more"] is True and events["data"][0]["message"].startswith("Job cancelled")
    older = anonymous.get(
        f"/v1/fine_tuning/jobs/{job['id']}/events", params={"after": events["data"][-1]["id"]}, headers=h
    ).json()
    assert older["data"] and older["data"][-1]["message"].startswith("Job queued")
    assert anonymous.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints", headers=h).json()["data"] == []

    r = anonymous.post(  # an unfinished run has no servable model yet
        "/v1/chat/completions",
        json={"model": experiment["fine_tuned_model"], "messages": [{"role": "user", "content": "x"}]},
        headers=h,
    )
    assert r.status_code == 404 and error(r)["code"] == "model_not_found"


def test_jobs_page_newest_first_and_metadata_filters_every_page(anonymous: TestClient, tiny_model: Path) -> None:
    """Found: the list read every job of the team to filter labels in Python; the filter is SQL now, so it
    must still hold on every page, for label keys with JSON-path characters too."""
    member = make_member(make_team(), Role.trainer)
    training_file = upload(anonymous, member.headers, CHAT).json()["id"]
    odd_key = 'odd "key.$[0]'
    made = []
    for i in range(5):
        metadata = {"colour": "blue" if i % 2 == 0 else "red", odd_key: "x" if i == 3 else "y"}
        body = {"model": str(tiny_model), "training_file": training_file, "metadata": metadata}
        r = anonymous.post("/v1/fine_tuning/jobs", json=body, headers=member.headers)
        assert r.status_code == 200, r.text
        made.append(r.json()["id"])

    def every_page(params: dict[str, str]) -> list[str]:
        seen: list[str] = []
        after: dict[str, str] = {}
        while True:
            page = anonymous.get(
                "/v1/fine_tuning/jobs", params={**params, "limit": "2", **after}, headers=member.headers
            ).json()
            seen += [job["id"] for job in page["data"]]
            if not page["has_more"]:
                return seen
            after = {"after": page["data"][-1]["id"]}

    assert every_page({}) == made[::-1]
    assert every_page({"metadata[colour]": "blue"}) == [made[4], made[2], made[0]]
    assert every_page({f"metadata[{odd_key}]": "x"}) == [made[3]]
    assert every_page({"metadata[colour]": "green"}) == []


def test_a_preference_file_needs_method_dpo(
    anonymous: TestClient, trainer: Member, tiny_model: Path, training_file: str
) -> None:
    prefs = upload(anonymous, trainer.headers, PREFS).json()["id"]
    r = anonymous.post(
        "/v1/fine_tuning/jobs", json={"model": str(tiny_model), "training_file": prefs}, headers=trainer.headers
    )
    assert r.status_code == 400 and error(r)["param"] == "training_file", r.text
    r = anonymous.post(
        "/v1/fine_tuning/jobs",
        json={"model": str(tiny_model), "training_file": training_file, "method": {"type": "dpo"}},
        headers=trainer.headers,
    )
    assert r.status_code == 400 and error(r)["param"] == "hyperparameters", r.text
    r = anonymous.post(
        "/v1/fine_tuning/jobs",
        json={
            "model": str(tiny_model),
            "training_file": prefs,
            "validation_file": training_file,
            "method": {"type": "dpo"},
        },
        headers=trainer.headers,
    )
    assert r.status_code == 400 and error(r)["param"] == "validation_file", r.text
    job = anonymous.post(
        "/v1/fine_tuning/jobs",
        json={
            "model": str(tiny_model),
            "training_file": prefs,
            "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.3}}},
        },
        headers=trainer.headers,
    ).json()
    assert job["method"] == {
        "type": "dpo",
        "dpo": {"hyperparameters": {"n_epochs": "auto", "batch_size": 4, "learning_rate_multiplier": 1.0, "beta": 0.3}},
    }
    anonymous.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=trainer.headers)


def _uuid(openai_id: str) -> str:
    hex_ = openai_id.split("-", 1)[1]
    return f"{hex_[:8]}-{hex_[8:12]}-{hex_[12:16]}-{hex_[16:20]}-{hex_[20:]}"
