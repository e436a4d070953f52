"""Hostile dataset uploads against a real API process: refused with a 4xx that names the problem, nothing
stored, and the API's peak memory bounded.

Memory is the API process's own high-water mark (``VmHWM`` in /proc/<pid>/status). Before each upload
the mark is reset to the current resident size (``echo 5 > /proc/<pid>/clear_refs``; where the kernel
refuses, the mark since the warm-up is used, which only makes the check stricter), so what is measured
is how far that one request pushed the process's resident memory. The bound, ``GROWTH_LIMIT_MB``, is
stated in docs/reliability.md ("Bounded uploads"). Before streaming, the Parquet file below took the API
from 177 MB to 1.27 GB and the JSONL file to 595 MB, and the CSV and JSON cases answered 500.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import RUN_ID, create_database, drop_database
from tests.e2e.stack import Stack, running_stack

pytestmark = pytest.mark.e2e

GROWTH_LIMIT_MB = 150  # how much one hostile upload may grow the API process's peak resident memory


@dataclass
class Api:
    stack: Stack
    storage: Path

    @property
    def pid(self) -> int:
        return self.stack.procs["api"].pid

    def stored(self) -> tuple[int, list[str]]:
        """Datasets the API lists, and every file under storage's datasets/ folder."""
        with self.stack.http() as http:
            count = http.get("/api/datasets/").json()["count"]
        root = self.storage / "datasets"
        return count, sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []

    def upload(self, name: str, path: Path) -> tuple[httpx.Response, float]:
        """Upload one file; the answer and how many MB it grew the API's peak resident memory."""
        reset = _reset_peak(self.pid)
        before = _status_kb(self.pid, "VmRSS" if reset else "VmHWM")
        with self.stack.http(timeout=300) as http, path.open("rb") as f:
            r = http.post("/api/datasets/upload", files={"file": (name, f)})
        return r, (_status_kb(self.pid, "VmHWM") - before) / 1024


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for process {pid}")


