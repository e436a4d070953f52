"""Trainer callback that reports progress as JSON lines and honours a stop file.

The supervisor tails `events_file` to follow a run, and asks it to stop by creating `stop_file`. Events are
appended one JSON object per line and flushed immediately, so a reader never sees a partial line for long
and a crash loses at most the event being written.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from app.core.contracts.events import INTERRUPTIONS, TrainerEvent

# Keys copied from the Trainer's training logs into a "metrics" event, under the same name.
_TRAIN_KEYS = (
    "loss",
    "learning_rate",
    "grad_norm",
    "mean_token_accuracy",
    "entropy",
    # DPO: the implicit rewards of the chosen and rejected answers, their margin and how often it is positive.
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)


def _jsonable(value: Any) -> Any:
    """Make a value strict-JSON-safe: tensors/numpy scalars to Python numbers, NaN/inf to None (recursively)."""
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class EventWriter:
    """Appends events to a JSON-lines file; one short `open` per event so the file is never held open."""

    def __init__(self, path: str | Path, enabled: bool = True) -> None:
        self.path = Path(path)
        # Only the main process of a distributed run writes, so events are not duplicated per rank.
        self.enabled = enabled
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, event: TrainerEvent) -> None:
        """Append one of the typed events the supervisor acts on (`app.core.contracts.events`)."""
        data = event.model_dump(mode="json")
        self.emit(data.pop("type"), **data)

    def emit(self, event_type: str, **fields: Any) -> dict[str, Any]:
        event = {"type": event_type, "time": time.time()}
        event.update({key: _jsonable(value) for key, value in fields.items()})
        if self.enabled:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(event, default=str) + "\n")
                f.flush()
        return event


class LossTokenCounter:
    """Wraps the training loader's collate function to count the tokens the loss sees (labels != -100) in every
    batch drawn, so throughput is reported for trained tokens as well as for all tokens. accelerate draws one
    batch ahead, so the count leads the trainer's by at most one batch (and a window's rate shifts with it)."""

    def __init__(self, collate: Any) -> None:
        self.collate = collate
        self.count = 0

    def __call__(self, examples: list[dict[str, Any]]) -> Any:
        batch = self.collate(examples)
        labels = batch.get("labels") if isinstance(batch, dict) else None
        if labels is not None:
            self.count += int((labels != -100).sum())
        return batch


class EventsCallback(TrainerCallback):
    """Writes started/metrics/checkpoint/stopped events and stops training when the stop file appears.

    `started_fields` are merged into the "started" event (model size, dataset sizes, device...), which is
    emitted at `on_train_begin` so it can also report the total number of steps the Trainer computed.
    """

    def __init__(
        self,
        writer: EventWriter,
        stop_file: str | Path | None,
        started_fields: dict[str, Any] | None = None,
    ) -> None:
        self.writer = writer
        self.stop_file = Path(stop_file) if stop_file else None
        self.started_fields = dict(started_fields or {})
        self.stop_reason: str | None = None
        self.stopped_at_step: int | None = None
        self.last_checkpoint: str | None = None
        self._last_log_time: float | None = None
        self._last_log_tokens = 0
        self.loss_tokens: LossTokenCounter | None = None
        self.count_loss_tokens = True  # DPO batches have no labels: its recipe turns the count off
        self._last_loss_tokens = 0

    # ----------------------------------------------------------------------------------------------- stop control

    def request_stop(self, reason: str) -> None:
        """Ask for a graceful stop at the end of the current optimizer step (used by the SIGTERM handler)."""
        if self.stop_reason is None:
            self.stop_reason = reason

    @property
    def stopped(self) -> bool:
        return self.stopped_at_step is not None

    def _stop_requested(self) -> bool:
        if self.stop_reason is None and self.stop_file is not None and self.stop_file.exists():
            # The supervisor writes why ("handoff" when its worker shuts down); a bare file is a user stop.
            self.stop_reason = self.stop_file.read_text(encoding="utf-8", errors="replace").strip() or "stop_file"
        return self.stop_reason is not None

    @property
    def interrupted(self) -> bool:
        """Stopped by the platform (SIGTERM, a handoff), not by the user: the run is unfinished and will
        resume from the checkpoint written at the stop step."""
        return self.stopped and self.stop_reason in INTERRUPTIONS

    # ---------------------------------------------------------------------------------------------------- events

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # Throughput is measured between consecutive logs; on resume the token counter starts from the
        # checkpoint's value, so the baseline is taken from the state rather than zero.
        self._last_log_time = time.time()
        self._last_log_tokens = state.num_input_tokens_seen
        # Count the loss's tokens on the training loader only (evaluation batches must not inflate them).
        loader = kwargs.get("train_dataloader")
        if loader is not None and self.loss_tokens is None and self.count_loss_tokens:
            # accelerate's DataLoaderShard iterates the DataLoader it wraps (`base_dataloader`): the collate
            # function to wrap is that one's, not the adapter's attribute (which nothing calls).
            inner = getattr(loader, "base_dataloader", loader)
            self.loss_tokens = LossTokenCounter(inner.collate_fn)
            inner.collate_fn = self.loss_tokens
        self.writer.emit(
            "started",
            **self.started_fields,
            processes=args.world_size,  # > 1 under `accelerate launch` (DDP / DeepSpeed)
            max_steps=state.max_steps,
            num_train_epochs=state.num_train_epochs,
            start_step=state.global_step,
        )

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        if not self.stopped and self._stop_requested() and state.global_step < state.max_steps:
            control.should_training_stop = True
            # Write a checkpoint at the stop step too, so a stopped run can be resumed where it left off.
            control.should_save = True
            self.stopped_at_step = state.global_step
            self.writer.emit("stopped", step=state.global_step, reason=self.stop_reason)
        return control

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not logs:
            return
        if "eval_loss" in logs:
            self._emit_eval(state, logs)
        elif "loss" in logs:
            self._emit_train(state, logs)
        # Anything else is the end-of-training summary (train_loss, train_runtime...), which the run reports
        # in its "completed" event instead.

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        # on_save fires after the Trainer wrote weights, optimizer, RNG and trainer_state.json and rotated old
        # checkpoints, so the directory named here is complete and safe to resume from.
        path = Path(args.output_dir or ".").resolve() / f"checkpoint-{state.global_step}"
        if path.is_dir():
            self.last_checkpoint = str(path)
            self.writer.emit("checkpoint", step=state.global_step, path=str(path))

    # --------------------------------------------------------------------------------------------------- helpers

    def _emit_train(self, state: TrainerState, logs: dict[str, Any]) -> None:
        # tokens_per_second covers the window since the previous training log, so it tracks current speed
        # (the Trainer's own train_tokens_per_second is a since-start average); eval or checkpoint time that
        # falls inside the window counts against it.
        now = time.time()
        tokens = state.num_input_tokens_seen
        fields: dict[str, Any] = {"step": state.global_step, "epoch": state.epoch}
        fields.update({key: logs[key] for key in _TRAIN_KEYS if key in logs})
        elapsed = now - (self._last_log_time or now)
        if tokens:
            fields["num_tokens"] = tokens
            if elapsed > 0:
                fields["tokens_per_second"] = (tokens - self._last_log_tokens) / elapsed
        if self.loss_tokens is not None:  # tokens the loss saw: answers only, unless train_on_prompt
            trained = self.loss_tokens.count
            fields["num_loss_tokens"] = trained
            if elapsed > 0:
                fields["loss_tokens_per_second"] = (trained - self._last_loss_tokens) / elapsed
            self._last_loss_tokens = trained
        self._last_log_time, self._last_log_tokens = now, tokens
        self.writer.emit("metrics", **fields)

    def _emit_eval(self, state: TrainerState, logs: dict[str, Any]) -> None:
        fields: dict[str, Any] = {"step": state.global_step, "epoch": state.epoch}
        fields.update({key: value for key, value in logs.items() if key.startswith("eval_")})
        self.writer.emit("metrics", **fields)


def is_main_process() -> bool:
    """True on the process that owns the event log (rank 0, or a plain single-process run)."""
    return int(os.environ.get("RANK", "0")) == 0
