"""Events: the status entries of an experiment's event log, and the trainer child's events that its
supervisor acts on (the child appends them to ``events.jsonl``; metrics and ``started`` pass through as
they are, so a new metric needs no change here)."""

from __future__ import annotations

import time
import traceback as tb
from typing import Any, Literal

from pydantic import BaseModel, Field

# Why a trainer stops early. The supervisor writes the reason into the stop file; "sigterm" is the
# child's own signal handler. Interruptions are the platform taking the process back: the run is
# unfinished, is never `succeeded`, and resumes from its checkpoint as the next attempt.
USER_STOP = "user"
HANDOFF = "handoff"
PAUSE = "pause"  # the user paused the job: like a handoff, but it waits as `paused` instead of requeueing
INTERRUPTIONS = frozenset({"sigterm", HANDOFF, PAUSE})


class StatusEvent(BaseModel):
    """A status change in the experiment event log (``type = "status"``)."""

    status: str
    attempt: int
    worker: str | None = None
    reason: str | None = None
    error: str | None = None

    def data(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class TrainerEvent(BaseModel):
    time: float = Field(default_factory=time.time)


class CheckpointSaved(TrainerEvent):
    type: Literal["checkpoint"] = "checkpoint"
    step: int
    path: str


class Completed(TrainerEvent):
    type: Literal["completed"] = "completed"
    final_dir: str
    metrics: dict[str, Any] = {}
    stopped: bool = False
    merged_dir: str | None = None


class Failed(TrainerEvent):
    """The child's own account of why it died: the exception, not a guess from its log."""

    type: Literal["failed"] = "failed"
    error_type: str
    message: str
    last_frame: str | None = Field(None, description="file:line in function, of the innermost frame")
    traceback: str = ""
    step: int | None = None

    @classmethod
    def from_exception(cls, exc: BaseException, step: int | None = None) -> Failed:
        frames = tb.extract_tb(exc.__traceback__)
        last = f"{frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}" if frames else None
        return cls(
            error_type=type(exc).__name__,
            message=str(exc)[:2000],
            last_frame=last,
            traceback="".join(tb.format_exception(exc))[-20000:],
            step=step,
        )

    def summary(self) -> str:
        """One line for the experiment's ``error``: type, message, and where it was raised."""
        where = f" (at {self.last_frame})" if self.last_frame else ""
        return f"{self.error_type}: {self.message}{where}"[:1000]
