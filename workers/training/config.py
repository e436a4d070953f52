"""Configuration of one training run, shared by the API process and the training child.

The API process writes a `RunConfig` to JSON; the child process (`python -m workers.training.run`) reads it
back. This module must stay importable without torch/transformers, because the API process imports it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METHODS = ("lora", "qlora", "full")
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "warmup_stable_decay",
)
EVENTS_FILE_NAME = "events.jsonl"
STOP_FILE_NAME = "STOP"


@dataclass
class RunConfig:
    r"""
    Configuration of one supervised fine-tuning run executed by `workers.training.run`.

    Every field is JSON-serialisable, so a run is fully described by its `config.json` and can be replayed on a
    machine that only has the training dependencies installed.
    """

    # Inputs and outputs
    base_model: str = field(
        metadata={"help": "Base model to fine-tune: a local directory or a Hugging Face Hub model id."}
    )
    train_file: str = field(
        metadata={
            "help": "JSONL training file. Each row is in one TRL format: `{'messages': [...]}`, `{'text': ...}` "
            "or `{'prompt': ..., 'completion': ...}`."
        }
    )
    output_dir: str = field(
        metadata={
            "help": "Run directory. Trainer checkpoints go to `output_dir/checkpoints/checkpoint-N`, the final "
            "model to `output_dir/final`."
        }
    )
    eval_file: str | None = field(
        default=None,
        metadata={"help": "Optional JSONL evaluation file in the same format as `train_file`."},
    )
    events_file: str | None = field(
        default=None,
        metadata={"help": "JSON-lines file the run appends its events to. Defaults to `output_dir/events.jsonl`."},
    )
    stop_file: str | None = field(
        default=None,
        metadata={
            "help": "Path polled after every optimizer step; when it exists the run stops gracefully. Defaults "
            "to `output_dir/STOP`."
        },
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={"help": "Trainer checkpoint directory (`.../checkpoint-N`) to resume training from."},
    )
    experiment_name: str = field(
        default="sft-run",
        metadata={"help": "Human-readable name of the run, used in logs and the model card."},
    )
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Name of the training dataset, shown in the model card."},
    )

    # Method
    method: str = field(
        default="lora",
        metadata={
            "help": "Fine-tuning method: `lora` (adapter on a full-precision base), `qlora` (adapter on a 4-bit "
            "NF4 base, needs a CUDA GPU) or `full` (all weights).",
            "choices": list(METHODS),
        },
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout applied to the LoRA input."})
    lora_target_modules: str | list[str] = field(
        default="all-linear",
        metadata={
            "help": "Modules that get a LoRA adapter: `all-linear` or a list of module names such as "
            "`['q_proj', 'v_proj']`."
        },
    )
    merge_adapter: bool = field(
        default=False,
        metadata={
            "help": "For lora/qlora, also save the adapter merged into the base weights to `output_dir/final/merged`."
        },
    )

    # Optimisation
    learning_rate: float = field(default=2e-4, metadata={"help": "Peak learning rate of AdamW."})
    num_train_epochs: float = field(
        default=1.0, metadata={"help": "Number of passes over the training set (ignored if `max_steps` > 0)."}
    )
    max_steps: int = field(
        default=-1,
        metadata={"help": "Total number of optimizer steps. `-1` trains for `num_train_epochs` instead."},
    )
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Micro-batch size per device."})
    per_device_eval_batch_size: int | None = field(
        default=None,
        metadata={"help": "Evaluation batch size per device. Defaults to `per_device_train_batch_size`."},
    )
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Micro-batches accumulated per optimizer step."}
    )
    max_seq_length: int = field(
        default=1024,
        metadata={
            "help": "Maximum tokens per sequence; longer rows are truncated. With packing, the length of each "
            "packed sequence."
        },
    )
    packing: bool = field(
        default=False,
        metadata={"help": "Pack several rows into each `max_seq_length` sequence (TRL best-fit decreasing)."},
    )
    assistant_only_loss: bool = field(
        default=False,
        metadata={
            "help": "For `messages` rows, compute the loss on assistant turns only. Needs a chat template with "
            "`{% generation %}` markers or one TRL knows how to patch."
        },
    )
    seed: int = field(default=42, metadata={"help": "Random seed for adapter init, data order and dropout."})
    warmup_ratio: float = field(
        default=0.0, metadata={"help": "Fraction of the total steps used for linear learning-rate warmup."}
    )
    lr_scheduler_type: str = field(
        default="linear",
        metadata={"help": "Learning-rate schedule after warmup.", "choices": list(LR_SCHEDULERS)},
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm; 0 disables clipping."})
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "Recompute activations in the backward pass to save memory (about 20% slower)."},
    )
    bf16: bool | str = field(
        default="auto",
        metadata={
            "help": "Train in bfloat16 mixed precision: `true`, `false` or `auto` (on when the CUDA device "
            "supports bf16)."
        },
    )
    attn_implementation: str = field(
        default="sdpa",
        metadata={
            "help": "Attention kernel passed to `from_pretrained`: `sdpa`, `eager`, `flash_attention_2`, or a "
            "Hub kernel reference such as `kernels-community/flash-attn`."
        },
    )
    deepspeed: str | None = field(default=None, metadata={"help": "Optional path to a DeepSpeed ZeRO JSON config."})

    # Logging, evaluation and checkpoints
    logging_steps: int = field(default=1, metadata={"help": "Emit a metrics event every N optimizer steps."})
    eval_steps: int | None = field(
        default=None,
        metadata={
            "help": "Evaluate on `eval_file` every N steps. When unset, the eval set is only scored once at the end."
        },
    )
    save_steps: int = field(default=50, metadata={"help": "Write a resumable checkpoint every N steps."})
    save_total_limit: int | None = field(
        default=2, metadata={"help": "Keep at most this many checkpoints (oldest are deleted). None keeps all."}
    )
    save_on_stop: bool = field(
        default=True,
        metadata={"help": "When the stop file ends training early, still save the model to `output_dir/final`."},
    )

    def __post_init__(self) -> None:
        self._validate()
        # Derived defaults are resolved here so the serialised config names every file the run touches.
        if self.events_file is None:
            self.events_file = str(Path(self.output_dir) / EVENTS_FILE_NAME)
        if self.stop_file is None:
            self.stop_file = str(Path(self.output_dir) / STOP_FILE_NAME)

    # ----------------------------------------------------------------------------------------------- validation

    def _validate(self) -> None:
        for name in ("base_model", "train_file", "output_dir"):
            _require(
                isinstance(getattr(self, name), str) and getattr(self, name).strip() != "",
                name,
                "must be a non-empty string",
            )
        _require(self.method in METHODS, "method", f"must be one of {', '.join(METHODS)}, got {self.method!r}")
        _require(_is_int(self.lora_r) and self.lora_r > 0, "lora_r", "must be a positive integer")
        _require(_is_number(self.lora_alpha) and self.lora_alpha > 0, "lora_alpha", "must be > 0")
        _require(_is_number(self.lora_dropout) and 0 <= self.lora_dropout < 1, "lora_dropout", "must be in [0, 1)")
        self._validate_target_modules()
        _require(_is_number(self.learning_rate) and self.learning_rate > 0, "learning_rate", "must be > 0")
        _require(_is_number(self.num_train_epochs) and self.num_train_epochs > 0, "num_train_epochs", "must be > 0")
        _require(
            _is_int(self.max_steps) and (self.max_steps == -1 or self.max_steps > 0),
            "max_steps",
            "must be -1 (use num_train_epochs) or a positive integer",
        )
        for name in (
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "max_seq_length",
            "logging_steps",
            "save_steps",
        ):
            _require(_is_int(getattr(self, name)) and getattr(self, name) > 0, name, "must be a positive integer")
        for name in ("per_device_eval_batch_size", "eval_steps", "save_total_limit"):
            value = getattr(self, name)
            _require(value is None or (_is_int(value) and value > 0), name, "must be a positive integer or null")
        # transformers 5 reads a warmup_steps value below 1 as a ratio, so 1.0 would silently mean "one step".
        _require(_is_number(self.warmup_ratio) and 0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)")
        _require(
            self.lr_scheduler_type in LR_SCHEDULERS,
            "lr_scheduler_type",
            f"must be one of {', '.join(LR_SCHEDULERS)}, got {self.lr_scheduler_type!r}",
        )
        _require(_is_number(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "must be >= 0")
        _require(_is_number(self.max_grad_norm) and self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0")
        _require(_is_int(self.seed) and self.seed >= 0, "seed", "must be a non-negative integer")
        _require(self.bf16 in (True, False, "auto"), "bf16", f"must be true, false or 'auto', got {self.bf16!r}")
        _require(
            isinstance(self.attn_implementation, str) and self.attn_implementation != "",
            "attn_implementation",
            "must be a non-empty string",
        )
        _require(
            not (self.merge_adapter and self.method == "full"),
            "merge_adapter",
            "only applies to lora/qlora (a full fine-tune has no adapter to merge)",
        )
        _require(
            not (self.eval_steps is not None and self.eval_file is None), "eval_steps", "is set but eval_file is not"
        )

    def _validate_target_modules(self) -> None:
        value = self.lora_target_modules
        ok = value == "all-linear" or (
            isinstance(value, list) and len(value) > 0 and all(isinstance(m, str) and m for m in value)
        )
        _require(ok, "lora_target_modules", "must be 'all-linear' or a non-empty list of module names")

    # ---------------------------------------------------------------------------------------------- (de)serialise

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        # A typo in a config key would otherwise silently fall back to the default.
        if unknown:
            raise ValueError(f"unknown RunConfig field(s): {', '.join(unknown)}")
        missing = [f.name for f in dataclasses.fields(cls) if _is_required(f) and f.name not in data]
        if missing:
            raise ValueError(f"missing required RunConfig field(s): {', '.join(missing)}")
        return cls(**data)

    @classmethod
    def from_json(cls, path: str | Path) -> RunConfig:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
        return cls.from_dict(data)

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n", encoding="utf-8")
        return path

    # ------------------------------------------------------------------------------------------------ derived

    @property
    def uses_adapter(self) -> bool:
        return self.method in ("lora", "qlora")

    @property
    def checkpoints_dir(self) -> Path:
        return Path(self.output_dir) / "checkpoints"

    @property
    def final_dir(self) -> Path:
        return Path(self.output_dir) / "final"


def _require(condition: bool, field_name: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{field_name}: {message}")


def _is_int(value: Any) -> bool:
    # bool is an int subclass; `true` in a JSON config is never a meaningful step count.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)) and math.isfinite(value)


def _is_required(f: dataclasses.Field[Any]) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
