"""The dataset report: what training on these rows with this base model will meet, computed before it runs.

One pass over every row, with the model's own tokenizer and chat template (``templates.py``, no
transformers): each row's length in tokens as the trainer will see it, the rows ``max_seq_length``
cuts (and those it cuts before the first trained token: they teach nothing), duplicates exact and near,
short answers, encoding and language anomalies, the first rows rendered with what the loss sees, and the
memory and time estimate (``estimate.py``). Problems that would make training fail or useless are
``blocking``; the rest are ``warnings``. Pure: the API runs it for small datasets, a worker on the
default queue for large ones (``workers/reports.py``), and both store the same document.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from app.core.chat_spans import SpansNotFound, assistant_spans
from app.datasets.estimate import TrainingShape, estimate
from app.datasets.formats import preference_texts, to_training_record
from app.datasets.quality import (
    answer_text,
    canonical,
    encoding_anomaly,
    exact_groups,
    histogram,
    near_duplicates,
    percentile,
    row_text,
    script_outliers,
    token_counter,
)
from app.datasets.templates import load_renderer, record_preview
from app.models.common import utcnow
from app.models.datasets import DatasetFormat, DatasetReportRecord, ReportStatus

REPORT_VERSION = 1  # part of the cache key: a report computed by older code is computed again
NEAR_THRESHOLD = 0.85
SHORT_ANSWER_CHARS = 3
LISTED = 50  # row numbers listed per finding (the counts are complete)


def compute_report(
    rows: Sequence[dict[str, Any]],
    fmt: DatasetFormat,
    model_dir: Path,
    *,
    max_seq_length: int,
    train_on_prompt: bool,
    shape: TrainingShape,
    sample_rows: int = 3,
) -> dict[str, Any]:
    """The report document (the ``DatasetReport`` fields besides the request's own); row numbers are 1-based."""
    texts = [row_text(row, fmt) for row in rows]
    blocking: list[str] = []
    warnings: list[str] = []
    report: dict[str, Any] = {"rows_total": len(rows)}

    lengths = _token_lengths(rows, fmt, model_dir)
    if lengths is None:
        report["tokens"] = None
        warnings.append("the base model has no tokenizer.json: token lengths and truncation are not measured")
    else:
        full = [total for total, _ in lengths]
        cut = [i for i, total in enumerate(full) if total > max_seq_length]
        untrained = [i for i, (_, first) in enumerate(lengths) if first is not None and first >= max_seq_length]
        report["tokens"] = {
            "total": sum(full),
            "mean": round(sum(full) / max(len(full), 1), 1),
            "p50": percentile(full, 0.5),
            "p90": percentile(full, 0.9),
            "p99": percentile(full, 0.99),
            "max": max(full, default=0),
            "histogram": histogram(full),
        }
        report["truncation"] = {
            "max_seq_length": max_seq_length,
            "rows": len(cut),
            "share": round(len(cut) / max(len(rows), 1), 4),
            "row_numbers": [i + 1 for i in cut[:LISTED]],
            "answer_cut_off_rows": [i + 1 for i in untrained[:LISTED]],
            "answer_cut_off": len(untrained),
        }
        if cut:
            warnings.append(
                f"{len(cut)} of {len(rows)} rows are longer than max_seq_length {max_seq_length} and will be cut"
            )
        if untrained and not train_on_prompt:
            message = (
                f"{len(untrained)} rows reach max_seq_length {max_seq_length} before their answer: they teach nothing"
            )
            (blocking if len(untrained) == len(rows) else warnings).append(message)

    exact = exact_groups([canonical(row) for row in rows])
    unique = [i for i in range(len(rows)) if not any(i in g[1:] for g in exact)] if exact else list(range(len(rows)))
    near = near_duplicates(unique, texts, NEAR_THRESHOLD)
    report["duplicates"] = {
        "exact_groups": [[i + 1 for i in g] for g in exact[:LISTED]],
        "exact_rows": sum(len(g) - 1 for g in exact),
        "near_threshold": NEAR_THRESHOLD,
        "near_pairs": [[i + 1, j + 1] for i, j in list(near.items())[:LISTED]],
        "near_rows": len(near),
    }
    if exact or near:
        warnings.append(f"{report['duplicates']['exact_rows']} exact and {len(near)} near-duplicate rows")

    short = [i for i, row in enumerate(rows) if len(answer_text(row, fmt).strip()) < SHORT_ANSWER_CHARS]
    report["short_answers"] = {
        "under_chars": SHORT_ANSWER_CHARS,
        "rows": len(short),
        "row_numbers": [i + 1 for i in short[:LISTED]],
    }
    if short:
        warnings.append(f"{len(short)} rows have an answer under {SHORT_ANSWER_CHARS} characters")

    anomalies: list[dict[str, Any]] = [
        {"row": i + 1, "kind": "encoding", "detail": why} for i, t in enumerate(texts) if (why := encoding_anomaly(t))
    ]
    main_script, outliers = script_outliers(texts)
    anomalies += [
        {"row": i + 1, "kind": "script", "detail": f"written in {script} script; most rows are {main_script}"}
        for i, script in outliers.items()
    ]
    anomalies.sort(key=lambda a: a["row"])
    report["anomalies"] = {
        "rows": len({a["row"] for a in anomalies}),
        "main_script": main_script,
        "listed": anomalies[:LISTED],
    }
    if anomalies:
        warnings.append(f"{report['anomalies']['rows']} rows with encoding or language anomalies")

    if fmt is not DatasetFormat.preference:
        samples = []
        for number, row in enumerate(rows[:sample_rows], start=1):
            preview = record_preview(model_dir, to_training_record(row, fmt), train_on_prompt=train_on_prompt) or {}
            samples.append(
                {"row": number, **{k: preview.get(k) for k in ("rendered", "tokens", "trained_tokens", "problem")}}
            )
            samples[-1]["trained_text"] = preview.get("trained_text", [])
            if preview.get("problem") and not train_on_prompt:  # training on everything needs no spans
                blocking.append(f"row {number}: {preview['problem']}")
        report["rows"] = samples
    else:
        report["rows"] = []

    tokens_per_epoch = report["tokens"]["total"] if report.get("tokens") else None
    report["estimate"] = estimate(model_dir, shape, max_seq_length=max_seq_length, tokens_per_epoch=tokens_per_epoch)
    report["blocking"] = blocking
    report["warnings"] = warnings
    return report


def _token_lengths(
    rows: Sequence[dict[str, Any]], fmt: DatasetFormat, model_dir: Path
) -> list[tuple[int, int | None]] | None:
    """Per row: its tokens as the trainer sees them, and the position of its first trained token (None
    when all of the row is trained, as for plain text). None when the model has no tokenizer.json."""
    count = token_counter(model_dir)
    render = load_renderer(model_dir)
    if count is None or render is None:
        return None
    eos = _eos(model_dir)
    lengths: list[tuple[int, int | None]] = []
    for row in rows:
        if fmt is DatasetFormat.preference:
            prompt, chosen, rejected = preference_texts(row)
            longest = max(chosen, rejected, key=len)
            lengths.append((count(prompt + longest + eos), count(prompt)))
            continue
        record = to_training_record(row, fmt)
        if "messages" in record:
            lengths.append(_chat_lengths(record["messages"], render, count))
        elif "prompt" in record:
            lengths.append((count(record["prompt"] + record["completion"] + eos), count(record["prompt"])))
        else:
            lengths.append((count(record["text"] + eos), None))
    return lengths


def _chat_lengths(messages: list[dict[str, Any]], render: Any, count: Callable[[str], int]) -> tuple[int, int | None]:
    try:
        text, spans = assistant_spans(messages, render)
    except SpansNotFound:
        return count(render(messages, False)), None  # reported as a blocking problem by the sample rows
    return count(text), (count(text[: spans[0][0]]) if spans else None)


def _eos(model_dir: Path) -> str:
    import json

    config = model_dir / "tokenizer_config.json"
    token = json.loads(config.read_text(encoding="utf-8")).get("eos_token") if config.is_file() else None
    return str(token.get("content", "") if isinstance(token, dict) else token or "")


def fill_record(record: DatasetReportRecord, *, rows: Sequence[dict[str, Any]], fmt: DatasetFormat) -> None:
    """Compute ``record``'s report from its request (the API's and the worker's one way to do it): ready
    with the result, or failed with the reason (a template or tokenizer the report cannot run)."""
    request = record.request
    try:
        record.result = compute_report(
            rows,
            fmt,
            Path(request["base_model"]),
            max_seq_length=request["max_seq_length"],
            train_on_prompt=request["train_on_prompt"],
            shape=TrainingShape(**request["shape"]),
            sample_rows=request["sample_rows"],
        )
        record.status, record.error = ReportStatus.ready, None
    except Exception as exc:
        record.status, record.error = ReportStatus.failed, f"{type(exc).__name__}: {exc}"[:2000]
    record.finished_at = utcnow()
