from __future__ import annotations

from pathlib import Path

import pytest

from app.datasets.formats import DatasetInvalid, detect_format, to_training_record, validate_rows
from app.datasets.readers import read_rows, sniff_kind
from app.datasets.split import split_indices
from app.models import DatasetFormat

ROWS = {
    DatasetFormat.text: {"text": "Once upon a time."},
    DatasetFormat.messages: {
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    },
    DatasetFormat.sharegpt: {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
    DatasetFormat.alpaca: {"instruction": "Greet", "input": "Bob", "output": "Hello Bob"},
    DatasetFormat.prompt_completion: {"prompt": "2+2=", "completion": "4"},
    DatasetFormat.preference: {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."},
}


@pytest.mark.parametrize("fmt", list(ROWS))
def test_each_format_is_detected_and_validated(fmt: DatasetFormat) -> None:
    assert detect_format(ROWS[fmt]) is fmt
    assert validate_rows([(1, ROWS[fmt])]) is fmt


def test_sharegpt_and_alpaca_become_chat_messages() -> None:
    assert to_training_record(ROWS[DatasetFormat.sharegpt], DatasetFormat.sharegpt) == {
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    }
    alpaca = to_training_record(ROWS[DatasetFormat.alpaca], DatasetFormat.alpaca)
    assert alpaca["messages"][0] == {"role": "user", "content": "Greet\n\nBob"}
    assert alpaca["messages"][1] == {"role": "assistant", "content": "Hello Bob"}


def test_errors_name_row_and_field() -> None:
    rows = [(1, {"instruction": "a", "output": "b"}), (2, {"instruction": "c"}), (3, {"instruction": "d", "output": 5})]
    with pytest.raises(DatasetInvalid) as info:
        validate_rows(rows)
    found = [(e.row, e.field) for e in info.value.errors]
    assert found == [(2, "output"), (3, "output")]
    assert "row 2: field 'output': is required" in str(info.value)


def test_chat_without_assistant_turn_is_refused() -> None:
    with pytest.raises(DatasetInvalid, match="assistant"):
        validate_rows([(1, {"messages": [{"role": "user", "content": "Hi"}]})])
    with pytest.raises(DatasetInvalid, match=r"messages\[0\]\.role"):
        validate_rows([(1, {"messages": [{"role": "robot", "content": "Hi"}]})])


def test_unknown_shape_and_empty_dataset() -> None:
    with pytest.raises(DatasetInvalid, match="unrecognised format"):
        validate_rows([(1, {"question": "?"})])
    with pytest.raises(DatasetInvalid, match="no rows"):
        validate_rows([])


def test_malformed_jsonl_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": oops}\n')
    with pytest.raises(DatasetInvalid) as info:
        validate_rows(read_rows(path, "jsonl"))
    assert info.value.errors[0].row == 4 and "invalid JSON" in info.value.errors[0].message


def test_csv_and_parquet_readers(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    csv_path = tmp_path / "d.csv"
    csv_path.write_text("instruction,input,output\nGreet,,Hello\nCount,to 3,1 2 3\n")
    assert validate_rows(read_rows(csv_path, "csv")) is DatasetFormat.alpaca
    pq_path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "a", "completion": "b"}] * 3), pq_path)
    rows = list(read_rows(pq_path, "parquet"))
    assert [n for n, _ in rows] == [1, 2, 3]
    assert sniff_kind("x.bin", pq_path.read_bytes()[:8]) == "parquet"
    assert sniff_kind(None, b'[{"text"') == "json"


def test_split_is_deterministic_and_order_independent() -> None:
    rows = [{"text": f"row {i}"} for i in range(100)]
    train, held = split_indices(rows, 0.1)
    assert len(held) == 10 and len(train) == 90 and not set(train) & set(held)
    assert split_indices(rows, 0.1) == (train, held)
    reversed_rows = rows[::-1]
    _, held_rev = split_indices(reversed_rows, 0.1)
    assert {reversed_rows[i]["text"] for i in held_rev} == {rows[i]["text"] for i in held}
    assert split_indices(rows[:2], 0.01)[1] != []  # a fraction asked for gives at least one row
    assert split_indices(rows, 0.0)[1] == []


def test_openai_weights_are_validated_and_reach_the_trainer() -> None:

    good = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "bad answer", "weight": 0},
            {"role": "user", "content": "again"},
            {"role": "assistant", "content": "good answer", "weight": 1},
        ]
    }
    assert validate_rows(iter([(1, good)]), None).value == "messages"
    record = to_training_record(good, DatasetFormat.messages)
    assert [m.get("weight") for m in record["messages"]] == [None, 0, None, 1]
    for bad_turn in (
        {"role": "user", "content": "x", "weight": 0},
        {"role": "assistant", "content": "x", "weight": 2},
        {"role": "assistant", "content": "x", "weight": True},
    ):
        row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, bad_turn]}
        with pytest.raises(DatasetInvalid, match=r"row 1.*messages\[2\]\.weight"):
            validate_rows(iter([(1, row)]), None)
