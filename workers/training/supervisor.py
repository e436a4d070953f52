"""Supervise one training attempt: prepare the run dir, launch the trainer child, relay its events.

The child (``python -m workers.training.run config.json``) knows nothing of the database: it writes
JSON lines to ``events.jsonl``. This side persists them (fenced on the attempt), uploads
checkpoints and the final artifacts to storage, heartbeats, and kills the child's whole process
group on stop. A crash of the trainer is a failed job, never a dead worker.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.exc import InterfaceError, OperationalError
from sqlmodel import col, select

from app.core.config import Settings, get_settings
from app.core.contracts.events import HANDOFF, INTERRUPTIONS, PAUSE, USER_STOP, CheckpointSaved, Completed, Failed
from app.core.contracts.training import DEEPSPEED_DIR, Hyperparameters, RunConfig, TrainMessage
from app.core.db import session_scope
from app.core.event_log import Fenced
from app.core.layout import TRAIN_LOG_FILE, artifact_prefix, checkpoint_prefix, read_dataset_rows
from app.core.storage import Storage, download_prefix, get_storage, upload_dir
from app.datasets.formats import to_training_record
from app.datasets.split import split_indices
from app.models import Dataset, Experiment, ExperimentEvent, ExperimentStatus
from workers import jobs
from workers.training.model_card import framework_versions

log = logging.getLogger(__name__)
T = TypeVar("T")
PROJECT_ROOT = Path(__file__).resolve().parents[2]
KEEP_CHECKPOINTS = 2  # per attempt, in storage; resume needs only the newest


@dataclass
class RunFiles:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def events(self) -> Path:
        return self.root / "events.jsonl"

    @property
    def stop(self) -> Path:
        return self.root / "STOP"

    @property
    def log(self) -> Path:
        return self.root / "train.log"

    @property
    def output(self) -> Path:
        return self.root / "out"


def run_training(message: TrainMessage, worker: str) -> str:
    """Entry point of the Celery task. Returns the outcome for the worker log."""
    experiment_id, attempt = message.experiment_id, message.attempt
    settings, storage = get_settings(), get_storage()
    retry_s = settings.training.db_retry_s
    experiment = jobs.with_db_retries("claim", lambda: jobs.claim(experiment_id, attempt, worker), retry_s)
    if experiment is None:
        log.info("experiment %s attempt %s: not claimable, skipping duplicate", experiment_id, attempt)
        return "skipped"
    files = RunFiles(Path(settings.training.work_dir) / str(experiment_id) / f"attempt-{attempt}")
    try:
        prepare_run(experiment, files, settings, storage)
    except (OperationalError, InterfaceError):  # the database stayed away past the retry budget
        raise
    except Exception as exc:
        log.exception("preparing experiment %s failed", experiment_id)
        error = f"setup failed: {exc}"
        jobs.with_db_retries(
            "finish", lambda: jobs.finish(experiment_id, attempt, ExperimentStatus.failed, error=error), retry_s
        )
        return "failed"
    libraries = library_versions()
    jobs.with_db_retries("record libraries", lambda: jobs.record_libraries(experiment_id, attempt, libraries), retry_s)
    supervision = Supervision(experiment_id, attempt, files, settings, storage, processes=experiment.gpus)
    with _sigterm_hands_off(supervision):
        outcome = supervision.run()
    if outcome != "lost":
        shutil.rmtree(files.root, ignore_errors=True)
    return outcome


@contextlib.contextmanager
def _sigterm_hands_off(supervision: Supervision) -> Iterator[None]:
    """While a job runs, SIGTERM to this process (a systemd stop, a node drain) asks for a handoff
    (checkpoint, requeue at once) instead of killing the supervisor and orphaning the job until the
    stale window passes. Celery's own warm shutdown asks the same through the row (`request_handoff`)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: supervision.hand_off())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------- preparation


