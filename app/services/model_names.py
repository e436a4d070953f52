"""The OpenAI `model` names of fine-tuned runs: `ft:<base>:<team-or-suffix>:<id>`, and `...:ckpt-step-<n>` for
one of their checkpoints. Every experiment gets one at submit, so a run answers at /v1/chat/completions by
that name once it succeeds, without a separate deployment step (it is deployed on first use)."""

from __future__ import annotations

import re
import uuid

FT_PREFIX = "ft:"
CHECKPOINT_MARK = ":ckpt-step-"
PART_CHARS = 30  # each of base and owner: with the id and a checkpoint mark, within a deployment name's 100


def _part(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._")[:PART_CHARS].strip("-._") or "model"


def fine_tuned_model_name(base_model: str, owner: str, experiment_id: uuid.UUID) -> str:
    """``owner``: the job's suffix, or the team's name. The id is the experiment's first 12 hex digits."""
    base = base_model.rstrip("/").rsplit("/", 1)[-1]
    return f"{FT_PREFIX}{_part(base)}:{_part(owner)}:{experiment_id.hex[:12]}"


def checkpoint_model_name(fine_tuned_model: str, step: int) -> str:
    return f"{fine_tuned_model}{CHECKPOINT_MARK}{step}"


def split_checkpoint(name: str) -> tuple[str, int | None]:
    """(the run's model name, the checkpoint step or None) of a name a client passed as `model`."""
    head, mark, step = name.rpartition(CHECKPOINT_MARK)
    if mark and step.isdigit() and len(step) <= 9:
        return head, int(step)
    return name, None
