"""Readers hold uploads to their limits as they stream: every problem is a DatasetInvalid naming the row
(and the field when there is one), never another exception."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path
from typing import Any

import psutil
import pytest

from app.core.config import ApiSettings
from app.datasets import readers
from app.datasets.formats import DatasetInvalid, validate_rows
from app.datasets.readers import Limits, check_rows, json_depth, read_rows
from app.datasets.split import split_indices, split_sizes
from app.services.datasets import upload_limits

SMALL = Limits(max_rows=5, max_row_bytes=2048, max_cell_bytes=1024, max_json_depth=4)
CELL_ROW = ('{"text": "' + "é" * 600 + '"}').encode()
LONGER_ROWS = Limits(max_rows=5, max_row_bytes=8192, max_cell_bytes=1024, max_json_depth=4)


def refused(path: Path, kind: readers.FileKind, limits: Limits = SMALL) -> DatasetInvalid:
    with pytest.raises(DatasetInvalid) as info:
        validate_rows(read_rows(path, kind, limits))
    return info.value


def only_error(exc: DatasetInvalid) -> tuple[int, str, str]:
    assert len(exc.errors) == 1, exc.errors
    e = exc.errors[0]
    return e.row, e.field, e.message


def test_limits_default_to_the_settings() -> None:
    assert upload_limits(ApiSettings()) == Limits()


@pytest.mark.parametrize(
    ("text", "depth"),
    [
        ("{}", 1),
        ('{"a": [1, {"b": []}]}', 4),
        ('[[], [[]], {"x": "[[[[[[[["}]', 3),  # brackets inside strings do not count
        (r'{"a": "\"[[[", "b": [[]]}', 3),  # nor after an escaped quote
        ("[" * 50 + "]" * 50, 5),  # stops counting above the limit
        ("[[[[[[[[", 5),  # unpaired brackets count as levels
    ],
)
def test_json_depth_without_recursion(text: str, depth: int) -> None:
    assert json_depth(text, stop_above=4) == depth
    assert json_depth(text.encode(), stop_above=4) == depth


def test_jsonl_rows_past_the_limits_name_row_and_field(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    cases: list[tuple[bytes, tuple[int, str, str]]] = [
        (b'{"a": ' + b"[" * 10 + b"]" * 10 + b"}", (2, "a", "nested deeper than 4 levels (api.max_json_depth)")),
        (b'{"text": "a", "x": [[[[1]]]]}', (2, "x", "nested deeper than 4 levels (api.max_json_depth)")),
        (b"[" * 300 + b"]" * 300, (2, "*", "nested deeper than 4 levels")),  # too deep to parse for a name
        (b"[" * 1000, (2, "*", "nested deeper than 4 levels")),  # never closed
        (CELL_ROW, (2, "text", "1200 bytes, more than the 1024-byte cell limit")),
        (b'{"text": "' + b"a" * 3000 + b'"}', (2, "*", "larger than the 2048-byte row limit (api.max_row_bytes)")),
        (b'{"text": ' + b"1" * 5000 + b"}", (2, "*", "invalid JSON: Exceeds the limit (4300 digits)")),
        (b'{"text": "\xff"}', (2, "*", "invalid JSON")),
    ]
    for bad, (row, field, message) in cases:
        path.write_bytes(b'{"text": "fine"}\n' + bad + b"\n")
        got = only_error(refused(path, "jsonl", LONGER_ROWS if b"1" * 5000 in bad else SMALL))
        assert got[:2] == (row, field) and got[2].startswith(message), (bad[:40], got)


def test_jsonl_cells_are_named_by_their_path(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x" * 1500}]}
    path.write_text(json.dumps(row) + "\n")
    assert only_error(refused(path, "jsonl"))[:2] == (1, "messages[1].content")


def test_a_line_without_newline_is_never_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "one-line.jsonl"
    path.write_bytes(b'{"text": "' + b"a" * 20_000_000)
    tracemalloc.start()
    try:
        assert only_error(refused(path, "jsonl"))[:2] == (1, "*")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3_000_000, peak  # the newline count reads 1 MiB at a time; the line, 2 KB


def test_jsonl_row_cap_counts_rows_not_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('\n\n{"text": "a"}\n\n' * 5)
    assert validate_rows(read_rows(path, "jsonl", SMALL)).value == "text"
    path.write_text('{"text": "a"}\n' * 6)
    row, field, message = only_error(refused(path, "jsonl"))
    assert (row, field) == (6, "*") and "5-row limit (api.max_dataset_rows)" in message


def test_earlier_row_errors_are_kept_when_a_reader_fails(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a"}\n{"oops\n')
    assert [(e.row, e.field) for e in refused(path, "jsonl").errors] == [(1, "output"), (2, "*")]


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 1 << 16])
def test_json_array_streams_across_any_piece_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    monkeypatch.setattr(readers, "CHUNK", chunk)
    rows = [
        {"text": 'a"]}[{ \\ é ✓' * (i % 3), "n": 1234567 + i, "f": -1.5e10, "t": True, "z": None, "l": [i, [i]]}
        for i in range(30)
    ]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=1 if chunk % 2 else None))
    got = list(read_rows(path, "json"))
    assert got == list(enumerate(rows, start=1))
    path.write_text(json.dumps({"meta": {"a": [1, "]"]}, "data": rows, "after": 1}))
    assert list(read_rows(path, "json")) == list(enumerate(rows, start=1))


@pytest.mark.parametrize(
    ("text", "row", "words"),
    [
        ('[{"text": "a"}, {"text": tru}]', 2, "invalid JSON"),
        ('[{"text": "a"} {"text": "b"}]', 1, "expected ',' or ']' after row 1"),
        ('[{"text": "a"},', 2, "invalid JSON: Expecting value"),
        ('[{"text": "a"}', 1, "found the end of the file"),
        ('[{"text": "a"}] [', 0, "extra data"),
        ('{"rows": []}', 0, "must hold a list of rows"),
        ('"text"', 0, "must hold a list of rows"),
        ('[{"text": "a"}, ' + "[" * 50_000 + "]" * 50_000 + "]", 2, "api.max_json_depth"),
        ('[{"text": "a"}, {"text": "' + "b" * 3000 + '"}]', 2, "api.max_row_bytes"),
        ('[{"text": "a"}, {"text": "' + "b" * 1500 + '"}]', 2, "api.max_cell_bytes"),
        ('[{"text": "a"}]' + "\n" + " " * 10, None, ""),
    ],
)
def test_json_array_problems_name_the_row(tmp_path: Path, text: str, row: int | None, words: str) -> None:
    path = tmp_path / "d.json"
    path.write_text(text)
    if row is None:
        assert validate_rows(read_rows(path, "json", SMALL)).value == "text"
        return
    got = only_error(refused(path, "json"))
    assert got[0] == row and words in got[2], got


def test_json_array_element_larger_than_a_row_is_not_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text('[{"text": "' + "a" * 20_000_000 + '"}]')
    tracemalloc.start()
    try:
        assert only_error(refused(path, "json"))[:2] == (1, "*")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3_000_000, peak


def test_csv_cells_and_records(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text('prompt,completion\nhi,"' + "x" * 200_000 + '"\n')  # over csv's own 128 KB default
    assert validate_rows(read_rows(path, "csv")).value == "prompt_completion"
    path.write_text('prompt,completion\nhi,there\nup,"' + "é" * 600 + '"\n')
    assert only_error(refused(path, "csv"))[:2] == (2, "completion")
    path.write_text("prompt,completion\nhi,there\n" + "a," * 1500 + "b\n")
    row, field, message = only_error(refused(path, "csv"))
    assert (row, field) == (2, "*") and "api.max_row_bytes" in message
    path.write_text('\ufeffprompt,completion\n"multi\nline",b\n\nc,d\n')  # BOM, quoted newline, blank line
    assert [r for _, r in read_rows(path, "csv")] == [
        {"prompt": "multi\nline", "completion": "b"},
        {"prompt": "c", "completion": "d"},
    ]
    path.write_bytes(b"prompt,completion\nhi,there\nup,\xff\n")
    row, _, message = only_error(refused(path, "csv"))
    assert row == 2 and "UTF-8" in message


def test_parquet_row_cap_is_read_from_the_footer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": pa.array(["a"] * 6)}), path)
    monkeypatch.setattr(readers, "_materialise", lambda *a: pytest.fail("data was read"))
    with pytest.raises(DatasetInvalid) as info:
        list(readers.parquet_rows(path, SMALL))
    row, field, message = only_error(info.value)
    assert (row, field) == (6, "*") and "the file has 6 rows" in message and "api.max_dataset_rows" in message


def test_parquet_rows_match_arrow(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {
            "messages": [{"role": "user", "content": "hi" * i}, {"role": "assistant", "content": "yo"}],
            "text": None if i % 3 else "abc",
            "n": i,
            "tags": [["a", "b"], []] if i % 2 else None,
        }
        for i in range(700)
    ]
    categories = pa.array([str(i % 4) for i in range(700)]).dictionary_encode()  # a pandas category, say
    table = pa.Table.from_pylist(rows).append_column("cat", categories)
    path = tmp_path / "d.parquet"
    pq.write_table(table, path, row_group_size=300)
    got = list(read_rows(path, "parquet"))  # through the child process
    assert got == list(enumerate(table.to_pylist(), start=1))


def test_parquet_problems(tmp_path: Path) -> None:
    import datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    deep: Any = "x"
    for _ in range(5):
        deep = [deep]
    cases: list[tuple[Any, tuple[int, str], str]] = [
        (pa.table({"text": ["a"], "when": [datetime.datetime(2026, 1, 1)]}), (0, "when"), "has no JSON form"),
        (pa.Table.from_pylist([{"text": "a", "deep": deep}]), (0, "deep"), "api.max_json_depth"),
        (pa.table({"text": ["a", "b" * 3000]}), (2, "*"), "api.max_row_bytes"),  # measured in Arrow
        (pa.table({"text": ["a", "b" * 1500]}), (2, "text"), "api.max_cell_bytes"),
    ]
    for table, where, words in cases:
        pq.write_table(table, path)
        row, field, message = only_error(refused(path, "parquet"))
        assert (row, field) == where and words in message, (where, message)
    path.write_bytes(b"PAR1 not really")
    assert "unreadable Parquet file" in only_error(refused(path, "parquet"))[2]


def test_parquet_decoder_memory_is_capped(tmp_path: Path) -> None:
    """One 20 MB dictionary value on 400 rows: 8 GB decoded, from a file of about 1 KB."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    column = pa.DictionaryArray.from_arrays(pa.array([0] * 400, pa.int32()), pa.array(["x" * (20 << 20)]))
    # Without the Arrow schema in the file, the column reads back as plain strings: 400 copies.
    pq.write_table(
        pa.table({"text": column}), path, compression="zstd", dictionary_pagesize_limit=64 << 20, store_schema=False
    )
    assert path.stat().st_size < 64 * 1024
    limits = Limits(max_row_bytes=64 << 20, max_cell_bytes=64 << 20, parquet_memory_bytes=256 << 20)
    row, field, message = only_error(refused(path, "parquet", limits))
    assert (row, field) == (1, "*") and "api.parquet_memory_bytes" in message


