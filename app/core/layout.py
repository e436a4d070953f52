"""Where things live in object storage: the one module that builds storage keys.

Keys are built from ids only (user-supplied names never become part of a key). Every writer and reader,
API or worker, asks here, so the layout can change in one place.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from app.core.storage import Storage

DATASET_ROWS_FILE = "rows.jsonl"
TRAIN_LOG_FILE = "train.log"


def dataset_prefix(dataset_id: uuid.UUID) -> str:
    return f"datasets/{dataset_id}"


def dataset_rows_key(dataset_id: uuid.UUID) -> str:
    """The validated rows, one JSON object a line, as training and evaluation read them."""
    return f"{dataset_prefix(dataset_id)}/{DATASET_ROWS_FILE}"


def dataset_source_key(dataset_id: uuid.UUID, kind: str) -> str:
    """The uploaded file as it came (``kind`` is the detected file type, never the user's file name)."""
    return f"{dataset_prefix(dataset_id)}/source.{kind}"


def experiment_prefix(experiment_id: uuid.UUID) -> str:
    return f"experiments/{experiment_id}"


def artifact_prefix(experiment_id: uuid.UUID) -> str:
    """The run's deliverable: adapter or model, tokenizer, model card, metrics, train log."""
    return f"{experiment_prefix(experiment_id)}/artifacts"


def checkpoint_prefix(experiment_id: uuid.UUID) -> str:
    """Resumable trainer checkpoints, one ``checkpoint-N`` folder each."""
    return f"{experiment_prefix(experiment_id)}/checkpoints"


def read_dataset_rows(storage: Storage, dataset_id: uuid.UUID, limit: int | None = None) -> list[dict[str, Any]]:
    """The dataset's rows in order (the first ``limit`` only, read as a stream, when given)."""
    rows: list[dict[str, Any]] = []
    with storage.open(dataset_rows_key(dataset_id)) as f:
        for line in f:
            if limit is not None and len(rows) >= limit:
                break
            if line.strip():
                rows.append(json.loads(line))
    return rows


STORED_MODEL = "storage:"  # a base model that is a run's own weights in storage (a full fine-tune, a merge)


def stored_model(prefix: str) -> str:
    """The base model name of weights stored under ``prefix``: inference workers fetch them from storage."""
    return f"{STORED_MODEL}{prefix}"
