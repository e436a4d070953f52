"""A large dataset's report is computed by a worker on the default queue: the API answers 202 pending
until a `studio worker --queue default` has filled it, then serves the kept report."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.cli.processes import worker_command
from tests.e2e.stack import Stack, wait_for

pytestmark = pytest.mark.e2e


def test_a_large_datasets_report_comes_from_a_default_queue_worker(stack: Stack, tiny_model: Path) -> None:
    rows = [{"prompt": f"question {i}?", "completion": f" answer {i}."} for i in range(60)]  # inline limit: 50
    rows.append(dict(rows[0]))
    with stack.http() as http:
        r = http.post("/api/datasets/", json={"name": "large", "rows": rows, "eval_fraction": 0.0})
        assert r.status_code == 201, r.text
        url, params = f"/api/datasets/{r.json()['id']}/report", {"base_model": str(tiny_model)}
        pending = http.get(url, params=params)
        assert pending.status_code == 202 and pending.json()["status"] == "pending", pending.text
        assert pending.json()["rows_total"] is None
        stack.start("default", worker_command(["default"], "default-test@%h"))
        try:
            ready = wait_for(
                lambda: (r := http.get(url, params=params)).status_code == 200 and r, timeout_s=90, what="the report"
            )
        finally:
            stack.stop("default")
    report = ready.json()
    assert report["status"] == "ready" and report["rows_total"] == 61
    assert report["duplicates"]["exact_groups"] == [[1, 61]] and report["rows"][0]["trained_text"]
