"""Curation makes a new dataset version with a parent link; export streams rows that HF `datasets` loads."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from fastapi.testclient import TestClient

ANSWERS = [f"answer number {i} explains topic {i} in several distinct words" for i in range(12)]


def planted_rows() -> list[dict[str, Any]]:
    """12 distinct rows, then: an exact copy of row 1, a near copy of row 2 (one word changed),
    and two answers too short to teach anything."""
    rows = [{"prompt": f"question {i} about topic {i}", "completion": a} for i, a in enumerate(ANSWERS)]
    rows.append(dict(rows[1]))
    near = dict(rows[2])
    near["completion"] = near["completion"].replace("several", "many")
    rows.append(near)
    rows += [{"prompt": "short", "completion": "ok"}, {"prompt": "shorter", "completion": " k "}]
    return rows


def make_dataset(client: TestClient, rows: list[dict[str, Any]], name: str = "planted") -> dict[str, Any]:
    r = client.post("/api/datasets/", json={"name": name, "rows": rows, "eval_fraction": 0.0})
    assert r.status_code == 201, r.text
    return dict(r.json())


def rows_of(client: TestClient, dataset_id: str) -> list[dict[str, Any]]:
    r = client.get(f"/api/datasets/{dataset_id}/export")
    assert r.status_code == 200, r.text
    return [json.loads(line) for line in r.text.splitlines()]


def test_curate_drops_what_each_filter_names_and_links_the_parent(client: TestClient) -> None:
    parent = make_dataset(client, planted_rows())
    r = client.post(
        f"/api/datasets/{parent['id']}/curate", json={"dedup": "near", "near_threshold": 0.5, "min_answer_chars": 3}
    )
    assert r.status_code == 201, r.text
    child = r.json()
    assert child["parent_id"] == parent["id"] and child["name"] == "planted (curated)"
    assert child["origin"]["dropped"] == {"short_answers": 2, "exact_duplicates": 1, "near_duplicates": 1}
    assert child["origin"]["curated_from"] == parent["id"] and child["origin"]["rows_before"] == 16
    assert rows_of(client, child["id"]) == planted_rows()[:12]
    assert client.get(f"/api/datasets/{parent['id']}").json()["row_count"] == 16  # the parent is untouched

    # Exact only keeps the near copy; a sample is reproducible by its seed and keeps the parent's order.
    exact = client.post(f"/api/datasets/{parent['id']}/curate", json={}).json()
    assert exact["row_count"] == 15 and exact["origin"]["dropped"] == {"exact_duplicates": 1}
    sampled = [
        client.post(f"/api/datasets/{parent['id']}/curate", json={"sample": 5, "seed": 7, "eval_fraction": 0.2}).json()
        for _ in range(2)
    ]
    assert sampled[0]["row_count"] == 5 and sampled[0]["eval_rows"] == 1
    first, second = rows_of(client, sampled[0]["id"]), rows_of(client, sampled[1]["id"])
    assert first == second
    positions = [planted_rows().index(row) for row in first]
    assert positions == sorted(positions)


def test_token_bounds_count_with_the_base_models_tokenizer(client: TestClient, tiny_model: Path) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    rows = [{"prompt": "p", "completion": "word " * n} for n in (1, 5, 20, 60)]
    lengths = [len(tokenizer.encode(r["prompt"] + r["completion"], add_special_tokens=False).ids) for r in rows]
    parent = make_dataset(client, rows, "lengths")
    low, high = lengths[1], lengths[2]
    body = {"base_model": str(tiny_model), "min_tokens": low, "max_tokens": high, "dedup": "none"}
    child = client.post(f"/api/datasets/{parent['id']}/curate", json=body)
    assert child.status_code == 201, child.text
    assert rows_of(client, child.json()["id"]) == rows[1:3]
    assert child.json()["origin"]["dropped"]["token_bounds"] == 2

    r = client.post(f"/api/datasets/{parent['id']}/curate", json={"min_tokens": 3})
    assert r.status_code == 422 and r.json()["field"] == "base_model"
    r = client.post(f"/api/datasets/{parent['id']}/curate", json={**body, "min_tokens": 9, "max_tokens": 2})
    assert r.status_code == 422 and r.json()["field"] == "min_tokens"
    r = client.post(f"/api/datasets/{parent['id']}/curate", json={"sample": 0})
    assert r.status_code == 422 and "sample" in r.text
    r = client.post(f"/api/datasets/{parent['id']}/curate", json={"min_answer_chars": 10_000})
    assert r.status_code == 422 and "leave no row" in r.json()["detail"]


def test_export_loads_with_hf_datasets(client: TestClient, tmp_path: Path) -> None:
    import datasets

    rows = [
        {"instruction": "say hi", "output": "hi"},
        {"instruction": "add", "input": "1+1", "output": "2"},  # an optional key first seen on row 2
    ]
    parent = make_dataset(client, rows, "alpaca")
    for fmt, loader in (("jsonl", "json"), ("parquet", "parquet")):
        r = client.get(f"/api/datasets/{parent['id']}/export", params={"format": fmt})
        assert r.status_code == 200, r.text
        assert f"{parent['id']}.{fmt}" in r.headers["content-disposition"]
        path = tmp_path / f"rows.{fmt}"
        path.write_bytes(r.content)
        loaded = datasets.load_dataset(loader, data_files=str(path), split="train", cache_dir=str(tmp_path / "hf"))
        assert loaded.num_rows == 2 and loaded[1]["input"] == "1+1" and loaded[0]["output"] == "hi"
    assert pq.read_table(io.BytesIO(r.content)).num_rows == 2
    assert client.get(f"/api/datasets/{parent['id']}/export", params={"format": "csv"}).status_code == 422


def test_other_teams_cannot_curate_or_export(client: TestClient, anonymous: TestClient) -> None:
    from app.models import Role
    from tests.accounts import make_member, make_team

    parent = make_dataset(client, planted_rows(), "private")
    outsider = make_member(make_team(), Role.admin).headers
    assert anonymous.get(f"/api/datasets/{parent['id']}/export", headers=outsider).status_code == 404
    assert anonymous.post(f"/api/datasets/{parent['id']}/curate", json={}, headers=outsider).status_code == 404
    viewer = make_member(client.get("/api/users/me").json()["teams"][0]["id"], Role.viewer).headers
    assert anonymous.get(f"/api/datasets/{parent['id']}/export", headers=viewer).status_code == 200
    assert anonymous.post(f"/api/datasets/{parent['id']}/curate", json={}, headers=viewer).status_code == 403
