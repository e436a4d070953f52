"""Dataset row formats: detect, validate (errors name the row and the field), convert to trl's.

Pure Python on purpose: the API validates uploads with it, and the training worker converts rows
with it, without either importing torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from app.datasets.readers import DatasetInvalid, RowError
from app.models import DatasetFormat

__all__ = ["DatasetInvalid", "RowError", "detect_format", "preference_texts", "to_training_record", "validate_rows"]

MESSAGE_ROLES = {"system", "user", "assistant", "tool"}
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "tool": "tool",
}
MAX_REPORTED_ERRORS = 10
# OpenAI's preference (DPO) rows: {"input": {"messages": [...]}, "preferred_output": [turn],
# "non_preferred_output": [turn]}; stored as uploaded, trained as trl's conversational preference rows.
OPENAI_PREFERENCE = {"input", "preferred_output", "non_preferred_output"}


def detect_format(row: dict[str, Any]) -> DatasetFormat | None:
    """Guess the format from one row's keys; the most specific match wins."""
    keys = set(row)
    if "messages" in keys:
        return DatasetFormat.messages
    if "conversations" in keys:
        return DatasetFormat.sharegpt
    if {"chosen", "rejected"} <= keys or keys >= OPENAI_PREFERENCE:
        return DatasetFormat.preference
    if "instruction" in keys:
        return DatasetFormat.alpaca
    if {"prompt", "completion"} <= keys:
        return DatasetFormat.prompt_completion
    if "text" in keys:
        return DatasetFormat.text
    return None


def _need_text(row: dict[str, Any], field: str, *, allow_empty: bool = False) -> str | None:
    if field not in row or row[field] is None:
        return "is required"
    if not isinstance(row[field], str):
        return f"must be a string, got {type(row[field]).__name__}"
    if not allow_empty and not row[field].strip():
        return "must not be empty"
    return None


def _check_turns(turns: Any, field: str, role_key: str, text_key: str, roles: Iterable[str]) -> list[tuple[str, str]]:
    if not isinstance(turns, list) or not turns:
        return [(field, "must be a non-empty list of turns")]
    allowed = set(roles)
    problems: list[tuple[str, str]] = []
    for i, turn in enumerate(turns):
        where = f"{field}[{i}]"
        if not isinstance(turn, dict):
            problems.append((where, "must be an object"))
        elif turn.get(role_key) not in allowed:
            problems.append((f"{where}.{role_key}", f"must be one of {sorted(allowed)}"))
        elif not isinstance(turn.get(text_key), str):
            problems.append((f"{where}.{text_key}", "must be a string"))
        elif "weight" in turn and not _valid_weight(turn, role_key):
            problems.append((f"{where}.weight", "must be 0 or 1, and only on assistant turns"))
    if not problems and not any(SHAREGPT_ROLES.get(t[role_key]) == "assistant" for t in turns):
        problems.append((field, "needs at least one assistant turn to learn from"))
    return problems


def _problems(row: dict[str, Any], fmt: DatasetFormat) -> list[tuple[str, str]]:
    def texts(*fields: str, optional: tuple[str, ...] = ()) -> list[tuple[str, str]]:
        found = [(f, m) for f in fields if (m := _need_text(row, f))]
        found += [(f, m) for f in optional if f in row and (m := _need_text(row, f, allow_empty=True))]
        return found

    checks: dict[DatasetFormat, Callable[[], list[tuple[str, str]]]] = {
        DatasetFormat.text: lambda: texts("text"),
        DatasetFormat.alpaca: lambda: texts("instruction", "output", optional=("input",)),
        DatasetFormat.prompt_completion: lambda: texts("prompt", "completion"),
        DatasetFormat.preference: lambda: (
            _openai_preference_problems(row) if set(row) >= OPENAI_PREFERENCE else texts("prompt", "chosen", "rejected")
        ),
        DatasetFormat.messages: lambda: _check_turns(row.get("messages"), "messages", "role", "content", MESSAGE_ROLES),
        DatasetFormat.sharegpt: lambda: _check_turns(
            row.get("conversations"), "conversations", "from", "value", SHAREGPT_ROLES
        ),
    }
    return checks[fmt]()


