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


def planted() -> list[dict[str, Any]]:
    """Distinct prompt/completion rows, then one of each thing the report must find: an exact duplicate
    (row 11 of row 2), a near duplicate (row 12 of row 3), a row far over 96 tokens (13), a one-character
    answer (14), mojibake (15) and a row in Cyrillic among Latin ones (16)."""
    rows = [
        {
            "prompt": f"Question {i}: tell me about subject {i}.",
            "completion": f" Subject {i} is covered by answer {i} here.",
        }
        for i in range(10)
    ]
    rows.append(dict(rows[1]))
    rows.append({"prompt": rows[2]["prompt"], "completion": rows[2]["completion"].replace("here", "there")})
    rows.append({"prompt": "Write a long essay.", "completion": " " + "word " * 200})
    rows.append({"prompt": "Say yes.", "completion": "y"})
    rows.append({"prompt": "Name a café.", "completion": " The cafÃ© on the corner."})
    rows.append({"prompt": "Скажи привет.", "completion": " Привет, мир."})
    return rows


def test_the_report_finds_what_was_planted(client: TestClient, model: Path) -> None:
    dataset_id = _dataset(client, planted())
    params = {"base_model": str(model), "max_seq_length": 96, "batch_size": 2, "lora_r": 8}
    r = client.get(f"/api/datasets/{dataset_id}/report", params=params)
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["status"] == "ready" and report["rows_total"] == 16 and report["max_seq_length"] == 96
    assert report["duplicates"]["exact_groups"] == [[2, 11]] and report["duplicates"]["exact_rows"] == 1
    assert report["duplicates"]["near_pairs"] == [[12, 3]]
    assert report["truncation"]["row_numbers"] == [13] and report["truncation"]["share"] == round(1 / 16, 4)
    assert report["short_answers"]["row_numbers"] == [14]
    kinds = {(a["row"], a["kind"]) for a in report["anomalies"]["listed"]}
    assert kinds == {(15, "encoding"), (16, "script")} and report["anomalies"]["main_script"] == "LATIN"
    tokens = report["tokens"]
    assert tokens["max"] > 96 >= tokens["p50"] and sum(b["count"] for b in tokens["histogram"]) == 16
    estimate = report["estimate"]
    assert estimate["is_estimate"] and estimate["peak_memory_bytes"] == sum(estimate["breakdown_bytes"].values())
    assert estimate["inputs"]["batch_size"] == 2 and estimate["inputs"]["lora_r"] == 8 and estimate["assumptions"]
    assert estimate["seconds_per_epoch"] > 0 and estimate["throughput"]["gpu_class"] == "cpu"
    assert report["blocking"] == [] and any("will be cut" in w for w in report["warnings"])


def test_a_row_whose_answer_starts_past_the_length_teaches_nothing(client: TestClient, model: Path) -> None:
    rows = [{"prompt": "word " * 200, "completion": " answer"}] * 2
    report = client.get(
        f"/api/datasets/{_dataset(client, rows)}/report", params={"base_model": str(model), "max_seq_length": 32}
    ).json()
    assert report["truncation"]["answer_cut_off"] == 2
    assert any("teach nothing" in problem for problem in report["blocking"])


def test_a_report_is_computed_once_per_what_it_depends_on(client: TestClient, model: Path) -> None:
    from sqlmodel import func, select

    from app.core.db import session_scope
    from app.models import DatasetReportRecord

    def records() -> int:
        with session_scope() as session:
            return int(session.exec(select(func.count()).select_from(DatasetReportRecord)).one())

    dataset_id = _dataset(client, planted())
    url, params = f"/api/datasets/{dataset_id}/report", {"base_model": str(model), "max_seq_length": 64}
    before = records()
    first = client.get(url, params=params).json()
    assert client.get(url, params=params).json() == first and records() == before + 1
    client.get(url, params={**params, "max_seq_length": 128})
    assert records() == before + 2
    (model / "tokenizer_config.json").write_text(  # another chat template is another report
        (model / "tokenizer_config.json").read_text().replace("<|im_end|>", "<|im_end|> ")
    )
    client.get(url, params=params)
    assert records() == before + 3
    assert client.delete(f"/api/datasets/{dataset_id}").status_code == 204
    assert records() == before


def test_report_parameters_are_checked(client: TestClient, model: Path) -> None:
    url = f"/api/datasets/{_dataset(client, planted())}/report"
    for params, field in (
        ({"base_model": str(model), "queue": "train.nope"}, "queue"),
        ({"base_model": str(model), "method": "dora"}, "method"),
        ({"base_model": str(model), "max_seq_length": 4}, "max_seq_length"),
        ({"base_model": str(model), "max_seq_length": 10**6}, "max_seq_length"),
    ):
        r = client.get(url, params=params)
        assert r.status_code == 422 and field in r.text, (params, r.text)
