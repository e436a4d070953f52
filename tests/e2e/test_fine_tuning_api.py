"""OpenAI's fine-tuning flow, unchanged, against the real stack (Postgres, Redis, a training worker, an
inference worker, the API) with the official `openai` client only: files → job → events → checkpoints →
chat with the fine-tuned model; cancel, pause and resume; DPO on an OpenAI preference file."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.e2e.conftest import ALPACA_ROWS
from tests.e2e.stack import Stack, wait_for

pytestmark = pytest.mark.e2e

CHAT_ROWS = [
    {"messages": [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]}
    for r in ALPACA_ROWS
]
PREFERENCE_ROWS = [
    {
        "input": {"messages": [{"role": "user", "content": r["instruction"]}]},
        "preferred_output": [{"role": "assistant", "content": r["output"]}],
        "non_preferred_output": [{"role": "assistant", "content": "I will not answer that."}],
    }
    for r in ALPACA_ROWS
]


def _jsonl(rows: list[dict[str, Any]], name: str) -> tuple[str, io.BytesIO]:
    return name, io.BytesIO("".join(json.dumps(r) + "\n" for r in rows).encode())


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    stack.start_inference_worker()
    key = stack.headers["Authorization"].removeprefix("Bearer ")
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def chat_file(client: openai.OpenAI) -> str:
    return client.files.create(file=_jsonl(CHAT_ROWS, "chat.jsonl"), purpose="fine-tune").id


def _until(job_id: str, client: openai.OpenAI, done: Callable[[Any], bool], what: str, timeout_s: float = 300) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if done(job):
            return job
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}: {client.fine_tuning.jobs.retrieve(job_id)}")


def _steps_logged(client: openai.OpenAI, job_id: str) -> list[int]:
    events = client.fine_tuning.jobs.list_events(job_id, limit=100)
    return [e.data["step"] for e in events if e.type == "metrics" and e.data and "loss" in e.data]


def test_files_are_datasets_and_bad_lines_are_named(stack: Stack, client: openai.OpenAI, chat_file: str) -> None:
    assert client.files.retrieve(chat_file).purpose == "fine-tune"
    assert chat_file in {f.id for f in client.files.list()}
    content = client.files.content(chat_file).text.splitlines()
    assert [json.loads(line) for line in content] == CHAT_ROWS
    with stack.http() as http:  # one truth, two shapes
        datasets = http.get("/api/datasets/").json()["data"]
    assert chat_file.removeprefix("file-") in {d["id"].replace("-", "") for d in datasets}

    bad = [*CHAT_ROWS[:2], {"messages": [{"role": "robot", "content": "hi"}]}]
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=_jsonl(bad, "bad.jsonl"), purpose="fine-tune")
    assert "line 3" in caught.value.message and caught.value.param == "file"
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=_jsonl(CHAT_ROWS, "x.jsonl"), purpose="assistants")
    assert caught.value.param == "purpose"
    with pytest.raises(openai.BadRequestError) as caught:
        client.fine_tuning.jobs.create(model="../etc", training_file=chat_file)
    assert caught.value.param == "model"
    with pytest.raises(openai.NotFoundError) as missing:
        client.fine_tuning.jobs.create(model="x", training_file="file-" + "0" * 32)
    assert missing.value.status_code == 404


def test_fine_tune_then_chat_with_the_fine_tuned_model(
    stack: Stack, client: openai.OpenAI, chat_file: str, tiny_model: Path
) -> None:
    validation = client.files.create(file=_jsonl(CHAT_ROWS[:4], "val.jsonl"), purpose="fine-tune").id
    job = client.fine_tuning.jobs.create(
        model=str(tiny_model),
        training_file=chat_file,
        validation_file=validation,
        suffix="tiny-chat",
        seed=7,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3, "batch_size": 4}}},
        metadata={"ticket": "T-1"},
    )
    assert job.status == "queued" and job.fine_tuned_model is None
    assert job.hyperparameters.n_epochs == 3 and job.hyperparameters.learning_rate_multiplier == 1.0

    deadline = time.monotonic() + 300
    while (status := client.fine_tuning.jobs.retrieve(job.id).status) not in ("succeeded", "failed", "cancelled"):
        assert client.fine_tuning.jobs.list_events(job.id, limit=5).data  # events from the start
        assert time.monotonic() < deadline, "the job did not finish"
        time.sleep(0.5)
    done = client.fine_tuning.jobs.retrieve(job.id)
    assert status == "succeeded", done.error
    assert done.fine_tuned_model and done.fine_tuned_model.startswith("ft:") and ":tiny-chat:" in done.fine_tuned_model
    assert done.trained_tokens and done.trained_tokens > 0 and done.result_files
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=7))  # pages through every event
    assert events[0].message.startswith("Job succeeded") and any(e.type == "metrics" for e in events)
    assert len({e.id for e in events}) == len(events)
    assert any("valid_loss" in (e.data or {}) and e.data["valid_loss"] is not None for e in events)
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"ticket": "T-1"})] == [job.id]
    results = client.files.content(done.result_files[0]).text.splitlines()
    assert results[0].startswith("step,train_loss") and len(results) > 2

    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job.id))
    assert [c.step_number for c in checkpoints] == [12, 10]  # every 10 steps (tiny_lora_cpu) and the last
    assert checkpoints[0].metrics.train_loss is not None

    question = [{"role": "user", "content": ALPACA_ROWS[0]["instruction"]}]
    for model in (done.fine_tuned_model, checkpoints[1].fine_tuned_model_checkpoint):
        answer = client.chat.completions.create(model=model, messages=question, max_tokens=8, temperature=0)
        assert answer.choices[0].message.content, model
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=done.fine_tuned_model + "x", messages=question, max_tokens=2)


def test_cancel_a_running_job(client: openai.OpenAI, chat_file: str, tiny_model: Path) -> None:
    job = client.fine_tuning.jobs.create(
        model=str(tiny_model), training_file=chat_file, hyperparameters={"n_epochs": 200}
    )
    _until(job.id, client, lambda j: j.status == "running", "the job to run")
    wait_for(lambda: _steps_logged(client, job.id), timeout_s=120, what="a logged step")
    client.fine_tuning.jobs.cancel(job.id)
    assert _until(job.id, client, lambda j: j.status != "running", "the cancel").status == "cancelled"
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.cancel(job.id)


def test_pause_and_resume_continues_from_the_checkpoint(
    stack: Stack, client: openai.OpenAI, chat_file: str, tiny_model: Path
) -> None:
    job = client.fine_tuning.jobs.create(
        model=str(tiny_model), training_file=chat_file, hyperparameters={"n_epochs": 15}
    )
    _until(job.id, client, lambda j: j.status == "running", "the job to run")
    wait_for(lambda: _steps_logged(client, job.id), timeout_s=120, what="a logged step")
    client.fine_tuning.jobs.pause(job.id)
    paused = _until(job.id, client, lambda j: j.status != "running", "the pause")
    assert paused.status == "paused"
    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job.id))
    assert checkpoints, "a paused job keeps the checkpoint of its stop step"
    paused_at = checkpoints[0].step_number

    client.fine_tuning.jobs.resume(job.id)
    done = _until(job.id, client, lambda j: j.status in ("succeeded", "failed", "cancelled"), "the resumed job")
    assert done.status == "succeeded", done.error
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    starts = [e.data["start_step"] for e in events if e.message.startswith("Training started")]
    assert sorted(starts) == [0, paused_at]  # the second attempt began where the pause left off
    assert sum(e.message.startswith("Job succeeded") for e in events) == 1
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.resume(job.id)
    with stack.http() as http:  # /api sees the same run, one success
        run = http.get(f"/api/experiments/{_uuid(job.id)}").json()
    assert run["status"] == "succeeded" and run["attempt"] == 2


def test_dpo_on_an_openai_preference_file(client: openai.OpenAI, tiny_model: Path) -> None:
    prefs = client.files.create(file=_jsonl(PREFERENCE_ROWS, "prefs.jsonl"), purpose="fine-tune").id
    job = client.fine_tuning.jobs.create(
        model=str(tiny_model),
        training_file=prefs,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1}}},
    )
    done = _until(job.id, client, lambda j: j.status in ("succeeded", "failed", "cancelled"), "the DPO job")
    assert done.status == "succeeded", done.error
    assert done.method and done.method.type == "dpo"
    events = reversed(list(client.fine_tuning.jobs.list_events(job.id, limit=100)))
    margins = [e.data["rewards/margins"] for e in events if e.type == "metrics" and "rewards/margins" in e.data]
    assert len(margins) >= 4
    assert sum(margins[-2:]) / 2 > sum(margins[:2]) / 2 + 0.01, margins  # the preferred answers pull ahead

    with pytest.raises(openai.BadRequestError) as caught:  # a preference file needs method dpo
        client.fine_tuning.jobs.create(model=str(tiny_model), training_file=prefs)
    assert caught.value.param == "training_file"


def _uuid(job_id: str) -> str:
    hex_ = job_id.removeprefix("ftjob-")
    return f"{hex_[:8]}-{hex_[8:12]}-{hex_[12:16]}-{hex_[16:20]}-{hex_[20:]}"


def test_the_cli_pauses_and_resumes(stack: Stack, client: openai.OpenAI, chat_file: str, tiny_model: Path) -> None:
    import os
    import subprocess
    import sys

    from tests.e2e.stack import REPO

    env = {**os.environ, "STUDIO_API_URL": stack.url, "STUDIO_API_KEY": client.api_key}
    with stack.http() as http:
        run = http.post(
            "/api/experiments/",
            json={
                "name": "cli-pause",
                "base_model": str(tiny_model),
                "dataset_id": _uuid(chat_file.replace("file-", "ftjob-")),
                "recipe": "tiny_lora_cpu",
                "hyperparameters": {"max_steps": 2000},
            },
        ).json()

        def cli(*args: str) -> str:
            argv = [sys.executable, "-m", "app.cli.main", "experiments", *args, run["id"]]
            done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr
            return done.stdout

        def status() -> str:
            return str(http.get(f"/api/experiments/{run['id']}").json()["status"])

        wait_for(lambda: status() == "running", timeout_s=120, what="the run to start")
        assert "pausing" in cli("pause") or status() == "paused"
        wait_for(lambda: status() == "paused", timeout_s=120, what="the pause")
        assert "queued" in cli("resume") or status() == "running"
        wait_for(lambda: status() == "running", timeout_s=120, what="the run to resume")
        assert http.post(f"/api/experiments/{run['id']}/stop").status_code == 200
        wait_for(lambda: status() == "cancelled", timeout_s=120, what="the stop")
