"""Model card (README.md) for a finished run, in the Hugging Face Hub format.

The YAML front matter carries the metadata the Hub indexes (base_model, library_name, tags, pipeline_tag);
the body documents how the model was trained so the folder is self-describing once it leaves the platform.
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from app.core.contracts.training import RunConfig

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HYPERPARAMETERS = (
    "method",
    "learning_rate",
    "lr_scheduler",
    "warmup_ratio",
    "epochs",
    "max_steps",
    "batch_size",
    "gradient_accumulation_steps",
    "max_seq_length",
    "packing",
    "weight_decay",
    "max_grad_norm",
    "seed",
)
_LORA_HYPERPARAMETERS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")
_ADAPTER_NAMES = {"lora": "LoRA", "qlora": "QLoRA", "full": "full"}
_FRAMEWORKS = ("trl", "transformers", "peft", "torch", "datasets", "tokenizers")


def card_data(cfg: RunConfig, *, merged: bool = False) -> ModelCardData:
    tags = ["trl", "sft", "fine-tuning-studio"]
    tags.append(cfg.method if cfg.uses_adapter else "full-fine-tune")
    if merged:
        tags.append("merged")
    return ModelCardData(
        base_model=cfg.base_model,
        # A merged adapter is a plain transformers checkpoint.
        library_name="peft" if cfg.uses_adapter and not merged else "transformers",
        pipeline_tag="text-generation",
        tags=tags,
        model_name=cfg.experiment_name,
    )


def render_model_card(
    cfg: RunConfig,
    metrics: dict[str, Any],
    extra: dict[str, Any] | None = None,
    *,
    merged: bool = False,
) -> str:
    """Return the README.md text. `extra` holds run facts such as train_rows, total/trainable params.

    `merged` describes the adapter merged into the base weights rather than the adapter itself.
    """
    data = card_data(cfg, merged=merged)
    body = "\n".join(
        [
            f"# {cfg.experiment_name}",
            "",
            _intro(cfg, merged=merged),
            "",
            "## Usage",
            "",
            _usage(cfg, merged=merged),
            "",
            "## Training data",
            "",
            _training_data(cfg, extra or {}),
            "",
            "## Training hyperparameters",
            "",
            _table(_hyperparameters(cfg, extra or {}), header=("Hyperparameter", "Value")),
            "",
            "## Results",
            "",
            _table({k: v for k, v in metrics.items() if v is not None}, header=("Metric", "Value"))
            if metrics
            else "No metrics were recorded.",
            "",
            "## Framework versions",
            "",
            "\n".join(f"- {name}: {version}" for name, version in framework_versions().items()),
            "",
            *_lineage(cfg.lineage),
        ]
    )
    return f"---\n{data.to_yaml()}\n---\n\n{body}"


def write_model_card(
    cfg: RunConfig,
    directory: str | Path,
    metrics: dict[str, Any],
    extra: dict[str, Any] | None = None,
    *,
    merged: bool = False,
) -> Path:
    path = Path(directory) / "README.md"
    # ModelCard parses the front matter back, which catches malformed YAML before it is written.
    card = ModelCard(render_model_card(cfg, metrics, extra, merged=merged))
    path.write_text(str(card), encoding="utf-8")
    return path


def _base_model_link(base_model: str) -> str:
    if _HUB_ID.match(base_model) and not Path(base_model).exists():
        return f"[{base_model}](https://huggingface.co/{base_model})"
    return f"`{base_model}`"


def _intro(cfg: RunConfig, *, merged: bool) -> str:
    kind = {
        "lora": "a LoRA adapter for",
        "qlora": "a QLoRA adapter (trained on a 4-bit NF4 quantised base) for",
        "full": "a full fine-tune of",
    }[cfg.method]
    if merged:
        kind = f"the {_ADAPTER_NAMES[cfg.method]} adapter of this run merged into the weights of"
    return (
        f"This model is {kind} {_base_model_link(cfg.base_model)}, trained with supervised fine-tuning "
        "(TRL `SFTTrainer`) by Fine-Tuning Studio."
    )


def _usage(cfg: RunConfig, *, merged: bool) -> str:
    if cfg.uses_adapter and not merged:
        code = (
            "from peft import AutoPeftModelForCausalLM\n"
            "from transformers import AutoTokenizer\n\n"
            'model = AutoPeftModelForCausalLM.from_pretrained("path/to/this/folder")\n'
            'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")'
        )
    else:
        code = (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")\n'
            'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")'
        )
    return f"```python\n{code}\n```"


def _training_data(cfg: RunConfig, extra: dict[str, Any]) -> str:
    name = cfg.dataset_name or Path(cfg.train_file).name
    lines = [f"- Dataset: {name}"]
    if "train_rows" in extra:
        lines.append(f"- Training rows: {extra['train_rows']}")
    if extra.get("eval_rows"):
        lines.append(f"- Evaluation rows: {extra['eval_rows']}")
    return "\n".join(lines)


def _hyperparameters(cfg: RunConfig, extra: dict[str, Any]) -> dict[str, Any]:
    names = _HYPERPARAMETERS + (_LORA_HYPERPARAMETERS if cfg.uses_adapter else ())
    values: dict[str, Any] = {name: getattr(cfg, name) for name in names}
    if cfg.deepspeed:  # the config's name, as the request gave it
        values["deepspeed"] = Path(cfg.deepspeed).stem
    for key in ("precision", "trainable_params", "total_params"):
        if key in extra:
            values[key] = extra[key]
    return values


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value).replace("|", "\\|")


def _table(rows: dict[str, Any], header: tuple[str, str]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "| --- | --- |"]
    lines += [f"| {key} | {_format(value)} |" for key, value in rows.items()]
    return "\n".join(lines)


def framework_versions(names: tuple[str, ...] = _FRAMEWORKS) -> dict[str, str]:
    """Installed versions of these packages (those not installed are left out)."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _lineage(lineage: dict[str, Any] | None) -> list[str]:
    """Where the run came from, as Fine-Tuning Studio recorded it (GET /api/experiments/{id}/lineage)."""
    if not lineage:
        return []
    dataset = lineage.get("dataset") or {}
    base = lineage.get("base_model") or {}
    rows = {
        "dataset": f"{dataset.get('name')} ({dataset.get('id')})",
        "dataset sha256": dataset.get("content_hash"),
        "dataset made from": dataset.get("parent_id"),
        "dataset origin": dataset.get("origin"),
        "recipe": lineage.get("recipe"),
        "base model": base.get("name"),
        "base model fingerprint": base.get("fingerprint"),
        "cloned from experiment": lineage.get("parent_experiment_id"),
    }
    return ["## Lineage", "", _table({k: v for k, v in rows.items() if v}, header=("Input", "Value")), ""]
