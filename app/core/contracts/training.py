"""The one training vocabulary: what a request may ask for (`Hyperparameters`) and what the trainer
child runs (`RunConfig` = those hyperparameters + the files of one attempt).

The API validates a request into `Hyperparameters` (a bad value is a 422 that names the field before
anything is queued); the supervisor adds the attempt's paths and writes a `RunConfig`; the child
(`python -m workers.training.run config.json`) parses that file with the same model. There is no
second set of names, defaults or checks anywhere. Needs only pydantic, so it loads on a GPU box that
has nothing of the API installed.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StringConstraints, model_validator

Method = Literal["lora", "qlora", "full"]
LrScheduler = Literal[
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "warmup_stable_decay",
]
ModuleName = Annotated[str, StringConstraints(min_length=1, max_length=200)]
DeepSpeedName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9_]{1,40}$")]  # a file stem of config/deepspeed
DEEPSPEED_DIR = Path(__file__).resolve().parents[3] / "config" / "deepspeed"


def deepspeed_configs(directory: Path = DEEPSPEED_DIR) -> list[str]:
    """The DeepSpeed configs a run may name (`deepspeed: zero3` is config/deepspeed/zero3.json)."""
    return sorted(p.stem for p in directory.glob("*.json"))


EVENTS_FILE_NAME = "events.jsonl"
STOP_FILE_NAME = "STOP"


class TrainMessage(BaseModel):
    """The Celery message of `studio.train`: a wake-up call that names the job and the attempt to claim."""

    experiment_id: uuid.UUID
    attempt: int = Field(ge=1)

    def kwargs(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class Hyperparameters(BaseModel):
    """Knobs of a fine-tuning run, as requests and recipes (config/recipes/*.yaml) name them."""

    model_config = ConfigDict(extra="forbid")

    method: Method = Field(
        "lora",
        description="lora: adapter on a full-precision base; qlora: adapter on a 4-bit NF4 base (CUDA only); "
        "full: all weights",
    )
    objective: Literal["sft", "dpo"] = Field(
        "sft",
        description="sft: learn the answers (supervised); dpo: prefer `chosen` over `rejected` answers (direct "
        "preference optimization, trl's DPOTrainer) on a preference dataset",
    )
    dpo_beta: float = Field(0.1, gt=0, le=10, description="dpo: how far the policy may move from the reference model")
    lora_r: int = Field(16, ge=1, le=1024, description="LoRA rank: higher = more capacity and memory")
    lora_alpha: int = Field(32, ge=1, le=1_000_000, description="LoRA scaling numerator (scale = alpha / r)")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout applied to the LoRA input")
    lora_target_modules: Literal["all-linear"] | Annotated[list[ModuleName], Field(min_length=1, max_length=64)] = (
        Field("all-linear", description='"all-linear" or module names, e.g. ["q_proj", "v_proj"]')
    )
    merge_adapter: bool = Field(False, description="lora/qlora: also store the adapter merged into the base")
    learning_rate: float = Field(2e-4, gt=0, le=1, description="Peak learning rate of AdamW")
    epochs: float = Field(1.0, gt=0, le=1000, description="Passes over the train set; ignored when max_steps > 0")
    max_steps: int = Field(-1, ge=-1, description="Optimizer steps; -1 = run `epochs`")
    batch_size: int = Field(4, ge=1, le=4096, description="Micro-batch per device")
    gradient_accumulation_steps: int = Field(1, ge=1, le=4096, description="Micro-batches per optimizer step")
    max_seq_length: int = Field(1024, ge=8, description="Tokens per sequence; longer rows are cut")
    packing: bool = Field(False, description="Pack short rows into full max_seq_length sequences")
    train_on_prompt: bool = Field(
        False,
        description="Also train on prompts (system and user turns, the prompt of prompt/completion rows); by default "
        "the loss sees the answers only: assistant turns with their end-of-turn marker, and completions",
    )
    eval_fraction: float | None = Field(None, ge=0, lt=1, description="Held-out share; default: the dataset's own")
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Seed of adapter init, data order and dropout")
    # transformers 5 reads a warmup value below 1 as a ratio, so 1.0 would silently mean "one step".
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Share of the steps spent warming the LR up")
    lr_scheduler: LrScheduler = Field("linear", description="Learning-rate schedule after warmup")
    weight_decay: float = Field(0.0, ge=0, le=10, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, ge=0, le=1e6, description="Gradient clipping norm; 0 disables it")
    logging_steps: int = Field(1, ge=1, description="Emit a metrics event every N optimizer steps")
    eval_steps: int | None = Field(None, ge=1, description="Evaluate every N steps; default: once at the end")
    save_steps: int = Field(50, ge=1, description="Checkpoint to storage every N steps")
    gradient_checkpointing: bool = Field(False, description="Recompute activations: less memory, ~20% slower")
    deepspeed: DeepSpeedName | None = Field(
        None,
        description="DeepSpeed ZeRO config of config/deepspeed (zero2: optimizer and gradients sharded; zero3: "
        "weights too), for a job on several GPUs of a CUDA queue",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Hyperparameters:
        if self.method == "full" and self.merge_adapter:
            raise ValueError("merge_adapter only applies to lora and qlora (a full fine-tune has no adapter)")
        if self.max_steps == 0:
            raise ValueError("max_steps must be -1 (use epochs) or a positive number")
        if self.objective == "dpo" and self.packing:
            raise ValueError("packing does not apply to dpo (each row is a chosen/rejected pair)")
        return self

    @property
    def uses_adapter(self) -> bool:
        return self.method in ("lora", "qlora")


class RunConfig(Hyperparameters):
    """One attempt of a run, as the trainer child reads it from `config.json`: the hyperparameters plus the
    attempt's files and the knobs the platform (not the request) decides."""

    base_model: str = Field(min_length=1, description="Local model directory or Hugging Face Hub id")
    train_file: str = Field(min_length=1, description="JSONL rows: messages, text or prompt/completion (TRL formats)")
    output_dir: str = Field(min_length=1, description="Checkpoints go to output_dir/checkpoints, the result to final")
    eval_file: str | None = Field(None, description="Held-out JSONL rows in the train file's format")
    events_file: str | None = Field(None, description="JSON lines of progress; default output_dir/events.jsonl")
    stop_file: str | None = Field(None, description="Stop after the step once it exists; default output_dir/STOP")
    resume_from_checkpoint: str | None = Field(None, description="A trainer checkpoint directory to resume from")
    experiment_name: str = Field("sft-run", description="Shown in logs and the model card")
    dataset_name: str | None = Field(None, description="Shown in the model card")
    lineage: dict[str, Any] | None = Field(
        None, description="Where the run came from (dataset version, recipe, base model, libraries): in the model card"
    )
    bf16: StrictBool | Literal["auto"] = Field(
        "auto", description="bfloat16 mixed precision; auto = where the GPU has it"
    )
    attn_implementation: str = Field("sdpa", min_length=1, description="Attention kernel for from_pretrained")
    deepspeed: str | None = Field(None, description="Path of the DeepSpeed ZeRO JSON config (the request names it)")
    per_device_eval_batch_size: int | None = Field(None, ge=1, description="Default: batch_size")
    # The supervisor owns checkpoint retention (it uploads each one, then deletes it); None keeps all.
    save_total_limit: int | None = Field(2, ge=1, description="Keep at most this many local checkpoints")
    save_on_stop: bool = Field(True, description="Still save final/ when the stop file ends the run early")

    @model_validator(mode="after")
    def _files(self) -> RunConfig:
        if self.eval_steps is not None and self.eval_file is None:
            raise ValueError("eval_steps is set but eval_file is not")
        # Resolved here so the written config names every file the run touches.
        self.events_file = self.events_file or str(Path(self.output_dir) / EVENTS_FILE_NAME)
        self.stop_file = self.stop_file or str(Path(self.output_dir) / STOP_FILE_NAME)
        return self

    @classmethod
    def from_json(cls, path: str | Path) -> RunConfig:
        return cls.model_validate_json(Path(path).read_text(encoding="utf-8"))

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8")
        return path

    @property
    def checkpoints_dir(self) -> Path:
        return Path(self.output_dir) / "checkpoints"

    @property
    def final_dir(self) -> Path:
        return Path(self.output_dir) / "final"
