"""A fleet: two inference workers, two base models (two different tiny models) and an adapter of each, on
Postgres + a private Redis. Requests go where their model is placed: 64 concurrent requests across the
four deployments load each base model once and answer as they do alone; a killed worker's model is
re-placed and later requests succeed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.cli.processes import worker_command
from tests.e2e.conftest import ALPACA_ROWS, RedisServer, private_stack
from tests.e2e.stack import REPO, Stack, wait_for
from workers.training.tiny_model import build_tiny_model

pytestmark = pytest.mark.e2e
MODELS = ["base-a", "tuned-a", "base-b", "tuned-b"]
QUESTIONS = ["What is the capital of France?", "Why is the sky blue?", "Greet the user"]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[tuple[Stack, dict[str, Any]]]:
    server = RedisServer(tmp_path_factory.mktemp("fleet-redis"), "fleet-redis").start()
    other_model = build_tiny_model(tmp_path_factory.mktemp("fleet-models") / "tiny-b", seed=1)
    env = {
        "STUDIO_BROKER__URL": server.url,
        "STUDIO_EVENTS__REDIS_URL": server.url,
        "STUDIO_INFERENCE__HEARTBEAT_INTERVAL_S": "0.5",
        "STUDIO_INFERENCE__WORKER_STALE_AFTER_S": "3",
        "STUDIO_INFERENCE__MAX_BASE_MODELS": "2",  # room to take the other's model when one dies
        "STUDIO_INFERENCE__MAX_BATCH_SIZE": "32",
        "STUDIO_API__METRICS_TOKEN": "scrape-secret",
        "STUDIO_TRAINING__QUEUES": '[{"name": "train.cpu", "cuda": false}, {"name": "train.big", "cuda": false}]',
        "STUDIO_TRAINING__STALE_AFTER_S": "20",
    }
    try:
        with private_stack("fleet", tmp_path_factory.mktemp("fleet"), env, workers=True) as stack:
            with stack.http(timeout=300) as http:
                rows = [{"prompt": r["instruction"], "completion": " " + r["output"]} for r in ALPACA_ROWS]
                dataset = http.post("/api/datasets/", json={"name": "qa", "rows": rows}).json()["id"]
                runs = {}
                for name, base in (("a", tiny_model), ("b", other_model)):
                    body = {
                        "name": f"adapter-{name}",
                        "base_model": str(base),
                        "dataset_id": dataset,
                        "recipe": "tiny_lora_cpu",
                        "hyperparameters": {"max_steps": 4},
                    }
                    runs[name] = http.post("/api/experiments/", json=body).json()["id"]
                for run in runs.values():
                    wait_for(
                        lambda run=run: http.get(f"/api/experiments/{run}").json()["status"] == "succeeded",
                        timeout_s=240,
                        what="an adapter to train",
                    )
                for name, base in (("a", tiny_model), ("b", other_model)):
                    for body in ({"base_model": str(base)}, {"experiment_id": runs[name]}):
                        kind = "base" if "base_model" in body else "tuned"
                        r = http.post("/api/deployments/", json={**body, "name": f"{kind}-{name}"})
                        assert r.status_code == 201, r.text
            for name in ("inf-1", "inf-2"):
                stack.start(name, worker_command(["inference"], f"{name}@%h", concurrency=40))
            with stack.http() as http:
                wait_for(lambda: len(_workers(stack, http)) == 2, timeout_s=120, what="two inference workers")
            yield stack, {"bases": {"a": str(tiny_model), "b": str(other_model)}}
    finally:
        server.kill()


def _workers(stack: Stack, http: httpx.Client) -> list[dict[str, Any]]:
    return list(http.get("/admin/stats", headers=stack.jwt_headers).json()["workers"])


def _gauge(stack: Stack, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{stack.url}/metrics", headers={"Authorization": "Bearer scrape-secret"}, timeout=30).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    raise AssertionError(f"{name}{labels} is not in /metrics")


def _chat(http: httpx.Client, model: str, question: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 10, "temperature": 0}
    return http.post("/v1/chat/completions", json=body)


def test_requests_go_where_their_model_is_placed(fleet: tuple[Stack, dict[str, Any]]) -> None:
    stack, info = fleet
    with stack.http(timeout=180) as http:
        solo = {}
        for model in MODELS:
            for question in QUESTIONS:
                r = _chat(http, model, question)
                assert r.status_code == 200, r.text
                solo[model, question] = r.json()["choices"][0]["message"]["content"]
        assert solo["base-a", QUESTIONS[0]] != solo["base-b", QUESTIONS[0]]  # two different models

        work = [(MODELS[i % 4], QUESTIONS[i % 3]) for i in range(64)]
        with ThreadPoolExecutor(64) as pool:
            answers = list(pool.map(lambda job: _chat(http, *job), work))
        assert [r.status_code for r in answers] == [200] * 64, [r.text for r in answers if r.status_code != 200][:3]
        assert [r.json()["choices"][0]["message"]["content"] for r in answers] == [solo[job] for job in work]

        workers = _workers(stack, http)
        holders = {base: [w["name"] for w in workers if base in w["models"]] for base in info["bases"].values()}
        assert all(len(names) == 1 for names in holders.values()), holders  # each on the worker it is placed on
        for base in info["bases"].values():  # loaded once, on the worker it is placed on, never per request
            assert sum(w["loads"].get(base, {}).get("count", 0) for w in workers) == 1, workers

        deployments = http.get("/api/deployments/").json()["data"]
        tuned_a = next(d for d in deployments if d["name"] == "tuned-a")
        status = http.get(f"/api/deployments/{tuned_a['id']}/status").json()
        assert [(p["worker"], p["state"]) for p in status["placement"]] == [(holders[info["bases"]["a"]][0], "ready")]
        assert status["placement"][0]["load_seconds"] is not None


def test_a_full_fine_tune_and_a_merged_run_serve_as_base_models(
    fleet: tuple[Stack, dict[str, Any]], tiny_model: Path
) -> None:
    import openai

    stack, _ = fleet
    with stack.http(timeout=120) as http:
        dataset = http.get("/api/datasets/").json()["data"][0]["id"]
        runs = {}
        for kind, params in (("full", {"method": "full"}), ("merged", {"merge_adapter": True})):
            body = {
                "name": kind,
                "base_model": str(tiny_model),
                "dataset_id": dataset,
                "recipe": "tiny_lora_cpu",
                "hyperparameters": {**params, "max_steps": 2},
            }
            runs[kind] = http.post("/api/experiments/", json=body).json()["id"]
        for run in runs.values():
            wait_for(
                lambda run=run: http.get(f"/api/experiments/{run}").json()["status"] in ("succeeded", "failed"),
                timeout_s=240,
                what="the run to finish",
            )
            assert http.get(f"/api/experiments/{run}").json()["status"] == "succeeded"
        full = http.post("/api/deployments/", json={"experiment_id": runs["full"], "name": "full-run"})
        merged = http.post(
            "/api/deployments/", json={"experiment_id": runs["merged"], "name": "merged-run", "merged": True}
        )
        assert full.status_code == 201 and merged.status_code == 201, (full.text, merged.text)
        assert full.json()["base_model"].startswith("storage:") and merged.json()["base_model"].endswith("/merged")
        r = http.post("/api/deployments/", json={"experiment_id": runs["full"], "merged": True})
        assert r.status_code == 422 and r.json()["field"] == "merged"  # a full run has no merged weights
    key = stack.headers["Authorization"].removeprefix("Bearer ")
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=key, max_retries=0, timeout=120)
    for model in ("full-run", "merged-run"):
        answer = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": QUESTIONS[0]}], max_tokens=6, temperature=0
        )
        assert answer.choices[0].message.content is not None and answer.usage and answer.usage.completion_tokens > 0


def test_a_killed_worker_has_its_model_re_placed(fleet: tuple[Stack, dict[str, Any]]) -> None:
    stack, info = fleet
    with stack.http(timeout=180) as http:
        workers = _workers(stack, http)
        victim = next(w["name"] for w in workers if info["bases"]["a"] in w["models"])
        survivor = next(w["name"] for w in workers if w["name"] != victim)
        proc = victim.split("@", 1)[0]

        def traffic() -> list[int]:
            return [_chat(http, m, QUESTIONS[0]).status_code for m in ("base-a", "tuned-b") * 4]

        with ThreadPoolExecutor(1) as pool:
            during = pool.submit(traffic)
            time.sleep(0.3)
            stack.stop(proc, signal.SIGKILL)  # mid-traffic
            during.result()  # requests caught on the dead worker may fail (502/503); none may hang
        wait_for(
            lambda: _chat(http, "tuned-a", QUESTIONS[1]).status_code == 200, timeout_s=60, what="model a re-placed"
        )
        later = [_chat(http, m, QUESTIONS[2]) for m in MODELS]
        assert [r.status_code for r in later] == [200] * 4, [r.text for r in later]
        base_a = next(d for d in http.get("/api/deployments/").json()["data"] if d["name"] == "base-a")
        status = http.get(f"/api/deployments/{base_a['id']}/status").json()
        assert [p["worker"] for p in status["placement"]] == [survivor]


def test_fleet_view_and_metrics(fleet: tuple[Stack, dict[str, Any]]) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    stack, _ = fleet

    def scrape(headers: dict[str, str]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        r = httpx.get(f"{stack.url}/metrics", headers=headers, timeout=30)
        assert r.status_code == 200, r.text
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(r.text)
            for sample in family.samples
        }

    with stack.http(timeout=120) as http:
        view = http.get("/admin/fleet", headers=stack.jwt_headers).json()
        live = {w["name"] for w in _workers(stack, http)}  # the survivor of the kill above, whichever it was
        assert live and {w["name"] for w in view["inference"]} == live
        assert view["training"] and view["training"][0]["queues"] == ["train.cpu"]
        assert http.get("/admin/fleet").status_code == 403  # an API key never carries platform admin
        assert httpx.get(f"{stack.url}/metrics", timeout=10).status_code == 401
        assert httpx.get(f"{stack.url}/metrics", headers=stack.headers, timeout=10).status_code == 403

        tuned_b = next(d for d in http.get("/api/deployments/").json()["data"] if d["name"] == "tuned-b")
        key = ("studio_inference_requests_total", (("deployment", tuned_b["id"]), ("outcome", "ok")))
        before = scrape(stack.jwt_headers)
        for _ in range(3):
            assert _chat(http, "tuned-b", QUESTIONS[0]).status_code == 200
        after = scrape({"Authorization": "Bearer scrape-secret"})  # the configured metrics token
    assert after[key] == before.get(key, 0) + 3
    tokens = ("studio_inference_tokens_total", (("deployment", tuned_b["id"]), ("kind", "completion")))
    assert after[tokens] > before.get(tokens, 0)
    assert after[("studio_live_workers", (("kind", "inference"),))] >= 1
    assert after[("studio_experiments", (("status", "succeeded"),))] >= 2
    assert ("studio_inference_time_to_first_token_seconds_count", (("deployment", tuned_b["id"]),)) in after
    assert ("studio_queue_depth", (("queue", "train.cpu"),)) in after


def test_a_job_for_a_class_without_a_worker_waits_visibly_then_runs(fleet: tuple[Stack, dict[str, Any]]) -> None:
    stack, info = fleet
    with stack.http(timeout=120) as http:
        dataset = http.get("/api/datasets/").json()["data"][0]["id"]
        body = {"base_model": info["bases"]["a"], "dataset_id": dataset, "recipe": "tiny_lora_cpu"}
        big = http.post(
            "/api/experiments/", json={**body, "name": "big", "queue": "train.big", "hyperparameters": {"max_steps": 2}}
        ).json()
        assert "no live worker consumes train.big" in big["waiting_reason"]
        key = stack.headers["Authorization"].removeprefix("Bearer ")
        shown = subprocess.run(
            [sys.executable, "-m", "app.cli.main", "experiments", "show", big["id"]],
            cwd=REPO,
            env={**os.environ, "STUDIO_API_URL": stack.url, "STUDIO_API_KEY": key},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "waiting: no live worker consumes train.big" in shown.stdout, shown.stdout + shown.stderr
        huge = http.post("/api/experiments/", json={**body, "name": "huge", "gpus": 64}).json()
        wait_for(
            lambda: "asks for 64 GPUs" in (http.get(f"/api/experiments/{huge['id']}").json()["waiting_reason"] or ""),
            timeout_s=30,
            what="the waiting reason of a job too large for every worker",
        )
        assert http.post(f"/api/experiments/{huge['id']}/stop").status_code == 200
        r = http.post("/api/experiments/", json={**body, "name": "nowhere", "queue": "train.nowhere"})
        assert r.status_code == 422 and r.json()["field"] == "queue"

        before = _gauge(stack, "studio_experiments", status="succeeded")
        stack.start("big-worker", worker_command(["train.big"], "big@%h"))
        wait_for(
            lambda: http.get(f"/api/experiments/{big['id']}").json()["status"] == "succeeded",
            timeout_s=180,
            what="the job to run once a worker of its class is up",
        )
        assert _gauge(stack, "studio_experiments", status="succeeded") == before + 1  # /metrics moves with jobs
        stack.stop("big-worker")


def test_a_two_process_run_through_accelerate_launch(fleet: tuple[Stack, dict[str, Any]]) -> None:
    stack, info = fleet
    with stack.http(timeout=120) as http:
        dataset = http.get("/api/datasets/").json()["data"][0]["id"]
        body = {
            "name": "ddp",
            "base_model": info["bases"]["a"],
            "dataset_id": dataset,
            "recipe": "tiny_lora_cpu",
            "gpus": 2,
            "hyperparameters": {"max_steps": 4},
        }
        run = http.post("/api/experiments/", json=body).json()
        assert run["gpus"] == 2
        wait_for(
            lambda: http.get(f"/api/experiments/{run['id']}").json()["status"] in ("succeeded", "failed"),
            timeout_s=240,
            what="the 2-process run",
        )
        done = http.get(f"/api/experiments/{run['id']}").json()
        assert done["status"] == "succeeded", done["error"]
        events = http.get(f"/v1/fine_tuning/jobs/ftjob-{run['id'].replace('-', '')}/events", params={"limit": 100})
        started = [e["data"] for e in events.json()["data"] if e["message"].startswith("Training started")]
        assert [s["processes"] for s in started] == [2]  # one trainer process per requested GPU, over gloo
