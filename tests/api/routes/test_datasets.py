from __future__ import annotations

import datetime
import io
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import func, select

from app.core.config import get_settings
from app.core.db import session_scope
from app.main import app
from app.models import Dataset

ALPACA = [{"instruction": f"Say {i}", "input": "", "output": f"{i}!"} for i in range(20)]


def jsonl(rows: list[dict[str, object]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _counts() -> tuple[int, int]:
    with session_scope() as session:
        n = session.exec(select(func.count()).select_from(Dataset)).one()
    storage = Path(get_settings().storage.root) / "datasets"
    return n, len(list(storage.glob("*"))) if storage.exists() else 0


def test_upload_jsonl_detects_format_and_splits(client: TestClient) -> None:
    r = client.post(
        "/api/datasets/upload", files={"file": ("alpaca.jsonl", jsonl(ALPACA))}, data={"eval_fraction": "0.25"}
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["format"], body["row_count"], body["train_rows"], body["eval_rows"]) == ("alpaca", 20, 15, 5)
    assert body["name"] == "alpaca" and len(body["content_hash"]) == 64
    again = client.post("/api/datasets/upload", files={"file": ("x.jsonl", jsonl(ALPACA))}).json()
    assert again["content_hash"] == body["content_hash"]

    listed = client.get("/api/datasets/").json()
    assert body["id"] in [d["id"] for d in listed["data"]] and listed["count"] >= 2
    assert client.get(f"/api/datasets/{body['id']}").json()["row_count"] == 20
    preview = client.get(f"/api/datasets/{body['id']}/preview").json()
    assert preview["rows"][0] == ALPACA[0] and len(preview["rows"]) == 5


def test_upload_csv_json_and_parquet(client: TestClient) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([{"text": f"line {i}"} for i in range(4)]), buf)
    cases = [
        ("d.csv", b"prompt,completion\nhi,there\nup,down\n", "prompt_completion"),
        (
            "d.json",
            json.dumps([{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}]).encode(),
            "sharegpt",
        ),
        ("d.parquet", buf.getvalue(), "text"),
    ]
    for name, content, fmt in cases:
        r = client.post("/api/datasets/upload", files={"file": (name, content)})
        assert r.status_code == 201, r.text
        assert r.json()["format"] == fmt


def test_inline_rows(client: TestClient) -> None:
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}] * 3
    r = client.post("/api/datasets/", json={"name": "chat", "rows": rows})
    assert r.status_code == 201 and r.json()["format"] == "messages"


def test_bad_files_are_refused_and_store_nothing(client: TestClient) -> None:
    before = _counts()
    lines = [json.dumps(r) for r in ALPACA[:10]]
    lines[6] = '{"instruction": "broken", '
    r = client.post("/api/datasets/upload", files={"file": ("bad.jsonl", "\n".join(lines).encode())})
    assert r.status_code == 422 and r.json()["errors"][0]["row"] == 7
    assert "row 7" in r.json()["detail"]

    missing = [*ALPACA[:3], {"instruction": "no answer"}]
    r = client.post("/api/datasets/upload", files={"file": ("m.jsonl", jsonl(missing))})
    assert r.status_code == 422
    assert r.json()["errors"] == [{"row": 4, "field": "output", "message": "is required"}]

    r = client.post("/api/datasets/upload", files={"file": ("f.jsonl", jsonl(ALPACA))}, data={"format": "text"})
    assert r.status_code == 422 and "'text'" in r.json()["detail"]
    r = client.post("/api/datasets/upload", files={"file": ("f.jsonl", jsonl(ALPACA))}, data={"eval_fraction": "1.5"})
    assert r.status_code == 422 and "eval_fraction" in r.text
    assert _counts() == before


def test_upload_over_the_limit_is_413(client: TestClient) -> None:
    settings = get_settings().model_copy(deep=True)
    settings.api.max_upload_bytes = 1000
    app.dependency_overrides[get_settings] = lambda: settings
    try:
        before = _counts()
        r = client.post("/api/datasets/upload", files={"file": ("big.jsonl", jsonl(ALPACA * 5))})
        assert r.status_code == 413 and "file" in r.json()["detail"]
        assert _counts() == before
    finally:
        app.dependency_overrides.clear()


def test_unknown_dataset_is_404(client: TestClient) -> None:
    r = client.get("/api/datasets/00000000-0000-0000-0000-00000000abcd")
    assert r.status_code == 404 and "not found" in r.json()["detail"]


def test_upload_filename_never_reaches_the_filesystem(client: TestClient, tmp_path: Path) -> None:
    target = tmp_path / "escaped.jsonl"
    crafted = f"../../../../../../{target}"
    r = client.post("/api/datasets/upload", files={"file": (crafted, b'{"text": "hello"}\n')})
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "escaped"
    assert not target.exists()