def prepare_run(experiment: Experiment, files: RunFiles, settings: Settings, storage: Storage) -> None:
    """Write the datasets and the resolved config the child reads; fetch a checkpoint to resume."""
    if files.root.exists():
        shutil.rmtree(files.root)
    files.root.mkdir(parents=True)
    params = Hyperparameters.model_validate(experiment.hyperparameters)
    dataset, validation, resume_key = jobs.with_db_retries(
        "read the run's inputs", lambda: _run_inputs(experiment), settings.training.db_retry_s
    )
    rows = read_dataset_rows(storage, dataset.id)
    if validation is not None:  # a separate validation dataset: train on every row, evaluate on its rows
        train_idx = list(range(len(rows)))
        eval_records = [to_training_record(r, validation.format) for r in read_dataset_rows(storage, validation.id)]
    else:
        eval_fraction = dataset.eval_fraction if params.eval_fraction is None else params.eval_fraction
        train_idx, eval_idx = split_indices(rows, eval_fraction)
        eval_records = [to_training_record(rows[i], dataset.format) for i in eval_idx]
    _write_jsonl(files.root / "train.jsonl", (to_training_record(rows[i], dataset.format) for i in train_idx))
    if eval_records:
        _write_jsonl(files.root / "eval.jsonl", eval_records)
    resume_dir = None
    if resume_key:
        resume_dir = files.root / "resume" / resume_key.rsplit("/", 1)[-1]
        download_prefix(storage, resume_key, resume_dir)
    config = RunConfig(
        **params.model_dump(exclude={"eval_steps", "deepspeed"}),
        eval_steps=params.eval_steps if eval_records else None,  # nothing held out, so nothing to evaluate
        base_model=experiment.base_model,
        train_file=str(files.root / "train.jsonl"),
        eval_file=str(files.root / "eval.jsonl") if eval_records else None,
        output_dir=str(files.output),
        events_file=str(files.events),
        stop_file=str(files.stop),
        # The supervisor owns checkpoint retention: it uploads each one, then deletes the local copy.
        # Trainer-side rotation could delete a checkpoint before it has been uploaded.
        save_total_limit=None,
        resume_from_checkpoint=str(resume_dir) if resume_dir else None,
        deepspeed=str(DEEPSPEED_DIR / f"{params.deepspeed}.json") if params.deepspeed else None,
        experiment_name=experiment.name,
        dataset_name=dataset.name,
        lineage={**(experiment.lineage or {}), "libraries": library_versions()},
    )
    config.to_json(files.config)


LIBRARIES = (
    "torch",
    "transformers",
    "peft",
    "trl",
    "accelerate",
    "datasets",
    "tokenizers",
    "bitsandbytes",
    "deepspeed",
)


def library_versions() -> dict[str, str]:
    """The training stack of this worker (the trainer child runs in the same environment)."""
    return framework_versions(LIBRARIES)


def _run_inputs(experiment: Experiment) -> tuple[Dataset, Dataset | None, str | None]:
    """The experiment's dataset, its validation dataset if it has one, and the storage key of its last
    complete checkpoint (to resume from)."""
    with session_scope() as session:
        dataset = session.get(Dataset, experiment.dataset_id)
        assert dataset is not None
        validation_id = experiment.validation_dataset_id
        validation = session.get(Dataset, validation_id) if validation_id else None
        return dataset, validation, _last_checkpoint_key(session, experiment.id)


def _last_checkpoint_key(session: Any, experiment_id: uuid.UUID) -> str | None:
    event = session.exec(
        select(ExperimentEvent)
        .where(ExperimentEvent.experiment_id == experiment_id, ExperimentEvent.type == "checkpoint")
        .order_by(col(ExperimentEvent.seq).desc())
        .limit(1)
    ).first()
    return event.data.get("key") if event else None


def _write_jsonl(path: Path, records: Any) -> None:
    with path.open("w") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------- supervision


