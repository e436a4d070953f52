"""The human preference loop on the real stack: votes on an A/B test become a preference dataset, a DPO
experiment trains on it and succeeds, and its lineage leads back to the test and both deployments."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.stack import Stack, wait_for
from workers.training.tiny_model import _ANSWERS, _QUESTIONS

pytestmark = pytest.mark.e2e


def test_votes_train_a_dpo_experiment_whose_lineage_leads_back(stack: Stack, tiny_model: Path) -> None:
    with stack.http() as http:
        a = http.post("/api/deployments/", json={"base_model": str(tiny_model), "name": "pref-a"}).json()
        b = http.post("/api/deployments/", json={"base_model": str(tiny_model), "name": "pref-b"}).json()
        test = http.post(
            "/api/ab-testing/",
            json={"name": "prefs", "deployment_a": a["id"], "deployment_b": b["id"], "prompts": ["hi"]},
        ).json()
        n = len(_QUESTIONS)
        for i, (question, answer) in enumerate(zip(_QUESTIONS, _ANSWERS, strict=True)):
            vote = {
                "prompt": f"Question: {question}\nAnswer:",
                "answer_a": f" {answer}",
                "answer_b": f" {_ANSWERS[(i + 1) % n]}",
                "shown_first": "ab"[i % 2],
                "choice": "a",
            }
            assert http.post(f"/api/ab-testing/{test['id']}/votes", json=vote).status_code == 201
        board = http.get("/api/leaderboard").json()["data"]
        assert [e["model"] for e in board] == ["pref-a", "pref-b"]

        dataset = http.post(f"/api/ab-testing/{test['id']}/preference-dataset").json()
        body = {"name": "dpo", "base_model": str(tiny_model), "dataset_id": dataset["id"], "recipe": "tiny_dpo_cpu"}
        r = http.post("/api/experiments/", json=body)
        assert r.status_code == 201, r.text
        run = r.json()
        assert run["hyperparameters"]["objective"] == "dpo"
        status = wait_for(
            lambda: (s := http.get(f"/api/experiments/{run['id']}").json()["status"]) in ("succeeded", "failed") and s,
            timeout_s=240,
            what="the DPO run",
        )
        assert status == "succeeded", http.get(f"/api/experiments/{run['id']}").json()["error"]
        metrics = http.get(f"/api/experiments/{run['id']}/metrics").json()["data"]
        assert any("rewards/margins" in m["data"] for m in metrics)
        graph = http.get(f"/api/experiments/{run['id']}/lineage").json()
    edges = {(e["source"], e["relation"], e["target"]) for e in graph["edges"]}
    assert (f"experiment:{run['id']}", "trained_on", f"dataset:{dataset['id']}") in edges
    assert (f"dataset:{dataset['id']}", "votes_of", f"ab_test:{test['id']}") in edges
    for deployment in (a, b):
        assert (f"ab_test:{test['id']}", "compared", f"deployment:{deployment['id']}") in edges


def test_the_cli_shows_what_the_report_warned_of(stack: Stack, tiny_model: Path) -> None:
    import os
    import subprocess
    import sys

    from tests.e2e.stack import REPO

    rows = [{"prompt": f"q{i}", "completion": f" answer {i}"} for i in range(8)] * 2  # every row twice
    with stack.http() as http:
        dataset = http.post("/api/datasets/", json={"name": "twice", "rows": rows}).json()
    key = stack.headers["Authorization"].removeprefix("Bearer ")
    env = {**os.environ, "STUDIO_API_URL": stack.url, "STUDIO_API_KEY": key}
    argv = [sys.executable, "-m", "app.cli.main", "experiments", "submit", "--name", "dups"]
    argv += ["--base-model", str(tiny_model), "--dataset", dataset["id"], "--recipe", "tiny_lora_cpu"]
    argv += ["--set", "max_steps=1"]
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "warning: 8 exact and 0 near-duplicate rows" in done.stdout, done.stdout