def _reset_peak(pid: int) -> bool:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = f"studio_hostile_{RUN_ID}"
    url = create_database(name)
    data = tmp_path_factory.mktemp("hostile")
    env = {
        "STUDIO_DATA_DIR": str(data),
        "STUDIO_DATABASE__URL": url,
        "STUDIO_BROKER__URL": "",  # kombu's SQLite transport under data: nothing here sends tasks
        "STUDIO_EVENTS__REDIS_URL": "",
    }
    try:
        with running_stack(env, data / "logs", workers=False) as stack:
            api = Api(stack, data / "storage")
            # Warm up every reader once (first imports, the first request's allocations), then delete.
            warm = data / "warm"
            warm.mkdir()
            pq.write_table(pa.table({"text": ["a", "b"]}), warm / "w.parquet")
            (warm / "w.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')
            (warm / "w.json").write_text('[{"text": "a"}, {"text": "b"}]')
            (warm / "w.csv").write_text("text\na\nb\n")
            with stack.http() as http:
                for path in sorted(warm.iterdir()):
                    r = http.post("/api/datasets/upload", files={"file": (path.name, path.read_bytes())})
                    assert r.status_code == 201, r.text
                    assert http.delete(f"/api/datasets/{r.json()['id']}").status_code == 204
            yield api
    finally:
        drop_database(name)


def _refused(api: Api, name: str, path: Path, *words: str) -> dict[str, object]:
    before = api.stored()
    r, grown_mb = api.upload(name, path)
    print(f"{name}: {path.stat().st_size} bytes -> {r.status_code}, peak grew {grown_mb:.0f} MB")
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    body: dict[str, object] = r.json()
    for word in words:
        assert word in str(body["detail"]), body
    assert api.stored() == before, "a refused upload stored something"
    assert grown_mb < GROWTH_LIMIT_MB, f"{name}: the API's peak memory grew by {grown_mb:.0f} MB"
    assert api.stack.procs["api"].poll() is None
    return body


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_large_valid_upload_streams(api: Api, tmp_path: Path, kind: str) -> None:
    """400,000 rows are accepted without the API holding them: memory does not grow with rows. (First in
    the module: memory an earlier request freed stays resident and would hide the growth.)"""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 400_000
    path = tmp_path / f"many.{kind}"
    if kind == "jsonl":
        with path.open("w") as f:
            for i in range(n):
                f.write(f'{{"prompt": "p{i}", "completion": "c{i % 7}"}}\n')
    else:
        prompts, completions = pa.array([f"p{i}" for i in range(n)]), pa.array([f"c{i % 7}" for i in range(n)])
        pq.write_table(pa.table({"prompt": prompts, "completion": completions}), path, row_group_size=n)
    r, grown_mb = api.upload(path.name, path)
    print(f"{path.name}: {path.stat().st_size} bytes -> {r.status_code}, peak grew {grown_mb:.0f} MB")
    assert r.status_code == 201, r.text[:500]
    body = r.json()
    assert (body["row_count"], body["train_rows"], body["eval_rows"]) == (n, n - n // 10, n // 10)
    assert body["format"] == "prompt_completion"
    with api.stack.http() as http:
        preview = http.get(f"/api/datasets/{body['id']}/preview").json()["rows"]
        assert preview[0] == {"prompt": "p0", "completion": "c0"} and len(preview) == 5
        assert http.delete(f"/api/datasets/{body['id']}").status_code == 204
    assert grown_mb < GROWTH_LIMIT_MB, f"{path.name}: the API's peak memory grew by {grown_mb:.0f} MB"


def test_parquet_with_two_million_rows_in_one_row_group(api: Api, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    n = 2_000_000
    pq.write_table(pa.table({"text": pa.array(["hello"] * n)}), path, row_group_size=n)
    assert pq.ParquetFile(path).metadata.num_row_groups == 1
    assert path.stat().st_size < 64 * 1024  # tiny on disk: dictionary + run-length encoding
    body = _refused(api, "rows.parquet", path, "2000000 rows", "api.max_dataset_rows")
    assert body["errors"][0]["field"] == "*"  # type: ignore[index]


def test_jsonl_with_a_million_short_rows(api: Api, tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    with path.open("w") as f:
        for i in range(1_000_000):
            f.write(f'{{"text": "r{i}"}}\n')
    _refused(api, "rows.jsonl", path, "api.max_dataset_rows")


def test_csv_cell_over_the_cell_limit(api: Api, tmp_path: Path) -> None:
    path = tmp_path / "big.csv"
    path.write_text('prompt,completion\nhi,there\nup,"' + "x" * 300_000 + '"\n')
    body = _refused(api, "big.csv", path, "row 2", "'completion'", "api.max_cell_bytes")
    assert body["errors"] == [  # type: ignore[comparison-overlap]
        {"row": 2, "field": "completion", "message": body["errors"][0]["message"]}  # type: ignore[index]
    ]


def test_jsonl_row_nested_deeper_than_python_can_parse(api: Api, tmp_path: Path) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    path = tmp_path / "deep.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b", "extra": ' + deep + "}\n")
    body = _refused(api, "deep.jsonl", path, "row 2", "api.max_json_depth")
    assert body["errors"][0]["row"] == 2  # type: ignore[index]


def test_jsonl_row_nested_past_the_depth_limit(api: Api, tmp_path: Path) -> None:
    path = tmp_path / "deep40.jsonl"
    row = {"text": "a", "extra": json.loads("[" * 40 + "]" * 40)}
    path.write_text(json.dumps(row) + "\n")
    _refused(api, "deep40.jsonl", path, "row 1", "api.max_json_depth")


def test_json_array_with_a_deeply_nested_row(api: Api, tmp_path: Path) -> None:
    deep = "{" + '"a": {' * 50_000 + "}" * 50_000 + "}"
    path = tmp_path / "deep.json"
    path.write_text('[{"text": "a"}, {"text": "b"}, {"text": "c", "extra": ' + deep + "}]")
    body = _refused(api, "deep.json", path, "row 3", "api.max_json_depth")
    assert body["errors"][0]["row"] == 3  # type: ignore[index]


def test_parquet_whose_dictionary_repeats_a_large_value(api: Api, tmp_path: Path) -> None:
    """1,000 rows of five 250 KB strings: 1.25 GB once decoded, from a file of a few KB (one dictionary
    value each, zstd). Refused by the row limit or by the Parquet decoder's memory cap, whichever Arrow
    reaches first; either way the API holds at most one row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "wide.parquet"
    column = pa.DictionaryArray.from_arrays(pa.array([0] * 1000, pa.int32()), pa.array(["x" * 250_000]))
    # Without the Arrow schema in the file, the columns read back as plain strings, each row its own copy.
    pq.write_table(pa.table({f"c{i}": column for i in range(5)}), path, compression="zstd", store_schema=False)
    assert path.stat().st_size < 64 * 1024
    body = _refused(api, "wide.parquet", path, "row 1")
    assert "api.max_row_bytes" in str(body["detail"]) or "api.parquet_memory_bytes" in str(body["detail"]), body
