"""Training hyperparameters as the API accepts them, and the recipes (named presets) they override.

A request resolves as: defaults < recipe (config/recipes/<name>.yaml) < request overrides. The
result is validated here, so a bad value is a 422 that names the field before anything is queued.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

RECIPES_DIR = Path(__file__).resolve().parents[2] / "config" / "recipes"


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["lora", "qlora", "full"] = Field("lora", description="qlora needs CUDA")
    lora_r: int = Field(16, ge=1, le=1024, description="LoRA rank: higher = more capacity")
    lora_alpha: float = Field(32, gt=0, description="LoRA scaling numerator (alpha / r)")
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    lora_target_modules: str | list[str] = Field(
        "all-linear", description='"all-linear" or module names, e.g. ["q_proj", "v_proj"]'
    )
    learning_rate: float = Field(2e-4, gt=0, le=1)
    epochs: float = Field(1.0, gt=0, le=1000, description="Ignored when max_steps > 0")
    max_steps: int = Field(-1, ge=-1, description="Optimizer steps; -1 = run `epochs`")
    batch_size: int = Field(4, ge=1, le=4096, description="Per-device micro-batch")
    gradient_accumulation_steps: int = Field(1, ge=1, le=4096)
    max_seq_length: int = Field(1024, ge=8)
    packing: bool = Field(False, description="Pack short rows into full sequences")
    eval_fraction: float | None = Field(
        None, ge=0, lt=1, description="Held-out share; default: the dataset's own split"
    )
    seed: int = Field(42, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, le=1)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    weight_decay: float = Field(0.0, ge=0)
    logging_steps: int = Field(1, ge=1)
    eval_steps: int | None = Field(None, ge=1, description="Evaluate every N steps; default: at the end")
    save_steps: int = Field(50, ge=1, description="Checkpoint to storage every N steps")
    gradient_checkpointing: bool = False
    merge_adapter: bool = Field(False, description="Also store a merged full model")

    @model_validator(mode="after")
    def _method_specific(self) -> Hyperparameters:
        if self.method == "full" and self.merge_adapter:
            raise ValueError("merge_adapter only applies to lora and qlora")
        return self


class RecipeNotFound(LookupError):
    pass


def available_recipes(recipes_dir: Path = RECIPES_DIR) -> list[str]:
    return sorted(p.stem for p in recipes_dir.glob("*.yaml"))


def load_recipe(name: str, recipes_dir: Path = RECIPES_DIR) -> dict[str, Any]:
    if name not in available_recipes(recipes_dir):  # also keeps names from becoming paths
        raise RecipeNotFound(f"unknown recipe {name!r}; available: {available_recipes(recipes_dir)}")
    data = yaml.safe_load((recipes_dir / f"{name}.yaml").read_text()) or {}
    values: dict[str, Any] = data.get("hyperparameters", {})
    return values


def resolve(recipe: str | None, overrides: dict[str, Any]) -> Hyperparameters:
    """Merge recipe and overrides; raises RecipeNotFound or pydantic.ValidationError."""
    base = load_recipe(recipe) if recipe else {}
    return Hyperparameters.model_validate({**base, **overrides})
