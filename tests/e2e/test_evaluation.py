"""Evaluation after training, on the real stack: an evaluation asked for at submit waits for the run,
is queued by the worker that finishes it, runs on an inference worker, and lands on the experiment and in
its model card; two runs then compare side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.stack import Stack, wait_for

pytestmark = pytest.mark.e2e

# Prompt/completion rows with reference answers; a fifth held out.
ROWS = [{"prompt": f"Repeat the number {i}:", "completion": f" {i}"} for i in range(25)]


def submit(http: httpx.Client, dataset_id: str, model: Path, name: str) -> dict[str, Any]:
    body = {
        "name": name,
        "base_model": str(model),
        "dataset_id": dataset_id,
        "recipe": "tiny_lora_cpu",
        "hyperparameters": {"max_steps": 6, "save_steps": 6},
    }
    r = http.post("/api/experiments/", json=body)
    assert r.status_code == 201, r.text
    return dict(r.json())


def test_a_run_is_evaluated_after_it_succeeds(stack: Stack, tiny_model: Path) -> None:
    stack.start_inference_worker()
    with stack.http() as http:
        r = http.post("/api/datasets/", json={"name": "refs", "rows": ROWS, "eval_fraction": 0.2})
        assert r.status_code == 201, r.text
        dataset = r.json()
        first = submit(http, dataset["id"], tiny_model, "evaluated")
        judge = http.post("/api/deployments/", json={"base_model": str(tiny_model), "name": "eval-judge"}).json()
        spec = {"metrics": ["exact_match", "rouge_l", "bleu"], "max_tokens": 8, "judge_deployment": judge["id"]}
        r = http.post(f"/api/experiments/{first['id']}/evaluation", json=spec)
        assert r.status_code == 201, r.text
        assert r.json()["status"] in ("waiting", "queued")  # queued only if the run already succeeded
        second = submit(http, dataset["id"], tiny_model, "baseline")

        def evaluated() -> dict[str, Any] | None:
            body = http.get(f"/api/experiments/{first['id']}/evaluation").json()
            assert body["status"] != "failed", body["error"]
            return body if body["status"] == "succeeded" else None

        evaluation = wait_for(evaluated, timeout_s=240, what="the evaluation")
        wait_for(lambda: http.get(f"/api/experiments/{second['id']}").json()["status"] == "succeeded", timeout_s=240)

        metrics = evaluation["results"]["metrics"]
        assert set(metrics) == {"exact_match", "rouge_l", "bleu"} and evaluation["results"]["items"] == 5
        assert 0 <= metrics["exact_match"] <= 1 and 0 <= metrics["rouge_l"] <= 1 and metrics["bleu"] >= 0
        assert {e["reference"] for e in evaluation["results"]["examples"]} <= {r["completion"] for r in ROWS}
        # The judge (a random tiny model) graded each answer or was counted as not grading it.
        verdicts = evaluation["results"]["judge"]
        assert verdicts["model"] == "eval-judge" and verdicts["graded"] + verdicts["ungraded"] == 5
        card = http.get(f"/api/experiments/{first['id']}/artifacts/README.md").text
        assert "## Evaluation" in card and f"| rouge_l | {metrics['rouge_l']} |" in card
        # The model card and the lineage carry where the run came from, and what trained it.
        assert "## Lineage" in card and dataset["content_hash"] in card
        graph = http.get(f"/api/experiments/{first['id']}/lineage").json()
        recorded = next(n for n in graph["nodes"] if n["id"] == f"experiment:{first['id']}")["data"]["lineage"]
        assert {"torch", "transformers", "peft", "trl"} <= set(recorded["libraries"])

        compared = http.get("/api/experiments/compare", params={"ids": [first["id"], second["id"]]}).json()
    assert [run["name"] for run in compared["runs"]] == ["evaluated", "baseline"]
    assert compared["runs"][0]["evaluation"]["metrics"] == metrics and compared["runs"][1]["evaluation"] is None
    assert "loss" in compared["metrics"] and compared["steps"] == sorted(compared["steps"])
    for run in (first, second):
        assert len(compared["curves"]["loss"][run["id"]]) == len(compared["steps"])
        assert any(v is not None for v in compared["curves"]["loss"][run["id"]])
