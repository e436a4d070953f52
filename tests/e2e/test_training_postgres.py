"""Production shape: Postgres + Redis + a real `celery worker` process + the API over HTTP."""

from __future__ import annotations

import json
import os
import signal
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse
from sqlalchemy import text

from app.core.db import make_engine
from tests.e2e.stack import E2E_REDIS, Stack, wait_for

pytestmark = pytest.mark.e2e


def upload(http: httpx.Client, path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        r = http.post("/api/datasets/upload", files={"file": (path.name, f)}, data={"eval_fraction": "0.2"})
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def submit(http: httpx.Client, dataset_id: str, model: Path, **hyper: Any) -> dict[str, Any]:
    r = http.post(
        "/api/experiments/",
        json={
            "name": "e2e",
            "base_model": str(model),
            "dataset_id": dataset_id,
            "recipe": "tiny_lora_cpu",
            "hyperparameters": hyper,
        },
    )
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def follow(
    stack: Stack,
    experiment_id: str,
    last_event_id: int | None = None,
    stop_after: int | None = None,
) -> list[tuple[int, str, dict[str, Any]]]:
    """Read the SSE stream until it ends (terminal status) or `stop_after` events."""
    headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
    seen: list[tuple[int, str, dict[str, Any]]] = []
    with (
        stack.http(timeout=180) as http,
        connect_sse(http, "GET", f"/api/experiments/{experiment_id}/events", headers=headers) as source,
    ):
        for sse in source.iter_sse():
            if not sse.data:  # keep-alive ping
                continue
            seen.append((int(sse.id), sse.event, json.loads(sse.data)))
            if stop_after and len(seen) >= stop_after:
                break
    return seen


def query(stack: Stack, sql: str, experiment_id: str) -> list[dict[str, Any]]:
    """Read the stack's database directly (what the API does not expose, like the trainer pid)."""
    engine = make_engine(stack.env["STUDIO_DATABASE__URL"])
    try:
        with engine.connect() as conn:
            return [dict(r) for r in conn.execute(text(sql), {"id": uuid.UUID(experiment_id)}).mappings()]
    finally:
        engine.dispose()


def experiment_row(stack: Stack, experiment_id: str) -> dict[str, Any]:
    return query(stack, "SELECT * FROM experiment WHERE id = :id", experiment_id)[0]


def test_fine_tune_end_to_end(
    stack: Stack, tiny_model: Path, alpaca_file: Path, chat_file: Path, tmp_path: Path
) -> None:
    with stack.http() as http:
        alpaca = upload(http, alpaca_file)
        chat = upload(http, chat_file)
        assert (alpaca["format"], chat["format"]) == ("alpaca", "messages")
        exp_chat = submit(http, chat["id"], tiny_model)
        exp_alpaca = submit(http, alpaca["id"], tiny_model)

    # Follow the first few events, drop the connection, and resume with Last-Event-ID.
    head = follow(stack, exp_chat["id"], stop_after=3)
    rest = follow(stack, exp_chat["id"], last_event_id=head[-1][0])
    events = head + rest
    assert [seq for seq, _, _ in events] == list(range(1, len(events) + 1)), "gap or duplicate in the stream"
    statuses = [d["status"] for _, kind, d in events if kind == "status"]
    assert statuses == ["queued", "running", "succeeded"], stack.log("worker")[-3000:]
    losses = [d["loss"] for _, kind, d in events if kind == "metrics" and "loss" in d]
    assert len(losses) >= 5 and sum(losses[-3:]) / 3 < losses[0], losses
    metrics = [d for _, kind, d in events if kind == "metrics" and "loss" in d]
    assert {"learning_rate", "grad_norm", "tokens_per_second", "epoch"} <= set(metrics[-1])
    assert any(kind == "metrics" and "eval_loss" in d for _, kind, d in events)
    assert any(kind == "checkpoint" for _, kind, _ in events)

    with stack.http() as http:
        final = http.get(f"/api/experiments/{exp_chat['id']}").json()
        assert final["final_metrics"]["global_step"] == 30 and final["attempt"] == 1
        assert http.get(f"/api/experiments/{exp_chat['id']}/metrics").json()["count"] == len(metrics) + 1
        listing = {a["path"] for a in http.get(f"/api/experiments/{exp_chat['id']}/artifacts").json()["data"]}
        assert {
            "adapter_model.safetensors",
            "adapter_config.json",
            "README.md",
            "training_config.json",
            "metrics.json",
            "tokenizer.json",
            "train.log",
        } <= listing
        adapter = tmp_path / "adapter"
        adapter.mkdir()
        for name in ("adapter_model.safetensors", "adapter_config.json", "README.md"):
            r = http.get(f"/api/experiments/{exp_chat['id']}/artifacts/{name}")
            assert r.status_code == 200
            (adapter / name).write_bytes(r.content)
        assert http.get(f"/api/experiments/{exp_chat['id']}/artifacts/..%2F..%2Fetc%2Fpasswd").status_code == 404
    card = (adapter / "README.md").read_text()
    assert card.startswith("---") and f"base_model: {tiny_model.resolve()}" in card

    _assert_adapter_changes_output(tiny_model, adapter)

    alpaca_events = follow(stack, exp_alpaca["id"])
    assert alpaca_events[-1][2]["status"] == "succeeded", stack.log("worker")[-3000:]


def _assert_adapter_changes_output(model_dir: Path, adapter_dir: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    inputs = tokenizer("What is the capital of France?", return_tensors="pt")
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        before = base(**inputs).logits
        tuned = PeftModel.from_pretrained(base, adapter_dir)
        after = tuned(**inputs).logits
    assert (after - before).abs().max().item() > 1e-3


def test_stop_mid_run_kills_the_whole_process_group(stack: Stack, tiny_model: Path, chat_file: Path) -> None:
    with stack.http() as http:
        dataset = upload(http, chat_file)
        exp = submit(http, dataset["id"], tiny_model, max_steps=100_000, save_steps=100_000)
        wait_for(
            lambda: http.get(f"/api/experiments/{exp['id']}/metrics").json()["count"] >= 2, what="training metrics"
        )
        pid = experiment_row(stack, exp["id"])["pid"]
        assert pid and _alive(pid)
        r = http.post(f"/api/experiments/{exp['id']}/stop")
        assert r.status_code == 200 and r.json()["stop_requested"]
        final = wait_for(
            lambda: (e := http.get(f"/api/experiments/{exp['id']}").json())["status"] != "running" and e,
            what="cancelled",
        )
    assert final["status"] == "cancelled"
    assert not _alive(pid)
    assert not _group_alive(pid), "a process of the trainer's group survived"


def test_same_message_twice_trains_once(stack: Stack, tiny_model: Path, chat_file: Path) -> None:
    from celery import Celery

    with stack.http() as http:
        dataset = upload(http, chat_file)
        exp = submit(http, dataset["id"], tiny_model, max_steps=10)
        # Deliver the very message the outbox sent a second time, straight into the broker.
        sender = Celery(broker=E2E_REDIS)
        sender.send_task("studio.train", kwargs={"experiment_id": exp["id"], "attempt": 1}, queue="train.cpu")
        events = follow(stack, exp["id"])
        assert [d["status"] for _, k, d in events if k == "status"] == ["queued", "running", "succeeded"]
        assert sum(1 for _, k, _ in events if k == "started") == 1
        assert http.get(f"/api/experiments/{exp['id']}").json()["attempt"] == 1
    wait_for(lambda: "skipping duplicate" in stack.log("worker"), what="the duplicate to be skipped")


def test_worker_loss_requeues_and_resumes_from_checkpoint(stack: Stack, tiny_model: Path, chat_file: Path) -> None:
    from app.cli.processes import worker_command

    with stack.http() as http:
        dataset = upload(http, chat_file)
        exp = submit(http, dataset["id"], tiny_model, max_steps=400, save_steps=5, logging_steps=5)
        wait_for(lambda: any(e["type"] == "checkpoint" for e in _all_events(stack, exp["id"])), what="a checkpoint")
        stack.stop("worker", signal.SIGKILL)  # the whole worker dies, trainer included
        stack.start("worker", worker_command(["train.cpu"], "train-test2@%h"))
        events = follow(stack, exp["id"])
    statuses = [d["status"] for _, k, d in events if k == "status"]
    assert statuses == ["queued", "running", "queued", "running", "succeeded"], statuses
    started = [i for i, (_, k, _) in enumerate(events) if k == "started"]
    assert len(started) == 2
    assert "checkpoint-" in events[started[1]][2]["resume_from_checkpoint"]
    resumed_steps = [d["step"] for _, k, d in events[started[1] :] if k == "metrics" and "loss" in d]
    assert resumed_steps[0] > 5, "the second attempt started over instead of resuming"
    stored = Path(stack.env["STUDIO_DATA_DIR"], "storage", "experiments", exp["id"], "checkpoints")
    assert 1 <= len(list(stored.iterdir())) <= 4, "storage keeps the newest two checkpoints per attempt"


def _all_events(stack: Stack, experiment_id: str) -> list[dict[str, Any]]:
    return query(stack, "SELECT type, data FROM experiment_event WHERE experiment_id = :id ORDER BY seq", experiment_id)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


def _group_alive(pgid: int) -> bool:
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                stat = (proc / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False