def test_parquet_child_stops_when_the_reader_does(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": [f"r{i}" for i in range(50_000)]}), path)
    rows = read_rows(path, "parquet")
    assert next(rows) == (1, {"text": "r0"})
    child = next(p for p in psutil.Process().children() if "parquet_child" in " ".join(p.cmdline()))
    rows.close()  # kills the child and waits for it
    assert not child.is_running()


def test_inline_rows_are_checked_too() -> None:
    row: Any = {"text": "a", "x": [[[[1]]]]}
    with pytest.raises(DatasetInvalid, match=r"row 2: field 'x': nested deeper than 4"):
        list(check_rows([{"text": "a"}, row], SMALL))
    with pytest.raises(DatasetInvalid, match=r"row 1: field 'text': .*api.max_cell_bytes"):
        list(check_rows([{"text": "é" * 600}], SMALL))
    with pytest.raises(DatasetInvalid, match=r"row 6: .*api.max_dataset_rows"):
        list(check_rows([{"text": "a"}] * 6, SMALL))


@pytest.mark.parametrize("n", [0, 1, 2, 3, 10, 99, 1000])
@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.1, 0.5, 0.99])
def test_split_sizes_match_split_indices(n: int, fraction: float) -> None:
    train, held = split_indices([{"text": str(i)} for i in range(n)], fraction)
    assert split_sizes(n, fraction) == (len(train), len(held))