def validate_rows(rows: Iterable[tuple[int, dict[str, Any]]], fmt: DatasetFormat | None = None) -> DatasetFormat:
    """Validate numbered rows; return the (detected) format or raise DatasetInvalid.

    ``rows`` may be a reader that raises DatasetInvalid itself (a row it cannot parse, a limit): its errors
    are reported after those found in the rows before it.
    """
    errors: list[RowError] = []
    seen = 0
    numbered = iter(rows)
    while True:
        try:
            number, row = next(numbered)
        except StopIteration:
            break
        except DatasetInvalid as exc:
            errors += exc.errors
            seen += 1
            break
        seen += 1
        if not isinstance(row, dict):
            errors.append(RowError(number, "*", "must be a JSON object"))
        else:
            if fmt is None:
                fmt = detect_format(row)
                if fmt is None:
                    fields = sorted(row)[:8]
                    errors.append(
                        RowError(
                            number,
                            "*",
                            f"unrecognised format (fields {fields}); "
                            "expected text, messages, conversations, "
                            "instruction/output, prompt/completion or "
                            "prompt/chosen/rejected",
                        )
                    )
                    break
            errors += [RowError(number, f, m) for f, m in _problems(row, fmt)]
        if len(errors) >= MAX_REPORTED_ERRORS:
            break
    if not seen:
        errors.append(RowError(0, "*", "the dataset has no rows"))
    if errors:
        raise DatasetInvalid(errors[:MAX_REPORTED_ERRORS])
    assert fmt is not None
    return fmt


def _openai_preference_problems(row: dict[str, Any]) -> list[tuple[str, str]]:
    source = row["input"]
    if not isinstance(source, dict):
        return [("input", "must be an object with `messages`")]
    turns = source.get("messages")
    if not isinstance(turns, list) or not turns:
        return [("input.messages", "must be a non-empty list of turns")]
    problems: list[tuple[str, str]] = []
    for i, turn in enumerate(turns):
        if (
            not isinstance(turn, dict)
            or turn.get("role") not in MESSAGE_ROLES
            or not isinstance(turn.get("content"), str)
        ):
            problems.append(
                (f"input.messages[{i}]", f"must be {{role: one of {sorted(MESSAGE_ROLES)}, content: text}}")
            )
    for field in ("preferred_output", "non_preferred_output"):
        answer = row[field]
        if (
            not isinstance(answer, list)
            or len(answer) != 1
            or not isinstance(answer[0], dict)
            or answer[0].get("role") != "assistant"
            or not isinstance(answer[0].get("content"), str)
        ):
            problems.append((field, "must be a list of one {role: assistant, content: text} turn"))
    return problems


def _valid_weight(turn: dict[str, Any], role_key: str) -> bool:
    """OpenAI's fine-tuning format: `weight` 0 or 1 on an assistant turn (0 leaves it out of the loss)."""
    weight = turn["weight"]
    return SHAREGPT_ROLES.get(turn[role_key]) == "assistant" and type(weight) is int and weight in (0, 1)


def _turn(role: str, content: str, weight: int | None) -> dict[str, Any]:
    """A turn as the trainer reads it, with its `weight` when the row gave one."""
    turn: dict[str, Any] = {"role": role, "content": content}
    if weight is not None:
        turn["weight"] = weight
    return turn


def preference_texts(row: dict[str, Any]) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) of a validated preference row as plain text, whatever its shape (turns
    joined by newlines): what length and duplicate checks measure."""
    record = to_training_record(row, DatasetFormat.preference)

    def text(value: Any) -> str:
        return "\n".join(str(t.get("content", "")) for t in value) if isinstance(value, list) else str(value)

    return text(record["prompt"]), text(record["chosen"]), text(record["rejected"])


def to_training_record(row: dict[str, Any], fmt: DatasetFormat) -> dict[str, Any]:
    """Convert a validated row to one of the formats trl's SFTTrainer (or, for preferences, DPOTrainer) reads."""
    if fmt is DatasetFormat.text:
        return {"text": row["text"]}
    if fmt is DatasetFormat.messages:
        return {"messages": [_turn(m["role"], m["content"], m.get("weight")) for m in row["messages"]]}
    if fmt is DatasetFormat.sharegpt:
        return {"messages": [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in row["conversations"]]}
    if fmt is DatasetFormat.alpaca:
        prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]}
    if fmt is DatasetFormat.prompt_completion:
        return {"prompt": row["prompt"], "completion": row["completion"]}
    if fmt is DatasetFormat.preference and set(row) >= OPENAI_PREFERENCE:  # trl's conversational preference rows
        return {
            "prompt": [{"role": m["role"], "content": m["content"]} for m in row["input"]["messages"]],
            "chosen": [{"role": "assistant", "content": row["preferred_output"][0]["content"]}],
            "rejected": [{"role": "assistant", "content": row["non_preferred_output"][0]["content"]}],
        }
    if fmt is DatasetFormat.preference:  # trl's standard preference format, for DPO
        return {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}
    raise ValueError(f"unknown dataset format {fmt}")
