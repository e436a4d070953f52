"""What the loss will see, before training: GET /api/datasets/{id}/report renders rows for a base model with
the trained parts marked, and a submit whose chat template hides the answers is refused (422), never trained
on whole."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

CHAT = [
    {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And of Spain?"},
            {"role": "assistant", "content": "Madrid.", "weight": 1},
        ]
    }
] * 4


def _dataset(client: TestClient, rows: list[dict[str, Any]]) -> str:
    r = client.post("/api/datasets/", json={"name": "report", "rows": rows, "eval_fraction": 0.0})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


@pytest.fixture
def model(tiny_model: Path, tmp_path: Path) -> Path:
    """The tiny model outside the studio's directories (the base-model fence refuses those)."""
    return Path(shutil.copytree(tiny_model, tmp_path / "model"))


def test_the_report_marks_exactly_the_answers(client: TestClient, model: Path) -> None:
    dataset_id = _dataset(client, CHAT)
    r = client.get(f"/api/datasets/{dataset_id}/report", params={"base_model": str(model)})
    assert r.status_code == 200, r.text
    [row] = r.json()["rows"]
    assert row["trained_text"] == ["Paris.<|im_end|>\n", "Madrid.<|im_end|>\n"]
    trained = "".join(t["text"] for t in row["tokens"] if t["trained"])
    assert trained == "Paris.<|im_end|>\nMadrid.<|im_end|>\n" and row["trained_tokens"] > 0
    assert "capital" in row["rendered"] and row["problem"] is None

    everything = client.get(
        f"/api/datasets/{dataset_id}/report", params={"base_model": str(model), "train_on_prompt": "true"}
    ).json()["rows"][0]
    assert all(t["trained"] for t in everything["tokens"])


def test_prompt_completion_rows_train_the_completion_and_eos(client: TestClient, model: Path) -> None:
    dataset_id = _dataset(client, [{"prompt": "2 + 2 =", "completion": " 4"}] * 3)
    [row] = client.get(f"/api/datasets/{dataset_id}/report", params={"base_model": str(model)}).json()["rows"]
    assert row["trained_text"] == [" 4<|im_end|>"]


def test_a_template_that_hides_the_answers_is_refused_at_submit(client: TestClient, model: Path) -> None:
    config_path = model / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = (  # rewrites earlier answers once later turns follow
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}{{ '(earlier answer)' }}"
        "{% else %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endif %}{% endfor %}"
    )
    config_path.write_text(json.dumps(config))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    dataset_id = _dataset(client, CHAT)
    body = {"name": "hidden", "base_model": str(model), "dataset_id": dataset_id, "recipe": "tiny_lora_cpu"}

    r = client.post("/api/experiments/", json=body)
    assert r.status_code == 422, r.text
    assert "base_model" in r.text and "differently once later turns follow" in r.text
    report = client.get(f"/api/datasets/{dataset_id}/report", params={"base_model": str(model)}).json()
    assert "differently once later turns follow" in report["rows"][0]["problem"]
    # The explicit opt-in trains on everything, so the template is fine for it.
    r = client.post("/api/experiments/", json={**body, "hyperparameters": {"train_on_prompt": True}, "start": False})
    assert r.status_code == 201, r.text