def _die_with_parent() -> None:
    """Child side of fork: get SIGKILL if the supervising worker dies, so no orphan holds a GPU."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def trainer_command(config_path: Path, processes: int = 1) -> list[str]:
    """The trainer child; a job asking for several GPUs runs one process per GPU under `accelerate launch`
    (DDP, or DeepSpeed when its config asks), on a CPU worker as many processes over gloo."""
    python = get_settings().training.python or sys.executable
    if processes > 1:
        gpus = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
        # --multi_gpu is accelerate's torchrun launcher; without GPUs its processes meet over gloo (MULTI_CPU).
        backend = ["--multi_gpu", "--gpu_ids", ",".join(gpus[:processes])] if gpus else ["--multi_gpu"]
        return [
            python,
            "-m",
            "accelerate.commands.launch",
            *backend,
            "--num_processes",
            str(processes),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "workers.training.run",
            str(config_path),
        ]
    return [python, "-m", "workers.training.run", str(config_path)]


@dataclass
class Supervision:
    experiment_id: uuid.UUID
    attempt: int
    files: RunFiles
    settings: Settings
    storage: Storage
    completed: Completed | None = None
    failure: Failed | None = None
    stopped: dict[str, Any] | None = None  # the child's "stopped" event: why and at which step
    stop_requested: bool = False
    handoff: threading.Event = field(default_factory=threading.Event)
    pause: threading.Event = field(default_factory=threading.Event)  # the user paused the job
    wake: threading.Event = field(default_factory=threading.Event)  # the heartbeat acts now, not at its next beat
    processes: int = 1  # the job's GPUs (processes on a CPU worker): more than one runs under accelerate
    _events_offset: int = 0
    _stored_checkpoints: list[str] = field(default_factory=list)

    def hand_off(self) -> None:
        """Checkpoint and hand the job back now (safe in a signal handler). The heartbeat thread is woken:
        a small model trains dozens of steps in one heartbeat interval, and a job that reached its end
        meanwhile would be reported `succeeded` by a worker that was asked to stop."""
        self.handoff.set()
        self.wake.set()

    def run(self) -> str:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        with self.files.log.open("wb") as log_file:
            proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                trainer_command(self.files.config, self.processes),
                cwd=PROJECT_ROOT,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        try:
            return self._watch(proc)
        finally:
            _kill_group(proc.pid, signal.SIGKILL)  # nothing of the job outlives its supervision
            proc.wait()

    def _watch(self, proc: subprocess.Popen[bytes]) -> str:
        # Heartbeats, stop and fencing run on their own thread, so a long checkpoint or final upload neither
        # makes the job look dead to the reaper nor delays a stop; this loop relays events and uploads.
        beat = Heartbeat(self, proc)
        beat.start()
        try:
            while True:
                beat.tick()
                try:
                    if beat.fenced.is_set():
                        raise Fenced("heartbeat fenced")
                    self._relay_events()
                except Fenced:
                    log.warning(
                        "experiment %s attempt %s lost ownership; killing trainer", self.experiment_id, self.attempt
                    )
                    return "lost"
                if proc.poll() is not None:
                    break
                time.sleep(0.2)
            self.stop_requested = beat.stop_requested.is_set()
            return self._conclude(proc.returncode)
        finally:
            beat.close()

    def _conclude(self, returncode: int) -> str:
        """Record the end truthfully: the user's stop → cancelled; a run that trained to its end →
        succeeded; the user's pause → paused (resumes from its checkpoint when started); one the platform
        interrupted (SIGTERM, a handoff) → the next attempt, queued now; anything else → failed with the
        child's own error."""
        job, attempt = self.experiment_id, self.attempt
        try:
            self._relay_events()
            if self.stop_requested:
                self._db("finish", lambda: jobs.finish(job, attempt, ExperimentStatus.cancelled))
                return "cancelled"
            if returncode == 0 and self.completed is not None and not self.completed.stopped:
                prefix = artifact_prefix(job)
                upload_dir(self.storage, Path(self.completed.final_dir), prefix)
                self.storage.put_file(f"{prefix}/{TRAIN_LOG_FILE}", self.files.log)
                metrics = self.completed.metrics
                self._db(
                    "finish",
                    lambda: jobs.finish(job, attempt, ExperimentStatus.succeeded, final_metrics=metrics),
                )
                return "succeeded"
            if self.pause.is_set():  # checkpointed at the stop step (or the last one, if killed at the grace)
                self._db("pause", lambda: jobs.finish(job, attempt, ExperimentStatus.paused))
                log.info("experiment %s paused at %s", job, self._resume_point())
                return "paused"
            if interruption := self._interruption(returncode):
                reason = f"{interruption}; resumes from {self._resume_point()} as attempt {attempt + 1}"
                handed = self._db("hand off", lambda: jobs.hand_off(job, attempt, reason))
                log.warning("experiment %s attempt %s: %s", job, attempt, reason)
                return "handed off" if handed else "lost"
            if returncode == -signal.SIGKILL and self.failure is None:  # not ours: ours end as cancel or handoff
                limits = self.settings.training
                lost = self._db(
                    "record the lost attempt",
                    lambda: jobs.lose(
                        job,
                        attempt,
                        what="the trainer was killed (SIGKILL: out of memory?)",
                        max_attempts=limits.max_attempts,
                        backoff_s=limits.requeue_backoff_s,
                    ),
                )
                return f"trainer killed; job {lost}" if lost else "lost"
            tail = _tail(self.files.log, self.settings.training.log_tail_lines)
            error = self._failure_reason(returncode)
            self._db(
                "finish",
                lambda: jobs.finish(job, attempt, ExperimentStatus.failed, error=error, log_tail=tail),
            )
            return "failed"
        except Fenced:
            return "lost"

    def _interruption(self, returncode: int) -> str | None:
        """Why the run ended early without the user asking, if it did: it must not count as a success."""
        if self.handoff.is_set():
            return "handed off: its worker is shutting down"
        if self.pause.is_set():
            return "paused"
        reason = (self.stopped or {}).get("reason")
        if reason in INTERRUPTIONS or (self.completed is not None and self.completed.stopped):
            return f"interrupted ({reason or 'stopped early'}) at step {(self.stopped or {}).get('step')}"
        if returncode == -signal.SIGTERM:
            return "interrupted: the trainer was terminated (SIGTERM)"
        return None

    def _resume_point(self) -> str:
        return self._stored_checkpoints[-1].rsplit("/", 1)[-1] if self._stored_checkpoints else "its last checkpoint"

    def _db(self, what: str, operation: Callable[[], T]) -> T:
        return jobs.with_db_retries(what, operation, self.settings.training.db_retry_s)

    def _relay_events(self) -> None:
        """Persist new complete lines of the child's events file."""
        if not self.files.events.exists():
            return
        with self.files.events.open("rb") as f:
            f.seek(self._events_offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written waits
        self._events_offset += len(complete)
        batch: list[tuple[str, dict[str, Any]]] = []
        for line in complete.splitlines():
            event = json.loads(line)
            kind = event.pop("type")
            if kind == "checkpoint":
                batch.append(("checkpoint", self._store_checkpoint(CheckpointSaved.model_validate(event))))
            elif kind == "completed":
                self.completed = Completed.model_validate(event)
            elif kind == "failed":
                self.failure = Failed.model_validate(event)
            elif kind in ("metrics", "started", "stopped"):
                batch.append((kind, event))
                if kind == "stopped":
                    self.stopped = event
        self._db("record events", lambda: jobs.add_events(self.experiment_id, self.attempt, batch))
        self._prune_checkpoints()

    def _prune_checkpoints(self) -> None:
        """Drop older stored checkpoints, only once newer ones are recorded (resume reads the events)."""
        for key in self._stored_checkpoints[:-KEEP_CHECKPOINTS]:
            self.storage.delete_prefix(key)
        del self._stored_checkpoints[:-KEEP_CHECKPOINTS]

    def _failure_reason(self, returncode: int) -> str:
        """The child's own error (type, message, where) when it reported one; else how it ended."""
        if self.failure is not None:
            return self.failure.summary()
        if returncode < 0:
            with contextlib.suppress(ValueError):
                return f"trainer killed by signal {signal.Signals(-returncode).name}"
        return f"trainer exited with code {returncode} without reporting an error"

    def _store_checkpoint(self, event: CheckpointSaved) -> dict[str, Any]:
        """Upload a finished checkpoint and free its local disk."""
        local = Path(event.path)
        key = f"{checkpoint_prefix(self.experiment_id)}/{local.name}"
        upload_dir(self.storage, local, key)
        shutil.rmtree(local, ignore_errors=True)
        self._stored_checkpoints.append(key)
        return {"step": event.step, "key": key, "time": event.time}


class Heartbeat(threading.Thread):
    """Beats every ``training.heartbeat_interval_s`` until closed, and acts on what it learns at once:
    a stop request → stop file + SIGTERM to the trainer's group, SIGKILL after ``stop_grace_s``; a handoff
    (this worker is shutting down) → the same with ``handoff_grace_s`` for the checkpoint; lost
    ownership → SIGKILL. If the supervising loop stops ticking for ``stall_after_s`` (a hung upload), it
    stops beating and kills the trainer, so the reaper gives the job to another worker."""

    def __init__(self, supervision: Supervision, proc: subprocess.Popen[bytes]) -> None:
        super().__init__(name=f"heartbeat-{supervision.experiment_id}", daemon=True)
        self.job, self.proc = supervision, proc
        self.limits = supervision.settings.training
        self.stop_requested = threading.Event()
        self.fenced = threading.Event()
        self._closed = threading.Event()
        self._ticked = time.monotonic()

    def tick(self) -> None:
        self._ticked = time.monotonic()

    def run(self) -> None:
        kill_at: float | None = None
        handing_off = False
        while not self._closed.is_set():
            now = time.monotonic()
            if now - self._ticked > self.limits.stall_after_s:
                log.error(
                    "supervisor of experiment %s stalled for %.0f s; giving the job up",
                    self.job.experiment_id,
                    now - self._ticked,
                )
                self._kill(signal.SIGKILL)
                self.fenced.set()
                return
            try:
                orders = jobs.heartbeat(self.job.experiment_id, self.job.attempt, pid=self.proc.pid)
            except Fenced:
                self._kill(signal.SIGKILL)
                self.fenced.set()
                return
            except Exception:  # a database blip: the next beat tries again (the reaper allows stale_after_s)
                log.exception("heartbeat for experiment %s failed", self.job.experiment_id)
                orders = jobs.Orders(stop=False, handoff=False, pause=False)
            if orders.handoff:
                self.job.handoff.set()
            if orders.pause and not self.job.pause.is_set() and not self.job.handoff.is_set():
                self.job.pause.set()  # checkpoint at the end of the step, then the job waits as paused
                self._ask_trainer_to_stop(PAUSE)
                kill_at = now + self.limits.handoff_grace_s
            if orders.stop and not self.stop_requested.is_set():
                self.stop_requested.set()
                self._ask_trainer_to_stop(USER_STOP)
                kill_at = now + self.limits.stop_grace_s
            elif self.job.handoff.is_set() and not handing_off and not self.stop_requested.is_set():
                handing_off = True  # checkpoint at the end of the step, within handoff_grace_s
                log.warning("experiment %s: worker shutting down; handing the job off", self.job.experiment_id)
                self._ask_trainer_to_stop(HANDOFF)
                kill_at = now + self.limits.handoff_grace_s
            if kill_at is not None and now >= kill_at:
                self._kill(signal.SIGKILL)
            self.job.wake.wait(self.limits.heartbeat_interval_s)
            self.job.wake.clear()

    def _ask_trainer_to_stop(self, reason: str) -> None:
        """The stop file says why (the trainer's callback reads it at the end of a step); SIGTERM makes it look
        now. Written then renamed, so the trainer never reads a half-written reason."""
        partial = self.job.files.stop.with_suffix(".partial")
        partial.write_text(reason, encoding="utf-8")
        partial.replace(self.job.files.stop)
        self._kill(signal.SIGTERM)

    def _kill(self, sig: signal.Signals) -> None:
        if self.proc.returncode is None:  # not reaped yet, so its process group id is still ours
            _kill_group(self.proc.pid, sig)

    def close(self) -> None:
        self._closed.set()
        self.job.wake.set()
        self.join(timeout=self.limits.heartbeat_interval_s + 30)


def _kill_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)  # the child leads its own session, so its pgid is its pid


def _tail(path: Path, lines: int) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