def test_stored_rows_are_the_validated_rows(client: TestClient) -> None:
    from app.core.layout import read_dataset_rows
    from app.core.storage import get_storage

    # The last row writes an emoji as a JSON surrogate-pair escape: one character once parsed, stored as such.
    body = "".join(json.dumps(r) + "\n" for r in ALPACA[:3]) + '{"instruction": "s", "output": "\\ud83d\\ude00"}\n'
    r = client.post("/api/datasets/upload", files={"file": ("s.jsonl", body.encode())})
    assert r.status_code == 201, r.text
    stored = read_dataset_rows(get_storage(), uuid.UUID(r.json()["id"]))
    assert stored == [*ALPACA[:3], {"instruction": "s", "output": "\U0001f600"}]


def test_csv_cell_larger_than_csv_default_limit_is_accepted(client: TestClient) -> None:
    """csv's own field limit is 128 KB; ours is api.max_cell_bytes (256 KiB). This answered 500."""
    from app.core.layout import read_dataset_rows
    from app.core.storage import get_storage

    cell = "x" * 200_000
    r = client.post("/api/datasets/upload", files={"file": ("c.csv", f"prompt,completion\nhi,{cell}\n".encode())})
    assert r.status_code == 201, r.text
    assert read_dataset_rows(get_storage(), uuid.UUID(r.json()["id"])) == [{"prompt": "hi", "completion": cell}]


def test_hostile_rows_are_422_naming_row_and_field(client: TestClient) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    before = _counts()
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": ["a"], "when": [datetime.datetime(2026, 1, 1)]}), buf)
    deep: Any = "x"
    for _ in range(40):
        deep = [deep]
    cases = [
        ("t.parquet", buf.getvalue(), 0, "when", "no JSON form"),
        ("d.jsonl", jsonl([{"text": "a"}, {"text": "b", "x": deep}]), 2, "x", "api.max_json_depth"),
        ("d.json", json.dumps([{"text": "a"}, {"text": "b", "x": deep}]).encode(), 2, "x", "api.max_json_depth"),
        ("c.csv", b'prompt,completion\nhi,"' + b"x" * 300_000 + b'"\n', 1, "completion", "api.max_cell_bytes"),
        ("n.json", b'[{"text": ' + b"1" * 5000 + b"}]", 1, "*", "invalid JSON"),
    ]
    for name, content, row, field, words in cases:
        r = client.post("/api/datasets/upload", files={"file": (name, content)})
        assert r.status_code == 422, (name, r.text[:300])
        error = r.json()["errors"][0]
        assert (error["row"], error["field"]) == (row, field) and words in error["message"], (name, error)

    inline = [{"text": "a"}, {"text": "b", "x": deep}]
    r = client.post("/api/datasets/", json={"name": "deep", "rows": inline})
    assert r.status_code == 422 and r.json()["errors"][0] | {"message": ""} == {"row": 2, "field": "x", "message": ""}
    r = client.post("/api/datasets/", json={"name": "big", "rows": [{"text": "é" * 200_000}]})
    assert r.status_code == 422 and "api.max_cell_bytes" in r.json()["detail"]
    assert _counts() == before


def test_row_limit_comes_from_the_settings(client: TestClient) -> None:
    settings = get_settings().model_copy(deep=True)
    settings.api.max_dataset_rows = 3
    app.dependency_overrides[get_settings] = lambda: settings
    try:
        before = _counts()
        r = client.post("/api/datasets/upload", files={"file": ("many.jsonl", jsonl(ALPACA[:4]))})
        assert r.status_code == 422 and "3-row limit (api.max_dataset_rows)" in r.json()["detail"], r.text
        assert r.json()["errors"][0]["row"] == 4
        r = client.post("/api/datasets/", json={"name": "many", "rows": ALPACA[:4]})
        assert r.status_code == 422 and "api.max_dataset_rows" in r.json()["detail"], r.text
        assert _counts() == before
        r = client.post("/api/datasets/upload", files={"file": ("few.jsonl", jsonl(ALPACA[:3]))})
        assert r.status_code == 201, r.text
    finally:
        app.dependency_overrides.clear()


@pytest.mark.parametrize("escaped", ["\\ud800", "\\udfff"])
def test_half_a_surrogate_pair_is_refused_naming_the_row(client: TestClient, escaped: str) -> None:
    """A JSON escape can put a lone surrogate in a cell (or a key): text with no UTF-8 form, which no
    tokenizer or response could carry (the preview answered 500). It is a 422 naming the row."""
    what = f"U+{escaped[2:].upper()}, half of a surrogate pair"
    good = json.dumps({"text": "fine"})
    for bad in ('{"text": "a' + escaped + 'b"}', '{"k' + escaped + '": "v", "text": "x"}'):
        body = f"{good}\n{bad}\n"
        before = client.get("/api/datasets/").json()["count"]
        r = client.post("/api/datasets/upload", files={"file": ("s.jsonl", body.encode())})
        assert r.status_code == 422, r.text
        assert "row 2" in r.text and what in r.text, r.text
        assert client.get("/api/datasets/").json()["count"] == before
